"""OpenAI-compatible endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions`` and ``GET /v1/models``, for
the official ``openai`` client and everything written against it. The request's ``user`` names the profile (within
the caller's tenant, like every ``/v1`` route) that personalizes the answer.

- Same keys, limits, queue and batching as the native ``/v1/users/{user}/generate``: both put a ``GenerationJob`` on
  the one model worker, so a chat request with one user message and the native request with that instruction give the
  same greedy answer.
- ``messages`` go through the backbone's chat template (system, user and assistant turns); ``prompt`` (completions)
  is read as one instruction, exactly as the native endpoint reads it.
- ``usage.prompt_tokens`` counts what the generator reads: the soft prompt's K vectors plus the prompt's tokens;
  ``usage.profile_documents`` (an extension) is how many documents the profile merged.
- A parameter this server does not support (``logprobs``, ``tools``, ``n`` > 1, ...) is a 400 in OpenAI's error shape,
  never silently ignored. A ``user`` without a profile is answered unpersonalized (``unknown_user="plain"``) or refused
  with a 404 (``"404"``).
"""

# No ``from __future__ import annotations``: pydantic and FastAPI read these annotations at run time.

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.concurrency import run_in_threadpool

from commer.errors import ConfigError
from commer.merge import ProfileState
from commer.service.limits import ServiceLimits
from commer.service.middleware import Metrics
from commer.service.schemas import ID_PATTERN, MAX_ID_CHARS
from commer.service.streaming import Detokenizer, sse, start_generation
from commer.service.worker import GenerationJob, ModelWorker, RejectedGenerationError
from commer.serving import Personalizer
from commer.store import CorruptProfileError, ProfileStore, StaleProfileError, UnknownUserError

UNKNOWN_USER_POLICIES = ("plain", "404")


