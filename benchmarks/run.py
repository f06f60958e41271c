"""The benchmark suite: Flora against its peers on memory, speed and the loss it reaches.

    python benchmarks/run.py step          # optimizer step time and exact state bytes (LLaMA-130M)
    python benchmarks/run.py throughput    # training tokens/s at several tokens-per-step sizes
    python benchmarks/run.py quality       # validation loss against state bytes, peers tuned alike (Shakespeare)
    python benchmarks/run.py quality --preset demo   # the learning-rate sweep behind flora-lab demo
    python benchmarks/run.py all           # the three, in that order

Every contender runs in a fresh process (``benchmarks/worker.py``; the reference
``flora-opt==0.0.3`` through ``benchmarks/peers/ref_worker.py`` in its own venv), so no
contender inherits another's allocations, compiled kernels or thread pools. Workers use the
peers venv (``$FLORA_PEERS_VENV``, default ``/work/venv-peers``, made by
``benchmarks/setup_peers.sh``) with this repository on ``PYTHONPATH``; without it they use the
current interpreter and the peers that are not importable are skipped (recorded as such).

Results go to ``--out`` (default ``benchmarks/results``): ``<task>.json`` (every number, the exact
command, each worker's command line), ``<task>.md`` (the tables) and ``<task>.png`` (plots);
single runs under ``runs/<task>/``; ``quality`` writes ``results.json``, ``report.md``,
``pareto.png`` and ``curves.png`` (and its runs) under ``quality/`` (``quality-demo/``). ``--resume`` reuses finished runs whose configuration is
unchanged. ``docs/benchmarks.md`` explains the set-up and shows the committed results.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import itertools
import json
import math
import os
import platform
import shlex
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _path in (REPO, REPO / "lab"):  # flora_opt and the lab (flora_lab) of this checkout
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

# ---- contenders ------------------------------------------------------------------------------

# The quality benchmark's presets. ``pretrain`` (the default): a LLaMA-style decoder whose block
# matrices hold 86% of the parameters (byte-level vocabulary, hidden 64, 4 layers; 1M tokens take
# about 40 s of one core), trained on the Shakespeare corpus for 512 steps of 16 x 128 bytes
# (1,048,576 tokens) per run. ``demo``: the model, data and budget of ``flora-lab demo`` (its
# learning-rate sweep, one seed). ``interval`` is Flora's resample interval kappa and
# GaLore/APOLLO's update_proj_gap, the same for all: the libraries' defaults (1000, 200) are meant
# for runs of many thousand steps.
QUALITY_MODEL = dict(vocab_size=256, dim=64, n_layers=4, n_heads=2, max_seq_len=128)
PRESETS = {
    "pretrain": dict(
        lm=QUALITY_MODEL,
        dataset="shakespeare",
        tokenizer="bytes",
        vocab_size=256,
        steps=512,
        batch_size=16,
        seq_len=128,
        eval_every=128,
        final_eval_batches=32,
        seeds=3,
        interval=128,
        ranks=[16, 8, 32],
        peer_ranks=[16, 8],
        bits_rank=32,
        lora_rank=16,
    ),
    "demo": dict(
        lm=None,
        dataset="shakespeare_sample",
        tokenizer="bpe",
        vocab_size=1024,
        steps=200,
        batch_size=16,
        seq_len=128,
        eval_every=40,
        final_eval_batches=None,
        seeds=1,
        interval=50,
        ranks=[32],
        peer_ranks=[32],
        bits_rank=32,
        lora_rank=None,
    ),
}
# Flora's options in the pretrain preset. It factors the second moment of matrices whose smaller
# side is >= min_dim_size_to_factor (default 128, as optax); transformers.Adafactor factors every
# matrix, and so does Flora here. Its default rule would also compress the 256 x 64 embedding and
# head (aspect ratio 4 <= max_aspect_ratio); GaLore and APOLLO project only the block matrices
# and keep full Adam state for the embedding and head (their training scripts' grouping), so
# Flora compresses the same block matrices and keeps full momentum for those two.
FLORA_PRETRAIN = {"min_dim_size_to_factor": 1, "full_momentum_for": ["embed.", "lm_head."]}

# Learning-rate grids: 2x apart, centred on priors (Adafactor and Flora take relative step sizes,
# lr * RMS(W)); a grid whose best value is at an edge is extended (--extend).
RELATIVE_GRID = [0.05, 0.1, 0.2]
ADAMW_GRID = [3e-3, 6e-3, 1.2e-2]
GALORE_GRID = [0.02, 0.04, 0.08]
APOLLO_GRID = [6e-3, 1.2e-2, 2.4e-2]
LORA_GRID = [2e-3, 4e-3, 8e-3]


def _grid_around(lr: float) -> list[float]:
    return [float(f"{lr / 2:.3g}"), lr, float(f"{lr * 2:.3g}")]


def quality_contenders(
    preset: str = "pretrain", ranks=(16, 8, 32), peer_ranks=(16, 8), bits_rank=32, lora_rank=16, interval=128
) -> list[dict]:
    """The contenders of the quality benchmark: ``id``, ``kind`` (a ``flora_lab.contenders`` name
    or ``lora``), ``label``, ``options`` (Adam-based ones with ``flora_lab.demo.ADAM_RECIPE``) and
    the learning-rate ``grid``; Flora with :data:`FLORA_PRETRAIN`. ``demo``: the demo's optimizers at
    rank ``ranks[0]``, grids around ``flora_lab.demo.DEFAULT_LRS``."""
    from flora_lab.demo import DEFAULT_LRS, OPTIMIZERS, label, recipe_options

    def options(kind, rank=None):
        return json.loads(json.dumps(recipe_options(kind, rank, interval)))  # tuples as JSON lists

    if preset == "demo":
        rank = ranks[0]
        return [
            dict(
                id=name,
                kind=name,
                label=label(name, rank),
                grid=_grid_around(DEFAULT_LRS[name]),
                options=options(name, rank),
            )
            for name in OPTIMIZERS
        ]
    # in the order the runs are queued: the first Flora rank and the peers at the first peer rank
    # complete before the other ranks start
    flora = [
        dict(
            id=f"flora_r{r}",
            kind="flora",
            label=f"Flora r={r}",
            grid=RELATIVE_GRID,
            options=dict(options("flora", r), **FLORA_PRETRAIN),
        )
        for r in ranks
    ]
    peers = [
        [
            dict(id=f"{kind}_r{r}", kind=kind, label=f"{name} r={r}", grid=grid, options=options(kind, r))
            for kind, name, grid in (("galore", "GaLore", GALORE_GRID), ("apollo", "APOLLO", APOLLO_GRID))
        ]
        for r in peer_ranks
    ]
    out = [
        dict(
            id="adafactor_m",
            kind="adafactor_momentum",
            label="Adafactor+momentum",
            grid=RELATIVE_GRID,
            options=options("adafactor_momentum"),
        )
    ]
    for i in range(max(len(flora), len(peers))):
        out += flora[i : i + 1]
        if i == 0:
            out.append(dict(id="adamw", kind="adamw", label="AdamW", grid=ADAMW_GRID, options=options("adamw")))
        out += peers[i] if i < len(peers) else []
    if bits_rank:
        out.append(
            dict(
                id=f"flora_r{bits_rank}_8bit",
                kind="flora_8bit",
                label=f"Flora r={bits_rank} 8-bit",
                grid=RELATIVE_GRID,
                options=dict(options("flora_8bit", bits_rank), **FLORA_PRETRAIN),
            )
        )
    if lora_rank:
        out.append(
            dict(
                id=f"lora_r{lora_rank}",
                kind="lora",
                label=f"LoRA r={lora_rank}",
                grid=LORA_GRID,
                options=dict(options("lora"), rank=lora_rank, alpha=lora_rank),
            )
        )
    return out


def step_contenders(rank=256):
    return [
        dict(id="adamw", kind="adamw", label="AdamW (fused)", options={}),
        dict(id="adamw8bit_torchao", kind="adamw8bit_torchao", label="AdamW 8-bit (torchao)", options={}),
        dict(id="adamw8bit_bnb", kind="adamw8bit_bnb", label="AdamW 8-bit (bitsandbytes)", options={}),
        dict(id="adafactor", kind="adafactor", label="Adafactor (transformers)", options={}),
        dict(id="adafactor_m", kind="adafactor_momentum", label="Adafactor+momentum (transformers)", options={}),
        dict(id=f"galore_r{rank}", kind="galore", label=f"GaLore r={rank}", options={"rank": rank}),
        dict(id=f"apollo_r{rank}", kind="apollo", label=f"APOLLO r={rank}", options={"rank": rank}),
        dict(id="flora_r32", kind="flora", label="Flora r=32", options={"rank": 32}),
        dict(id=f"flora_r{rank}", kind="flora", label=f"Flora r={rank}", options={"rank": rank}),
        dict(id=f"flora_r{rank}_8bit", kind="flora_8bit", label=f"Flora r={rank} 8-bit", options={"rank": rank}),
        dict(
            id=f"flora_ref_r{rank}",
            kind="flora_ref",
            label=f"reference flora-opt 0.0.3 r={rank}",
            options={"rank": rank},
        ),
    ]


def throughput_contenders(rank=32):
    return [
        dict(id="adamw", kind="adamw", label="AdamW (fused)", options={}),
        dict(id="adafactor_m", kind="adafactor_momentum", label="Adafactor+momentum", options={}),
        dict(id=f"flora_r{rank}", kind="flora", label=f"Flora r={rank}", options={"rank": rank}),
        dict(id=f"flora_r{rank}_8bit", kind="flora_8bit", label=f"Flora r={rank} 8-bit", options={"rank": rank}),
        dict(id=f"galore_r{rank}", kind="galore", label=f"GaLore r={rank}", options={"rank": rank}),
        dict(id=f"apollo_r{rank}", kind="apollo", label=f"APOLLO r={rank}", options={"rank": rank}),
    ]


# ---- running workers -------------------------------------------------------------------------


def worker_python(explicit: str | None) -> str:
    if explicit:
        return explicit
    venv = os.environ.get("FLORA_PEERS_VENV", "/work/venv-peers")
    candidate = Path(venv) / "bin" / "python"
    return str(candidate) if candidate.exists() else sys.executable


def _key(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


class Slots:
    """At most ``n`` holders at once; waiting callers are let in by ascending ``priority`` (ties:
    first come), so a run that completes a started result can go before fresh ones."""

    def __init__(self, n: int):
        self.free = n
        self.cond = threading.Condition()
        self.waiting: list[tuple] = []
        self.tickets = itertools.count()

    @contextlib.contextmanager
    def hold(self, priority=0):
        with self.cond:
            ticket = (priority, next(self.tickets))
            heapq.heappush(self.waiting, ticket)
            self.cond.wait_for(lambda: self.free > 0 and self.waiting[0] == ticket)
            heapq.heappop(self.waiting)
            self.free -= 1
            self.cond.notify_all()
        try:
            yield
        finally:
            with self.cond:
                self.free += 1
                self.cond.notify_all()


NOT_RUN = "not run (--cached-only)"


class Runner:
    """Runs worker processes (at most ``jobs`` at once) and caches their JSON under ``runs/``.

    ``resume``: reuse a finished run of the same configuration; ``cached_only``: never start a
    worker, a run without a cached result is recorded as not run."""

    def __init__(
        self, out: Path, task: str, python: str, jobs: int, resume: bool, log=print, cached_only: bool = False
    ):
        self.dir = out / "runs" / task
        self.dir.mkdir(parents=True, exist_ok=True)
        self.task = task
        self.python = python
        self.resume = resume or cached_only
        self.cached_only = cached_only
        self.slots = Slots(jobs)
        self.lock = threading.Lock()
        self.done = 0
        self.log = log

    def run(self, spec: dict, config: dict, name: str, priority=0) -> dict:
        path = self.dir / f"{name}.json"
        key = _key(dict(spec=spec, config=config))
        if self.resume and path.exists():
            cached = json.loads(path.read_text())
            # no key: the worker finished after its orchestrator was stopped; its spec and config say what ran
            ran = cached.get("key") or _key(dict(spec=cached.get("spec"), config=cached.get("config")))
            if ran == key and cached.get("ok"):
                return cached
        if self.cached_only:
            return dict(ok=False, spec=spec, config=config, error=NOT_RUN)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "lab")]) + (
            os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
        )
        threads = str(config.get("threads") or "")
        if threads:
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        cmd = [
            self.python,
            str(HERE / "worker.py"),
            "--task",
            self.task,
            "--spec",
            json.dumps(spec),
            "--config",
            json.dumps(config),
            "--out",
            str(path),
        ]
        with self.slots.hold(priority):
            started = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
            elapsed = time.perf_counter() - started
        try:
            result = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            result = dict(ok=False, spec=spec, config=config)
        if proc.returncode != 0 and not result.get("error"):
            result["ok"] = False
            result["error"] = f"worker exited with {proc.returncode}: {proc.stderr[-1500:]}"
        result["key"] = key
        result["command"] = shlex.join(cmd)
        if not result.get("ok"):
            result["stderr_tail"] = proc.stderr[-3000:]
        path.write_text(json.dumps(result, indent=1))
        with self.lock:
            self.done += 1
            status = "ok" if result.get("ok") else f"FAILED: {result.get('error', '')[:200]}"
            self.log(f"  [{self.task} {self.done}] {name}: {status} ({elapsed:.0f} s)", flush=True)
        return result


def environment(python: str) -> dict:
    info = dict(
        orchestrator_python=sys.executable,
        worker_python=python,
        machine=platform.machine(),
        cpu_count=os.cpu_count(),
        platform=platform.platform(),
    )
    try:
        out = subprocess.run(
            [python, "-c", "import torch, sys; print(torch.__version__, sys.version.split()[0])"],
            capture_output=True,
            text=True,
            timeout=120,
        )
        info["worker_torch"], info["worker_python_version"] = out.stdout.split()
    except Exception:
        pass
    try:
        with open("/proc/loadavg") as fh:
            info["loadavg_at_start"] = fh.read().split()[:3]
    except OSError:
        pass
    return info


def _write(out: Path, task: str, payload: dict, markdown: str) -> None:
    (out / f"{task}.json").write_text(json.dumps(payload, indent=1, default=str))
    (out / f"{task}.md").write_text(markdown + "\n")
    print(markdown)
    print(f"\nwrote {out / (task + '.json')}, {out / (task + '.md')}", flush=True)


def _mib(n) -> str:
    return "" if n is None else f"{n / 2**20:,.2f}"


def _plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        return plt
    except ImportError:
        print("matplotlib is not installed: no plot written", file=sys.stderr)
        return None


# ---- step ------------------------------------------------------------------------------------


def run_step(args, command: str) -> dict:
    from benchmarks.peers import registry

    out = Path(args.out)
    python = worker_python(args.python)
    runner = Runner(out, "step", python, 1, args.resume)
    env = environment(python)
    config = dict(
        model=args.model,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        threads=args.threads,
        seed=0,
        device=args.device,
    )
    rows = []
    for spec in step_contenders(args.rank):
        if args.only and spec["id"] not in args.only:
            continue
        if spec["kind"] == "flora_ref":
            if args.device != "cpu" or not Path(registry.ref_python()).exists():
                rows.append(dict(ok=False, spec=spec, error="reference venv not available here (CPU only)"))
                continue
            started = time.perf_counter()
            try:
                ref = registry.run_ref_worker(
                    config["model"],
                    steps=args.steps,
                    rank=spec["options"]["rank"],
                    kappa=1000,
                    lr=1e-3,
                    beta1=0.9,
                    batch_size=args.batch_size,
                    seq_len=args.seq_len,
                    seed=0,
                    threads=args.threads,
                )
                result = dict(
                    ok=True,
                    spec=spec,
                    state_bytes=ref["state_bytes"],
                    step_s_median=ref["step_time_s_median"],
                    first_step_s=ref["first_step_s"],
                    n_params=ref["model"]["n_params"],
                    param_bytes=ref["param_bytes"],
                    state_bytes_formula=None,
                    reference=ref,
                    command=shlex.join([registry.ref_python(), str(HERE / "peers" / "ref_worker.py"), *ref["argv"]]),
                )
            except Exception as error:
                result = dict(ok=False, spec=spec, error=f"{type(error).__name__}: {error}")
            print(
                f"  [step] {spec['id']}: {'ok' if result['ok'] else result['error'][:200]} "
                f"({time.perf_counter() - started:.0f} s)",
                flush=True,
            )
        else:
            result = runner.run(spec, config, spec["id"])
        rows.append(result)
    ok = [r for r in rows if r.get("ok")]
    base = {r["spec"]["id"]: r for r in ok}
    adamw = base.get("adamw") or (ok[0] if ok else None)
    adafactor = base.get("adafactor_m")
    lines = ["no successful runs"]
    if ok:
        lines = [
            f"Model `{args.model}` ({ok[0]['n_params']:,} parameters, {_mib(ok[0]['param_bytes'])} MiB fp32), "
            f"batch {args.batch_size} x {args.seq_len} tokens (real forward/backward), median "
            f"`optimizer.step()` time of steps 2-{args.steps}, "
            + (
                f"{args.threads} CPU thread(s)."
                if args.device == "cpu"
                else f"on {ok[0].get('device_name') or args.device}."
            ),
            "",
            "| optimizer | state MiB | state / AdamW | formula = measured | step (s) | step / AdamW | "
            "step / Adafactor+m | first step (s) |",
            "|---|---:|---:|:---:|---:|---:|---:|---:|",
        ]
    for r in rows:
        if not r.get("ok"):
            lines.append(f"| {r['spec']['label']} | unavailable: {r.get('error', '')[:120]} |||||||")
            continue
        formula = r.get("state_bytes_formula")
        check = "n/a" if formula is None else ("yes" if formula == r["state_bytes"] else f"no ({_mib(formula)})")
        lines.append(
            f"| {r['spec']['label']} | {_mib(r['state_bytes'])} | "
            f"{r['state_bytes'] / adamw['state_bytes']:.3f} | {check} | {r['step_s_median']:.3f} | "
            f"{r['step_s_median'] / adamw['step_s_median']:.2f} | "
            + (f"{r['step_s_median'] / adafactor['step_s_median']:.2f} | " if adafactor else " | ")
            + f"{r['first_step_s']:.2f} |"
        )
    payload = dict(task="step", command=command, config=config, environment=env, rows=rows)
    _write(out, "step", payload, "\n".join(lines))
    plt = _plt()
    if plt and ok:
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        labels = [r["spec"]["label"] for r in ok]
        y = range(len(ok))
        a.barh(y, [r["state_bytes"] / 2**20 for r in ok])
        a.set_yticks(list(y), labels)
        a.invert_yaxis()
        a.set_xlabel("optimizer state (MiB)")
        b.barh(y, [r["step_s_median"] for r in ok], color="tab:orange")
        b.set_yticks(list(y), [])
        b.invert_yaxis()
        b.set_xlabel("optimizer.step() median (s)")
        where = f"CPU, {args.threads} thread(s)" if args.device == "cpu" else (ok[0].get("device_name") or args.device)
        fig.suptitle(f"{args.model}: state bytes and step time ({where})")
        fig.tight_layout()
        fig.savefig(out / "step.png", dpi=110)
    return payload


# ---- throughput ------------------------------------------------------------------------------

THROUGHPUT_MODEL = dict(vocab_size=1024, dim=256, n_layers=4, n_heads=4, max_seq_len=256)


def run_throughput(args, command: str) -> dict:
    out = Path(args.out)
    python = worker_python(args.python)
    runner = Runner(out, "throughput", python, 1, args.resume)
    env = environment(python)
    config = dict(
        model=THROUGHPUT_MODEL,
        seq_len=128,
        tokens_per_step=args.tokens_per_step,
        warmup=1,
        steps=args.steps,
        threads=args.threads,
        seed=0,
        device=args.device,
    )
    rows = []
    for spec in throughput_contenders(args.rank):
        if args.only and spec["id"] not in args.only:
            continue
        spec = dict(spec, lr=1e-3)
        if spec["kind"] in ("galore", "apollo"):
            spec["options"] = dict(spec["options"], update_proj_gap=200)
        rows.append(runner.run(spec, config, spec["id"]))
    ok = [r for r in rows if r.get("ok")]
    base = {r["spec"]["id"]: r for r in ok}
    sizes = args.tokens_per_step
    lines = []
    if ok:
        lines += [
            f"LLaMA-style model, dim {THROUGHPUT_MODEL['dim']}, {THROUGHPUT_MODEL['n_layers']} layers "
            f"({ok[0]['n_params']:,} parameters), sequence 128, median of {args.steps} steps after 1 warm-up, "
            + (f"{args.threads} CPU thread(s)" if args.device == "cpu" else f"device {args.device}")
            + ". Cells: tokens/s (optimizer share of the iteration).",
            "",
            "| optimizer | " + " | ".join(f"{s:,} tok/step" for s in sizes) + " |",
            "|---|" + "---:|" * len(sizes),
        ]
        for r in ok:
            cells = [f"{s['tokens_per_s']:,.0f} ({100 * s['optimizer_fraction']:.0f}%)" for s in r["sizes"]]
            lines.append(f"| {r['spec']['label']} | " + " | ".join(cells) + " |")
        lines += [
            "",
            "Iteration time relative to AdamW (1.00 = as fast):",
            "",
            "| optimizer | " + " | ".join(f"{s:,}" for s in sizes) + " |",
            "|---|" + "---:|" * len(sizes),
        ]
        adamw = base.get("adamw")
        for r in ok:
            if adamw:
                cells = [f"{s['iteration_s'] / a['iteration_s']:.2f}" for s, a in zip(r["sizes"], adamw["sizes"])]
                lines.append(f"| {r['spec']['label']} | " + " | ".join(cells) + " |")
    for r in rows:
        if not r.get("ok"):
            lines.append(f"\n{r['spec']['label']}: unavailable ({r.get('error', '')[:200]})")
    payload = dict(task="throughput", command=command, config=config, environment=env, rows=rows)
    _write(out, "throughput", payload, "\n".join(lines))
    plt = _plt()
    if plt and ok and "adamw" in base:
        fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
        for r in ok:
            xs = [s["tokens_per_step"] for s in r["sizes"]]
            a.plot(xs, [s["tokens_per_s"] for s in r["sizes"]], marker="o", label=r["spec"]["label"])
            b.plot(
                xs,
                [s["iteration_s"] / t["iteration_s"] for s, t in zip(r["sizes"], base["adamw"]["sizes"])],
                marker="o",
                label=r["spec"]["label"],
            )
        for ax in (a, b):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("tokens per step")
            ax.grid(alpha=0.3)
        a.set_ylabel("training tokens/s")
        b.set_ylabel("iteration time / AdamW")
        b.axhline(1.0, color="k", lw=0.8)
        a.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / "throughput.png", dpi=110)
    return payload


# ---- quality ---------------------------------------------------------------------------------


def prepare_quality_data(args) -> tuple[dict, str, str]:
    """Tokenize the corpus once (UTF-8 bytes, or a BPE trained on its train split) and cache the
    ids as .npy."""
    import numpy as np

    from flora_lab.data import DataUnavailableError
    from flora_lab.demo import prepare_data

    cache = Path(args.cache or os.environ.get("FLORA_OPT_BENCH_CACHE", Path.home() / ".cache" / "flora-opt" / "bench"))
    cache.mkdir(parents=True, exist_ok=True)
    dataset, note = args.dataset, None
    suffix = "bytes" if args.tokenizer == "bytes" else f"bpe{args.vocab_size}"
    for attempt in (dataset, "shakespeare_sample"):
        stem = cache / f"{attempt}_{suffix}"
        meta = stem.with_suffix(".json")
        if meta.exists():
            info = json.loads(meta.read_text())
            break
        try:
            train, val, info = prepare_data(attempt, args.vocab_size, kind=args.tokenizer)
        except DataUnavailableError as error:
            note = f"{dataset} unavailable ({error}); fell back to the bundled shakespeare_sample"
            print(note, file=sys.stderr)
            continue
        np.save(f"{stem}_train.npy", train)
        np.save(f"{stem}_val.npy", val)
        meta.write_text(json.dumps(info))
        break
    if note:
        info["note"] = note
    return info, f"{stem}_train.npy", f"{stem}_val.npy"


def _next_lr(grid: list[float], edge: str) -> float:
    ratio = grid[1] / grid[0]
    value = grid[0] / ratio if edge == "low" else grid[-1] * ratio
    return float(f"{value:.3g}")


def model_facts(model: dict) -> dict:
    """Parameter counts of the benchmark model and the smallest side of its block matrices."""
    from flora_lab.lm import LMConfig, TinyLlama

    net = TinyLlama(LMConfig(**model))
    blocks = {n: p for n, p in net.named_parameters() if n.startswith("blocks.") and p.ndim == 2}
    n_params = net.num_params()
    block_params = sum(p.numel() for p in blocks.values())
    return dict(
        n_params=n_params,
        block_params=block_params,
        block_fraction=block_params / n_params,
        min_block_dim=min(min(p.shape) for p in blocks.values()),
        ffn_dim=net.cfg.ffn_dim,
    )


def run_quality(args, command: str) -> dict:
    """Tune each contender's learning rate on seed 0 (2x grid, extended at an edge), then train
    ``--seeds`` seeds at the best one; write ``results.json``, ``report.md``, ``pareto.png`` and
    ``curves.png`` to ``--out``/quality (``--out``/quality-demo for ``--preset demo``)."""
    from flora_lab.demo import DEMO_MODEL

    preset = PRESETS[args.preset]
    for key, value in preset.items():
        if key != "lm" and getattr(args, key, None) is None:
            setattr(args, key, value)
    out = Path(args.out) / ("quality" if args.preset == "pretrain" else f"quality-{args.preset}")
    out.mkdir(parents=True, exist_ok=True)
    python = worker_python(args.python)
    info, train_path, val_path = prepare_quality_data(args)
    runner = Runner(out, "quality", python, args.jobs, args.resume, cached_only=args.cached_only)
    env = environment(python)
    model = dict(preset["lm"] or DEMO_MODEL, vocab_size=info["vocab_size"])
    base_config = dict(
        model=model,
        steps=args.steps,
        batch_size=args.batch_size,
        seq_len=args.seq_len,
        eval_every=args.eval_every,
        eval_batches=8,
        final_eval_batches=args.final_eval_batches,
        clip_norm=1.0,
        threads=args.threads,
        train_ids=train_path,
        val_ids=val_path,
        dataset=info["dataset"],
    )
    contenders = [
        c
        for c in quality_contenders(
            args.preset, args.ranks, args.peer_ranks, args.bits_rank, args.lora_rank, args.interval
        )
        if not args.only or c["id"] in args.only
    ]
    for text in args.contender:
        extra = json.loads(text)
        extra.setdefault("options", {})
        extra.setdefault("label", extra["id"])
        relative = extra["kind"] in ("flora", "flora_8bit", "adafactor", "adafactor_momentum")
        extra.setdefault("grid", RELATIVE_GRID if relative else ADAMW_GRID)
        contenders.append(extra)
    if args.grid:
        contenders = [dict(c, grid=list(args.grid)) for c in contenders]
    results: dict[str, dict] = {c["id"]: dict(contender=c, grid=[], seeds=[]) for c in contenders}
    facts = model_facts(model)
    write_lock = threading.Lock()
    started = time.perf_counter()

    def job(c, lr, seed, priority):
        spec = dict(id=c["id"], kind=c["kind"], label=c["label"], options=c["options"], lr=lr)
        config = dict(base_config, seed=seed)
        return runner.run(spec, config, f"{c['id']}_lr{lr:g}_seed{seed}", priority)

    def write():
        payload = dict(
            task="quality",
            preset=args.preset,
            command=command,
            seeds=args.seeds,
            config=base_config,
            data=info,
            model=facts,
            wall_s=time.perf_counter() - started,
            environment=env,
            contenders=contenders,
            summary=summarize_quality(results),
            runs={
                cid: dict(grid=r["grid"], best_lr=r.get("best_lr"), seeds=[_slim(s) for s in r["seeds"]])
                for cid, r in results.items()
            },
        )
        with write_lock:
            (out / "results.json").write_text(json.dumps(payload, indent=1, default=str))
            (out / "report.md").write_text(quality_markdown(payload) + "\n")
            plot_quality(payload, out)
        return payload

    def pipeline(index, c):
        # grid runs queue behind the runs that complete a started contender (priority 0)
        record = results[c["id"]]
        grid = list(c["grid"])
        with ThreadPoolExecutor(len(grid)) as pool:
            runs = list(pool.map(lambda lr: job(c, lr, 0, (1, index)), grid))
        tried = dict(zip(grid, runs))

        def best():
            finite = {lr: r for lr, r in tried.items() if r.get("ok") and math.isfinite(r["final_val_loss"])}
            return min(finite, key=lambda lr: finite[lr]["final_val_loss"]) if finite else None

        for _ in range(args.extend):  # the best LR at an edge of the grid: try one step beyond it
            lr = best()
            if lr is None or len(tried) < 2 or any(r.get("error") == NOT_RUN for r in tried.values()):
                break  # (a grid of one LR is that LR, not tuned)
            lrs = sorted(tried)
            if lr == lrs[0]:
                new = _next_lr(lrs, "low")
            elif lr == lrs[-1]:
                new = _next_lr(lrs, "high")
            else:
                break
            tried[new] = job(c, new, 0, (0, index))
        record["grid"] = [
            dict(
                lr=lr,
                final_val_loss=tried[lr].get("final_val_loss"),
                ok=tried[lr].get("ok"),
                error=tried[lr].get("error"),
            )
            for lr in sorted(tried)
        ]
        # under --cached-only a grid with runs missing is not tuned: no best LR, no row
        lr = None if any(r.get("error") == NOT_RUN for r in tried.values()) else best()
        record["best_lr"] = lr
        if lr is not None:
            seeds = [tried[lr]]
            with ThreadPoolExecutor(max(1, args.seeds - 1)) as pool:
                seeds += list(pool.map(lambda s: job(c, lr, s, (0, index)), range(1, args.seeds)))
            record["seeds"] = seeds
        write()

    with ThreadPoolExecutor(len(contenders)) as pool:
        list(pool.map(pipeline, range(len(contenders)), contenders))
    payload = write()
    print(quality_markdown(payload))
    print(
        f"\nwrote {out / 'results.json'}, {out / 'report.md'}, {out / 'pareto.png'}, {out / 'curves.png'}", flush=True
    )
    return payload


def _slim(run: dict) -> dict:
    keep = (
        "ok",
        "error",
        "config",
        "final_val_loss",
        "val_curve",
        "train_losses",
        "train_losses_every",
        "state_bytes",
        "state_bytes_formula",
        "peak_live_bytes",
        "tokens_per_s",
        "optimizer_fraction",
        "trainable_params",
        "n_params",
        "wall_s",
        "command",
        "diverged",
    )
    slim = {k: run.get(k) for k in keep}
    slim["seed"] = (run.get("config") or {}).get("seed")
    slim.pop("config")
    return slim


def summarize_quality(results: dict) -> list[dict]:
    """One row per contender: the best LR, the seeds' final validation losses (mean, std), the
    state bytes counted from the optimizer's tensors and the ``flora_lab.peer_memory`` formula's."""
    rows = []
    for cid, r in results.items():
        finals = [s["final_val_loss"] for s in r["seeds"] if s.get("ok") and math.isfinite(s["final_val_loss"])]
        ok = [s for s in r["seeds"] if s.get("ok")]
        c = r["contender"]
        rows.append(
            dict(
                id=cid,
                kind=c["kind"],
                label=c["label"],
                rank=c["options"].get("rank"),
                best_lr=r.get("best_lr"),
                grid=r["grid"],
                n_seeds=len(finals),
                mean=statistics.fmean(finals) if finals else None,
                std=statistics.stdev(finals) if len(finals) > 1 else None,
                min=min(finals) if finals else None,
                max=max(finals) if finals else None,
                finals=finals,
                state_bytes=ok[0]["state_bytes"] if ok else None,
                state_bytes_formula=ok[0].get("state_bytes_formula") if ok else None,
                peak_live_bytes=ok[0].get("peak_live_bytes") if ok else None,
                tokens_per_s=statistics.fmean([s["tokens_per_s"] for s in ok if s.get("tokens_per_s")]) if ok else None,
                trainable_params=ok[0].get("trainable_params") if ok else None,
            )
        )
    done = [row for row in rows if row["mean"] is not None]
    front = pareto_front(done)
    for row in rows:
        row["pareto"] = row["id"] in front
    return rows


def pareto_front(rows: list[dict]) -> set[str]:
    """Ids of the rows no other row dominates (state bytes <= and mean loss <=, one of them <)."""

    def dominates(a, b):
        return (
            a["state_bytes"] <= b["state_bytes"]
            and a["mean"] <= b["mean"]
            and (a["state_bytes"] < b["state_bytes"] or a["mean"] < b["mean"])
        )

    return {r["id"] for r in rows if not any(dominates(o, r) for o in rows if o is not r)}


def _is_flora(row: dict) -> bool:
    return row["kind"] in ("flora", "flora_8bit")


def quality_targets(summary: list[dict], min_block_dim: int) -> list[str]:
    """The quality targets: Flora within 1% of Adafactor with full momentum at rank <= min(m, n)/4;
    no peer with at most Flora's state bytes and a lower mean validation loss."""
    done = [r for r in summary if r["mean"] is not None]
    ada = next((r for r in done if r["id"] == "adafactor_m"), None)
    peers = [r for r in done if not _is_flora(r)]
    lines = []
    for f in (r for r in done if _is_flora(r)):
        if ada:
            gap = (f["mean"] - ada["mean"]) / ada["mean"]
            applies = f["rank"] is not None and 4 * f["rank"] <= min_block_dim
            verdict = ("met" if gap <= 0.01 else "MISSED") if applies else "for reference"
            lines.append(
                f"- {f['label']} vs Adafactor+momentum: {100 * gap:+.2f}% ({f['mean']:.4f} vs {ada['mean']:.4f}; "
                f"{verdict}: target within 1% at rank <= min(m, n)/4 = {min_block_dim // 4})"
            )
        better = [p for p in peers if p["state_bytes"] <= f["state_bytes"] and p["mean"] < f["mean"]]
        if not better:
            lines.append(
                f"- {f['label']} on the Pareto front against the peers: met (no peer with at most "
                f"{f['state_bytes']:,} state bytes has a lower loss)"
            )
        for p in better:
            spread = math.hypot(f["std"] or 0.0, p["std"] or 0.0)
            lines.append(
                f"- {f['label']} on the Pareto front: MISSED: {p['label']} holds {p['state_bytes']:,} bytes "
                f"({p['state_bytes'] / f['state_bytes']:.2f}x Flora's {f['state_bytes']:,}) and reaches "
                f"{p['mean']:.4f}, {f['mean'] - p['mean']:.4f} ({100 * (f['mean'] - p['mean']) / p['mean']:.2f}%) "
                f"lower (combined seed std {spread:.4f})"
            )
    return lines


