"""The task bus: work for an agent as entries of a Redis stream, run at least once,
answered exactly once.

Work that does not come in over HTTP (workflow steps, fan-out per story, retries the
operator schedules) arrives as tasks. Each Agent has one stream and one consumer group
(`agents`), shared by all its replicas. A consumer group hands every entry to one
consumer and keeps it *pending* until it is acknowledged, so a replica that dies (OOM
kill, node loss, SIGKILL) leaves its entries behind; the survivors take them over
with XAUTOCLAIM once they have been idle for `min_idle_ms`. Delivery is therefore
at-least-once and a task may run twice.

The *result* is still written exactly once. Task ids are the caller's idempotency
keys: the result lives under the task id, and the Lua script that stores it sets the
key only if it is absent (``SET NX``) and acknowledges the entry in the same atomic
step. A second run of the same task finds the result there, leaves it alone and only
acks. Submitting an id twice enqueues it once (a submission marker, checked and set by
one script, kept as long as the result); and if a duplicate got through (a task still
queued when its marker expired), its result would still be written once.

The delivery count that the group keeps per pending entry is the attempt number. A
handler that raises leaves its entry pending; it is retried when reclaimed (so
`min_idle_ms` is also the retry delay), and the attempt that reaches `max_attempts`
moves the entry to the dead-letter stream with the error (and stores a ``failed``
result, so waiters stop waiting). An entry that is
reclaimed more than `max_attempts` times without ever finishing (its consumers keep
dying) is dead-lettered without running again.

Acked entries are deleted from the stream in the same script (XDEL), so the stream
holds exactly the tasks without a result: XLEN is the queue depth, waiting plus in
flight, which is what the autoscaler scales on.

Key layout, for tenant ``T`` and agent ``A`` (both Kubernetes object names, so they
contain no ``:``):

=================================  =================================================
``bmad:T:A:tasks``                 the stream; consumer group ``agents``
``bmad:T:A:results:<task id>``     the result, a JSON string with a TTL
``bmad:T:A:dead``                  dead letters (a stream, capped at ~10,000 entries)
``bmad:T:A:submitted:<task id>``   the stream entry id of a submission (dedup), TTL
``bmad:T:A:runs:<task id>``        executions counted by the echo handler (tests)
=================================  =================================================

The scripts touch several keys of one agent; on Redis Cluster they would need one
hash slot (a hash tag such as ``bmad:{T:A}:…``), which this layout does not have yet.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from redis import asyncio as aioredis
from redis import exceptions as redis_errors

log = logging.getLogger(__name__)

GROUP = "agents"
PREFIX = "bmad"
DEAD_LETTER_MAXLEN = 10_000
ERROR_MAX_CHARS = 2_000
TASK_ID_MAX_CHARS = 256

# Kubernetes object names (DNS subdomains): lower-case alphanumerics, '-' and '.'.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# Printable ASCII without spaces: ids end up in key names and log lines.
_TASK_ID = re.compile(rf"[!-~]{{1,{TASK_ID_MAX_CHARS}}}")

Status = Literal["succeeded", "failed"]


class BusError(Exception):
    """A task, result or dead letter that cannot be encoded or decoded."""


# --- keys ---------------------------------------------------------------------------


def validate_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{kind} {value!r} is not a Kubernetes object name "
            "(lower-case letters, digits, '-' and '.', at most 253 characters)"
        )
    return value


def validate_task_id(task_id: str) -> str:
    if not _TASK_ID.fullmatch(task_id):
        raise ValueError(
            f"task id {task_id!r} must be 1-{TASK_ID_MAX_CHARS} printable ASCII "
            "characters without spaces"
        )
    return task_id


@dataclass(frozen=True)
class Keys:
    """The Redis key names of one agent's bus (see the module docstring)."""

    tenant: str
    agent: str

    def __post_init__(self) -> None:
        validate_name("tenant", self.tenant)
        validate_name("agent", self.agent)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}:{self.tenant}:{self.agent}"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:tasks"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def group(self) -> str:
        return GROUP

    def result(self, task_id: str) -> str:
        return f"{self.prefix}:results:{validate_task_id(task_id)}"

    def submitted(self, task_id: str) -> str:
        return f"{self.prefix}:submitted:{validate_task_id(task_id)}"

    def runs(self, task_id: str) -> str:
        return f"{self.prefix}:runs:{validate_task_id(task_id)}"


