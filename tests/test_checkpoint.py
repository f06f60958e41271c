"""Checkpoints: weights_only loading, bit-exact resume across resamples, dtype guards, the format
marker, and the one table of bad inputs to load_state_dict (foreign, hand-edited and mismatched
state)."""

import copy

import pytest

torch = pytest.importorskip("torch")

from _trained import roundtrip, trained  # noqa: E402

import flora_opt  # noqa: E402


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Embedding(300, 48), torch.nn.Linear(48, 160), torch.nn.GELU(), torch.nn.Linear(160, 300)
    )
    return model.to(dtype)


def _batches(n):
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, 300, (4, 12), generator=gen) for _ in range(n)]


def _train(model, opt, batches):
    for tokens in batches:
        logits = model(tokens[:, :-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 300), tokens[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


CONFIGS = [
    dict(rank=16, kappa=3),
    dict(rank=16, kappa=3, quantization=True),
    dict(rank=None),
    dict(rank=16, kappa=2, beta1=None, factorize_second_moment=False),
]


@pytest.mark.parametrize("options", CONFIGS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_resume_is_bit_exact_across_a_resample(options, dtype):
    if options.get("quantization"):
        pytest.importorskip("torchao")
    batches = _batches(8)
    model = _model(dtype)
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, min_dim_size_to_factor=32, **options)
    _train(model, opt, batches[:4])  # kappa=3: step 4 resampled; step 7 will resample again
    model_state = roundtrip(model.state_dict())
    opt_state = roundtrip(opt.state_dict())
    _train(model, opt, batches[4:])

    resumed = _model(dtype)
    resumed.load_state_dict(model_state)
    resumed_opt = flora_opt.Flora(resumed.parameters(), lr=1e-2, min_dim_size_to_factor=32, **options)
    resumed_opt.load_state_dict(opt_state)
    for p in resumed.parameters():  # no state was downcast to the parameter dtype
        for key, value in resumed_opt.state[p].items():
            if isinstance(value, torch.Tensor):
                assert value.dtype in (torch.float32, torch.uint8), key
    _train(resumed, resumed_opt, batches[4:])
    for a, b in zip(model.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(model.parameters(), resumed.parameters()):
        for key, value in opt.state[a].items():
            other = resumed_opt.state[b][key]
            assert torch.equal(value, other) if isinstance(value, torch.Tensor) else value == other


def test_state_dict_holds_only_tensors_and_plain_values():
    model = _model()
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    _train(model, opt, _batches(1))
    sd = opt.state_dict()
    for entry in sd["state"].values():
        for key, value in entry.items():
            assert isinstance(value, (torch.Tensor, int)) and not isinstance(value, bool), (key, type(value))
    for group in sd["param_groups"]:
        for key, value in group.items():
            assert isinstance(value, (int, float, bool, str, tuple, list, type(None))), key
    assert roundtrip(sd)["param_groups"][0]["rank"] == 16


def test_bf16_state_dict_keeps_fp32_compressed_state_after_load():
    model = _model(torch.bfloat16)
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    _train(model, opt, _batches(2))
    sd = roundtrip(opt.state_dict())
    fresh = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    fresh.load_state_dict(sd)
    weight = model[1].weight
    assert weight.dtype == torch.bfloat16
    assert fresh.state[weight]["exp_avg"].dtype == torch.float32
    assert torch.equal(fresh.state[weight]["exp_avg"], opt.state[weight]["exp_avg"])
    # the plain torch.optim.Optimizer would have downcast it
    plain = torch.optim.Optimizer.load_state_dict
    other = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    plain(other, roundtrip(opt.state_dict()))
    assert other.state[weight]["exp_avg"].dtype == torch.bfloat16


def test_old_checkpoints_without_new_options_load():
    model = _model()
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    _train(model, opt, _batches(1))
    sd = roundtrip(opt.state_dict())
    for group in sd["param_groups"]:
        del group["min_dim_size_to_factor"]
    fresh = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["min_dim_size_to_factor"] == 128
    _train(model, fresh, _batches(1))


def test_state_dict_carries_a_format_marker_and_old_checkpoints_without_it_load():
    params, opt = trained(kappa=2, steps=5)
    sd = roundtrip(opt.state_dict())
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


def test_saved_options_that_keep_the_layout_win_as_in_torch():
    params, opt = trained(kappa=5)
    sd = roundtrip(opt.state_dict())
    other = flora_opt.Flora(params, lr=1e-4, rank=8, kappa=7, weight_decay=0.1)
    other.load_state_dict(sd)
    assert other.param_groups[0]["lr"] == 1e-2 and other.param_groups[0]["kappa"] == 5
    assert other.param_groups[0]["weight_decay"] == 0.0


# ---- bad state: load_state_dict refuses it and loads nothing ------------------------------------


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
        _, opt = trained()
        sd = roundtrip(opt.state_dict())
        target = sd
        for key in path[:-1]:
            target = target[key]
        if value is KeyError:
            del target[path[-1]]
        else:
            target[path[-1]] = value
        return sd

    return edit


def _saved(params):
    return roundtrip(trained()[1].state_dict())


def _model_checkpoint_with_groups(change):
    """The model's checkpoint after one step at rank=16, its groups' options edited."""

    def make(params):
        model = _model()
        opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
        _train(model, opt, _batches(1))
        sd = roundtrip(opt.state_dict())
        for group in sd["param_groups"]:
            group.update(change)
        return sd

    return make


def _flora(**options):
    """Builds the optimizer that loads: on fresh (20, 30) and (30,) parameters by default."""

    def build():
        if options.get("quantization"):
            pytest.importorskip("torchao")
        params = [torch.nn.Parameter(torch.randn(20, 30)), torch.nn.Parameter(torch.randn(30))]
        return flora_opt.Flora(params, **{"lr": 1e-2, "rank": 8, **options})

    return build


def _flora_on(module):
    """Builds the optimizer that loads on ``module()``'s parameters, at rank=16."""
    return lambda: flora_opt.Flora(module().parameters(), lr=1e-2, rank=16)


def _other_model():
    return torch.nn.Sequential(
        torch.nn.Embedding(300, 48), torch.nn.Linear(48, 200), torch.nn.Linear(200, 300), torch.nn.Linear(1, 1)
    )


def _wrong_shapes_model():
    return torch.nn.Sequential(
        torch.nn.Embedding(300, 48), torch.nn.Linear(48, 200), torch.nn.GELU(), torch.nn.Linear(200, 300)
    )


def _layout_disagreement(option, value):
    """A checkpoint saved at rank=8 loaded by an optimizer built with another layout option."""
    pattern = rf"group 0 was saved with {option}=.* this optimizer was built with {option}={value!r}"
    return (f"built with {option}={value}", _saved, pattern, _flora(**{option: value}))


# foreign and hand-edited state dicts, loaded by Flora(lr=1e-2, rank=8) on (20, 30) and (30,):
# (name, make the state dict from two parameters, message)
FOREIGN_AND_EDITED = [
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

# state dicts that do not fit the optimizer that loads them:
# (name, make the state dict, message, build the optimizer that loads it)
MISMATCHED = [
    # the state does not fit the layout its groups name
    (
        "groups say rank=8",
        _model_checkpoint_with_groups(dict(rank=8)),
        r"'exp_avg' should be \(160, 8\)",
        _flora_on(_model),
    ),
    (
        "groups say quantization",
        _model_checkpoint_with_groups(dict(quantization=True)),
        r"'exp_avg_codes' should be",
        _flora_on(_model),
    ),
    (
        "groups say unfactored",
        _model_checkpoint_with_groups(dict(factorize_second_moment=False)),
        r"'exp_avg_sq' should be",
        _flora_on(_model),
    ),
    # another model
    ("more parameters", _model_checkpoint_with_groups({}), "parameters", _flora_on(_other_model)),
    ("other shapes", _model_checkpoint_with_groups({}), "cannot load Flora state", _flora_on(_wrong_shapes_model)),
    # the constructor and the checkpoint disagree on the layout
    _layout_disagreement("rank", 4),
    _layout_disagreement("quantization", True),
    _layout_disagreement("factorize_second_moment", False),
    _layout_disagreement("beta1", None),
    _layout_disagreement("min_dim_size_to_factor", 8),
    _layout_disagreement("max_aspect_ratio", None),
]

LOAD_BAD = [(*row, _flora()) for row in FOREIGN_AND_EDITED] + MISMATCHED


@pytest.mark.parametrize("name,make,pattern,build", LOAD_BAD, ids=[b[0] for b in LOAD_BAD])
def test_load_state_dict_table_of_bad_inputs(name, make, pattern, build):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(20, 30)), torch.nn.Parameter(torch.randn(30))]
    sd = make(params)
    opt = build()
    groups_before = copy.deepcopy([{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    # nothing was loaded
    assert [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups] == groups_before
    assert len(opt.state) == 0


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
