r"""``compressed_ema``: Flora's momentum as an optax transformation that can replace ``optax.ema``.

For each leaf, with ``U`` the incoming update (in Flora, the Adafactor-normalised gradient) and
``t`` the leaf's step count (docs/algorithm.md sections 1, 3, 4 and 8,
:func:`flora_opt.core.momentum_direction`):

.. math::
   \text{full momentum (} \tau = \text{None, small or embedding-like leaves):}\quad
     M_t = \beta_1 M_{t-1} + (1-\beta_1) U, \quad D = M_t \\
   \text{compressed:}\quad P = P_k\ (k = \lfloor (t-1)/\kappa \rfloor,\ M \text{ transferred at a resample}),\quad
     s = \|M_{t-1}\|_F / \|P^\top M_{t-1}\|_F \\
   D = (1-\beta_1) U + \beta_1 s P^\top M_{t-1}, \qquad M_t = \beta_1 M_{t-1} + (1-\beta_1) P U

and the transformation outputs ``D``. With ``tau=None`` it is ``optax.ema(b1, debias=False)``
(tested). A leaf whose ``D`` is not finite keeps its state and step count (section 9's rule,
:func:`flora_opt.core.keep_if_finite`) and passes the non-finite ``D`` on, so that a later
stage can zero it. It takes no learning rate, so a chain built with it works with
``optax.inject_hyperparams`` without a list of static arguments.

Example::

    tx = optax.chain(optax.scale_by_factored_rms(), compressed_ema(0.9, tau=32, kappa=1000),
                     optax.clip_by_block_rms(1.0), optax.scale_by_learning_rate(1e-3))
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import core
from ..hyperparams import from_optax
from ..ops import get_ops
from ..projection import tensor_seed
from .transform import (
    _check_arguments,
    _concrete,
    _concrete_record,
    _flatten_state,
    _float_dtype,
    _on_leaf,
    _placeholder,
    _state_shapes,
    _static,
    _traced,
)

__all__ = ["CompressedEmaState", "compressed_ema"]


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
    """Flora's compressed momentum (module docstring), a drop-in for ``optax.ema``.

    Args:
      b1: momentum coefficient ``beta1`` in ``[0, 1)``; ``None`` or 0: no momentum (the updates
        pass through, every momentum is a placeholder).
      tau: projection rank ``r`` (``None``: full momentum for every leaf).
      kappa: resample interval.
      seed: 32-bit seed; leaf ``i`` (in ``jax.tree_util.tree_leaves`` order) uses
        ``tensor_seed(seed, i)``, as :func:`flora_opt.optax.flora` does.
      max_aspect_ratio: matrices with ``max(m, n) > ratio * min(m, n)`` keep full momentum.

    ``tau``, ``seed`` and ``max_aspect_ratio`` are read by ``init`` only (they fix the state);
    ``update`` takes the layout from the state's shapes, so ``b1`` and ``kappa`` may be traced
    arrays there (``optax.inject_hyperparams``).
    """
    arguments = dict(b1=b1, tau=tau, kappa=kappa, seed=seed, max_aspect_ratio=max_aspect_ratio)
    _check_arguments(arguments)
    return _compressed_ema(from_optax(arguments))


def _compressed_ema(hp: core.FloraHyperParams) -> optax.GradientTransformation:
    """:func:`compressed_ema` reading the whole record ``hp`` (what :func:`flora_opt.optax.flora`
    builds): ``init`` lays the state out with :func:`flora_opt.core.tensor_layout`, ``update``
    calls :func:`flora_opt.core.momentum_direction` with ``hp``."""
    ops = get_ops("jax")

    def init_fn(params):
        b1_value = _static("b1", hp.beta1)
        kappa_value = _concrete(hp.kappa)  # only for the stability warning: skipped when traced
        layout_hp = replace(
            _concrete_record(hp),
            rank=_static("tau", hp.rank),
            kappa=1 if _traced(kappa_value) else kappa_value,
            beta1=None if not b1_value else float(b1_value),
            max_aspect_ratio=_static("max_aspect_ratio", hp.max_aspect_ratio),
        )
        base_seed = _static("seed", hp.seed)
        leaves, treedef = jax.tree_util.tree_flatten(params)
        steps, seeds, momenta = [], [], []
        for index, leaf in enumerate(leaves):
            steps.append(jnp.zeros((), jnp.int32))
            seeds.append(jnp.asarray(tensor_seed(base_seed, index), dtype=jnp.uint32))
            shape = None
            if _float_dtype(leaf) is not None:
                layout = core.tensor_layout(jnp.shape(leaf), layout_hp)
                shape = _state_shapes(layout).get(core.EXP_AVG)
                message = None if _traced(kappa_value) else core.unstable_transfer_message(layout, layout_hp)
                if message is not None:
                    warnings.warn(message, RuntimeWarning, stacklevel=3)
            momenta.append(jnp.zeros(shape, jnp.float32) if shape is not None else _placeholder())
        return CompressedEmaState(*(treedef.unflatten(x) for x in (steps, seeds, momenta)))

    def leaf_update(update, leaf_state):
        step, leaf_seed, momentum = leaf_state
        if _float_dtype(update) is None or jnp.size(update) == 0:
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
