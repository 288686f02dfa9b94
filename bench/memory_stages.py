"""Where the quickstart's memory goes: resident set size (now and peak) after each stage of a fine-tuning run.

    python bench/memory_stages.py [--steps 3] [--glibc-default [--trim] | --mmap-threshold BYTES]
        [--checkpointing] [--onednn-cache N]

Loads the embedded backbone and the shipped compressor, reads LaMP-7 (two BM25 documents per user), scores 16 test
users, then takes ``--steps`` training steps of 4 examples under bfloat16 autocast, printing RSS after each stage (and
after every tenth step past the third) and the mean time of a step. Like ``COMMER_LOW_MEMORY=1 commer``, it first
makes glibc return freed memory (``commer.train.return_freed_memory``, blocks of ``--mmap-threshold`` bytes and more on
mmap); ``--glibc-default`` keeps the allocator's defaults, and ``--trim`` adds ``malloc_trim(0)`` after every step
(``train.trim_heap``, ``commer.train.trim_heap``; docs/benchmarks.md, sessions 5 and 9).
``--checkpointing`` turns on activation checkpointing (``train.activation_checkpointing``, session 7), and
``--onednn-cache N`` caps oneDNN's primitive cache as ``commer train`` does (``commer.train.cap_onednn_cache``).
"""

import argparse
import resource
import time
from pathlib import Path

import torch

from commer.backbone import load_backbone
from commer.checkpoint import load_checkpoint
from commer.config import TrainConfig
from commer.data.tasks import load_splits
from commer.evaluate import autocast, perplexity
from commer.text import Collator
from commer.train import cap_onednn_cache, param_groups, return_freed_memory, trim_heap


def rss(tag: str) -> None:
    now = int(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1e6
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
    print(f"{tag:14} RSS {now:5.2f} GB, peak {peak:5.2f} GB", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--glibc-default", action="store_true", help="Leave glibc's allocator settings as they are.")
    parser.add_argument("--trim", action="store_true", help="With --glibc-default: malloc_trim(0) after every step.")
    parser.add_argument("--mmap-threshold", type=int, default=1 << 16, help="Without --glibc-default: mmap from here.")
    parser.add_argument("--onednn-cache", type=int, help="Cap oneDNN's primitive cache at N.")
    parser.add_argument("--checkpointing", action="store_true", help="Activation checkpointing while training.")
    args = parser.parse_args()
    if args.onednn_cache is not None:
        cap_onednn_cache(args.onednn_cache)
    if not args.glibc_default:
        return_freed_memory(args.mmap_threshold)
    rss("start")
    bb = load_backbone()
    rss("backbone")
    model = load_checkpoint("pretrained", bb)
    rss("model")
    splits, _ = load_splits("lamp7", None, 2, 0)
    rss("data")
    collator = Collator(bb.tokenizer, model.config, model.max_length)
    perplexity(model, collator, splits["test"][:16])
    rss("eval 16 users")
    optimizer = torch.optim.AdamW(param_groups(model, TrainConfig()))
    if args.checkpointing:
        model.checkpoint_activations()
    model.train()
    start = time.perf_counter()
    for i in range(args.steps):
        batch = collator(splits["train"][i * 4 : (i + 1) * 4])
        with autocast(model.device, True):
            loss = model.loss(batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if args.trim:
            trim_heap()
        if i < 3 or i % 10 == 9:
            rss(f"train step {i}")
    print(f"{(time.perf_counter() - start) / args.steps:.2f} s per training step")


if __name__ == "__main__":
    main()
