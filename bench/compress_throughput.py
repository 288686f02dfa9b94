"""Compression throughput against the backbone's plain forward pass on the same tokens, side by side in one run.

    python bench/compress_throughput.py [--backbone smollm2-135m] [--batch-size 16] [--batches 8] [--k 16]

Documents are real LaMP-7 profile tweets when ``--data-dir`` (default ../shared/data) has them. The plain forward is
what a naive compressor would run: the full causal LM, LM head included, on the document tokens. ComMer's compressor
reads K more positions but skips the LM head; it runs either through peft's LoRA layers (training's path) or with
the LoRA merged into a copy of the weights (``ComMer.merged_compressor``: what ``Personalizer.compress`` runs, for
the store and the service), in float32 and under bfloat16 autocast (``Personalizer(bf16_compress=True)``, ``commer
serve --bf16-compress``) when the CPU has native bf16; the plain forward runs both ways too. Rounds alternate between
the jobs to spread machine noise evenly.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from commer.backbone import load_backbone
from commer.config import ComMerConfig
from commer.evaluate import autocast, bf16_supported
from commer.model import ComMer
from commer.text import Collator


def tweets(data_dir: Path, n: int) -> list[str]:
    path = data_dir / "lamp7" / "LaMP_7_questions.json"
    if path.is_file():
        texts = [p["text"] for q in json.loads(path.read_text()) for p in q["profile"]]
        return texts[:n]
    return [f"Document number {i}: an ordinary short text about running, coffee and the weather." for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=Path("../shared/data"))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    torch.set_grad_enabled(False)

    backbone = load_backbone(args.backbone)
    model = ComMer(backbone, ComMerConfig(num_embeddings=args.k)).eval()
    collator = Collator(backbone.tokenizer, model.config, backbone.max_length)
    docs = tweets(args.data_dir, args.batch_size * args.batches)
    batches = [
        collator.pad(collator.encode_documents(docs[i : i + args.batch_size]))
        for i in range(0, len(docs), args.batch_size)
    ]
    n_tokens = sum(int(mask.sum()) for _, mask in batches)

    merged = model.merged_compressor()

    def compress() -> None:
        for ids, mask in batches:
            model.compress(ids, mask)

    def compress_merged() -> None:
        for ids, mask in batches:
            model.compress(ids, mask, merged)

    def plain_forward() -> None:
        for ids, mask in batches:
            model.generator_lm(input_ids=ids, attention_mask=mask.long())

    cpu = torch.device("cpu")

    def in_bf16(fn: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            with autocast(cpu, True):
                fn()

        return run

    jobs = {"compress": compress, "merged": compress_merged, "plain": plain_forward}
    labels = {"compress": "compression (LoRA)", "merged": "compression (merged)", "plain": "plain forward (LM)"}
    bf16 = bf16_supported(cpu)
    if bf16:
        jobs |= {"merged_bf16": in_bf16(compress_merged), "plain_bf16": in_bf16(plain_forward)}
        labels |= {"merged_bf16": "compression (merged, bf16)", "plain_bf16": "plain forward (LM, bf16)"}
    for fn in jobs.values():  # warm-up
        fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for _ in range(args.rounds):
        for name, fn in jobs.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)

    print(f"backbone {args.backbone}, K={args.k}, batch {args.batch_size}, {len(docs)} documents, {n_tokens} tokens, ")
    print(f"torch threads {torch.get_num_threads()}, median of {args.rounds} alternating rounds")
    print(f"{'':28}{'docs/s':>10}{'tokens/s':>12}")
    rate = {}
    for name, label in labels.items():
        t = statistics.median(times[name])
        rate[name] = len(docs) / t
        print(f"{label:28}{rate[name]:10.1f}{n_tokens / t:12.0f}")
    print(f"ratio compression / plain forward (float32): LoRA {rate['compress'] / rate['plain']:.2f}, "
          f"merged {rate['merged'] / rate['plain']:.2f} (target >= 1.0)")  # fmt: skip
    if bf16:
        print(f"merged bf16 compression / plain forward: float32 {rate['merged_bf16'] / rate['plain']:.2f}, "
              f"bf16 {rate['merged_bf16'] / rate['plain_bf16']:.2f}")  # fmt: skip


if __name__ == "__main__":
    main()
