"""CUDA correctness checks and GPU memory/speed figures, in one short run (not a test).

    python benchmarks/gpu_check.py --out results/gpu_check.json

1. The projection generator: the integer stream is bit-identical on CPU and CUDA, and the
   Gaussians agree to float rounding (docs/algorithm.md section 2).
2. flora_opt.Flora on CUDA follows the CPU run step for step (fp32, bf16, 8-bit, kappa
   resamples), and a CUDA checkpoint resumes bit-exactly.
3. JAX on the GPU (when present): the same projection as PyTorch.
4. The grouped step: batched projections on CUDA equal the CPU's bit for bit; the
   grouped step equals the per-tensor path on CUDA; no host sync inside ``step()`` after the
   first (``torch.cuda.set_sync_debug_mode("error")``); the test subset marked ``cuda``.
5. Step time (CUDA-synchronised median) and exact optimizer-state bytes / peak allocated memory
   for GPT-2-small and the LLaMA 1.34B shape (GaLore's ``llama_1b``): AdamW (fused),
   torch.optim.Adafactor, Adafactor with momentum and APOLLO (from the lab registry, when
   importable), Flora r=32/256 and 8-bit.

Sized to finish in under 8 minutes on an H200 (``--budget-s`` stops the benchmark part early).
Its CPU parts run anywhere; its CUDA parts need a CUDA device.
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import sys
import time
import traceback
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flora_opt
from flora_opt import projection as pj
from flora_opt.ops import get_ops

RESULTS: dict = {}


def check_projection():
    ops = get_ops("torch")
    rows = []
    for seed, stream, index, rank, dim in [
        (0, 0, 0, 256, 768),
        (7, 1, 3, 32, 4096),
        (123, 0, 99, 5, 3),
        (2**31 + 5, 0, 1, 512, 8192),
    ]:
        key = pj.stream_key(pj.tensor_seed(seed, 1), stream, index)
        cpu = pj.gaussian_projection(key, rank, dim, ops, device="cpu")
        gpu = pj.gaussian_projection(key, rank, dim, ops, device="cuda").cpu()
        c = ops.u32_arange(rank * dim, "cuda")
        bits_gpu = ops.mix32(ops.u32_add(c, key), pj.MIX_MUL_1, pj.MIX_MUL_2).cpu()
        bits_cpu = ops.mix32(ops.u32_add(ops.u32_arange(rank * dim, "cpu"), key), pj.MIX_MUL_1, pj.MIX_MUL_2)
        rows.append(
            dict(
                shape=[rank, dim],
                integer_stream_identical=bool(torch.equal(bits_gpu, bits_cpu)),
                max_abs_diff=float((gpu - cpu).abs().max()),
                fraction_bit_identical=float((gpu == cpu).float().mean()),
            )
        )
    RESULTS["projection_cpu_vs_cuda"] = rows
    assert all(r["integer_stream_identical"] for r in rows)
    assert all(r["max_abs_diff"] < 1e-5 for r in rows)


def _small_model(dtype, device):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(512, 96), torch.nn.Linear(96, 384), torch.nn.GELU(), torch.nn.Linear(384, 512)
    )
    return model.to(device=device, dtype=dtype)


def _train(model, opt, batches):
    for tokens in batches:
        logits = model(tokens[:, :-1].to(next(model.parameters()).device)).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 512), tokens[:, 1:].reshape(-1).to(logits.device))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return loss.item()


def check_flora_cuda_vs_cpu():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (8, 33), generator=gen) for _ in range(12)]
    rows = []
    for name, dtype, options in [
        ("fp32 r=16 kappa=4", torch.float32, dict(rank=16, kappa=4)),
        ("fp32 rank=None", torch.float32, dict(rank=None)),
        ("bf16 r=16 kappa=4", torch.bfloat16, dict(rank=16, kappa=4)),
        ("fp32 8-bit r=32", torch.float32, dict(rank=32, kappa=4, quantization=True)),
        ("fp32 r=16 bf16 products", torch.float32, dict(rank=16, kappa=4, projection_dtype="bfloat16")),
    ]:
        if options.get("quantization"):
            try:
                import torchao  # noqa: F401
            except ImportError:
                rows.append(dict(config=name, skipped="torchao not installed"))
                continue
        results = {}
        for device in ("cpu", "cuda"):
            model = _small_model(dtype, device)
            opt = flora_opt.Flora(model.parameters(), lr=1e-2, min_dim_size_to_factor=32, **options)
            loss = _train(model, opt, batches)
            results[device] = ([p.detach().float().cpu() for p in model.parameters()], loss)
        rel = max(float((a - b).norm() / (a.norm() + 1e-12)) for a, b in zip(results["cpu"][0], results["cuda"][0]))
        rows.append(
            dict(config=name, max_relative_param_diff=rel, loss_cpu=results["cpu"][1], loss_cuda=results["cuda"][1])
        )
    RESULTS["flora_cuda_vs_cpu_after_12_steps"] = rows

    # resume bit-exactly on CUDA across a resample
    RESULTS["flora_cuda_vs_cpu_after_12_steps"] = rows
    quantization = any("skipped" not in r for r in rows if "8-bit" in r["config"])
    model = _small_model(torch.float32, "cuda")
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16, kappa=3, quantization=quantization)
    _train(model, opt, batches[:4])
    buffer_m, buffer_o = io.BytesIO(), io.BytesIO()
    torch.save(model.state_dict(), buffer_m)
    torch.save(opt.state_dict(), buffer_o)
    _train(model, opt, batches[4:9])
    buffer_m.seek(0), buffer_o.seek(0)
    resumed = _small_model(torch.float32, "cuda")
    resumed.load_state_dict(torch.load(buffer_m, weights_only=True))
    resumed_opt = flora_opt.Flora(resumed.parameters(), lr=1e-2, rank=16, kappa=3, quantization=quantization)
    resumed_opt.load_state_dict(torch.load(buffer_o, weights_only=True))
    _train(resumed, resumed_opt, batches[4:9])
    RESULTS["cuda_resume_bit_exact"] = all(torch.equal(a, b) for a, b in zip(model.parameters(), resumed.parameters()))


def check_batched_projection():
    ops = get_ops("torch")
    keys_cpu = pj.projection_key(
        torch.tensor([0, 5, -7, 2**31 - 1], dtype=torch.int32), 0, torch.tensor([0, 1, 2, 999], dtype=torch.int32), ops
    )
    keys_gpu = pj.projection_key(
        keys_cpu.new_tensor([0, 5, -7, 2**31 - 1]).cuda(),
        0,
        torch.tensor([0, 1, 2, 999], dtype=torch.int32, device="cuda"),
        ops,
    )
    rows = []
    for rank, dim in [(32, 256), (256, 2048), (7, 13)]:
        cpu = pj.gaussian_projections(keys_cpu, rank, dim, ops)
        gpu = pj.gaussian_projections(keys_gpu, rank, dim, ops, device="cuda").cpu()
        rows.append(
            dict(
                shape=[rank, dim],
                keys_identical=bool(torch.equal(keys_cpu, keys_gpu.cpu())),
                fraction_bit_identical=float((gpu == cpu).float().mean()),
                max_abs_diff=float((gpu - cpu).abs().max()),
            )
        )
    RESULTS["batched_projection_cpu_vs_cuda"] = rows
    assert all(r["keys_identical"] and r["max_abs_diff"] < 1e-5 for r in rows)


def check_grouped_step_cuda():
    """Grouped vs per-tensor on CUDA, and no host sync in step() after the first."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 512, (8, 33), generator=gen) for _ in range(8)]
    rows = []
    for name, options in [
        ("r=16 kappa=3", dict(rank=16, kappa=3)),
        ("8-bit r=32", dict(rank=32, kappa=3, quantization=True)),
    ]:
        results = {}
        for foreach in (True, False):
            model = _small_model(torch.float32, "cuda")
            opt = flora_opt.Flora(model.parameters(), lr=1e-2, min_dim_size_to_factor=32, foreach=foreach, **options)
            _train(model, opt, batches)
            results[foreach] = [p.detach().float().cpu() for p in model.parameters()]
        rel = max(float((a - b).norm() / (b.norm() + 1e-12)) for a, b in zip(results[True], results[False]))
        rows.append(dict(config=name, max_relative_param_diff_grouped_vs_per_tensor=rel))
    RESULTS["grouped_vs_per_tensor_cuda"] = rows
    model = _small_model(torch.float32, "cuda")
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16, kappa=2, min_dim_size_to_factor=32)
    _train(model, opt, batches[:1])  # the first step may sync (state creation)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    next(model.parameters()).grad[0, 0] = float("nan")  # a skip, decided on the device
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):  # crosses resamples (kappa=2)
            opt.step()
        RESULTS["step_without_host_sync"] = True
    finally:
        torch.cuda.set_sync_debug_mode("default")
    RESULTS["skipped_after_synchronize"] = opt.synchronize()


