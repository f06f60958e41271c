"""The one state-bytes rule (flora_opt.statebytes): both sides of each threshold."""

import math

import pytest

from flora_opt import core, statebytes


@pytest.mark.parametrize(
    "key, numel, quantization, quantized",
    [
        (core.EXP_AVG, 4096, True, True),
        (core.EXP_AVG, 4095, True, False),  # below MIN_QUANTIZED_NUMEL: float32
        (core.EXP_AVG, 4096, False, False),
        (core.EXP_AVG_SQ, 4097, True, True),
        (core.EXP_AVG_SQ_ROW, 10_000, True, False),  # factored statistics are never quantized
        (core.EXP_AVG_SQ_COL, 10_000, True, False),
    ],
)
def test_is_quantized(key, numel, quantization, quantized):
    assert statebytes.is_quantized(key, numel, quantization) is quantized
    expected = math.ceil(numel / 256) * (256 + 4) if quantized else 4 * numel
    assert statebytes.state_key_bytes(key, (numel,), quantization) == expected


@pytest.mark.parametrize("quantization", [False, True])
def test_layout_bytes(quantization):
    # 768 x 3072 at rank 64: compressed momentum 64 x 3072, factored second moment 768 + 3072
    layout = core.tensor_layout((768, 3072), core.FloraHyperParams(rank=64))
    momentum = 64 * 3072
    momentum_bytes = math.ceil(momentum / 256) * 260 if quantization else 4 * momentum
    assert statebytes.state_bytes(layout, quantization) == momentum_bytes + 4 * (768 + 3072)
    # a small vector: below the 8-bit threshold, full momentum and unfactored second moment
    small = core.tensor_layout((100,), core.FloraHyperParams(rank=64))
    assert statebytes.state_bytes(small, quantization) == 4 * 200
