"""Hardening of the service, end to end on the tiny backbone (real uvicorn, real SQLite): one tenant's bad request never
fails another's, metric labels stay bounded, the queue is bounded and fair, the API key is checked before the body is
read, failures at start-up are one line; and a crafted trainer state is never unpickled."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shlex
import socket
import sqlite3
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import torch
import typer
from _server import AppServer, add_documents, auth, held, metric, save_tiny_model, wait_for
from conftest import tiny_backbone
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from commer.checkpoint import META, WEIGHTS, save_checkpoint
from commer.config import ComMerConfig, RunConfig, TrainConfig
from commer.model import build_model
from commer.service.cli import register
from commer.service.limits import ServiceLimits
from commer.store import CorruptProfileError
from commer.text import Example
from commer.train import Trainer

INSTRUCTION = "what is my plan today ?"
DOCS = ["i love running in the morning", "jazz music and coffee", "rain in the city today"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = AppServer(tmp_path_factory.mktemp("hardening"), ServiceLimits(batch_wait_ms=20)).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=auth(), timeout=60) as c:
        yield c


def _post(url: str, path: str, body: object, key: str = "key-acme") -> httpx.Response:
    with httpx.Client(base_url=url, headers=auth(key), timeout=60) as c:
        return c.post(path, json=body)


# -- 1: a bad row is its own 4xx and never touches another tenant's request ---------------------------------------
def test_a_bad_request_fails_alone_not_its_batch(server, client):
    for key in ("key-acme", "key-globex"):
        _post(server.url, "/v1/users/iso/documents", {"documents": [{"text": t} for t in DOCS]}, key)
    bad_body = {"instruction": "hi", "top_p": 1e-46, "temperature": 1}  # 0 in float32: decoding would refuse it
    answers: dict[str, httpx.Response] = {}
    with ThreadPoolExecutor(2) as pool, held(server.worker):
        good = pool.submit(_post, server.url, "/v1/users/iso/generate", {"instruction": INSTRUCTION})
        bad = pool.submit(_post, server.url, "/v1/users/iso/generate", bad_body, "key-globex")
        bad.add_done_callback(lambda f: answers.setdefault("bad", f.result()))
        # both wait for the model together (refused before it: only the good one waits)
        wait_for(lambda: server.worker.queue_depth + len(answers) == 2, "both requests to be queued or answered")
    assert good.result().status_code == 200, good.result().text
    assert bad.result().status_code == 422 and "top_p" in bad.result().text and "float32" in bad.result().text


def test_bm25_merge_is_off_unless_the_operator_allows_it(client):
    """BM25 ranking reads users' stored texts: a server started without ``--bm25-merge`` refuses it with a 422."""
    _post(client.base_url, "/v1/users/texts/documents", {"documents": [{"text": t} for t in DOCS]})
    r = client.post("/v1/users/texts/generate", json={"instruction": "hi", "merge": {"top_k": 1, "by": "bm25"}})
    assert r.status_code == 422 and "--bm25-merge" in r.text, r.text
    assert client.post("/v1/users/texts/generate", json={"instruction": "hi", "merge": {"top_k": 1}}).status_code == 200


def test_bm25_ranking_does_not_wait_behind_the_model(tmp_path):
    """BM25 ranks stored texts with no model: while the model worker is busy, a BM25 request is ranked at once and
    only its generation waits; a dense request waits to be ranked (its instruction is compressed by the model)."""
    srv = AppServer(tmp_path, ServiceLimits(batch_wait_ms=20, bm25_merge=True)).start()
    try:
        _post(srv.url, "/v1/users/ranked/documents", {"documents": [{"text": t} for t in DOCS]})
        for by, waiting in (("bm25", "generation"), ("dense", "ranking")):
            body = {"instruction": INSTRUCTION, "max_new_tokens": 2, "merge": {"top_k": 1, "by": by}}
            with ThreadPoolExecutor(1) as pool, held(srv.worker):
                answer = pool.submit(_post, srv.url, "/v1/users/ranked/generate", body)
                wait_for(lambda: srv.worker.queue_depth == 1, f"the {by} request to wait for the model")
                queued = "generation" if len(srv.worker._jobs) else "ranking"
            assert queued == waiting, by
            assert answer.result().status_code == 200, answer.result().text
    finally:
        srv.stop()


