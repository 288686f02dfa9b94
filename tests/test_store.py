"""The profile store: O(1) updates, idempotent adds, exact deletes, fingerprints, rebuild; a real SQLite file."""

from __future__ import annotations

import sqlite3

import pytest
import torch
from conftest import tiny_backbone

from commer.checkpoint import model_fingerprint
from commer.config import ComMerConfig
from commer.errors import ConfigError
from commer.model import ComMer
from commer.serving import Personalizer, add_texts, text_hash
from commer.store import (
    DocumentConflictError,
    ProfileStore,
    StaleProfileError,
    StoreError,
    UnknownDocumentError,
    UnknownUserError,
)

SHAPE = (4, 8)


def _vectors(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, *SHAPE, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def store(tmp_path) -> ProfileStore:
    with ProfileStore(tmp_path / "profiles.db", "model-a", SHAPE) as s:
        yield s


def _add(store: ProfileStore, user: str, texts: list[str], seed: int = 0, tenant: str = "t") -> list[str]:
    return store.add_documents(tenant, user, texts, _vectors(len(texts), seed))


def _statements(store: ProfileStore, fn) -> tuple[list[str], int]:
    """The SQL statements ``fn`` runs, and the number of SQLite VM instructions they take (work actually done)."""
    statements: list[str] = []
    steps = 0

    def progress() -> int:
        nonlocal steps
        steps += 1
        return 0

    store._conn.set_trace_callback(statements.append)
    store._conn.set_progress_handler(progress, 1)
    try:
        fn()
    finally:
        store._conn.set_trace_callback(None)
        store._conn.set_progress_handler(None, 1)
    return statements, steps


def test_add_is_constant_work_whatever_the_profile_size(store):
    _add(store, "small", ["s0"], seed=1)
    big = _vectors(2000, seed=2)
    store.add_documents("t", "big", [f"b{i}" for i in range(2000)], big)
    vector = _vectors(1, seed=3)

    small_sql, small_steps = _statements(store, lambda: store.add_documents("t", "small", ["new"], vector))
    big_sql, big_steps = _statements(store, lambda: store.add_documents("t", "big", ["new"], vector))

    # The same statements (up to the user's name and the timestamps), with the same amount of work: B-tree depth
    # grows with the profile, nothing else does.
    assert len(small_sql) == len(big_sql)
    assert [s.split()[0] for s in small_sql] == [s.split()[0] for s in big_sql]
    assert big_steps <= 1.5 * small_steps, (small_steps, big_steps)
    for statement in big_sql:
        if statement.startswith(("SELECT", "UPDATE", "INSERT", "DELETE")):
            plan = " ".join(str(row[-1]) for row in store._conn.execute("EXPLAIN QUERY PLAN " + statement))
            assert "SCAN" not in plan, (statement[:200], plan)


def test_incremental_mean_equals_recomputed_mean(store):
    vectors = _vectors(50, seed=4)
    texts = [f"doc {i}" for i in range(50)]
    ids = store.add_documents("t", "u", texts, vectors)
    for doc_id in ids[::3]:
        store.remove_document("t", "u", doc_id)
    kept = torch.stack([v for i, v in enumerate(vectors) if i % 3])
    profile = store.get_profile("t", "u")
    assert profile.count == len(kept)
    torch.testing.assert_close(profile.mean(), kept.double().mean(0).float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(profile.mean(), store.recompute_mean("t", "u"), rtol=0, atol=1e-6)


def test_readd_is_idempotent_and_ids_are_text_hashes(store):
    ids = _add(store, "u", ["hello", "world"])
    assert ids == [text_hash("hello"), text_hash("world")]
    before = store.get_profile("t", "u")
    assert _add(store, "u", ["world", "hello", "hello"], seed=9) == [ids[1], ids[0], ids[0]]
    after = store.get_profile("t", "u")
    assert after.count == 2
    assert torch.equal(after.sum, before.sum)
    assert store.missing_documents("t", "u", ["hello", "new", "new"]) == [1]


def test_client_ids_conflict_on_other_text(store):
    store.add_documents("t", "u", ["first"], _vectors(1), ids=["d1"])
    store.add_documents("t", "u", ["first"], _vectors(1), ids=["d1"])  # same text: no-op
    with pytest.raises(DocumentConflictError, match="d1"):
        store.add_documents("t", "u", ["second"], _vectors(1), ids=["d1"])
    with pytest.raises(DocumentConflictError):
        store.add_documents("t", "u", ["a", "b"], _vectors(2), ids=["x", "x"])
    assert store.user_info("t", "u").count == 1
    assert [d.id for d in store.list_documents("t", "u")] == ["d1"]


def test_remove_is_exact_and_empty_profile_is_zero(store):
    vectors = _vectors(3, seed=5)
    ids = store.add_documents("t", "u", ["a", "b", "c"], vectors)
    assert store.remove_document("t", "u", ids[1]) == 2
    torch.testing.assert_close(store.get_profile("t", "u").sum, (vectors[0].double() + vectors[2].double()))
    store.remove_document("t", "u", ids[0])
    store.remove_document("t", "u", ids[2])
    empty = store.get_profile("t", "u")
    assert empty.count == 0 and empty.mean() is None and not empty.sum.any()
    with pytest.raises(UnknownDocumentError, match="no document 'nope'"):
        store.remove_document("t", "u", "nope")


def test_unknown_user_and_tenants_are_separate(store):
    _add(store, "alice", ["x"])
    with pytest.raises(UnknownUserError, match="'alice'") as err:
        store.get_profile("other", "alice")
    assert isinstance(err.value, KeyError)
    assert "unknown user 'alice'" in str(err.value)
    assert store.delete_user("t", "alice") == 1
    with pytest.raises(UnknownUserError):
        store.user_info("t", "alice")
    assert store.users() == []


def test_failed_write_leaves_nothing(store):
    _add(store, "u", ["a"])
    before = store.get_profile("t", "u").sum.clone()
    with pytest.raises(ValueError, match="shape"):
        store.add_documents("t", "u", ["b"], torch.zeros(1, 3, 3))
    with pytest.raises(DocumentConflictError):  # the first document would be new, the second conflicts
        store.add_documents("t", "u", ["new", "b"], _vectors(2), ids=["n", text_hash("a")])
    assert store.user_info("t", "u").count == 1
    assert torch.equal(store.get_profile("t", "u").sum, before)


def test_writes_are_durable_and_in_wal_mode(tmp_path):
    path = tmp_path / "p.db"
    with ProfileStore(path, "model-a", SHAPE) as s:
        _add(s, "u", ["a", "b"])
        assert s._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert s._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    # another process's view: a plain connection sees the committed rows
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT count FROM profiles").fetchone()[0] == 2


def test_other_fingerprint_is_refused_until_rebuild(tmp_path):
    backbone = tiny_backbone()
    torch.manual_seed(0)
    old = Personalizer.new(backbone, ComMerConfig(num_embeddings=4, lora_r=4))
    texts = ["i love running in the morning", "jazz music and coffee", "rain in the city"]
    path = tmp_path / "p.db"
    old_fp = model_fingerprint(old.model)
    with ProfileStore(path, old_fp, old.shape) as s:
        add_texts(s, old, "t", "u", texts)
        old_mean = s.get_profile("t", "u").mean()

    new = Personalizer.new(tiny_backbone(), ComMerConfig(num_embeddings=4, lora_r=4, init_seed=1))
    new_fp = model_fingerprint(new.model)
    assert new_fp != old_fp
    with ProfileStore(path, new_fp, new.shape) as s:
        with pytest.raises(StaleProfileError) as err:
            s.get_profile("t", "u")
        assert old_fp in str(err.value) and new_fp in str(err.value) and "rebuild" in str(err.value)
        with pytest.raises(StaleProfileError):
            add_texts(s, new, "t", "u", ["another one"])
        assert s.user_info("t", "u").stale
        with pytest.raises(StoreError, match="rebuild needs"):
            s.rebuild(old)

        report = s.rebuild(new)
        assert (report.users, report.documents, report.failed) == (1, 3, [])
        assert s.stale_users() == []
        rebuilt = s.get_profile("t", "u")
        torch.testing.assert_close(rebuilt.mean(), new.profile(texts).mean(), rtol=0, atol=1e-6)
        assert not torch.allclose(rebuilt.mean(), old_mean)
        assert s.rebuild(new).users == 0  # nothing left to do


def test_a_concat_model_is_refused_rather_than_served_as_a_mean():
    """Profiles are running sums: a model trained to read concatenated compressions would be served wrongly."""
    backbone = tiny_backbone()
    model = ComMer(backbone, ComMerConfig(num_embeddings=SHAPE[0], lora_r=4, merge="concat"))
    with pytest.raises(ConfigError, match="trained with merge 'concat'.*only merge 'mean' can be served"):
        Personalizer(model, backbone.tokenizer)


def test_document_compressions_come_back_in_the_order_added(store):
    vectors = _vectors(3)
    store.add_documents("t", "u", ["a", "b", "c"], vectors)
    compressions, texts = store.document_compressions("t", "u", with_texts=True)
    assert torch.equal(compressions, vectors) and texts == ["a", "b", "c"]
    assert store.document_compressions("t", "u")[1] is None
