"""Compressed gradient accumulation for JAX (docs/algorithm.md section 12).

Accumulating ``K`` micro-batch gradients of an ``m x n`` leaf with ``min(m, n) > tau`` keeps a
buffer ``B`` of shape ``(tau, n)`` (``m <= n``) or ``(m, tau)`` instead of their sum, and the
optimizer receives an estimate of ``sum_k w_k g_k`` once per cycle (one per optimizer step). The
``subspace`` estimator (default) folds every micro-batch into a ``min(m, n) x tau`` orthonormal
basis ``Q``, tracked by one warm-started power iteration per micro-batch and kept between cycles,
and ``B = Q^T S`` of the running sum ``S``; it hands over ``Q B``. The ``gaussian`` estimator (the
paper's) keeps ``B = sum_k w_k compress(g_k; Q_c)`` with projection ``c`` of the accumulation
stream of the leaf's seed ``tensor_seed(seed, i)`` and hands over ``decompress(B; Q_c)``, unbiased.
Other leaves accumulate naively in float32. The math is :mod:`flora_opt.core`'s, shared with the
PyTorch ``CompressedAccumulator``.

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
from ..hyperparams import check_choice, is_int
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
      basis: per leaf, float32: the subspace estimator's ``(min(m, n), tau)`` basis for
        eligible leaves, a ``(0,)`` placeholder for the others (and with ``gaussian``).
    """

    cycle: jax.Array
    seed: Any
    buffer: Any
    basis: Any


class AccumulatorFunctions(NamedTuple):
    """Pure functions of a compressed gradient accumulator (see :func:`compressed_accumulator`).

    Named apart from the PyTorch ``flora_opt.CompressedAccumulator`` (an object with backward
    hooks).

    Attributes:
      init: ``init(params) -> AccumulatorState`` (cycle 0, zero buffers, the first bases).
      add: ``add(grads, state, weight=1.0) -> state``: fold ``weight * grads`` into the buffers.
      result: ``result(state, like) -> grads``: the estimate of the cycle's sum for every leaf,
        with the shapes and dtypes of the tree ``like`` (the params or the gradients).
      reset: ``reset(state) -> state``: zero the buffers and advance the cycle (bases are kept).
      finish: ``finish(state, like) -> (grads, state)``: ``result`` then ``reset``; with
        ``axis_name`` and the subspace estimator the new state also keeps the basis the devices
        agreed on (with ``result`` and ``reset`` each device keeps its own, which only changes
        where the next cycle's tracking starts).
    """

    init: Callable
    add: Callable
    result: Callable
    reset: Callable
    finish: Callable


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


