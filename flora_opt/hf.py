"""Flora with ``transformers.Trainer``: compressed accumulation and layer-wise updates.

The optimizer alone needs nothing from this module: pass it to any Trainer with
``optimizers=(flora_opt.Flora(model.parameters(), lr=...), None)`` (or
``optimizer_cls_and_kwargs=(flora_opt.Flora, {...})``). To also compress gradient accumulation
(``TrainingArguments(gradient_accumulation_steps > 1)``) or update layer-wise, use
:class:`FloraTrainer`, a ``Trainer`` whose accelerator is a :class:`flora_opt.FloraAccelerator`::

    trainer = FloraTrainer(
        model=model, args=TrainingArguments(..., gradient_accumulation_steps=16),
        train_dataset=dataset, optimizers=(flora_opt.Flora(model.parameters(), lr=1e-3), None),
        accumulation_compression_rank=64,
    )
    trainer.train()

Under FSDP2 (``TrainingArguments(fsdp="full_shard", fsdp_config={"version": 2})``) the Trainer
refuses ``optimizers=(...)``: pass ``optimizer_cls_and_kwargs=(flora_opt.Flora, {...})`` and
leave ``accumulation_compression_rank`` unset (docs/distributed.md); Flora then steps the sharded
parameters and shards its state with them, after backward or, with ``layerwise=True``, each shard
right after its reduce-scatter.
"""

from __future__ import annotations

import functools
import os
import types

import transformers
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .accelerator import FloraAccelerator

__all__ = ["FloraTrainer"]


class _CycleCallback(transformers.TrainerCallback):
    """Keeps the accumulator in step with the Trainer's checkpoints.

    The Trainer checkpoints only at cycle boundaries (after an optimizer step), where the
    compressed buffers are empty; what must survive is the cycle number, which selects the
    projections, and the subspace estimator's bases. Each checkpoint folder gets the
    accumulator's state (``FloraAccelerator.save_accumulator``); a resumed run loads it, and
    the cycle is set from the Trainer's restored ``state.global_step`` in any case.
    """

    def __init__(self, trainer: FloraTrainer):
        self._trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        accelerator = self._trainer.accelerator
        accumulator = accelerator.accumulator
        if accumulator is not None:
            accumulator.reset()
            if self._trainer._flora_resume is not None:
                accelerator.load_accumulator(self._trainer._flora_resume)
            accumulator.cycle = int(state.global_step)
        return control

    def on_save(self, args, state, control, **kwargs):
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if os.path.isdir(folder):
            self._trainer.accelerator.save_accumulator(folder)
        return control


class FloraTrainer(transformers.Trainer):
    """``transformers.Trainer`` built on :class:`flora_opt.FloraAccelerator`.

    Args:
      accumulation_compression_rank (int or None, default None): rank of the compressed
        gradient accumulation (used when ``gradient_accumulation_steps > 1``).
      accumulation_seed (int, default 0): seed of the accumulation projections.
      accumulation_estimator (str, default ``"subspace"``): as :class:`flora_opt.FloraAccelerator`.
      layerwise (bool, default False): update each tensor inside backward, from its reduced
        gradient under DDP and FSDP2 (not with fp16). ``TrainingArguments.max_grad_norm`` then
        clips each tensor to its share ``max_grad_norm * sqrt(numel_i / numel_total)``
        (docs/accumulation.md); the logged ``grad_norm`` is the exact pre-clip global norm.
        Under DDP, ``TrainingArguments.ddp_find_unused_parameters`` left at ``None`` is set to
        ``False`` (DDP's search for unused parameters writes into buckets that layer-wise
        updates keep freed; :func:`flora_opt.distributed.register_layerwise_allreduce`).
      *args, **kwargs: as ``transformers.Trainer`` (pass the optimizer with ``optimizers=``
        or ``optimizer_cls_and_kwargs=``).

    The accumulation cycle is the Trainer's ``global_step``, so ``resume_from_checkpoint``
    continues with the same projections as an uninterrupted run.
    """

    def __init__(
        self,
        *args,
        accumulation_compression_rank: int | None = None,
        accumulation_seed: int = 0,
        accumulation_estimator: str = "subspace",
        layerwise: bool = False,
        **kwargs,
    ):
        self._flora_options = dict(
            accumulation_compression_rank=accumulation_compression_rank,
            accumulation_seed=accumulation_seed,
            accumulation_estimator=accumulation_estimator,
            layerwise=layerwise,
        )
        self._flora_resume: str | None = None  # the checkpoint folder train() resumes from
        super().__init__(*args, **kwargs)
        self.add_callback(_CycleCallback(self))

    def train(self, resume_from_checkpoint=None, *args, **kwargs):
        """``transformers.Trainer.train``; a resumed run also restores the accumulator's state."""
        folder = resume_from_checkpoint
        if folder is True:
            folder = get_last_checkpoint(self.args.output_dir)
        self._flora_resume = folder if isinstance(folder, str) else None
        return super().train(resume_from_checkpoint, *args, **kwargs)

    def create_accelerator_and_postprocess(self) -> None:
        options = dict(self._flora_options)
        if options["layerwise"] and self.args.ddp_find_unused_parameters is None:
            # the Trainer's default for a PreTrainedModel is True, which layer-wise updates under DDP refuse
            self.args.ddp_find_unused_parameters = False
        max_norm = self.args.max_grad_norm
        if options["layerwise"] and max_norm is not None and 0 < max_norm < float("inf"):
            options["layerwise_max_grad_norm"] = float(max_norm)
        # The Trainer builds ``Accelerator(**args)`` from its module's globals. Run its method
        # with a copy of those globals in which ``Accelerator`` is the FloraAccelerator: the
        # change is seen by this call only, never by transformers.trainer (other Trainers,
        # other threads).
        base = super().create_accelerator_and_postprocess.__func__
        scoped_globals = dict(base.__globals__, Accelerator=functools.partial(FloraAccelerator, **options))
        scoped = types.FunctionType(base.__code__, scoped_globals, base.__name__, base.__defaults__, base.__closure__)
        return scoped(self)
