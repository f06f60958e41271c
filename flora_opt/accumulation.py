r"""Compressed gradient accumulation and layer-wise updates for PyTorch, through post-accumulate-grad hooks.

Layer-wise updates (LOMO-style, :func:`enable_layerwise_updates`): each parameter is updated by its
optimizer from a post-accumulate-grad hook as soon as its gradient for the cycle is complete, and
its ``.grad`` is freed right away, so at most a few full-size gradients exist at any time. Across
processes the step waits for the reduced gradient: under FSDP2 it runs in the hook FSDP2 calls on
each sharded parameter right after the reduce-scatter that produced its gradient shard, and under
DDP in Flora's communication hook once a bucket's all-reduce has completed
(:func:`flora_opt.distributed.register_layerwise_allreduce`). This is
exact for optimizers whose update of one tensor depends only on that tensor's gradient and state
(SGD, Adam(W), Adafactor, :class:`flora_opt.Flora`); it is wrong for optimizers that couple tensors
(LAMB-style global trust ratios, anything reading all gradients in ``step``).

This is the engine shared by :class:`flora_opt.FloraAccelerator`, :class:`flora_opt.hf.FloraTrainer`
and plain PyTorch loops. It follows ``docs/algorithm.md`` section 12 (the math is in
:mod:`flora_opt.core`: :func:`~flora_opt.core.accumulation_layout`,
:func:`~flora_opt.core.accumulation_projection`, :func:`~flora_opt.core.compress`,
:func:`~flora_opt.core.decompress`); ``docs/accumulation.md`` gives the details.

For an ``m x n`` gradient (``m <= n``; otherwise the columns are compressed) and ``K``
micro-batches in accumulation cycle ``c``:

.. math::
   Q_c \in \mathbb R^{r \times m},\ (Q_c)_{ij} \sim \mathcal N(0, 1/r)
   \text{ from } \mathrm{key}(\mathrm{tensor\_seed}(s, i), 1, c), \qquad
   B = \sum_{k=1}^{K} Q_c\, g_k, \qquad G = Q_c^\top B,

with ``E[G] = sum_k g_k``, exactly what naive accumulation would leave in ``.grad``. Every micro-batch
gradient is compressed as soon as it is produced and dropped, so between micro-batches a compressed
tensor holds only its ``r x max(m, n)`` buffer.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.weak import WeakIdKeyDictionary

from . import core
from .distributed import is_dtensor
from .hyperparams import check_bool, check_choice, check_int, check_real, check_seed, is_int
from .ops import get_ops
from .projection import tensor_seed

__all__ = ["CompressedAccumulator", "enable_layerwise_updates", "step_parameter", "unwrap_optimizer"]

STATE_FORMAT = 2

# parameter -> the CompressedAccumulator whose hooks are on it (two would compress twice)
_OWNERS: WeakIdKeyDictionary = WeakIdKeyDictionary()


def process_count() -> int:
    """The size of the default process group, 1 when none is initialised."""
    distributed = torch.distributed
    if distributed.is_available() and distributed.is_initialized():
        return distributed.get_world_size()
    return 1


def unreduced_gradient_message(processes: int) -> str:
    """Why a layer-wise update of a local (unreduced) gradient is refused on ``processes > 1``, and
    what to do instead."""
    return (
        f"layer-wise updates on {processes} processes: a gradient arrived before any reduction across processes "
        "(a plain tensor, not a DTensor shard that FSDP2 has reduce-scattered), and updating with it would make "
        "the ranks diverge. Under DistributedDataParallel attach the accumulator to the DDP model with "
        "flora_opt.distributed.register_layerwise_allreduce(ddp_model, accumulator) (FloraAccelerator and "
        "FloraTrainer do it): each tensor is then updated when its bucket's all-reduce completes; or shard the "
        "model with FSDP2 (fully_shard), whose reduce-scatter runs before the update (docs/distributed.md)"
    )


class _Slot:
    """Book-keeping for one parameter (position ``index`` in the optimizer's parameter order)."""

    __slots__ = ("basis", "buffer", "done", "group", "handle", "index", "layout", "param", "seed")

    def __init__(self, param, index, group, layout, seed):
        self.param = param
        self.index = index
        self.group = group
        self.layout = layout
        self.seed = seed
        self.buffer = None  # float32 (r, n) or (m, r) while a cycle has compressed data
        self.basis = None  # subspace estimator: float32 (min(m, n), r), kept from cycle to cycle
        self.done = False  # handled in the current sync backward
        self.handle = None


class CompressedAccumulator:
    r"""Accumulates gradients compressed by a fresh random projection per cycle; optionally
    applies the optimizer to each tensor inside backward (layer-wise updates).

    For each tensor whose matrix view ``(m, n)`` has ``min(m, n) > rank``, every micro-batch
    gradient is projected into an ``r x max(m, n)`` float32 buffer as soon as autograd produces it,
    and ``.grad`` is set back to ``None``. On the sync micro-batch (the last of a cycle) the buffer
    is decompressed once into ``.grad``, which is then what naive accumulation would have left
    there, in expectation (unbiased; variance ``O(1/rank)``). Other tensors (vectors, small
    matrices, ``rank=None``) accumulate in ``.grad`` as usual. A cycle of one micro-batch has
    nothing to accumulate: its gradient is handed over exact.

    With ``layerwise=True`` each tensor is updated by ``optimizer`` as soon as its gradient for
    the cycle is complete (during the sync backward), then its ``.grad`` is freed, so at most a
    few full-size gradients exist at any time. ``optimizer.step()`` and ``zero_grad()`` keep
    working: after a layer-wise backward no tensor holds a gradient, so ``step()`` updates
    nothing more (a gradient you set by hand is still applied).

    Args:
      optimizer: the ``torch.optim.Optimizer`` the gradients are for (an accelerate
        ``AcceleratedOptimizer`` is unwrapped). Tensor ``i`` (its position in the flattened
        param groups, as in :class:`flora_opt.Flora`) gets projection seed
        ``tensor_seed(seed, i)``. Parameters with ``requires_grad=False`` are ignored.
      rank (int or None, default None): accumulation rank ``r_acc``; ``None`` accumulates
        naively (useful with ``layerwise=True``).
      accumulation_steps (int, default 1): micro-batches per cycle, used by :meth:`backward`
        when its ``sync`` argument is not given.
      seed (int, default 0): 32-bit seed of the accumulation projections (stream 1; it never
        collides with Flora's momentum projections, stream 0, even with the same seed).
      layerwise (bool, default False): update each tensor inside the sync backward. Across
        processes each tensor is updated from its reduced gradient: FSDP2 (``DTensor``
        parameters) calls the hooks after the reduce-scatter; under
        ``DistributedDataParallel`` attach the accumulator with
        :func:`flora_opt.distributed.register_layerwise_allreduce`, which steps each bucket after
        its all-reduce. A gradient that arrives unreduced on more than one process raises a
        ``RuntimeError`` before any update; a ``DistributedDataParallel`` module without that
        hook in a one-process group raises one when the first backward ends (its reducer would
        hand ``optimizer.step()`` the gradient a second time).
      max_grad_norm (float or None, default None): layer-wise gradient clipping (needs
        ``layerwise=True``): tensor ``i`` of ``n_i`` elements is clipped to norm
        ``max_grad_norm * sqrt(n_i / N)`` (``N``: all elements), so the gradient applied has
        global norm ``<= max_grad_norm``. See ``docs/accumulation.md``.

    Example:
      >>> import torch, flora_opt
      >>> from flora_opt.accumulation import CompressedAccumulator
      >>> model = torch.nn.Linear(256, 256)
      >>> optimizer = flora_opt.Flora(model.parameters(), lr=1e-3, rank=32)
      >>> accumulator = CompressedAccumulator(optimizer, rank=32, accumulation_steps=4)
      >>> for micro_batch in range(8):
      ...     loss = model(torch.randn(8, 256)).pow(2).mean() / 4
      ...     accumulator.backward(loss)  # loss.backward() plus book-keeping
      ...     if accumulator.sync_gradients:
      ...         optimizer.step(); optimizer.zero_grad()

    Note:
      Use :meth:`backward` (or the :meth:`micro_batch` context around your own backward) so the
      accumulator knows which micro-batch closes a cycle; a bare ``loss.backward()`` is accepted
      only with ``accumulation_steps=1``. Differences from the reference implementation
      (``flora-opt==0.0.3``): updates are not always layer-wise and ``optimizer.step()`` is not
      turned into a no-op; seeds, cycle and buffers are checkpointed; works under DDP.

    References:
      Yongchang Hao, Yanshuai Cao, Lili Mou. "Flora: Low-Rank Adapters Are Secretly Gradient
      Compressors", ICML 2024, Algorithm 1. Kai Lv et al. "Full Parameter Fine-tuning for Large
      Language Models with Limited Resources" (LOMO), 2023.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        rank: int | None = None,
        *,
        accumulation_steps: int = 1,
        seed: int = 0,
        layerwise: bool = False,
        max_grad_norm: float | None = None,
        estimator: str = core.ESTIMATOR_SUBSPACE,
    ):
        optimizer = unwrap_optimizer(optimizer)
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"Invalid optimizer: {type(optimizer).__name__}: expected a torch.optim.Optimizer "
                "(the accumulator needs its parameter order and, for layer-wise updates, its step)"
            )
        check_int("rank", rank, none="for naive accumulation")
        check_int("accumulation_steps", accumulation_steps)
        check_seed("seed", seed)
        check_bool("layerwise", layerwise)
        check_choice("estimator", estimator, core.ESTIMATORS)
        if max_grad_norm is not None:
            check_real("max_grad_norm", max_grad_norm, above=0.0, none="")
            if not layerwise:
                raise ValueError(
                    f"Invalid max_grad_norm: {max_grad_norm!r}: it is only used with layerwise=True; "
                    "without layer-wise updates clip with torch.nn.utils.clip_grad_norm_ before optimizer.step()"
                )
        self.optimizer = optimizer
        self.rank = None if rank is None else int(rank)
        self.accumulation_steps = int(accumulation_steps)
        self.seed = int(seed)
        self.layerwise = bool(layerwise)
        self.max_grad_norm = None if max_grad_norm is None else float(max_grad_norm)
        self.estimator = estimator
        self.cycle = 0
        self.micro_step = 0  # backward passes done in the current cycle
        self.sync_gradients = False  # whether the last (or current) micro-batch closes a cycle
        self.last_grad_norm: torch.Tensor | None = None  # layer-wise: global norm of the last cycle
        self._sync: bool | None = None  # set while a managed backward runs
        # set by flora_opt.distributed.register_compressed_allreduce / register_layerwise_allreduce (DDP):
        # the sync micro-batch's buffers are kept until the DDP comm hook has all-reduced them instead of
        # the gradients
        self.communicate_compressed = False
        # set by flora_opt.distributed.register_layerwise_allreduce: DDP's comm hook steps the tensors
        self.ddp_hook_state = None
        # id(param) -> (slot, buffer, projection or None): the sync micro-batch's buffers, for the DDP hook
        self._pending: dict[int, tuple[_Slot, torch.Tensor, torch.Tensor | None]] = {}
        # layer-wise, with a process group: the autograd graph task whose end is checked
        # (_queue_check_after_backward) and the slots updated in it
        self._checked_task: int | None = None
        self._updated_in_backward: list[_Slot] = []
        self._norm_sq: torch.Tensor | None = None
        self._ops = get_ops("torch")
        self._slots: list[_Slot] = []
        index = 0
        for group_index, group in enumerate(optimizer.param_groups):
            for param in group["params"]:
                if param.requires_grad:
                    layout = core.accumulation_layout(param.shape, rank)
                    self._slots.append(_Slot(param, index, group_index, layout, tensor_seed(seed, index)))
                index += 1
        self._total_numel = sum(slot.param.numel() for slot in self._slots)
        self._slot_of = {id(slot.param): slot for slot in self._slots}
        hooked = [slot for slot in self._slots if slot.layout.compressed or layerwise]
        if any(slot.layout.compressed and is_dtensor(slot.param) for slot in hooked):
            raise ValueError(
                "compressed accumulation does not support DTensor (FSDP2) parameters: FSDP2 takes each micro-batch's "
                "gradient from autograd itself and either reduce-scatters it into a sharded gradient or, without "
                "gradient sync, accumulates it unsharded inside its own parameter objects, so no full local "
                "gradient reaches .grad to be compressed. Under FSDP2 accumulate with "
                "model.set_requires_gradient_sync(False) on all but the last micro-batch (one reduce-scatter per "
                "step), or sync every micro-batch (sharded gradients, 1/world of the memory); layer-wise updates "
                "work there with rank=None; flora_opt.Flora shards its state with the parameters (docs/distributed.md)"
            )
        for slot in hooked:
            if _OWNERS.get(slot.param) is not None:
                raise ValueError(
                    f"parameter {slot.index} (shape {tuple(slot.param.shape)}) is already managed by another "
                    "CompressedAccumulator; call its remove() first"
                )
        for slot in hooked:
            slot.handle = slot.param.register_post_accumulate_grad_hook(self._make_hook(slot))
            _OWNERS[slot.param] = self

    # ---- public API -----------------------------------------------------------------------
    @contextlib.contextmanager
    def micro_batch(self, sync: bool | None = None) -> Iterator[None]:
        """Context for the backward pass(es) of one micro-batch.

        ``sync`` says whether this micro-batch closes the cycle (default: the
        ``accumulation_steps``-th micro-batch of the cycle). On exit after a sync micro-batch the
        gradients are complete in ``.grad`` (or, layer-wise, already applied) and the next cycle
        draws a fresh projection.
        """
        if self._sync is not None:
            raise RuntimeError("CompressedAccumulator.micro_batch() contexts cannot be nested")
        if sync is None:
            sync = self.micro_step + 1 >= self.accumulation_steps
        self._sync = bool(sync)
        self.sync_gradients = self._sync
        try:
            yield
        except BaseException:
            self._sync = None
            raise
        self._end_micro_batch()

    def backward(self, loss: torch.Tensor, *, sync: bool | None = None, **kwargs) -> None:
        """``loss.backward(**kwargs)`` for one micro-batch (see :meth:`micro_batch` for ``sync``).

        Like naive accumulation, the loss should already be divided by the number of
        micro-batches if you want the mean gradient.
        """
        with self.micro_batch(sync):
            loss.backward(**kwargs)

    def buffer_bytes(self) -> int:
        """Bytes held by the accumulation state now (exact): the compressed buffers and, with the
        subspace estimator, the bases kept between cycles."""
        return sum(t.numel() * t.element_size() for s in self._slots for t in (s.buffer, s.basis) if t is not None)

    def compressed_parameters(self) -> list[torch.Tensor]:
        """The parameters whose gradients are accumulated in compressed form."""
        return [s.param for s in self._slots if s.layout.compressed]

    def reset(self) -> None:
        """Drop the current cycle's compressed buffers (``zero_grad`` for the compressed part)."""
        for slot in self._slots:
            slot.buffer = None
        self._pending.clear()
        self.micro_step = 0

    def remove(self) -> None:
        """Remove the hooks; the accumulator stops acting (buffers and bases are dropped). A DDP
        comm hook it was attached to (:func:`flora_opt.distributed.register_layerwise_allreduce`)
        then reduces the gradients into ``.grad`` as DDP's own would."""
        if self.ddp_hook_state is not None:
            self.ddp_hook_state.detach()
            self.ddp_hook_state = None
        for slot in self._slots:
            if slot.handle is not None:
                slot.handle.remove()
                slot.handle = None
                if _OWNERS.get(slot.param) is self:
                    del _OWNERS[slot.param]
            slot.buffer = None
            slot.basis = None

    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> torch.Tensor:
        """What ``clip_grad_norm_`` means in layer-wise mode.

        The gradients were already applied during backward, so this cannot clip them any more: it
        returns the exact global 2-norm of the last cycle's gradients *before* clipping, and checks
        that ``max_norm`` is the ``max_grad_norm`` the accumulator clips with (or ``inf``: no
        clipping requested, norm only). Anything else raises, instead of silently not clipping.
        """
        if not self.layerwise:
            raise RuntimeError(
                "CompressedAccumulator.clip_grad_norm_ is for layer-wise mode; otherwise use "
                "torch.nn.utils.clip_grad_norm_ on the parameters after the sync backward"
            )
        if float(norm_type) != 2.0:
            raise ValueError(f"Invalid norm_type: {norm_type!r}: layer-wise clipping supports only the 2-norm")
        max_norm = float(max_norm)
        if not math.isinf(max_norm) and max_norm != self.max_grad_norm:
            raise RuntimeError(
                f"clip_grad_norm_(max_norm={max_norm!r}) in layer-wise mode: each tensor is updated during "
                "backward, before this call, so clipping must be configured up front: pass "
                f"max_grad_norm={max_norm!r} (FloraAccelerator: layerwise_max_grad_norm={max_norm!r}); "
                f"currently max_grad_norm={self.max_grad_norm!r}"
            )
        if self.last_grad_norm is None:
            device = self._slots[0].param.device if self._slots else None
            return torch.zeros((), device=device)
        return self.last_grad_norm

    # ---- checkpoints ----------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Seed, cycle, position in the cycle, buffers and bases: strings, ints and tensors only.

        Mid-cycle it also holds the partial ``.grad`` of the naively accumulated tensors, so a
        run resumed from it continues bit-exactly. Loads with ``torch.load(weights_only=True)``.
        """
        buffers = {s.index: s.buffer.detach().clone() for s in self._slots if s.buffer is not None}
        bases = {s.index: s.basis.detach().clone() for s in self._slots if s.basis is not None}
        grads = {}
        if self.micro_step > 0:
            for slot in self._slots:
                if not slot.layout.compressed and slot.param.grad is not None:
                    grads[slot.index] = slot.param.grad.detach().clone()
        return {
            "format": STATE_FORMAT,
            "rank": self.rank,
            "seed": self.seed,
            "estimator": self.estimator,
            "accumulation_steps": self.accumulation_steps,
            "cycle": self.cycle,
            "micro_step": self.micro_step,
            "buffers": buffers,
            "bases": bases,
            "grads": grads,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; buffers keep float32, gradients take the parameter dtype."""
        for key in ("seed", "cycle", "micro_step"):
            if not is_int(state_dict.get(key)):
                raise ValueError(f"accumulator state: {key!r} must be an int, got {state_dict.get(key)!r}")
        saved_steps = state_dict.get("accumulation_steps", self.accumulation_steps)
        if not is_int(saved_steps) or saved_steps < 1:
            raise ValueError(f"accumulator state: 'accumulation_steps' must be an int >= 1, got {saved_steps!r}")
        if state_dict["micro_step"] < 0 or state_dict["cycle"] < 0:
            raise ValueError(
                f"accumulator state: 'cycle' and 'micro_step' must be >= 0, got cycle={state_dict['cycle']!r}, "
                f"micro_step={state_dict['micro_step']!r}"
            )
        if state_dict["micro_step"] > 0 and saved_steps != self.accumulation_steps:
            raise ValueError(
                f"accumulator state was saved in the middle of a cycle (micro_step={state_dict['micro_step']}) "
                f"with accumulation_steps={saved_steps}; this accumulator has accumulation_steps="
                f"{self.accumulation_steps}: resume with the same accumulation_steps, or from a checkpoint taken "
                "at a cycle boundary (there a new accumulation_steps applies from the next cycle)"
            )
        saved = (state_dict.get("rank"), state_dict["seed"], state_dict.get("estimator"))
        if saved != (self.rank, self.seed, self.estimator):
            raise ValueError(
                f"accumulator state was saved with rank={saved[0]!r}, seed={saved[1]!r}, estimator={saved[2]!r}; "
                f"this accumulator has rank={self.rank!r}, seed={self.seed!r}, estimator={self.estimator!r}"
            )
        by_index = {slot.index: slot for slot in self._slots}
        buffers = state_dict.get("buffers", {})
        bases = state_dict.get("bases", {})
        grads = state_dict.get("grads", {})
        for index, value in bases.items():
            slot = by_index.get(index)
            expected = None if slot is None or not slot.layout.compressed else slot.layout.basis_shape()
            if expected is None or tuple(value.shape) != expected:
                raise ValueError(
                    f"accumulator state: basis for parameter {index} has shape {tuple(value.shape)}, "
                    f"expected {expected}"
                )
        for index, value in buffers.items():
            slot = by_index.get(index)
            if slot is None or not slot.layout.compressed or tuple(value.shape) != slot.layout.buffer_shape():
                expected = None if slot is None else slot.layout.buffer_shape()
                raise ValueError(
                    f"accumulator state: buffer for parameter {index} has shape {tuple(value.shape)}, "
                    f"expected {expected}"
                )
        for index, value in grads.items():
            slot = by_index.get(index)
            if slot is None or tuple(value.shape) != tuple(slot.param.shape):
                raise ValueError(f"accumulator state: gradient for parameter {index} does not match its parameter")
        self.cycle = state_dict["cycle"]
        self.micro_step = state_dict["micro_step"]
        for slot in self._slots:
            value = buffers.get(slot.index)
            slot.buffer = None if value is None else value.to(device=slot.param.device, dtype=torch.float32, copy=True)
            value = bases.get(slot.index)
            slot.basis = None if value is None else value.to(device=slot.param.device, dtype=torch.float32, copy=True)
            if slot.index in grads:
                slot.param.grad = grads[slot.index].to(device=slot.param.device, dtype=slot.param.dtype, copy=True)

    # ---- the hooks ------------------------------------------------------------------------
    def _current_sync(self) -> bool:
        if self._sync is not None:
            return self._sync
        if self.accumulation_steps == 1:
            return True  # bare loss.backward(): every backward closes its own cycle
        raise RuntimeError(
            "a gradient arrived outside CompressedAccumulator.backward() / micro_batch(): with "
            f"accumulation_steps={self.accumulation_steps} the accumulator must know which micro-batch closes "
            "a cycle (FloraAccelerator: call accelerator.backward(loss), not loss.backward())"
        )

    def _make_hook(self, slot: _Slot):
        def hook(param: torch.Tensor) -> None:
            self._on_gradient(slot)

        return hook

    def _projection(self, slot: _Slot) -> torch.Tensor:
        layout = slot.layout
        return core.accumulation_projection(
            slot.seed, self.cycle, layout.rank, layout.compressed_dim, self._ops, slot.param.device
        )

    @torch.no_grad()
    def _on_gradient(self, slot: _Slot) -> None:
        sync = self._current_sync()
        managed = self._sync is not None
        param = slot.param
        if sync and slot.done and managed:
            if self.layerwise:
                raise RuntimeError(
                    f"parameter {slot.index} (shape {tuple(param.shape)}) received its gradient in two pieces in one "
                    "backward (e.g. shared between a use_reentrant=True checkpointed segment and the rest); layer-wise "
                    "updates need the complete gradient: use torch.utils.checkpoint with use_reentrant=False"
                )
            return  # the late piece stays in .grad, added exactly to the decompressed sum
        ddp = self.ddp_hook_state
        if ddp is not None:
            ddp.gradient_arrived(param, sync)  # before DDP's reducer copies the gradient into its bucket
        if slot.layout.compressed and param.grad is not None:
            if sync and slot.buffer is None:
                pass  # a cycle of one micro-batch: nothing to accumulate, the gradient is exact
            else:
                grad = param.grad
                param.grad = None
                self._fold(slot, grad.to(torch.float32).reshape(slot.layout.matrix))
                del grad
                if sync:
                    self._flush(slot)
        if sync:
            if self.layerwise and ddp is not None:  # DDP's comm hook steps it, after the all-reduce
                self._queue_check_after_backward(slot)
            if self.layerwise and ddp is None:
                if not is_dtensor(param):  # a DTensor shard: FSDP2 calls this after its reduce-scatter
                    processes = process_count()
                    if processes > 1:
                        raise RuntimeError(unreduced_gradient_message(processes))
                    if processes == 1 and torch.distributed.is_initialized():
                        self._queue_check_after_backward(slot)
                self._apply(slot)
            if managed:
                slot.done = True

    def _fold(self, slot: _Slot, matrix: torch.Tensor) -> None:
        """Add one micro-batch's float32 ``(m, n)`` gradient to the slot's compressed state."""
        side = slot.layout.side
        if self.estimator == core.ESTIMATOR_SUBSPACE:
            basis = slot.basis
            if basis is None:
                basis = core.initial_basis(
                    slot.seed, slot.layout.rank, slot.layout.compressed_dim, self._ops, slot.param.device
                )
            slot.basis, slot.buffer = core.track_subspace(basis, slot.buffer, matrix, side, self._ops)
            return
        compressed = core.compress(matrix, self._projection(slot), side, self._ops)
        if slot.buffer is None:
            slot.buffer = compressed
        else:
            slot.buffer.add_(compressed)

    def _flush(self, slot: _Slot) -> None:
        """``.grad <- `` the cycle's estimate (added to any gradient already there); the buffer is freed."""
        side = slot.layout.side
        if self.estimator == core.ESTIMATOR_SUBSPACE:
            projection = None
            dense = core.expand_subspace(slot.basis, slot.buffer, side, self._ops)
        else:
            projection = self._projection(slot)
            dense = core.decompress(slot.buffer, projection, side, self._ops)
        if self.communicate_compressed:  # the DDP comm hook reduces the compressed state, not .grad
            self._pending[id(slot.param)] = (slot, slot.buffer, projection)
        slot.buffer = None
        param = slot.param
        dense = dense.view(param.shape)
        if param.grad is None:
            param.grad = dense.to(param.dtype)
        else:
            param.grad.add_(dense.to(param.grad.dtype))

    def _apply(self, slot: _Slot) -> None:
        """Layer-wise update of one tensor from its complete gradient, then free the gradient.

        The tensor's norm (for the clipping share and ``last_grad_norm``) stays on the device; for
        a ``DTensor`` shard it is the whole tensor's norm, one all-reduce of a scalar."""
        param = slot.param
        grad = param.grad
        if grad is None:
            return
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        if is_dtensor(norm):
            norm = norm.full_tensor()
        self._norm_sq = norm * norm if self._norm_sq is None else self._norm_sq + norm * norm
        if self.max_grad_norm is not None:
            budget = self.max_grad_norm * math.sqrt(param.numel() / self._total_numel)
            local = grad.to_local() if is_dtensor(grad) else grad
            local.mul_((budget / (norm + 1e-6)).clamp(max=1.0).to(grad.dtype))
        step_parameter(self.optimizer, param, slot.group)
        param.grad = None

    def _queue_check_after_backward(self, slot: _Slot) -> None:
        """Check, once this backward has ended, that no tensor whose gradient closed its cycle in it
        still holds a gradient.

        Updated here, in a one-process group (on more, a local gradient is refused before its
        update): ``DistributedDataParallel`` without Flora's comm hook writes the reduced gradients
        into ``.grad`` in a callback queued during backward, for ``optimizer.step()`` to apply a
        second time. Under Flora's comm hook: a gradient DDP did not reduce (a sync micro-batch run
        under ``no_sync``) was never updated. The callback queued here queues the check behind
        every callback queued during backward (DDP's, the hook's steps), so it sees ``.grad`` after
        them.
        """
        task = torch._C._current_graph_task_id()  # this backward (one autograd graph task)
        if task != self._checked_task:
            self._checked_task = task
            self._updated_in_backward = []
            engine = torch.autograd.Variable._execution_engine
            engine.queue_callback(lambda: engine.queue_callback(self._check_after_backward))
        self._updated_in_backward.append(slot)

    def _check_after_backward(self) -> None:
        updated, self._updated_in_backward = self._updated_in_backward, []
        rewritten = [slot for slot in updated if slot.param.grad is not None]
        if not rewritten:
            return
        for slot in updated:  # optimizer.step() must not apply these gradients (again)
            slot.param.grad = None
        first = rewritten[0]
        if self.ddp_hook_state is not None:
            raise RuntimeError(
                f"layer-wise updates under DDP: parameter {first.index} (shape {tuple(first.param.shape)}), of "
                f"{len(rewritten)} tensor(s), kept a gradient that DDP never reduced in the micro-batch that closes "
                "the cycle (run under ddp_model.no_sync()): run the last micro-batch of each cycle outside no_sync. "
                "These gradients were dropped; nothing was updated with them"
            )
        self.remove()
        raise RuntimeError(
            f"layer-wise updates: parameter {first.index} (shape {tuple(first.param.shape)}), of "
            f"{len(rewritten)} tensor(s), received a gradient again after their update inside backward: their module "
            "is wrapped in DistributedDataParallel, whose reducer writes the reduced gradient into .grad when "
            "backward ends, so optimizer.step() would apply it a second time. Under DDP attach the accumulator "
            "with flora_opt.distributed.register_layerwise_allreduce(ddp_model, accumulator) before the first "
            "backward: each tensor is then updated once, from its reduced gradient, when its bucket's all-reduce "
            "completes. The gradients were cleared and the layer-wise hooks removed"
        )

    @torch.no_grad()
    def _end_micro_batch(self) -> None:
        sync = self._sync
        self._sync = None
        if not sync:
            self.micro_step += 1
            return
        # a gradient left over (no hook fired for it) is applied here only where it cannot be an
        # unreduced one: on a single process, outside DDP's hook and FSDP2
        local_step = self.layerwise and self.ddp_hook_state is None and process_count() == 1
        for slot in self._slots:
            if slot.buffer is not None:  # compressed data but no gradient in the sync micro-batch
                self._flush(slot)
            if local_step and not slot.done and slot.param.grad is not None and not is_dtensor(slot.param):
                self._apply(slot)
            slot.done = False
        if self.layerwise:
            self.last_grad_norm = None if self._norm_sq is None else self._norm_sq.sqrt()
            self._norm_sq = None
        self._pending.clear()
        self.cycle += 1
        self.micro_step = 0

    def __repr__(self) -> str:
        compressed = sum(1 for s in self._slots if s.layout.compressed)
        return (
            f"CompressedAccumulator(rank={self.rank}, estimator={self.estimator!r}, "
            f"accumulation_steps={self.accumulation_steps}, seed={self.seed}, "
            f"layerwise={self.layerwise}, max_grad_norm={self.max_grad_norm}, compressed_tensors={compressed}/"
            f"{len(self._slots)}, cycle={self.cycle}, micro_step={self.micro_step})"
        )


# ---- layer-wise updates (LOMO-style), for any per-tensor torch optimizer ----------------------


def unwrap_optimizer(optimizer):
    """The optimizer under accelerate's ``AcceleratedOptimizer`` wrapper(s), if any."""
    try:
        from accelerate.optimizer import AcceleratedOptimizer
    except ImportError:  # accelerate is optional for the plain-PyTorch API
        return optimizer
    while isinstance(optimizer, AcceleratedOptimizer):
        optimizer = optimizer.optimizer
    return optimizer


def optimizer_group_index(optimizer: torch.optim.Optimizer, param: torch.Tensor) -> int:
    """Index of the param group holding ``param``."""
    for index, group in enumerate(optimizer.param_groups):
        if any(candidate is param for candidate in group["params"]):
            return index
    raise ValueError(f"the parameter of shape {tuple(param.shape)} is not in this optimizer")


@torch.no_grad()
def step_parameter(optimizer: torch.optim.Optimizer, param: torch.Tensor, group_index: int | None = None) -> None:
    """Apply ``optimizer`` to ``param`` alone, from ``param.grad``, as ``optimizer.step()`` would.

    Uses the optimizer's ``step_param(param)`` when it has one (:class:`flora_opt.Flora`, whose
    projection seeds depend on the tensor's position). Otherwise it runs ``optimizer.step()`` with
    the optimizer temporarily restricted to ``param``'s group holding only ``param``; per-tensor
    state (``optimizer.state[param]``) and the group's options (lr from a scheduler, ...) are used
    as in a full step.
    """
    step_param = getattr(optimizer, "step_param", None)
    if callable(step_param):
        step_param(param)
        return
    if group_index is None:
        group_index = optimizer_group_index(optimizer, param)
    groups = optimizer.param_groups
    group = groups[group_index]
    params = group["params"]
    try:
        group["params"] = [param]
        optimizer.param_groups = [group]
        optimizer.step()
    finally:
        group["params"] = params
        optimizer.param_groups = groups


def enable_layerwise_updates(
    optimizer: torch.optim.Optimizer,
    *,
    accumulation_steps: int = 1,
    accumulation_rank: int | None = None,
    seed: int = 0,
    max_grad_norm: float | None = None,
    accumulation_estimator: str = core.ESTIMATOR_SUBSPACE,
):
    """Update every parameter of ``optimizer`` inside backward, as soon as its gradient is complete.

    Returns the :class:`CompressedAccumulator` that holds the hooks (call
    its ``remove()`` to turn layer-wise updates off). With ``accumulation_steps > 1`` run each
    micro-batch's backward through ``accumulator.backward(loss)`` so the update fires on the last
    micro-batch of each cycle only; ``accumulation_rank`` compresses the accumulation
    (docs/algorithm.md section 12). With ``accumulation_steps=1`` a bare ``loss.backward()`` works.

    Across processes: under FSDP2 (``fully_shard``) nothing else is needed, each shard is
    updated after its reduce-scatter; under ``DistributedDataParallel`` call
    ``flora_opt.distributed.register_layerwise_allreduce(ddp_model, accumulator)`` before the
    first backward (see :class:`CompressedAccumulator`'s ``layerwise``).

    Args:
      optimizer: a per-tensor torch optimizer (see the module docstring).
      accumulation_steps (int, default 1): micro-batches per optimizer step.
      accumulation_rank (int or None, default None): rank of compressed accumulation.
      seed (int, default 0): seed of the accumulation projections.
      accumulation_estimator (str, default ``"subspace"``): see :class:`CompressedAccumulator`.
      max_grad_norm (float or None, default None): clip each tensor ``i`` to norm
        ``max_grad_norm * sqrt(numel_i / numel_total)`` before its update, which bounds the
        global norm of the applied gradient by ``max_grad_norm`` (the exact global norm is not
        known until backward ends). ``accumulator.last_grad_norm`` is the pre-clip global norm.

    Example:
      >>> import torch
      >>> from flora_opt import enable_layerwise_updates
      >>> model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
      >>> optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
      >>> accumulator = enable_layerwise_updates(optimizer)
      >>> model(torch.randn(16, 64)).pow(2).mean().backward()  # parameters updated here
      >>> all(p.grad is None for p in model.parameters())
      True
      >>> optimizer.step()  # nothing left to update; still safe to call
    """
    return CompressedAccumulator(
        optimizer,
        accumulation_rank,
        accumulation_steps=accumulation_steps,
        seed=seed,
        layerwise=True,
        max_grad_norm=max_grad_norm,
        estimator=accumulation_estimator,
    )
