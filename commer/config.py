"""Typed configuration of the two soft-prompt methods.

A config is plain data: it is validated once, in ``__post_init__``, with errors that name the field and the value,
and it round-trips through a dict (for the JSON written next to every checkpoint).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, Literal

Method = Literal["commer", "prompt_tuning"]
MergeStrategy = Literal["mean", "concat"]
PromptFormat = Literal["chat", "plain"]
CompressionNorm = Literal["none", "embedding"]
Bridge = Literal["none", "linear", "gate", "mlp"]
BRIDGES = ("none", "linear", "gate", "mlp")


def _positive(name: str, value: float) -> None:
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value!r}")


@dataclass
class ComMerConfig:
    """Hyper-parameters of ComMer and of the prompt-tuning baseline.

    Defaults follow the paper (appendix A.1): LoRA rank 64, alpha 16, dropout 0.1 on every attention and MLP
    projection; ``num_embeddings`` (K) is one of 4..128 in the paper.
    """

    method: Method = "commer"
    num_embeddings: int = 16
    merge: MergeStrategy = "mean"
    lora_r: int = 64
    lora_alpha: float = 16.0
    lora_dropout: float = 0.1
    # "all-linear" is peft's name for every linear layer but the LM head: the attention and MLP projections.
    lora_target_modules: str | list[str] = "all-linear"
    # How instructions become tokens: "chat" uses the tokenizer's chat template when it has one.
    prompt_format: PromptFormat = "chat"
    # "embedding" rescales every compression vector to the mean norm of the backbone's token embeddings. The paper
    # uses the raw last-layer states ("none"), whose norm the final RMSNorm pins far above that of any token
    # (about 51 against 3.2 on SmolLM2): the generator then reads K vectors unlike anything it was trained on.
    compression_norm: CompressionNorm = "none"
    # How the merged compressions become the generator's soft prompt (``commer.model.Bridge``):
    #   "none"   the merged raw states themselves (the paper);
    #   "linear" task_prompt + W @ merged, W initialised at zero;
    #   "gate"   task_prompt + g * merged, the scalar g initialised at zero;
    #   "mlp"    task_prompt + MLP(merged), the MLP's output layer initialised at zero.
    # With every bridge but "none" the untrained model is exactly prompt tuning without documents (the raw states
    # read as input embeddings wreck the frozen generator: docs/results.md), a user without documents gets the task
    # prompt, and the personal part grows from the first step. The bridge maps the merged mean, so the store keeps
    # raw sums and O(1) updates stay exact.
    bridge: Bridge = "linear"
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("commer", "prompt_tuning"):
            raise ValueError(f"method must be 'commer' or 'prompt_tuning', got {self.method!r}")
        if not isinstance(self.num_embeddings, int) or self.num_embeddings < 1:
            raise ValueError(f"num_embeddings (K) must be an integer >= 1, got {self.num_embeddings!r}")
        if self.merge not in ("mean", "concat"):
            raise ValueError(f"merge must be 'mean' or 'concat', got {self.merge!r}")
        _positive("lora_r", self.lora_r)
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha must be > 0, got {self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout!r}")
        if self.compression_norm not in ("none", "embedding"):
            raise ValueError(f"compression_norm must be 'none' or 'embedding', got {self.compression_norm!r}")
        if self.bridge not in BRIDGES:
            raise ValueError(f"bridge must be one of {', '.join(map(repr, BRIDGES))}, got {self.bridge!r}")
        if self.prompt_format not in ("chat", "plain"):
            raise ValueError(f"prompt_format must be 'chat' or 'plain', got {self.prompt_format!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComMerConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown ComMerConfig field(s): {', '.join(unknown)}")
        return cls(**data)
