"""The projection generator: the same Gaussian matrix for the same (seed, stream, index, shape),
on every device and in every framework.

Flora never stores its random projections. Each one is regenerated from integers kept in the
optimizer state, so this module defines, exactly, the map

    (tensor_seed, stream, index, rank, dim)  ->  P in R^{rank x dim},  P_ij ~ N(0, 1/rank)

with nothing but 32-bit integer arithmetic (xor, logical shift, wrapping add and multiply) and one
Box-Muller transform. PyTorch (int32 tensors holding the uint32 bit patterns, see
``flora_opt.ops.TorchOps``), JAX (uint32) and NumPy (uint64, masked) produce the *same integer
stream*; the Gaussians then differ at most by the last-ulp
rounding of ``log``/``sqrt``/``cos``/``sin`` between math libraries (a few 1e-7 relative).

Definition (all arithmetic modulo 2^32; ``>>`` is a logical shift):

    mix32(x):                                   # Wellons' "lowbias32" variant; both
        x ^= x >> 16;  x *= 0x21F0AAAD          # multipliers < 2^31, so NumPy's uint64
        x ^= x >> 15;  x *= 0x735A2D97          # product x * c < 2^63 is exact before
        x ^= x >> 15                            # masking

    tensor_seed(seed, i)       = mix32(mix32(seed ^ GOLDEN) + i) # i: the tensor's position
    stream_key(s, stream, k)   = mix32(mix32(s ^ mix32(GOLDEN * (stream + 1))) + mix32(k))
    key2                       = mix32(key ^ GOLDEN)
    bits(key, c)               = mix32(mix32(c + key) ^ key2)    # c: element counter

    with GOLDEN = 0x9E3779B9. For P of shape (rank, dim), flattened row-major with
    c = i * dim + j, the elements are produced in pairs (2t, 2t + 1):

        u1 = (2 * (bits(key, 2t) >> 9) + 1) * 2^-24              # odd multiples of 2^-24 in
        u2 = (2 * (bits(key, 2t + 1) >> 9) + 1) * 2^-24          # (0, 1): exact in float32
        rho = sqrt(-2 ln u1),  theta = 2 pi u2
        P[2t] = rho cos(theta) / sqrt(rank),   P[2t + 1] = rho sin(theta) / sqrt(rank)

    (if rank * dim is odd the last pair's sine is dropped). Since u1 >= 2^-24, |P_ij| sqrt(rank)
    never exceeds sqrt(48 ln 2) = 5.77: the Gaussian is truncated beyond 5.77 sigma.

Streams: ``STREAM_MOMENTUM`` (index = resample number, floor((step - 1) / kappa)),
``STREAM_ACCUMULATION`` (index = accumulation cycle number) and ``STREAM_CONSENSUS`` (index =
accumulation cycle number: the data-parallel test matrix of the subspace estimator) never share
a matrix.
"""

from __future__ import annotations

import math

from .ops import ArrayOps

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MIX_MUL_1 = 0x21F0AAAD
MIX_MUL_2 = 0x735A2D97

STREAM_MOMENTUM = 0
STREAM_ACCUMULATION = 1
STREAM_CONSENSUS = 2

__all__ = [
    "STREAM_ACCUMULATION",
    "STREAM_CONSENSUS",
    "STREAM_MOMENTUM",
    "gaussian_projection",
    "mix32_int",
    "projection_key",
    "stream_key",
    "tensor_seed",
]


def mix32_int(x: int) -> int:
    """``mix32`` on one Python integer (exact; used for keys, which are scalars)."""
    x &= MASK32
    x ^= x >> 16
    x = (x * MIX_MUL_1) & MASK32
    x ^= x >> 15
    x = (x * MIX_MUL_2) & MASK32
    x ^= x >> 15
    return x


def tensor_seed(seed: int, index: int) -> int:
    """Per-tensor seed from the optimizer-wide ``seed`` and the tensor's position ``index``."""
    return mix32_int((mix32_int((seed ^ GOLDEN) & MASK32) + index) & MASK32)


def stream_key(seed: int, stream: int, index: int) -> int:
    """Key of projection number ``index`` of ``stream`` for a tensor with seed ``seed``."""
    base = mix32_int(seed ^ mix32_int((GOLDEN * (stream + 1)) & MASK32))
    return mix32_int((base + mix32_int(index)) & MASK32)


def projection_key(seed, stream: int, index, ops: ArrayOps | None = None):
    """:func:`stream_key` for Python ints, or for integer arrays (traced JAX steps; the vectors of
    seeds and indices of a bucket, which broadcast against each other), elementwise."""
    if isinstance(seed, int) and isinstance(index, int):
        return stream_key(seed, stream, index)
    stream_mix = mix32_int((GOLDEN * (stream + 1)) & MASK32)
    base = _mix32_array(ops.u32_xor(ops.u32(seed), stream_mix), ops)
    mixed_index = _mix32_array(ops.u32(index), ops)
    return _mix32_array(ops.u32_add(base, mixed_index), ops)


def _mix32_array(x, ops: ArrayOps):
    return ops.mix32(x, MIX_MUL_1, MIX_MUL_2)


def gaussian_projection(key, rank: int, dim: int, ops: ArrayOps, device=None):
    """The ``(rank, dim)`` float32 projection of ``key``; entries i.i.d. N(0, 1/rank).

    ``key`` comes from :func:`stream_key` (a Python int) or :func:`projection_key` (an integer
    array). An array of keys of shape ``(...)`` gives a stack ``(..., rank, dim)``, one projection
    per key, in one call: the grouped step generates a bucket's projections from its vectors of
    seeds and indices, and every projection, single or stacked, is this computation (the counter
    restarts at 0 for every key). Both Box-Muller outputs are used, so each pair of uniforms
    yields two matrix entries.
    """
    if rank < 1 or dim < 1:
        raise ValueError(f"projection shape must be positive, got ({rank}, {dim})")
    numel = rank * dim
    if numel > 2**32:
        raise ValueError(f"projection of {numel} elements exceeds the 2^32 counter range")
    if isinstance(key, int):
        batch = ()
        word = key & MASK32
        key2 = mix32_int(word ^ GOLDEN)
    else:
        batch = tuple(key.shape)
        word = ops.reshape(key, (*batch, 1))  # one row of counters per key
        key2 = _mix32_array(ops.u32_xor(word, GOLDEN), ops)
    pairs = (numel + 1) // 2
    counter = ops.u32_arange(2 * pairs, device)
    bits = _mix32_array(ops.u32_xor(_mix32_array(ops.u32_add(counter, word), ops), key2), ops)
    uniform = ops.u32_to_unit_float(ops.u32_shr(bits, 9))  # (2 (b >> 9) + 1) * 2^-24
    values = ops.reshape(ops.box_muller(uniform, 1.0 / math.sqrt(rank)), (*batch, 2 * pairs))
    if 2 * pairs != numel:
        values = values[..., :numel]
    return ops.reshape(values, (*batch, rank, dim))
