r"""``flora``: the Flora update (docs/algorithm.md section 8) as an ``optax.chain`` of small transformations.

Built the way ``optax.adafactor`` is, with Flora's momentum in place of ``optax.ema``. For a leaf
``W`` (an ``m x n`` matrix view) with gradient ``G`` at its step ``t``:

.. math::
   \begin{aligned}
   &U = G / \sqrt{\hat V_t}
     &&\text{scale\_by\_second\_moment: Adafactor's factored (or full) } \hat V,\ \beta_{2,t} = 1 - t^{-b_2} \\
   &D = \text{compressed\_ema}(U)
     &&\text{full: } M_t = b_1 M + (1-b_1) U,\ D = M_t;\ \text{compressed: } D = (1-b_1) U + b_1 s P^\top M \\
   &D \leftarrow D / \max(1, \mathrm{RMS}(D)/d) &&\text{clip\_by\_rms} \\
   &D \leftarrow D + \lambda W &&\text{add\_weight\_decay (decoupled)} \\
   &D \leftarrow \alpha_t D &&\text{optax.scale\_by\_learning\_rate} \\
   &D \leftarrow \max(\epsilon_2, \mathrm{RMS}(W))\, D &&\text{scale\_by\_param\_rms} \\
   &\text{update} = -D &&\text{optax.scale(-1)} \\
   &\text{update} \leftarrow 0 \text{ where not finite} &&\text{zero\_non\_finite (section 9)}
   \end{aligned}

so that ``W_t = W - eta_t D_clip - eta_t lambda W`` with ``eta_t = alpha_t max(eps2, RMS(W))``: the
weight decay is added before the two scalings, which is what scales it by ``eta_t`` as in the
PyTorch :class:`flora_opt.Flora`. No ``scale_by_*`` takes a learning rate, so
``optax.inject_hyperparams(flora)(learning_rate=...)`` works without a list of static arguments.

**The state fixes the layout.** ``init`` decides each leaf's layout (section 1) from the
arguments; ``update`` reads it back from the state's shapes (placeholder, full or compressed
momentum and its side; factored or full second moment) and never from ``tau``,
``min_dim_size_to_factor``, ``max_aspect_ratio`` or ``factorized_second_moment``. Hence those
arguments may arrive as traced arrays in ``update`` (``inject_hyperparams`` turns every numeric
argument into one); only ``init`` needs them concrete (call it outside ``jax.jit``).

**Non-finite steps (section 9)** are decided per stage, each on its own output: a stage whose
output leaf has a non-finite sum of squares keeps that leaf's state and step count and passes the
non-finite values on, ``clip_by_rms`` turns a leaf with a non-finite RMS into NaN, and the last
stage sets such a leaf's update to zero. docs/jax.md ("Non-finite gradients") says where this can
differ from the PyTorch single decision on ``RMS(D)``: only at the float32 overflow boundary.
"""

from __future__ import annotations

import inspect
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import core
from ..core import EXP_AVG_SQ, EXP_AVG_SQ_COL, EXP_AVG_SQ_ROW, FloraHyperParams
from ..hyperparams import check_bool, check_int, check_real, check_seed, is_real
from ..ops import get_ops

__all__ = [
    "STATIC_ARGS",
    "ScaleBySecondMomentState",
    "add_weight_decay",
    "clip_by_rms",
    "flora",
    "scale_by_flora",
    "scale_by_param_rms",
    "scale_by_second_moment",
    "state_bytes",
    "zero_non_finite",
]

MaskOrFn = Optional[Union[Any, Callable[[Any], Any]]]

#: Kept for code written for the former monolithic transformation, which had to be injected with
#: ``optax.inject_hyperparams(flora, static_args=STATIC_ARGS)``. The chain needs no static
#: argument, so this is now empty: passing it changes nothing.
STATIC_ARGS: tuple[str, ...] = ()

# optax >= 0.2.4 names it safe_increment; older versions safe_int32_increment.
_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment


def _placeholder():
    return jnp.zeros((0,), jnp.float32)


