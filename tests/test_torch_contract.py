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

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch.testing._internal.common_optimizers import (  # noqa: E402
    ErrorOptimizerInput,
    OptimizerErrorEnum,
    OptimizerInfo,
    OptimizerInput,
    get_error_inputs_for_all_optims,
)

import flora_opt  # noqa: E402

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
            kwargs=dict(lr=1e-2, rank=8, kappa=2, min_dim_size_to_factor=8),
            desc="small kappa: a resample every other step",
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
        (dict(projection_dtype="float16"), ValueError, r"Invalid projection_dtype: 'float16'"),
        (dict(foreach=1), ValueError, r"Invalid foreach: 1: must be a bool"),
        (dict(betas=(0.9, 0.99)), TypeError, r"unexpected keyword argument\(s\) 'betas'"),
        (dict(momentum=0.9), TypeError, r"unexpected keyword argument\(s\) 'momentum'"),
        (dict(ranks=4), TypeError, r"unexpected keyword argument\(s\) 'ranks'"),
    ]
    for kwargs, error_type, pattern in bad:
        inputs.append(_error(None, {"lr": 1e-3, **kwargs}, f"{kwargs}", error_type, pattern))
    inputs += [
        _error(
            [_complex_parameter(device)],
            dict(lr=1e-3),
            "complex parameters",
            ValueError,
            r"Flora does not support complex parameters \(shape \(4, 6\)\)",
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
    ]
    return inputs


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


# ---- per-group options ---------------------------------------------------------------------------


def _weight_bias_input(dtype=torch.float32, contiguous=True):
    generator = torch.Generator().manual_seed(0)
    if contiguous:
        weight = torch.randn(ROWS, COLS, generator=generator, dtype=dtype)
        bias = torch.randn(ROWS, generator=generator, dtype=dtype)
    else:
        weight = torch.randn(ROWS, COLS, 2, generator=generator, dtype=dtype)[..., 0]
        bias = torch.randn(ROWS, 2, generator=generator, dtype=dtype)[..., 0]
    x = torch.randn(COLS, generator=generator, dtype=dtype)
    return torch.nn.Parameter(weight), torch.nn.Parameter(bias), x


def _loss(weight, bias, x):
    return (weight.mv(x) + bias).pow(2).sum()


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
        for _ in range(10):
            optimizer.zero_grad()
            _loss(weight, bias, x).backward()
            optimizer.step()
        assert _loss(weight, bias, x).item() < initial
        assert torch.equal(irrelevant, irrelevant_before)  # no gradient: untouched
