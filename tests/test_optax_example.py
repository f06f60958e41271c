"""Smoke test of the flax example: a few steps of a one-layer model with compressed accumulation.

Runs the script in a subprocess, as a user would, with a lower XLA optimisation level there
(compiling dominates the run time; the flag does not leak into other tests).
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("flax")
pytest.importorskip("tqdm")

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "flax" / "causal_lm.py"


@pytest.mark.slow
def test_flax_example_trains_with_compressed_accumulation(tmp_path):
    config = tmp_path / "model.json"
    config.write_text(json.dumps(dict(d_model=32, n_layer=1, n_head=2, d_ff=64)))
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    args = [
        "--config",
        str(config),
        "--optimizer",
        "flora",
        "--tau",
        "8",
        "--kappa",
        "2",
        "--lr",
        "0.03",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--accumulation-steps",
        "2",
        "--compressed-accumulation",
        "--eval-batches",
        "2",
        "--weight-decay",
        "0.01",
        "--print-json",
    ]
    result = subprocess.run(
        [sys.executable, str(EXAMPLE), *args], env=env, cwd=REPO, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-4000:]
    out = result.stdout
    assert "accumulation: 2 micro-batches (compressed)" in out
    assert "validation loss:" in out and "peak memory:" in out and "optimizer state:" in out
    assert "train" in result.stderr  # the tqdm progress bar
    summary = json.loads(next(line for line in out.splitlines() if line.startswith("RESULT "))[len("RESULT ") :])
    assert math.isfinite(summary["val_loss"])
    losses = summary["train_losses"]
    assert len(losses) == 4 and losses[-1] < losses[0], losses
    assert summary["optimizer_state_bytes"] > 0
