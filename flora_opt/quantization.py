"""8-bit blockwise quantization of optimizer state (PyTorch), backed by torchao.

Why torchao: its ``torchao.optim.quant_utils`` implements the dynamic-tree 8-bit code of
Dettmers et al. (8-bit Optimizers via Block-wise Quantization, 2022) with plain PyTorch ops, so
it runs unchanged on CPU and CUDA; bitsandbytes' blockwise kernels are CUDA-first and ship
large native binaries. We only use its functions: the state we keep is plain ``uint8`` codes
plus one ``float32`` absmax per block, so checkpoints load with ``torch.load(weights_only=True)``
without torchao's tensor subclass being importable.

Layout of a quantized state of ``numel`` elements:
  ``codes``  uint8,  ``ceil(numel / 256) * 256`` elements (zero padded),
  ``absmax`` float32, ``ceil(numel / 256)`` elements.
Which states are quantized and how many bytes they take is decided in one place,
:mod:`flora_opt.statebytes` (tensors with fewer than ``MIN_QUANTIZED_NUMEL`` elements stay
float32, as in bitsandbytes and torchao: for them the scales would cost more than they save).
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator

import torch

from .statebytes import BLOCK_SIZE, num_blocks

# quantize/dequantize work on this many blocks at a time (2**20 elements): bounded temporaries
CHUNK_BLOCKS = 4096

_QMAPS: dict[tuple[bool, torch.device], torch.Tensor] = {}
_MIDPOINTS: dict[tuple[bool, torch.device], torch.Tensor] = {}
_TABLES: dict[tuple[bool, torch.device], tuple[torch.Tensor, torch.Tensor]] = {}


@contextlib.contextmanager
def quiet_torchao_import() -> Iterator[None]:
    """A context for importing torchao, directly or through another library (transformers imports
    it to build models): while it lasts, torchao's warnings about optional compiled kernels it
    cannot load (its mxfp8 and CUTLASS extensions need a CUDA build) and torch's deprecation
    warning for the enums torchao registers are not logged. Flora uses torchao's pure-PyTorch
    functions only. Errors are still logged and exceptions propagate."""
    quiet = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)


def _quant_utils():
    try:
        with quiet_torchao_import():
            from torchao.optim import quant_utils
    except ImportError as error:
        if (error.name or "").split(".")[0] != "torchao":
            raise  # torchao is there but failed: its own message says why
        raise ImportError(
            f"Flora(quantization=True) needs torchao ({error}); install it with: pip install 'flora-optim[torch]'"
        ) from error
    return quant_utils


def _cached(cache: dict, key, build):
    """``cache[key]``, built on first use. Tensors made under a tensor mode (e.g. the fake
    tensors of ``benchmarks/memory_accumulation.py``) are not plain ``torch.Tensor``s and are
    not kept, so a later real call never receives one."""
    if key in cache:
        return cache[key]
    value = build()
    if all(type(t) is torch.Tensor for t in (value if isinstance(value, tuple) else (value,))):
        cache[key] = value
    return value


def qmap(signed: bool, device: torch.device) -> torch.Tensor:
    def build():
        values = _quant_utils().create_dynamic_map(signed=signed)
        return torch.tensor(values, dtype=torch.float32, device=device)

    return _cached(_QMAPS, (signed, torch.device(device)), build)


def midpoints(signed: bool, device: torch.device) -> torch.Tensor:
    def build():
        values = qmap(signed, device)
        return (values[:-1] + values[1:]) / 2

    return _cached(_MIDPOINTS, (signed, torch.device(device)), build)


def _prefix_table(signed: bool, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Lookup table for :func:`encode`: for each value of a float32's top 16 bits (sign,
    exponent, 7 mantissa bits), the number of code-map midpoints below that bucket; plus the
    midpoints padded with +inf.

    Every bucket spans less than 0.8% of its values, while neighbouring entries of the dynamic
    map are at least 1.4% apart, so a bucket holds at most one midpoint (asserted here) and one
    comparison finishes the search.
    """

    def build():
        mids = midpoints(signed, device)
        prefixes = torch.arange(-32768, 32768, dtype=torch.int32, device=device)
        lo = (prefixes << 16).view(torch.float32)
        hi = ((prefixes << 16) | 0xFFFF).view(torch.float32)
        low, high = torch.minimum(lo, hi), torch.maximum(lo, hi)  # negative floats sort backwards
        base = torch.bucketize(low, mids, right=True)
        top = torch.bucketize(high, mids, right=True)
        finite = torch.isfinite(low) & torch.isfinite(high)
        # checked on real tensors only (fake and meta tensors have no values to check)
        real = type(top) is torch.Tensor and top.device.type != "meta"
        if real and int(torch.where(finite, top - base, 0).max()) > 1:  # pragma: no cover - property of the map
            raise AssertionError("dynamic code map too dense for the 16-bit prefix table")
        padded = torch.cat([mids, torch.full((1,), float("inf"), device=device)])
        return base.to(torch.int32), padded

    return _cached(_TABLES, (signed, torch.device(device)), build)


