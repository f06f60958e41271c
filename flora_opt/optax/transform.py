r"""The stages of Flora's optax chain, each an ``optax.GradientTransformation`` of its own.

For a leaf ``W`` (an ``m x n`` matrix view) with incoming update ``G`` at its step ``t``
(docs/algorithm.md sections 5-9):

.. math::
   \begin{aligned}
   &U = G / \sqrt{\hat V_t}
     &&\text{scale\_by\_second\_moment: Adafactor's factored (or full) } \hat V,\ \beta_{2,t} = 1 - t^{-b_2} \\
   &D = \text{compressed\_ema}(U)
     &&\text{full: } M_t = b_1 M + (1-b_1) U,\ D = M_t;\ \text{compressed: } D = (1-b_1) U + b_1 s P^\top M \\
   &D \leftarrow D / \max(1, \mathrm{RMS}(D)/d) &&\text{clip\_by\_rms} \\
   &D \leftarrow D + \lambda W &&\text{add\_weight\_decay (decoupled)} \\
   &D \leftarrow \max(\epsilon_2, \mathrm{RMS}(W))\, D &&\text{scale\_by\_param\_rms} \\
   &\text{update} \leftarrow 0 \text{ where not finite} &&\text{zero\_non\_finite (section 9)}
   \end{aligned}

:func:`flora_opt.optax.flora` chains them (``flora_opt/optax/alias.py``). The two stateful stages
call the core (:func:`flora_opt.core.normalised_update`, :func:`flora_opt.core.momentum_direction`)
per leaf with one record of every option: :func:`second_moment_stage` and :func:`momentum_stage`
take that record, :func:`scale_by_second_moment` and :func:`compressed_ema` build it from their
own arguments.

**The state fixes the layout.** ``init`` decides each leaf's layout (section 1) from the
arguments; ``update`` reads it back from the state's shapes (placeholder, full or compressed
momentum and its side; factored or full second moment) and never from ``tau``,
``min_dim_size_to_factor``, ``max_aspect_ratio`` or ``factorized_second_moment``. Hence those
arguments may arrive as traced arrays in ``update`` (``inject_hyperparams`` turns every numeric
argument into one); only ``init`` needs them concrete (call it outside ``jax.jit``).

**Non-finite steps (section 9)** are decided per stage, each on its own output: a stage whose
output leaf has a non-finite sum of squares keeps that leaf's state and step count and passes the
non-finite values on, ``clip_by_rms`` turns a leaf with a non-finite RMS into NaN, and
``zero_non_finite`` sets such a leaf's update to zero. docs/jax.md ("Non-finite gradients") says
where this can differ from the PyTorch single decision on ``RMS(D)``: only at the float32
overflow boundary.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import replace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import core
from ..core import EXP_AVG_SQ, EXP_AVG_SQ_COL, EXP_AVG_SQ_ROW
from ..hyperparams import FloraHyperParams, from_optax, is_real
from ..ops import get_ops
from ..projection import tensor_seed
from ._common import check_arguments, concrete, concrete_record, float_dtype, placeholder, static_value, traced

__all__ = [
    "CompressedEmaState",
    "ScaleBySecondMomentState",
    "add_weight_decay",
    "clip_by_rms",
    "compressed_ema",
    "momentum_stage",
    "scale_by_param_rms",
    "scale_by_second_moment",
    "second_moment_stage",
    "zero_non_finite",
]

MaskOrFn = Any | Callable[[Any], Any] | None


def _explicit_sharding(value):
    """The sharding in ``value``'s type when its mesh has ``Explicit`` axes, else ``None``."""
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    if explicit is None or not hasattr(jax, "typeof") or not isinstance(value, jax.Array):
        return None  # JAX versions before explicit sharding
    sharding = getattr(jax.typeof(value), "sharding", None)
    axis_types = getattr(getattr(sharding, "mesh", None), "axis_types", None) or ()
    if any(axis_type == explicit for axis_type in axis_types):
        return sharding
    return None


