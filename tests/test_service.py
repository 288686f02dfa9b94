"""The HTTP service, end to end: a real uvicorn server in a subprocess, a real SQLite file, the tiny backbone."""

from __future__ import annotations

import json
from urllib.parse import quote

import httpx
import pytest
import typer
from _server import Server, add_documents, auth, metric, save_tiny_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from commer.backbone import load_backbone
from commer.merge import ProfileState
from commer.service.cli import register
from commer.serving import Personalizer, bm25_scores, text_hash

DOCS = {
    "alice": ["i love running in the morning", "marathon tomorrow !", "my weekend plan is a run"],
    "bob": ["jazz music and coffee", "i read a book with tea"],
    "carol": ["rain in the city today"],
}
INSTRUCTION = "what is my plan today ?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("service")
    backbone_dir, checkpoint_dir = save_tiny_model(folder)
    srv = Server(
        folder, backbone_dir, checkpoint_dir, folder / "profiles.db", "--batch-wait-ms", "20", "--bm25-merge"
    ).start()
    srv.backbone_dir, srv.checkpoint_dir = backbone_dir, checkpoint_dir
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=auth(), timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def personalizer(server) -> Personalizer:
    """The served model, in this process: the reference the server's answers must equal."""
    return Personalizer.from_checkpoint(server.checkpoint_dir, load_backbone(str(server.backbone_dir)))


def _events(body: str) -> list[tuple[str, dict]]:
    out = []
    for block in body.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.splitlines())
        out.append((lines["event"], json.loads(lines["data"])))
    return out


def test_profile_lifecycle(client):
    r = add_documents(client, "dave", ["i love running", "jazz music"])
    assert r.status_code == 200, r.text
    assert r.json()["ids"] == [text_hash("i love running"), text_hash("jazz music")]
    assert r.json()["count"] == 2
    # re-adding is idempotent; a client id works
    r = client.post(
        "/v1/users/dave/documents",
        json={"documents": [{"text": "jazz music"}, {"text": "coffee and tea", "id": "note-1"}]},
    )
    assert r.status_code == 200 and r.json()["count"] == 3 and r.json()["added"] == ["note-1"]
    info = client.get("/v1/users/dave").json()
    assert info["count"] == 3 and info["stale"] is False and len(info["fingerprint"]) == 16
    assert {d["id"] for d in info["documents"]} == {text_hash("i love running"), text_hash("jazz music"), "note-1"}
    # the same id with another text is a conflict, not an overwrite
    r = client.post("/v1/users/dave/documents", json={"documents": [{"text": "other", "id": "note-1"}]})
    assert r.status_code == 409 and "note-1" in r.json()["detail"]

    r = client.delete(f"/v1/users/dave/documents/{text_hash('jazz music')}")
    assert r.status_code == 200 and r.json()["count"] == 2
    assert client.delete("/v1/users/dave/documents/nope").status_code == 404
    r = client.delete("/v1/users/dave")
    assert r.status_code == 200 and r.json()["documents"] == 2
    for response in (client.get("/v1/users/dave"), client.delete("/v1/users/dave")):
        assert response.status_code == 404 and "'dave'" in response.json()["detail"]


def test_generate_matches_the_model(client, personalizer):
    for user, docs in DOCS.items():
        assert add_documents(client, user, docs).status_code == 200
    for user, docs in DOCS.items():
        [expected] = personalizer.generate([personalizer.profile(docs)], [INSTRUCTION], max_new_tokens=8)
        r = client.post(f"/v1/users/{user}/generate", json={"instruction": INSTRUCTION, "max_new_tokens": 8})
        assert r.status_code == 200, r.text
        assert r.json()["text"].strip() == expected
        assert r.json()["tokens"] <= 8 and r.json()["finish_reason"] in ("stop", "length")


def test_retrieval_merge_over_http(client, personalizer):
    """``merge.top_k``: with every document it is the plain mean (the same answer); with one it is that document's
    profile, the one whose compression is closest to the instruction's."""
    docs = DOCS["alice"]
    assert add_documents(client, "rita", docs).status_code == 200

    def answer(**extra) -> str:
        r = client.post("/v1/users/rita/generate", json={"instruction": INSTRUCTION, "max_new_tokens": 8, **extra})
        assert r.status_code == 200, r.text
        return r.json()["text"]

    assert answer(merge={"top_k": len(docs)}) == answer() == answer(merge={"top_k": 100})
    compressions = personalizer.compress(docs)
    top = personalizer.retrieval_profile(INSTRUCTION, compressions, 1)
    [expected] = personalizer.generate([top], [INSTRUCTION], max_new_tokens=8)
    assert answer(merge={"top_k": 1}) == expected


