"""The use case of the runtime: one turn of a conversation with the agent.

A turn: check the caller's rate limit; load the conversation's recent turns; assemble
the context (persona and instructions, then the conversation, trimmed to the model's
window by `context`); take a concurrency slot and ask the model chain; store the user
and assistant turns, the usage record and an audit entry (never the text: the audit
log outlives conversations).

Both entrances run it: ``POST /v1/invoke`` (`api.routes.invoke`, whole or streamed)
and a task from the agent's bus (`run_task`, called by the consumer that `wiring`
starts). Nothing here knows HTTP: refusals are domain errors (`RateLimitedError`,
`context.ContextOverflowError`, `providers.router.AllProvidersFailedError`), which
the HTTP layer maps to its statuses and a task records as its error. A conversation
belongs to the subject that started it: continuing another subject's is
`ports.ConversationNotFoundError`, before the model is asked.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import itertools
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any

from bmad_integrations.usage import record as usage_record
from bmad_runtime import config as config_mod
from bmad_runtime import context, ports, schemas, telemetry
from bmad_runtime.providers import base as providers_base
from bmad_runtime.providers import router as providers_router

logger = logging.getLogger(__name__)

# What the answer may use when neither the caller nor the agent says (for trimming).
DEFAULT_ANSWER_RESERVE = 1024
# Who a task from the bus runs as: the bus keys are the tenant's own.
TASK_SUBJECT = "task-bus"


class RateLimitedError(Exception):
    """The turn is refused for now: a rate limit, or every concurrency slot is busy."""

    def __init__(self, wait: float, message: str | None = None) -> None:
        super().__init__(message or f"rate limited for {wait:.1f}s")
        self.wait = wait
        self.message = message


class BudgetExhaustedError(Exception):
    """The tenant's token budget is used up until the period resets (or the limit rises)."""

    CODE = "budget_exhausted"

    def __init__(self, budget: ports.Budget) -> None:
        super().__init__(budget.message)
        self.budget = budget


@dataclass(kw_only=True)
class Services:
    """What a turn uses: the agent's config, its store, the model chain, limits, metrics."""

    tenant: str
    agent: str
    config: config_mod.AgentConfig
    store: ports.ConversationStore
    router: providers_router.ModelRouter
    limiter: ports.Limiter | None
    metrics: telemetry.Metrics
    # spec.limits.concurrency: model calls in flight at once in this replica.
    slots: asyncio.Semaphore | None = None
    # Records of streams the caller left early, written outside the request's task.
    background: set[asyncio.Task[None]] = field(default_factory=set)
    # The platform's usage ledger, when the operator meters usage (BMAD_USAGE_LEDGER_URL).
    ledger: ports.UsageLedger | None = None
    # `config`'s agent layer, derived once and kept while `config` is the same object.
    _agent: context.AgentLayer | None = field(default=None, init=False, repr=False, compare=False)

    def agent_layer(self) -> context.AgentLayer:
        if self._agent is None or self._agent.config is not self.config:
            self._agent = context.AgentLayer.of(self.config)
        return self._agent


@ports.direct_init
@dataclass(frozen=True)
class Turn:
    """One turn, prepared: the context to send and what `finish` records."""

    services: Services
    caller: ports.Principal
    conversation_id: str
    user_text: str
    messages: list[ports.Message]
    params: dict[str, Any]
    started: float
    received_at: dt.datetime
    estimated_in: int
    request_id: str | None
    # The ledger's id of this turn's model call (`record_id`) and where the turn came from.
    record_id: str = ""
    source: usage_record.Source = "http"

    def latency_ms(self) -> int:
        return max(0, int((time.perf_counter() - self.started) * 1000))


def check_capacity(services: Services) -> None:
    """Refuse at once while every slot is busy (HTTP callers do not queue without bound)."""
    if services.slots is not None and services.slots.locked():
        services.metrics.count_task("rejected")
        raise RateLimitedError(
            1.0, "the agent is at its concurrency limit (spec.limits.concurrency)"
        )


def _messages(
    services: Services,
    history: Sequence[ports.Turn],
    text: str,
    params: dict[str, Any],
    artifacts: Sequence[context.ArtifactLayer] = (),
) -> list[ports.Message]:
    agent = services.agent_layer()
    system = list(agent.system)
    system_tokens: int | None = agent.system_tokens
    if artifacts:  # after the agent layer, as `context.Layers` orders them
        system += context.Layers(artifacts=tuple(artifacts)).system_messages()
        system_tokens = None
    reserve = providers_base.merge_params(agent.config.model.params, params).get("max_tokens")
    return context.trim(
        system,
        [*(ports.Message(t.role, t.content) for t in history), ports.Message("user", text)],
        context_window=agent.context_window,
        reserve_tokens=int(reserve) if isinstance(reserve, int) else DEFAULT_ANSWER_RESERVE,
        system_tokens=system_tokens,
    )


