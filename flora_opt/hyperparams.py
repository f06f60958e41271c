"""One home for Flora's option defaults, their validation and the torch -> optax name table.

Every framework layer validates through these functions, so an option has one rule and one
message: :class:`flora_opt.Flora` (param groups, :func:`validate_group`), the optax
transformations (:mod:`flora_opt.optax.transform`), :class:`flora_opt.CompressedAccumulator` and
:class:`flora_opt.FloraAccelerator`. Messages follow ``torch.optim``: they name the argument and
the bad value (``Invalid rank: 0: must be an int >= 1, ...``).

Numbers: any real number that is not a bool is accepted where a float is expected (Python,
NumPy and 0-d torch scalars alike), any integral number that is not a bool where an int is; they
are stored as plain Python ``int``/``float`` (:func:`normalize_group`), so checkpoints hold
plain values only. This module imports neither torch nor jax.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

__all__ = [
    "DEFAULTS",
    "OPTAX_NAMES",
    "check_bool",
    "check_int",
    "check_real",
    "check_seed",
    "is_int",
    "is_real",
    "normalize_group",
    "validate_group",
]

# Options of a torch param group (flora_opt.Flora), with their defaults.
DEFAULTS: dict[str, Any] = dict(
    lr=None,
    rank=256,
    kappa=1000,
    eps=(1e-30, 1e-3),
    clip_threshold=1.0,
    decay_rate=-0.8,
    beta1=0.9,
    weight_decay=0.0,
    scale_parameter=True,
    relative_step=False,
    warmup_init=False,
    factorize_second_moment=True,
    min_dim_size_to_factor=128,
    max_aspect_ratio=4.0,
    seed=0,
    quantization=False,
    foreach=None,
)

# torch option -> optax argument of flora_opt.optax.flora (docs/jax.md). ``decay_rate = -b2``;
# ``eps`` is ``(eps, min_parameter_scale)``; torch-only options map to None.
OPTAX_NAMES: dict[str, str | tuple[str, str] | None] = dict(
    lr="learning_rate",
    rank="tau",
    kappa="kappa",
    eps=("eps", "min_parameter_scale"),
    clip_threshold="clipping_threshold",
    decay_rate="b2",
    beta1="b1",
    weight_decay="weight_decay",
    scale_parameter="multiply_by_parameter_scale",
    relative_step=None,
    warmup_init=None,
    factorize_second_moment="factorized_second_moment",
    min_dim_size_to_factor="min_dim_size_to_factor",
    max_aspect_ratio="max_aspect_ratio",
    seed="seed",
    quantization=None,
    foreach=None,
)

_FLAGS = ("scale_parameter", "relative_step", "warmup_init", "factorize_second_moment", "quantization")


def is_int(value) -> bool:
    """An integral number that is not a bool (``int``, ``numpy.int64``, ...)."""
    return isinstance(value, numbers.Integral) and not _is_bool(value)


def is_real(value) -> bool:
    """A real number that is not a bool (``int``, ``float``, ``numpy.float32``, ...)."""
    return isinstance(value, numbers.Real) and not _is_bool(value)


def _is_bool(value) -> bool:
    return isinstance(value, bool) or type(value).__name__ in ("bool_", "bool")  # numpy.bool_


def _plain(value):
    """NumPy scalars as Python ``int``/``float`` (bools and everything else unchanged)."""
    if _is_bool(value):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and type(value) is not float:  # numpy.float64 subclasses float
        return float(value)
    return value


def check_int(name: str, value, minimum: int = 1, none: str | None = None) -> None:
    """``value`` is an int ``>= minimum`` (or None when ``none`` says what None means)."""
    if value is None and none is not None:
        return
    if not is_int(value) or value < minimum:
        tail = "" if none is None else (f", or None {none}" if none else ", or None")
        raise ValueError(f"Invalid {name}: {value!r}: must be an int >= {minimum}{tail}")


def check_real(
    name: str,
    value,
    *,
    above: float | None = None,
    at_least: float | None = None,
    below: float | None = None,
    none: str | None = None,
    what: str | None = None,
) -> None:
    """``value`` is a finite real number in the given bounds (or None when ``none`` is set)."""
    if value is None and none is not None:
        return
    ok = is_real(value) and math.isfinite(float(value))
    if ok:
        x = float(value)
        ok = (above is None or x > above) and (at_least is None or x >= at_least) and (below is None or x < below)
    if not ok:
        if what is None:
            bounds = [f"> {above:g}" if above is not None else "", f">= {at_least:g}" if at_least is not None else "",
                      f"< {below:g}" if below is not None else ""]
            what = "must be a finite float " + " and ".join(b for b in bounds if b)
        tail = "" if none is None else (f", or None {none}" if none else ", or None")
        raise ValueError(f"Invalid {name}: {value!r}: {what}{tail}")


def check_bool(name: str, value) -> None:
    if not _is_bool(value):
        raise ValueError(f"Invalid {name}: {value!r}: must be a bool")


def check_seed(name: str, value) -> None:
    if not is_int(value) or not 0 <= value < 2**32:
        raise ValueError(f"Invalid {name}: {value!r}: must be an int in [0, 2**32)")


def _check_lr(lr, relative_step: bool) -> None:
    if relative_step:
        if lr is not None:
            raise ValueError(
                f"Invalid lr: {lr!r}: lr must be None when relative_step=True "
                "(the step size is then min(1e-2, 1/sqrt(t)), scaled by the parameter RMS)"
            )
        return
    if lr is None:
        raise ValueError("Invalid lr: None: pass a learning rate, or set relative_step=True")
    if hasattr(lr, "numel") and hasattr(lr, "item"):  # a torch tensor (e.g. for torch.compile)
        if lr.numel() != 1:
            raise ValueError(f"Invalid lr: a tensor lr must have one element, got shape {tuple(lr.shape)}")
        if lr.is_floating_point() or lr.dtype.is_signed:
            value = float(lr) if lr.device.type != "meta" else 0.0
        else:
            raise ValueError(f"Invalid lr: {lr!r}: expected a real number")
    elif is_real(lr):
        value = float(lr)
    else:
        raise ValueError(f"Invalid lr: {lr!r}: expected a float")
    if not value >= 0.0 or math.isinf(value):
        raise ValueError(f"Invalid lr: {lr!r}: must be a finite float >= 0")


def validate_group(options: dict[str, Any]) -> None:
    """Validate one torch param group's options (all of :data:`DEFAULTS` present).

    Raises ``ValueError`` naming the argument and the bad value; changes nothing.
    """
    _check_lr(options["lr"], options["relative_step"])
    for flag in _FLAGS:
        check_bool(flag, options[flag])
    if options["warmup_init"] and not options["relative_step"]:
        raise ValueError("Invalid warmup_init: True requires relative_step=True")
    check_int("rank", options["rank"], none="for full momentum")
    check_int("kappa", options["kappa"])
    eps = options["eps"]
    if not isinstance(eps, (tuple, list)) or len(eps) != 2 or not all(is_real(e) for e in eps):
        raise ValueError(f"Invalid eps: {eps!r}: expected a pair (eps1, eps2) of positive floats")
    for index, value in enumerate(eps):
        if not value > 0.0 or math.isinf(value):
            raise ValueError(f"Invalid eps value at index {index}: {value!r}: must be a finite float > 0")
    check_real("clip_threshold", options["clip_threshold"], above=0.0)
    check_real(
        "decay_rate", options["decay_rate"], below=0.0, what="must be a finite float < 0 (beta2_t = 1 - t^decay_rate)"
    )
    check_real("beta1", options["beta1"], at_least=0.0, below=1.0, what="must be in [0, 1)", none="to disable momentum")
    check_real("weight_decay", options["weight_decay"], at_least=0.0)
    check_int("min_dim_size_to_factor", options["min_dim_size_to_factor"])
    check_real("max_aspect_ratio", options["max_aspect_ratio"], at_least=1.0, none="")
    check_seed("seed", options["seed"])
    if options.get("foreach") is not None:
        check_bool("foreach", options["foreach"])


def normalize_group(group: dict[str, Any]) -> None:
    """In place: NumPy scalars become Python numbers, ``eps`` a tuple (after validation)."""
    for key in DEFAULTS:
        if key == "eps":
            group[key] = tuple(_plain(e) for e in group[key])
        elif key in group:
            group[key] = _plain(group[key])
