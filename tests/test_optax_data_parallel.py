"""Compressed accumulation across devices in JAX, on a 4-device CPU mesh.

* ``compressed_accumulator(axis_name=...)`` inside ``jax.shard_map``: the compiled step's
  all-reduces carry the compressed ``tau x max(m, n)`` buffers and the uncompressed leaves (and,
  for the subspace estimator, the ``min(m, n) x tau`` range sketches first), never a gradient, and
  the result is single-device compressed accumulation over the global batch. For the subspace
  estimator the inputs lie in a 2-dimensional subspace and the loss is linear in the output, so
  every weight gradient has rank <= 2 on its compressed side: both estimates are then exact.
* ``compressed_multi_steps`` under a data-parallel ``jax.jit`` (batch sharded, parameters
  replicated): XLA all-reduces the full-size gradient of every micro-batch before it reaches the
  accumulator (the statement of docs/distributed.md), with the single-device numerics.

The mesh needs ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` before JAX starts, so the
checks run in a subprocess.
"""

import json
import textwrap

import pytest
from _jax_devices import run_on_host_devices

pytest.importorskip("jax")
pytest.importorskip("optax")

SCRIPT = textwrap.dedent(
    r"""
    import json, re
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from flora_opt.optax import compressed_accumulator, compressed_multi_steps, flora

    assert jax.device_count() == 4, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("data",))
    K, TAU, SEED, ESTIMATOR = 3, 4, 3, "__ESTIMATOR__"
    rng = np.random.default_rng(0)
    # (16, 40): compressed rows, buffer (4, 40); (40, 12): compressed cols, buffer (40, 4); bias: plain
    params = {"rows": jnp.asarray(rng.normal(size=(16, 40)) * 0.1, jnp.float32),
              "cols": jnp.asarray(rng.normal(size=(40, 12)) * 0.1, jnp.float32),
              "bias": jnp.zeros((12,), jnp.float32)}
    batches = jnp.asarray(rng.normal(size=(2, K, 8, 16)), jnp.float32)  # 2 steps of K global micro-batches of 8
    readout = jnp.asarray(rng.normal(size=(12,)), jnp.float32)
    if ESTIMATOR == "subspace":
        batches = batches[..., :2] @ jnp.asarray(rng.normal(size=(2, 16)), jnp.float32)

    def loss_fn(p, x):
        out = jnp.tanh(x @ p["rows"]) @ p["cols"] + p["bias"]
        return jnp.mean(out @ readout) if ESTIMATOR == "subspace" else jnp.mean(out ** 2)

    tx = flora(1e-2, tau=TAU, min_dim_size_to_factor=8)

    def train_step(acc, vma):
        def step(params, opt_state, acc_state, micro):
            local = params
            if vma:  # check_vma=True: per-device gradients and buffers are typed as varying
                local = jax.lax.pcast(params, "data", to="varying")
                acc_state = acc_state._replace(buffer=jax.lax.pcast(acc_state.buffer, "data", to="varying"),
                                               basis=jax.lax.pcast(acc_state.basis, "data", to="varying"))
            def body(acc_state, x):
                return acc.add(jax.grad(loss_fn)(local, x), acc_state, weight=1.0 / K), None
            acc_state, _ = jax.lax.scan(body, acc_state, micro)
            grads, acc_state = acc.finish(acc_state, like=params)
            updates, opt_state = tx.update(grads, opt_state, params)
            return optax.apply_updates(params, updates), opt_state, acc_state, grads
        return step

    def all_reduce_shapes(compiled):
        shapes = []
        for line in compiled.as_text().splitlines():
            match = re.search(r"= \(?([^=]*?)\)? all-reduce(?:-start)?\(", line)
            if match:
                shapes += [tuple(map(int, s.split(","))) if s else () for s in re.findall(r"f32\[([\d,]*)\]", match.group(1))]
        return shapes

    single_acc = compressed_accumulator(tau=TAU, seed=SEED, estimator=ESTIMATOR)
    single = jax.jit(train_step(single_acc, False))
    out = {}
    for vma in (False, True):
        acc = compressed_accumulator(tau=TAU, seed=SEED, axis_name="data", estimator=ESTIMATOR)
        dp = jax.jit(jax.shard_map(train_step(acc, vma), mesh=mesh, in_specs=(P(), P(), P(), P(None, "data")),
                                   out_specs=(P(), P(), P(), P()), check_vma=vma))
        p1, o1, a1 = params, tx.init(params), single_acc.init(params)
        p2, o2, a2 = params, tx.init(params), acc.init(params)
        grad_error = param_error = 0.0
        for s in range(2):  # two cycles: two accumulation projections
            p1, o1, a1, g1 = single(p1, o1, a1, batches[s])
            p2, o2, a2, g2 = dp(p2, o2, a2, batches[s])
            for k in g1:
                grad_error = max(grad_error, float(jnp.max(jnp.abs(g1[k] - g2[k])) / jnp.max(jnp.abs(g1[k]))))
        for k in p1:
            param_error = max(param_error, float(jnp.max(jnp.abs(p1[k] - p2[k])) / jnp.max(jnp.abs(p1[k]))))
        out[f"shard_map_vma{vma}"] = dict(
            grad_error=grad_error, param_error=param_error, cycle=int(a2.cycle),
            all_reduce=sorted(all_reduce_shapes(dp.lower(p2, o2, a2, batches[0]).compile())),
        )

    # compressed_multi_steps under a data-parallel jit: batch sharded, everything else replicated
    ms = compressed_multi_steps(tx, K, tau=TAU, seed=SEED, estimator=ESTIMATOR)
    def ms_step(params, state, x):
        updates, state = ms.update(jax.grad(loss_fn)(params, x), state, params)
        return optax.apply_updates(params, updates), state
    replicated, rows = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    sharded_step = jax.jit(ms_step, in_shardings=(replicated, replicated, rows), out_shardings=(replicated, replicated))
    plain_step = jax.jit(ms_step)
    p1, s1 = params, ms.init(params)
    p2, s2 = jax.device_put(params, replicated), jax.device_put(ms.init(params), replicated)
    for s in range(2):
        for k in range(K):
            p1, s1 = plain_step(p1, s1, batches[s, k])
            p2, s2 = sharded_step(p2, s2, jax.device_put(batches[s, k], rows))
    out["multi_steps_jit"] = dict(
        param_error=max(float(jnp.max(jnp.abs(p1[k] - p2[k])) / jnp.max(jnp.abs(p1[k]))) for k in p1),
        all_reduce=sorted(all_reduce_shapes(sharded_step.lower(p2, s2, jax.device_put(batches[0, 0], rows)).compile())),
    )
    print(json.dumps(out))
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["gaussian", "subspace"])
def test_compressed_buffers_are_what_devices_all_reduce(estimator):
    stdout = run_on_host_devices(SCRIPT.replace("__ESTIMATOR__", estimator), fast_compile=True)
    out = json.loads(stdout.strip().splitlines()[-1])
    for vma in (False, True):
        run = out[f"shard_map_vma{vma}"]
        # single-device compressed accumulation over the global batch: the same projections, the
        # micro-batch means of each device's share averaged across devices (summation order
        # only); subspace: both exact here (rank-2 gradients)
        tolerance = 1e-6 if estimator == "gaussian" else 2e-5
        assert run["grad_error"] < tolerance, run
        assert run["param_error"] < tolerance, run
        assert run["cycle"] == 2
        # the (4, 40) and (40, 4) buffers and the bias' plain sum; subspace: first the (16, 4) and
        # (12, 4) range sketches; never a (16, 40) or (40, 12) gradient
        sketches = [[12, 4], [16, 4]] if estimator == "subspace" else []
        assert run["all_reduce"] == sorted([[4, 40], [12], [40, 4], *sketches]), run
    jit = out["multi_steps_jit"]
    assert jit["param_error"] < 1e-6, jit
    # data-parallel jit: XLA reduces the full gradients (every micro-batch, in its own layout, e.g.
    # (12, 40) for the (40, 12) gradient) before they reach the compression: nothing of rank 4
    assert sorted(sorted(shape) for shape in jit["all_reduce"]) == [[12], [12, 40], [16, 40]], jit


@pytest.mark.parametrize("axis_name", [3, "", (), ("data", 1), ["data"]])
def test_axis_name_is_validated(axis_name):
    from flora_opt.optax import compressed_accumulator

    with pytest.raises(ValueError, match=r"Invalid axis_name: .*mesh axis name"):
        compressed_accumulator(tau=4, axis_name=axis_name)


def test_axis_name_outside_a_mapped_axis_names_the_problem():
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from flora_opt.optax import compressed_accumulator

    compressed_accumulator(tau=4, axis_name=("data", "model"))  # a tuple of axes is accepted too
    acc = compressed_accumulator(tau=4, axis_name="data")
    params = {"w": jnp.ones((16, 40))}
    state = acc.add(params, acc.init(params))  # no communication until result
    with pytest.raises(NameError, match="unbound axis name"):
        acc.result(state, like=params)
    assert jax.tree.map(jnp.shape, compressed_accumulator(tau=4).result(state, like=params)) == {"w": (16, 40)}
