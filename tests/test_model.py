"""The ML correctness checks of the core, on the tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import perturb_zero_init, tiny_backbone
from peft.tuners.lora import LoraLayer
from transformers import LlamaForCausalLM

from commer.batch import Batch
from commer.config import ComMerConfig, RunConfig
from commer.evaluate import bf16_supported
from commer.merge import stack_profiles
from commer.model import STATIC_CACHE_BUCKET, ComMer, PromptTuning
from commer.serving import Personalizer
from commer.text import Collator, ContextTooLongError, Example
from commer.train import Trainer, build

K = 4

EXAMPLES = [
    Example("alice", ["i love running in the morning", "marathon tomorrow !"], "what is my plan today ?", "run"),
    Example("bob", ["jazz music and coffee"], "what does the user like ?", "jazz and coffee"),
    Example("carol", [], "what is the news ?", "rain in the city"),
]


def _model(backbone, **overrides) -> ComMer:
    model = ComMer(backbone, ComMerConfig(num_embeddings=K, lora_r=4, lora_dropout=0.0, **overrides))
    perturb_zero_init(model)
    return model.eval()


def _collate(backbone, model, examples=EXAMPLES, with_answers=True) -> Batch:
    return Collator(backbone.tokenizer, model.config, backbone.max_length)(examples, with_answers=with_answers)


def test_shapes(backbone):
    model = _model(backbone)
    batch = _collate(backbone, model)
    assert model.compress(batch.doc_ids, batch.doc_mask).shape == (3, K, 64)  # 3 documents in all
    prefix, mask = model.prefix(batch)
    assert prefix.shape == (3, K, 64) and mask.all()  # carol, without documents, reads the task prompt
    assert _model(tiny_backbone(), bridge="none").prefix(batch)[1].tolist() == [[True] * K, [True] * K, [False] * K]
    loss = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert model.perplexity(batch).shape == (3,)
    tokens = model.generate(
        _collate(backbone, model, with_answers=False), eos_token_id=2, pad_token_id=1, max_new_tokens=5
    )
    assert tokens.shape[0] == 3 and 1 <= tokens.shape[1] <= 5


def test_padding_invariance(backbone):
    """A document compressed alone equals the same document inside a padded batch."""
    model = _model(backbone)
    collator = Collator(backbone.tokenizer, model.config, backbone.max_length)
    docs = ["cat", "i love running in the morning with my dog today", "jazz music"]
    alone = [model.compress(*collator.pad(collator.encode_documents([d]))) for d in docs]
    together = model.compress(*collator.pad(collator.encode_documents(docs)))
    for i, single in enumerate(alone):
        torch.testing.assert_close(together[i], single[0], atol=1e-5, rtol=0)


def test_lora_changes_compression_but_not_generator(backbone):
    """The compressor really uses the LoRA; the generator really runs without it: its logits equal the plain
    base model's (a separate, untouched copy of the same weights) for the same input embeddings."""
    plain = LlamaForCausalLM(backbone.model.config).eval()
    plain.load_state_dict(copy.deepcopy(backbone.model.state_dict()))
    model = _model(backbone)
    embeds = torch.randn(2, 7, 64)
    with torch.no_grad():
        ours = model.generator_lm(inputs_embeds=embeds).logits
        reference = plain(inputs_embeds=embeds).logits
        with_lora = model.lm(inputs_embeds=embeds).logits
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    assert (with_lora - reference).abs().max() > 1e-3


@pytest.mark.parametrize("bridge", ["none", "linear"])
def test_zero_documents_reads_the_task_prompt_or_nothing(backbone, bridge):
    """A user without documents gets exactly what the frozen model says to the task prompt and the prompt (the bare
    prompt with the paper's bridge "none"), even when batched with users that have soft prompts."""
    model = _model(backbone, bridge=bridge)
    batch = _collate(backbone, model)
    nll, n = model.nll(batch)
    carol = batch.input_ids[2][batch.input_mask[2]][None]
    labels = batch.labels[2][batch.input_mask[2]][None]
    embeds = model.embed(carol)
    if bridge != "none":
        embeds = torch.cat([model.bridge.task_prompt[None], embeds], dim=1)
        labels = torch.cat([labels.new_full((1, K), -100), labels], dim=1)
    with torch.no_grad():
        reference = model.generator_lm(inputs_embeds=embeds, labels=labels).loss
    torch.testing.assert_close(nll[2] / n[2], reference, atol=1e-5, rtol=0)


