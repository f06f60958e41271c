"""Layer-wise updates across processes: each tensor is updated inside backward from its *reduced*
gradient, once per accumulation cycle.

FSDP2: the hook FSDP2 calls on each sharded parameter after the reduce-scatter that produced its
gradient shard. DDP: Flora's communication hook (``register_layerwise_allreduce``), which steps a
bucket's tensors when its all-reduce completes and frees the bucket. A gradient that arrives
unreduced on more than one process is refused before any update. The 2-process runs are in
tests/_layerwise_worker.py (gloo, CPU); the rest runs in a one-process group here.
"""

import json
import os
import pickle
import re

import pytest
from _tiny_mlp import build, micro_batch
from _torchrun import run_torchrun

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402

import flora_opt  # noqa: E402
from flora_opt.accumulation import CompressedAccumulator  # noqa: E402
from flora_opt.distributed import LayerwiseAllreduceState, register_layerwise_allreduce  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_layerwise_worker.py")

UNREDUCED = (
    r"layer-wise updates on 2 processes: a gradient arrived before any reduction across processes.*would make the "
    r"ranks diverge.*register_layerwise_allreduce\(ddp_model, accumulator\).*or shard the model with FSDP2"
)
REWRITTEN = (
    r"layer-wise updates: parameter \d+ \(shape \(\d+,( \d+)?\)\), of 6 tensor\(s\), received a gradient again "
    r"after their update inside backward: their module is wrapped in DistributedDataParallel.*"
    r"register_layerwise_allreduce\(ddp_model, accumulator\) before the first backward"
)


