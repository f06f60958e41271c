"""PyTorch's generic optimizer contract, checked for ``flora_opt.Flora``.

The structure of torch's own optimizer tests (``TestOptimRenewed`` in torch's
``test/test_optim.py``, which does not ship with torch): an ``OptimizerInfo`` from
``torch.testing._internal.common_optimizers`` describes Flora (its configurations, the LR
schedulers it runs with, its implementations ``foreach=False``/``True``, and its bad inputs:
torch's table for every optimizer plus Flora's), and each test checks one generic property for
every configuration, in each implementation. Torch's comparison helpers assume every state value
is a tensor; Flora's per-tensor counters (``step``, ``seed``, ``skipped_steps``, ``projection``)
are Python ints (docs/algorithm.md section 11), so states are compared with :func:`assert_states_equal`.
"""

import copy
import io
import math
import pickle
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.optim.lr_scheduler import ReduceLROnPlateau  # noqa: E402
from torch.optim.optimizer import (  # noqa: E402
    register_optimizer_step_post_hook,
    register_optimizer_step_pre_hook,
)
from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

import flora_opt  # noqa: E402


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors of a few thousand elements: one thread is faster, and immune to a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The parameters of the generic tests: a weight whose states are compressed (rank 8 < 64),
# factored (min_dim_size_to_factor 8 <= 64) or 8-bit (4608 >= 4096 elements) as the
# configuration says, and a vector.
ROWS, COLS = 64, 72


def optim_inputs_func_flora(device, dtype=None):
    """Flora's configurations (without ``foreach``, which the test helpers add, as torch's do)."""
    return [
        OptimizerInput(params=None, kwargs=dict(lr=1e-2, rank=8), desc="compressed momentum"),
        OptimizerInput(
            params=None,
            kwargs=dict(lr=1e-2, rank=8, min_dim_size_to_factor=8),
            desc="compressed momentum, factored second moment",
        ),
        OptimizerInput(params=None, kwargs=dict(lr=1e-2, rank=None), desc="full momentum"),
        OptimizerInput(params=None, kwargs=dict(lr=1e-2, beta1=None, min_dim_size_to_factor=8), desc="no momentum"),
        OptimizerInput(
            params=None,
            kwargs=dict(lr=1e-2, rank=16, kappa=8, min_dim_size_to_factor=8),
            desc="small kappa: a resample every 8 steps",
        ),
        OptimizerInput(
            params=None,
            kwargs=dict(lr=1e-2, rank=None, quantization=True),
            desc="8-bit momentum and second moment",
        ),
        OptimizerInput(params=None, kwargs=dict(lr=1e-2, rank=8, weight_decay=0.1), desc="weight decay"),
        OptimizerInput(params=None, kwargs=dict(lr=1e-2, rank=8, scale_parameter=False), desc="no parameter scale"),
        OptimizerInput(
            params=None, kwargs=dict(lr=1e-2, rank=8, projection_dtype="bfloat16"), desc="bfloat16 products"
        ),
    ]


def _complex_parameter(device):
    param = torch.nn.Parameter(torch.randn(4, 6, device=device, dtype=torch.complex64))
    param.grad = torch.randn_like(param)
    return param


def _error(params, kwargs, desc, error_type, pattern, on=OptimizerErrorEnum.CONSTRUCTION_ERROR):
    return ErrorOptimizerInput(
        OptimizerInput(params=params, kwargs=kwargs, desc=desc), error_type=error_type, error_regex=pattern, error_on=on
    )


