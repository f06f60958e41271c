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

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from .. import core
from ..hyperparams import check_int, check_real, check_seed
from ..ops import get_ops
from ..projection import tensor_seed
from .transform import _float_dtype, _placeholder

__all__ = ["CompressedEmaState", "compressed_ema"]


class CompressedEmaState(NamedTuple):
    """Per-leaf step counts (int32), seeds (uint32) and momenta (placeholders where unused)."""

    step: optax.Params
    seed: optax.Params
    exp_avg: optax.Params


def compressed_ema(b1: float = 0.9, tau: int | None = 256, kappa: int = 1000, seed: int = 0,
                   max_aspect_ratio: float | None = 4.0) -> optax.GradientTransformation:
    """Flora's compressed momentum (module docstring), a drop-in for ``optax.ema``.

    Args:
      b1: momentum coefficient ``beta1`` in ``(0, 1)``.
      tau: projection rank ``r`` (``None``: full momentum for every leaf).
      kappa: resample interval (static).
      seed: 32-bit seed; leaf ``i`` (in ``jax.tree_util.tree_leaves`` order) uses
        ``tensor_seed(seed, i)``, as :func:`flora_opt.optax.flora` does.
      max_aspect_ratio: matrices with ``max(m, n) > ratio * min(m, n)`` keep full momentum.
    """
    check_real("b1", b1, above=0.0, below=1.0, what="must be in (0, 1)")
    check_int("tau", tau, none="for full momentum")
    check_int("kappa", kappa)
    check_seed("seed", seed)
    check_real("max_aspect_ratio", max_aspect_ratio, at_least=1.0, none="")
    hp = core.FloraHyperParams(rank=tau, kappa=kappa, beta1=float(b1), max_aspect_ratio=max_aspect_ratio)
    ops = get_ops("jax")

    def init_fn(params):
        leaves, treedef = jax.tree_util.tree_flatten(params)
        steps, seeds, momenta = [], [], []
        for index, leaf in enumerate(leaves):
            steps.append(jnp.zeros((), jnp.int32))
            seeds.append(jnp.asarray(tensor_seed(int(seed), index), dtype=jnp.uint32))
            shape = None
            if _float_dtype(leaf) is not None:
                shape = core.tensor_layout(jnp.shape(leaf), hp).momentum_shape()
            momenta.append(jnp.zeros(shape, jnp.float32) if shape is not None else _placeholder())
        return CompressedEmaState(*(treedef.unflatten(x) for x in (steps, seeds, momenta)))

    def leaf_update(update, step, leaf_seed, momentum):
        dtype = _float_dtype(update)
        if dtype is None or jnp.size(update) == 0:
            return update, step, momentum
        update = jnp.asarray(update)
        layout = core.tensor_layout(update.shape, hp)
        new_step = step + 1
        normalised = update.astype(jnp.float32).reshape(layout.work_shape)
        direction, new_state = core.momentum_direction(
            normalised, momentum.reshape(layout.momentum_shape()), new_step, leaf_seed, layout, hp, ops
        )
        finite = jnp.isfinite(jnp.sum(direction * direction))
        new_momentum = core.keep_if_finite(finite, new_state[core.EXP_AVG], momentum, ops)
        return direction.reshape(update.shape).astype(dtype), core.keep_if_finite(finite, new_step, step, ops), new_momentum

    def update_fn(updates, state: CompressedEmaState, params=None):
        del params
        leaves, treedef = jax.tree_util.tree_flatten(updates)
        steps = treedef.flatten_up_to(state.step)
        seeds = treedef.flatten_up_to(state.seed)
        momenta = treedef.flatten_up_to(state.exp_avg)
        results = [leaf_update(*args) for args in zip(leaves, steps, seeds, momenta)]
        new_updates, new_steps, new_momenta = (treedef.unflatten(list(x)) for x in zip(*results))
        return new_updates, CompressedEmaState(step=new_steps, seed=state.seed, exp_avg=new_momenta)

    return optax.GradientTransformation(init_fn, update_fn)
