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
import weakref
from typing import Any

import torch

from . import core
from .core import EXP_AVG, EXP_AVG_SQ, EXP_AVG_SQ_COL, EXP_AVG_SQ_ROW, TensorLayout
from .ops import TorchOps

__all__ = [
    "CompressedAllreduceState",
    "DTensorOps",
    "LayerwiseAllreduceState",
    "check_supported",
    "compressed_allreduce_hook",
    "dequantize_state",
    "dtensor_ops",
    "is_dtensor",
    "layerwise_allreduce_hook",
    "local_state_bytes",
    "place_state",
    "quantize_state",
    "quantized_zeros",
    "register_compressed_allreduce",
    "register_layerwise_allreduce",
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

    At the sync micro-batch of a cycle, rank ``i`` holds, for every compressed tensor, its
    cycle's compressed state (docs/algorithm.md section 12), and the hook sends only that:

    * ``gaussian``: ``B_i = sum_k Q_c g_{i,k}`` with the same ``Q_c`` on every rank; compression
      is linear, so :math:`\frac1W \sum_i Q_c^\top B_i = Q_c^\top (\frac1W \sum_i B_i)` and one
      all-reduce of the ``r x max(m, n)`` buffers gives the mean gradient's estimate.
    * ``subspace``: ``S_i = Q_i B_i`` with a basis ``Q_i`` of the rank's own. Two all-reduces
      agree on a common basis and then average in it: the ``min(m, n) x r`` range sketches
      ``S_i Omega_c`` (``Omega_c`` a Gaussian regenerated alike on every rank, stream 2) are
      averaged into the sketch of the mean estimate, ``Q = orth(mean_i S_i Omega_c)`` (a
      randomized range finder), and the buffers re-projected on it, ``Q^T Q_i B_i``
      (``r x max(m, n)``), are averaged. The gradient is ``Q mean_i(Q^T Q_i B_i)``, the
      projection of the mean estimate on ``Q``, and ``Q`` is every rank's basis for the next cycle.

    Values are divided by ``W`` before the sum, as DDP's default hook does. Tensors without a
    pending buffer (uncompressed: vectors, small or embedding-like matrices, and cycles of one
    micro-batch) are reduced exactly as DDP's default ``allreduce_hook`` would, in the last
    all-reduce. Every rank computes from the same reduced values, so the gradients, and the
    parameters after the step, are bit-identical across ranks.
    """
    return _reduce_bucket(state, bucket)


def _reduce_bucket(state: CompressedAllreduceState, bucket):
    """The body of :func:`compressed_allreduce_hook`: a future of ``bucket.buffer()`` holding the
    mean gradients (expanded from the mean compressed state where there is one)."""
    import torch.distributed as dist

    group = state.process_group if state.process_group is not None else dist.group.WORLD
    world = dist.get_world_size(group)
    accumulator = state.accumulator
    ops = accumulator._ops
    plan = []  # (grad, None) for an uncompressed tensor, else (grad, [slot, buffer, projection])
    for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
        entry = accumulator._pending.pop(id(param), None)
        plan.append((grad, None if entry is None else list(entry)))
    buffer = bucket.buffer()
    if all(entry is None for _, entry in plan):
        return _allreduce(state, buffer, group, world).then(lambda fut: buffer)

    subspace = [entry for _, entry in plan if entry is not None and entry[2] is None]
    if subspace:  # first all-reduce: the range sketches, for a common basis
        sketches = []
        for slot, compressed, _ in subspace:
            layout = slot.layout
            test = core.consensus_test_matrix(
                slot.seed, accumulator.cycle, layout.rank, max(layout.matrix), ops, compressed.device
            )
            sketches.append(core.range_sketch(slot.basis, compressed, test, layout.side, ops))
        reduced = _allreduce(state, torch.cat([s.reshape(-1) for s in sketches]), group, world).wait()[0]
        offset = 0
        for entry, sketch in zip(subspace, sketches, strict=True):
            slot, compressed, _ = entry
            basis = ops.orthonormal(reduced[offset : offset + sketch.numel()].view(sketch.shape))
            offset += sketch.numel()
            entry[1] = core.reproject(basis, slot.basis, compressed, slot.layout.side, ops)
            slot.basis = basis

    pieces = [grad.reshape(-1) if entry is None else entry[1].reshape(-1).to(grad.dtype) for grad, entry in plan]
    flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()

    def unpack(fut):
        reduced = fut.value()[0]
        offset = 0
        for grad, entry in plan:
            numel = grad.numel() if entry is None else entry[1].numel()
            part = reduced[offset : offset + numel]
            offset += numel
            if entry is None:
                grad.copy_(part.view_as(grad))
                continue
            slot, compressed, projection = entry
            part = part.view(compressed.shape).to(torch.float32)
            if projection is None:
                dense = core.expand_subspace(slot.basis, part, slot.layout.side, ops)
            else:
                dense = core.decompress(part, projection, slot.layout.side, ops)
            grad.copy_(dense.view_as(grad))
        return buffer

    return _allreduce(state, flat, group, world).then(unpack)


def _allreduce(state: CompressedAllreduceState, flat: torch.Tensor, group, world: int):
    """Mean over ``group`` of ``flat`` (in place), counted in ``state``; a future."""
    import torch.distributed as dist

    flat.div_(world)
    state.calls += 1
    state.elements += flat.numel()
    return dist.all_reduce(flat, group=group, async_op=True).get_future()


def register_compressed_allreduce(ddp_model, accumulator, process_group=None) -> CompressedAllreduceState:
    """Make ``ddp_model`` (a ``DistributedDataParallel``) all-reduce ``accumulator``'s compressed
    buffers at the end of each accumulation cycle instead of the full gradients.

    Run the non-sync micro-batches under ``ddp_model.no_sync()`` (``accelerate``'s
    ``accumulate`` does), so DDP communicates once per cycle; see
    :func:`compressed_allreduce_hook` for what is sent. Returns the hook's state.
    """
    if accumulator.layerwise:
        raise ValueError(
            "register_compressed_allreduce is for layerwise=False; a layer-wise accumulator is attached with "
            "register_layerwise_allreduce(ddp_model, accumulator), whose hook also all-reduces the compressed "
            "buffers and then steps each bucket's tensors"
        )
    state = CompressedAllreduceState(accumulator, process_group)
    ddp_model.register_comm_hook(state, compressed_allreduce_hook)
    accumulator.communicate_compressed = True
    return state


# ---- DDP: layer-wise updates in the communication hook ---------------------------------------


class LayerwiseAllreduceState(CompressedAllreduceState):
    """State of :func:`layerwise_allreduce_hook`.

    Besides what :class:`CompressedAllreduceState` holds (the accumulator, the process group,
    the counters): the DDP model (a weak reference), each parameter's bucket buffer, whose
    storage is freed after the bucket's step and allocated again before DDP next writes into
    it, the parameter whose local gradient DDP copied into its bucket last, and the reduced
    buckets waiting for their step. Pickles without them (and without the process group and
    accumulator).
    """

    def __init__(self, accumulator, ddp_model, process_group=None):
        from torch.utils.weak import WeakIdKeyDictionary

        super().__init__(accumulator, process_group)
        self.ddp_model = weakref.ref(ddp_model)
        # parameter -> (its bucket's flat buffer, whether DDP had rebuilt its buckets when it was seen):
        # DDP replaces its buckets once (at the first forward after the first synchronised backward)
        self.buckets = WeakIdKeyDictionary()
        self.local_gradient = None
        self.reduced: list[tuple[torch.Tensor, list, list]] = []  # (bucket buffer, params, gradient views)
        self.step_queued = False

    def __getstate__(self):
        state = super().__getstate__()
        for key in ("ddp_model", "buckets", "local_gradient", "reduced", "step_queued"):
            state.pop(key, None)
        return state

    def __setstate__(self, state):
        from torch.utils.weak import WeakIdKeyDictionary

        super().__setstate__(state)
        self.ddp_model = lambda: None
        self.buckets = WeakIdKeyDictionary()
        self.local_gradient = None
        self.reduced = []
        self.step_queued = False

    def gradient_arrived(self, param, sync: bool) -> None:
        """Called by the accumulator's hook on ``param`` right after autograd accumulated its
        gradient and before DDP's reducer (a hook of its own that runs next) copies it into
        ``param``'s bucket. The buckets reduced since the last call are stepped and freed first;
        then ``param``'s bucket gets its storage back. On the sync micro-batch the previous
        parameter's local gradient, which the reducer has copied by now, is dropped."""
        self.step_reduced()
        ddp = self.ddp_model()
        if ddp is None or not ddp.require_backward_grad_sync:
            return  # under no_sync the reducer leaves its buckets alone
        previous = self.local_gradient
        if sync and previous is not None and previous is not param:
            previous.grad = None
        self.local_gradient = param if sync else None
        entry = self.buckets.get(param)
        if entry is None:
            return
        buffer, rebuilt = entry
        if rebuilt != ddp._has_rebuilt_buckets:
            del self.buckets[param]  # a bucket DDP has since replaced (and allocated anew)
            return
        storage = buffer.untyped_storage()
        if storage.nbytes() == 0:
            storage.resize_(buffer.nbytes)

    def reduced_bucket(self, bucket_buffer, params, gradients) -> None:
        """Keep a reduced bucket for its step: at the next gradient's arrival, or when backward
        ends. Not inside the comm hook: DDP runs it from autograd's hook after the bucket's last
        gradient was accumulated, while autograd still holds that gradient (twice, with DDP's own
        hook on the accumulation), so a step there would add its temporaries to both."""
        self.reduced.append((bucket_buffer, params, gradients))
        if not self.step_queued:
            self.step_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self.step_reduced)

    @torch.no_grad()
    def step_reduced(self) -> None:
        """Step the reduced buckets' tensors (the accumulator's optimizer, its clipping share) and free
        the buckets; tensors the optimizer does not hold get their reduced gradient in ``.grad``."""
        self.step_queued = False
        reduced, self.reduced = self.reduced, []
        accumulator = self.accumulator
        for bucket_buffer, params, gradients in reduced:
            for param, grad in zip(params, gradients, strict=True):
                slot = None if accumulator is None else accumulator._slot_of.get(id(param))
                if slot is None:
                    _write_gradient(param, grad)
                    continue
                param.grad = grad
                accumulator._apply(slot)
            self.free(bucket_buffer, params)

    def free(self, bucket_buffer, params) -> None:
        """Free a stepped bucket's storage, to be allocated again by :meth:`gradient_arrived`."""
        ddp = self.ddp_model()
        rebuilt = bool(ddp is not None and ddp._has_rebuilt_buckets)
        for param in params:
            self.buckets[param] = (bucket_buffer, rebuilt)
            if param is self.local_gradient:
                self.local_gradient = None
        bucket_buffer.untyped_storage().resize_(0)

    def allocated_bucket_bytes(self) -> int:
        """Bytes of the bucket storages allocated now, among those this hook has seen."""
        storages = {id(buffer.untyped_storage()): buffer for buffer, _ in self.buckets.values()}
        return sum(buffer.untyped_storage().nbytes() for buffer in storages.values())

    def detach(self) -> None:
        """Stop stepping (the accumulator was removed): every freed bucket is allocated again and
        the hook reduces gradients into ``.grad`` as DDP's own would."""
        self.step_reduced()
        for buffer, _ in list(self.buckets.values()):
            storage = buffer.untyped_storage()
            if storage.nbytes() == 0:
                storage.resize_(buffer.nbytes)
        self.buckets.clear()
        self.local_gradient = None
        self.accumulator = None


