"""How long adding one document to a stored profile takes as the profile grows, against recomputing its mean.

    python bench/store_update.py [--sizes 1 100 10000] [--repeats 30]

Compressions are random ``(16, 576)`` tensors (K=16 on SmolLM2-135M's width): the store's cost does not depend on
what the vectors hold, and random ones build a 10,000-document profile in seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from commer.store import ProfileStore

SHAPE = (16, 576)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 10_000])
    parser.add_argument("--repeats", type=int, default=30, help="adds timed per size (the median is reported)")
    args = parser.parse_args()
    generator = torch.Generator().manual_seed(0)
    rows = []
    with tempfile.TemporaryDirectory() as folder, ProfileStore(Path(folder) / "bench.db", "bench", SHAPE) as store:
        for size in args.sizes:
            user = f"user-{size}"
            for start in range(0, size, 1000):  # one transaction per chunk keeps the build fast
                n = min(1000, size - start)
                texts = [f"{user} document {start + i}" for i in range(n)]
                store.add_documents("bench", user, texts, torch.randn(n, *SHAPE, generator=generator))
            adds = []
            for r in range(args.repeats):
                vector = torch.randn(1, *SHAPE, generator=generator)
                t = time.perf_counter()
                store.add_documents("bench", user, [f"{user} extra {r}"], vector)
                adds.append(time.perf_counter() - t)
            recomputes = []
            for _ in range(3):
                t = time.perf_counter()
                store.recompute_mean("bench", user)
                recomputes.append(time.perf_counter() - t)
            rows.append((size, statistics.median(adds), statistics.median(recomputes)))
    base = rows[0][1]
    print(f"compression shape {SHAPE}, median of {args.repeats} adds (each a durable, fsynced transaction)")
    print(f"{'documents':>10} | {'add one (ms)':>12} | {'ratio to 1st':>12} | {'recompute mean (ms)':>19}")
    print(f"{'-' * 10}-+-{'-' * 12}-+-{'-' * 12}-+-{'-' * 19}")
    for size, add, recompute in rows:
        print(f"{size:>10} | {add * 1e3:>12.2f} | {add / base:>12.2f} | {recompute * 1e3:>19.2f}")


if __name__ == "__main__":
    main()