@pytest.mark.parametrize("bridge", ["linear", "gate", "mlp"])
def test_untrained_bridge_is_the_task_prompt_whatever_the_documents(backbone, bridge):
    """At initialisation the soft prompt is exactly the task prompt for every user (prompt tuning without documents),
    and the bridge's zero-initialised map gets a gradient at the first step."""
    model = ComMer(backbone, ComMerConfig(num_embeddings=K, lora_r=4, bridge=bridge))
    for name, p in model.named_parameters():  # a trained-looking LoRA: the compressions differ per document
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.1)
    batch = _collate(backbone, model)
    prefix, mask = model.prefix(batch)
    assert mask.all()
    for row in prefix:
        assert torch.equal(row, model.bridge.task_prompt)
    model.loss(batch).backward()
    zero_init = [p for name, p in model.bridge.named_parameters() if name != "task_prompt" and not p.any()]
    assert zero_init and all(p.grad is not None and p.grad.abs().sum() > 0 for p in zero_init)
    assert model.bridge.task_prompt.grad.abs().sum() > 0


def test_generator_view_shares_the_weights_and_has_no_adapter(backbone):
    """The generator's view of the backbone holds no tensor of its own (every parameter and buffer is the backbone's
    object), calls no LoRA layer, is not saved with the model, and follows the model through ``.to()``."""
    from peft.tuners.lora import LoraLayer

    model = _model(backbone)
    view = model.generator_lm
    assert view is not model.lm and not any(isinstance(m, LoraLayer) for m in view.modules())
    base = {name.replace(".base_layer", ""): p for name, p in model.lm.named_parameters() if "lora_" not in name}
    assert {name: id(p) for name, p in view.named_parameters()} == {name: id(p) for name, p in base.items()}
    assert not any("_generator_lm" in key for key in model.state_dict())
    model.to(torch.bfloat16)
    assert {p.dtype for p in view.parameters()} == {torch.bfloat16}
    assert {b.dtype for b in view.buffers() if b.is_floating_point()} == {
        b.dtype for b in model.lm.buffers() if b.is_floating_point()
    }


def test_greedy_decoding_equals_the_adapter_disabled_backbone_without_cache(backbone):
    """Decoding through the view, with its KV cache, gives the tokens of a plain greedy loop that re-reads the whole
    sequence each step through peft's disabled adapter (the generator path before the view), LoRA trained-looking."""
    model = _model(backbone)
    perturb_zero_init(model)
    batch = _collate(backbone, model, EXAMPLES[:1], with_answers=False)
    tokens = model.generate(batch, eos_token_id=-1, pad_token_id=1, max_new_tokens=6)[0]
    prefix, _ = model.prefix(batch)
    embeds = torch.cat([prefix, model.embed(batch.input_ids)], dim=1)
    expected = []
    with torch.no_grad(), model.peft_model.disable_adapter():
        for _ in range(6):
            nxt = model.lm(inputs_embeds=embeds).logits[0, -1].argmax()
            expected.append(int(nxt))
            embeds = torch.cat([embeds, model.embed(nxt[None, None])], dim=1)
    assert tokens.tolist() == expected


