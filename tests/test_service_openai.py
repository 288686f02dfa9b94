"""The OpenAI-compatible endpoints, end to end with the official ``openai`` client against a real server (a subprocess
on loopback, real SQLite, the tiny backbone): the same greedy answers as the native endpoint, exact usage, tenant
isolation, stop strings, seeds, and OpenAI-shaped 400s for what is not supported."""

from __future__ import annotations

import httpx
import openai
import pytest
from _server import AppServer, Server, add_documents, auth, save_tiny_model

from commer.backbone import load_backbone
from commer.serving import Personalizer

DOCS = ["i love running in the morning", "marathon tomorrow !", "my weekend plan is a run"]
INSTRUCTION = "what is my plan today ?"
MODEL = "backbone"  # the served model is named after the backbone folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    folder = tmp_path_factory.mktemp("openai")
    backbone_dir, checkpoint_dir = save_tiny_model(folder)
    srv = Server(folder, backbone_dir, checkpoint_dir, folder / "profiles.db").start()
    srv.personalizer = Personalizer.from_checkpoint(checkpoint_dir, load_backbone(str(backbone_dir)))
    with httpx.Client(base_url=srv.url, headers=auth(), timeout=60) as c:
        assert add_documents(c, "alice", DOCS).status_code == 200
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="key-acme", max_retries=0)


def _native(server, user: str, instruction: str, max_new_tokens: int, key: str = "key-acme") -> dict:
    with httpx.Client(base_url=server.url, headers=auth(key), timeout=60) as c:
        r = c.post(f"/v1/users/{user}/generate", json={"instruction": instruction, "max_new_tokens": max_new_tokens})
    assert r.status_code == 200, r.text
    return r.json()


def _chat(client, **kw):
    args = {"model": MODEL, "messages": [{"role": "user", "content": INSTRUCTION}], "temperature": 0, "max_tokens": 8}
    return client.chat.completions.create(**{**args, **kw})


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat_and_completions_answer_as_the_native_endpoint(server, client):
    native = _native(server, "alice", INSTRUCTION, 8)
    chat = _chat(client, user="alice")
    assert chat.choices[0].message.content == native["text"] and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason == native["finish_reason"]
    done = client.completions.create(model=MODEL, prompt=INSTRUCTION, temperature=0, max_tokens=8, user="alice")
    assert done.choices[0].text == native["text"]


def test_usage_counts_what_the_generator_reads(server, client):
    chat = _chat(client, user="alice")
    k = server.personalizer.shape[0]
    prompt = server.personalizer.collator.encode_prompt([{"role": "user", "content": INSTRUCTION}])
    native = _native(server, "alice", INSTRUCTION, 8)
    assert chat.usage.prompt_tokens == k + len(prompt)
    assert chat.usage.completion_tokens == native["tokens"]
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert chat.usage.model_extra["profile_documents"] == len(DOCS)
    assert _chat(client).usage.model_extra["profile_documents"] == 0  # no user: unpersonalized


def test_streaming_gives_the_same_answer_then_done(client):
    whole = _chat(client, user="alice", max_tokens=12)
    chunks = list(_chat(client, user="alice", max_tokens=12, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_a_stop_string_ends_the_answer_before_it(client):
    full = _chat(client, user="alice", max_tokens=12).choices[0].message.content
    assert len(full) > 6, full
    stop = full[3:6]
    cut = _chat(client, user="alice", max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = _chat(client, user="alice", max_tokens=12, stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full[: full.index(stop)]


def test_a_seed_makes_sampling_repeatable(client):
    a, b = (_chat(client, user="alice", temperature=1.0, seed=7, max_tokens=10) for _ in range(2))
    assert a.choices[0].message.content == b.choices[0].message.content


def test_another_tenants_user_is_never_read(server, client):
    globex = openai.OpenAI(base_url=server.url + "/v1", api_key="key-globex", max_retries=0)
    theirs = _chat(globex, user="alice")  # acme's alice is not globex's: answered without a profile
    assert theirs.usage.model_extra["profile_documents"] == 0
    assert theirs.choices[0].message.content == _chat(client).choices[0].message.content


@pytest.mark.parametrize(
    ("extra", "param", "code"),
    [
        ({"logprobs": True}, "logprobs", "unsupported_parameter"),
        ({"n": 2}, "n", "invalid_value"),
        ({"temperature": 5}, "temperature", "invalid_value"),
        ({"max_tokens": 10_000}, "max_tokens", None),
        ({"messages": [{"role": "user", "content": "x" * 4001}]}, "messages", "string_above_max_length"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages.0.role", "invalid_value"),
    ],
)
def test_bad_parameters_are_openai_400s(client, extra, param, code):
    with pytest.raises(openai.BadRequestError) as caught:
        _chat(client, **extra)
    error = caught.value.body
    assert caught.value.status_code == 400 and error["param"] == param and error["type"] == "invalid_request_error"
    assert code is None or error["code"] == code


def test_an_unknown_model_is_a_404(client):
    with pytest.raises(openai.NotFoundError):
        _chat(client, model="gpt-4o")


def test_unknown_user_policy_404(tmp_path):
    srv = AppServer(tmp_path, openai_unknown_user="404").start()
    try:
        with pytest.raises(openai.NotFoundError) as caught:
            _chat(openai.OpenAI(base_url=srv.url + "/v1", api_key="key-acme", max_retries=0), user="ghost")
    finally:
        srv.stop()
    assert caught.value.body["code"] == "user_not_found"
