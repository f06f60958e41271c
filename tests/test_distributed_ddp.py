"""DDP with compressed accumulation: the compressed buffers are all-reduced, not the gradients
(flora_opt.distributed.compressed_allreduce_hook), 2 CPU processes (gloo)."""

import json
import os
import pickle

import pytest
from _torchrun import run_torchrun

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_ddp_worker.py")

# tests/_ddp_worker.py: rank 4 (gaussian) or 8 (subspace); (40, 24) -> 40 x r buffer, (16, 40) ->
# r x 40; the rest uncompressed ((1, 16), biases 40 + 16 + 1). The subspace estimator also sends
# the range sketches of its bases, 24 x r and 16 x r.
UNCOMPRESSED_ELEMENTS = 16 + 40 + 16 + 1
CYCLES = 3
BUFFER_ELEMENTS = {"gaussian": 4 * 40 + 4 * 40, "subspace": 8 * 40 + 8 * 40}
SKETCH_ELEMENTS = {"gaussian": 0, "subspace": 8 * 24 + 8 * 16}


def run_worker(world, *args, timeout=100):
    run_torchrun(WORKER, world, *args, timeout=timeout)


@pytest.mark.slow
@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "mode,estimator",
    [("plain", "gaussian"), ("accelerate", "gaussian"), ("plain", "subspace"), ("accelerate", "subspace")],
)
def test_ddp_all_reduces_compressed_buffers_and_matches_single_process(tmp_path, mode, estimator):
    out = tmp_path / "result.json"
    run_worker(2, mode, out, estimator)
    result = json.loads(out.read_text())
    assert result["identical"]  # parameters bit-identical across ranks after every micro-batch
    # gaussian: single-process compressed accumulation over the same global batch, the sums
    # ordered differently; subspace: naive accumulation (the global gradient's rank fits)
    assert result["error"] < (1e-6 if estimator == "gaussian" else 2e-5), result["error"]
    # per cycle, one all-reduce per DDP bucket (one here), and one more of the sketches for subspace
    assert result["calls"] == CYCLES * (1 if estimator == "gaussian" else 2)
    sent = BUFFER_ELEMENTS[estimator] + SKETCH_ELEMENTS[estimator]
    assert result["elements"] == CYCLES * (sent + UNCOMPRESSED_ELEMENTS)
    assert sent <= 2 * BUFFER_ELEMENTS[estimator]  # the estimator's collectives: at most 2x the buffers
    assert result["numel"] == 40 * 24 + 16 * 40 + UNCOMPRESSED_ELEMENTS


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_flora_trainer_under_ddp_all_reduces_compressed_buffers(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "result.json"
    run_worker(2, "trainer", out)
    result = json.loads(out.read_text())
    assert result["ddp"] and result["identical"]
    # max_steps=2; per optimizer step the default subspace estimator all-reduces the range sketches of its
    # bases, then the compressed buffers
    assert result["calls"] == 2 * 2


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


def test_compressed_accumulation_refuses_dtensor_parameters(tmp_path):
    torch = pytest.importorskip("torch")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    import flora_opt
    from flora_opt.accumulation import CompressedAccumulator

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        param = torch.nn.Parameter(distribute_tensor(torch.randn(32, 32), mesh, [Shard(0)]))
        optimizer = flora_opt.Flora([param], lr=1e-3, rank=4)
        pattern = r"compressed accumulation does not support DTensor .FSDP2. parameters.*set_requires_gradient_sync"
        with pytest.raises(ValueError, match=pattern):
            CompressedAccumulator(optimizer, rank=4, accumulation_steps=2)
        with pytest.raises(ValueError, match=pattern + r".*layer-wise updates work there with rank=None"):
            CompressedAccumulator(optimizer, rank=4, accumulation_steps=2, layerwise=True)
        # layer-wise updates without compression are accepted (tests/test_layerwise_distributed.py)
        flora_opt.enable_layerwise_updates(optimizer).remove()
        # Flora itself steps it (world 1): the same update as on the plain tensor, up to rounding
        plain = torch.nn.Parameter(param.full_tensor().clone())
        reference = flora_opt.Flora([plain], lr=1e-2, rank=4, min_dim_size_to_factor=8)
        optimizer = flora_opt.Flora([param], lr=1e-2, rank=4, min_dim_size_to_factor=8)
        for step in range(3):
            grad = torch.randn(32, 32, generator=torch.Generator().manual_seed(step))
            plain.grad = grad
            param.grad = distribute_tensor(grad, mesh, [Shard(0)])
            reference.step()
            optimizer.step()
        torch.testing.assert_close(param.full_tensor(), plain.detach(), rtol=1e-6, atol=1e-7)
        assert type(optimizer.state[param]["exp_avg"]).__name__ == "DTensor"
        # tensor-parallel placements are refused with the reason, not stepped wrongly
        column = torch.nn.Parameter(distribute_tensor(torch.randn(32, 32), mesh, [Shard(1)]))
        column.grad = distribute_tensor(torch.randn(32, 32), mesh, [Shard(1)])
        with pytest.raises(NotImplementedError, match=r"sharded along dim 0 .*got S\(1\)|Shard\(dim=1\)"):
            flora_opt.Flora([column], lr=1e-2, rank=4).step()
    finally:
        dist.destroy_process_group()
