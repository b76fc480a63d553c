"""Worker processes on the test bed's real Redis: killed, stopped, replaced.

Each test starts bus_worker.py processes (the runtime's consumer with the echo handler,
which counts every execution of a task in ``bmad:T:A:runs:<id>``) and then does to
them what Kubernetes does to pods: SIGKILL (OOM, node loss) and SIGTERM with a grace
period (rollouts, scale-down). What must hold: every task gets exactly one result,
none is lost, a dead consumer's tasks are taken over with XAUTOCLAIM, and no task is
acknowledged without its result.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from redis import asyncio as aioredis

from bmad_integrations import taskbus, taskwire
from bmad_runtime.bus import client

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

MIN_IDLE_MS = 1000
WORKER = Path(__file__).with_name("bus_worker.py")


@dataclass
class Worker:
    name: str
    proc: subprocess.Popen[bytes]
    out: Path
    err: Path

    def tail(self) -> str:
        text = self.err.read_text(errors="replace") if self.err.exists() else ""
        return f"--- {self.name} (rc {self.proc.poll()}) ---\n" + "\n".join(text.splitlines()[-15:])

    def stats(self) -> dict[str, Any]:
        lines = self.out.read_text().splitlines()
        assert lines, f"{self.name} printed no stats\n{self.tail()}"
        stats: dict[str, Any] = json.loads(lines[-1])
        return stats

    async def exited(self, *, timeout_s: float) -> int:
        deadline = time.monotonic() + timeout_s
        while (rc := self.proc.poll()) is None:
            assert time.monotonic() < deadline, f"{self.name} did not exit\n{self.tail()}"
            await asyncio.sleep(0.02)
        return rc


@dataclass
class Bed:
    """One tenant/agent's bus, a Redis client, and the workers started on it."""

    redis: aioredis.Redis
    bus: client.TaskBus
    tasks: taskbus.TaskProducer
    start: Callable[..., Worker]
    workers: list[Worker]

    def tails(self) -> str:
        return "\n".join(w.tail() for w in self.workers)


@pytest.fixture
def spawned() -> Iterator[list[Worker]]:
    workers: list[Worker] = []
    yield workers
    for worker in workers:  # only the processes this test started, by their own pid
        if worker.proc.poll() is None:
            worker.proc.kill()
            worker.proc.wait(timeout=10)


@pytest.fixture
async def bed(
    redis_url: str, clean_env: dict[str, str], tmp_path: Path, spawned: list[Worker]
) -> AsyncIterator[Bed]:
    tenant, agent = f"t-{secrets.token_hex(4)}", f"a-{secrets.token_hex(3)}"
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    task_bus = client.TaskBus(
        redis, tenant=tenant, agent=agent, config=client.BusConfig(min_idle_ms=MIN_IDLE_MS)
    )
    producer = taskbus.TaskProducer(redis, tenant=tenant, agent=agent)
    await task_bus.ensure_group()
    env = {**clean_env, "PYTHONUNBUFFERED": "1"}

    def start(name: str, *options: str) -> Worker:
        out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
        command = [
            sys.executable,
            str(WORKER),
            "--redis-url",
            redis_url,
            "--tenant",
            tenant,
            "--agent",
            agent,
            "--consumer",
            name,
            "--min-idle-ms",
            str(MIN_IDLE_MS),
            "--block-ms",
            "200",
            *options,
        ]
        with out.open("wb") as stdout, err.open("wb") as stderr:
            proc = subprocess.Popen(command, env=env, stdout=stdout, stderr=stderr)
        worker = Worker(name, proc, out, err)
        spawned.append(worker)
        return worker

    try:
        yield Bed(redis, task_bus, producer, start, spawned)
    finally:
        for worker in spawned:
            if worker.proc.poll() is None:
                worker.proc.kill()
                worker.proc.wait(timeout=10)
        keys = [k async for k in redis.scan_iter(match=f"{task_bus.keys.prefix}:*", count=1000)]
        for i in range(0, len(keys), 500):
            await redis.delete(*keys[i : i + 500])
        await redis.aclose()


