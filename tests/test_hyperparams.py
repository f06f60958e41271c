"""The hyperparameter record (flora_opt/hyperparams.py) is the one place an option is written:
torch defaults, validation, signatures, docstrings, the optax arguments and the doc tables all
follow from it (docs/architecture.md, "Adding things")."""

import dataclasses
import importlib.util
import inspect
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from flora_opt import Flora, hyperparams
from flora_opt.hyperparams import DEFAULTS, FloraHyperParams, from_group, from_optax, options
from flora_opt.reference import ReferenceFlora

ROOT = Path(__file__).resolve().parent.parent


def _option_docs():
    spec = importlib.util.spec_from_file_location("option_docs", ROOT / "tools" / "option_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_doc_tables_are_the_records():
    """README.md and docs/jax.md hold the tables tools/option_docs.py renders from the record: an
    option missing there, or with another default, fails here (run the script to fix it)."""
    docs = _option_docs()
    for relative, names in docs.BLOCKS.items():
        text = (ROOT / relative).read_text()
        for name in names:
            assert docs.current(text, name) == docs.render(name), (
                f"{relative}: block {name!r} is out of date: run python tools/option_docs.py"
            )
    table = docs.render("torch-options")
    for key, default in DEFAULTS.items():
        assert f"| `{key}` | " + ("required" if key == "lr" else f"`{default!r}`") in table, key


def test_docstrings_and_signatures_list_every_option():
    flora_optax = pytest.importorskip("flora_opt.optax")
    torch_parameters = inspect.signature(Flora).parameters
    for key, default in DEFAULTS.items():
        assert torch_parameters[key].default == default, key
        assert f"      {key} (" in Flora.__doc__, key
    optax_parameters = inspect.signature(flora_optax.flora).parameters
    for entry in options():
        if entry.optax is not None:
            assert optax_parameters[entry.optax].default == entry.optax_default, entry.optax
            assert f"      {entry.optax} (" in flora_optax.flora.__doc__, entry.optax
    assert inspect.signature(flora_optax.scale_by_flora) == inspect.signature(flora_optax.flora)


def test_torch_and_optax_defaults_give_the_same_record():
    """The two frameworks' defaults name the same record (``b2 = -decay_rate``, ``eps`` split)."""
    torch_record = from_group(dict(DEFAULTS, lr=1e-3))
    optax_record = from_optax({e.optax: e.optax_default for e in options() if e.optax and e.name != "lr"})
    assert optax_record.decay_rate == torch_record.decay_rate == -0.8
    assert (optax_record.eps1, optax_record.eps2) == (torch_record.eps1, torch_record.eps2) == (1e-30, 1e-3)
    shared = [e.name for e in options() if e.torch is not None and e.optax is not None and e.name != "lr"]
    for name in shared:
        assert getattr(optax_record, name) == getattr(torch_record, name), name
    assert from_group(dict(DEFAULTS, lr=1e-3, beta1=0)).beta1 is None  # 0 and None: no momentum


def test_the_reference_has_the_records_defaults():
    """reference.py (the float64 spec) shares no code with the library, but not other defaults."""
    reference = {f.name: f.default for f in dataclasses.fields(ReferenceFlora) if f.name in DEFAULTS}
    assert reference == {key: DEFAULTS[key] for key in reference}
    assert len(reference) >= 15


def test_a_tuple_option_is_validated_element_by_element():
    with pytest.raises(ValueError, match=r"Invalid eps: \(1e-30,\): expected a tuple \(eps1, eps2\) of 2 floats"):
        Flora([], lr=0.1, eps=(1e-30,))
    with pytest.raises(ValueError, match=r"Invalid eps value at index 1: 0\.0: must be a finite float > 0"):
        Flora([], lr=0.1, eps=(1e-30, 0.0))
    with pytest.raises(KeyError, match=r"'rank' is not an argument of flora_opt.optax.flora"):
        hyperparams.check_optax("rank", 4)


# One field added to the record, in a copy of the package: nothing else is edited.
_NEW_FIELD = '    zeta: float = option(0.5, "a throw-away option", _real(above=0.0), optax="zeta_opt", convert=float)\n'

_SCRIPT = textwrap.dedent("""
    import inspect, sys
    import flora_opt
    assert flora_opt.__file__.startswith(sys.argv[1]), flora_opt.__file__
    import torch
    from flora_opt import Flora, core

    def raises(call, text):
        try:
            call()
        except ValueError as error:
            assert text in str(error), str(error)
        else:
            raise AssertionError(f"no error: {text}")

    # torch: a group option with its default, in the signature and the docstring, validated by name
    p = torch.nn.Parameter(torch.ones(4, 4))
    assert Flora([p], lr=0.1).defaults["zeta"] == 0.5
    assert inspect.signature(Flora).parameters["zeta"].default == 0.5
    assert "zeta (default 0.5): a throw-away option" in Flora.__doc__
    raises(lambda: Flora([p], lr=0.1, zeta=-1.0), "Invalid zeta: -1.0: must be a finite float > 0")
    raises(lambda: Flora([p], lr=0.1).add_param_group({"params": [torch.ones(2)], "zeta": 0}), "Invalid zeta: 0")

    # ... that reaches the record of core.flora_update, per group, in both torch paths: per tensor
    # (a gradient (4, 4)) and grouped (a stack (1, 4, 4))
    seen = []
    flora_update = core.flora_update
    core.flora_update = lambda *a, **k: (seen.append((a[0].ndim, a[6].zeta)), flora_update(*a, **k))[1]
    q, r = torch.nn.Parameter(torch.ones(4, 4)), torch.nn.Parameter(torch.ones(4, 4))
    groups = [{"params": [p], "zeta": 0.25, "foreach": False}, {"params": [q]}, {"params": [r], "zeta": 0.75}]
    optimizer = Flora(groups, lr=0.1)
    p.grad, q.grad, r.grad = torch.ones(4, 4), torch.ones(4, 4), torch.ones(4, 4)
    optimizer.step()
    assert seen == [(2, 0.25), (3, 0.5), (3, 0.75)], seen
    saved = optimizer.state_dict()
    assert [group["zeta"] for group in saved["param_groups"]] == [0.25, 0.5, 0.75]
    Flora([{"params": [p]}, {"params": [q]}, {"params": [r]}], lr=0.1).load_state_dict(saved)

    # optax: a keyword-only argument of flora with its default, validated by its optax name ...
    import jax.numpy as jnp, optax
    from flora_opt.optax import flora, scale_by_flora
    parameter = inspect.signature(flora).parameters["zeta_opt"]
    assert parameter.default == 0.5 and parameter.kind is parameter.KEYWORD_ONLY
    assert "zeta_opt" in inspect.signature(scale_by_flora).parameters
    assert "zeta_opt (keyword, default 0.5): a throw-away option. PyTorch: ``zeta``" in flora.__doc__
    raises(lambda: flora(1e-3, zeta_opt=-1.0), "Invalid zeta_opt: -1.0: must be a finite float > 0")

    # ... that reaches the record of the core functions the stages call, injected or not
    seen.clear()
    normalised_update, momentum_direction = core.normalised_update, core.momentum_direction
    core.normalised_update = lambda *a: (seen.append(float(a[4].zeta)), normalised_update(*a))[1]
    core.momentum_direction = lambda *a, **k: (seen.append(float(a[5].zeta)), momentum_direction(*a, **k))[1]
    params = {"w": jnp.ones((8, 8))}
    for tx in (flora(1e-3, tau=2, zeta_opt=0.75), optax.inject_hyperparams(flora)(learning_rate=1e-3, tau=2,
                                                                                   zeta_opt=0.75)):
        tx.update(params, tx.init(params), params)
    assert seen == [0.75] * 4, seen

    # the doc tables: one more row each
    sys.path.insert(0, sys.argv[2])
    import option_docs
    assert "| `zeta` | `0.5` | a throw-away option | |" in option_docs.render("torch-options")
    assert "| `zeta_opt` (keyword) | 0.5 | `zeta` | 0.5 | |" in option_docs.render("optax-options")
    assert "    zeta_opt=0.5," in option_docs.render("optax-signature")
    print("ok")
""")


@pytest.mark.slow
def test_adding_an_option_touches_only_the_record(tmp_path):
    """docs/architecture.md's claim, executed: one field added to FloraHyperParams (in a copy of
    the package) is a torch group option (default, signature, docstring, validation, checkpoint)
    that reaches the record of core.flora_update in the per-tensor and the grouped step, and an optax argument of
    flora/scale_by_flora (signature, docstring, validation, inject_hyperparams) that reaches the
    record of the core functions the stages call, and a row of each doc table."""
    pytest.importorskip("optax")
    copy = tmp_path / "flora_opt"
    shutil.copytree(ROOT / "flora_opt", copy, ignore=shutil.ignore_patterns("__pycache__"))
    record = copy / "hyperparams.py"
    text = record.read_text()
    anchor = "    foreach: bool | None = option("
    assert text.count(anchor) == 1
    record.write_text(text.replace(anchor, _NEW_FIELD + anchor))
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    completed = subprocess.run(
        [sys.executable, "-c", _SCRIPT, str(copy), str(ROOT / "tools")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-4000:]


def test_the_record_type_is_shared():
    """core and the framework layers read the record of hyperparams.py (one class, not copies)."""
    from flora_opt import core

    assert core.FloraHyperParams is FloraHyperParams
