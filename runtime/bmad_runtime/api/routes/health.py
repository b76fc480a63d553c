"""Probes and metrics: ``/healthz`` (alive), ``/readyz`` (can serve), ``/metrics``.

Kubernetes restarts a pod whose liveness fails, so ``/healthz`` checks nothing but the
process; ``/readyz`` takes the pod out of its Service while the conversation store or
the primary model cannot be reached (the model probe is cached, see
`providers.router.ModelRouter.ready`), or while the task consumer does not read the
agent's stream (Redis unreachable: ``checks.bus``). It also names the memory mode
(``spec.memory.store``) and, when the store is missing, what to bind. None of them
needs a token.
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
from bmad_runtime.api import deps

logger = logging.getLogger(__name__)

router = fastapi.APIRouter(tags=["health"])

READY_TIMEOUT_SECONDS = 2.0


class Health(pydantic.BaseModel):
    status: Literal["ok"] = "ok"


class ReadyChecks(pydantic.BaseModel):
    store: bool = pydantic.Field(description="The conversation store answers its ping.")
    model: bool = pydantic.Field(description="The primary model's API is reachable.")
    bus: bool | None = pydantic.Field(
        default=None,
        description="The task consumer reads the agent's stream; null when this replica "
        "consumes no tasks (no Redis bound, or the store is not available).",
    )


class Readiness(pydantic.BaseModel):
    status: Literal["ready", "not-ready"]
    checks: ReadyChecks
    memory_store: agent_api.MemoryStore = pydantic.Field(
        description="spec.memory.store: durable (PostgreSQL and Redis) or inProcess (this "
        "process only, lost on restart)."
    )
    message: str | None = pydantic.Field(
        default=None, description="Why the agent is not ready and what to change, when known."
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
    summary="Readiness: the store and the primary model are reachable",
    responses={503: {"model": Readiness, "description": "Not ready: see `checks`."}},
)
async def readyz(state: deps.State, response: fastapi.Response) -> Readiness:
    store_ok, model_ok = await asyncio.gather(
        _check("conversation store", asyncio.ensure_future(state.store.ping())),
        _check("primary model", asyncio.ensure_future(state.router.ready())),
    )
    problems = [
        *(
            [state.store_problem or "the conversation store does not answer"]
            if not store_ok
            else []
        ),
        *(["the primary model's API cannot be reached"] if not model_ok else []),
    ]
    bus_ok = state.bus.consuming if state.bus is not None else None
    if state.bus is not None and not bus_ok:
        problems.append(state.bus.problem or "the task consumer does not read its stream")
    if problems:
        response.status_code = 503
    return Readiness(
        status="not-ready" if problems else "ready",
        checks=ReadyChecks(store=store_ok, model=model_ok, bus=bus_ok),
        memory_store=state.settings.memory_store,
        message="; ".join(problems) or None,
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
