"""The grouped, sync-free step (flora_opt/engine.py) against the per-tensor reference path.

Tolerance: the grouped step calls the same core (``core.flora_update`` on a stack) but its
batched reductions (row/column sums of squares in blocks, ``RMS`` over a stack or its blocks, ``bmm``) sum
in another order, so results differ by float32 rounding: measured <= 3e-7 relative on states and
<= 1e-7 on parameters over 9 steps; the tests allow 1e-5 relative. Projections and the integer
state (step, projection index, skipped steps) are equal exactly.
"""

import collections
import io
import warnings

import pytest

torch = pytest.importorskip("torch")
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import flora_opt  # noqa: E402
from flora_opt import core  # noqa: E402
from flora_opt.ops import get_ops  # noqa: E402
from flora_opt.projection import gaussian_projection, projection_key, stream_key  # noqa: E402

SHAPES = [(64, 48), (64, 48), (48, 64), (48, 64), (30,), (8, 6, 5), (), (200, 40), (40, 300), (16, 16), (0, 4)]

OPTIONS = [
    dict(rank=8, kappa=3, min_dim_size_to_factor=8),
    dict(rank=None),
    dict(beta1=None),
    dict(rank=8, kappa=2, factorize_second_moment=False, weight_decay=0.1),
    dict(rank=4, kappa=3, clip_threshold=0.3, scale_parameter=False),
    dict(rank=4, kappa=4, lr=None, relative_step=True, warmup_init=True),
    dict(rank=6, kappa=3, max_aspect_ratio=None, beta1=0.5, decay_rate=-0.5),
]


def _run(foreach, options, dtype=torch.float32, steps=9, poison=None):
    options = dict(options)
    lr = options.pop("lr", 1e-2)
    gen = torch.Generator().manual_seed(1)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]
    opt = flora_opt.Flora(params, lr=lr, foreach=foreach, **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen).to(dtype)
            if poison is not None and step == poison[0]:
                params[poison[1]].grad.view(-1)[0] = float("nan")
            opt.step()
        opt.synchronize()
    return params, opt


def _assert_same(a, opt_a, b, opt_b, rtol=1e-5):
    for x, y in zip(a, b):
        scale = y.detach().float().abs().max().clamp(min=1e-30) if y.numel() else 1.0
        assert ((x.detach().float() - y.detach().float()).abs().max() <= rtol * scale) if y.numel() else True
        assert set(opt_a.state[x]) == set(opt_b.state[y])
        for key, value in opt_b.state[y].items():
            mine = opt_a.state[x][key]
            if isinstance(value, torch.Tensor):
                assert mine.shape == value.shape and mine.dtype == value.dtype, key
                if value.numel() == 0:
                    continue
                if value.dtype == torch.uint8:  # 8-bit codes: a rounding step may move a code by one
                    assert (mine.int() - value.int()).abs().max() <= 1, key
                else:
                    tol = rtol * value.abs().max().clamp(min=1e-30)
                    assert (mine - value).abs().max() <= tol, key
            else:
                assert mine == value, (key, mine, value)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_grouped_step_equals_per_tensor_path(options, dtype):
    grouped, opt_grouped = _run(True, options, dtype)
    reference, opt_reference = _run(False, options, dtype)
    _assert_same(grouped, opt_grouped, reference, opt_reference)


def test_grouped_step_equals_per_tensor_path_8bit():
    pytest.importorskip("torchao")
    options = dict(rank=16, kappa=3, quantization=True, min_dim_size_to_factor=100)
    global SHAPES
    saved = SHAPES
    SHAPES = [(256, 300), (256, 300), (300, 256), (5000,), (5000,), (70, 70)]
    try:
        grouped, opt_grouped = _run(True, options)
        reference, opt_reference = _run(False, options)
    finally:
        SHAPES = saved
    assert opt_grouped.state[grouped[0]]["exp_avg_codes"].dtype == torch.uint8
    # codes may differ by one where a one-ulp difference crosses a code boundary (not seen here)
    _assert_same(grouped, opt_grouped, reference, opt_reference, rtol=1e-5)


def test_non_finite_gradient_grouped_skips_only_that_tensor():
    clean, _opt_clean = _run(True, OPTIONS[0], steps=5)
    dirty, opt_dirty = _run(True, OPTIONS[0], steps=5, poison=(2, 1))
    reference, opt_reference = _run(False, OPTIONS[0], steps=5, poison=(2, 1))
    _assert_same(dirty, opt_dirty, reference, opt_reference)
    assert opt_dirty.state[dirty[1]]["skipped_steps"] == 1 and opt_dirty.state[dirty[1]]["step"] == 4
    assert opt_dirty.state[dirty[0]]["step"] == 5
    for index in (0, 2, 3):  # the other tensors of the same bucket are untouched by the NaN
        assert torch.equal(dirty[index], clean[index])


