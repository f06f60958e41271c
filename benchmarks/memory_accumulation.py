#!/usr/bin/env python
"""Peak live tensor memory of one gradient-accumulation cycle (not a test).

For GPT-2 small (124M) and a LLaMA-style 1.1B model (TinyLlama's shape), both built from configs,
batch 1 x 512 tokens, 16 micro-batches per optimizer step, with and without activation
checkpointing, this measures the peak of live tensor bytes over one full cycle (16 forward and
backward passes, the optimizer step and ``zero_grad``) for:

* ``floor``: the same forward/backward with every gradient dropped as soon as it is produced
  (a post-accumulate-grad hook sets ``.grad = None``) and no optimizer;
* ``adamw``: ``torch.optim.AdamW`` with naive accumulation in ``.grad``;
* ``adafactor``: ``torch.optim.Adafactor`` with naive accumulation;
* ``flora``: ``flora_opt.Flora`` + compressed accumulation (docs/algorithm.md section 12);
* ``flora-layerwise``: the same, with layer-wise updates fused into backward.

What is measured, exactly: every tensor storage allocated by an operator is recorded by
``flora_lab.livebytes.LiveTensorBytes`` (a ``TorchDispatchMode``) when it is created, with its
exact ``nbytes``, and forgotten when its storage is freed (a weakref finalizer on the storage);
the model is built inside the mode, so parameters count too. The peak of the sum is reported. This is the memory a perfect allocator would need:
no caching, fragmentation, block rounding, CUDA context or library workspaces.
By default the tensors are fake (``FakeTensorMode``: shapes, dtypes and lifetimes without data or
compute; a 1.1B model trains on a 2-core CPU this way), and ``.item()``/``bool()`` on a fake tensor
answer 1/True. ``--validate`` runs a smaller configuration both fake and for real and checks that
the peaks agree to the byte. ``--device cuda`` runs real tensors on a GPU and also reports
``torch.cuda.max_memory_allocated``.

Before the measured cycle, one warm-up optimizer step (one micro-batch) allocates the optimizer
state, so the cycle measured is a steady-state one. AdamW and Adafactor run their per-tensor loop
(``foreach=False``); the default foreach path on GPUs adds temporaries for all tensors at once.

Usage::

    PYTHONPATH=. python benchmarks/memory_accumulation.py                 # the table, fake tensors
    PYTHONPATH=. python benchmarks/memory_accumulation.py --validate      # fake == real, to the byte
    PYTHONPATH=. python benchmarks/memory_accumulation.py --device cuda   # real, on a GPU
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import time

import torch

import flora_opt
from flora_lab.livebytes import LiveTensorBytes
from flora_opt.accumulation import CompressedAccumulator

METHODS = ("floor", "adamw", "adafactor", "flora", "flora-layerwise")


def enable_activation_checkpointing(model):
    """Non-reentrant activation checkpointing of every layer (transformers >= 5 and older names)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def model_config(name: str, layers: int | None = None):
    import transformers

    if name == "gpt2":
        config = transformers.GPT2Config()  # GPT-2 small: 12 x 768, vocab 50257, tied embeddings
        if layers is not None:
            config.n_layer = layers
        return transformers.GPT2LMHeadModel, config
    if name == "llama-1b":
        config = transformers.LlamaConfig(  # TinyLlama-1.1B's shape
            vocab_size=32000,
            hidden_size=2048,
            intermediate_size=5632,
            num_hidden_layers=layers or 22,
            num_attention_heads=32,
            num_key_value_heads=4,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        )
        return transformers.LlamaForCausalLM, config
    raise ValueError(f"unknown model {name!r}")


