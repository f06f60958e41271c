"""The few array operations the Flora math core needs, for each framework.

The math in :mod:`flora_opt.core` and :mod:`flora_opt.projection` is written once against this
small interface, so PyTorch, JAX and NumPy run the same code. Every reduction goes through
:meth:`ArrayOps.sum` / :meth:`ArrayOps.mean` (or a reduction built on them) with an explicit axis,
which is where a sharded backend inserts its cross-shard all-reduce.

Operations that may write their result into an existing array take ``out=``: PyTorch writes
there (``out is`` an input: in place), so the grouped step keeps its full-size temporaries in
a few buffers; JAX and NumPy ignore it and return a new array. The core therefore only ever
uses the returned value, and never reads an array after passing it as ``out``.
:meth:`ArrayOps.buffer` hands the core such a buffer for a named temporary (``None``: allocate).

Unsigned 32-bit integer arithmetic is the part that differs: JAX has wrapping ``uint32``;
PyTorch's ``uint32`` lacks ``add`` and ``>>``, so it holds the bit patterns in ``int32`` (two's
complement wraps like unsigned arithmetic; logical shifts are masked arithmetic shifts); NumPy
uses ``uint64`` with masking, the multipliers being below 2^31 so products stay exact.
"""

from __future__ import annotations

import math

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

    # ---- buffers ----------------------------------------------------------------------------
    def buffer(self, slot: str, shape, dtype=None):
        """A buffer of ``shape`` kept from step to step for the temporary named ``slot``, to pass as
        ``out=``, or ``None`` (allocate as usual): only the grouped PyTorch step keeps any."""
        return None

    # ---- float math ---------------------------------------------------------------------
    def sqrt(self, x):
        return self.xp.sqrt(x)

    def rsqrt(self, x, out=None):
        return 1.0 / self.xp.sqrt(x)

    def mul(self, a, b, out=None):
        return a * b

    def add(self, a, b, out=None):
        return a + b

    def addcmul(self, x, a, b, out=None):
        """``x + a * b``."""
        return x + a * b

    def add_product(self, x, a, b, beta, out=None):
        """``beta x + a @ b`` (batched matrices)."""
        return beta * x + self.matmul(a, b)

    def zero_non_finite(self, x, out=None):
        """``x`` with NaN and +-Inf entries replaced by 0."""
        return self.xp.where(self.xp.isfinite(x), x, 0.0)

    def sums_of_squares(self, x, scratch=None):
        """``(sum_j x_ij^2, sum_i x_ij^2)`` of the trailing ``(m, n)`` matrices of ``x``: shapes
        ``(..., m)`` and ``(..., n)``. ``scratch``: a free buffer of at least ``x``'s size for the squares."""
        squares = x * x
        return self.sum(squares, axis=-1), self.sum(squares, axis=-2)

    def sum_of_squares(self, x, axis=None):
        """``sum(x^2)`` over ``axis`` (all axes when ``None``)."""
        return self.sum(x * x, axis=axis)

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

    def stack(self, arrays):
        return self.xp.stack(arrays)

    def unbind(self, x):
        """The arrays along the first axis."""
        return list(x)

    def update_(self, targets, keeps, scales, values) -> None:
        """In place, for each ``i``: ``targets[i] <- keeps[i] targets[i] - scales[i] values[i]``
        (``keeps`` may be ``None``: 1). Only backends with mutable arrays (PyTorch) have it."""
        raise NotImplementedError(f"{self.name} arrays are immutable: use core.apply_direction")

    def matmul(self, a, b, out=None):
        return a @ b

    def rounded_matmul(self, a, b, dtype: str, out=None):
        """``a @ b`` at the precision ``dtype`` (``hp.projection_dtype``): ``"float32"`` is
        :meth:`matmul`; ``"bfloat16"`` rounds both operands to bfloat16, sums in float32 (what
        bfloat16 matrix units do) and rounds the product to bfloat16, then widens it back."""
        if dtype == "float32":
            return self.matmul(a, b, out=out)
        return self.widen(self.matmul(self.narrow(a, dtype), self.narrow(b, dtype)))

    def narrow(self, x, dtype: str):
        return x.astype(getattr(self.xp, dtype))

    def widen(self, x):
        return x.astype(self.xp.float32)

    def transpose(self, x):
        """The transpose of each trailing matrix of ``x``."""
        return self.xp.swapaxes(x, -1, -2)

    def sum(self, x, axis=None):
        return x.sum(axis=axis)

    def mean(self, x, axis=None):
        return x.mean(axis=axis)

    def maximum(self, x, floor: float):
        return self.xp.maximum(x, floor)

    def clip_min(self, x, floor: float):
        return self.xp.maximum(x, floor)

    def lerp(self, start, end, weight, out=None):
        """``start + weight * (end - start)``; ``weight`` a Python float or an array that broadcasts."""
        return start + weight * (end - start)

    def where(self, cond, a, b, out=None):
        """``a`` where ``cond`` else ``b`` (elementwise, broadcasting; scalars allowed)."""
        return self.xp.where(cond, a, b)

    def isfinite(self, x):
        return self.xp.isfinite(x)

    def orthonormal(self, x):
        """An orthonormal basis of the columns of ``x`` (``..., d, r``, ``r <= d``): the ``Q`` of
        its reduced QR decomposition (Householder, so orthonormal even when ``x`` is rank
        deficient)."""
        return self.xp.linalg.qr(x)[0]

    def rms(self, x, axis=None):
        """Root mean square over ``axis`` (all elements when ``None``)."""
        return self.sqrt(self.mean(x * x, axis=axis))

    def smin(self, a, b):
        """Elementwise minimum of two values that may be Python numbers or arrays."""
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

    def rsqrt(self, x, out=None):
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