def _assert_non_finite_step_skips_only_that_tensor(options):
    """A NaN in tensor 1's gradient at step 2: the grouped path equals the per-tensor path, counts
    one skip, leaves the other tensors as in a clean run and keeps tensor 1 finite."""
    clean, _ = _run(True, options, steps=5)
    dirty, opt_dirty = _run(True, options, steps=5, poison=(2, 1))
    reference, opt_reference = _run(False, options, steps=5, poison=(2, 1))
    _assert_same(dirty, opt_dirty, reference, opt_reference)
    assert opt_dirty.state[dirty[1]]["skipped_steps"] == 1
    for index in (0, 2, 3):
        assert torch.equal(dirty[index], clean[index])
    assert torch.isfinite(dirty[1]).all()


@pytest.mark.parametrize("options", [dict(rank=None), dict(rank=None, weight_decay=0.1)], ids=["full", "full,wd"])
def test_non_finite_gradient_with_full_momentum_skips_only_that_tensor(options):
    """Full momentum applies ``p - scale * M_t`` in place (no Delta buffer): a skipped tensor's
    rows of ``M_t`` are its old momentum and its scale is 0, so its parameter is bit-unchanged."""
    _assert_non_finite_step_skips_only_that_tensor(options)


@pytest.mark.parametrize("shape", [(3, 100, 7), (2, 9, 1), (1, 1, 5), (2, 0, 3), (40, 3, 2), (1, 100, 7)])
def test_sums_of_squares_in_row_blocks(monkeypatch, shape):
    """TorchOps.sums_of_squares squares blocks of rows (the last one short): a stack of several
    matrices in at most MAX_SQUARE_BLOCKS blocks, one matrix in blocks of about SQUARE_BLOCK."""
    from flora_opt import ops

    monkeypatch.setattr(ops, "SQUARE_BLOCK", 40)  # blocks of 1-13 rows
    G = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    rows, cols = ops.TorchOps().sums_of_squares(G)
    torch.testing.assert_close(rows, G.square().sum(dim=2), rtol=1e-6, atol=0)
    torch.testing.assert_close(cols, G.square().sum(dim=1), rtol=1e-6, atol=0)
    count, m, n = shape
    rows = ops.square_block_rows(shape)
    assert -(-m // rows) <= ops.MAX_SQUARE_BLOCKS if count > 1 else (rows - 1) * n < 40


def test_grouped_step_with_row_blocked_statistics_equals_per_tensor_path(monkeypatch):
    from flora_opt import ops

    monkeypatch.setattr(ops, "SQUARE_BLOCK", 500)  # several row blocks for every factored stack
    options = dict(rank=8, kappa=3, min_dim_size_to_factor=8)
    grouped, opt_grouped = _run(True, options)
    reference, opt_reference = _run(False, options)
    _assert_same(grouped, opt_grouped, reference, opt_reference)


@pytest.mark.parametrize("read_counters", [True, False], ids=["cpu-exact", "host-window"])
def test_previous_projection_only_when_a_resample_can_happen(monkeypatch, read_counters):
    """The previous projection and the transfer are computed only at steps where some tensor of
    the bucket may resample, decided on the host (exactly from the CPU counters, or from the
    window between the last synchronized step and the optimistic host step). A skipped step puts
    one tensor's resample one step after its bucket-mates': both decisions still transfer it
    at its own step, as the per-tensor path does, and skip the transfer elsewhere."""
    from flora_opt import engine

    monkeypatch.setattr(engine, "READ_CPU_COUNTERS", read_counters)
    calls = []
    original = core.gaussian_projection

    def spy(key, *args, **kwargs):
        if isinstance(key, torch.Tensor) and key.ndim:  # a bucket's keys: (2, T) with the previous ones
            calls.append(key.ndim == 2)
        return original(key, *args, **kwargs)

    monkeypatch.setattr(core, "gaussian_projection", spy)
    options = dict(rank=8, kappa=3, min_dim_size_to_factor=8)
    grouped, opt_grouped = _run(True, options, steps=9, poison=(2, 1))
    reference, opt_reference = _run(False, options, steps=9, poison=(2, 1))
    _assert_same(grouped, opt_grouped, reference, opt_reference)
    assert opt_grouped.state[grouped[1]]["projection"] == 2 and opt_grouped.state[grouped[0]]["projection"] == 2
    assert True in calls and False in calls  # skipped at most steps, computed at resamples


def test_large_tensors_are_stepped_in_small_stacks_with_the_same_results(monkeypatch):
    """Buckets of large tensors are split into stacks (engine.chunks); every stack is stepped
    like a bucket, so the results still equal the per-tensor path, skips and resamples too."""
    from flora_opt import engine

    monkeypatch.setattr(engine, "LARGE_TENSOR", 1000)
    monkeypatch.setattr(engine, "STACK_ELEMENTS", 5000)  # one (64, 48) or (200, 40) per stack
    assert [len(c) for c in engine.chunks([torch.empty(64, 48)] * 5)] == [1] * 5
    assert [len(c) for c in engine.chunks([torch.empty(40, 60)] * 5)] == [2, 2, 1]  # 2400 each
    assert [len(c) for c in engine.chunks([torch.empty(30, 30)] * 5)] == [5]  # small: one stack
    options = dict(rank=8, kappa=3, min_dim_size_to_factor=8)
    grouped, opt_grouped = _run(True, options, poison=(2, 1))
    reference, opt_reference = _run(False, options, poison=(2, 1))
    _assert_same(grouped, opt_grouped, reference, opt_reference)


@pytest.mark.parametrize(
    "options",
    [dict(rank=None), dict(rank=None, weight_decay=0.1), dict(beta1=None), dict(rank=8, kappa=3)],
    ids=["full", "full,wd", "none", "compressed+full"],
)
def test_streamed_large_matrices_equal_per_tensor_path(monkeypatch, options):
    """A matrix of more than STREAM_ELEMENTS elements without compressed momentum is streamed in
    blocks of rows (no full-size buffer; the momentum updated in place): same results as the
    per-tensor path, a NaN skips only that tensor and leaves its parameter bit-unchanged."""
    from flora_opt import engine, ops

    monkeypatch.setattr(engine, "LARGE_TENSOR", 1000)
    monkeypatch.setattr(engine, "STACK_ELEMENTS", 2000)  # (64, 48), (200, 40), (40, 300): one per stack
    monkeypatch.setattr(engine, "STREAM_ELEMENTS", 2000)  # and streamed without compressed momentum
    monkeypatch.setattr(ops, "SQUARE_BLOCK", 500)  # blocks of a few rows, the last one short
    streamed = []
    original = engine.Engine._step_streamed

    def spy(self, stack, *args):
        streamed.append(tuple(stack.params[0].shape))
        return original(self, stack, *args)

    monkeypatch.setattr(engine.Engine, "_step_streamed", spy)
    _assert_non_finite_step_skips_only_that_tensor(dict(options, min_dim_size_to_factor=8))
    assert (200, 40) in streamed  # full momentum (aspect ratio 5) or none


def test_history_norm_from_the_history_equals_per_tensor_path(monkeypatch):
    """At a large rank ``s`` comes from the formed history's norm instead of Gram products
    (core.history_norm_from_history; forced here at rank 8): the grouped step still equals the
    per-tensor path, both sides, across resamples and a skipped step, and both equal the Gram
    form up to float32 rounding."""
    options = dict(rank=8, kappa=3, min_dim_size_to_factor=8)
    grams, _ = _run(False, options, poison=(2, 1))
    monkeypatch.setattr(core, "HISTORY_NORM_RATIO", 0)
    stacks = []
    original = core.norm_ratio
    monkeypatch.setattr(core, "norm_ratio", lambda m, h, *args: stacks.append(m.ndim == 3) or original(m, h, *args))
    grouped, opt_grouped = _run(True, options, poison=(2, 1))
    reference, opt_reference = _run(False, options, poison=(2, 1))
    _assert_same(grouped, opt_grouped, reference, opt_reference)
    assert True in stacks and False in stacks  # taken by the grouped and the per-tensor path
    for a, b in zip(reference, grams):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_skip_warning_is_raised_lazily_and_state_dict_is_exact():
    p = torch.nn.Parameter(torch.randn(40, 50))
    opt = flora_opt.Flora([p], lr=1e-2, rank=8, kappa=2)
    p.grad = torch.randn(40, 50)
    opt.step()
    p.grad = torch.full((40, 50), float("inf"))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # no warning, no host sync here
    assert opt.state[p]["step"] == 2  # optimistic until synchronized
    with pytest.warns(RuntimeWarning, match=r"non-finite gradient for 1 parameter"):
        saved = opt.state_dict()
    assert saved["state"][0]["step"] == 1 and saved["state"][0]["skipped_steps"] == 1
    assert opt.state[p]["projection"] == 0


@pytest.mark.parametrize("rank, dim", [(8, 64), (3, 7), (32, 256)])
def test_batched_projections_equal_single_ones_bit_for_bit(rank, dim):
    ops = get_ops("torch")
    seeds = [0, 1, 2**31 + 5, 2**32 - 1]
    indices = [0, 3, 7, 1000]
    signed = torch.tensor([s - 2**32 if s >= 2**31 else s for s in seeds], dtype=torch.int32)
    keys = projection_key(signed, 0, torch.tensor(indices, dtype=torch.int32), ops)
    batch = gaussian_projection(keys, rank, dim, ops)
    for i, (seed, index) in enumerate(zip(seeds, indices)):
        single = gaussian_projection(stream_key(seed, 0, index), rank, dim, ops)
        assert torch.equal(batch[i], single)


@pytest.mark.parametrize("batch", [(), (3,)], ids=["one", "stack"])
def test_apply_direction_in_place_equals_core(batch):
    """core.apply_direction_ (in place: the torch paths) rounds as core.apply_direction does."""
    ops = get_ops("torch")
    gen = torch.Generator().manual_seed(0)
    param = torch.randn((*batch, 30, 20), generator=gen)
    direction = core.Direction(
        torch.randn((*batch, 30, 20), generator=gen), torch.full(batch, 1e-4), torch.full(batch, 1e-3)
    )
    expected = core.apply_direction(param, direction, ops)
    target = param.clone()
    core.apply_direction_(list(target.unbind(0)) if batch else [target], direction, ops)
    torch.testing.assert_close(target, expected, rtol=1e-6, atol=1e-7)


# ---- structure: dispatched ops and host syncs ----------------------------------------------


class _CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))


