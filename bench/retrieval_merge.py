"""What retrieval-merge costs per request against the O(1) mean, at 10, 100 and 1,000 stored documents.

    python bench/retrieval_merge.py [--backbone smollm2-135m] [--top-k 4] [--rounds 5]

One user's profile in a SQLite store (a temporary file), with N stored document compressions (random vectors of the
model's shape: the cost does not depend on their values). Per request, timed side by side in one run, medians:
- **mean**: read the profile's running sum (``ProfileStore.get_profile``), what ``generate`` does by default;
- **retrieval**: read the N per-document compressions, compress the request, rank them (dense, centred cosine) and
  mean the top-k (``merge.top_k`` over HTTP).
Decoding the answer costs the same after either (K soft vectors), so it is left out.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from commer.checkpoint import model_fingerprint
from commer.serving import load_personalizer
from commer.store import ProfileStore

SIZES = (10, 100, 1000)
REQUEST = "What did I say about my weekend plans?"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--checkpoint", default="pretrained")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    personalizer = load_personalizer(args.checkpoint, args.backbone)
    k, d = personalizer.shape
    print(f"torch threads {torch.get_num_threads()}, K={k}, D={d}, top_k={args.top_k}, {args.rounds} rounds, medians")
    print(f"{'documents':>9} {'mean ms':>9} {'retrieval ms':>13} {'ratio':>7}")
    with tempfile.TemporaryDirectory() as tmp:
        store = ProfileStore(Path(tmp) / "bench.db", model_fingerprint(personalizer.model), (k, d))
        for n in SIZES:
            user = f"user-{n}"
            vectors = torch.randn(n, k, d, generator=torch.Generator().manual_seed(n))
            store.add_documents("bench", user, [f"document {i} of {user}" for i in range(n)], vectors)
            mean_s, retrieval_s = [], []
            for _ in range(args.rounds):
                start = time.perf_counter()
                store.get_profile("bench", user)
                mean_s.append(time.perf_counter() - start)
                start = time.perf_counter()
                compressions, _ = store.document_compressions("bench", user)
                personalizer.retrieval_profile(REQUEST, compressions, args.top_k)
                retrieval_s.append(time.perf_counter() - start)
            mean_ms, retrieval_ms = 1000 * statistics.median(mean_s), 1000 * statistics.median(retrieval_s)
            print(f"{n:>9} {mean_ms:>9.2f} {retrieval_ms:>13.1f} {retrieval_ms / mean_ms:>6.0f}x")
        store.close()


if __name__ == "__main__":
    main()
