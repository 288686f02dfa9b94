"""The HTTP API: profiles of many tenants' users, and personalized generation, batched across users.

Every ``/v1`` request carries an API key (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``) that names its tenant;
a tenant sees only its own users (another tenant's user is a 404, exactly like a user that does not exist). The key is
checked before any of the body is read. Model work waits in a bounded queue, served round-robin across tenants: a
request it cannot take is a 429 with ``Retry-After``.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, and the request models are
# built per app (their bounds come from ``ServiceLimits``), so they only exist in ``create_app``'s scope.

import asyncio
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import torch
from fastapi import Depends, FastAPI, Path, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from starlette.concurrency import run_in_threadpool
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from commer.checkpoint import model_fingerprint
from commer.model import DocumentTooLongError
from commer.pipeline import Personalizer
from commer.service.batcher import (
    BatchStats,
    GenerationJob,
    ModelWorker,
    QueueFullError,
    RejectedGenerationError,
    check_sampling,
)
from commer.service.limits import ServiceLimits
from commer.store import (
    CorruptProfileError,
    DocumentConflictError,
    ProfileStore,
    StaleProfileError,
    UnknownDocumentError,
    UnknownUserError,
    text_hash,
)

if TYPE_CHECKING:
    from commer.scale.vllm import VLLMGenerator

log = logging.getLogger("commer.service")

# User and document ids travel in URL paths: a conservative alphabet keeps them unambiguous there.
ID_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.@:+-]*$"
MAX_ID_CHARS = 128
# Metric labels come from fixed sets: a client's made-up method must not create a time series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
RETRY_AFTER_S = 1
UNAUTHORIZED = "missing or invalid API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"


class RejectedDocumentError(ValueError):
    """A document the model cannot compress (blank after tokenization, or too long for the context)."""


class _Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "commer_http_requests_total", "HTTP requests", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "commer_http_request_duration_seconds",
            "HTTP request latency, to the last byte of the response",
            ["method", "route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "commer_generate_batch_size",
            "Generations decoded together in one batch",
            buckets=(1, 2, 4, 8, 16, 32, 64),
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "commer_generate_batch_seconds", "Wall time of one decoding batch", registry=self.registry
        )
        self.tokens = Counter("commer_generated_tokens_total", "Tokens generated", registry=self.registry)
        self.documents_added = Counter(
            "commer_documents_added_total", "Documents compressed and added to profiles", registry=self.registry
        )
        self.queue_depth = Gauge(
            "commer_model_queue_depth", "Jobs waiting for the model worker", registry=self.registry
        )

    def on_batch(self, stats: BatchStats) -> None:
        self.batch_size.observe(stats.size)
        self.batch_seconds.observe(stats.seconds)


class _Guard:
    """ASGI middleware: refuse a ``/v1`` request without a valid API key (401) before reading its body, and a body
    over the limit (413) before anything parses it; record each request's status and latency under its method (if a
    known one) and route template (not the raw path, which would explode the label space)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: _Metrics,
        max_body_bytes: int,
        keys: Sequence[tuple[bytes, str]],
        routes: Sequence[BaseRoute],
    ) -> None:
        self.app, self.metrics, self.max_body_bytes = app, metrics, max_body_bytes
        self.keys, self.routes = keys, routes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if scope["path"] == "/v1" or scope["path"].startswith("/v1/"):
                tenant = self._tenant(scope)
                if tenant is None:
                    status = 401
                    await _send_json(send, 401, {"detail": UNAUTHORIZED}, [(b"www-authenticate", b"Bearer")])
                    return
                scope.setdefault("state", {})["tenant"] = tenant
            replay = await self._buffer_body(scope, receive)
            if replay is None:
                status = 413
                await _send_json(send, 413, {"detail": f"request body over {self.max_body_bytes} bytes"})
                return
            await self.app(scope, replay, send_wrapper)
        finally:
            method = scope["method"] if scope["method"] in HTTP_METHODS else "other"
            route = self._route(scope)
            self.metrics.requests.labels(method, route, str(status)).inc()
            self.metrics.latency.labels(method, route).observe(time.perf_counter() - start)

    def _tenant(self, scope: Scope) -> str | None:
        """The tenant of the request's API key, if it is one."""
        headers = dict(scope["headers"])
        scheme, _, credentials = headers.get(b"authorization", b"").partition(b" ")
        given = credentials.strip() if scheme.lower() == b"bearer" else headers.get(b"x-api-key", b"")
        if not given:
            return None
        # Compare against every key in constant time: no timing hint of how much of a key was right.
        found = [t for k, t in self.keys if hmac.compare_digest(k, given)]
        return found[0] if found else None

    def _route(self, scope: Scope) -> str:
        """The route template: the one routing chose, else the first that matches (a request refused before
        routing), else ``unmatched``."""
        if (route := scope.get("route")) is not None:
            return route.path
        for candidate in self.routes:
            if candidate.matches(scope)[0] != Match.NONE:
                return getattr(candidate, "path", "unmatched")
        return "unmatched"

    async def _buffer_body(self, scope: Scope, receive: Receive) -> Receive | None:
        """Read the body up to the limit and return a ``receive`` that replays it; ``None`` when it is too big."""
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_body_bytes:
            return None
        if scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            return receive
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return receive  # client gone: let the app see the disconnect
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                return None
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        sent = False

        async def replay() -> Message:
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay


async def _send_json(
    send: Send, status: int, payload: dict[str, Any], extra_headers: Sequence[tuple[bytes, bytes]] = ()
) -> None:
    body = json.dumps(payload).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()), *extra_headers]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class _Detokenizer:
    """Token ids -> text deltas. Decoding the whole answer each time (answers are short) is what keeps multi-token
    characters and word-joining spaces right; an incomplete UTF-8 sequence is held back until it completes."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.text = ""

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        if text.endswith("\ufffd") or not text.startswith(self.text):
            return ""
        delta, self.text = text[len(self.text) :], text
        return delta

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True).lstrip()
        delta = text[len(self.text) :] if text.startswith(self.text) else ""
        self.text += delta
        return delta


def _check_documents(personalizer: Personalizer, texts: Sequence[str], labels: Sequence[str]) -> torch.Tensor:
    """Compress, naming the document the model refuses (run on the model worker: it tokenizes)."""
    for text, label in zip(texts, labels, strict=True):
        try:
            personalizer.collator.encode_documents([text])
        except DocumentTooLongError as err:
            raise RejectedDocumentError(f"{label} is too long: {str(err).removeprefix('document 0 ')}") from err
        except ValueError as err:
            raise RejectedDocumentError(f"{label} cannot be compressed: {err}") from err
    return personalizer.compress(list(texts))


def create_app(
    personalizer: Personalizer,
    store: ProfileStore,
    api_keys: Mapping[str, str],
    limits: ServiceLimits | None = None,
    generator: "VLLMGenerator | None" = None,
) -> FastAPI:
    """The service's ASGI app. ``api_keys`` maps each API key to its tenant; ``store`` must serve this
    personalizer's model (same fingerprint). The model worker thread starts and stops with the app's lifespan.
    ``generator``: decode on a vLLM server instead of the local model (which still compresses documents)."""
    limits = limits or ServiceLimits()
    if not api_keys:
        raise ValueError("no API keys configured: every request would be refused")
    fingerprint = model_fingerprint(personalizer.model)
    if fingerprint != store.fingerprint:
        raise ValueError(f"the store serves model {store.fingerprint}, the personalizer is model {fingerprint}")
    keys = [(k.encode(), t) for k, t in api_keys.items()]
    metrics = _Metrics()
    worker = ModelWorker(
        personalizer,
        limits.max_batch_size,
        limits.batch_wait_ms,
        on_batch=metrics.on_batch,
        max_queued=limits.max_queued,
        max_queued_per_tenant=limits.max_queued_per_tenant,
        max_active_batches=limits.max_active_batches,
    )
    metrics.queue_depth.set_function(lambda: worker.queue_depth)
    k, d = personalizer.shape

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        worker.start()
        if stale := await run_in_threadpool(store.stale_users):
            log.warning("%d profiles hold vectors of another model: run `commer profile rebuild`", len(stale))
        try:
            yield
        finally:
            await run_in_threadpool(worker.stop)
            if generator is not None:
                await generator.aclose()

    app = FastAPI(title="commer", summary="Personalized generation from compressed user documents", lifespan=lifespan)
    app.add_middleware(
        _Guard, metrics=metrics, max_body_bytes=limits.max_body_bytes, keys=keys, routes=app.router.routes
    )
    app.state.worker, app.state.store, app.state.metrics = worker, store, metrics

    # -- errors -> status codes -------------------------------------------------------------------------------------
    def _error(status: int) -> Callable[[Request, Exception], Any]:
        async def handler(_: Request, err: Exception) -> JSONResponse:
            return JSONResponse({"detail": str(err)}, status_code=status)

        return handler

    async def invalid_request(_: Request, err: RequestValidationError) -> JSONResponse:
        # Pydantic's default echoes each offending input back, which may be NaN (not JSON) or a huge document.
        errors = [{"type": e["type"], "loc": list(e["loc"]), "msg": e["msg"]} for e in err.errors()]
        return JSONResponse({"detail": errors}, status_code=422)

    app.add_exception_handler(RequestValidationError, invalid_request)
    if generator is not None:
        from commer.scale.vllm import VLLMError

        async def vllm_failed(_: Request, err: VLLMError) -> JSONResponse:
            # vLLM's 400 is a request it cannot serve (e.g. over its context): the client's problem, not a failure.
            return JSONResponse({"detail": str(err)}, status_code=422 if err.status == 400 else 502)

        app.add_exception_handler(VLLMError, vllm_failed)
    for exc, status in [
        (UnknownUserError, 404),
        (UnknownDocumentError, 404),
        (DocumentConflictError, 409),
        (StaleProfileError, 409),
        (RejectedDocumentError, 422),
        (RejectedGenerationError, 422),
        (CorruptProfileError, 500),  # the server's data, not the request, is at fault: said plainly
    ]:
        app.add_exception_handler(exc, _error(status))

    async def queue_full(_: Request, err: QueueFullError) -> JSONResponse:
        return JSONResponse(
            {"detail": f"{err}: retry later"}, status_code=429, headers={"Retry-After": str(RETRY_AFTER_S)}
        )

    app.add_exception_handler(QueueFullError, queue_full)

    def tenant(request: Request) -> str:
        """The tenant ``_Guard`` found for the request's API key."""
        return request.state.tenant

    # -- request bodies ---------------------------------------------------------------------------------------------
    # strict: "3" is not a number, "yes" not a boolean.
    class DocumentIn(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        text: str = Field(min_length=1, max_length=limits.max_document_chars, description="The document's text.")
        id: str | None = Field(
            None, min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN, description="Default: SHA-256 of text."
        )

        @field_validator("text")
        @classmethod
        def _text(cls, text: str) -> str:
            if not text.strip():
                raise ValueError("document text is blank")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError("document text is not valid Unicode (lone surrogate)") from err
            return text

    class AddDocuments(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        documents: list[DocumentIn] = Field(min_length=1, max_length=limits.max_documents_per_request)

    class GenerateIn(BaseModel):
        model_config = ConfigDict(extra="forbid", strict=True)
        instruction: str = Field(min_length=1, max_length=limits.max_instruction_chars)
        max_new_tokens: int = Field(32, ge=1, le=limits.max_new_tokens)
        temperature: float = Field(0.0, ge=0.0, le=10.0, allow_inf_nan=False)
        top_p: float = Field(1.0, gt=0.0, le=1.0, allow_inf_nan=False)
        stream: bool = False

        @field_validator("instruction")
        @classmethod
        def _instruction(cls, text: str) -> str:
            if not text.strip():
                raise ValueError("instruction is blank")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as err:
                raise ValueError("instruction is not valid Unicode (lone surrogate)") from err
            return text

        @model_validator(mode="after")
        def _sampling(self) -> "GenerateIn":
            check_sampling(self.temperature, self.top_p)  # as the model will see them: in float32
            return self

    UserId = Path(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)
    DocId = Path(min_length=1, max_length=MAX_ID_CHARS, pattern=ID_PATTERN)

    # -- routes -----------------------------------------------------------------------------------------------------
    @app.get("/healthz")
    async def healthz() -> dict[str, Any]:
        """Liveness, and which model is served."""
        return {"status": "ok", "fingerprint": fingerprint, "shape": [k, d], "queue_depth": worker.queue_depth}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def prometheus() -> PlainTextResponse:
        """Prometheus text exposition."""
        return PlainTextResponse(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.post("/v1/users/{user}/documents")
    async def add_documents(body: AddDocuments, user: str = UserId, tenant: str = Depends(tenant)) -> dict[str, Any]:
        """Compress and add one or many documents (creating the user); re-adding a document is a no-op."""
        texts = [doc.text for doc in body.documents]
        ids = [doc.id for doc in body.documents]
        new = await run_in_threadpool(store.missing_documents, tenant, user, texts, ids)
        chosen = [texts[i] for i in new]
        if chosen:
            labels = [f"document {i} ({ids[i] or 'sha256 ' + text_hash(texts[i])[:12]})" for i in new]
            compressions = await asyncio.wrap_future(
                worker.submit(lambda: _check_documents(personalizer, chosen, labels), tenant)
            )
        else:
            compressions = torch.empty(0, k, d)
        # A concurrent identical add may have stored some of them meanwhile: "added" is what this request stored.
        done = await run_in_threadpool(
            store.insert_documents, tenant, user, chosen, compressions, [ids[i] for i in new]
        )
        metrics.documents_added.inc(len(done.added))
        all_ids = [i if i is not None else text_hash(t) for i, t in zip(ids, texts, strict=True)]
        return {"user": user, "ids": all_ids, "added": done.added, "count": done.count}

    @app.get("/v1/users/{user}")
    async def get_user(user: str = UserId, tenant: str = Depends(tenant)) -> dict[str, Any]:
        """The user's document count, documents and model fingerprint."""

        def read() -> dict[str, Any]:
            info = store.user_info(tenant, user)
            docs = store.list_documents(tenant, user)
            return {
                "user": user,
                "count": info.count,
                "fingerprint": info.fingerprint,
                "stale": info.stale,
                "updated_at": info.updated_at,
                "documents": [{"id": x.id, "sha256": x.sha256, "chars": x.chars, "added_at": x.added_at} for x in docs],
            }

        return await run_in_threadpool(read)

    @app.delete("/v1/users/{user}/documents/{doc}")
    async def remove_document(user: str = UserId, doc: str = DocId, tenant: str = Depends(tenant)) -> dict[str, Any]:
        """Remove one document: its compression is subtracted from the profile."""
        count = await run_in_threadpool(store.remove_document, tenant, user, doc)
        return {"user": user, "removed": doc, "count": count}

    @app.delete("/v1/users/{user}")
    async def delete_user(user: str = UserId, tenant: str = Depends(tenant)) -> dict[str, Any]:
        """Delete the user and all their documents."""
        removed = await run_in_threadpool(store.delete_user, tenant, user)
        return {"user": user, "deleted": True, "documents": removed}

    @app.post("/v1/users/{user}/generate", response_model=None)
    async def generate(
        body: GenerateIn, user: str = UserId, tenant: str = Depends(tenant)
    ) -> dict[str, Any] | StreamingResponse:
        """Answer an instruction from the user's profile. ``stream``: server-sent events, ``delta`` events with text
        then one ``done`` event with the whole answer."""
        profile = await run_in_threadpool(store.get_profile, tenant, user)
        if generator is not None:
            return await _generate_vllm(body, user, tenant, profile if profile.count else None)
        job = GenerationJob(
            profile=profile if profile.count else None,
            instruction=body.instruction,
            max_new_tokens=body.max_new_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            loop=asyncio.get_running_loop(),
            tenant=tenant,
        )
        started = time.perf_counter()
        worker.generate(job)
        try:
            first = await job.queue.get()
            if isinstance(first, Exception):
                raise first
        except BaseException:
            job.cancelled.set()
            raise
        detok = _Detokenizer(personalizer.tokenizer)
        eos = personalizer.tokenizer.eos_token_id

        async def tokens() -> AsyncIterator[int]:
            try:
                while (item := await job.queue.get()) is not None:
                    if isinstance(item, Exception):
                        raise item
                    metrics.tokens.inc()
                    yield item
            finally:
                job.cancelled.set()  # a client that went away frees its row

        def final() -> dict[str, Any]:
            finish = "stop" if detok.ids and detok.ids[-1] == eos else "length"
            return {"user": user, "text": detok.text, "tokens": len(detok.ids), "finish_reason": finish}

        if not body.stream:
            async for token in tokens():
                detok.push(token)
            detok.flush()
            return final()

        async def events() -> AsyncIterator[str]:
            try:
                async for token in tokens():
                    if delta := detok.push(token):
                        yield _sse("delta", {"text": delta})
                if delta := detok.flush():
                    yield _sse("delta", {"text": delta})
                yield _sse("done", {**final(), "seconds": round(time.perf_counter() - started, 4)})
            except Exception as err:  # noqa: BLE001 - headers are sent: the error can only be an event now
                log.exception("generation failed for user %r", user)
                yield _sse("error", {"detail": str(err)})

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    async def _generate_vllm(body: Any, user: str, tenant: str, profile: Any) -> dict[str, Any] | StreamingResponse:
        """``generate`` on the vLLM server: the request's embeddings are built on the model worker (it tokenizes)."""
        from commer.scale.vllm import Completion, completion_request

        def request() -> dict[str, Any]:
            return completion_request(
                personalizer,
                profile,
                body.instruction,
                max_tokens=body.max_new_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                model=generator.model,
            )

        started = time.perf_counter()
        request_body = await asyncio.wrap_future(worker.submit(request, tenant))

        def final(done: Completion) -> dict[str, Any]:
            metrics.tokens.inc(done.tokens)
            return {"user": user, "text": done.text, "tokens": done.tokens, "finish_reason": done.finish_reason}

        if not body.stream:
            return final(await generator.complete(request_body))
        stream = generator.stream(request_body)
        first = await anext(stream)  # vLLM refusing the request is still a status code, not an event

        async def events() -> AsyncIterator[str]:
            try:
                item = first
                while True:
                    if isinstance(item, Completion):
                        yield _sse("done", {**final(item), "seconds": round(time.perf_counter() - started, 4)})
                        return
                    yield _sse("delta", {"text": item})
                    item = await anext(stream)
            except Exception as err:  # noqa: BLE001 - headers are sent: the error can only be an event now
                log.exception("vLLM generation failed for user %r", user)
                yield _sse("error", {"detail": str(err)})
            finally:
                await stream.aclose()  # a client gone mid-answer closes the vLLM request, which aborts it there

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


def _sse(event: str, data: dict[str, Any]) -> str:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