def _completed(value):
    future = torch.futures.Future()
    future.set_result(value)
    return future


def layerwise_allreduce_hook(state: LayerwiseAllreduceState, bucket):
    r"""DDP communication hook of layer-wise updates: reduce the bucket, step its tensors, free it.

    On the micro-batch that closes an accumulation cycle the bucket is reduced as
    :func:`compressed_allreduce_hook` would reduce it (the compressed buffers where the
    accumulator compresses and communicates compressed, else the gradients; means over the
    ranks) and the hook waits for that reduction. Then, at the next gradient's arrival or when
    backward ends (:meth:`LayerwiseAllreduceState.reduced_bucket` says why not here), each of the
    bucket's tensors gets its reduced gradient (a view of the bucket) and is updated by the
    accumulator's optimizer (clipping share, :meth:`flora_opt.Flora.step_param`), after which
    its ``.grad`` is ``None``, and the bucket's storage is freed. Every rank applies the same
    reduced gradients, so parameters stay bit-identical across ranks. Tensors of the DDP model
    that the optimizer does not hold get their reduced gradient in ``.grad``, as with DDP's own
    hook.

    On other micro-batches (run outside ``no_sync``) nothing is reduced and the local gradients
    keep accumulating in ``.grad``. DDP's reducer is switched to its optimizer-in-backward mode
    (:func:`register_layerwise_allreduce`), so it writes nothing into ``.grad`` when backward
    ends; the future returned holds a ``meta`` tensor of the bucket's size, which DDP only views.
    """
    import torch.distributed as dist

    buffer = bucket.buffer()
    params = bucket.parameters()
    meta = torch.empty(buffer.shape, dtype=buffer.dtype, device="meta")
    accumulator = state.accumulator
    if accumulator is None:  # detached: DDP's all-reduce, the mean written into .grad
        group = state.process_group if state.process_group is not None else dist.group.WORLD
        _allreduce(state, buffer, group, dist.get_world_size(group)).wait()
        for param, grad in zip(params, bucket.gradients(), strict=True):
            _write_gradient(param, grad)
        return _completed(meta)
    if accumulator._current_sync():
        _reduce_bucket(state, bucket).wait()
        state.reduced_bucket(buffer, params, bucket.gradients())
    else:
        state.free(buffer, params)
    return _completed(meta)


