"""Run the *reference* Flora (PyPI ``flora-opt==0.0.3``) on a randomly initialised model.

Meant to be executed by the reference venv's interpreter, in a subprocess::

    $FLORA_REF_VENV/bin/python benchmarks/peers/ref_worker.py \
        --model gpt2-small --steps 5 --rank 8 --kappa 1000 --lr 1e-3 --beta1 0.9

``--model`` is a preset name (see ``PRESETS``) or JSON: ``{"arch": "gpt2"|"llama", <config
kwargs>}`` or ``{"preset": "gpt2-small", <overrides>}``. Models are built from a config with
random init (never downloaded). The last stdout line is one JSON object::

    {"ok": true, "state_bytes": ..., "step_time_s_median": ..., ...}

``state_bytes`` is the sum of ``nbytes`` of all tensors in ``optimizer.state`` (each distinct tensor
once; containers and helper objects such as bitsandbytes' QuantState are walked);
``state_storage_bytes`` counts the storages they keep alive instead. ``step_time_s_median`` is the median wall time of
``optimizer.step()`` alone over steps 2..N (step 1, which allocates the state, is
``first_step_s``). Everything else goes to stderr.

This file is ours (Apache-2.0); it only *calls* the LGPL reference package, which must be
installed in the interpreter's own site-packages (see ``benchmarks/setup_peers.sh``).
``build_model`` / ``PRESETS`` are importable without touching ``flora_opt``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

PRESETS: dict[str, dict] = {
    # GPT-2 small (124M): the Flora paper's GPT-2 setting.
    "gpt2-small": {
        "arch": "gpt2",
        "n_layer": 12,
        "n_head": 12,
        "n_embd": 768,
        "vocab_size": 50257,
        "n_positions": 1024,
    },
    "gpt2-tiny": {"arch": "gpt2", "n_layer": 2, "n_head": 4, "n_embd": 128, "vocab_size": 1024, "n_positions": 256},
    # LLaMA sizes of the GaLore/APOLLO pre-training configs (llama_60m.json, llama_130m.json).
    "llama-60m": {
        "arch": "llama",
        "hidden_size": 512,
        "intermediate_size": 1376,
        "num_attention_heads": 8,
        "num_hidden_layers": 8,
        "vocab_size": 32000,
        "max_position_embeddings": 1024,
    },
    "llama-130m": {
        "arch": "llama",
        "hidden_size": 768,
        "intermediate_size": 2048,
        "num_attention_heads": 12,
        "num_hidden_layers": 12,
        "vocab_size": 32000,
        "max_position_embeddings": 1024,
    },
    "llama-tiny": {
        "arch": "llama",
        "hidden_size": 128,
        "intermediate_size": 352,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "vocab_size": 1024,
        "max_position_embeddings": 256,
    },
}


def resolve_spec(spec) -> dict:
    if isinstance(spec, str):
        spec = spec.strip()
        if spec.startswith("{"):
            spec = json.loads(spec)
        elif spec in PRESETS:
            return dict(PRESETS[spec])
        else:
            raise ValueError(f"unknown model preset {spec!r}; presets: {sorted(PRESETS)} (or pass JSON)")
    spec = dict(spec)
    if "preset" in spec:
        base = dict(PRESETS[spec.pop("preset")])
        base.update(spec)
        spec = base
    if spec.get("arch") not in ("gpt2", "llama"):
        raise ValueError('model JSON needs "arch": "gpt2" or "llama" (or "preset")')
    return spec


def build_model(spec, seed: int = 0):
    """Randomly initialised causal LM from a config (no hub access). Returns (model, spec)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    spec = resolve_spec(spec)
    kwargs = {k: v for k, v in spec.items() if k != "arch"}
    torch.manual_seed(seed)
    if spec["arch"] == "gpt2":
        kwargs.setdefault("resid_pdrop", 0.0)
        kwargs.setdefault("embd_pdrop", 0.0)
        kwargs.setdefault("attn_pdrop", 0.0)
        if kwargs.get("vocab_size", 50257) <= 50256:  # small vocab: keep special ids in range
            kwargs.setdefault("bos_token_id", kwargs["vocab_size"] - 1)
            kwargs.setdefault("eos_token_id", kwargs["vocab_size"] - 1)
        model = GPT2LMHeadModel(GPT2Config(**kwargs))
    else:
        kwargs.setdefault("num_key_value_heads", kwargs.get("num_attention_heads"))
        model = LlamaForCausalLM(LlamaConfig(**kwargs))
    return model, spec


def vocab_size(model) -> int:
    return int(model.config.vocab_size)


def _leaf_tensors(t):
    import torch

    if type(t) is not torch.Tensor and hasattr(t, "__tensor_flatten__") and not isinstance(t, torch.nn.Parameter):
        names, _ = t.__tensor_flatten__()
        out = []
        for n in names:
            out.extend(_leaf_tensors(getattr(t, n)))
        return out
    return [t]


