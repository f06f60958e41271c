"""flora_opt.FloraAccelerator: an unchanged accelerate loop, compressed accumulation, layer-wise, checkpoints."""

import math

import pytest
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState, GradientState

import flora_opt
from flora_opt.accumulation import CompressedAccumulator

K = 4


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def make_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
    )


def make_optimizer(name, model):
    if name == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    return flora_opt.Flora(model.parameters(), lr=1e-2, rank=4)


def batch(index):
    generator = torch.Generator().manual_seed(index)
    return torch.randn(6, 24, generator=generator)


def accelerate_loop(accelerator, model, optimizer, scheduler, indices, max_norm=1.0, checks=None):
    """The standard accelerate loop, written once for every accelerator under test."""
    norms = []
    for index in indices:
        with accelerator.accumulate(model):
            loss = model(batch(index)).pow(2).mean()
            accelerator.backward(loss)
            if checks is not None:
                checks(accelerator, model)
            if accelerator.sync_gradients:
                norms.append(float(accelerator.clip_grad_norm_(model.parameters(), max_norm)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    return norms


def run(accelerator_cls, optimizer_name="adamw", steps=3 * K, max_norm=1.0, checks=None, **kwargs):
    accelerator = accelerator_cls(gradient_accumulation_steps=K, **kwargs)
    model = make_model()
    optimizer = make_optimizer(optimizer_name, model)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    norms = accelerate_loop(accelerator, model, optimizer, scheduler, range(steps), max_norm, checks)
    return accelerator, model, norms


@pytest.mark.parametrize("optimizer_name", ["adamw", "flora"])
def test_rank_none_is_exactly_accelerate(optimizer_name):
    _, expected, expected_norms = run(Accelerator, optimizer_name)
    accelerator, model, norms = run(flora_opt.FloraAccelerator, optimizer_name)
    assert isinstance(accelerator, Accelerator) and accelerator.accumulator is None
    assert norms == expected_norms
    for p, q in zip(expected.parameters(), model.parameters()):
        assert torch.equal(p, q)


def test_compressed_accumulation_in_accelerate_loop():
    compressed_shapes = {(40, 24), (16, 40)}

    def checks(accelerator, model):
        for param in model.parameters():
            if tuple(param.shape) in compressed_shapes:
                assert (param.grad is None) != accelerator.sync_gradients
            else:
                assert param.grad is not None
        bases = 4 * (24 * 4 + 16 * 4)  # the subspace estimator's bases, kept between cycles
        expected = bases if accelerator.sync_gradients else bases + 4 * (40 * 4 + 4 * 40)
        assert accelerator.accumulator.buffer_bytes() == expected

    accelerator, model, norms = run(
        flora_opt.FloraAccelerator, "flora", checks=checks, accumulation_compression_rank=4, accumulation_seed=9
    )
    assert accelerator.accumulator.cycle == 3
    assert {tuple(p.shape) for p in accelerator.accumulator.compressed_parameters()} == compressed_shapes
    # the same numbers as the plain-PyTorch accumulator (one shared code path)
    model_b = make_model()
    optimizer = make_optimizer("flora", model_b)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    accumulator = CompressedAccumulator(optimizer, 4, accumulation_steps=K, seed=9)
    plain_norms = []
    for index in range(3 * K):
        accumulator.backward(model_b(batch(index)).pow(2).mean() / K)
        if accumulator.sync_gradients:
            plain_norms.append(float(torch.nn.utils.clip_grad_norm_(model_b.parameters(), 1.0)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
    assert norms == plain_norms
    for p, q in zip(model.parameters(), model_b.parameters()):
        assert torch.equal(p, q)
    # and close to (not equal to) naive accumulation
    _, naive, _ = run(flora_opt.FloraAccelerator, "flora")
    differences = [(p - q).abs().max().item() for p, q in zip(model.parameters(), naive.parameters())]
    assert 0 < max(differences) < 0.05


@pytest.mark.parametrize("optimizer_name", ["adamw", "flora"])
def test_layerwise_matches_standard(optimizer_name):
    _, expected, expected_norms = run(
        flora_opt.FloraAccelerator, optimizer_name, max_norm=100.0, accumulation_compression_rank=4
    )

    def checks(accelerator, model):
        if accelerator.sync_gradients:
            assert all(p.grad is None for p in model.parameters())  # applied and freed during backward

    accelerator, model, norms = run(
        flora_opt.FloraAccelerator,
        optimizer_name,
        max_norm=100.0,
        checks=checks,
        accumulation_compression_rank=4,
        layerwise=True,
        layerwise_max_grad_norm=100.0,
    )
    assert accelerator.accumulator.layerwise
    assert norms == pytest.approx(expected_norms, rel=1e-5)
    for p, q in zip(expected.parameters(), model.parameters()):
        torch.testing.assert_close(q, p, rtol=1e-6, atol=1e-7)


def test_layerwise_clip_grad_norm_needs_configuration():
    with pytest.raises(RuntimeError, match=r"layerwise_max_grad_norm=1.0"):
        run(flora_opt.FloraAccelerator, layerwise=True, max_norm=1.0)
    accelerator, _, norms = run(flora_opt.FloraAccelerator, layerwise=True, max_norm=float("inf"))
    assert len(norms) == 3 and all(n > 0 for n in norms)
    with pytest.raises(RuntimeError, match="clip_grad_value_"):
        accelerator.clip_grad_value_([], 1.0)


@pytest.mark.parametrize("kwargs", [dict(accumulation_compression_rank=4), dict(layerwise=True)])
@pytest.mark.parametrize("stop", [6, 9])
def test_save_and_load_state_mid_cycle_is_bit_exact(tmp_path, kwargs, stop):
    total = 3 * K

    def fresh():
        accelerator = flora_opt.FloraAccelerator(gradient_accumulation_steps=K, **kwargs)
        model = make_model()
        optimizer = make_optimizer("flora", model)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
        return (accelerator, *accelerator.prepare(model, optimizer, scheduler))

    accelerator, model, optimizer, scheduler = fresh()
    accelerate_loop(accelerator, model, optimizer, scheduler, range(total), max_norm=float("inf"))
    expected = [p.detach().clone() for p in model.parameters()]

    accelerator, model, optimizer, scheduler = fresh()
    accelerate_loop(accelerator, model, optimizer, scheduler, range(stop), max_norm=float("inf"))
    accelerator.save_state(str(tmp_path / "ckpt"))
    state = torch.load(tmp_path / "ckpt" / "flora_accumulator_0.pt", weights_only=True)
    assert (state["cycle"], state["micro_step"]) == (stop // K, stop % K)
    assert state["grads"]  # partial sums of the naively accumulated tensors are saved too

    accelerator, model, optimizer, scheduler = fresh()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # make sure the weights come from the checkpoint
    accelerator.load_state(str(tmp_path / "ckpt"))
    assert accelerator.step == stop
    assert (accelerator.accumulator.cycle, accelerator.accumulator.micro_step) == (stop // K, stop % K)
    accelerate_loop(accelerator, model, optimizer, scheduler, range(stop, total), max_norm=float("inf"))
    for p, q in zip(expected, model.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(accumulation_compression_rank=0), ValueError, r"Invalid accumulation_compression_rank: 0"),
        (dict(accumulation_compression_rank=-1), ValueError, r"Invalid accumulation_compression_rank: -1"),
        (dict(accumulation_compression_rank="8"), ValueError, r"Invalid accumulation_compression_rank: '8'"),
        (dict(accumulation_compression_rank=8.0), ValueError, r"Invalid accumulation_compression_rank: 8.0"),
        (dict(accumulation_seed=-1), ValueError, r"Invalid accumulation_seed: -1"),
        (dict(layerwise=1), ValueError, r"Invalid layerwise: 1"),
        (dict(layerwise_max_grad_norm=1.0), ValueError, r"Invalid layerwise_max_grad_norm: 1.0: needs layerwise"),
        (dict(layerwise=True, layerwise_max_grad_norm=-1.0), ValueError, r"Invalid layerwise_max_grad_norm: -1.0"),
        (dict(accumulation_compresion_rank=8), TypeError, r"accumulation_compresion_rank"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        flora_opt.FloraAccelerator(**kwargs)


def test_incompatible_usage_fails_clearly():
    accelerator = flora_opt.FloraAccelerator(gradient_accumulation_steps=K, accumulation_compression_rank=4)
    model = make_model()
    accelerator.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(NotImplementedError, match="one optimizer"):
        accelerator.prepare(torch.optim.SGD(model.parameters(), lr=0.1))
    with pytest.raises(RuntimeError, match=r"call accelerator.backward\(loss\)"), accelerator.accumulate(model):
        model(batch(0)).pow(2).mean().backward()  # bypasses accelerator.backward
    assert math.isfinite(float(accelerator.clip_grad_norm_(model.parameters(), 1.0)))


# ---- loops whose cycle layer-wise updates cannot follow -------------------------------------


@pytest.mark.parametrize("retain_graph", [False, True])
def test_layerwise_two_backwards_in_the_sync_micro_batch_is_refused(retain_graph):
    accelerator = flora_opt.FloraAccelerator(gradient_accumulation_steps=2, layerwise=True)
    model = make_model()
    optimizer = make_optimizer("flora", model)
    model, optimizer = accelerator.prepare(model, optimizer)
    steps = []
    optimizer.optimizer.register_step_post_hook(lambda *args: steps.append(1))
    with pytest.raises(
        RuntimeError, match=r"layerwise=True\): accelerator.backward was called twice in the micro-batch"
    ):
        for index in range(8):
            with accelerator.accumulate(model):
                if retain_graph:
                    loss = model(batch(index)).pow(2).mean()
                    accelerator.backward(loss, retain_graph=True)
                    accelerator.backward(loss)
                else:
                    accelerator.backward(model(batch(index)).pow(2).mean())
                    accelerator.backward(model(batch(100 + index)).pow(2).mean())
                optimizer.step()
                optimizer.zero_grad()
    assert index == 1  # refused in the first sync micro-batch, after one layer-wise update


def test_two_backwards_per_micro_batch_without_layerwise_accumulate_everything():
    def run_two(accelerator_cls, **kwargs):
        accelerator = accelerator_cls(gradient_accumulation_steps=2, **kwargs)
        model = make_model()
        optimizer = make_optimizer("adamw", model)
        model, optimizer = accelerator.prepare(model, optimizer)
        for index in range(4):
            with accelerator.accumulate(model):
                accelerator.backward(model(batch(index)).pow(2).mean())
                accelerator.backward(model(batch(100 + index)).pow(2).mean())
                optimizer.step()
                optimizer.zero_grad()
        return model

    expected = run_two(Accelerator)
    model = run_two(flora_opt.FloraAccelerator, accumulation_compression_rank=64)  # larger than every matrix
    for p, q in zip(expected.parameters(), model.parameters()):
        torch.testing.assert_close(p, q)


@pytest.mark.parametrize("kwargs", [dict(layerwise=True), dict(accumulation_compression_rank=2)])
def test_manual_accumulation_without_accumulate_is_refused(kwargs):
    def manual(accelerator):
        model = make_model()
        optimizer = make_optimizer("flora", model)
        model, optimizer = accelerator.prepare(model, optimizer)
        steps = []
        optimizer.optimizer.register_step_post_hook(lambda *args: steps.append(1))
        for index in range(8):
            accelerator.backward(model(batch(index)).pow(2).mean())
            if (index + 1) % 4 == 0:
                optimizer.step()
                optimizer.zero_grad()
        return steps

    assert len(manual(Accelerator(gradient_accumulation_steps=4))) == 2
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    with pytest.raises(RuntimeError, match=r"outside `with accelerator.accumulate\(model\):`"):
        manual(flora_opt.FloraAccelerator(gradient_accumulation_steps=4, **kwargs))
