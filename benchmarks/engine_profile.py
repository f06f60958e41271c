"""Where one grouped Flora step spends its time on the CPU, what a fresh buffer costs, and what each
of the engine's memory measures buys.

    python benchmarks/engine_profile.py --model llama-48x256 --rank 32 --threads 1
    python benchmarks/engine_profile.py --model gpt2-small --rank 256 --threads 1 --rows 12
    python benchmarks/engine_profile.py --ablations --model gpt2-small --rank 32 --rounds 15

Prints ``torch.profiler``'s table of one ``Flora.step()`` after two warm-up steps (parameter
shapes from benchmarks/step_time.py, random gradients), sorted by self CPU time, then the time
to fill a fresh 50 MiB buffer (glibc maps allocations above 32 MiB afresh: every page faults on
first touch) against a resident one and a fresh 16 MiB one (from the heap): the measurement
behind the engine's scratch buffers and streamed matrices (docs/benchmarks.md).

``--ablations`` times the grouped step with each measure switched off in turn against the step
with all of them, in one process with interleaved rounds, as the CPU time of the step's thread
(less sensitive than wall time to other processes on a shared machine), and prints each
variant's median, its ratio to the step with all measures and its scratch bytes: the
measurements behind ``engine.SCRATCH_ELEMENTS`` (scratch buffers), ``engine.STREAM_ELEMENTS``
(streamed matrices), ``engine.LARGE_TENSOR``/``STACK_ELEMENTS`` (stacks of large tensors split
by size), ``ops.SQUARE_BLOCK`` (statistics in blocks of rows) and ``core.HISTORY_NORM_RATIO``
(where ``s`` comes from the formed history: run it at ``--rank 256``).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time

from flora_opt import Flora, core, engine, ops

# name -> (module, constant, value) that switches one measure off; None: all on
ABLATIONS = {
    "all measures": None,
    "no scratch buffers": (engine, "SCRATCH_ELEMENTS", 0),
    "no streamed matrices": (engine, "STREAM_ELEMENTS", 1 << 40),
    "stacks not split by size": (engine, "LARGE_TENSOR", 1 << 40),
    "statistics not in blocks": (ops, "SQUARE_BLOCK", 1 << 40),
    "s from Gram products at every rank": (core, "HISTORY_NORM_RATIO", 1 << 40),
}


def fill_times(elements: int, repeats: int = 7) -> tuple[float, float]:
    """Median seconds to fill a fresh buffer of ``elements`` float32 and a resident one."""
    resident = torch.empty(elements)
    fresh, warm = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.empty(elements).fill_(1.0)
        fresh.append(time.perf_counter() - start)
        start = time.perf_counter()
        resident.fill_(1.0)
        warm.append(time.perf_counter() - start)
    return statistics.median(fresh), statistics.median(warm)


def ablations(model: str, rank: int, rounds: int) -> None:
    """The table of ``--ablations`` (see the module docstring)."""
    params = step_time.build_params(model)
    built = [(name, Flora(params, lr=1e-3, rank=rank, kappa=1000), switch) for name, switch in ABLATIONS.items()]
    times: dict[str, list[float]] = {name: [] for name, _, _ in built}
    for round_index in range(rounds + 2):
        for name, optimizer, switch in built:
            saved = None
            if switch is not None:
                module, constant, value = switch
                saved = getattr(module, constant)
                setattr(module, constant, value)
            gc.collect()
            start = time.thread_time()
            optimizer.step()
            elapsed = time.thread_time() - start
            if switch is not None:
                setattr(module, constant, saved)
            if round_index >= 2:
                times[name].append(elapsed)
    reference = statistics.median(times["all measures"])
    print(
        f"| {model} r={rank}, {torch.get_num_threads()} thread(s) | step CPU time (s) | / all measures | scratch MiB |"
    )
    print("|---|---:|---:|---:|")
    for name, optimizer, _ in built:
        median = statistics.median(times[name])
        print(f"| {name} | {median:.3f} | {median / reference:.2f} | {optimizer.scratch_bytes() / 2**20:.0f} |")
    print(f"load average {os.getloadavg()}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-48x256", choices=list(step_time.MODELS))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15, help="rows of the profiler table")
    parser.add_argument("--ablations", action="store_true", help="time the step with each memory measure off")
    parser.add_argument("--rounds", type=int, default=15, help="timed rounds of --ablations (median reported)")
    args = parser.parse_args(argv)
    if args.rank < 1 or args.threads < 1 or args.rows < 1 or args.rounds < 1:
        parser.error(
            f"--rank, --threads, --rows and --rounds must be positive, got {args.rank}, {args.threads}, "
            f"{args.rows}, {args.rounds}"
        )
    torch.set_num_threads(args.threads)
    if args.ablations:
        ablations(args.model, args.rank, args.rounds)
        return
    params = step_time.build_params(args.model)
    optimizer = Flora(params, lr=1e-3, rank=args.rank, kappa=1000)
    for _ in range(2):
        optimizer.step()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profiler:
        start = time.perf_counter()
        optimizer.step()
        elapsed = time.perf_counter() - start
    print(
        f"{args.model} r={args.rank} threads={args.threads}: step {elapsed:.3f} s (profiled); "
        f"load average {os.getloadavg()}"
    )
    print(profiler.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    for mib in (50, 16):
        fresh, warm = fill_times(mib * 2**18)
        print(f"fill {mib} MiB: fresh buffer {fresh * 1e3:.2f} ms, resident buffer {warm * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
