"""Optimizer-state bytes per parameter and median ``optimizer.step()`` time, all in one run.

Contenders: AdamW (fused), ``torch.optim.Adafactor``, and Flora at several ranks with and
without 8-bit quantization, on the parameter shapes of GPT-2-small and of a LLaMA-style 134M
model built from configs (random weights, random gradients: the step's cost does not depend
on their values). Steps are interleaved round-robin (one timed step per contender per round),
so machine noise hits every contender alike; ratios are taken within the run.

    python benchmarks/step_time.py                      # all models, default contenders
    python benchmarks/step_time.py --models gpt2-small --rounds 5 --ranks 32 256
    python benchmarks/step_time.py --models llama-48x256 --ranks 32 --no-quantization --per-tensor \
        --adafactor-foreach                             # many small tensors

``--projection-dtypes float32 bfloat16`` adds Flora with ``projection_dtype="bfloat16"`` beside
the float32 default (and beside each ``--package-at`` contender). ``--per-tensor`` adds Flora's per-tensor reference path (``foreach=False``) beside the grouped
default; ``--adafactor-foreach`` makes the reference ``torch.optim.Adafactor(foreach=True)``;
``--engine-at REF`` adds Flora with ``flora_opt/engine.py`` as it was at the git revision ``REF``
(``git show REF:flora_opt/engine.py``, run with this checkout's other modules, so only for an
engine that fits them), so that an engine change is measured against the previous one in the
same process, rounds interleaved; ``--package-at REF`` adds Flora from the
whole ``flora_opt`` package at ``REF`` (another update rule or step), imported under its own
name. ``--threads 1 --clock thread`` times each step by the CPU time of the stepping thread, which
leaves out the waits of a machine shared with other processes (with more threads the others'
time is not counted, so use it with one).

Prints a markdown table and writes JSON to benchmarks/results/step_time.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
for _path in (REPO, REPO / "lab"):  # flora_opt and the lab (flora_lab) of this checkout
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
from flora_lab import contenders as registry  # noqa: E402

MODELS = {
    "gpt2-small": dict(kind="gpt2", n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024),
    "llama-134m": dict(
        kind="llama",
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=12,
        num_attention_heads=12,
        vocab_size=32000,
        tie_word_embeddings=False,
    ),
    # LLaMA-style, width 256, 48 layers (many small tensors; byte-level vocab)
    "llama-48x256": dict(
        kind="llama",
        hidden_size=256,
        intermediate_size=688,
        num_hidden_layers=48,
        num_attention_heads=4,
        vocab_size=256,
        tie_word_embeddings=False,
    ),
}


def build_params(name: str) -> list[torch.nn.Parameter]:
    """The model's parameters, built from a config with transformers (no download)."""
    import transformers

    spec = dict(MODELS[name])
    kind = spec.pop("kind")
    with torch.device("meta"):
        if kind == "gpt2":
            model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**spec))
        else:
            model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec))
    params = []
    seen = set()
    gen = torch.Generator().manual_seed(0)
    for p in model.parameters():
        if id(p) in seen:  # tied weights
            continue
        seen.add(id(p))
        real = torch.nn.Parameter(torch.randn(p.shape, generator=gen) * 0.02)
        real.grad = torch.randn(p.shape, generator=gen) * 1e-3
        params.append(real)
    return params


