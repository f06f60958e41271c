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

``--memory`` measures instead the peak live tensor bytes per rank over one steady-state optimizer
step (after two warm-up steps: the optimizer state exists and DDP has rebuilt its buckets) of:

* ``fsdp2_floor``: FSDP2 forward and backward, every gradient shard dropped as FSDP2 hands it over
  (a post-accumulate-grad hook sets ``.grad = None``), no optimizer;
* ``fsdp2_flora``: FSDP2 + ``flora_opt.Flora``, ``optimizer.step()`` after backward;
* ``fsdp2_flora_layerwise``: the same with ``enable_layerwise_updates`` (each shard stepped after its
  reduce-scatter);
* ``ddp_floor``: the unwrapped model's forward and backward, every gradient dropped, no optimizer;
* ``ddp_flora``: DDP + Flora, ``optimizer.step()`` after backward (with ``--micro`` > 1: compressed
  accumulation, ``register_compressed_allreduce``);
* ``ddp_flora_layerwise``: DDP + Flora + ``register_layerwise_allreduce`` (with ``--micro`` > 1:
  compressed accumulation too).

Live bytes are counted by ``flora_lab.livebytes.LiveTensorBytes`` (every tensor storage an operator
creates, with its bytes, until it is freed: parameters, activations, gradients, optimizer state,
DDP's buckets, FSDP2's communication buffers), extended to follow the storages that FSDP2 and
the layer-wise DDP hook resize in place (``UntypedStorage.resize_``). Gradient bytes are sampled at
every gradient hook: for FSDP2 the sharded gradients alive (distinct storages), for DDP the local
gradients plus the bucket storages allocated. Results go to
``benchmarks/results/distributed_memory_<world>p[_<layers>layers][_<micro>micro].json``; the table
ends with the targets of docs/distributed.md.

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
import contextlib
import json
import math
import os
import resource
import sys
import time

MODES = ("ddp_adamw", "ddp_flora_compressed", "fsdp2_adamw", "fsdp2_flora")
MEMORY_MODES = (
    "fsdp2_floor",
    "fsdp2_flora",
    "fsdp2_flora_layerwise",
    "ddp_floor",
    "ddp_flora",
    "ddp_flora_layerwise",
)


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
        accumulator = CompressedAccumulator(
            optimizer, rank=args.rank, accumulation_steps=args.micro, estimator=args.estimator
        )
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
    if mode == "ddp_flora_compressed":
        # what the hook must send per compressed matrix: the r x max(m, n) buffer, and with the
        # subspace estimator the min(m, n) x r range sketch too (algorithm.md section 12)
        from flora_opt.core import accumulation_layout

        layouts = [(accumulation_layout(p.shape, args.rank), p) for p in model.parameters()]
        sketches = args.estimator == "subspace"
        result.update(
            estimator=args.estimator,
            compressed_matrices_full_bytes=sum(4 * p.numel() for lay, p in layouts if lay.compressed),
            compressed_matrices_buffer_bytes=sum(
                4 * math.prod(lay.buffer_shape()) for lay, _ in layouts if lay.compressed
            ),
            compressed_matrices_sent_bytes=sum(
                4 * (math.prod(lay.buffer_shape()) + sketches * math.prod(lay.basis_shape()))
                for lay, _ in layouts
                if lay.compressed
            ),
            # r / min(m, n) of DDP's bytes, per compressed matrix
            target_bytes=sum(4 * p.numel() * args.rank / min(lay.matrix) for lay, p in layouts if lay.compressed),
            uncompressed_bytes=sum(4 * p.numel() for lay, p in layouts if not lay.compressed),
            buffer_bytes=sum(4 * b.numel() for b in model.buffers()),
            hook_elements_per_step=accumulator_state.elements // 3,
        )
    return result


