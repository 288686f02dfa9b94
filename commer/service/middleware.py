"""What every request passes through before a route: the API key (401) and body size (413) checks, and the metrics
each request and decoding batch records."""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from starlette.routing import BaseRoute, Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from commer.service.worker import BatchStats

UNAUTHORIZED = "missing or invalid API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'"
# Metric labels come from fixed sets: a client's made-up method must not create a time series.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


class Metrics:
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


class Guard:
    """ASGI middleware: refuse a ``/v1`` request without a valid API key (401) before reading its body, and a body
    over the limit (413) before anything parses it; record each request's status and latency under its method (if a
    known one) and route template (not the raw path, which would explode the label space)."""

    def __init__(
        self,
        app: ASGIApp,
        metrics: Metrics,
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
