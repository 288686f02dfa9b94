import json

import pytest

from commer.config import DataConfig
from commer.data.errors import DataError
from commer.data.perltqa import MEMORY_FILE, QA_FILE, iter_qa, load_perltqa, persona_memories, referenced_ids
from commer.data.splits import split_users
from commer.data.tasks import keep_retrieved, load_splits
from commer.errors import ConfigError
from commer.text import Example

pytest_plugins = ["data_fixtures"]


@pytest.fixture(scope="module")
def raw(data_dir):
    memories = json.loads((data_dir / MEMORY_FILE).read_text())
    qa = list(iter_qa(json.loads((data_dir / QA_FILE).read_text()), data_dir / QA_FILE))
    return {p: persona_memories(p, r) for p, r in memories.items()}, qa


@pytest.fixture(scope="module")
def perltqa(data_dir):
    return load_perltqa(data_dir, n_docs=4)


def resolved_pairs(raw):
    memories, qa = raw
    for persona, pair in qa:
        refs = referenced_ids(pair["Reference Memory"])
        if refs and all(r in memories[persona] for r in refs):
            yield persona, pair, [memories[persona][r] for r in refs]


def test_counts_match_the_files(perltqa, raw):
    assert len(raw[1]) == 1651
    assert len(perltqa.examples) == 1644
    assert perltqa.skipped == {"unresolved_reference": 7}
    assert len(perltqa.profile_sizes) == 7
    assert perltqa.profile_sizes["Chen Zhi"] == 25


def test_every_example_holds_its_referenced_memory(perltqa, raw):
    pairs = list(resolved_pairs(raw))
    assert len(pairs) == len(perltqa.examples)
    for example, (persona, pair, referenced) in zip(perltqa.examples, pairs, strict=True):
        assert example.user_id == persona
        assert (example.instruction, example.answer) == (pair["Question"], pair["Answer"])
        assert len(example.documents) == 4
        assert len(set(example.documents)) == 4
        assert all(doc in example.documents for doc in referenced)
        assert set(example.documents) <= set(raw[0][persona].values())


def test_reference_is_not_always_first(perltqa, raw):
    positions = {
        ex.documents.index(refs[0]) for ex, (_, _, refs) in zip(perltqa.examples, resolved_pairs(raw), strict=True)
    }
    assert positions == {0, 1, 2, 3}


def test_subsets_are_seeded(data_dir, perltqa):
    assert load_perltqa(data_dir, n_docs=4).examples == perltqa.examples
    assert load_perltqa(data_dir, n_docs=4, seed=1).examples != perltqa.examples


def test_sizes_one_and_more_than_a_persona_has(data_dir, raw):
    one = load_perltqa(data_dir, n_docs=1)
    for example, (_, _, refs) in zip(one.examples, resolved_pairs(raw), strict=True):
        assert example.documents == refs
    everything = load_perltqa(data_dir, n_docs=1000)
    chen = [e for e in everything.examples if e.user_id == "Chen Zhi"]
    assert chen and all(len(e.documents) == 25 for e in chen)
    with pytest.raises(ValueError, match="at least 1"):
        load_perltqa(data_dir, n_docs=0)


def test_retrieval_keeps_the_bm25_best_documents_in_profile_order():
    documents = ["the cat sat on the mat", "stock markets fell sharply", "my favourite colour is blue"]
    example = Example("u", documents, "What is your favourite colour?", "blue")
    [one] = keep_retrieved([example], 1)
    assert one.documents == ["my favourite colour is blue"]
    assert (one.user_id, one.instruction, one.answer) == ("u", example.instruction, "blue")
    [two] = keep_retrieved([example], 2)
    assert len(two.documents) == 2 and two.documents[1] == documents[2] and two.documents[0] in documents[:2]
    assert keep_retrieved([example], 5) == [example]
    with pytest.raises(ConfigError, match="retrieve_top_k"):
        DataConfig(retrieve_top_k=0)


def test_a_retrieve_share_cuts_that_share_of_examples_and_leaves_the_others_whole():
    documents = ["the cat sat on the mat", "stock markets fell sharply", "my favourite colour is blue"]
    examples = [Example(f"u{i}", documents, "What is your favourite colour?", "blue") for i in range(400)]
    mixed = keep_retrieved(examples, 1, share=0.25, seed=3)
    cut = [e for e in mixed if e.documents == ["my favourite colour is blue"]]
    assert all(e.documents == documents for e in mixed if e not in cut)
    assert 60 < len(cut) < 140  # a quarter of 400, seeded
    assert keep_retrieved(examples, 1, share=0.25, seed=3) == mixed
    assert keep_retrieved(examples, 1, share=0.0) == examples
    assert keep_retrieved(examples, 1, share=1.0) == keep_retrieved(examples, 1)
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="retrieve_share"):
            DataConfig(retrieve_top_k=1, retrieve_share=bad)


def test_splits_with_retrieval_hold_one_memory_of_the_same_examples(data_dir):
    full, split = load_splits("perltqa", data_dir, 4, max_chars=10**9)
    top, same_split = load_splits("perltqa", data_dir, 4, max_chars=10**9, retrieve_top_k=1)
    assert same_split.users == split.users
    for name in full:
        for f, t in zip(full[name], top[name], strict=True):
            assert len(t.documents) == 1 and t.documents[0] in f.documents and t.instruction == f.instruction


def test_reference_forms():
    assert referenced_ids("Gender") == ["Gender"]
    assert referenced_ids("['4_0_0#3']") == ["4_0_0#3"]
    assert referenced_ids("['4_0") is None
    assert referenced_ids(None) is None


def test_personas_split_disjointly(perltqa):
    info = split_users(e.user_id for e in perltqa.examples)
    parts = info.apply(perltqa.examples)
    personas = {name: {e.user_id for e in part} for name, part in parts.items()}
    assert [len(personas[s]) for s in ("train", "validation", "test")] == [5, 1, 1]
    assert not personas["train"] & (personas["validation"] | personas["test"])


def test_missing_file_is_named(tmp_path):
    with pytest.raises(DataError, match="perltmem_subset.json"):
        load_perltqa(tmp_path)
