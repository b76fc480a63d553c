"""`workqueue.WorkQueue`: deduplicated, one reconcile at a time per key, retried.

These run real asyncio workers against small recording reconcile functions; waits
are bounded (`asyncio.wait_for`) so a broken queue fails instead of hanging.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
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
        self.sleep = 0.0

    async def __call__(self, key: Hashable) -> None:
        loop = asyncio.get_running_loop()
        self.calls.append((key, loop.time()))
        n = len(self.calls)
        self.active[key] += 1
        self.max_active[key] = max(self.max_active[key], self.active[key])
        self.max_total = max(self.max_total, sum(self.active.values()))
        self.started.set()
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.sleep:
                await asyncio.sleep(self.sleep)
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


async def _settle(seconds: float = 0.05) -> None:
    await asyncio.sleep(seconds)


async def test_many_adds_while_idle_make_one_reconcile(
    recorder: Recorder, make_queue: MakeQueue
) -> None:
    queue = make_queue(recorder, workers=4)
    for _ in range(50):
        queue.add(KEY)
    assert len(queue) == 1
    await recorder.wait_for_calls(1)
    await _settle()
    assert recorder.count() == 1
    assert len(queue) == 0


async def test_distinct_keys_each_reconcile_once(recorder: Recorder, make_queue: MakeQueue) -> None:
    queue = make_queue(recorder, workers=4)
    keys = [("ns", f"a{i}") for i in range(10)]
    for _ in range(3):
        for key in keys:
            queue.add(key)
    assert len(queue) == 10
    for key in keys:
        await recorder.wait_for_calls(1, key)
    await _settle()
    assert sorted(str(k) for k, _ in recorder.calls) == sorted(str(k) for k in keys)


async def test_add_during_reconcile_runs_exactly_once_more(
    recorder: Recorder, make_queue: MakeQueue
) -> None:
    recorder.gate = asyncio.Event()
    queue = make_queue(recorder, workers=4)
    queue.add(KEY)
    await asyncio.wait_for(recorder.started.wait(), WAIT)
    for _ in range(5):
        queue.add(KEY)  # while the first pass runs
    await _settle(0.02)
    assert recorder.count() == 1, "a second reconcile of the same key started concurrently"
    recorder.gate.set()
    await recorder.wait_for_calls(2)
    await _settle()
    assert recorder.count() == 2
    assert recorder.max_active[KEY] == 1


async def test_never_two_concurrent_reconciles_of_one_key(
    recorder: Recorder, make_queue: MakeQueue
) -> None:
    recorder.sleep = 0.005
    queue = make_queue(recorder, workers=8)
    other = ("team-a", "john")
    for _ in range(40):
        queue.add(KEY)
        queue.add(other)
        await asyncio.sleep(0.001)
    await recorder.wait_for_calls(2)
    await recorder.wait_for_calls(2, other)
    await _settle(0.05)
    assert recorder.max_active[KEY] == 1
    assert recorder.max_active[other] == 1
    assert recorder.count() >= 2
    # ...while different keys do run side by side.
    assert recorder.max_total == 2


async def test_failures_are_retried_with_backoff_then_succeed(
    recorder: Recorder, make_queue: MakeQueue, caplog: pytest.LogCaptureFixture
) -> None:
    base = 0.02
    recorder.fail_first = 3
    queue = make_queue(recorder, workers=2, base_backoff=base, max_backoff=10.0)
    with caplog.at_level(logging.ERROR, logger="bmad_operator.workqueue"):
        queue.add(KEY)
        await recorder.wait_for_calls(4)
    await _settle(0.1)
    assert recorder.count() == 4  # three failures, one success, then quiet
    times = [t for _, t in recorder.calls]
    gaps = [b - a for a, b in itertools.pairwise(times)]
    # Exponential with +-20% jitter: base, 2*base, 4*base.
    for n, gap in enumerate(gaps[:3]):
        assert gap >= 0.8 * base * 2**n - 0.002, gaps
    assert gaps[2] > gaps[0], gaps
    assert len([r for r in caplog.records if "failed" in r.getMessage()]) == 3


async def test_backoff_is_capped(recorder: Recorder, make_queue: MakeQueue) -> None:
    recorder.fail_first = 4
    queue = make_queue(recorder, workers=1, base_backoff=0.02, max_backoff=0.02)
    loop = asyncio.get_running_loop()
    start = loop.time()
    queue.add(KEY)
    await recorder.wait_for_calls(5)
    # Uncapped, 0.02 * (1 + 2 + 4 + 8) = 0.3s; capped, 4 * 0.02 * 1.2 at most.
    assert loop.time() - start < 0.25


async def test_success_resets_the_backoff(recorder: Recorder, make_queue: MakeQueue) -> None:
    recorder.fail_first = 3
    queue = make_queue(recorder, workers=1, base_backoff=0.05, max_backoff=10.0)
    queue.add(KEY)
    await recorder.wait_for_calls(4)
    # A new failure after a success starts again from the base delay.
    recorder.fail_first = 5
    loop = asyncio.get_running_loop()
    queue.add(KEY)
    await recorder.wait_for_calls(5)
    failed_at = loop.time()
    await recorder.wait_for_calls(6)
    assert loop.time() - failed_at < 0.05 * 1.2 + 0.1


async def test_an_add_cancels_a_pending_backoff(recorder: Recorder, make_queue: MakeQueue) -> None:
    recorder.fail_first = 1
    queue = make_queue(recorder, workers=1, base_backoff=30.0)
    queue.add(KEY)
    await recorder.wait_for_calls(1)
    queue.add(KEY)  # a new event: reconcile now, not in 30 seconds
    await recorder.wait_for_calls(2)
    await _settle()
    assert recorder.count() == 2


async def test_requeue_schedules_a_later_run(recorder: Recorder, make_queue: MakeQueue) -> None:
    recorder.requeue_first = 0.1
    queue = make_queue(recorder, workers=2, base_backoff=10.0)
    queue.add(KEY)
    await recorder.wait_for_calls(1)
    await _settle(0.03)
    assert recorder.count() == 1  # not immediately
    await recorder.wait_for_calls(2)
    (_, first), (_, second) = recorder.calls
    assert second - first >= 0.1 - 0.002
    assert second - first < 5.0  # the requeue delay, not the failure backoff
    await _settle()
    assert recorder.count() == 2


async def test_add_after_and_forget(recorder: Recorder, make_queue: MakeQueue) -> None:
    queue = make_queue(recorder, workers=1)
    queue.add_after(KEY, 0.05)
    queue.add_after(KEY, 0.01)  # already scheduled: ignored
    await _settle(0.02)
    assert recorder.count() == 0
    await recorder.wait_for_calls(1)
    queue.add_after(KEY, 0.03)
    queue.forget(KEY)  # a deleted object: its timer goes too
    await _settle(0.08)
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
    await _settle(0.1)
    assert recorder.count(("ns", "later")) == 0


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