def _traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def _concrete(value):
    """A concrete 0-d array (what ``inject_hyperparams`` passes to ``init``) as a Python number;
    tracers, Python values and everything else unchanged."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and not _traced(value) and np.ndim(value) == 0:
        dtype = np.dtype(value.dtype)
        if dtype == np.bool_:
            return bool(value)
        if np.issubdtype(dtype, np.integer):
            return int(value)
        if np.issubdtype(dtype, np.floating):
            return float(value)
    return value


def _static(name: str, value):
    """The Python value of an argument that fixes the state layout (only ``init`` reads these)."""
    value = _concrete(value)
    if _traced(value):
        raise ValueError(
            f"Invalid {name}: a traced value: it fixes the state layout, so init needs it concrete "
            "(call tx.init outside jax.jit/eval_shape, or list it in inject_hyperparams' static_args)"
        )
    return value


def _is_zero(value) -> bool:
    """``None`` or a Python/NumPy number equal to 0 (arrays, possibly traced, are not)."""
    return value is None or (is_real(value) and float(value) == 0.0)


def _validate(learning_rate, **args) -> None:
    """Raise ValueError naming the argument and the bad value, with the rules and messages of
    :mod:`flora_opt.hyperparams` (shared with :class:`flora_opt.Flora`). Traced values (under
    ``inject_hyperparams``, inside a jitted ``update``) were checked when ``init`` ran."""
    if learning_rate is None:
        raise ValueError("Invalid learning_rate: None: pass a float or an optax schedule")
    if not callable(learning_rate) and not _traced(learning_rate):
        if isinstance(learning_rate, (jax.Array, np.ndarray)) and not is_real(learning_rate):
            if np.ndim(learning_rate) != 0:
                raise ValueError(
                    f"Invalid learning_rate: an array learning_rate must be 0-d, got shape {np.shape(learning_rate)}"
                )
            if not jnp.issubdtype(learning_rate.dtype, jnp.floating) and not jnp.issubdtype(
                learning_rate.dtype, jnp.integer
            ):
                raise ValueError(f"Invalid learning_rate: {learning_rate!r}: expected a real number")
            check_real("learning_rate", float(learning_rate), at_least=0.0)
        elif is_real(learning_rate):
            check_real("learning_rate", learning_rate, at_least=0.0)
        else:
            raise ValueError(f"Invalid learning_rate: {learning_rate!r}: expected a float or a schedule")
    checks = dict(
        b1=lambda v: check_real("b1", v, at_least=0.0, below=1.0, what="must be in [0, 1)", none="to disable momentum"),
        b2=lambda v: check_real(
            "b2", v, above=0.0, what="must be a float > 0 (beta2_t = 1 - t^-b2, optax.adafactor's decay_rate)"
        ),
        tau=lambda v: check_int("tau", v, none="for full momentum"),
        seed=lambda v: check_seed("seed", v),
        kappa=lambda v: check_int("kappa", v),
        clipping_threshold=lambda v: check_real("clipping_threshold", v, above=0.0, none=""),
        weight_decay=lambda v: check_real("weight_decay", v, at_least=0.0, none=""),
        eps=lambda v: check_real("eps", v, above=0.0),
        min_parameter_scale=lambda v: check_real("min_parameter_scale", v, above=0.0),
        min_dim_size_to_factor=lambda v: check_int("min_dim_size_to_factor", v),
        max_aspect_ratio=lambda v: check_real("max_aspect_ratio", v, at_least=1.0, none=""),
        multiply_by_parameter_scale=lambda v: check_bool("multiply_by_parameter_scale", v),
        factorized_second_moment=lambda v: check_bool("factorized_second_moment", v),
    )
    for name, value in args.items():
        if isinstance(value, (jax.Array, np.ndarray)) and not _traced(value) and np.ndim(value) == 0:
            if np.dtype(value.dtype) == np.bool_ and name not in ("multiply_by_parameter_scale", "factorized_second_moment"):
                checks[name](value)  # a boolean array is refused with the value named
                continue
            value = _concrete(value)
        if not _traced(value):
            checks[name](value)


def _float_dtype(value):
    """The leaf's dtype if it is a real floating array or number; ``None`` otherwise."""
    try:
        dtype = np.dtype(value.dtype) if hasattr(value, "dtype") else np.dtype(jnp.result_type(value))
    except TypeError:  # not an array or a number (e.g. a string in a config-like tree)
        return None
    if jnp.issubdtype(dtype, jnp.complexfloating):
        raise ValueError(f"Flora does not support complex parameters or gradients (dtype {dtype})")
    if jnp.issubdtype(dtype, jnp.floating):
        return dtype
    return None


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
    ops = get_ops("jax")

    def init_fn(params):
        hp = FloraHyperParams(
            beta1=None,
            factorize_second_moment=_static("factorized_second_moment", factorized_second_moment),
            min_dim_size_to_factor=_static("min_dim_size_to_factor", min_dim_size_to_factor),
        )
        leaves, treedef = jax.tree_util.tree_flatten(params)
        fields: dict[str, list] = {name: [] for name in ScaleBySecondMomentState._fields}
        for leaf in leaves:
            fields["step"].append(jnp.zeros((), jnp.int32))
            shapes = _state_shapes(core.tensor_layout(np.shape(leaf), hp)) if _float_dtype(leaf) is not None else {}
            for name, key in _SECOND_MOMENT_FIELDS.items():
                fields[name].append(jnp.zeros(shapes[key], jnp.float32) if key in shapes else _placeholder())
        return ScaleBySecondMomentState(**{name: treedef.unflatten(v) for name, v in fields.items()})

    def leaf_update(grad, leaf_state):
        step, row, col, full = leaf_state
        if _float_dtype(grad) is None:
            return _non_float_update(grad), leaf_state
        grad = jnp.asarray(grad)
        new_step = step + 1
        if grad.size == 0:
            return jnp.zeros(grad.shape, jnp.float32), (new_step, row, col, full)
        factored = row.shape != (0,)  # the state fixes the layout
        work_shape = core.matrix_view(grad.shape) if factored else grad.shape
        layout = core.TensorLayout(grad.shape, core.matrix_view(grad.shape), factored, core.MOMENTUM_NONE, None, None)
        hp = FloraHyperParams(eps1=eps, decay_rate=-b2)
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
            for name, value in zip(ScaleBySecondMomentState._fields, new_state):
                new_fields[name].append(value)
        return treedef.unflatten(out), ScaleBySecondMomentState(**{k: treedef.unflatten(v) for k, v in new_fields.items()})

    return optax.GradientTransformation(init_fn, update_fn)


