"""``flora-lab demo``: its results (JSON, markdown table, plot), the state bytes it reports against
the documented formula, and the memory story at scale it ends with."""

from __future__ import annotations

import json
import math

import pytest

torch = pytest.importorskip("torch")

from flora_lab import cli as lab_cli  # noqa: E402
from flora_opt import memory as M  # noqa: E402


def run_cli(argv, capsys, main=lab_cli.main):
    """``flora-lab ARGV`` in-process: (exit status, stdout, stderr)."""
    try:
        status = main(argv)
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
        "--scale-model",
        "llama-60m",
        "--scale-rank",
        "64",
    ]
    status = lab_cli.main(argv)
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
    assert results["command"].startswith("flora-lab demo --quick")


def test_demo_ends_with_the_same_optimizers_at_scale(demo_run):
    """The memory story at scale: the library's estimate of the trained optimizers on the scale
    model (bf16, the scale rank), and which of its totals fit on the GPU."""
    _, out = demo_run
    results = json.loads((out / "results.json").read_text())
    at_scale = results["at_scale"]
    est = at_scale["estimate"]
    assert est["model"] == "llama-60m" and est["dtype"] == "bf16" and est["rank"] == 64
    assert [row["method"] for row in est["rows"]] == [row["optimizer"] for row in results["rows"]]
    library = {row["method"]: row for row in M.estimate("llama-60m", rank=64, dtype="bf16", quantization=True).rows}
    budget = at_scale["gpu_gib"] * 2**30
    modes = {"total_bytes": "all gradients", "total_layerwise_bytes": "layer-wise updates"}
    modes["total_accumulation_bytes"] = "gradient accumulation"
    for row in est["rows"]:
        expected = library[row["method"]]
        for key in ("state_bytes", *modes):
            assert row[key] == expected[key], (row["method"], key)
        assert at_scale["fits"][row["method"]] == [mode for key, mode in modes.items() if row[key] <= budget]
    rows = {row["method"]: row for row in est["rows"]}
    assert rows["flora"]["total_accumulation_bytes"] < rows["adamw"]["total_accumulation_bytes"]
    table = (out / "results.md").read_text()
    assert "| optimizer | state GiB | state / AdamW | all gradients GiB | layer-wise GiB | accumulation GiB |" in table
    assert table.rstrip().splitlines()[-1].startswith(f"On a {at_scale['gpu_gib']} GiB GPU")


def test_demo_without_the_scale_model(tmp_path, capsys):
    status, stdout, _ = run_cli(
        [
            "demo",
            "--steps",
            "1",
            "--eval-batches",
            "1",
            "--no-progress",
            "--no-plot",
            "--batch-size",
            "2",
            "--seq-len",
            "16",
            "--threads",
            "1",
            "--optimizers",
            "adamw",
            "--scale-model",
            "none",
            "--out",
            str(tmp_path),
        ],
        capsys,
        lab_cli.main,
    )
    assert status == 0 and "At scale" not in stdout
    assert "at_scale" not in json.loads((tmp_path / "results.json").read_text())


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
            "--scale-model",
            "llama-60m",
            "--out",
            str(tmp_path),
        ],
        capsys,
        lab_cli.main,
    )
    assert status == 0
    assert "| Flora r=32 |" in stdout and "final val loss" in stdout
    # the run ends with the memory story at scale, then the files written
    last = stdout.rstrip().splitlines()
    assert last[-3].startswith("On a 24 GiB GPU") and "Flora r=256 fits with" in last[-3]
    assert last[-1].startswith("wrote ")
    assert not (tmp_path / "demo.png").exists()
    assert json.loads((tmp_path / "results.json").read_text())["rows"][0]["steps"] == 2
