"""Worker for tests/test_accelerate_fsdp.py: accelerate's FSDP2 path with flora_opt.Flora on CPU (gloo).

``python -m torch.distributed.run --nproc_per_node=W _accelerate_fsdp_worker.py MODE OUT [VARIANT]``

accelerate 1.x enables FSDP only on GPU back-ends: on CPU, ``AcceleratorState`` sets
``distributed_type = MULTI_CPU`` and drops the plugin (``accelerate/state.py``: the FSDP branch
is inside ``if self.distributed_type in [MULTI_GPU, MULTI_NPU, ...]``), and prepares DDP instead.
:func:`force_fsdp2` sets the two fields that gate alone, after the accelerator is built; everything
after it is accelerate's own code: ``prepare`` (``_prepare_fsdp2``: the optimizer is prepared,
its parameters are swapped for placeholders, ``fully_shard`` runs, and the optimizer's parameters
are replaced by the sharded ``DTensor`` ones), ``accumulate`` (``set_requires_gradient_sync``),
``backward``, ``save_state``/``load_state`` (``torch.distributed.checkpoint``).

Modes:
  accelerate  FloraAccelerator + FSDP2 plugin, 2 micro-batches per step, 4 steps (kappa=2: a
              resample), against single-process Flora on the same global batch; then save_state,
              2 steps, load_state, the same 2 steps again (must repeat bit for bit).
  accelerate_layerwise  the same with ``layerwise=True``: each shard updated after its
              reduce-scatter, nothing left for ``optimizer.step()``.
  trainer     flora_opt.hf.FloraTrainer, a tiny GPT-2, 4 optimizer steps of 2 micro-batches;
              ``fsdp2`` (forced as above, world 2) or ``plain`` (world 1, the reference), and
              ``fsdp2_layerwise`` / ``plain_layerwise`` with ``layerwise=True``; records the
              final full parameters and the optimizer state's placements.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from _tiny_mlp import PER_RANK, build, micro_batch

import flora_opt
from flora_opt.distributed import is_dtensor, local_state_bytes

K, STEPS = 2, 4
OPTIONS = dict(lr=1e-2, rank=4, kappa=2, min_dim_size_to_factor=8)


def force_fsdp2(plugin) -> None:
    """Let accelerate's FSDP2 code run on CPU: the fields its GPU-only gate leaves unset."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    state = AcceleratorState()
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    state.distributed_type = DistributedType.FSDP
    state.fsdp_plugin = plugin


def full_parameters(model):
    return torch.cat([(p.full_tensor() if is_dtensor(p) else p).detach().flatten() for p in model.parameters()])


def placements(optimizer):
    found = {}
    for index, param in enumerate(optimizer.param_groups[0]["params"]):
        state = optimizer.state.get(param, {})
        found[str(index)] = {
            key: [str(value.placements[0]), list(value.to_local().shape)]
            for key, value in state.items()
            if is_dtensor(value)
        }
    return found


