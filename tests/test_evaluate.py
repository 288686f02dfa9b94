"""Metrics: perplexity equals the one computed by hand from the plain LM, ROUGE is LaMP's, cost counts are exact."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import tiny_backbone

from commer.config import ComMerConfig
from commer.evaluate import (
    NONE,
    OTHER,
    OWN,
    TEXT,
    compare_documents,
    contains_answer,
    copy_input,
    document_variants,
    evaluate_examples,
    perplexity,
    prompt_cost,
    rouge,
)
from commer.experiments import concat_documents
from commer.model import build_model
from commer.text import Collator, Example

EXAMPLES = [
    Example("u0", [], "what does my cat like ?", "the cat likes jazz ."),
    Example("u1", [], "write a tweet", "i love running in the rain today !"),
    Example("u2", [], "a question", "tea"),
]


def _by_hand(lm, prefix: torch.Tensor | None, collator: Collator, examples: list[Example]) -> float:
    """exp(total NLL / total answer tokens) from log-softmax of the LM's logits, one unpadded example at a time."""
    total, count = 0.0, 0
    for ex in examples:
        prompt, answer = collator.encode_prompt(ex.instruction), collator.encode_answer(ex.answer)
        ids = torch.tensor([prompt + answer])
        embeds = lm.get_input_embeddings()(ids)
        if prefix is not None:
            embeds = torch.cat([prefix[None], embeds], dim=1)
        logprobs = torch.log_softmax(lm(inputs_embeds=embeds).logits[0].double(), dim=-1)
        p = 0 if prefix is None else prefix.shape[0]
        for t, token in enumerate(answer):
            position = p + len(prompt) + t  # the token at this position is predicted from the one before
            total -= float(logprobs[position - 1, token])
            count += 1
    return math.exp(total / count)


def test_perplexity_of_commer_without_documents_is_the_plain_lm():
    backbone = tiny_backbone()
    model = build_model(backbone, ComMerConfig(num_embeddings=2, lora_r=4, bridge="none"))
    collator = Collator(backbone.tokenizer, model.config, model.max_length)
    ours = perplexity(model, collator, EXAMPLES, batch_size=2, bf16=False)  # padded batches of unequal answers
    plain = tiny_backbone().model  # same seed: the same weights, never wrapped by peft
    assert ours == pytest.approx(_by_hand(plain, None, collator, EXAMPLES), rel=1e-5)


def test_perplexity_of_prompt_tuning_reads_the_soft_prompt():
    backbone = tiny_backbone()
    model = build_model(backbone, ComMerConfig(method="prompt_tuning", num_embeddings=3))
    collator = Collator(backbone.tokenizer, model.config, model.max_length)
    ours = perplexity(model, collator, EXAMPLES, batch_size=3, bf16=False)
    by_hand = _by_hand(backbone.model, model.soft_prompt.detach(), collator, EXAMPLES)
    assert ours == pytest.approx(by_hand, rel=1e-5)
    assert ours != pytest.approx(_by_hand(backbone.model, None, collator, EXAMPLES), rel=1e-3)


def test_rouge_is_lamps_rouge_score_with_stemming():
    predictions = ["The cat sat on the mat.", "running dogs"]
    references = ["the cat was on the mat", "dog runs"]
    scores = rouge(predictions, references)
    # by hand: LCS "the cat on the mat" = 5 of 6 words each side; stemmed "run dog" vs "dog run": LCS 1 of 2, 2 unigrams
    assert scores["rougeL"] == pytest.approx((5 / 6 + 1 / 2) / 2)
    assert scores["rouge1"] == pytest.approx((5 / 6 + 1.0) / 2)
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    direct = [scorer.score(r, p)["rougeL"].fmeasure for p, r in zip(predictions, references, strict=True)]
    assert scores["rougeL"] == pytest.approx(sum(direct) / 2)
    with pytest.raises(ValueError, match="2 predictions for 1"):
        rouge(predictions, references[:1])


def test_copy_input_returns_the_text_after_the_colon():
    assert copy_input("Paraphrase the following tweet without any explanation: I love: jazz ") == "I love: jazz"
    assert copy_input("no colon here") == "no colon here"


USER = Example("u", ["my cat", "i love jazz"], "write a tweet", "jazz")
# Word-level tokenizer: one token per word or punctuation mark ("Question" and "Answer" are <unk>).
PROMPT = 7  # Question : write a tweet Answer :
PT_PROMPT = 18  # Question : Document 1 : my cat Document 2 : i love jazz write a tweet Answer :


