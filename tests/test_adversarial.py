"""Silent wrong results and unclear crashes that adversarial use of flora_opt.Flora could cause.

The table of bad inputs to load_state_dict (foreign, mismatched and hand-edited state) lives
here; those of the constructor, add_param_group and step are in test_torch_contract.py, the
CLI's in test_cli.py.
"""

import copy
import io
import math
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flora_opt  # noqa: E402


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def _trained(rank=8, steps=3, **options):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(20, 30)), torch.nn.Parameter(torch.randn(30))]
    opt = flora_opt.Flora(params, lr=1e-2, rank=rank, **options)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    return params, opt


# ---- float64 parameters keep float64 precision ---------------------------------------------------


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


# ---- NumPy scalars are accepted as plain numbers -------------------------------------------------


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
    _roundtrip(opt.state_dict())  # weights_only: plain values only


# ---- meta and fake tensors step ------------------------------------------------------------------


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


# ---- kappa changed mid-run carries the momentum over ---------------------------------------------


def test_changing_kappa_mid_run_keeps_the_momentum():
    torch.manual_seed(0)
    p = torch.nn.Parameter(torch.randn(20, 30))
    opt = flora_opt.Flora([p], lr=1e-2, rank=8, kappa=10, scale_parameter=False)
    direction = torch.randn(20, 30)

    def step():
        """One step; returns the applied update P_k^T M_t (the decompressed momentum)."""
        before = p.detach().clone()
        p.grad = direction + 0.1 * torch.randn(20, 30)
        opt.step()
        return (before - p.detach()).flatten()

    for _ in range(24):  # projections 0, 1, 2 (steps 21..25 use projection 2)
        step()
    last = step()
    assert opt.state[p]["projection"] == 2
    opt.param_groups[0]["kappa"] = 3  # floor((26 - 1) / 3) = 8: the old rule jumped to projection 8
    after = step()
    assert opt.state[p]["projection"] == 2  # step 26 is not a resample under kappa=3 ((26-1) % 3 != 0)
    assert torch.nn.functional.cosine_similarity(last, after, dim=0) > 0.95
    step()
    resampled = step()  # step 28: (28 - 1) % 3 == 0, a resample: projection 3, with a transfer
    assert opt.state[p]["projection"] == 3
    assert opt.state[p]["step"] == 28
    assert torch.nn.functional.cosine_similarity(last, resampled, dim=0) > 0.3


def test_constant_kappa_projection_index_is_floor_of_step():
    params, opt = _trained(rank=8, steps=7, kappa=3)
    assert opt.state[params[0]]["projection"] == (7 - 1) // 3


# ---- load_state_dict with foreign, hand-edited and mismatched state ------------------------------


def _reference_0_0_3_state_dict(params):
    """A state dict shaped like the reference flora-opt==0.0.3's (written from its documented
    layout, not its code): per parameter step, a torch.Generator seed, the momentum and
    Adafactor's factored second moment; groups without our newer options."""
    _w, _b = params
    state = {
        0: {
            "step": 3,
            "seed": 2147483647,
            "exp_avg": torch.zeros(8, 30),
            "exp_avg_sq_row": torch.ones(20),
            "exp_avg_sq_col": torch.ones(30),
        },
        1: {"step": 3, "seed": 2147483648, "exp_avg": torch.zeros(30), "exp_avg_sq": torch.ones(30)},
    }
    group = dict(
        lr=1e-2,
        rank=8,
        kappa=1000,
        eps=(1e-30, 1e-3),
        clip_threshold=1.0,
        decay_rate=-0.8,
        beta1=0.9,
        weight_decay=0.0,
        scale_parameter=True,
        relative_step=False,
        warmup_init=False,
        params=[0, 1],
    )
    return {"state": state, "param_groups": [group]}


def _reference_default_state_dict(params):
    sd = _reference_0_0_3_state_dict(params)
    sd["param_groups"][0].update(rank=None, beta1=None)
    for entry in sd["state"].values():
        entry.pop("exp_avg")
    return sd


