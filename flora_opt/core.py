"""The Flora math core: one tensor's update, as plain functions over :class:`~flora_opt.ops.ArrayOps`.

Everything here follows ``docs/algorithm.md`` (the single spec); section numbers below refer to
it. PyTorch (:class:`flora_opt.Flora`), the accelerate integration and the optax transformation
are thin wrappers that store state and call these functions. The float64 NumPy reference in
:mod:`flora_opt.reference` follows the same document line by line and is the ground truth in tests.

Notation: a tensor with ``ndim >= 2`` is viewed as the matrix ``(m, n) = (shape[0],
numel / shape[0])``. ``r`` is the rank; the compressed dimension ``d = min(m, n)`` (the rows when
``m <= n``, side ``"rows"``; the columns otherwise, side ``"cols"``). The projection ``P`` is
``(r, d)`` with ``N(0, 1/r)`` entries, so ``E[P^T P] = I_d``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from .hyperparams import FloraHyperParams
from .ops import ArrayOps
from .projection import (
    STREAM_ACCUMULATION,
    STREAM_CONSENSUS,
    STREAM_MOMENTUM,
    gaussian_projection,
    projection_key,
)

MOMENTUM_NONE = "none"
MOMENTUM_FULL = "full"
MOMENTUM_COMPRESSED = "compressed"

SIDE_ROWS = "rows"
SIDE_COLS = "cols"

# Keys of the per-tensor float state. Step and seed are integers kept beside them.
EXP_AVG = "exp_avg"
EXP_AVG_SQ = "exp_avg_sq"
EXP_AVG_SQ_ROW = "exp_avg_sq_row"
EXP_AVG_SQ_COL = "exp_avg_sq_col"


@dataclass(frozen=True)
class TensorLayout:
    """Static decisions for one tensor (section 1 of docs/algorithm.md)."""

    shape: tuple[int, ...]
    matrix: tuple[int, int] | None  # (m, n) view for ndim >= 2, else None
    factored: bool
    momentum: str  # MOMENTUM_NONE | MOMENTUM_FULL | MOMENTUM_COMPRESSED
    side: str | None  # SIDE_ROWS | SIDE_COLS when compressed
    rank: int | None  # rank when compressed

    @property
    def work_shape(self) -> tuple[int, ...]:
        """Shape the gradient is viewed as during the update."""
        return self.matrix if self.matrix is not None else self.shape

    @property
    def compressed_dim(self) -> int | None:
        if self.momentum != MOMENTUM_COMPRESSED:
            return None
        return min(self.matrix)

    def momentum_shape(self) -> tuple[int, ...] | None:
        if self.momentum == MOMENTUM_NONE:
            return None
        if self.momentum == MOMENTUM_FULL:
            return self.work_shape
        m, n = self.matrix
        return (self.rank, n) if self.side == SIDE_ROWS else (m, self.rank)

    def state_shapes(self) -> dict[str, tuple[int, ...]]:
        """Shapes of the float32 state tensors, by key (exactly what is allocated)."""
        shapes: dict[str, tuple[int, ...]] = {}
        momentum = self.momentum_shape()
        if momentum is not None:
            shapes[EXP_AVG] = momentum
        if self.factored:
            m, n = self.matrix
            shapes[EXP_AVG_SQ_ROW] = (m,)
            shapes[EXP_AVG_SQ_COL] = (n,)
        else:
            shapes[EXP_AVG_SQ] = self.work_shape
        return shapes


def matrix_view(shape: tuple[int, ...]) -> tuple[int, int] | None:
    """``(shape[0], prod(shape[1:]))`` for ``ndim >= 2``; ``None`` for scalars and vectors."""
    if len(shape) < 2:
        return None
    m = shape[0]
    n = math.prod(shape[1:])
    return (m, n)


def is_embedding_like(m: int, n: int, max_aspect_ratio: float | None) -> bool:
    """``max(m, n) > max_aspect_ratio * min(m, n)``: token embeddings, LM heads (section 1)."""
    return max_aspect_ratio is not None and max(m, n) > max_aspect_ratio * min(m, n)


def transfer_growth(dim: int, rank: int, beta1: float, kappa: int) -> float:
    """Factor by which one resample period multiplies the decompressed momentum's expected
    squared norm (section 4): ``beta1^(2 kappa) (1 + (dim + 1) / rank)``.

    A resample maps the momentum ``x = P_old^T M`` to ``P_new^T P_new x``, unbiased but with
    ``E||P_new^T P_new x||^2 = (1 + (d + 1) / r) ||x||^2``; between resamples the old momentum
    decays by ``beta1^kappa``. Above 1 the transferred noise compounds from one resample to the
    next and training can diverge; the default ``kappa = 1000`` is far below that for any
    ``beta1 < 0.99``.
    """
    return beta1 ** (2 * kappa) * (1.0 + (dim + 1.0) / rank)


def min_stable_kappa(dim: int, rank: int, beta1: float) -> int:
    """Smallest ``kappa`` with :func:`transfer_growth` below 1."""
    return max(1, math.floor(math.log(1.0 + (dim + 1.0) / rank) / (2.0 * math.log(1.0 / beta1))) + 1)


def unstable_transfer_message(layout: TensorLayout, hp: FloraHyperParams) -> str | None:
    """A warning text when ``layout``'s compressed momentum sits in the divergent regime."""
    if layout.momentum != MOMENTUM_COMPRESSED:
        return None
    growth = transfer_growth(layout.compressed_dim, layout.rank, hp.beta1, hp.kappa)
    if growth < 1.0:
        return None
    return (
        f"Flora: kappa={hp.kappa} is too small for a tensor of shape {layout.shape} with rank {layout.rank} "
        f"and beta1={hp.beta1}: each resample multiplies the momentum's noise by {growth:.2f} and training may "
        f"diverge; use kappa >= {min_stable_kappa(layout.compressed_dim, layout.rank, hp.beta1)} "
        "(docs/algorithm.md section 4)"
    )


