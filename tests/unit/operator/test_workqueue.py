"""`workqueue.WorkQueue`: deduplicated, one reconcile at a time per key, retried.

These run real asyncio workers against small recording reconcile functions; waits
are bounded (`asyncio.wait_for`) so a broken queue fails instead of hanging. No test
sleeps and then concludes that nothing happened: "nothing more ran" is shown by a
marker key behind the work (one worker runs keys first in, first out) or by the
delays the queue scheduled, recorded as it schedules them.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable

import pytest

from bmad_operator import errors, workqueue

pytestmark = pytest.mark.unit

KEY = ("team-a", "mary")
WAIT = 5.0

Reconcile = Callable[[Hashable], Awaitable[None]]
MakeQueue = Callable[..., workqueue.WorkQueue]


class Recorder:
    """A reconcile that records calls, optionally blocking or failing."""

    def __init__(self) -> None:
        self.calls: list[tuple[Hashable, float]] = []
        self.active: collections.Counter[Hashable] = collections.Counter()
        self.max_active: collections.Counter[Hashable] = collections.Counter()
        self.max_total = 0
        self.gate: asyncio.Event | None = None
        self.started = asyncio.Event()
        self.changed = asyncio.Condition()
        self.fail_first = 0
        self.requeue_first: float | None = None

    async def __call__(self, key: Hashable) -> None:
        loop = asyncio.get_running_loop()
        self.calls.append((key, loop.time()))
        n = len(self.calls)
        self.active[key] += 1
        self.max_active[key] = max(self.max_active[key], self.active[key])
        self.max_total = max(self.max_total, sum(self.active.values()))
        self.started.set()
        async with self.changed:
            self.changed.notify_all()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if n <= self.fail_first:
                raise RuntimeError(f"failure {n}")
            if self.requeue_first is not None and n == 1:
                raise errors.Requeue(self.requeue_first, "not yet")
        finally:
            self.active[key] -= 1
            async with self.changed:
                self.changed.notify_all()

    def count(self, key: Hashable = KEY) -> int:
        return sum(1 for k, _ in self.calls if k == key)

    async def wait_for_calls_started(self, n: int, key: Hashable = KEY) -> None:
        async def until() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: self.count(key) >= n)

        await asyncio.wait_for(until(), WAIT)

    async def wait_for_calls(self, n: int, key: Hashable = KEY) -> None:
        async def until() -> None:
            async with self.changed:
                await self.changed.wait_for(lambda: self.count(key) >= n and not self.active[key])

        await asyncio.wait_for(until(), WAIT)


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
async def make_queue() -> AsyncIterator[MakeQueue]:
    queues: list[workqueue.WorkQueue] = []

    def make(reconcile: Reconcile, **kw: float) -> workqueue.WorkQueue:
        queue = workqueue.WorkQueue("Test", reconcile, **kw)  # type: ignore[arg-type]
        queue.start()
        queues.append(queue)
        return queue

    yield make
    for queue in queues:
        await queue.stop()


MARKER = ("team-a", "marker")


async def run_marker(queue: workqueue.WorkQueue, recorder: Recorder) -> None:
    """Queue a marker key and wait for its reconcile. With one worker the queue is
    first in, first out: whatever was queued before the marker has run by then."""
    queue.add(MARKER)
    await recorder.wait_for_calls(1, MARKER)


@pytest.fixture
def no_jitter(monkeypatch: pytest.MonkeyPatch) -> None:
    """Backoff delays without their +-20% jitter, so they can be compared exactly."""
    monkeypatch.setattr(random, "uniform", lambda low, high: (low + high) / 2)


def record_scheduling(
    queue: workqueue.WorkQueue, monkeypatch: pytest.MonkeyPatch
) -> list[tuple[Hashable, float]]:
    """Every (key, delay) the queue schedules for later (retries, requeues)."""
    scheduled: list[tuple[Hashable, float]] = []
    original = queue.add_after

    def add_after(key: Hashable, delay: float) -> None:
        scheduled.append((key, delay))
        original(key, delay)

    monkeypatch.setattr(queue, "add_after", add_after)
    return scheduled


async def test_many_adds_while_idle_make_one_reconcile(
    recorder: Recorder, make_queue: MakeQueue
) -> None:
    queue = make_queue(recorder, workers=1)
    for _ in range(50):
        queue.add(KEY)
    assert len(queue) == 1
    await run_marker(queue, recorder)
    assert recorder.count() == 1
    assert len(queue) == 0


async def test_distinct_keys_each_reconcile_once(recorder: Recorder, make_queue: MakeQueue) -> None:
    queue = make_queue(recorder, workers=1)
    keys = [("ns", f"a{i}") for i in range(10)]
    for _ in range(3):
        for key in keys:
            queue.add(key)
    assert len(queue) == 10
    await run_marker(queue, recorder)
    assert sorted(str(k) for k, _ in recorder.calls if k != MARKER) == sorted(str(k) for k in keys)


@pytest.mark.timeout(60)  # a queue that re-runs a key forever starves the loop: fail, not hang
async def test_add_during_reconcile_runs_exactly_once_more(
    recorder: Recorder, make_queue: MakeQueue
) -> None:
    recorder.gate = asyncio.Event()
    queue = make_queue(recorder, workers=1)
    queue.add(KEY)
    await asyncio.wait_for(recorder.started.wait(), WAIT)
    for _ in range(5):
        queue.add(KEY)  # while the first pass runs
    assert len(queue) == 0, "a key being reconciled was queued again instead of marked"
    recorder.gate.set()
    await recorder.wait_for_calls(2)
    await run_marker(queue, recorder)
    assert recorder.count() == 2


async def test_never_two_concurrent_reconciles_of_one_key(
    recorder: Recorder, make_queue: MakeQueue
) -> None:
    recorder.gate = asyncio.Event()
    queue = make_queue(recorder, workers=8)
    other = ("team-a", "john")
    queue.add(KEY)
    queue.add(other)
    await recorder.wait_for_calls_started(1)
    await recorder.wait_for_calls_started(1, other)
    # Both keys are being reconciled and six workers are free: more events for
    # either key must wait for its running pass, not start a second one.
    for _ in range(20):
        queue.add(KEY)
        queue.add(other)
        await asyncio.sleep(0)
    recorder.gate.set()
    await recorder.wait_for_calls(2)
    await recorder.wait_for_calls(2, other)
    assert recorder.max_active[KEY] == 1
    assert recorder.max_active[other] == 1
    # ...while different keys do run side by side.
    assert recorder.max_total == 2


async def test_failures_are_retried_with_backoff_then_succeed(
    recorder: Recorder,
    make_queue: MakeQueue,
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    no_jitter: None,
) -> None:
    base = 0.02
    recorder.fail_first = 3
    queue = make_queue(recorder, workers=1, base_backoff=base, max_backoff=10.0)
    scheduled = record_scheduling(queue, monkeypatch)
    with caplog.at_level(logging.ERROR, logger="bmad_operator.workqueue"):
        queue.add(KEY)
        await recorder.wait_for_calls(4)
    assert recorder.count() == 4  # three failures, one success
    # Exponential: base, 2*base, 4*base; nothing scheduled after the success.
    assert scheduled == [(KEY, base), (KEY, 2 * base), (KEY, 4 * base)]
    times = [t for _, t in recorder.calls]
    for n, gap in enumerate(b - a for a, b in itertools.pairwise(times)):
        assert gap >= base * 2**n - 0.002, times  # a timer never fires early
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 3


async def test_backoff_is_capped(
    recorder: Recorder, make_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch, no_jitter: None
) -> None:
    recorder.fail_first = 4
    queue = make_queue(recorder, workers=1, base_backoff=0.02, max_backoff=0.03)
    scheduled = record_scheduling(queue, monkeypatch)
    queue.add(KEY)
    await recorder.wait_for_calls(5)
    # Uncapped: 0.02, 0.04, 0.08, 0.16.
    assert [delay for _, delay in scheduled] == [0.02, 0.03, 0.03, 0.03]


async def test_success_resets_the_backoff(
    recorder: Recorder, make_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch, no_jitter: None
) -> None:
    recorder.fail_first = 3
    queue = make_queue(recorder, workers=1, base_backoff=0.01, max_backoff=10.0)
    scheduled = record_scheduling(queue, monkeypatch)
    queue.add(KEY)
    await recorder.wait_for_calls(4)
    # A new failure after a success starts again from the base delay.
    recorder.fail_first = 5
    queue.add(KEY)
    await recorder.wait_for_calls(6)
    assert [delay for _, delay in scheduled] == [0.01, 0.02, 0.04, 0.01]


async def test_an_add_cancels_a_pending_backoff(recorder: Recorder, make_queue: MakeQueue) -> None:
    recorder.fail_first = 1
    queue = make_queue(recorder, workers=1, base_backoff=30.0)
    queue.add(KEY)
    await recorder.wait_for_calls(1)
    queue.add(KEY)  # a new event: reconcile now, not in 30 seconds
    await recorder.wait_for_calls(2)
    # The 30 s timer is gone: a new, short one is accepted (a key keeps one timer).
    queue.add_after(KEY, 0.01)
    await recorder.wait_for_calls(3)


async def test_requeue_schedules_a_later_run(
    recorder: Recorder, make_queue: MakeQueue, monkeypatch: pytest.MonkeyPatch
) -> None:
    recorder.requeue_first = 0.1
    queue = make_queue(recorder, workers=1, base_backoff=10.0)
    scheduled = record_scheduling(queue, monkeypatch)
    queue.add(KEY)
    await recorder.wait_for_calls(2)
    # The requeue delay, not the failure backoff; nothing more after the second pass.
    assert scheduled == [(KEY, 0.1)]
    (_, first), (_, second) = recorder.calls
    assert second - first >= 0.1 - 0.002


async def test_add_after_and_forget(recorder: Recorder, make_queue: MakeQueue) -> None:
    queue = make_queue(recorder, workers=1)
    loop = asyncio.get_running_loop()
    scheduled_at = loop.time()
    queue.add_after(KEY, 0.05)
    queue.add_after(KEY, 0.01)  # earlier: replaces the 0.05 s timer
    queue.add_after(KEY, 0.2)  # later than the one set: ignored
    await recorder.wait_for_calls(1)
    assert recorder.calls[0][1] - scheduled_at >= 0.01 - 0.002
    queue.add_after(KEY, 0.03)
    queue.forget(KEY)  # a deleted object: its timer goes too
    # Timers fire in deadline order: had the 0.03 s one (or the replaced 0.05 s or the
    # ignored 0.2 s one) survived, KEY would be queued again before the marker.
    queue.add_after(MARKER, 0.3)
    await recorder.wait_for_calls(1, MARKER)
    assert recorder.count() == 1


async def test_stop_cancels_workers_and_timers(recorder: Recorder) -> None:
    recorder.gate = asyncio.Event()  # never set: the reconcile blocks
    cancelled = asyncio.Event()

    async def reconcile(key: Hashable) -> None:
        try:
            await recorder(key)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    queue = workqueue.WorkQueue("Test", reconcile, workers=3)
    queue.start()
    queue.add(KEY)
    queue.add_after(("ns", "later"), 0.05)
    await asyncio.wait_for(recorder.started.wait(), WAIT)
    tasks = [t for t in asyncio.all_tasks() if t.get_name().startswith("Test-worker-")]
    assert len(tasks) == 3
    await asyncio.wait_for(queue.stop(), WAIT)
    assert cancelled.is_set()
    assert all(t.done() for t in tasks)
    assert all(t.cancelled() for t in tasks)
    # Past the 0.05 s timer's deadline: a timer that survived would have queued its key.
    past = asyncio.Event()
    asyncio.get_running_loop().call_later(0.1, past.set)
    await asyncio.wait_for(past.wait(), WAIT)
    assert len(queue) == 0


async def test_a_key_that_keeps_failing_is_retried_forever(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls = 0
    done = asyncio.Event()

    async def reconcile(key: Hashable) -> None:
        nonlocal calls
        calls += 1
        if calls <= 1100:
            raise RuntimeError("still broken")
        done.set()

    caplog.set_level(logging.CRITICAL, logger="bmad_operator.workqueue")
    queue = workqueue.WorkQueue(
        "Overflow", reconcile, workers=1, base_backoff=1e-9, max_backoff=1e-6
    )
    queue.start()
    (worker,) = [t for t in asyncio.all_tasks() if t.get_name().startswith("Overflow-worker-")]
    finished = asyncio.ensure_future(done.wait())
    try:
        queue.add(KEY)
        await asyncio.wait({finished, worker}, timeout=20, return_when=asyncio.FIRST_COMPLETED)
        assert not worker.done(), f"the worker died: {worker.exception()!r}"
        assert done.is_set()
        assert calls == 1101
    finally:
        finished.cancel()
        # A dead worker's exception comes back out of stop(): it is reported above.
        with contextlib.suppress(Exception):
            await queue.stop()


async def test_of_two_timers_for_one_key_the_earlier_wins(
    recorder: Recorder, make_queue: MakeQueue
) -> None:
    queue = make_queue(recorder, workers=1)
    queue.add_after(KEY, 30.0)  # a poll far away
    queue.add_after(KEY, 0.01)  # a retry due now: it must not wait for the poll
    await recorder.wait_for_calls(1)
    queue.add_after(KEY, 0.01)
    queue.add_after(KEY, 30.0)  # a later one does not push the earlier back
    await recorder.wait_for_calls(2)
