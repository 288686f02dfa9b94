"""Corpus compression: documents/s of ``--engine ray`` (Ray Data, N model replicas) against ``--engine local`` (one
model in this process), on the same LaMP-7 profile tweets, with the same model; and whether their profiles agree.

    python bench/compress_corpus.py [--documents 300] [--workers 2] [--backbone smollm2-135m] [--k 16]
                                    [--local-threads N]

Both timings cover the whole ``compress_corpus`` call: loading the model (once locally, once per Ray worker),
compressing, summing per user and writing Parquet. Starting the local Ray cluster (``ray.init``) is timed apart. On a
machine of C cores, the local engine runs torch on C threads (``--local-threads``); the Ray engine runs ``--workers``
replicas of one thread each, with ``--cpus-per-worker`` logical CPUs each so the rest is left to Ray Data's read and
write tasks.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from commer.scale.corpus import ModelSpec, compress_corpus, read_profiles


def write_corpus(data_dir: Path, n: int, path: Path) -> tuple[int, int]:
    """The first ``n`` profile tweets of LaMP-7, user by user, as JSONL; returns (users, documents)."""
    questions = json.loads((data_dir / "lamp7" / "LaMP_7_questions.json").read_text())
    rows = [{"user_id": q["id"], "text": d["text"]} for q in questions for d in q["profile"] if d["text"].strip()][:n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len({r["user_id"] for r in rows}), len(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--checkpoint", default=None, help="default: an untrained ComMer (same cost)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--documents", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--local-threads", type=int, default=None, help="torch threads of the local engine")
    args = parser.parse_args()
    import ray

    if args.local_threads:
        torch.set_num_threads(args.local_threads)

    cpus = os.cpu_count() or 1
    model = ModelSpec(args.checkpoint, args.backbone, args.k)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        users, docs = write_corpus(args.data_dir, args.documents, root / "docs.jsonl")
        print(f"{docs} LaMP-7 tweets of {users} users; backbone {args.backbone}, K={args.k}, {cpus} CPU cores")

        start = time.perf_counter()
        compress_corpus(root / "docs.jsonl", root / "local", model, batch_size=args.batch_size)
        local_s = time.perf_counter() - start

        start = time.perf_counter()
        ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False)
        init_s = time.perf_counter() - start
        start = time.perf_counter()
        compress_corpus(
            root / "docs.jsonl",
            root / "ray",
            model,
            engine="ray",
            batch_size=args.batch_size,
            workers=args.workers,
            cpus_per_worker=args.cpus_per_worker,
        )
        ray_s = time.perf_counter() - start
        ray.shutdown()

        a, b = read_profiles(root / "local"), read_profiles(root / "ray")
        assert a.keys() == b.keys() and all(a[u][1] == b[u][1] for u in a)
        # the profile a user is served is the mean: compare means, and against the largest value in them
        diff = max(float(np.abs(a[u][0] - b[u][0]).max()) / a[u][1] for u in a)
        scale = max(float(np.abs(a[u][0]).max()) / a[u][1] for u in a)

    print("engine | workers x torch threads | seconds | documents/s")
    print(f"local  | 1 x {torch.get_num_threads():<19} | {local_s:7.1f} | {docs / local_s:11.1f}")
    print(f"ray    | {args.workers} x 1{'':18} | {ray_s:7.1f} | {docs / ray_s:11.1f}")
    print(f"ray.init (not in the ray time): {init_s:.1f} s")
    print(f"documents/s ray / local: {local_s / ray_s:.2f}x")
    print(f"largest difference between the two engines' profile means: {diff:.2e} (largest |value| {scale:.1f})")


if __name__ == "__main__":
    main()
