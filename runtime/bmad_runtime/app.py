"""The agent runtime's HTTP app: the factory, its shared state and its guard rails.

`create_app` builds a FastAPI app from what it is handed (settings, a conversation
store, the model router, an optional authenticator and limiter), so tests run it with
fakes; `create_default_app` builds the real ones from the environment when the app
starts (lifespan) and is what `main.run` serves.

Everything a route needs comes through `Annotated` dependencies defined here
(`State`, `Invoker`, `Reader`, `Deleter`); each resource has its router module
(`api_invoke`, `api_conversations`, `api_health`). Around the routes, three ASGI
middlewares: `ObserveMiddleware` (request id, security headers, metrics, one span per
request), `CatchAllMiddleware` (any unhandled error becomes a generic 500 that
names the request id, never a stack trace) and `BodyLimitMiddleware` (413). Every
error has the body ``{"error": {"code", "message", ...}}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import itertools
import logging
import os
import re
import secrets
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, cast

import fastapi
import fastapi.exceptions
import pydantic
import pydantic.alias_generators
from opentelemetry import trace
from starlette import datastructures
from starlette import exceptions as starlette_exceptions
from starlette import requests as starlette_requests
from starlette import types as asgi

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_runtime import bindings as bindings_mod
from bmad_runtime import config as config_mod
from bmad_runtime import fakes, ports, telemetry
from bmad_runtime import settings as settings_mod
from bmad_runtime.providers import base as providers_base
from bmad_runtime.providers import router as providers_router

logger = logging.getLogger(__name__)

SCOPE_INVOKE = "agent:invoke"
SCOPE_READ = "conversations:read"
SCOPE_DELETE = "conversations:delete"
ALL_SCOPES = frozenset({SCOPE_INVOKE, SCOPE_READ, SCOPE_DELETE})

REQUEST_ID_HEADER = "X-Request-ID"
SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}
# Routes that are probed constantly: measured, but not traced.
_UNTRACED = frozenset({"/healthz", "/readyz", "/metrics"})
# Conversation ids the API accepts (the stores accept more; this keeps URLs plain).
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_REQUEST_ID_KEY = "bmad.request_id"
# Request ids: unique per process start, then a counter (cheaper than uuid4 per request).
_ID_PREFIX = secrets.token_hex(6)
_ID_COUNTER = itertools.count(1)


def new_request_id() -> str:
    return f"{_ID_PREFIX}-{next(_ID_COUNTER):x}"


READY_TIMEOUT_SECONDS = 2.0


# --- error bodies -------------------------------------------------------------------


class FieldError(pydantic.BaseModel):
    field: str = pydantic.Field(description="Where: body.input, query.limit, path.id, ...")
    message: str
    type: str = pydantic.Field(description="Machine-readable kind of problem.")


class ErrorDetail(pydantic.BaseModel):
    code: str = pydantic.Field(description="Machine-readable error code, snake_case.")
    message: str = pydantic.Field(description="What went wrong and, where possible, the fix.")
    request_id: str | None = pydantic.Field(
        default=None, description="Quote it when reporting a problem."
    )
    details: list[FieldError] | None = pydantic.Field(
        default=None, description="Per-field problems of a 422."
    )

    model_config = pydantic.ConfigDict(
        alias_generator=pydantic.alias_generators.to_camel, populate_by_name=True
    )


class ErrorBody(pydantic.BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """An error a route raises on purpose: status, code and a message for the caller."""

    def __init__(
        self, status: int, code: str, message: str, *, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def rate_limited(wait: float, *, message: str | None = None) -> ApiError:
    seconds = max(1, int(wait + 0.999))
    return ApiError(
        429,
        "rate_limited",
        message or f"the rate limit of this tenant is reached: retry in {seconds}s",
        headers={"Retry-After": str(seconds)},
    )


_DESCRIPTIONS = {
    400: "The body cannot be read (for instance, it is not UTF-8).",
    401: "No, or an invalid, Bearer token.",
    403: "The token lacks the scope this call needs, or is for another tenant.",
    404: "No such conversation (for this tenant and agent).",
    413: "The request body is larger than the runtime accepts.",
    422: "The request is invalid; `details` names each field.",
    429: "Rate limited: retry after `Retry-After` seconds.",
    500: "Internal error; the body names the request id, nothing else.",
    502: "No model of the chain (primary and fallbacks) could answer.",
    503: "The model provider is rate limiting every model of the chain.",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route may answer."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _DESCRIPTIONS[status]}
        if status == 429:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        out[status] = entry
    return out


def error_payload(
    code: str,
    message: str,
    *,
    request_id: str | None,
    details: list[FieldError] | None = None,
) -> dict[str, Any]:
    detail = ErrorDetail(code=code, message=message, request_id=request_id, details=details)
    return ErrorBody(error=detail).model_dump(mode="json", by_alias=True, exclude_none=True)


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None,
    headers: dict[str, str] | None = None,
    details: list[FieldError] | None = None,
) -> fastapi.responses.JSONResponse:
    return fastapi.responses.JSONResponse(
        error_payload(code, message, request_id=request_id, details=details),
        status_code=status,
        headers=headers,
    )


def request_id_of(scope: asgi.Scope) -> str | None:
    value = scope.get(_REQUEST_ID_KEY)
    return value if isinstance(value, str) else None


# --- shared state and dependencies ----------------------------------------------------


@dataclass
class RuntimeState:
    """What the routes share; `create_default_app` fills in the real parts at startup."""

    settings: settings_mod.RuntimeSettings
    config: config_mod.AgentConfig
    store: ports.ConversationStore
    router: providers_router.ModelRouter
    authenticator: ports.Authenticator | None
    limiter: ports.Limiter | None
    metrics: telemetry.Metrics
    tracing: telemetry.Tracing
    # spec.limits.concurrency: model calls in flight at once in this replica.
    slots: asyncio.Semaphore | None = None

    @property
    def tenant(self) -> str:
        return self.settings.effective_tenant

    @property
    def agent(self) -> str:
        return self.settings.agent_name

    async def authorize(self, authorization: str | None, scope: str) -> ports.Principal:
        if self.authenticator is None:
            return ports.Principal(subject="anonymous", tenant=self.tenant, scopes=ALL_SCOPES)
        principal = await self.authenticator.authenticate(authorization)
        if principal.tenant != self.tenant:
            raise ports.AuthError(
                403,
                "wrong_tenant",
                f"the token is for tenant {principal.tenant!r}; this agent serves tenant "
                f"{self.tenant!r}",
            )
        if scope not in principal.scopes:
            raise ports.AuthError(
                403, "insufficient_scope", f"this call needs a token with scope {scope!r}"
            )
        return principal


def state_of(request: starlette_requests.Request) -> RuntimeState:
    return cast(RuntimeState, request.app.state.runtime)


# Dependencies are coroutines: FastAPI runs a plain function in a worker thread.
async def get_state(request: starlette_requests.Request) -> RuntimeState:
    return state_of(request)


State = Annotated[RuntimeState, fastapi.Depends(get_state)]


def require(scope: str) -> Callable[[starlette_requests.Request], Awaitable[ports.Principal]]:
    """A dependency: the caller, authenticated and holding ``scope``."""

    async def authorized(request: starlette_requests.Request) -> ports.Principal:
        return await state_of(request).authorize(request.headers.get("authorization"), scope)

    authorized.__name__ = f"require_{scope.replace(':', '_')}"
    return authorized


async def request_id(request: starlette_requests.Request) -> str | None:
    return request_id_of(request.scope)


Invoker = Annotated[ports.Principal, fastapi.Depends(require(SCOPE_INVOKE))]
Reader = Annotated[ports.Principal, fastapi.Depends(require(SCOPE_READ))]
Deleter = Annotated[ports.Principal, fastapi.Depends(require(SCOPE_DELETE))]
RequestId = Annotated[str | None, fastapi.Depends(request_id)]


# --- middlewares ----------------------------------------------------------------------


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
            response = error_response(
                413,
                "request_too_large",
                RequestTooLargeError(self.max_bytes).detail,
                request_id=request_id_of(scope),
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
            rid = request_id_of(scope)
            logger.exception(
                "unhandled error in %s %s (request %s)", scope.get("method"), scope.get("path"), rid
            )
            if started:
                return  # the status is out; the server closes the connection
            response = error_response(
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
        scope[_REQUEST_ID_KEY] = rid
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


# --- exception handlers ---------------------------------------------------------------


def _http_code(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


async def _on_http_exception(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, starlette_exceptions.HTTPException)
    code = "request_too_large" if exc.status_code == 413 else _http_code(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else _http_code(exc.status_code)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.url.path}: see /openapi.json for this API"
    elif exc.status_code == 400 and message == "There was an error parsing the body":
        code, message = "unreadable_body", "the request body cannot be read: send UTF-8 JSON"
    return error_response(
        exc.status_code,
        code,
        message,
        request_id=request_id_of(request.scope),
        headers=dict(exc.headers) if exc.headers else None,
    )


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc) or "(request)"


async def _on_validation_error(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, fastapi.exceptions.RequestValidationError)
    # Never the offending input: it may be a secret the caller pasted in the wrong place.
    details = [
        FieldError(
            field=_field_path(err.get("loc", ())),
            message=str(err.get("msg", "invalid")),
            type=str(err.get("type", "invalid")),
        )
        for err in exc.errors()
    ]
    summary = "; ".join(f"{d.field}: {d.message}" for d in details[:5])
    more = f" (and {len(details) - 5} more)" if len(details) > 5 else ""
    return error_response(
        422,
        "validation_error",
        f"the request is invalid: {summary}{more}",
        request_id=request_id_of(request.scope),
        details=details,
    )


async def _on_auth_error(request: starlette_requests.Request, exc: Exception) -> fastapi.Response:
    assert isinstance(exc, ports.AuthError)
    headers = {"WWW-Authenticate": 'Bearer realm="bmad-agent"'} if exc.status == 401 else None
    return error_response(
        exc.status, exc.code, exc.message, request_id=request_id_of(request.scope), headers=headers
    )


async def _on_api_error(request: starlette_requests.Request, exc: Exception) -> fastapi.Response:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status,
        exc.code,
        exc.message,
        request_id=request_id_of(request.scope),
        headers=exc.headers or None,
    )


def model_failure(exc: providers_router.AllProvidersFailedError) -> ApiError:
    if exc.rate_limited:
        wait = exc.retry_after or 1.0
        seconds = max(1, int(wait + 0.999))
        return ApiError(
            503,
            "model_rate_limited",
            f"every model of this agent is rate limited by its provider: retry in {seconds}s "
            f"({'; '.join(e.summary for e in exc.errors)})",
            headers={"Retry-After": str(seconds)},
        )
    return ApiError(502, "model_unavailable", exc.message)


async def _on_model_failure(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, providers_router.AllProvidersFailedError)
    return await _on_api_error(request, model_failure(exc))


# --- the factory ----------------------------------------------------------------------


Lifespan = Callable[[fastapi.FastAPI], contextlib.AbstractAsyncContextManager[None]]


class RuntimeApp(fastapi.FastAPI):
    """The FastAPI app, with the Bearer scheme in its OpenAPI document when auth is on."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        schema = super().openapi()
        state: RuntimeState = self.state.runtime
        if state.authenticator is not None:
            components = schema.setdefault("components", {})
            components.setdefault("securitySchemes", {})["bearerAuth"] = {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "A JWT from the tenant's auth0 Integration, with the scopes "
                f"{', '.join(sorted(ALL_SCOPES))} as each operation needs.",
            }
            for path, operations in schema.get("paths", {}).items():
                if path.startswith("/v1/"):
                    for operation in operations.values():
                        operation["security"] = [{"bearerAuth": []}]
        self.openapi_schema = schema
        return schema


