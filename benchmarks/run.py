"""The benchmark suite: Flora against its peers on memory, speed and the loss it reaches.

    python benchmarks/run.py step          # optimizer step time and exact state bytes (LLaMA-130M)
    python benchmarks/run.py throughput    # training tokens/s at several tokens-per-step sizes
    python benchmarks/run.py quality       # validation loss at a fixed token budget (Shakespeare)
    python benchmarks/run.py all           # the three, in that order

Every contender runs in a fresh process (``benchmarks/worker.py``; the reference
``flora-opt==0.0.3`` through ``benchmarks/peers/ref_worker.py`` in its own venv), so no
contender inherits another's allocations, compiled kernels or thread pools. Workers use the
peers venv (``$FLORA_PEERS_VENV``, default ``/work/venv-peers``, made by
``benchmarks/setup_peers.sh``) with this repository on ``PYTHONPATH``; without it they use the
current interpreter and the peers that are not importable are skipped (recorded as such).

Results go to ``--out`` (default ``benchmarks/results``): ``<task>.json`` (every number, the exact
command, each worker's command line), ``<task>.md`` (the tables) and ``<task>.png`` (plots);
single runs under ``runs/<task>/``. ``--resume`` reuses finished runs whose configuration is
unchanged. ``docs/benchmarks.md`` explains the set-up and shows the committed results.
"""

from __future__ import annotations

import argparse
import hashlib
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

# Projection-refresh interval of Flora (kappa) and GaLore/APOLLO (update_proj_gap) in the quality
# and throughput runs: the libraries' defaults (1000, 200) are meant for runs of many thousand
# steps; a 200-step run would keep one subspace for all of training.
QUALITY_INTERVAL = 50

ADAFACTOR_GRID = [0.03, 0.1, 0.3]
ADAM_GRID = [1e-3, 3e-3, 1e-2]


def quality_contenders(ranks=(8, 32, 64), peer_rank=32, interval=QUALITY_INTERVAL):
    out = [
        dict(id="adamw", kind="adamw", label="AdamW", grid=ADAM_GRID, options={}),
        dict(id="adafactor_m", kind="adafactor_momentum", label="Adafactor+momentum", grid=ADAFACTOR_GRID,
             options={}),
    ]
    for rank in ranks:
        out.append(dict(id=f"flora_r{rank}", kind="flora", label=f"Flora r={rank}", grid=ADAFACTOR_GRID,
                        options={"rank": rank, "kappa": interval}))
    out += [
        dict(id=f"galore_r{peer_rank}", kind="galore", label=f"GaLore r={peer_rank}", grid=[3e-3, 1e-2, 3e-2],
             options={"rank": peer_rank, "update_proj_gap": interval}),
        dict(id=f"apollo_r{peer_rank}", kind="apollo", label=f"APOLLO r={peer_rank}", grid=ADAM_GRID,
             options={"rank": peer_rank, "update_proj_gap": interval}),
        dict(id=f"lora_r{peer_rank}", kind="lora", label=f"LoRA r={peer_rank}", grid=[3e-3, 1e-2, 3e-2],
             options={"rank": peer_rank, "alpha": peer_rank}),
    ]
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
        dict(id=f"flora_r{rank}_8bit", kind="flora_8bit", label=f"Flora r={rank} 8-bit",
             options={"rank": rank}),
        dict(id=f"flora_ref_r{rank}", kind="flora_ref", label=f"reference flora-opt 0.0.3 r={rank}",
             options={"rank": rank}),
    ]


