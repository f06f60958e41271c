"""optax ``scale_by_flora`` / ``flora``: API, validation, pytrees, dtypes, compilation, checkpoints,
and the momentum transfer at a resample (docs/algorithm.md sections 4, 9, 11)."""

import math

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import flora_opt  # noqa: E402
from flora_opt import core  # noqa: E402
from flora_opt.ops import get_ops  # noqa: E402
from flora_opt.optax import (  # noqa: E402
    CompressedEmaState,
    ScaleBySecondMomentState,
    compressed_ema,
    flora,
    scale_by_flora,
    state_bytes,
)
from flora_opt.projection import tensor_seed  # noqa: E402


def _stages(state):
    """The states of the chain's second-moment and momentum stages."""
    second = next(s for s in state if isinstance(s, ScaleBySecondMomentState))
    return second, next(s for s in state if isinstance(s, CompressedEmaState))


def _tree_signature(tree):
    return jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x), getattr(x, "weak_type", None)), tree)


def test_public_names():
    assert flora_opt.optax_flora is flora_opt.optax.flora
    tx = flora(1e-3)
    assert isinstance(tx, optax.GradientTransformation)
    assert isinstance(scale_by_flora(1e-3), optax.GradientTransformation)
    state = tx.init({"w": jnp.ones((3, 3))})
    assert isinstance(state[0], ScaleBySecondMomentState) and isinstance(state[1], CompressedEmaState)