def tensor_layout(shape, hp: FloraHyperParams) -> TensorLayout:
    """Which state a tensor of ``shape`` gets under ``hp`` (docs/algorithm.md section 1).

    * ``ndim < 2`` or an empty tensor: full second moment, full momentum (if any).
    * ``ndim >= 2``: viewed as ``(m, n) = (shape[0], numel / shape[0])``.
      - second moment factored iff ``factorize_second_moment`` and ``min(m, n) >=
        min_dim_size_to_factor``;
      - momentum compressed iff momentum is on, ``rank`` is not ``None``, ``min(m, n) > rank``
        and the matrix is not embedding-like: ``max(m, n) <= max_aspect_ratio * min(m, n)``
        (``max_aspect_ratio=None`` drops that test); the smaller dimension is compressed (rows
        on a tie).
    Embedding tables and LM heads ``(vocab, dim)`` have ``vocab / dim > 4`` in practice, so by
    default they keep full momentum.
    """
    shape = tuple(int(s) for s in shape)
    matrix = matrix_view(shape)
    if matrix is not None and min(matrix) == 0:
        matrix = None
    has_momentum = hp.beta1 is not None and hp.beta1 > 0
    if matrix is None:
        return TensorLayout(
            shape=shape,
            matrix=None,
            factored=False,
            momentum=MOMENTUM_FULL if has_momentum else MOMENTUM_NONE,
            side=None,
            rank=None,
        )
    m, n = matrix
    factored = bool(hp.factorize_second_moment) and min(m, n) >= hp.min_dim_size_to_factor
    if not has_momentum:
        momentum, side, rank = MOMENTUM_NONE, None, None
    elif hp.rank is not None and min(m, n) > hp.rank and not is_embedding_like(m, n, hp.max_aspect_ratio):
        momentum, side, rank = MOMENTUM_COMPRESSED, (SIDE_ROWS if m <= n else SIDE_COLS), hp.rank
    else:
        momentum, side, rank = MOMENTUM_FULL, None, None
    return TensorLayout(shape=shape, matrix=matrix, factored=factored, momentum=momentum, side=side, rank=rank)


