"""flora_opt.Flora against the float64 reference, transformers' Adafactor, and its own contract."""

import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from _trained import roundtrip, trained  # noqa: E402

import flora_opt  # noqa: E402
from flora_opt import core, statebytes  # noqa: E402
from flora_opt.reference import ReferenceFlora  # noqa: E402

# shapes crossing every threshold of section 1 with rank 8 and min_dim_size_to_factor 16
SHAPES = [(5,), (), (8, 40), (9, 40), (40, 9), (16, 16), (15, 30), (20, 3, 4), (30, 17), (0, 3)]
OPTIONS = [
    dict(rank=8, kappa=3),
    dict(rank=None),
    dict(rank=8, beta1=None),
    dict(rank=8, beta1=0.0),
    dict(rank=8, kappa=2, factorize_second_moment=False, weight_decay=0.1),
    dict(rank=8, kappa=4, scale_parameter=False, clip_threshold=0.5, decay_rate=-0.5),
    dict(lr=None, relative_step=True, rank=8, kappa=2),
    dict(lr=None, relative_step=True, warmup_init=True, rank=8, kappa=2),
    dict(rank=8, kappa=1, beta1=0.5, eps=(1e-20, 1e-2), seed=12345),
    dict(rank=8, kappa=3, max_aspect_ratio=None),
]


def _run_pair(shapes, options, steps, dtype=torch.float32, seed=0):
    options = dict(options)
    lr = options.pop("lr", 3e-2)
    options.setdefault("min_dim_size_to_factor", 16)
    options.setdefault("max_aspect_ratio", 3.0)  # (8, 40), (9, 40) embedding-like; (15, 30) not
    gen = torch.Generator().manual_seed(seed)
    init = [torch.randn(s, generator=gen) for s in shapes]
    params = [torch.nn.Parameter(x.to(dtype)) for x in init]
    opt = flora_opt.Flora(params, lr=lr, **options)
    ref = ReferenceFlora([p.detach().double().numpy() for p in params], lr=lr, **options)
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.to(dtype)
        opt.step()
        ref.step([g.to(dtype).double().numpy() for g in grads])
    return params, opt, ref


@pytest.mark.parametrize("options", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_fast_path_matches_reference_params_and_state(options):
    params, opt, ref = _run_pair(SHAPES, options, steps=9)
    for index, (p, expected) in enumerate(zip(params, ref.params)):
        np.testing.assert_allclose(p.detach().numpy(), expected, rtol=1e-5, atol=1e-5, err_msg=f"param {index}")
        state, rstate = opt.state[p], ref.states[index]
        assert state["step"] == rstate.step == 9
        assert state["seed"] == rstate.seed
        if p.numel() == 0:
            continue
        if rstate.momentum is not None:
            np.testing.assert_allclose(state["exp_avg"].numpy(), rstate.momentum, rtol=1e-4, atol=1e-6)
        else:
            assert "exp_avg" not in state
        if rstate.row is not None:
            np.testing.assert_allclose(state["exp_avg_sq_row"].numpy(), rstate.row, rtol=1e-5)
            np.testing.assert_allclose(state["exp_avg_sq_col"].numpy(), rstate.col, rtol=1e-5)
        else:
            np.testing.assert_allclose(
                state["exp_avg_sq"].numpy().reshape(rstate.second.shape), rstate.second, rtol=1e-5
            )


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 3e-3)])
def test_low_precision_params_use_fp32_math(dtype, tol):
    params, opt, ref = _run_pair([(12, 40), (40,)], dict(rank=4, kappa=2), steps=5, dtype=dtype)
    for p, expected in zip(params, ref.params):
        assert p.dtype == dtype
        np.testing.assert_allclose(p.detach().double().numpy(), expected, rtol=tol, atol=tol)
        for key, value in opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype == torch.float32, key


