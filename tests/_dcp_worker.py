"""Worker for tests/test_distributed_checkpoint.py, run under ``torch.distributed.run`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node=W _dcp_worker.py save OUT CKPT``
``python -m torch.distributed.run --nproc_per_node=W _dcp_worker.py resume OUT CKPT [CKPT ...]``

The flow PyTorch documents for ``torch.distributed.checkpoint``, for each variant of Flora
(``VARIANTS``: the grouped step, the per-tensor step, 8-bit states): a 3-layer MLP (wrapped in
``DistributedDataParallel`` at more than one process), ``STEPS`` steps in all.

  save    ``RESUME_AT`` steps; ``get_state_dict(model, optimizer)``; ``dcp.save`` to
          ``CKPT/<variant>``; the remaining steps. Records the final parameters (the
          uninterrupted run).
  resume  For each CKPT: in this fresh process, build the model and Flora, ``get_state_dict`` on
          them, ``dcp.load`` into that dict, ``set_state_dict``, then the remaining steps.
          Records the loaded step counts and the final parameters.

Every rank trains on the whole batch: DDP's mean of identical gradients is exact (halving and
adding two equal floats rounds nothing), so runs at 1 and 2 processes are bit-identical and a
checkpoint taken at one world size resumes bit-exactly at the other.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

import flora_opt

STEPS, RESUME_AT = 8, 4
OPTIONS = dict(lr=1e-2, rank=16, kappa=3, weight_decay=0.01)
VARIANTS = {
    "grouped": dict(OPTIONS),
    "per_tensor": dict(OPTIONS, foreach=False),
    "quantized": dict(OPTIONS, quantization=True),
}


def build():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(48, 96),  # (96, 48): compressed momentum (96, 16); 8-bit: the full second moment
        torch.nn.Tanh(),
        torch.nn.Linear(96, 96),  # (96, 96): compressed momentum (16, 96); 8-bit: the full second moment
        torch.nn.Tanh(),
        torch.nn.Linear(96, 8),  # (8, 96): full momentum
    )


def optimizer_for(model, variant):
    options = dict(VARIANTS[variant])
    if variant == "quantized":  # the first matrix with full, 8-bit momentum: a group of its own
        first, *rest = list(model.parameters())
        return flora_opt.Flora([{"params": [first], "rank": None}, {"params": rest}], **options)
    return flora_opt.Flora(model.parameters(), **options)


def train(model, optimizer, first, last):
    for step in range(first, last):
        x = torch.randn(16, 48, generator=torch.Generator().manual_seed(step))
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()


def setup(variant, world):
    model = build()
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model)
    return model, optimizer_for(model, variant)


def params_of(model):
    return [p.detach().reshape(-1).tolist() for p in model.parameters()]


def main():
    mode, out, checkpoints = sys.argv[1], sys.argv[2], sys.argv[3:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {}
    for variant in VARIANTS:
        if mode == "save":
            model, optimizer = setup(variant, world)
            train(model, optimizer, 0, RESUME_AT)
            model_sd, optim_sd = get_state_dict(model, optimizer)
            dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(checkpoints[0], variant))
            train(model, optimizer, RESUME_AT, STEPS)
            result[variant] = dict(params=params_of(model))
        elif mode == "resume":
            for checkpoint in checkpoints:
                model, optimizer = setup(variant, world)
                model_sd, optim_sd = get_state_dict(model, optimizer)  # the structure to load into
                state = {"model": model_sd, "optim": optim_sd}
                dcp.load(state, checkpoint_id=os.path.join(checkpoint, variant))
                set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
                steps = [optimizer.state[p]["step"] for p in model.parameters()]
                train(model, optimizer, RESUME_AT, STEPS)
                result[f"{variant}:{checkpoint}"] = dict(params=params_of(model), loaded_steps=steps)
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
    # gloo's worker threads can abort the interpreter's teardown after a clean run; everything is
    # written and the group is destroyed
    os._exit(0)


if __name__ == "__main__":
    main()
