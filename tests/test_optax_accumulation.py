"""Compressed gradient accumulation for JAX (docs/algorithm.md section 12)."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from flora_opt import core  # noqa: E402
from flora_opt.ops import get_ops  # noqa: E402
from flora_opt.optax import (  # noqa: E402
    compressed_accumulator,
    compressed_multi_steps,
    flora,
    has_updated,
)
from flora_opt.projection import STREAM_ACCUMULATION, gaussian_projection, projection_key, tensor_seed  # noqa: E402
from flora_opt.reference import reference_subspace_accumulation  # noqa: E402

K = 3


def _params():
    return {
        "rows": jnp.zeros((12, 40), jnp.float32),  # compressed: (tau, 40)
        "cols": jnp.zeros((40, 10), jnp.bfloat16),  # compressed: (40, tau)
        "conv": jnp.zeros((10, 3, 2, 2), jnp.float32),  # viewed (10, 12): compressed (tau, 12)
        "bias": jnp.zeros((40,), jnp.float32),  # naive
        "small": jnp.zeros((3, 40), jnp.float32),  # min dim 3 <= tau: naive
        "ids": jnp.zeros((2,), jnp.int32),  # not a float: ignored
    }


def _micro_grads(t, params=None):
    params = params or _params()

    def grad(i, p):
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return jnp.zeros_like(p)
        x = jnp.arange(p.size, dtype=jnp.float32)
        return jnp.sin(0.37 * x * (i + 1) + t).reshape(p.shape).astype(p.dtype)

    leaves, treedef = jax.tree_util.tree_flatten(params)
    return treedef.unflatten([grad(i, p) for i, p in enumerate(leaves)])


def _naive_mean(params, ts):
    grads = [_micro_grads(t, params) for t in ts]
    return jax.tree.map(lambda *g: sum(np.asarray(x, np.float32) for x in g) / len(g), *grads)


def test_layout_and_fresh_projection_each_cycle():
    params = _params()
    acc = compressed_accumulator(tau=4, seed=7, estimator="gaussian")
    state = acc.init(params)
    shapes = jax.tree.map(jnp.shape, state.buffer)
    assert shapes == {"rows": (4, 40), "cols": (40, 4), "conv": (4, 12), "bias": (40,), "small": (3, 40), "ids": (0,)}
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(state.buffer))
    assert [int(s) for s in jax.tree_util.tree_leaves(state.seed)] == [tensor_seed(7, i) for i in range(6)]
    g = _micro_grads(0)
    add = jax.jit(acc.add)
    first = add(g, state)
    second = add(g, acc.reset(first))
    assert int(acc.reset(first).cycle) == 1
    assert np.all(np.asarray(acc.reset(first).buffer["rows"]) == 0)
    assert not np.allclose(first.buffer["rows"], second.buffer["rows"])  # a fresh Q_c
    np.testing.assert_array_equal(first.buffer["bias"], second.buffer["bias"])  # naive leaves
    # Q_c is projection c of stream 1 of the leaf's seed (never a momentum projection).
    ops = get_ops("jax")
    seed = tensor_seed(7, list(sorted(params)).index("rows"))
    q0 = gaussian_projection(projection_key(seed, STREAM_ACCUMULATION, 0, ops), 4, 12, ops)
    np.testing.assert_allclose(first.buffer["rows"], np.asarray(q0) @ np.asarray(g["rows"]), rtol=1e-5, atol=1e-6)
    assert not np.allclose(q0, core.momentum_projection(seed, 0, 4, 12, ops))


def test_subspace_state_layout_and_reference():
    """The default estimator keeps a (min(m, n), tau) basis per compressed leaf (the Gaussian of
    cycle 0 at first) and hands over the float64 reference's estimate; exact when the cycle's sum
    lies in a rank-tau column space."""
    params = _params()
    acc = compressed_accumulator(tau=4, seed=7)
    state = acc.init(params)
    shapes = jax.tree.map(jnp.shape, state.basis)
    assert shapes == {"rows": (12, 4), "cols": (10, 4), "conv": (10, 4), "bias": (0,), "small": (0,), "ids": (0,)}
    ops = get_ops("jax")
    seed = tensor_seed(7, sorted(params).index("rows"))
    np.testing.assert_array_equal(state.basis["rows"], core.initial_basis(seed, 4, 12, ops))
    rng = np.random.default_rng(0)
    column_space = rng.standard_normal((12, 4))
    for exact in (True, False):
        micro = [column_space @ rng.standard_normal((4, 40)) for _ in range(K)]
        if not exact:
            micro = [g + 0.5 * rng.standard_normal(g.shape) for g in micro]
        state = acc.init(params)
        for g in micro:
            state = jax.jit(acc.add)(dict(_micro_grads(0), rows=jnp.asarray(g, jnp.float32)), state)
        estimate = np.asarray(acc.result(state, like=params)["rows"], np.float64)
        expected, _ = reference_subspace_accumulation(micro, 4, seed)
        np.testing.assert_allclose(estimate, expected, rtol=0, atol=2e-5 * np.abs(expected).max())
        if exact:
            np.testing.assert_allclose(estimate, sum(micro), rtol=0, atol=2e-5 * np.abs(expected).max())
    finished, next_state = acc.finish(state, like=params)
    assert int(next_state.cycle) == 1 and not np.any(np.asarray(next_state.buffer["rows"]))
    np.testing.assert_array_equal(next_state.basis["rows"], state.basis["rows"])
    np.testing.assert_array_equal(finished["rows"], acc.result(state, like=params)["rows"])


def test_subspace_estimator_matches_torch():
    """The JAX accumulator and the PyTorch CompressedAccumulator compute the same estimate from the
    same micro-batch gradients, over two cycles (the basis carries over)."""
    torch = pytest.importorskip("torch")
    from flora_opt.accumulation import CompressedAccumulator

    rng = np.random.default_rng(1)
    shapes = [(12, 40), (40, 10)]
    torch_params = [torch.nn.Parameter(torch.zeros(shape)) for shape in shapes]
    accumulator = CompressedAccumulator(torch.optim.SGD(torch_params, lr=0.0), 4, accumulation_steps=K, seed=5)
    acc = compressed_accumulator(tau=4, seed=5)
    params = [jnp.zeros(shape, jnp.float32) for shape in shapes]
    state = acc.init(params)
    for _ in range(2):
        for _ in range(K):
            grads = [rng.standard_normal(shape).astype(np.float32) for shape in shapes]
            loss = sum((p * torch.from_numpy(g)).sum() for p, g in zip(torch_params, grads))
            accumulator.backward(loss)
            state = acc.add([jnp.asarray(g) for g in grads], state)
        estimates, state = acc.finish(state, like=params)
        for p, estimate in zip(torch_params, estimates):
            expected = p.grad.numpy()
            np.testing.assert_allclose(np.asarray(estimate), expected, rtol=0, atol=1e-4 * np.abs(expected).max())
            p.grad = None


def test_compressed_accumulation_is_unbiased_over_seeds():
    params = _params()
    acc = compressed_accumulator(tau=4, estimator="gaussian")
    micro = [_micro_grads(t) for t in range(K)]
    template = acc.init(params)

    def run(seed_offset):
        seeds = jax.tree.map(lambda s: s + seed_offset, template.seed)
        state = template._replace(seed=seeds)
        for g in micro:
            state = acc.add(g, state, weight=1.0 / K)
        return acc.result(state, like=params)

    offsets = jnp.arange(1024, dtype=jnp.uint32) * jnp.uint32(0x9E3779B9)
    results = jax.jit(jax.vmap(run))(offsets)
    target = _naive_mean(params, range(K))
    for name in ("rows", "cols", "conv"):
        estimate = np.asarray(results[name], np.float32).mean(0)
        rel = np.linalg.norm(estimate - target[name]) / np.linalg.norm(target[name])
        assert rel < 0.15, (name, rel)
        single = np.asarray(results[name][0], np.float32)  # one seed alone is a rough estimate
        assert np.linalg.norm(single - target[name]) / np.linalg.norm(target[name]) > 0.3
    for name in ("bias", "small"):
        np.testing.assert_allclose(results[name][0], target[name], rtol=1e-6, atol=1e-7)
    assert results["cols"].dtype == jnp.bfloat16 and results["ids"].dtype == jnp.int32


def test_disabled_compression_equals_optax_multisteps():
    params = {k: v.astype(jnp.float32) for k, v in _params().items() if k in ("rows", "bias")}
    inner = flora(0.05, tau=4, kappa=2)
    ours = compressed_multi_steps(inner, every_k_schedule=K, tau=None)
    theirs = optax.MultiSteps(inner, every_k_schedule=K)

    def run(tx):
        state = tx.init(params)
        p = params
        update = jax.jit(tx.update)
        for t in range(2 * K):
            u, state = update(_micro_grads(t, params), state, p)
            p = optax.apply_updates(p, u)
        return p

    a, b = run(ours), run(theirs)
    for name in a:
        np.testing.assert_allclose(a[name], b[name], rtol=1e-5, atol=1e-7, err_msg=name)
        assert not np.allclose(a[name], params[name])


def test_multi_steps_matches_scan_loop_and_resumes_bit_exactly():
    params = {k: v for k, v in _params().items() if k in ("rows", "cols", "bias", "ids")}
    inner = flora(0.05, tau=4, kappa=2, min_dim_size_to_factor=8)
    tx = compressed_multi_steps(inner, every_k_schedule=K, tau=4, seed=3)
    update = jax.jit(tx.update)
    state = tx.init(params)
    p = params
    history = []
    for t in range(2 * K):
        u, state = update(_micro_grads(t, params), state, p)
        p = optax.apply_updates(p, u)
        history.append(bool(has_updated(state)))
        if t == K + 1:  # checkpoint in the middle of the second cycle
            saved = jax.tree.map(np.asarray, (p, state))
    assert history == [False, False, True, False, False, True]
    assert int(state.accumulator.cycle) == 2 and int(state.inner_opt_state[0].step["rows"]) == 2  # inner steps

    # Resume from the host copy: bit-exact.
    rp, rstate = jax.tree.map(jnp.asarray, saved)
    for t in range(K + 2, 2 * K):
        u, rstate = update(_micro_grads(t, params), rstate, rp)
        rp = optax.apply_updates(rp, u)
    for a, b in zip(jax.tree_util.tree_leaves((p, state)), jax.tree_util.tree_leaves((rp, rstate))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    # The same two cycles written as lax.scan micro-batch loops over the accumulator functions.
    acc = compressed_accumulator(tau=4, seed=3)

    @jax.jit
    def train_step(params, opt_state, acc_state, micro_ts):
        def micro(acc_state, t):
            return acc.add(_micro_grads(t, params), acc_state, weight=1.0 / K), None

        acc_state, _ = jax.lax.scan(micro, acc_state, micro_ts)
        grads = acc.result(acc_state, like=params)
        updates, opt_state = inner.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, acc.reset(acc_state)

    sp, opt_state, acc_state = params, inner.init(params), acc.init(params)
    for cycle in range(2):
        ts = jnp.arange(cycle * K, (cycle + 1) * K, dtype=jnp.float32)
        sp, opt_state, acc_state = train_step(sp, opt_state, acc_state, ts)
    for name in p:
        np.testing.assert_allclose(
            np.asarray(sp[name], np.float32), np.asarray(p[name], np.float32), rtol=1e-5, atol=1e-6
        )
    assert not np.allclose(np.asarray(p["rows"]), 0.0)


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(tau=0), r"Invalid tau: 0"),
        (dict(tau=1.5), r"Invalid tau: 1.5"),
        (dict(seed=-1), r"Invalid seed: -1"),
        (dict(every_k_schedule=0), r"Invalid every_k_schedule: 0"),
        (dict(use_grad_mean="yes"), r"Invalid use_grad_mean: 'yes'"),
        (dict(estimator="svd"), r"Invalid estimator: 'svd': must be one of 'subspace', 'gaussian'"),
    ],
)
def test_bad_accumulation_inputs(kwargs, pattern):
    kwargs = dict(kwargs)
    every_k = kwargs.pop("every_k_schedule", 2)
    with pytest.raises(ValueError, match=pattern):
        compressed_multi_steps(flora(1e-3), every_k, **kwargs)
    if "tau" in kwargs or "seed" in kwargs or "estimator" in kwargs:
        with pytest.raises(ValueError, match=pattern):
            compressed_accumulator(**kwargs)


def test_single_micro_batch_cycles_hand_gradients_over_exact():
    """k = 1: nothing to accumulate, the gradient is not compressed (as on the PyTorch side)."""
    params = {"rows": jnp.ones((12, 40), jnp.float32)}
    inner = flora(0.05, tau=4, b1=None)
    tx = compressed_multi_steps(inner, every_k_schedule=1, tau=4)
    state, inner_state = tx.init(params), inner.init(params)
    for t in range(2):
        g = _micro_grads(t, params)
        u, state = jax.jit(tx.update)(g, state, params)
        expected, inner_state = inner.update(g, inner_state, params)
        np.testing.assert_allclose(u["rows"], expected["rows"], rtol=1e-6, atol=1e-8)
    assert int(state.accumulator.cycle) == 2
    np.testing.assert_array_equal(state.accumulator.basis["rows"], tx.init(params).accumulator.basis["rows"])


def test_accumulator_functions_name():
    import flora_opt.optax as fo

    assert isinstance(fo.compressed_accumulator(tau=4), fo.AccumulatorFunctions)
    # flora_opt.CompressedAccumulator is the PyTorch accumulator: the optax package has no such name
    assert not hasattr(fo, "CompressedAccumulator") and "CompressedAccumulator" not in fo.__all__


@pytest.mark.parametrize("tau", [None, 4])
def test_multi_steps_keeps_the_dtypes_of_optax_multisteps(tau):
    """As ``optax.MultiSteps``: the updates have the inner optimizer's dtype (float32 parameters
    with bfloat16 gradients get float32 updates, not bfloat16-rounded ones), including the zero
    updates between steps, and the inner state keeps its dtypes (adam's float16 moments of
    float16 parameters, fed float32 gradients)."""
    params = {"rows": jnp.linspace(-1.0, 1.0, 12 * 40).reshape(12, 40), "bias": jnp.ones((40,))}
    cases = [
        (flora(0.05, tau=4, b1=None), params, jnp.bfloat16),
        (optax.adam(0.1), jax.tree.map(lambda p: p.astype(jnp.float16), params), jnp.float32),
    ]
    for inner, p, grad_dtype in cases:
        ours = compressed_multi_steps(inner, every_k_schedule=2, tau=tau)
        theirs = optax.MultiSteps(inner, every_k_schedule=2)
        state, their_state = ours.init(p), theirs.init(p)
        update, their_update = jax.jit(ours.update), jax.jit(theirs.update)
        for t in range(4):
            grads = jax.tree.map(lambda g, dtype=grad_dtype: g.astype(dtype), _micro_grads(t, p))
            u, state = update(grads, state, p)
            v, their_state = their_update(grads, their_state, p)
            assert jax.tree.map(lambda x: x.dtype, u) == jax.tree.map(lambda x: x.dtype, v), t
            assert jax.tree.map(lambda x: x.dtype, state.inner_opt_state) == jax.tree.map(
                lambda x: x.dtype, their_state.inner_opt_state
            )
            if tau is None:  # plain sums: the same updates as optax.MultiSteps
                for a, b in zip(jax.tree_util.tree_leaves(u), jax.tree_util.tree_leaves(v)):
                    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-5)
        assert bool(has_updated(state))
