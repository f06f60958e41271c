"""Layer-wise updates fused into backward: same parameters as the usual step, less gradient memory."""

import math

import pytest
import torch
import torch.utils.checkpoint

import flora_opt
from flora_opt.accumulation import CompressedAccumulator, enable_layerwise_updates, step_parameter

K = 3


class Block(torch.nn.Module):
    def __init__(self, width):
        super().__init__()
        self.norm = torch.nn.LayerNorm(width)
        self.up = torch.nn.Linear(width, 2 * width)
        self.down = torch.nn.Linear(2 * width, width)

    def forward(self, h):
        return h + self.down(torch.tanh(self.up(self.norm(h))))


class Net(torch.nn.Module):
    """Embedding -> blocks (optionally checkpointed) -> head tied to the embedding."""

    def __init__(self, checkpointing=None, vocab=50, width=24, depth=2):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, width)
        self.blocks = torch.nn.ModuleList(Block(width) for _ in range(depth))
        self.checkpointing = checkpointing  # None, "reentrant" or "non_reentrant"

    def forward(self, tokens):
        h = self.embed(tokens)
        for block in self.blocks:
            if self.checkpointing is None:
                h = block(h)
            else:
                h = torch.utils.checkpoint.checkpoint(block, h, use_reentrant=self.checkpointing == "reentrant")
        logits = h @ self.embed.weight.T
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten())


def make_optimizer(name, model):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    if name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    return flora_opt.Flora(model.parameters(), lr=1e-2, rank=4)


def batches(n, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (2, 12), generator=generator) for _ in range(n)]


def train(optimizer_name, steps, rank=None, layerwise=False, checkpointing=None, max_grad_norm=None):
    torch.manual_seed(0)
    model = Net(checkpointing)
    optimizer = make_optimizer(optimizer_name, model)
    accumulator = CompressedAccumulator(
        optimizer, rank, accumulation_steps=steps, layerwise=layerwise, max_grad_norm=max_grad_norm, seed=5
    )
    for x in batches(3 * steps):
        accumulator.backward(model(x) / steps)
        if accumulator.sync_gradients:
            optimizer.step()
            optimizer.zero_grad()
    return model, accumulator


CASES = [
    # optimizer, accumulation steps, accumulation rank, activation checkpointing
    ("adamw", 1, None, None),
    ("flora", 1, None, None),
    ("sgd", 1, None, None),
    ("adamw", K, None, None),
    ("flora", K, None, None),
    ("adamw", K, 4, None),
    ("flora", K, 4, None),
    ("flora", 1, None, "non_reentrant"),
    ("adamw", K, 4, "non_reentrant"),
    ("flora", K, 4, "reentrant"),
]


@pytest.mark.parametrize("optimizer_name,steps,rank,checkpointing", CASES)
def test_layerwise_matches_standard_step(optimizer_name, steps, rank, checkpointing):
    standard, _ = train(optimizer_name, steps, rank, layerwise=False, checkpointing=checkpointing)
    layerwise, accumulator = train(optimizer_name, steps, rank, layerwise=True, checkpointing=checkpointing)
    assert accumulator.cycle == 3
    for (name, p), q in zip(standard.named_parameters(), layerwise.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7, msg=name)
        assert q.grad is None
    # the runs really trained (and differ from the initial weights)
    torch.manual_seed(0)
    initial = Net()
    assert not torch.allclose(initial.embed.weight, layerwise.embed.weight)


def test_at_most_one_full_gradient_held_during_backward():
    held = {}
    for layerwise in (False, True):
        torch.manual_seed(0)
        model = Net()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
        enable_layerwise_updates(optimizer) if layerwise else None
        counts = []
        params = list(model.parameters())

        def observe(_param, counts=counts, params=params):
            counts.append(sum(p.grad is not None for p in params))

        for p in params:  # registered after the layer-wise hooks: runs after them
            p.register_post_accumulate_grad_hook(observe)
        model(batches(1)[0]).backward()
        held[layerwise] = max(counts)
    assert held[False] == len(list(Net().parameters()))
    assert held[True] == 0  # each gradient is applied and freed as soon as it is complete


def test_step_parameter_equals_full_step_for_generic_and_flora():
    for name in ("adamw", "flora"):
        models, optimizers = [], []
        for _ in range(2):
            torch.manual_seed(0)
            model = Net()
            if name == "adamw":
                params = list(model.parameters())
                optimizer = torch.optim.AdamW([{"params": params[:3]}, {"params": params[3:], "lr": 3e-3}], lr=1e-2)
            else:
                optimizer = make_optimizer(name, model)
                # the per-tensor path, which step_param uses, bit for bit (the grouped default
                # agrees within float32 rounding: tests/test_engine.py)
                for group in optimizer.param_groups:
                    group["foreach"] = False
            models.append(model)
            optimizers.append(optimizer)
        for step in range(3):
            for model in models:
                model(batches(1, seed=step)[0]).backward()
            optimizers[0].step()
            for p in reversed(list(models[1].parameters())):
                step_parameter(optimizers[1], p)
            for optimizer in optimizers:
                optimizer.zero_grad()
        for p, q in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(p, q), name
        assert [len(g["params"]) for g in optimizers[0].param_groups] == [
            len(g["params"]) for g in optimizers[1].param_groups
        ]


def test_flora_step_param_rejects_foreign_parameter():
    optimizer = flora_opt.Flora(torch.nn.Linear(4, 4).parameters(), lr=1e-3)
    with pytest.raises(ValueError, match="not in this optimizer"):
        optimizer.step_param(torch.nn.Parameter(torch.zeros(3)))