async def until(
    condition: Callable[[], Awaitable[bool]], *, timeout_s: float, what: str, bed: Bed
) -> None:
    deadline = time.monotonic() + timeout_s
    while not await condition():
        if time.monotonic() >= deadline:
            pytest.fail(f"timed out waiting for {what}\n{bed.tails()}")
        for worker in bed.workers:
            # A worker that died on its own (not killed by the test) is a failure.
            rc = worker.proc.poll()
            assert rc in (None, 0, -signal.SIGKILL), f"{worker.name} crashed\n{worker.tail()}"
        await asyncio.sleep(0.02)


async def consumers(bed: Bed) -> dict[str, int]:
    """Consumer name -> number of its pending entries."""
    rows = await bed.redis.xinfo_consumers(bed.bus.keys.stream, taskwire.GROUP)
    return {str(row["name"]): int(row["pending"]) for row in rows}


async def pending_of(bed: Bed, consumer: str) -> list[str]:
    rows = await bed.redis.xpending_range(
        bed.bus.keys.stream, taskwire.GROUP, min="-", max="+", count=10_000, consumername=consumer
    )
    return [str(row["message_id"]) for row in rows]


async def submit_all(bed: Bed, count: int) -> dict[str, str]:
    """Task id -> stream entry id, for tasks task-0000 … with input "input <i>"."""
    ids = [f"task-{i:04d}" for i in range(count)]
    mids: list[str] = []
    for i in range(0, count, 100):
        chunk = ids[i : i + 100]
        mids += await asyncio.gather(
            *(bed.tasks.submit(tid, {"input": f"input {tid}"}) for tid in chunk)
        )
    return dict(zip(ids, mids, strict=True))


async def results_of(bed: Bed, task_ids: list[str]) -> dict[str, taskwire.TaskResult | None]:
    found: dict[str, taskwire.TaskResult | None] = {}
    for i in range(0, len(task_ids), 200):
        chunk = task_ids[i : i + 200]
        raws = await bed.redis.mget([bed.bus.keys.result(t) for t in chunk])
        found.update(
            {
                t: None if raw is None else taskwire.decode_result(raw)
                for t, raw in zip(chunk, raws, strict=True)
            }
        )
    return found


def runs_key(bed: Bed, task_id: str) -> str:
    """Where bus_worker.py's handlers count a task's executions."""
    return f"{bed.bus.keys.prefix}:runs:{task_id}"


async def runs_of(bed: Bed, task_ids: list[str]) -> dict[str, int]:
    raws = await bed.redis.mget([runs_key(bed, t) for t in task_ids])
    return {t: int(raw or 0) for t, raw in zip(task_ids, raws, strict=True)}


async def assert_acked_only_with_a_result(bed: Bed, task_ids: list[str]) -> None:
    """Acked entries are deleted: what left the stream must have its result, and what
    is still in it (waiting or pending) must not."""
    in_stream = {
        fields["task_id"]: mid for mid, fields in await bed.redis.xrange(bed.bus.keys.stream)
    }
    answered = {t for t, r in (await results_of(bed, task_ids)).items() if r is not None}
    assert not set(in_stream) & answered
    assert set(in_stream) | answered == set(task_ids)
    pending = await bed.redis.xpending_range(
        bed.bus.keys.stream, taskwire.GROUP, min="-", max="+", count=10_000
    )
    assert {str(row["message_id"]) for row in pending} <= set(in_stream.values())


async def stop(worker: Worker, *, timeout_s: float = 20) -> dict[str, Any]:
    worker.proc.send_signal(signal.SIGTERM)
    assert await worker.exited(timeout_s=timeout_s) == 0, worker.tail()
    return worker.stats()


