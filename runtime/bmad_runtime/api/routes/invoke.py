"""``POST /v1/invoke``: one turn of a conversation with the agent, whole or streamed.

A turn: check the caller's rate limit; load the conversation's recent turns; assemble
the context (persona and instructions, then the conversation, trimmed to the model's
window by `context`); ask the model chain; store the user and assistant turns, the
usage record and an audit entry (never the text: the audit log outlives
conversations). With ``stream: true`` the answer arrives as Server-Sent Events:
``event: delta`` with ``{"text"}`` pieces, then one ``event: done`` with the same JSON
as the non-streamed answer (or ``event: error`` with an error body).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import fastapi
import pydantic
import pydantic.alias_generators

from bmad_runtime import context, ports
from bmad_runtime.api import deps, errors
from bmad_runtime.providers import base as providers_base
from bmad_runtime.providers import router as providers_router

logger = logging.getLogger(__name__)

router = fastapi.APIRouter(prefix="/v1", tags=["invoke"])

# What the answer may use when neither the caller nor the agent says (for trimming).
DEFAULT_ANSWER_RESERVE = 1024


class _Camel(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        alias_generator=pydantic.alias_generators.to_camel,
        populate_by_name=True,
        extra="forbid",
    )


StopSequence = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=64)]


class InvokeParams(_Camel):
    """Model parameters for this call; they override the Agent's ``spec.model.params``."""

    temperature: float | None = pydantic.Field(default=None, ge=0, le=2)
    max_tokens: int | None = pydantic.Field(
        default=None, ge=1, le=1_000_000, description="Most tokens the answer may use."
    )
    top_p: float | None = pydantic.Field(default=None, ge=0, le=1)
    stop: list[StopSequence] | None = pydantic.Field(
        default=None, max_length=4, description="Stop sequences."
    )
    seed: int | None = pydantic.Field(default=None, ge=0, le=2**31 - 1)


class InvokeRequest(_Camel):
    input: str = pydantic.Field(min_length=1, description="The user's message.")
    conversation_id: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=128,
        pattern=deps.CONVERSATION_ID_PATTERN,
        description="Continue this conversation; a new one is started when omitted.",
    )
    stream: bool = pydantic.Field(
        default=False, description="Answer as Server-Sent Events (text/event-stream)."
    )
    params: InvokeParams | None = None


class TokenUsage(_Camel):
    tokens_in: int = pydantic.Field(ge=0)
    tokens_out: int = pydantic.Field(ge=0)


class InvokeResponse(_Camel):
    output: str = pydantic.Field(description="The agent's answer.")
    conversation_id: str
    model: str = pydantic.Field(description="The model that answered (maybe a fallback).")
    provider: str
    usage: TokenUsage
    latency_ms: int = pydantic.Field(ge=0)
    finish_reason: str = "stop"


SSE_DESCRIPTION = (
    'With `stream: true`: Server-Sent Events. `event: delta` carries `{"text": ...}`; '
    "the last event is `event: done` with the InvokeResponse JSON, or `event: error` "
    "with an error body if the model failed after it started answering."
)


# One event of the stream (OpenAPI 3.1 has no item schema for streams: this describes
# each event, as OpenAPI 3.2's itemSchema would; `data` is JSON text).
SSE_EVENT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["event", "data"],
    "properties": {
        "event": {"type": "string", "enum": ["delta", "done", "error"]},
        "data": {
            "type": "string",
            "contentMediaType": "application/json",
            "description": 'delta: {"text": "..."}; done: an InvokeResponse; error: an ErrorBody.',
        },
        "id": {"type": "string"},
        "retry": {"type": "integer", "minimum": 0},
    },
}


@dataclass(frozen=True)
class _Turn:
    """One invocation, as the handler prepared it."""

    state: deps.RuntimeState
    caller: ports.Principal
    conversation_id: str
    user_text: str
    messages: list[ports.Message]
    params: dict[str, Any]
    started: float
    received_at: dt.datetime
    estimated_in: int
    request_id: str | None

    def latency_ms(self) -> int:
        return max(0, int((time.perf_counter() - self.started) * 1000))