def run_worker(tmp_path, mode, *args, world=2, timeout=150):
    out = tmp_path / f"{mode}{world}.json"
    run_torchrun(WORKER, world, mode, out, *args, timeout=timeout)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_fsdp2_updates_each_shard_after_its_reduce_scatter(tmp_path):
    results = run_worker(tmp_path, "fsdp2", tmp_path / "checkpoint")
    for result in results:
        # 8 cycles, two resamples: single-process Flora.step() on the same global batch, float32 rounding
        assert result["error"] < 2e-6, result["error"]
        # layer-wise clipping (each tensor's share of the budget, from its global norm), 2 micro-batches
        assert result["clipped_error"] < 2e-6, result["clipped_error"]
        assert result["norm_error"] < 1e-6  # last_grad_norm: the exact global norm
        # exactly one update per tensor and cycle; none in the micro-batches without gradient sync
        assert result["updates"] == result["steps"] == [8]
        assert result["clipped_updates"] == [8]
        tensors = result["tensors"]
        assert result["updates_after_each_micro_batch"] == [tensors * ((i + 1) // 2) for i in range(16)]
        # gradient memory: at most the shards of the unit being reduced, never the whole model's
        assert result["max_alive_gradient_bytes"] <= max(result["unit_shard_bytes"])
        assert result["all_gradient_bytes"] == sum(result["unit_shard_bytes"])  # what backward leaves without
        # DCP: a fresh model, optimizer and accumulator resumed from the checkpoint repeat the run bit for bit
        assert result["resumed_equal"] and result["resumed_steps"] == [6]
    # every rank issued the same collectives in the same order (FSDP2's and those of Flora's steps
    # inside its hooks), so none can wait on a mismatched one
    assert results[0]["collectives"] == results[1]["collectives"]
    names = {name for name, _ in results[0]["collectives"]}
    assert any("reduce_scatter" in name for name in names) and any("all_reduce" in name for name in names)


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_ddp_updates_each_bucket_after_its_all_reduce(tmp_path):
    results = run_worker(tmp_path, "ddp")
    for result in results:
        assert result["error"] < 1e-6, result["error"]  # single-process Flora.step(), 6 cycles
        assert result["updates"] == [6] and result["identical"]
        # compressed accumulation (gaussian, 3 micro-batches): single-process compressed accumulation
        assert result["compressed_error"] < 1e-6, result["compressed_error"]
        assert result["compressed_updates"] == [3] and result["compressed_identical"]
        # subspace: the same collectives as the non-layer-wise compressed all-reduce, the same parameters
        assert result["subspace_equal"]
        assert result["subspace_elements"][0] == result["subspace_elements"][1]
        assert result["subspace_calls"][0] == result["subspace_calls"][1]
        # memory: every bucket freed after its step; from the third backward on at most one bucket and one
        # tensor's local gradient (DDP copies it into the bucket) are alive, not the model's gradients
        assert all(result["freed_after_each_backward"])
        buckets = result["bucket_bytes"]
        assert len(buckets) == 2
        assert result["max_gradient_bytes"] <= max(buckets) + result["largest_gradient_bytes"]
        assert result["max_gradient_bytes"] < 2 * sum(buckets)  # DDP: every bucket and every gradient
    # one all-reduce per bucket and cycle: DDP's first backward has one bucket, then it rebuilds them into two
    assert results[0]["calls"] == 1 + 5 * 2


@pytest.mark.slow
@pytest.mark.timeout(200)
def test_an_unreduced_gradient_is_refused_before_any_update(tmp_path):
    (result, _) = run_worker(tmp_path, "refusals")
    for name in ("plain", "ddp"):  # no process group reduction, and DDP without Flora's hook
        assert re.search(UNREDUCED, result[name], flags=re.S), result[name]
        assert result[name + "_unchanged"] and result[name + "_no_state"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_flora_accelerator_and_trainer_update_layerwise_under_ddp(tmp_path):
    pytest.importorskip("transformers")
    reference = run_worker(tmp_path, "accelerate", "reference", world=1)  # FloraTrainer on one process
    for result in run_worker(tmp_path, "accelerate", "ddp"):
        assert result["distributed_type"] == "MULTI_CPU" and result["hook"] == "LayerwiseAllreduceState"
        assert result["error"] < 1e-6, result["error"]  # single-process layer-wise, 2 micro-batches
        assert result["steps"] == [3]
        trainer = result["trainer"]
        assert trainer["hooked"]
        # the same global batches (2 + 2 sequences); float32 rounding of kernels of batch 2 against 4
        scale = max(abs(v) for v in reference["params"])
        error = max(abs(a - b) for a, b in zip(trainer["params"], reference["params"])) / scale
        assert error < 2e-5, error
        assert trainer["norms"] == pytest.approx(reference["norms"], rel=1e-5)  # exact pre-clip global norms


@pytest.fixture
def one_process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("gradient_as_bucket_view", [False, True])
@pytest.mark.parametrize("managed", [False, True])
def test_ddp_without_flora_hook_is_refused_before_a_second_step(one_process_group, gradient_as_bucket_view, managed):
    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model, gradient_as_bucket_view=gradient_as_bucket_view)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    accumulator = flora_opt.enable_layerwise_updates(optimizer)
    before = [p.detach().clone() for p in model.parameters()]
    loss = ddp(micro_batch(0, 1)).pow(2).mean()
    with pytest.raises(RuntimeError, match=REWRITTEN):
        if managed:
            accumulator.backward(loss)
        else:
            loss.backward()
    assert all(p.grad is None for p in model.parameters())  # nothing left for optimizer.step()
    optimizer.step()
    reference = build()  # one SGD step of the same gradient: each tensor was stepped once
    reference(micro_batch(0, 1)).pow(2).mean().backward()
    for p, b, q in zip(model.parameters(), before, reference.parameters()):
        torch.testing.assert_close(p.detach(), b - 0.1 * q.grad)
    # the hooks are gone: the next backward leaves its gradients for optimizer.step()
    ddp(micro_batch(1, 1)).pow(2).mean().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("max_grad_norm", [None, 0.05])
def test_ddp_with_flora_hook_matches_the_plain_layerwise_run(one_process_group, max_grad_norm):
    plain, wrapped = build(), build()
    reference = flora_opt.enable_layerwise_updates(
        flora_opt.Flora(plain.parameters(), lr=1e-2, rank=4), max_grad_norm=max_grad_norm
    )
    ddp = torch.nn.parallel.DistributedDataParallel(wrapped, bucket_cap_mb=0.001)
    accumulator = flora_opt.enable_layerwise_updates(
        flora_opt.Flora(ddp.parameters(), lr=1e-2, rank=4), max_grad_norm=max_grad_norm
    )
    state = register_layerwise_allreduce(ddp, accumulator)
    for index in range(4):
        plain(micro_batch(index, 1)).pow(2).mean().backward()
        ddp(micro_batch(index, 1)).pow(2).mean().backward()
        assert all(p.grad is None for p in wrapped.parameters())
        assert state.allocated_bucket_bytes() == 0  # each bucket freed after its step
        torch.testing.assert_close(accumulator.last_grad_norm, reference.last_grad_norm)
    for p, q in zip(wrapped.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert state.calls == 1 + 3 * 2  # DDP's first backward has one bucket, then it rebuilds them into two
    # removed: DDP's buckets come back, and the hook reduces into .grad as DDP's own would
    accumulator.remove()
    ddp(micro_batch(9, 1)).pow(2).mean().backward()
    plain_grads = torch.autograd.grad(wrapped(micro_batch(9, 1)).pow(2).mean(), list(wrapped.parameters()))
    for p, g in zip(wrapped.parameters(), plain_grads):
        torch.testing.assert_close(p.grad, g)


def test_ddp_hook_refuses_a_cycle_ddp_did_not_reduce(one_process_group):
    ddp = torch.nn.parallel.DistributedDataParallel(build())
    accumulator = flora_opt.enable_layerwise_updates(flora_opt.Flora(ddp.parameters(), lr=1e-2))
    register_layerwise_allreduce(ddp, accumulator)
    before = [p.detach().clone() for p in ddp.parameters()]
    with ddp.no_sync(), pytest.raises(RuntimeError, match=r"kept a gradient that DDP never reduced.*outside no_sync"):
        ddp(micro_batch(0, 1)).pow(2).mean().backward()
    assert all(p.grad is None for p in ddp.parameters())  # nothing for optimizer.step() to apply
    assert all(torch.equal(p, b) for p, b in zip(ddp.parameters(), before))
    ddp(micro_batch(1, 1)).pow(2).mean().backward()  # the next cycle runs as usual
    assert not any(torch.equal(p, b) for p, b in zip(ddp.parameters(), before))


@pytest.mark.parametrize(
    "ddp_options,accumulator_options,error,pattern",
    [
        (dict(gradient_as_bucket_view=True), {}, ValueError, r"gradient_as_bucket_view=True: every \.grad would be"),
        (dict(find_unused_parameters=True), {}, ValueError, r"find_unused_parameters=True: DDP writes zeros"),
        (dict(static_graph=True), {}, ValueError, r"static_graph=True: DDP copies every gradient"),
        ({}, dict(layerwise=False), ValueError, r"needs a layer-wise accumulator.*register_compressed_allreduce"),
        ({}, dict(foreign=True), ValueError, r"parameter 6 \(shape \(3,\)\) of the optimizer is not a parameter"),
        ({}, dict(twice=True), ValueError, r"already attached to a DDP model"),
        ({}, dict(unwrapped=True), TypeError, r"Invalid ddp_model: Sequential: expected a .*DistributedDataParallel"),
    ],
)
def test_register_layerwise_allreduce_refuses_what_ddp_cannot_do(
    one_process_group, ddp_options, accumulator_options, error, pattern
):
    model = build()
    ddp = torch.nn.parallel.DistributedDataParallel(model, **ddp_options)
    params = list(ddp.parameters())
    if accumulator_options.get("foreign"):
        params.append(torch.nn.Parameter(torch.zeros(3)))
    optimizer = flora_opt.Flora(params, lr=1e-2)
    accumulator = CompressedAccumulator(optimizer, layerwise=accumulator_options.get("layerwise", True))
    if accumulator_options.get("twice"):
        register_layerwise_allreduce(ddp, accumulator)
    with pytest.raises(error, match=pattern):
        register_layerwise_allreduce(model if accumulator_options.get("unwrapped") else ddp, accumulator)


def test_layerwise_hook_state_pickles_without_ddp_and_buckets(one_process_group):
    ddp = torch.nn.parallel.DistributedDataParallel(build())
    accumulator = flora_opt.enable_layerwise_updates(flora_opt.Flora(ddp.parameters(), lr=1e-2))
    state = register_layerwise_allreduce(ddp, accumulator)
    ddp(micro_batch(0, 1)).pow(2).mean().backward()
    assert len(state.buckets) == 6 and state.calls == 1
    restored = pickle.loads(pickle.dumps(state))
    assert isinstance(restored, LayerwiseAllreduceState)
    assert restored.accumulator is None and restored.ddp_model() is None and len(restored.buckets) == 0
    assert restored.calls == 1


def test_fsdp2_at_one_process_updates_layerwise(one_process_group):
    from torch.distributed.fsdp import fully_shard

    plain, sharded = build(), build()
    for layer in sharded:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    reference = flora_opt.enable_layerwise_updates(flora_opt.Flora(plain.parameters(), lr=1e-2, rank=4))
    accumulator = flora_opt.enable_layerwise_updates(flora_opt.Flora(sharded.parameters(), lr=1e-2, rank=4))
    for index in range(3):
        plain(micro_batch(index, 1)).pow(2).mean().backward()
        sharded(micro_batch(index, 1)).pow(2).mean().backward()
        assert all(p.grad is None for p in sharded.parameters())
    torch.testing.assert_close(accumulator.last_grad_norm, reference.last_grad_norm)
    for p, q in zip(sharded.parameters(), plain.parameters()):
        torch.testing.assert_close(p.full_tensor(), q.detach(), rtol=1e-6, atol=1e-7)


def test_one_process_group_without_ddp_keeps_layerwise_updates(one_process_group):
    model = build()
    reference = build()
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-2, rank=4)
    reference_optimizer = flora_opt.Flora(reference.parameters(), lr=1e-2, rank=4)
    accumulator = CompressedAccumulator(optimizer, layerwise=True)
    for index in range(3):
        model(micro_batch(index, 1)).pow(2).mean().backward()  # each tensor updated here
        assert all(p.grad is None for p in model.parameters())
        optimizer.step()
        reference(micro_batch(index, 1)).pow(2).mean().backward()
        reference_optimizer.step()
        reference_optimizer.zero_grad()
    assert accumulator.layerwise
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
