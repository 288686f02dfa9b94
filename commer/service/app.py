"""The HTTP API: profiles of many tenants' users, and personalized generation, batched across users.

Every ``/v1`` request carries an API key (``Authorization: Bearer KEY`` or ``X-API-Key: KEY``) that names its tenant;
a tenant sees only its own users (another tenant's user is a 404, exactly like a user that does not exist). The key is
checked before any of the body is read. Model work waits in a bounded queue, served round-robin across tenants: a
request it cannot take is a 429 with ``Retry-After``.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations, and the request models are
# built per app (their bounds come from ``ServiceLimits``), so they only exist in ``create_app``'s scope.

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import torch
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.concurrency import run_in_threadpool

from commer.checkpoint import model_fingerprint
from commer.service.limits import ServiceLimits
from commer.service.middleware import Guard, Metrics
from commer.service.openai_api import OpenAIRoutes
from commer.service.schemas import DocId, UserId, request_models
from commer.service.streaming import Detokenizer, sse, start_generation
from commer.service.worker import (
    GenerationJob,
    ModelWorker,
    QueueFullError,
    RejectedGenerationError,
)
from commer.serving import Personalizer, bm25_profile, plan_add
from commer.store import (
    CorruptProfileError,
    DocumentConflictError,
    ProfileStore,
    StaleProfileError,
    UnknownDocumentError,
    UnknownUserError,
)
from commer.text import ContextTooLongError, EmptyTextError

if TYPE_CHECKING:
    from commer.scale.vllm import VLLMGenerator

log = logging.getLogger("commer.service")

RETRY_AFTER_S = 1


def create_app(
    personalizer: Personalizer,
    store: ProfileStore,
    api_keys: Mapping[str, str],
    limits: ServiceLimits | None = None,
    generator: "VLLMGenerator | None" = None,
    openai_unknown_user: str = "plain",
) -> FastAPI:
    """The service's ASGI app. ``api_keys`` maps each API key to its tenant; ``store`` must serve this
    personalizer's model (same fingerprint). The model worker thread starts and stops with the app's lifespan.
    ``generator``: decode on a vLLM server instead of the local model (which still compresses documents).
    ``openai_unknown_user``: what the OpenAI-compatible endpoints do for a ``user`` without a profile: ``"plain"``
    answers unpersonalized, ``"404"`` refuses (``commer.service.openai_api``)."""
    limits = limits or ServiceLimits()
    if not api_keys:
        raise ValueError("no API keys configured: every request would be refused")
    fingerprint = model_fingerprint(personalizer.model)
    if fingerprint != store.fingerprint:
        raise ValueError(f"the store serves model {store.fingerprint}, the personalizer is model {fingerprint}")
    keys = [(k.encode(), t) for k, t in api_keys.items()]
    metrics = Metrics()
    worker = ModelWorker(
        personalizer,
        limits.max_batch_size,
        limits.batch_wait_ms,
        on_batch=metrics.on_batch,
        max_queued=limits.max_queued,
        max_queued_per_tenant=limits.max_queued_per_tenant,
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
        Guard, metrics=metrics, max_body_bytes=limits.max_body_bytes, keys=keys, routes=app.router.routes
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
        (ContextTooLongError, 422),  # a document the model cannot read
        (EmptyTextError, 422),
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
        """The tenant ``Guard`` found for the request's API key."""
        return request.state.tenant

    models = request_models(limits)
    AddDocuments, GenerateIn = models.add_documents, models.generate  # noqa: N806 - FastAPI reads them as types

    routes = OpenAIRoutes(personalizer, store, worker, metrics, limits, tenant, openai_unknown_user, generator is None)
    app.include_router(routes.router())

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
        # commer.serving.add_texts, with the compression on the model worker (plan -> compress -> commit)
        texts = [doc.text for doc in body.documents]
        ids = [doc.id for doc in body.documents]
        plan = await run_in_threadpool(plan_add, store, tenant, user, texts, ids)
        chosen = [texts[i] for i in plan.new]
        if chosen:
            labels = plan.labels(ids)
            compressions = await asyncio.wrap_future(
                worker.submit(lambda: personalizer.compress(chosen, names=labels), tenant)
            )
        else:
            compressions = torch.empty(0, k, d)
        # A concurrent identical add may have stored some of them meanwhile: "added" is what this request stored.
        done = await run_in_threadpool(
            store.insert_documents, tenant, user, chosen, compressions, [ids[i] for i in plan.new]
        )
        metrics.documents_added.inc(len(done.added))
        return {"user": user, "ids": plan.ids, "added": done.added, "count": done.count}

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
        then one ``done`` event with the whole answer. ``merge.top_k``: retrieval-merge, the mean of only the
        ``top_k`` documents most relevant to the instruction, ranked ``by`` dense similarity or BM25 (O(documents)
        per request instead of O(1)), or of all where the top ``k`` do not stand out by ``merge.min_margin``."""
        profile = await run_in_threadpool(store.get_profile, tenant, user)
        if body.merge is not None and profile.count:
            merge = body.merge
            compressions, texts = await run_in_threadpool(store.document_compressions, tenant, user, merge.by == "bm25")
            if compressions.shape[0]:  # a sum-only profile (imported) has no documents to rank: its mean serves
                if texts is not None:  # no model in text ranking: it never waits behind decoding
                    profile = await run_in_threadpool(
                        bm25_profile, body.instruction, compressions, texts, merge.top_k, merge.min_margin
                    )
                else:  # dense: the request is compressed by the model, on its worker
                    profile = await asyncio.wrap_future(
                        worker.submit(
                            lambda: personalizer.retrieval_profile(
                                body.instruction, compressions, merge.top_k, min_margin=merge.min_margin
                            ),
                            tenant,
                        )
                    )
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
        tokens = await start_generation(worker, job, metrics.tokens.inc)
        detok = Detokenizer(personalizer.tokenizer)
        eos = personalizer.tokenizer.eos_token_id

        def final() -> dict[str, Any]:
            finish = "stop" if detok.ids and detok.ids[-1] == eos else "length"
            return {"user": user, "text": detok.text, "tokens": len(detok.ids), "finish_reason": finish}

        if not body.stream:
            async for token in tokens:
                detok.push(token)
            detok.flush()
            return final()

        async def events() -> AsyncIterator[str]:
            try:
                async for token in tokens:
                    if delta := detok.push(token):
                        yield sse("delta", {"text": delta})
                if delta := detok.flush():
                    yield sse("delta", {"text": delta})
                yield sse("done", {**final(), "seconds": round(time.perf_counter() - started, 4)})
            except Exception as err:  # noqa: BLE001 - headers are sent: the error can only be an event now
                log.exception("generation failed for user %r", user)
                yield sse("error", {"detail": str(err)})

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
                        yield sse("done", {**final(item), "seconds": round(time.perf_counter() - started, 4)})
                        return
                    yield sse("delta", {"text": item})
                    item = await anext(stream)
            except Exception as err:  # noqa: BLE001 - headers are sent: the error can only be an event now
                log.exception("vLLM generation failed for user %r", user)
                yield sse("error", {"detail": str(err)})
            finally:
                await stream.aclose()  # a client gone mid-answer closes the vLLM request, which aborts it there

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app
