"""The floor that Flora's two projection products put under a step, on this machine.

Every Flora step with compressed momentum computes ``P U`` (``r x m`` by ``m x n``) and
``P^T M`` (``m x r`` by ``r x n``) for each compressed matrix: ``4 r N`` flops for ``N``
compressed parameters, whatever the engine does around them. This times exactly those two
products, alone, on GPT-2-small's block-matrix shapes (12 layers of ``768 x 2304``,
``768 x 768``, ``768 x 3072``, ``3072 x 768``; the embedding is not compressed), so that a step
time can be read against what the arithmetic alone costs here::

    python benchmarks/product_floor.py --rank 256 --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

GPT2_SMALL_BLOCKS = [(768, 2304), (768, 768), (768, 3072), (3072, 768)]
GPT2_SMALL_LAYERS = 12


def products_seconds(rank: int, repeats: int) -> float:
    """Seconds for the two products over every compressed matrix of the model (best of 3)."""
    best = float("inf")
    for _ in range(3):
        total = 0.0
        for a, b in GPT2_SMALL_BLOCKS:
            small, large = min(a, b), max(a, b)
            projection = torch.randn(rank, small)
            update = torch.randn(small, large)
            momentum = torch.randn(rank, large)
            for _ in range(2):
                projection @ update, projection.T @ momentum
            start = time.perf_counter()
            for _ in range(repeats):
                projection @ update, projection.T @ momentum
            total += (time.perf_counter() - start) / repeats * GPT2_SMALL_LAYERS
        best = min(best, total)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    if args.rank < 1:
        parser.error(f"--rank must be >= 1, got {args.rank}")
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    compressed = GPT2_SMALL_LAYERS * sum(a * b for a, b in GPT2_SMALL_BLOCKS)
    seconds = products_seconds(args.rank, args.repeats)
    gflop = 4 * args.rank * compressed / 1e9
    print(
        f"GPT-2-small, rank {args.rank}, {torch.get_num_threads()} threads: {compressed:,} compressed "
        f"parameters, {gflop:.1f} GFLOP in the two products, {seconds:.3f} s ({gflop / seconds:.0f} GFLOP/s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
