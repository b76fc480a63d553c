"""Schema migrations against the test bed's real PostgreSQL, each test in a fresh database."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from bmad_runtime import migrations
from bmad_runtime.memory import store as memory_store
from bmad_testbed import databases

pytestmark = pytest.mark.integration

TABLES = {
    "schema_migrations",
    "conversations",
    "messages",
    "context_versions",
    "usage_records",
    "audit_log",
}


@pytest.fixture
async def fresh_dsn(postgres_url: str) -> AsyncIterator[str]:
    """A database of its own for one test, dropped afterwards."""
    async with databases.temporary(postgres_url, "bmad_mig") as url:
        yield url


async def tables(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch("SELECT tablename FROM pg_tables WHERE schemaname = 'public'")
    return {r["tablename"] for r in rows}


async def test_migrations_apply_once_and_then_do_nothing(fresh_dsn: str) -> None:
    conn = await asyncpg.connect(fresh_dsn)
    try:
        assert await migrations.apply(conn) == [m.version for m in migrations.MIGRATIONS]
        assert await migrations.apply(conn) == []
        assert await migrations.apply(conn) == []
        assert await tables(conn) >= TABLES
        rows = await conn.fetch("SELECT version, checksum FROM schema_migrations")
        assert {(r["version"], r["checksum"]) for r in rows} == {
            (m.version, m.checksum) for m in migrations.MIGRATIONS
        }
        # The lock is released after each run.
        held = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted"
        )
        assert held == 0
    finally:
        await conn.close()


async def test_replicas_starting_together_migrate_exactly_once(
    fresh_dsn: str, redis_url: str
) -> None:
    stores = await asyncio.gather(
        *(
            memory_store.PostgresRedisStore.connect(postgres_dsn=fresh_dsn, redis_url=redis_url)
            for _ in range(4)
        )
    )
    try:
        assert all([await s.ping() for s in stores])
        conn = await asyncpg.connect(fresh_dsn)
        try:
            count = await conn.fetchval("SELECT count(*) FROM schema_migrations")
            assert count == len(migrations.MIGRATIONS)
            assert await tables(conn) >= TABLES
        finally:
            await conn.close()
    finally:
        for store in stores:
            await store.close()


class RefusalWatch:
    """A connection that sets `refused` once tries for the migration lock failed twice."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn
        self.refusals = 0
        self.refused = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._conn, name)

    async def fetchval(self, query: str, *args: Any) -> Any:
        value = await self._conn.fetchval(query, *args)
        if "pg_try_advisory_lock" in query and value is False:
            self.refusals += 1
            if self.refusals >= 2:
                self.refused.set()
        return value


async def test_a_replica_waits_for_the_migration_lock(fresh_dsn: str) -> None:
    holder = await asyncpg.connect(fresh_dsn)
    other = await asyncpg.connect(fresh_dsn)
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock($1)", migrations.LOCK_KEY)
        with pytest.raises(migrations.MigrationError, match="migration lock"):
            await migrations.apply(other, lock_timeout=0.5)
        assert "conversations" not in await tables(other)

        # Event, not a nap: the replica asked for the lock, was refused, and asked again.
        watched = RefusalWatch(other)
        waiting = asyncio.create_task(migrations.apply(watched, lock_timeout=30))
        await asyncio.wait_for(watched.refused.wait(), 30)
        assert not waiting.done()
        await holder.fetchval("SELECT pg_advisory_unlock($1)", migrations.LOCK_KEY)
        assert await asyncio.wait_for(waiting, 30) == [m.version for m in migrations.MIGRATIONS]
    finally:
        await holder.close()
        await other.close()


async def test_each_migration_is_its_own_transaction(fresh_dsn: str) -> None:
    good = migrations.Migration(1, "good", "CREATE TABLE first_table (id int)")
    bad = migrations.Migration(2, "bad", "CREATE TABLE second_table (id int); SELECT 1/0")
    conn = await asyncpg.connect(fresh_dsn)
    try:
        with pytest.raises(asyncpg.DivisionByZeroError):
            await migrations.apply(conn, migrations=(good, bad))
        assert await migrations.applied(conn) == {1: good.checksum}
        names = await tables(conn)
        assert "first_table" in names
        assert "second_table" not in names  # rolled back with its ledger row
        fixed = migrations.Migration(2, "fixed", "CREATE TABLE second_table (id int)")
        assert await migrations.apply(conn, migrations=(good, fixed)) == [2]
    finally:
        await conn.close()


async def test_an_edited_migration_is_refused(fresh_dsn: str) -> None:
    conn = await asyncpg.connect(fresh_dsn)
    try:
        original = migrations.Migration(1, "t", "CREATE TABLE edited (id int)")
        await migrations.apply(conn, migrations=(original,))
        edited = migrations.Migration(1, "t", "CREATE TABLE edited (id bigint)")
        with pytest.raises(migrations.MigrationError, match="must not change"):
            await migrations.apply(conn, migrations=(edited,))
        # The failed run released the lock.
        assert await conn.fetchval("SELECT pg_try_advisory_lock($1)", migrations.LOCK_KEY)
    finally:
        await conn.close()
