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


def test_written_signatures_and_args_are_the_records():
    """``Flora.__init__``, ``flora`` and ``scale_by_flora`` are written out (typed, for type
    checkers and IDEs); their names, order, kinds and defaults, and the ``Args`` entries of
    ``Flora`` and ``flora``, are the record's."""
    pytest.importorskip("flora_opt.optax")
    docs = _option_docs()
    assert docs.signature_problems() == []
    # What the checks read is there: every option, in inspect.signature and in the docstrings.
    from flora_opt.optax import flora

    assert list(inspect.signature(Flora).parameters) == ["params", *DEFAULTS]
    assert len(docs.written_args(Flora.__doc__)) == len(DEFAULTS) + 1  # and params
    optax_names = [e.optax for e in options() if e.optax is not None]
    assert sorted(inspect.signature(flora).parameters) == sorted(optax_names)
    assert sorted(docs.written_args(flora.__doc__)) == sorted(optax_names)


def _drifted_signatures():
    """The record's optax signature, changed in each way the check must catch."""
    docs = _option_docs()
    expected = docs.optax_signature()
    parameters = list(expected.parameters.values())
    kappa = next(i for i, p in enumerate(parameters) if p.name == "kappa")
    last_positional = next(i for i, p in enumerate(parameters) if p.name == "factorized_second_moment")

    def changed(index, **replace):
        return [*parameters[:index], parameters[index].replace(**replace), *parameters[index + 1 :]]

    zeta = inspect.Parameter("zeta", inspect.Parameter.KEYWORD_ONLY, default=0.5)
    swapped = [*parameters[:kappa], parameters[kappa + 1], parameters[kappa], *parameters[kappa + 2 :]]
    return expected, [
        (
            parameters[:kappa] + parameters[kappa + 1 :],
            "argument 'kappa' is missing (the record: positional or keyword, default 1000)",
        ),
        (
            changed(kappa, default=100),
            "argument 'kappa' is positional or keyword, default 100; the record: positional or keyword, default 1000",
        ),
        (changed(kappa, default=1000.0), "argument 'kappa' is positional or keyword, default 1000.0"),
        (
            changed(last_positional, kind=inspect.Parameter.KEYWORD_ONLY),
            "argument 'factorized_second_moment' is keyword-only, default True; the record: positional or keyword",
        ),
        ([*parameters, zeta], "argument 'zeta' is not an option of the record"),
        (swapped, "arguments in the order"),
    ]


def test_the_signature_check_names_each_drift():
    expected, cases = _drifted_signatures()
    docs = _option_docs()
    assert docs.signature_differences(expected, expected, "f") == []
    for parameters, message in cases:
        problems = docs.signature_differences(expected.replace(parameters=parameters), expected, "f")
        assert len(problems) == 1 and problems[0].startswith(f"f: {message}"), problems


def test_the_args_check_names_each_drift():
    """Each change of an ``Args`` entry is named; rewrapping its lines is not a change."""
    flora_optax = pytest.importorskip("flora_opt.optax")
    docs = _option_docs()
    doc, expected = flora_optax.flora.__doc__, docs.args_entries("optax")
    assert docs.args_differences(doc, expected, "f") == []
    kappa, clipping = "      kappa (default 1000): resample", "      clipping_threshold (default 1.0)"
    seed_entry = doc[doc.index("      seed (default 0)") : doc.index(kappa)]
    assert (
        docs.args_differences(doc.replace("resample the momentum", "resample the\n        momentum"), expected, "f")
        == []
    )
    cases = [
        (doc.replace(seed_entry, ""), "f: Args has no entry for 'seed'; the record's: seed (default 0): 32-bit seed"),
        (doc.replace(kappa, "      kappa (default 100): resample"), "f: Args entry 'kappa' differs from the record's"),
        (doc.replace("resample the momentum", "resample the momentum\n        projection"), "f: Args entry 'kappa'"),
        (doc.replace(kappa, "      zeta (default 0.5): a throw-away option\n" + kappa), "f: Args entry 'zeta' is not"),
        (doc.replace(seed_entry, "").replace(clipping, seed_entry + clipping), "f: Args entries in the order"),
    ]
    for text, message in cases:
        problems = docs.args_differences(text, expected, "f")
        assert len(problems) == 1 and problems[0].startswith(message), problems
    assert docs.args_differences(None, {"x": "x (default 1): y"}, "f") == [
        "f: Args has no entry for 'x'; the record's: x (default 1): y"
    ]


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


def test_an_optax_check_of_a_torch_only_option_names_it():
    with pytest.raises(KeyError, match=r"'rank' is not an argument of flora_opt.optax.flora"):
        hyperparams.check_optax("rank", 4)


# One field added to the record, in a copy of the package.
_NEW_FIELD = '    zeta: float = option(0.5, "a throw-away option", _real(above=0.0), optax="zeta_opt", convert=float)\n'