def optim_error_inputs_func_flora(device, dtype):
    """torch's bad inputs for every optimizer (with an ``lr``: Flora has no default one), then
    Flora's: the one table of bad constructor arguments, with the message each must raise."""
    inputs = []
    for error_input in get_error_inputs_for_all_optims(device, dtype):
        optim_input = error_input.optimizer_error_input
        optim_input.kwargs = {"lr": 1e-3, **optim_input.kwargs}
        inputs.append(error_input)
    bad = [
        (dict(lr=-1e-3), ValueError, r"Invalid lr: -0\.001"),
        (dict(lr=float("nan")), ValueError, r"Invalid lr: nan"),
        (dict(lr=np.float32("nan")), ValueError, r"Invalid lr: (np\.float32\()?nan"),
        (dict(lr=None), ValueError, r"Invalid lr: None: pass a learning rate"),
        (dict(lr="0.1"), ValueError, r"Invalid lr: '0\.1'"),
        (dict(lr=True), ValueError, r"Invalid lr: True"),
        (dict(lr=torch.tensor([1e-3, 1e-3])), ValueError, r"Invalid lr: Tensor lr must be 1-element, got shape \(2,\)"),
        (dict(rank=0), ValueError, r"Invalid rank: 0"),
        (dict(rank=-3), ValueError, r"Invalid rank: -3"),
        (dict(rank=2.5), ValueError, r"Invalid rank: 2\.5"),
        (dict(rank=np.bool_(True)), ValueError, r"Invalid rank: (np\.)?(True|bool)"),
        (dict(rank=np.float64(4.0)), ValueError, r"Invalid rank: (np\.float64\()?4\.0"),
        (dict(kappa=0), ValueError, r"Invalid kappa: 0"),
        (dict(kappa=1.5), ValueError, r"Invalid kappa: 1\.5"),
        (dict(kappa=np.int64(0)), ValueError, r"Invalid kappa: (np\.int64\()?0"),
        (dict(beta1=1.0), ValueError, r"Invalid beta1: 1\.0"),
        (dict(beta1=-0.1), ValueError, r"Invalid beta1: -0\.1"),
        (dict(beta1=float("nan")), ValueError, r"Invalid beta1: nan"),
        (dict(decay_rate=0.0), ValueError, r"Invalid decay_rate: 0\.0"),
        (dict(decay_rate=0.8), ValueError, r"Invalid decay_rate: 0\.8"),
        (dict(decay_rate=-math.inf), ValueError, r"Invalid decay_rate: -inf: must be a finite float < 0"),
        (dict(decay_rate=float("nan")), ValueError, r"Invalid decay_rate: nan"),
        (dict(clip_threshold=0.0), ValueError, r"Invalid clip_threshold: 0\.0"),
        (dict(clip_threshold=-1.0), ValueError, r"Invalid clip_threshold: -1\.0"),
        (dict(clip_threshold=math.inf), ValueError, r"Invalid clip_threshold: inf"),
        (dict(eps=(0.0, 1e-3)), ValueError, r"Invalid eps value at index 0: 0\.0"),
        (dict(eps=(1e-30, -1e-3)), ValueError, r"Invalid eps value at index 1: -0\.001"),
        (dict(eps=(1e-30, math.inf)), ValueError, r"Invalid eps value at index 1: inf"),
        (dict(eps=1e-3), ValueError, r"Invalid eps: 0\.001"),
        (dict(eps=(1e-30,)), ValueError, r"Invalid eps: \(1e-30,\): expected a tuple \(eps1, eps2\) of 2 floats"),
        (dict(eps=(1e-30, 0.0)), ValueError, r"Invalid eps value at index 1: 0\.0: must be a finite float > 0"),
        (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay: -0\.1"),
        (dict(weight_decay=math.inf), ValueError, r"Invalid weight_decay: inf"),
        (dict(scale_parameter=1), ValueError, r"Invalid scale_parameter: 1: must be a bool"),
        (dict(lr=None, relative_step=True, warmup_init=True, seed=-1), ValueError, r"Invalid seed: -1"),
        (dict(seed=2**32), ValueError, r"Invalid seed: 4294967296"),
        (dict(relative_step=True), ValueError, r"Invalid lr: 0\.001: lr must be None when relative_step=True"),
        (dict(warmup_init=True), ValueError, r"Invalid warmup_init: True requires relative_step=True"),
        (dict(quantization="yes"), ValueError, r"Invalid quantization: 'yes'"),
        (dict(min_dim_size_to_factor=0), ValueError, r"Invalid min_dim_size_to_factor: 0"),
        (dict(max_aspect_ratio=0.5), ValueError, r"Invalid max_aspect_ratio: 0\.5"),
        (dict(max_aspect_ratio="4"), ValueError, r"Invalid max_aspect_ratio: '4'"),
        (
            dict(max_aspect_ratio=math.inf),
            ValueError,
            r"Invalid max_aspect_ratio: inf: must be a finite float >= 1, or None",
        ),
        (
            dict(projection_dtype="float16"),
            ValueError,
            r"Invalid projection_dtype: 'float16': must be one of 'float32', 'bfloat16'",
        ),
        (
            dict(projection_dtype="bf16"),
            ValueError,
            r"Invalid projection_dtype: 'bf16': must be one of 'float32', 'bfloat16'",
        ),
        (
            dict(projection_dtype=torch.bfloat16),
            ValueError,
            r"Invalid projection_dtype: torch\.bfloat16: must be one of 'float32', 'bfloat16'",
        ),
        (
            dict(projection_dtype=None),
            ValueError,
            r"Invalid projection_dtype: None: must be one of 'float32', 'bfloat16'",
        ),
        (dict(foreach=1), ValueError, r"Invalid foreach: 1: must be a bool"),
        (dict(betas=(0.9, 0.99)), TypeError, r"unexpected keyword argument 'betas'"),
        (dict(momentum=0.9), TypeError, r"unexpected keyword argument 'momentum'"),
        (dict(ranks=4), TypeError, r"unexpected keyword argument 'ranks'"),
    ]
    for kwargs, error_type, pattern in bad:
        inputs.append(_error(None, {"lr": 1e-3, **kwargs}, f"{kwargs}", error_type, pattern))
    inputs += [
        _error(
            [_complex_parameter(device)],
            dict(lr=1e-3),
            "complex parameters",
            ValueError,
            r"Flora does not support complex parameters \(shape \(4, 6\), torch\.complex64\)",
        ),
        _error(
            [{"params": [torch.nn.Parameter(torch.randn(3, 3, device=device))], "rank": 0}],
            dict(lr=1e-3),
            "a bad option in a param group",
            ValueError,
            r"Invalid rank: 0",
        ),
        _error(
            [{"params": [torch.nn.Parameter(torch.randn(3, 3, device=device))], "ranks": 2}],
            dict(lr=1e-3),
            "an unknown option in a param group",
            TypeError,
            r"unexpected option\(s\) 'ranks'",
        ),
        _error(
            [{"params": [torch.nn.Parameter(torch.randn(3, 3, device=device))]}],
            dict(),
            "a param group without lr, and no lr for the optimizer",
            ValueError,
            r"Invalid lr: None: pass a learning rate",
        ),
        _error(
            [torch.nn.Parameter(torch.randn(3, 3, device=device))],
            dict(lr=torch.tensor([[1e-3]]).expand(1, 2)),
            "a tensor lr of shape (1, 2)",
            ValueError,
            r"Tensor lr must be 1-element",
        ),
        _error(
            [_sparse_gradient_parameter(device)],
            dict(lr=1e-3),
            "a sparse gradient",
            RuntimeError,
            r"Flora does not support sparse gradients \(parameter of shape \(5, 3\)\)",
            OptimizerErrorEnum.STEP_ERROR,
        ),
        _error(
            [_sparse_gradient_parameter(device)],
            dict(lr=1e-3, foreach=False),
            "a sparse gradient, per-tensor step",
            RuntimeError,
            r"Flora does not support sparse gradients",
            OptimizerErrorEnum.STEP_ERROR,
        ),
    ]
    return inputs


def _sparse_gradient_parameter(device):
    param = torch.nn.Parameter(torch.randn(5, 3, device=device))
    param.grad = torch.randn(5, 3, device=device).to_sparse()
    return param


# add_param_group: the option of the group, and the message. A failed call leaves the optimizer as
# it was (test_failed_add_param_group_changes_nothing).
ADD_PARAM_GROUP_ERRORS = [
    (dict(lr=float("nan")), ValueError, r"Invalid lr: nan"),
    (dict(lr=None), ValueError, r"Invalid lr: None: pass a learning rate"),
    (dict(rank=0), ValueError, r"Invalid rank: 0"),
    (dict(kappa=-1), ValueError, r"Invalid kappa: -1"),
    (dict(decay_rate=-math.inf), ValueError, r"Invalid decay_rate: -inf"),
    (dict(beta1=1.5), ValueError, r"Invalid beta1: 1\.5"),
    (dict(seed=2**40), ValueError, r"Invalid seed: 1099511627776"),
    (dict(relative_step=True), ValueError, r"Invalid lr: 0\.01: lr must be None when relative_step=True"),
    (dict(ranks=2), TypeError, r"Flora param group got unexpected option\(s\) 'ranks'"),
    (dict(params=[torch.nn.Parameter(torch.randn(3, dtype=torch.complex64))]), ValueError, r"complex parameters"),
]


FLORA_INFO = OptimizerInfo(
    flora_opt.Flora,
    optim_inputs_func=optim_inputs_func_flora,
    optim_error_inputs_func=optim_error_inputs_func_flora,
    supported_impls=("foreach",),
    not_og_supported_flags=(),
    supports_complex=False,
    supports_sparse=False,
)

DEVICE = "cpu"


def all_inputs():
    """Every configuration in each implementation: ``foreach=False`` (per tensor) and ``True``
    (grouped). torch's helper adds ``foreach=True`` only on devices with foreach kernels (not the
    CPU); Flora's grouped step runs on every device, so both are always tested."""
    inputs = []
    for optim_input in FLORA_INFO.optim_inputs_func(DEVICE):
        for flag in FLORA_INFO.supported_impls:
            for value in (False, True):
                desc = optim_input.desc + (f" & {flag}" if value else "")
                inputs.append(OptimizerInput(params=None, kwargs={**optim_input.kwargs, flag: value}, desc=desc))
    return inputs


def _ids(inputs):
    return [f"{i}:{optim_input.desc}" for i, optim_input in enumerate(inputs)]


INPUTS = all_inputs()
configurations = pytest.mark.parametrize("optim_input", INPUTS, ids=_ids(INPUTS))
ERRORS = optim_error_inputs_func_flora(DEVICE, torch.float32)


# ---- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error_input", ERRORS, ids=[f"{i}:{e.optimizer_error_input.desc}" for i, e in enumerate(ERRORS)]
)
def test_errors(error_input):
    optim_input = error_input.optimizer_error_input
    params = optim_input.params
    if params is None:
        params = [torch.nn.Parameter(torch.randn(3, 3))]
    if error_input.error_on == OptimizerErrorEnum.CONSTRUCTION_ERROR:
        if issubclass(error_input.error_type, Warning):
            with pytest.warns(error_input.error_type, match=error_input.error_regex):
                flora_opt.Flora(params, **optim_input.kwargs)
        else:
            with pytest.raises(error_input.error_type, match=error_input.error_regex):
                flora_opt.Flora(params, **optim_input.kwargs)
    else:
        optimizer = flora_opt.Flora(params, **optim_input.kwargs)
        with pytest.raises(error_input.error_type, match=error_input.error_regex):
            optimizer.step()


