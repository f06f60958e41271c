"""The ``flora-opt`` command: ``demo`` and ``memory`` outputs, ``--help``, and clear errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from flora_opt import cli  # noqa: E402

REPO = Path(__file__).resolve().parent.parent


def run_cli(argv, capsys):
    """``flora-opt ARGV`` in-process: (exit status, stdout, stderr)."""
    try:
        status = cli.main(argv)
    except SystemExit as exit_:
        status = exit_.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def flora_state_by_hand(model, rank):
    """docs/algorithm.md section 11 for the demo model, without flora_opt.core."""
    total = 0
    for p in model.parameters():
        if p.ndim < 2:
            total += 4 * 2 * p.numel()  # full second moment + full momentum
            continue
        m, n = p.shape[0], p.numel() // p.shape[0]
        compressed = min(m, n) > rank and max(m, n) <= 4 * min(m, n)  # embeddings/head: full
        momentum = rank * max(m, n) if compressed else m * n
        second = m + n if min(m, n) >= 128 else m * n
        total += 4 * (momentum + second)
    return total


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    argv = [
        "demo",
        "--quick",
        "--steps",
        "4",
        "--eval-every",
        "2",
        "--eval-batches",
        "2",
        "--no-progress",
        "--batch-size",
        "4",
        "--seq-len",
        "32",
        "--threads",
        "1",
        "--out",
        str(out),
        "--optimizers",
        "adamw",
        "adafactor_momentum",
        "flora",
        "flora_8bit",
    ]
    status = cli.main(argv)
    return status, out


def test_demo_quick_outputs(demo_run, capsys):
    status, out = demo_run
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    rows = {r["optimizer"]: r for r in results["rows"]}
    assert list(rows) == ["adamw", "adafactor_momentum", "flora", "flora_8bit"]
    for row in rows.values():
        for key in (
            "label",
            "state_bytes",
            "peak_live_bytes",
            "tokens_per_s",
            "final_val_loss",
            "val_curve",
            "train_losses",
            "lr",
            "state_vs_adamw",
        ):
            assert key in row, key
        assert row["steps"] == 4
        for key in ("state_bytes", "peak_live_bytes", "tokens_per_s", "final_val_loss"):
            assert math.isfinite(row[key]) and row[key] > 0, (row["optimizer"], key, row[key])
        assert 0 < row["final_val_loss"] < 8  # ln(1024) = 6.93 at random init
        # the estimator predicts every optimizer's state exactly
        assert row["state_bytes"] == row["state_bytes_formula"]
        # peak live >= weights + optimizer state (+ activations)
        assert row["peak_live_bytes"] > results["model"]["param_bytes"] + row["state_bytes"]
    assert [p["step"] for p in rows["flora"]["val_curve"]] == [2, 4]
    # Flora's state: the documented formula, and far below AdamW's 8 bytes per parameter
    from flora_lab.lm import LMConfig, TinyLlama

    model = TinyLlama(
        LMConfig(
            **{k: results["model"][k] for k in ("vocab_size", "dim", "n_layers", "n_heads", "ffn_dim", "max_seq_len")}
        )
    )
    n = results["model"]["n_params"]
    assert n == sum(p.numel() for p in model.parameters())
    assert rows["flora"]["state_bytes"] == flora_state_by_hand(model, results["settings"]["rank"])
    assert rows["adamw"]["state_bytes"] == 8 * n + 4 * len(list(model.parameters()))
    # embedding and head (1024 x 128, ratio 8) keep full momentum by default: 0.22 of AdamW here
    assert rows["flora"]["state_bytes"] < 0.25 * rows["adamw"]["state_bytes"]
    assert rows["flora_8bit"]["state_bytes"] < rows["flora"]["state_bytes"] < rows["adafactor_momentum"]["state_bytes"]
    # the markdown table and the plot
    table = (out / "results.md").read_text()
    assert "| optimizer | state MiB | state / AdamW | peak live MiB | tokens/s | final val loss |" in table
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert results["command"].startswith("flora-opt demo --quick")


def test_demo_prints_table(tmp_path, capsys):
    status, stdout, _ = run_cli(
        [
            "demo",
            "--steps",
            "2",
            "--eval-batches",
            "1",
            "--no-progress",
            "--no-plot",
            "--batch-size",
            "2",
            "--seq-len",
            "32",
            "--threads",
            "1",
            "--optimizers",
            "flora",
            "--out",
            str(tmp_path),
        ],
        capsys,
    )
    assert status == 0
    assert "| Flora r=32 |" in stdout and "final val loss" in stdout
    assert not (tmp_path / "demo.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["steps"] == 2


def test_memory_gpt2_table(capsys):
    status, stdout, _ = run_cli(["memory", "gpt2"], capsys)
    assert status == 0
    assert "gpt2: 124,439,808 parameters" in stdout
    for label in (
        "AdamW (fp32 states)",
        "AdamW 8-bit (torchao)",
        "AdamW 8-bit (bitsandbytes)",
        "Adafactor ",
        "Adafactor + momentum",
        "GaLore AdamW r=256",
        "APOLLO r=256",
        "Flora r=256",
    ):
        assert label in stdout, label
    assert "Flora r=256 8-bit" not in stdout  # only with --quantization
    adamw_mib = (8 * 124_439_808 + 4 * 148) / 2**20
    assert f"{adamw_mib:,.2f}" in stdout


def test_memory_gpt2_json(capsys):
    status, stdout, _ = run_cli(["memory", "gpt2", "--rank", "64", "--quantization", "--json"], capsys)
    assert status == 0
    report = json.loads(stdout)
    assert report["n_params"] == 124_439_808 and report["rank"] == 64
    rows = {r["method"]: r for r in report["rows"]}
    assert set(rows) == {
        "adamw",
        "adamw8bit_torchao",
        "adamw8bit_bnb",
        "adafactor",
        "adafactor_momentum",
        "galore",
        "apollo",
        "flora",
        "flora_8bit",
    }
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


def test_memory_rank_none_and_methods(capsys):
    status, stdout, _ = run_cli(
        ["memory", "llama-60m", "--rank", "none", "--methods", "adamw", "flora", "--json"], capsys
    )
    assert status == 0
    rows = {r["method"]: r for r in json.loads(stdout)["rows"]}
    assert set(rows) == {"adamw", "flora"}
    assert rows["flora"]["optimizer"] == "Flora r=None"


@pytest.mark.parametrize(
    "argv,pattern",
    [
        (["memory", "gpt-17"], "unknown model 'gpt-17'.*Presets: gpt2, gpt2-medium"),
        (["memory", "/nonexistent/config.json"], "config file not found"),
        (["memory", "gpt2", "--rank", "0"], "argument --rank: expected a positive integer"),
        (["memory", "gpt2", "--dtype", "fp8"], "argument --dtype: invalid choice"),
        (["memory", "gpt2", "--methods", "sgd"], "argument --methods: invalid choice"),
        (["memory"], "the following arguments are required: MODEL"),
        (
            ["demo", "--optimizers", "sgd"],
            "unknown optimizer 'sgd'; valid: adamw, adafactor_momentum, flora, flora_8bit",
        ),
        (["demo", "--steps", "0"], "argument --steps: expected a positive integer, got '0'"),
        (["demo", "--lr", "flora"], "expected NAME=LR"),
        (["demo", "--lr", "flora=fast"], "is not a number"),
        (["demo", "--lr", "sgd=0.1"], "unknown optimizer 'sgd'"),
        (["demo", "--dataset", "wikipedia"], "unknown dataset 'wikipedia'; valid: shakespeare_sample"),
        (["demo", "--seq-len", "4096"], "exceeds the model's maximum 256"),
        (["demo", "--vocab-size", "100"], "below 256"),
        (["frobnicate"], "invalid choice: 'frobnicate'"),
        (["demo", "--lr", "flora=inf"], r"argument --lr: learning rate in 'flora=inf' must be a finite number > 0"),
        (["demo", "--lr", "flora=nan"], r"argument --lr: learning rate in 'flora=nan' must be a finite number > 0"),
        (["demo", "--out", __file__], r"--out .*test_cli\.py: exists and is not a directory"),
    ],
)
def test_bad_arguments(argv, pattern, capsys):
    import re

    status, _, stderr = run_cli(argv, capsys)
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


@pytest.mark.parametrize("argv", [["memory", "gpt2"], ["demo", "--quick"]])
def test_without_torch_the_commands_name_the_extra(argv):
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'accelerate'):\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from flora_opt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", blocker, *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'flora-opt[torch]'" in lines[0], proc.stderr


def test_no_command_prints_help(capsys):
    status, stdout, _ = run_cli([], capsys)
    assert status == 2 and "demo" in stdout and "memory" in stdout


def test_help_explains_every_option():
    parser = cli.build_parser()
    subparsers = parser._subparsers._group_actions[0].choices
    for name in ("demo", "memory"):
        sub = subparsers[name]
        text = sub.format_help()
        for action in sub._actions:
            if action.dest == "help":
                continue
            assert action.help and len(action.help) > 10, (name, action.dest)
            for option in action.option_strings:
                assert option in text
    assert "llama-13b" in subparsers["memory"].format_help()  # the presets are listed


def test_module_entry_point():
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-m", "flora_opt", "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0 and "flora-opt" in proc.stdout
    proc = subprocess.run(
        [sys.executable, "-m", "flora_opt", "memory", "nope"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2 and "unknown model 'nope'" in proc.stderr


def test_demo_without_the_lab_names_what_to_install():
    """The library ships no demo: without flora-lab, ``flora-opt demo`` and ``flora-opt replicate``
    exit 2 with one line naming what to install, and ``flora-opt memory`` still works."""
    blocker = (
        "import sys, importlib.abc\n"
        "class Block(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] == 'flora_lab':\n"
        "            raise ImportError(f'No module named {name!r}', name=name)\n"
        "sys.meta_path.insert(0, Block())\n"
        "from flora_opt.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(
        [sys.executable, "-c", blocker, "demo", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "flora-lab" in lines[0] and "pip install -e lab" in lines[0], proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", blocker, "replicate", "all", "--quick"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "flora-opt replicate" in lines[0] and "pip install -e lab" in lines[0], proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", blocker, "memory", "gpt2", "--methods", "flora", "--json"],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    proc = subprocess.run(
        [sys.executable, "-c", blocker, "--help"], capture_output=True, text=True, env=env, cwd=REPO, timeout=120
    )
    assert proc.returncode == 0 and "demo" in proc.stdout


def test_library_ships_no_lab():
    """The flora_opt package holds no dataset reader, demo model or demo (they live in flora_lab)."""
    import flora_opt

    root = Path(flora_opt.__file__).parent
    for name in ("data.py", "demo.py", "lm.py", "livebytes.py", "data"):
        assert not (root / name).exists(), name
