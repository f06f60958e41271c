"""Compressed gradient accumulation (docs/algorithm.md section 12): the rule, the math, the memory, the state."""

import numpy as np
import pytest
import torch

import flora_opt
from flora_lab.livebytes import LiveTensorBytes
from flora_opt import core
from flora_opt.accumulation import CompressedAccumulator
from flora_opt.ops import get_ops
from flora_opt.projection import STREAM_ACCUMULATION, STREAM_MOMENTUM, projection_key, tensor_seed
from flora_opt.reference import (
    reference_key,
    reference_projection,
    reference_subspace_accumulation,
    reference_tensor_seed,
)

K = 4
RANK = 8


def make_model(seed=0):
    torch.manual_seed(seed)
    # weights: (40, 24) -> cols side, (16, 40) -> rows side, (1, 16) -> naive (min dim 1 <= rank)
    return torch.nn.Sequential(
        torch.nn.Linear(24, 40),
        torch.nn.Tanh(),
        torch.nn.Linear(40, 16, bias=False),
        torch.nn.Tanh(),
        torch.nn.Linear(16, 1),
    )


def batches(n, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(6, 24, generator=generator) for _ in range(n)]


def loss_fn(model, x):
    return model(x).pow(2).mean() / K


def naive_grads(model, xs):
    model.zero_grad()
    for x in xs:
        loss_fn(model, x).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def accumulated_grads(model, xs, rank, seed, estimator="subspace"):
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulator = CompressedAccumulator(optimizer, rank, accumulation_steps=len(xs), seed=seed, estimator=estimator)
    for x in xs:
        accumulator.backward(loss_fn(model, x))
    assert accumulator.sync_gradients and accumulator.cycle == 1
    grads = [p.grad.clone() for p in model.parameters()]
    accumulator.remove()
    model.zero_grad()
    return grads


# ---- the eligibility rule ----------------------------------------------------------------


@pytest.mark.parametrize(
    "shape,rank,side,buffer",
    [
        ((9, 20), 8, "rows", (8, 20)),  # min 9 > 8: compressed
        ((8, 20), 8, None, None),  # min == rank: nothing saved, naive
        ((20, 9), 8, "cols", (20, 8)),
        ((9, 9), 8, "rows", (8, 9)),  # tie: rows
        ((129, 300), 128, "rows", (128, 300)),
        ((128, 300), 128, None, None),
        ((16, 3, 3, 3), 8, "rows", (8, 27)),  # conv kernel viewed as (16, 27)
        ((300,), 8, None, None),
        ((), 8, None, None),
        ((0, 50), 8, None, None),
        ((50, 60), None, None, None),
    ],
)
def test_accumulation_layout_rule(shape, rank, side, buffer):
    layout = core.accumulation_layout(shape, rank)
    assert layout.side == side
    assert layout.compressed == (side is not None)
    assert layout.buffer_shape() == buffer


def test_projection_is_stream_one_and_matches_reference():
    ops = get_ops("torch")
    seed = tensor_seed(123, 5)
    assert seed == reference_tensor_seed(123, 5)
    for cycle in (0, 1, 7):
        key = projection_key(seed, STREAM_ACCUMULATION, cycle)
        assert key == reference_key(seed, 1, cycle)
        q = core.accumulation_projection(seed, cycle, 3, 10, ops)
        np.testing.assert_allclose(q.numpy(), reference_projection(key, 3, 10), atol=3e-6)
    momentum = core.momentum_projection(seed, 0, 3, 10, ops)
    assert not torch.allclose(momentum, core.accumulation_projection(seed, 0, 3, 10, ops))
    assert projection_key(seed, STREAM_MOMENTUM, 0) != projection_key(seed, STREAM_ACCUMULATION, 0)


def test_accumulate_compressed_functional_core():
    ops = get_ops("numpy")
    rng = np.random.default_rng(0)
    grads = [rng.standard_normal((6, 10)) for _ in range(3)]
    q = core.accumulation_projection(99, 0, 4, 6, ops).astype(np.float64)
    buffer = None
    for g in grads:
        buffer = core.accumulate_compressed(buffer, g, q, "rows", ops, weight=1 / 3)
    np.testing.assert_allclose(buffer, q @ (sum(grads) / 3), rtol=1e-12)


# ---- what the accumulator computes --------------------------------------------------------