def test_merged_compressor_compresses_as_the_adapter_does(backbone):
    """The LoRA merged into a copy of the weights gives the LoRA'd compressor's output (float32 rounding), with no
    adapter layer left, the embeddings shared, and the backbone's own weights untouched."""
    model = _model(backbone)
    batch = _collate(backbone, model)
    before = {n: p.clone() for n, p in model.lm.named_parameters()}
    merged = model.merged_compressor()
    assert not any(isinstance(m, LoraLayer) for m in merged.modules())
    assert merged.get_input_embeddings().weight is model.lm.get_input_embeddings().weight
    with torch.no_grad():
        expected = model.compress(batch.doc_ids, batch.doc_mask)
        got = model.compress(batch.doc_ids, batch.doc_mask, merged)
    assert (expected - got).abs().max() < 1e-4 * expected.abs().max()
    assert all(torch.equal(before[n], p) for n, p in model.lm.named_parameters())


def test_personalizer_compresses_with_the_current_adapter(backbone):
    """``Personalizer.compress`` runs the merged compressor and builds it again once the LoRA changes in place."""
    p = Personalizer(_model(backbone), backbone.tokenizer)
    batch = _collate(backbone, p.model, EXAMPLES[:1])
    first = p.compress(EXAMPLES[0].documents)
    with torch.no_grad():
        assert torch.allclose(first, p.model.compress(batch.doc_ids, batch.doc_mask), atol=1e-4)
        for name, param in p.model.peft_model.named_parameters():
            if "lora_B" in name:
                param.add_(0.05)
        expected = p.model.compress(batch.doc_ids, batch.doc_mask)
    again = p.compress(EXAMPLES[0].documents)
    assert not torch.allclose(again, first, atol=1e-3) and torch.allclose(again, expected, atol=1e-4)


@pytest.mark.skipif(not bf16_supported(torch.device("cpu")), reason="this CPU has no native bfloat16")
def test_bf16_compression_is_float32_within_bf16_rounding(backbone):
    """``bf16_compress`` runs the compressor under bfloat16 autocast: not float32's numbers, but close to them."""
    model = _model(backbone)
    docs = [d for ex in EXAMPLES for d in ex.documents]
    full = Personalizer(model, backbone.tokenizer).compress(docs)
    half = Personalizer(model, backbone.tokenizer, bf16_compress=True).compress(docs)
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    assert (half - full).norm() < 0.03 * full.norm()


def test_batched_generation_equals_per_user(backbone):
    model = _model(backbone)
    kwargs = dict(eos_token_id=2, pad_token_id=1, max_new_tokens=8)
    batched = model.generate(_collate(backbone, model, with_answers=False), **kwargs)
    for i, ex in enumerate(EXAMPLES):
        single = model.generate(_collate(backbone, model, [ex], with_answers=False), **kwargs)[0]
        assert batched[i, : len(single)].tolist() == single.tolist()


@pytest.mark.parametrize("static", [False, True], ids=["dynamic-cache", "static-cache"])
def test_rows_joining_and_leaving_decode_as_each_row_alone(backbone, static):
    """Continuous batching: rows prefilled apart, joined at different steps (the later one shorter or longer than
    the running rows) and left behind as others end, decode exactly the greedy tokens each decodes alone; a dynamic
    cache keeps no column that no row reads, a static one keeps its length (a multiple of the bucket)."""
    model = _model(backbone)
    steps = 6
    alone = [model.generate(_collate(backbone, model, [ex], with_answers=False), eos_token_id=-1, pad_token_id=1,
                            max_new_tokens=steps)[0].tolist() for ex in EXAMPLES]  # fmt: skip
    model.static_decoding(static, compile=False)

    def prefill(ex: Example):
        batch = _collate(backbone, model, [ex], with_answers=False)
        return model.prefill(*model.prefix(batch), batch.input_ids, batch.input_mask, steps)

    rows, tokens, owners, finished = prefill(EXAMPLES[0]), [[]], [0], []
    for step in range(2 * steps):
        if step in (2, 3):  # one row joins at step 2, another at step 3
            rows, owners, tokens = rows.join(prefill(EXAMPLES[step - 1])), owners + [step - 1], tokens + [[]]
        nxt = rows.logits.argmax(-1)
        for row, token in zip(tokens, nxt.tolist(), strict=True):
            row.append(token)
        finished += [o for o, row in zip(owners, tokens, strict=True) if len(row) == steps]
        assert [row for o, row in zip(owners, tokens, strict=True) if o in finished] == [
            alone[o] for o in owners if o in finished
        ]
        keep = [i for i, row in enumerate(tokens) if len(row) < steps]
        if not keep:
            break
        rows, owners, tokens = rows.select(keep), [owners[i] for i in keep], [tokens[i] for i in keep]
        rows = model.advance(rows, nxt[keep])
        assert rows.static == static
        if static:
            assert rows.mask.shape[1] % STATIC_CACHE_BUCKET == 0 and not bool(rows.mask[:, rows.end :].any())
        else:
            assert bool(rows.mask[:, 0].any())  # no leading column that every row masks
    assert finished == [0, 1, 2]


