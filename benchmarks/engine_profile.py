"""Where one grouped Flora step spends its time on the CPU, and what a fresh buffer costs.

    python benchmarks/engine_profile.py --model llama-48x256 --rank 32 --threads 1
    python benchmarks/engine_profile.py --model gpt2-small --rank 256 --threads 1 --rows 12

Prints ``torch.profiler``'s table of one ``Flora.step()`` after two warm-up steps (parameter
shapes from benchmarks/step_time.py, random gradients), sorted by self CPU time, then the time
to fill a fresh 50 MiB buffer (glibc maps allocations above 32 MiB afresh: every page faults on
first touch) against a resident one and a fresh 16 MiB one (from the heap): the measurement
behind the engine's 24 MiB parts and streamed matrices (docs/benchmarks.md, issue 11).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import step_time

from flora_opt import Flora


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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama-48x256", choices=list(step_time.MODELS))
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rows", type=int, default=15, help="rows of the profiler table")
    args = parser.parse_args(argv)
    if args.rank < 1 or args.threads < 1 or args.rows < 1:
        parser.error(f"--rank, --threads and --rows must be positive, got {args.rank}, {args.threads}, {args.rows}")
    torch.set_num_threads(args.threads)
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
