"""What the modules of ``flora_opt.optax`` share: reading arguments that may be arrays, leaf dtypes,
placeholders, and the bytes of a state.

``optax.inject_hyperparams`` hands every numeric argument to the factory as an array: a concrete
one when ``init`` runs eagerly, a tracer inside a jitted ``update``. The arguments that fix the
state layout must be concrete where ``init`` reads them (:func:`static_value`); the others enter
the math as numbers or tracers alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import fields, replace
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ..hyperparams import FloraHyperParams, check_optax, optax_flags

__all__ = [
    "check_arguments",
    "concrete",
    "concrete_record",
    "float_dtype",
    "placeholder",
    "state_bytes",
    "static_value",
    "traced",
]


def placeholder() -> jax.Array:
    """The ``(0,)`` float32 array that stands for an unused state field (no bytes, one tree structure)."""
    return jnp.zeros((0,), jnp.float32)


def traced(value) -> bool:
    return isinstance(value, jax.core.Tracer)


def concrete(value):
    """A concrete 0-d array (what ``inject_hyperparams`` passes to ``init``) as a Python number;
    tracers, Python values and everything else unchanged."""
    if isinstance(value, (jax.Array, np.ndarray, np.generic)) and not traced(value) and np.ndim(value) == 0:
        dtype = np.dtype(value.dtype)
        if dtype == np.bool_:
            return bool(value)
        if np.issubdtype(dtype, np.integer):
            return int(value)
        if np.issubdtype(dtype, np.floating):
            return float(value)
    return value


def static_value(name: str, value):
    """The Python value of an argument that fixes the state layout (only ``init`` reads these)."""
    value = concrete(value)
    if traced(value):
        raise ValueError(
            f"Invalid {name}: a traced value: it fixes the state layout, so init needs it concrete "
            "(call tx.init outside jax.jit/eval_shape, or list it in inject_hyperparams' static_args)"
        )
    return value


def concrete_record(hp: FloraHyperParams) -> FloraHyperParams:
    """``hp`` with its concrete 0-d arrays as Python numbers (what ``init`` reads the layout from)."""
    return replace(hp, **{f.name: concrete(getattr(hp, f.name)) for f in fields(hp)})


def check_arguments(arguments: Mapping[str, Any]) -> None:
    """Each optax argument by its rule in the record (:func:`flora_opt.hyperparams.check_optax`,
    the rules :class:`flora_opt.Flora` applies under the torch names). Concrete 0-d arrays are
    checked as Python numbers; traced values (under ``inject_hyperparams``, inside a jitted
    ``update``) were checked when ``init`` ran."""
    flags = optax_flags()
    for name, value in arguments.items():
        if isinstance(value, (jax.Array, np.ndarray)) and not traced(value) and np.ndim(value) == 0:
            if np.dtype(value.dtype) == np.bool_ and name not in flags:
                check_optax(name, value)  # a boolean array is refused with the value named
                continue
            value = concrete(value)
        if not traced(value):
            check_optax(name, value)


def float_dtype(value):
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


def state_bytes(state) -> int:
    """Bytes of all arrays in an optax state (works on ``jax.eval_shape`` output too)."""
    total = 0
    for leaf in jax.tree_util.tree_leaves(state):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            total += int(np.prod(leaf.shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
    return total
