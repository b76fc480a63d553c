"""The workflow engine's side of the agents' task buses: submit, cancel, read results,
and hear when results arrive.

Each Agent's tasks travel on the Redis of the redis Integration it binds; the reconciler
reads that Integration's binding Secret (the same one the Agent's pods mount) for the
URL, so the operator and the agent meet on the same server and keys (`taskwire`).
One client per Redis URL is kept for all Agents on it, with one listener that
PSUBSCRIBEs to every agent's ``finished`` channel: a stored result wakes its Workflow
at once, instead of at the next poll. The listener is a shortcut, not the record: a
missed message only delays a Workflow until its next timed pass.

URLs may carry a password: they are never logged (`where` shows host and port only).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import urllib.parse
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from bmad_integrations import lazy, taskbus, taskwire
from bmad_operator import errors

if TYPE_CHECKING:
    from redis import asyncio as aioredis
    from redis import exceptions as redis_errors
else:  # imported when first used: only where Redis is configured
    aioredis = lazy.module("redis.asyncio")
    redis_errors = lazy.module("redis.exceptions")

log = logging.getLogger(__name__)

LISTEN_BACKOFF_MAX_S = 30.0


class Route(NamedTuple):
    """Where one Agent's tasks go."""

    url: str
    tenant: str
    agent: str


class BusUnavailableError(errors.Transient):
    """A Redis server did not answer; the pass is retried (its message names no secret)."""


def where(url: str) -> str:
    """host:port of a Redis URL, without credentials."""
    parsed = urllib.parse.urlsplit(url)
    return f"{parsed.hostname or '?'}:{parsed.port or 6379}"


Finished = Callable[[str, str, str], None]
"""Called with (tenant, agent, task id) when a result is announced."""


class WorkflowBus:
    """Producers for every Agent the engine dispatches to, pooled per Redis URL."""

    def __init__(self, on_finished: Finished | None = None) -> None:
        self.on_finished = on_finished
        self._clients: dict[str, aioredis.Redis] = {}
        self._producers: dict[Route, taskbus.TaskProducer] = {}
        self._listeners: dict[str, asyncio.Task[None]] = {}

    def producer(self, route: Route) -> taskbus.TaskProducer:
        found = self._producers.get(route)
        if found is None:
            found = taskbus.TaskProducer(
                self._client(route.url), tenant=route.tenant, agent=route.agent
            )
            self._producers[route] = found
        return found

    def _client(self, url: str) -> aioredis.Redis:
        client = self._clients.get(url)
        if client is None:
            client = aioredis.Redis.from_url(
                url, decode_responses=True, socket_connect_timeout=5, socket_timeout=10
            )
            self._clients[url] = client
            if self.on_finished is not None:
                self._listeners[url] = asyncio.create_task(
                    self._listen(url), name=f"workflow-results-{where(url)}"
                )
        return client

    async def submit(self, route: Route, task_id: str, payload: Mapping[str, Any]) -> None:
        async with self._errors(route):
            await self.producer(route).submit(task_id, payload)

    async def cancel(self, route: Route, task_id: str, *, reason: str) -> None:
        async with self._errors(route):
            await self.producer(route).cancel(task_id, reason=reason)

    async def results(self, wanted: Mapping[str, Route]) -> dict[str, taskwire.TaskResult]:
        """The results there are for these task ids, one MGET per Agent."""
        by_route: dict[Route, list[str]] = {}
        for task_id, route in wanted.items():
            by_route.setdefault(route, []).append(task_id)
        found: dict[str, taskwire.TaskResult] = {}
        batches = await asyncio.gather(
            *(self._results(route, ids) for route, ids in by_route.items())
        )
        for batch in batches:
            found.update(batch)
        return found

    async def _results(self, route: Route, ids: list[str]) -> dict[str, taskwire.TaskResult]:
        producer = self.producer(route)
        async with self._errors(route):
            try:
                return await producer.results(ids)
            except taskwire.WireError:
                pass
            # Something else sits under a result key: read them one by one, so that the
            # others still count and the odd one fails its attempt instead of the pass.
            found: dict[str, taskwire.TaskResult] = {}
            for task_id in ids:
                try:
                    one = await producer.result(task_id)
                except taskwire.WireError as exc:
                    one = taskwire.TaskResult(
                        task_id=task_id,
                        message_id="",
                        status="failed",
                        output=None,
                        error=f"the stored result cannot be read: {exc}",
                        consumer="",
                        attempt=0,
                        finished_at=0.0,
                    )
                if one is not None:
                    found[task_id] = one
            return found

    @contextlib.asynccontextmanager
    async def _errors(self, route: Route) -> Any:
        try:
            yield
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
            raise BusUnavailableError(
                f"the task bus of Agent {route.agent} (Redis at {where(route.url)}) did not "
                f"answer: {type(exc).__name__}"
            ) from None

    async def _listen(self, url: str) -> None:
        backoff = 0.5
        while True:
            client = aioredis.Redis.from_url(url, decode_responses=True, socket_connect_timeout=5)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.psubscribe(taskwire.FINISHED_PATTERN)
                backoff = 0.5
                async for message in pubsub.listen():
                    if message.get("type") != "pmessage":
                        continue
                    agent = taskwire.agent_of_channel(str(message.get("channel", "")))
                    if agent is not None and self.on_finished is not None:
                        self.on_finished(agent[0], agent[1], str(message.get("data", "")))
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure: resubscribe after a while
                log.warning(
                    "result announcements from Redis at %s lost (%s); resubscribing in %.1fs",
                    where(url),
                    type(exc).__name__,
                    backoff,
                )
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, LISTEN_BACKOFF_MAX_S)

    async def close(self) -> None:
        for listener in self._listeners.values():
            listener.cancel()
        for listener in self._listeners.values():
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await listener
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.aclose()
        self._listeners.clear()
        self._clients.clear()
        self._producers.clear()
