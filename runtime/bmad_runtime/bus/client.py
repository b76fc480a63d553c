"""The Redis commands of one agent's task bus, as its consumers use them.

`TaskBus` reads new entries for a consumer (XREADGROUP), keeps its in-flight ones
claimed (a heartbeat script: XCLAIM JUSTID of what it still holds), takes over idle
ones (XAUTOCLAIM, with XPENDING for the delivery count), finishes and dead-letters tasks
(the Lua in `bus.scripts`) and reports the queue's state. Keys, fields and encodings
are `bmad_integrations.taskwire`'s; submitting is the producer's
(`bmad_integrations.taskbus`). The loop that decides what to run when is
`bus.consumer`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from redis import asyncio as aioredis
from redis import exceptions as redis_errors

from bmad_integrations import taskwire
from bmad_runtime.bus import scripts

DEAD_LETTER_MAXLEN = 10_000


@dataclass(frozen=True, kw_only=True)
class BusConfig:
    """What all consumers of one agent must agree on."""

    min_idle_ms: int = 30_000
    """An entry whose consumer has not touched it for this long is taken over by
    another consumer. A live consumer touches its in-flight entries every
    `heartbeat_interval_ms`, so only the entries of a dead (or cut-off) consumer go
    idle: a task may take much longer than this."""
    max_attempts: int = 5
    claim_interval_ms: int | None = None
    """How often a consumer looks for stale entries; default `min_idle_ms` / 2."""
    heartbeat_interval_ms: int | None = None
    """How often a consumer resets the idle time of its in-flight entries; default
    `min_idle_ms` / 3, and always less than `min_idle_ms`."""
    attempt_timeout_ms: int | None = None
    """A handler still running after this long is cancelled and the attempt counts as
    failed (retried, or dead-lettered on the last attempt); None: no deadline."""
    result_ttl_s: int = taskwire.RESULT_TTL_S
    """How long results (and the submission markers) are kept."""

    def __post_init__(self) -> None:
        if self.min_idle_ms < 1:
            raise ValueError("min_idle_ms must be at least 1")
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        if self.result_ttl_s < 1:
            raise ValueError("result_ttl_s must be at least 1")
        if self.claim_interval_ms is not None and self.claim_interval_ms < 1:
            raise ValueError("claim_interval_ms must be at least 1")
        beat = self.heartbeat_interval_ms
        if beat is not None and not 1 <= beat < self.min_idle_ms:
            raise ValueError("heartbeat_interval_ms must be at least 1 and below min_idle_ms")
        if self.attempt_timeout_ms is not None and self.attempt_timeout_ms < 1:
            raise ValueError("attempt_timeout_ms must be at least 1")

    @property
    def claim_interval_s(self) -> float:
        ms = self.claim_interval_ms
        if ms is None:
            ms = min(max(self.min_idle_ms // 2, 100), 10_000)
        return ms / 1000

    @property
    def heartbeat_interval_s(self) -> float:
        ms = self.heartbeat_interval_ms
        if ms is None:
            ms = max(self.min_idle_ms // 3, 1)
        return ms / 1000


@dataclass(frozen=True, kw_only=True)
class Malformed(taskwire.Task):
    """An entry that does not decode; it is dead-lettered and never handled."""

    error: str
    raw_fields: dict[str, str] = field(default_factory=dict)


def decode_or_quarantine(message_id: Any, fields: Any, attempt: int) -> taskwire.Task:
    """The task of an entry, or a `Malformed` one for an entry not in the wire format."""
    try:
        return taskwire.decode_entry(message_id, fields, attempt=attempt)
    except taskwire.WireError as exc:
        return Malformed(
            task_id="",
            payload={},
            message_id=taskwire.text(message_id),
            attempt=attempt,
            error=str(exc),
            raw_fields=taskwire.text_fields(fields),
        )


def stream_entries(response: Any) -> list[tuple[Any, Any]]:
    """The (id, fields) pairs of an XREADGROUP reply, whichever shape redis-py gives:
    ``[[stream, entries]]`` (RESP2) or ``{stream: entries}`` (RESP3 / unified)."""
    if not response:
        return []
    streams: Iterable[Any] = (
        response.values() if isinstance(response, dict) else (item[1] for item in response)
    )
    entries: list[tuple[Any, Any]] = []
    for items in streams:
        # The legacy RESP3 shape wraps the entry list in one more list.
        wrapped = (
            len(items) == 1
            and isinstance(items[0], list)
            and (not items[0] or isinstance(items[0][0], (list, tuple)))
        )
        entries.extend((item[0], item[1]) for item in (items[0] if wrapped else items))
    return entries


class TaskBus:
    """One agent's task bus, consumer side. The Redis client is injected (or `from_url`)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        tenant: str,
        agent: str,
        config: BusConfig | None = None,
    ) -> None:
        self.redis = redis
        self.keys = taskwire.Keys(tenant, agent)
        self.config = config or BusConfig()
        self._owns_client = False
        self._group_ready = False
        self._finish_script = redis.register_script(scripts.FINISH)
        self._dead_script = redis.register_script(scripts.DEAD)
        self._heartbeat_script = redis.register_script(scripts.HEARTBEAT)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        tenant: str,
        agent: str,
        config: BusConfig | None = None,
        redis_options: Mapping[str, Any] | None = None,
    ) -> TaskBus:
        """A bus over a client of its own; ``redis_options`` go to redis-py (TLS: the CA)."""
        bus = cls(
            aioredis.Redis.from_url(url, decode_responses=True, **(redis_options or {})),
            tenant=tenant,
            agent=agent,
            config=config,
        )
        bus._owns_client = True
        return bus

    async def aclose(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    async def ensure_group(self, *, force: bool = False) -> None:
        """Create the stream and its group; from id 0, so earlier entries are served."""
        if self._group_ready and not force:
            return
        try:
            await self.redis.xgroup_create(self.keys.stream, self.keys.group, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # --- the queue's state ---

    async def queue_depth(self) -> int:
        """Tasks without a result: waiting plus in flight (acked entries are deleted)."""
        return int(await self.redis.xlen(self.keys.stream))

    async def dead_letter_count(self) -> int:
        """Entries on the dead-letter stream (trimmed to about `DEAD_LETTER_MAXLEN`)."""
        return int(await self.redis.xlen(self.keys.dead))

    async def pending(self) -> int:
        """Entries delivered to a consumer and not yet acked."""
        try:
            summary = await self.redis.xpending(self.keys.stream, self.keys.group)
        except redis_errors.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise
        return int(summary["pending"])

    async def dead_letters(self, count: int = 100) -> list[taskwire.DeadLetter]:
        entries = await self.redis.xrange(self.keys.dead, count=count)
        return [taskwire.decode_dead_letter(eid, fields) for eid, fields in entries or []]

    # --- what a consumer does ---

    async def read(self, consumer: str, *, count: int, block_ms: int) -> list[taskwire.Task]:
        response = await self.redis.xreadgroup(
            self.keys.group, consumer, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        # New entries (">") are on their first delivery.
        return [decode_or_quarantine(mid, fields, 1) for mid, fields in stream_entries(response)]

    async def claim(
        self, consumer: str, *, count: int, cursor: str
    ) -> tuple[str, list[taskwire.Task]]:
        """Take over up to `count` entries idle for `min_idle_ms`, whoever held them.

        XAUTOCLAIM scans the pending entries like SCAN: it returns where to go on from
        (``0-0`` once the scan has wrapped around)."""
        reply = await self.redis.xautoclaim(
            self.keys.stream,
            self.keys.group,
            consumer,
            min_idle_time=self.config.min_idle_ms,
            start_id=cursor,
            count=count,
        )
        cursor, claimed = taskwire.text(reply[0]), reply[1]
        pairs = [(mid, fields) for mid, fields in claimed if fields is not None]
        if not pairs:
            return cursor, []
        # XAUTOCLAIM does not say how often an entry was delivered; XPENDING does
        # (the claim itself counted as one more delivery).
        async with self.redis.pipeline(transaction=False) as pipe:
            for mid, _ in pairs:
                pipe.xpending_range(self.keys.stream, self.keys.group, min=mid, max=mid, count=1)
            details = await pipe.execute()
        tasks = []
        for (mid, fields), detail in zip(pairs, details, strict=True):
            if not detail:  # acked by its slow first owner in the meantime
                continue
            attempt = int(detail[0]["times_delivered"])
            tasks.append(decode_or_quarantine(mid, fields, attempt))
        return cursor, tasks

    async def heartbeat(self, consumer: str, message_ids: Iterable[str]) -> set[str]:
        """Reset the idle time of the entries `consumer` still holds; returns those ids.

        An id missing from the answer was acked, or taken over by another consumer
        (this one was silent for `min_idle_ms`): its run is no longer this consumer's."""
        ids = list(message_ids)
        if not ids:
            return set()
        held = await self._heartbeat_script(
            keys=[self.keys.stream], args=[self.keys.group, consumer, *ids]
        )
        return {taskwire.text(mid) for mid in held or []}

    async def finish(self, task: taskwire.Task, result: taskwire.TaskResult) -> bool:
        """Store the result unless one is there, ack and delete the entry; True if stored."""
        keys = self.keys
        written = await self._finish_script(
            keys=[keys.result(task.task_id), keys.stream, keys.submitted(task.task_id)],
            args=[
                keys.group,
                task.message_id,
                taskwire.encode_result(result),
                self.config.result_ttl_s * 1000,
            ],
        )
        if int(written):
            await self._announce(task.task_id)
        return bool(int(written))

    async def settled(self, task: taskwire.Task) -> bool:
        """Whether the task already has a result (cancelled, or run elsewhere); if so its
        entry is acknowledged and deleted, so that it is not run."""
        if not task.task_id or not await self.redis.exists(self.keys.result(task.task_id)):
            return False
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.xack(self.keys.stream, self.keys.group, task.message_id)
            pipe.xdel(self.keys.stream, task.message_id)
            await pipe.execute()
        return True

    async def _announce(self, task_id: str) -> None:
        """Tell a waiting producer that the result is there (a hint: it also polls)."""
        with contextlib.suppress(redis_errors.RedisError):
            await self.redis.publish(self.keys.finished, task_id)

    async def dead_letter(self, task: taskwire.Task, *, error: str, consumer: str) -> bool:
        """Move the entry to the dead letters with a ``failed`` result; True if stored."""
        keys = self.keys
        if isinstance(task, Malformed):
            letter = taskwire.dead_letter_fields(
                task_id="",
                message_id=task.message_id,
                payload=json.dumps(task.raw_fields, sort_keys=True),
                error=error,
                attempts=task.attempt,
                consumer=consumer,
            )
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(keys.dead, letter, maxlen=DEAD_LETTER_MAXLEN, approximate=True)  # type: ignore[arg-type]
                pipe.xack(keys.stream, keys.group, task.message_id)
                pipe.xdel(keys.stream, task.message_id)
                await pipe.execute()
            return True
        failed = taskwire.result_of(task, consumer=consumer, finished_at=time.time(), error=error)
        letter = taskwire.dead_letter_fields(
            task_id=task.task_id,
            message_id=task.message_id,
            payload=taskwire.encode_payload(task.payload),
            error=error,
            attempts=task.attempt,
            consumer=consumer,
        )
        written = await self._dead_script(
            keys=[
                keys.result(task.task_id),
                keys.stream,
                keys.dead,
                keys.submitted(task.task_id),
            ],
            args=[
                keys.group,
                task.message_id,
                taskwire.encode_result(failed),
                self.config.result_ttl_s * 1000,
                DEAD_LETTER_MAXLEN,
                *taskwire.flat(letter),
            ],
        )
        if int(written):
            await self._announce(task.task_id)
        return bool(int(written))
