"""Worker for tests/test_layerwise_distributed.py, run under ``torch.distributed.run`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node=2 _layerwise_worker.py OUT``

Tries every entry point of layer-wise updates in a process group of more than one rank, and
records, per entry point, the error it raised (``None`` if it raised nothing) and whether the
parameters moved by more than one step's worth, that is whether a tensor was stepped twice.
"""

import json
import os
import sys
import tempfile

import torch
import torch.distributed as dist
from _tiny_mlp import PER_RANK, build, micro_batch

import flora_opt
from flora_opt.accumulation import CompressedAccumulator


def attempt(name, results, make):
    try:
        make()
    except ValueError as error:
        results[name] = str(error)
    else:
        results[name] = None


def ddp_layerwise(results):
    """DDP + enable_layerwise_updates with SGD: one backward and one optimizer.step() must move
    the parameters by exactly one step of the reduced gradient (or be refused)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = torch.nn.parallel.DistributedDataParallel(build())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    try:
        flora_opt.enable_layerwise_updates(optimizer)
    except ValueError as error:
        results["enable_layerwise_updates"] = str(error)
        return
    results["enable_layerwise_updates"] = None
    local = micro_batch(0, world)[rank * PER_RANK : (rank + 1) * PER_RANK]
    model(local).pow(2).mean().backward()
    optimizer.step()
    reference = build()  # one SGD step of the global-batch gradient
    reference(micro_batch(0, world)).pow(2).mean().backward()
    moved = max(
        ((p.detach() - b) - (-0.1 * q.grad)).abs().max().item()
        for p, b, q in zip(model.parameters(), before, reference.parameters())
    )
    results["ddp_error_against_one_step"] = moved


def main():
    out = sys.argv[1]
    accelerator_error = None
    try:  # first: accelerate initialises the process group itself
        flora_opt.FloraAccelerator(layerwise=True, cpu=True)
    except ValueError as error:
        accelerator_error = str(error)
    if not dist.is_initialized():
        dist.init_process_group("gloo")
    results = {"FloraAccelerator": accelerator_error}
    ddp_layerwise(results)
    optimizer = flora_opt.Flora(build().parameters(), lr=1e-2, rank=4)
    attempt("CompressedAccumulator", results, lambda: CompressedAccumulator(optimizer, layerwise=True))
    attempt(
        "CompressedAccumulator(rank=4)",
        results,
        lambda: CompressedAccumulator(optimizer, rank=4, accumulation_steps=2, layerwise=True),
    )

    import transformers

    from flora_opt.hf import FloraTrainer

    class Regression(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.net = build()

        def forward(self, x, labels=None):
            return {"loss": self.net(x).pow(2).mean()}

    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir, use_cpu=True, ddp_backend="gloo", report_to=[], max_steps=1
        )
        model = Regression()
        attempt(
            "FloraTrainer",
            results,
            lambda: FloraTrainer(
                model=model,
                args=args,
                optimizers=(flora_opt.Flora(model.parameters(), lr=1e-2), None),
                layerwise=True,
            ),
        )
    if dist.get_rank() == 0:
        with open(out, "w") as f:
            json.dump(results, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/_fsdp_worker.py


if __name__ == "__main__":
    main()
