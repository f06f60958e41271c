"""The projection generator: one integer stream everywhere, the right distribution."""

import math

import numpy as np
import pytest

from flora_opt import projection as pj
from flora_opt.ops import get_ops
from flora_opt.reference import reference_bits, reference_key, reference_projection, reference_tensor_seed

SHAPES = [(1, 1), (1, 7), (3, 5), (8, 33), (32, 64), (5, 1)]


def test_mix32_known_values():
    # Pinned outputs: the generator is part of the checkpoint format, it must never drift.
    assert pj.mix32_int(0) == 0
    assert [pj.mix32_int(x) for x in (1, 2, 0xFFFFFFFF, 0x9E3779B9)] == [2261973619, 229111015, 2578835075, 1684164658]
    assert (pj.tensor_seed(0, 0), pj.tensor_seed(123, 45), pj.stream_key(7, 1, 3)) == (340428713, 3614276042, 715683692)
    assert pj.tensor_seed(0, 0) == reference_tensor_seed(0, 0)
    assert pj.tensor_seed(123, 45) == reference_tensor_seed(123, 45)
    assert pj.stream_key(7, 1, 3) == reference_key(7, 1, 3)


def test_pinned_first_values():
    key = pj.stream_key(pj.tensor_seed(0, 0), pj.STREAM_MOMENTUM, 0)
    P = reference_projection(key, 2, 3)
    fast = pj.gaussian_projection(key, 2, 3, get_ops("numpy"))
    np.testing.assert_allclose(fast, P, atol=5e-7)
    # Regression guard against any change of the definition in docs/algorithm.md section 2.
    np.testing.assert_allclose(P.ravel(), PINNED, atol=1e-6)


PINNED = [-0.3509535, 0.9221449, 0.2012696, 0.4103309, -0.1008828, 0.2832197]


def _int_stream(ops_name, key, n):
    ops = get_ops(ops_name)
    c = ops.u32_arange(n)
    key2 = pj.mix32_int(key ^ pj.GOLDEN)
    bits = ops.mix32(
        ops.u32_xor(ops.mix32(ops.u32_add(c, key), pj.MIX_MUL_1, pj.MIX_MUL_2), key2), pj.MIX_MUL_1, pj.MIX_MUL_2
    )
    bits = np.asarray(bits.cpu() if hasattr(bits, "cpu") else bits).astype(np.int64) & 0xFFFFFFFF
    return bits


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
def test_integer_stream_is_bit_identical(backend):
    pytest.importorskip(backend)
    key = pj.stream_key(pj.tensor_seed(2024, 3), pj.STREAM_ACCUMULATION, 11)
    n = 257
    expected = np.array([reference_bits(key, c) for c in range(n)], dtype=np.int64)
    np.testing.assert_array_equal(_int_stream(backend, key, n), expected)


@pytest.mark.parametrize("backend", ["numpy", "torch", "jax"])
@pytest.mark.parametrize("shape", SHAPES)
def test_projection_matches_reference(backend, shape):
    pytest.importorskip(backend)
    key = pj.stream_key(pj.tensor_seed(1, 2), pj.STREAM_MOMENTUM, 5)
    fast = pj.gaussian_projection(key, *shape, get_ops(backend))
    fast = np.asarray(fast.cpu() if hasattr(fast, "cpu") else fast)
    assert fast.shape == shape and fast.dtype == np.float32
    np.testing.assert_allclose(fast, reference_projection(key, *shape), atol=1e-6, rtol=1e-5)


def test_projection_keys_accept_traced_arrays():
    jnp = pytest.importorskip("jax.numpy")
    ops = get_ops("jax")
    seed = pj.tensor_seed(9, 4)
    for index in (0, 1, 17):
        key = pj.projection_key(jnp.uint32(seed), pj.STREAM_MOMENTUM, jnp.int32(index), ops)
        assert int(key) == pj.stream_key(seed, pj.STREAM_MOMENTUM, index)


def test_distribution_moments():
    rank, dim = 64, 512
    P = pj.gaussian_projection(pj.stream_key(3, 0, 0), rank, dim, get_ops("numpy")).astype(np.float64)
    scaled = P.ravel() * math.sqrt(rank)
    n = scaled.size
    assert abs(scaled.mean()) < 4 / math.sqrt(n)
    assert abs(scaled.var() - 1) < 4 * math.sqrt(2 / n)
    assert abs(np.mean(scaled**4) - 3) < 4 * math.sqrt(96 / n)  # Gaussian kurtosis (Var x^4 = 96)
    # neighbours in the counter (the Box-Muller pair, and across pairs) are uncorrelated
    for lag in (1, 2, dim):
        corr = np.corrcoef(scaled[:-lag], scaled[lag:])[0, 1]
        assert abs(corr) < 4 / math.sqrt(n), lag


def test_expected_gram_is_identity():
    # E[P^T P] = I: average over many independent keys.
    rank, dim, draws = 4, 6, 3000
    ops = get_ops("numpy")
    gram = np.zeros((dim, dim))
    for k in range(draws):
        P = pj.gaussian_projection(pj.stream_key(77, 0, k), rank, dim, ops).astype(np.float64)
        gram += P.T @ P
    gram /= draws
    np.testing.assert_allclose(gram, np.eye(dim), atol=0.06)


def test_streams_indices_and_tensors_are_independent():
    ops = get_ops("numpy")
    base = pj.gaussian_projection(pj.stream_key(5, 0, 0), 16, 64, ops).ravel()
    others = [
        pj.gaussian_projection(pj.stream_key(5, 0, 1), 16, 64, ops).ravel(),  # next resample
        pj.gaussian_projection(pj.stream_key(5, 1, 0), 16, 64, ops).ravel(),  # accumulation stream
        pj.gaussian_projection(pj.stream_key(6, 0, 0), 16, 64, ops).ravel(),  # next tensor seed
    ]
    for other in others:
        assert abs(np.corrcoef(base, other)[0, 1]) < 4 / math.sqrt(base.size)
    # nearby keys are not shifted copies of each other
    key = pj.stream_key(5, 0, 0)
    a = pj.gaussian_projection(key, 1, 64, ops).ravel()
    b = pj.gaussian_projection((key + 2) & 0xFFFFFFFF, 1, 64, ops).ravel()
    assert not np.allclose(a[2:], b[:-2])


def test_deterministic_and_validated():
    ops = get_ops("numpy")
    key = pj.stream_key(1, 0, 0)
    np.testing.assert_array_equal(pj.gaussian_projection(key, 3, 4, ops), pj.gaussian_projection(key, 3, 4, ops))
    with pytest.raises(ValueError, match="positive"):
        pj.gaussian_projection(key, 0, 4, ops)


@pytest.mark.cuda
def test_cpu_and_cuda_projections_agree():
    torch = pytest.importorskip("torch")
    ops = get_ops("torch")
    key = pj.stream_key(pj.tensor_seed(0, 1), 0, 2)
    cpu = pj.gaussian_projection(key, 256, 1024, ops, device="cpu")
    gpu = pj.gaussian_projection(key, 256, 1024, ops, device="cuda").cpu()
    torch.testing.assert_close(gpu, cpu, atol=1e-6, rtol=1e-5)