def _resolve_mask(mask: MaskOrFn, params, treedef, count: int) -> list[bool]:
    if mask is None:
        return [True] * count
    tree = mask(params) if callable(mask) else mask
    try:
        leaves = treedef.flatten_up_to(tree)
    except (ValueError, TypeError) as error:
        raise ValueError(f"weight_decay_mask must have the structure of the parameters: {error}") from error
    resolved = []
    for leaf in leaves:
        if not isinstance(leaf, (bool, np.bool_)):
            raise ValueError(
                f"weight_decay_mask leaves must be Python bools (static under jit), got {type(leaf).__name__}"
            )
        resolved.append(bool(leaf))
    return resolved


def _state_shapes(layout) -> dict[str, tuple[int, ...]]:
    """The core's state shapes, except that full states keep the parameter's own shape.

    The core views an ``ndim > 2`` tensor as ``(shape[0], -1)``; storing its full momentum and
    second moment in the parameter's shape lets them share the parameter's sharding.
    """
    shapes = layout.state_shapes()
    for key in (core.EXP_AVG, EXP_AVG_SQ):
        if key in shapes and shapes[key] == layout.work_shape:
            shapes[key] = layout.shape
    return shapes


def _flatten_state(treedef, fields: dict[str, Any]) -> dict[str, list]:
    try:
        return {name: treedef.flatten_up_to(tree) for name, tree in fields.items()}
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"the Flora state does not have the structure of the gradients (was it initialised "
            f"with other params?): {error}"
        ) from error


def _flatten_params(treedef, params, who: str) -> list:
    if params is None:
        raise ValueError(f"{who} needs params (update(grads, state, params))")
    try:
        return treedef.flatten_up_to(params)
    except (ValueError, TypeError) as error:
        raise ValueError(f"params must have the structure of the gradients: {error}") from error


def _on_leaf(fn, update, leaf_state: tuple):
    """``fn(update, leaf_state) -> (update, leaf_state)``, run in auto mode on ``Explicit`` meshes
    (``jax.make_mesh``'s default types every array with its sharding): its results keep the
    shardings of the update and of the state they replace."""
    explicit = _explicit_sharding(update)
    if explicit is None:
        return fn(update, leaf_state)
    out_sharding = (explicit, tuple(jax.typeof(v).sharding for v in leaf_state))
    return jax.sharding.auto_axes(fn, out_sharding=out_sharding)(update, leaf_state)


def _finite(x):
    """0-d bool: the sum of squares of ``x`` is finite (NaN/Inf anywhere, or float32 overflow)."""
    return jnp.isfinite(jnp.sum(x * x))


def _non_float_update(update):
    """What every stage does with a leaf that is not a float array: integers and booleans get a
    zero update, float0 and non-array leaves pass through."""
    if not hasattr(update, "dtype") or update.dtype == jax.dtypes.float0:
        return update
    return jnp.zeros_like(update)


class ScaleBySecondMomentState(NamedTuple):
    """State of :func:`scale_by_second_moment`: one tree per field, arrays only.

    Attributes:
      step: per leaf, int32: steps the leaf has taken (a non-finite one does not count).
      exp_avg_sq_row, exp_avg_sq_col: per leaf, float32 factored second moment ``(m,)`` and
        ``(n,)``, or ``(0,)`` placeholders.
      exp_avg_sq: per leaf, float32 full second moment (the parameter's shape), or a placeholder.
    """

    step: Any
    exp_avg_sq_row: Any
    exp_avg_sq_col: Any
    exp_avg_sq: Any


_SECOND_MOMENT_FIELDS = {"exp_avg_sq_row": EXP_AVG_SQ_ROW, "exp_avg_sq_col": EXP_AVG_SQ_COL, "exp_avg_sq": EXP_AVG_SQ}


