"""Smoke test of examples/torch/causal_language_modeling.py (tiny model, two optimizer steps)."""

import importlib.util
import os
import re

import pytest

pytest.importorskip("transformers")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "examples", "torch", "causal_language_modeling.py")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


def load_example():
    spec = importlib.util.spec_from_file_location("causal_language_modeling", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_example_trains_with_compressed_layerwise_accumulation(capsys, tmp_path):
    example = load_example()
    example.main(
        [
            "--model",
            "gpt2-tiny",
            "--seq-len",
            "32",
            "--batch-size",
            "2",
            "--gradient-accumulation-steps",
            "2",
            "--max-steps",
            "3",
            "--optimizer",
            "flora",
            "--rank",
            "8",
            "--accumulation-rank",
            "8",
            "--layerwise",
            "--activation-checkpointing",
            "--eval-batches",
            "1",
            "--checkpoint-dir",
            str(tmp_path / "ckpt"),
        ]
    )
    last = capsys.readouterr().out.strip().splitlines()[-1]
    match = re.fullmatch(r"validation loss (\d+\.\d+) \| peak memory ([\d.]+) MiB \(.*\) \| (\d+) tokens/s", last)
    assert match, last
    assert 0 < float(match.group(1)) < 10 and float(match.group(2)) > 0 and int(match.group(3)) > 0
    assert (tmp_path / "ckpt" / "flora_accumulator_0.pt").exists()


def test_example_rejects_unknown_optimizer():
    example = load_example()
    with pytest.raises(SystemExit):
        example.parse_args(["--optimizer", "sgd"])