# ---- the problem every generic test solves ------------------------------------------------------


def _weight_bias_input(dtype=torch.float32, contiguous=True, seed=0):
    generator = torch.Generator().manual_seed(seed)
    if contiguous:
        weight = torch.randn(ROWS, COLS, generator=generator).to(dtype)
        bias = torch.randn(ROWS, generator=generator).to(dtype)
    else:
        weight = torch.randn(ROWS, COLS, 2, generator=generator).to(dtype)[..., 0]
        bias = torch.randn(ROWS, 2, generator=generator).to(dtype)[..., 0]
    x = torch.randn(COLS, generator=generator).to(dtype)
    return torch.nn.Parameter(weight), torch.nn.Parameter(bias), x


def _loss(weight, bias, x):
    return (weight.mv(x) + bias).pow(2).sum()


def _train(optimizer, weight, bias, x, steps, schedulers=()):
    """``steps`` steps on the loss; returns the last loss (before the last step)."""
    loss = None
    for _ in range(steps):
        optimizer.zero_grad()
        loss = _loss(weight, bias, x)
        loss.backward()
        optimizer.step()
        for scheduler in schedulers:
            if isinstance(scheduler, ReduceLROnPlateau):
                scheduler.step(loss.item())
            else:
                scheduler.step()
    return loss.item()