def create_app(
    settings: settings_mod.RuntimeSettings,
    *,
    store: ports.ConversationStore,
    providers: providers_router.ModelRouter,
    authenticator: ports.Authenticator | None,
    limiter: ports.Limiter | None,
    config: config_mod.AgentConfig | None = None,
    metrics: telemetry.Metrics | None = None,
    lifespan: Lifespan | None = None,
) -> fastapi.FastAPI:
    """The runtime's HTTP app, serving with exactly the parts it is handed.

    ``authenticator=None`` turns authentication off (every caller is the anonymous
    principal of this agent's tenant); ``limiter=None`` turns rate limits off;
    ``config`` defaults to a bare agent of ``settings.agent_role`` on the router's
    primary model; ``lifespan`` runs inside the app's own (which closes the router and
    flushes traces at shutdown).
    """
    from bmad_runtime import api_conversations, api_health, api_invoke

    config = config or _default_config(settings, providers)
    tracing = telemetry.tracing(
        agent=settings.agent_name, namespace=settings.agent_namespace, role=settings.agent_role
    )
    metrics = metrics or telemetry.Metrics()
    if isinstance(providers.tracer, trace.NoOpTracer):
        providers.tracer = tracing.tracer
    state = RuntimeState(
        settings=settings,
        config=config,
        store=store,
        router=providers,
        authenticator=authenticator,
        limiter=limiter,
        metrics=metrics,
        tracing=tracing,
        slots=asyncio.Semaphore(config.limits.concurrency) if config.limits.concurrency else None,
    )

    @contextlib.asynccontextmanager
    async def run(app: fastapi.FastAPI) -> AsyncIterator[None]:
        try:
            if lifespan is None:
                yield
            else:
                async with lifespan(app):
                    yield
        finally:
            await providers.aclose()
            tracing.shutdown()

    app = RuntimeApp(
        title="BMAD agent runtime",
        version=_version(),
        description=(
            f"The HTTP API of BMAD agent {settings.agent_name!r} ({settings.agent_role}) in "
            f"namespace {settings.agent_namespace!r}: invoke the agent, read and delete its "
            'conversations, probe its health. Errors are `{"error": {"code", "message"}}`.'
        ),
        docs_url=None,
        redoc_url=None,
        lifespan=run,
    )
    app.state.runtime = state
    app.include_router(api_invoke.router)
    app.include_router(api_conversations.router)
    app.include_router(api_health.router)
    app.add_exception_handler(starlette_exceptions.HTTPException, _on_http_exception)
    app.add_exception_handler(fastapi.exceptions.RequestValidationError, _on_validation_error)
    app.add_exception_handler(ports.AuthError, _on_auth_error)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(providers_router.AllProvidersFailedError, _on_model_failure)
    # Added innermost first: Observe wraps CatchAll wraps BodyLimit wraps the routes.
    app.add_middleware(BodyLimitMiddleware, max_bytes=settings.max_request_bytes)
    app.add_middleware(CatchAllMiddleware)
    app.add_middleware(ObserveMiddleware, metrics=metrics, tracer=tracing.tracer)
    return app


