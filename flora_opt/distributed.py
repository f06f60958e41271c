r"""Flora on sharded parameters: FSDP2 / ``DTensor`` (``fully_shard``, ``Shard(0)``).

:class:`flora_opt.Flora` steps a ``DTensor`` parameter by running the one math core,
:func:`flora_opt.core.flora_update`, on ``DTensor`` operands: the gradient, the parameter view,
the state and the projection are all ``DTensor`` objects on the parameter's mesh, so every reduction
the core writes with an explicit axis (``docs/algorithm.md`` section 14) becomes a partial sum
on each rank that ``DTensor`` all-reduces or reduce-scatters, and nothing else is communicated.
Whatever the core computes (including a changed update rule) is computed on the *global* tensor,
so the result is the single-process result up to the order of floating-point summation.

For an ``m x n`` weight sharded by rows (``Shard(0)``: rank ``k`` holds rows ``[lo_k, hi_k)``,
``torch.chunk`` split) with gradient ``G``:

* factored second moment: ``R = mean_j G^2`` is local (``Shard(0)``, ``m / world`` floats per
  rank); ``C = mean_i G^2`` is a partial sum, all-reduced (``n`` floats, replicated);
  ``mean(R)``, ``RMS(W)``, ``RMS(U)``: one all-reduced scalar each;
* compressed momentum, rows side (``m <= n``, ``P in R^{r x m}``): the shard uses columns
  ``[lo_k, hi_k)`` of ``P`` (the counter-based generator gives every rank the same ``P``);
  ``P G = sum_k P[:, lo_k:hi_k] G_k`` is a partial ``r x n`` product, reduce-scattered into the
  momentum ``M`` (``Shard(0)``: ``r / world`` rows of ``M`` per rank); the transfer
  ``P_new P_old^T`` is an all-reduced ``r x r`` block; applying ``P^T M`` all-gathers the
  ``r x n`` momentum (never the ``m x n`` gradient or update);
* compressed momentum, cols side (``m > n``, ``P in R^{r x n}``): ``G P^T`` and ``M P`` are
  local (``M`` is ``m x r``, ``Shard(0)`` like the parameter);
* full momentum and a full second moment: elementwise, local, ``Shard(0)``.

So each rank holds ``1 / world`` of every state except the column statistic ``C`` (``n``
floats), and the largest collective is an ``r x max(m, n)`` block. Vectors (biases, norms) are
sharded too and need only scalar all-reduces.

8-bit state (``quantization=True``) keeps the single-process blocks of 256 consecutive elements
of the global state: codes are sharded like the state, the per-block scales are replicated and
a block straddling a shard boundary gets the maximum of the ranks' partial maxima (one MAX
all-reduce of the scales), so codes and scales do not depend on the world size
(:func:`quantized_zeros`).

Limits: a one-dimensional mesh with ``Shard(0)`` or ``Replicate()`` parameters (FSDP2's
``fully_shard`` on one mesh dimension, or DDP-style replication); see ``docs/distributed.md``.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from . import core
from .core import EXP_AVG, EXP_AVG_SQ, EXP_AVG_SQ_COL, EXP_AVG_SQ_ROW, TensorLayout
from .ops import TorchOps

__all__ = [
    "CompressedAllreduceState",
    "DTensorOps",
    "check_supported",
    "compressed_allreduce_hook",
    "dequantize_state",
    "dtensor_ops",
    "is_dtensor",
    "local_state_bytes",
    "place_state",
    "quantize_state",
    "quantized_zeros",
    "register_compressed_allreduce",
    "state_zeros",
]


def is_dtensor(tensor: Any) -> bool:
    """Whether ``tensor`` is a ``torch.distributed.tensor.DTensor`` (without importing it eagerly)."""
    cls = type(tensor)
    return cls.__name__ == "DTensor" and cls.__module__.startswith("torch.distributed")


def _dtensor_api():
    from torch.distributed.tensor import DTensor, Replicate, Shard

    return DTensor, Replicate, Shard


def check_supported(param, quantization: bool = False) -> None:
    """Raise a clear error for sharded parameters this module cannot step exactly."""
    _, Replicate, Shard = _dtensor_api()
    mesh = param.device_mesh
    if mesh.ndim != 1:
        raise NotImplementedError(
            f"Flora steps DTensor parameters on a one-dimensional mesh (FSDP2 fully_shard); got a {mesh.ndim}-D mesh "
            f"with placements {param.placements} (HSDP and tensor parallelism are not supported yet)"
        )
    placement = param.placements[0]
    if not (isinstance(placement, Replicate) or (isinstance(placement, Shard) and placement.dim == 0)):
        raise NotImplementedError(
            f"Flora steps DTensor parameters sharded along dim 0 (FSDP2's Shard(0)) or replicated; got {placement} "
            f"for a parameter of shape {tuple(param.shape)}"
        )


def _sharded(param) -> bool:
    _, _, Shard = _dtensor_api()
    return isinstance(param.placements[0], Shard)


def state_placements(param, layout: TensorLayout, key: str):
    """Placements of state ``key`` of a ``DTensor`` parameter (see the module docstring).

    Everything that has the parameter's rows is ``Shard(0)`` like the parameter; the column
    statistic ``C`` is replicated; the rows-side compressed momentum ``(r, n)`` is ``Shard(0)``
    over its ``r`` rows, so each rank keeps ``1 / world`` of it.
    """
    _, Replicate, Shard = _dtensor_api()
    if not _sharded(param) or key == EXP_AVG_SQ_COL:
        return (Replicate(),)
    if key in (EXP_AVG, EXP_AVG_SQ, EXP_AVG_SQ_ROW):
        return (Shard(0),)
    raise KeyError(key)  # pragma: no cover - every layout key is listed above


def state_zeros(param, layout: TensorLayout, key: str, shape) -> torch.Tensor:
    """A float32 zero ``DTensor`` of global ``shape`` for state ``key``, allocated shard by shard."""
    DTensor, _, _ = _dtensor_api()
    placements = state_placements(param, layout, key)
    mesh = param.device_mesh
    local_shape, _ = _local_shape_and_offset(tuple(shape), mesh, placements)
    local = torch.zeros(local_shape, dtype=torch.float32, device=param.to_local().device)
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=_contiguous_stride(shape)
    )


def place_state(param, layout: TensorLayout, values: dict[str, Any]) -> dict[str, Any]:
    """``values`` (new state from the core) with the placements of :func:`state_placements`.

    ``DTensor`` may return a state replicated (e.g. after an all-reduce it chose over a
    reduce-scatter); keeping only this rank's shard is a local slice, no communication.
    """
    placed = {}
    for key, value in values.items():
        placements = state_placements(param, layout, key)
        if is_dtensor(value) and tuple(value.placements) != tuple(placements):
            value = value.redistribute(value.device_mesh, placements)
        placed[key] = value
    return placed


def _contiguous_stride(shape) -> tuple[int, ...]:
    stride, acc = [], 1
    for size in reversed(tuple(shape)):
        stride.append(acc)
        acc *= size
    return tuple(reversed(stride))


def _local_shape_and_offset(shape: tuple[int, ...], mesh, placements) -> tuple[tuple[int, ...], int]:
    """``torch.chunk`` split of dim 0 (DTensor's and FSDP2's rule): this rank's shape and row offset."""
    _, _, Shard = _dtensor_api()
    if not isinstance(placements[0], Shard):
        return shape, 0
    world = mesh.size()
    rank = mesh.get_local_rank()
    chunk = math.ceil(shape[0] / world) if shape[0] else 0
    lo = min(rank * chunk, shape[0])
    hi = min(lo + chunk, shape[0])
    return (hi - lo, *tuple(shape[1:])), lo