BAD_INPUTS = [
    (dict(learning_rate=None), ValueError, r"Invalid learning_rate: None"),
    (dict(learning_rate=-1.0), ValueError, r"Invalid learning_rate: -1.0"),
    (dict(learning_rate=float("nan")), ValueError, r"Invalid learning_rate: nan"),
    (dict(learning_rate="fast"), ValueError, r"Invalid learning_rate: 'fast'"),
    (dict(learning_rate=np.ones(2)), ValueError, r"learning_rate must be 0-d"),
    (dict(learning_rate=jnp.asarray(-1e-3)), ValueError, r"Invalid learning_rate: -0\.001"),
    (dict(learning_rate=np.asarray(np.nan)), ValueError, r"Invalid learning_rate: nan"),
    (dict(learning_rate=jnp.asarray(jnp.inf)), ValueError, r"Invalid learning_rate: inf"),
    (dict(b2=math.inf), ValueError, r"Invalid b2: inf"),
    (dict(tau=np.bool_(True)), ValueError, r"Invalid tau: (np\.)?(True|bool)"),
    (dict(b1=1.0), ValueError, r"Invalid b1: 1.0: must be in \[0, 1\)"),
    (dict(b1=-0.1), ValueError, r"Invalid b1: -0.1"),
    (dict(b2=0.0), ValueError, r"Invalid b2: 0.0: must be a float > 0"),
    (dict(b2=-0.8), ValueError, r"Invalid b2: -0.8"),
    (dict(tau=0), ValueError, r"Invalid tau: 0: must be an int >= 1, or None"),
    (dict(tau=2.5), ValueError, r"Invalid tau: 2.5"),
    (dict(tau=True), ValueError, r"Invalid tau: True"),
    (dict(seed=-1), ValueError, r"Invalid seed: -1"),
    (dict(seed=2**32), ValueError, r"Invalid seed: 4294967296"),
    (dict(kappa=0), ValueError, r"Invalid kappa: 0: must be an int >= 1"),
    (dict(kappa=10.0), ValueError, r"Invalid kappa: 10.0"),
    (dict(clipping_threshold=0.0), ValueError, r"Invalid clipping_threshold: 0.0"),
    (dict(clipping_threshold=math.inf), ValueError, r"Invalid clipping_threshold: inf"),
    (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay: -0.1"),
    (dict(weight_decay=math.nan), ValueError, r"Invalid weight_decay: nan"),
    (dict(eps=0.0), ValueError, r"Invalid eps: 0.0: must be a finite float > 0"),
    (dict(min_parameter_scale=-1e-3), ValueError, r"Invalid min_parameter_scale: -0.001"),
    (dict(min_dim_size_to_factor=0), ValueError, r"Invalid min_dim_size_to_factor: 0"),
    (dict(factorized_second_moment="yes"), ValueError, r"Invalid factorized_second_moment: 'yes'"),
    (dict(multiply_by_parameter_scale=1), ValueError, r"Invalid multiply_by_parameter_scale: 1"),
    (
        dict(projection_dtype="float16"),
        ValueError,
        r"Invalid projection_dtype: 'float16': must be one of 'float32', 'bfloat16'",
    ),
    (dict(rank=8), TypeError, r"unexpected keyword argument 'rank'"),
    (dict(beta1=0.9), TypeError, r"unexpected keyword argument 'beta1'"),
]


@pytest.mark.parametrize("kwargs,error,pattern", BAD_INPUTS, ids=[str(b[0]) for b in BAD_INPUTS])
@pytest.mark.parametrize("factory", [flora, scale_by_flora], ids=["flora", "scale_by_flora"])
def test_bad_inputs_raise_naming_the_argument(factory, kwargs, error, pattern):
    kwargs = dict(kwargs)
    learning_rate = kwargs.pop("learning_rate", 1e-3)
    with pytest.raises(error, match=pattern):
        factory(learning_rate, **kwargs)


def test_numpy_scalars_are_accepted_like_python_numbers():
    params = {"w": jnp.ones((20, 30))}
    expected = flora(1e-3, tau=4, kappa=10, b1=0.9, seed=3)
    given = flora(np.float32(1e-3), tau=np.int64(4), kappa=np.int64(10), b1=np.float32(0.9), seed=np.uint32(3))
    state = given.init(params)
    assert _stages(state)[1].exp_avg["w"].shape == _stages(expected.init(params))[1].exp_avg["w"].shape == (4, 30)
    given.update(params, state, params)
    flora(jnp.asarray(1e-3)).init(params)  # a concrete 0-d array learning rate is checked, then accepted


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(b1=None),
        dict(b1=0.0),
        dict(tau=None),
        dict(clipping_threshold=None),
        dict(weight_decay=None),
        dict(seed=2**32 - 1),
        dict(learning_rate=optax.linear_schedule(1e-3, 1e-2, 10)),
        dict(learning_rate=jnp.asarray(1e-3)),
    ],
    ids=["b1=None", "b1=0", "tau=None", "no clipping", "no weight decay", "largest seed", "schedule", "array lr"],
)
def test_accepted_edge_values_build_a_working_optimizer(kwargs):
    kwargs = dict(kwargs)
    tx = flora(kwargs.pop("learning_rate", 1e-3), **kwargs)
    params = {"w": jnp.ones((20, 30)), "b": jnp.ones((30,))}
    grads = {"w": jnp.full((20, 30), 0.5), "b": jnp.full((30,), -0.5)}
    state = tx.init(params)
    momentum = _stages(state)[1].exp_avg
    if kwargs.get("b1", 0.9) in (None, 0.0):  # no momentum: nothing is kept
        assert jax.tree.map(jnp.shape, momentum) == {"w": (0,), "b": (0,)}
    else:
        assert jax.tree.map(jnp.shape, momentum) == jax.tree.map(jnp.shape, params)
    updates, state = tx.update(grads, state, params)
    assert jax.tree.map(jnp.shape, updates) == jax.tree.map(jnp.shape, params)
    assert all(u.dtype == jnp.float32 and bool(jnp.isfinite(u).all()) for u in jax.tree.leaves(updates))
    # a descent step: against the sign of the gradient
    assert bool((updates["w"] < 0).all()) and bool((updates["b"] > 0).all())