@pytest.mark.parametrize(
    ("config", "example", "expected"),
    [
        (ComMerConfig(num_embeddings=2), USER, (2, 2 + PROMPT, (2 + 2) + (3 + 2))),
        (ComMerConfig(num_embeddings=2, merge="concat"), USER, (4, 4 + PROMPT, (2 + 2) + (3 + 2))),
        (ComMerConfig(num_embeddings=2), concat_documents(USER), (2, 2 + PROMPT, 5 + 2)),
        (ComMerConfig(num_embeddings=2, bridge="none"), Example("u", [], "write a tweet", "jazz"), (0, PROMPT, 0)),
        (ComMerConfig(num_embeddings=2), Example("u", [], "write a tweet", "jazz"), (2, 2 + PROMPT, 0)),
        (ComMerConfig(method="prompt_tuning", num_embeddings=2), USER, (2, 2 + PT_PROMPT, 0)),
        (ComMerConfig(method="prompt_tuning", num_embeddings=2), Example("u", [], "write a tweet"), (2, 2 + PROMPT, 0)),
    ],
    ids=[
        "commer-mean",
        "commer-concat",
        "concat-then-compress",
        "no-documents-paper",
        "no-documents-task-prompt",
        "prompt-tuning",
        "pt-no-documents",
    ],
)
def test_prompt_cost_counts_every_token_the_generator_reads(config, example, expected):
    collator = Collator(tiny_backbone().tokenizer, config, 128)
    cost = prompt_cost(collator, [example])
    assert (cost.soft_prompt, cost.generator, cost.compressor) == expected


def test_prompt_cost_is_the_mean_over_examples():
    collator = Collator(tiny_backbone().tokenizer, ComMerConfig(num_embeddings=2, bridge="none"), 128)
    cost = prompt_cost(collator, [USER, Example("v", [], "write a tweet", "x")], batch_size=1)
    assert (cost.soft_prompt, cost.generator, cost.compressor) == (1.0, (9 + 7) / 2, 9 / 2)


def test_evaluate_examples_scores_generations_on_a_subset_next_to_the_copy_baseline():
    backbone = tiny_backbone()
    model = build_model(backbone, ComMerConfig(num_embeddings=2, lora_r=4))
    collator = Collator(backbone.tokenizer, model.config, model.max_length)
    examples = [Example("u", ["my cat"], "paraphrase : i love jazz", "i love jazz")] * 3
    result = evaluate_examples(model, collator, examples, rouge_examples=2, max_new_tokens=3, bf16=False)
    assert result.n_examples == 3 and result.n_rouge == 2 and len(result.samples) == 2
    assert result.copy_rougeL == 1.0 and 0.0 <= result.rougeL <= 1.0 and result.perplexity > 1.0
    assert result.cost.soft_prompt == 2
    assert math.isnan(evaluate_examples(model, collator, examples, rouge_examples=0, bf16=False).rougeL)


def test_document_variants_keep_requests_and_move_documents():
    users = [Example(f"u{i}", [f"doc of {i}"], f"q{i}", f"a{i}") for i in range(3)]
    variants = document_variants(users, with_text=True)
    assert [ex.documents for ex in variants[OTHER]] == [["doc of 1"], ["doc of 2"], ["doc of 0"]]
    assert all(not ex.documents for ex in variants[NONE] + variants[TEXT])
    assert variants[TEXT][0].instruction == "Document 1: doc of 0\n\nq0"
    for variant in variants.values():
        assert [(ex.user_id, ex.answer) for ex in variant] == [(ex.user_id, ex.answer) for ex in users]


def test_compare_documents_scores_every_variant_consistently():
    """Perplexity per variant equals ``perplexity`` on that variant; token accuracy is the share of answer tokens the
    teacher-forced argmax gets right (checked by hand); greedy answers are scored against the gold."""
    backbone = tiny_backbone()
    model = build_model(backbone, ComMerConfig(num_embeddings=2, lora_r=4)).eval()
    collator = Collator(backbone.tokenizer, model.config, 128)
    users = [
        Example(f"u{i}", ["i love jazz", "my cat"][: i % 2 + 1], "write a tweet", "tea and jazz") for i in range(3)
    ]
    result = compare_documents(model, collator, users, generate_examples=2, score_answers=True, bf16=False)
    variants = document_variants(users)
    assert set(result.perplexity) == set(variants) and result.n_generated == 2
    for name, variant in variants.items():
        assert result.perplexity[name] == pytest.approx(perplexity(model, collator, variant, bf16=False), rel=1e-6)
    batch = collator(users)
    with torch.no_grad():
        logits, targets, _ = model.answer_logits(batch)
    assert result.token_accuracy[OWN] == pytest.approx(float((logits.argmax(-1) == targets).float().mean()))
    assert set(result.rouge) == {*variants, "copy input"} and set(result.answer_accuracy) == set(variants)
    assert contains_answer("I think Jazz.", "jazz") and not contains_answer("rock", "jazz")
    assert OWN in result.table()


def test_another_users_documents_never_come_from_the_same_user():
    authors = [Example("a", ["a1"], "q", "x"), Example("a", ["a2"], "q", "y"), Example("b", ["b1"], "q", "z")]
    assert [ex.documents for ex in document_variants(authors)[OTHER]] == [["b1"], ["b1"], ["a1"]]
    with pytest.raises(ValueError, match="at least two users"):
        document_variants(authors[:2])
