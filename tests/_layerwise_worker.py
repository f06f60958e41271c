"""Worker for tests/test_layerwise_distributed.py, run under ``torch.distributed.run`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node=2 _layerwise_worker.py MODE OUT [CKPT | VARIANT]``

Every single-process reference is computed before the process group exists (a layer-wise
accumulator refuses a local gradient on more than one process). Modes:

  fsdp2     FSDP2 (``fully_shard`` per Linear and at the root) + ``enable_layerwise_updates``:
            8 cycles of 1 micro-batch against single-process ``Flora.step()`` on the same global
            batch (kappa=3: two resamples); 8 cycles of 2 micro-batches with
            ``set_requires_gradient_sync`` and layer-wise clipping against the single-process
            layer-wise run with the same clipping. Records the parameter errors, the updates
            counted per tensor and micro-batch, the sharded gradient bytes alive at each hook
            against each FSDP unit's, every collective issued during backward (name, size) in
            order, and a DCP checkpoint round trip (save after 3 cycles, 3 more; a fresh model,
            optimizer and accumulator load it and repeat the 3).
  ddp       DDP + ``register_layerwise_allreduce`` (two buckets): 6 cycles of 1 micro-batch
            against single-process ``Flora.step()``; 3 cycles of 3 micro-batches compressed
            (``gaussian``) against single-process compressed accumulation; the same with the
            ``subspace`` estimator against DDP's non-layer-wise compressed all-reduce. Records
            errors, updates counted, bucket and gradient bytes alive, parameters across ranks.
  refusals  a plain model and a DDP model without Flora's hook: the first backward raises before
            any update.
  accelerate ``ddp``: ``FloraAccelerator(layerwise=True)`` (DDP, 2 micro-batches) against the
            single-process layer-wise run, and ``FloraTrainer(layerwise=True)`` under DDP;
            ``reference``: that ``FloraTrainer`` on one process (run with one process).
"""

import contextlib
import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from _tiny_mlp import PER_RANK, micro_batch, tiny_gpt2_and_tokens
from _tiny_mlp import build as build_mlp
from torch.utils._python_dispatch import TorchDispatchMode

import flora_opt
from flora_opt.accumulation import CompressedAccumulator
from flora_opt.distributed import is_dtensor, register_compressed_allreduce, register_layerwise_allreduce

OPTIONS = dict(lr=1e-2, rank=4, kappa=3, min_dim_size_to_factor=8, weight_decay=0.1)
GLOBAL_BATCH = 8


