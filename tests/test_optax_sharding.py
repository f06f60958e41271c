"""Flora under ``jax.jit`` with ``NamedSharding`` on a 4-device CPU mesh equals the unsharded run,
and its compressed states are sharded, not silently replicated.

The mesh needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts, so the
check runs in a subprocess and the flag does not leak into other tests.
"""

import json
import textwrap

import pytest
from _jax_devices import run_on_host_devices

pytest.importorskip("jax")
pytest.importorskip("optax")

SCRIPT = textwrap.dedent(
    r"""
    import json
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flora_opt.optax import compressed_multi_steps, flora, state_shardings

    assert jax.device_count() == 4, jax.devices()
    auto_mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))
    explicit_mesh = jax.make_mesh((4,), ("x",), axis_types=(jax.sharding.AxisType.Explicit,))
    specs = {
        "rows": P(None, "x"),   # (16, 64): compressed rows, momentum (4, 64) along n
        "cols": P("x", None),   # (64, 16): compressed cols, momentum (64, 4) along m
        "fact": P("x", None),   # (128, 256): factored, compressed rows
        "conv": P(None, "x"),   # (12, 4, 3, 3): viewed (12, 36)
        "bias": P("x"),         # (64,)
    }
    shapes = {"rows": (16, 64), "cols": (64, 16), "fact": (128, 256), "conv": (12, 4, 3, 3), "bias": (64,)}
    rng = np.random.default_rng(0)
    host = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    grads = [{k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()} for _ in range(6)]
    report = {}

    optimizers = {
        "flora": flora(0.05, tau=4, kappa=2, weight_decay=0.01),
        "accumulate": compressed_multi_steps(flora(0.05, tau=4, kappa=2), every_k_schedule=2, tau=4),
    }
    references = {}
    for name, mesh, key in (
        ("flora", auto_mesh, "flora"),
        ("flora_explicit_axes", explicit_mesh, "flora"),
        ("accumulate", auto_mesh, "accumulate"),
    ):
        tx = optimizers[key]
        param_sh = {k: NamedSharding(mesh, specs[k]) for k in shapes}

        def train_step(params, state, grads):
            updates, state = tx.update(grads, state, params)
            return optax.apply_updates(params, updates), state

        if key not in references:  # unsharded reference (one device)
            params, state = jax.tree.map(jnp.asarray, host), tx.init(host)
            ref_step = jax.jit(train_step)
            for g in grads:
                params, state = ref_step(params, state, g)
            references[key] = (params, state)
        ref_params, ref_state = references[key]

        # Sharded.
        params = jax.device_put(host, param_sh)
        opt_sh = state_shardings(jax.eval_shape(tx.init, params), params, param_sh)
        state = jax.jit(tx.init, out_shardings=opt_sh)(params)
        step = jax.jit(train_step, in_shardings=(param_sh, opt_sh, param_sh), out_shardings=(param_sh, opt_sh))
        for g in grads:
            params, state = step(params, state, jax.device_put(g, param_sh))
        err = max(
            float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))
            for a, b in zip(jax.tree_util.tree_leaves((params, state)), jax.tree_util.tree_leaves((ref_params, ref_state)))
        )
        scale = max(float(np.max(np.abs(np.asarray(a)))) for a in jax.tree_util.tree_leaves(ref_params))
        second, ema = (state.inner_opt_state if name == "accumulate" else state)[:2]  # the chain's stages
        leaves = {
            "rows_momentum": ema.exp_avg["rows"],
            "cols_momentum": ema.exp_avg["cols"],
            "fact_momentum": ema.exp_avg["fact"],
            "fact_row": second.exp_avg_sq_row["fact"],
            "fact_col": second.exp_avg_sq_col["fact"],
            "conv_momentum": ema.exp_avg["conv"],
            "bias_momentum": ema.exp_avg["bias"],
        }
        if name == "accumulate":
            leaves["rows_buffer"] = state.accumulator.buffer["rows"]
            leaves["cols_buffer"] = state.accumulator.buffer["cols"]
            leaves["rows_basis"] = state.accumulator.basis["rows"]
        report[name] = {
            "max_abs_err": err,
            "param_scale": scale,
            "states": {
                k: {"shape": list(v.shape), "spec": str(v.sharding.spec),
                    "shard_shape": list(v.addressable_shards[0].data.shape)}
                for k, v in leaves.items()
            },
        }
    print("REPORT" + json.dumps(report))
    """
)