def _default_config(
    settings: settings_mod.RuntimeSettings, providers: providers_router.ModelRouter
) -> config_mod.AgentConfig:
    primary = providers.primary
    provider = primary.name if primary.name in agent_api.MODEL_PROVIDERS else "echo"
    return config_mod.AgentConfig(
        agent=settings.agent_name,
        namespace=settings.agent_namespace,
        role=settings.agent_role,
        model=config_mod.ModelConfig(provider=provider, name=primary.model),
    )


def _version() -> str:
    try:
        from importlib import metadata

        return metadata.version("bmad-operator")
    except Exception:
        return "0.0.0"


# --- the production app -----------------------------------------------------------------


class StoreNotConnectedError(RuntimeError):
    def __init__(self) -> None:
        super().__init__("the conversation store is not connected yet")


class _StartingStore:
    """Stands in for the store until the lifespan has connected the real one."""

    async def append(self, turn: ports.Turn, *, tenant: str, agent: str) -> None:
        raise StoreNotConnectedError

    async def recent(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int
    ) -> list[ports.Turn]:
        raise StoreNotConnectedError

    async def history(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int = 100
    ) -> list[ports.Turn]:
        raise StoreNotConnectedError

    async def list_conversations(
        self, *, tenant: str, agent: str, limit: int = 50
    ) -> list[dict[str, Any]]:
        raise StoreNotConnectedError

    async def delete_conversation(self, conversation_id: str, *, tenant: str, agent: str) -> bool:
        raise StoreNotConnectedError

    async def record_usage(self, record: ports.UsageRecord) -> None:
        raise StoreNotConnectedError

    async def audit(
        self, *, tenant: str, agent: str, subject: str, action: str, detail: dict[str, Any]
    ) -> None:
        raise StoreNotConnectedError

    async def ping(self) -> bool:
        return False


