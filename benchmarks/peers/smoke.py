"""Smoke-check every registered peer: build it on a tiny random LLaMA/GPT-2, take a few steps on
CPU, and report loss, whether the weights moved, and the optimizer-state bytes.

Run from the repository root with the peers venv::

    $FLORA_PEERS_VENV/bin/python -m benchmarks.peers.smoke [--arch llama|gpt2] [--steps 3] [--json out.json]

Exit status is 0 when every contender that ``available()`` reports as usable also steps
correctly; unavailable contenders are listed with their reason. ``--ref-worker`` additionally runs
``ref_worker.py`` under ``$FLORA_REF_VENV`` in a subprocess.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings

import torch

from . import registry as reg  # flora_lab.contenders
from .ref_worker import build_model

# per-contender options used for the tiny models (rank <= the smallest block dimension)
TINY_OPTS = {
    "galore": {"rank": 16, "update_proj_gap": 2},
    "galore_adafactor": {"rank": 16, "update_proj_gap": 2},
    "apollo": {"rank": 16, "update_proj_gap": 2},
    "apollo_mini": {"update_proj_gap": 2},
    "flora_ref": {"rank": 8, "kappa": 2},
}


def one(name: str, arch: str, steps: int, lr: float) -> dict:
    ok, reason = reg.available(name)
    row = {"name": name, "available": ok, "reason": reason}
    if not ok:
        return row
    model, _ = build_model(f"{arch}-tiny", seed=0)
    if name == "lora":
        model = reg.wrap_lora(model, r=8)
    before = {n: p.detach().clone() for n, p in reg.named_trainable(model)}
    try:
        opt = reg.make(name, model, lr=lr, **TINY_OPTS.get(name, {}))
        gen = torch.Generator().manual_seed(1)
        losses, times = [], []
        for _ in range(steps):
            ids = torch.randint(0, model.config.vocab_size, (2, 32), generator=gen)
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            t0 = time.perf_counter()
            opt.step()
            times.append(time.perf_counter() - t0)
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss))
        named = dict(reg.named_trainable(model))
        moved = sum(1 for n, p in named.items() if not torch.equal(p.detach(), before[n]))
        finite = all(torch.isfinite(p).all() for p in named.values()) and all(math.isfinite(x) for x in losses)
        low, _other = reg.split_lowrank(model)
        row.update(
            {
                "stepped": bool(finite and moved > 0),
                "losses": [round(x, 4) for x in losses],
                "params_moved": f"{moved}/{len(named)}",
                "state_bytes": reg.state_bytes(opt),
                "state_storage_bytes": reg.state_bytes(opt, storage=True),
                "trainable_bytes": sum(p.numel() * p.element_size() for p in named.values()),
                "n_lowrank_block_matrices": len(low),
                "step_ms_median": round(1000 * sorted(times)[len(times) // 2], 2),
                "optimizer": f"{type(opt).__module__}.{type(opt).__name__}",
            }
        )
    except Exception as e:
        row.update({"stepped": False, "error": f"{type(e).__name__}: {e}"})
    return row


def expected_state_bytes(name: str, m: int, n: int, r: int) -> int | None:
    """State bytes of ONE block matrix m x n (fp32, numel >= 4096 and divisible by 256) after a
    step, from the per-library formulas in README.md (0-d step/RMS tensors included)."""
    lo, hi = min(m, n), max(m, n)
    return {
        "adamw": 4 * 2 * m * n + 4,
        "adafactor_torch": 4 * (m + n) + 4,
        "adafactor": 4 * (m + n) + 4,
        "adafactor_momentum": 4 * (m * n + m + n) + 4,
        "galore": 4 * (r * lo + 2 * r * hi),
        "galore_adafactor": 4 * (r * lo + r + hi) + 4,
        "apollo": 4 * (r * lo + 2 * r * hi + 1),
        "apollo_mini": 4 * (lo + 2 * hi + 1),
        "adamw8bit_bnb": 2 * m * n + 2 * 4 * math.ceil(m * n / 256) + 2 * 256 * 4,
        "adamw8bit_torchao": 2 * m * n + 2 * 4 * (m * n // 256) + 2 * 256 * 4 + 4,
        "flora_ref": 4 * (r * hi + m + n) + 4,
    }.get(name)


RANKED = {"galore", "galore_adafactor", "apollo", "flora_ref"}


def formula_check(shapes=((384, 128), (128, 384)), r: int = 16) -> list[dict]:
    """Measure ``state_bytes`` for one block matrix and compare with ``expected_state_bytes``."""
    rows = []
    for name in reg.names():
        for m, n in shapes:
            want = expected_state_bytes(name, m, n, r)
            if want is None or not reg.available(name)[0]:
                continue
            p = torch.nn.Parameter(torch.randn(m, n))
            opt = reg.make(name, [("layers.0.weight", p)], lr=1e-3, **({"rank": r} if name in RANKED else {}))
            for _ in range(2):
                p.grad = torch.randn_like(p)
                opt.step()
            got = reg.state_bytes(opt)
            rows.append(
                {
                    "name": name,
                    "shape": [m, n],
                    "rank": r,
                    "measured": got,
                    "formula": want,
                    "match": got == want,
                    "storage_bytes": reg.state_bytes(opt, storage=True),
                }
            )
    return rows


def hook_selftest() -> dict:
    """register() -> make() -> step -> unregister(), with torch SGD standing in for our Flora."""
    name = "_hook_selftest"
    seen = {}

    def make_fn(params, lr, **opts):
        seen["groups"] = [len(g["params"]) for g in params]
        seen["opts"] = opts
        return torch.optim.SGD(params, lr=lr)

    reg.register(name, make_fn, groups=True, defaults={"rank": 4}, replace=True)
    try:
        model, _ = build_model("llama-tiny", seed=0)
        opt = reg.make(name, model, lr=1e-3, kappa=7)
        ids = torch.randint(0, model.config.vocab_size, (1, 8))
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        ok = seen["opts"] == {"rank": 4, "kappa": 7} and len(seen["groups"]) == 2
        return {"ok": ok, **seen}
    except Exception as e:
        return {"ok": False, "error": f"{type(e).__name__}: {e}"}
    finally:
        reg.unregister(name)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=["llama", "gpt2", "both"], default="both")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--only", nargs="*", default=None)
    ap.add_argument("--ref-worker", action="store_true")
    ap.add_argument("--formulas", action="store_true", help="check the README state formulas on one matrix")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")

    archs = ["llama", "gpt2"] if args.arch == "both" else [args.arch]
    rows = []
    for arch in archs:
        for name in args.only or reg.names():
            row = one(name, arch, args.steps, args.lr)
            row["arch"] = arch
            rows.append(row)
            status = "OK  " if row.get("stepped") else ("SKIP" if not row["available"] else "FAIL")
            detail = row.get("error") or (
                row["reason"]
                if not row["available"]
                else f"state={row['state_bytes']}B moved={row['params_moved']} "
                f"loss={row['losses']} step={row['step_ms_median']}ms"
            )
            print(f"{status} {arch:5s} {name:22s} {detail}", flush=True)
    result = {"torch": torch.__version__, "rows": rows, "hook": hook_selftest()}
    print(f"{'OK  ' if result['hook']['ok'] else 'FAIL'} register() hook: {result['hook']}")
    if args.formulas:
        result["formulas"] = formula_check()
        for row in result["formulas"]:
            print(
                f"{'OK  ' if row['match'] else 'DIFF'} formula {row['name']:22s} {row['shape']} r={row['rank']} "
                f"measured={row['measured']} formula={row['formula']} storage={row['storage_bytes']}"
            )
    if args.ref_worker:
        try:
            result["ref_worker"] = reg.run_ref_worker("llama-tiny", steps=3, rank=8, kappa=2)
            r = result["ref_worker"]
            print(
                f"OK   ref_worker llama-tiny state={r['state_bytes']}B step={r['step_time_s_median']:.4f}s "
                f"flora-opt {r['flora_opt_version']} from {r['flora_opt_file']}"
            )
        except Exception as e:
            result["ref_worker"] = {"ok": False, "error": str(e)}
            print(f"FAIL ref_worker {e}")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=1)
    bad = [r for r in rows if r["available"] and not r.get("stepped")]
    if not result["hook"]["ok"]:
        bad.append(result["hook"])
    bad += [r for r in result.get("formulas", []) if not r["match"]]
    if args.ref_worker and not result["ref_worker"].get("ok"):
        bad.append(result["ref_worker"])
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