# -- 2: metric labels come from fixed sets --------------------------------------------------------------------------
def test_made_up_methods_do_not_grow_the_metrics(server, client):
    def series() -> set[str]:
        text = client.get("/metrics").text
        return {line.rsplit(" ", 1)[0] for line in text.splitlines() if line.startswith("commer_http_")}

    paths = ("/v1/users/x", "/healthz", "/nowhere")
    for path in paths:  # one made-up method per path (and /metrics itself) first, so that their series exist
        httpx.request("BREW", server.url + path, headers=auth())
    series()
    before = series()
    for i in range(40):
        for path in paths:
            assert httpx.request(f"M{i}", server.url + path, headers=auth()).status_code < 500
    after = series()
    assert after == before
    assert 'method="other",route="/v1/users/{user}"' in " ".join(after) and "M1" not in " ".join(after)


# -- 4: bounded queue (429 + Retry-After) -------------------------------------------------------------------------
def test_a_full_queue_is_a_429_with_retry_after_and_other_tenants_still_get_in(tmp_path):
    srv = AppServer(tmp_path, ServiceLimits(max_queued=3, max_queued_per_tenant=2)).start()
    try:
        for key in ("key-acme", "key-globex"):
            _post(srv.url, "/v1/users/q/documents", {"documents": [{"text": DOCS[0]}]}, key)
        body = {"instruction": "hi", "max_new_tokens": 2}
        with ThreadPoolExecutor(3) as pool, held(srv.worker):
            queued = [pool.submit(_post, srv.url, "/v1/users/q/generate", body) for _ in range(2)]
            wait_for(lambda: srv.worker.queue_depth == 2, "two queued generations")
            refused = _post(srv.url, "/v1/users/q/generate", body)
            assert refused.status_code == 429 and refused.headers["retry-after"] == "1", refused.text
            assert "tenant 'acme' has 2 requests waiting" in refused.json()["detail"]
            queued.append(pool.submit(_post, srv.url, "/v1/users/q/generate", body, "key-globex"))
            wait_for(lambda: srv.worker.queue_depth == 3, "the other tenant's generation queued")
            full = _post(srv.url, "/v1/users/q/documents", {"documents": [{"text": "new one"}]}, "key-globex")
            assert full.status_code == 429 and "3 requests are waiting" in full.json()["detail"]
        assert [f.result().status_code for f in queued] == [200, 200, 200]
    finally:
        srv.stop()


# -- 5: the API key is checked before the body is read ------------------------------------------------------------
def test_no_key_is_a_401_before_the_body_is_read(server):
    r = httpx.post(
        server.url + "/v1/users/u/generate", content=b"{bad json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer"
    # Announce 8 MB and send one byte: the answer comes without the server waiting for the rest.
    host, port = server.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(
            b"POST /v1/users/u/documents HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 8000000\r\n\r\n{"
        )
        head = b""
        while b"\r\n" not in head and (chunk := s.recv(100)):
            head += chunk
        assert head.startswith(b"HTTP/1.1 401 "), head


# -- 6: concurrent users share forward passes, deterministically ---------------------------------------------------
def test_concurrent_users_are_batched_and_answer_as_alone(server, client):
    users = [f"batch-{i}" for i in range(8)]
    for i, user in enumerate(users):
        add_documents(client, user, [DOCS[i % 3], DOCS[(i + 1) % 3]])
    lengths = [3 + i for i in range(len(users))]  # rows of one batch stop at their own max_new_tokens

    def ask(i: int) -> dict:
        r = _post(
            server.url, f"/v1/users/{users[i]}/generate", {"instruction": INSTRUCTION, "max_new_tokens": lengths[i]}
        )
        assert r.status_code == 200, r.text
        return r.json()

    def batches() -> tuple[float, float]:
        text = client.get("/metrics").text
        return metric(text, "commer_generate_batch_size_count"), metric(text, "commer_generate_batch_size_sum")

    count, rows = batches()
    with ThreadPoolExecutor(len(users)) as pool:
        with held(server.worker):  # all eight wait for the model, then form one batch
            together = [pool.submit(ask, i) for i in range(len(users))]
            wait_for(lambda: server.worker.queue_depth == len(users), "all generations queued")
        together = [f.result() for f in together]
    assert batches() == (count + 1, rows + len(users))  # one forward pass per step served all eight
    alone = [ask(i) for i in range(len(users))]
    for t, a, n in zip(together, alone, lengths, strict=True):
        assert t["text"] == a["text"]
        assert t["tokens"] == a["tokens"] <= n


# -- 7: identical concurrent adds, damaged blobs, strict types, one-line start-up errors ----------------------------
def test_of_two_identical_concurrent_adds_one_reports_the_document_added(server):
    body = {"documents": [{"text": "twice at once", "id": "twin"}]}
    with ThreadPoolExecutor(2) as pool, held(server.worker):  # both compress it, having both found it missing
        answers = [pool.submit(_post, server.url, "/v1/users/twins/documents", body) for _ in range(2)]
        wait_for(lambda: server.worker.queue_depth == 2, "both compressions queued")
    results = [f.result().json() for f in answers]
    assert sorted(r["added"] for r in results) == [[], ["twin"]]
    assert [r["count"] for r in results] == [1, 1]


def test_a_damaged_profile_is_a_clear_error(server, client):
    add_documents(client, "damaged", DOCS)
    add_documents(client, "intact", DOCS)
    db = sqlite3.connect(server.store.path)
    db.execute("UPDATE profiles SET sum = x'00' WHERE user = 'damaged'")
    db.commit()
    db.close()
    with pytest.raises(CorruptProfileError, match="user 'damaged'.*damaged"):
        server.store.get_profile("acme", "damaged")
    r = client.post("/v1/users/damaged/generate", json={"instruction": "hi"})
    assert r.status_code == 500 and "damaged" in r.json()["detail"]
    assert client.post("/v1/users/intact/generate", json={"instruction": "hi", "max_new_tokens": 2}).status_code == 200


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"instruction": "hi", "max_new_tokens": "3"}, "valid integer"),
        ({"instruction": "hi", "stream": "yes"}, "valid boolean"),
        ({"instruction": "hi", "temperature": "1"}, "valid number"),
        ({"instruction": "hi", "top_p": 5e-324, "temperature": 1}, "float32"),
    ],
)
def test_types_are_strict(client, body, message):
    add_documents(client, "strict", DOCS)
    r = client.post("/v1/users/strict/generate", json=body)
    assert r.status_code == 422 and message in r.text, r.text


