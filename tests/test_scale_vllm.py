"""Serving through vLLM: the prompt-embeddings request holds exactly what commer's own generator reads.

The end-to-end tests run a real ``vllm serve`` (on a GPU, or vLLM's CPU build) and are skipped where vLLM is not
installed; the service test with a stub transport only checks commer's side of the wire (what is sent, how answers
and errors come back)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
import torch
from _server import Server, auth, free_port
from conftest import perturb_zero_init, tiny_backbone
from fastapi.testclient import TestClient

from commer.backbone import load_backbone, resolve_backbone_path
from commer.checkpoint import model_fingerprint, save_checkpoint
from commer.config import ComMerConfig
from commer.model import ComMer
from commer.scale.vllm import VLLMGenerator, completion_request, decode_embeds, prompt_embeds
from commer.service.app import create_app
from commer.serving import Personalizer, add_texts
from commer.store import ProfileStore

DOCS = ["i like the cat today", "my dog is the morning", "we read a book"]
INSTRUCTION = "what do i like ?"


def _personalizer(dtype: torch.dtype = torch.float32, bridge: str = "linear") -> Personalizer:
    backbone = tiny_backbone()
    backbone.model.to(dtype)
    torch.manual_seed(0)
    p = Personalizer.new(backbone, ComMerConfig(num_embeddings=4, lora_r=4, bridge=bridge))
    perturb_zero_init(p.model)
    return p


def _personalizer_with_k(k: int) -> Personalizer:
    return Personalizer.new(tiny_backbone(), ComMerConfig(num_embeddings=k, lora_r=4))


def _generator_input(p: Personalizer, profile) -> torch.Tensor:
    """The ``inputs_embeds`` of the first forward pass of commer's own decoding (the prefill)."""
    seen: list[torch.Tensor] = []
    hook = p.model.generator_lm.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["inputs_embeds"].clone()), with_kwargs=True
    )
    try:
        p.generate([profile], [INSTRUCTION], max_new_tokens=1)
    finally:
        hook.remove()
    return seen[0][0]