def compressed_accumulator(
    tau: int | None = 256, seed: int = 0, axis_name=None, estimator: str = core.ESTIMATOR_SUBSPACE
) -> AccumulatorFunctions:
    r"""Accumulate gradients compressed to rank ``tau`` (docs/algorithm.md section 12).

    Args:
      tau (default 256): rank ``r_acc`` of the accumulation projections; a leaf is compressed
        iff it is a float leaf with ``ndim >= 2`` whose matrix view ``(m, n) = (shape[0], -1)``
        has ``min(m, n) > tau``. ``None`` disables compression (plain float32 sums).
      seed (default 0): 32-bit seed; leaf ``i`` (``jax.tree_util.tree_leaves`` order) uses
        ``tensor_seed(seed, i)`` and, with ``gaussian``, projection ``c`` of stream 1 (the momentum
        uses stream 0, so the same ``seed`` as the optimizer never reuses a momentum projection);
        with ``subspace``, the first basis is projection 0 of stream 1.
      axis_name (default None): data parallelism inside ``jax.shard_map`` (or ``pmap``) over the
        mesh axis (or tuple of axes) ``axis_name``: ``add`` folds each device's local gradients
        in without communicating, and ``result`` averages over the axis. ``gaussian``: every
        device draws the same ``Q_c`` and compression is linear, so with ``D`` devices

        .. math::
           \frac1D \sum_d Q_c^\top B_d = Q_c^\top \Big(\frac1D \sum_d B_d\Big),

        one ``pmean`` of the ``tau x max(m, n)`` buffers (and of the uncompressed leaves' sums)
        gives single-device compressed accumulation over the global batch (equal shares, each
        device's loss a mean over its share), up to the order of summation. ``subspace``: a
        ``pmean`` of the ``min(m, n) x tau`` range sketches ``Q_d B_d Omega_c`` gives the common
        basis ``Q = orth(...)``, then a ``pmean`` of the re-projected buffers ``Q^T Q_d B_d`` (and
        of the uncompressed sums) gives the estimate ``Q mean_d(Q^T Q_d B_d)`` (section 12).
        Under a plain data-parallel ``jax.jit`` the gradient reaches ``add``
        already all-reduced at full size by XLA (docs/distributed.md), so use ``axis_name`` with
        ``shard_map`` to communicate compressed. The gradients given to ``add`` must be each
        device's own: with ``shard_map(check_vma=False)`` that is what ``jax.grad`` returns; with
        ``check_vma=True`` JAX's autodiff all-reduces the gradient of a replicated input at full
        size, so differentiate with respect to ``jax.lax.pcast(params, axis_name, to="varying")``
        and ``pcast`` the state's ``buffer`` and ``basis`` likewise
        (``tests/test_optax_data_parallel.py`` runs both). ``None``: no collective.
      estimator (default ``"subspace"``): ``"subspace"`` or ``"gaussian"`` (section 12).

    Returns:
      An :class:`AccumulatorFunctions` of pure, jittable functions.

    Example (a micro-batch loop in ``lax.scan``)::

        acc = compressed_accumulator(tau=64)
        acc_state = acc.init(params)

        def micro_step(acc_state, batch):
            grads = jax.grad(loss_fn)(params, batch)
            return acc.add(grads, acc_state, weight=1.0 / num_micro_batches), None

        acc_state, _ = jax.lax.scan(micro_step, acc_state, micro_batches)
        grads, acc_state = acc.finish(acc_state, like=params)    # the mean gradient's estimate
        updates, opt_state = tx.update(grads, opt_state, params)
    """
    if tau is not None and (not is_int(tau) or tau < 1):
        raise ValueError(f"Invalid tau: {tau!r}: must be an int >= 1, or None to disable compression")
    if not is_int(seed) or not 0 <= seed < 2**32:
        raise ValueError(f"Invalid seed: {seed!r}: must be an int in [0, 2**32)")
    _check_axis_name(axis_name)
    check_choice("estimator", estimator, core.ESTIMATORS)
    ops = get_ops("jax")
    base_seed = int(seed)
    subspace = estimator == core.ESTIMATOR_SUBSPACE

    def projection(leaf_seed, cycle, plan: core.AccumulationLayout):
        return core.accumulation_projection(leaf_seed, cycle, plan.rank, plan.compressed_dim, ops)

    def init(params) -> AccumulatorState:
        leaves, treedef = jax.tree_util.tree_flatten(params)
        seeds, buffers, bases = [], [], []
        for index, leaf in enumerate(leaves):
            leaf_seed = tensor_seed(base_seed, index)
            seeds.append(jnp.asarray(leaf_seed, dtype=jnp.uint32))
            plan = _plan(leaf, tau)
            if plan is None:
                buffers.append(placeholder())
            else:
                shape = plan.buffer_shape() if plan.compressed else plan.shape
                buffers.append(jnp.zeros(shape, jnp.float32))
            if plan is not None and plan.compressed and subspace:
                bases.append(core.initial_basis(leaf_seed, plan.rank, plan.compressed_dim, ops))
            else:
                bases.append(placeholder())
        return AccumulatorState(
            cycle=jnp.zeros((), jnp.int32),
            seed=treedef.unflatten(seeds),
            buffer=treedef.unflatten(buffers),
            basis=treedef.unflatten(bases),
        )

    def add(grads, state: AccumulatorState, weight=1.0) -> AccumulatorState:
        leaves, treedef = jax.tree_util.tree_flatten(grads)
        seeds = treedef.flatten_up_to(state.seed)
        buffers = treedef.flatten_up_to(state.buffer)
        bases = treedef.flatten_up_to(state.basis)
        for i, (grad, leaf_seed) in enumerate(zip(leaves, seeds, strict=True)):
            grad = jnp.asarray(grad)
            plan = _plan(grad, tau)
            if plan is None:
                continue
            grad32 = grad.astype(jnp.float32)
            if not plan.compressed:
                buffers[i] = buffers[i] + weight * grad32
            elif subspace:
                scaled = weight * grad32.reshape(plan.matrix)
                bases[i], buffers[i] = core.track_subspace(bases[i], buffers[i], scaled, plan.side, ops)
            else:
                compressed = core.compress(
                    grad32.reshape(plan.matrix), projection(leaf_seed, state.cycle, plan), plan.side, ops
                )
                buffers[i] = buffers[i] + weight * compressed
        return state._replace(buffer=treedef.unflatten(buffers), basis=treedef.unflatten(bases))

    def estimate(state: AccumulatorState, like):
        """The cycle's estimate for every leaf of ``like``, and the bases (agreed on with ``axis_name``)."""
        like_leaves, treedef = jax.tree_util.tree_flatten(like)
        seeds = treedef.flatten_up_to(state.seed)
        buffers = treedef.flatten_up_to(state.buffer)
        bases = treedef.flatten_up_to(state.basis)
        plans = [_plan(reference, tau) for reference in like_leaves]
        if axis_name is not None:
            tracked = [i for i, plan in enumerate(plans) if plan is not None and plan.compressed and subspace]
            if tracked:  # first pmean: the range sketches, for a common basis
                sketches = []
                for i in tracked:
                    plan = plans[i]
                    test = core.consensus_test_matrix(seeds[i], state.cycle, plan.rank, max(plan.matrix), ops)
                    sketches.append(core.range_sketch(bases[i], buffers[i], test, plan.side, ops))
                for i, sketch in zip(tracked, jax.lax.pmean(sketches, axis_name), strict=True):
                    common = ops.orthonormal(sketch)
                    buffers[i] = core.reproject(common, bases[i], buffers[i], plans[i].side, ops)
                    bases[i] = common
            floats = [i for i, plan in enumerate(plans) if plan is not None]
            reduced = jax.lax.pmean([buffers[i] for i in floats], axis_name)
            for i, value in zip(floats, reduced, strict=True):
                buffers[i] = value
        out = []
        for reference, plan, leaf_seed, buffer, basis in zip(like_leaves, plans, seeds, buffers, bases, strict=True):
            shape = tuple(np.shape(reference))
            dtype = reference.dtype if hasattr(reference, "dtype") else jnp.result_type(reference)
            if plan is None:
                out.append(jnp.zeros(shape, dtype))
                continue
            value = buffer
            if plan.compressed and subspace:
                value = core.expand_subspace(basis, buffer, plan.side, ops)
            elif plan.compressed:
                value = core.decompress(buffer, projection(leaf_seed, state.cycle, plan), plan.side, ops)
            out.append(value.reshape(shape).astype(dtype))
        # fresh placeholders where nothing is tracked: under shard_map they are replicated again
        kept = [
            b if plan is not None and plan.compressed and subspace else placeholder()
            for plan, b in zip(plans, bases, strict=True)
        ]
        return treedef.unflatten(out), treedef.unflatten(kept)

    def result(state: AccumulatorState, like):
        return estimate(state, like)[0]

    def reset(state: AccumulatorState) -> AccumulatorState:
        return AccumulatorState(
            cycle=_safe_increment(state.cycle),
            seed=state.seed,
            # fresh zeros, not zeros_like: under shard_map they are replicated again (axis_name)
            buffer=jax.tree.map(lambda b: jnp.zeros(b.shape, b.dtype), state.buffer),
            basis=state.basis,
        )

    def finish(state: AccumulatorState, like):
        grads, bases = estimate(state, like)
        return grads, reset(state._replace(basis=bases))

    return AccumulatorFunctions(init, add, result, reset, finish)


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
    estimator: str = core.ESTIMATOR_SUBSPACE,
) -> optax.GradientTransformationExtraArgs:
    """``optax.MultiSteps`` with compressed accumulation (docs/algorithm.md section 12).

    Each ``update`` folds the micro-batch gradient into the compressed buffers and returns zero
    updates, except every ``k``-th call, which hands the cycle's estimate (of the mean gradient
    when ``use_grad_mean``, ``w_k = 1/k``; of the sum otherwise) to ``opt`` and returns its
    updates. With ``tau=None`` it accumulates plain float32 sums, like ``optax.MultiSteps``. A
    cycle of a single micro-batch (``k = 1``) hands its gradient over exact, as the PyTorch
    ``CompressedAccumulator`` does.

    Args:
      opt: the optimizer to run every ``k`` micro-batches (e.g. :func:`flora_opt.optax.flora`).
      every_k_schedule: ``k`` (an int >= 1) or a function of the cycle number returning it.
      tau (default 256): accumulation rank ``r_acc``; ``None`` disables compression.
      seed (default 0): 32-bit seed of the accumulation projections.
      use_grad_mean (default True): accumulate the mean (``w_k = 1/k``) instead of the sum.
      estimator (default ``"subspace"``): as :func:`compressed_accumulator`.

    Returns:
      A ``GradientTransformationExtraArgs`` with state :class:`CompressedMultiStepsState`.
    """
    if not callable(every_k_schedule) and (not is_int(every_k_schedule) or every_k_schedule < 1):
        raise ValueError(f"Invalid every_k_schedule: {every_k_schedule!r}: must be an int >= 1 or a schedule")
    if not isinstance(use_grad_mean, bool):
        raise ValueError(f"Invalid use_grad_mean: {use_grad_mean!r}: must be a bool")
    accumulator = compressed_accumulator(tau=tau, seed=seed, estimator=estimator)
    opt = optax.with_extra_args_support(opt)

    def every_k(cycle):
        if callable(every_k_schedule):
            return jnp.asarray(every_k_schedule(cycle), jnp.int32)
        return every_k_schedule

    def init_fn(params):
        return CompressedMultiStepsState(
            mini_step=jnp.zeros((), jnp.int32), inner_opt_state=opt.init(params), accumulator=accumulator.init(params)
        )

    def cycle_gradients(acc_state, updates, weight, single, bases):
        """What ``opt`` receives at the end of a cycle, the cycle's estimate in the dtypes of the
        micro-batch gradients (as ``optax.MultiSteps`` casts its mean), and the next cycle's
        accumulator state. A cycle of one micro-batch has nothing to accumulate: its gradient is
        handed over exact and the bases stay ``bases`` (section 12, as on the PyTorch side)."""
        grads, next_state = accumulator.finish(acc_state, like=updates)
        grads = jax.tree.map(
            lambda g, d: (
                jnp.where(single, (weight * jnp.asarray(g, jnp.float32)).astype(d.dtype), d)
                if float_dtype(d) is not None
                else d
            ),
            updates,
            grads,
        )
        kept = jax.tree.map(lambda new, old: jnp.where(single, old, new), next_state.basis, bases)
        return grads, next_state._replace(basis=kept)

    def update_fn(updates, state: CompressedMultiStepsState, params=None, **extra_args):
        k = every_k(state.accumulator.cycle)
        weight = 1.0 / jnp.asarray(k, jnp.float32) if use_grad_mean else 1.0
        acc_state = accumulator.add(updates, state.accumulator, weight=weight)
        emit = state.mini_step >= k - 1

        def step(acc_state, inner_state):
            single = state.mini_step == 0
            grads, next_state = cycle_gradients(acc_state, updates, weight, single, state.accumulator.basis)
            new_updates, new_inner = opt.update(grads, inner_state, params, **extra_args)
            # As optax.MultiSteps: the inner state keeps its dtypes whatever the gradients' are
            # (adam's float16 moments fed float32 gradients), so both branches have one type.
            return new_updates, _cast_like(new_inner, inner_state), next_state

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
