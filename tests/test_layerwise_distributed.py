"""Layer-wise updates refuse to run across processes: each tensor would be stepped inside
backward with its local gradient, before DDP (or FSDP2) reduces it, and DDP would then write the
reduced gradient into ``.grad`` for ``optimizer.step()`` to apply a second time.

At 2 gloo processes (worker tests/_layerwise_worker.py) every entry point refuses up front; in a
one-process group, a module wrapped in ``DistributedDataParallel`` is refused when the first
backward ends, before ``optimizer.step()`` can apply the gradients again.
"""

import json
import os
import re

import pytest
from _tiny_mlp import build, micro_batch
from _torchrun import run_torchrun

torch = pytest.importorskip("torch")

import torch.distributed as dist  # noqa: E402

import flora_opt  # noqa: E402
from flora_opt.accumulation import CompressedAccumulator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_layerwise_worker.py")

ENTRY_POINTS = [
    "enable_layerwise_updates",
    "CompressedAccumulator",
    "CompressedAccumulator(rank=4)",
    "FloraAccelerator",
    "FloraTrainer",
]
# why, and what to do instead
REFUSAL = (
    r"layer-wise updates need a single process \(2 processes here\): each tensor would be updated inside "
    r"backward with its local gradient, before DDP all-reduces it.*Across processes, call optimizer\.step\(\) "
    r"after backward"
)
REWRITTEN = (
    r"layer-wise updates: parameter \d+ \(shape \(\d+,( \d+)?\)\), of 6 tensor\(s\), received a gradient again "
    r"after their update inside "
    r"backward: their module is wrapped in DistributedDataParallel.*under DDP call optimizer\.step\(\) after backward"
)


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_every_entry_point_refuses_layerwise_updates_at_two_processes(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "result.json"
    run_torchrun(WORKER, 2, out, timeout=150)
    results = json.loads(out.read_text())
    assert "ddp_error_against_one_step" not in results  # never stepped: refused before backward
    for name in ENTRY_POINTS:
        assert results[name] is not None, f"{name} accepted layer-wise updates at 2 processes"
        assert re.search(REFUSAL, results[name], flags=re.S), (name, results[name])


@pytest.fixture
def one_process_group(tmp_path):
    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.mark.parametrize("gradient_as_bucket_view", [False, True])
@pytest.mark.parametrize("managed", [False, True])
def test_ddp_at_one_process_is_refused_before_a_second_step(one_process_group, gradient_as_bucket_view, managed):
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
