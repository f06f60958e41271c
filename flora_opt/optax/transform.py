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

from collections.abc import Callable, Mapping
from dataclasses import fields, replace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import core
from ..core import EXP_AVG_SQ, EXP_AVG_SQ_COL, EXP_AVG_SQ_ROW
from ..hyperparams import (
    FloraHyperParams,
    check_optax,
    check_real,
    docstring_args,
    from_optax,
    is_real,
    optax_flags,
    optax_signature,
)
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

MaskOrFn = Any | Callable[[Any], Any] | None

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


def _validate(arguments: Mapping[str, Any]) -> None:
    """Raise ValueError naming the argument and the bad value: ``learning_rate`` (a number, 0-d
    array or schedule) here, every other argument by :func:`_check_arguments`."""
    learning_rate = arguments["learning_rate"]
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
    _check_arguments({name: value for name, value in arguments.items() if name != "learning_rate"})


def _check_arguments(arguments: Mapping[str, Any]) -> None:
    """Each optax argument by its rule in the record (:func:`flora_opt.hyperparams.check_optax`,
    the rules :class:`flora_opt.Flora` applies under the torch names). Concrete 0-d arrays are
    checked as Python numbers; traced values (under ``inject_hyperparams``, inside a jitted
    ``update``) were checked when ``init`` ran."""
    flags = optax_flags()
    for name, value in arguments.items():
        if isinstance(value, (jax.Array, np.ndarray)) and not _traced(value) and np.ndim(value) == 0:
            if np.dtype(value.dtype) == np.bool_ and name not in flags:
                check_optax(name, value)  # a boolean array is refused with the value named
                continue
            value = _concrete(value)
        if not _traced(value):
            check_optax(name, value)


def _concrete_record(hp: FloraHyperParams) -> FloraHyperParams:
    """``hp`` with its concrete 0-d arrays as Python numbers (what ``init`` reads the layout from)."""
    return replace(hp, **{f.name: _concrete(getattr(hp, f.name)) for f in fields(hp)})


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
    arguments = dict(
        b2=b2, eps=eps, min_dim_size_to_factor=min_dim_size_to_factor, factorized_second_moment=factorized_second_moment
    )
    _check_arguments(arguments)
    return _second_moment(from_optax(arguments))


def _second_moment(hp: FloraHyperParams) -> optax.GradientTransformation:
    """:func:`scale_by_second_moment` reading the whole record ``hp`` (what :func:`flora` builds):
    ``init`` lays the state out with :func:`flora_opt.core.tensor_layout`, ``update`` calls
    :func:`flora_opt.core.normalised_update` with ``hp``."""
    ops = get_ops("jax")

    def init_fn(params):
        layout_hp = replace(
            _concrete_record(hp),
            beta1=None,
            factorize_second_moment=_static("factorized_second_moment", hp.factorize_second_moment),
            min_dim_size_to_factor=_static("min_dim_size_to_factor", hp.min_dim_size_to_factor),
        )
        leaves, treedef = jax.tree_util.tree_flatten(params)
        fields: dict[str, list] = {name: [] for name in ScaleBySecondMomentState._fields}
        for leaf in leaves:
            fields["step"].append(jnp.zeros((), jnp.int32))
            shapes = (
                _state_shapes(core.tensor_layout(np.shape(leaf), layout_hp)) if _float_dtype(leaf) is not None else {}
            )
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


def _map_float(fn, updates, *trees):
    """``fn(update, *leaves)`` on the float leaves of ``updates`` (``trees`` flattened up to it);
    other leaves pass through."""
    leaves, treedef = jax.tree_util.tree_flatten(updates)
    others = [treedef.flatten_up_to(tree) for tree in trees]
    out = [fn(u, *rest) if _float_dtype(u) is not None else u for u, *rest in zip(leaves, *others, strict=True)]
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
    _check_arguments(dict(clipping_threshold=threshold))

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
            dtype = None if p is None else _float_dtype(p)
            return out if dtype is None else out.astype(dtype)

        if params is None:
            return _map_float(leaf, updates), state
        _flatten_params(jax.tree_util.tree_structure(updates), params, "zero_non_finite")
        return _map_float(leaf, updates, params), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update_fn)


def _parts(arguments: Mapping[str, Any]) -> list[optax.GradientTransformation]:
    """Validate ``flora``'s arguments (by optax name), then the chain's stages up to (not
    including) the sign flip. The stateful stages read the one record :func:`from_optax` builds,
    so an option of the record reaches the core functions they call without being passed by name."""
    _validate(arguments)
    hp = from_optax(arguments)
    from .ema import _compressed_ema  # ema.py imports this module's helpers

    parts = [_second_moment(hp)]
    if not _is_zero(hp.beta1):
        parts.append(_compressed_ema(hp))
    parts.append(clip_by_rms(hp.clip_threshold))
    if not _is_zero(hp.weight_decay):
        parts.append(add_weight_decay(hp.weight_decay, hp.weight_decay_mask))
    parts.append(optax.scale_by_learning_rate(hp.lr, flip_sign=False))
    if hp.scale_parameter:
        parts.append(scale_by_param_rms(hp.eps2))
    return parts


def _arguments(args, kwargs) -> dict[str, Any]:
    """``flora``'s arguments by name, defaults filled in (a ``TypeError`` for unknown ones, as a call)."""
    bound = _FLORA_SIGNATURE.bind(*args, **kwargs)
    bound.apply_defaults()
    return bound.arguments


def flora(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
    r"""Flora: Adafactor whose momentum is compressed by regenerated Gaussian projections.

    For an ``m x n`` weight the momentum costs ``tau * max(m, n)`` floats instead of ``m * n``
    and the second moment ``m + n``; the projections are regenerated from a per-leaf seed kept in
    the state. The same algorithm, and the same projection matrices, as the PyTorch
    :class:`flora_opt.Flora` (docs/algorithm.md; the argument mapping is in docs/jax.md).

    Args:
      <options>

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
      history is rescaled by ``s`` and the weight decay is scaled by ``eta_t`` (the reference
      added unscaled weight decay after the step).
    """
    return optax.chain(*_parts(_arguments(args, kwargs)), optax.scale(-1.0), zero_non_finite())


def scale_by_flora(*args, **kwargs) -> optax.GradientTransformationExtraArgs:
    r"""The Flora step ``Delta_t = eta_t (D_clip + lambda W)`` of every leaf, to be *subtracted*:
    :func:`flora` without its ``optax.scale(-1)`` (kept for code written against the former
    monolithic transformation; its state is now the chain's tuple). Same arguments as
    :func:`flora` (its signature is :func:`flora`'s, so the defaults have one home)."""
    return optax.chain(*_parts(_arguments(args, kwargs)), zero_non_finite())


# flora's signature, defaults and Args lines come from the record (flora_opt.hyperparams): every
# option is there with its default for inspect.signature, help() and optax.inject_hyperparams.
_FLORA_SIGNATURE = optax_signature().replace(return_annotation=optax.GradientTransformationExtraArgs)
flora.__signature__ = scale_by_flora.__signature__ = _FLORA_SIGNATURE
if flora.__doc__:  # None under python -OO
    flora.__doc__ = flora.__doc__.replace("      <options>\n", docstring_args("optax", 6) + "\n")


def state_bytes(state) -> int:
    """Bytes of all arrays in an optax state (works on ``jax.eval_shape`` output too)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(state):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total
