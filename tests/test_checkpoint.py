"""Checkpoints: weights_only loading, bit-exact resume across resamples, dtype guards, bad state."""

import io

import pytest

torch = pytest.importorskip("torch")

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


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


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
    model_state = _roundtrip(model.state_dict())
    opt_state = _roundtrip(opt.state_dict())
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
    assert _roundtrip(sd)["param_groups"][0]["rank"] == 16


def test_bf16_state_dict_keeps_fp32_compressed_state_after_load():
    model = _model(torch.bfloat16)
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    _train(model, opt, _batches(2))
    sd = _roundtrip(opt.state_dict())
    fresh = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    fresh.load_state_dict(sd)
    weight = model[1].weight
    assert weight.dtype == torch.bfloat16
    assert fresh.state[weight]["exp_avg"].dtype == torch.float32
    assert torch.equal(fresh.state[weight]["exp_avg"], opt.state[weight]["exp_avg"])
    # the plain torch.optim.Optimizer would have downcast it
    plain = torch.optim.Optimizer.load_state_dict
    other = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    plain(other, _roundtrip(opt.state_dict()))
    assert other.state[weight]["exp_avg"].dtype == torch.bfloat16


@pytest.mark.parametrize(
    "change,pattern",
    [
        (dict(rank=8), r"'exp_avg' should be \(160, 8\)"),
        (dict(quantization=True), r"'exp_avg_codes' should be"),
        (dict(factorize_second_moment=False), r"'exp_avg_sq' should be"),
    ],
)
def test_loading_a_state_that_does_not_fit_raises(change, pattern):
    model = _model()
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    _train(model, opt, _batches(1))
    sd = _roundtrip(opt.state_dict())
    for group in sd["param_groups"]:
        group.update(change)
    fresh = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    with pytest.raises(ValueError, match=pattern):
        fresh.load_state_dict(sd)


def test_loading_into_a_different_model_raises():
    model = _model()
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    _train(model, opt, _batches(1))
    sd = _roundtrip(opt.state_dict())
    other = torch.nn.Sequential(
        torch.nn.Embedding(300, 48), torch.nn.Linear(48, 200), torch.nn.Linear(200, 300), torch.nn.Linear(1, 1)
    )
    with pytest.raises(ValueError, match="parameters"):
        flora_opt.Flora(other.parameters(), lr=1e-2, rank=16).load_state_dict(sd)
    wrong_shapes = torch.nn.Sequential(
        torch.nn.Embedding(300, 48), torch.nn.Linear(48, 200), torch.nn.GELU(), torch.nn.Linear(200, 300)
    )
    with pytest.raises(ValueError, match="cannot load Flora state"):
        flora_opt.Flora(wrong_shapes.parameters(), lr=1e-2, rank=16).load_state_dict(sd)


def test_old_checkpoints_without_new_options_load():
    model = _model()
    opt = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    _train(model, opt, _batches(1))
    sd = _roundtrip(opt.state_dict())
    for group in sd["param_groups"]:
        del group["min_dim_size_to_factor"]
    fresh = flora_opt.Flora(model.parameters(), lr=1e-2, rank=16)
    fresh.load_state_dict(sd)
    assert fresh.param_groups[0]["min_dim_size_to_factor"] == 128
    _train(model, fresh, _batches(1))