class DTensorOps(TorchOps):
    """:class:`~flora_opt.ops.TorchOps` for one ``DTensor`` parameter's step.

    The core works on ``DTensor`` objects, so its reductions are global; this backend only
    (a) computes functionally where ``TorchOps`` writes into temporaries (``out=`` is not
    defined for ``DTensor`` operands; the row and column sums of squares are plain reductions,
    not blocks of rows), (b) keeps a product with a row-sharded left operand
    row-sharded (:meth:`matmul`: the compressed-size right operand is replicated), so no
    ``m x n`` matrix is ever reduced or gathered, and (c) places the momentum projection
    (:meth:`shard_projection`): on the rows side ``P`` (``r x m``) is ``Shard(1)``, each rank
    keeping the columns that meet its rows of the gradient, so ``P G`` is a partial ``r x n``
    product; on the cols side it is replicated.
    """

    name = "torch-dtensor"
    in_place = False

    def __init__(self, mesh, row_sharded: bool, layout: TensorLayout):
        super().__init__()
        self.mesh = mesh
        self.row_sharded = row_sharded
        self.layout = layout

    def mean(self, x, axis=None):
        # sum / count, not DTensor's mean: a mean over unevenly sharded rows is not a
        # Partial(avg) of the local means, and DTensor would gather the operand instead
        if axis is None:
            return x.sum() / max(x.numel(), 1)
        return x.sum(dim=axis) / x.shape[axis]

    def sums_of_squares(self, x, scratch=None):
        squares = x * x
        return squares.sum(dim=-1), squares.sum(dim=-2)

    def matmul(self, a, b, out=None):
        # A row-sharded left operand (G, P^T, an (m, r) momentum) keeps the product row-sharded:
        # the right operand (r x n, n x r, r x r or a vector: compressed size) is replicated
        # first. Left to itself, DTensor may instead reshard the left operand and return a
        # Partial m x n product, whose reduction would move a full gradient-sized matrix.
        _, Replicate, Shard = _dtensor_api()
        if is_dtensor(a) and is_dtensor(b):
            row_sharded = isinstance(a.placements[0], Shard) and a.placements[0].dim == 0 and a.ndim == 2
            if row_sharded and not isinstance(b.placements[0], Replicate):
                b = b.redistribute(b.device_mesh, (Replicate(),))
        return a @ b

    def shard_projection(self, projection):
        DTensor, Replicate, Shard = _dtensor_api()
        if is_dtensor(projection):
            return projection
        rank, dim = projection.shape
        if self.row_sharded and self.layout.side == core.SIDE_ROWS:
            (local_m, _), lo = _local_shape_and_offset((dim, rank), self.mesh, (Shard(0),))
            local = projection[:, lo : lo + local_m].contiguous()
            return DTensor.from_local(
                local, self.mesh, (Shard(1),), run_check=False, shape=projection.shape, stride=projection.stride()
            )
        return DTensor.from_local(
            projection, self.mesh, (Replicate(),), run_check=False, shape=projection.shape, stride=projection.stride()
        )