def _momentum_before_clipping_adafactor(params, grads_per_step, lr, beta1, weight_decay):
    """Written out from docs/algorithm.md section 8 for ``rank=None``: Adafactor (factored for
    matrices, full for vectors) whose momentum averages the unclipped ``U``; clipping and the
    parameter-scaled step apply to the momentum. Independent of flora_opt's code."""
    params = [p.clone().double() for p in params]
    state = [dict() for _ in params]
    for t, grads in enumerate(grads_per_step, start=1):
        beta2 = 1.0 - t**-0.8
        for k, (w, g) in enumerate(zip(params, grads)):
            g = g.double()
            st = state[k]
            eta = lr * max(1e-3, w.pow(2).mean().sqrt().item())
            sq = g * g + 1e-30
            if w.ndim == 2:
                st["r"] = beta2 * st.get("r", 0.0) + (1 - beta2) * sq.mean(1)
                st["c"] = beta2 * st.get("c", 0.0) + (1 - beta2) * sq.mean(0)
                u = g / torch.sqrt(st["r"][:, None] * st["c"][None, :] / st["r"].mean())
            else:
                st["v"] = beta2 * st.get("v", 0.0) + (1 - beta2) * sq
                u = g / st["v"].sqrt()
            st["m"] = beta1 * st.get("m", 0.0) + (1 - beta1) * u
            d = st["m"] / max(1.0, st["m"].pow(2).mean().sqrt().item())
            params[k] = w - eta * weight_decay * w - eta * d
    return params


def test_rank_none_is_adafactor_with_momentum_before_clipping():
    """rank=None, beta1=0.9 is the full-momentum form of the rule (docs/algorithm.md section 8),
    not transformers.Adafactor(beta1=0.9), which averages the clipped, lr-scaled update."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shapes = [(160, 130), (130, 160), (30,)]
    init = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) * (1 + 5 * (t % 3)) for s in shapes] for t in range(12)]
    kwargs = dict(lr=1e-2, beta1=0.9, weight_decay=0.01)
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    opt = flora_opt.Flora(ours, rank=None, **kwargs)
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    hf = transformers.Adafactor(theirs, scale_parameter=True, relative_step=False, warmup_init=False, **kwargs)
    for step_grads in grads:
        for p, q, g in zip(ours, theirs, step_grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        hf.step()
    expected = _momentum_before_clipping_adafactor(init, grads, **kwargs)
    for p, e, q in zip(ours, expected, theirs):
        torch.testing.assert_close(p.detach().double(), e, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(p.detach(), q.detach(), rtol=1e-3, atol=1e-5)


def test_rank_none_matches_transformers_adafactor_when_step_size_is_constant_and_clipping_inactive():
    """rank=None, beta1=0.9 is Adafactor with full momentum (transformers.Adafactor) when the
    step size is constant and clipping is inactive.

    Flora's momentum averages the unclipped ``U`` and clips and scales the average (``Delta =
    eta_t clip(M_t)``); transformers averages ``eta_t clip(U_t)``. With ``scale_parameter=False``,
    a constant ``lr`` and a clip threshold never reached the two are the same numbers.
    Documented difference: transformers factors every matrix; ours only matrices with both
    dimensions >= min_dim_size_to_factor, so the test sets it to 1.
    """
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    shapes = [(64, 48), (48, 64), (30,), (8, 6, 5)]
    init = [torch.randn(s) for s in shapes]
    ours = [torch.nn.Parameter(x.clone()) for x in init]
    theirs = [torch.nn.Parameter(x.clone()) for x in init]
    kwargs = dict(
        lr=1e-2,
        beta1=0.9,
        weight_decay=0.01,
        scale_parameter=False,
        relative_step=False,
        warmup_init=False,
        clip_threshold=1e6,
    )
    opt = flora_opt.Flora(ours, rank=None, min_dim_size_to_factor=1, **kwargs)
    # transformers factors the last two dims of a 3-D tensor; ours views it as (8, 30): compare
    # the 3-D tensor through an equivalent 2-D parameter on their side.
    theirs[3] = torch.nn.Parameter(init[3].clone().reshape(8, 30))
    ref = transformers.Adafactor(theirs, **kwargs)
    for _ in range(12):
        grads = [torch.randn(s) for s in shapes]
        for p, q, g in zip(ours, theirs, grads):
            p.grad = g.clone()
            q.grad = g.clone().reshape(q.shape)
        opt.step()
        ref.step()
    for p, q in zip(ours, theirs):
        torch.testing.assert_close(p.detach().reshape(q.shape), q.detach(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(160, 130), (30,)])
def test_beta1_none_matches_transformers_adafactor_at_the_defaults(shape):
    """Without momentum, Flora at its defaults is transformers.Adafactor(beta1=None) step for step
    for vectors and for matrices whose both sides are >= min_dim_size_to_factor (128): the
    conditions under which both factor the same tensors."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(2)
    init = torch.randn(shape)
    p, q = torch.nn.Parameter(init.clone()), torch.nn.Parameter(init.clone())
    opt = flora_opt.Flora([p], lr=1e-2, beta1=None, weight_decay=0.01)
    ref = transformers.Adafactor([q], lr=1e-2, beta1=None, weight_decay=0.01, relative_step=False, warmup_init=False)
    for _ in range(8):
        g = torch.randn(shape)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)