def _adafactor_state_dict(params):
    transformers = pytest.importorskip("transformers")
    opt = transformers.Adafactor(params, lr=1e-2, scale_parameter=False, relative_step=False, beta1=0.9)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


def _adamw_state_dict(params):
    opt = torch.optim.AdamW(params, lr=1e-2)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()
    return opt.state_dict()


def _hand_edit(path, value):
    def edit(params):
        _, opt = _trained()
        sd = _roundtrip(opt.state_dict())
        target = sd
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return sd

    return edit


LOAD_BAD = [
    ("reference-0.0.3", _reference_0_0_3_state_dict, r"reference flora-opt 0\.0\.3.*torch\.Generator seed"),
    ("reference-defaults", _reference_default_state_dict, r"reference flora-opt 0\.0\.3"),
    ("adafactor", _adafactor_state_dict, r"not a Flora state dict \(it looks like transformers\.Adafactor's\)"),
    ("adamw", _adamw_state_dict, r"not a Flora state dict \(it looks like torch\.optim\.Adam/AdamW's\)"),
    ("step=-5", _hand_edit(("state", 0, "step"), -5), r"parameter 0: 'step' must be an int >= 0, got -5"),
    ("step=float", _hand_edit(("state", 0, "step"), 3.0), r"parameter 0: 'step' must be an int >= 0, got 3\.0"),
    ("seed missing", _hand_edit(("state", 0, "seed"), KeyError), r"parameter 0: 'seed' is missing"),
    ("seed=2**40", _hand_edit(("state", 1, "seed"), 2**40), r"parameter 1: 'seed' must be an int in \[0, 2\*\*32\)"),
    ("skipped<0", _hand_edit(("state", 0, "skipped_steps"), -1), r"'skipped_steps' must be an int >= 0, got -1"),
    ("projection<0", _hand_edit(("state", 0, "projection"), -2), r"'projection' must be an int >= 0, got -2"),
    ("projection ahead", _hand_edit(("state", 0, "projection"), 7), r"'projection' must be <= step - 1 \(2\), got 7"),
    ("newer format", _hand_edit(("flora_format",), 99), r"flora_format=99.*newer"),
    ("group lr", _hand_edit(("param_groups", 0, "lr"), -1.0), r"Invalid lr: -1\.0"),
    ("group rank", _hand_edit(("param_groups", 0, "rank"), 0), r"Invalid rank: 0"),
]


@pytest.mark.parametrize("name,make,pattern", LOAD_BAD, ids=[b[0] for b in LOAD_BAD])
def test_load_state_dict_table_of_bad_inputs(name, make, pattern):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(20, 30)), torch.nn.Parameter(torch.randn(30))]
    sd = make(params)
    fresh_params = [torch.nn.Parameter(torch.randn(20, 30)), torch.nn.Parameter(torch.randn(30))]
    opt = flora_opt.Flora(fresh_params, lr=1e-2, rank=8)
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    # nothing was loaded
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    assert len(opt.state) == 0


def test_state_dict_carries_a_format_marker_and_old_checkpoints_without_it_load():
    params, opt = _trained(kappa=2, steps=5)
    sd = _roundtrip(opt.state_dict())
    assert sd["flora_format"] == flora_opt.optim.STATE_FORMAT
    # a checkpoint of our own earlier format: no marker, no projection index
    old = copy.deepcopy(sd)
    del old["flora_format"]
    for entry in old["state"].values():
        entry.pop("projection", None)
    copies = [[torch.nn.Parameter(p.detach().clone()) for p in params] for _ in range(2)]
    resumed = flora_opt.Flora(copies[0], lr=1e-2, rank=8, kappa=2)
    resumed.load_state_dict(old)
    assert resumed.state[copies[0][0]]["projection"] == (5 - 1) // 2
    current = flora_opt.Flora(copies[1], lr=1e-2, rank=8, kappa=2)
    current.load_state_dict(sd)
    for _ in range(2):
        for p, q in zip(*copies):
            p.grad = torch.ones_like(p)
            q.grad = torch.ones_like(q)
        resumed.step()
        current.step()
    assert resumed.state[copies[0][0]]["projection"] == 3
    for p, q in zip(*copies):
        assert torch.equal(p, q)


