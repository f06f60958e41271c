"""``flora-lab replicate``: the Flora paper's two experiments in JAX on public-domain Bibles.

:func:`run_replicate` runs the momentum and/or the accumulation experiment
(:mod:`flora_lab.replicate.experiments`), every method for ``seeds`` seeds, and writes to
``out``: ``results.json`` (every run: settings, validation curve, final validation loss, BLEU,
exact state/buffer bytes, XLA memory analysis), ``report.md`` (tables, mean +- sample standard
deviation over seeds) and PNG plots (:mod:`flora_lab.replicate.report`). The accumulation
experiment's pretrained checkpoint is cached in ``out`` (``pretrained-<digest>.msgpack``).

Needs ``jax``, ``optax``, ``flax``, ``sacrebleu``, ``matplotlib`` and ``tqdm``
(the lab with its ``replicate`` extra: ``pip install -e 'lab[replicate]'``).
See docs/replication.md for the set-up next to the paper's and the results.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from . import tasks
from .experiments import (
    DEFAULT_LRS,
    EXPERIMENTS,
    FULL,
    QUICK,
    Method,
    Scale,
    Workbench,
    methods_for,
    pretrain,
    run_accumulation,
    run_momentum,
)
from .model import ModelConfig

__all__ = ["DEFAULT_LRS", "EXPERIMENTS", "FULL", "QUICK", "run_replicate"]


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _plan(experiments, scale: Scale, seeds: int, lr_grid) -> list[tuple[str, Method, int, float]]:
    """``(experiment, method, seed, lr multiplier)`` of every run, in order."""
    runs = []
    for experiment in experiments:
        for method in methods_for(experiment, scale.ranks):
            for factor in lr_grid:
                for seed in range(seeds):
                    runs.append((experiment, method, seed, factor))
    return runs


def _environment() -> dict:
    import jax

    return {
        "python": platform.python_version(),
        "jax": jax.__version__,
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }


def run_replicate(
    experiments,
    out: str | os.PathLike,
    *,
    quick: bool = False,
    seeds: int = 3,
    lrs: dict | None = None,
    lr_grid=(1.0,),
    steps: int | None = None,
    finetune_steps: int | None = None,
    jobs: int = 1,
    progress: bool = True,
    plot: bool = True,
    command: str = "",
    cache_dir=None,
    log: Callable[[str], None] = print,
) -> dict:
    """Run ``experiments`` (a subset of :data:`EXPERIMENTS`) and write the results to ``out``.

    Args:
      quick: the :data:`QUICK` scale on the bundled verse sample (no download), else :data:`FULL`
        on the Debian SWORD Bibles (fetched and cached by :mod:`flora_lab.data`).
      seeds: runs per method (seeds ``0 .. seeds-1``: model init, data order, LoRA init, projections).
      lrs: ``{experiment: {kind: peak lr}}`` overriding :data:`DEFAULT_LRS`.
      lr_grid: multipliers of each method's learning rate; every one is run for every seed.
      steps, finetune_steps: override the momentum experiment's / the fine-tuning's optimizer steps.
      jobs: processes running the runs at the same time (each with one XLA thread); 1 runs them in
        this process. The pretraining always runs here, first.
    Returns:
      The results dictionary also written as ``results.json``.
    """
    from .experiments import with_steps
    from .report import summarise, write_plots, write_report

    for e in experiments:
        if e not in EXPERIMENTS:
            raise ValueError(f"Invalid experiment: {e!r}: choose from {', '.join(EXPERIMENTS)}")
    if not isinstance(seeds, int) or seeds < 1:
        raise ValueError(f"Invalid seeds: {seeds!r}: must be an int >= 1")
    if not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Invalid jobs: {jobs!r}: must be an int >= 1")
    if not lr_grid or any(not f > 0 for f in lr_grid):
        raise ValueError(f"Invalid lr_grid: {lr_grid!r}: must be positive multipliers")
    table = {e: dict(v) for e, v in DEFAULT_LRS.items() if isinstance(v, dict)}
    for e, kinds in (lrs or {}).items():
        for kind, lr in kinds.items():
            if e not in table or kind not in table[e]:
                raise ValueError(f"Invalid lrs entry: {e}.{kind}: no such experiment/method")
            if not lr > 0:
                raise ValueError(f"Invalid lrs entry: {e}.{kind}={lr!r}: must be > 0")
            table[e][kind] = float(lr)
    scale = with_steps(QUICK if quick else FULL, steps, finetune_steps)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    log(
        f"replicate: {', '.join(experiments)} ({'quick' if quick else 'full'} scale, {seeds} seed(s)); "
        "reading the verses ..."
    )

    # one shared BPE for every task, trained on the train split of the three Bibles
    translate = tasks.load_pairs("kjv", "sparv", "train", quick=quick, cache_dir=cache_dir)
    modern = tasks.load_pairs("kjv", "web", "train", quick=quick, cache_dir=cache_dir)
    tok = tasks.build_tokenizer(
        [a for _, a, _ in translate] + [b for _, _, b in translate] + [b for _, _, b in modern], scale.vocab_size
    )
    cfg = ModelConfig(
        vocab=tok.vocab_size + len(tasks.SPECIAL),
        d_model=scale.d_model,
        n_heads=scale.n_heads,
        d_ff=scale.d_ff,
        enc_layers=scale.layers,
        dec_layers=scale.layers,
        max_len=scale.max_len,
    )
    benches, data_info = {}, {}
    if "momentum" in experiments:
        train = tasks.make_task(translate, tok, scale.max_len)
        val = tasks.make_task(
            tasks.load_pairs("kjv", "sparv", "validation", quick=quick, cache_dir=cache_dir), tok, scale.max_len
        )
        benches["momentum"] = Workbench(cfg, scale, tok, train, val)
        data_info["momentum"] = {
            "task": "KJV -> Reina-Valera 1909 (English -> Spanish)",
            "train_pairs": len(train),
            "validation_pairs": len(val),
        }
    if "accumulation" in experiments:
        train = tasks.make_task(modern, tok, scale.max_len)
        val = tasks.make_task(
            tasks.load_pairs("kjv", "web", "validation", quick=quick, cache_dir=cache_dir), tok, scale.max_len
        )
        bench = Workbench(cfg, scale, tok, train, val)
        benches["accumulation"] = bench
        verses = [(r, a, a) for r, a, _ in translate] + [(r, b, b) for r, _, b in translate]
        clean = tasks.make_task(verses, tok, scale.max_len)
        denoise = tasks.noised(clean, tasks.special_id(tok, "mask"), 0.15, seed=0)
        copy_bleu = _copy_bleu(val)
        data_info["accumulation"] = {
            "pretrain_task": "denoising KJV and Reina-Valera verses (15% of tokens in masked spans)",
            "task": "KJV -> World English Bible (archaic -> modern English)",
            "pretrain_verses": len(denoise),
            "train_pairs": len(train),
            "validation_pairs": len(val),
            "copy_source_bleu": copy_bleu,
        }

    plan = _plan(experiments, scale, seeds, lr_grid)
    total = sum(scale.steps if e == "momentum" else scale.finetune_steps for e, *_ in plan)
    total += scale.pretrain_steps if "accumulation" in experiments else 0
    bar = _bar(total, progress)
    results = {
        "command": command,
        "scale": "quick" if quick else "full",
        "settings": asdict(scale),
        "model": asdict(cfg),
        "seeds": seeds,
        "lr_grid": list(lr_grid),
        "lrs": table,
        "data": data_info,
        "jobs": jobs,
        "environment": _environment(),
        "runs": [],
    }
    try:
        pretrained = None
        if "accumulation" in experiments:
            bar.set_description("pretrain (denoising)")
            key = _digest(
                asdict(cfg),
                scale.pretrain_steps,
                scale.pretrain_batch_size,
                scale.warmup_fraction,
                DEFAULT_LRS["pretrain"],
                quick,
                tok.backend.to_str(),
            )
            pretrained, results["pretrain"] = pretrain(
                benches["accumulation"],
                denoise,
                steps=scale.pretrain_steps,
                lr=DEFAULT_LRS["pretrain"],
                cache=out / f"pretrained-{key}.msgpack",
                advance=bar.update,
            )
            results["pretrain"]["val_loss_before_finetune"] = benches["accumulation"].val_loss(pretrained)
        runs = [(i, e, m, seed, table[e][m.kind] * f, f) for i, (e, m, seed, f) in enumerate(plan)]
        by_index = {}

        def done(record):
            by_index[record["index"]] = record
            bar.write(
                f"  {record['experiment']:12s} {record['label']:26s} seed {record['seed']} lr {record['lr']:.2g}: "
                f"val loss {record['val_loss']:.4f}  BLEU {record['bleu']:.2f}  ({record['wall_s']:.0f} s)"
            )
            results["runs"] = [by_index[k] for k in sorted(by_index)]
            results["wall_s"] = time.time() - t0
            _write_json(out / "results.json", results)  # partial results survive an interruption

        if jobs == 1:
            for run in runs:
                bar.set_description(f"{run[1]}: {run[2].label}, seed {run[3]}")
                done(_execute(benches, pretrained, run, bar.update))
        else:
            bar.set_description(f"{len(runs)} runs in {jobs} processes")
            _in_processes(benches, pretrained, runs, jobs, scale, bar.update, done)
    finally:
        bar.close()
    results["summary"] = summarise(results)
    results["wall_s"] = time.time() - t0
    _write_json(out / "results.json", results)
    if plot:
        results["plots"] = write_plots(results, out)
        _write_json(out / "results.json", results)
    write_report(results, out / "report.md")
    return results


def _execute(benches, pretrained, run, advance) -> dict:
    index, experiment, method, seed, lr, factor = run
    bench = benches[experiment]
    if experiment == "momentum":
        record = run_momentum(bench, method, seed, lr, steps=bench.scale.steps, advance=advance)
    else:
        record = run_accumulation(
            bench, method, seed, lr, pretrained, steps=bench.scale.finetune_steps, advance=advance
        )
    record["lr_factor"], record["index"] = factor, index
    return record


def _shares(runs, jobs: int, scale: Scale) -> list[list]:
    """Deal the runs to ``jobs`` processes, whole methods at a time (one compile per method and
    process), longest first onto the least loaded process."""
    groups: dict = {}
    for run in runs:
        groups.setdefault((run[1], run[2].key, run[5]), []).append(run)

    def cost(group):  # optimizer steps, Flora's projections and an accumulation step weighted
        e, m = group[0][1], group[0][2]
        per = scale.steps if e == "momentum" else scale.finetune_steps
        return len(group) * per * (1.3 if m.kind.startswith("flora") else 1.0)

    shares, loads = [[] for _ in range(jobs)], [0.0] * jobs
    for group in sorted(groups.values(), key=cost, reverse=True):
        i = loads.index(min(loads))
        shares[i].extend(group)
        loads[i] += cost(group)
    return [s for s in shares if s]


def _worker(queue, benches, pretrained, runs) -> None:
    """A process of ``--jobs``: rebuild the compiled functions, run ``runs``, report on ``queue``."""
    import traceback

    try:
        benches = {e: Workbench(b.cfg, b.scale, b.tok, b.train, b.val) for e, b in benches.items()}
        for run in runs:
            queue.put(("run", _execute(benches, pretrained, run, lambda n: queue.put(("tick", n)))))
    except BaseException:
        queue.put(("error", traceback.format_exc()))
    queue.put(("done", None))


def _in_processes(benches, pretrained, runs, jobs, scale, advance, done) -> None:
    """Run ``runs`` in ``jobs`` spawned processes, one XLA thread each (``XLA_FLAGS``)."""
    import multiprocessing as mp

    import jax

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    pretrained = None if pretrained is None else jax.device_get(pretrained)
    plain = {e: _Portable(b) for e, b in benches.items()}
    saved = os.environ.get("XLA_FLAGS")
    os.environ["XLA_FLAGS"] = ((saved or "") + " --xla_cpu_multi_thread_eigen=false").strip()
    try:
        procs = [
            ctx.Process(target=_worker, args=(queue, plain, pretrained, share), daemon=True)
            for share in _shares(runs, jobs, scale)
        ]
        for p in procs:
            p.start()
    finally:
        if saved is None:
            del os.environ["XLA_FLAGS"]
        else:
            os.environ["XLA_FLAGS"] = saved
    running = len(procs)
    try:
        while running:
            kind, payload = queue.get()
            if kind == "tick":
                advance(payload)
            elif kind == "run":
                done(payload)
            elif kind == "error":
                raise RuntimeError(f"a replicate worker failed:\n{payload}")
            else:
                running -= 1
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()


class _Portable:
    """What a worker needs to rebuild a :class:`Workbench` (picklable: no jitted functions)."""

    def __init__(self, bench: Workbench):
        self.cfg, self.scale, self.train, self.val = bench.cfg, bench.scale, bench.train, bench.val
        self.tok_json = bench.tok.backend.to_str()

    @property
    def tok(self):
        import tokenizers

        from ..data import Tokenizer

        return Tokenizer("bpe", tokenizers.Tokenizer.from_str(self.tok_json))


def _copy_bleu(val: tasks.TaskData) -> float:
    """BLEU of the untouched KJV sources against the WEB references (what copying scores)."""
    import sacrebleu

    return float(sacrebleu.corpus_bleu(val.sources, [val.refs]).score)


def _bar(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="step", disable=not enabled, smoothing=0.05, mininterval=2.0, dynamic_ncols=True)


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=float))
    tmp.replace(path)