@pytest.fixture(scope="module")
def broken(tmp_path_factory) -> dict[str, list[str]]:
    """``serve`` arguments that cannot start: a truncated weights file, a ``commer.json`` without its backbone, a
    checkpoint trained with the concat merge (profiles are served as running means), a database in a folder that does
    not exist."""
    folder = tmp_path_factory.mktemp("broken")
    backbone_dir, checkpoint_dir = save_tiny_model(folder)
    truncated, no_backbone, concat = folder / "truncated", folder / "no-backbone", folder / "concat"
    for copy in (truncated, no_backbone, concat):
        copy.mkdir()
        for name in (META, WEIGHTS):
            (copy / name).write_bytes((checkpoint_dir / name).read_bytes())
    (truncated / WEIGHTS).write_bytes((checkpoint_dir / WEIGHTS).read_bytes()[:100])
    meta = json.loads((no_backbone / META).read_text())
    del meta["backbone"]
    (no_backbone / META).write_text(json.dumps(meta))
    meta = json.loads((concat / META).read_text())
    meta["config"]["merge"] = "concat"
    (concat / META).write_text(json.dumps(meta))
    good = ["--backbone", str(backbone_dir), "--checkpoint", str(checkpoint_dir), "--db", str(folder / "ok.db")]
    return {
        "is damaged": [*good[:2], "--checkpoint", str(truncated), *good[4:]],
        "names no backbone": [*good[:2], "--checkpoint", str(no_backbone), *good[4:]],
        "only merge 'mean' can be served": [*good[:2], "--checkpoint", str(concat), *good[4:]],
        "unable to open database file": [*good[:4], "--db", str(folder / "missing" / "x.db")],
    }


@pytest.mark.parametrize(
    "problem", ["is damaged", "names no backbone", "only merge 'mean' can be served", "unable to open database file"]
)
def test_serve_fails_on_one_line_without_a_traceback(broken, problem, monkeypatch):
    monkeypatch.setenv("COMMER_API_KEYS", json.dumps({"k": "t"}))
    app = typer.Typer()
    register(app)
    result = CliRunner().invoke(app, ["serve", *broken[problem]])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.exception  # not a raw error
    [line] = [x for x in result.output.splitlines() if x.startswith("error: ")]
    assert problem in line


