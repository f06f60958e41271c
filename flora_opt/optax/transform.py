r"""``scale_by_flora`` and ``flora``: the Flora update (docs/algorithm.md) as optax transformations.

For a leaf ``W`` with gradient ``G`` at its step ``t`` (an ``m x n`` matrix view, ``m <= n``):

.. math::
   \begin{aligned}
   &\eta_t = \alpha_t \max(\epsilon_2, \mathrm{RMS}(W_{t-1})), \quad
     \alpha_t = \text{learning\_rate (or schedule(count))} \\
   &\hat V_t:\ \text{Adafactor's factored (or full) second moment}, \quad
     \beta_{2,t} = 1 - t^{-b_2} \\
   &U_t = G_t / \sqrt{\hat V_t}, \qquad U_t \leftarrow U_t / \max(1, \mathrm{RMS}(U_t)/d) \\
   &P_k \in \mathbb R^{\tau\times m},\ (P_k)_{ij}\sim\mathcal N(0, 1/\tau),
     \ k = \lfloor (t-1)/\kappa \rfloor \text{ (regenerated from the leaf's seed)} \\
   &\text{if } t>1,\ (t-1) \bmod \kappa = 0:\ M \leftarrow P_k P_{k-1}^\top M \\
   &M_t = b_1 M_{t-1} + (1-b_1)\,\eta_t P_k U_t, \qquad
     \Delta_t = P_k^\top M_t + \eta_t \lambda W_{t-1}
   \end{aligned}

``scale_by_flora`` emits ``Delta_t`` (the step to *subtract*); :func:`flora` chains it with
``optax.scale(-1.0)`` so that ``optax.apply_updates(params, updates)`` gives ``W_t``.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from .. import core
from ..core import EXP_AVG, EXP_AVG_SQ, EXP_AVG_SQ_COL, EXP_AVG_SQ_ROW, FloraHyperParams, TensorLayout
from ..hyperparams import check_bool, check_int, check_real, check_seed, is_real
from ..ops import get_ops
from ..projection import tensor_seed

__all__ = ["STATIC_ARGS", "ScaleByFloraState", "scale_by_flora", "flora", "state_bytes"]

MaskOrFn = Optional[Union[Any, Callable[[Any], Any]]]

# Arguments of flora()/scale_by_flora() that fix the state layout or the compiled update: pass
# them as ``static_args`` to ``optax.inject_hyperparams`` (only the learning rate can be injected).
STATIC_ARGS = (
    "b1",
    "b2",
    "tau",
    "seed",
    "kappa",
    "clipping_threshold",
    "multiply_by_parameter_scale",
    "weight_decay",
    "eps",
    "min_dim_size_to_factor",
    "factorized_second_moment",
    "min_parameter_scale",
    "max_aspect_ratio",
    "weight_decay_mask",
)

# Per-leaf fields of the state, in order (each a tree with the structure of the params).
LEAF_FIELDS = ("step", "seed", "exp_avg", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")


class ScaleByFloraState(NamedTuple):
    """State of :func:`scale_by_flora`: arrays only, one tree per field.

    Every field but ``count`` has the structure of the parameters; a leaf that does not use a
    field holds a ``(0,)`` float32 placeholder, so the state has one structure for all leaves.

    Attributes:
      count: int32 scalar, number of ``update`` calls (the step a schedule is evaluated at).
      step: per leaf, int32 scalar: steps the leaf has taken (a skipped non-finite step does
        not count; docs/algorithm.md section 9).
      seed: per leaf, uint32 scalar ``tensor_seed(seed, i)``, ``i`` the leaf's position in
        ``jax.tree_util.tree_leaves(params)``. Projections are regenerated from it.
      exp_avg: per leaf, float32 momentum: compressed ``(tau, n)`` (``m <= n``) or ``(m, tau)``,
        full (the parameter's shape), or a placeholder when ``b1`` is ``None``/0.
      exp_avg_sq_row, exp_avg_sq_col: per leaf, float32 factored second moment ``(m,)`` and
        ``(n,)``, or placeholders.
      exp_avg_sq: per leaf, float32 full second moment (the parameter's shape), or a placeholder.
    """

    count: jax.Array
    step: Any
    seed: Any
    exp_avg: Any
    exp_avg_sq_row: Any
    exp_avg_sq_col: Any
    exp_avg_sq: Any


# optax >= 0.2.4 names it safe_increment; older versions safe_int32_increment.
_safe_increment = getattr(optax, "safe_increment", None) or optax.safe_int32_increment


def _placeholder():
    return jnp.zeros((0,), jnp.float32)


def _validate(
    learning_rate,
    b1,
    b2,
    tau,
    seed,
    kappa,
    clipping_threshold,
    multiply_by_parameter_scale,
    weight_decay,
    eps,
    min_dim_size_to_factor,
    factorized_second_moment,
    min_parameter_scale,
    max_aspect_ratio=4.0,
) -> None:
    """Raise ValueError naming the argument and the bad value, with the rules and messages of
    :mod:`flora_opt.hyperparams` (shared with :class:`flora_opt.Flora`)."""
    if learning_rate is None:
        raise ValueError("Invalid learning_rate: None: pass a float or an optax schedule")
    if not callable(learning_rate):
        if isinstance(learning_rate, (jax.Array, np.ndarray)) and not is_real(learning_rate):
            if np.ndim(learning_rate) != 0:
                raise ValueError(
                    f"Invalid learning_rate: an array learning_rate must be 0-d, got shape {np.shape(learning_rate)}"
                )
            if isinstance(learning_rate, jax.core.Tracer):
                return _validate_rest(locals())  # a traced value (inject_hyperparams under jit)
            if not jnp.issubdtype(learning_rate.dtype, jnp.floating) and not jnp.issubdtype(
                learning_rate.dtype, jnp.integer
            ):
                raise ValueError(f"Invalid learning_rate: {learning_rate!r}: expected a real number")
            check_real("learning_rate", float(learning_rate), at_least=0.0)
        elif is_real(learning_rate):
            check_real("learning_rate", learning_rate, at_least=0.0)
        else:
            raise ValueError(f"Invalid learning_rate: {learning_rate!r}: expected a float or a schedule")
    _validate_rest(locals())


def _validate_rest(args: dict[str, Any]) -> None:
    check_real("b1", args["b1"], at_least=0.0, below=1.0, what="must be in [0, 1)", none="to disable momentum")
    check_real(
        "b2", args["b2"], above=0.0, what="must be a float > 0 (beta2_t = 1 - t^-b2, optax.adafactor's decay_rate)"
    )
    check_int("tau", args["tau"], none="for full momentum")
    check_seed("seed", args["seed"])
    check_int("kappa", args["kappa"])
    check_real("clipping_threshold", args["clipping_threshold"], above=0.0, none="")
    check_real("weight_decay", args["weight_decay"], at_least=0.0, none="")
    check_real("eps", args["eps"], above=0.0)
    check_real("min_parameter_scale", args["min_parameter_scale"], above=0.0)
    check_int("min_dim_size_to_factor", args["min_dim_size_to_factor"])
    check_real("max_aspect_ratio", args["max_aspect_ratio"], at_least=1.0, none="")
    check_bool("multiply_by_parameter_scale", args["multiply_by_parameter_scale"])
    check_bool("factorized_second_moment", args["factorized_second_moment"])


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


def _state_shapes(layout: TensorLayout) -> dict[str, tuple[int, ...]]:
    """The core's state shapes, except that full states keep the parameter's own shape.

    The core views an ``ndim > 2`` tensor as ``(shape[0], -1)``; storing its full momentum and
    second moment in the parameter's shape lets them share the parameter's sharding.
    """
    shapes = layout.state_shapes()
    for key in (EXP_AVG, EXP_AVG_SQ):
        if key in shapes and shapes[key] == layout.work_shape:
            shapes[key] = layout.shape
    return shapes


_FIELD_OF_KEY = {
    EXP_AVG: "exp_avg",
    EXP_AVG_SQ_ROW: "exp_avg_sq_row",
    EXP_AVG_SQ_COL: "exp_avg_sq_col",
    EXP_AVG_SQ: "exp_avg_sq",
}


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


def scale_by_flora(
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
) -> optax.GradientTransformation:
    r"""The Flora step ``Delta_t`` of every leaf (docs/algorithm.md section 8), to be subtracted.

    The learning rate is applied *inside* (the momentum averages ``eta_t U_t``, as in
    ``optax.adafactor(momentum=...)`` and the PyTorch :class:`flora_opt.Flora`), and so is the
    decoupled weight decay ``eta_t * weight_decay * W``. Use :func:`flora` for the complete
    optimizer (this, then ``optax.scale(-1)``).

    Args: see :func:`flora`.

    Returns:
      An ``optax.GradientTransformation`` with state :class:`ScaleByFloraState`. ``update``
      needs ``params`` when ``multiply_by_parameter_scale`` or ``weight_decay`` is on.
    """
    _validate(
        learning_rate,
        b1,
        b2,
        tau,
        seed,
        kappa,
        clipping_threshold,
        multiply_by_parameter_scale,
        weight_decay,
        eps,
        min_dim_size_to_factor,
        factorized_second_moment,
        min_parameter_scale,
        max_aspect_ratio,
    )
    hp = FloraHyperParams(
        lr=None,
        rank=None if tau is None else int(tau),
        kappa=int(kappa),
        eps1=float(eps),
        eps2=float(min_parameter_scale),
        clip_threshold=math.inf if clipping_threshold is None else float(clipping_threshold),
        decay_rate=-float(b2),
        beta1=None if not b1 else float(b1),
        weight_decay=0.0 if weight_decay is None else float(weight_decay),
        scale_parameter=bool(multiply_by_parameter_scale),
        relative_step=False,
        warmup_init=False,
        factorize_second_moment=bool(factorized_second_moment),
        min_dim_size_to_factor=int(min_dim_size_to_factor),
        max_aspect_ratio=None if max_aspect_ratio is None else float(max_aspect_ratio),
    )
    hp_no_decay = dataclasses.replace(hp, weight_decay=0.0)
    needs_params = hp.scale_parameter or hp.weight_decay != 0.0
    ops = get_ops("jax")
    base_seed = int(seed)

    def init_fn(params):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        fields: dict[str, list] = {name: [] for name in LEAF_FIELDS}
        for index, leaf in enumerate(leaves):
            fields["step"].append(jnp.zeros((), jnp.int32))
            fields["seed"].append(jnp.asarray(tensor_seed(base_seed, index), dtype=jnp.uint32))
            shapes = {}
            if _float_dtype(leaf) is not None:
                layout = core.tensor_layout(np.shape(leaf), hp)
                shapes = _state_shapes(layout)
                message = core.unstable_transfer_message(layout, hp)
                if message is not None:
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
            for key, name in _FIELD_OF_KEY.items():
                fields[name].append(jnp.zeros(shapes[key], jnp.float32) if key in shapes else _placeholder())
        return ScaleByFloraState(
            count=jnp.zeros((), jnp.int32),
            **{name: treedef.unflatten(values) for name, values in fields.items()},
        )

    def leaf_update(grad, param, leaf_state: dict[str, Any], leaf_hp: FloraHyperParams, lr):
        dtype = _float_dtype(grad)
        if dtype is None:  # integer / boolean / float0 / non-array leaves: nothing to optimise
            if not hasattr(grad, "dtype") or grad.dtype == jax.dtypes.float0:
                return grad, leaf_state
            return jnp.zeros_like(grad), leaf_state
        grad = jnp.asarray(grad)
        layout = core.tensor_layout(grad.shape, leaf_hp)
        step = leaf_state["step"]
        new_step = step + 1
        if grad.size == 0:
            return jnp.zeros_like(grad), dict(leaf_state, step=new_step)
        work_shape = layout.work_shape
        grad32 = grad.astype(jnp.float32).reshape(work_shape)
        param32 = None if param is None else jnp.asarray(param).astype(jnp.float32).reshape(work_shape)
        core_shapes = layout.state_shapes()
        core_state = {key: leaf_state[_FIELD_OF_KEY[key]].reshape(shape) for key, shape in core_shapes.items()}
        new_core_state, direction, finite = core.flora_update(
            grad32, param32, core_state, new_step, leaf_state["seed"], layout, leaf_hp, ops, lr=lr
        )
        delta = direction.value
        if direction.decay is not None:
            delta = delta + direction.decay * param32
        # Section 9 (core.keep_if_finite): a non-finite step leaves the update at zero and the state unchanged.
        update = core.keep_if_finite(finite, delta, jnp.zeros_like(delta), ops).reshape(grad.shape).astype(dtype)
        new_state = dict(leaf_state)
        new_state["step"] = core.keep_if_finite(finite, new_step, step, ops)
        for key, value in new_core_state.items():
            name = _FIELD_OF_KEY[key]
            old = leaf_state[name]
            new_state[name] = core.keep_if_finite(finite, value.reshape(old.shape).astype(jnp.float32), old, ops)
        return update, new_state

    def update_fn(updates, state: ScaleByFloraState, params=None):
        grads, treedef = jax.tree_util.tree_flatten(updates)
        if params is None:
            if needs_params:
                raise ValueError(
                    "scale_by_flora needs params (update(grads, state, params)) when "
                    "multiply_by_parameter_scale=True or weight_decay > 0"
                )
            param_leaves = [None] * len(grads)
        else:
            try:
                param_leaves = treedef.flatten_up_to(params)
            except (ValueError, TypeError) as error:
                raise ValueError(f"params must have the structure of the gradients: {error}") from error
        try:
            field_leaves = {name: treedef.flatten_up_to(getattr(state, name)) for name in LEAF_FIELDS}
        except (ValueError, TypeError) as error:
            raise ValueError(
                f"the Flora state does not have the structure of the gradients (was it initialised "
                f"with other params?): {error}"
            ) from error
        decay_mask = _resolve_mask(weight_decay_mask, params, treedef, len(grads)) if hp.weight_decay else None
        lr = learning_rate(state.count) if callable(learning_rate) else learning_rate
        out_updates = []
        out_fields: dict[str, list] = {name: [] for name in LEAF_FIELDS}
        for index, (grad, param) in enumerate(zip(grads, param_leaves)):
            leaf_hp = hp if decay_mask is None or decay_mask[index] else hp_no_decay
            leaf_state = {name: field_leaves[name][index] for name in LEAF_FIELDS}
            explicit = _explicit_sharding(grad)
            if explicit is None:
                update, new_leaf_state = leaf_update(grad, param, leaf_state, leaf_hp, lr)
            else:
                # Explicit-axes meshes (jax.make_mesh's default) type every array with its
                # sharding; the math runs with those axes in auto mode and its results keep
                # the shardings of the gradient and of the state they replace.
                out_sharding = (explicit, {name: jax.typeof(v).sharding for name, v in leaf_state.items()})
                update, new_leaf_state = jax.sharding.auto_axes(
                    lambda g, p, st, rate, leaf_hp=leaf_hp: leaf_update(g, p, st, leaf_hp, rate),
                    out_sharding=out_sharding,
                )(grad, param, leaf_state, lr)
            out_updates.append(update)
            for name in LEAF_FIELDS:
                out_fields[name].append(new_leaf_state[name])
        new_state = ScaleByFloraState(
            count=_safe_increment(state.count),
            **{name: treedef.unflatten(values) for name, values in out_fields.items()},
        )
        return treedef.unflatten(out_updates), new_state

    return optax.GradientTransformation(init_fn, update_fn)


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
      ``optax.chain(scale_by_flora(...), optax.scale(-1.0))``.

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
      at zero and its state unchanged; the momentum averages ``eta_t U_t`` and the weight
      decay is scaled by ``eta_t`` (the reference added unscaled weight decay after the step).
    """
    return optax.chain(
        scale_by_flora(
            learning_rate,
            b1=b1,
            b2=b2,
            tau=tau,
            seed=seed,
            kappa=kappa,
            clipping_threshold=clipping_threshold,
            multiply_by_parameter_scale=multiply_by_parameter_scale,
            weight_decay=weight_decay,
            eps=eps,
            min_dim_size_to_factor=min_dim_size_to_factor,
            factorized_second_moment=factorized_second_moment,
            min_parameter_scale=min_parameter_scale,
            weight_decay_mask=weight_decay_mask,
            max_aspect_ratio=max_aspect_ratio,
        ),
        optax.scale(-1.0),
    )


def state_bytes(state) -> int:
    """Bytes of all arrays in an optax state (works on ``jax.eval_shape`` output too)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(state):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total