class _StartingAuthenticator:
    """Refuses every caller until the lifespan has set up the real authenticator."""

    async def authenticate(self, authorization: str | None) -> ports.Principal:
        raise ports.AuthError(401, "starting", "the agent is starting: retry shortly")


def create_default_app(settings: settings_mod.RuntimeSettings | None = None) -> fastapi.FastAPI:
    """The production app: settings from the environment, real dependencies at startup.

    Reads agent.json and the bindings now (a broken config fails before serving), and
    connects the store, the authenticator and the limiter in the lifespan.
    """
    settings = settings or settings_mod.load()
    found = bindings_mod.read_bindings(settings.binding_root)
    agent_config = config_mod.load(settings.agent_config)
    policy = providers_base.RetryPolicy(
        attempts=settings.model_attempts,
        backoff=settings.model_backoff_seconds,
        backoff_max=settings.model_backoff_max_seconds,
        retry_after_max=settings.model_retry_after_max_seconds,
    )
    auth_on = (
        settings.auth_enabled
        if settings.auth_enabled is not None
        else any(b.type == "auth0" for b in found.values())
    )
    model_router = providers_router.build(
        agent_config.model,
        found,
        policy=policy,
        timeout=settings.model_timeout_seconds,
        ready_ttl=settings.ready_cache_seconds,
    )

    @contextlib.asynccontextmanager
    async def connect(app: fastapi.FastAPI) -> AsyncIterator[None]:
        state: RuntimeState = app.state.runtime
        async with contextlib.AsyncExitStack() as stack:
            state.store = await _connect_store(settings, agent_config, stack)
            if auth_on:
                state.authenticator = await _authenticator(settings, found, stack)
            else:
                logger.warning(
                    "authentication is off (no auth0 Integration bound, or "
                    "BMAD_AUTH_ENABLED=false): /v1/* is open"
                )
            state.limiter = await _limiter(settings, agent_config, stack)
            await _start_task_consumer(settings, state, stack)
            yield

    return create_app(
        settings,
        store=_StartingStore(),
        providers=model_router,
        authenticator=_StartingAuthenticator() if auth_on else None,
        limiter=None,
        config=agent_config,
        lifespan=connect,
    )


