"""The consume loop's decisions, on an in-memory stand-in for the stream and group.

`FakeBus` is a `consumer.Source` (read new entries, claim idle ones, finish,
dead-letter, ensure the group) made of a queue, a pending-entries list and dicts, so
retries, dead-lettering, concurrency and the graceful shutdown can be tested without
a server. The Lua scripts and the real commands are tested against
the test bed's Redis in tests/integration/runtime/test_bus_live.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any
from unittest import mock

import pytest
from redis import exceptions as redis_errors

from bmad_integrations import taskwire
from bmad_runtime.bus import client, consumer

pytestmark = pytest.mark.unit


@dataclass
class Pending:
    fields: dict[str, str]
    deliveries: int
    consumer: str
    since: float


class FakeBus:
    def __init__(self, config: client.BusConfig | None = None) -> None:
        self.keys = taskwire.Keys("acme", "dev")
        self.config = config or client.BusConfig(min_idle_ms=30, max_attempts=3)
        self.new: list[tuple[str, dict[str, str]]] = []
        self.pel: dict[str, Pending] = {}
        self.results: dict[str, taskwire.TaskResult] = {}
        self.dead: list[tuple[str, str]] = []  # (message id, error)
        self.acked: list[str] = []
        self.seq = 0
        self.beats = 0

    def add(self, task_id: str, payload: dict[str, Any] | None = None) -> str:
        return self.add_raw({"task_id": task_id, "payload": taskwire.encode_payload(payload or {})})

    def add_raw(self, fields: dict[str, str]) -> str:
        self.seq += 1
        mid = f"{self.seq}-0"
        self.new.append((mid, fields))
        return mid

    async def ensure_group(self, *, force: bool = False) -> None:
        return None

    async def heartbeat(self, consumer: str, message_ids: Iterable[str]) -> set[str]:
        held = set()
        for mid in message_ids:
            entry = self.pel.get(mid)
            if entry is not None and entry.consumer == consumer:
                entry.since = time.monotonic()
                held.add(mid)
        self.beats += 1
        return held

    async def read(self, consumer: str, *, count: int, block_ms: int) -> list[taskwire.Task]:
        if not self.new:
            await asyncio.sleep(min(block_ms, 10) / 1000)
            return []
        taken, self.new = self.new[:count], self.new[count:]
        for mid, fields in taken:
            self.pel[mid] = Pending(fields, 1, consumer, time.monotonic())
        return [client.decode_or_quarantine(mid, fields, 1) for mid, fields in taken]

    async def claim(
        self, consumer: str, *, count: int, cursor: str
    ) -> tuple[str, list[taskwire.Task]]:
        now, claimed = time.monotonic(), []
        for mid, entry in self.pel.items():
            if len(claimed) == count:
                break
            if (now - entry.since) * 1000 >= self.config.min_idle_ms:
                entry.deliveries += 1
                entry.consumer, entry.since = consumer, now
                claimed.append(client.decode_or_quarantine(mid, entry.fields, entry.deliveries))
        return "0-0", claimed

    async def finish(self, task: taskwire.Task, result: taskwire.TaskResult) -> bool:
        written = task.task_id not in self.results
        self.results.setdefault(task.task_id, result)
        self._ack(task.message_id)
        return written

    async def dead_letter(self, task: taskwire.Task, *, error: str, consumer: str) -> bool:
        written = task.task_id not in self.results
        if written:
            self.dead.append((task.message_id, error))
            if task.task_id:
                self.results[task.task_id] = taskwire.result_of(
                    task, consumer=consumer, finished_at=0.0, error=error
                )
        self._ack(task.message_id)
        return written

    async def settled(self, task: taskwire.Task) -> bool:
        if task.task_id not in self.results:
            return False
        self._ack(task.message_id)
        return True

    def _ack(self, mid: str) -> None:
        if self.pel.pop(mid, None) is not None:
            self.acked.append(mid)


async def consume_until(
    fake: FakeBus,
    handler: consumer.Handler,
    done: Callable[[], bool],
    *,
    timeout_s: float = 5.0,
    **options: Any,
) -> consumer.ConsumeStats:
    """Run `consume` until `done()` holds, then stop it and return its counters."""
    stop = asyncio.Event()
    options.setdefault("consumer_name", "dev-0")
    options.setdefault("block_ms", 10)
    runner = asyncio.create_task(consumer.consume(fake, handler, stop=stop, **options))
    deadline = time.monotonic() + timeout_s
    while not done():
        assert not runner.done(), runner.exception()
        assert time.monotonic() < deadline, "the consumer did not get there in time"
        await asyncio.sleep(0.005)
    stop.set()
    return await asyncio.wait_for(runner, timeout=timeout_s)


def counting(
    body: Callable[[taskwire.Task, int], Awaitable[dict[str, Any]]],
) -> tuple[consumer.Handler, dict[str, int]]:
    runs: dict[str, int] = {}

    async def handler(task: taskwire.Task) -> dict[str, Any]:
        runs[task.task_id] = runs.get(task.task_id, 0) + 1
        return await body(task, runs[task.task_id])

    return handler, runs


async def echo(task: taskwire.Task, run: int) -> dict[str, Any]:
    return {"output": str(task.payload.get("input", "")).upper(), "run": run}


async def test_tasks_are_handled_answered_and_acked() -> None:
    fake = FakeBus()
    for i in range(25):
        fake.add(f"t{i}", {"input": f"hello {i}"})
    handler, runs = counting(echo)

    stats = await consume_until(fake, handler, lambda: len(fake.results) == 25)

    assert stats.succeeded == 25
    assert stats.read == 25
    assert fake.results["t7"].output == {"output": "HELLO 7", "run": 1}
    assert fake.results["t7"].status == "succeeded"
    assert fake.results["t7"].consumer == "dev-0"
    assert fake.results["t7"].attempt == 1
    assert not fake.pel
    assert len(fake.acked) == 25
    assert set(runs.values()) == {1}


async def test_a_failing_task_is_retried_when_reclaimed_and_then_succeeds() -> None:
    async def flaky(task: taskwire.Task, run: int) -> dict[str, Any]:
        if run == 1:
            raise ConnectionResetError("model endpoint hung up")
        return {"ok": True}

    fake = FakeBus()
    fake.add("t1")
    handler, runs = counting(flaky)

    stats = await consume_until(fake, handler, lambda: "t1" in fake.results)

    assert stats.failed == 1
    assert stats.claimed == 1
    assert runs == {"t1": 2}
    assert fake.results["t1"].status == "succeeded"
    assert fake.results["t1"].attempt == 2
    assert not fake.dead


async def test_a_task_that_always_fails_is_dead_lettered_on_the_last_attempt() -> None:
    async def broken(task: taskwire.Task, run: int) -> dict[str, Any]:
        raise ValueError(f"bad input, run {run}")

    fake = FakeBus(client.BusConfig(min_idle_ms=20, max_attempts=3))
    mid = fake.add("t1")
    handler, runs = counting(broken)

    stats = await consume_until(fake, handler, lambda: bool(fake.dead))

    assert runs == {"t1": 3}
    assert stats.failed == 2
    assert stats.dead_lettered == 1
    assert fake.dead == [(mid, "ValueError: bad input, run 3")]
    assert fake.results["t1"].status == "failed"
    assert fake.results["t1"].attempt == 3
    assert not fake.pel


async def test_an_entry_delivered_too_often_is_dead_lettered_without_running() -> None:
    # Its earlier consumers died (SIGKILL, OOM) before they could say anything.
    fake = FakeBus(client.BusConfig(min_idle_ms=20, max_attempts=3))
    fake.pel["9-0"] = Pending(
        {"task_id": "t9", "payload": "{}"}, deliveries=3, consumer="gone", since=0.0
    )
    handler, runs = counting(echo)

    stats = await consume_until(fake, handler, lambda: bool(fake.dead))

    assert runs == {}
    assert stats.dead_lettered == 1
    assert "no result after 3 deliveries" in fake.dead[0][1]
    assert fake.results["t9"].status == "failed"


async def test_an_entry_that_does_not_decode_is_dead_lettered_without_running() -> None:
    fake = FakeBus()
    mid = fake.add_raw({"something": "else"})
    handler, runs = counting(echo)

    stats = await consume_until(fake, handler, lambda: bool(fake.dead))

    assert runs == {}
    assert stats.dead_lettered == 1
    assert fake.dead[0][0] == mid
    assert "no valid task_id" in fake.dead[0][1]
    assert mid in fake.acked


async def test_a_handler_that_returns_no_dict_has_failed() -> None:
    async def wrong(task: taskwire.Task, run: int) -> Any:
        return ["not", "a", "dict"] if run == 1 else {"fixed": True}

    fake = FakeBus()
    fake.add("t1")
    handler, _ = counting(wrong)

    stats = await consume_until(fake, handler, lambda: "t1" in fake.results)

    assert stats.failed == 1
    assert fake.results["t1"].output == {"fixed": True}


def first_result(task_id: str) -> taskwire.TaskResult:
    return taskwire.TaskResult(
        task_id=task_id,
        message_id="0-1",
        status="succeeded",
        output={"first": True},
        error=None,
        consumer="other",
        attempt=1,
        finished_at=0.0,
    )


async def test_a_second_run_that_finishes_late_keeps_the_first_result() -> None:
    fake = FakeBus()
    fake.add("t1")

    async def overtaken(task: taskwire.Task, run: int) -> dict[str, Any]:
        # Another consumer (the slow first owner) stores its result meanwhile.
        fake.results[task.task_id] = first_result(task.task_id)
        return {"second": True}

    handler, runs = counting(overtaken)

    stats = await consume_until(fake, handler, lambda: not fake.new and not fake.pel)

    assert runs == {"t1": 1}
    assert stats.duplicates == 1
    assert stats.succeeded == 0
    assert fake.results["t1"].output == {"first": True}


async def test_a_task_that_has_a_result_already_is_acked_without_running() -> None:
    fake = FakeBus()
    cancelled = fake.add("t1")
    fake.add("t2")
    fake.results["t1"] = taskwire.cancelled_result("t1", reason="timed out", finished_at=0.0)
    handler, runs = counting(echo)

    stats = await consume_until(fake, handler, lambda: "t2" in fake.results and not fake.pel)

    assert runs == {"t2": 1}
    assert stats.skipped == 1
    assert cancelled in fake.acked
    assert fake.results["t1"].status == "cancelled"


async def test_a_task_failed_error_is_recorded_at_once_without_redelivery() -> None:
    fake = FakeBus(client.BusConfig(min_idle_ms=1, max_attempts=5))
    fake.add("t1")

    async def refuse(task: taskwire.Task, run: int) -> dict[str, Any]:
        raise consumer.TaskFailedError("the agent could not write the PRD")

    handler, runs = counting(refuse)

    stats = await consume_until(fake, handler, lambda: "t1" in fake.results and not fake.pel)

    assert runs == {"t1": 1}
    assert stats.refused == 1
    assert stats.failed == 0
    assert not fake.dead
    result = fake.results["t1"]
    assert (result.status, result.error) == ("failed", "the agent could not write the PRD")


async def test_no_more_than_concurrency_handlers_run_at_once() -> None:
    active, peak = 0, 0

    async def slow(task: taskwire.Task, run: int) -> dict[str, Any]:
        nonlocal active, peak
        active += 1
        peak = max(peak, active)
        await asyncio.sleep(0.01)
        active -= 1
        return {}

    fake = FakeBus()
    for i in range(40):
        fake.add(f"t{i}")
    handler, _ = counting(slow)

    await consume_until(fake, handler, lambda: len(fake.results) == 40, batch=10, concurrency=4)

    assert peak == 4


async def test_on_stop_in_flight_tasks_finish_within_the_grace_period() -> None:
    started = asyncio.Event()

    async def slow(task: taskwire.Task, run: int) -> dict[str, Any]:
        started.set()
        await asyncio.sleep(0.2)
        return {"done": True}

    fake = FakeBus(client.BusConfig(min_idle_ms=60_000))
    for i in range(10):
        fake.add(f"t{i}")
    handler, runs = counting(slow)

    stats = await consume_until(fake, handler, started.is_set, concurrency=3, grace_s=5.0)

    assert stats.succeeded == 3
    assert stats.abandoned == 0
    assert sorted(fake.results) == sorted(runs)
    assert len(fake.new) == 7, "no more entries are read after the stop"
    assert not fake.pel


async def test_on_stop_tasks_still_running_after_the_grace_period_stay_pending() -> None:
    started = asyncio.Event()

    never = asyncio.Event()

    async def stuck(task: taskwire.Task, run: int) -> dict[str, Any]:
        started.set()
        await never.wait()  # only the shutdown's cancellation ends it
        return {}

    fake = FakeBus(client.BusConfig(min_idle_ms=60_000))
    for i in range(5):
        fake.add(f"t{i}")
    handler, _ = counting(stuck)

    stats = await consume_until(fake, handler, started.is_set, concurrency=5, grace_s=0.05)

    assert stats.abandoned == 5
    assert not fake.results
    assert not fake.acked
    assert len(fake.pel) == 5, "unfinished tasks are left for others to reclaim"


@pytest.mark.parametrize("name", ["", "has space"])
async def test_a_consumer_needs_a_usable_name(name: str) -> None:
    handler, _ = counting(echo)
    with pytest.raises(ValueError, match="consumer name"):
        await consumer.consume(FakeBus(), handler, consumer_name=name)


class UnreachableAtFirst(FakeBus):
    """Redis refuses connections for the first `outages` calls, as during an outage."""

    def __init__(self, outages: int) -> None:
        super().__init__()
        self.outages = outages
        self.refused = 0

    def _maybe_refuse(self) -> None:
        if self.refused < self.outages:
            self.refused += 1
            raise redis_errors.ConnectionError("Connection refused")

    async def ensure_group(self, *, force: bool = False) -> None:
        self._maybe_refuse()

    async def read(self, consumer: str, *, count: int, block_ms: int) -> list[taskwire.Task]:
        self._maybe_refuse()
        return await super().read(consumer, count=count, block_ms=block_ms)


async def test_a_consumer_started_while_redis_is_down_consumes_once_it_is_back() -> None:
    """Issue 11: on main (9ca8f9d) `consume` called ensure_group before its retry loop,
    so a replica started during a Redis outage lost its consumer at once: `consume`
    raised ``ConnectionError`` on its first call, and the runtime's task died without
    a log line."""
    fake = UnreachableAtFirst(outages=3)
    fake.add("t-1", {"input": "hello"})
    health = consumer.ConsumerHealth()
    seen: list[bool] = []
    handler, runs = counting(echo)

    def done() -> bool:
        seen.append(health.consuming)
        return "t-1" in fake.results

    with mock_backoff():
        stats = await consume_until(fake, handler, done, health=health)

    assert fake.refused == 3
    assert runs == {"t-1": 1}
    assert stats.succeeded == 1
    assert health.consuming
    assert health.problem is None
    assert seen[0] is False  # not consuming while Redis refused


async def test_health_says_why_the_consumer_does_not_read() -> None:
    fake = UnreachableAtFirst(outages=10_000)
    health = consumer.ConsumerHealth()
    with mock_backoff():
        await consume_until(fake, echo_handler, lambda: fake.refused >= 2, health=health)
    assert not health.consuming
    assert health.problem is not None
    assert "cannot be reached (ConnectionError)" in health.problem


async def echo_handler(task: taskwire.Task) -> dict[str, Any]:
    return await echo(task, 1)


@contextlib.contextmanager
def mock_backoff() -> Iterator[None]:
    """Retries at once: the loop's backoff starts at 0.1 s and doubles."""
    with mock.patch.object(consumer._Run, "BACKOFF_MAX_S", 0.01):
        yield


