"""The grouped, sync-free Flora step for PyTorch (the default path of :meth:`flora_opt.Flora.step`).

Tensors of one param group with the same layout (shape, compressed side, rank, factoring),
parameter dtype, device and quantization form a *bucket*, stepped as one batch by the one math
core, :func:`flora_opt.core.flora_update` (docs/algorithm.md section 8), on stacks ``(T, m, n)``
(``(T, N)`` for vectors). What this module does is what the core does not: it buckets and
stacks, keeps the counters and the scratch buffers, reads and writes the state, streams one
large matrix, and applies the masked result. It computes no math of its own.

* the gradients are stacked once into a float32 ``(T, m, n)`` stack (read in place where they
  already are one contiguous tensor or consecutive rows of one buffer); the states are read as
  stacks (8-bit states dequantized as one stack, :func:`read_state`) and written back
  (:func:`write_state`);
* the step number ``t``, the projection index ``k``, the count of skipped steps and the seed of
  each tensor live in a small ``int64`` tensor per parameter on its device (:attr:`Engine.counters`),
  so ``beta2_t``, ``rho_t``, the resample test and ``k`` are computed on the device:
  ``step()`` reads nothing back to the host (no ``.item()``/``bool()``) after the first step;
* a non-finite ``RMS(D)`` (section 9) is decided per tensor on the device: the tensor's update and
  weight decay are masked to zero and its state keeps its old values
  (:func:`flora_opt.core.skip_non_finite`);
* the host integers of the checkpoint format (``state["step"]``, ``state["projection"]``,
  ``state["skipped_steps"]``) are advanced optimistically (as if no step were skipped,
  :meth:`Engine.finish_step`, once per ``step()`` outside any ``torch.compile`` graph) and
  made exact by :meth:`Engine.synchronize` (one device-to-host copy), which also raises the
  non-finite warning. :meth:`flora_opt.Flora.state_dict`, :meth:`~flora_opt.Flora.load_state_dict`,
  :meth:`~flora_opt.Flora.step_param` and :meth:`~flora_opt.Flora.synchronize` call it. Without
  skipped steps the host integers are always exact.

Precision: float32, as the per-tensor path; results equal the per-tensor path up to float32
rounding (batched reductions and matrix products sum in another order): the projections are
bit-identical, parameters and states agree to about ``1e-6`` relative.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, NamedTuple

import torch

from . import core
from . import quantization as q
from .core import EXP_AVG, EXP_AVG_SQ_COL, EXP_AVG_SQ_ROW, FloraHyperParams, TensorLayout
from .distributed import dequantize_state, is_dtensor, quantize_state
from .ops import TorchOps, square_block_rows
from .statebytes import ABSMAX_SUFFIX, CODES_SUFFIX, QUANTIZABLE_KEYS, is_quantized_state

# Columns of a parameter's counter tensor.
STEP, PROJ, PENDING, SEED = 0, 1, 2, 3
# "projection" (compressed momentum only): index k of the momentum projection in use
# (docs/algorithm.md section 4). It advances by one at each resample (core.next_projection_index).
PROJECTION = "projection"

# On the CPU, read the device step counters (host memory) to decide resamples exactly; False
# uses the conservative host-side window of other devices (tests exercise it on the CPU).
READ_CPU_COUNTERS = True

# A bucket of large tensors (LARGE_TENSOR elements or more, where an op's work dwarfs its
# dispatch cost) is stepped in stacks of at most STACK_ELEMENTS elements (one tensor per stack
# when it is larger): the step's full-size temporaries, and the scratch buffers, stay at 16 MiB
# instead of a whole bucket's (113 MiB for GPT-2-small's twelve 768 x 3072 matrices), for the
# same step time; small tensors are stacked all together, so that the number of dispatched ops
# does not grow with depth. Measured by (docs/benchmarks.md, "The grouped step on CPU"):
#   python benchmarks/engine_profile.py --ablations --model gpt2-small --rank 32
LARGE_TENSOR = 1 << 18
STACK_ELEMENTS = 1 << 22

# One matrix of more than STREAM_ELEMENTS elements without compressed momentum (an embedding or
# an output head) is streamed in blocks of rows (Engine._step_streamed): it gets no full-size
# buffer, whose new pages would cost more than the passes. Measured by the command above.
STREAM_ELEMENTS = 1 << 22

# The largest scratch buffer kept between steps on a CPU device (Engine.scratch), in elements:
# 2^25 (128 MiB in float32); a larger temporary is allocated at each step. Measured by:
#   python benchmarks/engine_profile.py --ablations --model llama-48x256 --rank 32
SCRATCH_ELEMENTS = 1 << 25


def chunks(params: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The stacks in which the grouped step takes a bucket (tensors of one layout): all of them
    for small tensors, stacks of at most ``STACK_ELEMENTS`` elements of large ones. The
    partition depends on shapes only, so it is the same at every step."""
    numel = params[0].numel()
    if numel < LARGE_TENSOR or len(params) * numel <= STACK_ELEMENTS:
        return [params]
    per = max(1, STACK_ELEMENTS // numel)
    return [params[i : i + per] for i in range(0, len(params), per)]


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


# ---- state I/O: the one reader and writer of the torch state, float or 8-bit -------------------


def read_state(states: list[dict[str, Any]], key: str, shape, quantized: bool) -> torch.Tensor:
    """The float32 values of state ``key`` of the tensors whose states are ``states``, as one
    array of ``shape``: ``(len(states), *state shape)``, or the state's own shape for one state.

    A float state is read without a copy where it can be (one state, or states that are the rows
    of one buffer, as :func:`write_state` leaves them); an 8-bit state (``quantized``,
    :func:`flora_opt.statebytes.is_quantized_state`) is dequantized as one stack, or through
    :mod:`flora_opt.distributed` for a ``DTensor`` state (FSDP2, one state).
    """
    if not quantized:
        if len(states) == 1 and tuple(states[0][key].shape) == tuple(shape):
            return states[0][key]
        return _stacked([state[key] for state in states], shape)
    signed = QUANTIZABLE_KEYS[key]
    codes = [state[key + CODES_SUFFIX] for state in states]
    absmax = [state[key + ABSMAX_SUFFIX] for state in states]
    if len(states) == 1:
        if is_dtensor(codes[0]):
            return dequantize_state(codes[0], absmax[0], signed)
        return q.dequantize(codes[0], absmax[0], shape, signed)
    padded = absmax[0].numel() * q.BLOCK_SIZE
    values = q.dequantize(torch.cat(codes), torch.cat(absmax), (len(states), padded), signed)
    return values[:, : math.prod(shape[1:])].reshape(shape)


def write_state(states: list[dict[str, Any]], key: str, value: torch.Tensor, quantized: bool, assign=None) -> None:
    """Store ``value`` (of :func:`read_state`'s shape) as state ``key`` of ``states``: the rows of
    a stack become the float states (views of it), or are quantized as one stack into the
    existing 8-bit codes and scales (no second copy of the codes). ``assign(i, key, tensor)``, if
    given, stores the new float tensor of ``states[i]`` instead of an assignment here."""
    count = len(states)
    if not quantized:
        shape = states[0][key].shape
        rows = (
            [value if value.shape == shape else value.view(shape)]
            if count == 1
            else value.view((count, *shape)).unbind(0)
        )
        for index, row in enumerate(rows):
            if assign is None:
                states[index][key] = row
            else:
                assign(index, key, row)
        return
    signed = QUANTIZABLE_KEYS[key]
    codes = [state[key + CODES_SUFFIX] for state in states]
    absmax = [state[key + ABSMAX_SUFFIX] for state in states]
    if count == 1:
        if is_dtensor(codes[0]):
            quantize_state(value, codes[0], absmax[0], signed)
        else:
            q.quantize(value, signed, out=(codes[0], absmax[0]))
        return
    flat = value.reshape(count, -1)
    padded = absmax[0].numel() * q.BLOCK_SIZE
    if padded != flat.shape[1]:
        flat = torch.nn.functional.pad(flat, (0, padded - flat.shape[1]))
    stacked_codes, stacked_absmax = q.quantize(flat, signed)
    torch._foreach_copy_(codes, list(stacked_codes.view(count, -1).unbind(0)))
    torch._foreach_copy_(absmax, list(stacked_absmax.view(count, -1).unbind(0)))


class _Stack(NamedTuple):
    """One stack of a bucket, loaded: what :func:`flora_opt.core.flora_update` takes, and where
    its results go."""

    params: list[torch.Tensor]
    states: list[dict[str, Any]]
    layout: TensorLayout
    ops: TorchOps
    quantized: dict[str, bool]
    grad: torch.Tensor  # float32 (T, *work)
    own_grad: bool  # a copy the update may overwrite, not a view of the .grad tensors
    weights: torch.Tensor | None  # bf16/fp16 (float32) or float64 parameters as a stack; None: float32
    old: dict[str, torch.Tensor]
    counters: torch.Tensor  # (T, 4) int64
    step: torch.Tensor  # (T,) int64, the new step numbers
    seed: torch.Tensor  # (T,) int32 bit patterns
    index: torch.Tensor | None  # (T,) int64 projection indices (compressed momentum)
    resample: torch.Tensor | None  # (T,) bool
    may_resample: bool


def _host_integers(state: dict[str, Any]) -> tuple:
    """The integers of a tensor's host state that its device counter mirrors."""
    return state.get("step"), state.get(PROJECTION), state.get("skipped_steps"), state.get("seed")


class Engine:
    """Device counters, scratch buffers and the bucketed step of one :class:`flora_opt.Flora` optimizer."""

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
        # (parameter, key, tensor): new float state of a compiled step, stored by finish_step
        self._deferred: list[tuple[torch.Tensor, str, torch.Tensor]] = []

    def scratch_bytes(self) -> int:
        """Bytes of the scratch buffers kept between steps (:meth:`scratch`; not state)."""
        return sum(buffer.numel() * buffer.element_size() for buffer in self._scratch.values())

    def scratch(
        self, device: torch.device, numel: int, dtype: torch.dtype = torch.float32, slot: str = "main"
    ) -> torch.Tensor | None:
        """A flat buffer of ``numel`` elements (one per ``slot`` and dtype) kept from step to step on
        a CPU device, for the temporaries that no state keeps (the stack of gradients, ``U``/``D``,
        the squares of the statistics, bfloat16 operands, the formed history, blocks of a streamed
        matrix); ``None`` on other devices and under ``torch.compile``.

        The CPU allocator gives the top of its heap back to the system, so a temporary of a few
        MiB allocated afresh at every step is new pages whose faults cost as much as the
        arithmetic (docs/benchmarks.md); reused, its pages stay resident. A buffer grows to the
        largest stack, at most ``SCRATCH_ELEMENTS``, and is not part of the state. CUDA's
        caching allocator already reuses blocks.
        """
        if device.type != "cpu" or torch.compiler.is_compiling() or numel > SCRATCH_ELEMENTS:
            return None
        key = (device, dtype, slot)
        buffer = self._scratch.get(key)
        if buffer is None or buffer.numel() < numel:
            buffer = torch.empty(numel, dtype=dtype, device=device)
            self._scratch[key] = buffer
        return buffer[:numel]

    def _ops(self, device: torch.device) -> TorchOps:
        """The torch backend of the core whose :meth:`~flora_opt.ops.ArrayOps.buffer` hands out
        this engine's scratch buffers on ``device``."""
        return TorchOps(buffers=lambda slot, numel, dtype: self.scratch(device, numel, dtype, slot))

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

    @torch.compiler.disable
    def finish_step(self, buckets: list[tuple[list[torch.Tensor], int, bool]]) -> None:
        """The end of a grouped step, outside any ``torch.compile`` graph (Python integers that
        change at every step would make each step a new graph): the deferred state tensors
        (:meth:`_store`) go into the state, and the checkpoint's integers of the parameters of
        each ``(params, kappa, compressed)`` advance as if no step were skipped (exact unless one
        was; see :meth:`synchronize`), and recorded in :attr:`host_integers`."""
        for param, key, tensor in self._deferred:
            self.optimizer.state[param][key] = tensor
        self._deferred.clear()
        for params, kappa, compressed in buckets:
            for param in params:
                state = self.optimizer.state[param]
                step = state["step"] + 1
                if compressed:
                    state[PROJECTION] = core.next_projection_index(state[PROJECTION], step, kappa)
                state["step"] = step
                self.host_integers[param] = _host_integers(state)

    def _may_resample(self, params, states, counters: torch.Tensor, kappa: int) -> bool:
        """Whether a tensor of the stack can resample at this step, decided on the host without
        a device sync, so that the previous projection and the transfer are only computed then.

        On the CPU the counters are host memory: their values are read directly (a load, no
        dispatched op, nothing to wait for), so the answer is exact. On other devices the step
        before this one is only known to lie in ``[known_steps[p], state["step"]]`` (the host
        integers are advanced as if no step were skipped; :meth:`synchronize` makes them exact):
        the answer is true if any step of that range resamples, so a skipped step can only make
        the engine compute a transfer that the device mask then discards, never miss one. Inside
        ``torch.compile`` it is always true (one graph for every step).
        """
        if torch.compiler.is_compiling():
            return True
        if counters.device.type == "cpu" and READ_CPU_COUNTERS:
            steps = counters[:, STEP].numpy().tolist()
            return any(core.resample_due(s + 1, kappa) for s in steps)
        for param, state in zip(params, states, strict=True):
            high = state["step"]
            low = self.known_steps.get(param, high)
            if high - low + 1 >= kappa or any(core.resample_due(s + 1, kappa) for s in range(low, high + 1)):
                return True
        return False

    # ---- one stack: load, update (the core), store, apply -------------------------------------
    @torch.no_grad()
    def step_bucket(
        self, params: list[torch.Tensor], group: dict[str, Any], hp: FloraHyperParams, layout: TensorLayout
    ) -> None:
        """One step of every tensor in ``params`` (same layout, dtype, device and options)."""
        stack = self._load(params, group, hp, layout)
        if self._streams(stack):
            self._step_streamed(stack, group, hp)
            return
        new, update, finite = core.flora_update(
            stack.grad,
            stack.params if stack.weights is None else stack.weights.to(torch.float32),
            stack.old,
            stack.step,
            stack.seed,
            layout,
            hp,
            stack.ops,
            lr=group["lr"],
            device=params[0].device,
            projection_index=stack.index,
            out=stack.grad if stack.own_grad else None,
            may_resample=stack.may_resample,
        )
        new, update = core.skip_non_finite(finite, new, stack.old, update, stack.ops)
        self._store(stack, new, finite)
        self._apply(stack, update)

    def _load(self, params, group, hp: FloraHyperParams, layout: TensorLayout) -> _Stack:
        """Stack the gradients (float32), the parameters that are not float32, the states and the
        counters of ``params``."""
        optimizer = self.optimizer
        states = [optimizer.state[p] for p in params]
        count = len(params)
        work = tuple(layout.work_shape) if layout.matrix is not None else (max(math.prod(layout.shape), 1),)
        shape = (count, *work)
        ops = self._ops(params[0].device)
        grad, own_grad = self._stack_gradients([p.grad for p in params], shape, layout, ops)
        weights = None
        if params[0].dtype != torch.float32:  # bf16/fp16 applied in float32 and rounded once; float64 in float64
            weights = torch.stack(params).view(shape)
            weights = weights.to(torch.float64 if weights.dtype == torch.float64 else torch.float32)
        quantized = {key: is_quantized_state(layout, key, group["quantization"]) for key in layout.state_shapes()}
        old = {
            key: read_state(states, key, (count, *(work if layout.matrix is None else state_shape)), quantized[key])
            for key, state_shape in layout.state_shapes().items()
        }
        counters = torch.stack([self._counter(p, s) for p, s in zip(params, states, strict=True)])
        step = counters[:, STEP] + 1
        index = resample = None
        may_resample = False
        if layout.momentum == core.MOMENTUM_COMPRESSED:
            resample = core.resample_due(step, hp.kappa)
            index = core.next_projection_index(counters[:, PROJ], step, hp.kappa)
            may_resample = self._may_resample(params, states, counters, hp.kappa)
        return _Stack(
            params=params,
            states=states,
            layout=layout,
            ops=ops,
            quantized=quantized,
            grad=grad,
            own_grad=own_grad,
            weights=weights,
            old=old,
            counters=counters,
            step=step,
            seed=counters[:, SEED].to(torch.int32),
            index=index,
            resample=resample,
            may_resample=may_resample,
        )

    @staticmethod
    def _stack_gradients(grads, shape, layout: TensorLayout, ops: TorchOps) -> tuple[torch.Tensor, bool]:
        """The float32 stack of ``grads`` and whether it is a copy: a view where the gradients
        already are one (only read then), else a copy, on the CPU into the scratch buffer where
        ``U`` and ``D``, written over it, do not become state (:func:`flora_opt.core.keeps_direction`)."""
        view = _stack_view(grads, shape)
        if view is not None and view.dtype == torch.float32:
            return view, False
        if view is None and grads[0].dtype == torch.float32 and not core.keeps_direction(layout):
            buffer = ops.buffer("main", (len(grads), *tuple(grads[0].shape)))
            if buffer is not None:
                return torch.stack(grads, out=buffer).view(shape), True
        stacked = torch.stack(grads).view(shape) if view is None else view
        return stacked.to(torch.float32), True

    def _store(self, stack: _Stack, new: dict[str, torch.Tensor], finite: torch.Tensor) -> None:
        """Write the new (masked) state and advance the device counters: step and projection index
        where the step was taken, pending skips where it was not. Under ``torch.compile`` the new
        float tensors are put into the state dicts by :meth:`finish_step`, outside the graph: a
        state dict changed inside it would be rebuilt at the graph's end, its integers guarded."""
        assign = None
        if torch.compiler.is_compiling():

            def assign(index, key, tensor):
                self._deferred.append((stack.params[index], key, tensor))

        for key, value in new.items():
            write_state(stack.states, key, value, stack.quantized[key], assign)
        taken = finite.to(torch.int64)
        zeros = torch.zeros_like(taken)
        moved = zeros if stack.resample is None else taken * stack.resample
        increments = torch.stack([taken, moved, 1 - taken, zeros], dim=1)
        torch._foreach_add_([self.counters[p] for p in stack.params], list(increments.unbind(0)))

    @staticmethod
    def _apply(stack: _Stack, update: core.Direction) -> None:
        """The parameters take the (masked) update in place (:func:`flora_opt.core.apply_direction_`);
        bf16/fp16 and float64 parameters through their stack, copied back."""
        if stack.weights is None:
            core.apply_direction_(stack.params, update, stack.ops)
            return
        core.apply_direction_(list(stack.weights.unbind(0)), update, stack.ops)
        shape = (len(stack.params), *tuple(stack.layout.shape))
        torch._foreach_copy_(stack.params, list(stack.weights.view(shape).unbind(0)))

    # ---- one large matrix, streamed ------------------------------------------------------------
    @staticmethod
    def _streams(stack: _Stack) -> bool:
        """One matrix of more than ``STREAM_ELEMENTS`` elements without compressed momentum is
        streamed (:meth:`_step_streamed`): its ``U`` and ``D`` are never formed whole, so the step
        allocates no full-size buffer (the new momentum is written into the old one)."""
        layout = stack.layout
        return (
            len(stack.params) == 1
            and not stack.own_grad
            and stack.weights is None
            and layout.factored
            and math.prod(layout.work_shape) > STREAM_ELEMENTS
            and layout.momentum != core.MOMENTUM_COMPRESSED
            and stack.params[0].is_contiguous()
            and not torch.compiler.is_compiling()
            and (
                layout.momentum == core.MOMENTUM_NONE
                or (not stack.quantized[EXP_AVG] and stack.states[0][EXP_AVG].is_contiguous())
            )
        )

    def _step_streamed(self, stack: _Stack, group: dict[str, Any], hp: FloraHyperParams) -> None:
        """The step of one matrix in blocks of rows, with the core's functions of each phase:
        the statistics and ``eta_t`` on the whole; ``RMS(D)`` from the blocks' sums of squares
        (``D`` of a block from its rows of ``G``: section 6 is row-wise given the scales, full
        momentum elementwise); then each block's ``D`` again (the same ops, so the same values)
        masked (the momentum written in place, a skipped step keeping its rows) and applied."""
        ops, layout, grad = stack.ops, stack.layout, stack.grad
        m, n = layout.work_shape
        eta = core.step_size(stack.step, stack.params, hp, ops, lr=group["lr"])
        rows = square_block_rows((1, m, n))
        scratch = ops.buffer("main", (rows * n,))
        (row_scale, col_scale), (row, col) = core.factored_statistics(
            grad, stack.old[EXP_AVG_SQ_ROW], stack.old[EXP_AVG_SQ_COL], stack.step, hp, ops, scratch
        )
        momentum = stack.old.get(EXP_AVG)
        blocks = [(start, min(start + rows, m)) for start in range(0, m, rows)]

        def block_direction(start: int, stop: int) -> torch.Tensor:
            out = None if scratch is None else scratch[: (stop - start) * n].view(1, stop - start, n)
            normalised = core.scale_rows_and_columns(grad[:, start:stop], row_scale[:, start:stop], col_scale, ops, out)
            block_momentum = None if momentum is None else momentum[:, start:stop]
            value, _, _ = core.momentum_update(
                normalised, block_momentum, stack.step, None, layout, hp, ops, out=normalised
            )
            return value

        sums = [ops.sum_of_squares(block_direction(start, stop), (1, 2)) for start, stop in blocks]
        scale, decay, finite = core.clipped_step(core.rms_of_blocks(sums, m * n, ops), eta, hp, ops)
        statistics = {EXP_AVG_SQ_ROW: row, EXP_AVG_SQ_COL: col}
        self._store(stack, core.keep_states_if_finite(finite, statistics, stack.old, ops), finite)
        target = stack.params[0].view(1, m, n)
        for start, stop in blocks:
            value = block_direction(start, stop)
            new = {} if momentum is None else {EXP_AVG: value}
            old = {} if momentum is None else {EXP_AVG: momentum[:, start:stop]}
            _, update = core.skip_non_finite(finite, new, old, core.Direction(value, decay, scale), ops, into=old)
            core.apply_direction_([target[0, start:stop]], update, ops)
