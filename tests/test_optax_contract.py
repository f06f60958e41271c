"""optax's own generic tests, run against ``flora_opt.optax``.

optax ships its tests in its wheel. This module imports the generic ones, those every optax
optimizer passes, and runs them with Flora's configurations in place of optax's optimizers, and
with :func:`flora_opt.optax.compressed_multi_steps` in place of ``optax.MultiSteps``; no test code
is copied:

* ``optax/_src/alias_test.py``, ``AliasTest``: convergence on optax's targets (a parabola and the
  Rosenbrock function, and the same targets stacked into a matrix so that the second moment is
  factored and the momentum compressed) with no recompilation, extra arguments to ``update``,
  ``optax.inject_hyperparams``, the dtype of the updates, dtype-stable states under ``lax.cond``,
  use inside ``optax.MultiSteps``;
* ``optax/transforms/_accumulation_test.py``, ``AccumulationTest``: the ``MultiSteps`` tests.

A test reads the optimizer as ``getattr(optax._src.alias, opt_name)``, so each configuration is
registered there under its name for the test (``monkeypatch``). The arguments that fix the state
layout (``LAYOUT_ARGUMENTS``) are part of a configuration: ``inject_hyperparams`` would turn them
into arrays, traced inside the jitted ``init`` of optax's test, where Flora refuses them
(docs/jax.md); optax's own test gives ``optax.adafactor`` a static list for the same reason.
"""

import inspect
import types

import pytest

optax = pytest.importorskip("optax")
_reason = "optax's test modules need absl-py and scikit-learn: pip install -e '.[dev]'"
alias_test = pytest.importorskip("optax._src.alias_test", reason=_reason)
accumulation_test = pytest.importorskip("optax.transforms._accumulation_test", reason=_reason)
import jax.numpy as jnp  # noqa: E402
from optax._src import alias as optax_alias  # noqa: E402

from flora_opt.optax import compressed_multi_steps, flora, has_updated, scale_by_flora  # noqa: E402

#: flora's arguments that ``init`` reads as Python values (they fix the state layout).
LAYOUT_ARGUMENTS = ("b1", "tau", "seed", "min_dim_size_to_factor", "max_aspect_ratio")
#: The rank of compressed_multi_steps standing in for optax.MultiSteps: optax's (7, 10) Dense
#: kernel is accumulated compressed, the bias in float32.
ACCUMULATION_TAU = 2


def _configuration(make, **layout):
    """A factory with flora's signature less ``LAYOUT_ARGUMENTS`` (every other argument, numeric
    ones included, left to the test and to ``inject_hyperparams``), that calls ``make`` with the
    configuration's layout arguments."""
    signature = inspect.signature(flora)
    fixed = {name: signature.parameters[name].default for name in LAYOUT_ARGUMENTS} | layout
    kept = inspect.Signature([p for p in signature.parameters.values() if p.name not in LAYOUT_ARGUMENTS])

    def factory(*args, **kwargs):
        return make(**kept.bind(*args, **kwargs).arguments, **fixed)

    factory.__signature__ = kept
    return factory


def _flora_in_a_chain(**kwargs):
    return optax.chain(optax.clip_by_global_norm(1.0), scale_by_flora(**kwargs), optax.scale(-1.0))


# name -> (factory, the optimizer's keyword arguments in optax's tests)
CONFIGURATIONS = {
    "flora_compressed": (_configuration(flora, tau=1, max_aspect_ratio=None, min_dim_size_to_factor=2), {}),
    "flora_full_momentum": (_configuration(flora, tau=None), {}),
    "flora_no_momentum": (_configuration(flora, b1=None), {}),
    # Resampled every 7 steps, the smallest kappa that is stable at rank 1 for these matrices.
    "flora_resampling": (
        _configuration(flora, tau=1, max_aspect_ratio=None, min_dim_size_to_factor=2),
        {"kappa": 7},
    ),
    "scale_by_flora_in_a_chain": (_configuration(_flora_in_a_chain, tau=1, max_aspect_ratio=None), {}),
}
LEARNING_RATE = 1e-2
OPTIMIZERS = [
    pytest.param({"opt_name": name, "opt_kwargs": {"learning_rate": LEARNING_RATE, **kwargs}}, id=name)
    for name, (_, kwargs) in CONFIGURATIONS.items()
]
COMPLEX = "Flora refuses complex parameters and gradients (a ValueError naming the dtype, tests/test_optax.py)"


class CompressedMultiSteps:
    """``optax.MultiSteps``'s interface (how its tests build and query the wrapper) over
    :func:`compressed_multi_steps`."""

    def __init__(self, opt, every_k_schedule, use_grad_mean=True):
        self._transformation = compressed_multi_steps(
            opt, every_k_schedule, tau=ACCUMULATION_TAU, use_grad_mean=use_grad_mean
        )
        self.init, self.update = self._transformation.init, self._transformation.update

    def gradient_transformation(self):
        return self._transformation

    @staticmethod
    def has_updated(state):
        return has_updated(state)


WRAPPERS = {
    "optax.MultiSteps": accumulation_test._accumulation,
    "compressed_multi_steps": types.SimpleNamespace(MultiSteps=CompressedMultiSteps),
}


@pytest.fixture(autouse=True)
def flora_in_optax(monkeypatch):
    """Flora's configurations under their names in ``optax._src.alias``, where optax's tests look
    optimizers up."""
    for name, (factory, _) in CONFIGURATIONS.items():
        monkeypatch.setattr(optax_alias, name, factory, raising=False)


