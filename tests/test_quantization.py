"""8-bit states (``quantization=True``): the block-wise dynamic-tree code of ``flora_opt.quantization``
equals torchao's, chunked or not, with bounded temporaries; training with 8-bit states tracks float32."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("torchao")

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402
from torchao.optim import quant_utils  # noqa: E402

import flora_opt  # noqa: E402
from flora_lab.livebytes import LiveTensorBytes  # noqa: E402
from flora_opt import quantization as q  # noqa: E402


def test_quantized_training_tracks_fp32():
    torch.manual_seed(0)
    init = torch.randn(96, 128) * 0.1
    target = torch.randn(96, 128) * 0.1
    results = {}
    for quantization in (False, True):
        p = torch.nn.Parameter(init.clone())
        opt = flora_opt.Flora(
            [p],
            lr=2e-2,
            rank=32,
            kappa=5,
            quantization=quantization,
            factorize_second_moment=False,
            scale_parameter=False,
        )
        for _ in range(60):
            loss = ((p - target) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
        results[quantization] = (p.detach().clone(), loss.item(), opt)
    q_opt = results[True][2]
    assert q_opt.state[p]["exp_avg_codes"].dtype == torch.uint8
    assert q_opt.state[p]["exp_avg_sq_codes"].dtype == torch.uint8
    assert results[True][1] < 0.5 * ((init - target) ** 2).sum().item()
    rel = (results[True][0] - results[False][0]).norm() / (results[False][0] - init).norm()
    assert rel < 0.1, rel


@pytest.mark.parametrize("signed", [True, False])
def test_quantizer_matches_torchao_codes(signed):
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3000, generator=gen) * torch.logspace(-8, 0, 3000)
    if not signed:
        x = x.abs()
    codes, absmax = q.quantize(x, signed)
    assert codes.shape == (3072,) and absmax.shape == (12,) and codes.dtype == torch.uint8
    padded = torch.nn.functional.pad(x, (0, 72))
    normalised, _scale = quant_utils.scale_tensor(padded, 256)
    expected = quant_utils.quantize_8bit_with_qmap(normalised, q.qmap(signed, x.device))
    assert torch.equal(codes, expected)
    # the prefix-table encoder equals a plain nearest-midpoint search, also exactly at and
    # next to every midpoint (where rounding direction matters)
    mids = q.midpoints(signed, x.device)
    probes = torch.cat(
        [
            mids,
            torch.nextafter(mids, torch.tensor(2.0)),
            torch.nextafter(mids, torch.tensor(-2.0)),
            torch.tensor([0.0, -0.0, 1.0, 1e-30, -1e-30]),
            torch.rand(20000, generator=gen) * (2 if signed else 1) - (1 if signed else 0),
        ]
    )
    probes = probes.clamp(-1.0 if signed else 0.0, 1.0)
    assert torch.equal(q.encode(probes, signed), torch.bucketize(probes, mids, right=True).to(torch.uint8))
    restored = q.dequantize(codes, absmax, (3000,), signed)
    # dynamic-tree code: relative error small for entries near their block's absmax
    big = x.abs() > 0.1 * absmax.repeat_interleave(256)[:3000]
    assert ((restored - x).abs()[big] / x.abs()[big]).max() < 0.1


@pytest.mark.parametrize("numel", [256 * 7, 256 * 7 - 5, 256 * 9 + 1])
def test_quantizer_chunks_equal_one_pass(numel, monkeypatch):
    """Chunked quantize/dequantize (tiny chunks here) give torchao's one-pass codes exactly."""
    monkeypatch.setattr(q, "CHUNK_BLOCKS", 3)
    x = torch.randn(numel, generator=torch.Generator().manual_seed(1)) * torch.logspace(-6, 0, numel)
    codes, absmax = q.quantize(x, True)
    blocks = q.num_blocks(numel)
    padded = torch.nn.functional.pad(x, (0, blocks * 256 - numel))
    normalised, scale = quant_utils.scale_tensor(padded, 256)
    assert torch.equal(codes, quant_utils.quantize_8bit_with_qmap(normalised, q.qmap(True, x.device)))
    assert torch.equal(absmax, scale)
    whole = quant_utils.dequant_with_qmap(codes, q.qmap(True, x.device), absmax)[:numel]
    assert torch.equal(q.dequantize(codes, absmax, (numel,), True), whole)
    # writing into existing buffers gives the same; buffers of the wrong size are refused
    out = (torch.full_like(codes, 7), torch.zeros_like(absmax))
    assert q.quantize(x, True, out=out)[0] is out[0]
    assert torch.equal(out[0], codes) and torch.equal(out[1], absmax)
    with pytest.raises(ValueError, match="do not fit"):
        q.quantize(x, True, out=(codes[:-256], absmax))


def test_quantizer_temporaries_are_bounded():
    """Quantizing a 32 MiB state allocates its codes and scales plus chunk-sized temporaries,
    not several state-sized copies."""
    numel = 1 << 23
    x = torch.randn(numel)
    q.quantize(x[:4096], True)  # builds the code map and prefix table outside the measurement
    chunk = q.CHUNK_BLOCKS * q.BLOCK_SIZE
    # (the tracker also counts storages that existed before, e.g. x's, once a view of them is
    # an op's output; so the temporaries are the peak above what is live at the end)
    with LiveTensorBytes() as mem:
        codes, absmax = q.quantize(x, True)
    assert mem.peak - mem.live <= 20 * chunk < 4 * numel, (mem.peak, mem.live)
    with LiveTensorBytes() as mem:
        restored = q.dequantize(codes, absmax, (numel,), True)
    assert mem.peak - mem.live <= 16 * chunk < 4 * numel, (mem.peak, mem.live)
    assert (restored - x).abs().max() <= x.abs().max() * 0.05


def test_quantizer_under_fake_tensors_leaves_real_calls_intact():
    """benchmarks/memory_accumulation.py quantizes fake tensors; the code-map caches must not keep
    fake tensors for later real calls."""
    for cache in (q._QMAPS, q._MIDPOINTS, q._TABLES):
        cache.clear()
    with FakeTensorMode(), LiveTensorBytes(fake_scalars=True):  # as the benchmark nests them
        codes, absmax = q.quantize(torch.randn(5000), True)
        assert codes.shape == (5120,) and absmax.shape == (20,)
    x = torch.randn(5000, generator=torch.Generator().manual_seed(2))
    codes, absmax = q.quantize(x, True)
    assert type(codes) is torch.Tensor
    assert (q.dequantize(codes, absmax, (5000,), True) - x).abs().max() < 0.05 * x.abs().max()