def dtensor_ops(param, layout: TensorLayout) -> DTensorOps:
    """The backend for one step of the ``DTensor`` parameter ``param`` with ``layout``."""
    return DTensorOps(param.device_mesh, _sharded(param), layout)


# ---- 8-bit state of DTensor parameters -------------------------------------------------------


def _dtensor_zeros(param, placements, shape, dtype) -> torch.Tensor:
    DTensor, _, _ = _dtensor_api()
    mesh = param.device_mesh
    local_shape, _ = _local_shape_and_offset(tuple(shape), mesh, placements)
    local = torch.zeros(local_shape, dtype=dtype, device=param.to_local().device)
    return DTensor.from_local(
        local, mesh, placements, run_check=False, shape=torch.Size(shape), stride=_contiguous_stride(shape)
    )


def quantized_zeros(param, layout: TensorLayout, key: str, shape) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Codes and absmax of an all-zero 8-bit state of a ``DTensor`` parameter.

    The blocks are the single-process blocks: 256 consecutive elements of the *global*
    row-major state (``docs/algorithm.md`` section 10), wherever the shard boundaries fall.
    ``codes`` (``uint8``) has the state's shape and placements, so rank ``k`` keeps the codes of
    its own elements; ``absmax`` (``ceil(numel / 256)`` float32, ``numel / 64`` bytes) is
    replicated. A block that straddles a shard boundary is shared: its absmax is the maximum of
    the ranks' partial maxima (one all-reduce of the ``absmax`` vector per step). Codes and
    scales are therefore bit-identical to the single-process ones at every world size, and both
    reshard under DCP (codes like the state, absmax replicated).
    """
    from . import quantization as q

    _, Replicate, _ = _dtensor_api()
    codes = _dtensor_zeros(param, state_placements(param, layout, key), shape, torch.uint8)
    absmax = _dtensor_zeros(param, (Replicate(),), (q.num_blocks(math.prod(shape)),), torch.float32)
    return codes, absmax


def _block_index(codes) -> torch.Tensor:
    """Global block number of each local element of a ``DTensor`` state (row-major, 256 per block)."""
    from .quantization import BLOCK_SIZE

    local = codes.to_local()
    _, row_offset = _local_shape_and_offset(tuple(codes.shape), codes.device_mesh, codes.placements)
    row_length = math.prod(codes.shape[1:]) if codes.ndim > 1 else 1
    start = row_offset * row_length
    return torch.arange(start, start + local.numel(), device=local.device).div_(BLOCK_SIZE, rounding_mode="floor")


def dequantize_state(codes, absmax, signed: bool) -> torch.Tensor:
    """float32 ``DTensor`` of the state from its codes and (replicated) absmax: ``qmap[code] * absmax[block]``,
    the same product as :func:`flora_opt.quantization.dequantize`."""
    from . import quantization as q

    DTensor, _, _ = _dtensor_api()
    local = codes.to_local()
    values = q.qmap(signed, local.device)[local.reshape(-1).int()] * absmax.to_local()[_block_index(codes)]
    return DTensor.from_local(
        values.view(local.shape),
        codes.device_mesh,
        codes.placements,
        run_check=False,
        shape=codes.shape,
        stride=_contiguous_stride(codes.shape),
    )


def quantize_state(value, codes, absmax, signed: bool) -> None:
    """Re-quantize ``value`` (a float32 ``DTensor`` with ``codes``' placements) into ``codes`` and
    ``absmax`` in place, with the single-process blocks (see :func:`quantized_zeros`)."""
    import torch.distributed as dist

    from . import quantization as q

    local_values = value.to_local().reshape(-1)
    blocks = _block_index(codes)
    block_max = torch.zeros(absmax.shape[0], dtype=torch.float32, device=local_values.device)
    block_max.scatter_reduce_(0, blocks, local_values.abs(), "amax")
    _, _, Shard = _dtensor_api()
    if isinstance(codes.placements[0], Shard):
        dist.all_reduce(block_max, op=dist.ReduceOp.MAX, group=codes.device_mesh.get_group())
    scale = block_max.clip_(1e-12)  # torchao's scale_tensor: amax of |x| over the block, clipped
    normalised = local_values / scale[blocks]
    codes.to_local().view(-1).copy_(q.encode(normalised.contiguous(), signed))
    absmax.to_local().copy_(scale)


def local_state_bytes(optimizer) -> int:
    """Bytes of optimizer state held by *this* rank (the local shards of ``DTensor`` states)."""
    total = 0
    for state in optimizer.state.values():
        for value in state.values():
            if isinstance(value, torch.Tensor):
                local = value.to_local() if is_dtensor(value) else value
                total += local.numel() * local.element_size()
    return total


# ---- DDP: all-reduce the compressed accumulation buffers instead of the gradients ----------------


class CompressedAllreduceState:
    """State of :func:`compressed_allreduce_hook`: the accumulator whose buffers are reduced.

    Pickles without its process group and accumulator (like PowerSGD's state, which drops its
    process group), so it can be checkpointed; the accumulator's own state (seed, cycle, buffers)
    is checkpointed by the accumulator, and a restored state needs ``accumulator`` and
    ``process_group`` set again before use. ``calls``
    and ``elements`` count the hook's all-reduces and the elements they carried (for tests and
    benchmarks).
    """

    def __init__(self, accumulator, process_group=None):
        self.accumulator = accumulator
        self.process_group = process_group
        self.calls = 0
        self.elements = 0

    def __getstate__(self):
        state = dict(self.__dict__)
        state.pop("process_group", None)
        state.pop("accumulator", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self.process_group = None
        self.accumulator = None


def compressed_allreduce_hook(state: CompressedAllreduceState, bucket):
    r"""DDP communication hook: all-reduce compressed buffers, not decompressed gradients.

    At the sync micro-batch of a cycle, rank ``i`` holds ``B_i = sum_k Q_c g_{i,k}`` for every
    compressed tensor (all ranks use the same ``Q_c``: same seed, same cycle). Compression is
    linear, so the mean gradient DDP would compute is

    .. math::
       \frac1W \sum_i Q_c^\top B_i = Q_c^\top \Big(\frac1W \sum_i B_i\Big),

    and the hook all-reduces the ``r x max(m, n)`` buffers (divided by ``W`` first, as DDP's
    default hook does) and writes ``decompress(mean B)`` into the bucket. Tensors without a
    pending buffer (uncompressed: vectors, small or embedding-like matrices, and cycles of one
    micro-batch) are reduced exactly as DDP's default ``allreduce_hook`` would. One all-reduce
    per bucket, of ``sum(r max(m, n))`` + uncompressed elements. Every rank decompresses the same
    reduced buffer, so the gradients, and the parameters after the step, are bit-identical
    across ranks.
    """
    import torch.distributed as dist

    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    pending = state.accumulator._pending
    gradients = bucket.gradients()
    pieces = []
    plan = []
    for param, grad in zip(bucket.parameters(), gradients, strict=True):
        entry = pending.pop(id(param), None)
        source = grad if entry is None else entry[0]
        pieces.append(source.reshape(-1).to(grad.dtype if entry is None else torch.float32))
        plan.append((grad, entry, source.numel()))
    if all(entry is None for _, entry, _ in plan):
        flat = bucket.buffer()
    else:
        flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
    flat.div_(world)
    state.calls += 1
    state.elements += flat.numel()
    future = dist.all_reduce(flat, group=group, async_op=True).get_future()
    buffer = bucket.buffer()
    ops = state.accumulator._ops

    def unpack(fut):
        reduced = fut.value()[0]
        if reduced.data_ptr() == buffer.data_ptr():
            return buffer
        offset = 0
        for grad, entry, numel in plan:
            part = reduced[offset : offset + numel]
            offset += numel
            if entry is None:
                grad.copy_(part.view_as(grad))
            else:
                compressed, projection, side = entry
                dense = core.decompress(part.view(compressed.shape), projection, side, ops)
                grad.copy_(dense.view_as(grad))
        return buffer

    return future.then(unpack)


def register_compressed_allreduce(ddp_model, accumulator, process_group=None) -> CompressedAllreduceState:
    """Make ``ddp_model`` (a ``DistributedDataParallel``) all-reduce ``accumulator``'s compressed
    buffers at the end of each accumulation cycle instead of the full gradients.

    Run the non-sync micro-batches under ``ddp_model.no_sync()`` (``accelerate``'s
    ``accumulate`` does), so DDP communicates once per cycle; see
    :func:`compressed_allreduce_hook` for what is sent. Returns the hook's state.
    """
    if accumulator.layerwise:
        raise ValueError(
            "compressed all-reduce under DDP needs layerwise=False: layer-wise updates step each tensor inside "
            "backward, before DDP has reduced its gradient"
        )
    state = CompressedAllreduceState(accumulator, process_group)
    ddp_model.register_comm_hook(state, compressed_allreduce_hook)
    accumulator.communicate_compressed = True
    return state
