"""The few array operations the Flora math core needs, for each framework.

The math in :mod:`flora_opt.core` and :mod:`flora_opt.projection` is written once against this
small interface, so PyTorch, JAX and NumPy run the same code. Every reduction goes through
:meth:`ArrayOps.sum` / :meth:`ArrayOps.mean` with an explicit axis, which is where a sharded
backend would insert its cross-shard all-reduce.

Unsigned 32-bit integer arithmetic is the part that differs: JAX has wrapping ``uint32``;
PyTorch's ``uint32`` lacks ``add`` and ``>>``, so it holds the bit patterns in ``int32`` (two's
complement wraps like unsigned arithmetic; logical shifts are masked arithmetic shifts); NumPy
uses ``uint64`` with masking, the multipliers being below 2^31 so products stay exact.
"""

from __future__ import annotations

MASK32 = 0xFFFFFFFF
_TWO_POW_MINUS_24 = 2.0**-24


class ArrayOps:
    """Interface used by the core. Subclasses bind ``xp`` (the array namespace)."""

    name = "abstract"

    # ---- unsigned 32-bit integers -------------------------------------------------------
    def u32_arange(self, n, device=None):
        raise NotImplementedError

    def u32_add(self, x, c: int):
        raise NotImplementedError

    def u32_xor(self, x, c: int):
        raise NotImplementedError

    def u32_shr(self, x, k: int):
        raise NotImplementedError

    def u32_mul(self, x, c: int):
        raise NotImplementedError

    def u32_to_unit_float(self, x):
        """float32 ``(2 x + 1) * 2^-24`` for ``x < 2^23`` (exact in every framework)."""
        raise NotImplementedError

    def mix32(self, x, mul1: int, mul2: int):
        """The ``mix32`` finaliser of :mod:`flora_opt.projection` (may reuse ``x``'s storage)."""
        x = self.u32_xor(x, self.u32_shr(x, 16))
        x = self.u32_mul(x, mul1)
        x = self.u32_xor(x, self.u32_shr(x, 15))
        x = self.u32_mul(x, mul2)
        return self.u32_xor(x, self.u32_shr(x, 15))

    def box_muller(self, uniform, scale: float):
        """Pairs ``(u1, u2)`` of the flat ``uniform`` -> interleaved ``(rho cos, rho sin) * scale``."""
        pairs = self.reshape(uniform, (-1, 2))
        radius = self.sqrt(-2.0 * self.log(pairs[:, 0])) * scale
        theta = (2.0 * 3.141592653589793) * pairs[:, 1]
        return self.reshape(self.stack_last(radius * self.cos(theta), radius * self.sin(theta)), (-1,))

    # ---- float math ---------------------------------------------------------------------
    def sqrt(self, x):
        return self.xp.sqrt(x)

    def rsqrt(self, x):
        return 1.0 / self.xp.sqrt(x)

    def log(self, x):
        return self.xp.log(x)

    def cos(self, x):
        return self.xp.cos(x)

    def sin(self, x):
        return self.xp.sin(x)

    def reshape(self, x, shape):
        return x.reshape(shape)

    def stack_last(self, a, b):
        return self.xp.stack([a, b], axis=-1)

    def matmul(self, a, b):
        return a @ b

    def rounded_matmul(self, a, b, dtype: str):
        """``a @ b`` at the precision ``dtype`` (``hp.projection_dtype``): ``"float32"`` is
        :meth:`matmul`; ``"bfloat16"`` rounds both operands to bfloat16, sums in float32 (what
        bfloat16 matrix units do) and rounds the product to bfloat16, then widens it back."""
        if dtype == "float32":
            return self.matmul(a, b)
        return self.widen(self.matmul(self.narrow(a, dtype), self.narrow(b, dtype)))

    def narrow(self, x, dtype: str):
        return x.astype(getattr(self.xp, dtype))

    def widen(self, x):
        return x.astype(self.xp.float32)

    def transpose(self, x):
        return x.T

    def sum(self, x, axis=None):
        return x.sum(axis=axis)

    def mean(self, x, axis=None):
        return x.mean(axis=axis)

    def maximum(self, x, floor: float):
        return self.xp.maximum(x, floor)

    def clip_min(self, x, floor: float):
        return self.xp.maximum(x, floor)

    def lerp(self, start, end, weight):
        """``start + weight * (end - start)``; ``weight`` a Python float or 0-d array."""
        return start + weight * (end - start)

    def where(self, cond, a, b):
        """``a`` where ``cond`` else ``b`` (elementwise, broadcasting; scalars allowed)."""
        return self.xp.where(cond, a, b)

    def isfinite(self, x):
        return self.xp.isfinite(x)

    def orthonormal(self, x):
        """An orthonormal basis of the columns of ``x`` (``..., d, r``, ``r <= d``): the ``Q`` of
        its reduced QR decomposition (Householder, so orthonormal even when ``x`` is rank
        deficient)."""
        return self.xp.linalg.qr(x)[0]

    def rms(self, x):
        """Root mean square of all elements, as a 0-d array."""
        return self.sqrt(self.mean(x * x))

    def smin(self, a, b):
        """Minimum of two scalars that may be Python numbers or 0-d arrays."""
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return min(a, b)
        return self.xp.minimum(a, b)

    def cond(self, pred, true_fn, false_fn, *operands):
        """``true_fn(*operands) if pred else false_fn(*operands)``; traced under JAX."""
        return true_fn(*operands) if pred else false_fn(*operands)

    def u32(self, x):
        """A Python int or integer array as this backend's uint32 representation."""
        return x & MASK32 if isinstance(x, int) else x

    def shard_projection(self, projection):
        """The momentum projection as the sharded backend needs it (identity here; a ``DTensor``
        backend places it so that ``P G`` over a row-sharded ``G`` is a partial sum)."""
        return projection