def scale_by_second_moment(
    b2: float = 0.8, eps: float = 1e-30, min_dim_size_to_factor: int = 128, factorized_second_moment: bool = True
) -> optax.GradientTransformation:
    r"""``U = G / sqrt(Vhat)``, Adafactor's second moment (docs/algorithm.md section 6), unclipped.

    With ``beta2_t = 1 - t^{-b2}`` (``t`` the leaf's step): factored, for a matrix view ``(m, n)``
    with ``min(m, n) >= min_dim_size_to_factor``,
    ``R_t = beta2_t R + (1 - beta2_t) mean_j(G^2 + eps)``, ``C_t`` likewise over rows,
    ``U_ij = G_ij (R_i / mean(R))^{-1/2} C_j^{-1/2}``; otherwise
    ``V_t = beta2_t V + (1 - beta2_t)(G^2 + eps)``, ``U = G / sqrt(V_t)``
    (:func:`flora_opt.core.normalised_update`). The layout is that of
    :func:`flora_opt.core.tensor_layout` (``ndim > 2`` viewed as ``(shape[0], -1)``), so it
    differs from ``optax.scale_by_factored_rms`` for such leaves. The output is float32; a leaf
    whose ``U`` is not finite keeps its state and step count and passes ``U`` on.
    """
    arguments = dict(
        b2=b2, eps=eps, min_dim_size_to_factor=min_dim_size_to_factor, factorized_second_moment=factorized_second_moment
    )
    check_arguments(arguments)
    return second_moment_stage(from_optax(arguments))


def second_moment_stage(hp: FloraHyperParams) -> optax.GradientTransformation:
    """:func:`scale_by_second_moment` reading the whole record ``hp`` (what :func:`flora_opt.optax.flora` builds):
    ``init`` lays the state out with :func:`flora_opt.core.tensor_layout`, ``update`` calls
    :func:`flora_opt.core.normalised_update` with ``hp``."""
    ops = get_ops("jax")

    def init_fn(params):
        layout_hp = replace(
            concrete_record(hp),
            beta1=None,
            factorize_second_moment=static_value("factorized_second_moment", hp.factorize_second_moment),
            min_dim_size_to_factor=static_value("min_dim_size_to_factor", hp.min_dim_size_to_factor),
        )
        leaves, treedef = jax.tree_util.tree_flatten(params)
        fields: dict[str, list] = {name: [] for name in ScaleBySecondMomentState._fields}
        for leaf in leaves:
            fields["step"].append(jnp.zeros((), jnp.int32))
            shapes = (
                _state_shapes(core.tensor_layout(np.shape(leaf), layout_hp)) if float_dtype(leaf) is not None else {}
            )
            for name, key in _SECOND_MOMENT_FIELDS.items():
                fields[name].append(jnp.zeros(shapes[key], jnp.float32) if key in shapes else placeholder())
        return ScaleBySecondMomentState(**{name: treedef.unflatten(v) for name, v in fields.items()})

    def leaf_update(grad, leaf_state):
        step, row, col, full = leaf_state
        if float_dtype(grad) is None:
            return _non_float_update(grad), leaf_state
        grad = jnp.asarray(grad)
        new_step = step + 1
        if grad.size == 0:
            return jnp.zeros(grad.shape, jnp.float32), (new_step, row, col, full)
        factored = row.shape != (0,)  # the state fixes the layout
        work_shape = core.matrix_view(grad.shape) if factored else grad.shape
        layout = core.TensorLayout(grad.shape, core.matrix_view(grad.shape), factored, core.MOMENTUM_NONE, None, None)
        state = {EXP_AVG_SQ_ROW: row, EXP_AVG_SQ_COL: col} if factored else {EXP_AVG_SQ: full.reshape(work_shape)}
        grad32 = grad.astype(jnp.float32).reshape(work_shape)
        normalised, new = core.normalised_update(grad32, state, new_step, layout, hp, ops)
        finite = _finite(normalised)
        keep = lambda new_value, old: core.keep_if_finite(finite, new_value.reshape(old.shape), old, ops)  # noqa: E731
        if factored:
            row, col = keep(new[EXP_AVG_SQ_ROW], row), keep(new[EXP_AVG_SQ_COL], col)
        else:
            full = keep(new[EXP_AVG_SQ], full)
        return normalised.reshape(grad.shape), (core.keep_if_finite(finite, new_step, step, ops), row, col, full)

    def update_fn(updates, state, params=None):
        del params
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        fields = _flatten_state(treedef, state._asdict())
        out, new_fields = [], {name: [] for name in fields}
        for index, leaf in enumerate(leaves):
            leaf_state = tuple(fields[name][index] for name in ScaleBySecondMomentState._fields)
            new_leaf, new_state = _on_leaf(leaf_update, leaf, leaf_state)
            out.append(new_leaf)
            for name, value in zip(ScaleBySecondMomentState._fields, new_state, strict=True):
                new_fields[name].append(value)
        return treedef.unflatten(out), ScaleBySecondMomentState(
            **{k: treedef.unflatten(v) for k, v in new_fields.items()}
        )

    return optax.GradientTransformation(init_fn, update_fn)