# The part of an HTTP call's record id that makes it unique: 128 random bits drawn once
# per process (again in a forked child) and a counter of 12 hex digits, so no two calls
# of any replica, now or after a restart, share one; no system call per request.
_CALL_SALT: str
_CALL_COUNTER: itertools.count[int]


def _new_salt() -> None:
    global _CALL_SALT, _CALL_COUNTER  # noqa: PLW0603 - a forked child draws its own
    _CALL_SALT = secrets.token_hex(16)
    _CALL_COUNTER = itertools.count(1)


_new_salt()
os.register_at_fork(after_in_child=_new_salt)


def record_id(*, request_id: str | None, task_id: str | None) -> str:
    """The usage ledger's id of a turn's model call, unique per call.

    A bus task's is derived from its task id, so a task redelivered after its replica
    died gets the same id and the ledger keeps one record. An HTTP request's joins its
    request id to a part unique to the call (the process's random salt and a counter,
    of fixed length, so that no choice of request id makes two calls' ids equal): a
    caller who sends the same ``X-Request-Id`` twice gets two answers and is billed for
    two (a caller must not be able to make usage vanish).
    """
    if task_id is not None:
        return usage_record.task_record_id(task_id)
    return usage_record.request_record_id(
        f"{request_id or 'none'}.{_CALL_SALT}{next(_CALL_COUNTER):012x}"
    )


def refuse_over_budget(services: Services, exhausted: ports.Budget | None) -> None:
    """Refuse new work while the tenant's token budget is used up (``exhausted``, from
    the ledger: awaited by the caller, which so makes no coroutine of its own for it)."""
    if exhausted is not None:
        services.metrics.count_task("rejected")
        raise BudgetExhaustedError(exhausted)


async def prepare(
    services: Services,
    body: schemas.InvokeRequest,
    caller: ports.Principal,
    *,
    request_id: str | None,
    artifacts: Sequence[context.ArtifactLayer] = (),
    task_id: str | None = None,
) -> Turn:
    """Admit the turn (the tenant's budget, rate limits) and assemble its context from
    the recent turns (and, for a workflow step, the artifacts it was given)."""
    started = time.perf_counter()
    if services.ledger is not None:  # else no budget to check (and no coroutine made for it)
        refuse_over_budget(services, await services.ledger.exhausted())
    estimated_in = context.estimate_tokens(body.input) + sum(
        context.estimate_tokens(a.content) for a in artifacts
    )
    if services.limiter is not None:
        wait = await services.limiter.hit(
            tenant=caller.tenant, agent=services.agent, tokens=estimated_in
        )
        if wait is not None:
            services.metrics.count_task("rejected")
            raise RateLimitedError(wait)
    conversation_id = body.conversation_id or schemas.new_conversation_id()
    turns = services.config.memory.turns
    history = (
        await services.store.recent(
            conversation_id,
            tenant=caller.tenant,
            agent=services.agent,
            limit=turns,
            subject=caller.subject,
        )
        if turns > 0 and body.conversation_id
        else []
    )
    # A window of recent turns may open with an answer; some APIs need a question first.
    while history and history[0].role != "user":
        history = history[1:]
    params = providers_base.merge_params(
        body.params.model_dump(exclude_none=True) if body.params else None
    )
    metered = services.ledger is not None  # the record id's only reader
    return Turn(
        services=services,
        caller=caller,
        conversation_id=conversation_id,
        user_text=body.input,
        messages=_messages(services, history, body.input, params, artifacts),
        params=params,
        started=started,
        received_at=dt.datetime.now(dt.UTC),
        estimated_in=estimated_in,
        request_id=request_id,
        record_id=record_id(request_id=request_id, task_id=task_id) if metered else "",
        source="task" if task_id is not None else "http",
    )


# Without spec.limits.concurrency: a reusable no-op, not a context manager made per call.
_NO_LIMIT: contextlib.AbstractAsyncContextManager[None] = contextlib.nullcontext()


def slot(services: Services) -> contextlib.AbstractAsyncContextManager[Any]:
    """One of the replica's concurrency slots (waiting for one if all are busy)."""
    return services.slots if services.slots is not None else _NO_LIMIT


async def complete(turn: Turn) -> ports.Completion:
    """Ask the model chain, in a concurrency slot (waiting for one if all are busy)."""
    services = turn.services
    async with slot(services):
        services.metrics.turn_began()
        try:
            return await services.router.complete(turn.messages, params=turn.params)
        except providers_router.AllProvidersFailedError:
            services.metrics.count_task("error")
            raise
        finally:
            services.metrics.turn_ended()


async def finish(
    turn: Turn, completion: ports.Completion, *, outcome: str = "ok"
) -> schemas.InvokeResponse:
    """Store the turn and account for it; the answer as the API returns it."""
    answer, recorded = settle(turn, completion, outcome=outcome)
    await recorded
    return answer


