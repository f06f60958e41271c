"""What the record, ``flora_opt.hyperparams``, says the docs and the signatures must be.

The option tables of README.md and docs/jax.md are generated: each sits between
``<!-- NAME: generated ... -->`` and ``<!-- /NAME -->``. The signatures of ``flora_opt.Flora``
and ``flora_opt.optax.flora``/``scale_by_flora`` and their ``Args`` lines are written out in
the code (so that type checkers and IDEs read them); :func:`signature_problems` compares them
with the record (names, order, kinds, defaults, doc lines)::

    python tools/option_docs.py          # rewrite the tables in place (make docs); report signature problems
    python tools/option_docs.py --check  # exit 1, naming each table or argument that differs from the record

``tests/test_hyperparams.py`` runs both checks, so a new option (a field of ``FloraHyperParams``)
fails the tests until this script has been run and the signatures and ``Args`` have it.
"""

from __future__ import annotations

import argparse
import inspect
import sys
from pathlib import Path

from flora_opt.hyperparams import DEFAULTS, REQUIRED, Entry, options

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = {"README.md": ("torch-options",), "docs/jax.md": ("optax-signature", "optax-options")}


# ---- the signatures and Args lines the record implies ---------------------------------------


def _torch_keys() -> dict[str, list[Entry]]:
    """Param-group key -> its options (two for ``eps``), in field order."""
    keys: dict[str, list[Entry]] = {}
    for entry in options():
        if entry.torch is not None:
            keys.setdefault(entry.torch, []).append(entry)
    return keys


def _optax_entries() -> list[Entry]:
    """The optax options in ``flora``'s order: the positional ones, then the keyword-only ones."""
    entries = [e for e in options() if e.optax is not None]
    positional = sorted((e for e in entries if e.spec.optax_position is not None), key=lambda e: e.spec.optax_position)
    return positional + [e for e in entries if e.spec.optax_position is None]


def torch_signature() -> inspect.Signature:
    """``Flora.__init__(self, params, lr=None, *, rank=256, ...)``: every param-group option."""
    parameters = [
        inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD),
        inspect.Parameter("params", inspect.Parameter.POSITIONAL_OR_KEYWORD),
    ]
    for key, entries in _torch_keys().items():  # lr (required) is positional, the others keyword-only
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD if entries[0].spec.required else inspect.Parameter.KEYWORD_ONLY
        parameters.append(inspect.Parameter(key, kind, default=DEFAULTS[key]))
    return inspect.Signature(parameters)


def optax_signature() -> inspect.Signature:
    """``flora(learning_rate, b1=0.9, ..., *, min_parameter_scale=0.001, ...)``."""
    parameters = []
    for entry in _optax_entries():
        kind = inspect.Parameter.POSITIONAL_OR_KEYWORD
        if entry.spec.optax_position is None:
            kind = inspect.Parameter.KEYWORD_ONLY
        parameters.append(inspect.Parameter(entry.optax, kind, default=entry.optax_default))
    return inspect.Signature(parameters)


def _rst(text: str) -> str:
    """Markdown code spans as reStructuredText literals."""
    return text.replace("`", "``")


def args_entries(framework: str) -> dict[str, str]:
    """Option -> its ``Args`` entry in the docstring of ``Flora`` (``"torch"``) or ``flora``
    (``"optax"``): ``name (default X): doc line`` (reStructuredText, on one line)."""
    entries = {}
    if framework == "torch":
        for key, group in _torch_keys().items():
            default = "required" if group[0].spec.required else f"default {DEFAULTS[key]!r}"
            entries[key] = f"{key} ({default}): " + _rst("; ".join(e.spec.doc for e in group))
    elif framework == "optax":
        for entry in _optax_entries():
            default = "required" if entry.optax_default is REQUIRED else f"default {entry.optax_default!r}"
            keyword = "keyword, " if entry.spec.optax_position is None else ""
            text = entry.spec.optax_doc or entry.spec.doc
            if entry.torch is not None and entry.torch != entry.optax:
                torch = entry.torch if entry.index is None else f"{entry.torch}[{entry.index}]"
                torch += f" = -{entry.optax}" if entry.spec.optax_negated else ""
                text += f". PyTorch: `{torch}`"
            entries[entry.optax] = f"{entry.optax} ({keyword}{default}): " + _rst(text)
    else:
        raise ValueError(f"Invalid framework: {framework!r}: must be 'torch' or 'optax'")
    return entries


