"""The text-summary profile (RLPF-style baseline) on the tiny Llama: greedy summaries are deterministic, incremental
(old summary + new document), bounded, and independent of the lists batched beside them."""

from __future__ import annotations

import pytest
from conftest import tiny_backbone

from commer.config import ComMerConfig
from commer.model import ComMer
from commer.summary import summarize, summary_as_text, with_summary
from commer.text import Collator, Example

DOCS = [
    ["i love running in the morning", "my cat likes jazz", "we read a book on the weekend"],
    ["coffee today", "tea tomorrow"],
]


@pytest.fixture(scope="module")
def frozen():
    backbone = tiny_backbone(max_positions=1024)
    model = ComMer(backbone, ComMerConfig(num_embeddings=2, lora_r=2, bridge="none"))
    return model, Collator(backbone.tokenizer, model.config, model.max_length)


def test_summaries_are_deterministic_and_bounded(frozen):
    model, collator = frozen
    first = summarize(model, collator, DOCS, max_new_tokens=6)
    assert first == summarize(model, collator, DOCS, max_new_tokens=6)
    assert all(s and len(collator.tokenizer(s)["input_ids"]) <= 6 for s in first)


def test_a_summary_is_updated_one_document_at_a_time(frozen):
    """Summarizing [d1, d2, d3] equals summarizing [d3] from the summary of [d1, d2]: what a stored summary needs."""
    model, collator = frozen
    whole = summarize(model, collator, DOCS[:1], max_new_tokens=6)
    head = summarize(model, collator, [DOCS[0][:2]], max_new_tokens=6)
    assert summarize(model, collator, [DOCS[0][2:]], initial=head, max_new_tokens=6) == whole


def test_a_summary_does_not_depend_on_the_lists_beside_it(frozen):
    model, collator = frozen
    together = summarize(model, collator, DOCS, max_new_tokens=6)
    assert [summarize(model, collator, [docs], max_new_tokens=6)[0] for docs in DOCS] == together


def test_the_generator_reads_the_summary_before_the_request():
    example = Example("u", ["a document"], "what does the user like ?", "jazz")
    read = with_summary(example, "likes jazz")
    assert read.documents == [] and read.answer == "jazz"
    assert read.instruction == summary_as_text("likes jazz", example.instruction)
    assert read.instruction.index("likes jazz") < read.instruction.index("what does the user like")
    assert summary_as_text("", "q ?") == "q ?"


def test_initial_summaries_must_match_the_lists(frozen):
    model, collator = frozen
    with pytest.raises(ValueError, match="1 initial summaries for 2 lists"):
        summarize(model, collator, DOCS, initial=[""])