def _map_float(fn, updates, *trees):
    """``fn(update, *leaves)`` on the float leaves of ``updates`` (``trees`` flattened up to it);
    other leaves pass through."""
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    others = [treedef.flatten_up_to(tree) for tree in trees]
    out = [fn(u, *rest) if _float_dtype(u) is not None else u for u, *rest in zip(leaves, *others)]
    return treedef.unflatten(out)


def _rms32(x):
    x = jnp.asarray(x).astype(jnp.float32)
    return jnp.sqrt(jnp.mean(x * x))


def clip_by_rms(threshold: Optional[float] = 1.0) -> optax.GradientTransformation:
    r"""``D <- D / max(1, RMS(D) / threshold)`` per leaf (section 7; ``None``: no clipping).

    Unlike ``optax.clip_by_block_rms`` (which maps a leaf whose RMS overflows to zero), a leaf
    whose ``RMS(D)`` is not finite becomes NaN, so that :func:`zero_non_finite` skips it: the
    PyTorch optimizer skips exactly the tensors with a non-finite ``RMS(D)`` (section 9).
    """
    if threshold is not None and not _traced(threshold):
        check_real("clipping_threshold", _concrete(threshold), above=0.0, none="")

    def clip(u):
        rms = _rms32(u)
        scaled = u if threshold is None else u / jnp.maximum(1.0, rms / threshold)
        return jnp.where(jnp.isfinite(rms), scaled, jnp.nan).astype(u.dtype)

    def update_fn(updates, state, params=None):
        del params
        return _map_float(clip, updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def add_weight_decay(weight_decay: float, mask: MaskOrFn = None) -> optax.GradientTransformation:
    r"""``D <- D + lambda W`` (in float32) on the leaves that ``mask`` selects.

    Placed before ``scale_by_learning_rate`` and :func:`scale_by_param_rms`, the decay ends up
    ``eta_t lambda W``, scaled like the step (section 8). ``mask``: a tree of Python bools with
    the structure of the params, or a function of the params returning one.
    """

    def update_fn(updates, state, params=None):
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        param_leaves = _flatten_params(treedef, params, "the weight decay")
        selected = _resolve_mask(mask, params, treedef, len(leaves))
        out = [
            u + weight_decay * jnp.asarray(p).astype(jnp.float32) if keep and _float_dtype(u) is not None else u
            for u, p, keep in zip(leaves, param_leaves, selected)
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
            dtype = None if p is None else _float_dtype(p)
            return out if dtype is None else out.astype(dtype)

        if params is None:
            return _map_float(leaf, updates), state
        _flatten_params(jax.tree_util.tree_structure(updates), params, "zero_non_finite")
        return _map_float(leaf, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _parts(*, learning_rate, b1, b2, tau, seed, kappa, clipping_threshold, multiply_by_parameter_scale, weight_decay,
           eps, min_dim_size_to_factor, factorized_second_moment, min_parameter_scale, weight_decay_mask,
           max_aspect_ratio):
    """Validate, then the chain's stages up to (not including) the sign flip."""
    _validate(
        learning_rate, b1=b1, b2=b2, tau=tau, seed=seed, kappa=kappa, clipping_threshold=clipping_threshold,
        multiply_by_parameter_scale=multiply_by_parameter_scale, weight_decay=weight_decay, eps=eps,
        min_dim_size_to_factor=min_dim_size_to_factor, factorized_second_moment=factorized_second_moment,
        min_parameter_scale=min_parameter_scale, max_aspect_ratio=max_aspect_ratio,
    )
    from .ema import compressed_ema  # ema.py imports this module's helpers

    parts = [scale_by_second_moment(b2, eps, min_dim_size_to_factor, factorized_second_moment)]
    if not _is_zero(b1):
        parts.append(compressed_ema(b1, tau=tau, kappa=kappa, seed=seed, max_aspect_ratio=max_aspect_ratio))
    parts.append(clip_by_rms(clipping_threshold))
    if not _is_zero(weight_decay):
        parts.append(add_weight_decay(weight_decay, weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(learning_rate, flip_sign=False))
    if multiply_by_parameter_scale:
        parts.append(scale_by_param_rms(min_parameter_scale))
    return parts


def flora(
    learning_rate: optax.ScalarOrSchedule,
    b1: Optional[float] = 0.9,
    b2: float = 0.8,
    tau: Optional[int] = 256,
    seed: int = 0,
    kappa: int = 1000,
    clipping_threshold: Optional[float] = 1.0,
    multiply_by_parameter_scale: bool = True,
    weight_decay: Optional[float] = 0.0,
    eps: float = 1e-30,
    min_dim_size_to_factor: int = 128,
    factorized_second_moment: bool = True,
    *,
    min_parameter_scale: float = 1e-3,
    weight_decay_mask: MaskOrFn = None,
    max_aspect_ratio: Optional[float] = 4.0,
) -> optax.GradientTransformationExtraArgs:
    r"""Flora: Adafactor whose momentum is compressed by regenerated Gaussian projections.

    For an ``m x n`` weight the momentum costs ``tau * max(m, n)`` floats instead of ``m * n``
    and the second moment ``m + n``; the projections are regenerated from a per-leaf seed kept in
    the state. The same algorithm, and the same projection matrices, as the PyTorch
    :class:`flora_opt.Flora` (docs/algorithm.md; the argument mapping is in docs/jax.md).

    Args:
      learning_rate: a float or an optax schedule (evaluated at the number of previous updates).
        Multiplied by ``max(min_parameter_scale, RMS(W))`` when
        ``multiply_by_parameter_scale``.
      b1 (default 0.9): momentum coefficient; ``None`` or ``0`` disables momentum (then no
        momentum state exists and Flora is plain Adafactor). PyTorch: ``beta1``.
      b2 (default 0.8): second-moment decay exponent, ``beta2_t = 1 - t^-b2`` (optax.adafactor's
        ``decay_rate``). PyTorch: ``decay_rate = -b2``.
      tau (default 256): projection rank. A leaf whose smaller matrix dimension is ``<= tau``
        keeps full momentum; ``None`` keeps full momentum everywhere. PyTorch: ``rank``.
      seed (default 0): 32-bit seed of the projections; leaf ``i`` (in
        ``jax.tree_util.tree_leaves`` order) uses ``tensor_seed(seed, i)``.
      kappa (default 1000): resample the projection every ``kappa`` steps, transferring the
        momentum ``M <- P_new P_old^T M``.
      clipping_threshold (default 1.0): update clipping threshold ``d``; ``None`` disables
        clipping. PyTorch: ``clip_threshold``.
      multiply_by_parameter_scale (default True): scale the step by ``max(min_parameter_scale,
        RMS(W))``. PyTorch: ``scale_parameter``.
      weight_decay (default 0.0): decoupled weight decay ``W <- W - eta_t * weight_decay * W``
        (scaled like the step); ``None`` means 0.
      eps (default 1e-30): added to squared gradients. PyTorch: ``eps[0]``.
      min_dim_size_to_factor (default 128): factor the second moment of matrices whose smaller
        dimension is at least this.
      factorized_second_moment (default True): Adafactor's factored second moment for
        matrices; ``False`` keeps a full second moment. PyTorch: ``factorize_second_moment``.
      min_parameter_scale (keyword, default 1e-3): floor of ``RMS(W)`` in the parameter scale.
        PyTorch: ``eps[1]``.
      max_aspect_ratio (keyword, default 4.0): leaves whose matrix view has ``max(m, n) >
        max_aspect_ratio * min(m, n)`` (embeddings, LM heads) keep full momentum; ``None``
        compresses them too. PyTorch: ``max_aspect_ratio``.
      weight_decay_mask (keyword, default None): a tree of Python bools with the structure of
        the params (or a function of the params returning one); ``False`` leaves get no weight
        decay.

    Returns:
      ``optax.chain(scale_by_second_moment(b2, eps, ...), compressed_ema(b1, tau, kappa, seed, ...),
      clip_by_rms(clipping_threshold), add_weight_decay(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate, flip_sign=False),
      scale_by_param_rms(min_parameter_scale), optax.scale(-1.0), zero_non_finite())``, without
      the momentum stage when ``b1`` is ``None``/0, the weight decay when it is 0 and the
      parameter scale when ``multiply_by_parameter_scale=False`` (module docstring). Every
      argument may be injected with ``optax.inject_hyperparams(flora)(learning_rate=...)``, no
      static list needed (``init`` must then run outside ``jax.jit``: it fixes the layout).

    Example:
      >>> import jax, jax.numpy as jnp, optax
      >>> from flora_opt.optax import flora
      >>> params = {"w": jnp.ones((512, 256)), "b": jnp.zeros((256,))}
      >>> tx = flora(1e-3, tau=32, kappa=100)
      >>> state = tx.init(params)
      >>> grads = jax.tree.map(jnp.ones_like, params)
      >>> updates, state = tx.update(grads, state, params)
      >>> params = optax.apply_updates(params, updates)

    References:
      Yongchang Hao, Yanshuai Cao, Lili Mou. "Flora: Low-Rank Adapters Are Secretly Gradient
      Compressors", ICML 2024. https://arxiv.org/abs/2402.03293

    Note:
      Deviations from the reference JAX code (``flora-opt==0.0.3``): defaults ``tau=256,
      b2=0.8`` (the reference used ``tau=4, b2=0.99``); projections come from the portable
      generator of docs/algorithm.md section 2 (not ``jax.random``), so they equal the PyTorch
      ones; the momentum transfer applies ``P_new P_old^T M`` (the reference re-projected with
      the old key, scrambling the momentum at every resample); momentum and statistics are
      float32 (not bfloat16); the smaller matrix dimension is compressed and ``ndim > 2``
      leaves are viewed as ``(shape[0], -1)``; a non-finite gradient leaves its leaf's update
      at zero and its state unchanged; the momentum averages the normalised gradient ``U_t``, the
      history is rescaled by ``s`` and the weight decay is scaled by ``eta_t`` (the reference added unscaled weight decay after the step).
    """
    return optax.chain(*_parts(**locals()), optax.scale(-1.0), zero_non_finite())


def scale_by_flora(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
    r"""The Flora step ``Delta_t = eta_t (D_clip + lambda W)`` of every leaf, to be *subtracted*:
    :func:`flora` without its ``optax.scale(-1)`` (kept for code written against the former
    monolithic transformation; its state is now the chain's tuple). Same arguments as
    :func:`flora` (its signature is :func:`flora`'s, so the defaults have one home)."""
    bound = _FLORA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return optax.chain(*_parts(**bound.arguments), zero_non_finite())


_FLORA_SIGNATURE = inspect.signature(flora)
scale_by_flora.__signature__ = _FLORA_SIGNATURE


def state_bytes(state) -> int:
    """Bytes of all arrays in an optax state (works on ``jax.eval_shape`` output too)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(state):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total
