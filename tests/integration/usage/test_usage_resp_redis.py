"""The ledger's own Redis client (`resp`) against the test bed's real Redis: replies
matched to their commands under pipelining, the group commit of concurrent records,
TLS, and a writer that survives its connection being killed."""

from __future__ import annotations

import asyncio
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from bmad_integrations.usage import acl, record, resp, writer

from .test_usage_redis_acl import plain_url, usage

pytestmark = pytest.mark.integration


async def test_concurrent_commands_each_get_their_own_reply(redis_url: str) -> None:
    client = resp.Client.from_url(redis_url)
    try:
        values = [f"value-{n}" for n in range(300)]
        replies = await asyncio.gather(*(client.execute_command("ECHO", v) for v in values))
        assert replies == values
        assert await client.execute_command("GET", "bmad:test:resp:missing") is None
    finally:
        await client.aclose()


@dataclass
class Dev:
    """Agent dev's writer in a fresh namespace, as its ACL user."""

    namespace: str
    user: str
    writer: writer.LedgerWriter


@pytest.fixture
async def dev(
    admin_redis: aioredis.Redis, redis_url: str, namespaces: list[str]
) -> AsyncIterator[Dev]:
    namespace = namespaces.new("acme")  # type: ignore[attr-defined]
    password = acl.new_password()
    user = await acl.ensure_writer(admin_redis, namespace=namespace, agent="dev", password=password)
    w = writer.LedgerWriter.from_url(
        plain_url(redis_url), username=user, password=password, namespace=namespace, agent="dev"
    )
    try:
        yield Dev(namespace, user, w)
    finally:
        await w.aclose()


async def test_the_records_of_concurrent_answers_all_land_once_each(
    admin_redis: aioredis.Redis, dev: Dev
) -> None:
    records = [usage(dev.namespace, "dev", n) for n in range(200)]
    ids = await asyncio.gather(*(dev.writer.write(r) for r in records))
    entries = await admin_redis.xrange(record.stream_key(dev.namespace, "dev"))
    assert len(entries) == 200
    # Each write was answered with the stream id of its own record.
    by_entry = {entry_id: fields["id"] for entry_id, fields in entries}
    assert [by_entry[i] for i in ids] == [r.record_id for r in records]


async def test_a_writer_whose_connection_is_killed_writes_on(
    admin_redis: aioredis.Redis, dev: Dev
) -> None:
    await dev.writer.write(usage(dev.namespace, "dev", 0))
    assert await admin_redis.execute_command("CLIENT", "KILL", "USER", dev.user) == 1
    await asyncio.gather(*(dev.writer.write(usage(dev.namespace, "dev", n)) for n in range(1, 21)))
    stored = {
        fields["id"]
        for _, fields in await admin_redis.xrange(record.stream_key(dev.namespace, "dev"))
    }
    # Every record is there (a retried XADD may add a second copy, which the
    # ingester's key makes harmless; see writer).
    assert stored == {usage(dev.namespace, "dev", n).record_id for n in range(21)}


@pytest.fixture
def platform_ca(testbed_env: dict[str, str]) -> str:
    return Path(testbed_env["BMAD_SERVICES_CA"]).read_text()


async def test_over_tls_with_the_platform_ca(
    platform_ca: str, redis_url: str, testbed_env: dict[str, str]
) -> None:
    password = urllib.parse.urlsplit(redis_url).password
    client = resp.Client.from_url(
        f"rediss://localhost:{testbed_env['BMAD_REDIS_TLS_PORT']}/0",
        password=password,
        ca_cert=platform_ca,
    )
    try:
        assert await client.execute_command("PING") == "PONG"
    finally:
        await client.aclose()
    # Not the platform's CA: the handshake fails, as a connection error.
    untrusted = resp.Client.from_url(
        f"rediss://localhost:{testbed_env['BMAD_REDIS_TLS_PORT']}/0", password=password
    )
    try:
        with pytest.raises(redis_errors.ConnectionError):
            await untrusted.execute_command("PING")
    finally:
        await untrusted.aclose()


async def test_execute_many_sends_a_group_and_raises_the_refusal_among_it(
    admin_redis: aioredis.Redis, dev: Dev
) -> None:
    """The spool's shipment: one write, every reply read; a command the agent's ACL
    user may not run (an XADD to another agent's stream) is raised, the others land."""
    client = dev.writer.client
    assert isinstance(client, resp.Client)
    own = record.stream_key(dev.namespace, "dev")
    other = record.stream_key(dev.namespace, "other")
    good = [resp.pack(("XADD", own, "*", "n", str(n))) for n in range(50)]
    await client.execute_many(good)
    assert await admin_redis.xlen(own) == 50
    refused = resp.pack(("XADD", other, "*", "n", "x"))
    with pytest.raises(redis_errors.NoPermissionError):
        await client.execute_many([*good[:3], refused, *good[3:6]])
    assert await admin_redis.xlen(own) == 56
    assert await admin_redis.xlen(other) == 0
    await client.execute_many([])
    # The connection is still good for the next group.
    await client.execute_many(good[:2])
    assert await admin_redis.xlen(own) == 58