def _copies(weight, bias):
    return torch.nn.Parameter(weight.detach().clone()), torch.nn.Parameter(bias.detach().clone())


def assert_states_equal(mine, theirs, exact=True, rtol=0.0, atol=0.0):
    """Two ``state_dict()``s (or two ``optimizer.state`` mappings) hold the same values: tensors
    equal (or close), everything else (Flora's integer counters, the options) equal."""
    assert type(mine) is type(theirs) or (isinstance(mine, dict) and isinstance(theirs, dict))
    if isinstance(mine, torch.Tensor):
        if exact or not mine.is_floating_point():
            assert mine.dtype == theirs.dtype and mine.shape == theirs.shape
            assert torch.equal(mine, theirs)
        else:
            torch.testing.assert_close(mine, theirs, rtol=rtol, atol=atol)
    elif isinstance(mine, dict):
        assert mine.keys() == theirs.keys()
        for key in mine:
            assert_states_equal(mine[key], theirs[key], exact, rtol, atol)
    elif isinstance(mine, (list, tuple)):
        assert len(mine) == len(theirs)
        for a, b in zip(mine, theirs):
            assert_states_equal(a, b, exact, rtol, atol)
    else:
        assert mine == theirs


def _by_position(optimizer):
    """The per-tensor state of ``optimizer`` keyed by the tensor's position (as in state_dict())."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return {index: optimizer.state[p] for index, p in enumerate(params) if p in optimizer.state}


# ---- the configurations hold the state they are named after --------------------------------------

EXPECTED_WEIGHT_STATE = {
    "compressed momentum": {"exp_avg": (8, COLS), "exp_avg_sq": (ROWS, COLS)},
    "compressed momentum, factored second moment": {
        "exp_avg": (8, COLS),
        "exp_avg_sq_row": (ROWS,),
        "exp_avg_sq_col": (COLS,),
    },
    "full momentum": {"exp_avg": (ROWS, COLS), "exp_avg_sq": (ROWS, COLS)},
    "no momentum": {"exp_avg_sq_row": (ROWS,), "exp_avg_sq_col": (COLS,)},
    "small kappa: a resample every 8 steps": {
        "exp_avg": (16, COLS),
        "exp_avg_sq_row": (ROWS,),
        "exp_avg_sq_col": (COLS,),
    },
    "8-bit momentum and second moment": {
        "exp_avg_codes": (ROWS * COLS,),
        "exp_avg_absmax": (ROWS * COLS // 256,),
        "exp_avg_sq_codes": (ROWS * COLS,),
        "exp_avg_sq_absmax": (ROWS * COLS // 256,),
    },
}


@configurations
def test_configurations_hold_the_state_they_are_named_after(optim_input):
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    _train(optimizer, weight, bias, x, 1)
    tensors = {key: tuple(value.shape) for key, value in optimizer.state[weight].items() if torch.is_tensor(value)}
    expected = EXPECTED_WEIGHT_STATE.get(
        optim_input.desc.removesuffix(" & foreach"), EXPECTED_WEIGHT_STATE["compressed momentum"]
    )
    assert tensors == expected


# ---- the direction of the steps --------------------------------------------------------------------


@configurations
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
def test_forloop_goes_right_direction(optim_input, contiguous):
    weight, bias, x = _weight_bias_input(contiguous=contiguous)
    assert weight.is_contiguous() == contiguous
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    initial = _loss(weight, bias, x).item()
    _train(optimizer, weight, bias, x, 20)
    assert _loss(weight, bias, x).item() < initial


@configurations
@pytest.mark.parametrize("schedulers", FLORA_INFO.scheduler_inputs, ids=["StepLR+ReduceLROnPlateau"])
def test_forloop_goes_right_direction_with_lr_schedulers(optim_input, schedulers):
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    made = [make(optimizer) for make in schedulers]
    initial = _loss(weight, bias, x).item()
    _train(optimizer, weight, bias, x, 20, made)
    assert _loss(weight, bias, x).item() < initial
    assert optimizer.param_groups[0]["lr"] < optim_input.kwargs["lr"]  # StepLR: gamma 0.9 every 10 steps


@configurations
def test_param_group_with_lr_scheduler_goes_right_direction(optim_input):
    kwargs = dict(optim_input.kwargs)
    lr = kwargs.pop("lr")
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora([{"params": [weight]}, {"params": [bias], "lr": lr / 2}], lr=lr, **kwargs)
    scheduler = torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.95)
    initial = _loss(weight, bias, x).item()
    _train(optimizer, weight, bias, x, 20, [scheduler])
    assert _loss(weight, bias, x).item() < initial
    assert optimizer.param_groups[1]["lr"] == pytest.approx(lr / 2 * 0.95**20)


@configurations
def test_tensor_lr_takes_the_same_steps_as_a_float(optim_input):
    kwargs = dict(optim_input.kwargs)
    lr = kwargs.pop("lr")
    weight, bias, x = _weight_bias_input()
    other = _copies(weight, bias)
    optimizer = flora_opt.Flora([weight, bias], lr=lr, **kwargs)
    tensor_lr = flora_opt.Flora(list(other), lr=torch.tensor(lr), **kwargs)
    _train(optimizer, weight, bias, x, 5)
    _train(tensor_lr, *other, x, 5)
    assert torch.equal(weight, other[0]) and torch.equal(bias, other[1])


@pytest.mark.parametrize("group,error,pattern", ADD_PARAM_GROUP_ERRORS, ids=[str(e[0]) for e in ADD_PARAM_GROUP_ERRORS])
def test_failed_add_param_group_changes_nothing(group, error, pattern):
    a = torch.nn.Parameter(torch.randn(4, 4))
    b = torch.nn.Parameter(torch.randn(4, 4))
    optimizer = flora_opt.Flora([a], lr=1e-2)
    with pytest.raises(error, match=pattern):
        optimizer.add_param_group({"params": [b], **group})
    assert len(optimizer.param_groups) == 1
    b_before = b.detach().clone()
    a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    optimizer.step()
    assert torch.equal(b, b_before) and torch.isfinite(a).all()
    optimizer.add_param_group({"params": [b], "lr": 1e-3})  # the same parameter, valid options
    assert len(optimizer.param_groups) == 2


# ---- per-group options -----------------------------------------------------------------------------


@configurations
def test_param_groups_lr(optim_input):
    """A group's lr is the one used: groups with their own lr, the optimizer's a tiny one or none."""
    kwargs = dict(optim_input.kwargs)
    lr = kwargs.pop("lr")
    for outer in (dict(lr=1e-28), dict()):
        weight, bias, x = _weight_bias_input()
        irrelevant = torch.nn.Parameter(torch.randn(2, 2))
        irrelevant_before = irrelevant.detach().clone()
        optimizer = flora_opt.Flora(
            [
                {"params": [weight], "lr": lr, **kwargs},
                {"params": [bias], "lr": lr, **kwargs},
                {"params": [irrelevant], "lr": 1e-3},
            ],
            **outer,
        )
        initial = _loss(weight, bias, x).item()
        _train(optimizer, weight, bias, x, 10)
        assert _loss(weight, bias, x).item() < initial
        assert torch.equal(irrelevant, irrelevant_before)  # no gradient: untouched
        assert irrelevant not in optimizer.state


@configurations
def test_param_groups_weight_decay(optim_input):
    kwargs = dict(optim_input.kwargs)
    weight_decay = kwargs.pop("weight_decay", 0.1)
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora(
        [{"params": [weight], "weight_decay": weight_decay}, {"params": [bias], "weight_decay": 0.0}], **kwargs
    )
    initial = _loss(weight, bias, x).item()
    _train(optimizer, weight, bias, x, 20)
    assert _loss(weight, bias, x).item() < initial


@configurations
def test_each_group_takes_the_steps_of_its_own_options(optim_input):
    """A group with the configuration and a group with other options step exactly as two
    optimizers would (the weight keeps its position, so its projection seed)."""
    kwargs = dict(optim_input.kwargs)
    lr = kwargs.pop("lr")
    weight, bias, x = _weight_bias_input()
    alone_weight, alone_bias = _copies(weight, bias)
    other = dict(lr=3e-3, rank=None, beta1=None, weight_decay=0.05, foreach=kwargs["foreach"])
    optimizer = flora_opt.Flora([{"params": [weight], "lr": lr, **kwargs}, {"params": [bias], **other}], lr=1e-2)
    separate = [flora_opt.Flora([alone_weight], lr=lr, **kwargs), flora_opt.Flora([alone_bias], **other)]
    for _ in range(6):
        for opt in [optimizer, *separate]:
            opt.zero_grad()
        _loss(weight, bias, x).backward()
        _loss(alone_weight, alone_bias, x).backward()
        optimizer.step()
        for opt in separate:
            opt.step()
    assert torch.equal(weight, alone_weight) and torch.equal(bias, alone_bias)
    assert_states_equal(optimizer.state[weight], separate[0].state[alone_weight])
    bias_state = dict(optimizer.state[bias])
    # the bias's projection seed depends on its position (1, and 0 alone); a vector uses none
    assert bias_state.pop("seed") != separate[1].state[alone_bias]["seed"]
    assert_states_equal(bias_state, {k: v for k, v in separate[1].state[alone_bias].items() if k != "seed"})


# ---- gradients: zero, missing, never written ---------------------------------------------------------


@configurations
def test_step_is_noop_when_params_have_no_grad(optim_input):
    weight, bias, _ = _weight_bias_input()
    before = _copies(weight, bias)
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    for _ in range(3):
        optimizer.step()
    assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])
    assert len(optimizer.state) == 0
    assert optimizer.state_dict()["state"] == {}


@configurations
def test_step_is_noop_for_zero_grads(optim_input):
    """Zero gradients from a fresh state leave the parameters as they are (without weight decay,
    which shrinks them by exactly ``1 - eta_t weight_decay``), and count the steps."""
    weight, bias, _ = _weight_bias_input()
    before = _copies(weight, bias)
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    for _ in range(3):
        weight.grad, bias.grad = torch.zeros_like(weight), torch.zeros_like(bias)
        optimizer.step()
    optimizer.synchronize()
    assert [optimizer.state[p]["step"] for p in (weight, bias)] == [3, 3]
    if optim_input.kwargs.get("weight_decay", 0.0) == 0.0:
        assert torch.equal(weight, before[0]) and torch.equal(bias, before[1])
    else:
        assert (weight.abs() <= before[0].abs()).all() and not torch.equal(weight, before[0])


@configurations
def test_missing_gradients_skip_only_their_tensors(optim_input):
    weight, bias, x = _weight_bias_input()
    bias_before = bias.detach().clone()
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    initial = _loss(weight, bias, x).item()
    for _ in range(5):
        optimizer.zero_grad()
        _loss(weight, bias, x).backward()
        bias.grad = None
        optimizer.step()
    assert torch.equal(bias, bias_before) and bias not in optimizer.state
    assert optimizer.state[weight]["step"] == 5
    assert _loss(weight, bias, x).item() < initial


@configurations
@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "non-contiguous"])
def test_step_does_not_modify_gradients(optim_input, contiguous):
    """The step reads ``.grad`` (the grouped step without a copy where it can) and never writes it."""
    weight, bias, x = _weight_bias_input(contiguous=contiguous)
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    for _ in range(4):
        optimizer.zero_grad()
        _loss(weight, bias, x).backward()
        if not contiguous:
            weight.grad = torch.randn(ROWS, COLS, 2)[..., 0]
        grads = [weight.grad.clone(), bias.grad.clone()]
        optimizer.step()
        assert torch.equal(weight.grad, grads[0]) and torch.equal(bias.grad, grads[1])


# ---- printing, copying ---------------------------------------------------------------------------


@configurations
def test_optimizer_can_be_printed(optim_input):
    weight, bias, _ = _weight_bias_input()
    optimizer = flora_opt.Flora([{"params": [weight]}, {"params": [bias], "rank": None}], **optim_input.kwargs)
    text = repr(optimizer)
    assert text.startswith("Flora (") and "Parameter Group 0" in text and "Parameter Group 1" in text
    assert f"rank: {optim_input.kwargs.get('rank', 256)}" in text and "rank: None" in text
    assert f"foreach: {optim_input.kwargs['foreach']}" in text


def _public_attributes(optimizer):
    return {key for key in optimizer.__dict__ if not key.startswith("_")}


@configurations
def test_deepcopy_copies_all_public_attributes_and_continues_identically(optim_input):
    """Also after a skipped step of the grouped engine, whose counts are only on the device
    until synchronized: the copy holds the exact counts."""
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    _train(optimizer, weight, bias, x, 3)
    optimizer.zero_grad()
    weight.grad, bias.grad = torch.full_like(weight, float("nan")), torch.zeros_like(bias)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the skipped step's warning
        optimizer.step()
        copied = copy.deepcopy(optimizer)
        pickled = pickle.loads(pickle.dumps(optimizer))
    assert _public_attributes(copied) == _public_attributes(optimizer)
    weight_copy, bias_copy = copied.param_groups[0]["params"]
    for clone in (copied, pickled):
        clone_weight = clone.param_groups[0]["params"][0]
        assert clone.state[clone_weight]["step"] == 3 and clone.state[clone_weight]["skipped_steps"] == 1
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _train(optimizer, weight, bias, x, 3)
        _train(copied, weight_copy, bias_copy, x, 3)
    assert torch.equal(weight, weight_copy) and torch.equal(bias, bias_copy)
    assert_states_equal(_by_position(optimizer), _by_position(copied))


# ---- state dicts ---------------------------------------------------------------------------------


def _roundtrip(state_dict, weights_only=True):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=weights_only)


@configurations
def test_state_dict_deterministic(optim_input):
    """Equal optimizers on equal (not identical) parameters have equal state dicts; a state dict
    loaded into the second continues exactly as the first; loading does not modify it."""
    weight, bias, x = _weight_bias_input()
    weight_c, bias_c = _copies(weight, bias)
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    optimizer_c = flora_opt.Flora([weight_c, bias_c], **optim_input.kwargs)
    _train(optimizer, weight, bias, x, 5)
    _train(optimizer_c, weight_c, bias_c, x, 5)
    assert_states_equal(optimizer.state_dict(), optimizer_c.state_dict())
    state_dict = copy.deepcopy(optimizer.state_dict())
    state_dict_c = copy.deepcopy(optimizer.state_dict())
    weight_c.data.copy_(weight)
    bias_c.data.copy_(bias)
    optimizer_c = flora_opt.Flora([weight_c, bias_c], **optim_input.kwargs)
    optimizer_c.load_state_dict(state_dict_c)
    assert_states_equal(state_dict, state_dict_c)  # not modified by loading
    for _ in range(5):
        _train(optimizer, weight, bias, x, 1)
        _train(optimizer_c, weight_c, bias_c, x, 1)
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    assert_states_equal(optimizer.state_dict(), optimizer_c.state_dict())


@configurations
def test_save_load_equality_with_weights_only(optim_input):
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    _train(optimizer, weight, bias, x, 5)
    loaded = _roundtrip(optimizer.state_dict())
    assert_states_equal(loaded, optimizer.state_dict())
    weight_c, bias_c = _copies(weight, bias)
    optimizer_c = flora_opt.Flora([weight_c, bias_c], **optim_input.kwargs)
    optimizer_c.load_state_dict(loaded)
    _train(optimizer, weight, bias, x, 5)
    _train(optimizer_c, weight_c, bias_c, x, 5)
    assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    assert_states_equal(optimizer.state_dict(), optimizer_c.state_dict())


@configurations
def test_state_dict_with_param_names(optim_input):
    """torch 2.x named parameters: groups keep ``param_names``; a named state dict resumes a named
    optimizer and an unnamed one alike."""
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora([("weight", weight), ("bias", bias)], **optim_input.kwargs)
    _train(optimizer, weight, bias, x, 4)
    state_dict = _roundtrip(optimizer.state_dict())
    assert state_dict["param_groups"][0]["param_names"] == ["weight", "bias"]
    resumed = []
    for named in (True, False):
        weight_c, bias_c = _copies(weight, bias)
        params = [("weight", weight_c), ("bias", bias_c)] if named else [weight_c, bias_c]
        optimizer_c = flora_opt.Flora(params, **optim_input.kwargs)
        optimizer_c.load_state_dict(copy.deepcopy(state_dict))
        assert optimizer_c.param_groups[0]["param_names"] == ["weight", "bias"]
        _train(optimizer_c, weight_c, bias_c, x, 3)
        resumed.append((weight_c, bias_c))
    _train(optimizer, weight, bias, x, 3)
    for weight_c, bias_c in resumed:
        assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)


@configurations
def test_can_load_older_state_dict(optim_input):
    """A checkpoint without the options added after it was written (their defaults keep the old
    behaviour) loads and steps, through ``load_state_dict`` and through ``__setstate__``
    (unpickling an optimizer), as torch's optimizers do with ``setdefault``."""
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    _train(optimizer, weight, bias, x, 3)
    defaults = flora_opt.hyperparams.DEFAULTS
    layout = set(flora_opt.hyperparams.LAYOUT_OPTIONS)
    older = optimizer.state_dict()
    dropped = [key for key, value in older["param_groups"][0].items() if key in defaults and key not in layout]
    # rank and kappa mark a Flora checkpoint (every format has them); lr has no default
    kept = {"lr", "rank", "kappa"}
    dropped = [key for key in dropped if key not in kept and older["param_groups"][0][key] == defaults[key]]
    assert {"eps", "clip_threshold", "decay_rate", "seed"} <= set(dropped)
    for group in older["param_groups"]:
        for key in dropped:
            del group[key]
    weight_c, bias_c = _copies(weight, bias)
    optimizer_c = flora_opt.Flora([weight_c, bias_c], **optim_input.kwargs)
    optimizer_c.load_state_dict(older)
    assert all(optimizer_c.param_groups[0][key] == defaults[key] for key in dropped)
    _train(optimizer, weight, bias, x, 3)
    _train(optimizer_c, weight_c, bias_c, x, 3)
    assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)

    pickled = optimizer.__getstate__()
    for group in pickled["param_groups"]:
        for key in dropped:
            del group[key]
    unpickled = flora_opt.Flora.__new__(flora_opt.Flora)
    unpickled.__setstate__(pickled)
    assert all(unpickled.param_groups[0][key] == defaults[key] for key in dropped)
    _train(unpickled, weight, bias, x, 1)