# ---- compression (section 3) ---------------------------------------------------------------


def compress(x, projection, side: str, ops: ArrayOps, dtype: str = "float32"):
    """``P x`` (rows) or ``x P^T`` (cols): the ``(m, n)`` matrix to ``r x max(m, n)``, at the
    precision ``dtype`` (``hp.projection_dtype``, :meth:`~flora_opt.ops.ArrayOps.rounded_matmul`)."""
    if side == SIDE_ROWS:
        return ops.rounded_matmul(projection, x, dtype)
    return ops.rounded_matmul(x, ops.transpose(projection), dtype)


def decompress(c, projection, side: str, ops: ArrayOps, dtype: str = "float32"):
    """``P^T c`` (rows) or ``c P`` (cols); unbiased since ``E[P^T P] = I``; precision as :func:`compress`."""
    if side == SIDE_ROWS:
        return ops.rounded_matmul(ops.transpose(projection), c, dtype)
    return ops.rounded_matmul(c, projection, dtype)


def transfer(c, old_projection, new_projection, side: str, ops: ArrayOps):
    """Momentum transfer at a resample: ``P_new (P_old^T c)`` (rows) or ``(c P_old) P_new^T``.

    Computed through the small ``r x r`` product, never through the full ``m x n`` matrix.
    """
    if side == SIDE_ROWS:
        mixing = ops.matmul(new_projection, ops.transpose(old_projection))
        return ops.matmul(mixing, c)
    mixing = ops.matmul(old_projection, ops.transpose(new_projection))
    return ops.matmul(c, mixing)


def compress_scaled(grad, row_scale, col_scale, projection, side: str, ops: ArrayOps):
    """``compress(diag(a) G diag(b))`` without forming the scaled ``m x n`` matrix."""
    if side == SIDE_ROWS:
        scaled_projection = projection * row_scale[None, :]
        return ops.matmul(scaled_projection, grad) * col_scale[None, :]
    scaled_projection_t = ops.transpose(projection) * col_scale[:, None]
    return ops.matmul(grad, scaled_projection_t) * row_scale[:, None]


def momentum_projection(seed, step_index, rank: int, dim: int, ops: ArrayOps, device=None):
    """Momentum projection number ``step_index`` (= floor((t - 1) / kappa)) of a tensor."""
    key = projection_key(seed, STREAM_MOMENTUM, step_index, ops)
    return ops.shard_projection(gaussian_projection(key, rank, dim, ops, device))


# ---- compressed gradient accumulation (section 12) ----------------------------------------


@dataclass(frozen=True)
class AccumulationLayout:
    """How one tensor's gradient is accumulated under accumulation rank ``r_acc`` (section 12).

    ``side`` is ``None`` for a tensor accumulated naively (full size); otherwise the buffer is
    ``(rank, n)`` (``"rows"``, ``m <= n``) or ``(m, rank)`` (``"cols"``) for the matrix view
    ``(m, n)`` of the gradient.
    """

    shape: tuple[int, ...]
    matrix: tuple[int, int] | None  # (m, n) view when compressed, else None
    side: str | None  # SIDE_ROWS | SIDE_COLS when compressed
    rank: int | None  # r_acc when compressed

    @property
    def compressed(self) -> bool:
        return self.side is not None

    @property
    def compressed_dim(self) -> int | None:
        return None if self.matrix is None else min(self.matrix)

    def buffer_shape(self) -> tuple[int, ...] | None:
        """Shape of the float32 accumulation buffer, ``None`` when accumulated naively."""
        if self.side is None:
            return None
        m, n = self.matrix
        return (self.rank, n) if self.side == SIDE_ROWS else (m, self.rank)

    def basis_shape(self) -> tuple[int, ...] | None:
        """Shape of the subspace estimator's float32 basis, ``(min(m, n), rank)``."""
        return None if self.side is None else (min(self.matrix), self.rank)


