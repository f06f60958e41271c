"""Smoke test of the flax example: a few steps of a one-layer model with compressed accumulation."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

pytest.importorskip("jax")
pytest.importorskip("optax")
pytest.importorskip("flax")
pytest.importorskip("tqdm")

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flax" / "causal_lm.py"


def _load_example():
    spec = importlib.util.spec_from_file_location("flax_causal_lm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_flax_example_trains_with_compressed_accumulation(tmp_path, capsys):
    config = tmp_path / "model.json"
    config.write_text(json.dumps(dict(d_model=32, n_layer=1, n_head=2, d_ff=64)))
    example = _load_example()
    result = example.main(
        [
            "--config", str(config), "--optimizer", "flora", "--tau", "8", "--kappa", "2",
            "--seq-len", "32", "--batch-size", "2", "--max-steps", "3", "--accumulation-steps", "2",
            "--compressed-accumulation", "--eval-batches", "2", "--weight-decay", "0.01",
        ]
    )
    out = capsys.readouterr().out
    assert "accumulation: 2 micro-batches (compressed)" in out
    assert "validation loss:" in out and "peak memory:" in out and "optimizer state:" in out
    assert math.isfinite(result["val_loss"]) and result["val_loss"] < math.log(256) + 0.5
    assert result["optimizer_state_bytes"] > 0
