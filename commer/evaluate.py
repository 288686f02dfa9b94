"""Metrics on held-out examples: perplexity of the gold answer and greedy generations."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from commer.data.collate import Collator
from commer.data.example import Example
from commer.model import SoftPromptLM


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def autocast(device: torch.device, enabled: bool) -> contextlib.AbstractContextManager:
    """bfloat16 autocast where the hardware does bf16 natively; float32 elsewhere."""
    if not (enabled and bf16_supported(device)):
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@torch.no_grad()
def perplexity(
    model: SoftPromptLM, collator: Collator, examples: Sequence[Example], batch_size: int = 8, bf16: bool = True
) -> float:
    """Token-weighted perplexity of the gold answers of ``examples``."""
    was_training = model.training
    model.eval()
    total_nll, total_tokens = 0.0, 0
    for start in tqdm(range(0, len(examples), batch_size), desc="perplexity", leave=False):
        batch = collator(examples[start : start + batch_size]).to(model.device)
        with autocast(model.device, bf16):
            nll, n = model.nll(batch)
        total_nll += float(nll.sum())
        total_tokens += int(n.sum())
    model.train(was_training)
    return math.exp(total_nll / max(total_tokens, 1))


@torch.no_grad()
def generate(
    model: SoftPromptLM,
    collator: Collator,
    examples: Sequence[Example],
    batch_size: int = 8,
    max_new_tokens: int = 64,
    bf16: bool = True,
) -> list[str]:
    """Greedy answers to ``examples`` (their gold answers are not read)."""
    model.eval()
    tokenizer = collator.tokenizer
    answers = []
    for start in tqdm(range(0, len(examples), batch_size), desc="generate", leave=False):
        batch = collator(examples[start : start + batch_size], with_answers=False).to(model.device)
        with autocast(model.device, bf16):
            tokens = model.generate(
                batch, eos_token_id=tokenizer.eos_token_id, pad_token_id=collator.pad_id, max_new_tokens=max_new_tokens
            )
        answers += [tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens.tolist()]
    return answers