def accumulation_layout(shape, rank: int | None) -> AccumulationLayout:
    """Section 12: a gradient is accumulated compressed iff ``rank`` is not ``None``, the tensor
    has ``ndim >= 2``, is non-empty, and its matrix view ``(m, n)`` has ``min(m, n) > rank``
    (the section 1 rule with ``r_acc``); the smaller dimension is compressed (rows on a tie).
    """
    shape = tuple(int(s) for s in shape)
    matrix = matrix_view(shape)
    if rank is None or matrix is None or min(matrix) == 0 or min(matrix) <= rank:
        return AccumulationLayout(shape=shape, matrix=None, side=None, rank=None)
    m, n = matrix
    return AccumulationLayout(shape=shape, matrix=matrix, side=SIDE_ROWS if m <= n else SIDE_COLS, rank=rank)


def accumulation_projection(seed, cycle, rank: int, dim: int, ops: ArrayOps, device=None):
    """``Q_c`` of accumulation cycle ``cycle`` for a tensor whose seed is
    ``tensor_seed(acc_seed, i)``: ``key(seed, STREAM_ACCUMULATION, cycle)`` (section 12)."""
    key = projection_key(seed, STREAM_ACCUMULATION, cycle, ops)
    return gaussian_projection(key, rank, dim, ops, device)


#: Accumulation estimators (section 12): ``"subspace"`` projects onto a basis fitted to the
#: gradients and tracked through the cycle; ``"gaussian"`` is the paper's unbiased random one.
ESTIMATOR_SUBSPACE = "subspace"
ESTIMATOR_GAUSSIAN = "gaussian"
ESTIMATORS = (ESTIMATOR_SUBSPACE, ESTIMATOR_GAUSSIAN)


def _oriented(x, side: str, ops: ArrayOps):
    """``x`` with the compressed dimension first: itself (rows) or its transpose (cols)."""
    return x if side == SIDE_ROWS else ops.transpose(x)


def initial_basis(seed, rank: int, dim: int, ops: ArrayOps, device=None):
    """The start of a tensor's first cycle: ``Q_0^T`` (``dim x rank``), the Gaussian of cycle 0."""
    return ops.transpose(accumulation_projection(seed, 0, rank, dim, ops, device))


def track_subspace(basis, buffer, grad, side: str, ops: ArrayOps):
    """One micro-batch of the subspace estimator (section 12): fold ``grad`` into ``(Q, B)``.

    In the orientation where the compressed dimension ``d`` comes first (``X = G`` for rows,
    ``G^T`` for cols), the running estimate of the cycle's sum is ``S = Q B`` with ``Q`` a
    ``d x r`` orthonormal basis and ``B = Q^T S``; ``buffer=None`` starts a cycle (``S = 0``,
    ``basis`` then holds the previous cycle's basis, or :func:`initial_basis`). With
    ``Z = S + X``, one power iteration warm-started from ``Q`` gives the new basis
    ``Q' = orth(Z Z^T Q)``, and ``B' = Q'^T Z``: what ``Z`` loses is only its part outside the
    ``r`` directions of largest energy (a randomized range finder with one power step, Halko,
    Martinsson and Tropp 2011; warm-started as PowerSGD, Vogels et al. 2019). ``Z`` is never
    formed: ``Z^T Q = B^T + X^T Q`` and ``Z (Z^T Q) = Q (B (Z^T Q)) + X (Z^T Q)``, ``r``-sized
    products only. A non-finite ``grad`` keeps the basis (the buffer then carries the NaN to the
    optimizer, which skips that step). Returns ``(Q', B')``, ``B'`` shaped like the buffer:
    ``(r, n)`` for rows, ``(m, r)`` for cols.
    """
    x = _oriented(grad, side, ops)
    across = ops.matmul(ops.transpose(x), basis)  # X^T Q
    if buffer is not None:
        running = _oriented(buffer, side, ops)  # B (r, N)
        across = across + ops.transpose(running)
        sketch = ops.matmul(basis, ops.matmul(running, across)) + ops.matmul(x, across)
    else:
        sketch = ops.matmul(x, across)
    sketch = ops.where(ops.isfinite(ops.sum(sketch)), sketch, basis)
    new_basis = ops.orthonormal(sketch)
    new_buffer = ops.matmul(ops.transpose(new_basis), x)
    if buffer is not None:
        new_buffer = new_buffer + ops.matmul(ops.matmul(ops.transpose(new_basis), basis), running)
    return new_basis, _oriented(new_buffer, side, ops)


