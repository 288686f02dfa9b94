"""Generation through a vLLM server: ComMer's generator is the frozen backbone, so vLLM can run it.

A user's soft prompt (the profile's mean through the model's bridge, ``(K, D)``) followed by the embedded instruction
tokens is exactly the input ``SoftPromptLM.decode_steps`` gives the backbone; vLLM takes such a sequence as *prompt
embeddings*: a server started with ``vllm serve MODEL_FOLDER --enable-prompt-embeds`` accepts ``/v1/completions``
requests whose ``prompt_embeds`` is the base64 of a ``torch.save``d ``(sequence_length, hidden_size)`` tensor (vLLM's
"Prompt Embedding Inputs"). The local model still compresses documents; only decoding moves to vLLM.

>>> body = completion_request(personalizer, store.get_profile("acme", "alice"), "Plan my weekend.", max_tokens=64)
>>> httpx.post("http://vllm:8000/v1/completions", json=body).json()["choices"][0]["text"]
"""

from __future__ import annotations

import base64
import io
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from commer.merge import ProfileState

if TYPE_CHECKING:
    import httpx

    from commer.serving import Personalizer


class VLLMError(RuntimeError):
    """vLLM refused or failed a request. ``status``: its HTTP status (0 when it could not be reached)."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"vLLM answered {status}: {detail}" if status else f"vLLM unreachable: {detail}")
        self.status, self.detail = status, detail


@torch.no_grad()
def prompt_embeds(personalizer: Personalizer, profile: ProfileState | None, instruction: str) -> torch.Tensor:
    """``(K + L, D)`` in the backbone's dtype, on the CPU: the profile's soft prompt (its mean through the model's
    bridge; nothing for a profile without documents when the bridge is ``none``) followed by the embedded prompt
    tokens, as commer's own generator reads them."""
    prefix, mask = personalizer.soft_prompts([profile])  # (1, K, D): as commer's own generator reads it
    model = personalizer.model
    ids = torch.tensor(personalizer.collator.encode_prompt(instruction), device=model.device)
    tokens = model.embed(ids)  # (L, D)
    return torch.cat([prefix[0][mask[0]], tokens]).cpu()


def encode_embeds(embeds: torch.Tensor) -> str:
    """vLLM's wire format for prompt embeddings: base64 of the ``torch.save`` bytes."""
    buffer = io.BytesIO()
    # contiguous().clone(): torch.save writes a view's whole storage, which would send more than the tensor
    torch.save(embeds.contiguous().clone(), buffer)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_embeds(data: str) -> torch.Tensor:
    """Inverse of ``encode_embeds`` (what vLLM does on receipt)."""
    return torch.load(io.BytesIO(base64.b64decode(data)), weights_only=True, map_location="cpu")


def completion_request(
    personalizer: Personalizer,
    profile: ProfileState | None,
    instruction: str,
    *,
    max_tokens: int = 64,
    temperature: float = 0.0,
    top_p: float = 1.0,
    model: str | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    """The JSON body of a vLLM ``/v1/completions`` request answering ``instruction`` for ``profile``.

    Decoding stops at the tokenizer's EOS, as commer's own decoding does; ``model`` is the name vLLM serves the backbone
    under (default: the only one it serves)."""
    body: dict[str, Any] = {
        "prompt_embeds": encode_embeds(prompt_embeds(personalizer, profile, instruction)),
        "max_tokens": max_tokens,
        "temperature": temperature,
        "top_p": top_p,
        "stop_token_ids": [personalizer.tokenizer.eos_token_id],
        "skip_special_tokens": True,
        "stream": stream,
    }
    if model is not None:
        body["model"] = model
    return body


@dataclass(frozen=True)
class Completion:
    text: str
    tokens: int
    finish_reason: str


class VLLMGenerator:
    """The ``commer serve --generator vllm`` backend: sends completion requests to a vLLM server.

    Args:
        url: the vLLM server, e.g. ``http://127.0.0.1:8001``.
        model: the served model name (default: vLLM's only one).
        client: an ``httpx.AsyncClient`` to send with (default: a new one with ``timeout`` seconds).
    """

    def __init__(
        self, url: str, model: str | None = None, timeout: float = 300.0, client: httpx.AsyncClient | None = None
    ) -> None:
        import httpx

        self.endpoint = url.rstrip("/") + "/v1/completions"
        self.model = model
        self.client = client or httpx.AsyncClient(timeout=timeout)

    async def aclose(self) -> None:
        await self.client.aclose()

    async def complete(self, body: dict[str, Any]) -> Completion:
        """One whole answer."""
        import httpx

        try:
            response = await self.client.post(self.endpoint, json={**body, "stream": False})
        except httpx.HTTPError as err:
            raise VLLMError(0, str(err) or type(err).__name__) from err
        if response.status_code != 200:
            raise VLLMError(response.status_code, _detail(response.text))
        data = response.json()
        choice = data["choices"][0]
        tokens = int(data.get("usage", {}).get("completion_tokens", 0))
        return Completion(choice["text"].strip(), tokens, choice.get("finish_reason") or "length")

    async def stream(self, body: dict[str, Any]) -> AsyncIterator[str | Completion]:
        """Text deltas as vLLM streams them (server-sent events), then the ``Completion``."""
        import httpx

        text, tokens, finish = "", 0, "length"
        request = {**body, "stream": True, "stream_options": {"include_usage": True}}  # usage: the token count
        try:
            async with self.client.stream("POST", self.endpoint, json=request) as response:
                if response.status_code != 200:
                    raise VLLMError(response.status_code, _detail((await response.aread()).decode(errors="replace")))
                async for line in response.aiter_lines():
                    if not line.startswith("data:") or line[5:].strip() == "[DONE]":
                        continue
                    chunk = json.loads(line[5:])
                    tokens = int((chunk.get("usage") or {}).get("completion_tokens", tokens))
                    for choice in chunk.get("choices", []):
                        delta = choice.get("text", "")
                        if not text:
                            delta = delta.lstrip()  # as commer's answers: no leading whitespace
                        if delta:
                            text += delta
                            yield delta
                        finish = choice.get("finish_reason") or finish
        except httpx.HTTPError as err:
            raise VLLMError(0, str(err) or type(err).__name__) from err
        yield Completion(text.strip(), tokens, finish)


def _detail(body: str) -> str:
    """vLLM's error message out of its JSON error body (or the body itself)."""
    try:
        data = json.loads(body)
    except json.JSONDecodeError:
        return body[:500]
    error = data.get("error", data) if isinstance(data, dict) else data
    return str(error.get("message", error) if isinstance(error, dict) else error)[:500]