def throughput_contenders(rank=32):
    return [
        dict(id="adamw", kind="adamw", label="AdamW (fused)", options={}),
        dict(id="adafactor_m", kind="adafactor_momentum", label="Adafactor+momentum", options={}),
        dict(id=f"flora_r{rank}", kind="flora", label=f"Flora r={rank}", options={"rank": rank}),
        dict(id=f"flora_r{rank}_8bit", kind="flora_8bit", label=f"Flora r={rank} 8-bit",
             options={"rank": rank}),
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


class Runner:
    """Runs worker processes (at most ``jobs`` at once) and caches their JSON under ``runs/``."""

    def __init__(self, out: Path, task: str, python: str, jobs: int, resume: bool, log=print):
        self.dir = out / "runs" / task
        self.dir.mkdir(parents=True, exist_ok=True)
        self.task = task
        self.python = python
        self.resume = resume
        self.slots = threading.Semaphore(jobs)
        self.lock = threading.Lock()
        self.done = 0
        self.log = log

    def run(self, spec: dict, config: dict, name: str) -> dict:
        path = self.dir / f"{name}.json"
        key = _key(dict(spec=spec, config=config))
        if self.resume and path.exists():
            cached = json.loads(path.read_text())
            if cached.get("key") == key and cached.get("ok"):
                return cached
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "lab")]) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        threads = str(config.get("threads") or "")
        if threads:
            env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
        cmd = [self.python, str(HERE / "worker.py"), "--task", self.task, "--spec", json.dumps(spec),
               "--config", json.dumps(config), "--out", str(path)]
        with self.slots:
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
    info = dict(orchestrator_python=sys.executable, worker_python=python, machine=platform.machine(),
                cpu_count=os.cpu_count(), platform=platform.platform())
    try:
        out = subprocess.run([python, "-c", "import torch, sys; print(torch.__version__, sys.version.split()[0])"],
                             capture_output=True, text=True, timeout=120)
        info["worker_torch"], info["worker_python_version"] = out.stdout.split()
    except Exception:  # noqa: BLE001
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
    config = dict(model=args.model, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                  threads=args.threads, seed=0, device=args.device)
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
                ref = registry.run_ref_worker(config["model"], steps=args.steps, rank=spec["options"]["rank"],
                                              kappa=1000, lr=1e-3, beta1=0.9, batch_size=args.batch_size,
                                              seq_len=args.seq_len, seed=0, threads=args.threads)
                result = dict(ok=True, spec=spec, state_bytes=ref["state_bytes"], step_s_median=ref["step_time_s_median"],
                              first_step_s=ref["first_step_s"], n_params=ref["model"]["n_params"],
                              param_bytes=ref["param_bytes"], state_bytes_formula=None, reference=ref,
                              command=shlex.join([registry.ref_python(), str(HERE / "peers" / "ref_worker.py"), *ref["argv"]]))
            except Exception as error:  # noqa: BLE001
                result = dict(ok=False, spec=spec, error=f"{type(error).__name__}: {error}")
            print(f"  [step] {spec['id']}: {'ok' if result['ok'] else result['error'][:200]} "
                  f"({time.perf_counter() - started:.0f} s)", flush=True)
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
            + (f"{args.threads} CPU thread(s)." if args.device == "cpu" else f"on {ok[0].get('device_name') or args.device}."),
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
    config = dict(model=THROUGHPUT_MODEL, seq_len=128, tokens_per_step=args.tokens_per_step, warmup=1,
                  steps=args.steps, threads=args.threads, seed=0, device=args.device)
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
        lines += ["", "Iteration time relative to AdamW (1.00 = as fast):", "",
                  "| optimizer | " + " | ".join(f"{s:,}" for s in sizes) + " |", "|---|" + "---:|" * len(sizes)]
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
            b.plot(xs, [s["iteration_s"] / t["iteration_s"] for s, t in zip(r["sizes"], base["adamw"]["sizes"])],
                   marker="o", label=r["spec"]["label"])
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
    """Tokenize the corpus once (BPE trained on its train split) and cache the ids as .npy."""
    import numpy as np

    from flora_lab.data import DataUnavailableError
    from flora_lab.demo import prepare_data

    cache = Path(args.cache or os.environ.get("FLORA_OPT_BENCH_CACHE", Path.home() / ".cache" / "flora-opt" / "bench"))
    cache.mkdir(parents=True, exist_ok=True)
    dataset, note = args.dataset, None
    for attempt in (dataset, "shakespeare_sample"):
        stem = cache / f"{attempt}_bpe{args.vocab_size}"
        meta = stem.with_suffix(".json")
        if meta.exists():
            info = json.loads(meta.read_text())
            break
        try:
            train, val, info = prepare_data(attempt, args.vocab_size)
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


