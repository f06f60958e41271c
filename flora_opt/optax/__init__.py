"""Flora for JAX as optax gradient transformations, laid out as optax is.

* ``alias.py``: :func:`flora`, the full optimizer (docs/algorithm.md section 8), an ``optax.chain``
  of the stages below, built like ``optax.adafactor``; its state is a tuple of NamedTuples of
  arrays. Also importable as ``flora_opt.optax_flora``;
  ``optax.inject_hyperparams(flora)(learning_rate=...)`` needs no static arguments.
  :func:`scale_by_flora`: the same chain without the sign flip (emits the step to subtract).
* ``transform.py``: the stages, each a transformation of its own: :func:`scale_by_second_moment`,
  :func:`compressed_ema` (Flora's momentum alone, a drop-in for ``optax.ema``),
  :func:`clip_by_rms`, :func:`add_weight_decay`, :func:`scale_by_param_rms`,
  :func:`zero_non_finite`.
* ``accumulation.py``: :func:`compressed_accumulator` and :func:`compressed_multi_steps`,
  gradient accumulation that keeps micro-batch gradients compressed (docs/algorithm.md
  section 12), as pure functions for ``lax.scan``/``fori_loop`` loops (an
  :class:`AccumulatorFunctions`), or as an ``optax.MultiSteps``-like wrapper.
* ``sharding.py``: :func:`state_shardings`, ``NamedSharding`` s for the state, for ``jax.jit``
  out_shardings.
* :func:`state_bytes`: the bytes of a state.

The per-tensor math is that of :mod:`flora_opt.core` (``normalised_update``,
``momentum_direction``, ``keep_if_finite``), shared with the PyTorch optimizer;
see ``docs/jax.md`` for the argument mapping between the two.
"""

try:
    import jax  # noqa: F401
    import optax  # noqa: F401
except ImportError as _error:  # name the extra, as the README promises
    raise ImportError(
        f"flora_opt.optax needs jax and optax ({_error}); install them with: pip install 'flora-optim[jax]'"
    ) from _error

from ._common import state_bytes
from .accumulation import (
    AccumulatorFunctions,
    AccumulatorState,
    CompressedMultiStepsState,
    compressed_accumulator,
    compressed_multi_steps,
    has_updated,
)
from .alias import flora, scale_by_flora
from .sharding import state_shardings
from .transform import (
    CompressedEmaState,
    ScaleBySecondMomentState,
    add_weight_decay,
    clip_by_rms,
    compressed_ema,
    scale_by_param_rms,
    scale_by_second_moment,
    zero_non_finite,
)

__all__ = [
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