async def _connect_store(
    settings: settings_mod.RuntimeSettings,
    agent_config: config_mod.AgentConfig,
    stack: contextlib.AsyncExitStack,
) -> ports.ConversationStore:
    if settings.postgres_dsn and settings.redis_url:
        from bmad_runtime import memory

        store = await memory.PostgresRedisStore.connect(
            postgres_dsn=settings.postgres_dsn,
            redis_url=settings.redis_url,
            recent_turns=max(agent_config.memory.turns, 1),
            ttl_seconds=agent_config.memory.ttl_seconds,
        )
        stack.push_async_callback(store.close)
        return store
    if settings.postgres_dsn or settings.redis_url:
        have, missing, variable = (
            ("postgres", "redis", "BMAD_REDIS_URL")
            if settings.postgres_dsn
            else ("redis", "postgres", "BMAD_POSTGRES_DSN")
        )
        raise config_mod.ConfigError(
            f"the agent has a {have} datastore but no {missing} one: bind an Integration of "
            f"type {missing} (or set {variable})"
        )
    logger.warning(
        "no postgres and redis bindings: conversations are kept in this process only and are "
        "lost on restart (bind Integrations of type postgres and redis to keep them)"
    )
    return fakes.InMemoryStore()


async def _authenticator(
    settings: settings_mod.RuntimeSettings,
    found: Mapping[str, bindings_mod.Binding],
    stack: contextlib.AsyncExitStack,
) -> ports.Authenticator:
    from bmad_runtime import auth

    issuers = bindings_mod.of_type(found, "auth0")
    if not issuers:
        raise config_mod.ConfigError(
            "authentication is on but no Integration of type auth0 is bound: add one to "
            "spec.integrations (or set BMAD_AUTH_ENABLED=false for a demo)"
        )
    if len(issuers) > 1:
        logger.warning(
            "several auth0 bindings (%s): tokens are verified against %r",
            ", ".join(b.name for b in issuers),
            issuers[0].name,
        )
    authenticator = auth.JwtAuthenticator.from_settings(
        issuers[0].auth0(), tenant=settings.effective_tenant
    )
    stack.push_async_callback(authenticator.aclose)
    return authenticator


