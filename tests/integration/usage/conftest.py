"""Fixtures of the usage tests: a database of their own, Redis clients, unique names."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from bmad_integrations.usage import record, store
from bmad_testbed import databases


@pytest.fixture
async def ledger_dsn(postgres_url: str) -> AsyncIterator[str]:
    """A fresh database for the ledger, dropped afterwards."""
    async with databases.temporary(postgres_url, "bmad_ledger") as url:
        yield url


@pytest.fixture
async def ledger(ledger_dsn: str) -> AsyncIterator[store.LedgerStore]:
    opened = await store.LedgerStore.connect(ledger_dsn, max_size=10)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def admin_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    """The platform Redis as the operator sees it (the test bed's default user)."""
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
async def namespaces(admin_redis: aioredis.Redis) -> AsyncIterator[list[str]]:
    """A supply of unique namespace names; their streams and writers are removed after."""
    made: list[str] = []

    class Supply(list[str]):
        def new(self, base: str = "ns") -> str:
            name = f"{base}-{secrets.token_hex(4)}"
            made.append(name)
            return name

    yield Supply()
    for namespace in made:
        async for key in admin_redis.scan_iter(match=f"{record.STREAM_PREFIX}:{namespace}:*"):
            await admin_redis.delete(key)
        for user in await admin_redis.acl_users():
            if user.startswith(f"{record.ACL_USER_PREFIX}:{namespace}:"):
                await admin_redis.acl_deluser(user)
