"""Shardings of Flora optax states, derived from the parameters' shardings.

``jax.jit(tx.init)`` creates the state from zeros, which carry no sharding of their own: without
``out_shardings`` XLA replicates them. :func:`state_shardings` gives every state leaf the
sharding that matches its parameter (docs/jax.md, "Sharding"):

=========================================  ==============================================
state leaf (parameter ``(m, ...)``, spec    sharding
``P(a0, a1, ...)``)
=========================================  ==============================================
full momentum / full second moment         the parameter's
compressed momentum ``(tau, n)`` (rows)    ``P(None, a1)``
compressed momentum ``(m, tau)`` (cols)    ``P(a0, None)``
factored row statistic ``(m,)``            ``P(a0)``
factored column statistic ``(n,)``         ``P(a1)`` (replicated if a later dim is sharded)
accumulation buffers                       as the momentum of the same shape
counters, seeds, placeholders              replicated
=========================================  ==============================================

Other optax states found in the tree (e.g. ``optax.MultiSteps`` accumulators) get the
parameters' shardings where a subtree has the parameters' structure and shapes, and are
replicated elsewhere.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from .. import core
from .accumulation import AccumulatorState
from .transform import LEAF_FIELDS, ScaleByFloraState

__all__ = ["state_shardings"]


def _spec(sharding: NamedSharding, ndim: int) -> tuple:
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _replicated(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return sharding


def _leaf_sharding(state_shape: tuple, param_shape: tuple, sharding) -> Any:
    """The sharding of one state array of ``state_shape`` kept for a ``param_shape`` leaf."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    replicated = NamedSharding(sharding.mesh, PartitionSpec())
    state_shape, param_shape = tuple(state_shape), tuple(param_shape)
    if len(state_shape) == 0 or 0 in state_shape:
        return replicated
    if state_shape == param_shape:
        return sharding
    matrix = core.matrix_view(param_shape)
    if matrix is None:
        return replicated
    m, n = matrix
    spec = _spec(sharding, len(param_shape))
    row_axis = spec[0]
    col_axis = spec[1] if all(axis is None for axis in spec[2:]) else None
    if state_shape == (m,):
        return NamedSharding(sharding.mesh, PartitionSpec(row_axis))
    if state_shape == (n,):
        return NamedSharding(sharding.mesh, PartitionSpec(col_axis))
    if len(state_shape) == 2 and state_shape[1] == n and state_shape[0] < m:  # (tau, n), rows side
        return NamedSharding(sharding.mesh, PartitionSpec(None, col_axis))
    if len(state_shape) == 2 and state_shape[0] == m and state_shape[1] < n:  # (m, tau), cols side
        return NamedSharding(sharding.mesh, PartitionSpec(row_axis, None))
    return replicated


def state_shardings(state, params, param_shardings):
    """Shardings for every leaf of an optax state containing Flora states.

    Args:
      state: the optimizer state, or its abstract version ``jax.eval_shape(tx.init, params)``.
      params: the parameters (arrays or ``jax.ShapeDtypeStruct`` s).
      param_shardings: a tree of shardings with the structure of ``params``
        (``NamedSharding`` for the mesh-aware rules; other shardings are used as they are).

    Returns:
      A tree with the structure of ``state`` whose leaves are shardings, for ``jax.jit``'s
      ``out_shardings``/``in_shardings`` or ``jax.device_put``.

    Example::

        param_sh = jax.tree.map(lambda p: p.sharding, params)
        abstract = jax.eval_shape(tx.init, params)
        opt_sh = flora_opt.optax.state_shardings(abstract, params, param_sh)
        opt_state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        train_step = jax.jit(train_step, out_shardings=(param_sh, opt_sh))
    """
    param_leaves, treedef = jax.tree_util.tree_flatten(params)
    sharding_leaves = treedef.flatten_up_to(param_shardings)
    shapes = [tuple(np.shape(leaf)) for leaf in param_leaves]
    any_sharding = sharding_leaves[0] if sharding_leaves else None

    def per_leaf(tree):
        leaves = treedef.flatten_up_to(tree)
        return treedef.unflatten(
            [_leaf_sharding(np.shape(value), shape, sh) for value, shape, sh in zip(leaves, shapes, sharding_leaves)]
        )

    def is_node(node) -> bool:
        if isinstance(node, (ScaleByFloraState, AccumulatorState)):
            return True
        return _params_like(node)

    def _params_like(node) -> bool:
        if not param_leaves or jax.tree_util.tree_structure(node) != treedef:
            return False
        return all(tuple(np.shape(a)) == s for a, s in zip(jax.tree_util.tree_leaves(node), shapes))

    def convert(node):
        if isinstance(node, ScaleByFloraState):
            fields = {name: per_leaf(getattr(node, name)) for name in LEAF_FIELDS}
            return ScaleByFloraState(count=_replicated(any_sharding), **fields)
        if isinstance(node, AccumulatorState):
            return AccumulatorState(
                cycle=_replicated(any_sharding), seed=per_leaf(node.seed), buffer=per_leaf(node.buffer)
            )
        if _params_like(node):
            return per_leaf(node)
        return _replicated(any_sharding)

    return jax.tree.map(convert, state, is_leaf=is_node)