async def _limiter(
    settings: settings_mod.RuntimeSettings,
    agent_config: config_mod.AgentConfig,
    stack: contextlib.AsyncExitStack,
) -> ports.Limiter | None:
    limits = agent_config.limits
    if limits.requests_per_minute is None and limits.tokens_per_minute is None:
        return None
    if not settings.redis_url:
        logger.warning("spec.limits is set but no redis is bound: rate limits are not enforced")
        return None
    import redis.asyncio

    from bmad_runtime import ratelimit

    client = redis.asyncio.Redis.from_url(settings.redis_url)
    stack.push_async_callback(client.aclose)
    return ratelimit.RedisLimiter(
        client,
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
    )


async def _start_task_consumer(
    settings: settings_mod.RuntimeSettings,
    state: RuntimeState,
    stack: contextlib.AsyncExitStack,
) -> None:
    """Consume the agent's task stream next to the HTTP API, while Redis is bound.

    Shutdown (the lifespan's end, on SIGTERM) stops reading, lets in-flight tasks finish
    within the grace period and leaves the rest pending for another replica.
    """
    if not settings.redis_url or not settings.task_bus_enabled:
        return
    from bmad_runtime import api_invoke, bus

    task_bus = bus.TaskBus.from_url(settings.redis_url, tenant=state.tenant, agent=state.agent)
    stop = asyncio.Event()
    consumer = f"{socket.gethostname()}-{os.getpid()}"

    async def handle(task: bus.Task) -> dict[str, Any]:
        # One span per task, as per request (a no-op without an exporter).
        with state.tracing.tracer.start_as_current_span(
            "task",
            kind=trace.SpanKind.CONSUMER,
            attributes={"bmad.task_id": task.task_id, "bmad.task_attempt": task.attempt},
        ):
            return await api_invoke.run_task(state, dict(task.payload))

    async def depth() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                state.metrics.queue_depth.set(await task_bus.queue_depth())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=5)

    consuming = asyncio.create_task(
        task_bus.consume(handle, consumer_name=consumer, stop=stop, grace_s=20.0),
        name="task-consumer",
    )
    gauge = asyncio.create_task(depth(), name="queue-depth")

    async def shutdown() -> None:
        stop.set()
        for task in (consuming, gauge):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        await task_bus.aclose()

    stack.push_async_callback(shutdown)
