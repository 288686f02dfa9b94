"""Text in, text out: the served model and the rules every application of it shares (the CLI, the store, the HTTP
service, Ray and vLLM).

- ``Personalizer``: a ComMer model with its tokenizer; ``load_personalizer`` is the one way to load the served model
  (a checkpoint, or an untrained ComMer of K on a backbone).
- A document's id (``document_ids``: given, else the SHA-256 of its text).
- Adding documents to a stored profile: plan (which documents are new: ``plan_add``) -> compress -> commit
  (``ProfileStore.insert_documents``); ``add_texts`` does all three, the HTTP route runs the compression on its worker.

>>> from commer import Personalizer, load_backbone
>>> p = Personalizer.new(load_backbone("smollm2-135m"))        # or .from_checkpoint("ckpt/", backbone)
>>> alice = p.profile(["I run every morning.", "Marathon in May!"])  # a ProfileState: sum + count
>>> p.generate([alice], ["Suggest a weekend plan."])
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from transformers import PreTrainedTokenizerBase

from commer.backbone import Backbone, load_backbone
from commer.checkpoint import PRETRAINED, load_checkpoint
from commer.config import DEFAULT_BACKBONE, DEFAULT_K, ComMerConfig
from commer.data.lamp import score_tokens, tokenize
from commer.errors import ConfigError
from commer.evaluate import autocast
from commer.merge import ProfileState, dense_scores, stack_profiles, top_k_profile
from commer.model import ComMer, DecodeRows
from commer.text import Collator, Prompt

if TYPE_CHECKING:  # the store sits above serving: named in annotations here, never imported
    from commer.store import ProfileStore


class Personalizer:
    """Compress documents into profiles and answer instructions from them."""

    def __init__(self, model: ComMer, tokenizer: PreTrainedTokenizerBase, bf16_compress: bool = False) -> None:
        """``bf16_compress``: compress under bfloat16 autocast where the hardware does bf16 natively (AMX, a GPU):
        2 to 3x faster on an AMX CPU, compressions within about 1% of float32's (``bench/compress_throughput.py``);
        float32 elsewhere. Answers are decoded in the model's dtype either way."""
        if not isinstance(model, ComMer):
            raise TypeError(f"Personalizer needs a ComMer model, got {type(model).__name__}")
        if model.config.merge != "mean":
            # Profiles are running sums (O(1) updates, the store, vLLM requests): only the mean merge can be served.
            raise ConfigError(
                f"this model was trained with merge {model.config.merge!r}; profiles are served as running means, so "
                "only merge 'mean' can be served: train with merge: mean, or evaluate it with the library's batches"
            )
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.collator = Collator(tokenizer, model.config, model.max_length)
        self._compressor: tuple[tuple, torch.nn.Module] | None = None  # (LoRA version, merged compressor)
        self.bf16_compress = bf16_compress

    @classmethod
    def new(cls, backbone: Backbone, config: ComMerConfig | None = None, bf16_compress: bool = False) -> Personalizer:
        """An untrained ComMer (LoRA at zero, compression embeddings at their initial values) on ``backbone``."""
        return cls(ComMer(backbone, config or ComMerConfig()), backbone.tokenizer, bf16_compress)

    @classmethod
    def from_checkpoint(cls, path: str | Path, backbone: Backbone, bf16_compress: bool = False) -> Personalizer:
        """A trained ComMer from a checkpoint folder (or ``"pretrained"``) on ``backbone``."""
        return cls(load_checkpoint(path, backbone), backbone.tokenizer, bf16_compress)

    @classmethod
    def pretrained(cls, backbone: Backbone | None = None) -> Personalizer:
        """The compressor shipped with the package (``commer/pretrained/smollm2-135m``, pretrained by auto-encoding;
        fine-tune it for a task) on ``backbone`` (default: the embedded SmolLM2-135M-Instruct). Other weights raise
        ``CheckpointError``."""
        backbone = backbone or load_backbone(DEFAULT_BACKBONE)
        return cls.from_checkpoint(PRETRAINED, backbone)

    def soft_prompt_length(self, profile: ProfileState | None) -> int:
        """How many soft-prompt positions the generator reads for ``profile`` (K, or 0 for a user without documents
        when the bridge is the paper's ``none``): what a request's prompt tokens count."""
        has_documents = profile is not None and profile.count > 0
        return self.shape[0] if has_documents or self.model.config.bridge != "none" else 0

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

    def retrieval_profile(
        self,
        request: str,
        compressions: torch.Tensor,
        top_k: int,
        texts: Sequence[str] | None = None,
        min_margin: float = 0.0,
    ) -> ProfileState:
        """Retrieval-merge: the profile of the ``top_k`` of a user's ``(n, K, D)`` document compressions most relevant
        to ``request``, by BM25 over ``texts`` when given, else by the cosine similarity of each compression with the
        request's own (compressed by this model: no text needs storing). ``top_k >= n`` is the plain mean, and so is
        a ranking whose top k do not stand out from the rest by ``min_margin`` (``commer.merge.top_k_indices``)."""
        if texts is not None:
            return bm25_profile(request, compressions, texts, top_k, min_margin)
        scores = dense_scores(self.compress([request])[0], compressions)
        return top_k_profile(compressions, scores, top_k, min_margin)

    @torch.no_grad()
    def compress(
        self, documents: Sequence[str], batch_size: int = 16, names: Sequence[str] | None = None
    ) -> torch.Tensor:
        """``(n, K, D)`` compressions of ``documents`` (float32, on the CPU), in batches of similar lengths. A document
        the model cannot read (empty, or too long for the context) raises an error naming it (``names[i]``, else
        ``document i``)."""
        if not documents:
            raise ValueError("no documents to compress: pass at least one document")
        encoded = self.collator.encode_documents(documents, names=names)
        # Sorting by length keeps padding (wasted compute) small; results go back to input order.
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
        out = torch.empty(len(encoded), *self.shape)
        device, compressor = self.model.device, self.compressor()
        for start in range(0, len(order), batch_size):
            idx = order[start : start + batch_size]
            ids, mask = self.collator.pad([encoded[i] for i in idx])
            with autocast(device, self.bf16_compress):
                out[idx] = self.model.compress(ids.to(device), mask.to(device), compressor).float().cpu()
        return out

    def compressor(self) -> torch.nn.Module:
        """The LM that ``compress`` runs: the model's LoRA merged into a copy of the adapted weights (no adapter calls
        per layer), built on first use and again whenever the LoRA has changed since."""
        version = self.model.lora_version()
        if self._compressor is None or self._compressor[0] != version:
            self._compressor = (version, self.model.merged_compressor())
        return self._compressor[1]

    def profile(self, documents: Sequence[str]) -> ProfileState:
        """A new profile holding ``documents`` (an empty list gives an empty profile)."""
        if not documents:
            return ProfileState(*self.shape)
        return ProfileState.from_compressions(self.compress(documents))

    def generate(
        self,
        profiles: Sequence[ProfileState | None],
        instructions: Sequence[Prompt],
        max_new_tokens: int = 64,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        seed: int | Sequence[int | None] | None = None,
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
        instructions: Sequence[Prompt],
        max_new_tokens: int = 64,
        temperature: float | Sequence[float] = 0.0,
        top_p: float | Sequence[float] = 1.0,
        seed: int | Sequence[int | None] | None = None,
    ) -> Iterator[list[int | None]]:
        """Decode a batch step by step: each step yields one token id per row, ``None`` once that row has ended
        (EOS is yielded, then ``None``). An instruction may be chat messages (``commer.text.Prompt``). Sampling
        parameters may differ per row; ``seed`` is one for the batch or one per row (a row's sample then depends on
        its seed only)."""
        if len(profiles) != len(instructions):
            raise ValueError(f"{len(profiles)} profiles but {len(instructions)} instructions")
        if not instructions:
            return
        device = self.model.device
        steps = self.model.decode_steps(
            *self._prompts(profiles, instructions),
            eos_token_id=self.tokenizer.eos_token_id,
            pad_token_id=self.collator.pad_id,
            max_new_tokens=max_new_tokens,
            temperature=torch.as_tensor(temperature, dtype=torch.float32),
            top_p=torch.as_tensor(top_p, dtype=torch.float32),
            generator=sampling_generators(seed, len(instructions), device),
        )
        ended = [False] * len(instructions)
        for step in steps:
            tokens = step.tolist()
            yield [None if e else t for e, t in zip(ended, tokens, strict=True)]
            ended = [e or t == self.tokenizer.eos_token_id for e, t in zip(ended, tokens, strict=True)]

    def prefill(
        self, profiles: Sequence[ProfileState | None], instructions: Sequence[Prompt], max_new_tokens: int = 1
    ) -> DecodeRows:
        """Rows ready to decode (each row's first token is picked from ``.logits``): what continuous batching joins
        to the rows already decoding (``commer.service.worker``). ``max_new_tokens``: see ``SoftPromptLM.prefill``."""
        return self.model.prefill(*self._prompts(profiles, instructions), max_new_tokens)

    def _prompts(
        self, profiles: Sequence[ProfileState | None], instructions: Sequence[Prompt]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The generator's input for each (profile, instruction): soft prompts and mask, token ids and mask."""
        prefix, prefix_mask = self.soft_prompts(profiles)
        ids, mask = self.collator.pad([self.collator.encode_prompt(x) for x in instructions])
        return prefix, prefix_mask, ids.to(self.model.device), mask.to(self.model.device)


def sampling_generators(
    seed: int | Sequence[int | None] | None, rows: int, device: torch.device
) -> torch.Generator | list[torch.Generator | None] | None:
    """The sampling generator(s) of ``Personalizer.stream``: one seeded for the batch, or one per row."""
    if seed is None or isinstance(seed, int):
        return None if seed is None else torch.Generator(device).manual_seed(seed)
    if len(seed) != rows:
        raise ValueError(f"{len(seed)} seeds for {rows} rows")
    return [None if s is None else torch.Generator(device).manual_seed(s) for s in seed]


def bm25_scores(request: str, texts: Sequence[str]) -> torch.Tensor:
    """``(n,)`` BM25 scores of ``texts`` against ``request`` (float64; 0 where a text shares no word with it)."""
    query, *documents = tokenize([request, *texts])
    return torch.from_numpy(score_tokens(query, documents))


def bm25_profile(
    request: str, compressions: torch.Tensor, texts: Sequence[str], top_k: int, min_margin: float = 0.0
) -> ProfileState:
    """Retrieval-merge ranked by BM25 of ``request`` over the ``texts`` of the ``(n, K, D)`` ``compressions``
    (``min_margin``: see ``commer.merge.top_k_indices``): no model is involved, so a service runs it beside the model
    worker, not on it."""
    if len(texts) != compressions.shape[0]:
        raise ValueError(f"{len(texts)} texts for {compressions.shape[0]} compressions")
    return top_k_profile(compressions, bm25_scores(request, texts), top_k, min_margin)


def load_personalizer(
    checkpoint: str | Path | None,
    backbone: str = DEFAULT_BACKBONE,
    num_embeddings: int = DEFAULT_K,
    bf16_compress: bool = False,
) -> Personalizer:
    """The served model: ``checkpoint`` (a folder or ``"pretrained"``) on ``backbone``, or with no checkpoint an
    untrained ComMer of ``num_embeddings`` (seeded, so that its fingerprint, and therefore stored vectors, stay valid
    across restarts: LoRA's A matrices are random at init and part of the fingerprint). ``bf16_compress``: see
    ``Personalizer``."""
    bb = load_backbone(backbone)
    if checkpoint is not None:
        return Personalizer.from_checkpoint(checkpoint, bb, bf16_compress)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return Personalizer.new(bb, ComMerConfig(num_embeddings=num_embeddings), bf16_compress)


# -- documents of stored profiles -----------------------------------------------------------------------------------
def text_hash(text: str) -> str:
    """SHA-256 of a document's UTF-8 text: its default id, and how a re-added document is recognised."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def document_ids(texts: Sequence[str], ids: Sequence[str | None] | None = None) -> tuple[list[str], list[str]]:
    """Each document's id (``ids[i]`` where given, else the SHA-256 of its text) and its text's SHA-256."""
    hashes = [text_hash(t) for t in texts]
    ids = list(ids) if ids is not None else [None] * len(texts)
    if len(ids) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(ids)} ids")
    return [i if i is not None else h for i, h in zip(ids, hashes, strict=True)], hashes


@dataclass(frozen=True)
class AddedDocuments:
    """What adding documents did: every document's id (input order), the ids stored by this call (the others were
    already there) and the profile's count after it."""

    ids: list[str]
    added: list[str]
    count: int