def expand_subspace(basis, buffer, side: str, ops: ArrayOps):
    """The subspace estimate ``Q B`` (rows) or ``B Q^T`` (cols), shaped like the gradient."""
    if side == SIDE_ROWS:
        return ops.matmul(basis, buffer)
    return ops.matmul(buffer, ops.transpose(basis))


def range_sketch(basis, buffer, test_matrix, side: str, ops: ArrayOps):
    """``S Omega`` (``d x r``) of a rank's estimate ``S = Q B`` against the test matrix
    ``Omega`` (``N x r``, the same on every rank): linear in ``S``, so its mean over the ranks is
    the sketch of the mean estimate (data parallelism, section 12)."""
    running = _oriented(buffer, side, ops)
    return ops.matmul(basis, ops.matmul(running, test_matrix))


def reproject(new_basis, basis, buffer, side: str, ops: ArrayOps):
    """The buffer of ``S = Q B`` in another basis: ``Q'^T Q B``, shaped like the buffer."""
    mixing = ops.matmul(ops.transpose(new_basis), basis)
    return _oriented(ops.matmul(mixing, _oriented(buffer, side, ops)), side, ops)


def consensus_test_matrix(seed, cycle, rank: int, length: int, ops: ArrayOps, device=None):
    """``Omega`` of :func:`range_sketch`: ``length x rank`` Gaussian from stream 2 of the tensor
    seed at ``cycle``, regenerated alike on every rank."""
    key = projection_key(seed, STREAM_CONSENSUS, cycle, ops)
    return ops.transpose(gaussian_projection(key, rank, length, ops, device))


def accumulate_compressed(buffer, grad, projection, side: str, ops: ArrayOps, weight=1.0):
    """``buffer + weight * compress(grad; Q_c)``; ``buffer=None`` starts a new cycle.

    ``grad`` is the float32 micro-batch gradient in its ``(m, n)`` view. ``weight`` is what naive
    accumulation would use (1 when the loss is already divided by the number of micro-batches,
    as ``accelerate`` does; ``1/K`` for a mean, as ``optax.MultiSteps``).
    """
    compressed = compress(grad, projection, side, ops)
    if not (isinstance(weight, (int, float)) and weight == 1):
        compressed = compressed * weight
    return compressed if buffer is None else buffer + compressed


# ---- step-size schedule and second moment (sections 5-7) ----------------------------------


def beta2_at(step, decay_rate: float):
    """Second-moment decay ``beta2_t = 1 - t^decay_rate`` (Adafactor, decay_rate < 0)."""
    return 1.0 - step**decay_rate


def relative_step_size(step, hp: FloraHyperParams, ops: ArrayOps):
    """``rho_t``: ``lr``, or ``min(1e-2 | 1e-6 t, 1/sqrt(t))`` under ``relative_step``."""
    if not hp.relative_step:
        return hp.lr
    floor = 1e-6 * step if hp.warmup_init else 1e-2
    return ops.smin(floor, step**-0.5)