class Collectives(TorchDispatchMode):
    """(name, numel) of every collective op dispatched (FSDP2's c10d ops and DTensor's functional ones)."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t.__name__ == "DTensor" for t in types):
            return NotImplemented  # let DTensor desugar into collectives first
        name = str(func)
        if "c10d" in name and "wait" not in name and "wrap_tensor" not in name:
            first = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
            if isinstance(first, (list, tuple)):
                first = first[0]
            self.log.append((name, int(first.numel())))
        return func(*args, **(kwargs or {}))


def build_sharded_layers():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 40),  # (40, 24): compressed cols momentum, factored
        torch.nn.LayerNorm(40),  # in the root unit
        torch.nn.Tanh(),
        torch.nn.Linear(40, 30),  # (30, 40): compressed rows momentum
        torch.nn.Tanh(),
        torch.nn.Linear(30, 1),
    )


def shard(model):
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def global_batch(index):
    return torch.randn(GLOBAL_BATCH, 24, generator=torch.Generator().manual_seed(index))


def local(x, rank, world):
    per = x.shape[0] // world
    return x[rank * per : (rank + 1) * per]


def relative_error(params, reference):
    return max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(params, reference))


def full(param):
    return param.full_tensor() if is_dtensor(param) else param.detach()


def count_updates(optimizer):
    """Wrap ``optimizer.step_param`` (what layer-wise updates call) to count the updates per tensor."""
    counts = {id(p): 0 for group in optimizer.param_groups for p in group["params"]}
    step_param = optimizer.step_param

    def counted(param):
        counts[id(param)] += 1
        step_param(param)

    optimizer.step_param = counted
    return counts


def fsdp2_references(cycles, micro, max_grad_norm):
    """Single-process runs on the global batches: Flora.step() (micro=1) and layer-wise with clipping."""
    plain = build_sharded_layers()
    optimizer = flora_opt.Flora(plain.parameters(), **OPTIONS)
    for cycle in range(cycles):
        plain(global_batch(cycle)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    clipped = build_sharded_layers()
    optimizer = flora_opt.Flora(clipped.parameters(), **OPTIONS)
    accumulator = CompressedAccumulator(
        optimizer, accumulation_steps=micro, layerwise=True, max_grad_norm=max_grad_norm
    )
    norms = []
    for index in range(cycles * micro):
        accumulator.backward(clipped(global_batch(100 + index)).pow(2).mean() / micro)
        if accumulator.sync_gradients:
            norms.append(accumulator.last_grad_norm.item())
    return [p.detach() for p in plain.parameters()], [p.detach() for p in clipped.parameters()], norms


def fsdp2_mode(out, checkpoint):
    cycles, micro, max_grad_norm = 8, 2, 0.05
    plain_reference, clipped_reference, reference_norms = fsdp2_references(cycles, micro, max_grad_norm)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}

    # one micro-batch per cycle, against Flora.step() at world 1; gradient bytes and collectives observed
    model = shard(build_sharded_layers())
    optimizer = flora_opt.Flora(model.parameters(), **OPTIONS)
    params = list(model.parameters())
    alive = []

    def observe(_param):  # registered first: runs before the layer-wise update frees the gradient
        storages = {}
        for p in params:
            if p.grad is not None:
                storage = p.grad.to_local().untyped_storage()
                storages[storage.data_ptr()] = storage.nbytes()
        alive.append(sum(storages.values()))

    for p in params:
        p.register_post_accumulate_grad_hook(observe)
    accumulator = flora_opt.enable_layerwise_updates(optimizer)
    counts = count_updates(optimizer)
    collectives = Collectives()
    for cycle in range(cycles):
        with collectives:
            model(local(global_batch(cycle), rank, world)).pow(2).mean().backward()
        assert all(p.grad is None for p in params)
        optimizer.step()  # nothing left: every tensor was updated inside backward
    result["error"] = relative_error([full(p) for p in params], plain_reference)
    result["updates"] = sorted(set(counts.values()))
    result["steps"] = sorted({optimizer.state[p]["step"] for p in params})
    result["collectives"] = collectives.log
    # each FSDP unit's reduce-scatter output on this rank: its gradient shards, dim 0 padded to a multiple of world
    linears = [layer for layer in model if isinstance(layer, torch.nn.Linear)]
    in_linears = {id(p) for layer in linears for p in layer.parameters()}
    units = [list(layer.parameters()) for layer in linears] + [[p for p in params if id(p) not in in_linears]]
    result["unit_shard_bytes"] = [
        sum(-(-p.shape[0] // world) * (p.numel() // p.shape[0]) * 4 for p in unit) for unit in units
    ]
    result["max_alive_gradient_bytes"] = max(alive)
    accumulator.remove()
    model(local(global_batch(0), rank, world)).pow(2).mean().backward()  # without layer-wise updates
    storages = {p.grad.to_local().untyped_storage().data_ptr(): p.grad.to_local().untyped_storage() for p in params}
    result["all_gradient_bytes"] = sum(storage.nbytes() for storage in storages.values())

    # two micro-batches per cycle, layer-wise clipping, against the single-process layer-wise run
    model = shard(build_sharded_layers())
    optimizer = flora_opt.Flora(model.parameters(), **OPTIONS)
    accumulator = CompressedAccumulator(
        optimizer, accumulation_steps=micro, layerwise=True, max_grad_norm=max_grad_norm
    )
    counts = count_updates(optimizer)
    per_micro_batch, norms = [], []
    for index in range(cycles * micro):
        sync = (index + 1) % micro == 0
        model.set_requires_gradient_sync(sync)  # no reduce-scatter (and no update) before the last
        accumulator.backward(model(local(global_batch(100 + index), rank, world)).pow(2).mean() / micro)
        per_micro_batch.append(sum(counts.values()))
        if sync:
            norms.append(accumulator.last_grad_norm.item())
    result["clipped_error"] = relative_error([full(p) for p in model.parameters()], clipped_reference)
    result["clipped_updates"] = sorted(set(counts.values()))
    result["updates_after_each_micro_batch"] = per_micro_batch
    result["norm_error"] = max(abs(a - b) / b for a, b in zip(norms, reference_norms))
    result["tensors"] = len(counts)

    # DCP: save after 3 cycles, run 3 more; a fresh model, optimizer and accumulator resume and repeat them
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    def run(model, accumulator, first, count):
        for cycle in range(first, first + count):
            accumulator.backward(model(local(global_batch(200 + cycle), rank, world)).pow(2).mean())

    model = shard(build_sharded_layers())
    optimizer = flora_opt.Flora(model.parameters(), **OPTIONS)
    accumulator = flora_opt.enable_layerwise_updates(optimizer)
    run(model, accumulator, 0, 3)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
    torch.save(accumulator.state_dict(), os.path.join(checkpoint, f"accumulator_{rank}.pt"))
    run(model, accumulator, 3, 3)
    uninterrupted = torch.cat([full(p).flatten() for p in model.parameters()])
    accumulator.remove()

    model = shard(build_sharded_layers())
    optimizer = flora_opt.Flora(model.parameters(), **OPTIONS)
    accumulator = flora_opt.enable_layerwise_updates(optimizer)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state = {"model": model_sd, "optim": optim_sd}
    dcp.load(state, checkpoint_id=checkpoint)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    accumulator.load_state_dict(torch.load(os.path.join(checkpoint, f"accumulator_{rank}.pt"), weights_only=True))
    run(model, accumulator, 3, 3)
    resumed = torch.cat([full(p).flatten() for p in model.parameters()])
    result["resumed_equal"] = torch.equal(resumed, uninterrupted)
    result["resumed_steps"] = sorted({optimizer.state[p]["step"] for p in model.parameters()})
    finish(out, result)


def ddp_references(cycles, compressed_cycles, micro):
    """Single-process runs on the global batches: Flora.step(), and gaussian compressed accumulation."""
    plain = build_mlp()
    optimizer = flora_opt.Flora(plain.parameters(), **OPTIONS)
    for cycle in range(cycles):
        plain(micro_batch(cycle, 2)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
    compressed = build_mlp()
    optimizer = flora_opt.Flora(compressed.parameters(), **OPTIONS)
    accumulator = CompressedAccumulator(optimizer, rank=4, accumulation_steps=micro, estimator="gaussian")
    for index in range(compressed_cycles * micro):
        accumulator.backward(compressed(micro_batch(100 + index, 2)).pow(2).mean() / micro)
        if accumulator.sync_gradients:
            optimizer.step()
            optimizer.zero_grad()
    return [p.detach() for p in plain.parameters()], [p.detach() for p in compressed.parameters()]


def ddp_run(rank, world, *, layerwise, micro, cycles, rank_acc=None, estimator="subspace", foreach=True, first=0):
    """DDP (two buckets) with Flora; returns the model, optimizer, hook state, update counts and observations."""
    model = torch.nn.parallel.DistributedDataParallel(build_mlp(), bucket_cap_mb=0.001)
    optimizer = flora_opt.Flora(model.parameters(), **dict(OPTIONS, foreach=foreach))
    accumulator = CompressedAccumulator(
        optimizer, rank_acc, accumulation_steps=micro, layerwise=layerwise, estimator=estimator
    )
    register = register_layerwise_allreduce if layerwise else register_compressed_allreduce
    state = register(model, accumulator)
    counts = count_updates(optimizer)
    params = list(model.parameters())
    gradient_bytes, identical, freed = [], [], []

    def observe(_param):  # after the accumulator's hook, before DDP's reducer copies the gradient
        local_bytes = sum(p.grad.untyped_storage().nbytes() for p in params if p.grad is not None)
        gradient_bytes.append(local_bytes + (state.allocated_bucket_bytes() if layerwise else 0))

    if layerwise:
        for p in params:
            p.register_post_accumulate_grad_hook(observe)
    for index in range(cycles * micro):
        sync = (index + 1) % micro == 0
        x = micro_batch(first + index, world)[rank * PER_RANK : (rank + 1) * PER_RANK]
        with model.no_sync() if not sync else contextlib.nullcontext():
            accumulator.backward(model(x).pow(2).mean() / micro, sync=sync)
        if sync:
            optimizer.step()
            optimizer.zero_grad()
            flat = torch.cat([p.detach().flatten() for p in params])
            gathered = [torch.empty_like(flat) for _ in range(world)]
            dist.all_gather(gathered, flat)
            identical.append(all(torch.equal(gathered[0], g) for g in gathered))
            if layerwise:
                freed.append(state.allocated_bucket_bytes() == 0)
    return model, state, counts, dict(gradient_bytes=gradient_bytes, identical=identical, freed=freed)


def ddp_mode(out):
    cycles, compressed_cycles, micro = 6, 3, 3
    plain_reference, compressed_reference = ddp_references(cycles, compressed_cycles, micro)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}

    model, state, counts, seen = ddp_run(rank, world, layerwise=True, micro=1, cycles=cycles)
    result["error"] = relative_error(list(model.parameters()), plain_reference)
    result["updates"] = sorted(set(counts.values()))
    result["identical"] = all(seen["identical"])
    result["freed_after_each_backward"] = seen["freed"]
    buffers = {id(buffer.untyped_storage()): buffer.nbytes for buffer, _ in state.buckets.values()}
    result["bucket_bytes"] = sorted(buffers.values())
    result["largest_gradient_bytes"] = max(p.numel() * p.element_size() for p in model.parameters())
    # from the third backward on: DDP rebuilds its buckets once, at the second forward, allocating all
    per_backward = len(seen["gradient_bytes"]) // cycles
    result["max_gradient_bytes"] = max(seen["gradient_bytes"][2 * per_backward :])
    result["calls"] = state.calls

    model, state, counts, seen = ddp_run(
        rank, world, layerwise=True, micro=micro, cycles=compressed_cycles, rank_acc=4, estimator="gaussian", first=100
    )
    result["compressed_error"] = relative_error(list(model.parameters()), compressed_reference)
    result["compressed_updates"] = sorted(set(counts.values()))
    result["compressed_identical"] = all(seen["identical"])

    layerwise_run = ddp_run(
        rank,
        world,
        layerwise=True,
        micro=micro,
        cycles=compressed_cycles,
        rank_acc=4,
        estimator="subspace",
        foreach=False,
        first=100,
    )
    standard_run = ddp_run(
        rank,
        world,
        layerwise=False,
        micro=micro,
        cycles=compressed_cycles,
        rank_acc=4,
        estimator="subspace",
        foreach=False,
        first=100,
    )
    result["subspace_equal"] = all(
        torch.equal(p, q) for p, q in zip(layerwise_run[0].parameters(), standard_run[0].parameters())
    )
    result["subspace_elements"] = [layerwise_run[1].elements, standard_run[1].elements]
    result["subspace_calls"] = [layerwise_run[1].calls, standard_run[1].calls]
    finish(out, result)


def refusals_mode(out):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    x = micro_batch(0, world)[rank * PER_RANK : (rank + 1) * PER_RANK]
    for name, wrap in (("plain", lambda m: m), ("ddp", torch.nn.parallel.DistributedDataParallel)):
        model = wrap(build_mlp())
        optimizer = flora_opt.Flora(model.parameters(), **OPTIONS)
        flora_opt.enable_layerwise_updates(optimizer)
        before = [p.detach().clone() for p in model.parameters()]
        try:
            model(x).pow(2).mean().backward()
        except RuntimeError as error:
            result[name] = str(error)
        else:
            result[name] = None
        result[name + "_unchanged"] = all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
        result[name + "_no_state"] = len(optimizer.state) == 0
    finish(out, result)


def accelerate_reference(cycles, micro):
    """What FloraAccelerator(layerwise=True) does on one process: the loss divided by the micro-batches."""
    model = build_mlp()
    optimizer = flora_opt.Flora(model.parameters(), **OPTIONS)
    accumulator = CompressedAccumulator(optimizer, accumulation_steps=micro, layerwise=True)
    for index in range(cycles * micro):
        accumulator.backward(model(micro_batch(index, 2)).pow(2).mean() / micro)
    return [p.detach() for p in model.parameters()]


def accelerate_loop(accelerator, model, optimizer, cycles, micro, select):
    for index in range(cycles * micro):
        with accelerator.accumulate(model):
            accelerator.backward(model(select(micro_batch(index, 2))).pow(2).mean())
            optimizer.step()
            optimizer.zero_grad()


def train_trainer(world):
    import transformers

    from flora_opt.hf import FloraTrainer

    model, tokens = tiny_gpt2_and_tokens()
    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=4 // world,
            gradient_accumulation_steps=2,
            max_steps=3,
            max_grad_norm=0.5,
            use_cpu=True,
            ddp_backend="gloo" if world > 1 else None,
            report_to=[],
            save_strategy="no",
            logging_strategy="steps",
            logging_steps=1,
            dataloader_num_workers=0,
            seed=0,
        )
        optimizer = flora_opt.Flora(model.parameters(), **OPTIONS)
        trainer = FloraTrainer(
            model=model, args=args, train_dataset=tokens, optimizers=(optimizer, None), layerwise=True
        )
        trainer.train()
        norms = [entry["grad_norm"] for entry in trainer.state.log_history if "grad_norm" in entry]
        unwrapped = trainer.accelerator.unwrap_model(trainer.model)
        return dict(
            params=torch.cat([p.detach().flatten() for p in unwrapped.parameters()]).tolist(),
            norms=norms,
            hooked=trainer.accelerator.flora_comm_state is not None,
        )


def accelerate_mode(out, variant):
    """``reference``: FloraTrainer(layerwise=True) on one process; ``ddp``: FloraAccelerator and
    FloraTrainer with layer-wise updates under DDP (2 processes)."""
    if variant == "reference":
        with open(out, "w") as f:
            json.dump(train_trainer(world=1), f)
        sys.stdout.flush()
        os._exit(0)
    cycles, micro = 3, 2
    reference = accelerate_reference(cycles, micro)
    accelerator = flora_opt.FloraAccelerator(cpu=True, gradient_accumulation_steps=micro, layerwise=True)
    rank, world = accelerator.process_index, accelerator.num_processes
    model = build_mlp()
    optimizer = flora_opt.Flora(model.parameters(), **OPTIONS)
    model, optimizer = accelerator.prepare(model, optimizer)
    accelerate_loop(accelerator, model, optimizer, cycles, micro, lambda x: x[rank * PER_RANK : (rank + 1) * PER_RANK])
    result = dict(
        distributed_type=accelerator.distributed_type.name,
        error=relative_error([p.detach() for p in model.parameters()], reference),
        hook=type(accelerator.flora_comm_state).__name__,
        steps=sorted({s["step"] for s in optimizer.optimizer.state.values()}),
    )
    accelerator.free_memory()
    result["trainer"] = train_trainer(world)
    finish(out, result)


def finish(out, result):
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, result)
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # see tests/_fsdp_worker.py


if __name__ == "__main__":
    torch.set_num_threads(1)
    mode = sys.argv[1]
    if mode == "fsdp2":
        fsdp2_mode(sys.argv[2], sys.argv[3])
    elif mode == "ddp":
        ddp_mode(sys.argv[2])
    elif mode == "refusals":
        refusals_mode(sys.argv[2])
    else:
        accelerate_mode(sys.argv[2], sys.argv[3])