def _messages(
    state: deps.RuntimeState, history: Sequence[ports.Turn], text: str, params: dict[str, Any]
) -> list[ports.Message]:
    config = state.config
    layers = context.Layers(persona=config.persona_text(), instructions=config.instructions)
    reserve = providers_base.merge_params(config.model.params, params).get("max_tokens")
    try:
        return context.assemble(
            layers,
            [*history, ports.Message("user", text)],
            context_window=config.context_window,
            reserve_tokens=int(reserve) if isinstance(reserve, int) else DEFAULT_ANSWER_RESERVE,
        )
    except context.ContextOverflowError as exc:
        raise errors.ApiError(422, "context_overflow", str(exc)) from None


async def _prepare(
    body: InvokeRequest, caller: ports.Principal, state: deps.RuntimeState, request_id: str | None
) -> _Turn:
    started = time.perf_counter()
    estimated_in = context.estimate_tokens(body.input)
    if state.limiter is not None:
        wait = await state.limiter.hit(tenant=caller.tenant, agent=state.agent, tokens=estimated_in)
        if wait is not None:
            state.metrics.tasks.labels(outcome="rejected").inc()
            raise errors.rate_limited(wait)
    conversation_id = body.conversation_id or uuid.uuid4().hex
    turns = state.config.memory.turns
    history = (
        await state.store.recent(
            conversation_id, tenant=caller.tenant, agent=state.agent, limit=turns
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
    return _Turn(
        state=state,
        caller=caller,
        conversation_id=conversation_id,
        user_text=body.input,
        messages=_messages(state, history, body.input, params),
        params=params,
        started=started,
        received_at=dt.datetime.now(dt.UTC),
        estimated_in=estimated_in,
        request_id=request_id,
    )


async def _finish(turn: _Turn, completion: ports.Completion) -> InvokeResponse:
    """Store the turn and account for it; the answer as the API returns it."""
    state, caller = turn.state, turn.caller
    latency = turn.latency_ms()
    if state.config.memory.turns > 0:
        await state.store.append(
            ports.Turn(turn.conversation_id, "user", turn.user_text, turn.received_at),
            tenant=caller.tenant,
            agent=state.agent,
        )
        await state.store.append(
            ports.Turn(
                turn.conversation_id,
                "assistant",
                completion.text,
                dt.datetime.now(dt.UTC),
                model=completion.model,
            ),
            tenant=caller.tenant,
            agent=state.agent,
        )
    usage = completion.usage
    await state.store.record_usage(
        ports.UsageRecord(
            tenant=caller.tenant,
            agent=state.agent,
            conversation_id=turn.conversation_id,
            model=completion.model,
            provider=completion.provider,
            tokens_in=usage.tokens_in,
            tokens_out=usage.tokens_out,
            latency_ms=latency,
        )
    )
    await state.store.audit(
        tenant=caller.tenant,
        agent=state.agent,
        subject=caller.subject,
        action="agent.invoke",
        detail={
            "conversationId": turn.conversation_id,
            "model": completion.model,
            "provider": completion.provider,
            "tokensIn": usage.tokens_in,
            "tokensOut": usage.tokens_out,
            "latencyMs": latency,
            "requestId": turn.request_id,
        },
    )
    # Tokens are known only now: book what the admission estimate did not cover.
    charge = getattr(state.limiter, "charge", None)
    extra = usage.tokens_in + usage.tokens_out - turn.estimated_in
    if charge is not None and extra > 0:
        await charge(tenant=caller.tenant, agent=state.agent, tokens=extra)
    state.metrics.record_tokens(completion.model, usage)
    state.metrics.tasks.labels(outcome="ok").inc()
    return InvokeResponse(
        output=completion.text,
        conversation_id=turn.conversation_id,
        model=completion.model,
        provider=completion.provider,
        usage=TokenUsage(tokens_in=usage.tokens_in, tokens_out=usage.tokens_out),
        latency_ms=latency,
        finish_reason=completion.finish_reason,
    )


def sse(event: str, data: Any) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


async def _stream(turn: _Turn) -> fastapi.Response:
    state = turn.state
    events = state.router.stream_events(turn.messages, params=turn.params)
    state.metrics.inflight.inc()
    try:
        # Wait for the first piece before answering 200: until then the chain may
        # still fail over, or fail as a whole with a proper HTTP error.
        first = await anext(events)
    except BaseException:
        state.metrics.inflight.dec()
        state.metrics.tasks.labels(outcome="error").inc()
        await events.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        completion: ports.Completion | None = None
        try:
            event: providers_base.StreamEvent | None = first
            while event is not None:
                if isinstance(event, providers_base.Delta):
                    yield sse("delta", {"text": event.text})
                else:
                    completion = event
                event = await anext(events, None)
            if completion is None:  # a provider that ended without its summary
                raise providers_base.ProviderError(
                    "ended the stream without a result", provider="?", model="?"
                )
            done = await _finish(turn, completion)
            yield sse("done", done.model_dump(mode="json", by_alias=True))
        except providers_base.ProviderError as exc:
            state.metrics.tasks.labels(outcome="error").inc()
            logger.warning("stream failed after it started: %s", exc.summary)
            yield sse(
                "error",
                errors.error_payload(
                    "model_failed",
                    f"the model failed while answering: {exc.summary}",
                    request_id=turn.request_id,
                ),
            )
        except Exception:
            state.metrics.tasks.labels(outcome="error").inc()
            logger.exception("stream failed (request %s)", turn.request_id)
            yield sse(
                "error",
                errors.error_payload(
                    "internal_error",
                    "the agent runtime failed while answering; quote request id "
                    f"{turn.request_id} when reporting it",
                    request_id=turn.request_id,
                ),
            )
        finally:
            state.metrics.inflight.dec()
            await events.aclose()

    return fastapi.responses.StreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"X-Accel-Buffering": "no"},
    )


