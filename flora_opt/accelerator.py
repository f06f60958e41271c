"""``flora_opt.FloraAccelerator``: ``accelerate.Accelerator`` with compressed gradient accumulation
and optional layer-wise updates.

A training loop written for accelerate runs unchanged; only the constructor changes::

    accelerator = flora_opt.FloraAccelerator(
        gradient_accumulation_steps=16, accumulation_compression_rank=64
    )

The work is done by :class:`flora_opt.accumulation.CompressedAccumulator` (docs/accumulation.md),
attached to the optimizer passed to :meth:`prepare`. Any torch optimizer works; with
:class:`flora_opt.Flora` the momentum is compressed too.
"""

from __future__ import annotations

import contextlib
import os
import warnings

import torch
from accelerate import Accelerator

from . import core
from .accumulation import CompressedAccumulator
from .hyperparams import check_bool, check_choice, check_int, check_real, check_seed

__all__ = ["FloraAccelerator"]

STATE_FILE = "flora_accumulator_{}.pt"  # one per process: buffers are local to each rank

_UNSUPPORTED = ("DEEPSPEED", "FSDP", "MEGATRON_LM", "XLA")
# why compressed accumulation / layer-wise updates cannot run under each engine, and what to use
_UNSUPPORTED_WHY = {
    "FSDP": (
        "FSDP takes every micro-batch's gradient from autograd itself (reduce-scattered into sharded DTensor "
        "gradients, or accumulated unsharded inside its parameters without sync), so no full local gradient "
        "reaches .grad to compress. Under FSDP2 use FloraAccelerator without accumulation_compression_rank "
        "(layerwise=True works there: each shard is updated after its reduce-scatter); flora_opt.Flora steps the "
        "sharded parameters and shards its state with them (docs/distributed.md)"
    ),
    "DEEPSPEED": (
        "DeepSpeed owns the gradient buffers (ZeRO partitions and reduces them in its engine) and the optimizer "
        "step, so hooks on a parameter's .grad never see the micro-batch gradients, reduced or not. Use DDP "
        "(compressed all-reduce of the accumulation buffers, layer-wise updates per bucket) or FSDP2 (sharded Flora "
        "state, layer-wise updates per shard), docs/distributed.md"
    ),
    "MEGATRON_LM": (
        "Megatron-LM's pipeline parallelism runs the backward of each micro-batch separately inside its schedule, "
        "interleaved with other stages' forward passes, and reduces and applies the gradients in its own engine, so a "
        "hook on a tensor can neither tell which backward completes its gradient for the step nor see it reduced. "
        "Use DDP or FSDP2 (docs/distributed.md)"
    ),
}
_FSDP1_WHY = (
    "FSDP1 (fsdp_version=1) reduces flat parameters that concatenate many tensors and writes their sharded gradients "
    "after its own post-backward, with no per-tensor hook called on the reduced gradient; use "
    "FullyShardedDataParallelPlugin(fsdp_version=2), where each shard is updated right after its reduce-scatter"
)