@pytest.mark.parametrize("bridge", ["none", "linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_request_holds_the_soft_prompt_then_the_instruction(dtype, bridge):
    p = _personalizer(dtype, bridge)
    profile = p.profile(DOCS)
    k, d = p.shape
    body = completion_request(p, profile, INSTRUCTION, max_tokens=8, model="smollm2")
    embeds = decode_embeds(body["prompt_embeds"])
    prompt = p.collator.encode_prompt(INSTRUCTION)
    assert embeds.shape == (k + len(prompt), d) and embeds.dtype == dtype
    assert torch.equal(embeds, prompt_embeds(p, profile, INSTRUCTION))  # the wire gives back the exact tensor
    mean = profile.mean(dtype)
    bridged = mean if bridge == "none" else p.model.bridge.task_prompt + mean.float() @ p.model.bridge.proj.weight.T
    torch.testing.assert_close(embeds[:k], bridged.to(dtype))  # the profile's mean through the bridge
    assert torch.equal(embeds, _generator_input(p, profile))  # exactly the generator's prefill input
    assert body["max_tokens"] == 8 and body["model"] == "smollm2" and body["temperature"] == 0.0
    assert body["stop_token_ids"] == [p.tokenizer.eos_token_id]


@pytest.mark.parametrize("bridge", ["none", "linear"])
def test_a_user_without_documents_sends_the_task_prompt_or_nothing_before_the_instruction(bridge):
    p = _personalizer(bridge=bridge)
    embeds = decode_embeds(completion_request(p, None, INSTRUCTION)["prompt_embeds"])
    k, prompt = p.shape[0], len(p.collator.encode_prompt(INSTRUCTION))
    if bridge == "none":
        assert embeds.shape[0] == prompt
        # commer's generator reads K masked slots (moved first, never attended to), then the same embeddings
        assert torch.equal(embeds, _generator_input(p, None)[k:])
    else:
        assert embeds.shape[0] == k + prompt and torch.equal(embeds[:k], p.model.bridge.task_prompt.detach())
        assert torch.equal(embeds, _generator_input(p, None))
    with pytest.raises(ValueError, match="does not fit"):
        prompt_embeds(p, _personalizer_with_k(2).profile(DOCS), INSTRUCTION)


def test_service_sends_the_stored_profile_and_relays_answers(tmp_path):
    """Commer's side of the wire only, with a stub transport in place of vLLM: no evidence that vLLM accepts the
    request (that is ``test_commer_serve_with_the_vllm_generator``)."""
    p = _personalizer()
    sent: list[dict] = []

    def vllm_stub(request: httpx.Request) -> httpx.Response:
        body = json.loads(request.content)
        sent.append(body)
        if body["max_tokens"] == 99:
            return httpx.Response(400, json={"error": {"message": "too long for max_model_len"}})
        if body["stream"]:
            chunks = [{"choices": [{"text": t, "finish_reason": None}]} for t in (" the", " cat")]
            chunks += [
                {"choices": [{"text": "", "finish_reason": "stop"}]},
                {"choices": [], "usage": {"completion_tokens": 3}},
            ]
            sse = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return httpx.Response(200, text=sse, headers={"content-type": "text/event-stream"})
        return httpx.Response(
            200, json={"choices": [{"text": " the cat", "finish_reason": "stop"}], "usage": {"completion_tokens": 3}}
        )

    generator = VLLMGenerator("http://vllm.invalid", client=httpx.AsyncClient(transport=httpx.MockTransport(vllm_stub)))
    store = ProfileStore(tmp_path / "db.sqlite", model_fingerprint(p.model), p.shape)
    add_texts(store, p, "acme", "alice", DOCS)
    app = create_app(p, store, {"key": "acme"}, generator=generator)
    headers = {"Authorization": "Bearer key"}
    with TestClient(app) as client:
        answer = client.post("/v1/users/alice/generate", json={"instruction": INSTRUCTION}, headers=headers)
        assert answer.json() == {"user": "alice", "text": "the cat", "tokens": 3, "finish_reason": "stop"}
        expected = prompt_embeds(p, store.get_profile("acme", "alice"), INSTRUCTION)
        assert torch.equal(decode_embeds(sent[-1]["prompt_embeds"]), expected)

        streamed = client.post(
            "/v1/users/alice/generate", json={"instruction": INSTRUCTION, "stream": True}, headers=headers
        )
        events = [json.loads(line[5:]) for line in streamed.text.splitlines() if line.startswith("data:")]
        assert [e.get("text") for e in events[:-1]] == ["the", " cat"]
        assert events[-1]["text"] == "the cat" and events[-1]["tokens"] == 3 and events[-1]["finish_reason"] == "stop"

        refused = client.post(
            "/v1/users/alice/generate", json={"instruction": INSTRUCTION, "max_new_tokens": 99}, headers=headers
        )
        assert refused.status_code == 422 and "too long for max_model_len" in refused.json()["detail"]
    store.close()


def _vllm_python() -> str | None:
    """A Python that has vLLM: ``$COMMER_TEST_VLLM_PYTHON`` (vLLM in its own environment, as on a serving machine; its
    pins rarely agree with commer's) or this one."""
    if python := os.environ.get("COMMER_TEST_VLLM_PYTHON"):
        return python
    return sys.executable if importlib.util.find_spec("vllm") is not None else None


@pytest.fixture(scope="module")
def vllm_url(tmp_path_factory) -> Iterator[str]:
    """A real ``vllm serve`` of the embedded SmolLM2 with prompt embeddings enabled, in float32 as commer decodes."""
    python = _vllm_python()
    if python is None:
        pytest.skip("vLLM is not installed: set COMMER_TEST_VLLM_PYTHON to a Python that has it (docs/scaling.md)")
    folder = resolve_backbone_path("smollm2-135m")
    port = free_port()
    # the API server module rather than the `vllm` command, which fails under the CPU build's distribution name
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", str(port)]
    command += ["--enable-prompt-embeds", "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
    # 1 GiB of KV cache on a CPU-only vLLM (ignored on a GPU) is plenty for a test and fits a small CI machine
    env = {"VLLM_CPU_KVCACHE_SPACE": "1", **os.environ, "HF_HUB_OFFLINE": "1"}
    log_path = tmp_path_factory.mktemp("vllm") / "vllm.log"
    with log_path.open("w") as log:
        server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"vLLM did not start (exit code {server.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(1)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture(scope="module")
def smollm_commer(tmp_path_factory) -> tuple[Personalizer, str]:
    """A ComMer on the embedded SmolLM2 whose LoRA and bridge map are not zero (so soft prompts depend on them), and
    its checkpoint."""
    torch.manual_seed(0)
    backbone = load_backbone("smollm2-135m")
    model = ComMer(backbone, ComMerConfig(num_embeddings=8))
    perturb_zero_init(model, std=0.05, seed=0)
    folder = tmp_path_factory.mktemp("ckpt") / "checkpoint"
    save_checkpoint(model, folder)
    return Personalizer(model, backbone.tokenizer), str(folder)


PROFILE_DOCS = ["Ran my first half marathon this morning!", "New running shoes arrived.", "Pasta before race day."]
QUESTIONS = ["Write a short tweet about my plans for Saturday.", "What is the capital of France?"]


def _commer_ids(p: Personalizer, profile, instruction: str, max_new_tokens: int) -> list[int]:
    return [step[0] for step in p.stream([profile], [instruction], max_new_tokens) if step[0] is not None]


@pytest.mark.integration
def test_vllm_decodes_the_prompt_embeddings_as_commer_does(vllm_url, smollm_commer):
    """vLLM's greedy tokens for a merged profile's request are commer's own greedy tokens (both in float32), and the
    profile changes the open request's answer (vLLM really reads the soft prompt)."""
    p, _ = smollm_commer
    answers: dict[tuple[bool, str], list[int]] = {}
    for profile in (p.profile(PROFILE_DOCS), None):
        for instruction in QUESTIONS:
            body = completion_request(p, profile, instruction, max_tokens=24)
            answer = httpx.post(f"{vllm_url}/v1/completions", json={**body, "return_token_ids": True}, timeout=300)
            assert answer.status_code == 200, answer.text
            choice = answer.json()["choices"][0]
            assert choice["token_ids"] == _commer_ids(p, profile, instruction, 24)
            done = asyncio.run(VLLMGenerator(vllm_url).complete(body))
            assert done.tokens == len(choice["token_ids"]) > 0 and done.text == choice["text"].strip()
            answers[profile is None, instruction] = choice["token_ids"]
    # the open request changes with the profile; the factual one may not (it stays Paris with a task prompt either way)
    assert answers[False, QUESTIONS[0]] != answers[True, QUESTIONS[0]]


@pytest.mark.integration
def test_commer_serve_with_the_vllm_generator(vllm_url, smollm_commer, tmp_path):
    """``commer serve --generator vllm``: documents go into the store, answers come from vLLM, and they are the answers
    commer's local generator gives the same stored profile."""
    p, checkpoint = smollm_commer
    server = Server(tmp_path, "smollm2-135m", checkpoint, tmp_path / "profiles.db", "--generator", "vllm")
    server.args += ["--vllm-url", vllm_url]
    server.start(timeout=300)
    try:
        with httpx.Client(base_url=server.url, headers=auth(), timeout=300) as client:
            added = client.post("/v1/users/ann/documents", json={"documents": [{"text": t} for t in PROFILE_DOCS]})
            assert added.status_code == 200, added.text
            request = {"instruction": QUESTIONS[0], "max_new_tokens": 24}
            answer = client.post("/v1/users/ann/generate", json=request).json()
            expected = p.generate([p.profile(PROFILE_DOCS)], [QUESTIONS[0]], max_new_tokens=24)[0]
            assert answer["text"] == expected and answer["tokens"] > 0
            streamed = client.post("/v1/users/ann/generate", json={**request, "stream": True})
            events = [json.loads(line[5:]) for line in streamed.text.splitlines() if line.startswith("data:")]
            assert "".join(e["text"] for e in events[:-1]) == events[-1]["text"] == expected
    finally:
        server.kill()