def test_compiled_decoding_with_a_vllm_generator_is_refused_on_one_line(monkeypatch):
    monkeypatch.setenv("COMMER_API_KEYS", json.dumps({"k": "t"}))
    app = typer.Typer()
    register(app)
    args = ["serve", "--generator", "vllm", "--vllm-url", "http://127.0.0.1:1", "--compile-decoding"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2 and "with vllm, vLLM decodes" in result.output


def test_every_service_limit_is_a_serve_option():
    app = typer.Typer()
    register(app)
    serve = typer.main.get_command(app).commands["serve"]
    assert {f.name for f in dataclasses.fields(ServiceLimits)} <= {p.name for p in serve.params}


def test_python_m_commer_service_serve_prints_one_line(broken):
    env = {**os.environ, "COMMER_API_KEYS": json.dumps({"k": "t"}), "HF_HUB_OFFLINE": "1"}
    args = [sys.executable, "-m", "commer.service", "serve", *broken["unable to open database file"]]
    done = subprocess.run(args, capture_output=True, text=True, env=env, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("error: unable to open database file"), done.stderr


# -- the whole generate request schema: no value of any field is a 5xx -------------------------------------------
# Each field: mostly values of its type, with the extremes (floats that are 0 or inf in float32, subnormals, ints past
# int64), and any other JSON type. The instruction is always there: a body without one is a plain 422 (test_service.py
# fuzzes bodies of any shape).
_EDGE_FLOATS = [1e-46, 5e-324, 1.4e-45, 1.2e-38, 1e-300, -0.0, 1 - 1e-17, 1.0000000000000002, 10.000000000000002, 1e39]
_floats = st.sampled_from(_EDGE_FLOATS) | st.floats(0, 1) | st.floats(0, 10) | st.floats()
_other = (
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.text(max_size=10) | st.lists(st.none(), max_size=2)
)
_generate_bodies = st.fixed_dictionaries(
    {
        "instruction": st.text(min_size=1, max_size=40)
        | st.sampled_from(["hi", "run " * 120, "\ud800", " ", "x" * 4001])
    },
    optional={
        "max_new_tokens": st.integers(-3, 12) | st.sampled_from([124, 125, 256, 257, 2**63]) | _floats | _other,
        "temperature": _floats | _other,
        "top_p": _floats | _other,
        "stream": st.booleans() | _other,
        "extra": _other,
    },
) | st.fixed_dictionaries({"instruction": _floats | _other})


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=_generate_bodies, user=st.sampled_from(["schema", "nobody"]), key=st.sampled_from(["key-acme", "key-globex"])
)
@example(body={"instruction": "hi", "top_p": 1e-46, "temperature": 1}, user="schema", key="key-acme")  # the issue's
@example(body={"instruction": "hi", "max_new_tokens": "3", "stream": "yes"}, user="schema", key="key-acme")
def test_no_generate_request_is_a_5xx(client, body, user, key):
    add_documents(client, "schema", DOCS)
    content = json.dumps(body, allow_nan=True).encode("utf-8", "surrogatepass")
    r = client.post(
        f"/v1/users/{user}/generate", content=content, headers={**auth(key), "content-type": "application/json"}
    )
    assert r.status_code < 500, (body, r.status_code, r.text)
    if r.status_code == 200 and not body.get("stream"):
        assert isinstance(r.json()["text"], str) and r.json()["tokens"] <= body.get("max_new_tokens", 32)


# -- 3: a crafted trainer state is never unpickled -----------------------------------------------------------------
class _Payload:
    """Unpickling this runs a shell command (what a planted ``trainer_state.pt`` would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch {shlex.quote(str(self.marker))}",)


def test_resuming_never_runs_a_pickled_trainer_state(tmp_path):
    config = RunConfig(
        output_dir=str(tmp_path / "run"),
        model=ComMerConfig(num_embeddings=2, lora_r=4),
        train=TrainConfig(batch_size=2, micro_batch_size=2, max_steps=2),
    )
    backbone = tiny_backbone()
    model = build_model(backbone, config.model)
    examples = [Example(f"u{i}", ["my coffee today"], "what do i like ?", "coffee") for i in range(4)]
    trainer = Trainer(config, model, backbone.tokenizer, examples, examples)
    save_checkpoint(model, tmp_path / "run" / "last")  # a run killed after its first checkpoint...
    marker = tmp_path / "pwned"
    torch.save({"step": 1, "optimizer": _Payload(marker)}, tmp_path / "run" / "last" / "trainer_state.pt")  # ...planted
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        trainer.fit()
    assert not marker.exists()
    torch.load(tmp_path / "run" / "last" / "trainer_state.pt", weights_only=False)  # what the payload would have done
    assert marker.exists()