def test_update_errors():
    params = {"w": jnp.ones((4, 4)), "b": jnp.ones((4,))}
    tx = flora(1e-3)
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs params"):
        tx.update(params, state)
    with pytest.raises(ValueError, match="structure"):
        tx.update({"w": jnp.ones((4, 4))}, state, {"w": jnp.ones((4, 4))})
    masked = flora(1e-3, weight_decay=0.1, weight_decay_mask={"w": True})
    with pytest.raises(ValueError, match="weight_decay_mask must have the structure"):
        masked.update(params, masked.init(params), params)
    with pytest.raises(ValueError, match="complex"):
        tx.init({"c": jnp.ones((2,), jnp.complex64)})
    # Without parameter scaling or weight decay the params are not needed.
    plain = flora(1e-3, multiply_by_parameter_scale=False)
    plain.update(params, plain.init(params))


def _mixed_params():
    """Nested dicts, a list, a tuple, None, a scalar, an int leaf, bf16, an empty leaf, a conv."""
    return {
        "dense": {"kernel": jnp.full((16, 40), 0.5, jnp.float32), "bias": jnp.zeros((40,))},
        "blocks": [
            {"kernel": jnp.full((40, 12), -0.25, jnp.bfloat16)},
            (jnp.ones((10, 3, 2, 2)), None),
        ],
        "scale": jnp.asarray(2.0, jnp.float32),
        "counter": jnp.arange(3, dtype=jnp.int32),
        "empty": jnp.zeros((0, 5)),
        "small": jnp.ones((3, 40)),
    }


def _grads_like(params, t):
    def grad(p):
        if not jnp.issubdtype(p.dtype, jnp.floating):
            return jnp.zeros_like(p)
        values = jnp.sin(jnp.arange(p.size, dtype=jnp.float32) * (1.0 + 0.1 * t)).reshape(p.shape)
        return values.astype(p.dtype)

    return jax.tree.map(grad, params)


def test_pytrees_dtypes_structure_and_no_recompilation():
    params = _mixed_params()
    tx = flora(0.01, tau=4, kappa=2, min_dim_size_to_factor=8, weight_decay=0.01)
    state = tx.init(params)
    traces = []

    @jax.jit
    def step(params, state, t):
        traces.append(1)
        grads = _grads_like(params, 0)
        grads = jax.tree.map(
            lambda g: g * (1 + t).astype(g.dtype) if jnp.issubdtype(g.dtype, jnp.floating) else g, grads
        )
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, updates

    params_sig, state_sig = _tree_signature(params), _tree_signature(state)
    for t in range(5):  # crosses two resamples (kappa = 2)
        params, state, updates = step(params, state, jnp.asarray(t, jnp.float32))
        assert _tree_signature(params) == params_sig
        assert _tree_signature(state) == state_sig
    assert len(traces) == 1, "the second update call recompiled"

    second, ema = _stages(state)
    # Seeds follow jax.tree_util.tree_leaves order.
    seeds = [int(s) for s in jax.tree_util.tree_leaves(ema.seed)]
    assert seeds == [tensor_seed(0, i) for i in range(len(jax.tree_util.tree_leaves(params)))]
    assert int(second.step["dense"]["kernel"]) == int(ema.step["dense"]["kernel"]) == 5
    # Updates keep the gradient dtype; the state is float32 whatever the parameter dtype.
    assert updates["blocks"][0]["kernel"].dtype == jnp.bfloat16
    assert params["blocks"][0]["kernel"].dtype == jnp.bfloat16
    for leaf in jax.tree_util.tree_leaves((ema.exp_avg, second.exp_avg_sq_row, second.exp_avg_sq)):
        assert leaf.dtype == jnp.float32
    # Layouts: compressed rows/cols, conv viewed as (10, 12), full momentum, placeholders.
    assert ema.exp_avg["dense"]["kernel"].shape == (4, 40)
    assert ema.exp_avg["blocks"][0]["kernel"].shape == (40, 4)
    assert ema.exp_avg["blocks"][1][0].shape == (4, 12)
    assert ema.exp_avg["small"].shape == (3, 40)
    assert second.exp_avg_sq_row["dense"]["kernel"].shape == (16,)
    assert second.exp_avg_sq["dense"]["kernel"].shape == (0,)
    assert ema.exp_avg["counter"].shape == (0,)
    # Integer leaves are left alone; every float leaf moved and stayed finite.
    np.testing.assert_array_equal(params["counter"], np.arange(3))
    assert params["empty"].shape == (0, 5)
    for leaf in jax.tree_util.tree_leaves(params):
        assert np.all(np.isfinite(np.asarray(leaf, np.float32)))
    assert not np.allclose(params["dense"]["kernel"], 0.5)
    assert float(params["scale"]) != 2.0


