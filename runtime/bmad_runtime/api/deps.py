"""What routes depend on: the runtime's shared state, the caller, the request id.

Each is an `Annotated` alias (`State`, `Invoker`, `Reader`, `Deleter`, `RequestId`,
`ConversationId`), so a route declares what it needs in its signature. The state is
`RuntimeState`, which the app factory puts on ``app.state.runtime``; the wiring of the
production app (`bmad_runtime.wiring`) fills in its real parts at startup.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Annotated, cast

import fastapi
from starlette import requests as starlette_requests

from bmad_runtime import config as config_mod
from bmad_runtime import ports, telemetry
from bmad_runtime import settings as settings_mod
from bmad_runtime.api import errors
from bmad_runtime.providers import router as providers_router

SCOPE_INVOKE = "agent:invoke"
SCOPE_READ = "conversations:read"
SCOPE_DELETE = "conversations:delete"
ALL_SCOPES = frozenset({SCOPE_INVOKE, SCOPE_READ, SCOPE_DELETE})

# Conversation ids the API accepts (the stores accept more; this keeps URLs plain).
CONVERSATION_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:\-]{0,127}$"


@dataclass
class RuntimeState:
    """What the routes share; `wiring.create_default_app` fills in the real parts at startup."""

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


def require(scope: str) -> Callable[[starlette_requests.Request], Awaitable[ports.Principal]]:
    """A dependency: the caller, authenticated and holding ``scope``."""

    async def authorized(request: starlette_requests.Request) -> ports.Principal:
        return await state_of(request).authorize(request.headers.get("authorization"), scope)

    authorized.__name__ = f"require_{scope.replace(':', '_')}"
    return authorized


async def request_id(request: starlette_requests.Request) -> str | None:
    return errors.request_id_of(request.scope)


State = Annotated[RuntimeState, fastapi.Depends(get_state)]
Invoker = Annotated[ports.Principal, fastapi.Depends(require(SCOPE_INVOKE))]
Reader = Annotated[ports.Principal, fastapi.Depends(require(SCOPE_READ))]
Deleter = Annotated[ports.Principal, fastapi.Depends(require(SCOPE_DELETE))]
RequestId = Annotated[str | None, fastapi.Depends(request_id)]
ConversationId = Annotated[
    str,
    fastapi.Path(
        min_length=1,
        max_length=128,
        pattern=CONVERSATION_ID_PATTERN,
        description="A conversation id, as returned by POST /v1/invoke.",
    ),
]