# ---- comparing what is written with the record ------------------------------------------------


def _describe(parameter: inspect.Parameter) -> str:
    default = "required" if parameter.default is inspect.Parameter.empty else f"default {parameter.default!r}"
    return f"{parameter.kind.description}, {default}"


def signature_differences(written: inspect.Signature, expected: inspect.Signature, who: str) -> list[str]:
    """Where the ``written`` signature of ``who`` differs from the record's ``expected`` one:
    a missing or unknown argument, another kind or default (of another type), another order."""
    problems = []
    have, want = written.parameters, expected.parameters
    for name, parameter in want.items():
        if name not in have:
            problems.append(f"{who}: argument {name!r} is missing (the record: {_describe(parameter)})")
            continue
        given = have[name]
        same_default = type(given.default) is type(parameter.default) and given.default == parameter.default
        if given.kind != parameter.kind or not same_default:
            problems.append(f"{who}: argument {name!r} is {_describe(given)}; the record: {_describe(parameter)}")
    problems += [f"{who}: argument {name!r} is not an option of the record" for name in have if name not in want]
    if not problems and list(have) != list(want):
        problems.append(f"{who}: arguments in the order {list(have)}; the record's: {list(want)}")
    return problems


def written_args(doc: str | None) -> dict[str, str]:
    """The entries of the ``Args:`` section of a docstring, each on one line (whitespace collapsed)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    if "Args:" not in lines:
        return {}
    entries: dict[str, str] = {}
    indent = None
    name = ""
    for line in lines[lines.index("Args:") + 1 :]:
        width = len(line) - len(line.lstrip())
        if not line.strip() or (indent is not None and width < indent):
            break
        if indent is None or width == indent:
            indent = width
            name = line.split()[0].rstrip(":")
            entries[name] = line.strip()
        else:
            entries[name] += " " + line.strip()
    return {name: " ".join(text.split()) for name, text in entries.items()}


def args_differences(doc: str | None, expected: dict[str, str], who: str, others: tuple[str, ...] = ()) -> list[str]:
    """Where the ``Args`` of ``who``'s docstring differ from the record's ``expected`` entries
    (``others``: entries that are not options, such as ``params``)."""
    written = written_args(doc)
    problems = []
    for name, entry in expected.items():
        if name not in written:
            problems.append(f"{who}: Args has no entry for {name!r}; the record's: {entry}")
        elif written[name] != entry:
            problems.append(f"{who}: Args entry {name!r} differs from the record's:\n  {written[name]}\n  {entry}")
    problems += [
        f"{who}: Args entry {name!r} is not an option of the record"
        for name in written
        if name not in expected and name not in others
    ]
    order = [name for name in written if name in expected]
    if not problems and order != list(expected):
        problems.append(f"{who}: Args entries in the order {order}; the record's: {list(expected)}")
    return problems


def signature_problems() -> list[str]:
    """Every difference between the written signatures and ``Args`` of ``flora_opt.Flora``,
    ``flora_opt.optax.flora`` and ``scale_by_flora`` and the record (empty when they agree)."""
    # The frameworks are needed only here, to read what the code says.
    from flora_opt.optax import flora, scale_by_flora
    from flora_opt.optim import Flora

    return [
        *signature_differences(inspect.signature(Flora.__init__), torch_signature(), "flora_opt.Flora"),
        *args_differences(Flora.__doc__, args_entries("torch"), "flora_opt.Flora", others=("params",)),
        *signature_differences(inspect.signature(flora), optax_signature(), "flora_opt.optax.flora"),
        *args_differences(flora.__doc__, args_entries("optax"), "flora_opt.optax.flora"),
        *signature_differences(inspect.signature(scale_by_flora), optax_signature(), "flora_opt.optax.scale_by_flora"),
    ]


# ---- the generated tables ---------------------------------------------------------------------------


def _begin(name: str) -> str:
    return f"<!-- {name}: generated from flora_opt/hyperparams.py by tools/option_docs.py; edit the record -->"


def _end(name: str) -> str:
    return f"<!-- /{name} -->"


def _code(value) -> str:
    return f"`{value!r}`"


def _row(*cells: str) -> str:
    return "|" + "|".join(f" {cell} " if cell else " " for cell in cells) + "|"


def _torch_options() -> str:
    signature = str(torch_signature()).replace("(self, ", "(", 1)
    lines = [
        f"`flora_opt.Flora{signature}`",
        "",
        "| argument | default | meaning | differs from `flora-opt==0.0.3` |",
        "|---|---|---|---|",
    ]
    by_key: dict[str, list] = {}
    for entry in options():
        if entry.torch is not None:
            by_key.setdefault(entry.torch, []).append(entry)
    for key, entries in by_key.items():
        default = "required" if entries[0].spec.required else _code(DEFAULTS[key])
        meaning = "; ".join(e.spec.doc for e in entries)
        reference = "; ".join(e.spec.reference for e in entries if e.spec.reference)
        lines.append(_row(f"`{key}`", default, meaning, reference))
    return "\n".join(lines)


def _optax_signature() -> str:
    lines = ["```python", "flora_opt.optax.flora("]
    keyword = False
    for parameter in optax_signature().parameters.values():
        if parameter.kind is parameter.KEYWORD_ONLY and not keyword:
            lines.append("    *,")
            keyword = True
        default = "" if parameter.default is REQUIRED else f"={parameter.default!r}"
        lines.append(f"    {parameter.name}{default},")
    lines += [") -> optax.GradientTransformationExtraArgs", "```"]
    return "\n".join(lines)


def _optax_options() -> str:
    lines = ["| optax `flora` | default | PyTorch `Flora` | default | note |", "|---|---|---|---|---|"]
    entries = _optax_entries() + [e for e in options() if e.optax is None]
    for entry in entries:
        if entry.optax is None:
            optax, optax_default = "(none)", ""
        else:
            keyword = " (keyword)" if entry.spec.optax_position is None else ""
            optax = f"`{entry.optax}`{keyword}"
            optax_default = "required" if entry.optax_default is REQUIRED else repr(entry.optax_default)
        if entry.torch is None:
            torch, torch_default = "(none)", ""
        else:
            torch = f"`{entry.torch}`" if entry.index is None else f"`{entry.torch}[{entry.index}]`"
            torch_default = "required" if entry.spec.required else repr(entry.default)
        lines.append(_row(optax, optax_default, torch, torch_default, entry.spec.note))
    return "\n".join(lines)


RENDER = {"torch-options": _torch_options, "optax-signature": _optax_signature, "optax-options": _optax_options}


def render(name: str) -> str:
    """The text of block ``name``, from the record."""
    return RENDER[name]()


def current(text: str, name: str) -> str:
    """The text between block ``name``'s markers in ``text`` (ValueError when a marker is missing)."""
    begin, end = _begin(name), _end(name)
    if text.count(begin) != 1 or text.count(end) != 1:
        raise ValueError(f"block {name!r}: expected one {begin!r} and one {end!r}")
    return text.split(begin, 1)[1].split(end, 1)[0].strip("\n")


def rewrite(text: str, name: str) -> str:
    """``text`` with block ``name`` regenerated."""
    head, rest = text.split(_begin(name), 1)
    tail = rest.split(_end(name), 1)[1]
    return f"{head}{_begin(name)}\n{render(name)}\n{_end(name)}{tail}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 when a table differs from the record")
    args = parser.parse_args(argv)
    stale = []
    for relative, names in BLOCKS.items():
        path = ROOT / relative
        text = path.read_text()
        for name in names:
            if current(text, name) != render(name):
                stale.append(f"{relative}: {name}")
                text = rewrite(text, name)
        if not args.check:
            path.write_text(text)
    status = 0
    if args.check and stale:
        print("out of date (run python tools/option_docs.py): " + ", ".join(stale), file=sys.stderr)
        status = 1
    problems = signature_problems()
    if problems:
        print("written signatures differ from the record (edit them):", *problems, sep="\n", file=sys.stderr)
        status = 1
    return status


if __name__ == "__main__":
    sys.exit(main())