def _llama_params(layers, width=256, ffn=688, vocab=256):
    """LLaMA-style parameter shapes: embedding, per layer q, k, v, o, gate, up, down and two
    norms, final norm and head."""
    shapes = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width, width)] * 4 + [(ffn, width), (ffn, width), (width, ffn), (width,), (width,)]
    shapes += [(width,), (vocab, width)]
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]


def _ops_per_step(layers, steps=3, kappa=2):
    params = _llama_params(layers)
    opt = flora_opt.Flora(params, lr=1e-3, rank=32, kappa=kappa)
    gen = torch.Generator().manual_seed(1)
    counts = []
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
        if step == 2:
            params[3].grad[0, 0] = float("nan")  # a skip, decided on the device
        with _CountOps() as counter:
            opt.step()
        counts.append(counter.ops)
    return counts


def test_dispatched_ops_do_not_grow_with_depth_and_no_host_sync_after_the_first_step():
    shallow = _ops_per_step(12)
    deep = _ops_per_step(48)
    # steps 2 and 3 cross a resample (kappa=2) and a non-finite gradient
    for counts in shallow[1:] + deep[1:]:
        assert counts["aten._local_scalar_dense.default"] == 0
    for a, b in zip(shallow[1:], deep[1:]):
        assert sum(b.values()) <= 1.2 * sum(a.values()), (sum(a.values()), sum(b.values()))


