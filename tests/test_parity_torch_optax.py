"""Golden parity: the PyTorch ``flora_opt.Flora`` and the optax ``flora`` fed the same parameters
and gradients take the same steps (docs/algorithm.md is the one spec both follow).

Runs ``2 * kappa + 2`` steps, so every compressed leaf crosses two resamples (momentum transfer),
over leaves of every kind: compressed rows and columns, a conv kernel viewed as a matrix, a small
matrix with full momentum, a vector and a scalar.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")
jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import flora_opt  # noqa: E402
from flora_opt.optax import CompressedEmaState, ScaleBySecondMomentState, flora  # noqa: E402

KAPPA = 3
STEPS = 2 * KAPPA + 2
SHAPES = {  # sorted keys: the jax.tree_util.tree_leaves order, used for the torch param order
    "a_rows": (16, 40),  # compressed rows (16 <= 40), factored
    "b_cols": (40, 12),  # compressed columns, factored
    "c_conv": (10, 3, 2, 2),  # viewed as (10, 12): compressed rows, factored
    "d_small": (3, 40),  # min dim 3 <= tau: full momentum, full second moment
    "e_bias": (40,),
    "f_scalar": (),
}


# (name, optax kwargs); the torch kwargs are derived by _torch_kwargs (the docs/jax.md table).
def _schedule(count):
    return 0.02 * (0.9**count)


# (name, optax kwargs, learning rate); the torch kwargs follow the docs/jax.md table.
CONFIGS = [
    ("compressed", dict(b1=0.9, tau=4), 0.05),
    ("no_momentum_schedule", dict(b1=None, tau=4), _schedule),
    ("full_momentum", dict(b1=0.9, tau=None), 0.05),
    (
        "wd_clip_b2_schedule",
        dict(b1=0.8, tau=5, weight_decay=0.1, clipping_threshold=0.5, b2=0.7, seed=12345),
        _schedule,
    ),
    (
        "unfactored_no_scale",
        dict(b1=0.9, tau=4, factorized_second_moment=False, multiply_by_parameter_scale=False),
        0.05,
    ),
]


def _torch_kwargs(kw):
    return dict(
        rank=kw.get("tau", 256),
        kappa=kw.get("kappa", KAPPA),
        eps=(kw.get("eps", 1e-30), kw.get("min_parameter_scale", 1e-3)),
        clip_threshold=kw.get("clipping_threshold", 1.0),
        decay_rate=-kw.get("b2", 0.8),
        beta1=kw.get("b1", 0.9),
        weight_decay=kw.get("weight_decay", 0.0),
        scale_parameter=kw.get("multiply_by_parameter_scale", True),
        factorize_second_moment=kw.get("factorized_second_moment", True),
        min_dim_size_to_factor=kw.get("min_dim_size_to_factor", 8),
        seed=kw.get("seed", 0),
    )


# Leaves for the variant configurations (XLA compile time grows with the number of leaves).
FEW = ("a_rows", "b_cols", "e_bias")


def _problem(seed=0, leaves=tuple(SHAPES)):
    rng = np.random.default_rng(seed)
    shapes = {k: SHAPES[k] for k in leaves}
    params = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) * (1.0 + t) for k, s in shapes.items()} for t in range(STEPS)]
    return params, grads


_COMPILED = {}


def _jitted_update(kw, lr):
    """One compiled update per configuration, shared by the tests (compiling dominates runtime)."""
    key = (tuple(sorted(kw.items())), lr)
    if key not in _COMPILED:
        tx = flora(lr, **dict(kw, kappa=KAPPA, min_dim_size_to_factor=8))
        _COMPILED[key] = (tx, jax.jit(tx.update))
    return _COMPILED[key]


def _run_optax(params, grads, kw, lr, param_dtype=jnp.float32):
    tx, update = _jitted_update(kw, lr)
    p = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), params)
    state = tx.init(p)
    trajectory = []
    for g in grads:
        g = jax.tree.map(lambda x: jnp.asarray(x, param_dtype), g)
        u, state = update(g, state, p)
        p = optax.apply_updates(p, u)
        trajectory.append(jax.tree.map(lambda x: np.asarray(x, np.float32), p))
    return trajectory, state


def _run_torch(params, grads, kw, lr, param_dtype=torch.float32):
    names = sorted(params)
    tparams = [torch.tensor(params[k]).to(param_dtype).requires_grad_(True) for k in names]
    schedule = lr if callable(lr) else None
    opt = flora_opt.Flora(tparams, lr=schedule(0) if schedule else lr, **_torch_kwargs(dict(kw, kappa=KAPPA)))
    trajectory = []
    for t, g in enumerate(grads):
        if schedule:
            opt.param_groups[0]["lr"] = schedule(t)
        for p, k in zip(tparams, names):
            p.grad = torch.tensor(g[k]).to(param_dtype)
        opt.step()
        trajectory.append({k: p.detach().float().numpy().copy() for k, p in zip(names, tparams)})
    opt.synchronize()  # exact host integers; the grouped step's non-finite warning is raised here
    return trajectory, opt, tparams


def _stages(state):
    """The states of the chain's second-moment and momentum stages."""
    second = next(s for s in state if isinstance(s, ScaleBySecondMomentState))
    return second, next(s for s in state if isinstance(s, CompressedEmaState))


