"""The library's state-bytes formulas (``flora_opt.memory``: AdamW, Adafactor, Flora) equal what
each optimizer actually allocates; the estimator's gradient bytes under compressed accumulation;
presets and configs on the meta device. The lab's peers are checked in
``lab/tests/test_peer_memory.py``.

Every formula is checked against ``optimizer_state_bytes`` (the lab's exact sum of the state
tensors' ``numel * element_size``, used here as the measuring tool) after real optimizer steps on
small models whose shapes straddle the thresholds (factoring at 128, compression at
``min(m, n) > rank``, 8-bit at 4096 elements).
"""

from __future__ import annotations

import importlib.util
import json
import math

import pytest

torch = pytest.importorskip("torch")

import flora_opt  # noqa: E402
from flora_lab.peer_memory import optimizer_state_bytes  # noqa: E402
from flora_opt import memory as M  # noqa: E402


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class Mixed(torch.nn.Module):
    """Shapes on both sides of every threshold, names following the block convention."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(300, 160)  # embedding: never a block matrix
        self.blocks = torch.nn.ModuleList(
            [
                torch.nn.ModuleDict(
                    dict(
                        wide=torch.nn.Linear(160, 520, bias=True),  # (520, 160): cols side, factored
                        small=torch.nn.Linear(100, 40, bias=False),  # min 40 < 128: unfactored; <= rank 64
                        conv=torch.nn.Conv2d(3, 130, 3),  # (130, 27): viewed as a matrix
                    )
                )
                for _ in range(2)
            ]
        )
        self.norm = torch.nn.LayerNorm(160)
        self.lm_head = torch.nn.Linear(160, 300, bias=False)

    def forward(self, ids):
        x = self.norm(self.embed(ids))
        dtype = x.dtype
        total = self.lm_head(x).pow(2).mean()
        for block in self.blocks:
            total = total + block["wide"](x).pow(2).mean()
            total = total + block["small"](torch.ones(2, 100, dtype=dtype)).pow(2).mean()
            total = total + block["conv"](torch.ones(1, 3, 5, 5, dtype=dtype)).pow(2).mean()
        return total


def _step(model, optimizer, steps=2):
    for _ in range(steps):
        ids = torch.randint(0, 300, (2, 7))
        model(ids).float().pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _predicted(method, model, rank=64):
    return M.method_state_bytes(method, M.params_from_module(model), rank)


OWN_CASES = [
    ("adamw", lambda m, r: torch.optim.AdamW(m.parameters(), lr=1e-3)),
    ("flora", lambda m, r: flora_opt.Flora(m.parameters(), lr=1e-2, rank=r)),
    ("flora_8bit", lambda m, r: flora_opt.Flora(m.parameters(), lr=1e-2, rank=r, quantization=True)),
]


@pytest.mark.parametrize("rank", [8, 64, 200])
@pytest.mark.parametrize("method,build", OWN_CASES, ids=[c[0] for c in OWN_CASES])
def test_formula_matches_allocation(method, build, rank):
    torch.manual_seed(0)
    model = Mixed()
    optimizer = build(model, rank)
    _step(model, optimizer)
    measured = optimizer_state_bytes(optimizer)
    assert measured == _predicted(method, model, rank)
    if method.startswith("flora"):
        assert measured == optimizer.state_bytes()  # Flora's own accounting agrees


@pytest.mark.skipif(not _has("transformers"), reason="transformers not installed")
@pytest.mark.parametrize("beta1", [None, 0.9])
def test_adafactor_formula(beta1):
    from transformers.optimization import Adafactor

    torch.manual_seed(0)
    model = Mixed()
    optimizer = Adafactor(model.parameters(), lr=1e-3, beta1=beta1, scale_parameter=True, relative_step=False)
    _step(model, optimizer)
    method = "adafactor_momentum" if beta1 else "adafactor"
    assert optimizer_state_bytes(optimizer) == _predicted(method, model)


def test_bf16_parameters():
    torch.manual_seed(0)
    model = Mixed().to(torch.bfloat16)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _step(model, adamw)
    params = M.params_from_module(model)
    assert all(p.itemsize == 2 for p in params)
    assert optimizer_state_bytes(adamw) == M.method_state_bytes("adamw", params)
    flora = flora_opt.Flora(model.parameters(), lr=1e-2, rank=8)
    _step(model, flora)
    assert optimizer_state_bytes(flora) == M.method_state_bytes("flora", params, 8)  # fp32 state


def test_flora_formula_by_hand():
    """docs/algorithm.md section 11, computed here without flora_opt.core."""
    r = 32
    params = [
        M.ParamInfo("a", (768, 3072)),
        M.ParamInfo("b", (1024, 64)),
        M.ParamInfo("c", (768,)),
        M.ParamInfo("d", (100, 100)),
    ]
    expected = 4 * (r * 3072 + 768 + 3072)  # compressed, factored
    expected += 4 * (1024 * 64 + 1024 * 64)  # ratio 16 > 4: embedding-like, full momentum; min 64 < 128: full v
    expected += 4 * (768 + 768)  # vector: full second moment and momentum
    expected += 4 * (r * 100 + 100 * 100)  # min 100 < 128: unfactored, compressed momentum
    assert M.method_state_bytes("flora", params, r) == expected
    expected_8bit = (
        math.ceil(r * 3072 / 256) * 260
        + 4 * (768 + 3072)
        + 2 * math.ceil(1024 * 64 / 256) * 260
        + 4 * (768 + 768)
        + 4 * r * 100
        + math.ceil(100 * 100 / 256) * 260  # momentum 3200 < 4096 stays fp32
    )
    assert M.method_state_bytes("flora_8bit", params, r) == expected_8bit


# ---- gradient accumulation ------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rank", [8, 64])
def test_compressed_accumulation_holds_what_the_estimate_says(rank, dtype):
    """Between micro-batches, a layer-wise CompressedAccumulator holds exactly the float32
    buffers of the compressed tensors and the gradients of the others; the estimate adds one
    full gradient of a compressed tensor (the largest) for the moment before its hook compresses it."""
    from flora_opt.accumulation import CompressedAccumulator

    torch.manual_seed(0)
    model = Mixed().to(dtype)
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-2, rank=rank)
    accumulator = CompressedAccumulator(optimizer, rank=rank, accumulation_steps=2, layerwise=True)
    accumulator.backward(model(torch.randint(0, 300, (2, 7))).float())  # the first of two micro-batches
    compressed = {id(p) for p in accumulator.compressed_parameters()}
    assert compressed and len(compressed) < len(list(model.parameters()))  # both kinds present
    held = accumulator.buffer_bytes()
    for p in model.parameters():
        assert (p.grad is None) == (id(p) in compressed)
        if p.grad is not None:
            held += p.grad.numel() * p.grad.element_size()
    largest = max(p.numel() * p.element_size() for p in model.parameters() if id(p) in compressed)
    params = M.params_from_module(model)
    assert M.accumulation_gradient_bytes(params, rank) == held + largest
    # naive accumulation (rank None) keeps every gradient
    assert M.accumulation_gradient_bytes(params, None) == sum(p.numel() * p.element_size() for p in model.parameters())


# ---- configs on the meta device --------------------------------------------------------------


@pytest.mark.skipif(not _has("transformers"), reason="transformers not installed")
@pytest.mark.parametrize(
    "preset,n_params",
    [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168), ("llama-7b", 6_738_415_616), ("llama-13b", 13_015_864_320)],
)
def test_preset_parameter_counts(preset, n_params):
    est = M.estimate(preset, rank=256)
    assert est.n_params == n_params
    assert est.weights_bytes == 4 * n_params
    rows = {r["method"]: r for r in est.rows}
    n_tensors = len(M.params_from_config(M.PRESETS[preset][0]))
    assert rows["adamw"]["state_bytes"] == 8 * n_params + 4 * n_tensors
    assert rows["flora"]["state_bytes"] < rows["adafactor_momentum"]["state_bytes"] < rows["adamw"]["state_bytes"]
    assert est.grads_layerwise_bytes < est.grads_accumulation_bytes < est.grads_bytes


@pytest.mark.skipif(not _has("transformers"), reason="transformers not installed")
def test_meta_config_matches_real_model(tmp_path):
    """A local config.json estimated on meta equals the same model instantiated for real."""
    import transformers

    config = dict(
        model_type="gpt2", n_embd=160, n_layer=2, n_head=4, vocab_size=500, n_positions=64, tie_word_embeddings=True
    )
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    est = M.estimate(str(path), rank=32)
    hf = dict(config)
    hf.pop("model_type")
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf))
    assert est.n_params == sum(p.numel() for p in model.parameters())
    rows = {r["method"]: r for r in est.rows}
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-2, rank=32)
    ids = torch.randint(0, 500, (2, 16))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    assert rows["flora"]["state_bytes"] == optimizer_state_bytes(optimizer)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    adamw.step()
    assert rows["adamw"]["state_bytes"] == optimizer_state_bytes(adamw)
    # tied embedding: wte counted once; layer-wise gradients = wte (tied) + the largest other
    wte = 500 * 160 * 4
    largest = max(p.numel() * 4 for n, p in model.named_parameters() if "wte" not in n)
    assert est.grads_layerwise_bytes == wte + largest


@pytest.mark.skipif(not _has("transformers"), reason="transformers not installed")
def test_estimate_allocates_nothing():
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    M.estimate("llama-7b", rank=256, quantization=True)
    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mib < 1024  # 7B fp32 weights alone would be 25 GiB


def test_load_config_errors(tmp_path):
    with pytest.raises(M.ModelConfigError, match="Presets: gpt2"):
        M.load_config("gpt-17")
    with pytest.raises(M.ModelConfigError, match="not found"):
        M.load_config(str(tmp_path / "missing.json"))
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(M.ModelConfigError, match="model_type"):
        M.load_config(str(tmp_path))
    bad.write_text("{not json")
    with pytest.raises(M.ModelConfigError, match="JSON"):
        M.load_config(str(bad))
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        M.method_state_bytes("sgd", [])
    with pytest.raises(ValueError, match="unknown method 'galore'"):  # a peer: the lab's formula
        M.estimate(params=[M.ParamInfo("w", (4, 4))], methods=["galore"])
    with pytest.raises(ValueError, match="dtype"):
        M.estimate(params=[M.ParamInfo("w", (4, 4))], dtype="fp8")