def test_python_scalar_leaves():
    params = {"a": 1.5, "b": [2.0, jnp.ones((2, 2))]}
    tx = flora(0.1, b1=None)
    state = tx.init(params)
    updates, state = tx.update({"a": 0.3, "b": [0.1, jnp.ones((2, 2))]}, state, params)
    new = optax.apply_updates(params, updates)
    assert float(new["a"]) < 1.5 and float(new["b"][0]) < 2.0


def test_non_finite_gradient_leaves_leaf_unchanged():
    params = {"w": jnp.ones((16, 40)), "b": jnp.ones((40,))}
    tx = flora(0.1, tau=4, kappa=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    grads = _grads_like(params, 0)
    _, state = update(grads, state, params)
    bad = dict(grads, w=grads["w"].at[3, 5].set(jnp.nan))
    updates, new_state = update(bad, state, params)
    np.testing.assert_array_equal(updates["w"], 0.0)
    # The second moment (stage 0) and the momentum (stage 1) keep the leaf's state and step.
    for field in ("step", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq"):
        np.testing.assert_array_equal(getattr(new_state[0], field)["w"], getattr(state[0], field)["w"])
    for field in ("step", "exp_avg"):
        np.testing.assert_array_equal(getattr(new_state[1], field)["w"], getattr(state[1], field)["w"])
    assert int(new_state[0].step["b"]) == int(new_state[1].step["b"]) == 2
    assert np.any(np.asarray(updates["b"]) != 0)


def test_weight_decay_mask():
    params = {"w": jnp.full((8, 8), 2.0), "b": jnp.full((8,), 2.0)}
    grads = _grads_like(params, 0)
    plain = flora(0.1, b1=None)
    decayed = flora(0.1, b1=None, weight_decay=0.5, weight_decay_mask=lambda p: {"w": True, "b": False})
    u0, _ = plain.update(grads, plain.init(params), params)
    u1, _ = decayed.update(grads, decayed.init(params), params)
    np.testing.assert_array_equal(u1["b"], u0["b"])
    # eta = lr * RMS(W) = 0.2; decay eta * wd * W = 0.2 * 0.5 * 2.0 = 0.2 (subtracted).
    np.testing.assert_allclose(u1["w"] - u0["w"], -0.2, rtol=1e-6)


def test_works_inside_optax_multisteps_and_chain():
    params = {"w": jnp.ones((16, 40)), "b": jnp.ones((40,))}
    tx = optax.MultiSteps(optax.chain(optax.clip_by_global_norm(1.0), flora(0.1, tau=4)), every_k_schedule=2)
    state = tx.init(params)
    update = jax.jit(tx.update)
    u, state = update(_grads_like(params, 0), state, params)
    assert all(np.all(np.asarray(x) == 0) for x in jax.tree_util.tree_leaves(u))
    u, state = update(_grads_like(params, 1), state, params)
    assert all(np.any(np.asarray(x) != 0) for x in jax.tree_util.tree_leaves(u))


def test_state_bytes_match_section_11():
    m, n, r = 512, 256, 32
    params = {"w": jax.ShapeDtypeStruct((m, n), jnp.float32), "b": jax.ShapeDtypeStruct((n,), jnp.float32)}
    state = jax.eval_shape(flora(1e-3, tau=r).init, params)
    # Per leaf: the second moment's int32 step, the momentum's int32 step and uint32 seed (a
    # constant learning rate keeps no count).
    integers = 2 * (4 + 4 + 4)
    placeholders = 0  # (0,) arrays hold no bytes
    expected = 4 * (r * max(m, n) + m + n) + 4 * (n + n) + integers + placeholders
    assert state_bytes(state) == expected
    adamw = state_bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
    assert state_bytes(state) < 0.1 * adamw  # 8 m n for Adam's two moments
    adafactor = state_bytes(jax.eval_shape(optax.adafactor(1e-3, momentum=0.9).init, params))
    assert state_bytes(state) < 0.2 * adafactor  # full momentum m n


def _run(tx, params, grads, state=None, update=None):
    update = update or jax.jit(tx.update)
    state = tx.init(params) if state is None else state
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
    return params, state


def test_checkpoint_resume_is_bit_exact(tmp_path):
    params = {
        "w": jnp.linspace(-1, 1, 16 * 40).reshape(16, 40),
        "v": jnp.ones((40, 12), jnp.bfloat16),
        "b": jnp.ones(40),
    }
    grads = [_grads_like(params, t) for t in range(8)]
    tx = flora(0.05, tau=4, kappa=3, min_dim_size_to_factor=8)
    update = jax.jit(tx.update)
    full_params, full_state = _run(tx, params, grads, update=update)

    mid_params, mid_state = _run(tx, params, grads[:4], update=update)
    leaves, _ = jax.tree_util.tree_flatten((mid_params, mid_state))
    # npz has no bfloat16: store raw bytes and the dtype names (the state itself is fp32/int).
    arrays = {f"arr_{i}": np.asarray(x).reshape(-1).view(np.uint8) for i, x in enumerate(leaves)}
    dtypes = np.array([str(np.asarray(x).dtype) for x in leaves])
    np.savez(tmp_path / "ckpt.npz", dtypes=dtypes, **arrays)
    del mid_params, mid_state
    # "Restart": a new optimizer object, its abstract state as the template.
    tx2 = flora(0.05, tau=4, kappa=3, min_dim_size_to_factor=8)
    template = (params, jax.eval_shape(tx2.init, params))
    treedef = jax.tree_util.tree_structure(template)
    with np.load(tmp_path / "ckpt.npz") as data:
        restored = [
            jnp.asarray(data[f"arr_{i}"].view(jnp.dtype(str(name))).reshape(np.shape(leaf)))
            for i, (name, leaf) in enumerate(zip(data["dtypes"], jax.tree_util.tree_leaves(template)))
        ]
    restored_params, restored_state = jax.tree_util.tree_unflatten(treedef, restored)
    assert _tree_signature(restored_state) == _tree_signature(jax.eval_shape(tx2.init, params))
    # (The compiled update is reused: compiling tx2.update again would only cost test time.)
    resumed_params, resumed_state = _run(tx2, restored_params, grads[4:], state=restored_state, update=update)
    for a, b in zip(
        jax.tree_util.tree_leaves((full_params, full_state)), jax.tree_util.tree_leaves((resumed_params, resumed_state))
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_momentum_transfer_preserves_momentum_in_expectation():
    """The compressed momentum decompresses to the full momentum in expectation over seeds, before
    and after a resample's transfer (section 4). (The step rescales the decompressed history by
    ``s``, section 8, so it is the state that is unbiased, not the step.) The reference JAX code
    re-projected with the *old* key before switching; its transferred momentum has expectation
    zero: this test fails on it."""
    m, n, r, b1 = 16, 48, 8, 0.9
    g1 = jnp.sin(jnp.arange(m * n, dtype=jnp.float32)).reshape(m, n)
    g2 = jnp.cos(0.7 * jnp.arange(m * n, dtype=jnp.float32)).reshape(m, n)
    kw = dict(b1=b1, kappa=2, clipping_threshold=None, multiply_by_parameter_scale=False)
    tx = scale_by_flora(1.0, tau=r, **kw)
    params = {"w": jnp.zeros((m, n))}
    ops = get_ops("jax")

    def run(seed):
        state = tx.init(params)
        state = (state[0], state[1]._replace(seed={"w": seed}), *state[2:])
        _, state = tx.update({"w": g1}, state)
        _, state2 = tx.update({"w": g2}, state)
        _, state3 = tx.update({"w": jnp.zeros((m, n))}, state2)  # t = 3 = kappa + 1: resample
        p_old = core.momentum_projection(seed, 0, r, m, ops)
        p_new = core.momentum_projection(seed, 1, r, m, ops)
        before = p_old.T @ state2[1].exp_avg["w"]
        after = p_new.T @ state3[1].exp_avg["w"] / b1  # U = 0 at t = 3: M_3 = b1 * transferred M_2
        # What the reference code did: P_new^T (P_old P_old^T M) -- projected back with the old key.
        defect = p_new.T @ (p_old @ before)
        return before, after, defect

    seeds = jnp.arange(1, 1025, dtype=jnp.uint32) * jnp.uint32(2654435761)
    before, after, defect = jax.jit(jax.vmap(run))(seeds)
    exact = scale_by_flora(1.0, tau=None, **kw)  # full momentum: the quantity estimated
    state = exact.init(params)
    _, state = exact.update({"w": g1}, state)
    _, state = exact.update({"w": g2}, state)
    target = np.asarray(state[1].exp_avg["w"])

    def rel(estimate):
        return np.linalg.norm(np.asarray(estimate) - target) / np.linalg.norm(target)

    assert rel(before.mean(0)) < 0.1  # compression is unbiased
    assert rel(after.mean(0)) < 0.15  # the transfer keeps the momentum in expectation
    assert rel(defect.mean(0)) > 0.8  # the reference's transfer loses it
    # Per seed, the transferred momentum stays correlated with the pre-resample one.
    cos = np.sum(np.asarray(before * after), axis=(1, 2)) / (
        np.linalg.norm(np.asarray(before), axis=(1, 2)) * np.linalg.norm(np.asarray(after), axis=(1, 2))
    )
    assert cos.mean() > 0.4, cos.mean()


def test_learning_rate_can_be_injected_without_static_arguments():
    """``inject_hyperparams(flora)`` with no static list: every numeric argument (tau, kappa, seed,
    min_dim_size_to_factor, ...) becomes a state array, traced in the jitted update; the layout
    comes from the state, so the compressed step still follows the injected learning rate step for
    step (compared with the same rates given as a schedule)."""
    kw = dict(tau=4, kappa=2, min_dim_size_to_factor=8, weight_decay=0.1)
    params = {"w": jnp.linspace(-1.0, 1.0, 16 * 40).reshape(16, 40), "b": jnp.ones((40,))}
    grads = [_grads_like(params, t) for t in range(5)]  # crosses two resamples (kappa = 2)
    rates = [0.1, 0.1, 0.05, 0.05, 0.02]
    injected = optax.inject_hyperparams(flora)(learning_rate=rates[0], **kw)
    state = injected.init(params)
    assert {"tau", "kappa", "seed", "b1", "min_dim_size_to_factor"} <= set(state.hyperparams)
    scheduled = flora(lambda count: jnp.asarray(rates)[count], **kw)
    plain_state = scheduled.init(params)
    update, plain_update = jax.jit(injected.update), jax.jit(scheduled.update)
    p, q = params, params
    for g, rate in zip(grads, rates):
        state.hyperparams["learning_rate"] = jnp.asarray(rate, jnp.float32)
        u, state = update(g, state, p)
        v, plain_state = plain_update(g, plain_state, q)
        p, q = optax.apply_updates(p, u), optax.apply_updates(q, v)
        for a, b in zip(jax.tree_util.tree_leaves(p), jax.tree_util.tree_leaves(q)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert _stages(state.inner_state)[1].exp_avg["w"].shape == (4, 40)
    # init fixes the layout: under jit the injected tau is traced, which is refused clearly.
    with pytest.raises(ValueError, match="traced value"):
        jax.jit(injected.init)(params)
    # ...unless the five arguments that fix the layout are static (docs/jax.md); the rest stay injected.
    layout_args = ("b1", "tau", "seed", "min_dim_size_to_factor", "max_aspect_ratio")
    jitted_init = optax.inject_hyperparams(flora, static_args=layout_args)(learning_rate=rates[0], **kw)
    state = jax.jit(jitted_init.init)(params)
    assert "kappa" in state.hyperparams and _stages(state.inner_state)[1].exp_avg["w"].shape == (4, 40)


def test_compressed_ema_is_the_momentum_stage_of_flora():
    """flora's momentum stage is compressed_ema itself: same state for the same arguments."""
    params = {"w": jnp.ones((16, 40))}
    assert _tree_signature(compressed_ema(0.9, tau=4, kappa=10).init(params)) == _tree_signature(
        flora(1e-3, tau=4, kappa=10).init(params)[1]
    )


@pytest.mark.parametrize("factory", [flora, scale_by_flora], ids=["flora", "scale_by_flora"])
def test_optax_defaults_agree_with_the_one_table(factory):
    """flora_opt.hyperparams owns the defaults and the torch -> optax name table."""
    import inspect

    from flora_opt.hyperparams import DEFAULTS, OPTAX_NAMES

    signature = inspect.signature(factory).parameters
    for torch_name, optax_name in OPTAX_NAMES.items():
        if optax_name is None or torch_name == "lr":
            continue
        if torch_name == "eps":
            assert (signature["eps"].default, signature["min_parameter_scale"].default) == DEFAULTS["eps"]
        elif torch_name == "decay_rate":
            assert signature["b2"].default == -DEFAULTS["decay_rate"]
        else:
            assert signature[optax_name].default == DEFAULTS[torch_name], torch_name


def test_the_small_stages():
    """clip_by_rms, add_weight_decay, scale_by_param_rms and zero_non_finite, each on its own."""
    from flora_opt.optax import add_weight_decay, clip_by_rms, scale_by_param_rms, zero_non_finite

    u = {"w": jnp.arange(12.0).reshape(3, 4), "n": jnp.arange(3)}
    params = {"w": jnp.full((3, 4), 2.0, jnp.bfloat16), "n": jnp.arange(3)}
    clip = clip_by_rms(1.0)
    clipped, _ = clip.update(u, clip.init(params))
    expected, _ = optax.clip_by_block_rms(1.0).update(u, None)
    np.testing.assert_allclose(clipped["w"], expected["w"], rtol=1e-6)
    np.testing.assert_array_equal(clipped["n"], u["n"])  # integer leaves pass through
    # A finite leaf whose RMS overflows is NaN (optax's clip maps it to 0): the step is skipped.
    huge, _ = clip.update({"w": jnp.full((3, 4), 1e30)}, None)
    assert np.all(np.isnan(np.asarray(huge["w"])))
    assert np.all(np.asarray(optax.clip_by_block_rms(1.0).update({"w": jnp.full((3, 4), 1e30)}, None)[0]["w"]) == 0)
    np.testing.assert_array_equal(clip_by_rms(None).update(u, None)[0]["w"], u["w"])

    decay = add_weight_decay(0.5, mask={"w": False, "n": True})
    decayed, _ = decay.update(u, decay.init(params), params)
    np.testing.assert_array_equal(decayed["w"], u["w"])
    decayed, _ = add_weight_decay(0.5).update(u, None, params)
    np.testing.assert_allclose(decayed["w"], u["w"] + 1.0)

    scaled, _ = scale_by_param_rms(1e-3).update(u, None, params)
    np.testing.assert_allclose(scaled["w"], 2.0 * u["w"])  # RMS(W) = 2
    scaled, _ = scale_by_param_rms(5.0).update(u, None, params)
    np.testing.assert_allclose(scaled["w"], 5.0 * u["w"])  # the floor
    with pytest.raises(ValueError, match="needs params"):
        scale_by_param_rms().update(u, None)

    bad = {"w": u["w"].at[1, 1].set(jnp.inf), "n": u["n"]}
    out, _ = zero_non_finite().update(bad, None, params)
    assert out["w"].dtype == jnp.bfloat16 and np.all(np.asarray(out["w"], np.float32) == 0)
    out, _ = zero_non_finite().update(u, None, params)
    np.testing.assert_array_equal(np.asarray(out["w"], np.float32), np.asarray(u["w"].astype(jnp.bfloat16), np.float32))


def test_flora_is_a_chain_of_the_documented_stages():
    """Eight stages whatever the values (the momentum and weight decay stages are there at
    ``b1=None`` and ``weight_decay=0``); only ``multiply_by_parameter_scale=False`` drops one."""
    params = {"w": jnp.ones((16, 40))}
    # second moment, momentum, clip, weight decay, learning rate, parameter scale, sign, non-finite
    kinds = ["ScaleBySecondMomentState", "CompressedEmaState"] + ["EmptyState"] * 6
    for kwargs in (dict(tau=4, weight_decay=0.1), dict(), dict(b1=None), dict(b1=0.0, weight_decay=None)):
        assert [type(s).__name__ for s in flora(1e-3, **kwargs).init(params)] == kinds, kwargs
    no_momentum = flora(1e-3, b1=None).init(params)[1]
    assert no_momentum.exp_avg["w"].shape == (0,)  # a placeholder
    assert len(flora(1e-3, b1=None, multiply_by_parameter_scale=False).init(params)) == 7
    assert isinstance(flora(optax.constant_schedule(1e-3)).init(params)[4], optax.ScaleByScheduleState)


# Every numeric argument of flora (what inject_hyperparams turns into an array), at a value other
# than its default. None values stay Python values under inject_hyperparams.
_INJECTED_VALUES = {
    "learning_rate": 0.05,
    "b1": 0.0,
    "b2": 0.7,
    "tau": 2,
    "seed": 7,
    "kappa": 3,
    "clipping_threshold": 0.5,
    "weight_decay": 0.1,
    "eps": 1e-20,
    "min_dim_size_to_factor": 4,
    "min_parameter_scale": 1e-2,
    "max_aspect_ratio": 2.0,
}


def _numeric_arguments():
    import inspect

    parameters = inspect.signature(flora).parameters.values()
    return [
        p.name
        for p in parameters
        if p.name == "learning_rate" or (isinstance(p.default, (int, float)) and not isinstance(p.default, bool))
    ]


@pytest.mark.parametrize(
    "name,value",
    [(None, None), *_INJECTED_VALUES.items(), ("b1", 0.5), ("b1", None), ("tau", None), ("weight_decay", None)],
)
def test_injected_hyperparameters_give_the_state_tree_of_flora(name, value):
    """``inject_hyperparams`` turns every numeric argument into an array; the chain, and so the
    state tree, must not depend on it: ``inject_hyperparams(flora)(...)``'s inner state and
    ``flora(...)``'s state are interchangeable, at the defaults and away from them."""
    assert sorted(_numeric_arguments()) == sorted(_INJECTED_VALUES)  # a new numeric argument needs a value here
    kwargs = {"learning_rate": 0.1} if name is None else {"learning_rate": 0.1, name: value}
    params = {"w": jnp.linspace(-1.0, 1.0, 8 * 24).reshape(8, 24), "v": jnp.ones((24, 6)), "b": jnp.ones((24,))}
    grads = _grads_like(params, 0)
    plain, injected = flora(**kwargs), optax.inject_hyperparams(flora)(**kwargs)
    plain_state, injected_state = plain.init(params), injected.init(params)
    assert _tree_signature(plain_state) == _tree_signature(injected_state.inner_state)
    # Each update takes the other's state: one step of each, from the other's state, agree.
    updates, plain_next = jax.jit(plain.update)(grads, injected_state.inner_state, params)
    injected_updates, injected_next = jax.jit(injected.update)(
        grads, injected_state._replace(inner_state=plain_state), params
    )
    assert _tree_signature(plain_next) == _tree_signature(injected_next.inner_state) == _tree_signature(plain_state)
    for a, b in zip(jax.tree_util.tree_leaves(updates), jax.tree_util.tree_leaves(injected_updates)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