async def test_a_task_slower_than_min_idle_is_kept_claimed_and_runs_once() -> None:
    """Issue 10, hole 1 (the loop's side): heartbeats keep a slow task's entry claimed."""

    async def slow(task: taskwire.Task, run: int) -> dict[str, Any]:
        await asyncio.sleep(0.3)  # ten times min_idle_ms
        return {"run": run}

    fake = FakeBus(client.BusConfig(min_idle_ms=30, claim_interval_ms=5, max_attempts=2))
    for i in range(5):
        fake.add(f"t{i}")
    handler, runs = counting(slow)

    stats = await consume_until(fake, handler, lambda: len(fake.results) == 5)

    assert runs == {f"t{i}": 1 for i in range(5)}
    assert {r.status for r in fake.results.values()} == {"succeeded"}
    assert stats.succeeded == 5
    assert fake.beats > 0
    assert not fake.dead


class LateHeartbeats(FakeBus):
    """Heartbeats that never arrive in time: the consumer's own claim finds its entries."""

    async def heartbeat(self, consumer: str, message_ids: Iterable[str]) -> set[str]:
        return {mid for mid in message_ids if mid in self.pel}


async def test_an_own_entry_reclaimed_after_a_late_heartbeat_is_not_started_again() -> None:
    async def slow(task: taskwire.Task, run: int) -> dict[str, Any]:
        await asyncio.sleep(0.2)
        return {"run": run}

    fake = LateHeartbeats(client.BusConfig(min_idle_ms=20, claim_interval_ms=5, max_attempts=2))
    fake.add("t1")
    handler, runs = counting(slow)

    stats = await consume_until(fake, handler, lambda: "t1" in fake.results)

    assert runs == {"t1": 1}
    assert stats.claimed >= 1, "the claim did find its own in-flight entry"
    assert fake.results["t1"].status == "succeeded"
    assert not fake.dead, "an in-flight task is never dead-lettered by its own claims"


