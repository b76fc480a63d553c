"""The agent runtime's HTTP app, built from exactly the parts it is handed.

`create_app` takes settings, a conversation store, the model router and an optional
authenticator and limiter, so tests build it with whatever stand-ins they need. It
puts the shared `api.deps.RuntimeState` on ``app.state.runtime``, includes one router
per resource (`api.routes.invoke`, `.conversations`, `.health`), installs the error
handlers (`api.errors`) and the middlewares (`api.middleware`). It connects nothing:
the production app, which reads the environment and connects real clients at startup,
is `wiring.create_default_app`.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from importlib import metadata
from typing import Any

import fastapi
from opentelemetry import trace

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_runtime import config as config_mod
from bmad_runtime import ports, streams, telemetry
from bmad_runtime import settings as settings_mod
from bmad_runtime.api import deps, errors, middleware
from bmad_runtime.api.routes import conversations, health, invoke
from bmad_runtime.providers import router as providers_router

Lifespan = Callable[[fastapi.FastAPI], contextlib.AbstractAsyncContextManager[None]]


class RuntimeApp(fastapi.FastAPI):
    """The FastAPI app, with the Bearer scheme in its OpenAPI document when auth is on."""

    def openapi(self) -> dict[str, Any]:
        if self.openapi_schema is not None:
            return self.openapi_schema
        schema = super().openapi()
        state: deps.RuntimeState = self.state.runtime
        if state.authenticator is not None:
            components = schema.setdefault("components", {})
            components.setdefault("securitySchemes", {})["bearerAuth"] = {
                "type": "http",
                "scheme": "bearer",
                "bearerFormat": "JWT",
                "description": "A JWT from the tenant's auth0 Integration, with the scopes "
                f"{', '.join(sorted(deps.ALL_SCOPES))} as each operation needs.",
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
    config = config or _default_config(settings, providers)
    tracing = telemetry.tracing(
        agent=settings.agent_name, namespace=settings.agent_namespace, role=settings.agent_role
    )
    metrics = metrics or telemetry.Metrics(
        labels=telemetry.agent_labels(
            namespace=settings.agent_namespace,
            agent=settings.agent_name,
            tenant=settings.effective_tenant,
        )
    )
    if isinstance(providers.tracer, trace.NoOpTracer):
        providers.tracer = tracing.tracer
    if providers.observer is None:
        providers.observer = metrics.record_operation
    state = deps.RuntimeState(
        tenant=settings.effective_tenant,
        agent=settings.agent_key,
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
    async def serving() -> AsyncIterator[None]:
        try:
            yield
        finally:
            # Records of streams left early, while the store is still connected.
            await streams.drain(state)

    @contextlib.asynccontextmanager
    async def run(app: fastapi.FastAPI) -> AsyncIterator[None]:
        try:
            async with contextlib.AsyncExitStack() as stack:
                if lifespan is not None:
                    await stack.enter_async_context(lifespan(app))
                await stack.enter_async_context(serving())
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
        # The runtime makes its own span and metrics per request (`api.middleware`):
        # FastAPI's own telemetry stays off, and costs no check per request.
        telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False},
    )
    app.state.runtime = state
    _add_routes(app, invoke.router, conversations.router, health.router)
    errors.install(app)
    middleware.install(
        app, max_bytes=settings.max_request_bytes, metrics=metrics, tracer=tracing.tracer
    )
    return app


def _add_routes(app: fastapi.FastAPI, *routers: fastapi.APIRouter) -> None:
    """The routers' routes, on the app's own router, in order.

    Not ``include_router``: FastAPI (0.16x) includes a router lazily and matched every
    request through the included routers' layers (their version check, scope keys and
    a second match: about a tenth of the bytecode an invoke ran, bench/runtime), where
    a flat list is matched as the bare endpoint's routes are. Each route is whole
    already (its router's prefix, tags, responses and route class are applied when it
    is declared). One thing is lost, and the runtime does not use it:
    ``app.dependency_overrides`` do not reach these routes (tests build the app from
    the parts they want instead).
    """
    for router in routers:
        app.router.routes.extend(router.routes)


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
        return metadata.version("bmad-operator")
    except metadata.PackageNotFoundError:
        return "0.0.0"
