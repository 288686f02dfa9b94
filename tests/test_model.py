"""The ML correctness checks of the core, on the tiny random Llama."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_backbone
from transformers import LlamaForCausalLM

from commer.batch import Batch
from commer.config import ComMerConfig
from commer.data.collate import Collator
from commer.data.example import Example
from commer.model import ComMer, DocumentTooLongError, PromptTuning

K = 4

EXAMPLES = [
    Example("alice", ["i love running in the morning", "marathon tomorrow !"], "what is my plan today ?", "run"),
    Example("bob", ["jazz music and coffee"], "what does the user like ?", "jazz and coffee"),
    Example("carol", [], "what is the news ?", "rain in the city"),
]


def _randomize_lora(model: ComMer, seed: int = 1) -> None:
    """peft initialises LoRA's B at zero, which would make 'LoRA on' and 'LoRA off' trivially equal."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def _model(backbone, **overrides) -> ComMer:
    model = ComMer(backbone, ComMerConfig(num_embeddings=K, lora_r=4, lora_dropout=0.0, **overrides))
    _randomize_lora(model)
    return model.eval()


def _collate(backbone, model, examples=EXAMPLES, with_answers=True) -> Batch:
    return Collator(backbone.tokenizer, model.config, backbone.max_length)(examples, with_answers=with_answers)


def test_shapes(backbone):
    model = _model(backbone)
    batch = _collate(backbone, model)
    assert model.compress(batch.doc_ids, batch.doc_mask).shape == (3, K, 64)  # 3 documents in all
    prefix, mask = model.prefix(batch)
    assert prefix.shape == (3, K, 64) and mask.tolist() == [[True] * K, [True] * K, [False] * K]
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
        with model.generator():
            ours = model.lm(inputs_embeds=embeds).logits
        reference = plain(inputs_embeds=embeds).logits
        with_lora = model.lm(inputs_embeds=embeds).logits
    torch.testing.assert_close(ours, reference, atol=1e-6, rtol=0)
    assert (with_lora - reference).abs().max() > 1e-3


def test_zero_documents_is_plain_generation(backbone):
    """A user without documents gets exactly what the frozen model says to the bare prompt, even when batched
    with users that have soft prompts."""
    model = _model(backbone)
    batch = _collate(backbone, model)
    nll, n = model.nll(batch)
    carol = batch.input_ids[2][batch.input_mask[2]][None]
    labels = batch.labels[2][batch.input_mask[2]][None]
    with torch.no_grad(), model.generator():
        reference = model.lm(input_ids=carol, labels=labels).loss
    torch.testing.assert_close(nll[2] / n[2], reference, atol=1e-5, rtol=0)


def test_batched_generation_equals_per_user(backbone):
    model = _model(backbone)
    kwargs = dict(eos_token_id=2, pad_token_id=1, max_new_tokens=8)
    batched = model.generate(_collate(backbone, model, with_answers=False), **kwargs)
    for i, ex in enumerate(EXAMPLES):
        single = model.generate(_collate(backbone, model, [ex], with_answers=False), **kwargs)[0]
        assert batched[i, : len(single)].tolist() == single.tolist()


def test_sampling_is_seeded_and_differs_from_greedy(backbone):
    model = _model(backbone)
    batch = _collate(backbone, model, with_answers=False)
    kwargs = dict(eos_token_id=-1, pad_token_id=1, max_new_tokens=12, temperature=1.5, top_p=0.95)
    a = model.generate(batch, generator=torch.Generator().manual_seed(0), **kwargs)
    b = model.generate(batch, generator=torch.Generator().manual_seed(0), **kwargs)
    greedy = model.generate(batch, eos_token_id=-1, pad_token_id=1, max_new_tokens=12)
    assert torch.equal(a, b) and not torch.equal(a, greedy)


def test_training_changes_only_lora_and_compression_embeddings(backbone):
    model = ComMer(backbone, ComMerConfig(num_embeddings=K, lora_r=4))
    frozen_before = {k: v.clone() for k, v in backbone.model.state_dict().items() if "lora" not in k}
    trainable_before = {k: v.detach().clone() for k, v in model.trainable_state().items()}
    assert trainable_before and all("lora" in k or k == "compression_embeddings" for k in trainable_before)
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


def test_concat_merge_reads_k_per_document(backbone):
    model = _model(backbone, merge="concat")
    prefix, mask = model.prefix(_collate(backbone, model))
    assert prefix.shape == (3, 2 * K, 64)
    assert mask.sum(1).tolist() == [2 * K, K, 0]


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
    with pytest.raises(DocumentTooLongError, match="document 0 of user 'erin' has 200 tokens"):
        collator([Example("erin", [long_doc], "what ?", "dog")])
    with pytest.raises(DocumentTooLongError, match="context of 128"):
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
