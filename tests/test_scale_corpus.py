"""Corpus compression: the local engine equals the model, Ray Data equals the local engine, and the store imports
either output (per-document compressions exactly, sums as sums)."""

from __future__ import annotations

import json

import pytest
import torch
from _server import save_tiny_model

from commer.backbone import load_backbone
from commer.checkpoint import model_fingerprint
from commer.merge import ProfileState
from commer.serving import Personalizer
from commer.store import DocumentConflictError, ProfileStore, StoreError

pa = pytest.importorskip("pyarrow", reason="corpus compression needs pyarrow (pip install pyarrow)")
pq = pytest.importorskip("pyarrow.parquet")

from commer.scale.corpus import (  # noqa: E402 - after the skip: the module needs pyarrow at run time
    Columns,
    ModelSpec,
    compress_corpus,
    import_profiles,
    read_profiles,
)

WORDS = "cat dog coffee tea rain sun jazz rock music city book hiking".split()
DOCS = {
    "alice": [f"i like the {w} today" for w in WORDS[:5]],
    "bob": [f"my {w} is the morning" for w in WORDS[5:9]],
    "carol": [f"we read a {w}" for w in WORDS[9:]],
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """The tiny model on disk and a JSONL corpus with one document repeated (it must count once)."""
    root = tmp_path_factory.mktemp("corpus")
    backbone_dir, checkpoint_dir = save_tiny_model(root)
    rows = [{"user_id": user, "text": text} for user, texts in DOCS.items() for text in texts]
    rows.append(rows[0])
    path = root / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    personalizer = Personalizer.from_checkpoint(checkpoint_dir, load_backbone(str(backbone_dir)))
    return {"root": root, "jsonl": path, "model": ModelSpec(str(checkpoint_dir), str(backbone_dir)), "p": personalizer}


def _expected(personalizer: Personalizer) -> dict[str, ProfileState]:
    return {user: personalizer.profile(texts) for user, texts in DOCS.items()}


def _store(path, personalizer: Personalizer) -> ProfileStore:
    return ProfileStore(path, model_fingerprint(personalizer.model), personalizer.shape)


def test_local_engine_gives_each_users_profile(corpus):
    out = corpus["root"] / "local"
    summary = compress_corpus(corpus["jsonl"], out, corpus["model"])
    assert (summary.users, summary.documents) == (3, 12)
    assert summary.fingerprint == model_fingerprint(corpus["p"].model)
    got = read_profiles(out)
    for user, state in _expected(corpus["p"]).items():
        total, count = got[user]
        assert count == state.count
        torch.testing.assert_close(torch.from_numpy(total).reshape(state.shape), state.sum, atol=1e-5, rtol=0)
    assert not (out / "documents").exists()
    with pytest.raises(ValueError, match="already holds a compressed corpus"):
        compress_corpus(corpus["jsonl"], out, corpus["model"])


def test_ray_engine_equals_local_engine(corpus):
    ray = pytest.importorskip("ray", reason="the Ray engine needs ray[data] (pip install 'ray[data]')")
    try:
        if not ray.is_initialized():
            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    except Exception as err:  # noqa: BLE001 - any failure to start means this machine cannot run the test
        pytest.skip(f"a local Ray cluster cannot start here: {err}")
    try:
        local, remote = corpus["root"] / "local-docs", corpus["root"] / "ray-docs"
        compress_corpus(corpus["jsonl"], local, corpus["model"], per_document=True)
        # Two model replicas on half a CPU each: the other CPU is left to Ray Data's read and write tasks.
        summary = compress_corpus(
            corpus["jsonl"], remote, corpus["model"], engine="ray", per_document=True, batch_size=4, cpus_per_worker=0.5
        )
        assert (summary.users, summary.documents) == (3, 12)
        a, b = read_profiles(local), read_profiles(remote)
        assert a.keys() == b.keys()
        for user in a:
            assert a[user][1] == b[user][1]
            assert abs(a[user][0] - b[user][0]).max() < 1e-5
        docs_a = pq.read_table(local / "documents").sort_by([("user", "ascending"), ("doc_id", "ascending")])
        docs_b = pq.read_table(remote / "documents").sort_by([("user", "ascending"), ("doc_id", "ascending")])
        assert docs_a.num_rows == docs_b.num_rows == 13  # every input row, the duplicate too
        assert docs_a["doc_id"].to_pylist() == docs_b["doc_id"].to_pylist()
        diff = torch.tensor(docs_a["compression"].to_pylist()) - torch.tensor(docs_b["compression"].to_pylist())
        assert diff.abs().max() < 1e-5
        with pytest.raises(ValueError, match="leaving none to read"):
            compress_corpus(corpus["jsonl"], corpus["root"] / "x", corpus["model"], engine="ray", workers=2)
    finally:
        ray.shutdown()


def test_store_imports_documents_exactly_and_sums_as_sums(corpus, tmp_path):
    p = corpus["p"]
    out = corpus["root"] / "for-import"
    compress_corpus(corpus["jsonl"], out, corpus["model"], per_document=True)
    with _store(tmp_path / "docs.db", p) as store:
        report = import_profiles(store, out, "acme")
        assert report.users == 3
        again = import_profiles(store, out, "acme")  # idempotent: stored documents are skipped
        assert again.users == 3
        for user, state in _expected(p).items():
            profile = store.get_profile("acme", user)
            assert profile.count == state.count == len(store.list_documents("acme", user))
            torch.testing.assert_close(profile.sum, state.sum, atol=1e-5, rtol=0)
            assert store.get_text("acme", user, store.list_documents("acme", user)[0].id) in DOCS[user]
        # a user with stored documents cannot be overwritten by a sum
        with pytest.raises(DocumentConflictError, match="has stored documents"):
            store.import_profile("acme", "alice", ProfileState(*p.shape))

    sums_only = corpus["root"] / "local"  # written by the first test, or now
    if not sums_only.exists():
        compress_corpus(corpus["jsonl"], sums_only, corpus["model"])
    with _store(tmp_path / "sums.db", p) as store:
        assert import_profiles(store, sums_only, "acme").documents == 0
        import_profiles(store, sums_only, "acme")  # a second import sets the same sums, it does not add them
        for user, state in _expected(p).items():
            profile = store.get_profile("acme", user)
            assert profile.count == state.count and store.list_documents("acme", user) == []
            torch.testing.assert_close(profile.sum, state.sum, atol=1e-5, rtol=0)
    with ProfileStore(tmp_path / "other.db", "another-model", p.shape) as store:
        with pytest.raises(StoreError, match="this store serves another-model"):
            import_profiles(store, sums_only, "acme")
        assert store.users() == []


def test_parquet_input_with_named_columns_and_ids(corpus, tmp_path):
    texts = DOCS["alice"][:3]
    table = pa.table({"who": [7, 7, 8], "body": texts, "key": ["a", "b", "a"]})
    pq.write_table(table, tmp_path / "in.parquet")
    out = tmp_path / "out"
    compress_corpus(tmp_path / "in.parquet", out, corpus["model"], Columns("who", "body", "key"), per_document=True)
    docs = pq.read_table(out / "documents")
    assert docs["user"].to_pylist() == ["7", "7", "8"] and docs["doc_id"].to_pylist() == ["a", "b", "a"]
    got = read_profiles(out)
    assert got["7"][1] == 2 and got["8"][1] == 1
    expected = corpus["p"].compress(texts).double()
    torch.testing.assert_close(torch.from_numpy(got["7"][0]).reshape(expected.shape[1:]), expected[:2].sum(0))

    clash = pa.table({"who": [1, 1], "body": texts[:2], "key": ["same", "same"]})
    pq.write_table(clash, tmp_path / "clash.parquet")
    with pytest.raises(ValueError, match="document id 'same' is given to two different texts"):
        compress_corpus(tmp_path / "clash.parquet", tmp_path / "o2", corpus["model"], Columns("who", "body", "key"))
    with pytest.raises(ValueError, match="has no column"):
        compress_corpus(tmp_path / "in.parquet", tmp_path / "o3", corpus["model"])


def test_cli_compress_corpus(corpus, tmp_path):
    from typer.testing import CliRunner

    from commer.cli import app

    model = corpus["model"]
    args = ["compress-corpus", str(corpus["jsonl"]), "--output", str(tmp_path / "out")]
    args += ["--checkpoint", model.checkpoint, "--backbone", model.backbone, "--engine", "local"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "12 documents of 3 users" in result.output
    assert read_profiles(tmp_path / "out").keys() == DOCS.keys()