@configurations
def test_can_load_a_state_dict_of_fewer_tensors(optim_input):
    """A checkpoint taken before some tensors had a gradient holds no state for them: they start
    fresh at their first step, as in the run that wrote it."""
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    for _ in range(3):  # the bias has no gradient yet
        optimizer.zero_grad()
        _loss(weight, bias, x).backward()
        bias.grad = None
        optimizer.step()
    smaller = _roundtrip(optimizer.state_dict())
    assert list(smaller["state"]) == [0]
    weight_c, bias_c = _copies(weight, bias)
    optimizer_c = flora_opt.Flora([weight_c, bias_c], **optim_input.kwargs)
    optimizer_c.load_state_dict(smaller)
    assert bias_c not in optimizer_c.state
    _train(optimizer, weight, bias, x, 3)
    _train(optimizer_c, weight_c, bias_c, x, 3)
    assert torch.equal(weight, weight_c) and torch.equal(bias, bias_c)
    assert_states_equal(_by_position(optimizer), _by_position(optimizer_c))


# ---- hooks ---------------------------------------------------------------------------------------


@configurations
def test_step_hooks_run_in_order(optim_input):
    """Global pre-hooks, the optimizer's pre-hooks, the step, its post-hooks, global post-hooks."""
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    calls = []
    handles = [
        register_optimizer_step_pre_hook(lambda opt, args, kwargs: calls.append("global pre")),
        register_optimizer_step_post_hook(lambda opt, args, kwargs: calls.append("global post")),
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre")),
        optimizer.register_step_post_hook(lambda opt, args, kwargs: calls.append("post")),
        optimizer.register_step_pre_hook(lambda opt, args, kwargs: calls.append("pre 2")),
    ]
    try:
        _loss(weight, bias, x).backward()
        optimizer.step()
        assert calls == ["global pre", "pre", "pre 2", "post", "global post"]
        assert optimizer.state[weight]["step"] == 1
        handles[2].remove()
        optimizer.step()
        assert calls[5:] == ["global pre", "pre 2", "post", "global post"]
    finally:
        for handle in handles:
            handle.remove()