@dataclass(frozen=True)
class AddPlan:
    """Which of the documents to add are new to the profile: the only ones worth compressing."""

    ids: list[str]  # every document's id, input order
    new: list[int]  # indices of the documents to compress and store (first occurrence of each new id)

    def labels(self, given: Sequence[str | None]) -> list[str]:
        """How errors name the new documents: ``document i (id)``, the id shortened when it is a hash."""
        return [f"document {i} ({given[i] or 'sha256 ' + self.ids[i][:12]})" for i in self.new]


def plan_add(
    store: ProfileStore, tenant: str, user: str, texts: Sequence[str], ids: Sequence[str | None] | None = None
) -> AddPlan:
    """Step 1 of adding documents: their ids and which of them the profile lacks (conflicts and stale profiles are
    refused here, before any compute is spent)."""
    return AddPlan(document_ids(texts, ids)[0], store.missing_documents(tenant, user, texts, ids))


def add_texts(
    store: ProfileStore,
    personalizer: Personalizer,
    tenant: str,
    user: str,
    texts: Sequence[str],
    ids: Sequence[str | None] | None = None,
) -> AddedDocuments:
    """Compress the documents the user does not have yet and add them: plan -> compress -> commit in one call."""
    given = list(ids) if ids is not None else [None] * len(texts)
    plan = plan_add(store, tenant, user, texts, given)
    chosen = [texts[i] for i in plan.new]
    compressions = (
        personalizer.compress(chosen, names=plan.labels(given)) if chosen else torch.empty(0, *personalizer.shape)
    )
    done = store.insert_documents(tenant, user, chosen, compressions, [given[i] for i in plan.new])
    return AddedDocuments(plan.ids, done.added, done.count)
