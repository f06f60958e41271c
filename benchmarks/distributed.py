"""Bytes communicated per optimizer step and per-rank optimizer state, DDP vs FSDP2, AdamW vs Flora.

    python benchmarks/distributed.py --world 2   # GPT-2 small shape, 2 processes, gloo, CPU
    python benchmarks/distributed.py --world 4 --layers 4   # 4 processes, 4 of GPT-2 small's 12 blocks
    python benchmarks/distributed.py --table benchmarks/results/distributed_4p_4layers.json   # table again

Four set-ups on the same model (``transformers.GPT2LMHeadModel``, GPT-2 small's config: 12 x 768,
vocab 50257, tied embeddings; ``--layers`` shortens it), each trained for 3 optimizer steps of
``--micro`` micro-batches of ``1 x --seq`` tokens per rank, each set-up in fresh processes:

* ``ddp_adamw``: DDP, ``no_sync`` on all but the last micro-batch, ``torch.optim.AdamW``;
* ``ddp_flora_compressed``: DDP, ``flora_opt.Flora`` and compressed accumulation (rank ``--rank``)
  whose buffers are all-reduced (``flora_opt.distributed.register_compressed_allreduce``);
* ``fsdp2_adamw``: ``fully_shard`` per block and at the root, ``set_requires_gradient_sync(False)``
  on all but the last micro-batch (one reduce-scatter per step), AdamW on the DTensor parameters;
* ``fsdp2_flora``: the same with ``flora_opt.Flora`` (state sharded with the parameters).

Counting: the 3rd step runs under ``torch.profiler`` (the 2nd, timed without it, has DDP's one-time
rebuild of its buckets, a small broadcast), which records every gloo collective with its
input shape (``gloo:all_reduce``, ``gloo:all_gather``, ...); the bytes of a collective are those of
its full (unsharded) tensor: the all-reduced tensor, or the all-gather's output (``world x`` its
input). gloo has no native reduce-scatter: FSDP2's reduce-scatter runs as an all-reduce of the
whole gradient, and is counted so. ``optimizer`` bytes are the collectives issued inside
``optimizer.step()`` (the DTensor statistics and ``r x n`` blocks of FSDP2 + Flora). Per-rank
state: the local tensors of the optimizer state (``flora_opt.distributed.local_state_bytes``).
Results go to ``benchmarks/results/distributed_<world>p.json`` (``..._<layers>layers.json`` for
another depth), written after each set-up;
``--modes`` re-runs some set-ups and keeps the others of a file with the same shape.

The printed table ends with the targets of docs/distributed.md, each ``met`` or ``MISSED``:
FSDP2 + Flora's largest per-rank state at most ``1.05 / world`` of the single-process state
(the global state, ``optimizer.state_bytes()``) plus the replicated tensors; no collective inside
its ``optimizer.step()`` larger than the largest compressed momentum ``r x max(m, n)``; DDP +
Flora's bytes for the compressed matrices (counted bytes less the uncompressed tensors' and
DDP's broadcast of the model's buffers) at most ``1.1 x r / min(m, n)`` of DDP's; and, under
DDP, a SHA-256 of every rank's parameters equal after each of the 3 steps.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time

MODES = ("ddp_adamw", "ddp_flora_compressed", "fsdp2_adamw", "fsdp2_flora")


def _collectives(prof, world: int, window=None) -> list[tuple[str, int]]:
    """``(name, elements)`` of every gloo collective recorded by ``prof`` (within ``window``, a list
    of ``(start, end)`` time ranges, if given). Elements are those of the full tensor: the
    all-reduced tensor, or the all-gather's output (``world x`` its input)."""
    found = []
    for event in prof.events():
        if not event.name.startswith("gloo:"):
            continue
        if window is not None and not any(a <= event.time_range.start <= b for a, b in window):
            continue
        shapes = [s for s in event.input_shapes if s]
        if not shapes:
            continue
        numel = math.prod(shapes[0])
        if "all_gather" in event.name:
            numel *= world
        found.append((event.name, numel))
    return found


def _bytes(collectives) -> tuple[int, dict]:
    by_op: dict[str, int] = {}
    for name, numel in collectives:
        by_op[name] = by_op.get(name, 0) + 4 * numel  # every collective here is float32
    return sum(by_op.values()), by_op