def _write_gradient(param, grad) -> None:
    """``.grad <- grad`` (a view of a bucket that will be freed: copied out)."""
    if param.grad is None:
        param.grad = grad.clone()
    else:
        param.grad.copy_(grad)


def register_layerwise_allreduce(
    ddp_model, accumulator, process_group=None, *, compressed_communication: bool = True
) -> LayerwiseAllreduceState:
    """Make ``ddp_model`` (a ``DistributedDataParallel``) step ``accumulator``'s tensors layer by
    layer: each bucket's tensors are updated as soon as the bucket's all-reduce has completed,
    inside backward, and the bucket's gradient memory is freed (:func:`layerwise_allreduce_hook`).

    ``accumulator`` is a layer-wise :class:`~flora_opt.accumulation.CompressedAccumulator`
    (``enable_layerwise_updates(optimizer)``), built on the optimizer of ``ddp_model``'s
    parameters; call this before the first backward. With a compressing accumulator (``rank``)
    and ``compressed_communication`` (default), the sync micro-batch all-reduces the compressed
    buffers, as :func:`register_compressed_allreduce` does. Run the other micro-batches of a
    cycle under ``ddp_model.no_sync()``.

    Memory: DDP allocates one flat buffer per bucket, together as large as the gradients, and
    keeps them for the whole run. Here a bucket's storage is freed after its tensors are stepped
    and allocated again when DDP next copies a gradient into it, and the local gradient of a
    tensor is dropped once DDP has copied it, so on the sync micro-batch a rank holds the
    buckets being filled or reduced and one local gradient, never the whole model's. DDP
    replaces its buckets once, at the forward after the first synchronised backward, and
    allocates all of them then; from the next backward on they are allocated one at a time.

    Raises ``ValueError`` for what DDP then cannot do: ``gradient_as_bucket_view=True`` (every
    ``.grad`` would be a view of bucket memory that DDP keeps until backward ends),
    ``find_unused_parameters=True`` (DDP writes zeros for unused tensors into their buckets
    before any of their hooks runs), ``static_graph=True`` (DDP copies every gradient at the end
    of its first backward), DDP's ``mixed_precision``, a non-layer-wise accumulator, parameters
    outside ``ddp_model``, and a second registration. Returns the hook's state.
    """
    from torch.nn.parallel import DistributedDataParallel

    if not isinstance(ddp_model, DistributedDataParallel):
        raise TypeError(
            f"Invalid ddp_model: {type(ddp_model).__name__}: expected a torch.nn.parallel.DistributedDataParallel"
        )
    if not accumulator.layerwise:
        raise ValueError(
            "register_layerwise_allreduce needs a layer-wise accumulator (enable_layerwise_updates or "
            "CompressedAccumulator(layerwise=True)); for compressed accumulation alone use "
            "register_compressed_allreduce"
        )
    if accumulator.ddp_hook_state is not None:
        raise ValueError("this accumulator is already attached to a DDP model")
    why = {
        "gradient_as_bucket_view=True": (
            ddp_model.gradient_as_bucket_view,
            "every .grad would be a view of DDP's bucket memory, which DDP keeps until backward ends, so no bucket "
            "could be freed after its step",
        ),
        "find_unused_parameters=True": (
            ddp_model.find_unused_parameters,
            "DDP writes zeros for the unused tensors into their buckets at the first gradient of backward, before "
            "the hooks that allocate those buckets run",
        ),
        "static_graph=True": (
            ddp_model.static_graph,
            "DDP copies every gradient into its buckets at the end of its first backward, after the local gradients "
            "were dropped",
        ),
        "mixed_precision": (
            getattr(ddp_model, "mixed_precision", None) is not None,
            "DDP's mixed precision reduces copies of the gradients that these hooks do not see",
        ),
    }
    for option, (used, reason) in why.items():
        if used:
            raise ValueError(f"layer-wise updates under DDP do not support {option}: {reason}")
    held = {id(p) for p in ddp_model.parameters()}
    outside = [slot for slot in accumulator._slots if id(slot.param) not in held]
    if outside:
        raise ValueError(
            f"parameter {outside[0].index} (shape {tuple(outside[0].param.shape)}) of the optimizer is not a "
            "parameter of ddp_model, so DDP would never reduce it; build the optimizer on ddp_model.parameters()"
        )
    state = LayerwiseAllreduceState(accumulator, ddp_model, process_group)
    ddp_model.register_comm_hook(state, layerwise_allreduce_hook)
    ddp_model.reducer._set_optimizer_in_backward()
    accumulator.communicate_compressed = bool(compressed_communication and accumulator.rank is not None)
    accumulator.ddp_hook_state = state
    return state
