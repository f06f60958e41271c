"""Two CPU processes (gloo, torch.distributed.run) with compressed accumulation under DDP, reducing the
decompressed gradients (``compressed_communication=False``)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

WORKER = textwrap.dedent(
    r"""
    import json, os, sys
    import torch
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
    import flora_opt

    K, CYCLES = 4, 3
    # compressed_communication=False: DDP reduces the decompressed gradients (the default, the compressed
    # buffers' all-reduce, is tested in tests/test_distributed_ddp.py)
    accelerator = flora_opt.FloraAccelerator(gradient_accumulation_steps=K, accumulation_compression_rank=4, cpu=True,
                                             compressed_communication=False)
    rank = accelerator.process_index
    torch.manual_seed(0)  # same initial weights on both ranks
    model = torch.nn.Sequential(torch.nn.Linear(24, 40), torch.nn.Tanh(), torch.nn.Linear(40, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
    optimizer = flora_opt.Flora(model.parameters(), lr=1e-2, rank=4)
    model, optimizer = accelerator.prepare(model, optimizer)
    assert isinstance(model, torch.nn.parallel.DistributedDataParallel), type(model)

    calls = [0]
    def counting_allreduce(state, bucket):
        calls[0] += 1
        return default_hooks.allreduce_hook(None, bucket)
    model.register_comm_hook(None, counting_allreduce)

    # capture each rank's local (decompressed, not yet reduced) gradient on sync micro-batches;
    # registered after the accumulator's hooks, so it runs after them and before DDP's reduction
    local = {}
    for index, p in enumerate(model.parameters()):
        p.register_post_accumulate_grad_hook(lambda p, index=index: local.__setitem__(index, None if p.grad is None else p.grad.clone()))

    compressed = {id(p) for p in accelerator.accumulator.compressed_parameters()}
    log = []
    mismatch = 0.0
    for step in range(K * CYCLES):
        generator = torch.Generator().manual_seed(1000 * rank + step)  # different data per rank
        x = torch.randn(6, 24, generator=generator)
        before = calls[0]
        with accelerator.accumulate(model):
            accelerator.backward(model(x).pow(2).mean())
            grads_none = [p.grad is None for p in model.parameters() if id(p) in compressed]
            if accelerator.sync_gradients:
                for index, p in enumerate(model.parameters()):
                    gathered = [torch.empty_like(local[index]) for _ in range(2)]
                    dist.all_gather(gathered, local[index])
                    mismatch = max(mismatch, (p.grad - (gathered[0] + gathered[1]) / 2).abs().max().item())
            log.append(dict(sync=accelerator.sync_gradients, allreduces=calls[0] - before, grads_none=grads_none))
            optimizer.step()
            optimizer.zero_grad()

    flat = torch.cat([p.detach().flatten() for p in model.parameters()])
    gathered = [torch.empty_like(flat) for _ in range(2)]
    dist.all_gather(gathered, flat)
    if rank == 0:
        with open(sys.argv[1], "w") as f:
            json.dump(dict(log=log, identical=bool(torch.equal(gathered[0], gathered[1])), mismatch=mismatch), f)
    accelerator.end_training()
    sys.stdout.flush()
    # gloo's threads can abort the interpreter's teardown ("terminate called without an active
    # exception") after a clean run: everything is written and the group destroyed
    os._exit(0)
    """
)


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_two_process_ddp_params_identical_and_one_allreduce_per_cycle(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    result_file = tmp_path / "result.json"
    env = dict(os.environ)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env["OMP_NUM_THREADS"] = "1"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        str(script),
        str(result_file),
    ]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=110)
    assert completed.returncode == 0, completed.stderr[-4000:]
    result = json.loads(result_file.read_text())
    assert result["identical"]
    log = result["log"]
    assert [entry["sync"] for entry in log] == [False, False, False, True] * 3
    # one all-reduce (one DDP bucket) per cycle, at the sync micro-batch only
    assert [entry["allreduces"] for entry in log] == [0, 0, 0, 1] * 3
    # between micro-batches the compressed tensors hold no gradient on either rank
    assert all(all(entry["grads_none"]) for entry in log if not entry["sync"])
    assert not any(any(entry["grads_none"]) for entry in log if entry["sync"])
    # the reduced gradient is the mean of the ranks' decompressed accumulations
    assert result["mismatch"] < 1e-6