async def test_a_run_whose_entry_another_consumer_took_over_is_cancelled() -> None:
    started, cancelled = asyncio.Event(), asyncio.Event()

    async def long(task: taskwire.Task, run: int) -> dict[str, Any]:
        started.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return {}

    fake = FakeBus(client.BusConfig(min_idle_ms=60, heartbeat_interval_ms=5))
    mid = fake.add("t1")
    handler, _ = counting(long)

    async def steal() -> None:
        await started.wait()
        # As XAUTOCLAIM of a consumer that saw it idle (and now heartbeats it itself).
        fake.pel[mid].consumer, fake.pel[mid].since = "elsewhere", time.monotonic() + 3600

    thief = asyncio.create_task(steal())
    stats = await consume_until(fake, handler, cancelled.is_set)
    await thief

    assert stats.lost == 1
    assert not fake.results
    assert fake.pel[mid].consumer == "elsewhere", "left to the consumer that has it now"


async def test_an_attempt_past_its_deadline_fails_and_is_retried() -> None:
    async def hangs_first(task: taskwire.Task, run: int) -> dict[str, Any]:
        if run == 1:
            await asyncio.sleep(30)
        return {"run": run}

    fake = FakeBus(client.BusConfig(min_idle_ms=30, attempt_timeout_ms=50, max_attempts=3))
    fake.add("t1")
    handler, runs = counting(hangs_first)

    stats = await consume_until(fake, handler, lambda: "t1" in fake.results)

    assert runs == {"t1": 2}
    assert stats.failed == 1
    assert fake.results["t1"].output == {"run": 2}


def test_the_heartbeat_must_come_before_an_entry_goes_idle() -> None:
    with pytest.raises(ValueError, match="heartbeat_interval_ms"):
        client.BusConfig(min_idle_ms=100, heartbeat_interval_ms=100)
    assert client.BusConfig(min_idle_ms=30_000).heartbeat_interval_s == 10.0