def run_quality(args, command: str) -> dict:
    from flora_lab.demo import DEMO_MODEL

    out = Path(args.out)
    python = worker_python(args.python)
    info, train_path, val_path = prepare_quality_data(args)
    runner = Runner(out, "quality", python, args.jobs, args.resume)
    env = environment(python)
    model = dict(DEMO_MODEL, vocab_size=info["vocab_size"])
    base_config = dict(model=model, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                       eval_every=args.eval_every, eval_batches=8, final_eval_batches=args.final_eval_batches,
                       clip_norm=1.0, threads=args.threads, train_ids=train_path, val_ids=val_path,
                       dataset=info["dataset"])
    contenders = [c for c in quality_contenders(tuple(args.ranks), args.peer_rank, args.interval)
                  if not args.only or c["id"] in args.only]
    for text in args.contender:
        extra = json.loads(text)
        extra.setdefault("options", {})
        extra.setdefault("label", extra["id"])
        extra.setdefault("grid", ADAFACTOR_GRID if extra["kind"] in ("flora", "flora_8bit", "adafactor", "adafactor_momentum") else ADAM_GRID)
        contenders.append(extra)
    if args.grid:
        contenders = [dict(c, grid=list(args.grid)) for c in contenders]
    results: dict[str, dict] = {c["id"]: dict(contender=c, grid=[], seeds=[]) for c in contenders}

    def job(c, lr, seed):
        spec = dict(id=c["id"], kind=c["kind"], label=c["label"], options=c["options"], lr=lr)
        config = dict(base_config, seed=seed)
        return runner.run(spec, config, f"{c['id']}_lr{lr:g}_seed{seed}")

    def pipeline(c):
        record = results[c["id"]]
        grid = list(c["grid"])
        with ThreadPoolExecutor(len(grid)) as pool:
            runs = list(pool.map(lambda lr: job(c, lr, 0), grid))
        tried = dict(zip(grid, runs))

        def best():
            finite = {lr: r for lr, r in tried.items() if r.get("ok") and math.isfinite(r["final_val_loss"])}
            return min(finite, key=lambda lr: finite[lr]["final_val_loss"]) if finite else None

        for _ in range(args.extend):  # the best LR at an edge of the grid: try one step beyond it
            lr = best()
            if lr is None:
                break
            lrs = sorted(tried)
            if lr == lrs[0]:
                new = _next_lr(lrs, "low")
            elif lr == lrs[-1]:
                new = _next_lr(lrs, "high")
            else:
                break
            tried[new] = job(c, new, 0)
        record["grid"] = [dict(lr=lr, final_val_loss=tried[lr].get("final_val_loss"), ok=tried[lr].get("ok"),
                               error=tried[lr].get("error")) for lr in sorted(tried)]
        lr = best()
        record["best_lr"] = lr
        if lr is None:
            return
        seeds = [tried[lr]]
        with ThreadPoolExecutor(max(1, args.seeds - 1)) as pool:
            seeds += list(pool.map(lambda s: job(c, lr, s), range(1, args.seeds)))
        record["seeds"] = seeds

    started = time.perf_counter()
    with ThreadPoolExecutor(len(contenders)) as pool:
        list(pool.map(pipeline, contenders))
    wall = time.perf_counter() - started
    summary = summarize_quality(results)
    payload = dict(task="quality", command=command, config=base_config, data=info, wall_s=wall,
                   environment=env, contenders=contenders, summary=summary,
                   runs={cid: dict(grid=r["grid"], best_lr=r.get("best_lr"),
                                   seeds=[_slim(s) for s in r["seeds"]]) for cid, r in results.items()})
    _write(out, "quality", payload, quality_markdown(payload))
    plot_quality(payload, out / "quality.png")
    return payload


def _slim(run: dict) -> dict:
    keep = ("ok", "error", "config", "final_val_loss", "val_curve", "train_losses", "train_losses_every",
            "state_bytes", "state_bytes_formula", "peak_live_bytes", "tokens_per_s", "optimizer_fraction",
            "trainable_params", "n_params", "wall_s", "command", "diverged")
    slim = {k: run.get(k) for k in keep}
    slim["seed"] = (run.get("config") or {}).get("seed")
    slim.pop("config")
    return slim


def summarize_quality(results: dict) -> list[dict]:
    rows = []
    for cid, r in results.items():
        finals = [s["final_val_loss"] for s in r["seeds"] if s.get("ok") and math.isfinite(s["final_val_loss"])]
        ok = [s for s in r["seeds"] if s.get("ok")]
        rows.append(dict(
            id=cid,
            label=r["contender"]["label"],
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
        ))
    return rows


