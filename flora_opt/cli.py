"""The ``flora-opt`` command (also ``python -m flora_opt``): ``memory``.

The demo and the paper's replications are the lab's command, ``flora-lab`` (``lab/``).
See ``docs/cli.md`` for every option and example output.
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
Flora: memory-efficient training by compressing optimizer momentum with regenerated random
projections (Hao, Cao and Mou, ICML 2024).

commands:
  memory   exact optimizer-state bytes and the training-step memory (all gradients, layer-wise
           updates, gradient accumulation) of AdamW, Adafactor and Flora for any Hugging Face
           model config, computed on the meta device (no weights allocated)

Run `flora-opt COMMAND --help` for a command's options. The demo and the paper's replications
are the lab's command, `flora-lab` (from a clone of the repository: pip install -e lab)."""


def _fill(*paragraphs: str) -> str:
    """Wrap help paragraphs (the raw formatter keeps line breaks, so wrap here)."""
    return "\n\n".join(textwrap.fill(p, 88) for p in paragraphs)


def _rank(text: str) -> int | None:
    if text.lower() == "none":
        return None
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'none', got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="flora-opt", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"flora-opt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_memory_parser(commands)
    return parser


def _add_memory_parser(commands) -> None:
    from .memory import METHODS, PRESETS

    memory = commands.add_parser(
        "memory",
        help="optimizer-state bytes and training-step memory for a model config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_fill(
            "Exact optimizer-state bytes of AdamW, Adafactor (factored, with and without momentum) "
            "and Flora for a Hugging Face model, and the training-step memory: weights + gradients "
            "+ optimizer state, with all gradients alive at optimizer.step(), with layer-wise "
            "updates (each gradient freed once its tensor is updated), and with gradient "
            "accumulation over micro-batches (naive; Flora: compressed, with layer-wise updates). "
            "The model is built on the meta device from its config: no weights are allocated, "
            "nothing is downloaded. Activations are not included. Formulas: docs/cli.md.",
        ),
        epilog=(
            "presets:\n"
            + "\n".join(f"  {name:<12} {source}" for name, (_, source) in PRESETS.items())
            + "\n\nexamples:\n  flora-opt memory gpt2\n  flora-opt memory llama-7b --rank 256 --quantization\n"
            "  flora-opt memory path/to/config.json --dtype bf16 --json"
        ),
    )
    memory.add_argument(
        "model",
        metavar="MODEL",
        help="a preset name (see below) or a path to a Hugging Face config.json (or to the directory holding it)",
    )
    memory.add_argument(
        "--rank",
        type=_rank,
        default=256,
        help="rank of Flora's momentum and of its compressed accumulation (default 256); 'none' = "
        "Flora with full momentum and naive accumulation",
    )
    memory.add_argument(
        "--quantization", action="store_true", help="also show Flora with 8-bit states (Flora(quantization=True))"
    )
    memory.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="dtype of weights and gradients (default fp32); AdamW keeps its states in it, "
        "Flora and Adafactor always in fp32",
    )
    memory.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        metavar="METHOD",
        default=None,
        help="rows to show (default: all; flora_8bit with --quantization). Choices: " + ", ".join(METHODS),
    )
    memory.add_argument("--json", action="store_true", help="print JSON instead of a table")
    memory.set_defaults(command_parser=memory)


def _run_memory(args) -> int:
    from .memory import estimate, format_table

    try:
        result = estimate(
            args.model, rank=args.rank, quantization=args.quantization, dtype=args.dtype, methods=args.methods
        )
    except ValueError as error:  # ModelConfigError included
        args.command_parser.error(str(error))
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(format_table(result))
    return 0


# missing top-level module -> the extra of flora-optim that installs it
_EXTRAS = {
    "torch": "torch",
    "accelerate": "torch",
    "torchao": "torch",
    "transformers": "hf",
}


def main(argv=None) -> int:
    """Entry point of the ``flora-opt`` console script. Returns the exit status.

    A missing optional dependency ends the command at once with exit status 2 and one line
    naming the extra to install.
    """
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        return _run_memory(args)
    except ImportError as error:
        missing = (getattr(error, "name", None) or "").split(".")[0]
        if missing not in _EXTRAS:
            raise
        command = " ".join(a for a in words[:1] if not a.startswith("-"))
        print(
            f"flora-opt{' ' + command if command else ''}: error: needs {missing}, which is not installed; "
            f"install it with: pip install 'flora-optim[{_EXTRAS[missing]}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
