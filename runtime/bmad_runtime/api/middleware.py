"""The ASGI middleware around every route: `EdgeMiddleware`.

It gives each request an id, adds the security headers, observes the request histogram
and opens one span; turns an unhandled error into a bare 500 that names the request id,
never a stack trace; and answers 413 to a body larger than the runtime accepts, declared
or streamed. One layer, not one per concern: on the hottest route each layer's
coroutine and wrapped ``send`` showed in the profile (docs/benchmarks.md, bench/runtime).
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
# The span context of a request that is not traced: one for all (a nullcontext keeps no
# state), not one made per request.
_NO_SPAN: contextlib.nullcontext[None] = contextlib.nullcontext()


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


class RequestTooLargeError(starlette_exceptions.HTTPException):
    # An HTTPException, so that FastAPI's body parsing re-raises it as it is.
    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is larger than {limit} bytes")


class EdgeMiddleware:
    """Everything at the edge of a request, in one pure ASGI layer (each layer costs a
    coroutine and a wrapped ``send`` per request), outermost concern first:

    - a request id (the caller's ``X-Request-ID`` when it is plain, else a new one),
      sent back with the security headers;
    - the request histogram, and one span when tracing records;
    - an unhandled error is logged and answered with a bare 500 that names the request
      id, never a stack trace;
    - a body larger than ``max_bytes``, declared or streamed, is answered 413.
    """

    def __init__(
        self,
        app: asgi.ASGIApp,
        *,
        max_bytes: int,
        metrics: telemetry.Metrics,
        tracer: trace.Tracer,
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.metrics = metrics
        self.tracer = tracer
        self.tracing = not isinstance(tracer, trace.NoOpTracer)

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        incoming, declared = _read_headers(scope)
        rid = incoming if incoming and _REQUEST_ID.match(incoming) else new_request_id()
        scope[errors.REQUEST_ID_KEY] = rid
        ours = [*_SECURITY_RAW, (_REQUEST_ID_RAW, rid.encode("latin-1"))]
        status = 500
        started = False

        async def decorate(message: asgi.Message) -> None:
            nonlocal status, started
            if message["type"] == "http.response.start":
                started = True
                status = message["status"]
                headers = [
                    item for item in message.get("headers", ()) if item[0].lower() not in _OURS
                ]
                headers += ours
                message["headers"] = headers
            await send(message)

        path: str = scope.get("path", "")
        span_cm: contextlib.AbstractContextManager[trace.Span | None] = (
            _NO_SPAN
            if path in _UNTRACED or not self.tracing
            else self.tracer.start_as_current_span(
                scope.get("method", "HTTP"),
                kind=trace.SpanKind.SERVER,
                attributes={"http.request.method": scope.get("method", ""), "bmad.request_id": rid},
            )
        )
        with span_cm as span:
            try:
                if declared is not None and declared > self.max_bytes:
                    await self._too_large(scope, receive, decorate, rid)
                else:
                    await self.app(scope, self._limited(receive), decorate)
            except Exception:
                logger.exception(
                    "unhandled error in %s %s (request %s)",
                    scope.get("method"),
                    scope.get("path"),
                    rid,
                )
                if not started:  # else the status is out; the server closes the connection
                    response = errors.error_response(
                        500,
                        "internal_error",
                        "the agent runtime failed to handle this request; quote request id "
                        f"{rid} when reporting it",
                        request_id=rid,
                    )
                    await response(scope, receive, decorate)
            finally:
                route = _route_template(scope)
                self.metrics.observe_request(route, status, time.perf_counter() - start)
                if span is not None:
                    span.update_name(f"{scope.get('method', 'HTTP')} {route}")
                    span.set_attribute("http.route", route)
                    span.set_attribute("http.response.status_code", status)
                    if status >= 500:
                        span.set_status(trace.Status(trace.StatusCode.ERROR))

    async def _too_large(
        self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send, rid: str
    ) -> None:
        response = errors.error_response(
            413,
            "request_too_large",
            RequestTooLargeError(self.max_bytes).detail,
            request_id=rid,
        )
        await response(scope, receive, send)

    def _limited(self, receive: asgi.Receive) -> asgi.Receive:
        """``receive``, refusing a body that grows past ``max_bytes`` as it streams."""
        received = 0
        limit = self.max_bytes

        async def limited() -> asgi.Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise RequestTooLargeError(limit)
            return message

        return limited


_REQUEST_ID_RAW = REQUEST_ID_HEADER.lower().encode("latin-1")
_SECURITY_RAW = [
    (name.lower().encode("latin-1"), value.encode("latin-1"))
    for name, value in SECURITY_HEADERS.items()
]
# The response headers this middleware sets: a route's own value of one is replaced.
_OURS = frozenset({_REQUEST_ID_RAW, *(name for name, _ in _SECURITY_RAW)})


def _read_headers(scope: asgi.Scope) -> tuple[str | None, int | None]:
    """The request's ``X-Request-ID`` and declared ``Content-Length`` (if a number), in
    one pass over the raw headers (ASGI servers send header names lowercased)."""
    incoming: str | None = None
    declared: int | None = None
    for name, value in scope.get("headers", ()):
        if name == _REQUEST_ID_RAW and incoming is None:
            incoming = value.decode("latin-1")
        elif name == b"content-length" and declared is None:
            text = value.decode("latin-1")
            declared = int(text) if text.isascii() and text.isdigit() else None
    return incoming, declared


def _route_template(scope: asgi.Scope) -> str:
    # Templates, not paths: a label per conversation id would grow without bound.
    route = scope.get("route")
    template = getattr(route, "path", None)
    return template if isinstance(template, str) else "unmatched"


def install(
    app: fastapi.FastAPI, *, max_bytes: int, metrics: telemetry.Metrics, tracer: trace.Tracer
) -> None:
    """Add the edge middleware (the one layer of the runtime's own around every route)."""
    app.add_middleware(EdgeMiddleware, max_bytes=max_bytes, metrics=metrics, tracer=tracer)
