import gzip
import json
import re
from itertools import islice

import pytest

from commer.data.errors import DataError
from commer.data.pretrain import (
    FINEWEB_FILE,
    chunk_text,
    fineweb_page_examples,
    fineweb_pretrain,
    iter_fineweb,
    profile_pretrain_examples,
)
from commer.data.tasks import PROFILE_TASKS, load_splits, load_task
from commer.errors import ConfigError
from commer.text import Example

pytest_plugins = ["data_fixtures"]

QUESTION = re.compile(r"What does document (\d+) contain\?")


def check_autoencoding(example, max_docs=8):
    n = int(QUESTION.fullmatch(example.instruction).group(1))
    assert 1 <= len(example.documents) <= max_docs
    assert 1 <= n <= len(example.documents)
    for i, doc in enumerate(example.documents, start=1):
        assert doc.startswith(f"Document {i}: ")
        assert len(doc.removeprefix(f"Document {i}: ")) <= 150
    assert example.answer == example.documents[n - 1].removeprefix(f"Document {n}: ")


def test_answer_is_document_n(data_dir):
    examples = list(fineweb_pretrain(data_dir, limit=300))
    assert len(examples) == 300
    for example in examples:
        check_autoencoding(example)
    assert {len(e.documents) for e in examples} == set(range(1, 9))
    assert len({e.instruction for e in examples}) == 8


def test_fineweb_is_streamed_and_complete(data_dir):
    stream = fineweb_pretrain(data_dir, limit=None)
    assert not isinstance(stream, list)
    assert next(stream).user_id == "fineweb-0"
    assert sum(1 for _ in iter_fineweb(data_dir / FINEWEB_FILE)) == 6500


def test_seeded(data_dir):
    a = list(fineweb_pretrain(data_dir, seed=5, limit=20))
    assert a == list(fineweb_pretrain(data_dir, seed=5, limit=20))
    assert a != list(fineweb_pretrain(data_dir, seed=6, limit=20))


def test_profile_pretraining_from_examples_and_text_lists():
    tweets = [f"tweet number {k} " + "x" * 200 for k in range(20)]
    from_examples = list(profile_pretrain_examples([Example("u1", tweets), Example("u2", [])], max_docs=4, seed=1))
    assert [e.user_id for e in from_examples] == ["u1"]
    check_autoencoding(from_examples[0], max_docs=4)
    from_lists = list(islice(profile_pretrain_examples([tweets[:3], tweets[3:]], seed=1), 5))
    assert [e.user_id for e in from_lists] == ["profile-0", "profile-1"]
    for example in from_lists:
        check_autoencoding(example)
        assert all(any(t.startswith(d.split(": ", 1)[1]) for t in tweets) for d in example.documents)
    with pytest.raises(ValueError):
        list(profile_pretrain_examples([tweets], min_docs=3, max_docs=2))


def test_malformed_line_is_named(tmp_path):
    path = tmp_path / FINEWEB_FILE
    path.parent.mkdir()
    with gzip.open(path, "wt") as f:
        f.write('{"id": "1", "url": "u", "text": "fine"}\n{"id": 2, oops}\n')
    with pytest.raises(DataError, match=r"fineweb_sample\.jsonl\.gz:2:\d+: malformed JSON"):
        list(fineweb_pretrain(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"missing FineWeb sample: expected the file .*empty/fineweb"):
        list(fineweb_pretrain(tmp_path / "empty"))


def test_chunks_are_consecutive_and_bounded():
    text = "word " * 100 + "x" * 400
    pieces = chunk_text(text, 150)
    assert all(0 < len(p) <= 150 for p in pieces)
    assert " ".join(pieces).replace("x" * 150, "").split() == text.split()[:-1]  # the over-long word is cut
    assert chunk_text("   ") == []


def test_pages_are_pieces_and_a_page_is_one_user(data_dir):
    examples = list(islice(fineweb_page_examples(data_dir, max_docs=4, seed=0), 200))
    for example in examples:
        check_autoencoding(example, max_docs=4)
    first_page = [e for e in examples if e.user_id == "fineweb-page-0"]
    assert len(first_page) > 1  # a page gives many examples, all of one pretraining user


def _write_pages(tmp_path, pages):
    path = tmp_path / FINEWEB_FILE
    path.parent.mkdir()
    with gzip.open(path, "wt") as f:
        f.writelines(json.dumps({"text": page}) + "\n" for page in pages)


def test_continuation_asks_for_the_next_piece_of_the_page(tmp_path):
    pages = [" ".join(f"p{page}w{i}" for i in range(200)) for page in range(3)]
    _write_pages(tmp_path, pages)
    pieces = [chunk_text(page) for page in pages]
    examples = list(fineweb_page_examples(tmp_path, max_docs=3, seed=1, continuation=1.0))
    continued = [e for e in examples if e.instruction.startswith("What follows")]
    # every group but a page's last has a next piece, and continuation=1 always asks for it
    assert len(continued) == len(examples) - len(pages)
    for example in continued:
        page = pieces[int(example.user_id.removeprefix("fineweb-page-"))]
        texts = [doc.split(": ", 1)[1] for doc in example.documents]
        start = page.index(texts[0])
        assert page[start : start + len(texts)] == texts  # consecutive pieces of the page
        assert example.instruction == f"What follows document {len(texts)}?"
        assert example.answer == page[start + len(texts)] and example.answer not in texts
    # continuation 0 is the auto-encoding stream unchanged (the shipped compressor's data)
    plain = list(fineweb_page_examples(tmp_path, max_docs=3, seed=1))
    assert plain == list(fineweb_page_examples(tmp_path, max_docs=3, seed=1, continuation=0.0))
    for example in plain:
        check_autoencoding(example, max_docs=3)
    with pytest.raises(ConfigError, match="continuation must be in"):
        list(fineweb_page_examples(tmp_path, continuation=1.5))


def test_the_pretraining_mix_never_reads_held_out_users(data_dir):
    """pretrain-mix reads LaMP-7 and news profiles of training users only: no document of a validation or test user
    of those tasks (split as their fine-tuning splits them) reaches pretraining."""
    pretrain = load_task("pretrain-mix", data_dir, 4, seed=0).examples
    mixed_ids = {e.user_id for e in pretrain}
    for task in PROFILE_TASKS:
        splits, _ = load_splits(task, data_dir, 2, seed=0)
        held_out = {e.user_id for name in ("validation", "test") for e in splits[name]}
        assert held_out and not {f"{task}-{uid}" for uid in held_out} & mixed_ids
        train_ids = {f"{task}-{e.user_id}" for e in splits["train"]}
        assert train_ids & mixed_ids
    assert sum(e.user_id.startswith("fineweb-page-") for e in pretrain) > 50_000