def _assert_close(a, b, rtol, atol, what):
    for k in a:
        np.testing.assert_allclose(a[k], b[k], rtol=rtol, atol=atol, err_msg=f"{what}: leaf {k}")


@pytest.mark.parametrize("name,kw,lr", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_parameters_match_torch_every_step(name, kw, lr):
    params, grads = _problem(leaves=tuple(SHAPES) if name == "compressed" else FEW)
    jax_traj, jax_state = _run_optax(params, grads, kw, lr)
    torch_traj, opt, tparams = _run_torch(params, grads, kw, lr)
    for t, (a, b) in enumerate(zip(jax_traj, torch_traj)):
        _assert_close(a, b, rtol=2e-5, atol=2e-6, what=f"{name} step {t + 1}")
    # The states agree too, compressed momentum included (same projections on both sides).
    second, ema = _stages(jax_state)
    for k, p in zip(sorted(params), tparams):
        st = opt.state[p]
        assert int(second.step[k]) == st["step"] == STEPS
        assert int(ema.step[k]) == (0 if kw["b1"] is None else STEPS)  # without momentum it passes through
        assert int(ema.seed[k]) == st["seed"]
        if "exp_avg" in st:
            np.testing.assert_allclose(
                np.asarray(ema.exp_avg[k]).reshape(st["exp_avg"].shape),
                st["exp_avg"].numpy(),
                rtol=1e-4,
                atol=1e-6,
                err_msg=f"{name}: momentum of {k}",
            )
        else:
            assert ema.exp_avg[k].shape == (0,)
        for key in ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
            if key in st:
                np.testing.assert_allclose(
                    np.asarray(getattr(second, key)[k]).reshape(st[key].shape),
                    st[key].numpy(),
                    rtol=1e-5,
                    err_msg=f"{name}: {key} of {k}",
                )


def test_momentum_kinds_cover_every_layout():
    """The golden problem really exercises compressed rows/cols, ndim>2, full and no momentum."""
    params, _ = _problem()
    second, ema = _stages(_jitted_update(dict(b1=0.9, tau=4), 0.05)[0].init(params))
    assert ema.exp_avg["a_rows"].shape == (4, 40)
    assert ema.exp_avg["b_cols"].shape == (40, 4)
    assert ema.exp_avg["c_conv"].shape == (4, 12)
    assert ema.exp_avg["d_small"].shape == (3, 40)
    assert second.exp_avg_sq_row["a_rows"].shape == (16,)
    assert second.exp_avg_sq["d_small"].shape == (3, 40)


def test_non_finite_gradient_skips_the_same_steps():
    """A NaN/Inf gradient skips that leaf's step on both sides; later steps still agree."""
    params, grads = _problem(seed=1)
    grads[1]["a_rows"][0, 0] = np.nan
    grads[3]["e_bias"][2] = np.inf
    grads[4]["b_cols"][:] = 1e20  # squares overflow float32
    kw = dict(b1=0.9, tau=4)
    jax_traj, jax_state = _run_optax(params, grads, kw, 0.05)
    with pytest.warns(RuntimeWarning, match="non-finite"):
        torch_traj, opt, tparams = _run_torch(params, grads, kw, 0.05)
    for t, (a, b) in enumerate(zip(jax_traj, torch_traj)):
        _assert_close(a, b, rtol=2e-5, atol=2e-6, what=f"step {t + 1}")
    np.testing.assert_array_equal(jax_traj[1]["a_rows"], jax_traj[0]["a_rows"])  # skipped: unchanged
    second, ema = _stages(jax_state)
    steps = second.step
    assert jax.tree.map(int, ema.step) == jax.tree.map(int, steps)  # both stages skipped the same steps
    assert int(steps["a_rows"]) == int(steps["e_bias"]) == int(steps["b_cols"]) == STEPS - 1
    assert int(steps["c_conv"]) == STEPS
    for k, p in zip(sorted(params), tparams):
        assert opt.state[p]["step"] == int(steps[k])


def test_bf16_parameters_match_torch():
    """bf16 parameters: both sides keep float32 state and round W_t to bf16 once per step."""
    params, grads = _problem(seed=2, leaves=FEW)
    kw = dict(b1=0.9, tau=4)
    jax_traj, jax_state = _run_optax(params, grads, kw, 0.05, param_dtype=jnp.bfloat16)
    torch_traj, _, _ = _run_torch(params, grads, kw, 0.05, param_dtype=torch.bfloat16)
    for t, (a, b) in enumerate(zip(jax_traj, torch_traj)):
        for k in a:
            # optax rounds the update to bf16 before apply_updates adds it (torch adds in float32
            # and rounds once), so a few elements differ by a bf16 rounding at the leaf's scale.
            scale = np.sqrt(np.mean(b[k] ** 2)) * 2.0**-8
            assert np.max(np.abs(a[k] - b[k])) <= 8 * scale, f"step {t + 1}: leaf {k}"
            assert np.mean(a[k] != b[k]) < 0.25, f"step {t + 1}: leaf {k}"
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(_stages(jax_state)[1].exp_avg))


