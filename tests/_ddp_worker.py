"""Worker for tests/test_distributed_ddp.py, run under ``torch.distributed.run`` (gloo, CPU).

``python -m torch.distributed.run --nproc_per_node=W _ddp_worker.py MODE OUT [ESTIMATOR]``

DDP with compressed gradient accumulation whose compressed state is all-reduced at the end of
each cycle (``flora_opt.distributed.register_compressed_allreduce``). MODE is ``plain`` (DDP +
``CompressedAccumulator``), ``accelerate`` (``FloraAccelerator``) or ``trainer``
(``flora_opt.hf.FloraTrainer``, parameters across ranks and all-reduce count only). With the
``gaussian`` estimator the run is compared with single-process compressed accumulation over the
same global batch (the same projections: equal up to the order of summation). With ``subspace``
each rank's micro-batch is one sample, so the global cycle's gradient of a weight has rank
``<= K W = 6 <= SUBSPACE_RANK``: the estimate is then exact and the run is compared with naive
accumulation over the same global batch.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from _tiny_mlp import PER_RANK, build, micro_batch, tiny_gpt2_and_tokens

import flora_opt
from flora_opt.accumulation import CompressedAccumulator

K, CYCLES, RANK, SUBSPACE_RANK = 3, 3, 4, 8


def trainer(out):
    """FloraTrainer under DDP (torchrun, gloo): compressed all-reduce, parameters identical across ranks."""
    import tempfile

    import transformers

    from flora_opt.hf import FloraTrainer

    model, tokens = tiny_gpt2_and_tokens()
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-3, rank=4)
    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=2,
            gradient_accumulation_steps=K,
            max_steps=2,
            use_cpu=True,
            ddp_backend="gloo",
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            seed=0,
        )
        trainer = FloraTrainer(
            model=model,
            args=args,
            train_dataset=tokens,
            optimizers=(optimizer, None),
            accumulation_compression_rank=4,
        )
        trainer.train()
        state = trainer.accelerator.flora_comm_state
        flat = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    rank, world = dist.get_rank(), dist.get_world_size()
    gathered = [torch.empty_like(flat) for _ in range(world)]
    dist.all_gather(gathered, flat)
    result = dict(
        identical=all(torch.equal(gathered[0], g) for g in gathered),
        calls=None if state is None else state.calls,
        ddp=isinstance(trainer.model_wrapped, torch.nn.parallel.DistributedDataParallel),
    )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)


def main():
    mode, out = sys.argv[1], sys.argv[2]
    estimator = sys.argv[3] if len(sys.argv) > 3 else "gaussian"
    if mode == "trainer":
        return trainer(out)
    acc_rank, per_rank = (RANK, PER_RANK) if estimator == "gaussian" else (SUBSPACE_RANK, 1)
    if mode == "accelerate":
        accelerator = flora_opt.FloraAccelerator(
            gradient_accumulation_steps=K,
            accumulation_compression_rank=acc_rank,
            accumulation_estimator=estimator,
            cpu=True,
        )
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    def global_batch(index):
        return torch.cat([micro_batch(index, world)[r * PER_RANK :][:per_rank] for r in range(world)])

    # the single-process run over the global batch (every rank computes it): compressed
    # accumulation with the same projections (gaussian), or naive accumulation (subspace)
    reference = build()
    reference_opt = flora_opt.Flora(reference.parameters(), lr=1e-2, rank=RANK)
    reference_rank = RANK if estimator == "gaussian" else None
    reference_acc = CompressedAccumulator(
        reference_opt, rank=reference_rank, accumulation_steps=K, estimator="gaussian"
    )
    for index in range(K * CYCLES):
        reference_acc.backward(reference(global_batch(index)).pow(2).mean() / K)
        if reference_acc.sync_gradients:
            reference_opt.step()
            reference_opt.zero_grad()

    model = build()
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-2, rank=RANK)
    if mode == "accelerate":
        model, optimizer = accelerator.prepare(model, optimizer)
        state = None
    else:
        model = torch.nn.parallel.DistributedDataParallel(model)
        accumulator = CompressedAccumulator(optimizer, rank=acc_rank, accumulation_steps=K, estimator=estimator)
        state = flora_opt.distributed.register_compressed_allreduce(model, accumulator)
    identical = True
    for index in range(K * CYCLES):
        local = micro_batch(index, world)[rank * PER_RANK :][:per_rank]
        if mode == "accelerate":
            with accelerator.accumulate(model):
                accelerator.backward(model(local).pow(2).mean())
                optimizer.step()
                optimizer.zero_grad()
            state = accelerator.flora_comm_state
        else:
            sync = (index + 1) % K == 0
            context = model.no_sync() if not sync else torch.enable_grad()
            with context:
                accumulator.backward(model(local).pow(2).mean() / K, sync=sync)
            if sync:
                optimizer.step()
                optimizer.zero_grad()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.empty_like(flat) for _ in range(world)]
        dist.all_gather(gathered, flat)
        identical = identical and all(torch.equal(gathered[0], g) for g in gathered)
    error = 0.0
    for p, q in zip(model.parameters(), reference.parameters()):
        error = max(error, ((p.detach() - q.detach()).abs().max() / q.abs().max()).item())
    result = dict(
        identical=identical,
        error=error,
        calls=state.calls,
        elements=state.elements,
        numel=sum(p.numel() for p in model.parameters()),
    )
    if rank == 0:
        with open(out, "w") as f:
            json.dump(result, f)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/_fsdp_worker.py


if __name__ == "__main__":
    main()