def test_beta1_none_matches_torch_adafactor_free_transformers_adafactor():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(1)
    init = torch.randn(32, 20)
    p = torch.nn.Parameter(init.clone())
    q = torch.nn.Parameter(init.clone())
    opt = flora_opt.Flora([p], lr=1e-2, beta1=None, min_dim_size_to_factor=1)
    ref = transformers.Adafactor([q], lr=1e-2, beta1=None, relative_step=False, warmup_init=False)
    for _ in range(8):
        g = torch.randn(32, 20)
        p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    assert set(opt.state[p]) == {"step", "seed", "skipped_steps", "exp_avg_sq_row", "exp_avg_sq_col"}


def test_flora_trains_a_small_model():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16, kappa=10, scale_parameter=False)
    x, y = torch.randn(256, 64), torch.randint(0, 10, (256,))
    losses = []
    for _ in range(60):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
    assert opt.state[model[0].weight]["exp_avg"].shape == (128, 16)  # (128, 64): columns compressed


# ---- dtypes, NumPy scalars, meta and fake tensors ----------------------------------------------


@pytest.mark.parametrize("options", [dict(rank=8), dict(rank=None), dict(beta1=None), dict(rank=8, weight_decay=0.1)])
def test_float64_parameter_is_not_rounded_to_float32(options):
    torch.manual_seed(0)
    p = torch.nn.Parameter(1 + 1e-9 * torch.rand(200, 300, dtype=torch.float64))
    before = p.detach().clone()
    assert before.unique().numel() > 50000
    opt = flora_opt.Flora([p], lr=0.0, **options)
    p.grad = torch.randn_like(p)
    opt.step()
    assert p.dtype == torch.float64
    assert torch.equal(p.detach(), before)  # lr=0: bit-identical
    # lr > 0: the step is applied in float64 (the parameter is not rounded to float32)
    q = torch.nn.Parameter(before.clone())
    opt = flora_opt.Flora([q], lr=1e-12, **options)
    q.grad = torch.randn_like(q)
    opt.step()
    assert q.detach().unique().numel() > 50000
    assert (q.detach() - before).abs().max() < 1e-9


def test_numpy_scalars_are_accepted_and_stored_as_plain_numbers():
    p = torch.nn.Parameter(torch.randn(20, 30))
    opt = flora_opt.Flora(
        [p],
        lr=np.float32(1e-3),
        rank=np.int64(4),
        kappa=np.int64(10),
        beta1=np.float32(0.9),
        min_dim_size_to_factor=np.int32(8),
        seed=np.uint32(7),
        eps=(np.float64(1e-30), np.float32(1e-3)),
    )
    group = opt.param_groups[0]
    assert type(group["rank"]) is int and group["rank"] == 4
    assert type(group["kappa"]) is int and type(group["lr"]) is float and type(group["seed"]) is int
    assert all(type(e) is float for e in group["eps"])
    p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[p]["exp_avg"].shape == (4, 30)
    opt.add_param_group({"params": [torch.nn.Parameter(torch.randn(3))], "lr": np.float16(1e-2)})
    assert type(opt.param_groups[1]["lr"]) is float
    roundtrip(opt.state_dict())  # weights_only: plain values only


@pytest.mark.parametrize("options", [dict(rank=4), dict(rank=None), dict(beta1=None, factorize_second_moment=False)])
def test_meta_parameters_step(options):
    params = [
        torch.nn.Parameter(torch.empty(20, 30, device="meta")),
        torch.nn.Parameter(torch.empty(30, device="meta")),
    ]
    opt = flora_opt.Flora(params, lr=1e-3, **options)
    for p in params:
        p.grad = torch.empty_like(p)
    opt.step()
    opt.step()
    assert opt.state[params[0]]["step"] == 2
    assert all(v.device.type == "meta" for v in opt.state[params[0]].values() if isinstance(v, torch.Tensor))