@configurations
def test_state_dict_hooks(optim_input):
    weight, bias, x = _weight_bias_input()
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    _train(optimizer, weight, bias, x, 2)
    calls = []
    optimizer.register_state_dict_pre_hook(lambda opt: calls.append("pre"))

    def post_hook(opt, state_dict):
        calls.append("post")
        state_dict["ran_state_dict_post_hook"] = True
        return state_dict

    optimizer.register_state_dict_post_hook(post_hook)
    state_dict = optimizer.state_dict()
    assert calls == ["pre", "post"] and state_dict["ran_state_dict_post_hook"]


@configurations
def test_load_state_dict_hooks(optim_input):
    """Pre-hooks adapt the dict before it is checked and loaded (here: torch's tensor ``step``
    convention converted to Flora's ints, and a new lr); post-hooks see the loaded state, its
    dtypes kept (float32 state for bfloat16 parameters)."""
    weight, bias, x = _weight_bias_input(dtype=torch.bfloat16)
    optimizer = flora_opt.Flora([weight, bias], **optim_input.kwargs)
    _train(optimizer, weight, bias, x, 3)
    state_dict = copy.deepcopy(optimizer.state_dict())
    for entry in state_dict["state"].values():
        entry["step"] = torch.tensor(float(entry["step"]))  # as torch.optim keeps it
    optimizer_c = flora_opt.Flora(list(_copies(weight, bias)), **optim_input.kwargs)
    calls = []

    def steps_as_ints(opt, loaded):
        calls.append("pre")
        loaded = dict(loaded, state={k: dict(v, step=int(v["step"])) for k, v in loaded["state"].items()})
        loaded["param_groups"] = [dict(group, lr=0.5) for group in loaded["param_groups"]]
        return loaded

    def first(opt, loaded):
        calls.append("pre, prepended")

    def post(opt):
        calls.append("post")
        dtypes = {value.dtype for state in opt.state.values() for value in state.values() if torch.is_tensor(value)}
        assert dtypes <= {torch.float32, torch.uint8}, dtypes  # the fp32 state, not cast to bfloat16
        assert [state["step"] for state in opt.state.values()] == [3, 3]

    optimizer_c.register_load_state_dict_pre_hook(steps_as_ints)
    optimizer_c.register_load_state_dict_pre_hook(first, prepend=True)
    optimizer_c.register_load_state_dict_post_hook(post)
    optimizer_c.load_state_dict(state_dict)
    assert calls == ["pre, prepended", "pre", "post"]
    assert optimizer_c.param_groups[0]["lr"] == 0.5
    assert isinstance(state_dict["state"][0]["step"], torch.Tensor)  # the caller's dict is untouched


