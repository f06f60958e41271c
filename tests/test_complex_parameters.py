"""Complex parameters are refused, with the reason and the real parameterisation to use instead
(docs/algorithm.md section 1); that parameterisation trains, in PyTorch and in optax."""

import pytest


def test_torch_refuses_complex_parameters_and_names_the_real_view():
    torch = pytest.importorskip("torch")
    import flora_opt

    param = torch.nn.Parameter(torch.randn(4, 6, dtype=torch.complex64))
    with pytest.raises(
        ValueError,
        match=r"Flora does not support complex parameters \(shape \(4, 6\), torch\.complex64\): its second moment.*"
        r"Keep a real parameter of shape \(4, 6, 2\) instead \(torch\.view_as_real\)",
    ):
        flora_opt.Flora([param], lr=1e-2)


def test_torch_real_view_of_a_complex_parameter_trains():
    torch = pytest.importorskip("torch")
    import flora_opt

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(16, 24, dtype=torch.complex64, generator=generator)
    real = torch.nn.Parameter(torch.view_as_real(weight).clone())  # (16, 24, 2): matrix view (16, 48)
    x = torch.randn(24, dtype=torch.complex64, generator=generator)
    optimizer = flora_opt.Flora([real], lr=1e-2, rank=4, min_dim_size_to_factor=8)

    def loss():
        return (torch.view_as_complex(real) @ x).abs().pow(2).sum()

    initial = loss().item()
    for _ in range(20):
        optimizer.zero_grad()
        loss().backward()
        optimizer.step()
    assert loss().item() < 0.9 * initial
    assert optimizer.state[real]["exp_avg"].shape == (4, 48)  # compressed like a real (16, 48) matrix


def test_optax_refuses_complex_leaves_and_split_real_and_imaginary_trains():
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    import jax.numpy as jnp

    from flora_opt.optax import flora

    keys = jax.random.split(jax.random.key(0), 3)
    params = {"w": (jax.random.normal(keys[0], (16, 24)) + 1j * jax.random.normal(keys[1], (16, 24)))}
    params = jax.tree.map(lambda a: a.astype(jnp.complex64), params)
    x = jax.random.normal(keys[2], (24,)).astype(jnp.complex64)
    with pytest.raises(ValueError, match=r"Flora does not support complex parameters or gradients \(dtype complex64\)"):
        flora(1e-2).init(params)

    def loss(p):
        return jnp.sum(jnp.abs(p["w"] @ x) ** 2)

    tx = optax.contrib.split_real_and_imaginary(flora(1e-2, tau=4, min_dim_size_to_factor=8))

    @jax.jit
    def step(params, state):
        grads = jax.tree.map(jnp.conj, jax.grad(loss)(params))  # the descent direction of a real loss
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    state = tx.init(params)
    initial = loss(params)
    for _ in range(20):
        params, state = step(params, state)
    assert loss(params) < 0.9 * initial
    assert params["w"].dtype == jnp.complex64