def test_fake_parameters_step():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p = torch.nn.Parameter(torch.randn(40, 50))
        opt = flora_opt.Flora([p], lr=1e-3, rank=4)
        p.grad = torch.randn(40, 50)
        opt.step()
        assert opt.state[p]["exp_avg"].shape == (4, 50)


def test_no_warnings_on_plain_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trained()


# ---- param groups, schedulers, closures ------------------------------------------------------


def test_param_groups_have_their_own_options():
    a = torch.nn.Parameter(torch.randn(40, 60))
    b = torch.nn.Parameter(torch.randn(40, 60))
    c = torch.nn.Parameter(torch.randn(40, 60))
    opt = flora_opt.Flora([{"params": [a]}, {"params": [b], "rank": 4, "kappa": 2}], lr=1e-2, rank=8)
    opt.add_param_group({"params": [c], "rank": None, "lr": 1e-3})
    for p in (a, b, c):
        p.grad = torch.randn(40, 60)
    opt.step()
    assert opt.state[a]["exp_avg"].shape == (8, 60)
    assert opt.state[b]["exp_avg"].shape == (4, 60)
    assert opt.state[c]["exp_avg"].shape == (40, 60)
    # seeds are distinct per tensor position
    assert len({opt.state[p]["seed"] for p in (a, b, c)}) == 3


def test_lr_scheduler_changes_the_step():
    def final_param(schedule):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.ones(20, 30))
        opt = flora_opt.Flora([p], lr=1e-2, rank=4, scale_parameter=False)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
        for _ in range(4):
            p.grad = torch.ones(20, 30)
            opt.step()
            sched.step()
        return p.detach().clone(), opt.param_groups[0]["lr"]

    constant, lr_c = final_param(lambda s: 1.0)
    decayed, lr_d = final_param(lambda s: 0.5**s)
    assert lr_c == pytest.approx(1e-2) and lr_d == pytest.approx(1e-2 * 0.5**4)
    # the all-ones gradient gives a deterministic update direction: the decayed run moves less
    assert (1 - decayed).abs().mean() < (1 - constant).abs().mean()


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=10, cycle_momentum=False),
        lambda opt: torch.optim.lr_scheduler.CyclicLR(
            opt, base_lr=1e-4, max_lr=1e-2, step_size_up=3, cycle_momentum=False
        ),
    ],
    ids=["OneCycleLR", "CyclicLR"],
)
def test_momentum_cycling_schedulers_work_with_cycle_momentum_false(make):
    params, opt = trained(steps=0)
    scheduler = make(opt)
    lrs = []
    for _ in range(5):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
        scheduler.step()
        lrs.append(opt.param_groups[0]["lr"])
    assert len(set(lrs)) == 5
    assert opt.param_groups[0]["beta1"] == 0.9


def test_closure_and_zero_grad_and_params_without_grad():
    torch.manual_seed(0)
    used = torch.nn.Parameter(torch.randn(10, 10))
    unused = torch.nn.Parameter(torch.randn(10, 10))
    before = unused.detach().clone()
    opt = flora_opt.Flora([used, unused], lr=1e-2, rank=2)

    def closure():
        opt.zero_grad()
        loss = (used**2).sum()
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and loss.item() > 0
    assert unused.grad is None and unused not in opt.state
    torch.testing.assert_close(unused.detach(), before, rtol=0, atol=0)
    opt.zero_grad()
    assert used.grad is None