def _parameters_digest(model) -> str:
    import hashlib

    digest = hashlib.sha256()
    for p in model.parameters():
        digest.update(p.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _state_split(optimizer) -> tuple[int, int]:
    """(global state bytes, bytes of this rank's *replicated* state tensors)."""
    import torch

    from flora_opt.distributed import is_dtensor

    total = replicated = 0
    for state in optimizer.state.values():
        for value in state.values():
            if not isinstance(value, torch.Tensor):
                continue
            total += value.numel() * value.element_size()
            if is_dtensor(value) and all(p.is_replicate() for p in value.placements):
                local = value.to_local()
                replicated += local.numel() * local.element_size()
    return total, replicated


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
        accumulator_state = register_compressed_allreduce(model, accumulator)

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

    digests = []

    def check_identical():  # DDP: every rank's parameters, bit for bit (outside the profiled region)
        if mode.startswith("ddp"):
            gathered = [None] * world
            dist.all_gather_object(gathered, _parameters_digest(model))
            digests.append(len(set(gathered)) == 1)

    one_step(0)
    check_identical()
    dist.barrier()
    start = time.perf_counter()
    one_step(1)
    dist.barrier()
    seconds = time.perf_counter() - start
    check_identical()
    peak_unprofiled = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        one_step(2)
    total, by_op = _bytes(_collectives(prof, world))
    window = [(e.time_range.start, e.time_range.end) for e in prof.events() if e.name == "optimizer_step"]
    in_optimizer = _collectives(prof, world, window)
    optimizer_bytes, _ = _bytes(in_optimizer)
    check_identical()
    result = dict(
        mode=mode,
        bytes_per_step=total,
        optimizer_bytes_per_step=optimizer_bytes,
        largest_optimizer_collective=max((numel for _, numel in in_optimizer), default=0),
        by_op=by_op,
        state_bytes_per_rank=local_state_bytes(optimizer),
        step_seconds=seconds,
        parameters=sum(p.numel() for p in model.parameters()),
        identical_across_ranks=all(digests) if digests else None,
        # the process's peak resident memory (Linux ru_maxrss), before the profiled step and at the end
        peak_rss_bytes_unprofiled=peak_unprofiled,
        peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
    )
    if mode.endswith("flora"):
        # the compressed momenta are the r x max(m, n) blocks (their state is not the parameter's shape)
        blocks = [
            s["exp_avg"].numel()
            for p, s in optimizer.state.items()
            if "exp_avg" in s and tuple(s["exp_avg"].shape) != tuple(p.shape)
        ]
        result["largest_compressed_block"] = max(blocks, default=0)
        result["global_state_bytes"], result["replicated_state_bytes"] = _state_split(optimizer)
    if mode == "ddp_flora_compressed":  # what the hook must send: r max(m, n) per compressed matrix
        from flora_opt.core import accumulation_layout

        layouts = [(accumulation_layout(p.shape, args.rank), p) for p in model.parameters()]
        result.update(
            compressed_matrices_full_bytes=sum(4 * p.numel() for lay, p in layouts if lay.compressed),
            compressed_matrices_sent_bytes=sum(
                4 * math.prod(lay.buffer_shape()) for lay, _ in layouts if lay.compressed
            ),
            # r / min(m, n) of DDP's bytes, per compressed matrix
            target_bytes=sum(4 * p.numel() * args.rank / min(lay.matrix) for lay, p in layouts if lay.compressed),
            uncompressed_bytes=sum(4 * p.numel() for lay, p in layouts if not lay.compressed),
            buffer_bytes=sum(4 * b.numel() for b in model.buffers()),
            hook_elements_per_step=accumulator_state.elements // 3,
        )
    return result


def _worker(rank: int, world: int, args, port: int, mode: str, partial: str) -> None:
    """One set-up in fresh processes (each mode's memory is returned to the system when they exit)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = _run_mode(mode, args, rank, world)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "by_op"}), flush=True)
        with open(partial, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def _targets(data: dict) -> list[tuple[str, bool, str]]:
    """The issue's targets, checked on a results file: ``(name, met, figures)``."""
    world = data["world"]
    per_rank = data["per_rank"]
    modes = {r["mode"]: i for i, r in enumerate(per_rank[0])}
    checks = []
    if "fsdp2_flora" in modes:
        ranks = [rank[modes["fsdp2_flora"]] for rank in per_rank]
        single = ranks[0]["global_state_bytes"]
        replicated = ranks[0]["replicated_state_bytes"]
        worst = max(r["state_bytes_per_rank"] for r in ranks)
        bound = 1.05 * (single - replicated) / world + replicated
        checks.append(
            (
                "FSDP2 per-rank Flora state <= 1.05 / world of single-process + replicated",
                worst <= bound,
                f"{worst} <= {bound:.0f} bytes (single-process {single}, replicated {replicated}, "
                f"ratio {worst / single:.4f} of single-process)",
            )
        )
        largest = max(r["largest_optimizer_collective"] for r in ranks)
        block = ranks[0]["largest_compressed_block"]
        checks.append(
            (
                "FSDP2 no optimizer collective larger than the largest r x max(m, n) block",
                largest <= block,
                f"largest collective in optimizer.step() {largest} elements <= r x max(m, n) = {block}",
            )
        )
    if "ddp_flora_compressed" in modes and "ddp_adamw" in modes:
        flora = per_rank[0][modes["ddp_flora_compressed"]]
        sent = flora["bytes_per_step"] - flora["uncompressed_bytes"] - flora["buffer_bytes"]
        full = flora["compressed_matrices_full_bytes"]
        checks.append(
            (
                "DDP compressed accumulation bytes <= 1.1 x r / min(m, n) of DDP's for compressed matrices",
                sent <= 1.1 * flora["target_bytes"],
                f"compressed matrices: {sent} bytes sent of DDP's {full} ({sent / full:.4f}); "
                f"r / min(m, n) gives {flora['target_bytes']:.0f} ({flora['target_bytes'] / full:.4f})",
            )
        )
    ddp = [(r["mode"], r["identical_across_ranks"]) for r in per_rank[0] if r["mode"].startswith("ddp")]
    if ddp:
        checks.append(
            (
                "DDP parameters bit-identical across ranks after every step",
                all(same for _, same in ddp),
                ", ".join(f"{mode}: {same}" for mode, same in ddp),
            )
        )
    return checks


def _table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    rows = data["per_rank"][0]
    states = {r["mode"]: max(rank[i]["state_bytes_per_rank"] for rank in data["per_rank"]) for i, r in enumerate(rows)}
    base = {r["mode"]: r for r in rows}
    reference = base.get("ddp_adamw")
    lines = [
        f"world {data['world']}",
        "| set-up | MB communicated / step | of which in optimizer.step() | state MB / rank (max) | step time (s) "
        "| step time / DDP + AdamW |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for mode in (m for m in MODES if m in base):
        r = base[mode]
        ratio = f"{r['step_seconds'] / reference['step_seconds']:.2f}" if reference else "-"
        lines.append(
            f"| {mode} | {r['bytes_per_step'] / 1e6:.1f} | {r['optimizer_bytes_per_step'] / 1e6:.1f} | "
            f"{states[mode] / 1e6:.1f} | {r['step_seconds']:.1f} | {ratio} |"
        )
    lines.append("")
    for name, met, figures in _targets(data):
        lines.append(f"[{'met' if met else 'MISSED'}] {name}: {figures}")
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
    parser.add_argument(
        "--out",
        default=None,
        help="default: benchmarks/results/distributed_<world>p.json (_<layers>layers added unless 12)",
    )
    parser.add_argument("--table", default=None, help="print the table and targets of this results file and exit")
    args = parser.parse_args(argv)
    if args.table is not None:
        print(_table(args.table))
        return 0
    if args.world < 1:
        parser.error(f"--world must be >= 1, got {args.world}")
    if args.out is None:
        depth = "" if args.layers == 12 else f"_{args.layers}layers"
        name = f"distributed_{args.world}p{depth}.json"
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    import torch.multiprocessing as mp

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown:
        parser.error(f"--modes: unknown set-up(s) {unknown}; choose from {list(MODES)}")
    per_rank: list[list[dict]] = [[] for _ in range(args.world)]
    if os.path.exists(args.out):  # keep the other set-ups of a previous run with the same shape
        with open(args.out) as f:
            previous = json.load(f)
        same = all(previous["args"].get(key) == getattr(args, key) for key in ("layers", "seq", "micro", "rank"))
        if same and previous["world"] == args.world:
            per_rank = [[r for r in rank if r["mode"] not in modes] for rank in previous["per_rank"]]
    for index, mode in enumerate(modes):
        partial = f"{args.out}.{mode}.part"
        mp.spawn(_worker, args=(args.world, args, args.port + index, mode, partial), nprocs=args.world)
        with open(partial) as f:
            for rank, result in enumerate(json.load(f)):
                per_rank[rank].append(result)
        os.remove(partial)
        with open(args.out, "w") as f:  # after every set-up, so a later failure keeps the earlier ones
            per_rank = [sorted(rank, key=lambda r: MODES.index(r["mode"])) for rank in per_rank]
            json.dump(dict(args=vars(args), world=args.world, per_rank=per_rank), f, indent=1)
    print(_table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
