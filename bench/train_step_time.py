"""Where a training step's time goes: compressor, generator, LM head, backward pass and optimizer.

    python bench/train_step_time.py [--steps 10] [--micro-batch 4]

The shipped compressor on the embedded backbone, LaMP-7 training users with two BM25 documents each (the quickstart's
data), bfloat16 autocast as training runs it, no hinge. Each step is timed in phases: the soft prompts (compressing
the documents, merging, the bridge), the generator's teacher-forced pass with the LM head on the answer positions, the
loss, the backward pass through all of it, and AdamW's step. The LM head's share of the generator pass is timed apart,
on the step's own number of answer positions. Prints the median over ``--steps`` steps after two warm-up steps.
"""

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from commer.backbone import load_backbone
from commer.checkpoint import load_checkpoint
from commer.config import TrainConfig
from commer.data.tasks import load_splits
from commer.evaluate import autocast
from commer.text import Collator
from commer.train import param_groups


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--micro-batch", type=int, default=4)
    args = parser.parse_args()
    torch.manual_seed(0)
    bb = load_backbone()
    model = load_checkpoint("pretrained", bb)
    splits, _ = load_splits("lamp7", None, 2, 0)
    collator = Collator(bb.tokenizer, model.config, model.max_length)
    optimizer = torch.optim.AdamW(param_groups(model, TrainConfig()))
    head = model.lm.get_output_embeddings()
    model.train()
    phases: dict[str, list[float]] = {}
    for i in range(args.steps + 2):
        batch = collator(splits["train"][i * args.micro_batch : (i + 1) * args.micro_batch])
        times = [time.perf_counter()]
        with autocast(model.device, True):
            prefix = model.prefix(batch)
            times.append(time.perf_counter())
            logits, targets, _ = model.answer_logits(batch, prefix)
            times.append(time.perf_counter())
            loss = F.cross_entropy(logits, targets)
            times.append(time.perf_counter())
        loss.backward()
        times.append(time.perf_counter())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter())
        with torch.no_grad(), autocast(model.device, True):  # the head alone, on as many positions
            hidden = torch.randn(logits.shape[0], head.in_features)
            start = time.perf_counter()
            head(hidden)
            head_s = time.perf_counter() - start
        if i < 2:
            continue
        names = ["soft prompts (compressor, merge, bridge)", "generator + LM head", "loss", "backward", "optimizer"]
        for name, a, b in zip(names, times, times[1:], strict=False):
            phases.setdefault(name, []).append(b - a)
        phases.setdefault("  of which LM head (forward)", []).append(head_s)
        phases.setdefault("step", []).append(times[-1] - times[0])
    step = statistics.median(phases["step"])
    threads = torch.get_num_threads()
    print(f"{args.micro_batch} examples per step, bf16 autocast, torch threads {threads}, median of {args.steps}")
    for name, values in phases.items():
        median = statistics.median(values)
        print(f"{name:42} {median * 1000:8.1f} ms  {median / step:6.1%}")


if __name__ == "__main__":
    main()
