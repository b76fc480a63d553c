"""The task bus against the test bed's real Redis, consumers in this process.

Tasks are submitted with the shared producer (`bmad_integrations.taskbus`) and run by
the runtime's consumer (`bmad_runtime.bus`): the two sides of one wire format. The
Lua scripts, XREADGROUP, XAUTOCLAIM and XPENDING as Redis really runs them:
idempotent submission, the result written once when a task runs twice to the end,
dead letters after N attempts, entries that are not tasks, and the queue depth.
Every test works under its own tenant and agent and deletes its keys afterwards.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
from redis import asyncio as aioredis
from redis import exceptions as redis_errors

from bmad_integrations import taskbus, taskwire
from bmad_runtime.bus import client, consumer

pytestmark = [pytest.mark.integration, pytest.mark.timeout(60)]


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@dataclass
class Lane:
    """One agent's bus seen from both sides: the producer's and the consumers'."""

    tasks: taskbus.TaskProducer
    bus: client.TaskBus

    def runs(self, task_id: str) -> str:
        """Where the handlers of these tests count a task's executions."""
        return f"{self.bus.keys.prefix}:runs:{task_id}"


@pytest.fixture
async def make_lane(redis: aioredis.Redis) -> AsyncIterator[Callable[..., Lane]]:
    tenant, made = f"t-{secrets.token_hex(4)}", list[Lane]()

    def make(**config: Any) -> Lane:
        agent = f"a-{secrets.token_hex(3)}"
        made.append(
            Lane(
                tasks=taskbus.TaskProducer(redis, tenant=tenant, agent=agent),
                bus=client.TaskBus(
                    redis, tenant=tenant, agent=agent, config=client.BusConfig(**config)
                ),
            )
        )
        return made[-1]

    yield make
    for one in made:
        prefix = one.bus.keys.prefix
        keys = [key async for key in redis.scan_iter(match=f"{prefix}:*", count=500)]
        if keys:
            await redis.delete(*keys)


