"""Write the option tables of README.md and docs/jax.md from the record, ``flora_opt.hyperparams``.

Each generated block sits between ``<!-- NAME: generated ... -->`` and ``<!-- /NAME -->``::

    python tools/option_docs.py          # rewrite the blocks in place (make docs)
    python tools/option_docs.py --check  # exit 1, naming the block, when one differs from the record

``tests/test_hyperparams.py`` runs the check, so a new option (a field of
``FloraHyperParams``) fails the tests until this script has been run.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from flora_opt.hyperparams import DEFAULTS, REQUIRED, optax_signature, options, torch_signature

ROOT = Path(__file__).resolve().parent.parent
BLOCKS = {"README.md": ("torch-options",), "docs/jax.md": ("optax-signature", "optax-options")}


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
    order = list(optax_signature().parameters)
    entries = sorted((e for e in options() if e.optax is not None), key=lambda e: order.index(e.optax))
    entries += [e for e in options() if e.optax is None]
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
    parser.add_argument("--check", action="store_true", help="exit 1 when a block differs from the record")
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
    if args.check and stale:
        print("out of date (run python tools/option_docs.py): " + ", ".join(stale), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
