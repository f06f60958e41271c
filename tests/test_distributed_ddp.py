"""DDP with compressed accumulation: the compressed buffers are all-reduced, not the gradients
(flora_opt.distributed.compressed_allreduce_hook), 2 CPU processes (gloo)."""

import json
import os
import pickle
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORKER = os.path.join(HERE, "_ddp_worker.py")

# tests/_ddp_worker.py: rank 4; (40, 24) -> 40 x 4 buffer, (16, 40) -> 4 x 40; the rest uncompressed
# ((1, 16), biases 40 + 16 + 1)
COMPRESSED_ELEMENTS = 4 * 40 + 4 * 40
UNCOMPRESSED_ELEMENTS = 16 + 40 + 16 + 1
CYCLES = 3


def run_worker(world, *args, timeout=100):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable, "-W", "ignore", "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={world}", WORKER, *map(str, args),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-5000:]


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["plain", "accelerate"])
def test_ddp_all_reduces_compressed_buffers_and_matches_single_process(tmp_path, mode):
    out = tmp_path / "result.json"
    run_worker(2, mode, out)
    result = json.loads(out.read_text())
    assert result["identical"]  # parameters bit-identical across ranks after every micro-batch
    # single-process compressed accumulation over the same global batch: same projections, the
    # sums ordered differently
    assert result["error"] < 1e-6, result["error"]
    assert result["calls"] == CYCLES  # one all-reduce (one DDP bucket) per cycle, none in between
    assert result["elements"] == CYCLES * (COMPRESSED_ELEMENTS + UNCOMPRESSED_ELEMENTS)
    assert result["numel"] == 40 * 24 + 16 * 40 + UNCOMPRESSED_ELEMENTS


def test_comm_state_pickles_without_process_group():
    torch = pytest.importorskip("torch")
    import flora_opt
    from flora_opt.accumulation import CompressedAccumulator
    from flora_opt.distributed import CompressedAllreduceState

    model = torch.nn.Linear(16, 16)
    accumulator = CompressedAccumulator(flora_opt.Flora(model.parameters(), lr=1e-3), rank=4, accumulation_steps=2)
    state = CompressedAllreduceState(accumulator, process_group=object())
    state.calls = 5
    restored = pickle.loads(pickle.dumps(state))
    assert restored.process_group is None and restored.accumulator is None and restored.calls == 5