def engine_at(ref: str):
    """The ``Engine`` class of ``flora_opt/engine.py`` at git revision ``ref``, loaded as a module of
    this checkout's ``flora_opt`` (same optimizer, state layout and projections)."""
    import importlib.util
    import subprocess
    import tempfile

    source = subprocess.run(
        ["git", "show", f"{ref}:flora_opt/engine.py"], cwd=REPO, capture_output=True, text=True, check=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "engine_at.py"
    path.write_text(source)
    spec = importlib.util.spec_from_file_location("flora_opt._engine_at", path)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "flora_opt"
    spec.loader.exec_module(module)
    return module.Engine


def package_at(ref: str):
    """The ``Flora`` class of the whole ``flora_opt`` package as it was at git revision ``ref``
    (``git archive``), imported under its own name, so that an older optimizer (another update
    rule, the per-tensor step) runs in the same process as this one, rounds interleaved. Taken
    from the package's ``optim`` module itself: the package's lazy ``flora_opt.Flora`` would
    import this checkout's."""
    import importlib
    import io
    import subprocess
    import tarfile
    import tempfile

    done = subprocess.run(["git", "archive", ref, "flora_opt"], cwd=REPO, capture_output=True)
    if done.returncode != 0:
        raise SystemExit(f"--package-at {ref!r}: git archive failed: {done.stderr.decode().strip()}")
    archive = done.stdout
    root = Path(tempfile.mkdtemp())
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(root / "archive", filter="data")
    name = "flora_opt_at_" + "".join(c if c.isalnum() else "_" for c in ref)
    (root / "archive" / "flora_opt").rename(root / name)
    sys.path.insert(0, str(root))
    flora = importlib.import_module(f"{name}.optim").Flora
    if not flora.__module__.startswith(name):  # pragma: no cover - a package that imports itself by name
        raise SystemExit(f"--package-at {ref!r}: its Flora comes from {flora.__module__}, not from the archive")
    return flora


def with_engine(optimizer, engine_class):
    optimizer._engine = engine_class(optimizer)
    return optimizer


def contenders(
    ranks,
    quantization_options,
    per_tensor=False,
    adafactor_foreach=False,
    engine_ref=None,
    projection_dtypes=("float32",),
    package_ref=None,
):
    """``(label, make(params))`` pairs, built by the one contender registry (flora_lab.contenders)."""
    yield "AdamW (fused)", lambda ps: registry.make("adamw", ps, lr=1e-3)
    if adafactor_foreach:
        yield "torch.optim.Adafactor", lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=True)
    else:
        yield "torch.optim.Adafactor", lambda ps: registry.make("adafactor_torch", ps, lr=1e-2)
    package_flora = None if package_ref is None else package_at(package_ref)
    for rank in ranks:
        for quantization in quantization_options:
            name = "flora_8bit" if quantization else "flora"
            for dtype in projection_dtypes:
                suffix = "" if dtype == "float32" else f" ({dtype} products)"
                yield (
                    registry.label(name, rank) + suffix,
                    (lambda n, r, d: lambda ps: registry.make(n, ps, lr=1e-3, rank=r, kappa=1000, projection_dtype=d))(
                        name, rank, dtype
                    ),
                )
                if package_flora is not None and not quantization:
                    yield (
                        registry.label(name, rank) + suffix + f" (flora_opt at {package_ref})",
                        (lambda r, d, flora: lambda ps: flora(ps, lr=1e-3, rank=r, kappa=1000, projection_dtype=d))(
                            rank, dtype, package_flora
                        ),
                    )
            if engine_ref is not None:
                engine_class = engine_at(engine_ref)
                yield (
                    registry.label(name, rank) + f" (engine at {engine_ref})",
                    (
                        lambda n, r, engine: (
                            lambda ps: with_engine(registry.make(n, ps, lr=1e-3, rank=r, kappa=1000), engine)
                        )
                    )(name, rank, engine_class),
                )
            if per_tensor:
                yield (
                    registry.label(name, rank) + " (per-tensor)",
                    (lambda n, r: lambda ps: registry.make(n, ps, lr=1e-3, rank=r, kappa=1000, foreach=False))(
                        name, rank
                    ),
                )


def state_bytes(optimizer: torch.optim.Optimizer) -> int:
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and value.device.type != "meta":
                if value.dim() == 0 and value.dtype in (torch.float32, torch.int64) and value.numel() == 1:
                    # step counters kept as 0-d tensors by torch.optim: count them too
                    pass
                total += value.numel() * value.element_size()
    return total