def quality_targets(summary: list[dict]) -> list[str]:
    by = {r["id"]: r for r in summary if r["mean"] is not None}
    lines = []
    ada = by.get("adafactor_m")
    peers = [by[k] for k in by if k.startswith(("galore", "apollo"))]
    for fid, f in by.items():
        if not fid.startswith("flora"):
            continue
        if ada:
            gap = (f["mean"] - ada["mean"]) / ada["mean"]
            lines.append(f"- {f['label']} vs Adafactor+momentum: {100 * gap:+.2f}% "
                         f"({'met' if gap <= 0.01 else 'MISSED'}: target within 1%)")
        for p in peers:
            if f["state_bytes"] is not None and p["state_bytes"] is not None and f["state_bytes"] <= p["state_bytes"]:
                ok = f["mean"] <= p["mean"]
                lines.append(f"- {f['label']} ({_mib(f['state_bytes'])} MiB) vs {p['label']} ({_mib(p['state_bytes'])} MiB): "
                             f"{f['mean']:.4f} vs {p['mean']:.4f} ({'met' if ok else 'MISSED'}: target at or below)")
    return lines


def quality_markdown(payload: dict) -> str:
    cfg, info = payload["config"], payload["data"]
    tokens = cfg["steps"] * cfg["batch_size"] * cfg["seq_len"]
    lines = [
        f"Data: `{info['dataset']}` ({info['train_tokens']:,} train / {info['val_tokens']:,} validation BPE-"
        f"{info['vocab_size']} tokens){' - ' + info['note'] if info.get('note') else ''}. Model: LLaMA-style, "
        f"dim {cfg['model']['dim']}, {cfg['model']['n_layers']} layers. Budget: {cfg['steps']} steps x "
        f"{cfg['batch_size']} x {cfg['seq_len']} = {tokens:,} tokens per run. Final validation loss on "
        f"{(cfg['final_eval_batches'] or 0) * cfg['batch_size'] * cfg['seq_len']:,} held-out tokens; mean +- std over seeds "
        f"at each method's best LR (tuned on seed 0).",
        "",
        "| method | best LR | LR grid (seed-0 loss) | seeds | val loss mean +- std | min / max | state MiB | trainable params | tokens/s |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in payload["summary"]:
        grid = ", ".join(f"{g['lr']:g}: {g['final_val_loss']:.3f}" if g.get("ok") else f"{g['lr']:g}: failed"
                         for g in r["grid"])
        if r["mean"] is None:
            lines.append(f"| {r['label']} | | {grid} | 0 | failed | | | | |")
            continue
        std = f"{r['std']:.4f}" if r["std"] is not None else "n/a"
        lines.append(
            f"| {r['label']} | {r['best_lr']:g} | {grid} | {r['n_seeds']} | {r['mean']:.4f} +- {std} | "
            f"{r['min']:.4f} / {r['max']:.4f} | {_mib(r['state_bytes'])} | {r['trainable_params']:,} | "
            f"{r['tokens_per_s']:,.0f} |"
        )
    lines += ["", "Targets (issue 5):", ""] + quality_targets(payload["summary"])
    return "\n".join(lines)


def replot(out: Path) -> None:
    """Redraw quality.png from quality.json (e.g. after changing the plot code)."""
    plot_quality(json.loads((out / "quality.json").read_text()), out / "quality.png")


def plot_quality(payload: dict, path: Path) -> None:
    plt = _plt()
    if plt is None:
        return
    fig, (a, b) = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw=dict(width_ratios=[3, 2]))
    for cid, run in payload["runs"].items():
        seeds = [s for s in run["seeds"] if s.get("ok") and s.get("val_curve")]
        if not seeds:
            continue
        label = next(r["label"] for r in payload["summary"] if r["id"] == cid)
        n = min(len(s["val_curve"]) for s in seeds)
        xs = [p["tokens"] for p in seeds[0]["val_curve"][:n]]
        ys = [statistics.fmean(s["val_curve"][i]["val_loss"] for s in seeds) for i in range(n)]
        a.plot(xs, ys, marker="o", ms=3, label=label)
    a.set_xlabel("training tokens")
    a.set_ylabel("validation loss (mean over seeds)")
    a.grid(alpha=0.3)
    a.legend(fontsize=8)
    for r in payload["summary"]:
        if r["mean"] is None:
            continue
        b.errorbar(r["state_bytes"] / 2**20, r["mean"], yerr=r["std"] or 0, fmt="o", capsize=3, label=r["label"])
        b.annotate(r["label"], (r["state_bytes"] / 2**20, r["mean"]), fontsize=7, xytext=(4, 4),
                   textcoords="offset points")
    b.set_xscale("log")
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    states = [r["state_bytes"] / 2**20 for r in payload["summary"] if r["mean"] is not None]
    if states:
        b.set_xticks([2.0**k for k in range(-6, 12) if min(states) / 2 <= 2.0**k <= max(states) * 2])
    b.xaxis.set_major_formatter(ScalarFormatter())
    b.xaxis.set_minor_formatter(NullFormatter())
    b.set_xlabel("optimizer state (MiB, log scale)")
    b.set_ylabel("final validation loss")
    b.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