def _run(case_class, name: str, **arguments) -> None:
    """Run test method ``name`` of the absl ``parameterized.TestCase`` ``case_class`` with
    ``arguments`` (its undecorated function: absl's ``parameterized`` keeps it as ``__wrapped__``
    of each case it generates)."""
    generated = [n for n in dir(case_class) if n == name or (n.startswith(name) and n[len(name) :].isdigit())]
    assert generated, f"{case_class.__name__} has no test {name!r}"
    function = inspect.unwrap(getattr(case_class, generated[0]))
    function(case_class(generated[0]), **arguments)


def _stacked(target):
    """``target`` twice, as the rows of a matrix started from two points: Flora's matrix layouts
    (factored second moment, compressed momentum) on optax's objective."""

    def setup(dtype):
        initial, final, objective = target(dtype)
        start = jnp.stack([initial, final + 0.5 * (final - initial)])
        return start, jnp.stack([final, final]), lambda params: objective(params[0]) + objective(params[1])

    return setup


TARGETS = {
    "parabola": alias_test._setup_parabola,
    "rosenbrock": alias_test._setup_rosenbrock,
    "stacked_parabola": _stacked(alias_test._setup_parabola),
    "stacked_rosenbrock": _stacked(alias_test._setup_rosenbrock),
}


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize(
    "dtype",
    [jnp.float32, pytest.param(jnp.complex64, marks=pytest.mark.skip(reason=COMPLEX))],
    ids=lambda dtype: dtype.__name__,
)
def test_optimization(optimizer, target, dtype):
    """Converges to optax's tolerance in its 10000 steps, compiling the step once."""
    _run(alias_test.AliasTest, "test_optimization", **optimizer, target=TARGETS[target], dtype=dtype)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_accepts_extra_args(optimizer):
    _run(alias_test.AliasTest, "test_optimizers_accept_extra_args", **optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
def test_can_be_wrapped_in_inject_hyperparams(optimizer):
    """The same updates and states, jitted, with and without ``inject_hyperparams``."""
    _run(alias_test.AliasTest, "test_optimizers_can_be_wrapped_in_inject_hyperparams", **optimizer)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_preserve_dtype(optimizer, dtype):
    _run(alias_test.AliasTest, "test_preserve_dtype", **optimizer, dtype=dtype)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize(
    "dtype",
    [
        jnp.float16,
        jnp.bfloat16,
        jnp.float32,
        jnp.float64,
        pytest.param(jnp.complex64, marks=pytest.mark.skip(reason=COMPLEX)),
        pytest.param(jnp.complex128, marks=pytest.mark.skip(reason=COMPLEX)),
    ],
    ids=lambda dtype: dtype.__name__,
)
def test_state_shape_dtype_shard_stability(optimizer, dtype):
    _run(alias_test.AliasTest, "test_state_shape_dtype_shard_stability", **optimizer, dtype=dtype)


@pytest.mark.parametrize("optimizer", OPTIMIZERS)
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("wrapper", list(WRAPPERS))
def test_gradient_accumulation(monkeypatch, optimizer, dtype, wrapper):
    """Zero updates before the k-th micro-batch, in ``optax.MultiSteps`` and in
    ``compressed_multi_steps``."""
    monkeypatch.setattr(alias_test, "_accumulation", WRAPPERS[wrapper])
    _run(alias_test.AliasTest, "test_gradient_accumulation", **optimizer, dtype=dtype)


MULTI_STEPS_TESTS = [
    "test_multi_steps",
    "test_multi_steps_every_k_schedule",
    "test_multi_steps_zero_nans",
    "test_multi_steps_computes_mean",
    pytest.param(
        "test_multi_steps_skip_not_finite",
        marks=pytest.mark.skip(reason="compressed_multi_steps has no should_skip_update_fn"),
    ),
    pytest.param(
        "test_multi_steps_scan_dtype_stability",
        marks=pytest.mark.skip(
            reason="reads MultiStepsState.acc_grads; compressed_multi_steps keeps its float32 buffers in "
            "AccumulatorState.buffer (dtypes and lax.scan: tests/test_optax_accumulation.py)"
        ),
    ),
]


@pytest.fixture
def compressed_multi_steps_as_multi_steps(monkeypatch):
    monkeypatch.setattr(accumulation_test, "_accumulation", WRAPPERS["compressed_multi_steps"])


@pytest.mark.usefixtures("compressed_multi_steps_as_multi_steps")
@pytest.mark.parametrize("name", MULTI_STEPS_TESTS)
def test_compressed_multi_steps_passes_the_multi_steps_tests(name):
    _run(accumulation_test.AccumulationTest, name)


@pytest.mark.usefixtures("compressed_multi_steps_as_multi_steps")
def test_compressed_multi_steps_mixed_precision():
    """Updates of the inner optimizer's dtypes, and parameters that keep theirs, for every
    combination of float32, float16 and bfloat16 parameters and gradients, with optax's first
    inner optimizer: adam, whose moments have the parameters' dtype (float16 moments fed float32
    gradients). Flora inside ``compressed_multi_steps`` is in test_gradient_accumulation and
    tests/test_optax_accumulation.py. (optax's test steps eagerly, so each call compiles its
    ``lax.cond``: its second case, float32 moments, is left out.)"""
    optimizer = accumulation_test.OPTIMIZERS_TO_TEST[0]
    assert optimizer == {"opt_name": "adam", "opt_kwargs": {"learning_rate": 0.1}}
    _run(accumulation_test.AccumulationTest, "test_multi_steps_mixed_precision", **optimizer)