def step_size(step, param, hp: FloraHyperParams, ops: ArrayOps, lr=None):
    """``eta_t = rho_t * max(eps2, RMS(param))`` (or ``rho_t`` without ``scale_parameter``).

    ``lr`` overrides ``hp.lr`` (so a scheduler can change it without rebuilding ``hp``).
    """
    rho = lr if lr is not None and not hp.relative_step else relative_step_size(step, hp, ops)
    if hp.scale_parameter:
        return ops.clip_min(ops.rms(param), hp.eps2) * rho
    return rho


class Direction(NamedTuple):
    """The step of one tensor: ``p <- p - decay * p - value`` (docs/algorithm.md section 8).

    ``value`` is the dense ``Delta = eta_t D`` in the gradient's working shape; ``decay`` is
    ``eta_t * weight_decay`` (``None`` without weight decay).
    """

    value: Any
    decay: Any


def apply_direction(param, direction: Direction, ops: ArrayOps):
    """``(1 - decay) p - Delta`` as a new array (the one rule both frameworks apply; the torch
    optimizer's in-place form ``p.mul_(1 - decay).sub_(Delta)`` rounds the same way)."""
    if direction.decay is None:
        return param - direction.value
    return param * (1.0 - direction.decay) - direction.value


def keep_if_finite(finite, new, old, ops: ArrayOps):
    """Section 9, the one skip rule: ``new`` where the tensor's step is finite, else ``old``.

    ``finite`` is the flag returned by :func:`flora_update` (0-d, or broadcastable for a stack of
    tensors); a skipped tensor keeps its parameter and its state.
    """
    return ops.where(finite, new, old)


def history_scale(momentum, projection, side: str, ops: ArrayOps):
    """``s = ||M||_F / ||decompress(M)||_F`` (0 when the decompression is 0), through ``r x r``
    products only: rescales the decompressed history to the norm of the momentum it estimates
    (``E ||P x||^2 = ||x||^2``, while ``||P^T P x||^2`` is about ``(1 + (d + 1) / r)`` times too large).

    rows: ``||P^T M||^2 = sum((P P^T) * (M M^T))``; cols: ``||M P||^2 = sum((M^T M) * (P P^T))``.
    """
    gram_p = ops.matmul(projection, ops.transpose(projection))
    if side == SIDE_ROWS:
        gram_m = ops.matmul(momentum, ops.transpose(momentum))
    else:
        gram_m = ops.matmul(ops.transpose(momentum), momentum)
    decompressed_sq = ops.sum(gram_p * gram_m)
    momentum_sq = ops.sum(momentum * momentum)
    return ratio_of_norms(momentum_sq, decompressed_sq, ops)


# ||H|| from H itself (one read of the m x n history) where the r x r Gram products of
# history_scale cost more: r^2 (m + n) > HISTORY_NORM_RATIO m n (rank 256 on a 768 x 3072 matrix:
# 2.1 ms of Gram products on the CPU against about 1 ms for writing and reading H).
HISTORY_NORM_RATIO = 40


def history_norm_from_history(rank: int, m: int, n: int) -> bool:
    """Whether ``s`` is taken from the formed history (:func:`norm_ratio`) rather than from Gram
    products (:func:`history_scale`); the two are equal up to rounding (with bfloat16 products,
    the rounding of ``H``). A cost rule of the shapes only, so every path takes the same one."""
    return rank * rank * (m + n) > HISTORY_NORM_RATIO * m * n


def norm_ratio(momentum, history, ops: ArrayOps):
    """``||M||_F / ||H||_F`` (0 when ``H = 0``): :func:`history_scale` from the decompressed
    history ``H`` itself (with bfloat16 products, the rounded ``H``)."""
    return ratio_of_norms(ops.sum(momentum * momentum), ops.sum(history * history), ops)


def ratio_of_norms(momentum_sq, history_sq, ops: ArrayOps):
    """``s = sqrt(||M||^2 / ||H||^2)`` from the squared norms, 0 where ``||H|| = 0`` (elementwise,
    so a stack of tensors' norms works too)."""
    positive = history_sq > 0
    safe = ops.where(positive, history_sq, 1.0)
    return ops.where(positive, ops.sqrt(momentum_sq / safe), 0.0)


