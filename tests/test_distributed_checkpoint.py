"""Resuming Flora through ``torch.distributed.checkpoint`` (``get_state_dict``, ``dcp.save``, a
fresh process, ``get_state_dict``, ``dcp.load``, ``set_state_dict``) at 1 and 2 CPU processes
(gloo), in both directions, for the grouped step, the per-tensor step and 8-bit states; and the
same flow's essence in one process: state written in place, then ``load_state_dict``.

The worker is tests/_dcp_worker.py. The FSDP2 (sharded state) flow is in test_distributed_fsdp.py.
"""

import copy
import json
import os
import warnings

import pytest
from _torchrun import run_torchrun

torch = pytest.importorskip("torch")

import _dcp_worker  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_dcp_worker.py")
VARIANTS = ("grouped", "per_tensor", "quantized")


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_dcp_resume_is_bit_exact_at_one_and_two_processes_in_both_directions(tmp_path):
    checkpoints = {world: str(tmp_path / f"saved_at_{world}") for world in (1, 2)}
    uninterrupted = {}
    for world, checkpoint in checkpoints.items():
        out = tmp_path / f"uninterrupted_{world}.json"
        run_torchrun(WORKER, world, "save", out, checkpoint, timeout=150)
        results = json.loads(out.read_text())
        assert all(result == results[0] for result in results)  # DDP keeps the ranks identical
        uninterrupted[world] = results[0]
    # every rank trains on the whole batch, so the uninterrupted runs are the same at both sizes
    assert uninterrupted[1] == uninterrupted[2]
    expected = uninterrupted[1]
    for world in (1, 2):
        out = tmp_path / f"resumed_{world}.json"
        run_torchrun(WORKER, world, "resume", out, *checkpoints.values(), timeout=150)
        results = json.loads(out.read_text())
        assert all(result == results[0] for result in results)
        for variant in VARIANTS:
            for saved_at, checkpoint in checkpoints.items():
                resumed = results[0][f"{variant}:{checkpoint}"]
                assert resumed["loaded_steps"] == [4] * len(resumed["loaded_steps"]), (variant, saved_at, world)
                assert resumed["params"] == expected[variant]["params"], (variant, saved_at, world)


# ---- the same flow in one process ----------------------------------------------------------------


def _uninterrupted(variant):
    model = _dcp_worker.build()
    optimizer = _dcp_worker.optimizer_for(model, variant)
    _dcp_worker.train(model, optimizer, 0, _dcp_worker.RESUME_AT)
    saved = copy.deepcopy((model.state_dict(), optimizer.state_dict()))
    _dcp_worker.train(model, optimizer, _dcp_worker.RESUME_AT, _dcp_worker.STEPS)
    return model, optimizer, saved


def _assert_same_run(model, optimizer, expected_model, expected_optimizer):
    for p, q in zip(model.parameters(), expected_model.parameters()):
        assert torch.equal(p, q)
    for p, q in zip(model.parameters(), expected_model.parameters()):
        mine, theirs = optimizer.state[p], expected_optimizer.state[q]
        assert mine.keys() == theirs.keys()
        for key, value in mine.items():
            assert torch.equal(value, theirs[key]) if isinstance(value, torch.Tensor) else value == theirs[key], key


@pytest.mark.parametrize("variant", VARIANTS)
def test_dcp_flow_in_one_process_resumes_bit_exactly(tmp_path, variant):
    """The documented flow without a process group (DCP then saves and loads in this process)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = _dcp_worker.build()
    optimizer = _dcp_worker.optimizer_for(model, variant)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # kappa=3 is small for these shapes; DCP: no process group
        _dcp_worker.train(model, optimizer, 0, _dcp_worker.RESUME_AT)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=str(tmp_path))
        _dcp_worker.train(model, optimizer, _dcp_worker.RESUME_AT, _dcp_worker.STEPS)

        resumed = _dcp_worker.build()
        resumed_optimizer = _dcp_worker.optimizer_for(resumed, variant)
        model_sd, optim_sd = get_state_dict(resumed, resumed_optimizer)  # takes a zero-lr step first
        state = {"model": model_sd, "optim": optim_sd}
        dcp.load(state, checkpoint_id=str(tmp_path))  # into the live optimizer state, in place
        set_state_dict(resumed, resumed_optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        assert [resumed_optimizer.state[p]["step"] for p in resumed.parameters()] == [_dcp_worker.RESUME_AT] * 6
        _dcp_worker.train(resumed, resumed_optimizer, _dcp_worker.RESUME_AT, _dcp_worker.STEPS)
    _assert_same_run(resumed, resumed_optimizer, model, optimizer)


def _write_in_place(optimizer, model, saved_state_dict):
    """What ``dcp.load`` does: the saved values written into the live state (tensors in place,
    integers into the live per-parameter dicts)."""
    saved = saved_state_dict["state"]
    for index, param in enumerate(model.parameters()):
        live = optimizer.state[param]
        for key, value in saved[index].items():
            if isinstance(value, torch.Tensor):
                live[key].copy_(value)
            else:
                live[key] = value


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("between", ["nothing", "state_dict", "synchronize"])
def test_state_written_in_place_then_loaded_is_honoured(variant, between):
    """State written into the live optimizer state (after a step of the grouped engine, whose
    device counters then disagree with it), then ``load_state_dict`` of that live state, resumes
    exactly; also with a ``state_dict()`` or ``synchronize()`` in between."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected_model, expected_optimizer, (model_sd, optim_sd) = _uninterrupted(variant)
        model = _dcp_worker.build()
        optimizer = _dcp_worker.optimizer_for(model, variant)
        for p in model.parameters():
            p.grad = torch.zeros_like(p)
        for group in optimizer.param_groups:  # what get_state_dict does to a fresh optimizer
            group["lr"], lr = 0.0, group["lr"]
        optimizer.step()
        for group in optimizer.param_groups:
            group["lr"] = lr
        optimizer.zero_grad()
        live = optimizer.state_dict()  # its per-parameter dicts are the live ones, as in torch
        _write_in_place(optimizer, model, optim_sd)
        model.load_state_dict(model_sd)
        if between == "state_dict":
            live = optimizer.state_dict()
        elif between == "synchronize":
            optimizer.synchronize()
        optimizer.load_state_dict(live)
        assert [optimizer.state[p]["step"] for p in model.parameters()] == [_dcp_worker.RESUME_AT] * 6
        _dcp_worker.train(model, optimizer, _dcp_worker.RESUME_AT, _dcp_worker.STEPS)
    _assert_same_run(model, optimizer, expected_model, expected_optimizer)