# ---- CLI -------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="benchmarks/run.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("task", choices=["step", "throughput", "quality", "all"])
    parser.add_argument("--out", default=str(HERE / "results"), help="results directory (default benchmarks/results)")
    parser.add_argument("--python", default=None, help="interpreter for the workers (default: the peers venv's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker (default 1)")
    parser.add_argument("--device", default="cpu", help="step/throughput: torch device (default cpu; e.g. cuda)")
    parser.add_argument("--resume", action="store_true", help="reuse finished runs with the same configuration")
    parser.add_argument("--only", nargs="+", default=None, metavar="ID", help="run only these contender ids")
    step = parser.add_argument_group("step")
    step.add_argument("--model", default="llama-130m", help="ref_worker preset or JSON (default llama-130m)")
    step.add_argument("--batch-size", type=int, default=None, help="step: 1; quality: 16")
    step.add_argument("--seq-len", type=int, default=None, help="step: 16; quality: 128")
    step.add_argument("--rank", type=int, default=None, help="step: 256; throughput: 32")
    tp = parser.add_argument_group("throughput")
    tp.add_argument("--tokens-per-step", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    tp.add_argument("--steps", type=int, default=None, help="step: 6 (first excluded); throughput: 4; quality: 200")
    q = parser.add_argument_group("quality")
    q.add_argument("--dataset", default="shakespeare", help="flora_lab.data dataset (default shakespeare)")
    q.add_argument("--vocab-size", type=int, default=1024)
    q.add_argument("--seeds", type=int, default=3)
    q.add_argument("--jobs", type=int, default=2, help="quality runs at once (default 2)")
    q.add_argument("--ranks", type=int, nargs="+", default=[8, 32, 64], help="Flora ranks (default 8 32 64)")
    q.add_argument("--peer-rank", type=int, default=32, help="GaLore/APOLLO/LoRA rank (default 32)")
    q.add_argument("--eval-every", type=int, default=50)
    q.add_argument("--final-eval-batches", type=int, default=32)
    q.add_argument("--interval", type=int, default=QUALITY_INTERVAL,
                   help=f"Flora kappa and GaLore/APOLLO update_proj_gap (default {QUALITY_INTERVAL})")
    q.add_argument("--grid", type=float, nargs="+", default=None, help="override every contender's LR grid")
    q.add_argument("--contender", action="append", default=[], metavar="JSON",
                   help='add a contender, e.g. \'{"id": "flora_r32_k10", "kind": "flora", '
                        '"options": {"rank": 32, "kappa": 10}}\' (repeatable; run even with --only)')
    q.add_argument("--extend", type=int, default=1, help="LR grid extensions when the best is at an edge (default 1)")
    q.add_argument("--cache", default=None, help="token cache (default ~/.cache/flora-opt/bench)")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["python", "benchmarks/run.py", *(sys.argv[1:] if argv is None else argv)])
    tasks = ["step", "throughput", "quality"] if args.task == "all" else [args.task]
    explicit = {k: getattr(args, k) for k in ("batch_size", "seq_len", "rank", "steps")}
    for task in tasks:
        defaults = dict(step=dict(batch_size=1, seq_len=16, rank=256, steps=6),
                        throughput=dict(batch_size=None, seq_len=128, rank=32, steps=4),
                        quality=dict(batch_size=16, seq_len=128, rank=None, steps=200))[task]
        for key, value in defaults.items():
            setattr(args, key, explicit[key] if explicit[key] is not None else value)
        print(f"== {task}", flush=True)
        started = time.perf_counter()
        {"step": run_step, "throughput": run_throughput, "quality": run_quality}[task](args, command)
        print(f"== {task} done in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
