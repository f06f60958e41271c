"""Flora for JAX as optax gradient transformations.

* :func:`scale_by_flora`: the Flora update of docs/algorithm.md as a ``GradientTransformation``
  whose state (:class:`ScaleByFloraState`) is a NamedTuple of arrays only.
* :func:`flora`: the full optimizer, ``optax.chain(scale_by_flora(...), optax.scale(-1))``;
  also importable as ``flora_opt.optax_flora``.
* :func:`compressed_accumulator` and :func:`compressed_multi_steps`: gradient accumulation that
  keeps micro-batch gradients compressed (docs/algorithm.md section 12), as a set of pure
  functions for ``lax.scan``/``fori_loop`` loops, or as an ``optax.MultiSteps``-like wrapper.
  :func:`compressed_accumulator` returns an :class:`AccumulatorFunctions` (formerly
  ``CompressedAccumulator``, a name that collided with the PyTorch
  ``flora_opt.CompressedAccumulator``; the old name still works with a ``DeprecationWarning``).
* :func:`compressed_ema`: Flora's momentum alone, a transformation that can replace
  ``optax.ema`` in a chain (no learning rate, so ``optax.inject_hyperparams`` needs no list).
* :func:`state_shardings`: ``NamedSharding`` s for the state, for ``jax.jit`` out_shardings.

The per-tensor math is :func:`flora_opt.core.flora_update`, shared with the PyTorch optimizer;
see ``docs/jax.md`` for the argument mapping between the two.
"""

import warnings as _warnings

try:
    import jax  # noqa: F401
    import optax  # noqa: F401
except ImportError as _error:  # name the extra, as the README promises
    raise ImportError(
        f"flora_opt.optax needs jax and optax ({_error}); install them with: pip install 'flora-opt[jax]'"
    ) from _error

from .accumulation import (
    AccumulatorFunctions,
    AccumulatorState,
    CompressedMultiStepsState,
    compressed_accumulator,
    compressed_multi_steps,
    has_updated,
)
from .ema import CompressedEmaState, compressed_ema
from .sharding import state_shardings
from .transform import STATIC_ARGS, ScaleByFloraState, flora, scale_by_flora, state_bytes

__all__ = [
    "STATIC_ARGS",
    "AccumulatorFunctions",
    "AccumulatorState",
    "CompressedEmaState",
    "CompressedMultiStepsState",
    "ScaleByFloraState",
    "compressed_accumulator",
    "compressed_ema",
    "compressed_multi_steps",
    "flora",
    "has_updated",
    "scale_by_flora",
    "state_bytes",
    "state_shardings",
]


def __getattr__(name: str):
    if name == "CompressedAccumulator":  # deprecated alias (docs/jax.md, "Names")
        _warnings.warn(
            "flora_opt.optax.CompressedAccumulator is deprecated: use flora_opt.optax.AccumulatorFunctions "
            "(flora_opt.CompressedAccumulator is the PyTorch accumulator)",
            DeprecationWarning,
            stacklevel=2,
        )
        return AccumulatorFunctions
    raise AttributeError(f"module 'flora_opt.optax' has no attribute {name!r}")