def test_bm25_retrieval_merge_over_http(client, personalizer):
    """``merge.by = "bm25"`` (this server allows it): the mean of the documents whose stored texts BM25 ranks first
    for the instruction; with every document it is the plain mean."""
    docs = ["jazz music and coffee", "my plan today is a long run", "rain in the city"]
    assert add_documents(client, "bea", docs).status_code == 200

    def answer(**merge) -> str:
        body = {"instruction": INSTRUCTION, "max_new_tokens": 8, "merge": {"by": "bm25", **merge}}
        r = client.post("/v1/users/bea/generate", json=body)
        assert r.status_code == 200, r.text
        return r.json()["text"]

    compressions = personalizer.compress(docs)
    plan = ProfileState.from_compressions(compressions[1:2])  # the only text sharing the instruction's words
    assert int(bm25_scores(INSTRUCTION, docs).argmax()) == 1
    [expected] = personalizer.generate([plan], [INSTRUCTION], max_new_tokens=8)
    assert answer(top_k=1) == expected
    assert answer(top_k=1, min_margin=0.9) == expected  # the other texts score 0: the first stands out fully
    [mean] = personalizer.generate([ProfileState.from_compressions(compressions)], [INSTRUCTION], max_new_tokens=8)
    assert answer(top_k=3) == mean


def test_generate_streams_deltas_then_done(client):
    add_documents(client, "erin", DOCS["alice"])
    r = client.post("/v1/users/erin/generate", json={"instruction": INSTRUCTION, "max_new_tokens": 6, "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = _events(r.text)
    assert [e for e, _ in events[:-1]] == ["delta"] * (len(events) - 1) and events[-1][0] == "done"
    done = events[-1][1]
    assert "".join(d["text"] for _, d in events[:-1]) == done["text"]
    plain = client.post("/v1/users/erin/generate", json={"instruction": INSTRUCTION, "max_new_tokens": 6}).json()
    assert plain["text"] == done["text"] and plain["tokens"] == done["tokens"]


def test_tenants_are_isolated(server, client):
    add_documents(client, "shared", ["i love running"])
    with httpx.Client(base_url=server.url, headers={"X-API-Key": "key-globex"}, timeout=60) as globex:
        assert globex.get("/v1/users/shared").status_code == 404
        assert globex.delete(f"/v1/users/shared/documents/{text_hash('i love running')}").status_code == 404
        assert globex.post("/v1/users/shared/generate", json={"instruction": "hi"}).status_code == 404
        assert globex.delete("/v1/users/shared").status_code == 404
        assert add_documents(globex, "shared", ["jazz music", "coffee"]).json()["count"] == 2
        assert globex.get("/v1/users/shared").json()["count"] == 2
    assert client.get("/v1/users/shared").json()["count"] == 1  # untouched by the other tenant
    # a second key of the same tenant sees the same users
    assert client.get("/v1/users/shared", headers=auth("key-acme-2")).json()["count"] == 1


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"X-API-Key": ""}, {"Authorization": "x"}])
def test_missing_or_wrong_key_is_401(server, headers):
    requests = [
        ("GET", "/v1/users/alice", None),
        ("DELETE", "/v1/users/alice", None),
        ("DELETE", "/v1/users/alice/documents/x", None),
        ("POST", "/v1/users/alice/documents", {"documents": [{"text": "hi"}]}),
        ("POST", "/v1/users/alice/generate", {"instruction": "hi"}),
    ]
    for method, path, body in requests:
        r = httpx.request(method, server.url + path, json=body, headers=headers)
        assert r.status_code == 401, (method, path, r.text)
        assert r.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("documents", {"documents": []}, 422, "at least 1"),
        ("documents", {"documents": [{"text": "x"}] * 65}, 422, "at most 64"),
        ("documents", {"documents": [{"text": "a" * 20_001}]}, 422, "at most 20000"),
        ("documents", {"documents": [{"text": "   "}]}, 422, "blank"),
        ("documents", {"documents": [{"text": "ok", "id": "a/b"}]}, 422, "pattern"),
        ("documents", {"documents": [{"text": "ok", "extra": 1}]}, 422, "extra"),
        ("documents", {"documents": [{"text": "run " * 200, "id": "long-one"}]}, 422, "long-one"),
        ("documents", {"documents": [{"text": "ok"}, {"text": "run " * 200}]}, 422, "document 1"),
        ("documents", {"docs": "x"}, 422, "documents"),
        ("generate", {"instruction": "hi", "max_new_tokens": 257}, 422, "256"),
        ("generate", {"instruction": "hi", "max_new_tokens": 0}, 422, "greater than"),
        ("generate", {"instruction": "x" * 4001}, 422, "4000"),
        ("generate", {"instruction": "run " * 120}, 422, "context"),
        ("generate", {"instruction": "hi", "max_new_tokens": 125}, 422, "context"),
        ("generate", {"instruction": "hi", "top_p": 0}, 422, "greater than"),
        ("generate", {"instruction": "hi", "temperature": -1}, 422, "greater than"),
        ("generate", {"instruction": ""}, 422, "at least 1"),
        ("generate", [1, 2], 422, "dictionary"),
        ("generate", {"instruction": "hi", "merge": {"top_k": 0}}, 422, "greater than or equal to 1"),
        ("generate", {"instruction": "hi", "merge": {"top_k": 1025}}, 422, "less than or equal to 1024"),
        ("generate", {"instruction": "hi", "merge": {"top_k": 2, "by": "x"}}, 422, "'dense' or 'bm25'"),
        ("generate", {"instruction": "hi", "merge": {"top_k": 2, "k": 1}}, 422, "extra"),
        ("generate", {"instruction": "hi", "merge": {"top_k": 2, "min_margin": 1.5}}, 422, "less than or equal to 1"),
    ],
)
def test_bad_input_is_a_clear_4xx(client, path, body, status, message):
    add_documents(client, "limits", ["i love running"])
    r = client.post(f"/v1/users/limits/{path}", json=body)
    assert r.status_code == status, r.text
    assert message in json.dumps(r.json()), r.text