@pytest.mark.slow
def test_sharded_equals_unsharded_and_states_are_sharded():
    stdout = run_on_host_devices(SCRIPT, fast_compile=True)  # both runs compiled alike
    line = next(line for line in stdout.splitlines() if line.startswith("REPORT"))
    report = json.loads(line[len("REPORT") :])
    for name, entry in report.items():
        assert entry["max_abs_err"] <= 1e-5 * max(1.0, entry["param_scale"]), (name, entry["max_abs_err"])
        states = entry["states"]
        # Compressed momentum follows the parameter's sharded dimension: a quarter per device.
        assert states["rows_momentum"]["shape"] == [4, 64] and states["rows_momentum"]["shard_shape"] == [4, 16]
        assert states["cols_momentum"]["shape"] == [64, 4] and states["cols_momentum"]["shard_shape"] == [16, 4]
        assert states["fact_momentum"]["shape"] == [4, 256] and states["fact_momentum"]["shard_shape"] == [4, 256]
        assert states["fact_row"]["shard_shape"] == [32]  # (128,) along the sharded rows
        assert states["fact_col"]["shard_shape"] == [256]
        assert states["conv_momentum"]["shape"] == [4, 36] and states["conv_momentum"]["shard_shape"] == [4, 9]
        assert states["bias_momentum"]["shard_shape"] == [16]
    buffers = report["accumulate"]["states"]
    assert buffers["rows_buffer"]["shard_shape"] == [4, 16]
    assert buffers["cols_buffer"]["shard_shape"] == [16, 4]
    # the subspace estimator's (min(m, n), tau) basis is small and replicated
    assert buffers["rows_basis"]["shape"] == [16, 4] and buffers["rows_basis"]["shard_shape"] == [16, 4]


SQUARE_SCRIPT = textwrap.dedent(
    r"""
    import json
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import NamedSharding, PartitionSpec as P
    from flora_opt.optax import compressed_multi_steps, flora, state_shardings

    mesh = jax.make_mesh((2, 2), ("a", "b"), axis_types=(jax.sharding.AxisType.Auto,) * 2)
    specs = {
        "square": P("a", "b"),         # (256, 256): compressed rows side, factored
        "square_t": P("b", "a"),       # the same with the axes swapped
        "full": P("a", "b"),           # (256, 256) with tau=None below: full momentum
        "unfactored": P("a", "b"),     # (64, 64): below min_dim_size_to_factor, full second moment
        "conv": P("a", None, "b"),     # (256, 4, 64): matrix view (256, 256), a later dim sharded
        "bias": P("b"),                # (256,)
    }
    shapes = {"square": (256, 256), "square_t": (256, 256), "full": (256, 256), "unfactored": (64, 64),
              "conv": (256, 4, 64), "bias": (256,)}
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}
    param_sh = {k: NamedSharding(mesh, specs[k]) for k in shapes}
    tx = compressed_multi_steps(flora(1e-3, tau=8), every_k_schedule=2, tau=8)
    abstract = jax.eval_shape(tx.init, params)
    sh = state_shardings(abstract, params, param_sh)
    full_sh = state_shardings(jax.eval_shape(flora(1e-3, tau=None).init, params), params, param_sh)
    report = {}
    # stage 0: second moment (step, exp_avg_sq_*); stage 1: compressed_ema (step, seed, exp_avg)
    for stage, fields in ((0, ("step", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq")), (1, ("step", "seed", "exp_avg"))):
        inner, inner_shape = sh.inner_opt_state[stage], abstract.inner_opt_state[stage]
        for field in fields:
            for k in shapes:
                name = f"ema_{field}" if (stage, field) == (1, "step") else field
                report[f"{name}/{k}"] = [list(getattr(inner_shape, field)[k].shape), repr(tuple(getattr(inner, field)[k].spec))]
    for k in shapes:
        report[f"buffer/{k}"] = [list(abstract.accumulator.buffer[k].shape), repr(tuple(sh.accumulator.buffer[k].spec))]
        report[f"full_exp_avg/{k}"] = [None, repr(tuple(full_sh[1].exp_avg[k].spec))]
    # the shardings are usable as they are: init under jit places each leaf as specified
    real = {k: jax.device_put(jnp.zeros(s, jnp.float32), param_sh[k]) for k, s in shapes.items()}
    state = jax.jit(tx.init, out_shardings=sh)(real)
    report["col_shard_shape"] = list(state.inner_opt_state[0].exp_avg_sq_col["square"].addressable_shards[0].data.shape)
    print("REPORT" + json.dumps(report))
    """
)


