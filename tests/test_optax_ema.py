"""flora_opt.optax.compressed_ema: Flora's momentum as a transformation that can replace optax.ema."""

import numpy as np
import pytest

jax = pytest.importorskip("jax")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

from flora_opt import core  # noqa: E402
from flora_opt.ops import get_ops  # noqa: E402
from flora_opt.optax import compressed_ema  # noqa: E402
from flora_opt.projection import tensor_seed  # noqa: E402


def _updates(steps, seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"a": (12, 30), "b": (30, 10), "c": (7,)}
    return [{k: jnp.asarray(rng.normal(size=s).astype(np.float32)) for k, s in shapes.items()} for _ in range(steps)]


def test_full_momentum_is_optax_ema_without_debiasing():
    tx, ref = compressed_ema(0.8, tau=None), optax.ema(0.8, debias=False)
    updates = _updates(5)
    state, ref_state = tx.init(updates[0]), ref.init(updates[0])
    for u in updates:
        out, state = tx.update(u, state)
        expected, ref_state = ref.update(u, ref_state)
        for k in u:
            np.testing.assert_allclose(out[k], expected[k], rtol=1e-6, atol=1e-7)


def test_compressed_leaves_follow_the_spec_across_resamples():
    """D = (1 - b1) U + b1 s P^T M, M_t = b1 M + (1 - b1) P U, transfer at t = kappa + 1, written
    out in NumPy float64 from the projections (docs/algorithm.md sections 3, 4, 8)."""
    b1, tau, kappa = 0.9, 4, 2
    tx = compressed_ema(b1, tau=tau, kappa=kappa, seed=7)
    updates = _updates(6, seed=1)
    state = tx.init(updates[0])
    ops = get_ops("jax")
    seed = tensor_seed(7, 0)  # leaf "a": (12, 30), rows side, d = 12
    M = np.zeros((tau, 30))
    for t, u in enumerate(updates, start=1):
        out, state = jax.jit(tx.update)(u, state)
        k = (t - 1) // kappa
        P = np.asarray(core.momentum_projection(seed, k, tau, 12, ops), np.float64)
        if t > 1 and (t - 1) % kappa == 0:
            P_old = np.asarray(core.momentum_projection(seed, k - 1, tau, 12, ops), np.float64)
            M = P @ (P_old.T @ M)
        H = P.T @ M
        s = np.linalg.norm(M) / np.linalg.norm(H) if np.linalg.norm(H) > 0 else 0.0
        U = np.asarray(u["a"], np.float64)
        expected = (1 - b1) * U + b1 * s * H
        M = b1 * M + (1 - b1) * (P @ U)
        np.testing.assert_allclose(np.asarray(out["a"]), expected, rtol=2e-5, atol=2e-6, err_msg=f"step {t}")
        np.testing.assert_allclose(np.asarray(state.exp_avg["a"]), M, rtol=2e-5, atol=2e-6)
    assert state.exp_avg["b"].shape == (30, tau)  # columns side
    assert state.exp_avg["c"].shape == (7,)  # vectors keep full momentum


def test_non_finite_leaf_keeps_its_state_and_step():
    tx = compressed_ema(0.9, tau=4, kappa=3)
    updates = _updates(2)
    state = tx.init(updates[0])
    _, state = tx.update(updates[0], state)
    bad = dict(updates[1], a=updates[1]["a"].at[0, 0].set(jnp.nan))
    out, new_state = tx.update(bad, state)
    assert not np.isfinite(np.asarray(out["a"])).all()  # passed on, for a later stage to zero
    np.testing.assert_array_equal(new_state.exp_avg["a"], state.exp_avg["a"])
    assert int(new_state.step["a"]) == 1 and int(new_state.step["b"]) == 2


def test_a_chain_with_it_injects_the_learning_rate_without_static_args():
    def make(learning_rate):
        return optax.chain(
            compressed_ema(0.9, tau=4, kappa=3),
            optax.clip_by_block_rms(1.0),
            optax.scale_by_learning_rate(learning_rate),
        )

    tx = optax.inject_hyperparams(make)(learning_rate=0.1)
    updates = _updates(3)
    state = tx.init(updates[0])
    update = jax.jit(tx.update)
    for u in updates:
        out, state = update(u, state)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    out, state = update(updates[0], state)
    for k in out:
        np.testing.assert_array_equal(np.asarray(out[k]), 0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(b1=1.0), r"Invalid b1: 1\.0"),
        (dict(tau=0), r"Invalid tau: 0"),
        (dict(kappa=0), r"Invalid kappa: 0"),
        (dict(seed=-1), r"Invalid seed: -1"),
    ],
)
def test_invalid_arguments_name_the_argument(kwargs, message):
    with pytest.raises(ValueError, match=message):
        compressed_ema(**kwargs)