@pytest.mark.timeout(300)
async def test_1000_tasks_on_three_workers_one_killed_midway_each_answered_exactly_once(
    bed: Bed,
) -> None:
    # A longer min-idle than the other tests: on a loaded machine a slow survivor must
    # not take over the victim's entries before the kill, nor between the kill and the
    # look at what the victim held. The victim's tasks take longer than the survivors'
    # (250 ms, still far under the min-idle): with 20 ms, it could finish the batch it
    # was seen running between that look and the kill, and hold nothing when killed
    # (CI, 2026-11-30: "the victim held [] at the kill").
    workers = [
        bed.start(f"w{i}", "--task-delay-ms", delay, "--min-idle-ms", "5000")
        for i, delay in enumerate(("250", "20", "20"))
    ]
    victim, survivors = workers[0], workers[1:]

    async def all_consuming() -> bool:
        # (Redis lists a consumer in the group only once it was handed something.)
        return all("consuming" in w.err.read_text() for w in workers)

    await until(all_consuming, timeout_s=30, what="three consumers reading", bed=bed)
    submitted = await submit_all(bed, 1000)
    task_of = {mid: tid for tid, mid in submitted.items()}
    task_ids = list(submitted)

    async def a_third_done_and_victim_busy() -> bool:
        if await bed.bus.queue_depth() > 700:
            return False
        held = [task_of[mid] for mid in await pending_of(bed, "w0")]
        # Kill it while at least one of its tasks is inside the handler (counted).
        return any((await runs_of(bed, held)).values()) if held else False

    await until(a_third_done_and_victim_busy, timeout_s=30, what="~300 results", bed=bed)
    victim.proc.kill()  # SIGKILL: no grace, no cleanup
    assert await victim.exited(timeout_s=10) == -signal.SIGKILL
    in_flight_at_kill = [task_of[mid] for mid in await pending_of(bed, "w0")]
    depth_at_kill = await bed.bus.queue_depth()

    async def drained() -> bool:
        return await bed.bus.queue_depth() == 0 and await bed.bus.pending() == 0

    # A deadline for liveness, not a speed target (bench/ measures speed).
    await until(drained, timeout_s=120, what="all 1000 tasks answered", bed=bed)
    stats = {w.name: await stop(w) for w in survivors}

    results = await results_of(bed, task_ids)
    runs = await runs_of(bed, task_ids)
    missing = [t for t, r in results.items() if r is None]
    assert not missing, f"{len(missing)} tasks lost, e.g. {missing[:5]}"
    stored = [k async for k in bed.redis.scan_iter(match=bed.bus.keys.result("*"), count=1000)]
    assert len(stored) == 1000, "one result key per task, nothing else"
    for tid, result in results.items():
        assert result is not None
        assert result.status == "succeeded"
        assert result.task_id == tid
        assert result.message_id == submitted[tid]
        assert result.output is not None
        assert result.output["output"] == f"INPUT {tid}".upper()
        assert result.output["consumer"] == result.consumer
        assert 1 <= result.output["run"] <= runs[tid]

    by_consumer = dict.fromkeys(("w0", "w1", "w2"), 0)
    for result in results.values():
        assert result is not None
        by_consumer[result.consumer] += 1
    assert by_consumer["w0"] > 0, "the victim did work before it was killed"
    # Every successful write a survivor counted is one of the results: none overwritten.
    assert by_consumer["w1"] == stats["w1"]["succeeded"]
    assert by_consumer["w2"] == stats["w2"]["succeeded"]

    # What the victim held when it died was taken over by XAUTOCLAIM: a second delivery
    # (XREADGROUP ">" never redelivers), to a survivor, and run again.
    reclaimed = [t for t in in_flight_at_kill if results[t].consumer != "w0"]  # type: ignore[union-attr]
    assert reclaimed, f"the victim held {in_flight_at_kill} at the kill"
    for tid in reclaimed:
        result = results[tid]
        assert result is not None
        assert result.consumer in ("w1", "w2")
        assert result.attempt >= 2
    assert stats["w1"]["claimed"] + stats["w2"]["claimed"] >= len(reclaimed)
    ran_twice = [t for t, n in runs.items() if n >= 2]
    assert ran_twice, "some tasks ran twice"
    assert set(ran_twice) <= set(in_flight_at_kill)
    assert (await consumers(bed))["w0"] == 0, "nothing is left pending on the dead consumer"
    assert await bed.bus.dead_letters() == []
    print(
        f"\n1000 tasks: results by consumer {by_consumer}; "
        f"killed at depth {depth_at_kill} holding {len(in_flight_at_kill)}; "
        f"reclaimed {len(reclaimed)}; ran twice {len(ran_twice)}; "
        f"runs total {sum(runs.values())}"
    )