class OpenAIError(Exception):
    """An error answered in OpenAI's shape: ``{"error": {"message", "type", "param", "code"}}``."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        error = {"message": self.message, "type": kind, "param": self.param}
        return JSONResponse({"error": {**error, "code": self.code}}, status_code=self.status)


# -- requests ---------------------------------------------------------------------------------------------------
class _TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "user", "assistant"]
    content: str | list[_TextPart]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class _StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    include_usage: bool = False


class _Common(BaseModel):
    """The sampling and routing parameters both endpoints take; anything else is refused as unsupported."""

    model_config = ConfigDict(extra="forbid", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0, allow_inf_nan=False)  # OpenAI's default and range
    top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    stop: str | list[str] | None = None
    n: int = 1
    seed: int | None = None
    stream: bool = False
    stream_options: _StreamOptions | None = None
    user: str | None = Field(None, min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)

    @field_validator("stop")
    @classmethod
    def _stop(cls, stop: str | list[str] | None) -> list[str]:
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        if len(stops) > 4 or not all(stops):
            raise ValueError("stop takes at most 4 non-empty strings")
        return stops

    @field_validator("n")
    @classmethod
    def _n(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n


class ChatRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class CompletionRequest(_Common):
    prompt: str = Field(min_length=1)


def _parse(model: type[BaseModel], body: Any) -> Any:
    """Validate a request body; the first problem is a 400 naming the parameter (``unsupported_parameter`` for one
    this server does not know)."""
    if not isinstance(body, dict):
        raise OpenAIError(400, "the request body must be a JSON object", code="invalid_request")
    try:
        return model.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        param = ".".join(str(x) for x in first["loc"]) or None
        if first["type"] == "extra_forbidden":
            raise OpenAIError(400, f"Unsupported parameter: '{param}'", param, "unsupported_parameter") from None
        raise OpenAIError(400, f"Invalid value for '{param}': {first['msg']}", param, "invalid_value") from None


# -- stop strings -----------------------------------------------------------------------------------------------
class _StopText:
    """Text deltas with the stop strings cut out: the answer ends before the first stop string, and text that might
    be the start of one is held back until it cannot be."""

    def __init__(self, stops: list[str]) -> None:
        self.stops, self.text, self.sent, self.stopped = stops, "", 0, False
        self.hold = max((len(s) for s in stops), default=1) - 1

    def push(self, delta: str, final: bool = False) -> str:
        if self.stopped:
            return ""
        self.text += delta
        hits = [i for i in (self.text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            end = min(hits)
        else:
            end = len(self.text) if final else max(self.sent, len(self.text) - self.hold)
        out, self.sent = self.text[self.sent : end], end
        return out


# -- the routes -------------------------------------------------------------------------------------------------
class OpenAIRoutes:
    """The OpenAI-compatible API of one app, on its worker and store: one model, named after the backbone.
    ``local=False`` (the app decodes on vLLM) answers 501 rather than decode elsewhere than the native endpoint."""

    def __init__(
        self,
        personalizer: Personalizer,
        store: ProfileStore,
        worker: ModelWorker,
        metrics: Metrics,
        limits: ServiceLimits,
        tenant: Callable[[Request], str],
        unknown_user: str = "plain",
        local: bool = True,
    ) -> None:
        if unknown_user not in UNKNOWN_USER_POLICIES:
            raise ConfigError(f"unknown_user must be one of {UNKNOWN_USER_POLICIES}, got {unknown_user!r}")
        self.personalizer, self.store, self.worker, self.metrics = personalizer, store, worker, metrics
        self.limits, self.tenant, self.unknown_user, self.local = limits, tenant, unknown_user, local
        # the backbone's name (a folder's last component): what clients pass as ``model``
        self.model_id = Path(personalizer.model.backbone_name).name

    def router(self) -> APIRouter:
        router = APIRouter()
        caller = Depends(self.tenant)

        @router.get("/v1/models")
        async def models(_: str = caller) -> dict[str, Any]:
            """The served model."""
            return {"object": "list", "data": [self._model_card()]}

        @router.get("/v1/models/{model}")
        async def model(model: str, _: str = caller) -> Any:
            if model != self.model_id:
                return self._no_such_model(model).response()
            return self._model_card()

        @router.post("/v1/chat/completions", response_model=None)
        async def chat(request: Request, tenant: str = caller) -> Any:
            """A chat completion: ``messages`` through the chat template, personalized by ``user``'s profile."""
            try:
                body = _parse(ChatRequest, await _json(request))
                messages = [{"role": m.role, "content": m.text()} for m in body.messages]
                max_tokens = body.max_completion_tokens or body.max_tokens
                return await self._complete(body, tenant, messages, max_tokens, chat=True)
            except OpenAIError as err:
                return err.response()

        @router.post("/v1/completions", response_model=None)
        async def completions(request: Request, tenant: str = caller) -> Any:
            """A completion of ``prompt``, read as one instruction (as the native endpoint reads it)."""
            try:
                body = _parse(CompletionRequest, await _json(request))
                return await self._complete(body, tenant, body.prompt, body.max_tokens, chat=False)
            except OpenAIError as err:
                return err.response()

        return router

    def _model_card(self) -> dict[str, Any]:
        return {"id": self.model_id, "object": "model", "created": 0, "owned_by": "commer"}

    def _no_such_model(self, model: str) -> OpenAIError:
        return OpenAIError(404, f"The model '{model}' does not exist; this server serves '{self.model_id}'", "model",
                           "model_not_found")  # fmt: skip

    async def _profile(self, tenant: str, user: str | None) -> ProfileState | None:
        if user is None:
            return None
        try:
            profile = await run_in_threadpool(self.store.get_profile, tenant, user)
        except UnknownUserError as err:
            if self.unknown_user == "404":
                raise OpenAIError(404, str(err), "user", "user_not_found") from None
            return None
        except StaleProfileError as err:
            raise OpenAIError(409, str(err), "user", "stale_profile") from None
        except CorruptProfileError as err:
            raise OpenAIError(500, str(err), "user", "corrupt_profile") from None
        return profile if profile.count else None

    async def _complete(
        self, body: Any, tenant: str, prompt: Any, max_tokens: int | None, chat: bool
    ) -> dict[str, Any] | StreamingResponse:
        if body.model != self.model_id:
            raise self._no_such_model(body.model)
        if not self.local:
            raise OpenAIError(501, "this server decodes on vLLM, which the OpenAI-compatible endpoints do not use yet: "
                              "use /v1/users/{user}/generate", code="not_implemented")  # fmt: skip
        chars = len(prompt) if isinstance(prompt, str) else sum(len(m["content"]) for m in prompt)
        if chars > self.limits.max_instruction_chars:
            what = "prompt" if isinstance(prompt, str) else "messages"
            raise OpenAIError(
                400, f"the {what} hold {chars} characters; this server takes at most "
                f"{self.limits.max_instruction_chars}", what, "string_above_max_length"
            )  # fmt: skip
        limit = self.limits.max_new_tokens
        if max_tokens is not None and max_tokens > limit:
            raise OpenAIError(400, f"max_tokens is {max_tokens}; this server allows at most {limit}", "max_tokens")
        profile = await self._profile(tenant, body.user)
        job = GenerationJob(
            profile=profile,
            instruction=prompt,
            max_new_tokens=max_tokens or limit,
            temperature=body.temperature,
            top_p=body.top_p,
            loop=asyncio.get_running_loop(),
            tenant=tenant,
            seed=body.seed,
        )
        try:
            tokens = await start_generation(self.worker, job, self.metrics.tokens.inc)
        except RejectedGenerationError as err:
            raise OpenAIError(400, str(err), code="invalid_request") from None
        answer = _Answer(self, job, profile, chat, body)
        if not body.stream:
            try:
                async for token in tokens:
                    answer.push(token)
                    if answer.stop.stopped:
                        break
            finally:
                await tokens.aclose()  # after a stop string the row stops decoding
            answer.finish()
            return answer.response()
        return StreamingResponse(answer.events(tokens), media_type="text/event-stream")


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OpenAIError(400, f"the request body is not valid JSON: {err}", code="invalid_json") from None