def normalised_update(grad, state: Mapping[str, Any], step, layout: TensorLayout, hp: FloraHyperParams, ops: ArrayOps):
    """Section 6: the second moment and ``U = G / sqrt(Vhat)`` (not clipped).

    Returns ``(U, new_state)`` with the second-moment keys of ``state`` (``exp_avg_sq_row`` and
    ``exp_avg_sq_col`` when factored, else ``exp_avg_sq``). Factored:
    ``R_t = beta2_t R + (1 - beta2_t) mean_j (G^2 + eps1)``, ``C_t`` likewise over rows,
    ``U_ij = G_ij a_i b_j`` with ``a = (R / mean(R))^{-1/2}``, ``b = C^{-1/2}``.
    """
    new_state: dict[str, Any] = {}
    beta2 = beta2_at(step, hp.decay_rate)
    grad_sq = grad * grad
    if layout.factored:
        row = ops.lerp(state[EXP_AVG_SQ_ROW], ops.mean(grad_sq, axis=1) + hp.eps1, 1.0 - beta2)
        col = ops.lerp(state[EXP_AVG_SQ_COL], ops.mean(grad_sq, axis=0) + hp.eps1, 1.0 - beta2)
        new_state[EXP_AVG_SQ_ROW] = row
        new_state[EXP_AVG_SQ_COL] = col
        row_scale = ops.rsqrt(row / ops.mean(row))  # a_i
        col_scale = ops.rsqrt(col)  # b_j;  U_ij = a_i G_ij b_j
        return grad * row_scale[:, None] * col_scale[None, :], new_state
    second = ops.lerp(state[EXP_AVG_SQ], grad_sq + hp.eps1, 1.0 - beta2)
    new_state[EXP_AVG_SQ] = second
    return grad * ops.rsqrt(second), new_state


def momentum_direction(
    normalised,
    momentum,
    step,
    seed,
    layout: TensorLayout,
    hp: FloraHyperParams,
    ops: ArrayOps,
    device=None,
    projection_index=None,
):
    """Sections 3, 4 and 8: the direction ``D`` from ``U`` and the momentum ``M_{t-1}``.

    none: ``D = U``; full: ``M_t = beta1 M_{t-1} + (1 - beta1) U``, ``D = M_t``; compressed:
    ``P = P_k`` (momentum transferred at a resample), ``s = ||M||_F / ||P^T M||_F`` (0 when
    ``P^T M = 0``), ``D = (1 - beta1) U + beta1 s P^T M``, ``M_t = beta1 M + (1 - beta1) P U``
    (rows; columns: ``M P`` and ``U P^T``); ``P U`` and ``P^T M`` at ``hp.projection_dtype``
    (the transfer stays float32); ``s`` from ``r x r`` Gram products (:func:`history_scale`), or
    from ``H`` itself at a large rank (:func:`history_norm_from_history`).
    Returns ``(D, new_state)`` with ``exp_avg`` when
    there is momentum. Used by :func:`flora_update` and by the optax ``compressed_ema``.
    """
    if layout.momentum == MOMENTUM_NONE:
        return normalised, {}
    if layout.momentum == MOMENTUM_FULL:
        direction = ops.lerp(momentum, normalised, 1.0 - hp.beta1)
        return direction, {EXP_AVG: direction}
    beta1, rank, dim, side = hp.beta1, layout.rank, layout.compressed_dim, layout.side
    resample_index = (step - 1) // hp.kappa if projection_index is None else projection_index
    projection = momentum_projection(seed, resample_index, rank, dim, ops, device)

    def transferred(c):
        old = momentum_projection(seed, resample_index - 1, rank, dim, ops, device)
        return transfer(c, old, projection, side, ops)

    is_resample = (step > 1) & ((step - 1) % hp.kappa == 0)
    momentum = ops.cond(is_resample, transferred, lambda c: c, momentum)
    precision = hp.projection_dtype
    decompressed = decompress(momentum, projection, side, ops, precision)
    if history_norm_from_history(rank, *layout.matrix):
        scale = beta1 * norm_ratio(momentum, decompressed, ops)
    else:
        scale = beta1 * history_scale(momentum, projection, side, ops)
    history = decompressed * scale
    direction = (1.0 - beta1) * normalised + history
    compressed = compress(normalised, projection, side, ops, precision)
    return direction, {EXP_AVG: ops.lerp(momentum, compressed, 1.0 - beta1)}