async def until(condition: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


class Consumer:
    """One `consume` running in the background, stopped (gracefully) by `stop()`."""

    def __init__(self, lane: Lane, handler: consumer.Handler, name: str, **kw: Any):
        self.event = asyncio.Event()
        kw.setdefault("block_ms", 100)
        self.runner = asyncio.create_task(
            consumer.consume(lane.bus, handler, consumer_name=name, stop=self.event, **kw)
        )

    async def stop(self) -> consumer.ConsumeStats:
        self.event.set()
        return await asyncio.wait_for(self.runner, timeout=15)


def counting_handler(redis: aioredis.Redis, lane: Lane, *, fail: bool = False) -> consumer.Handler:
    async def handler(task: taskwire.Task) -> dict[str, Any]:
        run = int(await redis.incr(lane.runs(task.task_id)))
        if fail:
            raise RuntimeError(f"always fails (run {run})")
        return {"output": str(task.payload.get("input", "")).upper(), "run": run}

    return handler


async def test_submitting_the_same_task_id_twice_enqueues_it_once_and_yields_one_result(
    redis: aioredis.Redis, make_lane: Callable[..., Lane]
) -> None:
    lane = make_lane(min_idle_ms=1000)

    first = await lane.tasks.submit("story-1", {"input": "plan"})
    again = await lane.tasks.submit("story-1", {"input": "something else"})

    assert again == first
    assert await lane.bus.queue_depth() == 1
    consumer = Consumer(lane, counting_handler(redis, lane), "c1")
    result = await lane.tasks.wait_result("story-1", timeout_s=10)
    stats = await consumer.stop()

    assert result.output == {"output": "PLAN", "run": 1}, "the first submission wins"
    assert result.message_id == first
    assert stats.succeeded == 1
    # Once answered, a third submission neither enqueues nor runs anything.
    assert await lane.tasks.submit("story-1", {"input": "plan"}) == first
    assert await lane.bus.queue_depth() == 0
    assert await redis.get(lane.runs("story-1")) == "1"


class CutOff:
    """A consumer's bus whose heartbeats do not reach Redis (a partition, a paused
    process): its entries go idle although its handler still runs."""

    def __init__(self, bus: client.TaskBus) -> None:
        self.bus = bus
        self.keys, self.config = bus.keys, bus.config

    def __getattr__(self, name: str) -> Any:
        return getattr(self.bus, name)

    async def heartbeat(self, consumer: str, message_ids: Any) -> set[str]:
        raise redis_errors.ConnectionError("cut off from Redis (simulated)")


async def test_a_task_that_runs_twice_to_the_end_has_its_result_written_once(
    redis: aioredis.Redis, make_lane: Callable[..., Lane]
) -> None:
    # c1 is cut off from Redis for its heartbeats and slower than min_idle_ms, so c2
    # reclaims the entry and runs it as well.
    lane = make_lane(min_idle_ms=300, claim_interval_ms=50)
    c1_started = asyncio.Event()

    started_at: list[float] = []

    async def slow_then_fast(task: taskwire.Task) -> dict[str, Any]:
        run = int(await redis.incr(lane.runs(task.task_id)))
        started_at.append(time.monotonic())
        if run == 1:
            c1_started.set()
            # c1 ends its run only once c2 has answered the task (after reclaiming it).
            await until(lambda: _has_result(lane, "t1"), timeout_s=20, what="c2's result")
        return {"run": run}

    await lane.tasks.submit("t1", {})
    # One slot: while its slow run holds it, c1 claims nothing (not even its own entry).
    c1 = Consumer(Lane(lane.tasks, CutOff(lane.bus)), slow_then_fast, "c1", concurrency=1)  # type: ignore[arg-type]
    await asyncio.wait_for(c1_started.wait(), timeout=10)
    c2 = Consumer(lane, slow_then_fast, "c2")
    result = await lane.tasks.wait_result("t1", timeout_s=10)
    # A graceful stop lets c1 finish its (first, slower) run within the grace period.
    stats1, stats2 = await c1.stop(), await c2.stop()

    assert result.consumer == "c2"
    assert result.attempt == 2, "c2 got it by XAUTOCLAIM: the second delivery"
    assert started_at[1] - started_at[0] >= 0.25, "not before it was idle for min_idle_ms"
    assert await redis.get(lane.runs("t1")) == "2"
    assert stats2.claimed == 1
    assert stats2.succeeded == 1
    assert stats1.duplicates == 1, "c1 finished later and found the result there"
    assert stats1.succeeded == 0
    assert await lane.tasks.result("t1") == result
    assert await lane.bus.queue_depth() == 0


async def test_a_task_that_always_fails_is_dead_lettered_after_max_attempts(
    redis: aioredis.Redis, make_lane: Callable[..., Lane]
) -> None:
    lane = make_lane(min_idle_ms=200, claim_interval_ms=50, max_attempts=3)
    mid = await lane.tasks.submit("doomed", {"input": "x"})
    await lane.tasks.submit("fine", {"input": "y"})

    async def handler(task: taskwire.Task) -> dict[str, Any]:
        if task.task_id == "doomed":
            return await counting_handler(redis, lane, fail=True)(task)
        return await counting_handler(redis, lane)(task)

    consumer = Consumer(lane, handler, "c1")
    result = await lane.tasks.wait_result("doomed", timeout_s=15)
    stats = await consumer.stop()

    assert result.status == "failed"
    assert result.error == "RuntimeError: always fails (run 3)"
    assert result.attempt == 3
    assert await redis.get(lane.runs("doomed")) == "3"
    letters = await lane.bus.dead_letters()
    assert len(letters) == 1
    letter = letters[0]
    assert (letter.task_id, letter.message_id, letter.attempts) == ("doomed", mid, 3)
    assert letter.error == "RuntimeError: always fails (run 3)"
    assert letter.payload == '{"input":"x"}'
    assert letter.consumer == "c1"
    assert stats.failed == 2
    assert stats.dead_lettered == 1
    assert (await lane.tasks.result("fine")) is not None
    assert await lane.bus.pending() == 0, "the dead letter was acked"
    assert await lane.bus.queue_depth() == 0
    assert await lane.bus.dead_letter_count() == 1


async def test_an_entry_that_is_not_a_task_goes_to_the_dead_letters_unrun(
    redis: aioredis.Redis, make_lane: Callable[..., Lane]
) -> None:
    lane = make_lane(min_idle_ms=1000)
    await lane.bus.ensure_group()
    mid = await redis.xadd(lane.bus.keys.stream, {"hello": "world"})
    ran: list[str] = []

    async def handler(task: taskwire.Task) -> dict[str, Any]:
        ran.append(task.task_id)
        return {}

    consumer = Consumer(lane, handler, "c1")
    await until(lambda: _has_dead_letters(lane), timeout_s=10, what="the entry to be dead-lettered")
    await consumer.stop()

    [letter] = await lane.bus.dead_letters()
    assert letter.message_id == mid
    assert "no valid task_id" in letter.error
    assert letter.payload == '{"hello": "world"}'
    assert ran == []
    assert await lane.bus.queue_depth() == 0


async def test_a_full_queue_refuses_new_tasks_and_keeps_every_waiting_one(
    redis: aioredis.Redis, make_lane: Callable[..., Lane]
) -> None:
    """Issue 10, hole 12 (XADD without a bound). The stream is bounded by refusing a
    submission, not by XADD MAXLEN, which would drop the oldest tasks unrun. Before the
    fix the producer had no bound, and this test failed with:

        TypeError: TaskProducer.__init__() got an unexpected keyword argument 'max_depth'
    """
    lane = make_lane(min_idle_ms=1000)
    keys = lane.bus.keys
    tasks = taskbus.TaskProducer(redis, tenant=keys.tenant, agent=keys.agent, max_depth=3)
    first = await tasks.submit("t0", {"input": "a"})
    await tasks.submit("t1", {"input": "b"})
    await tasks.submit("t2", {"input": "c"})

    with pytest.raises(taskbus.QueueFullError) as caught:
        await tasks.submit("t3", {"input": "d"})
    assert (caught.value.depth, caught.value.max_depth) == (3, 3)
    assert "submit again once it drains" in str(caught.value)
    assert await tasks.submit("t0", {"input": "a"}) == first, "a duplicate is still answered"
    assert await lane.bus.queue_depth() == 3
    assert await redis.get(keys.submitted("t3")) is None, "the refused task left no marker"

    consumer = Consumer(lane, counting_handler(redis, lane), "c1")
    for task_id in ("t0", "t1", "t2"):  # every waiting task ran: none was trimmed away
        assert (await tasks.wait_result(task_id, timeout_s=10)).status == "succeeded"
    await until(lambda: _depth_is(lane, 0, pending=0), timeout_s=10, what="the queue to drain")
    await tasks.submit("t3", {"input": "d"})
    assert (await tasks.wait_result("t3", timeout_s=10)).status == "succeeded"
    await consumer.stop()


async def _has_result(lane: Lane, task_id: str) -> bool:
    return await lane.tasks.result(task_id) is not None


async def _has_dead_letters(lane: Lane) -> bool:
    return bool(await lane.bus.dead_letters())


async def test_queue_depth_counts_waiting_and_in_flight_tasks(
    redis: aioredis.Redis, make_lane: Callable[..., Lane]
) -> None:
    lane = make_lane(min_idle_ms=60_000)
    assert await lane.bus.queue_depth() == 0
    for i in range(12):
        await lane.tasks.submit(f"t{i}", {})
    assert await lane.bus.queue_depth() == 12

    release = asyncio.Event()

    async def held(task: taskwire.Task) -> dict[str, Any]:
        if task.task_id in ("t0", "t1", "t2", "t3"):
            return {}
        await release.wait()
        return {}

    consumer = Consumer(lane, held, "c1", batch=6, concurrency=6)
    # Four answered; six in flight (delivered, unacked); two not yet delivered.
    await until(lambda: _depth_is(lane, 8, pending=6), timeout_s=10, what="6 in flight")
    release.set()
    await until(lambda: _depth_is(lane, 0, pending=0), timeout_s=10, what="all done")
    await consumer.stop()


async def _depth_is(lane: Lane, depth: int, *, pending: int) -> bool:
    return (await lane.bus.queue_depth(), await lane.bus.pending()) == (depth, pending)


async def test_slow_tasks_are_not_run_more_than_once(
    redis: aioredis.Redis, make_lane: Callable[..., Lane]
) -> None:
    """Issue 10, hole 1: a handler slower than `min_idle_ms` ran twice (or more).

    Two live consumers, an idle time of 200 ms and a handler that takes 1.2 s: XAUTOCLAIM
    took the in-flight entries over (its own consumer's too), ran them again, and after
    `max_attempts` deliveries stored a ``failed`` result while the first run was still
    going. Before the heartbeat this test failed with (runs, status) per task:

        AssertionError: (runs, status): {'slow-0': (2, 'succeeded'), 'slow-1': (2,
        'succeeded'), 'slow-2': (2, 'failed'), 'slow-3': (2, 'failed'), 'slow-4': (2,
        'failed'), 'slow-5': (2, 'failed'), 'slow-6': (2, 'failed'), 'slow-7': (2,
        'succeeded'), 'slow-8': (2, 'succeeded'), 'slow-9': (2, 'succeeded')}
    """
    lane = make_lane(min_idle_ms=200, claim_interval_ms=50, max_attempts=2)
    for i in range(10):
        await lane.tasks.submit(f"slow-{i}", {"input": f"x{i}"})

    async def slow(task: taskwire.Task) -> dict[str, Any]:
        run = int(await redis.incr(lane.runs(task.task_id)))
        await asyncio.sleep(1.2)
        return {"run": run}

    c1 = Consumer(lane, slow, "c1", concurrency=10)
    c2 = Consumer(lane, slow, "c2", concurrency=10)
    ids = [f"slow-{i}" for i in range(10)]
    results = [await lane.tasks.wait_result(t, timeout_s=30) for t in ids]
    # Let any second run that started still end (and count) before looking.
    stats = [await c1.stop(), await c2.stop()]

    outcome = {
        r.task_id: (int(await redis.get(lane.runs(r.task_id)) or 0), r.status) for r in results
    }
    assert outcome == dict.fromkeys(ids, (1, "succeeded")), f"(runs, status): {outcome}"
    assert {r.attempt for r in results} == {1}
    assert sum(s.lost for s in stats) == 0, "nothing was taken from a live consumer"
    assert sum(s.succeeded for s in stats) == 10
    assert await lane.bus.dead_letters() == []
    assert await lane.bus.queue_depth() == 0


# --- cancellation, many results at once, the finished channel ----------------------


async def test_a_cancelled_task_is_skipped_and_never_enqueued_again(
    redis: aioredis.Redis, make_lane: Callable[..., Lane]
) -> None:
    lane = make_lane(min_idle_ms=1000)
    await lane.tasks.submit("wf:u:prd:1", {"input": "x"})

    assert await lane.tasks.cancel("wf:u:prd:1", reason="timed out after 30s")
    assert not await lane.tasks.cancel("wf:u:prd:1", reason="again"), "cancelled once"
    consumer = Consumer(lane, counting_handler(redis, lane), "c1")
    await until(lambda: _queue_empty(lane), timeout_s=10, what="the cancelled entry to be acked")
    stats = await consumer.stop()

    result = await lane.tasks.result("wf:u:prd:1")
    assert result is not None
    assert (result.status, result.error, result.consumer) == (
        "cancelled",
        "timed out after 30s",
        taskwire.CANCELLED_BY,
    )
    assert stats.skipped == 1
    assert await redis.get(lane.runs("wf:u:prd:1")) is None, "the handler never ran it"
    # A producer that submits the id again (an operator restart) enqueues nothing.
    await lane.tasks.submit("wf:u:prd:1", {"input": "x"})
    assert await lane.bus.queue_depth() == 0


async def test_a_task_failed_error_is_answered_once_and_not_redelivered(
    redis: aioredis.Redis, make_lane: Callable[..., Lane]
) -> None:
    lane = make_lane(min_idle_ms=100, claim_interval_ms=20, max_attempts=5)

    async def refuse(task: taskwire.Task) -> dict[str, Any]:
        await redis.incr(lane.runs(task.task_id))
        raise consumer.TaskFailedError("the agent could not write the PRD")

    await lane.tasks.submit("t1", {})
    running = Consumer(lane, refuse, "c1")
    result = await lane.tasks.wait_result("t1", timeout_s=10)
    stats = await running.stop()

    assert (result.status, result.error) == ("failed", "the agent could not write the PRD")
    assert stats.refused == 1
    assert await redis.get(lane.runs("t1")) == "1"
    assert await lane.bus.dead_letters() == []
    assert await lane.bus.queue_depth() == 0


async def test_results_of_many_tasks_come_in_one_call_and_each_is_announced(
    redis: aioredis.Redis, make_lane: Callable[..., Lane]
) -> None:
    lane = make_lane(min_idle_ms=1000)
    announced: list[str] = []
    pubsub = redis.pubsub()
    await pubsub.psubscribe(taskwire.FINISHED_PATTERN)

    async def listen() -> None:
        async for message in pubsub.listen():
            if message["type"] == "pmessage" and message["channel"] == lane.bus.keys.finished:
                announced.append(message["data"])

    listening = asyncio.create_task(listen())
    try:
        for i in range(3):
            await lane.tasks.submit(f"t{i}", {"input": f"x{i}"})
        running = Consumer(lane, counting_handler(redis, lane), "c1")
        await until(lambda: _queue_empty(lane), timeout_s=10, what="three results")
        await running.stop()
        await lane.tasks.cancel("t9", reason="never submitted")
        await until(lambda: _true(len(announced) == 4), timeout_s=5, what="four announcements")
    finally:
        listening.cancel()
        await pubsub.aclose()

    found = await lane.tasks.results(["t0", "t1", "missing", "t2", "t9"])
    assert sorted(found) == ["t0", "t1", "t2", "t9"]
    assert found["t1"].output == {"output": "X1", "run": 1}
    assert found["t9"].status == "cancelled"
    assert sorted(announced) == ["t0", "t1", "t2", "t9"]
    assert await lane.tasks.results([]) == {}


async def _queue_empty(lane: Lane) -> bool:
    return await lane.bus.queue_depth() == 0


async def _true(value: bool) -> bool:
    return value
