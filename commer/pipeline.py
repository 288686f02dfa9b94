"""Text in, text out: a ComMer model with its tokenizer, for applications (the CLI, the store, the service).

>>> from commer import Personalizer, load_backbone
>>> p = Personalizer.new(load_backbone("smollm2-135m"))        # or .from_checkpoint("ckpt/", backbone)
>>> alice = p.profile(["I run every morning.", "Marathon in May!"])  # a ProfileState: sum + count
>>> p.generate([alice], ["Suggest a weekend plan."])
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from commer.backbone import DEFAULT_BACKBONE, Backbone, load_backbone
from commer.checkpoint import PRETRAINED, load_checkpoint
from commer.config import ComMerConfig
from commer.data.collate import Collator
from commer.merge import ProfileState, stack_profiles
from commer.model import ComMer


class Personalizer:
    """Compress documents into profiles and answer instructions from them."""

    def __init__(self, model: ComMer, tokenizer: PreTrainedTokenizerBase) -> None:
        if not isinstance(model, ComMer):
            raise TypeError(f"Personalizer needs a ComMer model, got {type(model).__name__}")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.collator = Collator(tokenizer, model.config, model.max_length)

    @classmethod
    def new(cls, backbone: Backbone, config: ComMerConfig | None = None) -> Personalizer:
        """An untrained ComMer (LoRA at zero, compression embeddings at their initial values) on ``backbone``."""
        return cls(ComMer(backbone, config or ComMerConfig()), backbone.tokenizer)

    @classmethod
    def from_checkpoint(cls, path: str | Path, backbone: Backbone) -> Personalizer:
        """A trained ComMer from a checkpoint folder (or ``"pretrained"``) on ``backbone``."""
        return cls(load_checkpoint(path, backbone), backbone.tokenizer)

    @classmethod
    def pretrained(cls, backbone: Backbone | None = None) -> Personalizer:
        """The compressor shipped with the package (``commer/pretrained/smollm2-135m``, pretrained by auto-encoding;
        fine-tune it for a task) on ``backbone`` (default: the embedded SmolLM2-135M-Instruct). Other weights raise
        ``CheckpointError``."""
        backbone = backbone or load_backbone(DEFAULT_BACKBONE)
        return cls.from_checkpoint(PRETRAINED, backbone)

    @property
    def shape(self) -> tuple[int, int]:
        """``(K, D)`` of one compression."""
        return tuple(self.model.compression_embeddings.shape)

    def check_profile(self, profile: ProfileState | None) -> None:
        """Refuse a profile built by a model of another shape (``None``, no documents, always fits)."""
        if profile is not None and profile.shape != self.shape:
            raise ValueError(f"a profile of shape {profile.shape} does not fit this model's {self.shape}")

    @torch.no_grad()
    def soft_prompts(self, profiles: Sequence[ProfileState | None]) -> tuple[torch.Tensor, torch.Tensor]:
        """What the generator reads for each profile: ``(B, P, D)`` soft prompts in the backbone's dtype, on the
        model's device, and their ``(B, P)`` mask (the profiles' means through the model's bridge)."""
        for profile in profiles:
            self.check_profile(profile)
        dtype = self.model.lm.get_input_embeddings().weight.dtype
        merged, mask = stack_profiles(list(profiles), *self.shape, dtype=dtype, device=self.model.device)
        prefix, mask = self.model.soft_prompt(merged, mask)
        return prefix.to(dtype), mask

    @torch.no_grad()
    def compress(self, documents: Sequence[str], batch_size: int = 16) -> torch.Tensor:
        """``(n, K, D)`` compressions of ``documents`` (float32, on the CPU), in batches of similar lengths."""
        if not documents:
            raise ValueError("no documents to compress: pass at least one document")
        encoded = self.collator.encode_documents(documents)
        # Sorting by length keeps padding (wasted compute) small; results go back to input order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.empty(len(encoded), *self.shape)
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = self.collator.pad([encoded[i] for i in idx])
            out[idx] = self.model.compress(ids.to(self.model.device), mask.to(self.model.device)).float().cpu()
        return out

    def profile(self, documents: Sequence[str]) -> ProfileState:
        """A new profile holding ``documents`` (an empty list gives an empty profile)."""
        if not documents:
            return ProfileState(*self.shape)
        return ProfileState.from_compressions(self.compress(documents))

    def generate(
        self,
        profiles: Sequence[ProfileState | None],
        instructions: Sequence[str],
        max_new_tokens: int = 64,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        seed: int | None = None,
    ) -> list[str]:
        """One answer per (profile, instruction) pair, decoded together in one batch."""
        if not instructions:
            return []
        rows: list[list[int]] = [[] for _ in instructions]
        for step in self.stream(profiles, instructions, max_new_tokens, temperature, top_p, seed):
            for row, token in zip(rows, step, strict=True):
                if token is not None:
                    row.append(token)
        return [self.tokenizer.decode(row, skip_special_tokens=True).strip() for row in rows]

    def stream(
        self,
        profiles: Sequence[ProfileState | None],
        instructions: Sequence[str],
        max_new_tokens: int = 64,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        seed: int | None = None,
    ) -> Iterator[list[int | None]]:
        """Decode a batch step by step: each step yields one token id per row, ``None`` once that row has ended
        (EOS is yielded, then ``None``). Sampling parameters may differ per row."""
        if len(profiles) != len(instructions):
            raise ValueError(f"{len(profiles)} profiles but {len(instructions)} instructions")
        if not instructions:
            return
        device = self.model.device
        prefix, prefix_mask = self.soft_prompts(profiles)
        ids, mask = self.collator.pad([self.collator.encode_prompt(x) for x in instructions])
        steps = self.model.decode_steps(
            prefix,
            prefix_mask,
            ids.to(device),
            mask.to(device),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.collator.pad_id,
            max_new_tokens=max_new_tokens,
            temperature=torch.as_tensor(temperature, dtype=torch.float32),
            top_p=torch.as_tensor(top_p, dtype=torch.float32),
            generator=None if seed is None else torch.Generator(device).manual_seed(seed),
        )
        ended = [False] * len(instructions)
        for step in steps:
            tokens = step.tolist()
            yield [None if e else t for e, t in zip(ended, tokens, strict=True)]
            ended = [e or t == self.tokenizer.eos_token_id for e, t in zip(ended, tokens, strict=True)]