def run(
    model: str,
    ranks,
    quantization_options,
    rounds: int,
    warmup: int,
    per_tensor=False,
    adafactor_foreach=False,
    engine_ref=None,
    projection_dtypes=("float32",),
    package_ref=None,
    clock=time.perf_counter,
) -> list[dict]:
    params = build_params(model)
    numel = sum(p.numel() for p in params)
    built = [
        (label, make(params))
        for label, make in contenders(
            ranks, quantization_options, per_tensor, adafactor_foreach, engine_ref, projection_dtypes, package_ref
        )
    ]
    times: dict[str, list[float]] = {label: [] for label, _ in built}
    for round_index in range(warmup + rounds):
        for label, optimizer in built:
            gc.collect()
            start = clock()
            optimizer.step()
            elapsed = clock() - start
            if round_index >= warmup:
                times[label].append(elapsed)
        print(f"  [{model}] round {round_index + 1}/{warmup + rounds} done", file=sys.stderr, flush=True)
    rows = []
    reference = statistics.median(times["torch.optim.Adafactor"])
    for label, optimizer in built:
        median = statistics.median(times[label])
        nbytes = state_bytes(optimizer)
        rows.append(
            dict(
                model=model,
                optimizer=label,
                params=numel,
                state_bytes=nbytes,
                bytes_per_param=nbytes / numel,
                median_step_s=median,
                step_vs_adafactor=median / reference,
                times_s=times[label],
            )
        )
    del built, params
    gc.collect()
    return rows


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--ranks", nargs="+", type=int, default=[32, 128, 256])
    parser.add_argument("--no-quantization", action="store_true", help="skip the 8-bit Flora variants")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--per-tensor", action="store_true", help="also time Flora's per-tensor path (foreach=False)")
    parser.add_argument(
        "--adafactor-foreach", action="store_true", help="reference: torch.optim.Adafactor(foreach=True)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument(
        "--clock",
        choices=["wall", "thread"],
        default="wall",
        help="wall time, or the CPU time of the stepping thread (with --threads 1: the step's own time, "
        "without the waits of a machine shared with other processes)",
    )
    parser.add_argument(
        "--engine-at",
        default=None,
        metavar="REF",
        help="also time Flora with flora_opt/engine.py as at this git revision (same process)",
    )
    parser.add_argument(
        "--package-at",
        default=None,
        metavar="REF",
        help="also time Flora from the whole flora_opt package as at this git revision (same process)",
    )
    parser.add_argument(
        "--projection-dtypes",
        nargs="+",
        default=["float32"],
        choices=["float32", "bfloat16"],
        help="Flora's projection_dtype values to time (default float32)",
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "step_time.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    quantization_options = [False] if args.no_quantization else [False, True]
    load_before = os.getloadavg()  # the machine may be shared: noted beside the figures
    rows = []
    for model in args.models:
        rows.extend(
            run(
                model,
                args.ranks,
                quantization_options,
                args.rounds,
                args.warmup,
                args.per_tensor,
                args.adafactor_foreach,
                args.engine_at,
                args.projection_dtypes,
                args.package_at,
                time.thread_time if args.clock == "thread" else time.perf_counter,
            )
        )
    print("| model | optimizer | state MiB | bytes/param | median step (s) | step / Adafactor |")
    print("|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(
            f"| {row['model']} | {row['optimizer']} | {row['state_bytes'] / 2**20:.1f} | "
            f"{row['bytes_per_param']:.3f} | {row['median_step_s']:.3f} | {row['step_vs_adafactor']:.2f} |"
        )
    print(f"\nload average (1, 5, 15 min) before: {load_before}, after: {os.getloadavg()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(
        command="python " + " ".join([Path(sys.argv[0]).as_posix()] + (argv if argv is not None else sys.argv[1:])),
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        clock=args.clock,
        cpu=platform.processor() or platform.machine(),
        cpu_count=os.cpu_count(),
        date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        commit=_commit(),
        load_average_before=load_before,
        load_average_after=os.getloadavg(),
    )
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=2))
    print(f"\nwrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