class NumpyOps(ArrayOps):
    """NumPy, used by the float64 reference implementation and for checks."""

    name = "numpy"

    def __init__(self, float_dtype=None):
        import numpy as np

        self.xp = np
        self.np = np
        self.float_dtype = np.float64 if float_dtype is None else float_dtype

    def u32_arange(self, n, device=None):
        return self.np.arange(n, dtype=self.np.uint64)

    def u32_add(self, x, c):
        return (x + self.np.uint64(c & MASK32)) & self.np.uint64(MASK32)

    def u32_xor(self, x, c):
        return x ^ self.np.uint64(c & MASK32)

    def u32_shr(self, x, k):
        return x >> self.np.uint64(k)

    def u32_mul(self, x, c):
        assert 0 <= c < 2**31
        return (x * self.np.uint64(c)) & self.np.uint64(MASK32)

    def u32_to_unit_float(self, x):
        odd = x * self.np.uint64(2) + self.np.uint64(1)
        return odd.astype(self.np.float32) * self.np.float32(_TWO_POW_MINUS_24)

    def rsqrt(self, x):
        return 1.0 / self.np.sqrt(x)

    def narrow(self, x, dtype: str):
        """bfloat16 values (round to nearest even of the float32 value) held in ``float_dtype``;
        the product of two of them is then exact in float64, like a float32 sum of bfloat16 products."""
        assert dtype == "bfloat16", dtype
        np = self.np
        bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.astype(np.uint32).view(np.float32).astype(self.float_dtype)

    def widen(self, x):
        return self.narrow(x, "bfloat16")  # the product, rounded to bfloat16 as the devices return it