def test_malformed_bodies(client):
    add_documents(client, "limits", ["i love running"])
    headers = {"content-type": "application/json"}
    for raw in [b"{bad json", b"", b"\xff\xfe", b'{"instruction": NaN}', b'{"documents": [{"text": "\\ud800"}]}']:
        for path in ("documents", "generate"):
            r = client.post(f"/v1/users/limits/{path}", content=raw, headers=headers)
            assert r.status_code == 422, (raw, path, r.text)
    r = client.post("/v1/users/limits/documents", content=b"x" * (9 * 1024 * 1024), headers=headers)
    assert r.status_code == 413
    assert client.get("/v1/users/" + "u" * 129).status_code == 422
    assert client.get("/v1/users/nobody").status_code == 404
    assert client.post("/v1/users/nobody/generate", json={"instruction": "hi"}).status_code == 404


def test_health_and_metrics(server, client):
    health = httpx.get(server.url + "/healthz").json()
    assert health["status"] == "ok" and health["shape"] == [4, 64]
    add_documents(client, "metered", ["coffee and tea"])
    client.post("/v1/users/metered/generate", json={"instruction": "hi", "max_new_tokens": 2})
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    text = metrics.text
    assert 'commer_http_requests_total{method="POST",route="/v1/users/{user}/generate",status="200"}' in text
    assert "commer_http_request_duration_seconds_bucket" in text
    assert metric(text, "commer_documents_added_total") >= 1
    assert metric(text, "commer_generate_batch_size_count") >= 1
    assert metric(text, "commer_generated_tokens_total") >= 1


# -- fuzzing: whatever the body or path, the answer is never a 5xx ------------------------------------------------
_json = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
_near_document = st.fixed_dictionaries({"text": _json | st.text(max_size=200)}, optional={"id": _json | st.text()})
_bodies = st.one_of(
    _json,
    st.fixed_dictionaries({"documents": st.lists(_near_document | _json, max_size=4) | _json}),
    st.fixed_dictionaries(
        {"instruction": _json | st.text(max_size=100)},
        optional={
            "max_new_tokens": _json | st.integers(-5, 300),
            "temperature": _json | st.floats(-1, 3, allow_nan=False),
            "top_p": _json | st.floats(-1, 2, allow_nan=False),
            "stream": _json | st.booleans(),
        },
    ),
)
_users = st.sampled_from(["alice", "bob", "fuzz"]) | st.text(min_size=1, max_size=20)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    method=st.sampled_from(["POST documents", "POST generate", "GET", "DELETE", "DELETE doc"]),
    user=_users,
    doc=st.text(min_size=1, max_size=20),
    body=_bodies,
)
def test_fuzzed_requests_never_5xx(client, method, user, doc, body):
    user_path = _quote(user)
    if method == "POST documents":
        r = client.post(f"/v1/users/{user_path}/documents", content=_dumps(body), headers=_JSON)
    elif method == "POST generate":
        if isinstance(body, dict) and isinstance(body.get("max_new_tokens"), int):
            body = {**body, "max_new_tokens": min(body["max_new_tokens"], 12)}  # keep decoding short
        r = client.post(f"/v1/users/{user_path}/generate", content=_dumps(body), headers=_JSON)
    elif method == "GET":
        r = client.get(f"/v1/users/{user_path}")
    elif method == "DELETE":
        r = client.delete(f"/v1/users/{user_path}")
    else:
        r = client.delete(f"/v1/users/{user_path}/documents/{_quote(doc)}")
    assert r.status_code < 500, (method, user, body, r.status_code, r.text)