# ---- checkpoints ----------------------------------------------------------------------------


def _train(opt, params, gen, steps):
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()


@pytest.mark.parametrize("writer_foreach", [True, False])
def test_resume_is_bit_exact_and_the_format_is_unchanged(writer_foreach):
    shapes = [(40, 30), (40, 30), (30, 50), (7,)]

    def make():
        return [
            torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)
        ]

    params = make()
    opt = flora_opt.Flora(params, lr=1e-2, rank=4, kappa=3, foreach=writer_foreach)
    gen = torch.Generator().manual_seed(5)
    _train(opt, params, gen, 4)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    saved = torch.load(io.BytesIO(buffer.getvalue()), weights_only=True)
    assert saved["flora_format"] == 2
    for entry in saved["state"].values():
        assert isinstance(entry["step"], int) and isinstance(entry["skipped_steps"], int)
    resumed_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    resumed = flora_opt.Flora(resumed_params, lr=1e-2, rank=4, kappa=3)  # the grouped default
    resumed.load_state_dict(saved)
    continued = flora_opt.Flora(params, lr=1e-2, rank=4, kappa=3)
    continued.load_state_dict(saved)
    gen_a, gen_b = torch.Generator().manual_seed(6), torch.Generator().manual_seed(6)
    _train(continued, params, gen_a, 5)
    _train(resumed, resumed_params, gen_b, 5)
    for p, q in zip(params, resumed_params):
        assert torch.equal(p, q)
    a, b = continued.state_dict(), resumed.state_dict()
    for key in a["state"]:
        for name, value in a["state"][key].items():
            other = b["state"][key][name]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


