"""Serving through vLLM: the prompt-embeddings request holds exactly what commer's own generator reads.

The end-to-end test (a real ``vllm serve``) needs vLLM and a GPU and is skipped without them; the service test with a
stub transport only checks commer's side of the wire (what is sent, how answers and errors come back)."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time

import httpx
import pytest
import torch
from _server import free_port
from conftest import tiny_backbone
from fastapi.testclient import TestClient

from commer.backbone import load_backbone, resolve_backbone_path
from commer.checkpoint import model_fingerprint
from commer.config import ComMerConfig
from commer.pipeline import Personalizer
from commer.scale.vllm import VLLMGenerator, completion_request, decode_embeds, prompt_embeds
from commer.service.app import create_app
from commer.store import ProfileStore, add_texts

DOCS = ["i like the cat today", "my dog is the morning", "we read a book"]
INSTRUCTION = "what do i like ?"


def _personalizer(dtype: torch.dtype = torch.float32) -> Personalizer:
    backbone = tiny_backbone()
    backbone.model.to(dtype)
    torch.manual_seed(0)
    return Personalizer.new(backbone, ComMerConfig(num_embeddings=4, lora_r=4))


def _personalizer_with_k(k: int) -> Personalizer:
    return Personalizer.new(tiny_backbone(), ComMerConfig(num_embeddings=k, lora_r=4))


def _generator_input(p: Personalizer, profile) -> torch.Tensor:
    """The ``inputs_embeds`` of the first forward pass of commer's own decoding (the prefill)."""
    seen: list[torch.Tensor] = []
    hook = p.model.lm.register_forward_pre_hook(
        lambda _m, _a, kwargs: seen.append(kwargs["inputs_embeds"].clone()), with_kwargs=True
    )
    try:
        p.generate([profile], [INSTRUCTION], max_new_tokens=1)
    finally:
        hook.remove()
    return seen[0][0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_request_holds_the_merged_profile_then_the_instruction(dtype):
    p = _personalizer(dtype)
    profile = p.profile(DOCS)
    k, d = p.shape
    body = completion_request(p, profile, INSTRUCTION, max_tokens=8, model="smollm2")
    embeds = decode_embeds(body["prompt_embeds"])
    prompt = p.collator.encode_prompt(INSTRUCTION)
    assert embeds.shape == (k + len(prompt), d) and embeds.dtype == dtype
    assert torch.equal(embeds, prompt_embeds(p, profile, INSTRUCTION))  # the wire gives back the exact tensor
    assert torch.equal(embeds[:k], profile.mean(dtype))
    assert torch.equal(embeds, _generator_input(p, profile))  # exactly the generator's prefill input
    assert body["max_tokens"] == 8 and body["model"] == "smollm2" and body["temperature"] == 0.0
    assert body["stop_token_ids"] == [p.tokenizer.eos_token_id]


def test_a_user_without_documents_sends_only_the_instruction():
    p = _personalizer()
    embeds = decode_embeds(completion_request(p, None, INSTRUCTION)["prompt_embeds"])
    k = p.shape[0]
    assert embeds.shape[0] == len(p.collator.encode_prompt(INSTRUCTION))
    # commer's generator reads K masked slots (moved first, never attended to), then the same embeddings
    assert torch.equal(embeds, _generator_input(p, None)[k:])
    with pytest.raises(ValueError, match="does not fit"):
        prompt_embeds(p, _personalizer_with_k(2).profile(DOCS), INSTRUCTION)


def test_service_sends_the_stored_profile_and_relays_answers(tmp_path):
    """Commer's side of the wire only, with a stub transport in place of vLLM: no evidence that vLLM accepts the
    request (that is ``test_vllm_end_to_end``)."""
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


VLLM_READY = importlib.util.find_spec("vllm") is not None and torch.cuda.is_available()


@pytest.mark.integration
@pytest.mark.skipif(not VLLM_READY, reason="vLLM not installed / no GPU: the end-to-end vLLM test needs both")
def test_vllm_end_to_end(tmp_path):
    """A real ``vllm serve`` of the embedded SmolLM2 with --enable-prompt-embeds answers a merged profile's request as
    commer's own greedy decoding does (both in float32)."""
    folder = resolve_backbone_path("smollm2-135m")
    port = free_port()
    command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", folder, "--port", str(port)]
    command += ["--enable-prompt-embeds", "--dtype", "float32", "--max-model-len", "2048"]
    command += ["--gpu-memory-utilization", "0.3"]
    log = (tmp_path / "vllm.log").open("w")
    server = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            assert server.poll() is None, (tmp_path / "vllm.log").read_text()[-3000:]
            try:
                if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(2)
        else:
            pytest.fail("vLLM did not start within 600 s")
        torch.manual_seed(0)
        p = Personalizer.new(load_backbone("smollm2-135m"), ComMerConfig(num_embeddings=8))
        profile = p.profile(["Ran my first half marathon this morning!", "New running shoes arrived."])
        instruction = "Write a short tweet about my plans for Saturday."
        body = completion_request(p, profile, instruction, max_tokens=16)
        done = asyncio.run(VLLMGenerator(url).complete(body))
        assert done.text == p.generate([profile], [instruction], max_new_tokens=16)[0]
        assert done.tokens > 0
    finally:
        server.terminate()
        server.wait(60)
        log.close()
