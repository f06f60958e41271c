r"""``flora`` and ``scale_by_flora``: the Flora update (docs/algorithm.md section 8) as an ``optax.chain``.

Built the way ``optax.adafactor`` is, with Flora's momentum in place of ``optax.ema``
(``flora_opt/optax/transform.py`` holds the stages):

.. math::
   \begin{aligned}
   &U = G / \sqrt{\hat V_t} &&\text{scale\_by\_second\_moment} \\
   &D = \text{compressed\_ema}(U) &&\text{the momentum combine} \\
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

The chain has the same stages whatever the values of the arguments, and whether they are Python
numbers or the arrays ``optax.inject_hyperparams`` makes of them: with ``b1`` ``None``/0 the
momentum stage keeps placeholders and passes its input through, with ``weight_decay`` 0 the
weight decay stage does nothing; both are there. So the state of ``flora(...)`` and the inner
state of ``optax.inject_hyperparams(flora)(...)`` have one tree. Only the flag
``multiply_by_parameter_scale`` (a Python bool, which ``inject_hyperparams`` keeps as it is) adds
or drops a stage, :func:`scale_by_param_rms`.

The signatures are written out (for type checkers and IDEs); the option record
:class:`flora_opt.hyperparams.FloraHyperParams` holds the defaults and the rules, checks the
arguments and builds the record that the stateful stages read, and
``tests/test_hyperparams.py`` holds the signatures and the ``Args`` below to the record.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from ..hyperparams import check_real, from_optax, is_real
from ._common import check_arguments, traced
from .transform import (
    MaskOrFn,
    add_weight_decay,
    clip_by_rms,
    momentum_stage,
    scale_by_param_rms,
    second_moment_stage,
    zero_non_finite,
)

__all__ = ["flora", "scale_by_flora"]


def _check_learning_rate(learning_rate) -> None:
    """A float, a 0-d real array or a schedule; a concrete number must be finite and >= 0."""
    if learning_rate is None:
        raise ValueError("Invalid learning_rate: None: pass a float or an optax schedule")
    if callable(learning_rate) or traced(learning_rate):
        return
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


def _stages(arguments: Mapping[str, Any]) -> list[optax.GradientTransformation]:
    """The chain's stages up to (not including) the sign flip, from ``flora``'s arguments (by
    optax name), each checked by its rule in the record. The stateful stages read the one record
    :func:`flora_opt.hyperparams.from_optax` builds, so an option of the record reaches the core
    functions they call without being passed by name."""
    _check_learning_rate(arguments["learning_rate"])
    check_arguments({name: value for name, value in arguments.items() if name != "learning_rate"})
    hp = from_optax(arguments)
    stages = [
        second_moment_stage(hp),
        momentum_stage(hp),
        clip_by_rms(hp.clip_threshold),
        add_weight_decay(hp.weight_decay, hp.weight_decay_mask),
        optax.scale_by_learning_rate(hp.lr, flip_sign=False),
    ]
    if hp.scale_parameter:
        stages.append(scale_by_param_rms(hp.eps2))
    return stages


def flora(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | None = 0.9,
    b2: float = 0.8,
    tau: int | None = 256,
    seed: int = 0,
    kappa: int = 1000,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    weight_decay: float | None = 0.0,
    eps: float = 1e-30,
    min_dim_size_to_factor: int = 128,
    factorized_second_moment: bool = True,
    *,
    min_parameter_scale: float = 1e-3,
    weight_decay_mask: MaskOrFn = None,
    max_aspect_ratio: float | None = 4.0,
    projection_dtype: str = "float32",
) -> optax.GradientTransformationExtraArgs:
    r"""Flora: Adafactor whose momentum is compressed by regenerated Gaussian projections.

    For an ``m x n`` weight the momentum costs ``tau * max(m, n)`` floats instead of ``m * n``
    and the second moment ``m + n``; the projections are regenerated from a per-leaf seed kept in
    the state. The same algorithm, and the same projection matrices, as the PyTorch
    :class:`flora_opt.Flora` (docs/algorithm.md; the argument mapping is in docs/jax.md).

    Args:
      learning_rate (required): a float or an optax schedule (evaluated at the number of previous
        updates), multiplied by ``max(min_parameter_scale, RMS(W))`` when
        ``multiply_by_parameter_scale``. PyTorch: ``lr``
      b1 (default 0.9): momentum; ``None`` or ``0`` disables it (then Flora is exactly Adafactor).
        PyTorch: ``beta1``
      b2 (default 0.8): second-moment decay exponent, ``beta2_t = 1 - t^-b2``
        (``optax.adafactor``'s ``decay_rate``). PyTorch: ``decay_rate = -b2``
      tau (default 256): projection rank; a leaf whose smaller matrix dimension is ``<= tau`` keeps
        full momentum; ``None`` keeps full momentum everywhere. PyTorch: ``rank``
      seed (default 0): 32-bit seed of the projections; leaf ``i`` (in
        ``jax.tree_util.tree_leaves`` order) uses ``tensor_seed(seed, i)``
      kappa (default 1000): resample the momentum projection every ``kappa`` steps, carrying the
        momentum over (``M <- P_new P_old^T M``); too small a ``kappa`` amplifies noise at each
        transfer and can diverge (a ``RuntimeWarning`` names the smallest stable value,
        docs/algorithm.md section 4)
      clipping_threshold (default 1.0): update clipping threshold ``d``; ``None`` disables
        clipping. PyTorch: ``clip_threshold``
      multiply_by_parameter_scale (default True): scale the step by
        ``max(min_parameter_scale, RMS(W))``. PyTorch: ``scale_parameter``
      weight_decay (default 0.0): decoupled weight decay ``W <- W - eta_t * weight_decay * W``
        (scaled like the step); ``None`` means 0
      eps (default 1e-30): ``eps1``, added to squared gradients (section 6)
      min_dim_size_to_factor (default 128): factor only matrices whose smaller dimension is at
        least this (as ``optax.adafactor``)
      factorized_second_moment (default True): Adafactor's factored second moment for matrices
        (``False``: a full, Adam-like one). PyTorch: ``factorize_second_moment``
      min_parameter_scale (keyword, default 0.001): ``eps2``, floor of the parameter RMS in the
        step size (section 5). PyTorch: ``eps[1]``
      weight_decay_mask (keyword, default None): a tree of Python bools with the structure of the
        params (or a function of the params returning one); ``False`` leaves get no weight decay
      max_aspect_ratio (keyword, default 4.0): embedding-like matrices
        (``max(m, n) > ratio * min(m, n)``: token embeddings, LM heads) keep full momentum;
        ``None`` compresses them too
      projection_dtype (keyword, default 'float32'): precision of the two ``r x m x n`` products
        of compressed momentum, ``P U`` and ``P^T M``: ``"bfloat16"`` rounds their operands and
        results to bfloat16 (float32 sums; state, statistics and update stay float32), 2-4x
        faster on CPUs with AVX512-BF16 and GPUs

    Returns:
      ``optax.chain(scale_by_second_moment(b2, eps, ...), compressed_ema(b1, tau, kappa, seed, ...),
      clip_by_rms(clipping_threshold), add_weight_decay(weight_decay, weight_decay_mask),
      optax.scale_by_learning_rate(learning_rate, flip_sign=False),
      scale_by_param_rms(min_parameter_scale), optax.scale(-1.0), zero_non_finite())``, without
      the parameter scale when ``multiply_by_parameter_scale=False`` (module docstring). Every
      argument may be injected with ``optax.inject_hyperparams(flora)(learning_rate=...)``, no
      static list needed (``init`` must then run outside ``jax.jit``: it fixes the layout).

    Raises:
      ValueError: an argument breaks its rule; the message names the argument and the value.
      TypeError: an unknown argument.

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
    # Every argument is an option of the record: the record checks them and builds the stages.
    return optax.chain(*_stages(locals()), optax.scale(-1.0), zero_non_finite())


def scale_by_flora(
    learning_rate: optax.ScalarOrSchedule,
    b1: float | None = 0.9,
    b2: float = 0.8,
    tau: int | None = 256,
    seed: int = 0,
    kappa: int = 1000,
    clipping_threshold: float | None = 1.0,
    multiply_by_parameter_scale: bool = True,
    weight_decay: float | None = 0.0,
    eps: float = 1e-30,
    min_dim_size_to_factor: int = 128,
    factorized_second_moment: bool = True,
    *,
    min_parameter_scale: float = 1e-3,
    weight_decay_mask: MaskOrFn = None,
    max_aspect_ratio: float | None = 4.0,
    projection_dtype: str = "float32",
) -> optax.GradientTransformationExtraArgs:
    r"""The Flora step ``Delta_t = eta_t (D_clip + lambda W)`` of every leaf, to be *subtracted*:
    :func:`flora` without its ``optax.scale(-1)``, for chains that flip the sign themselves.

    Args:
      The arguments of :func:`flora`, with the same defaults.
    """
    return optax.chain(*_stages(locals()), zero_non_finite())