def test_a_static_cache_drops_the_columns_no_row_reads_in_whole_buckets(backbone):
    """A short row left alone after a long one keeps its tokens, in a static cache without the long row's leading
    columns (dropped in whole buckets: the length stays a multiple of the bucket)."""
    model = _model(backbone)
    long = Example("dave", ["jazz music"], " ".join(["running"] * 70) + " ?", "run")
    short = _collate(backbone, model, EXAMPLES[1:2], with_answers=False)
    alone = model.generate(short, eos_token_id=-1, pad_token_id=1, max_new_tokens=4)[0].tolist()
    model.static_decoding(compile=False)

    def prefill(batch):
        return model.prefill(*model.prefix(batch), batch.input_ids, batch.input_mask, 4)

    both = prefill(_collate(backbone, model, [long], with_answers=False)).join(prefill(short))
    assert both.end > STATIC_CACHE_BUCKET and both.mask.shape[1] % STATIC_CACHE_BUCKET == 0
    rows = both.select([1])
    dropped = both.mask.shape[1] - rows.mask.shape[1]
    assert dropped > 0 and dropped % STATIC_CACHE_BUCKET == 0 and rows.end == both.end - dropped
    assert int(rows.mask.any(0).long().argmax()) < STATIC_CACHE_BUCKET  # less than a bucket that no row reads is left
    tokens = []
    for _ in range(4):
        tokens.append(int(rows.logits.argmax(-1)))
        if len(tokens) < 4:
            rows = model.advance(rows, torch.tensor(tokens[-1:]))
    assert tokens == alone


def test_decoding_in_bfloat16_is_a_bfloat16_copy_of_the_backbone_decoding(backbone):
    """``decode_in(bfloat16)``: the greedy tokens of Hugging Face's own loop on a bfloat16 copy of the backbone reading
    the same soft prompt and request (with a static cache or not), while scoring and the weights stay float32;
    ``decode_in(None)`` decodes with the model's own weights again."""
    model = _model(backbone)
    batch = _collate(backbone, model, with_answers=False)
    kwargs = dict(eos_token_id=-1, pad_token_id=1, max_new_tokens=8)
    full, ppl = model.generate(batch, **kwargs), model.perplexity(_collate(backbone, model))
    embeds, mask = model.left_aligned(*model.prefix(batch), batch.input_ids, batch.input_mask)
    half = tiny_backbone().model.to(torch.bfloat16)  # the fixture's weights, without the LoRA the model injected
    with torch.no_grad():
        expected = half.generate(
            inputs_embeds=embeds.to(torch.bfloat16), attention_mask=mask, do_sample=False, max_new_tokens=8,
            min_new_tokens=8, pad_token_id=1,
        )  # fmt: skip
    prompt = (*model.prefix(batch), batch.input_ids, batch.input_mask)
    logits = model.prefill(*prompt).logits
    model.decode_in(torch.bfloat16)
    assert model.decoder_lm.get_input_embeddings().weight.dtype == torch.bfloat16
    assert not torch.equal(model.prefill(*prompt).logits, logits)  # bf16 rounding: it is the copy that decodes
    assert torch.equal(model.generate(batch, **kwargs), expected)
    model.static_decoding(compile=False)
    assert torch.equal(model.generate(batch, **kwargs), expected)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert torch.equal(model.perplexity(_collate(backbone, model)), ppl)
    model.decode_in(None)
    assert model.decoder_lm is model.generator_lm and torch.equal(model.generate(batch, **kwargs), full)


