"""``benchmarks/run.py quality``: its set-up, the Pareto and target logic, the
run queue's priorities, and the state-bytes formula the report checks against the counted bytes."""

from __future__ import annotations

import itertools
import threading
import time

import pytest
import torch

from benchmarks import run as bench

pytest.importorskip("flora_lab")


def test_pretrain_preset_is_block_dominated_and_long_enough():
    preset = bench.PRESETS["pretrain"]
    facts = bench.model_facts(preset["lm"])
    assert facts["block_fraction"] >= 0.85
    assert preset["steps"] * preset["batch_size"] * preset["seq_len"] >= 2**20
    assert preset["tokenizer"] == "bytes" and preset["lm"]["vocab_size"] == 256
    assert preset["seeds"] == 3


def test_pretrain_contenders_cover_the_issue():
    preset = bench.PRESETS["pretrain"]
    min_dim = bench.model_facts(preset["lm"])["min_block_dim"]
    contenders = bench.quality_contenders(
        "pretrain", preset["ranks"], preset["peer_ranks"], preset["bits_rank"], preset["lora_rank"], preset["interval"]
    )
    kinds = [c["kind"] for c in contenders]
    flora_ranks = [c["options"]["rank"] for c in contenders if c["kind"] == "flora"]
    assert len(flora_ranks) >= 3 and min(flora_ranks) * 4 <= min_dim
    assert any(4 * r <= min_dim for r in flora_ranks if r != min(flora_ranks))
    for peer in ("galore", "apollo"):
        assert kinds.count(peer) >= 2
    for kind in ("adamw", "adafactor_momentum", "flora_8bit", "lora"):
        assert kind in kinds
    for c in contenders:
        grid = sorted(c["grid"])
        assert len(grid) >= 3 and all(b / a <= 2.0 + 1e-9 for a, b in itertools.pairwise(grid)), c["id"]
        if c["kind"] in ("adamw", "galore", "apollo", "lora"):
            assert c["options"]["betas"] == [0.9, 0.95] and c["options"]["weight_decay"] == 0.1
            assert c["options"]["eps"] == 1e-8
        if c["kind"] in ("flora", "flora_8bit"):
            assert c["options"]["min_dim_size_to_factor"] == 1
            assert c["options"]["full_momentum_for"] == ["embed.", "lm_head."]
            assert c["options"]["kappa"] == preset["interval"]


def test_demo_preset_sweeps_every_demo_optimizer_around_its_default():
    from flora_lab.demo import DEFAULT_LRS, OPTIMIZERS

    contenders = bench.quality_contenders("demo", [32], [32], 32, None, 50)
    assert [c["kind"] for c in contenders] == list(OPTIMIZERS)
    for c in contenders:
        assert c["grid"] == [DEFAULT_LRS[c["kind"]] / 2, DEFAULT_LRS[c["kind"]], DEFAULT_LRS[c["kind"]] * 2]


def test_next_lr_steps_beyond_the_edge_by_the_grid_ratio():
    assert bench._next_lr([0.05, 0.1, 0.2], "high") == 0.4
    assert bench._next_lr([0.05, 0.1, 0.2], "low") == 0.025


def _row(cid, kind, state, mean, std=0.01, rank=None):
    return dict(id=cid, kind=kind, label=cid, state_bytes=state, mean=mean, std=std, rank=rank)


def test_pareto_front_and_targets():
    rows = [
        _row("adafactor_m", "adafactor_momentum", 1000, 1.50),
        _row("flora_r16", "flora", 300, 1.51, rank=16),
        _row("flora_r32", "flora", 400, 1.49, rank=32),
        _row("galore_r8", "galore", 250, 1.52),
        _row("apollo_r8", "apollo", 350, 1.505),
    ]
    assert bench.pareto_front(rows) == {"galore_r8", "flora_r16", "apollo_r8", "flora_r32"}
    lines = bench.quality_targets(rows, min_block_dim=64)
    text = "\n".join(lines)
    assert "flora_r16 vs Adafactor+momentum: +0.67%" in text and "met: target within 1%" in text
    assert "flora_r32 vs Adafactor+momentum: -0.67%" in text and "for reference" in text
    assert "flora_r16 on the Pareto front against the peers: met" in text
    rows[3]["mean"] = 1.50  # GaLore r=8: smaller and now better than Flora r=16
    text = "\n".join(bench.quality_targets(rows, min_block_dim=64))
    assert "flora_r16 on the Pareto front: MISSED: galore_r8 holds 250 bytes (0.83x" in text
    assert "flora_r16" not in bench.pareto_front(rows)


def test_slots_let_waiters_in_by_priority():
    slots = bench.Slots(1)
    order, started = [], []
    gate = threading.Event()

    def first():
        with slots.hold(0):
            started.append(True)
            gate.wait(10)

    def waiter(name, priority):
        with slots.hold(priority):
            order.append(name)

    holder = threading.Thread(target=first)
    holder.start()
    while not started:
        time.sleep(0.01)
    threads = []
    for name, priority in (("grid-b", (1, 1)), ("grid-a", (1, 0)), ("seed", (0, 5))):
        thread = threading.Thread(target=waiter, args=(name, priority))
        thread.start()
        threads.append(thread)
        while len(slots.waiting) < len(threads):
            time.sleep(0.01)
    gate.set()
    for thread in [holder, *threads]:
        thread.join(10)
    assert order == ["seed", "grid-a", "grid-b"]


@pytest.mark.parametrize("kind", ["flora", "flora_8bit"])
def test_worker_formula_matches_counted_state_bytes(kind):
    """The report's formula column: ``flora_opt.statebytes`` of each layout under the run's
    options equals the bytes counted from the state tensors after a step."""
    if kind == "flora_8bit":
        pytest.importorskip("torchao")
    from benchmarks import worker
    from flora_lab import contenders
    from flora_lab.lm import LMConfig, TinyLlama
    from flora_lab.peer_memory import optimizer_state_bytes

    spec = next(c for c in bench.quality_contenders("pretrain", [16], [8], 32, 16, 128) if c["kind"] == kind)
    torch.manual_seed(0)
    model = TinyLlama(LMConfig(**bench.QUALITY_MODEL))
    optimizer = contenders.make(kind, model, 0.1, **spec["options"])
    ids = torch.randint(0, 256, (2, 17))
    model(ids[:, :-1], ids[:, 1:]).backward()
    optimizer.step()
    assert worker.predicted_state_bytes(spec, model) == optimizer_state_bytes(optimizer)
