"""Training throughput of a ComMer step against a plain forward + backward of the backbone on as many tokens.

    python bench/train_throughput.py [--backbone smollm2-135m] [--examples 8] [--n-docs 2] [--k 8] [--bf16]

A ComMer step compresses every document (LoRA on), merges, runs the generator (LoRA off) and back-propagates through
both. The reference is an ordinary LoRA fine-tuning step: the same LoRA'd backbone, causal-LM loss on every token, on
token sequences of the same total length (document tokens + slots + generator tokens). Rounds alternate between the
two; the ratio of tokens/s is printed (target >= 0.8). Examples are real LaMP-7 training examples.

Then where a ComMer step's time goes, each part timed alone (medians over the rounds): the compressor's forward
pass, the generator's forward pass (its LM head on answer tokens only), the generator's backward pass (down to the
soft prompt), the compressor's backward pass (from the soft prompt's gradient), and the optimizer step (AdamW with
gradient clipping); the LM head's forward and backward on as many positions are timed apart for scale.
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
    breakdown(model, batch, autocast, args.rounds)


def breakdown(model: ComMer, batch, autocast, rounds: int) -> None:
    """Print the median time of each part of a ComMer training step."""
    params = list(model.trainable_state().values())
    optimizer = torch.optim.AdamW(params, lr=0.0)  # lr 0: the weights stay as they are between rounds
    head = model.lm.get_output_embeddings()
    n_answer = int((batch.labels != -100).sum())
    hidden = torch.randn(n_answer, head.weight.shape[1], requires_grad=True)
    times: dict[str, list[float]] = {}

    def lap(name: str, start: float) -> float:
        now = time.perf_counter()
        times.setdefault(name, []).append(now - start)
        return now

    for _ in range(rounds + 1):  # the first round warms up
        start = time.perf_counter()
        with autocast():
            soft, mask = model.prefix(batch)
        start = lap("compressor forward", start)
        cut = soft.detach().requires_grad_()  # the generator's backward stops here
        with autocast():
            nll, n_tokens = model.nll(batch, (cut, mask))
            loss = nll.sum() / n_tokens.sum()
        start = lap("generator forward", start)
        loss.backward()
        start = lap("generator backward", start)
        soft.backward(cut.grad)
        start = lap("compressor backward", start)
        torch.nn.utils.clip_grad_norm_(params, 0.3)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        start = lap("optimizer step", start)
        with autocast():
            head(hidden).float().logsumexp(-1).sum().backward()
        lap(f"(LM head fwd+bwd, {n_answer} positions)", start)
    median = {name: statistics.median(t[1:]) for name, t in times.items()}
    total = sum(v for name, v in median.items() if not name.startswith("("))
    print(f"where a ComMer step's {total:.2f} s go (each part alone, median of {rounds}):")
    for name, seconds in median.items():
        share = "" if name.startswith("(") else f"{100 * seconds / total:5.1f}%"
        print(f"  {name:40}{seconds:8.3f} s {share}")


if __name__ == "__main__":
    main()