def state_accounting(optimizer) -> dict:
    """Bytes of ``optimizer.state``: ``logical`` = sum of nbytes of every distinct tensor (the
    figure reported as ``state_bytes``), ``storage`` = bytes of the storages they keep alive
    (each once), ``by_key`` = logical bytes per top-level state key."""
    import torch

    seen_views: set = set()
    seen_storage: set = set()
    acc = {"logical": 0, "storage": 0, "by_key": {}}

    def account(t, key):
        ptr = t.untyped_storage().data_ptr()
        skey = (t.device.type, ptr) if ptr else ("id", id(t))
        vkey = (*skey, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if vkey not in seen_views:
            seen_views.add(vkey)
            nbytes = t.numel() * t.element_size()
            acc["logical"] += nbytes
            acc["by_key"][key] = acc["by_key"].get(key, 0) + nbytes
        if skey not in seen_storage:
            seen_storage.add(skey)
            acc["storage"] += t.untyped_storage().nbytes()

    def visit(obj, key, depth, seen):
        if depth > 4 or id(obj) in seen:
            return
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            for t in _leaf_tensors(obj):
                account(t, key)
        elif isinstance(obj, dict):
            for k, v in obj.items():
                visit(v, key if depth else str(k), depth + 1, seen)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                visit(v, key, depth + 1, seen)
        elif hasattr(obj, "__dict__") and not isinstance(obj, (torch.nn.Module, torch.optim.Optimizer)):
            for v in vars(obj).values():
                visit(v, key, depth + 1, seen)

    for st in optimizer.state.values():
        visit(st, "", 0, set())
    return acc


def _sanitize_sys_path() -> None:
    """Drop path entries (cwd, PYTHONPATH, the repo root) that would shadow the installed
    reference ``flora_opt`` with this repository's package of the same name."""
    keep = []
    for entry in sys.path:
        absolute = os.path.abspath(entry or os.getcwd())
        shadow = os.path.isdir(os.path.join(absolute, "flora_opt"))
        if shadow and "site-packages" not in absolute:
            continue
        keep.append(entry)
    sys.path[:] = keep


def _none_or(cast):
    def parse(text):
        return None if text.lower() in ("none", "null", "") else cast(text)

    return parse


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="llama-tiny", help="preset name or JSON config")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rank", type=_none_or(int), default=8, help="int or 'none'")
    ap.add_argument("--kappa", type=int, default=1000)
    ap.add_argument("--lr", type=_none_or(float), default=1e-3, help="float or 'none' (library default)")
    ap.add_argument("--beta1", type=_none_or(float), default=0.9, help="float or 'none' (library default)")
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--quantization", action="store_true", help="Flora(quantization=True), bitsandbytes blockwise")
    ap.add_argument(
        "--library-defaults", action="store_true", help="pass only lr (and --opt-json); ignore --rank/--kappa/--beta1"
    )
    ap.add_argument("--opt-json", default="{}", help="extra Flora kwargs as JSON, e.g. '{\"decay_rate\": -0.8}'")
    args = ap.parse_args(argv)

    _sanitize_sys_path()
    out: dict = {"ok": False, "argv": sys.argv[1:]}
    try:
        import importlib.metadata

        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        import flora_opt

        out["flora_opt_file"] = flora_opt.__file__
        out["flora_opt_version"] = importlib.metadata.version("flora-opt")
        out["torch_version"] = torch.__version__
        out["python"] = sys.executable
        if hasattr(flora_opt, "__version__") or out["flora_opt_version"] != "0.0.3":
            raise RuntimeError(
                f"imported flora_opt is not the reference 0.0.3 package ({flora_opt.__file__}); "
                "run this with $FLORA_REF_VENV/bin/python and without the repo on PYTHONPATH"
            )
        if flora_opt.Flora is None:
            raise RuntimeError("flora_opt.Flora is None: torch, accelerate or bitsandbytes is missing in this venv")

        model, spec = build_model(args.model, seed=args.seed)
        model.train()
        n_params = sum(p.numel() for p in model.parameters())
        opts = json.loads(args.opt_json)
        if not args.library_defaults:
            opts = {"rank": args.rank, "kappa": args.kappa, "beta1": args.beta1, **opts}
        if args.quantization:
            opts["quantization"] = True
        optimizer = flora_opt.Flora(model.parameters(), lr=args.lr, **opts)
        out["model"] = {"spec": spec, "n_params": n_params}
        out["optimizer"] = {
            "class": f"{type(optimizer).__module__}.{type(optimizer).__name__}",
            "kwargs": opts,
            "group_defaults": {k: v for k, v in optimizer.defaults.items()},
        }

        gen = torch.Generator().manual_seed(args.seed + 1)
        losses, step_times, iter_times = [], [], []
        for _ in range(args.steps):
            ids = torch.randint(0, vocab_size(model), (args.batch_size, args.seq_len), generator=gen)
            t0 = time.perf_counter()
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            t1 = time.perf_counter()
            optimizer.step()
            t2 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            step_times.append(t2 - t1)
            iter_times.append(t2 - t0)

        acc = state_accounting(optimizer)
        factored = 0
        two_d = 0
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.ndim == 2:
                    two_d += 1
                    ea = optimizer.state[p].get("exp_avg")
                    if isinstance(ea, tuple) and ea:  # quantization=True: (uint8 codes, QuantState)
                        ea = ea[0]
                    if isinstance(ea, torch.Tensor) and tuple(ea.shape) != tuple(p.shape):
                        factored += 1
        later = step_times[1:] or step_times
        out.update(
            {
                "ok": True,
                "steps": args.steps,
                "losses": losses,
                "finite": all(x == x and abs(x) != float("inf") for x in losses),
                "state_bytes": acc["logical"],
                "state_storage_bytes": acc["storage"],
                "state_bytes_by_key": acc["by_key"],
                "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
                "n_2d_params": two_d,
                "n_factored_momentum": factored,
                "first_step_s": step_times[0] if step_times else None,
                "step_time_s_median": statistics.median(later) if later else None,
                "step_times_s": step_times,
                "iter_time_s_median": statistics.median(iter_times[1:] or iter_times) if iter_times else None,
                "threads": torch.get_num_threads(),
            }
        )
    except Exception as e:
        import traceback

        traceback.print_exc(file=sys.stderr)
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)
    return 0 if out["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
