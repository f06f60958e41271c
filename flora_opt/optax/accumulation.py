"""Compressed gradient accumulation for JAX (docs/algorithm.md section 12).

Accumulating ``K`` micro-batch gradients of an ``m x n`` leaf with ``min(m, n) > tau`` keeps only
``B = sum_k w_k compress(g_k; Q_c)``, of shape ``(tau, n)`` (``m <= n``) or ``(m, tau)``, where
``Q_c`` is projection number ``c`` (the cycle: one per optimizer step) of the accumulation
stream of the leaf's seed ``tensor_seed(seed, i)``. At the end of the cycle the optimizer receives
``decompress(B; Q_c)``, an unbiased estimate of ``sum_k w_k g_k``; then ``c`` advances (a fresh
projection) and ``B`` is zeroed. Other leaves accumulate naively in float32.

Two ways to use it:

* :func:`compressed_accumulator` returns pure functions ``init``/``add``/``result``/``reset``
  over an :class:`AccumulatorState`, for micro-batch loops written with ``jax.lax.scan`` or
  ``fori_loop`` (the accumulator is the loop carry).
* :func:`compressed_multi_steps` wraps an optax optimizer like ``optax.MultiSteps``: every call
  adds one micro-batch gradient, and every ``k``-th call runs the inner optimizer on the mean.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import core
from ..hyperparams import is_int
from ..ops import get_ops
from ..projection import tensor_seed
from ._common import float_dtype, placeholder

__all__ = [
    "AccumulatorFunctions",
    "AccumulatorState",
    "CompressedMultiStepsState",
    "compressed_accumulator",
    "compressed_multi_steps",
    "has_updated",
]

# optax >= 0.2.4 names it safe_increment; older versions safe_int32_increment.
_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment


class AccumulatorState(NamedTuple):
    """State of a :func:`compressed_accumulator`: arrays only.

    Attributes:
      cycle: int32 scalar ``c``, the number of completed cycles (optimizer steps).
      seed: per leaf, uint32 scalar ``tensor_seed(seed, i)``.
      buffer: per leaf, float32: the compressed sum ``(tau, n)``/``(m, tau)`` for eligible
        leaves, the plain sum (the leaf's shape) for the others, a ``(0,)`` placeholder for
        non-float leaves.
    """

    cycle: jax.Array
    seed: Any
    buffer: Any


class AccumulatorFunctions(NamedTuple):
    """Pure functions of a compressed gradient accumulator (see :func:`compressed_accumulator`).

    Named apart from the PyTorch ``flora_opt.CompressedAccumulator`` (an object with backward
    hooks).

    Attributes:
      init: ``init(params) -> AccumulatorState`` (cycle 0, zero buffers).
      add: ``add(grads, state, weight=1.0) -> state``: ``B += weight * compress(grads; Q_c)``.
      result: ``result(state, like) -> grads``: ``decompress(B; Q_c)`` for every leaf, with
        the shapes and dtypes of the tree ``like`` (the params or the gradients).
      reset: ``reset(state) -> state``: zero the buffers and advance the cycle.
    """

    init: Callable
    add: Callable
    result: Callable
    reset: Callable


def _plan(leaf, tau: int | None):
    """``core.accumulation_layout`` of a float leaf (section 12); ``None`` for other leaves."""
    if float_dtype(leaf) is None:
        return None
    return core.accumulation_layout(np.shape(leaf), tau)


def _check_axis_name(axis_name) -> None:
    valid = isinstance(axis_name, str) and axis_name != ""
    if isinstance(axis_name, tuple):
        valid = len(axis_name) > 0 and all(isinstance(a, str) and a != "" for a in axis_name)
    if axis_name is not None and not valid:
        raise ValueError(
            f"Invalid axis_name: {axis_name!r}: must be None, a mesh axis name (a non-empty str) or a non-empty "
            "tuple of them"
        )


def compressed_accumulator(tau: int | None = 256, seed: int = 0, axis_name=None) -> AccumulatorFunctions:
    r"""Accumulate gradients compressed to rank ``tau`` (docs/algorithm.md section 12).

    Args:
      tau (default 256): rank ``r_acc`` of the accumulation projections; a leaf is compressed
        iff it is a float leaf with ``ndim >= 2`` whose matrix view ``(m, n) = (shape[0], -1)``
        has ``min(m, n) > tau``. ``None`` disables compression (plain float32 sums).
      seed (default 0): 32-bit seed; leaf ``i`` (``jax.tree_util.tree_leaves`` order) uses
        ``tensor_seed(seed, i)`` and projection ``c`` of stream 1 (the momentum uses stream 0, so
        the same ``seed`` as the optimizer never reuses a momentum projection).
      axis_name (default None): data parallelism inside ``jax.shard_map`` (or ``pmap``) over the
        mesh axis (or tuple of axes) ``axis_name``: ``add`` compresses each device's local
        gradients without communicating, and ``result`` averages the buffers over the axis before
        decompressing. Compression is linear and every device draws the same ``Q_c``, so with
        ``D`` devices

        .. math::
           \frac1D \sum_d Q_c^\top B_d = Q_c^\top \Big(\frac1D \sum_d B_d\Big),

        one ``pmean`` of the ``tau x max(m, n)`` buffers (and of the uncompressed leaves' sums)
        gives the data-parallel mean gradient's estimate: single-device compressed accumulation
        over the global batch (equal shares, each device's loss a mean over its share), up to the
        order of summation. Under a plain data-parallel ``jax.jit`` the gradient reaches ``add``
        already all-reduced at full size by XLA (docs/distributed.md), so use ``axis_name`` with
        ``shard_map`` to communicate compressed. The gradients given to ``add`` must be each
        device's own: with ``shard_map(check_vma=False)`` that is what ``jax.grad`` returns; with
        ``check_vma=True`` JAX's autodiff all-reduces the gradient of a replicated input at full
        size, so differentiate with respect to ``jax.lax.pcast(params, axis_name, to="varying")``
        and ``pcast`` the state's ``buffer`` likewise (``tests/test_optax_data_parallel.py`` runs
        both). ``None``: no collective.

    Returns:
      An :class:`AccumulatorFunctions` of pure, jittable functions.

    Example (a micro-batch loop in ``lax.scan``)::

        acc = compressed_accumulator(tau=64)
        acc_state = acc.init(params)

        def micro_step(acc_state, batch):
            grads = jax.grad(loss_fn)(params, batch)
            return acc.add(grads, acc_state, weight=1.0 / num_micro_batches), None

        acc_state, _ = jax.lax.scan(micro_step, acc_state, micro_batches)
        grads = acc.result(acc_state, like=params)    # unbiased estimate of the mean gradient
        updates, opt_state = tx.update(grads, opt_state, params)
        acc_state = acc.reset(acc_state)                # next cycle: a fresh projection
    """
    if tau is not None and (not is_int(tau) or tau < 1):
        raise ValueError(f"Invalid tau: {tau!r}: must be an int >= 1, or None to disable compression")
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"Invalid seed: {seed!r}: must be an int in [0, 2**32)")
    _check_axis_name(axis_name)
    ops = get_ops("jax")
    base_seed = int(seed)

    def projection(leaf_seed, cycle, plan: core.AccumulationLayout):
        return core.accumulation_projection(leaf_seed, cycle, plan.rank, plan.compressed_dim, ops)

    def init(params) -> AccumulatorState:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        seeds, buffers = [], []
        for index, leaf in enumerate(leaves):
            seeds.append(jnp.asarray(tensor_seed(base_seed, index), dtype=jnp.uint32))
            plan = _plan(leaf, tau)
            if plan is None:
                buffers.append(placeholder())
            else:
                shape = plan.buffer_shape() if plan.compressed else plan.shape
                buffers.append(jnp.zeros(shape, jnp.float32))
        return AccumulatorState(
            cycle=jnp.zeros((), jnp.int32), seed=treedef.unflatten(seeds), buffer=treedef.unflatten(buffers)
        )

    def add(grads, state: AccumulatorState, weight=1.0) -> AccumulatorState:
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        seeds = treedef.flatten_up_to(state.seed)
        buffers = treedef.flatten_up_to(state.buffer)
        new_buffers = []
        for grad, leaf_seed, buffer in zip(leaves, seeds, buffers, strict=True):
            grad = jnp.asarray(grad)
            plan = _plan(grad, tau)
            if plan is None:
                new_buffers.append(buffer)
                continue
            grad32 = grad.astype(jnp.float32)
            if plan.compressed:
                grad32 = grad32.reshape(plan.matrix)
                grad32 = core.compress(grad32, projection(leaf_seed, state.cycle, plan), plan.side, ops)
            new_buffers.append(buffer + weight * grad32)
        return state._replace(buffer=treedef.unflatten(new_buffers))

    def result(state: AccumulatorState, like):
        like_leaves, treedef = jax.tree_util.tree_flatten(like)
        seeds = treedef.flatten_up_to(state.seed)
        buffers = treedef.flatten_up_to(state.buffer)
        if axis_name is not None:  # one pmean of the compressed buffers and the uncompressed sums
            floats = [i for i, reference in enumerate(like_leaves) if _plan(reference, tau) is not None]
            reduced = jax.lax.pmean([buffers[i] for i in floats], axis_name)
            for i, value in zip(floats, reduced, strict=True):
                buffers[i] = value
        out = []
        for reference, leaf_seed, buffer in zip(like_leaves, seeds, buffers, strict=True):
            plan = _plan(reference, tau)
            shape = tuple(np.shape(reference))
            dtype = reference.dtype if hasattr(reference, "dtype") else jnp.result_type(reference)
            if plan is None:
                out.append(jnp.zeros(shape, dtype))
                continue
            value = buffer
            if plan.compressed:
                value = core.decompress(buffer, projection(leaf_seed, state.cycle, plan), plan.side, ops)
            out.append(value.reshape(shape).astype(dtype))
        return treedef.unflatten(out)

    def reset(state: AccumulatorState) -> AccumulatorState:
        return AccumulatorState(
            cycle=_safe_increment(state.cycle),
            seed=state.seed,
            # fresh zeros, not zeros_like: under shard_map they are replicated again (axis_name)
            buffer=jax.tree.map(lambda b: jnp.zeros(b.shape, b.dtype), state.buffer),
        )

    return AccumulatorFunctions(init, add, result, reset)


class CompressedMultiStepsState(NamedTuple):
    """State of :func:`compressed_multi_steps`.

    Attributes:
      mini_step: int32, micro-batches accumulated in the current cycle (``0 .. k-1``).
      inner_opt_state: the wrapped optimizer's state.
      accumulator: the :class:`AccumulatorState` (its ``cycle`` counts optimizer steps).
    """

    mini_step: jax.Array
    inner_opt_state: Any
    accumulator: AccumulatorState


def has_updated(state: CompressedMultiStepsState) -> jax.Array:
    """True if the last ``update`` ran the inner optimizer (as ``optax.MultiSteps.has_updated``)."""
    return jnp.logical_and(state.mini_step == 0, state.accumulator.cycle > 0)


def compressed_multi_steps(
    opt: optax.GradientTransformation,
    every_k_schedule: int | Callable[[jax.Array], jax.Array],
    tau: int | None = 256,
    seed: int = 0,
    use_grad_mean: bool = True,
) -> optax.GradientTransformationExtraArgs:
    """``optax.MultiSteps`` with compressed accumulation (docs/algorithm.md section 12).

    Each ``update`` adds the micro-batch gradient to the compressed buffers and returns zero
    updates, except every ``k``-th call, which hands ``decompress(B; Q_c)`` (the mean gradient
    when ``use_grad_mean``, ``w_k = 1/k``; the sum otherwise) to ``opt`` and returns its
    updates. With ``tau=None`` it accumulates plain float32 sums, like ``optax.MultiSteps``. A
    cycle of a single micro-batch (``k = 1``) hands its gradient over exact, as the PyTorch
    ``CompressedAccumulator`` does.

    Args:
      opt: the optimizer to run every ``k`` micro-batches (e.g. :func:`flora_opt.optax.flora`).
      every_k_schedule: ``k`` (an int >= 1) or a function of the cycle number returning it.
      tau (default 256): accumulation rank ``r_acc``; ``None`` disables compression.
      seed (default 0): 32-bit seed of the accumulation projections.
      use_grad_mean (default True): accumulate the mean (``w_k = 1/k``) instead of the sum.

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`CompressedMultiStepsState`.
    """
    if not callable(every_k_schedule) and (not is_int(every_k_schedule) or every_k_schedule < 1):
        raise ValueError(f"Invalid every_k_schedule: {every_k_schedule!r}: must be an int >= 1 or a schedule")
    if not isinstance(use_grad_mean, bool):
        raise ValueError(f"Invalid use_grad_mean: {use_grad_mean!r}: must be a bool")
    accumulator = compressed_accumulator(tau=tau, seed=seed)
    opt = optax.with_extra_args_support(opt)

    def every_k(cycle):
        if callable(every_k_schedule):
            return jnp.asarray(every_k_schedule(cycle), jnp.int32)
        return every_k_schedule

    def init_fn(params):
        return CompressedMultiStepsState(
            mini_step=jnp.zeros((), jnp.int32), inner_opt_state=opt.init(params), accumulator=accumulator.init(params)
        )

    def cycle_gradients(acc_state, updates, weight, single):
        """What ``opt`` receives at the end of a cycle: ``decompress(B; Q_c)`` in the dtypes of
        the micro-batch gradients (as ``optax.MultiSteps`` casts its mean). A cycle of one
        micro-batch has nothing to accumulate: its gradient is handed over exact (section 12, as
        on the PyTorch side)."""
        grads = accumulator.result(acc_state, like=updates)
        return jax.tree.map(
            lambda g, d: (
                jnp.where(single, (weight * jnp.asarray(g, jnp.float32)).astype(d.dtype), d)
                if float_dtype(d) is not None
                else d
            ),
            updates,
            grads,
        )

    def update_fn(updates, state: CompressedMultiStepsState, params=None, **extra_args):
        k = every_k(state.accumulator.cycle)
        weight = 1.0 / jnp.asarray(k, jnp.float32) if use_grad_mean else 1.0
        acc_state = accumulator.add(updates, state.accumulator, weight=weight)
        emit = state.mini_step >= k - 1

        def step(acc_state, inner_state):
            grads = cycle_gradients(acc_state, updates, weight, single=state.mini_step == 0)
            new_updates, new_inner = opt.update(grads, inner_state, params, **extra_args)
            # As optax.MultiSteps: the inner state keeps its dtypes whatever the gradients' are
            # (adam's float16 moments fed float32 gradients), so both branches have one type.
            return new_updates, _cast_like(new_inner, inner_state), accumulator.reset(acc_state)

        def accumulate(acc_state, inner_state):
            return _zeros_of(inner_updates), inner_state, acc_state

        # The updates between steps are zeros of the inner optimizer's update dtypes (as
        # optax.MultiSteps), never cast to the gradients' (float32 params, bfloat16 gradients).
        inner_updates = _update_shapes(opt, updates, state.inner_opt_state, params, extra_args)
        new_updates, new_inner, acc_state = jax.lax.cond(emit, step, accumulate, acc_state, state.inner_opt_state)
        mini_step = jnp.where(emit, jnp.zeros((), jnp.int32), _safe_increment(state.mini_step))
        return new_updates, CompressedMultiStepsState(mini_step, new_inner, acc_state)

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def _update_shapes(opt, updates, inner_state, params, extra_args):
    """The shapes and dtypes of ``opt.update``'s updates, traced abstractly (array extra
    arguments are passed as arguments, the others bound, as ``optax.MultiSteps`` does)."""
    static = {name: value for name, value in extra_args.items() if not isinstance(value, jax.Array)}
    dynamic = {name: value for name, value in extra_args.items() if isinstance(value, jax.Array)}
    update = functools.partial(opt.update, **static)
    return jax.eval_shape(update, updates, inner_state, params, **dynamic)[0]


def _zeros_of(shapes):
    return jax.tree.map(lambda shape: jnp.zeros(shape.shape, shape.dtype), shapes)


def _cast_like(tree, like):
    return jax.tree.map(lambda new, old: jnp.asarray(new).astype(jnp.result_type(old)), tree, like)