# ---- non-finite, sparse and complex gradients ------------------------------------------------


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize(
    "options", [dict(rank=4), dict(rank=None), dict(beta1=None), dict(factorize_second_moment=False)]
)
def test_non_finite_gradient_skips_only_that_tensor(bad, options):
    torch.manual_seed(0)
    init = [torch.randn(30, 40), torch.randn(30, 40), torch.randn(7)]

    def run(poison):
        params = [torch.nn.Parameter(x.clone()) for x in init]
        opt = flora_opt.Flora(params, lr=1e-2, min_dim_size_to_factor=8, **options)
        gen = torch.Generator().manual_seed(1)
        for step in range(4):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if poison and step == 2:
                params[1].grad[3, 5] = bad
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                opt.step()
                opt.synchronize()  # the grouped step counts skips on the device and warns here
            if poison and step == 2:
                assert any("non-finite gradient" in str(w.message) for w in caught)
        return params, opt

    clean, _clean_opt = run(False)
    dirty, dirty_opt = run(True)
    for p in dirty:
        assert torch.isfinite(p).all()
        for value in dirty_opt.state[p].values():
            if isinstance(value, torch.Tensor):
                assert torch.isfinite(value).all()
    # untouched tensors are bit-identical to the clean run
    for index in (0, 2):
        assert torch.equal(dirty[index], clean[index])
    assert dirty_opt.state[dirty[1]]["skipped_steps"] == 1
    assert dirty_opt.state[dirty[1]]["step"] == 3
    assert dirty_opt.state[dirty[0]]["step"] == 4


# the documented overflow bound of the skip rule (docs/algorithm.md section 9)
@pytest.mark.parametrize("shape", [(10000, 300), (300, 10000), (4000,)])
def test_finite_gradients_below_the_documented_bound_are_stepped(shape):
    float_max = torch.finfo(torch.float32).max
    factored = len(shape) == 2
    bound = math.sqrt(float_max / max(shape)) if factored else math.sqrt(float_max)  # section 9
    p = torch.nn.Parameter(torch.zeros(shape))
    opt = flora_opt.Flora([p], lr=1e-3, rank=8)
    p.grad = torch.full(shape, 0.9 * bound)
    opt.step()
    assert opt.state[p]["skipped_steps"] == 0 and opt.state[p]["step"] == 1
    if factored:  # above it the row/column sums of G^2 overflow: the step is skipped, as documented
        p.grad = torch.full(shape, 1.2 * bound)
        opt.step()
        with pytest.warns(RuntimeWarning, match="non-finite gradient"):
            opt.synchronize()  # the grouped step warns lazily (flora_opt/engine.py)
        assert opt.state[p]["skipped_steps"] == 1


def test_changing_rank_of_a_live_group_fails_clearly():
    p = torch.nn.Parameter(torch.randn(20, 30))
    opt = flora_opt.Flora([p], lr=1e-2, rank=4)
    p.grad = torch.randn(20, 30)
    opt.step()
    opt.param_groups[0]["rank"] = 8
    with pytest.raises(RuntimeError, match=r"'exp_avg' should have shape \(8, 30\), found \(4, 30\)"):
        opt.step()


# ---- memory: state bytes equal the documented formula ------------------------------------------


def _formula_bytes(shape, rank, quantization=False, min_dim=128, max_aspect_ratio=4.0):
    """docs/algorithm.md section 11, written out independently of the implementation."""
    if len(shape) < 2:
        numel = math.prod(shape)
        momentum = second = numel
        factored_bytes = None
    else:
        m, n = shape[0], math.prod(shape[1:])
        numel = m * n
        compressed = min(m, n) > rank and max(m, n) <= max_aspect_ratio * min(m, n)
        momentum = rank * max(m, n) if compressed else numel
        factored_bytes = 4 * (m + n) if min(m, n) >= min_dim else None
        second = numel

    def stored(count):
        if quantization and count >= 4096:
            return math.ceil(count / 256) * (256 + 4)
        return 4 * count

    return stored(momentum) + (factored_bytes if factored_bytes is not None else stored(second))


