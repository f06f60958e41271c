"""Shardings of Flora optax states, derived from the parameters' shardings.

``jax.jit(tx.init)`` creates the state from zeros, which carry no sharding of their own: without
``out_shardings`` XLA replicates them. :func:`state_shardings` gives every state leaf the
sharding that matches its parameter (docs/jax.md, "Sharding"), decided by the state's key in
the layout (which field of the state it is), never guessed from its shape:

=========================================  ==============================================
state leaf (parameter ``(m, ...)``, spec    sharding
``P(a0, a1, ...)``)
=========================================  ==============================================
full momentum / full second moment         the parameter's
compressed momentum ``(tau, n)`` (rows)    ``P(None, a1)``
compressed momentum ``(m, tau)`` (cols)    ``P(a0, None)``
factored row statistic ``(m,)``            ``P(a0)``
factored column statistic ``(n,)``         ``P(a1)`` (replicated if a later dim is sharded)
full state in the ``(m, n)`` matrix view    ``P(a0, a1)`` (``a1`` as for the column statistic)
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
from .transform import CompressedEmaState, ScaleBySecondMomentState

__all__ = ["state_shardings"]


def _spec(sharding: NamedSharding, ndim: int) -> tuple:
    spec = tuple(sharding.spec)
    return spec + (None,) * (ndim - len(spec))


def _replicated(sharding):
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec())
    return sharding


#: Which field of Flora's stage states holds which state key of the layout (docs/algorithm.md,
#: section 1); the other fields (``step``, ``seed``) are per-leaf integers, replicated.
_FIELD_KEYS = {
    "exp_avg": core.EXP_AVG,
    "exp_avg_sq_row": core.EXP_AVG_SQ_ROW,
    "exp_avg_sq_col": core.EXP_AVG_SQ_COL,
    "exp_avg_sq": core.EXP_AVG_SQ,
}
_FLORA_STATES = (ScaleBySecondMomentState, CompressedEmaState)
#: The accumulation buffer has the momentum's rule: full, or compressed on one side.
_BUFFER_KEY = core.EXP_AVG


def _key_spec(key: str | None, state_shape: tuple, param_shape: tuple, spec: tuple) -> tuple | None:
    """The partition spec of the state ``key`` of ``state_shape`` kept for a parameter of
    ``param_shape`` with the (padded) spec ``spec``; ``None``: replicated.

    The key, not the shape, says which axis a statistic follows, so a square parameter sharded
    on both axes gets its row statistic along the first axis and its column statistic along the
    second. The parameter is viewed as the matrix ``(m, n) = (shape[0], prod(shape[1:]))``: its
    rows follow ``spec[0]``; its columns follow ``spec[1]`` only when no later axis is sharded.
    """
    if key is None or len(state_shape) == 0 or 0 in state_shape:
        return None  # counters, seeds, placeholders
    if state_shape == param_shape:
        return spec  # full momentum / full second moment / plain buffer of the parameter's shape
    matrix = core.matrix_view(param_shape)
    if matrix is None:
        return None
    m, n = matrix
    row_axis = spec[0]
    col_axis = spec[1] if all(axis is None for axis in spec[2:]) else None
    if key == core.EXP_AVG_SQ_ROW:
        return (row_axis,)
    if key == core.EXP_AVG_SQ_COL:
        return (col_axis,)
    if key in (core.EXP_AVG, core.EXP_AVG_SQ):
        if state_shape == (m, n):  # full state in the matrix view of a >2-D parameter
            return (row_axis, col_axis)
        if key == core.EXP_AVG and len(state_shape) == 2:
            # compressed: the uncompressed side keeps its spec, the rank side is replicated.
            # (tau, n) and (m, tau) with tau < min(m, n) cannot be confused, even when m == n.
            if state_shape[1] == n and state_shape[0] < m:  # SIDE_ROWS
                return (None, col_axis)
            if state_shape[0] == m and state_shape[1] < n:  # SIDE_COLS
                return (row_axis, None)
    raise ValueError(
        f"state_shardings: state {key!r} of shape {state_shape} does not fit a parameter of shape {param_shape}"
    )


def _leaf_sharding(key: str | None, state_shape: tuple, param_shape: tuple, sharding) -> Any:
    """The sharding of the state ``key`` (a layout key, ``None`` for counters and seeds) of
    ``state_shape`` kept for a ``param_shape`` leaf sharded as ``sharding``."""
    if not isinstance(sharding, NamedSharding):
        return sharding
    padded = _spec(sharding, len(param_shape))
    spec = _key_spec(key, tuple(state_shape), tuple(param_shape), padded)
    if spec is None:
        return NamedSharding(sharding.mesh, PartitionSpec())
    if spec == padded:
        return sharding
    return NamedSharding(sharding.mesh, PartitionSpec(*spec))


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

    def per_leaf(tree, key: str | None):
        leaves = treedef.flatten_up_to(tree)
        return treedef.unflatten(
            [
                _leaf_sharding(key, np.shape(value), shape, sh)
                for value, shape, sh in zip(leaves, shapes, sharding_leaves, strict=True)
            ]
        )

    def is_node(node) -> bool:
        if isinstance(node, (*_FLORA_STATES, AccumulatorState)):
            return True
        return _params_like(node)

    def _params_like(node) -> bool:
        if not param_leaves or jax.tree_util.tree_structure(node) != treedef:
            return False
        return all(tuple(np.shape(a)) == s for a, s in zip(jax.tree_util.tree_leaves(node), shapes, strict=True))

    def convert(node):
        if isinstance(node, _FLORA_STATES):
            return type(node)(
                **{name: per_leaf(value, _FIELD_KEYS.get(name)) for name, value in node._asdict().items()}
            )
        if isinstance(node, AccumulatorState):
            return AccumulatorState(
                cycle=_replicated(any_sharding),
                seed=per_leaf(node.seed, None),
                buffer=per_leaf(node.buffer, _BUFFER_KEY),
                basis=per_leaf(node.basis, None),  # (min(m, n), tau): small, replicated
            )
        if _params_like(node):
            return per_leaf(node, _BUFFER_KEY)  # shapes equal the parameters': their shardings
        return _replicated(any_sharding)

    return jax.tree.map(convert, state, is_leaf=is_node)
