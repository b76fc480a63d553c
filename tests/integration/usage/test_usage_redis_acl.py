"""Usage writers on the test bed's real Redis: an agent may append to its own stream
and do nothing else; the operator's ingester reads every stream.

The hostile-tenant attempts below use the credentials a tenant can read out of its
own namespace (the agent's usage Secret), so each refusal is one the real server made.
"""

from __future__ import annotations

import datetime as dt
import urllib.parse
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from bmad_integrations.usage import acl, budget, record, writer

pytestmark = pytest.mark.integration


def plain_url(redis_url: str) -> str:
    """The Redis URL without the admin password (what an agent is given)."""
    parts = urllib.parse.urlsplit(redis_url)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}"))


def usage(namespace: str, agent: str, n: int = 0) -> record.UsageRecord:
    return record.UsageRecord(
        record_id=record.request_record_id(f"req-{n}"),
        tenant=namespace,
        namespace=namespace,
        agent=agent,
        provider="echo",
        model="echo",
        tokens_in=3,
        tokens_out=4,
        occurred_at=dt.datetime.now(dt.UTC),
        source="http",
    )


@pytest.fixture
async def agent_client(
    admin_redis: aioredis.Redis, redis_url: str, namespaces: list[str]
) -> AsyncIterator[tuple[str, aioredis.Redis, str]]:
    namespace = namespaces.new("acme")  # type: ignore[attr-defined]
    password = acl.new_password()
    user = await acl.ensure_writer(
        admin_redis, namespace=namespace, agent="analyst", password=password
    )
    client = aioredis.Redis.from_url(
        plain_url(redis_url), username=user, password=password, decode_responses=True
    )
    try:
        yield namespace, client, password
    finally:
        await client.aclose()


async def test_a_writer_appends_to_its_own_stream(
    agent_client: tuple[str, aioredis.Redis, str], admin_redis: aioredis.Redis
) -> None:
    namespace, client, _ = agent_client
    key = record.stream_key(namespace, "analyst")
    rec = usage(namespace, "analyst")
    entry = await client.xadd(key, record.encode(rec))  # type: ignore[arg-type]
    assert await client.ping()
    stored = await admin_redis.xrange(key)
    assert [e[0] for e in stored] == [entry]
    assert record.decode(stored[0][1]) == rec


ATTEMPTS = [
    ("append to another agent's stream", ("XADD", "{other}", "*", "v", "1")),
    ("append to another tenant's stream", ("XADD", "bmad:usage:globex:analyst", "*", "v", "1")),
    ("read its own stream", ("XRANGE", "{own}", "-", "+")),
    (
        "read its own stream through a group",
        ("XREADGROUP", "GROUP", "ledger", "x", "STREAMS", "{own}", ">"),
    ),
    ("delete its own entries", ("XDEL", "{own}", "0-1")),
    ("trim its own stream", ("XTRIM", "{own}", "MAXLEN", "0")),
    ("delete its own stream", ("DEL", "{own}")),
    ("read any key", ("GET", "bmad:globex:analyst:tasks")),
    ("list keys", ("KEYS", "*")),
    ("scan keys", ("SCAN", "0")),
    ("flush the database", ("FLUSHALL",)),
    ("read the configuration", ("CONFIG", "GET", "*")),
    ("read the ACL", ("ACL", "LIST")),
    ("change its own rights", ("ACL", "SETUSER", "{user}", "+@all", "~*")),
    ("run a script", ("EVAL", "return 1", "0")),
    ("subscribe to a channel", ("SUBSCRIBE", "anything")),
    ("read server information", ("INFO",)),
]


@pytest.mark.parametrize(("what", "command"), ATTEMPTS, ids=[a[0] for a in ATTEMPTS])
async def test_a_hostile_tenant_with_the_writer_credentials_is_refused(
    agent_client: tuple[str, aioredis.Redis, str], what: str, command: tuple[str, ...]
) -> None:
    namespace, client, _ = agent_client
    own = record.stream_key(namespace, "analyst")
    other = record.stream_key(namespace, "dev")
    user = record.acl_user(namespace, "analyst")
    args = [a.format(own=own, other=other, user=user) for a in command]
    if args[0] == "SUBSCRIBE":
        pubsub = client.pubsub()

        async def listen() -> None:
            await pubsub.subscribe(args[1])
            await pubsub.get_message(timeout=5)

        try:
            with pytest.raises(redis_errors.ResponseError, match=r"NOPERM|no permissions"):
                await listen()
        finally:
            await pubsub.aclose()
        return
    with pytest.raises(redis_errors.NoPermissionError):
        await client.execute_command(*args)