# --- values -------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class Task:
    """One delivery of a task. `attempt` is the group's delivery count (1 = first)."""

    task_id: str
    payload: dict[str, Any]
    message_id: str
    attempt: int


@dataclass(frozen=True, kw_only=True)
class TaskResult:
    """What is stored under the result key: the handler's output, or the last error."""

    task_id: str
    message_id: str
    status: Status
    output: dict[str, Any] | None
    error: str | None
    consumer: str
    attempt: int
    finished_at: float


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """One entry of the dead-letter stream."""

    id: str
    task_id: str
    message_id: str
    payload: str
    error: str
    attempts: int
    consumer: str


@dataclass(frozen=True, kw_only=True)
class BusConfig:
    """What all consumers of one agent must agree on."""

    min_idle_ms: int = 30_000
    """An entry pending this long without an ack is taken over by another consumer;
    longer than the slowest task should take, or slow tasks run twice."""
    max_attempts: int = 5
    claim_interval_ms: int | None = None
    """How often a consumer looks for stale entries; default `min_idle_ms` / 2."""
    result_ttl_s: int = 86_400
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

    @property
    def claim_interval_s(self) -> float:
        ms = self.claim_interval_ms
        if ms is None:
            ms = min(max(self.min_idle_ms // 2, 100), 10_000)
        return ms / 1000


@dataclass
class ConsumeStats:
    """What one `consume` run did, for logs and tests."""

    read: int = 0
    claimed: int = 0
    succeeded: int = 0
    duplicates: int = 0
    """Tasks that finished but found a result already there (a second run)."""
    failed: int = 0
    """Handler errors left pending for a retry."""
    dead_lettered: int = 0
    abandoned: int = 0
    """In-flight tasks cancelled at shutdown, left pending for others to reclaim."""

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass(frozen=True, kw_only=True)
class _Malformed(Task):
    """An entry that does not decode; it is dead-lettered and never handled."""

    error: str
    raw_fields: dict[str, str] = field(default_factory=dict)


Handler = Callable[[Task], Awaitable[dict[str, Any]]]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def describe_error(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}"
    return text if len(text) <= ERROR_MAX_CHARS else text[: ERROR_MAX_CHARS - 1] + "…"


def encode_payload(payload: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(payload), separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise BusError(f"the task payload is not JSON-serialisable: {exc}") from exc


def decode_entry(message_id: Any, fields: Mapping[Any, Any] | None, *, attempt: int) -> Task:
    """A stream entry as the handler sees it; `BusError` for an entry we did not write."""
    mid = _text(message_id)
    data = {_text(k): _text(v) for k, v in (fields or {}).items()}
    task_id = data.get("task_id", "")
    if not _TASK_ID.fullmatch(task_id):
        raise BusError(f"entry {mid} has no valid task_id")
    try:
        payload = json.loads(data.get("payload", ""))
    except ValueError as exc:
        raise BusError(f"entry {mid} (task {task_id}) has a payload that is not JSON") from exc
    if not isinstance(payload, dict):
        raise BusError(f"entry {mid} (task {task_id}) has a payload that is not an object")
    return Task(task_id=task_id, payload=payload, message_id=mid, attempt=attempt)


def encode_result(result: TaskResult) -> str:
    data = {
        "task_id": result.task_id,
        "message_id": result.message_id,
        "status": result.status,
        "output": result.output,
        "error": result.error,
        "consumer": result.consumer,
        "attempt": result.attempt,
        "finished_at": result.finished_at,
    }
    try:
        return json.dumps(data, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise BusError(f"the result of task {result.task_id} is not JSON: {exc}") from exc


def decode_result(raw: str | bytes) -> TaskResult:
    try:
        data = json.loads(raw)
        status = data["status"]
        if status not in ("succeeded", "failed"):
            raise BusError(f"unknown result status {status!r}")
        output = data.get("output")
        if output is not None and not isinstance(output, dict):
            raise BusError("the result output is not an object")
        return TaskResult(
            task_id=str(data["task_id"]),
            message_id=str(data["message_id"]),
            status=status,
            output=output,
            error=data.get("error"),
            consumer=str(data["consumer"]),
            attempt=int(data["attempt"]),
            finished_at=float(data["finished_at"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise BusError(f"not a task result: {exc}") from exc


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


def before_run(*, attempt: int, max_attempts: int) -> Literal["run", "dead"]:
    """A delivery past `max_attempts` is not run: earlier ones died without a word."""
    return "run" if attempt <= max_attempts else "dead"


def after_failure(*, attempt: int, max_attempts: int) -> Literal["retry", "dead"]:
    """A handler error on the last allowed attempt dead-letters; before it, retry."""
    return "dead" if attempt >= max_attempts else "retry"


# --- scripts ------------------------------------------------------------------------

# KEYS: stream, submitted marker, result. ARGV: group, task id, payload, ttl ms.
# Returns {message id, 1 if enqueued now / 0 if it was a duplicate}.
_SUBMIT = """
local seen = redis.call('GET', KEYS[2])
if seen then return {seen, 0} end
local done = redis.call('GET', KEYS[3])
if done then
  local ok, decoded = pcall(cjson.decode, done)
  local mid = ''
  if ok and type(decoded) == 'table' and type(decoded['message_id']) == 'string' then
    mid = decoded['message_id']
  end
  return {mid, 0}
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.pcall('XGROUP', 'CREATE', KEYS[1], ARGV[1], '0', 'MKSTREAM')
end
local id = redis.call('XADD', KEYS[1], '*', 'task_id', ARGV[2], 'payload', ARGV[3])
redis.call('SET', KEYS[2], id, 'PX', ARGV[4])
return {id, 1}
"""

# KEYS: result, stream, submitted marker. ARGV: group, message id, result, ttl ms.
# The result is written only if absent; the entry is acked (and deleted) either way.
_FINISH = """
local written = redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[4])
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if written then
  redis.call('PEXPIRE', KEYS[3], ARGV[4])
  return 1
end
return 0
"""

# KEYS: result, stream, dead, submitted marker.
# ARGV: group, message id, failed result, ttl ms, task id, payload, error, attempts,
# consumer, dead-letter maxlen. A task that already has a result is only acked.
_DEAD = """
local written = redis.call('SET', KEYS[1], ARGV[3], 'NX', 'PX', ARGV[4])
if written then
  redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[10], '*',
    'task_id', ARGV[5], 'message_id', ARGV[2], 'payload', ARGV[6],
    'error', ARGV[7], 'attempts', ARGV[8], 'consumer', ARGV[9])
  redis.call('PEXPIRE', KEYS[4], ARGV[4])
end
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
redis.call('XDEL', KEYS[2], ARGV[2])
if written then return 1 end
return 0
"""


# --- the bus ------------------------------------------------------------------------


class TaskBus:
    """One agent's task bus. The Redis client is injected (or made by `from_url`)."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        tenant: str,
        agent: str,
        config: BusConfig | None = None,
    ) -> None:
        self.redis = redis
        self.keys = Keys(tenant, agent)
        self.config = config or BusConfig()
        self._owns_client = False
        self._group_ready = False
        self._submit_script = redis.register_script(_SUBMIT)
        self._finish_script = redis.register_script(_FINISH)
        self._dead_script = redis.register_script(_DEAD)

    @classmethod
    def from_url(
        cls, url: str, *, tenant: str, agent: str, config: BusConfig | None = None
    ) -> TaskBus:
        bus = cls(
            aioredis.Redis.from_url(url, decode_responses=True),
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
            await self.redis.xgroup_create(self.keys.stream, GROUP, id="0", mkstream=True)
        except redis_errors.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise
        self._group_ready = True

    # --- producing and reading results ---

    async def submit(self, task_id: str, payload: Mapping[str, Any]) -> str:
        """Enqueue a task once per id; returns the stream entry id (the first one's for
        a duplicate, or ``""`` if only its result is left)."""
        keys = self.keys
        raw = await self._submit_script(
            keys=[keys.stream, keys.submitted(task_id), keys.result(task_id)],
            args=[GROUP, task_id, encode_payload(payload), self.config.result_ttl_s * 1000],
        )
        message_id, _enqueued = raw
        return _text(message_id)

    async def result(self, task_id: str) -> TaskResult | None:
        raw = await self.redis.get(self.keys.result(task_id))
        return None if raw is None else decode_result(raw)

    async def wait_result(
        self, task_id: str, *, timeout_s: float, poll_s: float = 0.05
    ) -> TaskResult:
        """Poll for a result; `TimeoutError` if none within `timeout_s`."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = await self.result(task_id)
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                raise TimeoutError(f"no result for task {task_id} within {timeout_s}s")
            await asyncio.sleep(poll_s)

    async def queue_depth(self) -> int:
        """Tasks without a result: waiting plus in flight (acked entries are deleted)."""
        return int(await self.redis.xlen(self.keys.stream))

    async def pending(self) -> int:
        """Entries delivered to a consumer and not yet acked."""
        try:
            summary = await self.redis.xpending(self.keys.stream, GROUP)
        except redis_errors.ResponseError as exc:
            if "NOGROUP" in str(exc):
                return 0
            raise
        return int(summary["pending"])

    async def dead_letters(self, count: int = 100) -> list[DeadLetter]:
        entries = await self.redis.xrange(self.keys.dead, count=count)
        letters = []
        for entry_id, fields in entries or []:
            data = {_text(k): _text(v) for k, v in (fields or {}).items()}
            letters.append(
                DeadLetter(
                    id=_text(entry_id),
                    task_id=data.get("task_id", ""),
                    message_id=data.get("message_id", ""),
                    payload=data.get("payload", ""),
                    error=data.get("error", ""),
                    attempts=int(data.get("attempts", "0") or 0),
                    consumer=data.get("consumer", ""),
                )
            )
        return letters

    # --- consuming ---

    async def consume(
        self,
        handler: Handler,
        *,
        consumer_name: str,
        batch: int = 10,
        block_ms: int = 1000,
        concurrency: int | None = None,
        stop: asyncio.Event | None = None,
        grace_s: float = 30.0,
    ) -> ConsumeStats:
        """Run tasks until `stop` is set, then shut down gracefully.

        Up to `concurrency` (default `batch`) handlers run at once. Reads block at most
        `block_ms`, which bounds how long a stop takes to be noticed. On stop no more
        entries are read; in-flight tasks get `grace_s` to finish, the rest are
        cancelled and stay pending (unacked) for another consumer to reclaim.
        """
        if not consumer_name or not _TASK_ID.fullmatch(consumer_name):
            raise ValueError(f"consumer name {consumer_name!r} must be printable, no spaces")
        if batch < 1 or block_ms < 1:
            raise ValueError("batch and block_ms must be at least 1")
        run = _ConsumerRun(
            self,
            handler,
            consumer=consumer_name,
            batch=batch,
            block_ms=block_ms,
            concurrency=max(1, concurrency or batch),
            stop=stop or asyncio.Event(),
            grace_s=grace_s,
        )
        return await run.main()

    async def _read(self, consumer: str, *, count: int, block_ms: int) -> list[Task]:
        response = await self.redis.xreadgroup(
            GROUP, consumer, {self.keys.stream: ">"}, count=count, block=block_ms
        )
        # New entries (">") are on their first delivery.
        return [
            self._task_or_quarantine(mid, fields, 1) for mid, fields in stream_entries(response)
        ]

    async def _claim(self, consumer: str, *, count: int, cursor: str) -> tuple[str, list[Task]]:
        """Take over up to `count` entries idle for `min_idle_ms`, whoever held them.

        XAUTOCLAIM scans the pending entries like SCAN: it returns where to go on from
        (``0-0`` once the scan has wrapped around)."""
        reply = await self.redis.xautoclaim(
            self.keys.stream,
            GROUP,
            consumer,
            min_idle_time=self.config.min_idle_ms,
            start_id=cursor,
            count=count,
        )
        cursor, claimed = _text(reply[0]), reply[1]
        pairs = [(mid, fields) for mid, fields in claimed if fields is not None]
        if not pairs:
            return cursor, []
        # XAUTOCLAIM does not say how often an entry was delivered; XPENDING does
        # (the claim itself counted as one more delivery).
        async with self.redis.pipeline(transaction=False) as pipe:
            for mid, _ in pairs:
                pipe.xpending_range(self.keys.stream, GROUP, min=mid, max=mid, count=1)
            details = await pipe.execute()
        tasks = []
        for (mid, fields), detail in zip(pairs, details, strict=True):
            if not detail:  # acked by its slow first owner in the meantime
                continue
            attempt = int(detail[0]["times_delivered"])
            tasks.append(self._task_or_quarantine(mid, fields, attempt))
        return cursor, tasks

    def _task_or_quarantine(self, mid: Any, fields: Any, attempt: int) -> Task:
        try:
            return decode_entry(mid, fields, attempt=attempt)
        except BusError as exc:
            # Not an entry `submit` wrote: the run dead-letters it without a result.
            return _Malformed(
                task_id="",
                payload={},
                message_id=_text(mid),
                attempt=attempt,
                error=str(exc),
                raw_fields={_text(k): _text(v) for k, v in (fields or {}).items()},
            )

    async def _finish(self, task: Task, result: TaskResult) -> bool:
        keys = self.keys
        written = await self._finish_script(
            keys=[keys.result(task.task_id), keys.stream, keys.submitted(task.task_id)],
            args=[GROUP, task.message_id, encode_result(result), self.config.result_ttl_s * 1000],
        )
        return bool(int(written))

    async def _dead_letter(self, task: Task, *, error: str, consumer: str) -> bool:
        keys = self.keys
        if isinstance(task, _Malformed):
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.xadd(
                    keys.dead,
                    {
                        "task_id": "",
                        "message_id": task.message_id,
                        "payload": json.dumps(task.raw_fields, sort_keys=True),
                        "error": error,
                        "attempts": str(task.attempt),
                        "consumer": consumer,
                    },
                    maxlen=DEAD_LETTER_MAXLEN,
                    approximate=True,
                )
                pipe.xack(keys.stream, GROUP, task.message_id)
                pipe.xdel(keys.stream, task.message_id)
                await pipe.execute()
            return True
        failed = TaskResult(
            task_id=task.task_id,
            message_id=task.message_id,
            status="failed",
            output=None,
            error=error,
            consumer=consumer,
            attempt=task.attempt,
            finished_at=time.time(),
        )
        written = await self._dead_script(
            keys=[
                keys.result(task.task_id),
                keys.stream,
                keys.dead,
                keys.submitted(task.task_id),
            ],
            args=[
                GROUP,
                task.message_id,
                encode_result(failed),
                self.config.result_ttl_s * 1000,
                task.task_id,
                encode_payload(task.payload),
                error,
                task.attempt,
                consumer,
                DEAD_LETTER_MAXLEN,
            ],
        )
        return bool(int(written))


class _ConsumerRun:
    """The state of one `TaskBus.consume` call: the read/claim loop and its tasks."""

    # After the grace period, a task already writing its result gets this long more:
    # its handler's work is done, and losing it would only mean running it again.
    FINISH_TIMEOUT_S = 5.0
    BACKOFF_MAX_S = 5.0

    def __init__(
        self,
        bus: TaskBus,
        handler: Handler,
        *,
        consumer: str,
        batch: int,
        block_ms: int,
        concurrency: int,
        stop: asyncio.Event,
        grace_s: float,
    ) -> None:
        self.bus = bus
        self.handler = handler
        self.consumer = consumer
        self.batch = batch
        self.block_ms = block_ms
        self.concurrency = concurrency
        self.stop = stop
        self.grace_s = grace_s
        self.stats = ConsumeStats()
        self.inflight: set[asyncio.Task[None]] = set()
        self.finishing: set[asyncio.Task[Any]] = set()

    async def main(self) -> ConsumeStats:
        await self.bus.ensure_group()
        log.info("consumer %s: consuming %s (group %s)", self.consumer, self.bus.keys.stream, GROUP)
        try:
            await self._loop()
        finally:
            await self._drain()
        log.info("consumer %s: stopped: %s", self.consumer, self.stats.as_dict())
        return self.stats

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.bus.config.claim_interval_s
        next_claim = loop.time()  # at once: a predecessor may have left entries
        cursor = "0-0"
        backoff = 0.1
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            while not self.stop.is_set():
                try:
                    now = loop.time()
                    if self._free() > 0 and now >= next_claim:
                        cursor, claimed = await self.bus._claim(
                            self.consumer, count=self._free(), cursor=cursor
                        )
                        self.stats.claimed += len(claimed)
                        self._spawn(claimed)
                        next_claim = now + interval
                    if self._free() <= 0:
                        # Full: nothing can be read or claimed before a slot frees.
                        await asyncio.wait(
                            {*self.inflight, stopper}, return_when=asyncio.FIRST_COMPLETED
                        )
                        continue
                    until_claim_ms = max(1, math.ceil((next_claim - loop.time()) * 1000))
                    # Not raced against `stop`: a read cancelled after the server
                    # answered would strand its entries until they are reclaimed.
                    tasks = await self.bus._read(
                        self.consumer,
                        count=min(self.batch, self._free()),
                        block_ms=min(self.block_ms, until_claim_ms),
                    )
                    self.stats.read += len(tasks)
                    self._spawn(tasks)
                    backoff = 0.1
                except redis_errors.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    # The stream was deleted (and the group with it): start afresh.
                    log.warning("consumer %s: group missing, creating it", self.consumer)
                    await self.bus.ensure_group(force=True)
                except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                    log.warning(
                        "consumer %s: redis unavailable (%s), retrying in %.1fs",
                        self.consumer,
                        exc,
                        backoff,
                    )
                    await asyncio.wait({stopper}, timeout=backoff)
                    backoff = min(backoff * 2, self.BACKOFF_MAX_S)
        finally:
            stopper.cancel()

    def _free(self) -> int:
        return self.concurrency - len(self.inflight)

    def _spawn(self, tasks: Iterable[Task]) -> None:
        for task in tasks:
            job = asyncio.create_task(self._run(task), name=f"bmad-task-{task.message_id}")
            self.inflight.add(job)
            job.add_done_callback(self.inflight.discard)

    async def _drain(self) -> None:
        """Give in-flight tasks the grace period, then cancel them unacked."""
        if not self.inflight:
            return
        log.info(
            "consumer %s: stopping, %d task(s) in flight, grace %.1fs",
            self.consumer,
            len(self.inflight),
            self.grace_s,
        )
        _, late = await asyncio.wait(set(self.inflight), timeout=max(self.grace_s, 0))
        cancelled = [job for job in late if job not in self.finishing]
        for job in cancelled:
            job.cancel()
        if late:
            _, stuck = await asyncio.wait(late, timeout=self.FINISH_TIMEOUT_S)
            for job in stuck:
                job.cancel()
            await asyncio.gather(*late, return_exceptions=True)
        self.stats.abandoned += len(cancelled)

    async def _run(self, task: Task) -> None:
        bus, max_attempts = self.bus, self.bus.config.max_attempts
        try:
            if isinstance(task, _Malformed):
                await self._dead(task, task.error)
                return
            if before_run(attempt=task.attempt, max_attempts=max_attempts) == "dead":
                error = (
                    f"no result after {task.attempt - 1} deliveries "
                    f"(max_attempts {max_attempts}): its consumers stopped or timed out"
                )
                await self._dead(task, error)
                return
            try:
                output = await self.handler(task)
                if not isinstance(output, dict):
                    raise BusError(f"the handler returned {type(output).__name__}, not a dict")
                result = TaskResult(
                    task_id=task.task_id,
                    message_id=task.message_id,
                    status="succeeded",
                    output=output,
                    error=None,
                    consumer=self.consumer,
                    attempt=task.attempt,
                    finished_at=time.time(),
                )
                encode_result(result)  # fail here, as the handler's error, if not JSON
            except Exception as exc:
                error = describe_error(exc)
                if after_failure(attempt=task.attempt, max_attempts=max_attempts) == "dead":
                    await self._dead(task, error)
                else:
                    self.stats.failed += 1
                    log.warning(
                        "consumer %s: task %s attempt %d/%d failed: %s; left for a retry",
                        self.consumer,
                        task.task_id,
                        task.attempt,
                        max_attempts,
                        error,
                    )
                return
            with self._recording():
                written = await bus._finish(task, result)
            if written:
                self.stats.succeeded += 1
            else:
                self.stats.duplicates += 1
                log.info(
                    "consumer %s: task %s ran again; its first result stays",
                    self.consumer,
                    task.task_id,
                )
        except asyncio.CancelledError:
            raise
        except Exception:
            # Redis went away while recording: the entry stays pending, so the task
            # will be reclaimed and run again; the result can still be written once.
            log.exception(
                "consumer %s: could not record task %s; left pending",
                self.consumer,
                task.task_id or task.message_id,
            )

    @contextlib.contextmanager
    def _recording(self) -> Iterator[None]:
        """Mark the current task as writing its outcome: not cancelled at shutdown."""
        current = asyncio.current_task()
        if current is not None:
            self.finishing.add(current)
        try:
            yield
        finally:
            if current is not None:
                self.finishing.discard(current)

    async def _dead(self, task: Task, error: str) -> None:
        with self._recording():
            await self.bus._dead_letter(task, error=error, consumer=self.consumer)
        self.stats.dead_lettered += 1
        log.error(
            "consumer %s: task %s dead-lettered after attempt %d: %s",
            self.consumer,
            task.task_id or f"(entry {task.message_id})",
            task.attempt,
            error,
        )