# ---- the grouped step against the per-tensor loop --------------------------------------------------


@pytest.mark.parametrize(
    "optim_input", FLORA_INFO.optim_inputs_func(DEVICE), ids=[i.desc for i in FLORA_INFO.optim_inputs_func(DEVICE)]
)
def test_foreach_matches_forloop(optim_input):
    """float64 parameters, 17 steps (two resamples with the small kappa): the grouped step
    (``foreach=True``) and the per-tensor loop agree on parameters and state to float32 rounding
    (the math is float32; batched reductions sum in another order); integer state exactly."""
    params = []
    shapes = [(ROWS, COLS), (ROWS, COLS), (COLS, ROWS), (ROWS,), (5, 3, 8)]
    for index, shape in enumerate(shapes):
        params.append(torch.randn(shape, generator=torch.Generator().manual_seed(index), dtype=torch.float64))
    results = []
    for foreach in (False, True):
        tensors = [torch.nn.Parameter(p.clone()) for p in params]
        optimizer = flora_opt.Flora(tensors, **optim_input.kwargs, foreach=foreach)
        for step in range(17):
            for index, tensor in enumerate(tensors):
                generator = torch.Generator().manual_seed(100 * step + index)
                tensor.grad = torch.randn(tensor.shape, generator=generator, dtype=torch.float64)
            optimizer.step()
        results.append((tensors, optimizer.state_dict()))
    (loop, loop_state), (grouped, grouped_state) = results
    for a, b in zip(loop, grouped):
        assert a.dtype == b.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    # 8-bit codes may take the neighbouring code where a value is within a rounding of a midpoint
    quantized = optim_input.kwargs.get("quantization", False)
    for key, entry in loop_state["state"].items():
        for name, value in entry.items():
            other = grouped_state["state"][key][name]
            if name.endswith("_codes"):
                assert (value != other).float().mean() < 1e-3
            elif isinstance(value, torch.Tensor):
                tolerance = dict(rtol=1e-3, atol=1e-5) if quantized else dict(rtol=1e-5, atol=1e-6)
                torch.testing.assert_close(value, other, **tolerance)
            else:
                assert value == other, name
    assert loop_state["param_groups"][0]["foreach"] is False and grouped_state["param_groups"][0]["foreach"] is True


def test_mixed_dtypes_in_one_group_match_the_forloop():
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.float32]
    results = []
    for foreach in (False, True):
        tensors = [
            torch.nn.Parameter(torch.randn(ROWS, COLS, generator=torch.Generator().manual_seed(i)).to(dtype))
            for i, dtype in enumerate(dtypes)
        ]
        optimizer = flora_opt.Flora(tensors, lr=1e-2, rank=16, kappa=8, foreach=foreach)
        for step in range(10):  # a resample at step 9
            for index, tensor in enumerate(tensors):
                generator = torch.Generator().manual_seed(100 * step + index)
                tensor.grad = torch.randn(tensor.shape, generator=generator).to(tensor.dtype)
            optimizer.step()
        results.append(tensors)
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        tolerance = dict(rtol=1e-2, atol=1e-2) if a.dtype == torch.bfloat16 else dict(rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(a, b, **tolerance)
