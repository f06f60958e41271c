"""Optimizer-state bytes and jitted step time of optax Flora vs ``optax.adafactor(momentum=0.9)``
and ``optax.adamw``, on the parameter shapes of GPT-2-small and of a LLaMA-style 134M model
(the shapes of ``benchmarks/step_time.py``, the PyTorch benchmark, written out so that no
framework but JAX is needed).

Each contender's step is ``updates, state = tx.update(grads, state, params); params =
optax.apply_updates(params, updates)`` under ``jax.jit`` with params and state donated. Steps
are interleaved round-robin (one timed step per contender per round) so machine noise hits
every contender alike; the table reports medians and ratios taken within the run. State bytes
are exact (``jax.eval_shape`` of ``init``); compile time is reported separately.

    python benchmarks/optax_step.py                       # both models, Flora at tau=32 and 256
    python benchmarks/optax_step.py --models gpt2-small --rounds 5 --taus 64

Prints a markdown table and writes JSON to benchmarks/results/optax_step.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from flora_opt.optax import flora, state_bytes


def gpt2_small_shapes(n_embd=768, n_layer=12, vocab_size=50257, n_positions=1024) -> dict:
    """``transformers.GPT2LMHeadModel`` parameter shapes (lm_head tied to wte)."""
    shapes = {"wte": (vocab_size, n_embd), "wpe": (n_positions, n_embd), "ln_f.w": (n_embd,), "ln_f.b": (n_embd,)}
    for i in range(n_layer):
        block = {
            "ln_1.w": (n_embd,),
            "ln_1.b": (n_embd,),
            "attn.c_attn.w": (n_embd, 3 * n_embd),
            "attn.c_attn.b": (3 * n_embd,),
            "attn.c_proj.w": (n_embd, n_embd),
            "attn.c_proj.b": (n_embd,),
            "ln_2.w": (n_embd,),
            "ln_2.b": (n_embd,),
            "mlp.c_fc.w": (n_embd, 4 * n_embd),
            "mlp.c_fc.b": (4 * n_embd,),
            "mlp.c_proj.w": (4 * n_embd, n_embd),
            "mlp.c_proj.b": (n_embd,),
        }
        shapes.update({f"h{i:02d}.{k}": v for k, v in block.items()})
    return shapes


def llama_134m_shapes(hidden=768, intermediate=2048, n_layer=12, vocab_size=32000) -> dict:
    """``transformers.LlamaForCausalLM`` parameter shapes (untied lm_head)."""
    shapes = {"embed": (vocab_size, hidden), "norm": (hidden,), "lm_head": (vocab_size, hidden)}
    for i in range(n_layer):
        block = {
            "q": (hidden, hidden),
            "k": (hidden, hidden),
            "v": (hidden, hidden),
            "o": (hidden, hidden),
            "gate": (intermediate, hidden),
            "up": (intermediate, hidden),
            "down": (hidden, intermediate),
            "input_norm": (hidden,),
            "post_norm": (hidden,),
        }
        shapes.update({f"l{i:02d}.{k}": v for k, v in block.items()})
    return shapes


MODELS = {"gpt2-small": gpt2_small_shapes, "llama-134m": llama_134m_shapes}


def contenders(taus):
    yield "optax.adamw", optax.adamw(1e-3)
    yield "optax.adafactor(momentum=0.9)", optax.adafactor(1e-3, momentum=0.9)
    for tau in taus:
        yield f"flora tau={tau}", flora(1e-3, tau=tau, kappa=1000)


def make_tree(shapes: dict, key, scale: float) -> dict:
    keys = jax.random.split(key, len(shapes))
    return {name: scale * jax.random.normal(k, shape, jnp.float32) for k, (name, shape) in zip(keys, shapes.items())}


def run(model: str, taus, rounds: int) -> list[dict]:
    shapes = MODELS[model]()
    n_params = sum(int(np.prod(s)) for s in shapes.values())
    grads = make_tree(shapes, jax.random.PRNGKey(1), 1e-3)
    entries = []
    for label, tx in contenders(taus):
        params = make_tree(shapes, jax.random.PRNGKey(0), 0.02)
        nbytes = state_bytes(jax.eval_shape(tx.init, params))

        def train_step(params, state, grads, tx=tx):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        step = jax.jit(train_step, donate_argnums=(0, 1))
        state = jax.jit(tx.init)(params)
        start = time.perf_counter()
        compiled = step.lower(params, state, grads).compile()
        compile_s = time.perf_counter() - start
        params, state = compiled(params, state, grads)  # warm-up
        jax.block_until_ready((params, state))
        entries.append(
            dict(
                model=model,
                optimizer=label,
                n_params=n_params,
                state_bytes=nbytes,
                compile_s=compile_s,
                _step=compiled,
                _carry=[params, state],
                times=[],
            )
        )
        print(f"  {model}: {label} compiled in {compile_s:.1f} s", file=sys.stderr, flush=True)
    for _ in range(rounds):
        for entry in entries:
            params, state = entry["_carry"]
            start = time.perf_counter()
            params, state = entry["_step"](params, state, grads)
            jax.block_until_ready((params, state))
            entry["times"].append(time.perf_counter() - start)
            entry["_carry"] = [params, state]
    for entry in entries:
        del entry["_step"], entry["_carry"]
        entry["step_ms"] = 1e3 * statistics.median(entry["times"])
        entry["bytes_per_param"] = entry["state_bytes"] / entry["n_params"]
    base = next(e for e in entries if e["optimizer"] == "optax.adamw")
    for entry in entries:
        entry["state_vs_adamw"] = entry["state_bytes"] / base["state_bytes"]
        entry["time_vs_adamw"] = entry["step_ms"] / base["step_ms"]
    return entries


def table(entries) -> str:
    lines = [
        "| model | optimizer | state MiB | bytes/param | state vs AdamW | step ms (median) | time vs AdamW | compile s |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for e in entries:
        lines.append(
            f"| {e['model']} | {e['optimizer']} | {e['state_bytes'] / 2**20:.1f} | {e['bytes_per_param']:.3f} | "
            f"{e['state_vs_adamw']:.3f} | {e['step_ms']:.1f} | {e['time_vs_adamw']:.2f} | {e['compile_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--taus", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--json", default=str(Path(__file__).resolve().parent / "results" / "optax_step.json"))
    args = parser.parse_args(argv)
    entries = []
    for model in args.models:
        entries.extend(run(model, args.taus, args.rounds))
    print(table(entries))
    meta = dict(
        jax=jax.__version__,
        optax=optax.__version__,
        backend=jax.default_backend(),
        device=str(jax.devices()[0]),
        platform=platform.platform(),
        rounds=args.rounds,
    )
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(meta=meta, results=entries), indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