class CompressedEmaState(NamedTuple):
    """Per-leaf step counts (int32), seeds (uint32) and momenta (float32; placeholders where unused).

    A momentum is compressed ``(tau, n)`` (``m <= n``) or ``(m, tau)``, full (the parameter's
    shape), or a ``(0,)`` placeholder; ``update`` reads the layout back from these shapes.
    """

    step: optax.Params
    seed: optax.Params
    exp_avg: optax.Params


def _layout_from_state(shape, momentum_shape) -> core.TensorLayout:
    """The momentum layout that ``init`` chose, recovered from the state's shape (so ``update``
    needs neither ``tau`` nor ``max_aspect_ratio`` as Python values)."""
    matrix = core.matrix_view(shape)
    if matrix is not None and min(matrix) == 0:
        matrix = None
    if momentum_shape == (0,) and shape != (0,):
        kind, side, rank = core.MOMENTUM_NONE, None, None
    elif matrix is None or momentum_shape in (tuple(shape), matrix):
        kind, side, rank = core.MOMENTUM_FULL, None, None
    else:
        m, n = matrix
        side = core.SIDE_ROWS if m <= n else core.SIDE_COLS
        kind, rank = core.MOMENTUM_COMPRESSED, momentum_shape[0] if side == core.SIDE_ROWS else momentum_shape[1]
    return core.TensorLayout(tuple(shape), matrix, False, kind, side, rank)


def compressed_ema(
    b1: float | None = 0.9,
    tau: int | None = 256,
    kappa: int = 1000,
    seed: int = 0,
    max_aspect_ratio: float | None = 4.0,
) -> optax.GradientTransformation:
    r"""Flora's momentum (docs/algorithm.md sections 1, 3, 4 and 8), a drop-in for ``optax.ema``.

    For each leaf, with ``U`` the incoming update (in Flora, the Adafactor-normalised gradient)
    and ``t`` the leaf's step count (:func:`flora_opt.core.momentum_direction`):

    .. math::
       \text{full momentum (} \tau = \text{None, small or embedding-like leaves):}\quad
         M_t = \beta_1 M_{t-1} + (1-\beta_1) U, \quad D = M_t \\
       \text{compressed:}\quad P = P_k\ (k = \lfloor (t-1)/\kappa \rfloor,\ M \text{ transferred at a resample}),\quad
         s = \|M_{t-1}\|_F / \|P^\top M_{t-1}\|_F \\
       D = (1-\beta_1) U + \beta_1 s P^\top M_{t-1}, \qquad M_t = \beta_1 M_{t-1} + (1-\beta_1) P U

    and the transformation outputs ``D``. With ``tau=None`` it is ``optax.ema(b1, debias=False)``
    (tested). A leaf whose ``D`` is not finite keeps its state and step count (section 9,
    :func:`flora_opt.core.keep_if_finite`) and passes the non-finite ``D`` on, so that a later
    stage can zero it. It takes no learning rate, so a chain built with it works with
    ``optax.inject_hyperparams`` without a list of static arguments.

    Args:
      b1: momentum coefficient ``beta1`` in ``[0, 1)``; ``None`` or 0: no momentum (the updates
        pass through, every momentum is a placeholder).
      tau: projection rank ``r`` (``None``: full momentum for every leaf).
      kappa: resample interval.
      seed: 32-bit seed; leaf ``i`` (in ``jax.tree_util.tree_leaves`` order) uses
        ``tensor_seed(seed, i)``, as :func:`flora_opt.optax.flora` does.
      max_aspect_ratio: matrices with ``max(m, n) > ratio * min(m, n)`` keep full momentum.

    ``b1`` (whether it is 0), ``tau``, ``seed`` and ``max_aspect_ratio`` are read by ``init`` only
    (they fix the state); ``update`` takes the layout from the state's shapes, so ``b1`` and
    ``kappa`` may be traced arrays there (``optax.inject_hyperparams``).

    Example::

        tx = optax.chain(optax.scale_by_factored_rms(), compressed_ema(0.9, tau=32, kappa=1000),
                         optax.clip_by_block_rms(1.0), optax.scale_by_learning_rate(1e-3))
    """
    arguments = dict(b1=b1, tau=tau, kappa=kappa, seed=seed, max_aspect_ratio=max_aspect_ratio)
    check_arguments(arguments)
    return momentum_stage(from_optax(arguments))