@pytest.mark.parametrize(
    "option,value",
    [
        ("rank", 4),
        ("quantization", True),
        ("factorize_second_moment", False),
        ("beta1", None),
        ("min_dim_size_to_factor", 8),
        ("max_aspect_ratio", None),
    ],
)
def test_constructor_and_checkpoint_disagreeing_on_the_layout_raise(option, value):
    if option == "quantization":
        pytest.importorskip("torchao")
    params, opt = _trained()
    sd = _roundtrip(opt.state_dict())
    other = flora_opt.Flora(params, lr=1e-2, **{"rank": 8, option: value})
    with pytest.raises(
        ValueError, match=rf"group 0 was saved with {option}=.* this optimizer was built with {option}={value!r}"
    ):
        other.load_state_dict(sd)


def test_saved_options_that_keep_the_layout_win_as_in_torch():
    params, opt = _trained(kappa=5)
    sd = _roundtrip(opt.state_dict())
    other = flora_opt.Flora(params, lr=1e-4, rank=8, kappa=7, weight_decay=0.1)
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 1e-2 and other.param_groups[0]["kappa"] == 5
    assert other.param_groups[0]["weight_decay"] == 0.0


# ---- the foreign state never reaches step() ------------------------------------------------------


def test_adafactor_state_dict_is_refused_before_step():
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(20, 30)), torch.nn.Parameter(torch.randn(30))]
    sd = _adafactor_state_dict(params)
    opt = flora_opt.Flora(params, lr=1e-2, rank=8)
    with pytest.raises(ValueError, match="not a Flora state dict"):
        opt.load_state_dict(sd)
    for p in params:
        p.grad = torch.randn_like(p)
    opt.step()  # a fresh start still works


# ---- step_param in O(1) --------------------------------------------------------------------------


def test_step_param_does_not_scan_the_groups(monkeypatch):
    params = [torch.nn.Parameter(torch.randn(4, 4)) for _ in range(50)]
    opt = flora_opt.Flora([{"params": params[:25]}, {"params": params[25:], "lr": 1e-3}], lr=1e-2, rank=2)
    for p in params:
        p.grad = torch.randn_like(p)
    reference = flora_opt.Flora(
        [
            {"params": [torch.nn.Parameter(p.detach().clone()) for p in params[:25]]},
            {"params": [torch.nn.Parameter(p.detach().clone()) for p in params[25:]], "lr": 1e-3},
        ],
        lr=1e-2,
        rank=2,
        foreach=False,
    )  # the per-tensor path, which step_param uses: bit-identical results
    ref_params = [p for g in reference.param_groups for p in g["params"]]
    for p, q in zip(params, ref_params):
        q.grad = p.grad.clone()
    reference.step()

    class Counting(list):
        iterations = 0

        def __iter__(self):
            Counting.iterations += 1
            return super().__iter__()

    for group in opt.param_groups:
        group["params"] = Counting(group["params"])
    for p in reversed(params):
        opt.step_param(p)
    assert Counting.iterations == 0
    for p, q in zip(params, ref_params):
        assert torch.equal(p, q)
    assert opt.state[params[30]]["seed"] == reference.state[ref_params[30]]["seed"]
    with pytest.raises(ValueError, match="not in this optimizer"):
        opt.step_param(torch.nn.Parameter(torch.randn(2)))


def test_no_warnings_on_plain_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trained()


# ---- the documented overflow bound of the skip rule (docs/algorithm.md section 9) ----------------


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


# ---- momentum-cycling schedulers, as documented in the README ------------------------------------


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
    params, opt = _trained(steps=0)
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
