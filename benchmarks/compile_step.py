"""Eager against ``torch.compile``d ``Flora.step()`` on CPU, one process.

    python benchmarks/compile_step.py --layers 8 --threads 1

LLaMA-style parameter shapes of width 256 (as tests/test_engine.py), random gradients kept in
place from step to step (``zero_grad(set_to_none=False)``, which the compiled step needs to keep
its graphs), median of the timed steps after the warm-up; prints the compile time (first two
steps), the number of graphs and the medians of: per-tensor eager, grouped eager, grouped
compiled (inductor). Dynamo's recompile limit is left at its default: the compiled step traces
every bucket in one frame, so the number of graphs does not depend on the number of shapes.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import flora_opt


def llama_params(layers: int, width: int = 256, ffn: int = 688, vocab: int = 256):
    shapes = [(vocab, width)]
    for _ in range(layers):
        shapes += [(width, width)] * 4 + [(ffn, width), (ffn, width), (width, ffn), (width,), (width,)]
    shapes += [(width,), (vocab, width)]
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen) * 0.02) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    return params


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--rank", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    graphs = []
    results = {}
    for label in ("per-tensor eager", "grouped eager", "grouped compiled"):
        params = llama_params(args.layers)
        opt = flora_opt.Flora(params, lr=1e-3, rank=args.rank, kappa=4, foreach=label != "per-tensor eager")
        step = opt.step
        if label == "grouped compiled":
            torch._dynamo.reset()

            def backend(gm, inputs):
                graphs.append(gm)
                from torch._inductor.compile_fx import compile_fx

                return compile_fx(gm, inputs)

            step = torch.compile(opt.step, backend=backend)
        start = time.perf_counter()
        step()
        step()
        warm = time.perf_counter() - start
        times = []
        for _ in range(args.steps):
            start = time.perf_counter()
            step()
            times.append(time.perf_counter() - start)
        results[label] = (statistics.median(times), warm)
    print(
        f"| path | median step (s) | first two steps (s) |  ({args.layers} layers, width 256, r={args.rank}, "
        f"{torch.get_num_threads()} thread(s), {len(graphs)} compiled graphs)"
    )
    print("|---|---:|---:|")
    for label, (median, warm) in results.items():
        print(f"| {label} | {median:.3f} | {warm:.1f} |")


if __name__ == "__main__":
    main()
