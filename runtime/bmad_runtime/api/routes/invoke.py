"""``POST /v1/invoke``: one turn of a conversation with the agent, whole or streamed.

The turn itself is the use case `turns` (shared with the task consumer); this route
adds what only HTTP has: the caller's token, the refusal at once while every
concurrency slot is busy, and the stream. With ``stream: true`` the answer arrives as
Server-Sent Events: ``event: delta`` with ``{"text"}`` pieces, then one ``event: done``
with the same JSON as the non-streamed answer (or ``event: error`` with an error body).
A stream holds a concurrency slot while it runs, and one the caller leaves early is
recorded as far as it went (`streams.stream`).
"""

from __future__ import annotations

import collections.abc
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import fastapi
from starlette import types as asgi

from bmad_runtime import schemas, streams, turns
from bmad_runtime.api import deps, errors
from bmad_runtime.providers import base as providers_base

logger = logging.getLogger(__name__)

# The caller is authenticated by the route class, before the body is read (`deps`).
router = fastapi.APIRouter(
    prefix="/v1", tags=["invoke"], route_class=deps.authorized_route(deps.SCOPE_INVOKE)
)

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


class ClosingStreamingResponse(fastapi.responses.StreamingResponse):
    """Closes its body as soon as the response ends, however it ends: a client that
    goes away must end the model's stream (and free its slot) now, not whenever the
    body generator happens to be garbage-collected."""

    async def stream_response(self, send: asgi.Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            body = self.body_iterator
            if isinstance(body, collections.abc.AsyncGenerator):
                await body.aclose()


class RecordedResponse(fastapi.Response):
    """A JSON answer that leaves only once its records are in (`turns.settle`): the
    usage ledger's append, sent before the answer was serialised, then the turn's
    records. A record that fails raises here, before anything is sent, and the error
    handlers answer instead (a 503 for the ledger)."""

    media_type = "application/json"

    def __init__(self, content: str, recorded: collections.abc.Awaitable[None]) -> None:
        super().__init__(content)
        self.recorded = recorded

    async def __call__(self, scope: asgi.Scope, receive: asgi.Receive, send: asgi.Send) -> None:
        await self.recorded
        await super().__call__(scope, receive, send)


def sse(event: str, data: Any) -> bytes:
    payload = json.dumps(data, separators=(",", ":"), ensure_ascii=False)
    return f"event: {event}\ndata: {payload}\n\n".encode()


async def _stream(turn: turns.Turn) -> fastapi.Response:
    answer = streams.stream(turn)
    try:
        # Wait for the first piece before answering 200: until then the chain may
        # still fail over, or fail as a whole with a proper HTTP error.
        first = await anext(answer)
    except BaseException:
        await answer.aclose()
        raise

    async def body() -> AsyncIterator[bytes]:
        try:
            event: providers_base.Delta | schemas.InvokeResponse | None = first
            while event is not None:
                if isinstance(event, providers_base.Delta):
                    yield sse("delta", {"text": event.text})
                else:
                    yield sse("done", event.model_dump(mode="json", by_alias=True))
                event = await anext(answer, None)
        except providers_base.ProviderError as exc:
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
            await answer.aclose()

    return ClosingStreamingResponse(
        body(),
        media_type="text/event-stream",
        headers={"X-Accel-Buffering": "no"},
    )


@router.post(
    "/invoke",
    response_model=schemas.InvokeResponse,
    summary="Send the agent a message and get its answer (whole, or streamed as SSE)",
    responses={
        200: {
            "description": SSE_DESCRIPTION,
            "content": {"text/event-stream": {"schema": SSE_EVENT_SCHEMA}},
        },
        **errors.error_responses(400, 401, 403, 404, 413, 422, 429, 500, 502, 503),
    },
)
async def invoke(body: schemas.InvokeRequest, request: fastapi.Request) -> fastapi.Response:
    # The caller, the state and the request id straight from the request, not as
    # dependencies: each dependency costs FastAPI a resolution pass on the hottest route.
    caller = deps.caller_of(request)
    state = deps.state_of(request)
    # At spec.limits.concurrency: tell the caller to come back (another replica, or
    # this one in a moment) rather than queue without bound.
    turns.check_capacity(state)
    turn = await turns.prepare(state, body, caller, request_id=errors.request_id_of(request.scope))
    if body.stream:
        return await _stream(turn)
    answer, recorded = turns.settle(turn, await turns.complete(turn))
    # Serialised once, as built, while the ledger appends the record (FastAPI would
    # validate the answer against the response_model again before serialising it;
    # `response_model` stays, for OpenAPI). It leaves once `recorded` is done.
    return RecordedResponse(answer.model_dump_json(by_alias=True), recorded)