def accelerate_mode(out, layerwise=False):
    from accelerate.utils import FullyShardedDataParallelPlugin

    plugin = FullyShardedDataParallelPlugin(fsdp_version=2)
    accelerator = flora_opt.FloraAccelerator(
        fsdp_plugin=plugin, cpu=True, gradient_accumulation_steps=K, layerwise=layerwise
    )
    force_fsdp2(plugin)
    rank, world = accelerator.process_index, accelerator.num_processes

    reference = build()  # single process, the global batch, naive accumulation (every rank computes it)
    reference_opt = flora_opt.Flora(reference.parameters(), **OPTIONS)
    for index in range(K * STEPS):
        (reference(micro_batch(index, world)).pow(2).mean() / K).backward()
        if (index + 1) % K == 0:
            reference_opt.step()
            reference_opt.zero_grad()

    model = build()
    optimizer = flora_opt.Flora(model.parameters(), **OPTIONS)
    model, optimizer = accelerator.prepare(model, optimizer)
    params_are_dtensors = all(is_dtensor(p) for p in model.parameters())
    optimizer_params = list(optimizer.optimizer.param_groups[0]["params"])
    same_objects = all(a is b for a, b in zip(optimizer_params, model.parameters()))

    left_for_step = []  # layer-wise: tensors still holding a gradient after each sync backward

    def train(first, count):
        for index in range(first * K, (first + count) * K):
            local = micro_batch(index, world)[rank * PER_RANK : (rank + 1) * PER_RANK]
            with accelerator.accumulate(model):
                accelerator.backward(model(local).pow(2).mean())
                if accelerator.sync_gradients:
                    left_for_step.append(sum(p.grad is not None for p in model.parameters()))
                optimizer.step()
                optimizer.zero_grad()

    train(0, STEPS)
    flat = full_parameters(model)
    expected = torch.cat([p.detach().flatten() for p in reference.parameters()])
    error = ((flat - expected).abs().max() / expected.abs().max()).item()
    local_bytes = local_state_bytes(optimizer.optimizer)
    reference_bytes = reference_opt.state_bytes()

    checkpoint = os.path.join(os.path.dirname(out), "accelerate_state")
    accelerator.save_state(checkpoint)
    train(STEPS, 2)
    continued = full_parameters(model)
    accelerator.load_state(checkpoint)
    reloaded = full_parameters(model)
    train(STEPS, 2)
    repeated = full_parameters(model)

    gathered = [None] * world
    dist.all_gather_object(gathered, local_bytes)
    result = dict(
        distributed_type=accelerator.distributed_type.name,
        is_fsdp2=bool(accelerator.is_fsdp2),
        params_are_dtensors=params_are_dtensors,
        optimizer_holds_sharded_params=same_objects,
        error=error,
        local_state_bytes=gathered,
        reference_state_bytes=reference_bytes,
        placements=placements(optimizer.optimizer),
        reload_restored=torch.equal(reloaded, flat),
        resumed_equal=torch.equal(repeated, continued),
        resumed_moved=not torch.equal(continued, flat),
        steps=[s["step"] for s in optimizer.optimizer.state.values()],
        left_for_step=sorted(set(left_for_step)),
        layerwise=accelerator.accumulator is not None and accelerator.accumulator.layerwise,
    )
    finish(out, result, rank)


def trainer_mode(out, variant):
    import tempfile

    import transformers

    from flora_opt.hf import FloraTrainer

    class Tokens(torch.utils.data.Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, index):
            ids = torch.randint(0, 96, (16,), generator=torch.Generator().manual_seed(index))
            return {"input_ids": ids, "labels": ids}

    class ForcedFSDP2Trainer(FloraTrainer):
        def create_accelerator_and_postprocess(self):
            result = super().create_accelerator_and_postprocess()
            if variant.startswith("fsdp2"):  # the plugin the Trainer built from fsdp_config, dropped on CPU
                from accelerate.utils import FullyShardedDataParallelPlugin

                force_fsdp2(FullyShardedDataParallelPlugin(**self.args.fsdp_plugin_args))
                self.is_fsdp_enabled = True
            return result

    world = int(os.environ.get("WORLD_SIZE", "1"))
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=96, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0
    )
    model = transformers.GPT2LMHeadModel(config)
    fsdp = dict(fsdp="full_shard", fsdp_config={"version": 2}) if variant.startswith("fsdp2") else {}
    with tempfile.TemporaryDirectory() as output_dir:
        args = transformers.TrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=4 // world,
            gradient_accumulation_steps=K,
            max_steps=STEPS,
            use_cpu=True,
            ddp_backend="gloo" if world > 1 else None,
            report_to=[],
            save_strategy="no",
            logging_strategy="no",
            dataloader_num_workers=0,
            seed=0,
            **fsdp,
        )
        # under FSDP the Trainer refuses optimizers=(...): it must build the optimizer itself
        trainer = ForcedFSDP2Trainer(
            model=model,
            args=args,
            train_dataset=Tokens(),
            optimizer_cls_and_kwargs=(flora_opt.Flora, OPTIONS),
            layerwise=variant.endswith("layerwise"),
        )
        trainer.train()
        inner = trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer
        result = dict(
            distributed_type=trainer.accelerator.distributed_type.name,
            params=full_parameters(trainer.model).tolist(),
            params_are_dtensors=all(is_dtensor(p) for p in trainer.model.parameters()),
            placements=placements(inner),
            steps=sorted({s["step"] for s in inner.state.values()}),
        )
    finish(out, result, int(os.environ.get("RANK", "0")))


def finish(out, result, rank):
    if dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, result)
        dist.barrier()
    else:
        gathered = [result]
    if rank == 0:
        with open(out, "w") as f:
            json.dump(gathered, f)
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see tests/_fsdp_worker.py


if __name__ == "__main__":
    torch.set_num_threads(1)
    if sys.argv[1] in ("accelerate", "accelerate_layerwise"):
        accelerate_mode(sys.argv[2], layerwise=sys.argv[1] == "accelerate_layerwise")
    else:
        trainer_mode(sys.argv[2], sys.argv[3])
