"""The commands: the library's ``flora-opt memory`` (outputs) and, for both it and the lab's
``flora-lab``, ``--help``, clear errors and the extra named when a dependency is missing (the demo's
outputs: lab/tests/test_demo.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from flora_lab import cli as lab_cli  # noqa: E402
from flora_opt import cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_cli(argv, capsys, main=cli.main):
    """``flora-opt ARGV`` (or, with ``main=lab_cli.main``, ``flora-lab ARGV``) in-process:
    (exit status, stdout, stderr)."""
    try:
        status = main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_memory_gpt2_table(capsys):
    status, stdout, _ = run_cli(["memory", "gpt2"], capsys)
    assert status == 0
    assert "gpt2: 124,439,808 parameters" in stdout
    for label in ("AdamW ", "Adafactor ", "Adafactor + momentum", "Flora r=256"):
        assert label in stdout, label
    assert "Flora r=256 8-bit" not in stdout  # only with --quantization
    assert "accumulation MiB" in stdout
    adamw_mib = (8 * 124_439_808 + 4 * 148) / 2**20
    assert f"{adamw_mib:,.2f}" in stdout


def test_memory_gpt2_json(capsys):
    status, stdout, _ = run_cli(["memory", "gpt2", "--rank", "64", "--quantization", "--json"], capsys)
    assert status == 0
    report = json.loads(stdout)
    assert report["n_params"] == 124_439_808 and report["rank"] == 64
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {"adamw", "adafactor", "adafactor_momentum", "flora", "flora_8bit"}
    # Flora r=64 on GPT-2 by hand: every matrix is factored; all are compressed except the
    # token embedding (50257 x 768, aspect ratio > 4), which keeps full momentum
    d, vocab, pos, layers = 768, 50257, 1024, 12
    matrices = [(pos, d)] + layers * [(d, 3 * d), (d, d), (d, 4 * d), (4 * d, d)]
    vectors = 2 * d + layers * (2 * d + 3 * d + d + 2 * d + 4 * d + d)
    expected = sum(4 * (64 * max(m, n) + m + n) for m, n in matrices) + 4 * 2 * vectors
    expected += 4 * (vocab * d + vocab + d)
    assert rows["flora"]["state_bytes"] == expected
    assert rows["flora_8bit"]["state_bytes"] < rows["flora"]["state_bytes"]
    for row in rows.values():
        assert row["total_bytes"] == report["weights_bytes"] + report["grads_bytes"] + row["state_bytes"]
        assert row["total_layerwise_bytes"] < row["total_bytes"]
        # naive accumulation keeps every gradient; Flora's is compressed at its rank, layer-wise
        accumulating = (
            report["grads_accumulation_bytes"] if row["method"].startswith("flora") else report["grads_bytes"]
        )
        assert row["total_accumulation_bytes"] == report["weights_bytes"] + accumulating + row["state_bytes"]
    assert report["grads_layerwise_bytes"] < report["grads_accumulation_bytes"] < report["grads_bytes"]


def test_memory_rank_none_and_methods(capsys):
    status, stdout, _ = run_cli(
        ["memory", "llama-60m", "--rank", "none", "--methods", "adamw", "flora", "--json"], capsys
    )
    assert status == 0
    rows = {r["method"]: r for r in json.loads(stdout)["rows"]}
    assert set(rows) == {"adamw", "flora"}
    assert rows["flora"]["optimizer"] == "Flora r=None"


FLORA_OPT, FLORA_LAB = cli.main, lab_cli.main


@pytest.mark.parametrize(
    "main,argv,pattern",
    [
        (FLORA_OPT, ["memory", "gpt-17"], "unknown model 'gpt-17'.*Presets: gpt2, gpt2-medium"),
        (FLORA_OPT, ["memory", "/nonexistent/config.json"], "config file not found"),
        (
            FLORA_OPT,
            ["memory", "gpt2", "--rank", "0"],
            "argument --rank: expected a positive integer or 'none', got '0'",
        ),
        (FLORA_OPT, ["memory", "gpt2", "--dtype", "fp8"], "argument --dtype: invalid choice"),
        (FLORA_OPT, ["memory", "gpt2", "--methods", "galore"], "argument --methods: invalid choice: 'galore'"),
        (FLORA_OPT, ["memory"], "the following arguments are required: MODEL"),
        (FLORA_OPT, ["demo"], "invalid choice: 'demo'"),  # the demo is the lab's command
        (FLORA_OPT, ["frobnicate"], "invalid choice: 'frobnicate'"),
        (
            FLORA_LAB,
            ["demo", "--optimizers", "sgd"],
            "unknown optimizer 'sgd'; valid: adamw, adafactor_momentum, flora, flora_8bit",
        ),
        (FLORA_LAB, ["demo", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        (FLORA_LAB, ["demo", "--lr", "flora"], "expected NAME=LR"),
        (FLORA_LAB, ["demo", "--lr", "flora=fast"], "is not a number"),
        (FLORA_LAB, ["demo", "--lr", "sgd=0.1"], "unknown optimizer 'sgd'"),
        (FLORA_LAB, ["demo", "--dataset", "wikipedia"], "unknown dataset 'wikipedia'; valid: shakespeare_sample"),
        (FLORA_LAB, ["demo", "--seq-len", "4096"], "exceeds the model's maximum 256"),
        (FLORA_LAB, ["demo", "--vocab-size", "100"], "below 256"),
        (FLORA_LAB, ["demo", "--scale-model", "gpt-17"], "--scale-model gpt-17: unknown model 'gpt-17'"),
        (FLORA_LAB, ["demo", "--scale-rank", "0"], "argument --scale-rank: expected a positive integer, got '0'"),
        (
            FLORA_LAB,
            ["demo", "--lr", "flora=inf"],
            r"argument --lr: learning rate in 'flora=inf' must be a finite number > 0",
        ),
        (
            FLORA_LAB,
            ["demo", "--lr", "flora=nan"],
            r"argument --lr: learning rate in 'flora=nan' must be a finite number > 0",
        ),
        (FLORA_LAB, ["demo", "--out", __file__], r"--out .*test_cli\.py: exists and is not a directory"),
        (FLORA_LAB, ["memory", "gpt2"], "invalid choice: 'memory'"),  # the estimator is the library's command
    ],
)
def test_bad_arguments(main, argv, pattern, capsys):
    import re

    status, _, stderr = run_cli(argv, capsys, main)
    assert status == 2
    assert re.search(pattern, stderr), stderr


def test_bad_config_file(tmp_path, capsys):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"hidden_size": 64}))
    status, _, stderr = run_cli(["memory", str(path)], capsys)
    assert status == 2 and 'no "model_type"' in stderr
    path.write_text(json.dumps({"model_type": "no-such-architecture"}))
    status, _, stderr = run_cli(["memory", str(path)], capsys)
    assert status == 2 and "no-such-architecture" in stderr


@pytest.mark.parametrize("value", [-1, 0, "12", 1.5])
def test_memory_config_with_a_bad_size_is_refused(tmp_path, capsys, value):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "gpt2", "n_embd": 64, "n_layer": value, "n_head": 4}))
    status, _, stderr = run_cli(["memory", str(path)], capsys)
    assert status == 2 and f"n_layer must be a positive integer, got {value!r}" in stderr


def _blocking(modules, module, argv):
    """Run ``module``'s ``main(argv)`` in a fresh interpreter in which ``modules`` cannot be imported."""
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        f"        if name.split('.')[0] in {tuple(modules)!r}:\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"from {module} import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "lab")]))
    return subprocess.run(
        [sys.executable, "-c", blocker, *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )


@pytest.mark.parametrize(
    "blocked,module,argv,hint",
    [
        (("torch", "accelerate"), "flora_opt.cli", ["memory", "gpt2"], "pip install 'flora-optim[torch]'"),
        (("transformers",), "flora_opt.cli", ["memory", "gpt2"], "pip install 'flora-optim[hf]'"),
        (("torch", "accelerate"), "flora_lab.cli", ["demo", "--quick"], "pip install -e . -e lab"),
        (("flax",), "flora_lab.cli", ["replicate", "all", "--quick"], "pip install -e . -e 'lab[replicate]'"),
    ],
)
def test_a_missing_dependency_is_named_with_what_installs_it(blocked, module, argv, hint):
    proc = _blocking(blocked, module, argv)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    command = "flora-opt" if module == "flora_opt.cli" else "flora-lab"
    assert len(lines) == 1 and lines[0].startswith(f"{command} {argv[0]}: error: needs {blocked[0]}"), proc.stderr
    assert lines[0].endswith(hint), proc.stderr


def test_the_library_command_works_without_the_lab():
    proc = _blocking(("flora_lab",), "flora_opt.cli", ["memory", "llama-60m", "--methods", "flora", "--json"])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["rows"][0]["method"] == "flora"
    proc = _blocking(("flora_lab",), "flora_opt.cli", ["--help"])
    assert proc.returncode == 0 and "memory" in proc.stdout and "flora-lab" in proc.stdout


@pytest.mark.parametrize("main", [FLORA_OPT, FLORA_LAB])
def test_no_command_prints_help(main, capsys):
    status, stdout, _ = run_cli([], capsys, main)
    assert status == 2
    assert ("demo" in stdout and "replicate" in stdout) if main is FLORA_LAB else ("memory" in stdout)


@pytest.mark.parametrize("module,commands", [(cli, ("memory",)), (lab_cli, ("demo", "replicate"))])
def test_help_explains_every_option(module, commands):
    parser = module.build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    assert set(subparsers) == set(commands)
    for name in commands:
        sub = subparsers[name]
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, (name, action.dest)
            for option in action.option_strings:
                assert option in text
    if module is cli:
        assert "llama-13b" in subparsers["memory"].format_help()  # the presets are listed


@pytest.mark.parametrize("package,prog", [("flora_opt", "flora-opt"), ("flora_lab", "flora-lab")])
def test_module_entry_point(package, prog):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "lab")]))
    proc = subprocess.run(
        [sys.executable, "-m", package, "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0 and f"usage: {prog}" in proc.stdout
    argv = ["memory", "nope"] if package == "flora_opt" else ["demo", "--scale-model", "nope"]
    proc = subprocess.run(
        [sys.executable, "-m", package, *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr


def test_library_ships_no_lab():
    """The flora_opt package holds no dataset reader, demo model, demo or peer formulas (they live in flora_lab)."""
    import flora_opt

    root = Path(flora_opt.__file__).parent
    for name in ("data.py", "demo.py", "lm.py", "livebytes.py", "peer_memory.py", "contenders.py", "data"):
        assert not (root / name).exists(), name