def quality_markdown(payload: dict) -> str:
    cfg, info, facts = payload["config"], payload["data"], payload["model"]
    tokens = cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]
    m = cfg["model"]
    final_tokens = (
        (cfg["final_eval_batches"] * cfg["batch_size"] * cfg["seq_len"])
        if cfg["final_eval_batches"]
        else info["val_tokens"]
    )
    tokenizer = "UTF-8 bytes" if info.get("tokenizer") == "bytes" else f"BPE-{info['vocab_size']} tokens"
    lines = [
        f"Command: `{payload['command']}`",
        "",
        f"Data: `{info['dataset']}` ({info['train_tokens']:,} train / {info['val_tokens']:,} held-out validation "
        f"{tokenizer}){' - ' + info['note'] if info.get('note') else ''}. Model: LLaMA-style, vocabulary "
        f"{m['vocab_size']}, dim {m['dim']}, FFN {facts['ffn_dim']}, {m['n_layers']} layers, {m['n_heads']} heads: "
        f"{facts['n_params']:,} parameters, {100 * facts['block_fraction']:.1f}% of them in block matrices "
        f"(smallest side {facts['min_block_dim']}). Budget: {cfg['steps']} steps x {cfg['batch_size']} x "
        f"{cfg['seq_len']} = {tokens:,} tokens per run; linear warm-up over {max(1, cfg['steps'] // 10)} steps, "
        f"cosine decay to 10%, gradients clipped to norm {cfg['clip_norm']:g}. Final validation loss on "
        f"{final_tokens:,} held-out tokens; mean +- std over seeds at each method's best LR (tuned on seed 0).",
        "",
        "| method | best LR | LR grid (seed-0 loss) | seeds | val loss mean +- std | state bytes (counted) | "
        "state MiB | formula | trainable params | tokens/s | Pareto front |",
        "|---|---:|---|---:|---:|---:|---:|:---:|---:|---:|:---:|",
    ]
    for r in payload["summary"]:
        grid = ", ".join(
            f"{g['lr']:g}: {g['final_val_loss']:.4f}"
            if g.get("ok")
            else f"{g['lr']:g}: {'not run' if g.get('error') == NOT_RUN else 'failed'}"
            for g in r["grid"]
        )
        if r["mean"] is None:
            lines.append(f"| {r['label']} | | {grid} | 0 | not finished | | | | | | |")
            continue
        std = f"{r['std']:.4f}" if r["std"] is not None else "n/a"
        formula = r["state_bytes_formula"]
        check = "n/a" if formula is None else ("= counted" if formula == r["state_bytes"] else f"{formula:,}")
        lines.append(
            f"| {r['label']} | {r['best_lr']:g} | {grid} | {r['n_seeds']} | {r['mean']:.4f} +- {std} | "
            f"{r['state_bytes']:,} | {_mib(r['state_bytes'])} | {check} | {r['trainable_params']:,} | "
            f"{r['tokens_per_s']:,.0f} | {'yes' if r['pareto'] else ''} |"
        )
    short = [
        f"{r['label']} ({r['n_seeds']} of {payload['seeds']})"
        for r in payload["summary"]
        if r["mean"] is not None and r["n_seeds"] < payload["seeds"]
    ]
    if short:
        lines += ["", "Seeds not all finished: " + ", ".join(short) + "."]
    lines += ["", "Targets:", "", *quality_targets(payload["summary"], facts["min_block_dim"])]
    return "\n".join(lines)


