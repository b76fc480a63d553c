"""What routes depend on: the runtime's shared state, the caller, the request id.

Each is an `Annotated` alias (`State`, `Reader`, `Deleter`, `RequestId`,
`ConversationId`), so a route declares what it needs in its signature. The state is
`RuntimeState`, which the app factory puts on ``app.state.runtime``; the wiring of the
production app (`bmad_runtime.wiring`) fills in its real parts at startup.

The hottest route, ``POST /v1/invoke``, takes its caller from `authorized_route`
instead of a dependency: the route class authenticates before FastAPI reads the body,
and a dependency of its own cost FastAPI a second resolution pass per request
(docs/benchmarks.md, bench/runtime).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any

import fastapi
import fastapi.routing
from starlette import requests as starlette_requests

from bmad_integrations import base as integrations_base
from bmad_runtime import ports, schemas, telemetry, turns
from bmad_runtime import settings as settings_mod
from bmad_runtime.api import errors
from bmad_runtime.bus import consumer as bus_consumer

SCOPE_INVOKE = "agent:invoke"
SCOPE_READ = "conversations:read"
SCOPE_DELETE = "conversations:delete"
# Conversations belong to the subject that started them; these widen reading and
# deleting to every subject's (with SCOPE_READ / SCOPE_DELETE).
SCOPE_READ_ALL = "conversations:read:all"
SCOPE_DELETE_ALL = "conversations:delete:all"
ALL_SCOPES = frozenset({SCOPE_INVOKE, SCOPE_READ, SCOPE_DELETE, SCOPE_READ_ALL, SCOPE_DELETE_ALL})


@dataclass(kw_only=True)
class RuntimeState(turns.Services):
    """What the routes share: what a turn uses, plus the settings, auth and tracing.

    `wiring.create_default_app` fills in the real store, authenticator and limiter at
    startup.
    """

    settings: settings_mod.RuntimeSettings
    authenticator: ports.Authenticator | None
    tracing: telemetry.Tracing
    # Why the store cannot be used (durable memory without its datastores), for /readyz.
    store_problem: str | None = None
    # The task consumer's state, for /readyz; None when this replica runs no consumer.
    bus: bus_consumer.ConsumerHealth | None = None
    # Why no caller can be authenticated (jwt without an auth0 binding), for /readyz.
    auth_problem: str | None = None
    # How the connection to each datastore travels (tls-verified, tls-unverified,
    # plaintext), for /readyz; empty until the durable store is connected.
    datastores: dict[str, integrations_base.Transport] = dataclasses.field(default_factory=dict)

    @functools.cached_property
    def anonymous(self) -> ports.Principal:
        """Every caller while authentication is off: the tenant's anonymous principal."""
        return ports.Principal(subject="anonymous", tenant=self.tenant, scopes=ALL_SCOPES)

    async def authorize(self, authorization: str | None, scope: str) -> ports.Principal:
        if self.authenticator is None:
            return self.anonymous
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


def owner_filter(caller: ports.Principal, all_scope: str) -> str | None:
    """Whose conversations the caller may reach: its own, or everyone's (None) with
    `all_scope`."""
    return None if all_scope in caller.scopes else caller.subject


def state_of(request: starlette_requests.Request) -> RuntimeState:
    # By key: Starlette's `State` finds an attribute in `__getattr__`, after the ordinary
    # lookup has raised and caught an AttributeError (twice per invoke).
    state: RuntimeState = request.scope["app"].state["runtime"]
    return state


# Dependencies are coroutines: FastAPI runs a plain function in a worker thread.
async def get_state(request: starlette_requests.Request) -> RuntimeState:
    return state_of(request)


async def caller_holding(request: starlette_requests.Request, scope: str) -> ports.Principal:
    """The caller, authenticated and holding ``scope`` (`ports.AuthError` if not)."""
    state = state_of(request)
    if state.authenticator is None:  # no header to read
        return state.anonymous
    return await state.authorize(request.headers.get("authorization"), scope)


def require(scope: str) -> Callable[[starlette_requests.Request], Awaitable[ports.Principal]]:
    """A dependency: the caller, authenticated and holding ``scope``."""

    async def authorized(request: starlette_requests.Request) -> ports.Principal:
        return await caller_holding(request, scope)

    authorized.__name__ = f"require_{scope.replace(':', '_')}"
    return authorized


# Where `authorized_route` keeps the caller in the ASGI scope.
CALLER_KEY = "bmad.caller"

Handler = Callable[[starlette_requests.Request], Coroutine[Any, Any, fastapi.Response]]


def authorized_route(scope: str) -> type[fastapi.routing.APIRoute]:
    """A route class (``APIRouter(route_class=...)``) whose routes authenticate the
    caller, holding ``scope``, before FastAPI reads or validates the body; the route
    takes the principal with `caller_of`.

    What a `require` dependency does, without FastAPI's resolution pass for it: an
    unauthenticated request is refused before its body is read, parsed or validated.
    """

    class AuthorizedRoute(fastapi.routing.APIRoute):
        def get_route_handler(self) -> Handler:
            handler = super().get_route_handler()

            async def authorized(request: starlette_requests.Request) -> fastapi.Response:
                request.scope[CALLER_KEY] = await caller_holding(request, scope)
                return await handler(request)

            return authorized

    AuthorizedRoute.__name__ = AuthorizedRoute.__qualname__ = (
        f"RouteRequiring_{scope.replace(':', '_')}"
    )
    return AuthorizedRoute


def caller_of(request: starlette_requests.Request) -> ports.Principal:
    """The caller that `authorized_route` authenticated for this request."""
    caller = request.scope.get(CALLER_KEY)
    if not isinstance(caller, ports.Principal):
        raise RuntimeError("caller_of() on a route that is not an authorized_route")
    return caller


async def request_id(request: starlette_requests.Request) -> str | None:
    return errors.request_id_of(request.scope)


State = Annotated[RuntimeState, fastapi.Depends(get_state)]
Reader = Annotated[ports.Principal, fastapi.Depends(require(SCOPE_READ))]
Deleter = Annotated[ports.Principal, fastapi.Depends(require(SCOPE_DELETE))]
RequestId = Annotated[str | None, fastapi.Depends(request_id)]
ConversationId = Annotated[
    str,
    fastapi.Path(
        min_length=1,
        max_length=128,
        pattern=schemas.CONVERSATION_ID_PATTERN,
        description="A conversation id, as returned by POST /v1/invoke.",
    ),
]