# ... then its argument and Args entry added to the written signatures (text anchor -> insertion).
_WRITTEN = {
    "optim.py": [
        ("        foreach: bool | None = None,\n", "        zeta: float = 0.5,\n", 1, "before"),
        ("      foreach (default None): ", "      zeta (default 0.5): a throw-away option\n", 1, "before"),
    ],
    "optax/alias.py": [
        ('    projection_dtype: str = "float32",\n', "    zeta_opt: float = 0.5,\n", 2, "after"),
        (
            "        faster on CPUs with AVX512-BF16 and GPUs\n",
            "      zeta_opt (keyword, default 0.5): a throw-away option. PyTorch: ``zeta``\n",
            1,
            "after",
        ),
    ],
}

_CHECK_SIGNATURES = textwrap.dedent("""
    import sys
    import flora_opt
    assert flora_opt.__file__.startswith(sys.argv[1]), flora_opt.__file__
    sys.path.insert(0, sys.argv[2])
    import option_docs
    print("\\n".join(option_docs.signature_problems()))
""")

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

    # torch: a group option with its default, validated by name
    p = torch.nn.Parameter(torch.ones(4, 4))
    assert Flora([p], lr=0.1).defaults["zeta"] == 0.5
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

    # optax: an argument of flora validated by its optax name ...
    import jax.numpy as jnp, optax
    from flora_opt.optax import flora, scale_by_flora
    raises(lambda: flora(1e-3, zeta_opt=-1.0), "Invalid zeta_opt: -1.0: must be a finite float > 0")
    raises(lambda: scale_by_flora(1e-3, zeta_opt=0.0), "Invalid zeta_opt: 0.0: must be a finite float > 0")

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

    # the written signatures agree with the record again; the doc tables have one more row each
    sys.path.insert(0, sys.argv[2])
    import option_docs
    assert option_docs.signature_problems() == [], option_docs.signature_problems()
    assert "| `zeta` | `0.5` | a throw-away option | |" in option_docs.render("torch-options")
    assert "| `zeta_opt` (keyword) | 0.5 | `zeta` | 0.5 | |" in option_docs.render("optax-options")
    assert "    zeta_opt=0.5," in option_docs.render("optax-signature")
    print("ok")
""")


def _run(script: str, copy: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    return subprocess.run(
        [sys.executable, "-c", script, str(copy), str(ROOT / "tools")],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )


def _insert(path: Path, edits) -> None:
    text = path.read_text()
    for anchor, line, count, where in edits:
        assert text.count(anchor) == count, (path.name, anchor)
        text = text.replace(anchor, line + anchor if where == "before" else anchor + line)
    path.write_text(text)


@pytest.mark.slow
def test_adding_an_option(tmp_path):
    """docs/architecture.md's recipe, executed in a copy of the package. One field added to
    FloraHyperParams: the signature check names each written signature and Args section that
    lacks it. With the argument and its Args line written in (and nothing else edited), it is a
    torch group option (default, validation, checkpoint) that reaches the record of
    core.flora_update in the per-tensor and the grouped step, an optax argument of flora/scale_by_flora
    (validation, inject_hyperparams) that reaches the record of the core functions the stages
    call, and a row of each doc table."""
    pytest.importorskip("optax")
    copy = tmp_path / "flora_opt"
    shutil.copytree(ROOT / "flora_opt", copy, ignore=shutil.ignore_patterns("__pycache__"))
    _insert(copy / "hyperparams.py", [("    foreach: bool | None = option(", _NEW_FIELD, 1, "before")])

    completed = _run(_CHECK_SIGNATURES, copy, tmp_path)
    assert completed.returncode == 0, completed.stderr[-4000:]
    problems = completed.stdout.strip().splitlines()
    assert problems == [
        "flora_opt.Flora: argument 'zeta' is missing (the record: keyword-only, default 0.5)",
        "flora_opt.Flora: Args has no entry for 'zeta'; the record's: zeta (default 0.5): a throw-away option",
        "flora_opt.optax.flora: argument 'zeta_opt' is missing (the record: keyword-only, default 0.5)",
        "flora_opt.optax.flora: Args has no entry for 'zeta_opt'; the record's: zeta_opt (keyword, default 0.5): a "
        "throw-away option. PyTorch: ``zeta``",
        "flora_opt.optax.scale_by_flora: argument 'zeta_opt' is missing (the record: keyword-only, default 0.5)",
    ]

    for relative, edits in _WRITTEN.items():
        _insert(copy / relative, edits)
    completed = _run(_SCRIPT, copy, tmp_path)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-4000:]


def test_the_record_type_is_shared():
    """core and the framework layers read the record of hyperparams.py (one class, not copies)."""
    from flora_opt import core

    assert core.FloraHyperParams is FloraHyperParams