def measure(
    model_name,
    method,
    checkpointing,
    *,
    seq,
    steps,
    rank,
    accumulation_rank,
    fake,
    device,
    layers=None,
    max_aspect_ratio=4.0,
    quantization=False,
    estimator="subspace",
):
    """Peak live bytes over one steady-state accumulation cycle, plus the parts."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    model_cls, config = model_config(model_name, layers)
    tracker = LiveTensorBytes(fake_scalars=fake)
    fake_mode = FakeTensorMode() if fake else contextlib.nullcontext()
    torch.manual_seed(0)
    with fake_mode, tracker:
        with torch.device(device):
            model = model_cls(config)
        model.train()
        if checkpointing:
            enable_activation_checkpointing(model)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = accumulator = None
        if method == "floor":
            for p in params:
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        elif method == "adamw":
            optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01, foreach=False)
        elif method == "adafactor":
            optimizer = torch.optim.Adafactor(params, lr=1e-2, foreach=False)
        else:
            optimizer = flora_opt.Flora(
                params, lr=1e-4, rank=rank, max_aspect_ratio=max_aspect_ratio, quantization=quantization
            )
            accumulator = CompressedAccumulator(
                optimizer,
                accumulation_rank,
                accumulation_steps=steps,
                layerwise=method == "flora-layerwise",
                estimator=estimator,
            )
        ids = torch.zeros(1, seq, dtype=torch.long, device=device)

        def micro_batch(sync):
            loss = model(input_ids=ids, labels=ids, use_cache=False).loss / steps
            if accumulator is not None:
                accumulator.backward(loss, sync=sync)
            else:
                loss.backward()
            del loss

        def optimizer_step():
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)

        micro_batch(sync=True)  # warm-up step: allocates the optimizer state
        optimizer_step()
        gc.collect()
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = tracker.live
        tracker.reset_peak()
        buffer_peak = 0
        for micro in range(steps):
            micro_batch(sync=micro == steps - 1)
            if accumulator is not None:
                buffer_peak = max(buffer_peak, accumulator.buffer_bytes())
        optimizer_step()
        result = dict(
            model=model_name,
            method=method,
            checkpointing=checkpointing,
            peak=tracker.peak,
            start=start,
            params=sum(p.numel() * p.element_size() for p in params),
            optimizer_state=0 if optimizer is None else state_bytes(optimizer),
            accumulation_buffers=buffer_peak,
        )
        if device == "cuda":
            torch.cuda.synchronize()
            result["cuda_max_allocated"] = torch.cuda.max_memory_allocated()
        if accumulator is not None:
            accumulator.remove()
    model = optimizer = accumulator = params = None  # free them (the closures above hold the cells)
    gc.collect()
    if device == "cuda":
        torch.cuda.empty_cache()
    return result


def state_bytes(optimizer) -> int:
    tensors = [v for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    return sum(v.numel() * v.element_size() for v in tensors)


def gib(n: int) -> str:
    return f"{n / 2**30:.3f}"


def table(results) -> str:
    floors = {(r["model"], r["checkpointing"]): r["peak"] for r in results if r["method"] == "floor"}
    cuda = any("cuda_max_allocated" in r for r in results)
    header = "| model | act. ckpt | method | peak GiB | x floor | params GiB | optimizer state GiB | acc. buffers GiB |"
    rule = "|---|---|---|---:|---:|---:|---:|---:|"
    if cuda:
        header += " cuda max_allocated GiB |"
        rule += "---:|"
    lines = [header, rule]
    for r in results:
        floor = floors.get((r["model"], r["checkpointing"]))
        ratio = f"{r['peak'] / floor:.3f}" if floor else "-"
        line = (
            f"| {r['model']} | {'yes' if r['checkpointing'] else 'no'} | {r['method']} | {gib(r['peak'])} | {ratio} | "
            f"{gib(r['params'])} | {gib(r['optimizer_state'])} | {gib(r['accumulation_buffers'])} |"
        )
        if cuda:
            line += f" {gib(r.get('cuda_max_allocated', 0))} |"
        lines.append(line)
    return "\n".join(lines)


def _ratio_or_none(value: str) -> float | None:
    """``--max-aspect-ratio``: a number >= 1 (as `Flora` accepts), or ``none``."""
    if value.lower() == "none":
        return None
    try:
        ratio = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number or 'none'") from None
    if not ratio >= 1:
        raise argparse.ArgumentTypeError(f"{value!r} must be >= 1 (or 'none')")
    return ratio


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2,llama-1b")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--checkpointing", default="no,yes", help="no, yes, or no,yes")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--steps", type=int, default=16, help="micro-batches per optimizer step")
    parser.add_argument("--rank", type=int, default=64, help="Flora momentum rank")
    parser.add_argument("--accumulation-rank", type=int, default=64, help="compressed accumulation rank")
    parser.add_argument(
        "--max-aspect-ratio",
        type=_ratio_or_none,
        default=4.0,
        help="Flora's max_aspect_ratio (default 4.0, the library default: embeddings and LM heads keep "
        "full momentum); 'none' compresses them too",
    )
    parser.add_argument("--quantization", action="store_true", help="Flora with 8-bit states")
    parser.add_argument(
        "--estimator", default="subspace", choices=("subspace", "gaussian"), help="accumulation estimator"
    )
    parser.add_argument("--device", default="cpu", help="cpu (fake tensors by default) or cuda (real tensors)")
    parser.add_argument("--real", action="store_true", help="real tensors on the CPU (slow)")
    parser.add_argument("--layers", type=int, default=None, help="override the number of layers")
    parser.add_argument("--validate", action="store_true", help="check fake == real on a small configuration")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    checkpointing = [{"no": False, "yes": True}[c] for c in args.checkpointing.split(",")]
    common = dict(
        rank=args.rank,
        accumulation_rank=args.accumulation_rank,
        device=args.device,
        max_aspect_ratio=args.max_aspect_ratio,
        quantization=args.quantization,
        estimator=args.estimator,
    )

    if args.validate:  # GPT-2 small's width, 2 layers, 128 tokens, 4 micro-batches: fake vs real
        mismatches = 0
        for method in args.methods.split(","):
            for ckpt in checkpointing:
                kwargs = dict(seq=128, steps=4, layers=2, **common)
                fake = measure("gpt2", method, ckpt, fake=True, **kwargs)["peak"]
                real = measure("gpt2", method, ckpt, fake=False, **kwargs)["peak"]
                mismatches += fake != real
                print(
                    f"validate gpt2/2 layers {method:16s} ckpt={ckpt!s:5s} fake={fake} real={real} "
                    f"{'OK' if fake == real else 'MISMATCH'}",
                    flush=True,
                )
        raise SystemExit(1 if mismatches else 0)

    fake = args.device == "cpu" and not args.real
    results = []
    for model_name in args.models.split(","):
        for ckpt in checkpointing:
            for method in args.methods.split(","):
                started = time.perf_counter()
                result = measure(
                    model_name, method, ckpt, seq=args.seq, steps=args.steps, fake=fake, layers=args.layers, **common
                )
                result["seconds"] = round(time.perf_counter() - started, 1)
                results.append(result)
                print(json.dumps(result), flush=True)
    print()
    print(
        f"batch 1 x {args.seq}, {args.steps} micro-batches, Flora rank {args.rank} (max_aspect_ratio "
        f"{args.max_aspect_ratio}{', 8-bit states' if args.quantization else ''}), accumulation rank {args.accumulation_rank}, {'fake tensors' if fake else 'real tensors on ' + args.device}"
    )
    print(table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