async def test_a_killed_consumers_tasks_are_reclaimed_by_another_after_min_idle(
    bed: Bed,
) -> None:
    first = bed.start("w1", "--task-delay-ms", "60000")
    submitted = await submit_all(bed, 3)
    task_ids = list(submitted)

    async def all_started() -> bool:
        return set((await runs_of(bed, task_ids)).values()) == {1}

    await until(all_started, timeout_s=30, what="w1 to start all three", bed=bed)
    first.proc.kill()
    await first.exited(timeout_s=10)
    assert len(await pending_of(bed, "w1")) == 3

    second = bed.start("w2")
    answers = [await bed.tasks.wait_result(t, timeout_s=30) for t in task_ids]
    stats = await stop(second)

    assert [a.consumer for a in answers] == ["w2"] * 3
    assert [a.attempt for a in answers] == [2, 2, 2]
    assert await runs_of(bed, task_ids) == dict.fromkeys(task_ids, 2)
    assert stats["claimed"] == 3
    assert stats["read"] == 0, "nothing came by XREADGROUP: these entries were delivered"
    assert (await consumers(bed))["w1"] == 0


async def test_sigterm_lets_in_flight_tasks_finish_and_reads_no_more(bed: Bed) -> None:
    worker = bed.start(
        "w1", "--task-delay-ms", "2000", "--batch", "4", "--concurrency", "4", "--grace-s", "20"
    )
    submitted = await submit_all(bed, 10)
    task_ids = list(submitted)

    async def four_in_flight() -> bool:
        return await bed.bus.pending() == 4

    await until(four_in_flight, timeout_s=30, what="four tasks in flight", bed=bed)
    stats = await stop(worker)

    assert stats["succeeded"] == 4
    assert stats["abandoned"] == 0
    started = [t for t, n in (await runs_of(bed, task_ids)).items() if n]
    answered = [t for t, r in (await results_of(bed, task_ids)).items() if r is not None]
    assert len(started) == 4
    assert answered == started
    assert await bed.bus.pending() == 0
    assert await bed.bus.queue_depth() == 6, "the rest were never read"
    await assert_acked_only_with_a_result(bed, task_ids)


async def test_sigterm_leaves_tasks_unfinished_after_the_grace_period_pending(
    bed: Bed,
) -> None:
    worker = bed.start("w1", "--task-delay-ms", "60000", "--grace-s", "0.5")
    submitted = await submit_all(bed, 5)
    task_ids = list(submitted)

    async def all_started() -> bool:
        return set((await runs_of(bed, task_ids)).values()) == {1}

    await until(all_started, timeout_s=30, what="all five started", bed=bed)
    # Each handler would take 60s: exiting within stop()'s deadline means the 0.5s
    # grace period cut them off.
    stats = await stop(worker)

    assert stats["abandoned"] == 5
    assert stats["succeeded"] == 0
    assert await results_of(bed, task_ids) == dict.fromkeys(task_ids)
    assert await bed.bus.pending() == 5, "not acked: still pending on w1"
    assert await bed.bus.queue_depth() == 5
    await assert_acked_only_with_a_result(bed, task_ids)

    # The next consumer takes them over and answers each once.
    successor = bed.start("w2")
    answers = [await bed.tasks.wait_result(t, timeout_s=30) for t in task_ids]
    await stop(successor)
    assert {a.consumer for a in answers} == {"w2"}
    assert {a.attempt for a in answers} == {2}
    await assert_acked_only_with_a_result(bed, task_ids)
