"""The producer's side of an agent's task bus: submit a task once, read its result.

Task ids are the caller's idempotency keys. `TaskProducer.submit` runs one Lua script
that enqueues the task only if neither a submission marker nor a result exists for
its id, and sets the marker in the same atomic step; so submitting an id twice (a
retry after a timeout, an operator restart) enqueues it once. The marker lives as
long as the result (`taskwire.RESULT_TTL_S`), and the consumer that writes the result
extends it. The stream is bounded: while it holds `max_depth` tasks (waiting plus in
flight) a new task is refused with `QueueFullError`, in the same atomic step, rather
than trimmed (an XADD with MAXLEN would silently drop the oldest tasks, unrun). Keys,
fields and encodings come from `taskwire`, which the consumer (`bmad_runtime.bus`)
uses too.

`cancel` stores a ``cancelled`` result under the id unless one is there: a consumer
that has not started the task skips it, and a later submit of the id enqueues
nothing. `results` reads many results in one round trip, for a producer (the
workflow engine) that has many tasks out at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from bmad_integrations import lazy, taskwire

if TYPE_CHECKING:
    from redis import asyncio as aioredis
else:  # imported when first used: only where Redis is configured
    aioredis = lazy.module("redis.asyncio")

# KEYS: stream, submitted marker, result. ARGV: group, ttl ms, max depth, then the
# entry's fields and values. Returns {message id, 1 if enqueued now / 0 if it was a
# duplicate}; for a task that has only its result left, the message id recorded in the
# result; {stream length, -1} when the stream is full (nothing written).
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
local depth = redis.call('XLEN', KEYS[1])
if depth >= tonumber(ARGV[3]) then return {tostring(depth), -1} end
local id = redis.call('XADD', KEYS[1], '*', unpack(ARGV, 4))
redis.call('SET', KEYS[2], id, 'PX', ARGV[2])
return {id, 1}
"""


class QueueFullError(Exception):
    """The agent's stream holds its most tasks already: try again later."""

    def __init__(self, *, tenant: str, agent: str, depth: int, max_depth: int) -> None:
        self.depth = depth
        self.max_depth = max_depth
        super().__init__(
            f"the task queue of agent {agent!r} (tenant {tenant!r}) is full: {depth} tasks "
            f"waiting or running, at most {max_depth}; submit again once it drains"
        )


class TaskProducer:
    """Submits tasks to one agent's bus and reads their results."""

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        tenant: str,
        agent: str,
        result_ttl_s: int = taskwire.RESULT_TTL_S,
        max_depth: int = taskwire.MAX_QUEUE_DEPTH,
    ) -> None:
        if result_ttl_s < 1:
            raise ValueError("result_ttl_s must be at least 1")
        if max_depth < 1:
            raise ValueError("max_depth must be at least 1")
        self.redis = redis
        self.keys = taskwire.Keys(tenant, agent)
        self.result_ttl_s = result_ttl_s
        self.max_depth = max_depth
        self._owns_client = False
        self._submit_script = redis.register_script(_SUBMIT)

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        tenant: str,
        agent: str,
        result_ttl_s: int = taskwire.RESULT_TTL_S,
        max_depth: int = taskwire.MAX_QUEUE_DEPTH,
    ) -> TaskProducer:
        producer = cls(
            aioredis.Redis.from_url(url, decode_responses=True),
            tenant=tenant,
            agent=agent,
            result_ttl_s=result_ttl_s,
            max_depth=max_depth,
        )
        producer._owns_client = True
        return producer

    async def aclose(self) -> None:
        if self._owns_client:
            await self.redis.aclose()

    async def submit(self, task_id: str, payload: Mapping[str, Any]) -> str:
        """Enqueue a task once per id; returns the stream entry id (the first one's for
        a duplicate, or ``""`` if only its result is left).

        Raises `QueueFullError` for a new task while the stream holds `max_depth`.
        """
        keys = self.keys
        fields = taskwire.entry_fields(task_id, payload)
        raw = await self._submit_script(
            keys=[keys.stream, keys.submitted(task_id), keys.result(task_id)],
            args=[keys.group, self.result_ttl_s * 1000, self.max_depth, *taskwire.flat(fields)],
        )
        message_id, enqueued = raw
        if int(enqueued) < 0:
            raise QueueFullError(
                tenant=keys.tenant,
                agent=keys.agent,
                depth=int(taskwire.text(message_id)),
                max_depth=self.max_depth,
            )
        return taskwire.text(message_id)

    async def cancel(self, task_id: str, *, reason: str) -> bool:
        """Store a ``cancelled`` result unless the task has one; True if it was cancelled now.

        A consumer checks for a result before it runs a task, so a task not started yet
        never runs; one already running finishes, and its result is not stored.
        """
        result = taskwire.cancelled_result(task_id, reason=reason, finished_at=time.time())
        written = await self.redis.set(
            self.keys.result(task_id),
            taskwire.encode_result(result),
            nx=True,
            px=self.result_ttl_s * 1000,
        )
        if written:
            await self.redis.publish(self.keys.finished, task_id)
        return bool(written)

    async def results(self, task_ids: list[str]) -> dict[str, taskwire.TaskResult]:
        """The results there are among ``task_ids`` (one MGET); ids without one are left out."""
        if not task_ids:
            return {}
        raws = await self.redis.mget([self.keys.result(tid) for tid in task_ids])
        return {
            tid: taskwire.decode_result(raw)
            for tid, raw in zip(task_ids, raws, strict=True)
            if raw is not None
        }

    async def result(self, task_id: str) -> taskwire.TaskResult | None:
        raw = await self.redis.get(self.keys.result(task_id))
        return None if raw is None else taskwire.decode_result(raw)

    async def wait_result(
        self, task_id: str, *, timeout_s: float, poll_s: float = 0.05
    ) -> taskwire.TaskResult:
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
        """Tasks without a result: waiting plus in flight (finished entries are deleted)."""
        return int(await self.redis.xlen(self.keys.stream))
