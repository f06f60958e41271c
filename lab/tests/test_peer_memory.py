"""The lab's state-bytes formulas of the peers (``flora_lab.peer_memory``: 8-bit AdamW of torchao
and of bitsandbytes, GaLore, APOLLO) equal what each optimizer actually allocates, and
``LiveTensorBytes`` counts live storages exactly.

Every formula is checked against ``optimizer_state_bytes`` (the exact sum of the state tensors'
``numel * element_size``) after real optimizer steps on small models whose shapes straddle the
thresholds (8-bit at 4096 elements, torchao's ``numel % 256``, GaLore's ``min(r, m, n)``). Peers
that are not importable here are skipped.
"""

from __future__ import annotations

import importlib.util

import pytest

torch = pytest.importorskip("torch")

from flora_lab import peer_memory as P  # noqa: E402
from flora_lab.livebytes import LiveTensorBytes  # noqa: E402
from flora_lab.lm import LMConfig, TinyLlama  # noqa: E402
from flora_lab.peer_memory import optimizer_state_bytes  # noqa: E402
from flora_opt import memory as M  # noqa: E402


def _has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _step(model, optimizer, steps=2):
    """Every parameter gets a gradient (state shapes depend on the shapes only, not the values)."""
    for _ in range(steps):
        sum(p.float().pow(2).sum() for p in model.parameters()).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _predicted(method, model, rank=64):
    return P.method_state_bytes(method, M.params_from_module(model), rank)


@pytest.mark.skipif(not _has("torchao"), reason="torchao not installed")
def test_torchao_adamw8bit_formula(monkeypatch):
    import logging

    logging.getLogger("torchao").setLevel(logging.ERROR)
    from torchao.optim import AdamW8bit

    torch.manual_seed(0)
    # embedding 300 x 72 = 21600 (% 256 != 0: fp32 path), 72 x 72 = 5184 (8-bit), 192-vectors (fp32)
    model = TinyLlama(LMConfig(vocab_size=300, dim=72, n_layers=1, n_heads=1))
    optimizer = AdamW8bit(model.parameters(), lr=1e-3)
    # run torchao's step eagerly: torch.compile on a CPU takes minutes and changes no state shape
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    _step(model, optimizer, steps=1)
    assert any(type(t).__name__ == "OptimState8bit" for s in optimizer.state.values() for t in s.values())
    assert optimizer_state_bytes(optimizer) == _predicted("adamw8bit_torchao", model)


@pytest.mark.skipif(not _has("bitsandbytes"), reason="bitsandbytes not installed")
def test_bnb_adamw8bit_formula():
    import bitsandbytes as bnb

    torch.manual_seed(0)
    # 8-bit from 4096 elements: 48000 (256 does not divide it), 83200; fp32 below: 4000, 3510, vectors
    shapes = dict(
        embed=(300, 160), wide=(520, 160), wide_bias=(520,), small=(40, 100), conv=(130, 3, 3, 3), norm=(160,)
    )
    model = torch.nn.ParameterDict({name: torch.nn.Parameter(torch.randn(shape)) for name, shape in shapes.items()})
    optimizer = bnb.optim.AdamW8bit(model.parameters(), lr=1e-3)
    _step(model, optimizer)
    assert optimizer_state_bytes(optimizer) == _predicted("adamw8bit_bnb", model)


def _lowrank_groups(model, options):
    infos = {i.name: i for i in M.params_from_module(model)}
    low = [p for n, p in model.named_parameters() if P.is_block_matrix(infos[n])]
    other = [p for n, p in model.named_parameters() if not P.is_block_matrix(infos[n])]
    return [{"params": other}, {"params": low, **options}]


@pytest.mark.skipif(not _has("galore_torch"), reason="galore-torch not installed")
@pytest.mark.parametrize("rank", [16, 200])
def test_galore_formula(rank):
    import galore_torch

    torch.manual_seed(0)
    model = TinyLlama(LMConfig(vocab_size=300, dim=128, n_layers=2, n_heads=2))
    groups = _lowrank_groups(model, dict(rank=rank, update_proj_gap=200, scale=0.25, proj_type="std"))
    optimizer = galore_torch.GaLoreAdamW(groups, lr=1e-3, no_deprecation_warning=True)
    _step(model, optimizer)
    assert optimizer_state_bytes(optimizer) == _predicted("galore", model, rank)


@pytest.mark.skipif(not _has("apollo_torch"), reason="apollo-torch not installed")
def test_apollo_formula():
    import apollo_torch

    torch.manual_seed(0)
    model = TinyLlama(LMConfig(vocab_size=300, dim=128, n_layers=2, n_heads=2))
    groups = _lowrank_groups(
        model, dict(rank=16, proj="random", scale_type="channel", scale=1.0, update_proj_gap=200, proj_type="std")
    )
    optimizer = apollo_torch.APOLLOAdamW(groups, lr=1e-3)
    _step(model, optimizer)
    assert optimizer_state_bytes(optimizer) == _predicted("apollo", model, 16)


def test_peer_formula_errors():
    with pytest.raises(ValueError, match="unknown method 'sgd'"):
        P.method_state_bytes("sgd", [])
    with pytest.raises(ValueError, match="galore needs an int rank, got rank=None"):
        P.method_state_bytes("galore", [M.ParamInfo("w", (4, 4))], None)


def test_live_tensor_bytes_counts_storages_exactly():
    existing = torch.zeros(100)
    with LiveTensorBytes() as mem:
        mem.track([existing, existing[10:]])  # a view shares its storage: counted once
        assert mem.live == 400
        a = torch.empty(1000, dtype=torch.float32)
        b = torch.empty(250, dtype=torch.float64)
        assert mem.live == 400 + 4000 + 2000
        del a
        assert mem.live == 400 + 2000
        c = b.view(50, 5)
        assert mem.live == 400 + 2000
        mem.reset_peak()
        d = c * 2  # a new storage
        assert mem.peak == 400 + 2000 + 2000
        del d
    assert mem.live == 2400 and mem.peak == 4400