async def test_a_wrong_or_removed_credential_cannot_write(
    agent_client: tuple[str, aioredis.Redis, str],
    admin_redis: aioredis.Redis,
    redis_url: str,
) -> None:
    namespace, _, password = agent_client
    user = record.acl_user(namespace, "analyst")
    wrong = writer.LedgerWriter.from_url(
        plain_url(redis_url), username=user, password="x" * 32, namespace=namespace, agent="analyst"
    )
    with pytest.raises(writer.LedgerUnavailable, match="refused"):
        await wrong.write(usage(namespace, "analyst"))
    await wrong.aclose()

    right = writer.LedgerWriter.from_url(
        plain_url(redis_url), username=user, password=password, namespace=namespace, agent="analyst"
    )
    try:
        assert await right.write(usage(namespace, "analyst", 1))
        assert (namespace, "analyst") in await acl.writers(admin_redis)
        assert await acl.remove_writer(admin_redis, namespace=namespace, agent="analyst")
        with pytest.raises(writer.LedgerUnavailable, match="refused"):
            await right.write(usage(namespace, "analyst", 2))
    finally:
        await right.aclose()


async def test_resetting_a_writer_revokes_the_old_password(
    agent_client: tuple[str, aioredis.Redis, str], admin_redis: aioredis.Redis, redis_url: str
) -> None:
    namespace, _, old = agent_client
    new = acl.new_password()
    await acl.ensure_writer(admin_redis, namespace=namespace, agent="analyst", password=new)
    user = record.acl_user(namespace, "analyst")
    for password, works in ((old, False), (new, True)):
        w = writer.LedgerWriter.from_url(
            plain_url(redis_url),
            username=user,
            password=password,
            namespace=namespace,
            agent="analyst",
        )
        try:
            if works:
                assert await w.write(usage(namespace, "analyst"))
            else:
                with pytest.raises(writer.LedgerUnavailable):
                    await w.write(usage(namespace, "analyst"))
        finally:
            await w.aclose()


async def test_a_writer_refuses_a_record_of_another_agent(redis_url: str) -> None:
    w = writer.LedgerWriter.from_url(
        plain_url(redis_url), username="u", password="p" * 20, namespace="acme", agent="analyst"
    )
    try:
        with pytest.raises(record.RecordError):
            await w.write(usage("acme", "dev"))
    finally:
        await w.aclose()


async def test_an_unreachable_ledger_is_retried_then_reported() -> None:
    w = writer.LedgerWriter.from_url(
        "redis://127.0.0.1:1/0",
        username="u",
        password="p" * 20,
        namespace="acme",
        agent="a",
        timeout=0.5,
        attempts=2,
    )
    try:
        with pytest.raises(writer.LedgerUnavailable, match="after 2 attempts"):
            await w.write(usage("acme", "a"))
    finally:
        await w.aclose()


async def test_a_writer_reads_its_own_tenants_budget_and_nothing_more(
    admin_redis: aioredis.Redis, redis_url: str, namespaces: list[str]
) -> None:
    """With its tenant, a writer may GET that tenant's budget key, the one key the
    operator sets for it; it may not change it, nor read another tenant's."""
    namespace = namespaces.new("acme")  # type: ignore[attr-defined]
    tenant, other = f"{namespace}-t", f"{namespace}-other"
    password = acl.new_password()
    user = await acl.ensure_writer(
        admin_redis, namespace=namespace, agent="dev", password=password, tenant=tenant
    )
    state = budget.decide(limit=10, used=12, now=dt.datetime.now(dt.UTC))
    assert state is not None
    for name in (tenant, other):
        await admin_redis.set(budget.key(name), budget.encode(state))
    client = aioredis.Redis.from_url(
        plain_url(redis_url), username=user, password=password, decode_responses=True
    )
    try:
        assert budget.decode(await client.get(budget.key(tenant))) == state
        refused = [
            ("GET", budget.key(other)),
            ("SET", budget.key(tenant), "{}"),
            ("DEL", budget.key(tenant)),
            ("EXPIRE", budget.key(tenant), "1"),
            ("GETDEL", budget.key(tenant)),
            ("GET", record.stream_key(namespace, "dev")),
        ]
        for command in refused:
            with pytest.raises(redis_errors.NoPermissionError):
                await client.execute_command(*command)
        await writer.LedgerWriter(client, namespace=namespace, agent="dev").write(
            usage(namespace, "dev")
        )
        assert await admin_redis.get(budget.key(tenant)) == budget.encode(state)
    finally:
        await client.aclose()
        for name in (tenant, other):
            await admin_redis.delete(budget.key(name))