def settle(
    turn: Turn, completion: ports.Completion, *, outcome: str = "ok"
) -> tuple[schemas.InvokeResponse, Coroutine[Any, Any, None]]:
    """The answer, and its records to await before it may leave.

    The ledger's record is sent now (`ports.UsageLedger.write`), so the caller can
    serialise the answer while the ledger appends; awaiting the second part waits for
    the ledger first (`ports.LedgerUnavailableError`: nothing else is stored and the
    answer must not leave), then stores the turns, the usage record and the audit
    entry, books the tokens and counts them.
    """
    services = turn.services
    latency = turn.latency_ms()
    usage = completion.usage
    sent: Awaitable[object] | None = None
    if services.ledger is not None:
        sent = services.ledger.write(
            ports.LedgerEntry(
                record_id=turn.record_id or record_id(request_id=turn.request_id, task_id=None),
                source=turn.source,
                provider=completion.provider,
                model=completion.model,
                tokens_in=usage.tokens_in,
                tokens_out=usage.tokens_out,
                conversation_id=turn.conversation_id,
                occurred_at=dt.datetime.now(dt.UTC),
            )
        )
    answer = schemas.InvokeResponse(
        output=completion.text,
        conversation_id=turn.conversation_id,
        model=completion.model,
        provider=completion.provider,
        usage=schemas.TokenUsage(tokens_in=usage.tokens_in, tokens_out=usage.tokens_out),
        latency_ms=latency,
        finish_reason=completion.finish_reason,
    )
    return answer, _record(turn, completion, sent, latency=latency, outcome=outcome)


async def _record(
    turn: Turn,
    completion: ports.Completion,
    sent: Awaitable[object] | None,
    *,
    latency: int,
    outcome: str,
) -> None:
    services, caller = turn.services, turn.caller
    usage = completion.usage
    if sent is not None:
        # First: an answer the ledger has no record of never leaves (LedgerUnavailableError).
        try:
            await sent
        except ports.LedgerUnavailableError:
            services.metrics.count_ledger_write("failed")
            raise
        services.metrics.count_ledger_write("ok")
    # The turns (unless the agent keeps no memory), the usage record and the audit entry
    # (never the text), handed to the store at once (the durable one: one round trip each).
    kept = services.config.memory.turns > 0
    await services.store.record_turn(
        ports.TurnRecord(
            tenant=caller.tenant,
            agent=services.agent,
            subject=caller.subject,
            turns=(
                ports.Turn(turn.conversation_id, "user", turn.user_text, turn.received_at),
                ports.Turn(
                    turn.conversation_id,
                    "assistant",
                    completion.text,
                    dt.datetime.now(dt.UTC),
                    model=completion.model,
                ),
            )
            if kept
            else (),
            usage=ports.UsageRecord(
                tenant=caller.tenant,
                agent=services.agent,
                conversation_id=turn.conversation_id,
                model=completion.model,
                provider=completion.provider,
                tokens_in=usage.tokens_in,
                tokens_out=usage.tokens_out,
                latency_ms=latency,
            ),
            action="agent.invoke",
            detail={
                "conversationId": turn.conversation_id,
                "model": completion.model,
                "provider": completion.provider,
                "tokensIn": usage.tokens_in,
                "tokensOut": usage.tokens_out,
                "latencyMs": latency,
                "requestId": turn.request_id,
                "finishReason": completion.finish_reason,
            },
        )
    )
    # Tokens are known only now: book what the admission estimate did not cover.
    charge = getattr(services.limiter, "charge", None)
    extra = usage.tokens_in + usage.tokens_out - turn.estimated_in
    if charge is not None and extra > 0:
        await charge(tenant=caller.tenant, agent=services.agent, tokens=extra)
    services.metrics.record_usage(
        completion, request_model=services.router.requested_model(completion)
    )
    services.metrics.count_task(outcome)


async def run(
    services: Services,
    body: schemas.InvokeRequest,
    caller: ports.Principal,
    *,
    request_id: str | None,
    artifacts: Sequence[context.ArtifactLayer] = (),
    task_id: str | None = None,
) -> schemas.InvokeResponse:
    """One whole turn: prepare, ask the model in a slot, finish."""
    turn = await prepare(
        services, body, caller, request_id=request_id, artifacts=artifacts, task_id=task_id
    )
    return await finish(turn, await complete(turn))


async def run_task(
    services: Services, payload: dict[str, Any], *, task_id: str | None = None
) -> dict[str, Any]:
    """A task from the bus, answered like `POST /v1/invoke` (same limits, memory, usage).

    Tasks come from inside the tenant (the bus keys are the tenant's), so they run as
    the tenant's internal principal and wait for a concurrency slot; a payload that is
    not a valid invoke request is a failed task, never a crash.
    """
    body = schemas.InvokeRequest.model_validate({**payload, "stream": False})
    caller = ports.Principal(subject=TASK_SUBJECT, tenant=services.tenant)
    answer = await run(services, body, caller, request_id=task_id, task_id=task_id)
    services.metrics.count_task("succeeded")
    return answer.model_dump(mode="json", by_alias=True)
