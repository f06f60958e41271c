"""The small MLP and the seeded global micro-batches that the distributed test workers share.

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
