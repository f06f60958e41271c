"""Worker for tests/test_distributed_fsdp.py, run under ``torch.distributed.run`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node=W _fsdp_worker.py MODE OUT [CKPT [quantized]]``

Modes:
  parity    FSDP2 Flora vs single-process Flora on the same global batch, 8 steps (kappa=3: two
            resamples); records the max relative parameter error, per-rank state bytes and every
            collective issued inside ``optimizer.step()``.
  save      4 steps, then ``dcp.save`` of model and optimizer state (get_state_dict) to CKPT,
            then 4 more steps; records the final parameters (the uninterrupted run).
  quantized parity with quantization=True on matrices whose 8-bit blocks straddle the shard
            boundaries; records the parameter error and, per 8-bit state, how many codes differ
            from the single-process ones and the largest relative difference of the block scales.
  resume    ``dcp.load`` from CKPT (set_state_dict) at this world size, 4 steps; records the final
            parameters.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from torch.utils._python_dispatch import TorchDispatchMode

import flora_opt
from flora_opt.distributed import local_state_bytes

OPTIONS = dict(lr=1e-2, rank=4, kappa=3, min_dim_size_to_factor=8, weight_decay=0.1)
QUANTIZED_OPTIONS = dict(lr=1e-2, rank=16, kappa=3, min_dim_size_to_factor=8, quantization=True)
GLOBAL_BATCH = 8  # at every world size


class Collectives(TorchDispatchMode):
    """Records (name, numel) of every functional collective (what DTensor issues)."""

    def __init__(self):
        super().__init__()
        self.log = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        from torch.distributed.tensor import DTensor

        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor desugar into collectives first
        name = str(func)
        if "c10d" in name and "wait" not in name and "wrap_tensor" not in name:
            tensor = args[0][0] if isinstance(args[0], (list, tuple)) else args[0]
            self.log.append((name, int(tensor.numel())))
        return func(*args, **(kwargs or {}))


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 40),  # (40, 24): compressed columns (m > n), factored
        torch.nn.LayerNorm(40),
        torch.nn.Tanh(),
        torch.nn.Linear(40, 30),  # (30, 40): compressed rows (m <= n); 30 rows split unevenly at world 4
        torch.nn.Tanh(),
        torch.nn.Linear(30, 1),  # (1, 30): full momentum, full second moment; empty shards at world >= 2
    )


def build_quantized():
    """Matrices whose 8-bit states (>= 4096 elements) have blocks straddling the shard boundaries."""
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(130, 300),  # (300, 130): compressed cols momentum (300, 16), 8-bit
        torch.nn.Tanh(),
        torch.nn.Linear(300, 130),  # (130, 300): compressed rows momentum (16, 300), 8-bit
        torch.nn.Tanh(),
        torch.nn.Linear(130, 5),
        torch.nn.Tanh(),
        torch.nn.Linear(5, 1000),  # (1000, 5): full momentum and full second moment, 8-bit
    )


def shard(model):
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch(step, rank, world):
    x = torch.randn(GLOBAL_BATCH, 24, generator=torch.Generator().manual_seed(step))
    per = GLOBAL_BATCH // world
    return x, x[rank * per : (rank + 1) * per]


def train(model, optimizer, steps, first, rank, world, mode=None):
    for step in range(first, first + steps):
        _, local = batch(step, rank, world)
        model(local).pow(2).mean().backward()
        if mode is None:
            optimizer.step()
        else:
            with mode:
                optimizer.step()
        optimizer.zero_grad()


def quantized_batch(step):
    return torch.randn(GLOBAL_BATCH, 130, generator=torch.Generator().manual_seed(step))


def train_quantized(model, optimizer, steps, first, rank, world):
    per = GLOBAL_BATCH // world
    for step in range(first, first + steps):
        model(quantized_batch(step)[rank * per : (rank + 1) * per]).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def full_params(model):
    return [p.full_tensor().tolist() for p in model.parameters()]


def main():
    mode, out = sys.argv[1], sys.argv[2]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    if mode == "parity":
        # an optional third argument: the projection_dtype of both optimizers
        options = dict(OPTIONS, projection_dtype=sys.argv[3]) if len(sys.argv) > 3 else OPTIONS
        reference = build()
        reference_opt = flora_opt.Flora(reference.parameters(), **options)
        model = shard(build())
        optimizer = flora_opt.Flora(model.parameters(), **options)
        collectives = Collectives()
        for step in range(8):
            full, _ = batch(step, rank, world)
            reference(full).pow(2).mean().backward()
            reference_opt.step()
            reference_opt.zero_grad()
            train(model, optimizer, 1, step, rank, world, collectives)
        error = 0.0
        for p, q in zip(model.parameters(), reference.parameters()):
            error = max(error, ((p.full_tensor() - q).abs().max() / q.abs().max()).item())
        placements = {}
        for index, p in enumerate(model.parameters()):
            placements[index] = {
                key: [str(v.placements[0]), list(v.to_local().shape)]
                for key, v in optimizer.state[p].items()
                if isinstance(v, torch.Tensor)
            }
        result = dict(
            error=error,
            local_state_bytes=local_state_bytes(optimizer),
            reference_state_bytes=reference_opt.state_bytes(),
            collectives=collectives.log,
            placements=placements,
            steps=[optimizer.state[p]["step"] for p in model.parameters()],
        )
    elif mode == "quantized":
        reference = build_quantized()
        reference_opt = flora_opt.Flora(reference.parameters(), **QUANTIZED_OPTIONS)
        model = shard(build_quantized())
        optimizer = flora_opt.Flora(model.parameters(), **QUANTIZED_OPTIONS)
        for step in range(8):
            reference(quantized_batch(step)).pow(2).mean().backward()
            reference_opt.step()
            reference_opt.zero_grad()
            train_quantized(model, optimizer, 1, step, rank, world)
        error = 0.0
        for p, q in zip(model.parameters(), reference.parameters()):
            error = max(error, ((p.full_tensor() - q).abs().max() / q.abs().max()).item())
        codes = {}
        for index, (p, q) in enumerate(zip(model.parameters(), reference.parameters())):
            for key, value in optimizer.state[p].items():
                if key.endswith("_codes"):
                    mine = value.full_tensor().reshape(-1)
                    theirs = reference_opt.state[q][key][: mine.numel()]
                    scale = optimizer.state[p][key.replace("_codes", "_absmax")].full_tensor()
                    their_scale = reference_opt.state[q][key.replace("_codes", "_absmax")]
                    codes[f"{index}.{key}"] = dict(
                        mismatched=int((mine != theirs).sum()),
                        numel=mine.numel(),
                        scale_error=((scale - their_scale).abs().max() / their_scale.abs().max()).item(),
                        local=list(value.to_local().shape),
                    )
        result = dict(
            error=error,
            codes=codes,
            local_state_bytes=local_state_bytes(optimizer),
            reference_state_bytes=reference_opt.state_bytes(),
        )
    elif mode in ("save", "resume"):
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        checkpoint = sys.argv[3]
        quantized = len(sys.argv) > 4 and sys.argv[4] == "quantized"
        model = shard(build_quantized() if quantized else build())
        options = dict(QUANTIZED_OPTIONS) if quantized else dict(OPTIONS)
        optimizer = flora_opt.Flora(model.parameters(), **options)
        steps = (lambda *args: train_quantized(*args)) if quantized else train
        if mode == "save":
            steps(model, optimizer, 4, 0, rank, world)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=checkpoint)
        else:
            model_sd, optim_sd = get_state_dict(model, optimizer)  # the structure to load into
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=checkpoint)
            set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
            result["loaded_steps"] = [optimizer.state[p]["step"] for p in model.parameters()]
        steps(model, optimizer, 4, 4, rank, world)
        result["params"] = full_params(model)
        result["local_state_bytes"] = local_state_bytes(optimizer)
    else:  # pragma: no cover
        raise SystemExit(f"unknown mode {mode}")
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    # gloo's worker threads can abort the interpreter's teardown ("terminate called without an
    # active exception") after a clean run; everything is written and the group is destroyed
    os._exit(0)


if __name__ == "__main__":
    main()
