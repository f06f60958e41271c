"""The hyperparameter record: every Flora option, once, with its default, rule, names and doc line.

:class:`FloraHyperParams` is the one place an option is written. Each field carries, besides its
default, an :class:`Option`: the validation rule, the name of the torch param-group key
(``flora_opt.Flora``), the name of the optax argument (``flora_opt.optax.flora``), whether it
decides the state layout, and the doc line. Everything else is derived from it:

* torch: :data:`DEFAULTS` (``Flora.defaults``), :func:`validate_group`, :func:`from_group`
  (param group -> record, the record that :func:`flora_opt.core.flora_update` and the grouped
  engine read), :data:`LAYOUT_OPTIONS` (what a checkpoint must agree on);
* optax: the validation of ``flora``/``scale_by_flora``'s arguments (:func:`check_optax`) and
  the record the stages read (:func:`from_optax`); :data:`OPTAX_NAMES` maps torch names to optax
  names;
* the option tables of README.md and docs/jax.md (``tools/option_docs.py`` writes them).

The signatures of ``Flora`` and ``flora``/``scale_by_flora`` and their ``Args`` are written out
in ``optim.py`` and ``optax/alias.py``, with types, for type checkers and IDEs;
``tools/option_docs.py`` derives from the record what they must say (names, order, kinds,
defaults, doc lines), and ``tests/test_hyperparams.py`` fails when they, or the tables, differ.

Messages follow ``torch.optim``: they name the argument and the bad value (``Invalid rank: 0: must
be an int >= 1, ...``); the optax side names its own argument (``Invalid tau: 0: ...``).

Numbers: any real number that is not a bool is accepted where a float is expected (Python,
NumPy and 0-d torch scalars alike), any integral number that is not a bool where an int is; they
are stored as plain Python ``int``/``float`` (:func:`normalize_group`), so checkpoints hold
plain values only. This module imports neither torch nor jax.
"""

from __future__ import annotations

import functools
import inspect
import math
import numbers
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "DEFAULTS",
    "LAYOUT_OPTIONS",
    "OPTAX_NAMES",
    "REQUIRED",
    "Entry",
    "FloraHyperParams",
    "Option",
    "check_bool",
    "check_int",
    "check_optax",
    "check_real",
    "check_seed",
    "from_group",
    "from_optax",
    "is_int",
    "is_real",
    "normalize_group",
    "optax_flags",
    "option",
    "options",
    "validate_group",
]


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
            bounds = [
                f"> {above:g}" if above is not None else "",
                f">= {at_least:g}" if at_least is not None else "",
                f"< {below:g}" if below is not None else "",
            ]
            what = "must be a finite float " + " and ".join(b for b in bounds if b)
        tail = "" if none is None else (f", or None {none}" if none else ", or None")
        raise ValueError(f"Invalid {name}: {value!r}: {what}{tail}")


def check_bool(name: str, value) -> None:
    if not _is_bool(value):
        raise ValueError(f"Invalid {name}: {value!r}: must be a bool")


def check_seed(name: str, value) -> None:
    if not is_int(value) or not 0 <= value < 2**32:
        raise ValueError(f"Invalid {name}: {value!r}: must be an int in [0, 2**32)")


def check_choice(name: str, value, allowed) -> None:
    if not isinstance(value, str) or value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r}: must be one of {', '.join(map(repr, allowed))}")