_JSON = {"content-type": "application/json"}


def _quote(text: str) -> str:
    return quote(text, safe="")


def _dumps(body: object) -> bytes:
    return json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")


def test_server_survived_the_fuzzing(server, client):
    assert httpx.get(server.url + "/healthz").status_code == 200
    assert add_documents(client, "after-fuzz", ["i love running"]).status_code == 200
    r = client.post("/v1/users/after-fuzz/generate", json={"instruction": "hi", "max_new_tokens": 2})
    assert r.status_code == 200


def test_cli_works_on_the_store_without_a_server(server, tmp_path):
    app = typer.Typer()
    register(app)
    model = ["--backbone", str(server.backbone_dir), "--checkpoint", str(server.checkpoint_dir)]
    db = ["--db", str(tmp_path / "cli.db"), "--tenant", "acme"]
    (tmp_path / "a.txt").write_text("i love running\n\njazz music\n")
    runner = CliRunner()

    added = runner.invoke(app, ["profile", "add", "zoe", str(tmp_path / "a.txt"), "--lines", *model, *db])
    assert added.exit_code == 0, added.output
    assert text_hash("jazz music") in added.stdout
    shown = runner.invoke(app, ["profile", "show", "zoe", *model, *db])
    assert json.loads(shown.stdout)["count"] == 2
    answer = runner.invoke(app, ["generate", "zoe", INSTRUCTION, "--max-new-tokens", "3", *model, *db])
    assert answer.exit_code == 0, answer.output
    removed = runner.invoke(app, ["profile", "remove", "zoe", text_hash("jazz music"), *model, *db])
    assert removed.exit_code == 0 and "1 documents" in removed.stdout
    missing = runner.invoke(app, ["profile", "show", "nobody", *model, *db])
    assert missing.exit_code == 1 and "unknown user 'nobody'" in missing.output
    # another model: the profile is stale until rebuilt with it
    untrained = ["--backbone", str(server.backbone_dir), "--k", "4", "--db", str(tmp_path / "cli.db")]
    stale = runner.invoke(app, ["generate", "zoe", "hi", "--tenant", "acme", *untrained])
    assert stale.exit_code == 1 and "rebuild" in stale.output
    rebuilt = runner.invoke(app, ["profile", "rebuild", *untrained])
    assert rebuilt.exit_code == 0 and "rebuilt 1 profiles (1 documents)" in rebuilt.stdout
    assert runner.invoke(app, ["generate", "zoe", "hi", "--tenant", "acme", *untrained]).exit_code == 0


def test_a_server_with_compiled_decoding_answers_as_one_without(tmp_path):
    """``commer serve --compile-decoding`` (static KV cache, compiled step, in the model worker's thread) serves the
    same greedy answers as the same server without it (the tiny random model's answers are alike: the token-level
    equality on varied answers is tests/test_model.py's and test_integration_backbone.py's)."""
    backbone_dir, checkpoint_dir = save_tiny_model(tmp_path)
    docs = {"ann": ["i love running in the morning", "marathon tomorrow !"], "bob": ["jazz music and coffee"]}
    requests = [INSTRUCTION, "what does the user like ?", "what is the news ?"]
    answers = []
    for name, extra in (("plain", ()), ("compiled", ("--compile-decoding",))):
        folder = tmp_path / name
        folder.mkdir()
        server = Server(folder, backbone_dir, checkpoint_dir, folder / "profiles.db", *extra).start()
        try:
            with httpx.Client(base_url=server.url, headers=auth(), timeout=300) as client:
                for user, texts in docs.items():
                    add_documents(client, user, texts).raise_for_status()
                answers.append(
                    [
                        client.post(f"/v1/users/{u}/generate", json={"instruction": q, "max_new_tokens": 12}).json()
                        for u in docs
                        for q in requests
                    ]
                )
        finally:
            server.kill()
    plain, compiled = answers
    assert all(a["tokens"] == 12 for a in plain)
    assert compiled == plain