def test_square_matrix_sharded_on_both_axes_every_state_leaf_by_key():
    """Each state leaf's spec follows its key in the layout, not its shape: for a square
    parameter sharded P('a', 'b') the column statistic is P('b') (a shape guess gave P('a'))."""
    stdout = run_on_host_devices(SQUARE_SCRIPT)
    line = next(line for line in stdout.splitlines() if line.startswith("REPORT"))
    got = {k: tuple(v) if k == "col_shard_shape" else v[1] for k, v in json.loads(line[len("REPORT") :]).items()}
    shapes = {k: v[0] for k, v in json.loads(line[len("REPORT") :]).items() if k != "col_shard_shape"}
    replicated = "()"
    expected = {}
    for k in ("square", "square_t", "full", "unfactored", "conv", "bias"):
        expected[f"step/{k}"] = replicated
        expected[f"ema_step/{k}"] = replicated
        expected[f"seed/{k}"] = replicated
    expected.update(
        {
            # square P('a', 'b'), rows side (8, 256): the rank side replicated, the columns along 'b'
            "exp_avg/square": "(None, 'b')",
            "exp_avg_sq_row/square": "('a',)",
            "exp_avg_sq_col/square": "('b',)",
            "exp_avg_sq/square": replicated,  # placeholder
            "buffer/square": "(None, 'b')",
            # the same parameter sharded P('b', 'a')
            "exp_avg/square_t": "(None, 'a')",
            "exp_avg_sq_row/square_t": "('b',)",
            "exp_avg_sq_col/square_t": "('a',)",
            "exp_avg_sq/square_t": replicated,
            "buffer/square_t": "(None, 'a')",
            "exp_avg/full": "(None, 'b')",
            "exp_avg_sq_row/full": "('a',)",
            "exp_avg_sq_col/full": "('b',)",
            "exp_avg_sq/full": replicated,
            "buffer/full": "(None, 'b')",
            # (64, 64) at tau=8: compressed rows momentum; second moment unfactored, the parameter's spec
            "exp_avg/unfactored": "(None, 'b')",
            "exp_avg_sq_row/unfactored": replicated,
            "exp_avg_sq_col/unfactored": replicated,
            "exp_avg_sq/unfactored": "('a', 'b')",
            "buffer/unfactored": "(None, 'b')",
            # (256, 4, 64) P('a', None, 'b'): the flattened columns cannot follow 'b', so replicated
            "exp_avg/conv": "(None, None)",
            "exp_avg_sq_row/conv": "('a',)",
            "exp_avg_sq_col/conv": "(None,)",
            "exp_avg_sq/conv": replicated,
            "buffer/conv": "(None, None)",
            # a vector keeps its full states with the parameter's spec
            "exp_avg/bias": "('b',)",
            "exp_avg_sq_row/bias": replicated,
            "exp_avg_sq_col/bias": replicated,
            "exp_avg_sq/bias": "('b',)",
            "buffer/bias": "('b',)",
            # tau=None: full momentum of the parameter's shape and spec
            "full_exp_avg/square": "('a', 'b')",
            "full_exp_avg/square_t": "('b', 'a')",
            "full_exp_avg/full": "('a', 'b')",
            "full_exp_avg/unfactored": "('a', 'b')",
            "full_exp_avg/bias": "('b',)",
            "col_shard_shape": (128,),  # (256,) split over the 2 devices of axis 'b'
        }
    )
    got.pop("full_exp_avg/conv")  # full momentum of a 3-D parameter: checked in the unsharded tests
    assert got == expected, {
        k: (got.get(k), expected.get(k), shapes.get(k))
        for k in set(got) | set(expected)
        if got.get(k) != expected.get(k)
    }