@pytest.mark.parametrize("quantization", [False, True])
@pytest.mark.parametrize("rank", [8, 64])
def test_state_bytes_equal_formula(rank, quantization):
    pytest.importorskip("torchao") if quantization else None
    shapes = [(768, 2304), (3072, 768), (500, 96), (300, 96), (100, 70), (96,), (64, 3, 3, 3), (5000, 256)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    opt = flora_opt.Flora(params, lr=1e-3, rank=rank, quantization=quantization)
    for p in params:
        p.grad = torch.randn(p.shape)
    opt.step()
    for p, shape in zip(params, shapes):
        held = sum(v.numel() * v.element_size() for v in opt.state[p].values() if isinstance(v, torch.Tensor))
        assert held == _formula_bytes(shape, rank, quantization), shape
        layout = core.tensor_layout(shape, core.FloraHyperParams(rank=rank))
        assert statebytes.state_bytes(layout, quantization) == held, shape  # the one shared rule
    assert opt.state_bytes() == sum(_formula_bytes(s, rank, quantization) for s in shapes)
    # the headline ratio: a compressed, factored matrix costs r*max(m,n)+m+n floats
    assert _formula_bytes((768, 3072), 64) == 4 * (64 * 3072 + 768 + 3072)


class _NewFullSizeStorages(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts op outputs of ``numel`` elements that got a new storage (not written into an
    input or ``out=`` buffer)."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.count = numel, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {
            t.untyped_storage().data_ptr()
            for t in torch.utils._pytree.tree_leaves((args, kwargs))
            if isinstance(t, torch.Tensor)
        }
        out = func(*args, **kwargs)
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.numel() == self.numel and t.untyped_storage().data_ptr() not in inputs:
                self.count += 1
        return out


@pytest.mark.parametrize(
    "shape, options, expected",
    [
        # factored second moment, full momentum (embedding-like): the copy of G, overwritten by U
        # and then the new momentum M_t (state); Delta = eta_t clip(M_t) is never formed (float32
        # parameters take p - scale * M_t in place, addcmul)
        ((2048, 256), dict(rank=32), 1),
        # no momentum: U -> Delta, in the CPU scratch buffer kept from the first step
        # (engine.Engine.scratch), as the squares of G for the statistics
        ((2048, 256), dict(rank=32, beta1=None), 0),
        # compressed momentum: U (a single gradient is read, not copied) -> D = (1 - beta1) U +
        # P^T (beta1 s M) (one baddbmm over U) -> Delta, and the squares: all in the scratch buffer
        ((300, 200), dict(rank=16), 0),
        # bfloat16 products: U's bfloat16 copy and P^T M share a bfloat16 scratch buffer
        ((300, 200), dict(rank=16, projection_dtype="bfloat16"), 0),
        # full second moment: G^2 (-> V^-1/2 -> U -> M_t; a single gradient is read, not
        # copied), the new V
        ((4096,), dict(rank=32), 2),
        ((64, 100), dict(rank=None, factorize_second_moment=False), 2),
    ],
)
def test_step_allocates_few_gradient_sized_tensors(shape, options, expected):
    """The grouped eager step (flora_opt/engine.py) writes its full-size temporaries over few
    buffers (``out=``, in place): on a CPU a fresh gradient-sized allocation costs more than the
    arithmetic, and it adds to the peak. The state of a single tensor is read without a copy."""
    param = torch.nn.Parameter(torch.randn(shape))
    optimizer = flora_opt.Flora([param], lr=0.01, **options)
    param.grad = torch.randn(shape)
    optimizer.step()  # allocates the state
    param.grad = torch.randn(shape)
    with _NewFullSizeStorages(param.numel()) as counter:
        optimizer.step()
    assert counter.count == expected


@pytest.mark.parametrize(
    "count, options, expected",
    [
        # one gradient read in place: U and the squares share one buffer of the matrix
        (1, dict(rank=16), 300 * 200 * 4),
        # two gradients stacked into the buffer, their squares in a second one
        (2, dict(rank=16), 2 * (2 * 300 * 200 * 4)),
        # bfloat16 products add U's bfloat16 copy and the widened history
        (1, dict(rank=16, projection_dtype="bfloat16"), 300 * 200 * (4 + 2 + 4)),
        # full momentum keeps M_t: only the squares
        (1, dict(rank=None), 300 * 200 * 4),
    ],
)
def test_scratch_bytes_are_the_largest_temporaries(count, options, expected):
    params = [torch.nn.Parameter(torch.randn(300, 200)) for _ in range(count)]
    optimizer = flora_opt.Flora(params, lr=0.01, **options)
    assert optimizer.scratch_bytes() == 0
    for _ in range(2):
        for p in params:
            p.grad = torch.randn(300, 200)
        optimizer.step()
    assert optimizer.scratch_bytes() == expected
    assert "scratch" not in str(optimizer.state_dict())  # not state


def test_reports_layout_through_core():
    layout = core.tensor_layout((768, 3072), core.FloraHyperParams(lr=1.0, rank=256))
    assert layout.state_shapes() == {"exp_avg": (256, 3072), "exp_avg_sq_row": (768,), "exp_avg_sq_col": (3072,)}