def flora_update(
    grad,
    param,
    state: Mapping[str, Any],
    step,
    seed,
    layout: TensorLayout,
    hp: FloraHyperParams,
    ops: ArrayOps,
    lr=None,
    device=None,
    projection_index=None,
):
    """One Flora step for one tensor (docs/algorithm.md section 8); a pure function.

    With ``U = G / sqrt(Vhat)`` (Adafactor's second moment, section 6, not clipped):

    * no momentum: ``D = U``;
    * full momentum: ``M_t = beta1 M_{t-1} + (1 - beta1) U``, ``D = M_t``;
    * compressed momentum: ``P = P_k`` (after the transfer at a resample, section 4),
      ``H = decompress(M_{t-1})``, ``s = ||M_{t-1}||_F / ||H||_F`` (0 when ``H = 0``),
      ``D = (1 - beta1) U + beta1 s H``, ``M_t = beta1 M_{t-1} + (1 - beta1) compress(U)``;

    then ``D <- D / max(1, RMS(D) / d_clip)`` and ``Delta = eta_t D``; the parameter becomes
    ``p - eta_t lambda p - Delta`` (:func:`apply_direction`). A non-finite ``RMS(D)`` skips the
    tensor (:func:`keep_if_finite`).

    Args:
      grad: float32 gradient, already viewed as ``layout.work_shape``.
      param: float32 parameter values in the same view (read only: RMS and weight decay).
      state: the float state by key (see :meth:`TensorLayout.state_shapes`), before the step.
      step: the new step number ``t >= 1`` (Python int, or a 0-d int array under JAX).
      seed: the tensor's 32-bit seed (Python int or 0-d uint32 array).
      lr: the current learning rate (overrides ``hp.lr``), e.g. from a scheduler.
      projection_index: index ``k`` of the momentum projection for this step; ``None`` means
        ``floor((step - 1) / kappa)``. A wrapper that keeps ``k`` in its state (so a ``kappa``
        changed mid-run moves the next resample instead of jumping to another projection) passes
        it; at a resample (``step > 1`` and ``(step - 1) % kappa == 0``) the momentum is
        transferred from projection ``k - 1``.

    Returns:
      ``(new_state, direction, finite)``: new arrays (nothing is written into ``grad``,
      ``param`` or ``state``), the :class:`Direction` and a 0-d boolean array that is false when
      ``RMS(D)`` is not finite (NaN/Inf in the gradient, or squares overflowing float32).
      Wrappers then keep the old parameter and state (section 9).
    """
    new_state: dict[str, Any] = {}
    eta = step_size(step, param, hp, ops, lr=lr)
    normalised, second_state = normalised_update(grad, state, step, layout, hp, ops)
    new_state.update(second_state)
    direction, momentum_state = momentum_direction(
        normalised, state.get(EXP_AVG), step, seed, layout, hp, ops, device=device, projection_index=projection_index
    )
    new_state.update(momentum_state)

    # Update clipping on the combined direction (section 7), step size, weight decay.
    direction_rms = ops.rms(direction)
    finite = ops.isfinite(direction_rms)  # NaN/Inf anywhere in G makes RMS(D) non-finite
    scale = eta / ops.clip_min(direction_rms / hp.clip_threshold, 1.0)
    decay = eta * hp.weight_decay if hp.weight_decay != 0 else None
    return new_state, Direction(direction * scale, decay), finite
