"""Flora for JAX as optax gradient transformations.

* :func:`flora`: the full optimizer (docs/algorithm.md section 8), an ``optax.chain`` of
  :func:`scale_by_second_moment`, :func:`compressed_ema`, :func:`clip_by_rms`,
  :func:`add_weight_decay`, ``optax.scale_by_learning_rate``, :func:`scale_by_param_rms`,
  ``optax.scale(-1)`` and :func:`zero_non_finite`, built like ``optax.adafactor``; its state is a
  tuple of NamedTuples of arrays. Also importable as ``flora_opt.optax_flora``;
  ``optax.inject_hyperparams(flora)(learning_rate=...)`` needs no static arguments.
* :func:`scale_by_flora`: the same chain without the sign flip (emits the step to subtract).
* :func:`compressed_accumulator` and :func:`compressed_multi_steps`: gradient accumulation that
  keeps micro-batch gradients compressed (docs/algorithm.md section 12), as a set of pure
  functions for ``lax.scan``/``fori_loop`` loops, or as an ``optax.MultiSteps``-like wrapper.
  :func:`compressed_accumulator` returns an :class:`AccumulatorFunctions` (formerly
  ``CompressedAccumulator``, a name that collided with the PyTorch
  ``flora_opt.CompressedAccumulator``; the old name still works with a ``DeprecationWarning``).
* :func:`compressed_ema`: Flora's momentum alone, a transformation that can replace
  ``optax.ema`` in a chain (no learning rate, so ``optax.inject_hyperparams`` needs no list).
* :func:`state_shardings`: ``NamedSharding`` s for the state, for ``jax.jit`` out_shardings.

The per-tensor math is that of :mod:`flora_opt.core` (``normalised_update``,
``momentum_direction``, ``keep_if_finite``), shared with the PyTorch optimizer;
see ``docs/jax.md`` for the argument mapping between the two.
"""

import warnings as _warnings

try:
    import jax  # noqa: F401
    import optax  # noqa: F401
except ImportError as _error:  # name the extra, as the README promises
    raise ImportError(
        f"flora_opt.optax needs jax and optax ({_error}); install them with: pip install 'flora-optim[jax]'"
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
from .transform import (
    STATIC_ARGS,
    ScaleBySecondMomentState,
    add_weight_decay,
    clip_by_rms,
    flora,
    scale_by_flora,
    scale_by_param_rms,
    scale_by_second_moment,
    state_bytes,
    zero_non_finite,
)

__all__ = [
    "STATIC_ARGS",
    "AccumulatorFunctions",
    "AccumulatorState",
    "CompressedEmaState",
    "CompressedMultiStepsState",
    "ScaleBySecondMomentState",
    "add_weight_decay",
    "clip_by_rms",
    "compressed_accumulator",
    "compressed_ema",
    "compressed_multi_steps",
    "flora",
    "has_updated",
    "scale_by_flora",
    "scale_by_param_rms",
    "scale_by_second_moment",
    "state_bytes",
    "state_shardings",
    "zero_non_finite",
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