def encode(normalised: torch.Tensor, signed: bool) -> torch.Tensor:
    """Index of the nearest code-map entry (ties upward) of each finite value in [-1, 1]:
    ``torch.bucketize(x, midpoints, right=True)``, computed with a 16-bit prefix table and one
    comparison instead of a binary search (equal codes, tested)."""
    table, padded = _prefix_table(signed, normalised.device)
    prefix = torch.bitwise_right_shift(normalised.view(torch.int32), 16).add_(32768)
    base = torch.index_select(table, 0, prefix)
    above = normalised >= torch.index_select(padded, 0, base)
    return base.add_(above).to(torch.uint8)


def quantize(
    values: torch.Tensor, signed: bool, *, out: tuple[torch.Tensor, torch.Tensor] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 tensor -> (uint8 codes, float32 absmax per block of 256).

    Codes are the nearest entry of torchao's dynamic map (ties round up), found by
    :func:`encode`: the same codes as ``torchao.optim.quant_utils.quantize_8bit_with_qmap``
    (tested), with one table lookup and one comparison in place of its eight gather passes.

    Work proceeds in chunks of ``CHUNK_BLOCKS`` blocks, so the temporaries (scaled values,
    integer prefixes, lookups; about 14 bytes per element) are bounded by a few MiB instead of
    being a multiple of the state's size. ``out``: existing ``(codes, absmax)`` of the right
    size to write into (the optimizer reuses its state's buffers).
    """
    qu = _quant_utils()
    flat = values.reshape(-1)
    numel = flat.numel()
    blocks = num_blocks(numel)
    if out is None:
        codes = torch.empty(blocks * BLOCK_SIZE, dtype=torch.uint8, device=values.device)
        absmax = torch.empty(blocks, dtype=torch.float32, device=values.device)
    else:
        codes, absmax = out
        if codes.numel() != blocks * BLOCK_SIZE or absmax.numel() != blocks:
            raise ValueError(
                f"quantize: out buffers of {codes.numel()} codes and {absmax.numel()} scales do not fit "
                f"{numel} values ({blocks} blocks of {BLOCK_SIZE})"
            )
    for first in range(0, blocks, CHUNK_BLOCKS):
        last = min(blocks, first + CHUNK_BLOCKS)
        chunk = flat[first * BLOCK_SIZE : min(last * BLOCK_SIZE, numel)].to(torch.float32)
        padding = (last - first) * BLOCK_SIZE - chunk.numel()
        if padding:
            chunk = torch.nn.functional.pad(chunk, (0, padding))
        normalised, scale = qu.scale_tensor(chunk, BLOCK_SIZE)
        codes[first * BLOCK_SIZE : last * BLOCK_SIZE] = encode(normalised.contiguous(), signed)
        absmax[first:last] = scale
    return codes, absmax


def dequantize(codes: torch.Tensor, absmax: torch.Tensor, shape, signed: bool) -> torch.Tensor:
    """Inverse of :func:`quantize` (up to the quantization error), as float32 of ``shape``
    (torchao's ``dequant_with_qmap``, chunk by chunk so that its int32 index temporaries stay
    small)."""
    qu = _quant_utils()
    numel = math.prod(shape)
    code_map = qmap(signed, codes.device)
    result = torch.empty(numel, dtype=torch.float32, device=codes.device)
    blocks = absmax.numel()
    for first in range(0, blocks, CHUNK_BLOCKS):
        last = min(blocks, first + CHUNK_BLOCKS)
        values = qu.dequant_with_qmap(codes[first * BLOCK_SIZE : last * BLOCK_SIZE], code_map, absmax[first:last])
        stop = min(last * BLOCK_SIZE, numel)
        result[first * BLOCK_SIZE : stop] = values[: stop - first * BLOCK_SIZE]
    return result.reshape(shape)


def zeros(shape, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and absmax of an all-zero state (code of 0.0 in the map, absmax 0)."""
    numel = math.prod(shape)
    blocks = num_blocks(numel)
    codes = torch.zeros(blocks * BLOCK_SIZE, dtype=torch.uint8, device=device)
    absmax = torch.zeros(blocks, dtype=torch.float32, device=device)
    return codes, absmax
