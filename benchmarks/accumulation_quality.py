"""Quality of gradient-accumulation estimators on the regression benchmark's model and data.

The model, data, schedule, evaluation and token budget are those of ``benchmarks/regression.py``
(a block-dominated LLaMA decoder on byte-level Shakespeare, 300 steps of 16 x 128 bytes). Each
step is split into ``--micros`` micro-batches (4 x 4 x 128, or 16 x 1 x 128: the paper's batch-1
recipe at this budget) and the accumulated gradient goes to one of the ``--optimizers``:

* ``flora-r64`` / ``flora-r32``: :class:`flora_opt.Flora` at rank ``d/4`` / ``d/8``, ``kappa=50``;
* ``adafactor-m``: ``transformers.Adafactor(beta1=0.9)`` (full momentum);
* ``adafactor``: ``transformers.Adafactor(beta1=None)`` (no momentum).

Estimators (``--estimators``), for every matrix whose smaller side exceeds the accumulation rank
``r`` (``--acc-rank``, default ``d/4 = 64``); the other tensors accumulate naively:

* ``naive``: full-size accumulation in ``.grad`` (the target);
* ``product:<name>``: :class:`flora_opt.CompressedAccumulator` with ``estimator=<name>``, exactly
  as a user runs it (memory included);
* every other name is *emulated* here: the micro-batch gradients are kept in full and the
  estimator is applied to them, so these runs measure quality only. ``gaussian``: the paper's
  ``Q^T sum_k Q g_k``; ``first``: projection on the range of the first micro-batch
  (``g_1 Omega``, one QR; ``-warm``: one power iteration started from the previous step's basis;
  ``-p2``: two); ``track``: the basis re-fitted at every micro-batch to the running estimate plus
  the new gradient (one warm-started power iteration, then the running estimate re-projected);
  ``-last``: the sync micro-batch's gradient added exactly instead of projected; ``oracle``: the
  best rank-``r`` approximation of the exact sum (truncated SVD; not implementable in
  ``O(r (m + n))`` memory, an upper bound for any rank-``r`` basis). ``flora-path`` (Flora
  optimizers only): accumulation in the momentum's own projection ``P``, which makes the momentum
  increment ``P U`` exact; the step's current term ``(1 - beta1) U`` is then known only through
  ``P``, as ``(1 - beta1) P^T P U``. Emulated optimistically: the second moment and ``P U`` come
  from the exact sum (Flora's per-tensor path, ``foreach=False``), only the current term is
  replaced.

Usage::

    python benchmarks/accumulation_quality.py --optimizers flora-r64 --micros 16 \\
        --estimators naive gaussian first-warm --lrs 0.1
    python benchmarks/accumulation_quality.py --report   # table of every run in --out

Every run is a fresh process; results accumulate in ``--out/results.json`` (default
``benchmarks/results/accumulation_quality``) and the table in ``report.md`` there.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import regression  # noqa: E402  (the benchmark this one extends: model, data, schedule)

OPTIMIZERS = ("flora-r64", "flora-r32", "adafactor-m", "adafactor")
DEFAULT_LRS = {
    "flora-r64": [0.05, 0.1, 0.2],
    "flora-r32": [0.05, 0.1, 0.2],
    "adafactor-m": [0.05, 0.1, 0.2],
    "adafactor": [0.05, 0.1, 0.2],
}


# ---- estimators (emulated on the kept micro-batch gradients; rows = the compressed side) ------


def _orth(y):
    import torch

    return torch.linalg.qr(y).Q


def _first_basis(x1, previous, rank: int, warm: bool, powers: int, generator):
    import torch

    if warm and previous is not None:
        y = x1 @ (x1.T @ previous)
    else:
        omega = torch.randn(x1.shape[1], rank, generator=generator, dtype=x1.dtype)
        y = x1 @ omega
    for _ in range(powers - 1):
        q = _orth(y)
        y = x1 @ (x1.T @ q)
    return _orth(y)


def estimate(name: str, xs: list, state: dict, rank: int, generator):
    """The estimate of ``sum(xs)`` (each ``(d, n)``, ``d`` the compressed side) under ``name``."""
    import torch

    total = torch.stack(xs).sum(0)
    if name == "gaussian":
        p = torch.randn(rank, total.shape[0], generator=generator, dtype=total.dtype) / math.sqrt(rank)
        return p.T @ (p @ total)
    if name == "oracle":
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        return (u[:, :rank] * s[:rank]) @ vh[:rank]
    base, *flags = name.split("-")
    warm = "warm" in flags or base == "track"
    powers = 2 if "p2" in flags else 1
    exact_last = "last" in flags and len(xs) > 1
    body = xs[:-1] if exact_last else xs
    q = _first_basis(xs[0], state.get("basis"), rank, warm, powers, generator)
    if base == "first":
        b = q.T @ torch.stack(body).sum(0)
    elif base == "track":
        b = q.T @ body[0]
        for x in body[1:]:
            z = q @ b + x
            q = _orth(z @ (z.T @ q))
            b = q.T @ z
    else:
        raise ValueError(f"unknown estimator {name!r}")
    state["basis"] = q
    out = q @ b
    return out + xs[-1] if exact_last else out


# ---- worker -------------------------------------------------------------------------------


def _make_optimizer(cfg, params):
    optimizer = cfg["optimizer"]
    if optimizer.startswith("adafactor"):
        from transformers.optimization import Adafactor

        return Adafactor(
            params,
            lr=cfg["lr"],
            beta1=0.9 if optimizer == "adafactor-m" else None,
            scale_parameter=True,
            relative_step=False,
            warmup_init=False,
            clip_threshold=1.0,
        )
    from flora_opt import Flora

    foreach = cfg["estimator"] != "flora-path"
    return Flora(params, lr=cfg["lr"], rank=int(optimizer.split("-r")[1]), kappa=50, beta1=0.9, foreach=foreach)


def _emulate_flora_path() -> None:
    """Replace the current term of Flora's compressed momentum direction by its projection through
    the momentum's own ``P``: ``D = (1 - beta1) P^T P U + beta1 s H`` (rows; ``U P^T P`` cols)."""
    from flora_opt import core

    exact = core.momentum_direction

    def momentum_direction(normalised, momentum, step, seed, layout, hp, ops, device=None, projection_index=None):
        direction, state = exact(normalised, momentum, step, seed, layout, hp, ops, device, projection_index)
        if layout.momentum != core.MOMENTUM_COMPRESSED:
            return direction, state
        index = (step - 1) // hp.kappa if projection_index is None else projection_index
        p = core.momentum_projection(seed, index, layout.rank, layout.compressed_dim, ops, device)
        seen = core.decompress(core.compress(normalised, p, layout.side, ops), p, layout.side, ops)
        return direction + (1.0 - hp.beta1) * (seen - normalised), state

    core.momentum_direction = momentum_direction