def _resize_aware_tracker():
    """``LiveTensorBytes`` that lets tensor subclasses run first (a ``DTensor`` is counted by its
    local tensor) and follows storages resized in place; ``following()`` patches ``UntypedStorage.resize_``
    while it is active."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensor
    from torch.distributed.tensor import DTensor
    from torch.utils._python_dispatch import is_traceable_wrapper_subclass

    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lab"))
    from flora_lab.livebytes import LiveTensorBytes

    class Tracker(LiveTensorBytes):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if any(t is DTensor for t in types):
                return NotImplemented  # DTensor first: its ops on the local tensors then come back here
            return super().__torch_dispatch__(func, types, args, kwargs)

        def _track(self, tensor):
            # the local tensors are counted, not their DTensor wrappers (nor DTensor's fake tensors)
            if not is_traceable_wrapper_subclass(tensor) and not isinstance(tensor, FakeTensor):
                super()._track(tensor)

        @contextlib.contextmanager
        def following(self):
            original = torch.UntypedStorage.resize_
            tracker = self

            def resize_(storage, size):
                result = original(storage, size)
                key = storage._cdata
                if key in tracker._sizes:
                    tracker.live += storage.nbytes() - tracker._sizes[key]
                    tracker._sizes[key] = storage.nbytes()
                    tracker.peak = max(tracker.peak, tracker.live)
                return result

            torch.UntypedStorage.resize_ = resize_
            try:
                yield self
            finally:
                torch.UntypedStorage.resize_ = original

    return Tracker()


def _run_memory_mode(mode: str, args, rank: int, world: int) -> dict:
    import gc

    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    import flora_opt
    from flora_opt.accumulation import CompressedAccumulator
    from flora_opt.distributed import (
        is_dtensor,
        local_state_bytes,
        register_compressed_allreduce,
        register_layerwise_allreduce,
    )

    fsdp = mode.startswith("fsdp2")
    floor = mode.endswith("floor")
    layerwise = mode.endswith("layerwise")
    tracker = _resize_aware_tracker()
    samples: list[int] = []
    buffer_samples: list[int] = []  # compressed accumulation: buffers and bases, at each gradient
    with tracker.following(), tracker:
        model = _build(args.layers)
        units = []
        if fsdp:
            for block in model.transformer.h:
                fully_shard(block)
                units.append(list(block.parameters()))
            fully_shard(model)
            in_blocks = {id(p) for unit in units for p in unit}
            units.append([p for p in model.parameters() if id(p) not in in_blocks])
        elif not floor:
            model = torch.nn.parallel.DistributedDataParallel(model)
        params = list(model.parameters())
        optimizer = accumulator = state = None
        rank_acc = args.rank if args.micro > 1 and not fsdp else None
        if floor:
            for p in params:
                p.register_post_accumulate_grad_hook(lambda p: setattr(p, "grad", None))
        else:
            if fsdp:  # registered first: sees each shard before the layer-wise update frees it

                def observe(_param):
                    storages = {}
                    for p in params:
                        if p.grad is not None:
                            storage = p.grad.to_local().untyped_storage()
                            storages[storage.data_ptr()] = storage.nbytes()
                    samples.append(sum(storages.values()))

                for p in params:
                    p.register_post_accumulate_grad_hook(observe)
            optimizer = flora_opt.Flora(params, lr=1e-4, rank=args.rank)
            if layerwise or rank_acc is not None:
                accumulator = CompressedAccumulator(
                    optimizer, rank_acc, accumulation_steps=args.micro, layerwise=layerwise
                )
            if not fsdp and layerwise:
                state = register_layerwise_allreduce(model, accumulator)
            elif not fsdp and accumulator is not None:
                state = register_compressed_allreduce(model, accumulator)
            if not fsdp:  # registered after the accumulator's: the local gradients and the buckets allocated

                def observe(_param):
                    local = {
                        p.grad.untyped_storage().data_ptr(): p.grad.untyped_storage().nbytes()
                        for p in params
                        if p.grad is not None
                    }
                    if layerwise:
                        buckets = state.allocated_bucket_bytes()
                    else:  # DDP keeps every bucket: as large as the gradients
                        buckets = sum(p.numel() * p.element_size() for p in params)
                    samples.append(sum(local.values()) + buckets)
                    if accumulator is not None:
                        buffer_samples.append(accumulator.buffer_bytes())

                for p in params:
                    p.register_post_accumulate_grad_hook(observe)

        def micro_batch(step, index):
            generator = torch.Generator().manual_seed(1000 * step + 10 * index + rank)
            return torch.randint(0, 50257, (1, args.seq + 1), generator=generator)

        def one_step(step):
            for index in range(args.micro):
                last = index == args.micro - 1
                ids = micro_batch(step, index)
                if fsdp:
                    model.set_requires_gradient_sync(last)
                    context = contextlib.nullcontext()
                else:
                    context = model.no_sync() if not last and not floor else contextlib.nullcontext()
                with context:
                    loss = model(ids[:, :-1], labels=ids[:, 1:]).loss / args.micro
                    if accumulator is not None:
                        accumulator.backward(loss, sync=last)
                    else:
                        loss.backward()
                    del loss
            if optimizer is not None:
                optimizer.step()
                optimizer.zero_grad()

        one_step(0)
        one_step(1)
        gc.collect()
        dist.barrier()
        samples.clear()
        buffer_samples.clear()
        start = tracker.live
        tracker.reset_peak()
        one_step(2)
        result = dict(
            mode=mode,
            peak_bytes=tracker.peak,
            start_bytes=start,
            parameter_bytes=sum((p.to_local() if is_dtensor(p) else p).numel() * p.element_size() for p in params),
            state_bytes=0 if optimizer is None else local_state_bytes(optimizer),
            max_gradient_bytes=max(samples, default=0),
            model_gradient_bytes=sum(p.numel() * p.element_size() for p in params),
        )
        if fsdp:  # each unit's reduce-scatter output on this rank (dim 0 padded to a multiple of world)
            result["unit_shard_bytes"] = [
                sum(-(-p.shape[0] // world) * (p.numel() // max(p.shape[0], 1)) * p.element_size() for p in unit)
                for unit in units
            ]
        if state is not None and layerwise:
            storages = {id(b.untyped_storage()): b.nbytes for b, _ in state.buckets.values()}
            result["bucket_bytes"] = sorted(storages.values())
            result["largest_gradient_bytes"] = max(p.numel() * p.element_size() for p in params)
            result["compressed_buffer_bytes"] = max(buffer_samples, default=0)
        if accumulator is not None:
            accumulator.remove()
    return result


def _worker(rank: int, world: int, args, port: int, mode: str, partial: str) -> None:
    """One set-up in fresh processes (each mode's memory is returned to the system when they exit)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    import torch
    import torch.distributed as dist

    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = (_run_memory_mode if mode in MEMORY_MODES else _run_mode)(mode, args, rank, world)
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        print(json.dumps({k: v for k, v in result.items() if k != "by_op"}), flush=True)
        with open(partial, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()


def _targets(data: dict) -> list[tuple[str, bool, str]]:
    """The layer-wise memory targets (docs/distributed.md), checked on a results file: ``(name, met, figures)``."""
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
        buffers = flora.get("compressed_matrices_buffer_bytes", flora["target_bytes"])
        checks.append(
            (
                "DDP compressed accumulation bytes for compressed matrices: those of the estimator's "
                "collectives, and <= 2 x the buffers' (the Gaussian estimator's: r / min(m, n) of DDP's)",
                sent <= 1.01 * flora["compressed_matrices_sent_bytes"] and sent <= 2 * buffers,
                f"{flora.get('estimator', 'gaussian')}: compressed matrices: {sent} bytes sent of DDP's {full} "
                f"({sent / full:.4f}); expected {flora['compressed_matrices_sent_bytes']}; buffers {buffers} "
                f"({buffers / full:.4f}, {sent / buffers:.3f}x)",
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


def _memory_targets(data: dict) -> list[tuple[str, bool, str]]:
    """The memory targets of docs/distributed.md, checked on a ``--memory`` results file."""
    per_rank = data["per_rank"]
    modes = {r["mode"]: i for i, r in enumerate(per_rank[0])}
    checks = []
    if "fsdp2_floor" in modes and "fsdp2_flora_layerwise" in modes:
        ratios = [
            rank[modes["fsdp2_flora_layerwise"]]["peak_bytes"] / rank[modes["fsdp2_floor"]]["peak_bytes"]
            for rank in per_rank
        ]
        checks.append(
            (
                "FSDP2 + layer-wise: peak live bytes per rank <= 1.15 x the per-rank floor",
                max(ratios) <= 1.15,
                "per rank " + ", ".join(f"{ratio:.3f}" for ratio in ratios),
            )
        )
        ranks = [rank[modes["fsdp2_flora_layerwise"]] for rank in per_rank]
        alive = max(r["max_gradient_bytes"] for r in ranks)
        two = max(sum(sorted(r["unit_shard_bytes"])[-2:]) for r in ranks)
        largest = max(max(r["unit_shard_bytes"]) for r in ranks)
        checks.append(
            (
                "FSDP2 + layer-wise: gradient bytes alive from at most the one or two units being reduced",
                alive <= two,
                f"at most {alive} B of gradient shards alive; largest unit shard {largest} B, two largest {two} B; "
                f"all units {sum(ranks[0]['unit_shard_bytes'])} B",
            )
        )
    if "ddp_flora_layerwise" in modes:
        ranks = [rank[modes["ddp_flora_layerwise"]] for rank in per_rank]
        alive = max(r["max_gradient_bytes"] for r in ranks)
        bucket = max(max(r["bucket_bytes"]) for r in ranks)
        buffers = max(r["compressed_buffer_bytes"] for r in ranks)
        tensor = ranks[0]["largest_gradient_bytes"]
        checks.append(
            (
                "DDP + layer-wise: peak gradient bytes per rank <= the largest bucket (+ compressed buffers)",
                alive <= bucket + buffers,
                f"{alive} B; largest bucket {bucket} B, compressed buffers {buffers} B, largest tensor's gradient "
                f"{tensor} B (bucket + tensor {bucket + tensor} B); the model's gradients "
                f"{ranks[0]['model_gradient_bytes']} B",
            )
        )
    return checks


def _memory_table(path: str) -> str:
    with open(path) as f:
        data = json.load(f)
    per_rank = data["per_rank"]
    rows = per_rank[0]
    floors = {}
    for index, row in enumerate(rows):
        if row["mode"].endswith("floor"):
            floors[row["mode"].split("_")[0]] = index
    lines = [
        f"world {data['world']}, {data['args']['layers']} blocks, {data['args']['micro']} micro-batch(es) per step",
        "| set-up | peak MB / rank (max) | x floor (max over ranks) | Flora state MB / rank | gradient MB alive (max) "
        "| model gradient MB |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for index, row in enumerate(rows):
        peaks = [rank[index]["peak_bytes"] for rank in per_rank]
        floor = floors.get(row["mode"].split("_")[0])
        ratio = "-"
        if floor is not None:
            ratio = f"{max(rank[index]['peak_bytes'] / rank[floor]['peak_bytes'] for rank in per_rank):.3f}"
        state = max(rank[index]["state_bytes"] for rank in per_rank)
        alive = max(rank[index]["max_gradient_bytes"] for rank in per_rank)
        lines.append(
            f"| {row['mode']} | {max(peaks) / 1e6:.1f} | {ratio} | {state / 1e6:.1f} | {alive / 1e6:.1f} | "
            f"{row['model_gradient_bytes'] / 1e6:.1f} |"
        )
    lines.append("")
    for name, met, figures in _memory_targets(data):
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
    parser.add_argument(
        "--estimator", default="subspace", choices=("subspace", "gaussian"), help="compressed accumulation's"
    )
    parser.add_argument("--port", type=int, default=29581)
    parser.add_argument(
        "--out",
        default=None,
        help="default: benchmarks/results/distributed_<world>p.json (_<layers>layers added unless 12)",
    )
    parser.add_argument("--table", default=None, help="print the table and targets of this results file and exit")
    parser.add_argument(
        "--memory", action="store_true", help="peak live bytes per rank of the memory set-ups instead (see above)"
    )
    args = parser.parse_args(argv)
    known = MEMORY_MODES if args.memory else MODES
    table = _memory_table if args.memory else _table
    if args.table is not None:
        print(table(args.table))
        return 0
    if args.world < 1:
        parser.error(f"--world must be >= 1, got {args.world}")
    if args.memory and args.modes == ",".join(MODES):
        args.modes = ",".join(MEMORY_MODES)
    if args.out is None:
        depth = "" if args.layers == 12 else f"_{args.layers}layers"
        if args.memory:
            micro = "" if args.micro == 1 else f"_{args.micro}micro"
            name = f"distributed_memory_{args.world}p{depth}{micro}.json"
        else:
            name = f"distributed_{args.world}p{depth}.json"
        args.out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", name)
    import torch.multiprocessing as mp

    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    modes = args.modes.split(",")
    unknown = [mode for mode in modes if mode not in known]
    if unknown:
        parser.error(f"--modes: unknown set-up(s) {unknown}; choose from {list(known)}")
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
            per_rank = [sorted(rank, key=lambda r: known.index(r["mode"])) for rank in per_rank]
            json.dump(dict(args=vars(args), world=args.world, per_rank=per_rank), f, indent=1)
    print(table(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
