"""The synthetic recall probe: one fact per user, stated in exactly one document, asked for by the question."""

from __future__ import annotations

import pytest

from commer.data.recall import FACTS, FILLER, recall_examples
from commer.data.tasks import load_splits


def test_each_user_has_one_document_with_the_asked_fact():
    examples = recall_examples(200, n_docs=4, seed=3)
    questions = {question: (statement, values) for statement, question, values in FACTS.values()}
    for ex in examples:
        statement, values = questions[ex.instruction]
        assert ex.answer in values and len(ex.documents) == 4
        assert [d for d in ex.documents if d not in FILLER] == [statement.format(ex.answer)]
    assert len({ex.instruction for ex in examples}) == len(FACTS)  # every attribute is asked
    assert len({ex.answer for ex in examples}) > 30  # and many values: the answer cannot be guessed from the question
    assert len({next(i for i, d in enumerate(ex.documents) if d not in FILLER) for ex in examples}) == 4  # shuffled


def test_same_seed_same_examples():
    assert recall_examples(50, 3, seed=1) == recall_examples(50, 3, seed=1)
    assert recall_examples(50, 3, seed=1) != recall_examples(50, 3, seed=2)


@pytest.mark.parametrize("n_docs", [0, len(FILLER) + 2])
def test_document_counts_out_of_range_are_named(n_docs):
    with pytest.raises(ValueError, match="n_docs"):
        recall_examples(5, n_docs)


def test_recall_is_a_task_with_user_disjoint_splits():
    splits, info = load_splits("recall", n_docs=2, seed=0)
    users = {name: {ex.user_id for ex in examples} for name, examples in splits.items()}
    assert sum(map(len, users.values())) == 5000
    assert not (users["train"] & users["test"]) and not (users["validation"] & users["test"])