def test_a_static_cache_holds_every_answer_length(backbone):
    """Around and across bucket boundaries, the static cache has room for every token of the answer (the last one
    is never fed back) and decodes the dynamic cache's tokens."""
    model = _model(backbone)
    batch = _collate(backbone, model, with_answers=False)
    kwargs = dict(eos_token_id=-1, pad_token_id=1)
    dynamic = model.generate(batch, max_new_tokens=2 * STATIC_CACHE_BUCKET + 1, **kwargs)
    model.static_decoding(compile=False)
    for n in range(1, 2 * STATIC_CACHE_BUCKET + 2):
        assert torch.equal(model.generate(batch, max_new_tokens=n, **kwargs), dynamic[:, :n]), n


@pytest.mark.parametrize("compile", [False, True], ids=["static-cache", "compiled"])
def test_static_decoding_gives_the_dynamic_cache_greedy_tokens(backbone, compile):
    """The static KV cache (and the compiled step over it) decodes a padded batch to the tokens of today's dynamic
    cache in float32, rows of different lengths included; turned off, decoding is the dynamic path again (rows already
    in a static cache decode on)."""
    model = _model(backbone)
    batch = _collate(backbone, model, with_answers=False)
    kwargs = dict(eos_token_id=-1, pad_token_id=1, max_new_tokens=12)
    dynamic = model.generate(batch, **kwargs)
    saved = set(model.state_dict())
    model.static_decoding(compile=compile)
    assert set(model.state_dict()) == saved  # the (compiled) step shares the generator's weights: saved once
    rows = model.prefill(*model.prefix(batch), batch.input_ids, batch.input_mask, 12)
    assert rows.static and rows.mask.shape[1] % STATIC_CACHE_BUCKET == 0
    assert rows.end + 11 <= rows.mask.shape[1] < rows.end + 11 + STATIC_CACHE_BUCKET
    assert torch.equal(model.generate(batch, **kwargs), dynamic)
    model.static_decoding(False)
    assert not model.prefill(*model.prefix(batch), batch.input_ids, batch.input_mask).static
    assert torch.equal(model.generate(batch, **kwargs), dynamic)
    # rows prefilled while it was on decode on, uncompiled, in their static cache
    rows = model.advance(rows, dynamic[:, 0])
    assert rows.static and torch.equal(rows.logits.argmax(-1), dynamic[:, 1])


def test_sampling_is_seeded_and_differs_from_greedy(backbone):
    model = _model(backbone)
    batch = _collate(backbone, model, with_answers=False)
    kwargs = dict(eos_token_id=-1, pad_token_id=1, max_new_tokens=12, temperature=1.5, top_p=0.95)
    a = model.generate(batch, generator=torch.Generator().manual_seed(0), **kwargs)
    b = model.generate(batch, generator=torch.Generator().manual_seed(0), **kwargs)
    greedy = model.generate(batch, eos_token_id=-1, pad_token_id=1, max_new_tokens=12)
    assert torch.equal(a, b) and not torch.equal(a, greedy)