def momentum_stage(hp: FloraHyperParams) -> optax.GradientTransformation:
    """:func:`compressed_ema` reading the whole record ``hp`` (what :func:`flora_opt.optax.flora`
    builds): ``init`` lays the state out with :func:`flora_opt.core.tensor_layout`, ``update``
    calls :func:`flora_opt.core.momentum_direction` with ``hp``."""
    ops = get_ops("jax")

    def init_fn(params):
        b1_value = static_value("b1", hp.beta1)
        kappa_value = concrete(hp.kappa)  # only for the stability warning: skipped when traced
        layout_hp = replace(
            concrete_record(hp),
            rank=static_value("tau", hp.rank),
            kappa=1 if traced(kappa_value) else kappa_value,
            beta1=None if not b1_value else float(b1_value),
            max_aspect_ratio=static_value("max_aspect_ratio", hp.max_aspect_ratio),
        )
        base_seed = static_value("seed", hp.seed)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        steps, seeds, momenta = [], [], []
        for index, leaf in enumerate(leaves):
            steps.append(jnp.zeros((), jnp.int32))
            seeds.append(jnp.asarray(tensor_seed(base_seed, index), dtype=jnp.uint32))
            shape = None
            if float_dtype(leaf) is not None:
                layout = core.tensor_layout(jnp.shape(leaf), layout_hp)
                shape = _state_shapes(layout).get(core.EXP_AVG)
                message = None if traced(kappa_value) else core.unstable_transfer_message(layout, layout_hp)
                if message is not None:
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
            momenta.append(jnp.zeros(shape, jnp.float32) if shape is not None else placeholder())
        return CompressedEmaState(*(treedef.unflatten(x) for x in (steps, seeds, momenta)))

    def leaf_update(update, leaf_state):
        step, leaf_seed, momentum = leaf_state
        if float_dtype(update) is None or jnp.size(update) == 0:
            return update, leaf_state
        update = jnp.asarray(update)
        layout = _layout_from_state(update.shape, tuple(momentum.shape))
        if layout.momentum == core.MOMENTUM_NONE:
            return update, leaf_state
        new_step = step + 1
        normalised = update.astype(jnp.float32).reshape(layout.work_shape)
        direction, new_state = core.momentum_direction(
            normalised, momentum.reshape(layout.momentum_shape()), new_step, leaf_seed, layout, hp, ops
        )
        finite = jnp.isfinite(jnp.sum(direction * direction))
        new_momentum = core.keep_if_finite(finite, new_state[core.EXP_AVG].reshape(momentum.shape), momentum, ops)
        kept_step = core.keep_if_finite(finite, new_step, step, ops)
        return direction.reshape(update.shape).astype(update.dtype), (kept_step, leaf_seed, new_momentum)

    def update_fn(updates, state: CompressedEmaState, params=None):
        del params
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        fields = _flatten_state(treedef, state._asdict())
        results = [
            _on_leaf(leaf_update, leaf, (fields["step"][i], fields["seed"][i], fields["exp_avg"][i]))
            for i, leaf in enumerate(leaves)
        ]
        new_updates = treedef.unflatten([r[0] for r in results])
        steps, seeds, momenta = (treedef.unflatten([r[1][j] for r in results]) for j in range(3))
        return new_updates, CompressedEmaState(step=steps, seed=seeds, exp_avg=momenta)

    return optax.GradientTransformation(init_fn, update_fn)


