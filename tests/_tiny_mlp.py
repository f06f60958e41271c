"""The small models (an MLP; a one-layer GPT-2 with its token dataset) and the seeded global
micro-batches that the distributed test workers share.

Every rank and the single-process reference build the same model and draw the same global batch;
a rank trains on its slice ``[rank * PER_RANK, (rank + 1) * PER_RANK)``.
"""

import torch

PER_RANK = 4


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )


def micro_batch(index, world):
    return torch.randn(PER_RANK * world, 24, generator=torch.Generator().manual_seed(index))


def tiny_gpt2_and_tokens():
    """A one-layer GPT-2 (width 32, vocabulary 96, no dropout) and a dataset of 32 seeded
    sequences of 16 tokens, for the ``transformers.Trainer`` workers."""
    import transformers

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 32

        def __getitem__(self, index):
            ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(index))
            return {"input_ids": ids, "labels": ids}

    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=96, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    return transformers.GPT2LMHeadModel(config), Tokens()