class _Answer:
    """One request's answer as it decodes: text (stop strings cut), finish reason, usage, and OpenAI's objects."""

    def __init__(self, routes: OpenAIRoutes, job: GenerationJob, profile: ProfileState | None, chat: bool, body: Any):
        self.routes, self.job, self.chat, self.body = routes, job, chat, body
        self.detok = Detokenizer(routes.personalizer.tokenizer)
        self.stop = _StopText(body.stop or [])
        self.eos = routes.personalizer.tokenizer.eos_token_id
        self.soft = routes.personalizer.soft_prompt_length(profile)
        self.documents = profile.count if profile is not None else 0
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        self.created = int(time.time())
        self.text = ""
        self.finish_reason: str | None = None

    def push(self, token: int) -> str:
        delta = self.stop.push(self.detok.push(token))
        self.text += delta
        return delta

    def finish(self) -> str:
        """The text still held back, and the finish reason: a stop string or EOS is ``stop``, else ``length``."""
        delta = "" if self.stop.stopped else self.stop.push(self.detok.flush(), final=True)
        self.text += delta
        ended = self.stop.stopped or (self.detok.ids and self.detok.ids[-1] == self.eos)
        self.finish_reason = "stop" if ended else "length"
        return delta

    def usage(self) -> dict[str, int]:
        prompt = self.soft + self.job.prompt_length
        completion = len(self.detok.ids)
        return {
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "total_tokens": prompt + completion,
            "profile_documents": self.documents,  # extension: documents merged into the soft prompt
        }

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.routes.model_id}

    def response(self) -> dict[str, Any]:
        if self.chat:
            message = {"role": "assistant", "content": self.text}
            choice = {"index": 0, "message": message, "finish_reason": self.finish_reason, "logprobs": None}
            return {**self._head("chat.completion"), "choices": [choice], "usage": self.usage()}
        choice = {"index": 0, "text": self.text, "finish_reason": self.finish_reason, "logprobs": None}
        return {**self._head("text_completion"), "choices": [choice], "usage": self.usage()}

    def _chunk(self, delta: str | None, finish: str | None = None, first: bool = False) -> str:
        if self.chat:
            content = {"role": "assistant", "content": ""} if first else ({} if delta is None else {"content": delta})
            choice = {"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}
            return sse(None, {**self._head("chat.completion.chunk"), "choices": [choice]})
        choice = {"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}
        return sse(None, {**self._head("text_completion"), "choices": [choice]})

    async def events(self, tokens: AsyncIterator[int]) -> AsyncIterator[str]:
        """OpenAI's stream: a first chunk (chat: the role), content chunks, a chunk with the finish reason, the usage
        chunk when ``stream_options.include_usage``, then ``data: [DONE]``."""
        try:
            if self.chat:
                yield self._chunk(None, first=True)
            async for token in tokens:
                if delta := self.push(token):
                    yield self._chunk(delta)
                if self.stop.stopped:
                    break
            if delta := self.finish():
                yield self._chunk(delta)
            yield self._chunk(None, self.finish_reason)
            if self.body.stream_options is not None and self.body.stream_options.include_usage:
                yield sse(None, {**self._head(self._chunk_object()), "choices": [], "usage": self.usage()})
        except Exception as err:  # noqa: BLE001 - headers are sent: the error can only be an event now
            yield sse(None, {"error": {"message": str(err), "type": "server_error", "param": None, "code": None}})
        finally:
            await tokens.aclose()  # a stop string or a client gone: the row stops decoding
        yield sse(None, "[DONE]")

    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.chat else "text_completion"
