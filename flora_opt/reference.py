"""A slow, readable float64 NumPy reference of docs/algorithm.md, written line by line.

It shares no code with the fast paths (not even the projection generator, which is re-derived
here element by element with Python integers), so tests that compare :class:`flora_opt.Flora`
and the optax transformation against it check both the math and its transcription.
Use it on small tensors only: it loops in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B9


def _mix32(x: int) -> int:
    """Section 2: x ^= x>>16; x *= 0x21F0AAAD; x ^= x>>15; x *= 0x735A2D97; x ^= x>>15 (mod 2^32)."""
    x &= _M32
    x ^= x >> 16
    x = (x * 0x21F0AAAD) & _M32
    x ^= x >> 15
    x = (x * 0x735A2D97) & _M32
    x ^= x >> 15
    return x


def reference_tensor_seed(seed: int, index: int) -> int:
    return _mix32(_mix32(seed ^ _GOLDEN) + index)


def reference_key(tensor_seed: int, stream: int, index: int) -> int:
    base = _mix32(tensor_seed ^ _mix32(_GOLDEN * (stream + 1)))
    return _mix32(base + _mix32(index & _M32))


def reference_bits(key: int, counter: int) -> int:
    key2 = _mix32(key ^ _GOLDEN)
    return _mix32(_mix32(counter + key) ^ key2)


def reference_projection(key: int, rank: int, dim: int) -> np.ndarray:
    """Section 2, element by element: Box-Muller on pairs of 23-bit uniforms, scaled 1/sqrt(r)."""
    total = rank * dim
    values = []
    for pair in range((total + 1) // 2):
        u1 = (2 * (reference_bits(key, 2 * pair) >> 9) + 1) * 2.0**-24
        u2 = (2 * (reference_bits(key, 2 * pair + 1) >> 9) + 1) * 2.0**-24
        radius = math.sqrt(-2.0 * math.log(u1))
        angle = 2.0 * math.pi * u2
        values.append(radius * math.cos(angle))
        values.append(radius * math.sin(angle))
    return np.array(values[:total], dtype=np.float64).reshape(rank, dim) / math.sqrt(rank)


def reference_bfloat16(x: np.ndarray) -> np.ndarray:
    """Round float64 values to float32, then to bfloat16 (the 16 high bits, nearest, ties to
    even), held in float64."""
    bits = np.asarray(x, dtype=np.float32).view(np.uint32).astype(np.int64)
    lower = bits & 0xFFFF
    upper = bits >> 16
    up = (lower > 0x8000) | ((lower == 0x8000) & ((upper & 1) == 1))
    rounded = ((upper + up) << 16).astype(np.uint32)
    return rounded.view(np.float32).astype(np.float64)


@dataclass
class ReferenceTensorState:
    step: int = 0
    seed: int = 0
    momentum: np.ndarray | None = None
    row: np.ndarray | None = None
    col: np.ndarray | None = None
    second: np.ndarray | None = None
    skipped_steps: int = 0


@dataclass
class ReferenceFlora:
    """Flora on a list of float64 arrays; options as in :class:`flora_opt.Flora`."""

    params: list
    lr: float | None = None
    rank: int | None = 256
    kappa: int = 1000
    eps: tuple = (1e-30, 1e-3)
    clip_threshold: float = 1.0
    decay_rate: float = -0.8
    beta1: float | None = 0.9
    weight_decay: float = 0.0
    scale_parameter: bool = True
    relative_step: bool = False
    warmup_init: bool = False
    factorize_second_moment: bool = True
    min_dim_size_to_factor: int = 128
    max_aspect_ratio: float | None = 4.0
    seed: int = 0
    projection_dtype: str = "float32"
    states: list = field(default_factory=list)

    def __post_init__(self):
        self.params = [np.array(p, dtype=np.float64) for p in self.params]
        self.states = [ReferenceTensorState(seed=reference_tensor_seed(self.seed, i)) for i in range(len(self.params))]

    # Section 1: the layout of one tensor.
    def matrix_shape(self, p):
        if p.ndim < 2 or p.size == 0:
            return None
        return (p.shape[0], p.size // p.shape[0])

    def is_factored(self, p):
        mn = self.matrix_shape(p)
        return self.factorize_second_moment and mn is not None and min(mn) >= self.min_dim_size_to_factor

    def has_momentum(self):
        return self.beta1 is not None and self.beta1 > 0

    def is_compressed(self, p):
        mn = self.matrix_shape(p)
        if not (self.has_momentum() and self.rank is not None and mn is not None and min(mn) > self.rank):
            return False
        return self.max_aspect_ratio is None or max(mn) <= self.max_aspect_ratio * min(mn)

    def step(self, grads):
        for index, grad in enumerate(grads):
            if grad is not None:
                self.step_tensor(index, np.array(grad, dtype=np.float64))

    def step_tensor(self, index, grad):
        p = self.params[index]
        st = self.states[index]
        if p.size == 0:
            st.step += 1
            return
        mn = self.matrix_shape(p)
        W = p.reshape(mn) if mn is not None else p.copy()
        G = grad.reshape(W.shape)
        t = st.step + 1

        # Section 5: step size.
        rho = min(1e-06 * t if self.warmup_init else 0.01, 1.0 / math.sqrt(t)) if self.relative_step else self.lr
        eta = rho * max(self.eps[1], math.sqrt(np.mean(W * W))) if self.scale_parameter else rho

        # Section 6: second moment.
        beta2 = 1.0 - t**self.decay_rate
        if self.is_factored(p):
            m, n = mn
            row = st.row if st.row is not None else np.zeros(m)
            col = st.col if st.col is not None else np.zeros(n)
            sq = G * G + self.eps[0]
            row = beta2 * row + (1 - beta2) * sq.mean(axis=1)
            col = beta2 * col + (1 - beta2) * sq.mean(axis=0)
            V = np.zeros((m, n))
            for i in range(m):
                for j in range(n):
                    V[i, j] = row[i] * col[j] / row.mean()
            new_second = (row, col)
        else:
            second = st.second if st.second is not None else np.zeros(G.shape)
            second = beta2 * second + (1 - beta2) * (G * G + self.eps[0])
            V = second
            new_second = second
        U = G / np.sqrt(V)

        # Section 8: the direction D before clipping.
        if not self.has_momentum():
            D = U
        elif not self.is_compressed(p):
            M = st.momentum if st.momentum is not None else np.zeros(G.shape)
            M = self.beta1 * M + (1 - self.beta1) * U
            new_momentum = M
            D = M
        else:
            m, n = mn
            d = min(m, n)
            k = (t - 1) // self.kappa
            P = reference_projection(reference_key(st.seed, 0, k), self.rank, d)
            rows = m <= n
            M = st.momentum if st.momentum is not None else np.zeros((self.rank, n) if rows else (m, self.rank))
            if t > 1 and (t - 1) % self.kappa == 0:  # Section 4: carry the momentum into P_k.
                P_old = reference_projection(reference_key(st.seed, 0, k - 1), self.rank, d)
                M = P @ (P_old.T @ M) if rows else (M @ P_old) @ P.T
            if self.projection_dtype == "bfloat16":  # operands and products rounded to bfloat16

                def product(a, b):
                    return reference_bfloat16(reference_bfloat16(a) @ reference_bfloat16(b))
            else:

                def product(a, b):
                    return a @ b

            H = product(P.T, M) if rows else product(M, P)
            norm_h = math.sqrt(np.sum(H * H))
            if norm_h > 0:  # rescale the history to the norm of the momentum it estimates
                H = H * (math.sqrt(np.sum(M * M)) / norm_h)
            D = (1 - self.beta1) * U + self.beta1 * H
            new_momentum = self.beta1 * M + (1 - self.beta1) * (product(P, U) if rows else product(U, P.T))

        # Sections 7 and 9: clip the combined direction; a non-finite one skips the step.
        rms_d = math.sqrt(np.mean(D * D))
        if not math.isfinite(rms_d):
            st.skipped_steps += 1
            return
        delta = eta * D / max(1.0, rms_d / self.clip_threshold)
        if self.has_momentum():
            st.momentum = new_momentum

        W_new = W - eta * self.weight_decay * W - delta
        self.params[index] = W_new.reshape(p.shape)
        if self.is_factored(p):
            st.row, st.col = new_second
        else:
            st.second = new_second
        st.step = t


def reference_subspace_accumulation(grads, rank: int, tensor_seed: int, basis=None):
    """Section 12, the subspace estimator for one tensor over one cycle, in float64.

    ``grads`` are the cycle's micro-batch gradients of an ``(m, n)`` matrix; ``basis`` the
    previous cycle's ``min(m, n) x rank`` basis (``None`` at the first cycle: the transposed
    Gaussian of cycle 0, stream 1). Every micro-batch forms ``Z = Q B + X`` (``X`` the gradient
    with its smaller dimension first, ``B = 0`` at the first), then ``Q = orth(Z Z^T Q)``,
    ``B = Q^T Z``. Returns ``(estimate, basis)`` with ``estimate = Q B`` in the gradient's shape.
    """
    m, n = np.shape(grads[0])
    rows = m <= n
    if basis is None:
        basis = reference_projection(reference_key(tensor_seed, 1, 0), rank, min(m, n)).T
    basis = np.asarray(basis, dtype=np.float64)
    running = np.zeros((rank, max(m, n)))
    for grad in grads:
        x = np.asarray(grad, dtype=np.float64)
        z = basis @ running + (x if rows else x.T)
        basis = np.linalg.qr(z @ z.T @ basis)[0]
        running = basis.T @ z
    estimate = basis @ running
    return (estimate if rows else estimate.T), basis