def run_cuda_tests(timeout_s: int = 150):
    import subprocess

    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-m",
        "cuda",
        str(Path(__file__).resolve().parent.parent / "tests"),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s)
    RESULTS["pytest_cuda"] = dict(returncode=done.returncode, tail=done.stdout[-1500:])
    assert done.returncode in (0, 5), done.stdout[-3000:]  # 5: no test collected


def check_jax():
    try:
        import jax

        from flora_opt.ops import get_ops as _get
    except Exception as error:  # pragma: no cover
        RESULTS["jax"] = f"unavailable: {error}"
        return
    key = pj.stream_key(pj.tensor_seed(3, 2), 0, 4)
    jp = np.asarray(pj.gaussian_projection(key, 64, 512, _get("jax")))
    tp = pj.gaussian_projection(key, 64, 512, _get("torch"), device="cuda").cpu().numpy()
    RESULTS["jax"] = dict(
        devices=[str(d) for d in jax.devices()], max_abs_diff_vs_torch_cuda=float(np.abs(jp - tp).max())
    )


MODELS = {
    "gpt2-small": ("gpt2", dict(n_embd=768, n_layer=12, n_head=12, vocab_size=50257, n_positions=1024)),
    # GaLore's llama_1b shape: 1.34B parameters
    "llama-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=5461,
            num_hidden_layers=24,
            num_attention_heads=32,
            vocab_size=32000,
            tie_word_embeddings=False,
        ),
    ),
}


