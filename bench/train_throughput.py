"""Training throughput of a ComMer step against a plain forward + backward of the backbone on as many tokens.

    python bench/train_throughput.py [--backbone smollm2-135m] [--examples 8] [--n-docs 2] [--k 8] [--bf16]

A ComMer step compresses every document (LoRA on), merges, runs the generator (LoRA off) and back-propagates through
both. The reference is an ordinary LoRA fine-tuning step: the same LoRA'd backbone, causal-LM loss on every token, on
token sequences of the same total length (document tokens + slots + generator tokens). Rounds alternate between the
two; the ratio of tokens/s is printed (target >= 0.8). Examples are real LaMP-7 training examples.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from commer.backbone import load_backbone
from commer.config import ComMerConfig
from commer.data.tasks import load_splits
from commer.model import ComMer
from commer.text import Collator


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="smollm2-135m")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--examples", type=int, default=8)
    parser.add_argument("--n-docs", type=int, default=2)
    parser.add_argument("--k", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (also on the CPU)")
    args = parser.parse_args()

    backbone = load_backbone(args.backbone)
    model = ComMer(backbone, ComMerConfig(num_embeddings=args.k)).train()
    splits, _ = load_splits("lamp7", args.data_dir, args.n_docs)
    batch = Collator(backbone.tokenizer, model.config, backbone.max_length)(splits["train"][: args.examples])
    compress_tokens = int(batch.doc_mask.sum()) + args.k * batch.doc_ids.shape[0]
    generator_tokens = int(batch.input_mask.sum()) + args.k * batch.size
    n_tokens = compress_tokens + generator_tokens
    # The reference batch: the same number of rows and tokens, as ordinary text
    width = -(-n_tokens // batch.size)
    plain_ids = batch.input_ids.new_zeros(batch.size, width).random_(0, len(backbone.tokenizer))
    params = list(model.trainable_state().values())

    def autocast():
        return torch.autocast("cpu" if model.device.type == "cpu" else "cuda", torch.bfloat16, enabled=args.bf16)

    def commer_step() -> None:
        with autocast():
            loss = model.loss(batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        model.zero_grad(set_to_none=True)

    def plain_step() -> None:
        with autocast():
            loss = model.lm(input_ids=plain_ids, labels=plain_ids).loss
        loss.backward()
        model.zero_grad(set_to_none=True)

    commer_step(), plain_step()  # warm-up
    times: dict[str, list[float]] = {"commer": [], "plain": []}
    for _ in range(args.rounds):
        for name, fn in (("commer", commer_step), ("plain", plain_step)):
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    print(
        f"backbone {args.backbone}, K={args.k}, {batch.size} examples x {args.n_docs} documents, "
        f"{n_tokens} tokens per step ({compress_tokens} compressed, {generator_tokens} generator), "
        f"bf16={args.bf16}, torch threads {torch.get_num_threads()}, median of {args.rounds} alternating rounds"
    )
    rate = {name: n_tokens / statistics.median(t) for name, t in times.items()}
    print(f"{'ComMer step':28}{rate['commer']:10.0f} tokens/s  ({statistics.median(times['commer']):.2f} s/step)")
    print(f"{'plain LoRA fwd+bwd':28}{rate['plain']:10.0f} tokens/s  ({statistics.median(times['plain']):.2f} s/step)")
    print(f"ratio ComMer / plain: {rate['commer'] / rate['plain']:.2f} (target >= 0.8)")


if __name__ == "__main__":
    main()