def _check_lr(lr, relative_step: bool, optional: bool = False) -> None:
    if relative_step:
        if lr is not None:
            raise ValueError(
                f"Invalid lr: {lr!r}: lr must be None when relative_step=True "
                "(the step size is then min(1e-2, 1/sqrt(t)), scaled by the parameter RMS)"
            )
        return
    if lr is None:
        if optional:
            return
        raise ValueError(
            "Invalid lr: None: pass a learning rate (to the optimizer, or in every param group), "
            "or set relative_step=True"
        )
    if hasattr(lr, "numel") and hasattr(lr, "item"):  # a torch tensor (e.g. for torch.compile)
        if lr.numel() != 1:  # torch.optim's words, which its tests match
            raise ValueError(f"Invalid lr: Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
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


# ---- rules, as functions of (name, value) ---------------------------------------------------


def _int(minimum: int = 1, none: str | None = None) -> Callable[[str, Any], None]:
    return lambda name, value: check_int(name, value, minimum, none)


def _real(**bounds) -> Callable[[str, Any], None]:
    return lambda name, value: check_real(name, value, **bounds)


def _bool_or_none(name: str, value) -> None:
    if value is not None:
        check_bool(name, value)


def _float_or_none(value):
    return None if value is None else float(value)


def _off_if_zero(value):
    """``beta1``: ``None`` and ``0`` both mean no momentum; the record holds ``None`` then."""
    return None if not value else float(value)


def _choice(*allowed: str) -> Callable[[str, Any], None]:
    def check(name: str, value) -> None:
        check_choice(name, value, allowed)

    return check


def _momentum_on(value) -> bool:
    return bool(value)


def _same(value):
    return value


# ---- the record -----------------------------------------------------------------------------

#: The optax default of an argument that has none (``learning_rate``), as ``inspect`` writes it.
REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Option:
    """How one field of :class:`FloraHyperParams` is named, checked and documented.

    Attributes:
      doc: one line (Markdown) for the tables and the docstrings.
      check: ``check(name, value)`` raises ``ValueError("Invalid {name}: {value!r}: ...")``;
        ``None`` when a wider rule checks it (``lr``: with ``relative_step``; a mask: with the
        params).
      torch: the param-group key; ``(key, index)`` for an element of a tuple option (``eps``);
        ``None``: not a torch option; ``True``: the field's name.
      optax: the argument of ``flora_opt.optax.flora``; ``None``: not an optax option; ``True``:
        the field's name.
      optax_position: position among ``flora``'s positional arguments; ``None``: keyword-only
        (every option added after the first twelve, so no position ever shifts).
      optax_check: the optax rule, where it differs from ``check`` (``None`` allowed, ``b2 > 0``).
      optax_negated: the optax value is minus the record's (``b2 = -decay_rate``).
      optax_doc: the optax doc line, where it differs from ``doc``.
      required: the option must be given (``lr``; torch takes ``None`` only with
        ``relative_step``): the docs say "required", and optax's signature has no default.
      convert: torch param-group value -> record value (``float``, ``None`` for 0, ...).
      layout: ``None``, or what of the value decides the state layout (``beta1``: only whether
        momentum is on); a checkpoint must agree with the optimizer on it.
      reference: how ``flora-opt==0.0.3`` differs (README table).
      note: the note of docs/jax.md's torch <-> optax table.
    """

    doc: str
    check: Callable[[str, Any], None] | None
    torch: str | tuple[str, int] | bool | None = True
    optax: str | bool | None = True
    optax_position: int | None = None
    optax_check: Callable[[str, Any], None] | None = None
    optax_negated: bool = False
    optax_doc: str | None = None
    required: bool = False
    convert: Callable[[Any], Any] = _same
    layout: Callable[[Any], Any] | None = None
    reference: str = ""
    note: str = ""


def option(default, doc: str, check: Callable[[str, Any], None] | None, **meta) -> Any:
    """A field of :class:`FloraHyperParams`: its default and its :class:`Option` (``meta``)."""
    return field(default=default, metadata={"option": Option(doc, check, **meta)})


@dataclass(frozen=True)
class FloraHyperParams:
    """Every option of Flora, in the math's own terms (one param group's worth, or one ``flora``).

    This is the record the math reads (:func:`flora_opt.core.flora_update`, the grouped engine,
    the optax stages): ``eps1``/``eps2`` are the two halves of torch's ``eps`` (optax ``eps``,
    ``min_parameter_scale``), ``decay_rate`` is ``-b2``, ``beta1`` is ``None`` when momentum is
    off (``0`` is normalised to ``None`` by :func:`from_group`), ``rank`` is ``None`` for full,
    uncompressed momentum. Each field's metadata is its :class:`Option`; **adding an option is
    adding a field here**, its argument to the written signatures of ``Flora`` and
    ``flora``/``scale_by_flora`` with their ``Args`` lines (a test names what is missing), and,
    if it changes the math, the core function it changes and the spec (docs/architecture.md).
    """

    lr: float | None = option(
        None,
        "learning rate `rho`; required unless `relative_step` (then it must be `None`)",
        None,
        optax="learning_rate",
        optax_position=0,
        required=True,
        convert=_float_or_none,
        optax_doc="a float or an optax schedule (evaluated at the number of previous updates), multiplied by "
        "`max(min_parameter_scale, RMS(W))` when `multiply_by_parameter_scale`",
        note="a schedule is evaluated at its stage's `count` (update calls so far, 0 first), like a torch "
        "scheduler stepped once per step",
    )
    rank: int | None = option(
        256,
        "projection rank `r`; a tensor whose smaller matrix dimension is `<= rank` keeps full momentum; "
        "`None`: full momentum everywhere (the paper's uncompressed baseline)",
        _int(none="for full momentum"),
        optax="tau",
        optax_position=3,
        layout=_same,
        reference="reference default `None`",
        optax_doc="projection rank; a leaf whose smaller matrix dimension is `<= tau` keeps full momentum; `None` "
        "keeps full momentum everywhere",
        note="`None` keeps full momentum",
    )
    kappa: int = option(
        1000,
        "resample the momentum projection every `kappa` steps, carrying the momentum over "
        "(`M <- P_new P_old^T M`); too small a `kappa` amplifies noise at each transfer and can diverge "
        "(a `RuntimeWarning` names the smallest stable value, docs/algorithm.md section 4)",
        _int(),
        optax_position=5,
    )
    eps1: float = option(
        1e-30,
        "`eps1`, added to squared gradients (section 6)",
        _real(above=0.0),
        torch=("eps", 0),
        optax="eps",
        optax_position=9,
        convert=float,
        note="`eps1` of section 6",
    )
    eps2: float = option(
        1e-3,
        "`eps2`, floor of the parameter RMS in the step size (section 5)",
        _real(above=0.0),
        torch=("eps", 1),
        optax="min_parameter_scale",
        convert=float,
        note="`eps2` of section 5. (The reference code passed `eps` for both, i.e. a floor of 1e-30: a "
        "zero-initialised tensor never moved)",
    )
    clip_threshold: float = option(
        1.0,
        "update clipping of the combined direction: `D <- D / max(1, RMS(D) / clip_threshold)`",
        _real(above=0.0),
        optax="clipping_threshold",
        optax_position=6,
        optax_check=_real(above=0.0, none=""),
        optax_doc="update clipping threshold `d`; `None` disables clipping",
        convert=float,
        note="`None` (optax only) disables clipping",
    )
    decay_rate: float = option(
        -0.8,
        "second-moment decay `beta2_t = 1 - t^decay_rate`",
        _real(below=0.0, what="must be a finite float < 0 (beta2_t = 1 - t^decay_rate)"),
        optax="b2",
        optax_position=2,
        optax_negated=True,
        optax_check=_real(above=0.0, what="must be a float > 0 (beta2_t = 1 - t^-b2, optax.adafactor's decay_rate)"),
        optax_doc="second-moment decay exponent, `beta2_t = 1 - t^-b2` (`optax.adafactor`'s `decay_rate`)",
        convert=float,
        note="**`decay_rate = -b2`**: `beta2_t = 1 - t^-b2`. `b2` is Adafactor's decay *exponent* "
        "(optax.adafactor's `decay_rate=0.8`), not an Adam-style `0.999`",
    )
    beta1: float | None = option(
        0.9,
        "momentum; `None` or `0` disables it (then Flora is exactly Adafactor)",
        _real(at_least=0.0, below=1.0, what="must be in [0, 1)", none="to disable momentum"),
        optax="b1",
        optax_position=1,
        convert=_off_if_zero,
        layout=_momentum_on,
        reference="reference default `None`",
        note="`None`/`0` disables momentum on both sides",
    )
    weight_decay: float = option(
        0.0,
        "decoupled, `p <- p - eta_t * weight_decay * p`",
        _real(at_least=0.0),
        optax_position=8,
        optax_check=_real(at_least=0.0, none=""),
        convert=float,
        optax_doc="decoupled weight decay `W <- W - eta_t * weight_decay * W` (scaled like the step); `None` means 0",
        note="both `eta_t`-scaled; `None` means 0",
    )
    weight_decay_mask: Any = option(  # noqa: RUF009 (option() builds the field, as dataclasses.field does)
        None,
        "a tree of Python bools with the structure of the params (or a function of the params returning "
        "one); `False` leaves get no weight decay",
        None,
        torch=None,
        note="PyTorch: param groups with `weight_decay=0`",
    )
    scale_parameter: bool = option(
        True,
        "step size `eta_t = rho_t * max(eps2, RMS(p))`",
        check_bool,
        optax="multiply_by_parameter_scale",
        optax_position=7,
        optax_doc="scale the step by `max(min_parameter_scale, RMS(W))`",
    )
    relative_step: bool = option(
        False,
        "`rho_t = min(1e-2, 1/sqrt(t))` instead of `lr`",
        check_bool,
        optax=None,
        note="use `learning_rate=lambda c: jnp.minimum(1e-2, (c + 1.0) ** -0.5)`",
    )
    warmup_init: bool = option(
        False,
        "`rho_t = min(1e-6 t, 1/sqrt(t))`; needs `relative_step`",
        check_bool,
        optax=None,
        note="use `learning_rate=lambda c: jnp.minimum(1e-6 * (c + 1.0), (c + 1.0) ** -0.5)`",
    )
    factorize_second_moment: bool = option(
        True,
        "Adafactor's factored second moment for matrices (`False`: a full, Adam-like one)",
        check_bool,
        optax="factorized_second_moment",
        optax_position=11,
        layout=_same,
    )
    min_dim_size_to_factor: int = option(
        128,
        "factor only matrices whose smaller dimension is at least this (as `optax.adafactor`)",
        _int(),
        optax_position=10,
        layout=_same,
        reference="new",
    )
    max_aspect_ratio: float | None = option(
        4.0,
        "embedding-like matrices (`max(m, n) > ratio * min(m, n)`: token embeddings, LM heads) keep full "
        "momentum; `None` compresses them too",
        _real(at_least=1.0, none=""),
        convert=_float_or_none,
        layout=_same,
        reference="reference: fixed 4",
        note="`None` compresses embedding-like leaves too",
    )
    seed: int = option(
        0,
        "32-bit seed of the projections",
        check_seed,
        optax_position=4,
        optax_doc="32-bit seed of the projections; leaf `i` (in `jax.tree_util.tree_leaves` order) uses "
        "`tensor_seed(seed, i)`",
        note="leaf `i` of `jax.tree_util.tree_leaves(params)` uses `tensor_seed(seed, i)`; PyTorch uses the "
        "parameter's position in the flattened param groups",
    )
    projection_dtype: str = option(
        "float32",
        "precision of the two `r x m x n` products of compressed momentum, `P U` and `P^T M`: "
        '`"bfloat16"` rounds their operands and results to bfloat16 (float32 sums; state, '
        "statistics and update stay float32), 2-4x faster on CPUs with AVX512-BF16 and GPUs",
        _choice("float32", "bfloat16"),
        reference="new",
        note='`"bfloat16"`: the same rounding in both (float32 sums)',
    )
    quantization: bool = option(
        False,
        "8-bit blockwise momentum and full second moments (torchao's dynamic-tree code)",
        check_bool,
        optax=None,
        layout=_same,
        reference="different code",
        note="the optax state is float32",
    )
    foreach: bool | None = option(
        None,
        "`None`/`True`: the grouped step (tensors of a group with the same layout stepped together, no "
        "host sync after the first step); `False`: the per-tensor path (one `core.flora_update` per tensor)",
        _bool_or_none,
        optax=None,
        note="one optax update covers every leaf: `jax.jit` it",
    )


# ---- the record, read --------------------------------------------------------------------------


@dataclass(frozen=True)
class Entry:
    """One option of :class:`FloraHyperParams` with its names resolved."""

    name: str  # the record's field
    default: Any
    spec: Option
    torch: str | None  # the param-group key (``eps`` for ``eps1`` and ``eps2``)
    index: int | None  # the element of a tuple option (``eps[0]``), else None
    optax: str | None

    @property
    def optax_default(self):
        if self.spec.required:
            return REQUIRED
        return -self.default if self.spec.optax_negated else self.default


@functools.cache
def options() -> tuple[Entry, ...]:
    """The options of :class:`FloraHyperParams`, in field order (computed once)."""
    entries = []
    for f in fields(FloraHyperParams):
        spec = f.metadata["option"]
        torch, index = spec.torch, None
        if torch is True:
            torch = f.name
        elif isinstance(torch, tuple):
            torch, index = torch
        optax = f.name if spec.optax is True else spec.optax
        entries.append(Entry(f.name, f.default, spec, torch, index, optax))
    return tuple(entries)


@functools.cache
def _torch_keys() -> dict[str, list[Entry]]:
    """Param-group key -> its options (two for ``eps``), in field order."""
    keys: dict[str, list[Entry]] = {}
    for entry in options():
        if entry.torch is not None:
            keys.setdefault(entry.torch, []).append(entry)
    return keys


def _torch_default(entries: list[Entry]):
    return entries[0].default if entries[0].index is None else tuple(e.default for e in entries)


#: Options of a torch param group (``flora_opt.Flora``), with their defaults.
DEFAULTS: dict[str, Any] = {key: _torch_default(entries) for key, entries in _torch_keys().items()}

#: torch option -> optax argument of ``flora_opt.optax.flora`` (docs/jax.md); a tuple option maps
#: to a tuple of arguments (``eps`` -> ``(eps, min_parameter_scale)``), a torch-only one to None.
OPTAX_NAMES: dict[str, str | tuple[str, ...] | None] = {
    key: entries[0].optax if entries[0].index is None else tuple(e.optax for e in entries)
    for key, entries in _torch_keys().items()
}

#: torch options that decide the state layout -> what of their value decides it.
LAYOUT_OPTIONS: dict[str, Callable[[Any], Any]] = {
    entries[0].torch: entries[0].spec.layout for entries in _torch_keys().values() if entries[0].spec.layout
}


# ---- torch: param groups ----------------------------------------------------------------------


def validate_group(group: Mapping[str, Any], *, lr_optional: bool = False) -> None:
    """Validate one torch param group's options (all of :data:`DEFAULTS` present).

    Raises ``ValueError`` naming the argument and the bad value; changes nothing. Each option's
    rule is its :class:`Option`'s ``check``; an element of a tuple option is named
    ``"eps value at index 1"``. Two rules span options: ``lr`` (``None`` exactly when
    ``relative_step``) and ``warmup_init`` (needs ``relative_step``). ``lr_optional`` accepts
    ``lr=None`` without ``relative_step``: the optimizer's defaults, when every param group
    brings its own ``lr`` (each group is then validated with it, as ``torch.optim`` does in
    ``add_param_group``).
    """
    _check_lr(group["lr"], group["relative_step"], optional=lr_optional)
    for key, entries in _torch_keys().items():
        value = group[key]
        if entries[0].index is None:
            if entries[0].spec.check is not None:
                entries[0].spec.check(key, value)
            continue
        if not isinstance(value, (tuple, list)) or len(value) != len(entries) or not all(is_real(v) for v in value):
            names = ", ".join(e.name for e in entries)
            raise ValueError(f"Invalid {key}: {value!r}: expected a tuple ({names}) of {len(entries)} floats")
        for entry in entries:
            entry.spec.check(f"{key} value at index {entry.index}", value[entry.index])
    if group["warmup_init"] and not group["relative_step"]:
        raise ValueError("Invalid warmup_init: True requires relative_step=True")


def normalize_group(group: dict[str, Any]) -> None:
    """In place: NumPy scalars become Python numbers, tuple options tuples (after validation)."""
    for key, default in DEFAULTS.items():
        if isinstance(default, tuple):
            group[key] = tuple(_plain(e) for e in group[key])
        elif key in group:
            group[key] = _plain(group[key])


def from_group(group: Mapping[str, Any]) -> FloraHyperParams:
    """The record of a (validated) torch param group: what the core and the engine read (once per
    group and step, so the plan of which key feeds which field is computed once)."""
    return FloraHyperParams(
        **{
            name: convert(group[key] if index is None else group[key][index])
            for name, key, index, convert in _torch_plan()
        }
    )


@functools.cache
def _torch_plan() -> tuple[tuple[str, str, int | None, Callable[[Any], Any]], ...]:
    return tuple((e.name, e.torch, e.index, e.spec.convert) for e in options() if e.torch is not None)


# ---- optax: flora's arguments -------------------------------------------------------------------


def check_optax(name: str, value) -> None:
    """The rule of the optax argument ``name`` (a plain value: the caller unwraps arrays)."""
    for entry in options():
        if entry.optax == name:
            check = entry.spec.optax_check or entry.spec.check
            if check is not None:
                check(name, value)
            return
    raise KeyError(f"{name!r} is not an argument of flora_opt.optax.flora")


def optax_flags() -> frozenset[str]:
    """The optax arguments that are bools (``inject_hyperparams`` keeps them static)."""
    return frozenset(e.optax for e in options() if e.optax is not None and isinstance(e.default, bool))


def from_optax(arguments: Mapping[str, Any]) -> FloraHyperParams:
    """The record of ``flora``'s ``arguments`` (by optax name; absent ones keep their default).

    Values pass unchanged (they may be schedules or traced arrays), except that a negated one is
    negated back (``decay_rate = -b2``).
    """
    values = {}
    for entry in options():
        if entry.optax in arguments:
            value = arguments[entry.optax]
            values[entry.name] = -value if entry.spec.optax_negated and value is not None else value
    return FloraHyperParams(**values)
