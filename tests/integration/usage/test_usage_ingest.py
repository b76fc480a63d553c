"""Agents' usage streams into the ledger: the test bed's real Redis and PostgreSQL.

The crash test runs real processes: three workers (two replicas of one agent, one of
another) write the usage of 1,000 tasks while one replica is SIGKILLed after writing
a record and before acknowledging its task, and the ingester is SIGKILLed mid-run and
started again under another name. The ledger must hold exactly one row per task with
exactly the tokens of the tasks.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import random
import secrets
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from bmad_integrations.usage import acl, ingester, prices, record, store, writer

pytestmark = pytest.mark.integration

HERE = Path(__file__).resolve().parent
PRICES = prices.parse(
    {
        "currency": "USD",
        "prices": [{"provider": "echo", "model": "*", "inputPer1M": "1", "outputPer1M": "2"}],
    }
)


def plain_url(redis_url: str) -> str:
    parts = urllib.parse.urlsplit(redis_url)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}"))


def usage(namespace: str, agent: str, n: int, **changes: Any) -> record.UsageRecord:
    fields: dict[str, Any] = {
        "record_id": record.task_record_id(f"task-{n}"),
        "tenant": namespace,
        "namespace": namespace,
        "agent": agent,
        "provider": "echo",
        "model": "echo",
        "tokens_in": 10 + n,
        "tokens_out": 1,
        "occurred_at": dt.datetime.now(dt.UTC),
        "source": "task",
    }
    fields.update(changes)
    return record.UsageRecord(**fields)


async def eventually(probe: Callable[[], Any], *, within: float, what: str) -> Any:
    deadline = time.monotonic() + within
    while True:
        result = await probe()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within:.0f}s waiting for {what}")
        await asyncio.sleep(0.1)


@pytest.fixture
async def writers(
    admin_redis: aioredis.Redis, redis_url: str
) -> AsyncIterator[Callable[[str, str], Any]]:
    made: list[writer.LedgerWriter] = []

    async def make(namespace: str, agent: str) -> writer.LedgerWriter:
        password = acl.new_password()
        user = await acl.ensure_writer(
            admin_redis, namespace=namespace, agent=agent, password=password
        )
        w = writer.LedgerWriter.from_url(
            plain_url(redis_url), username=user, password=password, namespace=namespace, agent=agent
        )
        made.append(w)
        return w

    yield make
    for w in made:
        await w.aclose()


async def drain(job: ingester.Ingester) -> ingester.IngestStats:
    total = ingester.IngestStats()
    for _ in range(100):
        stats = await job.run_once(refresh=True)
        total.add(stats)
        if not stats.read:
            return total
    raise AssertionError("the streams never emptied")


async def test_records_reach_the_ledger_once_priced_and_billed_to_the_namespace_owner(
    admin_redis: aioredis.Redis,
    ledger: store.LedgerStore,
    namespaces: Any,
    writers: Any,
) -> None:
    prefix = f"ing-{secrets.token_hex(3)}"
    dev, prod = namespaces.new(f"{prefix}-dev"), namespaces.new(f"{prefix}-prod")
    owners = {dev: "acme", prod: "acme"}
    w_dev = await writers(dev, "analyst")
    w_prod = await writers(prod, "dev")
    for n in range(20):
        await w_dev.write(usage(dev, "analyst", n))
        await w_prod.write(usage(prod, "dev", n))
    for n in range(5):  # replays: the same calls again
        await w_dev.write(usage(dev, "analyst", n))
    job = ingester.Ingester(
        admin_redis,
        ledger,
        consumer="operator-0",
        tenant_of=lambda ns: owners.get(ns, ns),
        price_table=PRICES,
        match=f"{record.STREAM_PREFIX}:{prefix}-*",
    )
    stats = await drain(job)
    assert (stats.read, stats.inserted, stats.duplicates, stats.rejected) == (45, 40, 5, 0)
    assert await job.backlog() == {
        record.stream_key(dev, "analyst"): 0,
        record.stream_key(prod, "dev"): 0,
    }
    usage_now = await ledger.tenant_usage(dt.datetime.now(dt.UTC))
    acme = usage_now["acme"].this_period
    tokens_in = 2 * sum(10 + n for n in range(20))
    assert (acme.records, acme.tokens_in, acme.tokens_out) == (40, tokens_in, 40)
    assert acme.cost == {"USD": (Decimal(tokens_in) * 1 + Decimal(40) * 2) / Decimal(10**6)}
    assert dev not in usage_now  # the record said tenant=<namespace>; the owner is acme


async def test_forged_and_broken_entries_are_kept_aside_and_never_billed(
    admin_redis: aioredis.Redis, ledger: store.LedgerStore, namespaces: Any
) -> None:
    prefix = f"forge-{secrets.token_hex(3)}"
    victim, attacker = namespaces.new(f"{prefix}-globex"), namespaces.new(f"{prefix}-acme")
    key = record.stream_key(attacker, "analyst")
    # What a hostile runtime could append on its own stream (its ACL allows nothing else).
    await admin_redis.xadd(key, record.encode(usage(victim, "analyst", 1, tenant=victim)))
    await admin_redis.xadd(key, record.encode(usage(attacker, "dev", 2)))
    await admin_redis.xadd(key, {"v": "1", "id": "x"})
    await admin_redis.xadd(key, {"v": "9"})
    await admin_redis.xadd(key, record.encode(usage(attacker, "analyst", 3, tenant=victim)))
    job = ingester.Ingester(
        admin_redis, ledger, consumer="operator-0", match=f"{record.STREAM_PREFIX}:{prefix}-*"
    )
    stats = await drain(job)
    assert (stats.inserted, stats.rejected) == (1, 4)
    rows = await ledger.pool.fetch("SELECT tenant, namespace, agent FROM usage_ledger")
    # the one valid record is the attacker's own, billed to the attacker's namespace owner
    assert [tuple(r) for r in rows] == [(attacker, attacker, "analyst")]
    reasons = sorted(
        r["reason"] for r in await ledger.pool.fetch("SELECT reason FROM usage_rejected")
    )
    assert reasons == ["Malformed", "UnknownVersion", "WrongStream", "WrongStream"]
    assert await admin_redis.xlen(key) == 0


async def test_an_ingester_that_died_after_its_commit_is_replayed_without_effect(
    admin_redis: aioredis.Redis, ledger: store.LedgerStore, namespaces: Any, writers: Any
) -> None:
    prefix = f"replay-{secrets.token_hex(3)}"
    ns = namespaces.new(prefix)
    w = await writers(ns, "analyst")
    for n in range(30):
        await w.write(usage(ns, "analyst", n))
    key = record.stream_key(ns, "analyst")
    # "operator-0" reads and commits, then dies before its XACK.
    await admin_redis.xgroup_create(key, ingester.GROUP, id="0")
    read = await admin_redis.xreadgroup(ingester.GROUP, "operator-0", {key: ">"})
    rows = [
        ingester.judge(
            key, fields, tenant_of=lambda x: x, table=PRICES, now=dt.datetime.now(dt.UTC)
        )
        for _, fields in read[0][1]
    ]
    assert await ledger.insert(rows) == 30
    assert (await admin_redis.xpending(key, ingester.GROUP))["pending"] == 30
    # Another replica claims what "operator-0" left and finds it all in the ledger.
    job = ingester.Ingester(
        admin_redis,
        ledger,
        consumer="operator-1",
        min_idle_ms=0,
        claim_every=0,
        match=f"{record.STREAM_PREFIX}:{prefix}*",
    )
    stats = await drain(job)
    assert (stats.claimed, stats.inserted, stats.duplicates) == (30, 0, 30)
    assert await ledger.pool.fetchval("SELECT count(*) FROM usage_ledger") == 30
    assert (await admin_redis.xpending(key, ingester.GROUP))["pending"] == 0
    assert await admin_redis.xlen(key) == 0


class FailingOnce(store.LedgerStore):
    """The real store, whose first insert fails as if PostgreSQL had gone away."""

    failed = False

    async def insert(self, rows: Any, rejected: Any = ()) -> int:
        if not self.failed:
            self.failed = True
            raise ConnectionResetError("connection to PostgreSQL lost")
        return await super().insert(rows, rejected)


async def test_a_failed_insert_leaves_the_entries_to_the_next_pass(
    admin_redis: aioredis.Redis, ledger: store.LedgerStore, namespaces: Any, writers: Any
) -> None:
    prefix = f"outage-{secrets.token_hex(3)}"
    ns = namespaces.new(prefix)
    w = await writers(ns, "analyst")
    for n in range(10):
        await w.write(usage(ns, "analyst", n))
    job = ingester.Ingester(
        admin_redis,
        FailingOnce(ledger.pool),
        consumer="operator-0",
        match=f"{record.STREAM_PREFIX}:{prefix}*",
    )
    with pytest.raises(ConnectionResetError):
        await job.run_once(refresh=True)
    assert await admin_redis.xlen(record.stream_key(ns, "analyst")) == 10
    stats = await drain(job)
    assert stats.inserted == 10
    assert await ledger.pool.fetchval("SELECT count(*) FROM usage_ledger") == 10


@pytest.fixture
def urls(ledger_dsn: str, redis_url: str) -> dict[str, str]:
    return {"ledger": ledger_dsn, "redis": redis_url}


def spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, str(HERE / "usage_proc.py"), *args],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )


async def test_a_thousand_calls_with_a_replica_and_the_ingester_killed_are_a_thousand_rows(
    admin_redis: aioredis.Redis,
    ledger: store.LedgerStore,
    urls: dict[str, str],
    namespaces: Any,
    tmp_path: Path,
) -> None:
    ledger_dsn, redis_url = urls["ledger"], urls["redis"]
    prefix = f"crash-{secrets.token_hex(3)}"
    ns = namespaces.new(prefix)
    agents = {"analyst": 700, "dev": 300}
    rng = random.Random(14)
    expected: dict[str, tuple[int, int]] = {}
    env = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
    group = "agents"
    for agent, count in agents.items():
        password = acl.new_password()
        await acl.ensure_writer(admin_redis, namespace=ns, agent=agent, password=password)
        env[f"PW_{agent.upper()}"] = password
        tasks_key = f"bmad:{ns}:{agent}:tasks"
        await admin_redis.xgroup_create(tasks_key, group, id="0", mkstream=True)
        async with admin_redis.pipeline(transaction=False) as pipe:
            for n in range(count):
                task_id = f"{agent}-{n}"
                tokens = (rng.randint(1, 4000), rng.randint(1, 1000))
                expected[task_id] = tokens
                pipe.xadd(tasks_key, {"task_id": task_id, "in": tokens[0], "out": tokens[1]})
            await pipe.execute()
    marker = f"bmad:{ns}:paused"

    def worker(agent: str, consumer: str, *extra: str) -> subprocess.Popen[bytes]:
        return spawn(
            [
                "worker",
                "--tasks-url",
                redis_url,
                "--tasks-key",
                f"bmad:{ns}:{agent}:tasks",
                "--group",
                group,
                "--consumer",
                consumer,
                "--ledger-url",
                plain_url(redis_url),
                "--username",
                record.acl_user(ns, agent),
                "--password-env",
                f"PW_{agent.upper()}",
                "--namespace",
                ns,
                "--agent",
                agent,
                *extra,
            ],
            env,
            tmp_path / f"{consumer}.log",
        )

    def ingester_proc(consumer: str) -> subprocess.Popen[bytes]:
        return spawn(
            [
                "ingester",
                "--redis-url",
                redis_url,
                "--dsn",
                ledger_dsn,
                "--consumer",
                consumer,
                "--match",
                f"{record.STREAM_PREFIX}:{ns}:*",
            ],
            env,
            tmp_path / f"{consumer}.log",
        )

    doomed = worker("analyst", "analyst-1", "--pause-after", "40", "--marker", marker)
    survivor = worker("analyst", "analyst-2")
    other = worker("dev", "dev-1")
    first_ingester = ingester_proc("operator-a")
    procs = [doomed, survivor, other, first_ingester]
    try:
        await eventually(lambda: admin_redis.get(marker), within=120, what="the paused replica")
        doomed.send_signal(signal.SIGKILL)  # its 40th record written, its task not acked

        async def some_rows() -> bool:
            return bool(await ledger.pool.fetchval("SELECT count(*) FROM usage_ledger") >= 100)

        await eventually(some_rows, within=120, what="the ingester to have ingested 100 rows")
        first_ingester.send_signal(signal.SIGKILL)
        second_ingester = ingester_proc("operator-b")
        procs.append(second_ingester)
        assert survivor.wait(timeout=300) == 0, (tmp_path / "analyst-2.log").read_text()
        assert other.wait(timeout=300) == 0, (tmp_path / "dev-1.log").read_text()

        async def all_rows() -> bool:
            return bool(await ledger.pool.fetchval("SELECT count(*) FROM usage_ledger") >= 1000)

        await eventually(all_rows, within=120, what="1,000 rows in the ledger")

        async def drained() -> bool:
            lengths = [await admin_redis.xlen(record.stream_key(ns, a)) for a in agents]
            return sum(lengths) == 0

        await eventually(drained, within=60, what="the usage streams to drain")
        paused = await admin_redis.get(marker)
        written = [
            *await admin_redis.lrange(f"bmad:{ns}:analyst:tasks:written", 0, -1),
            *await admin_redis.lrange(f"bmad:{ns}:dev:tasks:written", 0, -1),
        ]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait(timeout=30)
        for agent in agents:
            await admin_redis.delete(f"bmad:{ns}:{agent}:tasks", f"bmad:{ns}:{agent}:tasks:written")
        await admin_redis.delete(marker)

    rows = await ledger.pool.fetch(
        "SELECT record_id, tokens_in, tokens_out FROM usage_ledger WHERE namespace = $1", ns
    )
    assert len(rows) == 1000
    got = {r["record_id"]: (int(r["tokens_in"]), int(r["tokens_out"])) for r in rows}
    assert got == {record.task_record_id(t): tokens for t, tokens in expected.items()}
    # The killed replica's 40th task ran twice (written, not acknowledged, claimed by the
    # other replica): its record reached the stream twice and the ledger kept one.
    assert paused is not None
    assert written.count(paused) == 2, f"{paused} written {written.count(paused)} times"
    assert len(written) > 1000
    for name in ("operator-a", "operator-b", "analyst-2", "dev-1"):
        assert "Traceback" not in (tmp_path / f"{name}.log").read_text(), name
    assert await ledger.pool.fetchval("SELECT count(*) FROM usage_rejected") == 0
    totals = await ledger.agent_usage(dt.datetime.now(dt.UTC), namespace=ns)
    assert totals[(ns, "analyst")].this_period.records == 700
    assert totals[(ns, "dev")].this_period.tokens == sum(
        tin + tout for t, (tin, tout) in expected.items() if t.startswith("dev-")
    )