class FloraAccelerator(Accelerator):
    r"""``accelerate.Accelerator`` whose gradient accumulation is compressed (Flora, Algorithm 1).

    For each weight matrix ``(m, n)`` with ``min(m, n) > accumulation_compression_rank``, each
    micro-batch gradient is folded into an ``r x max(m, n)`` buffer as soon as it is produced
    and ``.grad`` is freed; at the sync micro-batch the buffer is expanded once into ``.grad``,
    the estimate of what ``accelerate`` would have accumulated (the loss is still divided by
    ``gradient_accumulation_steps``). The estimator is :class:`flora_opt.CompressedAccumulator`'s
    (docs/algorithm.md section 12).

    Args:
      accumulation_compression_rank (int or None, default None): rank ``r_acc``; ``None`` keeps
        accelerate's accumulation unchanged (then, without ``layerwise``, this class is exactly
        ``accelerate.Accelerator``).
      accumulation_seed (int, default 0): seed of the accumulation projections.
      accumulation_estimator (str, default ``"subspace"``): ``"subspace"`` projects on a basis
        tracked through the micro-batches (``min(m, n) x r`` more floats, kept between cycles);
        ``"gaussian"`` is the paper's unbiased random projection, fresh at every cycle.
      layerwise (bool, default False): update each tensor inside ``accelerator.backward`` on the
        sync micro-batch, as soon as its reduced gradient is complete (LOMO-style; not with fp16
        loss scaling). On one process, under DDP (each bucket after its all-reduce, through
        :func:`flora_opt.distributed.register_layerwise_allreduce`, registered before the first
        sync backward) and under FSDP2 (each shard after its reduce-scatter).
        ``optimizer.step()``/``zero_grad()`` stay in your loop and keep working; after a
        layer-wise backward there is nothing left for them to do.
      compressed_communication (bool, default True): under DDP with
        ``accumulation_compression_rank``, all-reduce each cycle's compressed ``r x max(m, n)``
        buffers instead of the decompressed gradients (a DDP communication hook,
        :func:`flora_opt.distributed.compressed_allreduce_hook`; the same mean gradient, at
        ``r / min(m, n)`` of the bytes for the compressed tensors). ``False``: DDP reduces the
        decompressed gradients.
      layerwise_max_grad_norm (float or None, default None): clipping in layer-wise mode. Each
        tensor ``i`` is clipped to ``max_norm * sqrt(numel_i / numel_total)`` before its update
        (so the applied gradient has global norm ``<= max_norm``); ``clip_grad_norm_(params,
        max_norm)`` must then be called with the same value (or ``inf``) and returns the exact
        pre-clip global norm. Without it, ``clip_grad_norm_`` with a finite norm raises in
        layer-wise mode instead of silently not clipping.
      **accelerate_kwargs: everything ``accelerate.Accelerator`` accepts
        (``gradient_accumulation_steps``, ``mixed_precision``, ``project_dir``, ...).

    Example:
      >>> import torch, flora_opt
      >>> accelerator = flora_opt.FloraAccelerator(gradient_accumulation_steps=4, accumulation_compression_rank=8)
      >>> model = torch.nn.Linear(32, 32)
      >>> optimizer = flora_opt.Flora(model.parameters(), lr=1e-3, rank=8)
      >>> model, optimizer = accelerator.prepare(model, optimizer)
      >>> for _ in range(8):
      ...     with accelerator.accumulate(model):
      ...         accelerator.backward(model(torch.randn(4, 32)).pow(2).mean())
      ...         optimizer.step()
      ...         optimizer.zero_grad()

    Note:
      Checkpoints: ``save_state`` writes ``flora_accumulator_<process>.pt`` (seed, cycle, position
      in the cycle, buffers, partial gradients), and ``load_state`` restores it, so a run stopped
      in the middle of an accumulation cycle resumes bit-exactly. Differences from the reference
      ``FloraAccelerator`` (``flora-opt==0.0.3``): layer-wise updates are opt-in instead of always
      on, ``optimizer.step()`` is not a silent no-op, clipping is defined, DDP gradient sync and
      checkpoints work, and a cycle of one micro-batch is not compressed.
    """

    def __init__(
        self,
        *args,
        accumulation_compression_rank: int | None = None,
        accumulation_seed: int = 0,
        accumulation_estimator: str = core.ESTIMATOR_SUBSPACE,
        layerwise: bool = False,
        layerwise_max_grad_norm: float | None = None,
        compressed_communication: bool = True,
        **accelerate_kwargs,
    ):
        rank = accumulation_compression_rank
        check_int("accumulation_compression_rank", rank, none="for uncompressed accumulation")
        check_seed("accumulation_seed", accumulation_seed)
        check_choice("accumulation_estimator", accumulation_estimator, core.ESTIMATORS)
        check_bool("layerwise", layerwise)
        check_bool("compressed_communication", compressed_communication)
        norm = layerwise_max_grad_norm
        if norm is not None:
            check_real("layerwise_max_grad_norm", norm, above=0.0, none="")
            if not layerwise:
                raise ValueError(
                    f"Invalid layerwise_max_grad_norm: {norm!r}: needs layerwise=True (otherwise call "
                    "accelerator.clip_grad_norm_ as usual)"
                )
        super().__init__(*args, **accelerate_kwargs)
        self.accumulation_compression_rank = None if rank is None else int(rank)
        self.accumulation_seed = int(accumulation_seed)
        self.accumulation_estimator = accumulation_estimator
        self.layerwise = bool(layerwise)
        self.compressed_communication = bool(compressed_communication)
        self.flora_comm_state = None  # flora_opt.distributed.CompressedAllreduceState under DDP
        self._flora_ddp_models: list[torch.nn.parallel.DistributedDataParallel] = []
        self._flora_accumulate_depth = 0  # inside accelerator.accumulate()
        self._flora_sync_backwards = 0  # sync backward calls in the current accumulate() block
        self._flora_unsynced_since_sync = False  # a non-sync backward since the last sync one
        self.layerwise_max_grad_norm = None if norm is None else float(norm)
        self._flora_accumulator: CompressedAccumulator | None = None
        self._flora_deferred = None  # FSDP2: the prepared optimizer, until prepare() has sharded it
        self._flora_check_engine()
        if layerwise and self.scaler is not None:
            raise ValueError(
                f"FloraAccelerator: layerwise=True is incompatible with mixed_precision={self.mixed_precision!r} "
                "(fp16 loss scaling needs every gradient before any step); use bf16 or fp32"
            )
        fsdp_requested = (
            accelerate_kwargs.get("fsdp_plugin") is not None
            or os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        )
        if fsdp_requested and self.distributed_type.name != "FSDP":
            warnings.warn(
                f"FloraAccelerator: an FSDP plugin was requested but accelerate chose "
                f"distributed_type={self.distributed_type.name}: accelerate enables FSDP only with several processes "
                "on GPU back-ends (CPU runs get DDP, one process gets none), so the model will not be sharded "
                "(docs/distributed.md, accelerate and transformers)",
                RuntimeWarning,
                stacklevel=2,
            )
        self.register_save_state_pre_hook(self._flora_save_hook)
        self.register_load_state_pre_hook(self._flora_load_hook)

    def _flora_check_engine(self) -> None:
        """Refuse the options the distributed engine cannot run, saying why (also at ``prepare``, where
        the engine is final)."""
        rank = self.accumulation_compression_rank
        if rank is None and not self.layerwise:
            return
        engine = self.distributed_type.name
        option = "layerwise=True" if rank is None else f"accumulation_compression_rank={rank}"
        if engine == "FSDP" and rank is None and not self.is_fsdp2:
            raise ValueError(f"FloraAccelerator: layerwise=True is not supported with FSDP1: {_FSDP1_WHY}")
        if engine in _UNSUPPORTED and not (engine == "FSDP" and rank is None):
            why = _UNSUPPORTED_WHY.get(
                engine, "sharded or engine-managed gradients; it works with a single process, DDP and FSDP2"
            )
            raise ValueError(f"FloraAccelerator: {option} is not supported with distributed_type={engine}: {why}")

    @property
    def accumulator(self) -> CompressedAccumulator | None:
        """The :class:`CompressedAccumulator` attached at ``prepare`` (None when inactive)."""
        return self._flora_accumulator

    def prepare_model(self, model: torch.nn.Module, device_placement=None, evaluation_mode=False):
        prepared = super().prepare_model(model, device_placement=device_placement, evaluation_mode=evaluation_mode)
        if isinstance(prepared, torch.nn.parallel.DistributedDataParallel) and prepared not in self._flora_ddp_models:
            self._flora_ddp_models.append(prepared)  # the DDP wrapper, for the compressed comm hook
        return prepared

    def prepare(self, *args, device_placement=None):
        """``accelerate.Accelerator.prepare``; under FSDP2 the accumulator is attached once the
        optimizer holds the sharded parameters (accelerate swaps them in after ``fully_shard``)."""
        self._flora_check_engine()
        result = super().prepare(*args, device_placement=device_placement)
        deferred, self._flora_deferred = self._flora_deferred, None
        if deferred is not None:
            self._flora_attach(deferred)
        return result

    def prepare_optimizer(self, optimizer: torch.optim.Optimizer, device_placement=None):
        prepared = super().prepare_optimizer(optimizer, device_placement=device_placement)
        if self.accumulation_compression_rank is not None or self.layerwise:
            if self._flora_accumulator is not None or self._flora_deferred is not None:
                raise NotImplementedError(
                    "FloraAccelerator with accumulation_compression_rank or layerwise supports one optimizer; "
                    "a second one was prepared"
                )
            if self.is_fsdp2:  # its parameters are still the unsharded ones: attach after prepare()
                self._flora_deferred = prepared
            else:
                self._flora_attach(prepared)
        return prepared

    def _flora_attach(self, optimizer) -> None:
        self._flora_accumulator = CompressedAccumulator(
            optimizer,
            self.accumulation_compression_rank,
            accumulation_steps=self.gradient_accumulation_steps,
            seed=self.accumulation_seed,
            layerwise=self.layerwise,
            max_grad_norm=self.layerwise_max_grad_norm,
            estimator=self.accumulation_estimator,
        )

    @contextlib.contextmanager
    def accumulate(self, *models):
        """``accelerate.Accelerator.accumulate``; also marks one micro-batch for the checks of
        :meth:`backward`."""
        self._flora_accumulate_depth += 1
        self._flora_sync_backwards = 0
        try:
            with super().accumulate(*models):
                yield
        finally:
            self._flora_accumulate_depth -= 1

    def backward(self, loss, **kwargs):
        accumulator = self._flora_accumulator
        if accumulator is None:
            return super().backward(loss, **kwargs)
        sync = self.sync_gradients
        self._check_cycle(accumulator, sync)
        if not sync:
            self._flora_unsynced_since_sync = True
        else:
            self._flora_unsynced_since_sync = False
            self._flora_sync_backwards += 1
        if sync and self.flora_comm_state is None:
            self._flora_register_comm_hook(accumulator)
        with accumulator.micro_batch(sync=sync):
            return super().backward(loss, **kwargs)

    def _flora_register_comm_hook(self, accumulator: CompressedAccumulator) -> None:
        """Under DDP (once, before the first sync backward): with layer-wise updates, step each
        bucket after its all-reduce (flora_opt.distributed.layerwise_allreduce_hook); otherwise
        all-reduce the compressed buffers instead of the gradients
        (flora_opt.distributed.compressed_allreduce_hook)."""
        ddp = self._flora_ddp_models
        if len(ddp) != 1:
            return  # no DDP model (or several): DDP's own reduction (layer-wise: refused at the first gradient)
        from .distributed import register_compressed_allreduce, register_layerwise_allreduce

        if accumulator.layerwise:
            self.flora_comm_state = register_layerwise_allreduce(
                ddp[0], accumulator, compressed_communication=self.compressed_communication
            )
            return
        if not self.compressed_communication or accumulator.rank is None or self.num_processes == 1:
            return
        self.flora_comm_state = register_compressed_allreduce(ddp[0], accumulator)

    def _check_cycle(self, accumulator: CompressedAccumulator, sync: bool) -> None:
        """Refuse the loops whose cycle the accumulator cannot follow (docs/accumulation.md)."""
        if not sync:
            return
        option = (
            "layerwise=True"
            if self.layerwise
            else f"accumulation_compression_rank={self.accumulation_compression_rank}"
        )
        if self.layerwise and self._flora_accumulate_depth > 0 and self._flora_sync_backwards > 0:
            raise RuntimeError(
                "FloraAccelerator(layerwise=True): accelerator.backward was called twice in the micro-batch that "
                "closes the accumulation cycle; layer-wise updates are applied inside the first call, so a second "
                "one would update the parameters again (or fail on a retained graph). Sum the losses and call "
                "accelerator.backward once per micro-batch, or use layerwise=False"
            )
        steps = self.gradient_accumulation_steps
        if (
            steps > 1
            and self._flora_accumulate_depth == 0
            and not self._flora_unsynced_since_sync
            and not self.gradient_state.end_of_dataloader
        ):
            raise RuntimeError(
                f"FloraAccelerator(gradient_accumulation_steps={steps}, {option}): accelerator.backward ran "
                "outside `with accelerator.accumulate(model):` with every micro-batch marked as the end of a "
                "cycle, so each micro-batch would be its own cycle (layer-wise: its own update; compressed: "
                "nothing compressed). Wrap each micro-batch in `with accelerator.accumulate(model):` and call "
                "optimizer.step() in every iteration, as accelerate's accumulation guide does"
            )

    def clip_grad_norm_(self, parameters, max_norm, norm_type=2):
        accumulator = self._flora_accumulator
        if accumulator is not None and accumulator.layerwise:
            return accumulator.clip_grad_norm_(max_norm, norm_type)
        return super().clip_grad_norm_(parameters, max_norm, norm_type=norm_type)

    def clip_grad_value_(self, parameters, clip_value):
        accumulator = self._flora_accumulator
        if accumulator is not None and accumulator.layerwise:
            raise RuntimeError(
                "clip_grad_value_ is not available with layerwise=True: the gradients were applied during backward"
            )
        return super().clip_grad_value_(parameters, clip_value)

    def free_memory(self, *objects):
        if self._flora_accumulator is not None:
            self._flora_accumulator.remove()
            self._flora_accumulator = None
        return super().free_memory(*objects)

    # ---- checkpoints ----------------------------------------------------------------------
    def _flora_save_hook(self, models, weights, output_dir) -> None:
        self.save_accumulator(output_dir)

    def _flora_load_hook(self, models, input_dir) -> None:
        self.load_accumulator(input_dir)

    def save_accumulator(self, output_dir: str) -> None:
        """Write the accumulator's state to ``output_dir/flora_accumulator_<process>.pt``
        (``save_state`` does it; :class:`flora_opt.hf.FloraTrainer` at each checkpoint)."""
        if self._flora_accumulator is not None:
            path = os.path.join(output_dir, STATE_FILE.format(self.process_index))
            torch.save(self._flora_accumulator.state_dict(), path)

    def load_accumulator(self, input_dir: str) -> None:
        """Restore what :meth:`save_accumulator` wrote (``load_state`` does it); a checkpoint
        without it starts a fresh accumulation cycle, with a warning."""
        if self._flora_accumulator is None:
            return
        path = os.path.join(input_dir, STATE_FILE.format(self.process_index))
        if not os.path.exists(path):
            warnings.warn(
                f"FloraAccelerator.load_state: {path} not found (checkpoint saved without compressed "
                "accumulation?); starting a fresh accumulation cycle",
                RuntimeWarning,
                stacklevel=3,
            )
            self._flora_accumulator.reset()
            return
        self._flora_accumulator.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