def micro_batch_grads(model, xs):
    """Each micro-batch's gradients, computed naively on a copy of ``model``."""
    copy = make_model()
    copy.load_state_dict(model.state_dict())
    micro = []
    for x in xs:
        copy.zero_grad()
        loss_fn(copy, x).backward()
        micro.append([p.grad.clone() for p in copy.parameters()])
    return micro


def test_sync_gradient_is_decompressed_sum_with_cycle_projection():
    """The paper's estimator: .grad = decompress(sum_k compress(g_k; Q_c); Q_c), Q_c from key(seed_i, 1, c)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulator = CompressedAccumulator(optimizer, RANK, accumulation_steps=K, seed=77, estimator="gaussian")
    params = list(model.parameters())
    for cycle in range(2):
        xs = batches(K, seed=10 + cycle)
        micro = micro_batch_grads(model, xs)
        for x in xs:
            accumulator.backward(loss_fn(model, x))
        assert accumulator.cycle == cycle + 1
        for index, param in enumerate(params):
            layout = core.accumulation_layout(param.shape, RANK)
            if not layout.compressed:
                torch.testing.assert_close(param.grad, sum(g[index] for g in micro), rtol=1e-5, atol=1e-6)
                continue
            key = reference_key(reference_tensor_seed(77, index), 1, cycle)
            q = reference_projection(key, RANK, layout.compressed_dim)
            total = np.zeros(layout.buffer_shape())
            for g in micro:
                g64 = g[index].double().numpy()
                total += q @ g64 if layout.side == "rows" else g64 @ q.T
            expected = q.T @ total if layout.side == "rows" else total @ q
            np.testing.assert_allclose(param.grad.double().numpy(), expected, rtol=1e-4, atol=1e-5)
        optimizer.zero_grad()


def test_sync_gradient_is_the_subspace_estimate_of_the_reference():
    """The default estimator: .grad = Q B of the tracked basis, as the float64 reference computes
    it, over two cycles (the basis carries over); ineligible tensors are summed exactly. Micro-batches
    of two samples give weight gradients of rank <= 2, so a cycle's sum has rank <= 8 = RANK: the
    estimate is then exact and the basis spans its column space, which pins both down (with more
    rank than that, which directions are dropped depends on rounding, as for any truncated SVD)."""
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulator = CompressedAccumulator(optimizer, RANK, accumulation_steps=K, seed=77)
    params = list(model.parameters())
    bases = {}
    for cycle in range(2):
        xs = [x[:2] for x in batches(K, seed=10 + cycle)]
        micro = micro_batch_grads(model, xs)
        for x in xs:
            accumulator.backward(loss_fn(model, x))
        kept = accumulator.state_dict()["bases"]
        for index, param in enumerate(params):
            grads = [g[index].double().numpy() for g in micro]
            if not core.accumulation_layout(param.shape, RANK).compressed:
                np.testing.assert_allclose(param.grad.double().numpy(), sum(grads), rtol=1e-5, atol=1e-7)
                continue
            expected, bases[index] = reference_subspace_accumulation(
                grads, RANK, reference_tensor_seed(77, index), bases.get(index)
            )
            scale = np.abs(expected).max()
            np.testing.assert_allclose(param.grad.double().numpy(), expected, rtol=0, atol=1e-5 * scale)
            np.testing.assert_allclose(expected, sum(grads), rtol=0, atol=1e-6 * scale)
            basis = kept[index].double().numpy()
            np.testing.assert_allclose(basis @ basis.T, bases[index] @ bases[index].T, atol=1e-3)
        optimizer.zero_grad()


@pytest.mark.parametrize("side", ["rows", "cols"])
@pytest.mark.parametrize("framework", ["numpy", "torch", "jax"])
def test_subspace_core_matches_reference_and_is_exact_in_a_common_subspace(framework, side):
    """``core.track_subspace`` on every backend equals the float64 reference; micro-batch
    gradients inside one rank-r column space are recovered exactly (no amplified noise, unlike
    the Gaussian estimator); a non-finite gradient keeps the basis."""
    ops = get_ops(framework)
    rng = np.random.default_rng(3)
    d, length, rank = 12, 30, 4
    column_space = rng.standard_normal((d, rank))
    grads = [column_space @ rng.standard_normal((rank, length)) for _ in range(K)]
    noisy = [g + rng.standard_normal(g.shape) for g in grads]
    seed = tensor_seed(9, 1)
    as_array = {
        "numpy": lambda a: a,
        "torch": lambda a: torch.tensor(a, dtype=torch.float32),
        "jax": lambda a: __import__("jax.numpy").numpy.asarray(a, dtype="float32"),
    }[framework]
    oriented = (lambda a: a) if side == "rows" else (lambda a: a.T)
    for micro, exact in ((grads, True), (noisy, False)):
        basis, buffer = core.initial_basis(seed, rank, d, ops), None
        for g in micro:
            basis, buffer = core.track_subspace(basis, buffer, as_array(oriented(g)), side, ops)
        estimate = np.asarray(core.expand_subspace(basis, buffer, side, ops), dtype=np.float64)
        expected, _ = reference_subspace_accumulation([oriented(g) for g in micro], rank, seed)
        tolerance = 2e-5
        np.testing.assert_allclose(estimate, expected, rtol=0, atol=tolerance * np.abs(expected).max())
        if exact:
            np.testing.assert_allclose(estimate, oriented(sum(micro)), rtol=0, atol=tolerance * np.abs(expected).max())
    bad = np.full((d, length), np.nan)
    kept, buffer = core.track_subspace(basis, None, as_array(oriented(bad)), side, ops)
    np.testing.assert_allclose(np.abs(np.asarray(kept).T @ np.asarray(basis)), np.eye(rank), atol=1e-5)
    assert np.isnan(np.asarray(buffer)).all()


def test_gaussian_is_unbiased_over_seeds_and_error_shrinks_with_rank():
    xs = batches(K)
    model = make_model()
    naive = naive_grads(model, xs)
    compressed_ids = [0, 2]  # the two eligible weights
    reference = torch.cat([naive[i].flatten() for i in compressed_ids])
    # unbiased: the mean over seeds converges to the naive sum
    rank = 4
    mean = torch.zeros_like(reference)
    errors = {}
    for draws in range(1, 401):
        grads = accumulated_grads(model, xs, rank, seed=draws, estimator="gaussian")
        mean += (torch.cat([grads[i].flatten() for i in compressed_ids]) - mean) / draws
        if draws in (25, 400):
            errors[draws] = ((mean - reference).norm() / reference.norm()).item()
        # ineligible tensors are exact
        torch.testing.assert_close(grads[1], naive[1])
    assert errors[400] < 0.15, errors  # ~ sqrt(E|error|^2 / 400) = 0.11 at rank 4
    assert errors[400] < errors[25] / 2.5, errors  # 16x draws: ~4x smaller if unbiased
    # error of one draw shrinks like (d + 1) / r
    mse = {}
    for rank in (2, 8, 20):
        values = []
        for seed in range(60):
            grads = accumulated_grads(model, xs, rank, seed=1000 + seed, estimator="gaussian")
            values.append(
                (
                    (torch.cat([grads[i].flatten() for i in compressed_ids]) - reference).norm() ** 2
                    / reference.norm() ** 2
                ).item()
            )
        mse[rank] = float(np.mean(values))
    assert mse[2] > mse[8] > mse[20], mse
    assert 2.5 < mse[2] / mse[8] < 6.0, mse  # ~ 4x for 4x the rank
    assert mse[20] < 2.0, mse


def test_cycle_of_one_micro_batch_is_exact():
    xs = batches(1)
    model = make_model()
    naive = naive_grads(model, xs)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulator = CompressedAccumulator(optimizer, RANK, accumulation_steps=1)
    loss_fn(model, xs[0]).backward()  # bare backward is fine with accumulation_steps=1
    for param, grad in zip(model.parameters(), naive):
        torch.testing.assert_close(param.grad, grad, rtol=0, atol=0)
    assert accumulator.buffer_bytes() == 0


# ---- memory: no full-size gradient between micro-batches ------------------------------------


@pytest.mark.parametrize("estimator", ["subspace", "gaussian"])
def test_no_full_size_gradient_between_micro_batches(estimator):
    """Between micro-batches a compressed (m, n) tensor holds its r x max(m, n) buffer and, with
    the subspace estimator, its min(m, n) x r basis (kept between cycles): at most
    r (max(m, n) + min(m, n)) floats, asserted in bytes, and no gradient."""
    xs = batches(K)
    live = {}
    bases = 4 * RANK * (24 + 16) if estimator == "subspace" else 0  # (40, 24) -> 24 x r, (16, 40) -> 16 x r
    buffers = 4 * (40 * RANK + RANK * 40)
    for rank in (None, RANK):
        model = make_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        tracker = LiveTensorBytes()
        with tracker:
            accumulator = CompressedAccumulator(optimizer, rank, accumulation_steps=K, estimator=estimator)
            live[rank] = []
            for step, x in enumerate(xs):
                accumulator.backward(loss_fn(model, x))
                live[rank].append(tracker.live)
                if rank is not None and step < K - 1:
                    for param in accumulator.compressed_parameters():
                        assert param.grad is None
                    bound = sum(
                        4 * rank * sum(core.accumulation_layout(p.shape, rank).matrix)
                        for p in accumulator.compressed_parameters()
                    )
                    assert accumulator.buffer_bytes() == buffers + bases <= bound
                    held = sum(p.grad.numel() * 4 for p in model.parameters() if p.grad is not None)
                    assert held == 4 * (40 + 16 + 1)  # the biases and the (1, 16) weight only
        if rank is not None:
            assert accumulator.buffer_bytes() == bases  # buffers are freed at the sync step
            assert all(p.grad is not None for p in model.parameters())
    # the exact difference in live bytes between micro-batches: full grads minus the compressed state
    full = 4 * (40 * 24 + 16 * 40)
    for step in range(K - 1):
        assert live[None][step] - live[RANK][step] == full - buffers - bases
    assert live[RANK][K - 1] - live[None][K - 1] == bases  # at the sync step .grad is full-size again


# ---- state -------------------------------------------------------------------------------


def _train(model, optimizer, accumulator, xs):
    for x in xs:
        accumulator.backward(loss_fn(model, x))
        if accumulator.sync_gradients:
            optimizer.step()
            optimizer.zero_grad()


@pytest.mark.parametrize("estimator", ["subspace", "gaussian"])
@pytest.mark.parametrize("stop", [5, 8, 10])
def test_mid_cycle_state_dict_resume_is_bit_exact(tmp_path, stop, estimator):
    xs = batches(3 * K)
    model = make_model()
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-2, rank=4)
    accumulator = CompressedAccumulator(optimizer, RANK, accumulation_steps=K, seed=3, estimator=estimator)
    _train(model, optimizer, accumulator, xs)
    expected = [p.detach().clone() for p in model.parameters()]

    model = make_model()
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-2, rank=4)
    accumulator = CompressedAccumulator(optimizer, RANK, accumulation_steps=K, seed=3, estimator=estimator)
    _train(model, optimizer, accumulator, xs[:stop])
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "accumulator": accumulator.state_dict()},
        tmp_path / "ckpt.pt",
    )
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    assert checkpoint["accumulator"]["micro_step"] == stop % K
    assert checkpoint["accumulator"]["cycle"] == stop // K
    assert len(checkpoint["accumulator"]["bases"]) == (2 if estimator == "subspace" else 0)
    model = make_model(seed=123)
    model.load_state_dict(checkpoint["model"])
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-2, rank=4)
    optimizer.load_state_dict(checkpoint["optimizer"])
    accumulator = CompressedAccumulator(optimizer, RANK, accumulation_steps=K, seed=3, estimator=estimator)
    accumulator.load_state_dict(checkpoint["accumulator"])
    _train(model, optimizer, accumulator, xs[stop:])
    for param, value in zip(model.parameters(), expected):
        assert torch.equal(param, value)


def test_bf16_parameters_keep_float32_buffers():
    model = make_model().to(torch.bfloat16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulator = CompressedAccumulator(optimizer, RANK, accumulation_steps=2)
    xs = [x.to(torch.bfloat16) for x in batches(2)]
    accumulator.backward(loss_fn(model, xs[0]))
    state = accumulator.state_dict()
    assert {v.dtype for v in state["buffers"].values()} == {torch.float32}
    accumulator.backward(loss_fn(model, xs[1]))
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


def test_load_state_dict_rejects_other_rank_seed_or_estimator():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulator = CompressedAccumulator(optimizer, RANK, accumulation_steps=K)
    state = accumulator.state_dict()
    accumulator.remove()
    for rank, seed, estimator, pattern in (
        (4, 0, "subspace", "rank=8"),
        (RANK, 1, "subspace", "seed=0"),
        (RANK, 0, "gaussian", "estimator='subspace'"),
    ):
        accumulator = CompressedAccumulator(optimizer, rank, accumulation_steps=K, seed=seed, estimator=estimator)
        with pytest.raises(ValueError, match=pattern):
            accumulator.load_state_dict(state)
        accumulator.remove()


def test_load_state_dict_with_other_accumulation_steps_mid_cycle_is_refused():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    accumulator = CompressedAccumulator(optimizer, RANK, accumulation_steps=4)
    for _ in range(3):
        accumulator.backward(model(torch.randn(2, model[0].in_features)).pow(2).mean())
    state = accumulator.state_dict()
    assert state["micro_step"] == 3
    accumulator.remove()
    other = CompressedAccumulator(optimizer, RANK, accumulation_steps=2)
    with pytest.raises(
        ValueError, match=r"micro_step=3\) with accumulation_steps=4; this accumulator has accumulation_steps=2"
    ):
        other.load_state_dict(state)
    assert other.micro_step == 0
    boundary = dict(state, micro_step=0, buffers={}, grads={})
    other.load_state_dict(boundary)  # at a cycle boundary the new accumulation_steps applies
    assert other.accumulation_steps == 2 and other.cycle == state["cycle"]
    other.remove()


# ---- bad arguments -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(rank=0), ValueError, r"Invalid rank: 0"),
        (dict(rank=-3), ValueError, r"Invalid rank: -3"),
        (dict(rank=2.5), ValueError, r"Invalid rank: 2.5"),
        (dict(rank=True), ValueError, r"Invalid rank: True"),
        (dict(rank=4, accumulation_steps=0), ValueError, r"Invalid accumulation_steps: 0"),
        (dict(rank=4, seed=-1), ValueError, r"Invalid seed: -1"),
        (dict(rank=4, seed=2**32), ValueError, r"Invalid seed: 4294967296"),
        (dict(rank=4, layerwise="yes"), ValueError, r"Invalid layerwise: 'yes'"),
        (dict(rank=4, max_grad_norm=1.0), ValueError, r"Invalid max_grad_norm: 1.0: it is only used with layerwise"),
        (dict(layerwise=True, max_grad_norm=0.0), ValueError, r"Invalid max_grad_norm: 0.0"),
        (dict(layerwise=True, max_grad_norm=float("inf")), ValueError, r"Invalid max_grad_norm: inf"),
        (dict(rank=4, estimator="svd"), ValueError, r"Invalid estimator: 'svd': must be one of 'subspace', 'gaussian'"),
        (dict(rank=4, estimator=None), ValueError, r"Invalid estimator: None"),
    ],
)
def test_bad_arguments(kwargs, error, pattern):
    optimizer = torch.optim.SGD(make_model().parameters(), lr=0.1)
    with pytest.raises(error, match=pattern):
        CompressedAccumulator(optimizer, **kwargs)


def test_not_an_optimizer_and_unknown_argument():
    with pytest.raises(TypeError, match="Invalid optimizer: list"):
        CompressedAccumulator(list(make_model().parameters()), 4)
    with pytest.raises(TypeError):
        CompressedAccumulator(torch.optim.SGD(make_model().parameters(), lr=0.1), 4, acumulation_steps=2)


def test_bare_backward_with_accumulation_fails_clearly():
    model = make_model()
    CompressedAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), RANK, accumulation_steps=K)
    with pytest.raises(RuntimeError, match=r"outside CompressedAccumulator.backward"):
        loss_fn(model, batches(1)[0]).backward()


def test_micro_batch_contexts_do_not_nest():
    model = make_model()
    accumulator = CompressedAccumulator(torch.optim.SGD(model.parameters(), lr=0.1), RANK, accumulation_steps=K)
    with accumulator.micro_batch(), pytest.raises(RuntimeError, match="cannot be nested"), accumulator.micro_batch():
        pass


def test_one_accumulator_per_parameter():
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    first = CompressedAccumulator(optimizer, RANK, accumulation_steps=K)
    with pytest.raises(ValueError, match="already managed by another CompressedAccumulator"):
        CompressedAccumulator(optimizer, RANK, accumulation_steps=K)
    first.remove()
    second = CompressedAccumulator(optimizer, RANK, accumulation_steps=K)
    second.backward(loss_fn(model, batches(1)[0]))
    assert second.buffer_bytes() > 0
