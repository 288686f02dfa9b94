"""Shared fixtures: a tiny random Llama with a word-level tokenizer, built in code (no download, runs in ms)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: no test may reach a hub

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from commer.backbone import Backbone, from_model

WORDS = (
    "the a i you we my your is was are to of and in on for with it this that run running morning marathon "
    "cat dog coffee tea love hate today tomorrow plan weekend book read write tweet paraphrase news headline "
    "article question answer document what does contain user likes hiking music jazz rock city rain sun"
).split()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2}
    for w in WORDS + [":", "?", ".", "!", ","]:
        vocab.setdefault(w, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>")


def tiny_backbone(seed: int = 0, max_positions: int = 128) -> Backbone:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=96,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
    )
    return from_model(LlamaForCausalLM(config).eval(), tiny_tokenizer(), name=f"tiny-llama-{seed}")


def perturb_zero_init(model: torch.nn.Module, std: float = 0.1, seed: int = 1) -> None:
    """Fill the trainable tensors that start at zero (LoRA's B, the bridge's map) with noise: untouched, they would
    make 'LoRA on' equal 'LoRA off' and every user's soft prompt the task prompt, so tests would pass trivially."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("lora_B" in name or name.startswith("bridge.") and name != "bridge.task_prompt"):
                p.copy_(torch.randn(p.shape, generator=g) * std)


@pytest.fixture
def backbone() -> Backbone:
    return tiny_backbone()