def run_worker(cfg: dict) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from flora_opt import core

    torch.set_num_threads(cfg.get("threads", 2))
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(LlamaConfig(**regression.MODEL))
    train = np.load(cfg["train"])
    val = np.load(cfg["val"])
    batch, seq, steps, micro = cfg["batch"], cfg["seq"], cfg["steps"], cfg["micro"]
    params = list(model.parameters())
    optimizer = _make_optimizer(cfg, params)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: regression._schedule(s, steps, cfg["warmup"]))
    estimator, acc_rank = cfg["estimator"], cfg["acc_rank"]
    accumulator, emulated = None, []
    if estimator.startswith("product:"):
        from flora_opt import CompressedAccumulator

        kwargs = {}
        if estimator != "product:gaussian":
            kwargs["estimator"] = estimator.split(":", 1)[1]
        accumulator = CompressedAccumulator(optimizer, rank=acc_rank, accumulation_steps=micro, **kwargs)
    elif estimator == "flora-path":
        _emulate_flora_path()
    elif estimator != "naive":
        for index, p in enumerate(params):
            layout = core.accumulation_layout(p.shape, acc_rank)
            if layout.compressed:
                emulated.append((index, p, layout.side, {}))
    generator = torch.Generator().manual_seed(12345 + cfg["seed"])
    kept: dict[int, list] = {index: [] for index, *_ in emulated}
    rng = np.random.default_rng(1000 + cfg["seed"])
    evaluate = regression.evaluator(model, val, seq)
    curve, losses, start = [], [], time.time()
    for step in range(steps):
        for _ in range(micro):
            loss = regression.batch_loss(model, train, rng, batch // micro, seq)
            if accumulator is not None:
                accumulator.backward(loss / micro)
            else:
                (loss / micro).backward()
            for index, p, side, _ in emulated:
                g = p.grad.detach().float().reshape(p.shape[0], -1)
                kept[index].append(g if side == core.SIDE_ROWS else g.T)
                p.grad = None
            losses.append(loss.item())
        with torch.no_grad():
            for index, p, side, state in emulated:
                est = estimate(estimator, kept[index], state, acc_rank, generator)
                kept[index] = []
                est = est if side == core.SIDE_ROWS else est.T
                p.grad = est.reshape(p.shape).to(p.dtype)
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        if (step + 1) % cfg["eval_every"] == 0 or step + 1 == steps:
            curve.append([step + 1, evaluate()])
    final = curve[-1][1]
    return {
        "val_loss": final if math.isfinite(final) else float("nan"),
        "curve": curve,
        "train_loss_last": float(np.mean(losses[-20:])),
        "seconds": time.time() - start,
    }


# ---- orchestrator -------------------------------------------------------------------------


def _label(cfg: dict) -> str:
    return f"{cfg['optimizer']}_m{cfg['micro']}_{cfg['estimator']}_r{cfg['acc_rank']}_lr{cfg['lr']:g}_s{cfg['seed']}"


def _launch(cfg: dict) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "worker", json.dumps(cfg)],
        cwd=str(REPO),
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _report(results: dict) -> str:
    """One row per (optimizer, micro-batches, estimator): the best learning rate's loss (mean over
    seeds), the gap to naive accumulation's best, and every learning rate's loss."""
    rows: dict[tuple, dict[float, list[float]]] = {}
    for entry in results.values():
        cfg = entry["config"]
        key = (cfg["optimizer"], cfg["micro"], cfg["estimator"], cfg["acc_rank"])
        rows.setdefault(key, {}).setdefault(cfg["lr"], []).append(entry.get("val_loss", float("nan")))

    def best(row):
        means = {lr: sum(v) / len(v) for lr, v in row.items() if all(math.isfinite(x) for x in v)}
        return min(means.items(), key=lambda kv: kv[1]) if means else (None, float("nan"))

    lines = [
        "| optimizer | micro-batches | estimator | r | best lr | val loss | vs naive | all lrs (seeds) |",
        "|---|---:|---|---:|---:|---:|---:|---|",
    ]
    order = {name: i for i, name in enumerate(OPTIMIZERS)}
    for key in sorted(rows, key=lambda k: (order.get(k[0], 99), k[1], k[2] != "naive", k[2], k[3])):
        row = rows[key]
        lr, loss = best(row)
        naive = rows.get((key[0], key[1], "naive", key[3])) or next(
            (v for k, v in rows.items() if k[:3] == (key[0], key[1], "naive")), None
        )
        gap = f"{100 * (loss / best(naive)[1] - 1):+.1f}%" if naive and key[2] != "naive" else ""
        every = ", ".join(
            f"{lr_:g}: {sum(v) / len(v):.4f}" + (f" ({len(v)})" if len(v) > 1 else "") for lr_, v in sorted(row.items())
        )
        lines.append(
            f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {lr if lr is not None else ''} | {loss:.4f} | "
            f"{gap} | {every} |"
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        print(json.dumps(run_worker(json.loads(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--optimizers", nargs="+", default=["flora-r64"], choices=OPTIMIZERS)
    ap.add_argument("--micros", type=int, nargs="+", default=[16])
    ap.add_argument("--estimators", nargs="+", default=["naive", "product:gaussian"])
    ap.add_argument("--acc-rank", type=int, default=64)
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="override every optimizer's grid")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val-bytes", type=int, default=65536)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--jobs", type=int, default=1, help="runs at a time (give each --threads 2/jobs)")
    ap.add_argument("--report", action="store_true", help="only rewrite the table from --out/results.json")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "accumulation_quality")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    if not args.report:
        train, val = regression._prepare_data(REPO / ".cache" / "regression", args.val_bytes)
        configs = [
            dict(
                optimizer=opt,
                micro=micro,
                estimator=est,
                acc_rank=args.acc_rank,
                lr=lr,
                seed=seed,
                steps=args.steps,
                warmup=args.warmup,
                batch=args.batch,
                seq=args.seq,
                eval_every=args.eval_every,
                threads=args.threads,
                train=str(train),
                val=str(val),
            )
            for opt in args.optimizers
            for micro in args.micros
            for est in args.estimators
            for lr in (args.lrs or DEFAULT_LRS[opt])
            for seed in args.seeds
        ]
        from concurrent.futures import ThreadPoolExecutor

        start = time.time()
        with ThreadPoolExecutor(args.jobs) as pool:
            for i, (cfg, result) in enumerate(zip(configs, pool.map(_launch, configs))):
                results[_label(cfg)] = {"config": {k: v for k, v in cfg.items() if k not in ("train", "val")}, **result}
                results_path.write_text(json.dumps(results, indent=1))
                shown = result.get("val_loss", result.get("error"))
                print(f"[{i + 1}/{len(configs)}] {_label(cfg)}: {shown} ({time.time() - start:.0f}s)", flush=True)
    table = _report(results)
    (args.out / "report.md").write_text(table)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
