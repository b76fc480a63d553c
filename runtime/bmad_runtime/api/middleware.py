"""The three ASGI middlewares around every route, outermost first.

`ObserveMiddleware` gives each request an id, adds the security headers, observes the
request histogram and opens one span; `CatchAllMiddleware` turns an unhandled error
into a bare 500 that names the request id, never a stack trace; `BodyLimitMiddleware`
answers 413 to a body larger than the runtime accepts, declared or streamed.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import re
import secrets
import time

import fastapi
from opentelemetry import trace
from starlette import datastructures
from starlette import exceptions as starlette_exceptions
from starlette import types as asgi

from bmad_runtime import telemetry
from bmad_runtime.api import errors

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "X-Request-ID"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# Routes that are probed constantly: measured, but not traced.
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
# Request ids: unique per process start, then a counter (cheaper than uuid4 per request).
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


class RequestTooLargeError(starlette_exceptions.HTTPException):
    # An HTTPException, so that FastAPI's body parsing re-raises it as it is.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class BodyLimitMiddleware:
    def __init__(self, app: asgi.ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = datastructures.Headers(scope=scope).get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            response = errors.error_response(
                413,
                "request_too_large",
                RequestTooLargeError(self.max_bytes).detail,
                request_id=errors.request_id_of(scope),
            )
            await response(scope, receive, send)
            return
        received = 0

        async def limited() -> asgi.Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise RequestTooLargeError(self.max_bytes)
            return message

        await self.app(scope, limited, send)


class CatchAllMiddleware:
    """The last line: an unhandled exception is logged and answered with a bare 500."""

    def __init__(self, app: asgi.ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def watch(message: asgi.Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, receive, watch)
        except Exception:
            rid = errors.request_id_of(scope)
            logger.exception(
                "unhandled error in %s %s (request %s)", scope.get("method"), scope.get("path"), rid
            )
            if started:
                return  # the status is out; the server closes the connection
            response = errors.error_response(
                500,
                "internal_error",
                f"the agent runtime failed to handle this request; quote request id {rid} "
                "when reporting it",
                request_id=rid,
            )
            await response(scope, receive, send)


class ObserveMiddleware:
    """Request id, security headers, the request histogram and one span per request."""

    def __init__(
        self, app: asgi.ASGIApp, *, metrics: telemetry.Metrics, tracer: trace.Tracer
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.tracer = tracer
        self.tracing = not isinstance(tracer, trace.NoOpTracer)

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = datastructures.Headers(scope=scope).get(REQUEST_ID_HEADER)
        rid = incoming if incoming and _REQUEST_ID.match(incoming) else new_request_id()
        scope[errors.REQUEST_ID_KEY] = rid
        status = 500

        async def decorate(message: asgi.Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = datastructures.MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
                headers[REQUEST_ID_HEADER] = rid
            await send(message)

        start = time.perf_counter()
        path: str = scope.get("path", "")
        span_cm: contextlib.AbstractContextManager[trace.Span | None] = (
            contextlib.nullcontext()
            if path in _UNTRACED or not self.tracing
            else self.tracer.start_as_current_span(
                scope.get("method", "HTTP"),
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": scope.get("method", ""), "bmad.request_id": rid},
            )
        )
        with span_cm as span:
            try:
                await self.app(scope, receive, decorate)
            finally:
                route = _route_template(scope)
                self.metrics.request_seconds.labels(route=route, status=str(status)).observe(
                    time.perf_counter() - start
                )
                if span is not None:
                    span.update_name(f"{scope.get('method', 'HTTP')} {route}")
                    span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(trace.Status(trace.StatusCode.ERROR))


def _route_template(scope: asgi.Scope) -> str:
    # Templates, not paths: a label per conversation id would grow without bound.
    route = scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) else "unmatched"


def install(
    app: fastapi.FastAPI, *, max_bytes: int, metrics: telemetry.Metrics, tracer: trace.Tracer
) -> None:
    """Add the middlewares; added innermost first: Observe wraps CatchAll wraps BodyLimit."""
    app.add_middleware(BodyLimitMiddleware, max_bytes=max_bytes)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(ObserveMiddleware, metrics=metrics, tracer=tracer)