# TorchOps.sums_of_squares squares a stack in blocks of rows of about SQUARE_BLOCK elements (a
# temporary that stays in the cache between the square and the two sums, so G is read from memory
# once); a stack of several matrices in at most MAX_SQUARE_BLOCKS blocks, so that its number of
# dispatched ops does not grow with the number of matrices. Measured by (docs/benchmarks.md,
# "The grouped step on CPU"):
#   python benchmarks/engine_profile.py --ablations --model gpt2-small --rank 32
SQUARE_BLOCK = 1 << 20
MAX_SQUARE_BLOCKS = 8


def square_block_rows(shape) -> int:
    """Rows per block of :meth:`TorchOps.sums_of_squares` for a stack of ``(m, n)`` matrices."""
    m, n = shape[-2], shape[-1]
    count = math.prod(shape[:-2])
    blocks = max(1, -(-count * m * n // SQUARE_BLOCK))
    if count > 1:
        blocks = min(blocks, MAX_SQUARE_BLOCKS)
    return max(1, -(-m // min(blocks, max(m, 1))))


class TorchOps(ArrayOps):
    """PyTorch: uint32 values live in int32 tensors as their two's-complement bit patterns.

    torch's ``uint32`` lacks ``add`` and ``>>`` on CPU, so words are held in ``int32``:
    ``+``, ``*`` and ``^`` give the same low 32 bits as unsigned arithmetic (two's complement
    wraps), and a logical shift is an arithmetic shift followed by a mask: half the bytes of an
    ``int64`` representation.

    ``buffers``: ``(slot, numel, dtype) -> flat tensor or None``, the kept buffers that
    :meth:`buffer` hands out (the grouped step's :meth:`flora_opt.engine.Engine.scratch`); none
    by default. ``out=`` is honoured (``out is`` an input: the in-place method).
    """

    name = "torch"
    in_place = True  # out= is honoured (DTensorOps computes functionally)

    def __init__(self, buffers=None):
        import torch

        self.xp = torch
        self.torch = torch
        self.buffers = buffers

    def buffer(self, slot, shape, dtype=None):
        if self.buffers is None:
            return None
        numel = 1
        for size in shape:
            numel *= size
        flat = self.buffers(slot, numel, self.torch.float32 if dtype is None else dtype)
        return None if flat is None else flat.view(tuple(shape))

    def _call(self, name: str, x, *args, out=None, **kwargs):
        """``torch.<name>(x, *args)``: into ``out`` (``x.<name>_(...)`` when ``out is x``) or new."""
        if out is None or not self.in_place:
            return getattr(self.torch, name)(x, *args, **kwargs)
        if out is x:
            return getattr(x, name + "_")(*args, **kwargs)
        return getattr(self.torch, name)(x, *args, out=out, **kwargs)

    @staticmethod
    def _signed(c: int) -> int:
        c &= MASK32
        return c - (1 << 32) if c >= (1 << 31) else c

    def u32(self, x):
        if isinstance(x, int):
            return self._signed(x)
        return x.to(self.torch.int32)

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
        # One new tensor, then in place: each op is one pass over a small buffer; x is not written.
        torch = self.torch
        y = torch.bitwise_right_shift(x, 16).bitwise_and_((1 << 16) - 1).bitwise_xor_(x).mul_(self._signed(mul1))
        shifted = torch.bitwise_right_shift(y, 15)
        y.bitwise_xor_(shifted.bitwise_and_((1 << 17) - 1)).mul_(self._signed(mul2))
        torch.bitwise_right_shift(y, 15, out=shifted)
        return y.bitwise_xor_(shifted.bitwise_and_((1 << 17) - 1))

    def box_muller(self, uniform, scale):
        torch = self.torch
        pairs = uniform.view(-1, 2)
        radius = pairs[:, 0].log().mul_(-2.0).sqrt_().mul_(scale)
        theta = pairs[:, 1].mul(2.0 * 3.141592653589793)
        # stacked rather than written through out= column views, which torch.compile cannot trace
        return torch.stack([torch.cos(theta).mul_(radius), torch.sin(theta).mul_(radius)], dim=1).view(-1)

    def rsqrt(self, x, out=None):
        return self._call("rsqrt", x, out=out)

    def mul(self, a, b, out=None):
        return self._call("mul", a, b, out=out)

    def add(self, a, b, out=None):
        return self._call("add", a, b, out=out)

    def addcmul(self, x, a, b, out=None):
        return self._call("addcmul", x, a, b, out=out)

    def add_product(self, x, a, b, beta, out=None):
        # one BLAS call (``beta`` applied inside the product) and, with ``out``, no full-size
        # temporary: ``beta * x + a @ b`` would allocate two of x's size
        fused = {3: "baddbmm", 2: "addmm"}.get(a.dim()) if a.dim() == b.dim() else None
        if fused is None or (not self.in_place and fused == "addmm"):
            return beta * x + self.matmul(a, b)
        if not self.in_place:
            return self.torch.baddbmm(x, a, b, beta=beta)
        return self._call(fused, x, a, b, beta=beta, out=out)

    def zero_non_finite(self, x, out=None):
        return self._call("nan_to_num", x, 0.0, 0.0, 0.0, out=out)

    def lerp(self, start, end, weight, out=None):
        return self._call("lerp", start, end, weight, out=out)

    def where(self, cond, a, b, out=None):
        if out is None or not self.in_place:
            return self.torch.where(cond, a, b)
        return self.torch.where(cond, a, b, out=out)

    def matmul(self, a, b, out=None):
        if out is None or not self.in_place:
            return self.torch.matmul(a, b)
        return self.torch.matmul(a, b, out=out)

    def rounded_matmul(self, a, b, dtype, out=None):
        if dtype == "float32":
            return self.matmul(a, b, out=out)
        # The m x n one of the operands and the product (the others are r x m, r x n or r x r) is
        # kept in the "operands" buffer: a product only ever holds one.
        torch = self.torch
        narrow = getattr(torch, dtype)
        product_shape = (*torch.broadcast_shapes(a.shape[:-2], b.shape[:-2]), a.shape[-2], b.shape[-1])
        sizes = (a.numel(), b.numel(), math.prod(product_shape))
        largest = sizes.index(max(sizes))
        kept = self.buffer("operands", (max(sizes),), narrow) if self.in_place else None
        a16 = a.to(narrow) if largest != 0 or kept is None else kept.view(a.shape).copy_(a)
        b16 = b.to(narrow) if largest != 1 or kept is None else kept.view(b.shape).copy_(b)
        product_out = kept.view(product_shape) if largest == 2 and kept is not None else None
        return self.widen(self.matmul(a16, b16, out=product_out), out=out)

    def narrow(self, x, dtype: str):
        return x.to(getattr(self.torch, dtype))

    def widen(self, x, out=None):
        if out is None or not self.in_place:
            return x.to(self.torch.float32)
        return out.copy_(x)

    def sums_of_squares(self, x, scratch=None):
        """One read of ``x`` (see :data:`SQUARE_BLOCK`): the squares of a block of rows of every
        matrix, written into ``scratch`` or the kept "squares" buffer, are summed along both axes
        (a column sum of ``x ** 2`` would read ``x`` a second time, with a stride of ``n``)."""
        torch = self.torch
        m = x.shape[-2]
        rows = m if torch.compiler.is_compiling() or not self.in_place else square_block_rows(x.shape)
        if scratch is None and self.in_place:
            numel = x.numel() // max(m, 1) * rows
            scratch = self.buffer("squares", (numel,))
        if rows >= m:  # one block: the whole stack
            out = None if scratch is None else scratch.reshape(-1)[: x.numel()].view(x.shape)
            square = torch.square(x) if out is None else torch.square(x, out=out)
            return square.sum(dim=-1), square.sum(dim=-2)
        row_sums, col_sums = [], None
        for start in range(0, m, rows):
            block = x[..., start : start + rows, :]
            out = None if scratch is None else scratch.reshape(-1)[: block.numel()].view(block.shape)
            square = torch.square(block) if out is None else torch.square(block, out=out)
            row_sums.append(square.sum(dim=-1))
            part = square.sum(dim=-2)
            col_sums = part if col_sums is None else col_sums.add_(part)
        return torch.cat(row_sums, dim=-1), col_sums

    def sum_of_squares(self, x, axis=None):
        return self.torch.linalg.vector_norm(x, dim=axis).square()

    def unbind(self, x):
        return list(x.unbind(0))

    def update_(self, targets, keeps, scales, values) -> None:
        if len(targets) == 1:
            if keeps is not None:
                targets[0].mul_(keeps[0])
            targets[0].addcmul_(values[0], scales[0], value=-1.0)
            return
        if keeps is not None:
            self.torch._foreach_mul_(targets, keeps)
        self.torch._foreach_addcmul_(targets, values, scales, value=-1.0)

    def stack_last(self, a, b):
        return self.torch.stack([a, b], dim=-1)

    def transpose(self, x):
        return x.mT

    def sum(self, x, axis=None):
        return x.sum() if axis is None else x.sum(dim=axis)

    def mean(self, x, axis=None):
        return x.mean() if axis is None else x.mean(dim=axis)

    def maximum(self, x, floor):
        return self.torch.clamp(x, min=floor)

    def clip_min(self, x, floor):
        return self.torch.clamp(x, min=floor)

    def smin(self, a, b):
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return min(a, b)
        if isinstance(a, (int, float)):
            return self.torch.clamp(b, max=a)
        if isinstance(b, (int, float)):
            return self.torch.clamp(a, max=b)
        return self.torch.minimum(a, b)

    def rms(self, x, axis=None):
        """The RMS over ``axis``; ``x`` may be a list of same-shape tensors (the rows of a stack
        that is not formed): their RMS each, from one multi-tensor norm."""
        torch = self.torch
        if isinstance(x, (list, tuple)):
            norms = torch.stack(torch._foreach_norm(x)) if len(x) > 1 else torch.linalg.vector_norm(x[0])[None]
            return norms.to(torch.float32) / (max(x[0].numel(), 1) ** 0.5)
        count = x.numel() if axis is None else math.prod([x.shape[a] for a in axis])
        return torch.linalg.vector_norm(x, dim=axis) / (max(count, 1) ** 0.5)


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

    def rsqrt(self, x, out=None):
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