def test_step_param_does_not_scan_the_groups(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(50)]
    opt = flora_opt.Flora([{"params": params[:25]}, {"params": params[25:], "lr": 1e-3}], lr=1e-2, rank=2)
    for p in params:
        p.grad = torch.randn_like(p)
    reference = flora_opt.Flora(
        [
            {"params": [torch.nn.Parameter(p.detach().clone()) for p in params[:25]]},
            {"params": [torch.nn.Parameter(p.detach().clone()) for p in params[25:]], "lr": 1e-3},
        ],
        lr=1e-2,
        rank=2,
        foreach=False,
    )  # the per-tensor path, which step_param uses: bit-identical results
    ref_params = [p for g in reference.param_groups for p in g["params"]]
    for p, q in zip(params, ref_params):
        q.grad = p.grad.clone()
    reference.step()

    class Counting(list):
        iterations = 0

        def __iter__(self):
            Counting.iterations += 1
            return super().__iter__()

    for group in opt.param_groups:
        group["params"] = Counting(group["params"])
    for p in reversed(params):
        opt.step_param(p)
    assert Counting.iterations == 0
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    assert opt.state[params[30]]["seed"] == reference.state[ref_params[30]]["seed"]
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.step_param(torch.nn.Parameter(torch.randn(2)))


def test_optimizer_step_and_zero_grad_still_work():
    torch.manual_seed(0)
    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    enable_layerwise_updates(optimizer)
    before = model.embed.weight.detach().clone()
    model(batches(1)[0]).backward()
    after_backward = model.embed.weight.detach().clone()
    assert not torch.equal(before, after_backward)  # updated during backward
    optimizer.step()  # nothing left to apply
    assert torch.equal(after_backward, model.embed.weight)
    model.blocks[0].up.bias.grad = torch.ones_like(model.blocks[0].up.bias)  # a gradient set by hand
    bias = model.blocks[0].up.bias.detach().clone()
    optimizer.step()
    torch.testing.assert_close(model.blocks[0].up.bias, bias - 1.0)
    optimizer.zero_grad()
    assert all(p.grad is None for p in model.parameters())


def test_layerwise_clipping_bounds_global_norm_and_reports_exact_norm():
    max_norm = 0.05
    # gradients of the first step, computed normally
    torch.manual_seed(0)
    model = Net()
    x = batches(1)[0]
    model(x).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    global_norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads.values()]))
    assert global_norm > 4 * max_norm  # clipping is active
    total = sum(g.numel() for g in grads.values())
    # layer-wise SGD with lr=1: the applied gradient is minus the parameter change
    torch.manual_seed(0)
    model = Net()
    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    accumulator = enable_layerwise_updates(optimizer, max_grad_norm=max_norm)
    accumulator.backward(model(x))
    applied = {name: initial[name] - p.detach() for name, p in model.named_parameters()}
    applied_norm = torch.linalg.vector_norm(torch.stack([a.norm() for a in applied.values()]))
    assert applied_norm <= max_norm * (1 + 1e-4)
    for name, grad in grads.items():
        budget = max_norm * math.sqrt(grad.numel() / total)
        if grad.norm() <= budget:
            torch.testing.assert_close(applied[name], grad)
        else:
            torch.testing.assert_close(applied[name].norm(), torch.tensor(budget), rtol=1e-4, atol=0)
            torch.testing.assert_close(applied[name] / applied[name].norm(), grad / grad.norm(), rtol=0, atol=1e-4)
    torch.testing.assert_close(accumulator.last_grad_norm, global_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(accumulator.clip_grad_norm_(max_norm), global_norm, rtol=1e-5, atol=0)
    torch.testing.assert_close(accumulator.clip_grad_norm_(float("inf")), global_norm, rtol=1e-5, atol=0)
    with pytest.raises(RuntimeError, match=r"pass max_grad_norm=1.0"):
        accumulator.clip_grad_norm_(1.0)
    with pytest.raises(ValueError, match="Invalid norm_type: 1"):
        accumulator.clip_grad_norm_(max_norm, norm_type=1)


def test_gradient_in_two_pieces_is_refused_in_layerwise_mode():
    """A tensor used inside a use_reentrant=True checkpoint and outside gets two AccumulateGrad calls."""
    torch.manual_seed(0)
    shared = torch.nn.Linear(8, 8)

    def loss_of(x):
        h = torch.utils.checkpoint.checkpoint(shared, x, use_reentrant=True)
        return shared(h).pow(2).mean()

    x = torch.randn(4, 8, requires_grad=True)
    optimizer = torch.optim.SGD(shared.parameters(), lr=0.1)
    accumulator = enable_layerwise_updates(optimizer)
    with pytest.raises(RuntimeError, match="two pieces"):
        accumulator.backward(loss_of(x))


def test_layerwise_import_path_is_kept_and_has_no_cycle():
    import ast
    import importlib
    import pathlib

    legacy = importlib.import_module("flora_opt.layerwise")
    assert legacy.enable_layerwise_updates is enable_layerwise_updates
    assert flora_opt.enable_layerwise_updates is enable_layerwise_updates
    source = pathlib.Path(importlib.import_module("flora_opt.accumulation").__file__).read_text()
    imported = {node.module for node in ast.walk(ast.parse(source)) if isinstance(node, ast.ImportFrom) and node.module}
    assert "layerwise" not in imported