@router.post(
    "/invoke",
    response_model=InvokeResponse,
    summary="Send the agent a message and get its answer (whole, or streamed as SSE)",
    responses={
        200: {
            "description": SSE_DESCRIPTION,
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        },
        **errors.error_responses(400, 401, 403, 413, 422, 429, 500, 502, 503),
    },
)
async def invoke(
    body: InvokeRequest,
    caller: deps.Invoker,
    state: deps.State,
    request_id: deps.RequestId,
) -> fastapi.Response | InvokeResponse:
    if state.slots is not None and state.slots.locked():
        # At spec.limits.concurrency: tell the caller to come back (another replica, or
        # this one in a moment) rather than queue without bound.
        state.metrics.tasks.labels(outcome="rejected").inc()
        raise errors.rate_limited(
            1.0, message="the agent is at its concurrency limit (spec.limits.concurrency)"
        )
    turn = await _prepare(body, caller, state, request_id)
    if body.stream:
        return await _stream(turn)
    async with contextlib.AsyncExitStack() as slot:
        if state.slots is not None:
            await slot.enter_async_context(state.slots)
        state.metrics.inflight.inc()
        try:
            completion = await state.router.complete(turn.messages, params=turn.params)
        except providers_router.AllProvidersFailedError:
            state.metrics.tasks.labels(outcome="error").inc()
            raise
        finally:
            state.metrics.inflight.dec()
    return await _finish(turn, completion)


async def run_task(state: deps.RuntimeState, payload: dict[str, Any]) -> dict[str, Any]:
    """A task from the bus, answered like `POST /v1/invoke` (same limits, memory, usage).

    Tasks come from inside the tenant (the bus keys are the tenant's), so they run as
    the tenant's internal principal; a payload that is not a valid invoke request is a
    failed task, never a crash.
    """
    body = InvokeRequest.model_validate({**payload, "stream": False})
    caller = ports.Principal(subject="task-bus", tenant=state.tenant, scopes=deps.ALL_SCOPES)
    turn = await _prepare(body, caller, state, None)
    async with contextlib.AsyncExitStack() as slot:
        if state.slots is not None:
            await slot.enter_async_context(state.slots)  # tasks wait for a slot
        state.metrics.inflight.inc()
        try:
            completion = await state.router.complete(turn.messages, params=turn.params)
        finally:
            state.metrics.inflight.dec()
    answer = await _finish(turn, completion)
    state.metrics.tasks.labels(outcome="succeeded").inc()
    return answer.model_dump(mode="json", by_alias=True)