def _map_float(fn, updates, *trees):
    """``fn(update, *leaves)`` on the float leaves of ``updates`` (``trees`` flattened up to it);
    other leaves pass through."""
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    others = [treedef.flatten_up_to(tree) for tree in trees]
    out = [fn(u, *rest) if float_dtype(u) is not None else u for u, *rest in zip(leaves, *others, strict=True)]
    return treedef.unflatten(out)


def _rms32(x):
    x = jnp.asarray(x).astype(jnp.float32)
    return jnp.sqrt(jnp.mean(x * x))


def clip_by_rms(threshold: float | None = 1.0) -> optax.GradientTransformation:
    r"""``D <- D / max(1, RMS(D) / threshold)`` per leaf (section 7; ``None``: no clipping).

    Unlike ``optax.clip_by_block_rms`` (which maps a leaf whose RMS overflows to zero), a leaf
    whose ``RMS(D)`` is not finite becomes NaN, so that :func:`zero_non_finite` skips it: the
    PyTorch optimizer skips exactly the tensors with a non-finite ``RMS(D)`` (section 9).
    """
    check_arguments(dict(clipping_threshold=threshold))

    def clip(u):
        rms = _rms32(u)
        scaled = u if threshold is None else u / jnp.maximum(1.0, rms / threshold)
        return jnp.where(jnp.isfinite(rms), scaled, jnp.nan).astype(u.dtype)

    def update_fn(updates, state, params=None):
        del params
        return _map_float(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def add_weight_decay(weight_decay: float | None, mask: MaskOrFn = None) -> optax.GradientTransformation:
    r"""``D <- D + lambda W`` (in float32) on the leaves that ``mask`` selects.

    Placed before ``scale_by_learning_rate`` and :func:`scale_by_param_rms`, the decay ends up
    ``eta_t lambda W``, scaled like the step (section 8). ``mask``: a tree of Python bools with
    the structure of the params, or a function of the params returning one. A ``weight_decay``
    of ``None`` or a Python 0 passes the updates through and needs no params; an array (what
    ``optax.inject_hyperparams`` passes) is applied whatever its value. Stateless either way
    (``optax.EmptyState``), so the chain that holds it has one state tree.
    """
    check_arguments(dict(weight_decay=weight_decay))
    if weight_decay is None or (is_real(weight_decay) and weight_decay == 0):
        return optax.identity()

    def update_fn(updates, state, params=None):
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        param_leaves = _flatten_params(treedef, params, "the weight decay")
        selected = _resolve_mask(mask, params, treedef, len(leaves))
        out = [
            u + weight_decay * jnp.asarray(p).astype(jnp.float32) if keep and float_dtype(u) is not None else u
            for u, p, keep in zip(leaves, param_leaves, selected, strict=True)
        ]
        return treedef.unflatten(out), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def scale_by_param_rms(min_scale: float = 1e-3) -> optax.GradientTransformation:
    r"""``D <- max(min_scale, RMS(W)) D`` per leaf, ``RMS`` in float32 (section 5; the
    float32 counterpart of ``optax.scale_by_param_block_rms``)."""

    def update_fn(updates, state, params=None):
        _flatten_params(jax.tree_util.tree_structure(updates), params, "multiply_by_parameter_scale=True")
        return _map_float(lambda u, p: u * jnp.maximum(_rms32(p), min_scale), updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def zero_non_finite() -> optax.GradientTransformation:
    """Section 9's last word: a leaf with any non-finite value gets a zero update
    (:func:`flora_opt.core.keep_if_finite`); updates are cast to the parameters' dtypes when
    ``params`` are given (the stages before compute in float32)."""
    ops = get_ops("jax")

    def update_fn(updates, state, params=None):
        def leaf(u, p=None):
            finite = jnp.all(jnp.isfinite(u))
            out = core.keep_if_finite(finite, u, jnp.zeros_like(u), ops)
            dtype = None if p is None else float_dtype(p)
            return out if dtype is None else out.astype(dtype)

        if params is None:
            return _map_float(leaf, updates), state
        _flatten_params(jax.tree_util.tree_structure(updates), params, "zero_non_finite")
        return _map_float(leaf, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)
