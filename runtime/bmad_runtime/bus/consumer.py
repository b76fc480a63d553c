"""The consume loop: read and reclaim entries, run handlers, retry, dead-letter, stop.

`consume` runs one consumer of an agent's group until its `stop` event is set. Up to
`concurrency` handlers run at once; idle entries of dead consumers are reclaimed
every `BusConfig.claim_interval_s`; a handler error is retried on a later delivery
and dead-lettered on the last allowed one (`before_run`, `after_failure`); on stop,
in-flight tasks get a grace period and the rest stay pending for another consumer.
A task that already has a result (it was cancelled, or another consumer finished it)
is acknowledged without running; a handler that raises `TaskFailedError` records a
failed result at once, without the redeliveries meant for consumers that died.
The loop talks to Redis only through a `Source` (`client.TaskBus` is the real one).

Redis may be unreachable when the loop starts (a replica starting during a Redis
outage) or go away later: the loop keeps retrying with capped backoff, creating the
consumer group first, and says in its `ConsumerHealth` whether it reads the stream,
so that readiness can tell (``/readyz`` reports ``bus``).

While a handler runs, its entry is kept claimed: every
`BusConfig.heartbeat_interval_s` the consumer resets the idle time of the entries it
holds, so XAUTOCLAIM (another consumer's, or this one's) takes over only the entries
of a consumer that stopped, however long a task takes. An entry this consumer finds
in its own hands again (a late heartbeat) is not started twice; an entry another
consumer took over while this one was silent has its run here cancelled.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import Any, Protocol

from redis import exceptions as redis_errors

from bmad_integrations import taskwire
from bmad_runtime.bus import client, outcomes

log = logging.getLogger(__name__)

Handler = Callable[[taskwire.Task], Awaitable[dict[str, Any]]]


class Source(Protocol):
    """The bus commands the loop needs (`client.TaskBus`; a fake in unit tests)."""

    keys: taskwire.Keys
    config: client.BusConfig

    async def ensure_group(self, *, force: bool = False) -> None: ...

    async def heartbeat(self, consumer: str, message_ids: Iterable[str]) -> set[str]: ...

    async def read(self, consumer: str, *, count: int, block_ms: int) -> list[taskwire.Task]: ...

    async def claim(
        self, consumer: str, *, count: int, cursor: str
    ) -> tuple[str, list[taskwire.Task]]: ...

    async def finish(self, task: taskwire.Task, result: taskwire.TaskResult) -> bool: ...

    async def dead_letter(self, task: taskwire.Task, *, error: str, consumer: str) -> bool: ...

    async def settled(self, task: taskwire.Task) -> bool: ...


# Re-exported: the loop's callers name these through this module.
TaskFailedError = outcomes.TaskFailedError
ConsumerHealth = outcomes.ConsumerHealth
ConsumeStats = outcomes.ConsumeStats
describe_error = outcomes.describe_error
before_run = outcomes.before_run
after_failure = outcomes.after_failure


async def consume(
    source: Source,
    handler: Handler,
    *,
    consumer_name: str,
    batch: int = 10,
    block_ms: int = 1000,
    concurrency: int | None = None,
    stop: asyncio.Event | None = None,
    grace_s: float = 30.0,
    health: ConsumerHealth | None = None,
) -> ConsumeStats:
    """Run tasks until `stop` is set, then shut down gracefully.

    `health` is kept current: consuming once the group exists and a read or claim
    went through, not consuming (with the reason) while Redis cannot be reached.

    Up to `concurrency` (default `batch`) handlers run at once. Reads block at most
    `block_ms`, which bounds how long a stop takes to be noticed. On stop no more
    entries are read; in-flight tasks get `grace_s` to finish, the rest are
    cancelled and stay pending (unacked) for another consumer to reclaim.
    """
    if not consumer_name or not taskwire.is_task_id(consumer_name):
        raise ValueError(f"consumer name {consumer_name!r} must be printable, no spaces")
    if batch < 1 or block_ms < 1:
        raise ValueError("batch and block_ms must be at least 1")
    run = _Run(
        source,
        handler,
        consumer=consumer_name,
        batch=batch,
        block_ms=block_ms,
        concurrency=max(1, concurrency or batch),
        stop=stop or asyncio.Event(),
        grace_s=grace_s,
        health=health or ConsumerHealth(),
    )
    return await run.main()


class _Run:
    """The state of one `consume` call: the read/claim loop and its tasks."""

    # After the grace period, a task already writing its result gets this long more:
    # its handler's work is done, and losing it would only mean running it again.
    FINISH_TIMEOUT_S = 5.0
    BACKOFF_MAX_S = 5.0

    def __init__(
        self,
        source: Source,
        handler: Handler,
        *,
        consumer: str,
        batch: int,
        block_ms: int,
        concurrency: int,
        stop: asyncio.Event,
        grace_s: float,
        health: ConsumerHealth,
    ) -> None:
        self.source = source
        self.handler = handler
        self.consumer = consumer
        self.batch = batch
        self.block_ms = block_ms
        self.concurrency = concurrency
        self.stop = stop
        self.grace_s = grace_s
        self.health = health
        self.stats = ConsumeStats()
        self.inflight: set[asyncio.Task[None]] = set()
        self.running: dict[str, asyncio.Task[None]] = {}  # by message id
        self.finishing: set[asyncio.Task[Any]] = set()

    async def main(self) -> ConsumeStats:
        # The group is made inside the loop (Redis may be down when the replica starts).
        beating = asyncio.create_task(self._heartbeats(), name=f"bmad-heartbeat-{self.consumer}")
        try:
            await self._loop()
        finally:
            try:
                await self._drain()
            finally:
                beating.cancel()
                await asyncio.gather(beating, return_exceptions=True)
        log.info("consumer %s: stopped: %s", self.consumer, self.stats.as_dict())
        return self.stats

    async def _heartbeats(self) -> None:
        """Keep the entries of running tasks claimed until they finish (or are lost)."""
        interval = self.source.config.heartbeat_interval_s
        while True:
            await asyncio.sleep(interval)
            ids = [mid for mid, job in self.running.items() if not job.done()]
            if not ids:
                continue
            try:
                held = await self.source.heartbeat(self.consumer, ids)
            except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                log.warning("consumer %s: heartbeat failed (%s)", self.consumer, exc)
                continue
            except redis_errors.ResponseError as exc:
                log.warning("consumer %s: heartbeat refused (%s)", self.consumer, exc)
                continue
            for mid in ids:
                job = self.running.get(mid)
                if mid in held or job is None or job.done() or job in self.finishing:
                    continue
                # Acked by a second run elsewhere, or taken over while this consumer
                # was silent for min_idle_ms: the task is not ours to run any more.
                log.warning(
                    "consumer %s: entry %s was taken over by another consumer; "
                    "cancelling its run here",
                    self.consumer,
                    mid,
                )
                self.stats.lost += 1
                job.cancel()

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        interval = self.source.config.claim_interval_s
        next_claim = loop.time()  # at once: a predecessor may have left entries
        cursor = "0-0"
        backoff = 0.1
        grouped = False
        stopper = asyncio.ensure_future(self.stop.wait())
        try:
            while not self.stop.is_set():
                try:
                    if not grouped:
                        # Not before the loop: Redis may be down when the replica starts.
                        await self.source.ensure_group()
                        grouped = True
                        keys = self.source.keys
                        log.info(
                            "consumer %s: consuming %s (group %s)",
                            self.consumer,
                            keys.stream,
                            keys.group,
                        )
                        self.health.up()
                    now = loop.time()
                    if self._free() > 0 and now >= next_claim:
                        cursor, claimed = await self.source.claim(
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
                    tasks = await self.source.read(
                        self.consumer,
                        count=min(self.batch, self._free()),
                        block_ms=min(self.block_ms, until_claim_ms),
                    )
                    self.stats.read += len(tasks)
                    self._spawn(tasks)
                    if not self.health.consuming:
                        log.info("consumer %s: redis is back, consuming again", self.consumer)
                        self.health.up()
                    backoff = 0.1
                except redis_errors.ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    # The stream was deleted (and the group with it): start afresh.
                    log.warning("consumer %s: group missing, creating it", self.consumer)
                    await self.source.ensure_group(force=True)
                except (redis_errors.ConnectionError, redis_errors.TimeoutError) as exc:
                    self.health.down(
                        f"the task bus (Redis) cannot be reached ({type(exc).__name__}): "
                        "tasks are not consumed"
                    )
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

    def _spawn(self, tasks: Iterable[taskwire.Task]) -> None:
        for task in tasks:
            mid = task.message_id
            if mid in self.running:
                # Reclaimed from ourselves (a heartbeat came late): it is running here.
                continue
            job = asyncio.create_task(self._run(task), name=f"bmad-task-{mid}")
            self.inflight.add(job)
            self.running[mid] = job
            job.add_done_callback(self.inflight.discard)
            job.add_done_callback(functools.partial(self._forget, mid))

    def _forget(self, mid: str, job: asyncio.Task[None]) -> None:
        if self.running.get(mid) is job:
            del self.running[mid]

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

    async def _run(self, task: taskwire.Task) -> None:
        max_attempts = self.source.config.max_attempts
        try:
            if isinstance(task, client.Malformed):
                await self._dead(task, task.error)
                return
            if before_run(attempt=task.attempt, max_attempts=max_attempts) == "dead":
                error = (
                    f"no result after {task.attempt - 1} deliveries "
                    f"(max_attempts {max_attempts}): its consumers stopped or timed out"
                )
                await self._dead(task, error)
                return
            if await self.source.settled(task):
                self.stats.skipped += 1
                log.info(
                    "consumer %s: task %s already has a result (cancelled or done): skipped",
                    self.consumer,
                    task.task_id,
                )
                return
            try:
                timeout_ms = self.source.config.attempt_timeout_ms
                deadline = asyncio.timeout(None if timeout_ms is None else timeout_ms / 1000)
                try:
                    async with deadline:
                        output = await self.handler(task)
                except TimeoutError:
                    if not deadline.expired():
                        raise
                    raise TimeoutError(
                        f"the attempt took longer than {timeout_ms} ms (attempt_timeout_ms)"
                    ) from None
                if not isinstance(output, dict):
                    raise taskwire.WireError(
                        f"the handler returned {type(output).__name__}, not a dict"
                    )
                result = taskwire.result_of(
                    task, consumer=self.consumer, finished_at=time.time(), output=output
                )
                taskwire.encode_result(result)  # fail here, as the handler's error, if not JSON
            except TaskFailedError as exc:
                result = taskwire.result_of(
                    task,
                    consumer=self.consumer,
                    finished_at=time.time(),
                    error=describe_error(exc, with_type=False),
                )
                with self._recording():
                    await self.source.finish(task, result)
                self.stats.refused += 1
                log.warning(
                    "consumer %s: task %s failed: %s", self.consumer, task.task_id, result.error
                )
                return
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
                written = await self.source.finish(task, result)
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

    async def _dead(self, task: taskwire.Task, error: str) -> None:
        with self._recording():
            await self.source.dead_letter(task, error=error, consumer=self.consumer)
        self.stats.dead_lettered += 1
        log.error(
            "consumer %s: task %s dead-lettered after attempt %d: %s",
            self.consumer,
            task.task_id or f"(entry {task.message_id})",
            task.attempt,
            error,
        )