class TorchOps(ArrayOps):
    """PyTorch: uint32 values live in int32 tensors as their two's-complement bit patterns.

    torch's ``uint32`` lacks ``add`` and ``>>`` on CPU, so words are held in ``int32``:
    ``+``, ``*`` and ``^`` give the same low 32 bits as unsigned arithmetic (two's complement
    wraps), and a logical shift is an arithmetic shift followed by a mask. Half the bytes of an
    ``int64`` representation, hence about 3x faster projections on CPU.
    """

    name = "torch"

    def __init__(self):
        import torch

        self.xp = torch
        self.torch = torch

    @staticmethod
    def _signed(c: int) -> int:
        c &= MASK32
        return c - (1 << 32) if c >= (1 << 31) else c

    def u32(self, x):
        return self._signed(x) if isinstance(x, int) else x

    def u32_arange(self, n, device=None):
        if n > 2**31:
            raise ValueError(f"PyTorch projections are limited to 2^31 elements, got {n}")
        return self.torch.arange(n, dtype=self.torch.int32, device=device)

    def u32_add(self, x, c):
        return x + self.u32(c)

    def u32_xor(self, x, c):
        return x ^ self.u32(c)

    def u32_shr(self, x, k):
        return (x >> k).bitwise_and_((1 << (32 - k)) - 1)

    def u32_mul(self, x, c):
        return x * self.u32(c)

    def u32_to_unit_float(self, x):
        return (x * 2 + 1).to(self.torch.float32).mul_(_TWO_POW_MINUS_24)

    def mix32(self, x, mul1, mul2):
        # In place on x (callers pass temporaries): each op is one pass over a small buffer.
        torch = self.torch
        scratch = torch.empty_like(x)
        for shift, mul in ((16, mul1), (15, mul2)):
            torch.bitwise_right_shift(x, shift, out=scratch)
            x.bitwise_xor_(scratch.bitwise_and_((1 << (32 - shift)) - 1))
            x.mul_(self._signed(mul))
        torch.bitwise_right_shift(x, 15, out=scratch)
        return x.bitwise_xor_(scratch.bitwise_and_((1 << 17) - 1))

    def box_muller(self, uniform, scale):
        torch = self.torch
        pairs = uniform.view(-1, 2)
        radius = pairs[:, 0].log().mul_(-2.0).sqrt_().mul_(scale)
        theta = pairs[:, 1].mul(2.0 * 3.141592653589793)
        # stacked rather than written through out= column views, which torch.compile cannot trace
        return torch.stack([torch.cos(theta).mul_(radius), torch.sin(theta).mul_(radius)], dim=1).view(-1)

    def rsqrt(self, x):
        return self.torch.rsqrt(x)

    def stack_last(self, a, b):
        return self.torch.stack([a, b], dim=-1)

    def transpose(self, x):
        return x.mT

    def narrow(self, x, dtype: str):
        return x.to(getattr(self.torch, dtype))

    def widen(self, x):
        return x.to(self.torch.float32)

    def sum(self, x, axis=None):
        return x.sum() if axis is None else x.sum(dim=axis)

    def mean(self, x, axis=None):
        return x.mean() if axis is None else x.mean(dim=axis)

    def maximum(self, x, floor):
        return self.torch.clamp(x, min=floor)

    def clip_min(self, x, floor):
        return self.torch.clamp(x, min=floor)

    def lerp(self, start, end, weight):
        return self.torch.lerp(start, end, weight)

    def rms(self, x):
        return self.torch.linalg.vector_norm(x) / (max(x.numel(), 1) ** 0.5)


class JaxOps(ArrayOps):
    """JAX: native wrapping uint32 arithmetic."""

    name = "jax"

    def __init__(self):
        import jax.numpy as jnp

        self.xp = jnp
        self.jnp = jnp

    def u32_arange(self, n, device=None):
        return self.jnp.arange(n, dtype=self.jnp.uint32)

    def u32(self, x):
        if isinstance(x, int):
            return self.jnp.uint32(x & MASK32)
        return self.jnp.asarray(x).astype(self.jnp.uint32)

    def u32_add(self, x, c):
        return x + self.u32(c)

    def u32_xor(self, x, c):
        return x ^ self.u32(c)

    def u32_shr(self, x, k):
        return x >> self.jnp.uint32(k)

    def u32_mul(self, x, c):
        return x * self.u32(c)

    def cond(self, pred, true_fn, false_fn, *operands):
        import jax

        if isinstance(pred, bool):
            return true_fn(*operands) if pred else false_fn(*operands)
        return jax.lax.cond(pred, true_fn, false_fn, *operands)

    def u32_to_unit_float(self, x):
        odd = x * self.jnp.uint32(2) + self.jnp.uint32(1)
        return odd.astype(self.jnp.float32) * self.jnp.float32(_TWO_POW_MINUS_24)

    def rsqrt(self, x):
        import jax

        return jax.lax.rsqrt(x)

    # XLA may keep excess precision (``xla_allow_excess_precision``, on by default): a CPU
    # compilation upcasts a bfloat16 dot to float32 and can then drop the float32 -> bfloat16 ->
    # float32 round trips. ``reduce_precision`` (round to nearest even) is never dropped, so the
    # operands and the product are rounded as in the other backends.
    def narrow(self, x, dtype: str):
        import jax

        assert dtype == "bfloat16", dtype
        return jax.lax.reduce_precision(x, exponent_bits=8, mantissa_bits=7).astype(self.jnp.bfloat16)

    def widen(self, x):
        import jax

        return jax.lax.reduce_precision(x.astype(self.jnp.float32), exponent_bits=8, mantissa_bits=7)


_OPS_CACHE: dict[str, ArrayOps] = {}


def get_ops(name: str) -> ArrayOps:
    """The shared :class:`ArrayOps` instance for ``"torch"``, ``"jax"`` or ``"numpy"``."""
    if name not in _OPS_CACHE:
        factory = {"torch": TorchOps, "jax": JaxOps, "numpy": NumpyOps}.get(name)
        if factory is None:
            raise ValueError(f"unknown array backend {name!r}; expected 'torch', 'jax' or 'numpy'")
        _OPS_CACHE[name] = factory()
    return _OPS_CACHE[name]