def _lab_contender(name, **opts):
    """A peer from the lab's one registry (flora_lab.contenders), or None if it cannot be built."""
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "lab"))
        from flora_lab import contenders as registry

        ok, _ = registry.available(name)
        if not ok:
            return None
        return lambda ps: registry.make(name, ps, **opts)
    except Exception:  # the lab or the peer's package is missing: skip that row
        return None


def _params(name):
    import transformers

    kind, spec = MODELS[name]
    with torch.device("meta"):
        model = (
            transformers.GPT2LMHeadModel(transformers.GPT2Config(**spec))
            if kind == "gpt2"
            else transformers.LlamaForCausalLM(transformers.LlamaConfig(**spec))
        )
    params, seen = [], set()
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        real = torch.nn.Parameter(torch.randn(p.shape, device="cuda") * 0.02)
        real.grad = torch.randn(p.shape, device="cuda") * 1e-3
        params.append(real)
    return params


def bench_steps(rounds: int, budget_s: float = 360.0):
    rows = []
    started = time.perf_counter()
    for model in MODELS:
        contenders = [
            ("AdamW (fused)", lambda ps: torch.optim.AdamW(ps, lr=1e-3, fused=True)),
            ("torch.optim.Adafactor", lambda ps: torch.optim.Adafactor(ps, lr=1e-2, foreach=True)),
            ("Adafactor + momentum", _lab_contender("adafactor_momentum", lr=1e-2)),
            ("APOLLO r=256", _lab_contender("apollo", lr=1e-3, rank=256)),
            ("Flora r=32", lambda ps: flora_opt.Flora(ps, lr=1e-3, rank=32)),
            ("Flora r=256", lambda ps: flora_opt.Flora(ps, lr=1e-3, rank=256)),
            (
                "Flora r=256 bf16 products",
                lambda ps: flora_opt.Flora(ps, lr=1e-3, rank=256, projection_dtype="bfloat16"),
            ),
            ("Flora r=256 per-tensor", lambda ps: flora_opt.Flora(ps, lr=1e-3, rank=256, foreach=False)),
            ("Flora r=256 8-bit", lambda ps: flora_opt.Flora(ps, lr=1e-3, rank=256, quantization=True)),
        ]
        for label, make in contenders:
            if make is None:
                continue
            if time.perf_counter() - started > budget_s:
                RESULTS.setdefault("skipped_for_time", []).append(f"{model}: {label}")
                continue
            torch.cuda.empty_cache()
            params = _params(model)
            numel = sum(p.numel() for p in params)
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            opt = make(params)
            times = []
            for i in range(rounds + 2):
                torch.cuda.synchronize()
                start = time.perf_counter()
                opt.step()
                torch.cuda.synchronize()
                if i >= 2:
                    times.append(time.perf_counter() - start)
            state = sum(
                v.numel() * v.element_size()
                for s in opt.state.values()
                for v in s.values()
                if isinstance(v, torch.Tensor)
            )
            rows.append(
                dict(
                    model=model,
                    optimizer=label,
                    params=numel,
                    state_bytes=state,
                    bytes_per_param=state / numel,
                    median_step_ms=1e3 * statistics.median(times),
                    peak_over_params_and_grads_mib=(torch.cuda.max_memory_allocated() - base) / 2**20,
                )
            )
            print(rows[-1], flush=True)
            del opt, params
    ref = {r["model"]: r["median_step_ms"] for r in rows if r["optimizer"] == "torch.optim.Adafactor"}
    adamw = {r["model"]: r["median_step_ms"] for r in rows if r["optimizer"] == "AdamW (fused)"}
    for r in rows:
        r["step_vs_adafactor"] = r["median_step_ms"] / ref[r["model"]] if r["model"] in ref else None
        r["step_vs_fused_adamw"] = r["median_step_ms"] / adamw[r["model"]] if r["model"] in adamw else None
    RESULTS["step_time_cuda"] = rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--no-bench", action="store_true", help="correctness checks only")
    parser.add_argument("--budget-s", type=float, default=360.0, help="stop starting benchmark rows after this")
    args = parser.parse_args()
    RESULTS["torch"] = torch.__version__
    RESULTS["device"] = torch.cuda.get_device_name()
    checks = [
        check_projection,
        check_batched_projection,
        check_flora_cuda_vs_cpu,
        check_grouped_step_cuda,
        run_cuda_tests,
        check_jax,
    ]
    if not args.no_bench:
        checks.append(lambda: bench_steps(args.rounds, args.budget_s))
    for check in checks:
        try:
            check()
        except Exception:  # record and go on: one failure must not hide the other figures
            RESULTS.setdefault("errors", []).append(traceback.format_exc())
            print(traceback.format_exc(), file=sys.stderr)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(RESULTS, indent=2))
    print(json.dumps({k: v for k, v in RESULTS.items() if k != "step_time_cuda"}, indent=2))
    for r in RESULTS.get("step_time_cuda", []):
        print(
            f"| {r['model']} | {r['optimizer']} | {r['state_bytes'] / 2**20:.1f} | {r['bytes_per_param']:.3f} | "
            f"{r['median_step_ms']:.2f} | {r['step_vs_adafactor'] or float('nan'):.2f} | "
            f"{r['step_vs_fused_adamw'] or float('nan'):.2f} |"
        )
    sys.exit(1 if RESULTS.get("errors") else 0)


if __name__ == "__main__":
    main()
