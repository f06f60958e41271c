"""The one rule for how many bytes a tensor's Flora state takes (8-bit states included).

Used by the optimizer (:class:`flora_opt.Flora` decides from :func:`is_quantized` which states
it stores as 8-bit codes), by the memory estimator (:mod:`flora_opt.memory`) and, through it, by
the benchmarks' formula check. Plain Python: no framework is imported.

8-bit layout of a state of ``numel`` elements (:mod:`flora_opt.quantization`): ``uint8`` codes
padded to whole blocks of :data:`BLOCK_SIZE`, plus one ``float32`` absmax per block. Only the
momentum (``exp_avg``) and an unfactored second moment (``exp_avg_sq``) are quantized, and only
when they hold at least :data:`MIN_QUANTIZED_NUMEL` elements (for smaller ones the scales would
cost more than they save, as in bitsandbytes and torchao). Every other state is ``float32``.
"""

from __future__ import annotations

import math

from .core import EXP_AVG, EXP_AVG_SQ, TensorLayout

__all__ = [
    "ABSMAX_SUFFIX",
    "BLOCK_SIZE",
    "CODES_SUFFIX",
    "MIN_QUANTIZED_NUMEL",
    "QUANTIZABLE_KEYS",
    "is_quantized",
    "is_quantized_state",
    "num_blocks",
    "quantized_nbytes",
    "state_bytes",
    "state_key_bytes",
]

BLOCK_SIZE = 256
MIN_QUANTIZED_NUMEL = 4096
#: State keys that ``quantization=True`` stores in 8 bits, with whether their code is signed.
QUANTIZABLE_KEYS = {EXP_AVG: True, EXP_AVG_SQ: False}
#: An 8-bit state ``key`` is kept as ``key + CODES_SUFFIX`` (uint8) and ``key + ABSMAX_SUFFIX`` (float32).
CODES_SUFFIX = "_codes"
ABSMAX_SUFFIX = "_absmax"


def is_quantized(key: str, numel: int, quantization: bool) -> bool:
    """Whether the state ``key`` of ``numel`` elements is stored in 8 bits."""
    return bool(quantization) and key in QUANTIZABLE_KEYS and numel >= MIN_QUANTIZED_NUMEL


def is_quantized_state(layout: TensorLayout, key: str, quantization: bool) -> bool:
    """Whether state ``key`` of a tensor with ``layout`` is stored in 8 bits (:func:`is_quantized`)."""
    return is_quantized(key, math.prod(layout.state_shapes()[key]), quantization)


def num_blocks(numel: int) -> int:
    """Blocks of :data:`BLOCK_SIZE` elements (the last one zero padded)."""
    return math.ceil(numel / BLOCK_SIZE)


def quantized_nbytes(numel: int) -> int:
    """Bytes of an 8-bit state: one byte per (padded) element plus 4 per block."""
    blocks = num_blocks(numel)
    return blocks * BLOCK_SIZE + 4 * blocks


def state_key_bytes(key: str, shape, quantization: bool = False) -> int:
    """Bytes of one state tensor ``key`` of ``shape``."""
    numel = math.prod(shape)
    if is_quantized(key, numel, quantization):
        return quantized_nbytes(numel)
    return 4 * numel


def state_bytes(layout: TensorLayout, quantization: bool = False) -> int:
    """Bytes of all array state of one tensor with ``layout`` (the integer counters ``step``,
    ``seed`` and ``skipped_steps`` are Python ints in the torch state and not counted)."""
    return sum(state_key_bytes(key, shape, quantization) for key, shape in layout.state_shapes().items())