def test_optax_matches_float64_reference():
    """The optax path against the float64 transcription of docs/algorithm.md."""
    from flora_opt.reference import ReferenceFlora

    params, grads = _problem(seed=3)
    kw = dict(b1=0.9, tau=4)
    jax_traj, _ = _run_optax(params, grads, kw, 0.05)
    names = sorted(params)
    ref = ReferenceFlora(
        [params[k] for k in names], **{k: v for k, v in _torch_kwargs(dict(kw, kappa=KAPPA)).items()}, lr=0.05
    )
    for t, g in enumerate(grads):
        ref.step([g[k] for k in names])
        for k, p in zip(names, ref.params):
            np.testing.assert_allclose(jax_traj[t][k], p, rtol=3e-5, atol=3e-6, err_msg=f"step {t + 1}: {k}")
    assert math.isfinite(float(np.sum([np.sum(p) for p in ref.params])))


def test_compressed_accumulation_matches_torch():
    """Section 12 on both sides: optax ``compressed_multi_steps`` (mean, ``w_k = 1/K``) and the
    PyTorch ``CompressedAccumulator`` (loss divided by ``K``, ``w_k = 1``) feeding ``Flora``."""
    accumulation = pytest.importorskip("flora_opt.accumulation")
    from flora_opt.optax import compressed_multi_steps

    k_micro, cycles, acc_rank, acc_seed = 3, 3, 5, 11
    params, _ = _problem(seed=4, leaves=FEW)
    rng = np.random.default_rng(5)
    micro = [
        {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()} for _ in range(k_micro * cycles)
    ]
    kw = dict(b1=0.9, tau=4)

    tx = compressed_multi_steps(
        flora(0.05, **dict(kw, kappa=2, min_dim_size_to_factor=8)), k_micro, tau=acc_rank, seed=acc_seed
    )
    update = jax.jit(tx.update)
    p, state = jax.tree.map(jnp.asarray, params), tx.init(params)
    jax_traj = []
    for i, g in enumerate(micro):
        u, state = update(jax.tree.map(jnp.asarray, g), state, p)
        p = optax.apply_updates(p, u)
        if (i + 1) % k_micro == 0:
            jax_traj.append(jax.tree.map(np.asarray, p))

    names = sorted(params)
    tparams = [torch.tensor(params[k]).requires_grad_(True) for k in names]
    opt = flora_opt.Flora(tparams, lr=0.05, **_torch_kwargs(dict(kw, kappa=2)))
    acc = accumulation.CompressedAccumulator(opt, rank=acc_rank, accumulation_steps=k_micro, seed=acc_seed)
    assert len(acc.compressed_parameters()) == 2  # a_rows and b_cols; the bias accumulates naively
    torch_traj = []
    for g in micro:
        loss = sum((tp * torch.tensor(g[k] / k_micro)).sum() for tp, k in zip(tparams, names))
        acc.backward(loss)
        if acc.sync_gradients:
            opt.step()
            opt.zero_grad()
            torch_traj.append({k: tp.detach().numpy().copy() for k, tp in zip(names, tparams)})
    assert len(jax_traj) == len(torch_traj) == cycles
    for c, (a, b) in enumerate(zip(jax_traj, torch_traj)):
        _assert_close(a, b, rtol=2e-5, atol=2e-6, what=f"accumulation cycle {c}")
    assert int(state.accumulator.cycle) == acc.cycle == cycles
    assert int(_stages(state.inner_opt_state)[0].step["a_rows"]) == cycles
    assert not np.allclose(jax_traj[-1]["a_rows"], params["a_rows"])
