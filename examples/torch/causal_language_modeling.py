#!/usr/bin/env python
"""Train a causal language model with accelerate and Flora: compressed accumulation, layer-wise updates.

A plain accelerate training loop; the only Flora-specific lines are the optimizer and the
``FloraAccelerator`` constructor. The model is a Hugging Face ``transformers`` model built from a
config preset (``--model gpt2-tiny|gpt2-small|gpt2|llama-1b``) or loaded from a local folder
(``--model-path``); nothing is downloaded. The text comes from a local file (``--train-file``) or
from a corpus of :mod:`flora_lab.data` (``--dataset``; ``shakespeare_sample`` ships with the
lab), tokenized with UTF-8 bytes or a byte-level BPE trained on the training split.

Examples (CPU, a few minutes)::

    PYTHONPATH=. python examples/torch/causal_language_modeling.py --optimizer flora --rank 16 \
        --gradient-accumulation-steps 4 --accumulation-rank 16 --max-steps 30
    PYTHONPATH=. python examples/torch/causal_language_modeling.py --optimizer flora --rank 16 \
        --gradient-accumulation-steps 4 --accumulation-rank 16 --layerwise --activation-checkpointing

The last line reports the validation loss, the peak memory (on a GPU ``torch.cuda.max_memory_allocated``;
on a CPU the exact peak of live tensor bytes over the first two optimizer steps, measured with
:class:`flora_lab.livebytes.LiveTensorBytes`) and the training throughput in tokens/s (steps after the
measured ones).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import time

import numpy as np
import torch
from tqdm.auto import tqdm

import flora_opt
from flora_lab import data
from flora_lab.livebytes import LiveTensorBytes

PRESETS = {
    # name: (architecture, config kwargs)
    "gpt2-tiny": ("gpt2", dict(n_layer=4, n_embd=128, n_head=4)),
    "gpt2-small": ("gpt2", dict(n_layer=6, n_embd=384, n_head=6)),
    "gpt2": ("gpt2", dict()),  # GPT-2 small, 124M
    "llama-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=22,
            num_attention_heads=32,
            num_key_value_heads=4,
        ),
    ),
}


def enable_activation_checkpointing(model):
    """Non-reentrant activation checkpointing of every layer (transformers >= 5 and older names)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description="Causal LM training with accelerate and Flora.")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", default="gpt2-tiny", choices=sorted(PRESETS), help="config preset (random init)")
    source.add_argument("--model-path", default=None, help="local folder of a transformers causal LM (no download)")
    parser.add_argument("--dataset", default="shakespeare_sample", choices=data.DATASETS)
    parser.add_argument("--train-file", default=None, help="a local UTF-8 text file (instead of --dataset)")
    parser.add_argument("--validation-file", default=None, help="default: every 10th chunk of --train-file")
    parser.add_argument(
        "--tokenizer",
        default="bytes",
        choices=["bytes", "bpe", "model"],
        help="bytes, a BPE trained on the training text, or the --model-path folder's tokenizer",
    )
    parser.add_argument("--vocab-size", type=int, default=1024, help="BPE vocabulary size")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4, help="micro-batch size")
    parser.add_argument("--gradient-accumulation-steps", type=int, default=4)
    parser.add_argument("--max-steps", type=int, default=30, help="optimizer steps")
    parser.add_argument("--optimizer", default="flora", choices=["adamw", "adafactor", "flora"])
    parser.add_argument("--lr", type=float, default=None, help="default: 1e-3 (adamw), 1e-2 (adafactor, flora)")
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--rank", type=int, default=64, help="Flora momentum rank")
    parser.add_argument("--accumulation-rank", type=int, default=None, help="compressed accumulation rank")
    parser.add_argument("--layerwise", action="store_true", help="update each tensor inside backward")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--max-grad-norm", type=float, default=1.0, help="0 disables clipping")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--mixed-precision", default="no", choices=["no", "bf16", "fp16"])
    parser.add_argument("--eval-batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None, help="accelerator.save_state here at the end")
    parser.add_argument("--resume-from", default=None, help="accelerator.load_state from here first")
    return parser.parse_args(argv)


def load_texts(args):
    if args.train_file is None:
        return data.load_text(args.dataset, "train"), data.load_text(args.dataset, "validation")
    with open(args.train_file, encoding="utf-8") as f:
        text = f.read()
    if args.validation_file is None:
        chunks_train, chunks_val = data.split_text(text)
        return "".join(chunks_train), "".join(chunks_val)
    with open(args.validation_file, encoding="utf-8") as f:
        return text, f.read()


def build_model(args, vocab_size):
    import transformers

    if args.model_path is not None:
        return transformers.AutoModelForCausalLM.from_pretrained(args.model_path, local_files_only=True)
    architecture, kwargs = PRESETS[args.model]
    if architecture == "gpt2":
        config = transformers.GPT2Config(
            vocab_size=vocab_size, n_positions=max(1024, args.seq_len), bos_token_id=None, eos_token_id=None, **kwargs
        )
        return transformers.GPT2LMHeadModel(config)
    config = transformers.LlamaConfig(
        vocab_size=vocab_size,
        max_position_embeddings=max(2048, args.seq_len),
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
        **kwargs,
    )
    return transformers.LlamaForCausalLM(config)


def encode(args, train_text, val_text):
    if args.tokenizer == "model":
        import transformers

        if args.model_path is None:
            raise SystemExit("--tokenizer model needs --model-path")
        tokenizer = transformers.AutoTokenizer.from_pretrained(args.model_path, local_files_only=True)
        train = np.asarray(tokenizer(train_text)["input_ids"], dtype=np.int64)
        val = np.asarray(tokenizer(val_text)["input_ids"], dtype=np.int64)
        return train, val, len(tokenizer)
    tokenizer = data.train_tokenizer(train_text, args.vocab_size, kind=args.tokenizer)
    return data.encode(train_text, tokenizer), data.encode(val_text, tokenizer), tokenizer.vocab_size


def make_optimizer(args, model):
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=args.lr or 1e-3, weight_decay=args.weight_decay)
    if args.optimizer == "adafactor":
        return torch.optim.Adafactor(params, lr=args.lr or 1e-2, weight_decay=args.weight_decay)
    return flora_opt.Flora(params, lr=args.lr or 1e-2, rank=args.rank, weight_decay=args.weight_decay)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    accelerator = flora_opt.FloraAccelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        accumulation_compression_rank=args.accumulation_rank,
        layerwise=args.layerwise,
        layerwise_max_grad_norm=args.max_grad_norm if args.layerwise and args.max_grad_norm > 0 else None,
    )
    train_text, val_text = load_texts(args)
    train_ids, val_ids, vocab_size = encode(args, train_text, val_text)
    model = build_model(args, vocab_size)
    if args.activation_checkpointing:
        enable_activation_checkpointing(model)
    optimizer = make_optimizer(args, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min(1.0, (step + 1) / args.warmup_steps) if args.warmup_steps else 1.0
    )
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if args.resume_from:
        accelerator.load_state(args.resume_from)
    device = accelerator.device
    micro_batches = data.lm_batches(
        train_ids, args.batch_size, args.seq_len, seed=args.seed + accelerator.process_index
    )

    # Peak memory: the CUDA allocator's, or exact live tensor bytes over the first two steps.
    on_cuda = device.type == "cuda"
    tracker = None
    if not on_cuda:
        tracker = LiveTensorBytes()
        tracker.track(list(model.parameters()) + list(model.buffers()))
        tracker.track(v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    tracked_steps = 0 if on_cuda else min(2, args.max_steps)

    model.train()
    tokens_per_step = args.batch_size * args.seq_len * args.gradient_accumulation_steps * accelerator.num_processes
    progress = tqdm(total=args.max_steps, disable=not accelerator.is_local_main_process, desc="train")
    step = 0
    timed_tokens, timed_seconds = 0, 0.0
    while step < args.max_steps:
        tracking = tracker if step < tracked_steps else contextlib.nullcontext()
        started = time.perf_counter()
        with tracking:
            for _ in range(args.gradient_accumulation_steps):
                inputs, targets = next(micro_batches)
                inputs = torch.from_numpy(inputs).to(device)
                targets = torch.from_numpy(targets).to(device)
                with accelerator.accumulate(model):
                    logits = model(input_ids=inputs, use_cache=False).logits
                    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                    del logits
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad()
        if on_cuda:
            torch.cuda.synchronize()
        if step >= tracked_steps:
            timed_seconds += time.perf_counter() - started
            timed_tokens += tokens_per_step
        step += 1
        postfix = {"loss": f"{loss.item():.3f}"}
        if args.max_grad_norm > 0:
            postfix["grad_norm"] = f"{float(grad_norm):.3f}"
        progress.set_postfix(postfix)
        progress.update(1)
    progress.close()

    model.eval()
    losses = []
    with torch.no_grad():
        for inputs, targets in data.lm_batches(
            val_ids, args.batch_size, args.seq_len, shuffle=False, num_batches=args.eval_batches
        ):
            logits = model(input_ids=torch.from_numpy(inputs).to(device), use_cache=False).logits
            losses.append(
                torch.nn.functional.cross_entropy(
                    logits.flatten(0, 1).float(), torch.from_numpy(targets).to(device).flatten()
                ).item()
            )
    validation_loss = float(np.mean(losses)) if losses else math.nan
    if args.checkpoint_dir:
        accelerator.save_state(args.checkpoint_dir)
    if on_cuda:
        peak = f"{torch.cuda.max_memory_allocated() / 2**20:.1f} MiB (cuda max_memory_allocated)"
    else:
        peak = f"{tracker.peak / 2**20:.1f} MiB (live tensors, first {tracked_steps} steps)"
    speed = f"{timed_tokens / timed_seconds:.0f} tokens/s" if timed_seconds > 0 else "n/a tokens/s"
    accelerator.print(f"validation loss {validation_loss:.4f} | peak memory {peak} | {speed}")


if __name__ == "__main__":
    main()
