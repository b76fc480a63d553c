"""Probes and metrics: ``/healthz`` (alive), ``/readyz`` (can serve), ``/metrics``.

Kubernetes restarts a pod whose liveness fails, so ``/healthz`` checks nothing but the
process; ``/readyz`` takes the pod out of its Service while the conversation store cannot
be reached, while no caller can be authenticated (``spec.auth.mode: jwt`` without an
auth0 binding), or while the task consumer does not read the agent's stream (Redis
unreachable: ``checks.bus``): what this replica itself lacks. The model APIs are probed
and reported (each model of the chain, the probe cached, see
`providers.router.ModelRouter.probe`) but do not decide readiness: every replica shares
them, so an outage of the primary would take every replica out at once and leave the
fallbacks nobody to serve. It also names the memory mode (``spec.memory.store``), the
auth mode (``spec.auth.mode``) and, when something is missing, what to bind. None of
them needs a token.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Literal

import fastapi
import prometheus_client
import pydantic
import pydantic.alias_generators

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_integrations import base as integrations_base
from bmad_runtime.api import deps

logger = logging.getLogger(__name__)

router = fastapi.APIRouter(tags=["health"])

READY_TIMEOUT_SECONDS = 2.0
NO_MODEL = (
    "no model of the chain answers its API's probe (see models): invokes fail until one "
    "does; check the llm Integrations' status and the providers' own status pages"
)


class Health(pydantic.BaseModel):
    status: Literal["ok"] = "ok"


class ReadyChecks(pydantic.BaseModel):
    store: bool = pydantic.Field(description="The conversation store answers its ping.")
    model: bool = pydantic.Field(
        description="Some model of the chain (the primary or a fallback) answers its API's "
        "probe. Reported only: the model APIs do not decide readiness."
    )
    auth: bool = pydantic.Field(
        description="Callers can be authenticated: spec.auth.mode is none, or jwt with an "
        "auth0 Integration bound."
    )
    bus: bool | None = pydantic.Field(
        default=None,
        description="The task consumer reads the agent's stream; null when this replica "
        "consumes no tasks (no Redis bound, or the store is not available).",
    )


class ModelCheck(pydantic.BaseModel):
    provider: str
    model: str
    reachable: bool = pydantic.Field(description="The model's API answered its probe.")


class Readiness(pydantic.BaseModel):
    status: Literal["ready", "not-ready"]
    checks: ReadyChecks
    models: list[ModelCheck] = pydantic.Field(
        description="Each model of the chain, the primary first, and whether its API answers."
    )
    memory_store: agent_api.MemoryStore = pydantic.Field(
        description="spec.memory.store: durable (PostgreSQL and Redis) or inProcess (this "
        "process only, lost on restart)."
    )
    auth_mode: agent_api.AuthMode = pydantic.Field(
        description="spec.auth.mode: jwt (Bearer JWTs of the auth0 Integration) or none "
        "(no authentication: every caller may do everything)."
    )
    datastores: dict[str, integrations_base.Transport] = pydantic.Field(
        default_factory=dict,
        description="How the connection to each datastore of the durable store "
        "(postgres, redis) travels: tls-verified (encrypted, the certificate checked), "
        "tls-unverified (encrypted, the certificate not checked: sslMode require "
        "without a CA, or allow/prefer without a CA) or plaintext (not encrypted). "
        "Empty when no durable store is connected.",
    )
    message: str | None = pydantic.Field(
        default=None,
        description="Why the agent is not ready and what to change, when known; or, while "
        "ready, that no model of the chain answers (invokes fail until one does).",
    )

    model_config = pydantic.ConfigDict(
        alias_generator=pydantic.alias_generators.to_camel, populate_by_name=True
    )


async def _check(name: str, probe: asyncio.Future[bool] | asyncio.Task[bool]) -> bool:
    try:
        return await asyncio.wait_for(probe, timeout=READY_TIMEOUT_SECONDS)
    except TimeoutError:
        logger.warning("readiness: the %s did not answer within %ss", name, READY_TIMEOUT_SECONDS)
    except Exception as exc:
        logger.warning("readiness: the %s check failed: %s", name, type(exc).__name__)
    return False


@router.get("/healthz", response_model=Health, summary="Liveness: the process serves HTTP")
async def healthz() -> Health:
    return Health()


@router.get(
    "/readyz",
    response_model=Readiness,
    summary="Readiness: the store is reachable and callers can be authenticated",
    responses={503: {"model": Readiness, "description": "Not ready: see `checks`."}},
)
async def readyz(state: deps.State, response: fastapi.Response) -> Readiness:
    store_ok, models = await asyncio.gather(
        _check("conversation store", asyncio.ensure_future(state.store.ping())),
        state.router.probe(within=READY_TIMEOUT_SECONDS),
    )
    model_ok = any(m.reachable for m in models)
    problems = [
        *(
            [state.store_problem or "the conversation store does not answer"]
            if not store_ok
            else []
        ),
        *([state.auth_problem] if state.auth_problem else []),
    ]
    bus_ok = state.bus.consuming if state.bus is not None else None
    if state.bus is not None and not bus_ok:
        problems.append(state.bus.problem or "the task consumer does not read its stream")
    if problems:
        response.status_code = 503
    notes = [] if model_ok else [NO_MODEL]
    return Readiness(
        status="not-ready" if problems else "ready",
        checks=ReadyChecks(
            store=store_ok, model=model_ok, auth=state.auth_problem is None, bus=bus_ok
        ),
        models=[
            ModelCheck(provider=m.provider, model=m.model, reachable=m.reachable) for m in models
        ],
        memory_store=state.settings.memory_store,
        auth_mode="none" if state.authenticator is None else "jwt",
        datastores=state.datastores,
        message="; ".join(problems + notes) or None,
    )


@router.get(
    "/metrics",
    summary="Prometheus metrics of this replica",
    response_class=fastapi.responses.PlainTextResponse,
    responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
)
async def metrics(state: deps.State) -> fastapi.Response:
    return fastapi.Response(
        state.metrics.render(), media_type=prometheus_client.CONTENT_TYPE_LATEST
    )
