"""The Flora math core: the update, as plain functions over :class:`~flora_opt.ops.ArrayOps`.

Everything here follows ``docs/algorithm.md`` (the single spec); section numbers below refer to
it. PyTorch (:class:`flora_opt.Flora`: the grouped step of :mod:`flora_opt.engine`, the per-tensor
path, FSDP2's ``DTensor`` operands), the accelerate integration and the optax transformation
store state and call these functions; nothing else computes the update. The float64 NumPy
reference in :mod:`flora_opt.reference` follows the same document line by line, shares no code,
and is the ground truth in tests.

Batches: the update functions (sections 3-9) take arrays ``[..., *work_shape]`` whose leading
dimensions index a batch of tensors with the same layout (the grouped step's stack ``(T, m,
n)``); the per-tensor quantities (step, seed, projection index, ``eta_t``, ``s``, ``RMS(D)``,
the finite flag) then have the batch's shape. One tensor is the batch of shape ``()``
(:func:`batch_ndim`), so every path runs the same code. Functions that take ``out=`` may write
their result there (PyTorch; see :mod:`flora_opt.ops`), which is how the grouped step keeps its
full-size temporaries in a few buffers.

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


# ---- batches -------------------------------------------------------------------------------


def batch_ndim(step) -> int:
    """Number of batch dimensions: those of the step number (a Python int or 0-d array for one
    tensor, a vector for a stack of tensors)."""
    return getattr(step, "ndim", 0)


def tensor_axes(batch: int, ndim: int) -> tuple[int, ...] | None:
    """The axes of one tensor in an array of ``ndim`` dimensions whose first ``batch`` index the
    batch: ``None`` (every axis) for a single tensor."""
    return None if batch == 0 else tuple(range(batch, ndim))


def per_tensor(value, ndim: int, ops: ArrayOps):
    """A per-tensor quantity (shaped like the batch) made to broadcast against arrays with ``ndim``
    more trailing dimensions; a Python number or 0-d array is returned as it is."""
    if ndim == 0 or not getattr(value, "ndim", 0):
        return value
    return ops.reshape(value, (*tuple(value.shape), *(1,) * ndim))


# ---- compression (section 3) ---------------------------------------------------------------


def compress(x, projection, side: str, ops: ArrayOps, dtype: str = "float32"):
    """``P x`` (rows) or ``x P^T`` (cols): the ``(m, n)`` matrix to ``r x max(m, n)``, at the
    precision ``dtype`` (``hp.projection_dtype``, :meth:`~flora_opt.ops.ArrayOps.rounded_matmul`)."""
    if side == SIDE_ROWS:
        return ops.rounded_matmul(projection, x, dtype)
    return ops.rounded_matmul(x, ops.transpose(projection), dtype)


def decompress(c, projection, side: str, ops: ArrayOps, dtype: str = "float32", out=None):
    """``P^T c`` (rows) or ``c P`` (cols); unbiased since ``E[P^T P] = I``; precision as :func:`compress`."""
    if side == SIDE_ROWS:
        return ops.rounded_matmul(ops.transpose(projection), c, dtype, out=out)
    return ops.rounded_matmul(c, projection, dtype, out=out)


def transfer(c, old_projection, new_projection, side: str, ops: ArrayOps):
    """Momentum transfer at a resample: ``P_new (P_old^T c)`` (rows) or ``(c P_old) P_new^T``.

    Computed through the small ``r x r`` product, never through the full ``m x n`` matrix.
    """
    if side == SIDE_ROWS:
        mixing = ops.matmul(new_projection, ops.transpose(old_projection))
        return ops.matmul(mixing, c)
    mixing = ops.matmul(old_projection, ops.transpose(new_projection))
    return ops.matmul(c, mixing)


def momentum_projection(seed, step_index, rank: int, dim: int, ops: ArrayOps, device=None):
    """Momentum projection number ``step_index`` (section 4) of a tensor; arrays of seeds and
    indices (broadcasting) give one projection per element, ``(..., rank, dim)``."""
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


# ---- resampling (section 4) -----------------------------------------------------------------


def resample_due(step, kappa):
    """Whether step ``t`` resamples: ``t > 1`` and ``(t - 1) mod kappa = 0`` (section 4); Python
    ints or integer arrays, elementwise. The one resample test of every path."""
    return (step > 1) & ((step - 1) % kappa == 0)


def next_projection_index(previous, step, kappa):
    """The projection index ``k`` at step ``t`` from its value at step ``t - 1``: one more at a
    resample. Kept in the state, so a ``kappa`` changed mid-run moves the next resample and never
    jumps to an unrelated projection (section 4)."""
    return previous + resample_due(step, kappa)


def constant_kappa_index(step, kappa):
    """``k = floor((t - 1) / kappa)`` (0 before the first step): the projection index at step
    ``t`` when ``kappa`` never changed."""
    if isinstance(step, int):
        return max(step - 1, 0) // kappa
    return (step - 1) // kappa


# ---- step-size schedule and second moment (sections 5-6) ----------------------------------


def relative_step_size(step, hp: FloraHyperParams, ops: ArrayOps):
    """``rho_t``: ``lr``, or ``min(1e-2 | 1e-6 t, 1/sqrt(t))`` under ``relative_step`` (per tensor)."""
    if not hp.relative_step:
        return hp.lr
    floor = 1e-6 * step if hp.warmup_init else 1e-2
    return ops.smin(floor, step**-0.5)


def step_size(step, param, hp: FloraHyperParams, ops: ArrayOps, lr=None, axis=None):
    """``eta_t = rho_t * max(eps2, RMS(param))`` (or ``rho_t`` without ``scale_parameter``), per tensor.

    ``lr`` overrides ``hp.lr`` (so a scheduler can change it without rebuilding ``hp``); ``axis``:
    one tensor's axes of ``param`` (:func:`tensor_axes`). ``param`` may also be a list of the
    batch's tensors where the backend takes their RMS without a stack (``TorchOps.rms``).
    """
    rho = lr if lr is not None and not hp.relative_step else relative_step_size(step, hp, ops)
    if hp.scale_parameter:
        return ops.clip_min(ops.rms(param, axis), hp.eps2) * rho
    return rho


def second_moment_weight(step, hp: FloraHyperParams):
    """``1 - beta2_t = t^decay_rate`` (Adafactor's ``beta2_t = 1 - t^decay_rate``, ``decay_rate < 0``),
    computed directly: ``1 - (1 - t^c)`` would lose its digits in float32 for a large ``t``."""
    return step**hp.decay_rate


def factored_statistics(grad, row, col, step, hp: FloraHyperParams, ops: ArrayOps, scratch=None):
    """Section 6, factored: ``R_t = beta2_t R + (1 - beta2_t) mean_j (G^2 + eps1)``, ``C_t`` likewise
    over rows, from one read of ``G`` (``[..., m, n]``), and the scales ``a = (R_t / mean(R_t))^{-1/2}``,
    ``b = C_t^{-1/2}`` of ``U_ij = a_i G_ij b_j``. ``scratch``: a free buffer of ``G``'s size for
    the squares. Returns ``((a, b), (R_t, C_t))``."""
    m, n = grad.shape[-2], grad.shape[-1]
    weight = per_tensor(second_moment_weight(step, hp), 1, ops)
    row_sums, col_sums = ops.sums_of_squares(grad, scratch)
    row = ops.lerp(row, row_sums / n + hp.eps1, weight)
    col = ops.lerp(col, col_sums / m + hp.eps1, weight)
    row_scale = ops.rsqrt(row / per_tensor(ops.mean(row, axis=-1), 1, ops))
    return (row_scale, ops.rsqrt(col)), (row, col)


def scale_rows_and_columns(grad, row_scale, col_scale, ops: ArrayOps, out=None):
    """``U = diag(a) G diag(b)`` for each matrix (section 6); a block of rows of ``G`` with the
    same rows of ``a`` gives those rows of ``U``."""
    scaled = ops.mul(grad, row_scale[..., :, None], out=out)
    return ops.mul(scaled, col_scale[..., None, :], out=scaled)


def full_second_moment(grad, second, step, hp: FloraHyperParams, ops: ArrayOps, out=None):
    """Section 6, not factored: ``V_t = beta2_t V + (1 - beta2_t)(G^2 + eps1)`` and
    ``U = G / sqrt(V_t)``; returns ``(U, V_t)``. ``out`` (not ``grad``): where ``G^2`` and then ``U`` go."""
    weight = per_tensor(second_moment_weight(step, hp), grad.ndim - batch_ndim(step), ops)
    squares = ops.mul(grad, grad, out=out)
    squares = ops.add(squares, hp.eps1, out=squares)
    second = ops.lerp(second, squares, weight)
    normalised = ops.rsqrt(second, out=squares)
    return ops.mul(normalised, grad, out=normalised), second


def normalised_update(
    grad, state: Mapping[str, Any], step, layout: TensorLayout, hp: FloraHyperParams, ops: ArrayOps, *, out=None
):
    """Section 6: the second moment and ``U = G / sqrt(Vhat)`` (not clipped).

    Returns ``(U, new_state)`` with the second-moment keys of ``state`` (``exp_avg_sq_row`` and
    ``exp_avg_sq_col`` when factored, else ``exp_avg_sq``): :func:`factored_statistics` and
    :func:`scale_rows_and_columns`, or :func:`full_second_moment`. ``out``: where ``U`` may be
    written (``grad`` itself when the caller's copy of the gradient is free to overwrite).
    """
    if layout.factored:
        scratch = out if out is not None and out is not grad else None  # the squares go where U will
        (row_scale, col_scale), (row, col) = factored_statistics(
            grad, state[EXP_AVG_SQ_ROW], state[EXP_AVG_SQ_COL], step, hp, ops, scratch
        )
        normalised = scale_rows_and_columns(grad, row_scale, col_scale, ops, out=out)
        return normalised, {EXP_AVG_SQ_ROW: row, EXP_AVG_SQ_COL: col}
    normalised, second = full_second_moment(grad, state[EXP_AVG_SQ], step, hp, ops, out=None if out is grad else out)
    return normalised, {EXP_AVG_SQ: second}


# ---- the direction (sections 3, 4, 8) -------------------------------------------------------


def history_scale(momentum, projection, side: str, ops: ArrayOps, axis=None):
    """``s = ||M||_F / ||decompress(M)||_F`` (0 when the decompression is 0), through ``r x r``
    products only: rescales the decompressed history to the norm of the momentum it estimates
    (``E ||P x||^2 = ||x||^2``, while ``||P^T P x||^2`` is about ``(1 + (d + 1) / r)`` times too large).

    rows: ``||P^T M||^2 = sum((P P^T) * (M M^T))``; cols: ``||M P||^2 = sum((M^T M) * (P P^T))``.
    ``axis``: one tensor's axes (:func:`tensor_axes`) for a stack.
    """
    gram_p = ops.matmul(projection, ops.transpose(projection))
    if side == SIDE_ROWS:
        gram_m = ops.matmul(momentum, ops.transpose(momentum))
    else:
        gram_m = ops.matmul(ops.transpose(momentum), momentum)
    decompressed_sq = ops.sum(gram_p * gram_m, axis=axis)
    return ratio_of_norms(ops.sum_of_squares(momentum, axis), decompressed_sq, ops)


# s comes from the formed history H (one write and read of m x n) where the r x r Gram products
# of history_scale cost more: r^2 (m + n) > HISTORY_NORM_RATIO m n (rank 256 on 768 x 3072).
# Measured by (docs/benchmarks.md, "The grouped step on CPU"):
#   python benchmarks/engine_profile.py --ablations --model gpt2-small --rank 256
HISTORY_NORM_RATIO = 40


def history_norm_from_history(rank: int, m: int, n: int) -> bool:
    """Whether ``s`` is taken from the formed history (:func:`norm_ratio`) rather than from Gram
    products (:func:`history_scale`); the two are equal up to rounding (with bfloat16 products,
    the rounding of ``H``). A cost rule of the shapes only, so every path takes the same one."""
    return rank * rank * (m + n) > HISTORY_NORM_RATIO * m * n


def norm_ratio(momentum, history, ops: ArrayOps, axis=None):
    """``||M||_F / ||H||_F`` (0 when ``H = 0``): :func:`history_scale` from the decompressed
    history ``H`` itself (with bfloat16 products, the rounded ``H``)."""
    return ratio_of_norms(ops.sum_of_squares(momentum, axis), ops.sum_of_squares(history, axis), ops)


def ratio_of_norms(momentum_sq, history_sq, ops: ArrayOps):
    """``s = sqrt(||M||^2 / ||H||^2)`` from the squared norms, 0 where ``||H|| = 0`` (elementwise,
    so a stack of tensors' norms works too)."""
    positive = history_sq > 0
    safe = ops.where(positive, history_sq, 1.0)
    return ops.where(positive, ops.sqrt(momentum_sq / safe), 0.0)


def keeps_direction(layout: TensorLayout) -> bool:
    """Whether the direction ``D`` becomes state (full momentum: ``D = M_t``): the array ``U`` and
    ``D`` are written into must then be one that the state may keep, not a reused buffer."""
    return layout.momentum == MOMENTUM_FULL


def _projection_and_momentum(momentum, step, seed, index, layout: TensorLayout, hp, ops, device, may_resample):
    """``P_k`` and ``M_{t-1}`` on it: transferred from ``P_{k-1}`` where ``t`` resamples (section 4).

    One tensor: ``P_{k-1}`` is generated only at a resample (``ops.cond``; traced under JAX).
    A stack: where ``may_resample`` (some tensor of the stack may resample at this step, known to
    the caller), ``P_k`` and ``P_{k-1}`` of every tensor come from one generator call and the
    transfer is kept where the tensor resamples; otherwise neither is computed.
    """
    rank, dim, side = layout.rank, layout.compressed_dim, layout.side
    resample = resample_due(step, hp.kappa)
    if batch_ndim(step) == 0:
        projection = momentum_projection(seed, index, rank, dim, ops, device)

        def transferred(c):
            previous = momentum_projection(seed, index - 1, rank, dim, ops, device)
            return transfer(c, previous, projection, side, ops)

        return projection, ops.cond(resample, transferred, lambda c: c, momentum)
    if not may_resample:
        return momentum_projection(seed, index, rank, dim, ops, device), momentum
    both = momentum_projection(seed, ops.stack([index, index - 1]), rank, dim, ops, device)
    projection = both[0]
    moved = transfer(momentum, both[1], projection, side, ops)
    return projection, ops.where(per_tensor(resample, 2, ops), moved, momentum)


def _compressed_direction(
    normalised, momentum, step, seed, layout: TensorLayout, hp, ops, device, projection_index, may_resample, out
):
    """Compressed momentum (sections 3, 4, 8): ``(value, factor, new_state)``, ``D = factor value``.

    ``compress(U)`` is taken first, so ``D`` may then be written over ``U`` (``out``). With
    float32 products and ``s`` from Gram products, ``D = (1 - beta1) U + P^T (beta1 s M)`` is one
    product added to ``U`` (``factor`` 1). Where ``H = P^T M`` is formed (bfloat16 products, or
    ``s`` from ``H`` at a large rank, :func:`history_norm_from_history`),
    ``D / (1 - beta1) = U + (beta1 s / (1 - beta1)) H`` is one pass over ``U``, and
    ``factor = 1 - beta1`` goes into ``RMS(D)`` and the step.
    """
    beta1, side = hp.beta1, layout.side
    axis = tensor_axes(batch_ndim(step), normalised.ndim)
    index = constant_kappa_index(step, hp.kappa) if projection_index is None else projection_index
    projection, momentum = _projection_and_momentum(momentum, step, seed, index, layout, hp, ops, device, may_resample)
    precision = hp.projection_dtype
    compressed = compress(normalised, projection, side, ops, precision)
    from_history = history_norm_from_history(layout.rank, *layout.matrix)
    if precision != "float32" or from_history:
        history = decompress(momentum, projection, side, ops, precision, out=ops.buffer("history", normalised.shape))
        if from_history:
            ratio = norm_ratio(momentum, history, ops, axis)
        else:
            ratio = history_scale(momentum, projection, side, ops, axis)
        weight = per_tensor(ratio * (beta1 / (1.0 - beta1)), 2, ops)
        value, factor = ops.addcmul(normalised, history, weight, out=out), 1.0 - beta1
    else:
        ratio = history_scale(momentum, projection, side, ops, axis)
        scaled = momentum * per_tensor(beta1 * ratio, 2, ops)
        if side == SIDE_ROWS:
            value = ops.add_product(normalised, ops.transpose(projection), scaled, 1.0 - beta1, out=out)
        else:
            value = ops.add_product(normalised, scaled, projection, 1.0 - beta1, out=out)
        factor = None
    new_momentum = ops.lerp(momentum, compressed, 1.0 - beta1, out=compressed)
    return value, factor, {EXP_AVG: new_momentum}


def momentum_update(
    normalised,
    momentum,
    step,
    seed,
    layout: TensorLayout,
    hp: FloraHyperParams,
    ops: ArrayOps,
    device=None,
    projection_index=None,
    *,
    may_resample: bool = True,
    out=None,
):
    """Sections 3, 4 and 8: the direction from ``U`` and ``M_{t-1}``, as ``(value, factor,
    new_state)`` with ``D = factor * value`` (``factor`` ``None``: ``D = value``).

    none: ``D = U``; full: ``M_t = beta1 M_{t-1} + (1 - beta1) U``, ``D = M_t``; compressed:
    ``P = P_k`` (momentum transferred at a resample), ``s = ||M||_F / ||P^T M||_F`` (0 when
    ``P^T M = 0``), ``D = (1 - beta1) U + beta1 s P^T M``, ``M_t = beta1 M + (1 - beta1) P U``
    (rows; columns: ``M P`` and ``U P^T``); ``P U`` and ``P^T M`` at ``hp.projection_dtype``
    (the transfer stays float32); ``s`` from ``r x r`` Gram products (:func:`history_scale`), or
    from ``H`` itself at a large rank (:func:`history_norm_from_history`).

    ``out``: where ``D`` may be written (``normalised`` itself). ``may_resample`` (a stack only):
    ``False`` when no tensor of the stack resamples at this step.
    """
    if layout.momentum == MOMENTUM_NONE:
        return normalised, None, {}
    if layout.momentum == MOMENTUM_FULL:
        new_momentum = ops.lerp(momentum, normalised, 1.0 - hp.beta1, out=out)
        return new_momentum, None, {EXP_AVG: new_momentum}
    return _compressed_direction(
        normalised, momentum, step, seed, layout, hp, ops, device, projection_index, may_resample, out
    )


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
    """Sections 3, 4 and 8: the direction ``D`` from ``U`` and the momentum ``M_{t-1}``
    (:func:`momentum_update`, with ``D`` formed); returns ``(D, new_state)`` with ``exp_avg`` when
    there is momentum. Used by the optax ``compressed_ema``.
    """
    value, factor, new_state = momentum_update(
        normalised, momentum, step, seed, layout, hp, ops, device=device, projection_index=projection_index
    )
    return (value if factor is None else value * factor), new_state


# ---- clipping, step, skipping (sections 7-9) ------------------------------------------------


class Direction(NamedTuple):
    """The step of one tensor (or of each tensor of a batch), ``p <- (1 - decay) p - scale value``
    (docs/algorithm.md section 8): ``Delta = scale * value = eta_t D`` in the gradient's working
    shape; ``decay`` is ``eta_t * weight_decay`` (``None`` without weight decay)."""

    value: Any
    decay: Any
    scale: Any = 1.0


def clipped_step(direction_rms, eta, hp: FloraHyperParams, ops: ArrayOps, factor=None):
    """Sections 7-9: ``(scale, decay, finite)`` of the step ``p <- (1 - decay) p - scale value``.

    ``D = factor value`` (``factor`` ``None``: 1) and ``direction_rms`` is ``RMS(value)`` per
    tensor; ``scale = factor eta_t / max(1, RMS(D) / d_clip)`` (clipping), ``decay = eta_t
    lambda`` (``None`` without weight decay), and ``finite`` is false where ``RMS(D)`` is not
    finite (NaN/Inf in the gradient, or squares overflowing float32).
    """
    if factor is not None:
        direction_rms = direction_rms * factor
    finite = ops.isfinite(direction_rms)
    scale = eta / ops.clip_min(direction_rms / hp.clip_threshold, 1.0)
    if factor is not None:
        scale = scale * factor
    decay = eta * hp.weight_decay if hp.weight_decay != 0 else None
    return scale, decay, finite


def rms_of_blocks(block_sums_of_squares, numel: int, ops: ArrayOps):
    """``RMS`` of a tensor of ``numel`` elements from the sums of squares of its blocks."""
    total = block_sums_of_squares[0]
    for part in block_sums_of_squares[1:]:
        total = total + part
    return ops.sqrt(total / numel)


def apply_direction(param, direction: Direction, ops: ArrayOps):
    """``(1 - decay) p - scale value`` as a new array (section 8, step 5)."""
    ndim = getattr(direction.value, "ndim", 0) - getattr(direction.scale, "ndim", 0)
    delta = direction.value * per_tensor(direction.scale, ndim, ops)
    if direction.decay is None:
        return param - delta
    return param * per_tensor(1.0 - direction.decay, ndim, ops) - delta


def apply_direction_(targets, direction: Direction, ops: ArrayOps) -> None:
    """:func:`apply_direction` in place (PyTorch): ``targets`` holds one array per tensor of the
    batch (one array for a single tensor), each with the elements of its tensor's ``value``."""
    keep = None if direction.decay is None else 1.0 - direction.decay
    count = len(targets)
    if not getattr(direction.scale, "ndim", 0):  # one tensor
        values = [ops.reshape(direction.value, tuple(targets[0].shape))]
        keeps, scales = [keep], [direction.scale]
    else:
        values = ops.unbind(ops.reshape(direction.value, (count, *tuple(targets[0].shape))))
        keeps = ops.unbind(keep) if getattr(keep, "ndim", 0) else [keep] * count
        scales = ops.unbind(direction.scale)
    ops.update_(targets, None if keep is None else keeps, scales, values)


def keep_if_finite(finite, new, old, ops: ArrayOps, out=None):
    """Section 9, the one skip rule: ``new`` where the tensor's step is finite, else ``old``.

    ``finite`` is the flag returned by :func:`flora_update` (0-d, or broadcastable for a stack of
    tensors); a skipped tensor keeps its parameter and its state. ``out``: where to write.
    """
    return ops.where(finite, new, old, out=out)


def keep_states_if_finite(finite, new_state, old_state, ops: ArrayOps, into=None) -> dict[str, Any]:
    """:func:`keep_if_finite` for each array of ``new_state`` (a batch's: ``finite`` per tensor),
    written into ``into[key]`` (by default over the new arrays)."""
    into = new_state if into is None else into
    return {
        key: keep_if_finite(
            per_tensor(finite, new.ndim - getattr(finite, "ndim", 0), ops), new, old_state[key], ops, out=into[key]
        )
        for key, new in new_state.items()
    }


def skip_non_finite(finite, new_state, old_state, update: Direction, ops: ArrayOps, into=None):
    """Section 9 decided per tensor on the device (no host sync), for a batch: the state of a
    tensor whose step is not finite stays ``old_state`` (:func:`keep_states_if_finite`), and its
    step is zero: scale and decay 0, and the value's non-finite entries zeroed (``0 * NaN`` is
    NaN), unless the value is a kept state (full momentum's ``M_t``), finite once kept.
    Returns ``(state, update)``."""
    kept = keep_states_if_finite(finite, new_state, old_state, ops, into)
    aliases = [key for key, new in new_state.items() if new is update.value]
    value = kept[aliases[0]] if aliases else ops.zero_non_finite(update.value, out=update.value)
    decay = None if update.decay is None else ops.where(finite, update.decay, 0.0)
    return kept, Direction(value, decay, ops.where(finite, update.scale, 0.0))


def _update_buffer(grad, out, layout: TensorLayout, ops: ArrayOps):
    """Where ``U`` and ``D`` go: ``out``; else, unless ``D`` becomes state, a kept buffer (if the
    backend keeps any); else ``None`` (new arrays)."""
    if out is not None or keeps_direction(layout):
        return out
    return ops.buffer("main", tuple(grad.shape))


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
    *,
    out=None,
    may_resample: bool = True,
):
    """One Flora step (docs/algorithm.md section 8) for one tensor, or for a stack of tensors with
    the same layout; a pure function of its inputs (see ``out``).

    With ``U = G / sqrt(Vhat)`` (Adafactor's second moment, section 6, not clipped):

    * no momentum: ``D = U``;
    * full momentum: ``M_t = beta1 M_{t-1} + (1 - beta1) U``, ``D = M_t``;
    * compressed momentum: ``P = P_k`` (after the transfer at a resample, section 4),
      ``H = decompress(M_{t-1})``, ``s = ||M_{t-1}||_F / ||H||_F`` (0 when ``H = 0``),
      ``D = (1 - beta1) U + beta1 s H``, ``M_t = beta1 M_{t-1} + (1 - beta1) compress(U)``;

    then ``D <- D / max(1, RMS(D) / d_clip)`` and ``Delta = eta_t D`` (section 7); the parameter
    becomes ``p - eta_t lambda p - Delta`` (:func:`apply_direction`). A non-finite ``RMS(D)`` skips
    the tensor (section 9: :func:`keep_if_finite`, :func:`skip_non_finite`).

    Batch: ``grad`` (and ``param`` and the state) may carry leading batch dimensions, ``[...,
    *work_shape]``, with ``step``, ``seed`` and ``projection_index`` arrays of the batch's shape:
    each tensor of the stack is stepped as it would be alone (the grouped torch step).

    Args:
      grad: float32 gradient, viewed as ``layout.work_shape`` (after the batch dimensions).
      param: float32 parameter values in the same view (read only: their RMS); a list of the
        batch's tensors where the backend takes their RMS without a stack (``TorchOps``).
      state: the float state by key (see :meth:`TensorLayout.state_shapes`), before the step.
      step: the new step number ``t >= 1`` (Python int, or an int array: 0-d under JAX, one per
        tensor for a stack).
      seed: the tensor's 32-bit seed (Python int or uint32 array; a stack's as int32 bit patterns).
      lr: the current learning rate (overrides ``hp.lr``), e.g. from a scheduler.
      projection_index: index ``k`` of the momentum projection for this step
        (:func:`next_projection_index`); ``None`` means :func:`constant_kappa_index`. At a
        resample (:func:`resample_due`) the momentum is transferred from projection ``k - 1``.
      out: where ``U`` and ``D`` may be written (``grad`` itself when the caller's copy may be
        overwritten); otherwise new arrays, or a buffer from ``ops.buffer`` where ``D`` does not
        become state. Nothing is written into ``param`` or ``state``.
      may_resample: for a stack, ``False`` when the caller knows no tensor resamples at this step.

    Returns:
      ``(new_state, direction, finite)``: the new state arrays, the :class:`Direction` and a
      boolean (per tensor) that is false where ``RMS(D)`` is not finite. Wrappers then keep the
      old parameter and state (section 9).
    """
    axis = tensor_axes(batch_ndim(step), grad.ndim)
    eta = step_size(step, param, hp, ops, lr=lr, axis=axis)
    target = _update_buffer(grad, out, layout, ops)
    normalised, new_state = normalised_update(grad, state, step, layout, hp, ops, out=target)
    value, factor, momentum_state = momentum_update(
        normalised,
        state.get(EXP_AVG),
        step,
        seed,
        layout,
        hp,
        ops,
        device,
        projection_index,
        may_resample=may_resample,
        out=normalised,
    )
    new_state.update(momentum_state)
    scale, decay, finite = clipped_step(ops.rms(value, axis), eta, hp, ops, factor)
    return new_state, Direction(value, decay, scale), finite
