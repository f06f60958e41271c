r"""The grouped, sync-free Flora step for PyTorch (the default path of :meth:`flora_opt.Flora.step`).

Tensors of one param group with the same layout (shape, compressed side, rank, factoring),
parameter dtype, device and quantization form a *bucket* and are stepped together, on stacks
``(T, m, n)`` (or ``(T, N)`` for vectors): the same math as :func:`flora_opt.core.flora_update`
(docs/algorithm.md section 8), with

.. math::
   U = G / \sqrt{\hat V}, \quad
   D = \begin{cases} U & \text{no momentum} \\ M_t = \beta_1 M_{t-1} + (1-\beta_1) U & \text{full} \\
   (1-\beta_1) U + \beta_1 s\, P^\top M_{t-1},\ s = \|M_{t-1}\|_F / \|P^\top M_{t-1}\|_F & \text{compressed}
   \end{cases} \\
   D \leftarrow D / \max(1, \mathrm{RMS}(D)/d), \quad W \leftarrow W - \eta_t \lambda W - \eta_t D

per tensor, where

* the projections of a bucket are generated in one call from the vectors of seeds and
  projection indices (:func:`flora_opt.projection.gaussian_projections`), and compression,
  decompression and the momentum transfer are batched matrix products (``bmm``);
* the step number ``t``, the projection index ``k`` and the count of skipped steps live in a
  small ``int64`` tensor per parameter on its device (:attr:`Engine.counters`), so ``beta2_t``,
  ``rho_t``, the resample test ``(t - 1) mod kappa = 0`` and ``k`` are computed on the device:
  ``step()`` reads nothing back to the host (no ``.item()``/``bool()``) after the first step;
* a non-finite ``RMS(D)`` (section 9) is decided per tensor on the device: the tensor's update
  and weight decay are masked to zero and its state keeps its old values (``torch.where``);
* the host integers of the checkpoint format (``state["step"]``, ``state["projection"]``,
  ``state["skipped_steps"]``) are advanced optimistically (as if no step were skipped) and made
  exact by :meth:`Engine.synchronize` (one device-to-host copy), which also raises the
  non-finite warning. :meth:`flora_opt.Flora.state_dict`, :meth:`~flora_opt.Flora.load_state_dict`,
  :meth:`~flora_opt.Flora.step_param` and :meth:`~flora_opt.Flora.synchronize` call it. Without
  skipped steps the host integers are always exact.

Precision: float32, as the per-tensor path; results equal :func:`flora_opt.core.flora_update`
up to float32 rounding (batched reductions and matrix products sum in another order): the
projections are bit-identical, parameters and states agree to about ``1e-6`` relative.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import fields
from typing import Any

import torch

from . import core
from . import quantization as q
from .core import EXP_AVG, EXP_AVG_SQ, EXP_AVG_SQ_COL, EXP_AVG_SQ_ROW, FloraHyperParams, TensorLayout
from .ops import get_ops
from .projection import STREAM_MOMENTUM, gaussian_projections, projection_key

# Columns of a parameter's counter tensor.
STEP, PROJ, PENDING, SEED = 0, 1, 2, 3
_SIGNED = {EXP_AVG: True, EXP_AVG_SQ: False}
CODES_SUFFIX = "_codes"
ABSMAX_SUFFIX = "_absmax"
PROJECTION = "projection"


def _u32_signed(value: int) -> int:
    value &= 0xFFFFFFFF
    return value - (1 << 32) if value >= (1 << 31) else value


def _stack_view(tensors: list[torch.Tensor], shape) -> torch.Tensor | None:
    """``torch.stack(tensors).view(shape)`` as a view, without a copy, when the tensors already
    are the consecutive rows of one contiguous stack (what the previous step left in the state)
    or a single contiguous tensor; ``None`` otherwise."""
    if len(tensors) == 1 and tensors[0].is_contiguous():
        return tensors[0].view(shape)
    if torch.compiler.is_compiling():  # views' bases are not traced; the compiler removes the copy
        return None
    base = tensors[0]._base
    if base is not None and base.is_contiguous() and base.numel() == math.prod(shape):
        size = tensors[0].numel()
        start = base.storage_offset()
        if all(
            t._base is base and t.is_contiguous() and t.storage_offset() == start + i * size
            for i, t in enumerate(tensors)
        ):
            return base.view(shape)
    return None


def _stacked(tensors: list[torch.Tensor], shape) -> torch.Tensor:
    """``torch.stack(tensors).view(shape)``, without a copy where :func:`_stack_view` finds one."""
    view = _stack_view(tensors, shape)
    return torch.stack(tensors).view(shape) if view is None else view


# The fields of the record (flora_opt.hyperparams.FloraHyperParams) whose math step_bucket
# implements. Flora.step sends a group whose record sets any other field away from its default to
# the per-tensor path (core.flora_update): an option added to the record and the core is right at
# once in every path, and takes the grouped path once step_bucket implements it and names it here.
IMPLEMENTED = frozenset(
    {
        "lr",
        "rank",
        "kappa",
        "eps1",
        "eps2",
        "clip_threshold",
        "decay_rate",
        "beta1",
        "weight_decay",
        "weight_decay_mask",
        "scale_parameter",
        "relative_step",
        "warmup_init",
        "factorize_second_moment",
        "min_dim_size_to_factor",
        "max_aspect_ratio",
        "seed",
        "quantization",
        "foreach",
        "projection_dtype",
    }
)


def implements(hp: FloraHyperParams) -> bool:
    """Whether :meth:`Engine.step_bucket` implements every option of ``hp`` that is not at its default."""
    return all(getattr(hp, f.name) == f.default for f in fields(hp) if f.name not in IMPLEMENTED)


# On the CPU, read the device step counters (host memory) to decide resamples exactly; False
# uses the conservative host-side window of other devices (tests exercise it on the CPU).
READ_CPU_COUNTERS = True

# Stacks of large tensors are split (see chunks()): a tensor of at least LARGE_TENSOR elements is
# stepped in stacks of at most STACK_ELEMENTS elements (one tensor per stack when it is larger).
LARGE_TENSOR = 1 << 18
STACK_ELEMENTS = 1 << 22


def chunks(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The stacks in which the grouped step takes a bucket (tensors of one layout).

    Small tensors are stacked all together: the number of dispatched ops per step then does not
    depend on how many tensors share a layout (depth). Large ones (``LARGE_TENSOR`` elements or
    more, where an op's work dwarfs its dispatch cost) go in stacks of at most ``STACK_ELEMENTS``
    elements (16 MiB in float32): a step's full-size temporaries then stay small enough to be
    reused from the allocator's heap and to sit in the cache between passes, where a stack of a
    whole bucket (113 MiB for GPT-2-small's twelve 768 x 3072 matrices) is a fresh mapping every
    step whose page faults cost more than the arithmetic, and whose passes stream from main
    memory. The partition depends on shapes only, so it is the same at every step.
    """
    numel = params[0].numel()
    if numel < LARGE_TENSOR or len(params) * numel <= STACK_ELEMENTS:
        return [params]
    per = max(1, STACK_ELEMENTS // numel)
    return [params[i : i + per] for i in range(0, len(params), per)]


# A stack of small tensors with compressed momentum larger than PART_ELEMENTS keeps its full-size
# values (G, U, D) in parts of about that size (24 MiB), each its own allocation: glibc maps an
# allocation above 32 MiB afresh at every step (page faults cost several times the arithmetic
# here) and serves smaller ones from its heap. Only the full-size ops run per part.
PART_ELEMENTS = 3 << 21


def _parts(count: int, numel: int) -> list[tuple[int, int]]:
    """Index ranges ``[start, stop)`` of the stack's parts: ``ceil(count numel / PART_ELEMENTS)``
    parts of equal size (the last one shorter)."""
    number = max(1, -(-count * numel // PART_ELEMENTS))
    per = -(-count // number)
    return [(start, min(start + per, count)) for start in range(0, count, per)]


def _joined(pieces: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(pieces)`` (the pieces of a stack's parts), without an op for one piece."""
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces)


def _part(stack: torch.Tensor, start: int, stop: int, count: int) -> torch.Tensor:
    """Rows ``start:stop`` of a stack of ``count``, without an op for the whole stack."""
    return stack if (start, stop) == (0, count) else stack[start:stop]


# The largest scratch buffer kept between steps on a CPU device (Engine.scratch): 2^25 elements
# (128 MiB in float32).
SCRATCH_ELEMENTS = 1 << 25

# Elements per block of the second-moment statistics: the squares of a block of rows of the whole
# stack are a temporary of about this many elements; a stack of small tensors (one per bucket,
# whatever the depth) larger than PART_ELEMENTS takes SMALL_STACK_BLOCKS blocks.
SQUARE_BLOCK = 1 << 20
SMALL_STACK_BLOCKS = 8


def _square_rows(count: int, m: int, n: int) -> int:
    """Rows per block of :func:`_sums_of_squares` for a stack ``(count, m, n)`` (``m``: whole)."""
    if m * n < LARGE_TENSOR:
        if count * m * n <= PART_ELEMENTS:
            return m
        return max(1, -(-m // SMALL_STACK_BLOCKS))  # a fixed number of blocks, whatever the count
    return max(1, SQUARE_BLOCK // max(count * n, 1))


def _squares(block: torch.Tensor, scratch: torch.Tensor | None) -> torch.Tensor:
    """``block ** 2``, written into the front of ``scratch`` when one is given."""
    if scratch is None:
        return block.square()
    return torch.square(block, out=scratch[: block.numel()].view(block.shape))


def _sums_of_squares(G: torch.Tensor, scratch: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sum_j G_ij^2, sum_i G_ij^2)`` of a stack ``(T, m, n)``, as ``(T, m)`` and ``(T, n)``.

    One read of ``G``: the squares of a block of rows of every matrix of the stack (a temporary
    of about ``SQUARE_BLOCK`` elements, 1 MiB, which stays in the cache and comes from the heap)
    are summed along both axes. ``vector_norm(G, dim=1)`` reduces across rows with a stride of
    ``n`` and runs 10-40x slower than a contiguous pass on this CPU (200 ms for GPT-2's
    50257 x 768 embedding); a ``G.square()`` of more than 32 MiB is a fresh mapping at every step
    whose page faults cost several times the arithmetic. A stack of large tensors
    (``engine.chunks``: at most ``STACK_ELEMENTS``) takes blocks of about ``SQUARE_BLOCK``
    elements; a stack (or part, see ``PART_ELEMENTS``) of small ones of at most ``PART_ELEMENTS``
    elements is squared whole, a larger one in ``SMALL_STACK_BLOCKS`` blocks of rows, so that the
    number of dispatched ops does not depend on the number of tensors. The squares go into
    ``scratch`` (flat float32, at least ``G.numel()`` elements; :meth:`Engine.scratch`) if given.
    """
    count, m, n = G.shape
    rows = _square_rows(count, m, n)
    if torch.compiler.is_compiling() or rows >= m:
        square = _squares(G, scratch)  # compiled: one fused kernel; else at most 24 MiB
        return square.sum(dim=2), square.sum(dim=1)
    row_sums, col_sums = [], None
    for start in range(0, m, rows):
        square = _squares(G[:, start : start + rows], scratch)
        row_sums.append(square.sum(dim=2))
        part = square.sum(dim=1)
        col_sums = part if col_sums is None else col_sums.add_(part)
    if col_sums is None:  # no rows
        return G.new_zeros((count, m)), G.new_zeros((count, n))
    return (row_sums[0] if len(row_sums) == 1 else torch.cat(row_sums, dim=1)), col_sums


def _row_blocks(m: int, n: int) -> list[tuple[int, int]]:
    """Blocks of rows of one ``(m, n)`` matrix of about ``SQUARE_BLOCK`` elements (streamed step)."""
    rows = max(1, SQUARE_BLOCK // max(n, 1))
    return [(start, min(start + rows, m)) for start in range(0, m, rows)]


def _gram_ratio(P: torch.Tensor, momentum: torch.Tensor, rows: bool) -> torch.Tensor:
    """``s = ||M|| / ||decompress(M)||`` per tensor through ``r x r`` Gram products
    (:func:`flora_opt.core.history_scale`): ``||P^T M||^2 = <P P^T, M M^T>`` (rows)."""
    gram_p = torch.bmm(P, P.mT)
    gram_m = torch.bmm(momentum, momentum.mT) if rows else torch.bmm(momentum.mT, momentum)
    decompressed_sq = (gram_p * gram_m).sum(dim=(1, 2))
    momentum_sq = gram_m.diagonal(dim1=1, dim2=2).sum(dim=1)  # ||M||_F^2 = tr(M M^T): no M*M temporary
    return core.ratio_of_norms(momentum_sq, decompressed_sq, get_ops("torch"))


def _block_direction(
    G, row_scale, col_scale, momentum, beta1: float, start: int, stop: int, scratch: torch.Tensor | None
) -> torch.Tensor:
    """Rows ``start:stop`` of ``D`` of one matrix in the streamed step: ``U = G r c^T`` (section 6,
    the same elementwise ops as the stacked step, so the same values), and with full momentum
    ``M_t = M + (1 - beta1) (U - M)`` (``lerp``) written over it; one block, in ``scratch`` if given."""
    rows = G[start:stop]
    out = None if scratch is None else scratch[: rows.numel()].view(rows.shape)
    block = torch.mul(rows, row_scale[start:stop, None], out=out).mul_(col_scale)
    if momentum is not None:
        torch.lerp(momentum[start:stop], block, 1.0 - beta1, out=block)
    return block


def _host_integers(state: dict[str, Any]) -> tuple:
    """The integers of a tensor's host state that its device counter mirrors."""
    return state.get("step"), state.get(PROJECTION), state.get("skipped_steps"), state.get("seed")


@torch.compiler.disable
def _advance_host_integers(params, states, kappa: int, written: dict[torch.Tensor, tuple]) -> None:
    """The checkpoint's integers, advanced as if no step were skipped (exact unless one was; see
    :meth:`Engine.synchronize`), and recorded in ``written`` (:attr:`Engine.host_integers`). Kept
    out of ``torch.compile`` graphs: Python integers that change at every step would make each
    step a new graph."""
    for param, state in zip(params, states, strict=True):
        step = state["step"] + 1
        if PROJECTION in state and step > 1 and (step - 1) % kappa == 0:
            state[PROJECTION] += 1
        state["step"] = step
        written[param] = _host_integers(state)


class Engine:
    """Device counters and the bucketed step of one :class:`flora_opt.Flora` optimizer."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        # parameter -> int64 tensor (4,) on its device: step, projection index, pending skips,
        # seed (its uint32 bit pattern as a signed 32-bit value)
        self.counters: dict[torch.Tensor, torch.Tensor] = {}
        # parameter -> the device step counter's value at the last point where the host knew it
        # exactly (counter built from the host state, or synchronize()): the device step lies
        # between it and the optimistic host ``state["step"]`` (steps skipped since lower it)
        self.known_steps: dict[torch.Tensor, int] = {}
        # parameter -> its host integers (``_host_integers``) as the engine last built the counter
        # from them, advanced them or synchronized them. Host integers that differ were written by
        # someone else since (``torch.distributed.checkpoint`` loading into the live state, a hand
        # edit): they win, and :meth:`synchronize` drops the counter instead of overwriting them.
        self.host_integers: dict[torch.Tensor, tuple] = {}
        # (CPU device, dtype, slot) -> a buffer kept between steps for the step's full-size temporaries
        self._scratch: dict[tuple[torch.device, torch.dtype, str], torch.Tensor] = {}

    def scratch_bytes(self) -> int:
        """Bytes of the scratch buffers kept between steps (:meth:`scratch`; not state)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._scratch.values())

    def scratch(
        self, device: torch.device, numel: int, dtype: torch.dtype = torch.float32, slot: str = "main"
    ) -> torch.Tensor | None:
        """A flat buffer (float32, or the bfloat16 operands of ``projection_dtype="bfloat16"``; one
        per ``slot``) of ``numel`` elements kept from step to step on a CPU device, for
        temporaries that no state keeps (squares, ``U``/``D`` of a stack without full momentum,
        blocks of a streamed matrix); ``None`` on other devices and under ``torch.compile``.

        A temporary of a few MiB freshly allocated at every step is a page-faulting mapping on
        the CPU: glibc gives the top of its heap back to the system once more than twice the
        last large block is free, so every step touches new pages (docs/benchmarks.md). Reused,
        its pages stay resident. It grows to the largest stack (at most ``STACK_ELEMENTS``
        elements of large tensors, or a bucket of small ones), at most ``SCRATCH_ELEMENTS``
        (128 MiB in float32; a larger temporary is allocated as before), and is not part of the state.
        CUDA's caching allocator already reuses blocks.
        """
        if device.type != "cpu" or torch.compiler.is_compiling() or numel > SCRATCH_ELEMENTS:
            return None
        key = (device, dtype, slot)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._scratch[key] = buffer
        return buffer[:numel]

    # ---- counters ---------------------------------------------------------------------------
    def _counter(self, param: torch.Tensor, state: dict[str, Any]) -> torch.Tensor:
        counter = self.counters.get(param)
        if counter is None:
            values = [state["step"], state.get(PROJECTION, 0), 0, _u32_signed(state["seed"])]
            counter = torch.tensor(values, dtype=torch.int64, device=param.device)
            self.counters[param] = counter
            self.known_steps[param] = state["step"]
            self.host_integers[param] = _host_integers(state)
        return counter

    def synchronize(self, params=None, drop: bool = False) -> int:
        """Make the host integers of the state exact (``step``, ``projection``,
        ``skipped_steps``) from the device counters, and warn if steps were skipped.

        One device-to-host copy for all the parameters (or only ``params``). The counters' pending
        skips are then zeroed on the device (no host-to-device copy at the next step), or, with
        ``drop`` (the host state is about to be replaced or stepped by the per-tensor path), the
        counters are dropped and rebuilt from the host integers at the next grouped step.

        A tensor whose host integers were written by someone else since the engine last wrote
        them (:attr:`host_integers`: ``torch.distributed.checkpoint``'s ``dcp.load`` writes a
        checkpoint into the live state, which ``set_state_dict`` then hands to
        :meth:`~flora_opt.Flora.load_state_dict`) keeps them: its counter is stale, and is dropped.
        Returns the number of skipped tensor steps found.
        """
        chosen = list(self.counters) if params is None else [p for p in params if p in self.counters]
        if not chosen:
            return 0
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for param in chosen:
            by_device.setdefault(self.counters[param].device, []).append(param)
        skipped, stale = [], set()
        for device_params in by_device.values():
            values = torch.stack([self.counters[p] for p in device_params]).tolist()
            for param, (step, proj, pending, _) in zip(device_params, values, strict=True):
                state = self.optimizer.state[param]
                if _host_integers(state) != self.host_integers.get(param):
                    stale.add(param)
                    continue
                state["step"] = int(step)
                self.known_steps[param] = int(step)
                if PROJECTION in state:
                    state[PROJECTION] = int(proj)
                if pending:
                    state["skipped_steps"] += int(pending)
                    skipped.append((tuple(param.shape), int(pending)))
                self.host_integers[param] = _host_integers(state)
        for param in chosen:
            if drop or param in stale:
                del self.counters[param]
                self.known_steps.pop(param, None)
                self.host_integers.pop(param, None)
            else:
                self.counters[param][PENDING] = 0
        if skipped:
            shapes = ", ".join(f"{shape} x{count}" for shape, count in skipped[:8])
            more = "" if len(skipped) <= 8 else f" and {len(skipped) - 8} more"
            warnings.warn(
                f"Flora: non-finite gradient for {len(skipped)} parameter(s) (shape x skipped steps: {shapes}{more}); "
                "those updates were skipped (parameter and state unchanged)",
                RuntimeWarning,
                stacklevel=3,
            )
        return sum(count for _, count in skipped)

    # ---- one bucket -------------------------------------------------------------------------
    @torch.no_grad()
    def step_bucket(
        self, params: list[torch.Tensor], group: dict[str, Any], hp: FloraHyperParams, layout: TensorLayout
    ) -> None:
        """One step of every tensor in ``params`` (same layout, dtype, device and options)."""
        optimizer = self.optimizer
        quantization = group["quantization"]
        states = [optimizer.state[p] for p in params]
        count = len(params)
        work = tuple(layout.work_shape) if layout.matrix is not None else (max(math.prod(layout.shape), 1),)
        shape = (count, *work)
        dims = tuple(range(1, len(shape)))
        numel = math.prod(work)
        device = params[0].device

        # The float32 gradients as a stack (in parts of at most PART_ELEMENTS for a large stack of
        # small tensors with compressed momentum, see _parts): a view of the gradient itself where
        # it already is one (one contiguous tensor, or consecutive rows of one buffer), else our
        # own copy, which U below overwrites. A borrowed gradient is only read: U is then written
        # to a new buffer (one full-size pass fewer than copying first and scaling in place).
        grads = [p.grad for p in params]
        partitioned = (
            layout.factored
            and layout.momentum == core.MOMENTUM_COMPRESSED
            and params[0].dtype == torch.float32
            and not torch.compiler.is_compiling()
        )
        parts = _parts(count, numel) if partitioned else [(0, count)]
        # On the CPU the stack of float32 gradients goes into the scratch buffer unless D is kept
        # (full momentum writes M_t over U, as state); see Engine.scratch.
        stack_scratch = None
        if (
            layout.factored
            and layout.momentum != core.MOMENTUM_FULL
            and len(layout.shape) == 2
            and all(g.dtype == torch.float32 for g in grads)
        ):
            stack_scratch = self.scratch(device, count * numel)
        Gs, borrowed = [], []
        for start, stop in parts:
            part_shape = (stop - start, *work)
            G = _stack_view(grads[start:stop], part_shape)
            borrowed.append(G is not None and G.dtype == torch.float32)
            if G is None and stack_scratch is not None:  # one as_strided op: the op count stays flat
                m, n = work
                out = stack_scratch.as_strided(
                    part_shape, (numel, n, 1), stack_scratch.storage_offset() + start * numel
                )
                G = torch.stack(grads[start:stop], out=out)
            elif G is None:
                G = torch.stack(grads[start:stop]).view(part_shape)
            Gs.append(G.to(torch.float32))
        counters = torch.stack([self._counter(p, s) for p, s in zip(params, states, strict=True)])
        t = counters[:, STEP] + 1
        t_float = t.to(torch.float64)
        lr = group["lr"]

        # eta_t (section 5), per tensor: (T,) float32
        if hp.relative_step:
            floor = 1e-6 * t_float if hp.warmup_init else torch.full_like(t_float, 1e-2)
            rho = torch.minimum(floor, t_float.pow(-0.5)).to(torch.float32)
        else:
            rho = float(lr)
        in_place = params[0].dtype == torch.float32
        # One large matrix without compressed momentum is streamed: D is never formed whole (see
        # _block_direction and the apply below), so the step allocates no full-size buffer, whose
        # page faults would cost more than the passes (docs/benchmarks.md); the momentum is
        # updated in place.
        streamed = (
            count == 1
            and borrowed[0]
            and in_place
            and layout.factored
            and numel > STACK_ELEMENTS
            and layout.momentum != core.MOMENTUM_COMPRESSED
            and params[0].is_contiguous()
            and not torch.compiler.is_compiling()
            and (
                layout.momentum == core.MOMENTUM_NONE
                or (not self.optimizer._quantized(layout, EXP_AVG, quantization) and states[0][EXP_AVG].is_contiguous())
            )
        )
        if in_place:
            W = None
        else:  # bf16/fp16 applied in float32 and rounded once; float64 applied in float64
            W = torch.stack(params).view(shape)
            W = W.to(torch.float64 if W.dtype == torch.float64 else torch.float32)
        if hp.scale_parameter:
            if W is None:
                norms = torch.stack(torch._foreach_norm(params))
            else:
                norms = torch.linalg.vector_norm(W.to(torch.float32), dim=dims)
            eta = (norms / math.sqrt(numel)).clamp(min=hp.eps2) * rho
        else:
            # a fill on the device (torch.as_tensor of a float would be a host-to-device copy)
            eta = (
                rho if isinstance(rho, torch.Tensor) else torch.full((count,), rho, dtype=torch.float32, device=device)
            )
        weight = t_float.pow(hp.decay_rate).to(torch.float32)  # 1 - beta2_t

        state_shapes = layout.state_shapes()
        old = {
            key: self._read(states, key, self._stack_shape(count, s, layout, work), quantization, layout)
            for key, s in state_shapes.items()
        }
        new: dict[str, torch.Tensor] = {}

        # Second moment and U = G / sqrt(V_hat) (section 6), U written over the copy G.
        spare = None  # a free full-size buffer, if any, for Delta
        if layout.factored:
            m, n = work
            # Scratch: U of a borrowed gradient, one region per part (the squares of each part go
            # first into its region), unless D is kept (full momentum writes M_t over U); else the
            # squares alone, or the blocks of a streamed matrix.
            in_scratch = not streamed and any(borrowed) and layout.momentum != core.MOMENTUM_FULL
            stacked = stack_scratch is not None and not all(borrowed)  # a G in the scratch buffer
            if in_scratch and not stacked:
                scratch = self.scratch(device, count * numel)
                regions = [None if scratch is None else scratch[start * numel : stop * numel] for start, stop in parts]
            else:
                need = max((stop - start) * min(_square_rows(stop - start, m, n), m) * n for start, stop in parts)
                scratch = self.scratch(device, need, slot="squares" if stacked else "main")
                regions = [scratch] * len(parts)
            sums = [_sums_of_squares(G, region) for G, region in zip(Gs, regions, strict=True)]
            row_sums, col_sums = _joined([s[0] for s in sums]), _joined([s[1] for s in sums])
            row_mean = row_sums.div_(n).add_(hp.eps1)
            col_mean = col_sums.div_(m).add_(hp.eps1)
            row = torch.lerp(old[EXP_AVG_SQ_ROW], row_mean, weight[:, None])
            col = torch.lerp(old[EXP_AVG_SQ_COL], col_mean, weight[:, None])
            new[EXP_AVG_SQ_ROW], new[EXP_AVG_SQ_COL] = row, col
            row_scale = torch.rsqrt(row / row.mean(dim=1, keepdim=True))
            col_scale = torch.rsqrt(col)
            Us = []
            for (start, stop), G, own, region in zip(parts, Gs, borrowed, regions, strict=True):
                if streamed:
                    break
                rows, cols = _part(row_scale, start, stop, count), _part(col_scale, start, stop, count)
                if not own:
                    U = G.mul_(rows[:, :, None])
                else:
                    into = region is not None and in_scratch and not stacked
                    U = torch.mul(G, rows[:, :, None], out=region.view(G.shape) if into else None)
                Us.append(U.mul_(cols[:, None, :]))
        else:
            G = Gs[0]
            view_weight = weight.view((count,) + (1,) * len(work))
            grad_sq = torch.mul(G, G).add_(hp.eps1)
            second = torch.lerp(old[EXP_AVG_SQ], grad_sq, view_weight)
            new[EXP_AVG_SQ] = second
            if borrowed[0]:  # U written over grad_sq: no spare buffer
                U = torch.rsqrt(second, out=grad_sq).mul_(G)
            else:
                U = G.mul_(torch.rsqrt(second, out=grad_sq))
                spare = grad_sq
            Us = [U]

        # First moment and the direction D (sections 3-4, 8); the stored Ds are D / factor (see
        # _compressed), their RMS and step size take the factor.
        factor = 1.0
        if streamed:  # only RMS(D), block by block; D is formed again block by block to apply it
            m, n = work
            momentum = states[0][EXP_AVG].view(m, n) if layout.momentum == core.MOMENTUM_FULL else None
            blocks = _row_blocks(m, n)

            def direction(start, stop):
                return _block_direction(G[0], row_scale[0], col_scale[0], momentum, hp.beta1, start, stop, scratch)

            sum_sq = torch.zeros(1, dtype=torch.float32, device=device)
            for start, stop in blocks:
                sum_sq.add_(torch.linalg.vector_norm(direction(start, stop)).square_())
            Ds = []
        elif layout.momentum == core.MOMENTUM_NONE:
            Ds = Us
        elif layout.momentum == core.MOMENTUM_FULL:
            Ds = [torch.lerp(old[EXP_AVG], Us[0], 1.0 - hp.beta1, out=Us[0])]  # M_t, written over U
            new[EXP_AVG] = Ds[0]
        else:
            may_resample = self._may_resample(params, states, counters, hp.kappa)
            Ds, new[EXP_AVG], resample, factor = self._compressed(
                Us, parts, old[EXP_AVG], counters, t, hp, layout, device, may_resample
            )
        D = Ds[0] if len(Ds) == 1 else None  # the one full-size D of an unpartitioned stack

        # Clipping of D (section 7), the skip rule (section 9), the step size.
        if streamed:
            rms = sum_sq.sqrt() / math.sqrt(numel)
        else:
            rms = _joined([torch.linalg.vector_norm(D, dim=dims) for D in Ds]) * (factor / math.sqrt(numel))
        finite = torch.isfinite(rms)
        scale = eta / (rms / hp.clip_threshold).clamp(min=1.0)
        if factor != 1.0:
            scale = scale * factor
        expand = (count,) + (1,) * len(work)
        # Full momentum with float32 parameters: Delta = eta D is never formed; the parameters
        # take p - scale * M_t in one in-place pass after the state is written (a skipped tensor's
        # rows of M_t are then its old, finite momentum and its scale is 0). A fresh full-size
        # Delta costs more in page faults than the pass itself (docs/benchmarks.md).
        # Other float32 cases: D (a temporary) has its non-finite entries zeroed (one pass,
        # 3x faster than a masked fill here) and the parameters take p - scale * D in place with
        # scale 0 for a skipped tensor: no separate scaling pass.
        fused = in_place
        if fused:
            delta = None
            scale = torch.where(finite, scale, 0.0)
            if layout.momentum != core.MOMENTUM_FULL:
                for D in Ds:
                    D.nan_to_num_(0.0, 0.0, 0.0)
        elif layout.momentum == core.MOMENTUM_FULL:  # D is the new momentum: Delta needs a buffer
            delta = torch.mul(D, scale.view(expand)) if spare is None else torch.mul(D, scale.view(expand), out=spare)
        else:  # D is U or a temporary: scaled in place
            delta = D.mul_(scale.view(expand))
        if delta is not None:
            delta.masked_fill_(~finite.view(expand), 0.0)

        # Write the state (a skipped tensor keeps its old values) and the counters.
        for key, value in new.items():
            mask = finite.view((count,) + (1,) * (value.dim() - 1))
            value = torch.where(mask, value, old[key], out=value)
            self._write(states, key, value, state_shapes[key], quantization, layout)
        skipped = (~finite).to(torch.int64)
        increments = torch.stack([1 - skipped, torch.zeros_like(skipped), skipped, torch.zeros_like(skipped)], dim=1)
        if layout.momentum == core.MOMENTUM_COMPRESSED:
            increments[:, PROJ] = resample.to(torch.int64) * (1 - skipped)
        torch._foreach_add_([self.counters[p] for p in params], list(increments.unbind(0)))

        _advance_host_integers(params, states, hp.kappa, self.host_integers)

        # Apply: p <- p - decay * p - Delta (core.apply_direction, in place), masked decay.
        keep = 1.0 - torch.where(finite, eta * hp.weight_decay, 0.0) if hp.weight_decay != 0 else None
        if streamed:  # per block: D again (same values), M_t kept or not, p <- keep p - scale D
            target = params[0].view(m, n)
            for start, stop in blocks:
                block = direction(start, stop)
                if momentum is None:
                    block.nan_to_num_(0.0, 0.0, 0.0)
                else:  # the momentum in place; a skipped step keeps the old, finite rows
                    block = torch.where(finite, block, momentum[start:stop], out=momentum[start:stop])
                rows = target[start:stop]
                if keep is not None:
                    rows.mul_(keep)
                rows.addcmul_(block, scale, value=-1.0)
            return
        if in_place:
            if keep is not None:
                torch._foreach_mul_(params, list(keep.unbind(0)))
            if fused:  # D is M_t as written to the state above, or the zeroed temporary
                rows = [
                    row
                    for (start, stop), D in zip(parts, Ds, strict=True)
                    for row in D.view((stop - start, *tuple(layout.shape))).unbind(0)
                ]
                torch._foreach_addcmul_(params, rows, list(scale.unbind(0)), value=-1.0)
            else:
                torch._foreach_sub_(params, list(delta.view((count, *tuple(layout.shape))).unbind(0)))
            return
        if keep is not None:
            W.mul_(keep.view(expand))
        W.sub_(delta.to(W.dtype))
        torch._foreach_copy_(params, list(W.view((count, *tuple(layout.shape))).unbind(0)))

    def _may_resample(self, params, states, counters: torch.Tensor, kappa: int) -> bool:
        """Whether a tensor of the bucket can resample at this step, decided on the host without
        a device sync, so that the previous projection and the transfer are only computed then.

        Tensor ``i`` resamples when its device step ``s`` (before this step) has ``s >= 1`` and
        ``s mod kappa = 0``. On the CPU the counters are host memory: their values are read
        directly (a load, no dispatched op, nothing to wait for), so the answer is exact. On other
        devices ``s`` is only known to lie in ``[known_steps[p], state["step"]]`` (the host
        integers are advanced as if no step were skipped; :meth:`synchronize` makes them exact):
        the answer is true if any step of that range resamples, so a skipped step can only make
        the engine compute a transfer that the device mask then discards, never miss one. Inside
        ``torch.compile`` it is always true (one graph for every step).
        """
        if torch.compiler.is_compiling():
            return True
        if counters.device.type == "cpu" and READ_CPU_COUNTERS:
            steps = counters[:, STEP].numpy().tolist()
            return any(s >= 1 and s % kappa == 0 for s in steps)
        for param, state in zip(params, states, strict=True):
            high = state["step"]
            low = self.known_steps.get(param, high)
            if high - low + 1 >= kappa or any(s >= 1 and s % kappa == 0 for s in range(low, high + 1)):
                return True
        return False

    def _compressed(
        self,
        Us,
        parts,
        momentum,
        counters,
        t,
        hp: FloraHyperParams,
        layout: TensorLayout,
        device,
        may_resample: bool = True,
    ):
        """Compressed momentum of a bucket whose ``U`` is kept in ``parts`` (``Us``): returns
        ``(Ds, M_t, resample, factor)``, ``D / factor`` in the same parts, each written over its
        ``U``. Without ``may_resample`` (no tensor of the bucket resamples at this step) the
        previous projection and the transfer are skipped: ``resample`` is then false for every
        tensor.

        ``s`` from the ``r x r`` Gram products, or from the formed history at a large rank
        (:func:`flora_opt.core.history_norm_from_history`). Float32 products at a small rank:
        ``D = (1 - beta1) U + P^T (beta1 s M)`` in one ``baddbmm`` over ``U`` (``compress(U)``
        is taken first), ``factor = 1``. Otherwise :meth:`_formed_history`,
        ``factor = 1 - beta1``.
        """
        beta1, rank, side = hp.beta1, layout.rank, layout.side
        dim = layout.compressed_dim
        ops = get_ops("torch")
        resample = (t > 1) & ((t - 1) % hp.kappa == 0)
        index = counters[:, PROJ] + resample.to(torch.int64)
        seeds = counters[:, SEED].to(torch.int32)
        keys = projection_key(seeds, STREAM_MOMENTUM, index.to(torch.int32), ops)
        if may_resample:
            old_keys = projection_key(seeds, STREAM_MOMENTUM, (index - 1).to(torch.int32), ops)
            both = gaussian_projections(torch.cat([keys, old_keys]), rank, dim, ops, device)
            P, P_old = both[: len(keys)], both[len(keys) :]
        else:
            P, P_old = gaussian_projections(keys, rank, dim, ops, device), None
        mask = resample.view(-1, 1, 1)
        rows = side == core.SIDE_ROWS
        if P_old is not None:  # M <- (P P_old^T) M (rows), M (P_old P^T) (cols), at a resample
            if rows:
                momentum = torch.where(mask, torch.bmm(torch.bmm(P, P_old.mT), momentum), momentum)
            else:
                momentum = torch.where(mask, torch.bmm(momentum, torch.bmm(P_old, P.mT)), momentum)
        count = len(P)
        rounded = hp.projection_dtype == "bfloat16"
        from_history = core.history_norm_from_history(rank, *layout.work_shape)
        ratio = None if from_history else _gram_ratio(P, momentum, rows)
        if rounded or from_history:
            Ds, compressed = self._formed_history(Us, parts, P, momentum, beta1, rows, device, rounded, ratio)
            factor = 1.0 - beta1
        else:
            part_ps = [_part(P, a, b, count) for a, b in parts]
            if rows:
                compressed = _joined([torch.bmm(part_p, U) for part_p, U in zip(part_ps, Us, strict=True)])
            else:
                compressed = _joined([torch.bmm(U, part_p.mT) for part_p, U in zip(part_ps, Us, strict=True)])
            # D = (1 - beta1) U + decompress(beta1 s M): one baddbmm written over U (compress(U) is
            # already taken), so no full-size temporary for the history
            scaled = momentum * (beta1 * ratio).view(-1, 1, 1)
            Ds = []
            for (a, b), U, part_p in zip(parts, Us, part_ps, strict=True):
                part_m = _part(scaled, a, b, count)
                if rows:
                    Ds.append(U.baddbmm_(part_p.mT, part_m, beta=1.0 - beta1))
                else:
                    Ds.append(U.baddbmm_(part_m, part_p, beta=1.0 - beta1))
            factor = 1.0
        new_momentum = torch.lerp(momentum, compressed, 1.0 - beta1, out=compressed)  # over its own temporary
        return Ds, new_momentum, resample, factor

    def _formed_history(self, Us, parts, P, momentum, beta1: float, rows: bool, device, rounded: bool, ratio=None):
        """``(Ds, compress(U))`` with the history ``H = P^T M`` formed (see :meth:`_compressed`):
        ``D / (1 - beta1) = U + H beta1 s / (1 - beta1)`` written over each ``U`` (one pass), with
        ``s`` = ``ratio`` (from Gram products) or, when ``None``, ``||M|| / ||H||`` from ``H``
        itself (:func:`flora_opt.core.norm_ratio`). ``rounded`` (bfloat16 products):
        ``U`` and ``M`` are rounded to bfloat16 (``U``'s copy in a bfloat16 scratch buffer),
        ``H`` is a bfloat16 ``bmm`` widened into a float32 scratch buffer (an op mixing dtypes
        would allocate that copy itself). A part at a time, so the scratch buffers hold one part."""
        bf16 = torch.bfloat16
        count = len(P)
        if rounded:
            P, momentum_operand = P.to(bf16), momentum.to(bf16)
        else:
            momentum_operand = momentum
        momentum_sq = momentum.square().sum(dim=(1, 2)) if ratio is None else None
        largest = max((b - a) * Us[0][0].numel() for a, b in parts) if Us else 0
        operands = self.scratch(device, largest, bf16) if rounded else None
        widened = self.scratch(device, largest, slot="history")
        Ds, compressed = [], []
        for (a, b), U in zip(parts, Us, strict=True):
            part_p, part_m = _part(P, a, b, count), _part(momentum_operand, a, b, count)
            if rounded:
                operand = U.to(bf16) if operands is None else operands[: U.numel()].view(U.shape).copy_(U)
                out = operand if operands is not None else None  # the rounded U is dead once compressed
            else:
                operand = U
                out = None if widened is None else widened[: U.numel()].view(U.shape)
            if rows:
                compressed.append(torch.bmm(part_p, operand).to(torch.float32))
                history = torch.bmm(part_p.mT, part_m, out=out)
            else:
                compressed.append(torch.bmm(operand, part_p.mT).to(torch.float32))
                history = torch.bmm(part_m, part_p, out=out)
            if rounded:
                history = (
                    history.to(torch.float32) if widened is None else widened[: U.numel()].view(U.shape).copy_(history)
                )
            if ratio is None:
                history_sq = torch.linalg.vector_norm(history, dim=(1, 2)).square_()
                part_ratio = core.ratio_of_norms(_part(momentum_sq, a, b, count), history_sq, get_ops("torch"))
            else:
                part_ratio = _part(ratio, a, b, count)
            Ds.append(U.addcmul_(history, (part_ratio * (beta1 / (1.0 - beta1))).view(-1, 1, 1)))
        return Ds, _joined(compressed)

    # ---- state (8-bit states dequantized and requantized as one stack) ----------------------
    @staticmethod
    def _stack_shape(count: int, state_shape, layout: TensorLayout, work) -> tuple[int, ...]:
        """A stack of states: full-size states take the work shape (a scalar's () is (1,))."""
        if layout.matrix is None:
            return (count, *tuple(work))
        return (count, *tuple(state_shape))

    def _read(self, states, key: str, shape, quantization: bool, layout: TensorLayout) -> torch.Tensor:
        numel = math.prod(shape[1:])
        if not self.optimizer._quantized(layout, key, quantization):
            return _stacked([s[key] for s in states], shape)
        codes = torch.cat([s[key + CODES_SUFFIX] for s in states])
        absmax = torch.cat([s[key + ABSMAX_SUFFIX] for s in states])
        padded = absmax.numel() // len(states) * q.BLOCK_SIZE
        values = q.dequantize(codes, absmax, (len(states), padded), _SIGNED[key])
        return values[:, :numel].reshape(shape)

    def _write(
        self, states, key: str, value: torch.Tensor, state_shape, quantization: bool, layout: TensorLayout
    ) -> None:
        count = len(states)
        if not self.optimizer._quantized(layout, key, quantization):
            for state, row in zip(states, value.view((count, *tuple(state_shape))).unbind(0), strict=True):
                state[key] = row
            return
        flat = value.reshape(count, -1)
        padded = states[0][key + ABSMAX_SUFFIX].numel() * q.BLOCK_SIZE
        if padded != flat.shape[1]:
            flat = torch.nn.functional.pad(flat, (0, padded - flat.shape[1]))
        codes, absmax = q.quantize(flat, _SIGNED[key])
        torch._foreach_copy_([s[key + CODES_SUFFIX] for s in states], list(codes.view(count, -1).unbind(0)))
        torch._foreach_copy_([s[key + ABSMAX_SUFFIX] for s in states], list(absmax.view(count, -1).unbind(0)))
