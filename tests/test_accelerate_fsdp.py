"""accelerate's FSDP2 path (``FullyShardedDataParallelPlugin(fsdp_version=2)``) with flora_opt.Flora:
FloraAccelerator and FloraTrainer, 2 CPU processes (gloo).

accelerate gates FSDP to GPU back-ends; the worker (tests/_accelerate_fsdp_worker.py) sets the
distributed type that gate leaves at MULTI_CPU and runs the rest of accelerate's code as it is.
The refusals of the options that cannot run under FSDP/DeepSpeed are tested here too.
"""

import json
import os

import pytest
from _torchrun import run_torchrun

pytest.importorskip("accelerate")

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_accelerate_fsdp_worker.py")
# the worker's model: (40, 24) and (16, 40) factored, their column statistics replicated
REPLICATED_BYTES = 4 * (24 + 40)


@pytest.mark.slow
@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["accelerate", "accelerate_layerwise"])
def test_flora_accelerator_fsdp2_plugin_matches_single_process_and_resumes(tmp_path, mode):
    out = tmp_path / "result.json"
    run_torchrun(WORKER, 2, mode, out, timeout=170)
    results = json.loads(out.read_text())
    for result in results:
        # layer-wise: every shard was updated inside backward (the accumulator was attached after accelerate
        # swapped the sharded parameters in), nothing is left for optimizer.step()
        assert result["layerwise"] == (mode == "accelerate_layerwise")
        assert result["left_for_step"] == ([0] if mode == "accelerate_layerwise" else [6])
        assert result["distributed_type"] == "FSDP" and result["is_fsdp2"]
        # accelerate swapped the optimizer's parameters for the sharded DTensor ones before any step
        assert result["params_are_dtensors"] and result["optimizer_holds_sharded_params"]
        # same global batch, 2 micro-batches per step, a resample (kappa=2): rounding only
        assert result["error"] < 2e-6, result["error"]
        assert result["reload_restored"] and result["resumed_moved"]
        assert result["resumed_equal"]  # save_state / load_state (DCP) resumes bit for bit
        assert result["steps"] == [6] * 6
    placements = results[0]["placements"]
    assert placements["0"]["exp_avg"] == ["S(0)", [20, 4]]  # (40, 4) compressed momentum, half per rank
    assert placements["0"]["exp_avg_sq_col"] == ["R", [24]]
    assert placements["2"]["exp_avg"] == ["S(0)", [2, 40]]  # (4, 40) rows-side momentum, split by rows
    local = results[0]["local_state_bytes"]
    assert sum(local) == results[0]["reference_state_bytes"] + REPLICATED_BYTES


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("layerwise", ["", "_layerwise"])
def test_flora_trainer_fsdp2_matches_single_process_trainer(tmp_path, layerwise):
    pytest.importorskip("transformers")
    sharded, plain = tmp_path / "fsdp2.json", tmp_path / "plain.json"
    run_torchrun(WORKER, 2, "trainer", sharded, "fsdp2" + layerwise, timeout=110)
    run_torchrun(WORKER, 1, "trainer", plain, "plain" + layerwise, timeout=110)
    sharded, (plain,) = json.loads(sharded.read_text()), json.loads(plain.read_text())
    assert plain["distributed_type"] != "FSDP" and not plain["params_are_dtensors"]
    for result in sharded:
        assert result["distributed_type"] == "FSDP" and result["params_are_dtensors"]
        assert result["steps"] == plain["steps"] == [4]
        # the same global batches (accelerate shards each global batch of 4 sequences 2 + 2);
        # float32 rounding of differently shaped kernels and of the cross-rank mean only
        # (measured 3.6e-6; a different batch order moves the parameters by ~1e-2)
        scale = max(abs(v) for v in plain["params"])
        error = max(abs(a - b) for a, b in zip(result["params"], plain["params"])) / scale
        assert error < 5e-5, error
    assert sharded[0]["params"] == sharded[1]["params"]
    for state in sharded[0]["placements"].values():  # every matrix state split, statistics of n replicated
        assert state["exp_avg"][0] == "S(0)" and state["exp_avg_sq_col"][0] == "R"


@pytest.mark.parametrize(
    "engine,fsdp2,option,why",
    [
        (
            "FSDP",
            True,
            dict(accumulation_compression_rank=4),
            "takes every micro-batch's gradient from autograd itself",
        ),
        ("FSDP", False, dict(layerwise=True), "FSDP1 .fsdp_version=1. reduces flat parameters"),
        ("DEEPSPEED", False, dict(accumulation_compression_rank=4), "DeepSpeed owns the gradient buffers"),
        ("DEEPSPEED", False, dict(layerwise=True), "DeepSpeed owns the gradient buffers"),
        ("MEGATRON_LM", False, dict(layerwise=True), "runs the backward of each micro-batch separately"),
    ],
)
def test_flora_accelerator_refuses_options_its_engine_cannot_run(monkeypatch, engine, fsdp2, option, why):
    from accelerate.utils import DistributedType

    import flora_opt

    monkeypatch.setattr(flora_opt.FloraAccelerator, "distributed_type", property(lambda self: DistributedType[engine]))
    monkeypatch.setattr(flora_opt.FloraAccelerator, "is_fsdp2", property(lambda self: fsdp2))
    name = next(iter(option))
    with pytest.raises(ValueError, match=f"{name}.*not supported with .*{why}"):
        flora_opt.FloraAccelerator(cpu=True, **option)
    flora_opt.FloraAccelerator(cpu=True)  # without the options it is accelerate's Accelerator


def test_flora_accelerator_accepts_layerwise_updates_under_fsdp2(monkeypatch):
    from accelerate.utils import DistributedType

    import flora_opt

    monkeypatch.setattr(flora_opt.FloraAccelerator, "distributed_type", property(lambda self: DistributedType.FSDP))
    monkeypatch.setattr(flora_opt.FloraAccelerator, "is_fsdp2", property(lambda self: True))
    assert flora_opt.FloraAccelerator(cpu=True, layerwise=True).layerwise


def test_flora_accelerator_warns_when_accelerate_drops_the_fsdp_plugin(monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin

    import flora_opt

    # accelerate sets ACCELERATE_USE_FSDP=true when given a plugin; monkeypatch restores it afterwards
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")

    # one CPU process: accelerate picks distributed_type NO and ignores the plugin
    with pytest.warns(RuntimeWarning, match="FSDP plugin was requested but accelerate chose distributed_type=NO"):
        flora_opt.FloraAccelerator(cpu=True, fsdp_plugin=FullyShardedDataParallelPlugin(fsdp_version=2))
