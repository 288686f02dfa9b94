"""ComMer and the prompt-tuning baseline: a frozen causal LM that reads a soft prompt before the request.

Reading order: ``SoftPromptLM`` (the frozen generator: loss, perplexity, decoding) -> ``Bridge`` (merged compressions
-> the generator's soft prompt) -> ``ComMer`` (compress each document with a LoRA'd copy of the same weights, merge,
bridge, hand the soft prompt to the generator) -> ``PromptTuning`` (one trained soft prompt, the documents go into the
text prompt instead).

The models know nothing about tokenization: they read ``Batch`` tensors (see ``commer.text``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from torch import nn
from transformers import DynamicCache
from transformers.cache_utils import Cache, StaticCache, StaticLayer
from transformers.modeling_layers import GradientCheckpointingLayer

from commer.backbone import Backbone
from commer.batch import Batch
from commer.config import ComMerConfig
from commer.merge import merge_batch
from commer.text import IGNORE_INDEX, check_context

STATIC_CACHE_BUCKET = 16  # a static KV cache is a multiple of this long: its masked columns cost attention work


def static_cache_length(columns: int) -> int:
    """The length of a static KV cache that holds ``columns``: rounded up to a multiple of ``STATIC_CACHE_BUCKET``.
    It may exceed the backbone's context: each row has its own position ids, a column is not a position."""
    return -(-columns // STATIC_CACHE_BUCKET) * STATIC_CACHE_BUCKET


def _vocab_init(embeddings: torch.Tensor, rows: int, seed: int) -> torch.Tensor:
    """Initialise soft tokens as copies of random vocabulary embeddings (Lester et al.): they start on the scale and in
    the region of the embedding space the frozen LM expects, which trains faster and more stably than Gaussian noise."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, embeddings.shape[0], (rows,), generator=g)
    return embeddings.detach()[idx.to(embeddings.device)].clone().float()


class SoftPromptLM(nn.Module):
    """The frozen generator: reads ``concat(prefix, embed(input_ids))``. Subclasses define ``prefix(batch)``."""

    def __init__(self, backbone: Backbone, config: ComMerConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone_name = backbone.name
        self.backbone_fingerprint = backbone.fingerprint
        self.max_length = backbone.max_length
        # How decoding runs: ``_decoder`` (``decode_in``) a copy of the generator in another dtype, ``_decode_step``
        # (``static_decoding``) the step over a static cache (the decoder, or ``_compiled_step``: it compiled). Kept
        # out of the submodules (``__dict__``): they share or copy the frozen generator's weights, never saved.
        self.__dict__.update(_decoder=None, _decode_step=None, _compiled_step=None)

    # -- subclass interface -------------------------------------------------------------------------------------
    @property
    def lm(self) -> nn.Module:
        """The Hugging Face causal LM (its weights are frozen)."""
        raise NotImplementedError

    def prefix(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The soft prompt of each example: ``(B, P, D)`` vectors and a ``(B, P)`` bool mask."""
        raise NotImplementedError

    @property
    def generator_lm(self) -> nn.Module:
        """The plain frozen backbone the generator runs: no adapter on its path (same weights as ``lm``)."""
        return self.lm

    # -- shared by both methods -----------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.lm.get_input_embeddings().weight.device

    @property
    def decoder_lm(self) -> nn.Module:
        """The generator decoding runs: ``generator_lm``, or its copy in another dtype (``decode_in``)."""
        return self._decoder if self._decoder is not None else self.generator_lm

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids)

    def with_merge(self, strategy: str) -> SoftPromptLM:
        """A view of this model, sharing every weight, that merges a user's compressions by ``strategy`` (the paper's
        test-time variants, Figure 7); the model itself is left as trained."""
        view = copy.copy(self)
        view.config = replace(self.config, merge=strategy)  # validated by ComMerConfig
        return view

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Every trainable tensor by name: exactly what a checkpoint stores."""
        return {name: p for name, p in self.named_parameters() if p.requires_grad}

    def checkpoint_activations(self, enabled: bool = True) -> None:
        """Activation checkpointing for training: each decoder layer of the compressor and the generator keeps only its
        input and recomputes the rest in the backward pass (Hugging Face's, non-reentrant), about one more forward
        pass per step for much less memory (docs/benchmarks.md). Nothing changes without gradients (evaluation,
        decoding), and the gradients are the same."""
        for lm in dict.fromkeys((self.lm, self.generator_lm)):  # ComMer's generator view has layers of its own
            if enabled:
                lm.activation_checkpointing_enable()
            elif lm.is_activation_checkpointing:  # Hugging Face's disable fails on a model that never enabled it
                lm.activation_checkpointing_disable()
        if self.generator_lm is not self.lm:
            # A layer is checkpointed only while it is training. ComMer's generator view stays in eval mode (it is not
            # a submodule), so only its layers are marked: their children (dropout) keep the frozen generator's mode.
            for layer in self.generator_lm.modules():
                if isinstance(layer, GradientCheckpointingLayer):
                    layer.training = enabled

    def decode_in(self, dtype: torch.dtype | None) -> None:
        """Decode with a copy of the generator's weights in ``dtype`` (``None``: its own weights again). Why: bfloat16
        halves the bytes a step reads and runs on AMX: 1.75x float32's compiled step at 16 rows on a 2-core Xeon, 1.18x
        a server's throughput for 16 users with long answers, but slower at one row and for short answers
        (docs/benchmarks.md). Compression, scoring and training keep the model's own weights, so stored compressions
        do not change; greedy answers may (bf16 rounding swaps near-tied tokens). The copy stays on the device it was
        made on: call this after moving the model."""
        own = self.generator_lm.get_input_embeddings().weight.dtype
        copy_ = None if dtype in (None, own) else copy.deepcopy(self.generator_lm).to(dtype)
        static = self._decode_step is not None
        compiled = static and self._decode_step is self._compiled_step
        self.__dict__.update(_decoder=copy_, _compiled_step=None, _decode_step=None)
        if static:  # the compiled step was of the old decoder
            self.static_decoding(compile=compiled)

    def static_decoding(self, enabled: bool = True, compile: bool = True) -> None:  # noqa: A002 - torch's name
        """Decode into a pre-allocated (static) KV cache, each step compiled by ``torch.compile`` (``compile=False``:
        the static cache only). Why: a small model's decoding step at a small batch is mostly per-op overhead, which a
        compiled step removes: 1.33x at one row, level at 16 rows in float32, 1.21x in bfloat16 on a 2-core Xeon
        (``python bench/decode_speed.py --static-compile``, docs/benchmarks.md). Greedy tokens are the dynamic cache's
        in float32 (tests/test_model.py). Each new (rows, cache length) shape compiles once per process (after two, the
        dimension that changed is compiled as dynamic): worth it for a server or a long evaluation, not for one answer.
        Cache lengths are multiples of ``STATIC_CACHE_BUCKET``."""
        if not enabled:
            self.__dict__["_decode_step"] = None
            return
        config = self.decoder_lm.config
        if not all(type(layer) is StaticLayer for layer in StaticCache(config=config, max_cache_len=1).layers):
            raise ValueError(f"static decoding needs full attention in every layer; {config.model_type} has others")
        if compile and self._compiled_step is None:  # kept, so that turning it off and on again does not recompile
            self.__dict__["_compiled_step"] = torch.compile(self.decoder_lm)
        self.__dict__["_decode_step"] = self._compiled_step if compile else self.decoder_lm

    def _join(
        self, prefix: torch.Tensor, prefix_mask: torch.Tensor, input_ids: torch.Tensor, input_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What the generator reads: ``(B, P + L, D)`` embeddings of soft prompt then tokens, and their bool mask."""
        dtype = self.lm.get_input_embeddings().weight.dtype
        embeds = torch.cat([prefix.to(dtype), self.embed(input_ids)], dim=1)  # (B, P + L, D)
        return embeds, torch.cat([prefix_mask, input_mask.bool()], dim=1)

    def left_aligned(
        self, prefix: torch.Tensor, prefix_mask: torch.Tensor, input_ids: torch.Tensor, input_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """What decoding reads: ``_join``'s ``(B, P + L, D)`` embeddings and ``(B, P + L)`` long mask, left-aligned
        (all masked slots first, real positions last), so every row's next token goes at the same index."""
        embeds, mask = self._join(prefix, prefix_mask, input_ids, input_mask)
        order = torch.argsort(mask.to(torch.int8), dim=1, stable=True)
        return embeds.gather(1, order[..., None].expand_as(embeds)), mask.gather(1, order).long()

    def answer_logits(
        self, batch: Batch, prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher-forced logits at the batch's answer positions: ``(N, V)`` logits (float32) for the N answer tokens
        of all examples, their ``(N,)`` target ids and the ``(N,)`` example index each belongs to. ``prefix``: the
        soft prompts to read (``(B, P, D)`` and mask), default ``self.prefix(batch)``."""
        if batch.labels is None:
            raise ValueError("this batch has no labels: collate it with answers to compute a loss or perplexity")
        prefix, prefix_mask = prefix if prefix is not None else self.prefix(batch)
        embeds, mask = self._join(prefix, prefix_mask, batch.input_ids, batch.input_mask)
        labels = torch.cat([batch.labels.new_full(prefix_mask.shape, IGNORE_INDEX), batch.labels], dim=1)
        # Move masked positions (empty prefixes, padding) to the end: then no real query attends to a slot with no
        # valid key, and the loss is unchanged because it is selected by label, not by position.
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)
        embeds = embeds.gather(1, order[..., None].expand_as(embeds))
        mask, labels = mask.gather(1, order), labels.gather(1, order)
        hidden = self.generator_lm.get_decoder()(
            inputs_embeds=embeds, attention_mask=mask.long(), use_cache=False
        ).last_hidden_state  # (B, T, D)
        targets = labels[:, 1:]
        selected = targets != IGNORE_INDEX  # (B, T - 1)
        # The LM head is applied to answer positions only: the vocabulary projection dominates a small model's cost.
        logits = self.lm.get_output_embeddings()(hidden[:, :-1][selected]).float()  # (N, V)
        return logits, targets[selected], torch.nonzero(selected)[:, 0]

    def nll(
        self, batch: Batch, prefix: tuple[torch.Tensor, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed negative log-likelihood of each example's answer tokens and their number, both ``(B,)``
        (``prefix``: see ``answer_logits``)."""
        logits, targets, rows = self.answer_logits(batch, prefix)
        token_nll = F.cross_entropy(logits, targets, reduction="none")
        nll = token_nll.new_zeros(batch.size).index_add(0, rows, token_nll)
        return nll, torch.bincount(rows, minlength=batch.size)

    def loss(self, batch: Batch) -> torch.Tensor:
        """Mean cross-entropy over all answer tokens of the batch (the training objective)."""
        nll, n_tokens = self.nll(batch)
        return nll.sum() / n_tokens.sum().clamp(min=1)

    @torch.no_grad()
    def perplexity(self, batch: Batch) -> torch.Tensor:
        """Per-example perplexity of the gold answer, ``(B,)``."""
        nll, n_tokens = self.nll(batch)
        return torch.exp(nll / n_tokens.clamp(min=1))

    @torch.no_grad()
    def generate(self, batch: Batch, **kwargs) -> torch.Tensor:
        """Decode an answer for every example of ``batch`` (its prompts, without answers). See ``decode``."""
        prefix, prefix_mask = self.prefix(batch)
        return self.decode(prefix, prefix_mask, batch.input_ids, batch.input_mask, **kwargs)

    @torch.no_grad()
    def decode(self, *args, **kwargs) -> torch.Tensor:
        """All of ``decode_steps`` at once: ``(B, T)`` new token ids, ``T <= max_new_tokens``."""
        return torch.stack(list(self.decode_steps(*args, **kwargs)), dim=1)

    @torch.no_grad()
    def decode_steps(
        self,
        prefix: torch.Tensor,
        prefix_mask: torch.Tensor,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor,
        *,
        eos_token_id: int | list[int],
        pad_token_id: int,
        max_new_tokens: int = 64,
        temperature: float | torch.Tensor = 0.0,
        top_p: float | torch.Tensor = 1.0,
        generator: torch.Generator | Sequence[torch.Generator | None] | None = None,
    ) -> Iterator[torch.Tensor]:
        """Greedy or nucleus-sampled decoding with a KV cache, many users at once, one ``(B,)`` step at a time.

        Args:
            prefix: ``(B, P, D)`` soft prompts, ``prefix_mask`` ``(B, P)``: each user's own (masked where absent).
            input_ids, input_mask: ``(B, L)`` prompts, padded on either side.
            temperature, top_p: a float for all rows or a ``(B,)`` tensor per row; temperature 0 is greedy.
            generator: the random source of sampling, one for the batch or one per row (``None``: the global one);
                with one per row, a row's tokens depend on its own generator only, not on the rows beside it.
        Yields:
            ``(B,)`` token ids per step until every row has produced EOS or ``max_new_tokens`` steps; after a row's
            EOS it yields ``pad_token_id`` for that row.
        """
        b = input_ids.shape[0]
        temperature = torch.as_tensor(temperature, dtype=torch.float32, device=self.device).expand(b)
        top_p = torch.as_tensor(top_p, dtype=torch.float32, device=self.device).expand(b)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if bool((temperature < 0).any()) or not bool(((top_p > 0) & (top_p <= 1)).all()):
            raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature.tolist()}, {top_p.tolist()}")
        eos = torch.tensor([eos_token_id] if isinstance(eos_token_id, int) else eos_token_id, device=self.device)
        width = prefix.shape[1] + input_ids.shape[1]
        check_context(
            f"a prompt of {width} positions with {max_new_tokens} new tokens", width + max_new_tokens, self.max_length
        )
        done = torch.zeros(b, dtype=torch.bool, device=self.device)
        rows = self.prefill(prefix, prefix_mask, input_ids, input_mask, max_new_tokens)
        for step in range(max_new_tokens):
            nxt = sample_next(rows.logits, temperature, top_p, generator)
            nxt = torch.where(done, torch.full_like(nxt, pad_token_id), nxt)
            yield nxt
            done |= torch.isin(nxt, eos)
            if bool(done.all()) or step == max_new_tokens - 1:  # (no forward pass for a token nobody reads)
                return
            rows = self.advance(rows, nxt)

    @torch.no_grad()
    def prefill(
        self,
        prefix: torch.Tensor,
        prefix_mask: torch.Tensor,
        input_ids: torch.Tensor,
        input_mask: torch.Tensor,
        max_new_tokens: int = 1,
    ) -> DecodeRows:
        """Read each row's soft prompt ``(B, P, D)`` (mask ``(B, P)``) and prompt ``(B, L)`` (padded on either side)
        into a KV cache: rows ready to pick their first token. ``max_new_tokens``: the most tokens any row will pick,
        all but the last fed back (the size of a static cache, see ``static_decoding``; a dynamic cache grows)."""
        lm = self.decoder_lm
        embeds, mask = self.left_aligned(prefix, prefix_mask, input_ids, input_mask)
        positions = (mask.cumsum(1) - 1).clamp(min=0)
        width = mask.shape[1]
        cache = None
        if self._decode_step is not None:
            length = static_cache_length(width + max_new_tokens - 1)  # the last token is never fed back
            cache = StaticCache(config=lm.config, max_cache_len=length)
            mask = F.pad(mask, (0, length - width))  # (B, length): the columns to come are masked until written
        out = lm(
            inputs_embeds=embeds.to(lm.get_input_embeddings().weight.dtype),
            attention_mask=mask,
            position_ids=positions,
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        )
        return DecodeRows(out.cache, mask, positions[:, -1:], out.logits[:, -1].float(), width)

    @torch.no_grad()
    def advance(self, rows: DecodeRows, tokens: torch.Tensor) -> DecodeRows:
        """Feed each row its ``(B,)`` next token: the rows, one position longer, with their next logits."""
        b, end = rows.size, rows.end
        if rows.static:
            if end == rows.mask.shape[1]:
                raise ValueError(f"the static KV cache of {end} positions is full: prefill with more room")
            mask = rows.mask.clone()
            mask[:, end] = 1
        else:
            mask = torch.cat([rows.mask, rows.mask.new_ones(b, 1)], dim=1)
        positions = rows.positions + 1
        lm = self.decoder_lm
        # Rows prefilled into a static cache keep decoding after ``static_decoding(False)``: uncompiled, same cache.
        step = self._decode_step if rows.static and self._decode_step is not None else lm
        out = step(
            inputs_embeds=lm.get_input_embeddings()(tokens[:, None]),  # (B, 1, D), in the decoder's dtype
            attention_mask=mask,
            position_ids=positions,
            cache=rows.cache,
            use_cache=True,
        )
        return DecodeRows(out.cache, mask, positions, out.logits[:, -1].float(), end + 1)


@dataclass
class DecodeRows:
    """Rows decoding together, each ready for its next token: continuous batching lets rows leave (``select``) and
    join (``join``) between steps, whatever their lengths. Rows are left-aligned: all end at column ``end``, their
    masked slots (padding, or the room a shorter row leaves) come first, and each row keeps its own position ids, so
    a row's tokens do not depend on the rows beside it. A static cache also holds the columns to come, masked."""

    cache: Cache  # per layer (B, H, T, d) keys and values: a DynamicCache, or a static one (T fixed)
    mask: torch.Tensor  # (B, T) long, 1 at each row's real positions
    positions: torch.Tensor  # (B, 1) the position id of each row's last position
    logits: torch.Tensor  # (B, V) float32: each row's next-token logits
    end: int  # the columns written (T for a dynamic cache)

    @property
    def size(self) -> int:
        return self.mask.shape[0]

    @property
    def static(self) -> bool:
        return not isinstance(self.cache, DynamicCache)

    def _layers(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.cache.layers]

    def _with(
        self,
        layers: list[tuple[torch.Tensor, torch.Tensor]],
        mask: torch.Tensor,
        end: int,
        positions: torch.Tensor,
        logits: torch.Tensor,
    ) -> DecodeRows:
        """Rows holding ``layers``' keys and values, in a cache of the same kind as this one."""
        if self.static:
            cache = Cache(layers=[StaticLayer(max_cache_len=mask.shape[1]) for _ in layers])
            for layer, (k, v) in zip(cache.layers, layers, strict=True):
                layer.lazy_initialization(k, v)
                layer.keys.copy_(k)
                layer.values.copy_(v)
                layer.cumulative_length.fill_(end)
        else:
            cache = DynamicCache(layers)
        return DecodeRows(cache, mask, positions, logits, end)

    def select(self, rows: Sequence[int]) -> DecodeRows:
        """The rows at ``rows`` (in that order), without the leading columns that none of them uses (a static cache
        drops them in whole buckets, so that its length stays a multiple of ``STATIC_CACHE_BUCKET``)."""
        index = torch.as_tensor(rows, dtype=torch.long, device=self.mask.device)
        mask = self.mask[index]
        first = int(mask.any(0).long().argmax())  # the first column any kept row reads
        if self.static:
            first -= first % STATIC_CACHE_BUCKET
        layers = [(k[index, :, first:], v[index, :, first:]) for k, v in self._layers()]
        return self._with(layers, mask[:, first:], self.end - first, self.positions[index], self.logits[index])

    def join(self, other: DecodeRows) -> DecodeRows:
        """These rows, then ``other``'s: the side that has written fewer columns is shifted right (masked slots on
        its left) so that both end at the same column; a static cache keeps the room of the roomier side."""
        if self.static != other.static:
            raise ValueError("cannot join rows of a static KV cache with rows of a dynamic one")
        end = max(self.end, other.end)
        room = max(self.mask.shape[1] - self.end, other.mask.shape[1] - other.end)
        if self.static:
            room = static_cache_length(end + room) - end

        def aligned(x: torch.Tensor, dim: int, rows: DecodeRows) -> torch.Tensor:  # (.., end + room) along ``dim``
            x = x.narrow(dim, 0, rows.end)
            pad = [0, 0] * (x.dim() - 1 - dim) + [end - rows.end, room]
            return F.pad(x, pad)

        layers = [
            (
                torch.cat([aligned(k1, 2, self), aligned(k2, 2, other)]),
                torch.cat([aligned(v1, 2, self), aligned(v2, 2, other)]),
            )
            for (k1, v1), (k2, v2) in zip(self._layers(), other._layers(), strict=True)
        ]
        mask = torch.cat([aligned(self.mask, 1, self), aligned(other.mask, 1, other)])
        positions, logits = torch.cat([self.positions, other.positions]), torch.cat([self.logits, other.logits])
        return self._with(layers, mask, end, positions, logits)


def sample_next(
    logits: torch.Tensor,
    temperature: torch.Tensor,
    top_p: torch.Tensor,
    generator: torch.Generator | Sequence[torch.Generator | None] | None,
) -> torch.Tensor:
    """Next token from ``(B, V)`` logits: argmax where ``temperature`` is 0, else a sample from the top-p nucleus."""
    greedy = logits.argmax(-1)
    if bool((temperature == 0).all()):
        return greedy
    probs = torch.softmax(logits / temperature.clamp(min=1e-6)[:, None], dim=-1)
    sorted_probs, sorted_idx = probs.sort(dim=-1, descending=True)
    # keep the smallest set of tokens whose mass reaches top_p (always at least the most likely one)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p[:, None]
    probs = torch.zeros_like(probs).scatter(-1, sorted_idx, sorted_probs.masked_fill(outside, 0))
    if generator is None or isinstance(generator, torch.Generator):
        sampled = torch.multinomial(probs, 1, generator=generator)[:, 0]
    else:  # each row draws from its own generator
        rows = zip(probs, generator, strict=True)
        sampled = torch.cat([torch.multinomial(row[None], 1, generator=g)[0] for row, g in rows])
    return torch.where(temperature == 0, greedy, sampled)


def without_adapters(module: nn.Module) -> nn.Module:
    """A view of ``module`` in which every peft LoRA wrapper is replaced by the layer it wraps.

    Each module of the view is a shallow copy that shares its parameter and buffer dicts with the original, so the view
    holds no weights of its own and follows the original through ``.to()``, ``.half()`` or ``load_state_dict``. Why:
    a disabled adapter is still called on every linear layer; the generator, which never uses the adapter, should pay
    for the plain backbone only."""
    return _replace_lora(module, lambda layer: layer.get_base_layer())


def with_merged_adapters(module: nn.Module) -> nn.Module:
    """A view of ``module`` in which every peft LoRA wrapper is replaced by a copy of its base layer with the active
    adapters added into the weight (``W + scale * B @ A``): the same function without the adapter's per-layer calls,
    for as long as the adapter does not change. The merged weights are new tensors; everything else is shared."""
    return _replace_lora(module, _merged_linear)


def _replace_lora(module: nn.Module, replace: Callable[[LoraLayer], nn.Module]) -> nn.Module:
    if isinstance(module, LoraLayer):
        return replace(module)
    view = copy.copy(module)
    view._modules = {
        name: None if child is None else _replace_lora(child, replace) for name, child in module._modules.items()
    }
    return view


def _merged_linear(layer: LoraLayer) -> nn.Module:
    base = layer.get_base_layer()
    weight = base.weight.detach().clone()
    if not layer.disable_adapters:
        for name in layer.active_adapters:
            weight += layer.get_delta_weight(name).to(weight.dtype)
    merged = copy.copy(base)
    merged._parameters = {**base._parameters, "weight": nn.Parameter(weight, requires_grad=False)}
    return merged


class Bridge(nn.Module):
    """Merged compressions -> the generator's soft prompt: ``task_prompt + f(merged)`` (see ``ComMerConfig.bridge``).

    ``f`` starts at exactly zero (a zero ``W``, a zero gate, or an MLP whose output layer is zero), so the untrained
    ComMer is prompt tuning without documents: the generator is never fed raw last-layer states it cannot read, and
    ``f`` gets a gradient at the first step. ``kind="none"`` is the paper's identity (no parameters, no task prompt).
    """

    def __init__(self, kind: str, task_prompt: torch.Tensor) -> None:
        super().__init__()
        self.kind = kind
        if kind == "none":
            return
        k, d = task_prompt.shape
        self.task_prompt = nn.Parameter(task_prompt)  # (K, D), initialised like a prompt-tuning soft prompt
        if kind == "linear":
            self.proj = nn.Linear(d, d, bias=False)
            nn.init.zeros_(self.proj.weight)
        elif kind == "gate":
            self.gate = nn.Parameter(torch.zeros(()))
        elif kind == "mlp":
            self.mlp = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d))
            nn.init.zeros_(self.mlp[2].weight)
            nn.init.zeros_(self.mlp[2].bias)
        else:
            raise ValueError(f"unknown bridge {kind!r}")
        self.to(task_prompt.device)

    def forward(self, merged: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``merged (B, P, D)`` with ``mask (B, P)`` (``P = K``, or ``n * K`` for ``concat``) -> soft prompt and mask.

        A user without documents (all-False mask) reads the task prompt alone; for ``concat`` each document's K
        vectors get the task prompt added."""
        if self.kind == "none":
            return merged, mask
        p, k = merged.shape[1], self.task_prompt.shape[0]
        merged = merged.float().masked_fill(~mask[..., None], 0.0)  # no stray values from masked slots
        if self.kind == "linear":
            personal = self.proj(merged)
        elif self.kind == "gate":
            personal = self.gate * merged
        else:
            personal = self.mlp(merged).masked_fill(~mask[..., None], 0.0)  # MLP(0) is its bias: keep empty slots 0
        prompt = self.task_prompt.repeat(p // k, 1)[None] + personal  # (B, P, D)
        mask = mask.clone()
        mask[:, :k] = True  # every user reads at least the task prompt
        return prompt, mask


class ComMer(SoftPromptLM):
    """Compress each document into K vectors (backbone + LoRA + K compression embeddings), mean-merge per user,
    generate with the same backbone without the LoRA (``generator_lm``): one copy of the weights serves as compressor
    and generator."""

    def __init__(self, backbone: Backbone, config: ComMerConfig) -> None:
        super().__init__(backbone, config)
        if hasattr(backbone.model, "peft_config"):
            raise ValueError("this backbone already carries a LoRA adapter: load a fresh backbone for each model")
        lora = LoraConfig(
            r=config.lora_r,
            lora_alpha=config.lora_alpha,
            lora_dropout=config.lora_dropout,
            target_modules=config.lora_target_modules,
            bias="none",
        )
        self.peft_model = get_peft_model(backbone.model, lora)  # injects LoRA in place, freezes everything else
        weight = backbone.model.get_input_embeddings().weight
        self.compression_embeddings = nn.Parameter(
            _vocab_init(weight, config.num_embeddings, config.init_seed).to(weight.device)
        )  # (K, D)
        task_prompt = _vocab_init(weight, config.num_embeddings, config.init_seed + 1).to(weight.device)  # (K, D)
        self.bridge = Bridge(config.bridge, task_prompt)
        # a constant of the frozen backbone, kept as a buffer so it moves with the model but is never trained or saved
        self.register_buffer("token_norm", weight.detach().float().norm(dim=-1).mean(), persistent=False)
        # Not a submodule: it shares every weight with ``lm``, and registering it would save and count them twice.
        self.__dict__["_generator_lm"] = without_adapters(self.lm)

    @property
    def lm(self) -> nn.Module:
        return self.peft_model.get_base_model()

    @property
    def generator_lm(self) -> nn.Module:
        return self.__dict__["_generator_lm"]

    def compress(self, doc_ids: torch.Tensor, doc_mask: torch.Tensor, lm: nn.Module | None = None) -> torch.Tensor:
        """Compress documents independently.

        Args:
            doc_ids, doc_mask: ``(n_docs, L)`` right-padded token ids and their mask.
            lm: the LM that compresses: default the backbone with its LoRA (what training needs); for inference with a
                fixed adapter, ``merged_compressor()`` computes the same without the adapter's per-layer calls.
        Returns:
            ``(n_docs, K, D)``: the last layer's hidden states at the K compression slots placed right after each
            document's last real token (so padding never sits between a document and its slots).
        """
        k, d = self.compression_embeddings.shape
        n_docs, length = doc_ids.shape
        if n_docs == 0:
            return self.compression_embeddings.new_zeros(0, k, d)
        lengths = doc_mask.sum(1)  # (n_docs,)
        if bool((lengths == 0).any()):
            raise ValueError(f"document(s) {torch.nonzero(lengths == 0)[:, 0].tolist()} of this batch are empty")
        check_context(
            f"a document of {int(lengths.max())} tokens with K={k} compression slots",
            int(lengths.max()) + k,
            self.max_length,
        )
        tokens = self.embed(doc_ids)
        embeds = torch.cat([tokens, tokens.new_zeros(n_docs, k, d)], dim=1)  # (n, L + K, D)
        slot = torch.arange(length + k, device=doc_ids.device)[None, :] - lengths[:, None]  # (n, L + K)
        is_slot = (slot >= 0) & (slot < k)
        slot_embeds = self.compression_embeddings.to(embeds.dtype)[slot.clamp(0, k - 1)]  # (n, L + K, D)
        embeds = torch.where(is_slot[..., None], slot_embeds, embeds)
        mask = (slot < k).long()  # document tokens and slots; padding after them
        # The decoder alone: the LM head's vocabulary projection would be wasted work here.
        decoder = (lm or self.lm).get_decoder()
        hidden = decoder(inputs_embeds=embeds, attention_mask=mask, use_cache=False).last_hidden_state
        index = lengths[:, None] + torch.arange(k, device=doc_ids.device)[None, :]  # (n, K)
        compressions = hidden.gather(1, index[..., None].expand(n_docs, k, d))  # (n, K, D)
        if self.config.compression_norm == "embedding":
            compressions = F.normalize(compressions, dim=-1) * self.token_norm.to(compressions.dtype)
        return compressions

    def merged_compressor(self) -> nn.Module:
        """The compressor for inference: the backbone with the LoRA merged into a copy of each adapted weight (one more
        copy of those weights; the embeddings and norms are shared). It does not follow later changes to the LoRA."""
        return with_merged_adapters(self.lm)

    def with_compression_cache(self) -> ComMer:
        """A view of this model, sharing every weight, that compresses each distinct document once (keyed by its
        token ids) and reuses that compression whenever the document comes again: for evaluations that read the same
        documents many times (``commer memories``: every method and subset of a user's memories). Inference only: the
        cached compressions carry no gradient and do not follow later changes to the LoRA."""
        cache: dict[tuple[int, ...], torch.Tensor] = {}
        compress = self.compress

        def cached(doc_ids: torch.Tensor, doc_mask: torch.Tensor, lm: nn.Module | None = None) -> torch.Tensor:
            keys = [tuple(row[mask.bool()].tolist()) for row, mask in zip(doc_ids, doc_mask, strict=True)]
            new = [i for i, key in enumerate(keys) if key not in cache]
            if new:
                with torch.no_grad():
                    for i, compression in zip(new, compress(doc_ids[new], doc_mask[new], lm), strict=True):
                        cache[keys[i]] = compression
            return torch.stack([cache[key] for key in keys]) if keys else compress(doc_ids, doc_mask, lm)

        view = copy.copy(self)
        view.compress = cached  # an instance attribute: the view's prefix() compresses through the cache
        return view

    def lora_version(self) -> tuple[tuple, ...]:
        """Changes whenever a LoRA weight is replaced or changed in place (an optimizer step, ``load_state_dict``):
        when a ``merged_compressor()`` must be built again."""
        lora = [p for n, p in self.peft_model.named_parameters() if "lora_" in n]
        return tuple((id(p), p._version, p.device, p.dtype) for p in lora)

    def soft_prompt(self, merged: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the generator reads for users' merged compressions ``(B, P, D)`` and mask ``(B, P)``: the bridge's
        output. The one path from a merged profile (a batch's, the store's, a vLLM request's) to a soft prompt."""
        return self.bridge(merged, mask)

    def prefix(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        compressions = self.compress(batch.doc_ids, batch.doc_mask)  # (n_docs, K, D)
        return self.soft_prompt(*merge_batch(compressions, batch.doc_owner, batch.size, self.config.merge))


class PromptTuning(SoftPromptLM):
    """The baseline (Lester et al. 2021): one trained ``(K, D)`` soft prompt before the documents-as-text prompt."""

    def __init__(self, backbone: Backbone, config: ComMerConfig) -> None:
        super().__init__(backbone, config)
        self._lm = backbone.model
        weight = backbone.model.get_input_embeddings().weight
        self.soft_prompt = nn.Parameter(_vocab_init(weight, config.num_embeddings, config.init_seed).to(weight.device))

    @property
    def lm(self) -> nn.Module:
        return self._lm

    def prefix(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        b, (k, d) = batch.size, self.soft_prompt.shape
        mask = torch.ones(b, k, dtype=torch.bool, device=self.soft_prompt.device)
        return self.soft_prompt[None].expand(b, k, d), mask


def build_model(backbone: Backbone, config: ComMerConfig) -> SoftPromptLM:
    """The model ``config.method`` names, on ``backbone``."""
    return ComMer(backbone, config) if config.method == "commer" else PromptTuning(backbone, config)