# ---- torch.compile ---------------------------------------------------------------------------


def test_compiled_step_has_no_recompiles_across_resamples_and_matches_eager():
    """``torch.compile(optimizer.step)`` traces a fixed set of graphs: after the first two steps
    (state creation, then the steady step) no new graph is compiled, also across resamples
    (kappa=2) and a skipped step, because everything that changes per step is a device tensor
    and the host integers are advanced outside the graph. The ``.grad`` tensors are kept from one
    step to the next (``zero_grad(set_to_none=False)``); see docs/algorithm.md section 8."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    shapes = [(40, 60), (40, 60), (60, 40), (30,)]
    params = [
        torch.nn.Parameter(torch.randn(s, generator=torch.Generator().manual_seed(i))) for i, s in enumerate(shapes)
    ]
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt = flora_opt.Flora(params, lr=1e-2, rank=4, kappa=2)
    eager = flora_opt.Flora(eager_params, lr=1e-2, rank=4, kappa=2)
    torch._dynamo.reset()
    step = torch.compile(opt.step, backend=backend)
    for p, q in zip(params, eager_params):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    gen = torch.Generator().manual_seed(3)
    counts = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for index in range(7):
            for p, q in zip(params, eager_params):
                new = torch.randn(p.shape, generator=gen)
                if index == 4 and p is params[1]:
                    new[0, 0] = float("nan")
                p.grad.copy_(new)
                q.grad.copy_(new)
            step()
            eager.step()
            counts.append(len(graphs))
        opt.synchronize()
        eager.synchronize()
    torch._dynamo.reset()
    assert counts[2:] == [counts[1]] * 5, counts
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    assert opt.state[params[1]]["skipped_steps"] == 1 and opt.state[params[1]]["step"] == 6


def test_compiled_step_with_more_shapes_than_the_recompile_limit_matches_eager():
    """A model with more distinct shapes (buckets) than dynamo's recompile limit: the compiled
    step traces every bucket in one frame (the per-bucket step has no graph break, and the host
    integers advance once per step outside the graph), so it compiles a few graphs whatever the
    number of shapes, never recompiles a bucket (exceeding the limit is an error here), and
    matches the eager step."""
    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    # 12 layouts: compressed rows and cols, full momentum (rank >= min dim), vectors
    shapes = [(6 + i, 10) for i in range(5)] + [(10, 6 + i) for i in range(4)] + [(3, 7), (9,), (4,)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    eager_params = [torch.nn.Parameter(p.detach().clone()) for p in params]
    options = dict(lr=1e-2, rank=4, kappa=2, min_dim_size_to_factor=4)
    opt, eager = flora_opt.Flora(params, **options), flora_opt.Flora(eager_params, **options)
    for p, q in zip(params, eager_params):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    torch._dynamo.reset()
    counts = []
    with warnings.catch_warnings(), torch._dynamo.config.patch(recompile_limit=8, fail_on_recompile_limit_hit=True):
        warnings.simplefilter("ignore")
        step = torch.compile(opt.step, backend=backend)
        for _ in range(4):
            for p, q in zip(params, eager_params):
                new = torch.randn(p.shape, generator=gen)
                p.grad.copy_(new)
                q.grad.copy_(new)
            step()
            eager.step()
            counts.append(len(graphs))
    torch._dynamo.reset()
    assert len({layout for layout in opt._layout_cache.values()}) > 8
    assert counts[1] <= 8 and counts[1:] == [counts[1]] * 3, counts
    for p, q in zip(params, eager_params):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_8bit_grouped_step_has_no_host_sync_and_constant_op_count():
    """Quantized states are dequantized and requantized as one stack per bucket: no host sync,
    and the op count does not depend on how many tensors share a layout."""
    pytest.importorskip("torchao")
    counts = {}
    for copies in (2, 8):
        params = [torch.nn.Parameter(torch.randn(s)) for _ in range(copies) for s in [(256, 300), (300, 256), (5000,)]]
        opt = flora_opt.Flora(params, lr=1e-2, rank=16, kappa=2, quantization=True)
        per_step = []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for _ in range(3):
                for p in params:
                    p.grad = torch.randn_like(p)
                with _CountOps() as counter:
                    opt.step()
                per_step.append(counter.ops)
        assert opt.state[params[0]]["exp_avg_codes"].dtype == torch.uint8
        for ops in per_step[1:]:
            assert ops["aten._local_scalar_dense.default"] == 0
        counts[copies] = sum(per_step[-1].values())
    assert counts[8] == counts[2], counts