@pytest.mark.parametrize(
    ("bridge", "bridge_map"),
    [
        ("linear", {"bridge.proj.weight"}),
        ("mlp", {"bridge.mlp.0.weight", "bridge.mlp.0.bias", "bridge.mlp.2.weight", "bridge.mlp.2.bias"}),
    ],
)
def test_training_changes_only_lora_compression_embeddings_and_bridge(backbone, bridge, bridge_map):
    model = ComMer(backbone, ComMerConfig(num_embeddings=K, lora_r=4, bridge=bridge))
    frozen_before = {k: v.clone() for k, v in backbone.model.state_dict().items() if "lora" not in k}
    trainable_before = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    expected = {"compression_embeddings", "bridge.task_prompt", *bridge_map}
    assert expected < set(trainable_before)
    assert all("lora" in k or k in expected for k in trainable_before)
    optimizer = torch.optim.AdamW(model.trainable_state().values(), lr=1e-2)
    batch = _collate(backbone, model)
    model.train()
    losses = []
    for _ in range(5):
        loss = model.loss(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    for k, v in backbone.model.state_dict().items():
        if "lora" not in k:
            assert torch.equal(v, frozen_before[k]), f"frozen weight {k} changed"
    for k, v in model.trainable_state().items():
        assert not torch.equal(v, trainable_before[k]), f"trainable {k} did not change"


def test_prompt_tuning_trains_only_its_soft_prompt(backbone):
    model = PromptTuning(backbone, ComMerConfig(method="prompt_tuning", num_embeddings=K))
    assert list(model.trainable_state()) == ["soft_prompt"]
    batch = _collate(backbone, model)
    assert batch.doc_ids.shape[0] == 0  # the documents are in the prompt
    assert model.prefix(batch)[0].shape == (3, K, 64)
    model.loss(batch).backward()
    assert model.soft_prompt.grad is not None and model.soft_prompt.grad.abs().sum() > 0
    assert all(p.grad is None for p in backbone.model.parameters())


def _kept_bytes_and_grads(model, batch) -> tuple[int, dict[str, torch.Tensor]]:
    """One training loss's backward: the bytes autograd kept between forward and backward, and every gradient."""
    kept = []

    def pack(tensor):
        kept.append(tensor.numel() * tensor.element_size())
        return tensor

    model.train()
    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = model.loss(batch)
    loss.backward()
    return sum(kept), {name: p.grad.clone() for name, p in model.trainable_state().items()}


@pytest.mark.parametrize("method", ["commer", "prompt_tuning"])
def test_activation_checkpointing_keeps_less_for_the_same_gradients(method):
    """``train.activation_checkpointing``: far fewer saved activations (compressor and generator), the same gradients,
    and the same greedy tokens (no gradients, no checkpointing)."""
    config = RunConfig(model=ComMerConfig(method=method, num_embeddings=K, lora_r=4, lora_dropout=0.0))
    model, backbone = build(config, backbone=tiny_backbone())
    perturb_zero_init(model)
    batch = _collate(backbone, model)
    model.checkpoint_activations(False)  # off when never on: nothing to undo
    plain_bytes, plain_grads = _kept_bytes_and_grads(model, batch)
    tokens = model.eval().generate(batch, eos_token_id=-1, pad_token_id=1, max_new_tokens=4)
    model.checkpoint_activations()
    kept_bytes, grads = _kept_bytes_and_grads(model, batch)
    assert kept_bytes < plain_bytes / 3
    assert grads.keys() == plain_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, plain_grads[name], msg=name)
    assert torch.equal(model.eval().generate(batch, eos_token_id=-1, pad_token_id=1, max_new_tokens=4), tokens)
    model.checkpoint_activations(False)
    assert _kept_bytes_and_grads(model, batch)[0] == plain_bytes
    # a training run's config turns it on
    config.train.activation_checkpointing = True
    model, backbone = build(config, backbone=tiny_backbone())
    Trainer(config, model, backbone.tokenizer, EXAMPLES, [])
    assert _kept_bytes_and_grads(model, batch)[0] == kept_bytes


def test_compression_cache_compresses_each_document_once(backbone):
    """``with_compression_cache``: the same compressions and perplexity as the model; a document seen before is not
    compressed again (after a LoRA change, the view still returns what it cached, the model does not)."""
    model = _model(backbone)
    view = model.with_compression_cache()
    batch = _collate(backbone, model)
    with torch.no_grad():
        expected = model.compress(batch.doc_ids, batch.doc_mask)  # (3, K, D): alice's two documents, bob's one
        torch.testing.assert_close(view.perplexity(batch), model.perplexity(batch))
        torch.testing.assert_close(view.compress(batch.doc_ids, batch.doc_mask), expected)
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.add_(1.0)
        order = torch.tensor([2, 0])
        assert not torch.allclose(model.compress(batch.doc_ids[order], batch.doc_mask[order]), expected[order])
        torch.testing.assert_close(view.compress(batch.doc_ids[order], batch.doc_mask[order]), expected[order])


