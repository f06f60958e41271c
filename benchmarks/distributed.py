"""Bytes communicated per optimizer step and per-rank optimizer state, DDP vs FSDP2, AdamW vs Flora.

    python benchmarks/distributed.py                       # GPT-2 small shape, 2 processes, gloo, CPU
    python benchmarks/distributed.py --layers 2 --world 4  # smaller and wider

Four set-ups on the same model (``transformers.GPT2LMHeadModel``, GPT-2 small's config: 12 x 768,
vocab 50257, tied embeddings; ``--layers`` shortens it), each trained for 3 optimizer steps of
``--micro`` micro-batches of ``1 x --seq`` tokens per rank:

* ``ddp_adamw``: DDP, ``no_sync`` on all but the last micro-batch, ``torch.optim.AdamW``;
* ``ddp_flora_compressed``: DDP, ``flora_opt.Flora`` and compressed accumulation (rank ``--rank``)
  whose buffers are all-reduced (``flora_opt.distributed.register_compressed_allreduce``);
* ``fsdp2_adamw``: ``fully_shard`` per block and at the root, ``set_requires_gradient_sync(False)``
  on all but the last micro-batch (one reduce-scatter per step), AdamW on the DTensor parameters;
* ``fsdp2_flora``: the same with ``flora_opt.Flora`` (state sharded with the parameters).

Counting: the 2nd step runs under ``torch.profiler``, which records every gloo collective with its
input shape (``gloo:all_reduce``, ``gloo:all_gather``, ...); the bytes of a collective are those of
its full (unsharded) tensor: the all-reduced tensor, or the all-gather's output (``world x`` its
input). gloo has no native reduce-scatter: FSDP2's reduce-scatter runs as an all-reduce of the
whole gradient, and is counted so. ``optimizer`` bytes are the collectives issued inside
``optimizer.step()`` (the DTensor statistics and ``r x n`` blocks of FSDP2 + Flora). The 3rd step
is timed without the profiler. Per-rank state: the local tensors of the optimizer state
(``flora_opt.distributed.local_state_bytes``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

MODES = ("ddp_adamw", "ddp_flora_compressed", "fsdp2_adamw", "fsdp2_flora")


def _gloo_bytes(prof, world: int) -> tuple[int, dict]:
    total = 0
    by_op: dict[str, int] = {}
    for event in prof.events():
        if not event.name.startswith("gloo:"):
            continue
        shapes = [s for s in event.input_shapes if s]
        if not shapes:
            continue
        numel = 1
        for size in shapes[0]:
            numel *= size
        if "all_gather" in event.name:
            numel *= world
        nbytes = 4 * numel  # every collective here is float32
        total += nbytes
        by_op[event.name] = by_op.get(event.name, 0) + nbytes
    return total, by_op


def _build(layers: int):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=layers)
    config.attn_implementation = "eager"
    model = transformers.GPT2LMHeadModel(config)
    model.config.use_cache = False
    return model


def _run_mode(mode: str, args, rank: int, world: int) -> dict:
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torch.profiler import ProfilerActivity, profile

    import flora_opt
    from flora_opt.accumulation import CompressedAccumulator
    from flora_opt.distributed import local_state_bytes, register_compressed_allreduce

    model = _build(args.layers)
    accumulator = None
    if mode.startswith("ddp"):
        model = torch.nn.parallel.DistributedDataParallel(model)
        params = model.parameters()
    else:
        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        params = model.parameters()
    if mode.endswith("adamw"):
        optimizer = torch.optim.AdamW(params, lr=1e-4)
    else:
        optimizer = flora_opt.Flora(params, lr=1e-4, rank=args.rank)
    if mode == "ddp_flora_compressed":
        accumulator = CompressedAccumulator(optimizer, rank=args.rank, accumulation_steps=args.micro)
        register_compressed_allreduce(model, accumulator)

    def micro_batch(step, index):
        generator = torch.Generator().manual_seed(1000 * step + 10 * index + rank)
        return torch.randint(0, 50257, (1, args.seq + 1), generator=generator)

    def one_step(step):
        for index in range(args.micro):
            last = index == args.micro - 1
            ids = micro_batch(step, index)
            if mode.startswith("ddp"):
                context = model.no_sync() if not last else torch.enable_grad()
            else:
                model.set_requires_gradient_sync(last)
                context = torch.enable_grad()
            with context:
                loss = model(ids[:, :-1], labels=ids[:, 1:]).loss / args.micro
                if accumulator is not None:
                    accumulator.backward(loss, sync=last)
                else:
                    loss.backward()
        with torch.profiler.record_function("optimizer_step"):
            optimizer.step()
        optimizer.zero_grad()

    one_step(0)
    dist.barrier()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        one_step(1)
    total, by_op = _gloo_bytes(prof, world)
    optimizer_bytes = 0
    ranges = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.name == "optimizer_step"]
    for event in prof.events():
        if event.name.startswith("gloo:") and any(a <= event.time_range.start <= b for a, b in ranges):
            shapes = [s for s in event.input_shapes if s]
            if shapes:
                numel = 1
                for size in shapes[0]:
                    numel *= size
                optimizer_bytes += 4 * numel * (world if "all_gather" in event.name else 1)
    dist.barrier()
    start = time.perf_counter()
    one_step(2)
    dist.barrier()
    seconds = time.perf_counter() - start
    parameters = sum(p.numel() for p in model.parameters())
    if mode == "ddp_flora_compressed":  # what the hook must send: r max(m, n) per compressed matrix
        from flora_opt.core import accumulation_layout

        layouts = [accumulation_layout(p.shape, args.rank) for p in model.parameters()]
        compressed = [(lay, p) for lay, p in zip(layouts, model.parameters()) if lay.compressed]
        expected = sum(4 * math.prod(lay.buffer_shape()) for lay, _ in compressed)
        expected += sum(4 * p.numel() for lay, p in zip(layouts, model.parameters()) if not lay.compressed)
        full = sum(4 * p.numel() for _, p in compressed)
        sent = sum(4 * math.prod(lay.buffer_shape()) for lay, _ in compressed)
        extra = dict(expected_bytes=expected, compressed_matrices_full_bytes=full, compressed_matrices_sent_bytes=sent)
    else:
        extra = {}
    result = dict(**extra,
        mode=mode,
        bytes_per_step=total,
        optimizer_bytes_per_step=optimizer_bytes,
        by_op=by_op,
        state_bytes_per_rank=local_state_bytes(optimizer),
        step_seconds=seconds,
        parameters=parameters,
    )
    return result


def _worker(rank: int, world: int, args, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    results = []
    for mode in args.modes.split(","):
        results.append(_run_mode(mode, args, rank, world))
        if rank == 0:
            print(json.dumps({k: v for k, v in results[-1].items() if k != "by_op"}), flush=True)
    gathered = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump(dict(args=vars(args), world=world, per_rank=gathered), f, indent=1)
    dist.barrier()
    dist.destroy_process_group()


def _table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    rows = data["per_rank"][0]
    states = {r["mode"]: max(rank[i]["state_bytes_per_rank"] for rank in data["per_rank"]) for i, r in enumerate(rows)}
    base = {r["mode"]: r for r in rows}
    lines = [
        "| set-up | MB communicated / step | of which in optimizer.step() | state MB / rank (max) | step time (s) |",
        "|---|---:|---:|---:|---:|",
    ]
    for mode in (m for m in MODES if m in base):
        r = base[mode]
        lines.append(
            f"| {mode} | {r['bytes_per_step'] / 1e6:.1f} | {r['optimizer_bytes_per_step'] / 1e6:.3f} | "
            f"{states[mode] / 1e6:.1f} | {r['step_seconds']:.1f} |"
        )
    flora = base.get("ddp_flora_compressed")
    if flora is not None and "expected_bytes" in flora:
        lines.append("")
        lines.append(
            f"DDP + Flora: {flora['bytes_per_step']} bytes counted, {flora['expected_bytes']} expected "
            f"(r max(m, n) per compressed matrix + uncompressed tensors); the compressed matrices send "
            f"{flora['compressed_matrices_sent_bytes'] / flora['compressed_matrices_full_bytes']:.4f} of their "
            "gradient bytes"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--seq", type=int, default=32)
    parser.add_argument("--micro", type=int, default=4)
    parser.add_argument("--rank", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument("--port", type=int, default=29581)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "distributed.json"))
    args = parser.parse_args(argv)
    import torch.multiprocessing as mp

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    mp.spawn(_worker, args=(args.world, args, args.port), nprocs=args.world)
    print(_table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
