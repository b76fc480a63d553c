"""A streamed answer (``POST /v1/invoke`` with ``stream: true``): the turn of `turns`,
its pieces passed on as the model sends them, and the record of a stream that ended
early, written outside the request's task so that a caller who leaves cannot cancel it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator, Coroutine, Sequence
from typing import Any

from bmad_runtime import context, ports, schemas, turns
from bmad_runtime.providers import base as providers_base

logger = logging.getLogger(__name__)


async def stream(
    turn: turns.Turn,
) -> AsyncGenerator[providers_base.Delta | schemas.InvokeResponse, None]:
    """The answer as it comes, in a concurrency slot: its pieces, then the whole answer,
    recorded by `finish`.

    A stream that ends early after the caller was sent part of an answer (the caller
    went away, or the model broke off) is recorded too, as far as it went: the turns,
    a usage record and an audit entry with the tokens estimated from what was sent
    (`record_partial`).
    """
    services = turn.services
    sent: list[providers_base.Delta] = []
    outcome = "error"
    async with turns.slot(services):
        events = services.router.stream_events(turn.messages, params=turn.params)
        services.metrics.turn_began()
        try:
            completion: ports.Completion | None = None
            async for event in events:
                if isinstance(event, providers_base.Delta):
                    sent.append(event)
                    yield event
                else:
                    completion = event
            if completion is None:  # a provider that ended without its summary
                raise providers_base.ProviderError(
                    "ended the stream without a result", provider="?", model="?"
                )
            outcome = "finished"  # from here on, `finish` records it
            yield await turns.finish(turn, completion)
        except (GeneratorExit, asyncio.CancelledError):
            if outcome != "finished":
                outcome = "client_disconnected"
            raise
        except Exception:
            services.metrics.count_task("error")
            raise
        finally:
            services.metrics.turn_ended()
            if outcome != "finished" and sent:
                # Before any await: the request's task may be cancelled, and every await
                # here with it; the record is written by a task of its own.
                _detach(services, record_partial(turn, sent, reason=outcome))
            await events.aclose()


def _detach(services: turns.Services, work: Coroutine[Any, Any, None]) -> None:
    task = asyncio.get_running_loop().create_task(work, name="bmad-partial-record")
    services.background.add(task)
    task.add_done_callback(services.background.discard)


async def record_partial(
    turn: turns.Turn, sent: Sequence[providers_base.Delta], *, reason: str
) -> None:
    """Record a stream that ended early as far as it went: the text the caller was sent,
    the prompt and that text as estimated tokens, ``finishReason`` `reason`."""
    text = "".join(piece.text for piece in sent)
    usage = ports.Usage(
        tokens_in=context.count_tokens(turn.messages), tokens_out=context.estimate_tokens(text)
    )
    last = sent[-1]
    completion = ports.Completion(
        text=text, usage=usage, model=last.model, provider=last.provider, finish_reason=reason
    )
    try:
        await turns.finish(turn, completion, outcome=reason)
    except Exception:
        logger.exception(
            "the record of a stream that ended early (%s, request %s) could not be written",
            reason,
            turn.request_id,
        )


DRAIN_SECONDS = 10.0


async def drain(services: turns.Services) -> None:
    """Let the records of early-ended streams be written (at shutdown)."""
    if services.background:
        await asyncio.wait(set(services.background), timeout=DRAIN_SECONDS)