def test_concat_merge_reads_k_per_document(backbone):
    model = _model(backbone, merge="concat")
    prefix, mask = model.prefix(_collate(backbone, model))
    assert prefix.shape == (3, 2 * K, 64)
    assert mask.sum(1).tolist() == [2 * K, K, K]  # carol: the task prompt
    none = _model(tiny_backbone(), merge="concat", bridge="none")
    assert none.prefix(_collate(backbone, none))[1].sum(1).tolist() == [2 * K, K, 0]


@pytest.mark.parametrize("bad", [0, -3])
def test_k_below_one_is_refused(bad):
    with pytest.raises(ValueError, match="num_embeddings"):
        ComMerConfig(num_embeddings=bad)


def test_bad_documents_are_named(backbone):
    model = _model(backbone)
    collator = Collator(backbone.tokenizer, model.config, backbone.max_length)
    with pytest.raises(ValueError, match="document 1 of user 'dave' is empty"):
        collator([Example("dave", ["cat", "  "], "what ?", "dog")])
    long_doc = " ".join(["cat"] * 200)
    with pytest.raises(ContextTooLongError, match="document 0 of user 'erin' has 200 tokens"):
        collator([Example("erin", [long_doc], "what ?", "dog")])
    with pytest.raises(ContextTooLongError, match="context of 128"):
        model.compress(torch.ones(1, 126, dtype=torch.long), torch.ones(1, 126, dtype=torch.bool))


def test_a_backbone_serves_one_model():
    backbone = tiny_backbone()
    ComMer(backbone, ComMerConfig(num_embeddings=K, lora_r=4))
    with pytest.raises(ValueError, match="already carries a LoRA"):
        ComMer(backbone, ComMerConfig(num_embeddings=K, lora_r=4))


def test_embedding_norm_option_rescales_compressions(backbone):
    model = _model(backbone, compression_norm="embedding")
    batch = _collate(backbone, model)
    norms = model.compress(batch.doc_ids, batch.doc_mask).norm(dim=-1)
    expected = backbone.model.get_input_embeddings().weight.norm(dim=-1).mean()
    torch.testing.assert_close(norms, expected.expand_as(norms), atol=1e-4, rtol=0)
    with pytest.raises(ValueError, match="compression_norm must be"):
        ComMerConfig(compression_norm="unit")


def test_a_stored_profile_answers_as_the_batch_does(backbone):
    """The store's path (compress each document, keep the running sum, bridge the mean at answer time) and the batch
    path (compress, merge, bridge) give the same soft prompt and the same greedy answer."""
    model = _model(backbone)
    personalizer = Personalizer(model, backbone.tokenizer)
    profiles = [personalizer.profile(ex.documents) for ex in EXAMPLES]
    merged, mask = stack_profiles(profiles, K, 64, torch.float32, "cpu")
    stored = model.soft_prompt(merged, mask)[0]
    batched = model.prefix(_collate(backbone, model))[0]
    torch.testing.assert_close(stored, batched, atol=1e-5, rtol=0)
    answers = personalizer.generate(profiles, [ex.instruction for ex in EXAMPLES], max_new_tokens=6)
    tokens = model.generate(
        _collate(backbone, model, with_answers=False), eos_token_id=2, pad_token_id=1, max_new_tokens=6
    )
    assert answers == [backbone.tokenizer.decode(row, skip_special_tokens=True).strip() for row in tokens.tolist()]


def test_with_merge_is_a_view_that_leaves_the_trained_model_as_it_was(backbone):
    model = _model(backbone)
    view = model.with_merge("concat")
    assert view.config.merge == "concat" and model.config.merge == "mean"
    assert view.compression_embeddings is model.compression_embeddings and view.bridge is model.bridge
    batch = _collate(backbone, model)
    prefix, mask = view.prefix(batch)
    assert prefix.shape[1] == model.config.num_embeddings * int(torch.bincount(batch.doc_owner).max())