def plot_quality(payload: dict, out: Path) -> None:
    """``pareto.png`` (final validation loss against optimizer-state bytes, the front drawn) and
    ``curves.png`` (validation curves, mean over seeds)."""
    plt = _plt()
    if plt is None:
        return
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    rows = [r for r in payload["summary"] if r["mean"] is not None]
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for r in rows:
        x = r["state_bytes"] / 2**20
        ax.errorbar(
            x,
            r["mean"],
            yerr=r["std"] or 0,
            fmt="o" if _is_flora(r) else "s",
            capsize=3,
            color="tab:blue" if _is_flora(r) else "tab:gray",
            ms=6,
        )
        ax.annotate(r["label"], (x, r["mean"]), fontsize=7, xytext=(5, 3), textcoords="offset points")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r["state_bytes"])
    if front:
        ax.step(
            [r["state_bytes"] / 2**20 for r in front],
            [r["mean"] for r in front],
            where="post",
            ls="--",
            color="tab:red",
            lw=1,
            label="Pareto front",
        )
        ax.legend(fontsize=8)
    ax.set_xscale("log")
    states = [r["state_bytes"] / 2**20 for r in rows]
    if states:
        ticks = [2.0**k for k in range(-8, 12) if min(states) / 2 <= 2.0**k <= max(states) * 2]
        ax.set_xticks(ticks)
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("optimizer state (MiB, exact, log scale)")
    ax.set_ylabel("final validation loss (mean +- std over seeds)")
    ax.set_title("Flora (blue) and peers (gray): loss against state memory")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "pareto.png", dpi=110)
    plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for cid, run in payload["runs"].items():
        seeds = [s for s in run["seeds"] if s.get("ok") and s.get("val_curve")]
        if not seeds:
            continue
        label = next(r["label"] for r in payload["summary"] if r["id"] == cid)
        n = min(len(s["val_curve"]) for s in seeds)
        xs = [p["tokens"] for p in seeds[0]["val_curve"][:n]]
        ys = [statistics.fmean(s["val_curve"][i]["val_loss"] for s in seeds) for i in range(n)]
        ax.plot(xs, ys, marker="o", ms=3, label=label)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("validation loss (mean over seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


# ---- CLI -------------------------------------------------------------------------------------


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"expected a finite number > 0, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/run.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("task", choices=["step", "throughput", "quality", "all"])
    parser.add_argument("--out", default=str(HERE / "results"), help="results directory (default benchmarks/results)")
    parser.add_argument("--python", default=None, help="interpreter for the workers (default: the peers venv's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--device", default="cpu", help="step/throughput: torch device (default cpu; e.g. cuda)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs with the same configuration")
    parser.add_argument("--only", nargs="+", default=None, metavar="ID", help="run only these contender ids")
    step = parser.add_argument_group("step")
    step.add_argument("--model", default="llama-130m", help="ref_worker preset or JSON (default llama-130m)")
    step.add_argument("--batch-size", type=_positive, default=None, help="step: 1; quality: 16")
    step.add_argument("--seq-len", type=_positive, default=None, help="step: 16; quality: 128")
    step.add_argument("--rank", type=int, default=None, help="step: 256; throughput: 32")
    tp = parser.add_argument_group("throughput")
    tp.add_argument("--tokens-per-step", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    tp.add_argument(
        "--steps", type=int, default=None, help="step: 6 (first excluded); throughput: 4; quality: 512 (demo: 200)"
    )
    q = parser.add_argument_group("quality (defaults from --preset)")
    q.add_argument(
        "--preset",
        choices=list(PRESETS),
        default="pretrain",
        help="pretrain: the peer comparison (default); demo: the learning-rate sweep of flora-lab demo",
    )
    q.add_argument("--dataset", default=None, help="flora_lab.data dataset (pretrain: shakespeare)")
    q.add_argument("--tokenizer", choices=["bytes", "bpe"], default=None, help="pretrain: bytes; demo: bpe")
    q.add_argument("--vocab-size", type=_positive, default=None, help="BPE vocabulary (demo: 1024)")
    q.add_argument("--seeds", type=_positive, default=None, help="seeds at the best LR (pretrain: 3)")
    q.add_argument("--jobs", type=_positive, default=2, help="quality runs at once (default 2)")
    q.add_argument(
        "--ranks", type=_positive, nargs="+", default=None, help="Flora ranks, queued in this order (pretrain: 16 8 32)"
    )
    q.add_argument("--peer-ranks", type=_positive, nargs="+", default=None, help="GaLore/APOLLO ranks (pretrain: 16 8)")
    q.add_argument("--bits-rank", type=_positive, default=None, help="Flora 8-bit rank (pretrain: 32)")
    q.add_argument("--lora-rank", type=_positive, default=None, help="LoRA rank (pretrain: 16)")
    q.add_argument("--eval-every", type=_positive, default=None, help="validation-curve interval (pretrain: 128)")
    q.add_argument(
        "--final-eval-batches",
        type=_positive,
        default=None,
        help="final validation batches (pretrain: 32; demo: the whole split)",
    )
    q.add_argument(
        "--interval",
        type=_positive,
        default=None,
        help="Flora kappa and GaLore/APOLLO update_proj_gap (pretrain: 128; demo: 50)",
    )
    q.add_argument(
        "--grid",
        type=_positive_float,
        nargs="+",
        default=None,
        help="override every contender's LR grid (one value: that LR, not tuned)",
    )
    q.add_argument(
        "--contender",
        action="append",
        default=[],
        metavar="JSON",
        help='add a contender, e.g. \'{"id": "flora_r16_k32", "kind": "flora", '
        '"options": {"rank": 16, "kappa": 32}}\' (repeatable; run even with --only)',
    )
    q.add_argument("--extend", type=int, default=2, help="LR grid extensions when the best is at an edge (default 2)")
    q.add_argument(
        "--cached-only",
        action="store_true",
        help="start no worker: write the report from the finished runs (implies --resume)",
    )
    q.add_argument("--cache", default=None, help="token cache (default ~/.cache/flora-opt/bench)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    tasks = ["step", "throughput", "quality"] if args.task == "all" else [args.task]
    explicit = {k: getattr(args, k) for k in ("batch_size", "seq_len", "rank", "steps")}
    for task in tasks:
        defaults = dict(
            step=dict(batch_size=1, seq_len=16, rank=256, steps=6),
            throughput=dict(batch_size=None, seq_len=128, rank=32, steps=4),
            quality=dict(batch_size=None, seq_len=None, rank=None, steps=None),
        )[task]
        for key, value in defaults.items():
            setattr(args, key, explicit[key] if explicit[key] is not None else value)
        print(f"== {task}", flush=True)
        started = time.perf_counter()
        {"step": run_step, "throughput": run_throughput, "quality": run_quality}[task](args, command)
        print(f"== {task} done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
