"""`PostgresRedisStore` against the test bed's real PostgreSQL and Redis.

Each test gets a database of its own and unique tenant/agent names, so that its Redis
keys (``bmad:{tenant}:…``) are its own too: "flushing Redis" here deletes exactly
those keys, never anything another test or suite put there.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import json
import os
import secrets
import subprocess
import sys
import textwrap
import urllib.parse
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]
import pytest
import redis.asyncio as aioredis

from bmad_runtime import bindings, context, ports
from bmad_runtime.memory import conversations
from bmad_runtime.memory import store as memory_store
from bmad_runtime.memory import usage as usage_mod
from bmad_testbed import databases

pytestmark = pytest.mark.integration

OWNER = "auth0|owner"


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(4)}"


@pytest.fixture
async def dsn(postgres_url: str) -> AsyncIterator[str]:
    async with databases.temporary(postgres_url, "bmad_mem") as url:
        yield url


@pytest.fixture
async def store(dsn: str, redis_url: str) -> AsyncIterator[memory_store.PostgresRedisStore]:
    opened = await memory_store.PostgresRedisStore.connect(postgres_dsn=dsn, redis_url=redis_url)
    try:
        yield opened
    finally:
        await opened.close()


@pytest.fixture
async def raw_redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


@pytest.fixture
def names() -> tuple[str, str]:
    return unique("tenant"), unique("agent")


def turn(conversation: str, role: ports.Role, content: str, model: str | None = None) -> ports.Turn:
    return ports.Turn(
        conversation_id=conversation,
        role=role,
        content=content,
        created_at=dt.datetime.now(dt.UTC),
        model=model,
    )


async def write_dialogue(
    store: memory_store.PostgresRedisStore, conversation: str, n: int, *, tenant: str, agent: str
) -> list[str]:
    contents = []
    for i in range(n):
        role: ports.Role = "user" if i % 2 == 0 else "assistant"
        content = f"{role} says {i}"
        await store.append(
            turn(conversation, role, content, model="echo-1" if role == "assistant" else None),
            tenant=tenant,
            agent=agent,
            subject=OWNER,
        )
        contents.append(content)
    return contents


async def forget_tenant_keys(client: aioredis.Redis, tenant: str) -> int:
    """What a Redis flush does to this tenant: its keys are gone."""
    keys = [k async for k in client.scan_iter(match=f"bmad:{tenant}:*")]
    if keys:
        await client.delete(*keys)
    return len(keys)


async def test_turns_are_kept_in_order_in_both_stores(
    store: memory_store.PostgresRedisStore, raw_redis: aioredis.Redis, names: tuple[str, str]
) -> None:
    tenant, agent = names
    contents = await write_dialogue(store, "c-1", 5, tenant=tenant, agent=agent)

    recent = await store.recent("c-1", tenant=tenant, agent=agent, limit=3, subject=OWNER)
    assert [t.content for t in recent] == contents[-3:]
    assert all(t.conversation_id == "c-1" for t in recent)
    history = await store.history("c-1", tenant=tenant, agent=agent, subject=OWNER)
    assert [t.content for t in history] == contents
    assert [t.role for t in history] == ["user", "assistant"] * 2 + ["user"]
    assert history[1].model == "echo-1"
    assert history[0].model is None
    assert history[0].created_at.tzinfo is not None
    assert [
        t.content
        for t in await store.history("c-1", tenant=tenant, agent=agent, limit=2, subject=OWNER)
    ] == (contents[-2:])

    key = conversations.turns_key("c-1", tenant=tenant, agent=agent, owner=OWNER)
    assert key == f"bmad:{tenant}:{agent}:conv:{conversations.owner_digest(OWNER)}:c-1:turns"
    cached = [json.loads(x) for x in await raw_redis.lrange(key, 0, -1)]
    assert [c["seq"] for c in cached] == [1, 2, 3, 4, 5]
    assert 0 < await raw_redis.ttl(key) <= store.conversations.ttl_seconds

    listed = await store.list_conversations(tenant=tenant, agent=agent, subject=OWNER)
    assert [(c["id"], c["title"], c["turns"]) for c in listed] == [("c-1", "user says 0", 5)]
    got = await store.conversations.get_conversation(
        "c-1", tenant=tenant, agent=agent, subject=OWNER
    )
    assert got == listed[0]
    assert (
        await store.conversations.get_conversation(
            "nope", tenant=tenant, agent=agent, subject=OWNER
        )
        is None
    )


async def test_redis_keeps_only_the_recent_turns(
    dsn: str, redis_url: str, raw_redis: aioredis.Redis, names: tuple[str, str]
) -> None:
    tenant, agent = names
    small = await memory_store.PostgresRedisStore.connect(
        postgres_dsn=dsn, redis_url=redis_url, recent_turns=3, ttl_seconds=120
    )
    try:
        contents = await write_dialogue(small, "c", 7, tenant=tenant, agent=agent)
        key = conversations.turns_key("c", tenant=tenant, agent=agent, owner=OWNER)
        assert [json.loads(x)["seq"] for x in await raw_redis.lrange(key, 0, -1)] == [5, 6, 7]
        assert 0 < await raw_redis.ttl(key) <= 120
        # Within the hot window from Redis; beyond it from PostgreSQL.
        assert [
            t.content
            for t in await small.recent("c", tenant=tenant, agent=agent, limit=2, subject=OWNER)
        ] == (contents[-2:])
        assert [
            t.content
            for t in await small.recent("c", tenant=tenant, agent=agent, limit=6, subject=OWNER)
        ] == (contents[-6:])
        assert [
            t.content
            for t in await small.recent("c", tenant=tenant, agent=agent, limit=50, subject=OWNER)
        ] == (contents)
    finally:
        await small.close()


async def test_recent_falls_back_to_postgres_after_a_redis_flush(
    store: memory_store.PostgresRedisStore, raw_redis: aioredis.Redis, names: tuple[str, str]
) -> None:
    tenant, agent = names
    contents = await write_dialogue(store, "c", 4, tenant=tenant, agent=agent)
    key = conversations.turns_key("c", tenant=tenant, agent=agent, owner=OWNER)
    assert await forget_tenant_keys(raw_redis, tenant) == 1

    recent = await store.recent("c", tenant=tenant, agent=agent, limit=10, subject=OWNER)
    assert [t.content for t in recent] == contents
    # The read re-warmed Redis from PostgreSQL.
    assert [json.loads(x)["seq"] for x in await raw_redis.lrange(key, 0, -1)] == [1, 2, 3, 4]

    # Flushed again, then a new turn: the writer notices the gap and rebuilds, so a
    # list holding only the newest turn is never taken for the whole conversation.
    await forget_tenant_keys(raw_redis, tenant)
    await store.append(
        turn("c", "user", "after the flush"), tenant=tenant, agent=agent, subject=OWNER
    )
    assert [json.loads(x)["seq"] for x in await raw_redis.lrange(key, 0, -1)] == [1, 2, 3, 4, 5]
    recent = await store.recent("c", tenant=tenant, agent=agent, limit=10, subject=OWNER)
    assert [t.content for t in recent] == [*contents, "after the flush"]


async def test_a_store_on_an_empty_redis_still_sees_the_history(
    dsn: str, redis_url: str, store: memory_store.PostgresRedisStore, names: tuple[str, str]
) -> None:
    tenant, agent = names
    contents = await write_dialogue(store, "c", 3, tenant=tenant, agent=agent)
    parts = urllib.parse.urlsplit(redis_url)
    other_db = urllib.parse.urlunsplit(parts._replace(path="/7"))
    fresh = await memory_store.PostgresRedisStore.connect(postgres_dsn=dsn, redis_url=other_db)
    try:
        recent = await fresh.recent("c", tenant=tenant, agent=agent, limit=20, subject=OWNER)
        assert [t.content for t in recent] == contents
        await fresh.redis.delete(
            conversations.turns_key("c", tenant=tenant, agent=agent, owner=OWNER)
        )
    finally:
        await fresh.close()


SCRIPT = textwrap.dedent(
    """
    import asyncio, datetime as dt, json, os, sys
    from bmad_runtime import ports
    from bmad_runtime.memory import store as memory_store

    OWNER = "auth0|owner"

    async def main():
        store = await memory_store.PostgresRedisStore.connect(
            postgres_dsn=os.environ["DSN"], redis_url=os.environ["REDIS_URL"]
        )
        tenant, agent, conv = os.environ["TENANT"], os.environ["AGENT"], os.environ["CONV"]
        try:
            if sys.argv[1] == "append":
                await store.append(
                    ports.Turn(conv, "user", sys.argv[2], dt.datetime.now(dt.UTC)),
                    tenant=tenant, agent=agent,
                    subject=OWNER,
                )
            recent = await store.recent(conv, tenant=tenant, agent=agent, limit=50, subject=OWNER)
            history = await store.history(conv, tenant=tenant, agent=agent, subject=OWNER)
            print(json.dumps({
                "pid": os.getpid(),
                "recent": [t.content for t in recent],
                "history": [t.content for t in history],
            }))
        finally:
            await store.close()

    asyncio.run(main())
    """
)


def run_other_process(
    *args: str, dsn: str, redis_url: str, tenant: str, agent: str, conv: str
) -> dict[str, object]:
    env = {
        **os.environ,
        "DSN": dsn,
        "REDIS_URL": redis_url,
        "TENANT": tenant,
        "AGENT": agent,
        "CONV": conv,
    }
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, object] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


async def test_a_conversation_continues_in_another_process(
    dsn: str,
    redis_url: str,
    store: memory_store.PostgresRedisStore,
    raw_redis: aioredis.Redis,
    names: tuple[str, str],
) -> None:
    tenant, agent = names
    contents = await write_dialogue(store, "shared", 3, tenant=tenant, agent=agent)
    where = {"dsn": dsn, "redis_url": redis_url, "tenant": tenant, "agent": agent}

    seen = await asyncio.to_thread(run_other_process, "read", conv="shared", **where)
    assert seen["pid"] != os.getpid()
    assert seen["recent"] == contents
    assert seen["history"] == contents

    # The other process adds a turn; this one sees it, from Redis and from PostgreSQL.
    seen = await asyncio.to_thread(
        run_other_process, "append", "from the other process", conv="shared", **where
    )
    assert seen["recent"] == [*contents, "from the other process"]
    recent = await store.recent("shared", tenant=tenant, agent=agent, limit=10, subject=OWNER)
    assert [t.content for t in recent] == [*contents, "from the other process"]

    # And with Redis flushed in between, PostgreSQL carries the conversation across.
    await forget_tenant_keys(raw_redis, tenant)
    seen = await asyncio.to_thread(run_other_process, "read", conv="shared", **where)
    assert seen["recent"] == [*contents, "from the other process"]


async def test_concurrent_appends_from_two_replicas_get_distinct_sequence_numbers(
    dsn: str,
    redis_url: str,
    store: memory_store.PostgresRedisStore,
    raw_redis: aioredis.Redis,
    names: tuple[str, str],
) -> None:
    tenant, agent = names
    other = await memory_store.PostgresRedisStore.connect(postgres_dsn=dsn, redis_url=redis_url)
    try:
        writes = [
            (store if i % 2 else other).append(
                turn("busy", "user", f"m{i}"),
                tenant=tenant,
                agent=agent,
                subject=OWNER,
            )
            for i in range(30)
        ]
        await asyncio.gather(*writes)
    finally:
        await other.close()
    history = await store.history("busy", tenant=tenant, agent=agent, subject=OWNER)
    assert sorted(t.content for t in history) == sorted(f"m{i}" for i in range(30))
    key = conversations.turns_key("busy", tenant=tenant, agent=agent, owner=OWNER)
    cached = [json.loads(x) for x in await raw_redis.lrange(key, 0, -1)]
    assert [c["seq"] for c in cached] == list(range(11, 31))  # contiguous, newest 20
    recent = await store.recent("busy", tenant=tenant, agent=agent, limit=20, subject=OWNER)
    assert [t.content for t in recent] == [t.content for t in history[-20:]]


async def test_tenants_and_agents_cannot_see_each_others_conversations(
    store: memory_store.PostgresRedisStore, names: tuple[str, str]
) -> None:
    tenant, agent = names
    intruder, other_agent = unique("tenant"), unique("agent")
    await write_dialogue(store, "same-id", 2, tenant=tenant, agent=agent)
    await store.append(
        turn("same-id", "user", "intruder's own"), tenant=intruder, agent=agent, subject=OWNER
    )

    for who, what in ((intruder, agent), (tenant, other_agent)):
        assert [
            c["id"] for c in await store.list_conversations(tenant=who, agent=what, subject=OWNER)
        ] == (["same-id"] if who == intruder else [])
        mine = await store.history("same-id", tenant=who, agent=what, subject=OWNER)
        assert [t.content for t in mine] == (["intruder's own"] if who == intruder else [])
    assert (
        await store.recent("same-id", tenant=tenant, agent=other_agent, limit=5, subject=OWNER)
        == []
    )
    assert (
        await store.conversations.get_conversation(
            "same-id", tenant=tenant, agent=other_agent, subject=OWNER
        )
        is None
    )
    assert not await store.delete_conversation(
        "same-id", tenant=tenant, agent=other_agent, subject=OWNER
    )

    # The intruder deleting "its" same-id removes only its own.
    assert await store.delete_conversation("same-id", tenant=intruder, agent=agent, subject=OWNER)
    assert len(await store.history("same-id", tenant=tenant, agent=agent, subject=OWNER)) == 2
    assert (
        len(await store.recent("same-id", tenant=tenant, agent=agent, limit=5, subject=OWNER)) == 2
    )


async def test_deleting_a_conversation_removes_it_everywhere(
    store: memory_store.PostgresRedisStore, raw_redis: aioredis.Redis, names: tuple[str, str]
) -> None:
    tenant, agent = names
    await write_dialogue(store, "gone", 3, tenant=tenant, agent=agent)
    await context.save_version(
        store.context_versions,
        context.Layers(persona="p"),
        tenant=tenant,
        agent=agent,
        conversation_id="gone",
    )
    assert await store.delete_conversation("gone", tenant=tenant, agent=agent, subject=OWNER)
    assert not await store.delete_conversation("gone", tenant=tenant, agent=agent, subject=OWNER)
    assert (
        await raw_redis.exists(
            conversations.turns_key("gone", tenant=tenant, agent=agent, owner=OWNER)
        )
        == 0
    )
    assert await store.recent("gone", tenant=tenant, agent=agent, limit=5, subject=OWNER) == []
    assert await store.history("gone", tenant=tenant, agent=agent, subject=OWNER) == []
    assert await store.list_conversations(tenant=tenant, agent=agent, subject=OWNER) == []
    assert (
        await store.context_versions.get(tenant=tenant, agent=agent, conversation_id="gone") is None
    )
    # A new conversation under the same id starts over.
    await store.append(
        turn("gone", "user", "fresh start"), tenant=tenant, agent=agent, subject=OWNER
    )
    recent = await store.recent("gone", tenant=tenant, agent=agent, limit=5, subject=OWNER)
    assert [t.content for t in recent] == ["fresh start"]


async def test_usage_is_summed_per_tenant_and_month(
    store: memory_store.PostgresRedisStore, names: tuple[str, str]
) -> None:
    tenant, agent = names
    other_tenant = unique("tenant")
    now = dt.datetime.now(dt.UTC)
    last_month = usage_mod.month_bounds(now)[0] - dt.timedelta(days=1)

    def usage(who: str, what: str, tokens_in: int, tokens_out: int) -> ports.UsageRecord:
        return ports.UsageRecord(
            tenant=who,
            agent=what,
            conversation_id="c",
            model="echo-1",
            provider="echo",
            tokens_in=tokens_in,
            tokens_out=tokens_out,
            latency_ms=12,
        )

    await store.record_usage(usage(tenant, agent, 100, 50))
    await store.record_usage(usage(tenant, agent, 10, 5))
    await store.record_usage(usage(tenant, "second-agent", 1000, 1))
    await store.record_usage(usage(tenant, agent, 7_000_000, 0), at=last_month)
    await store.record_usage(usage(other_tenant, agent, 999, 999))

    assert await store.usage.tokens_this_month(tenant) == 150 + 15 + 1001
    assert await store.usage.tokens_this_month(tenant, agent=agent) == 165
    assert await store.usage.tokens_this_month(tenant, now=last_month) == 7_000_000
    assert await store.usage.tokens_this_month(other_tenant) == 1998
    assert await store.usage.tokens_this_month(unique("nobody")) == 0
    summary = await store.usage.monthly(tenant)
    assert summary == [
        {
            "agent": agent,
            "model": "echo-1",
            "provider": "echo",
            "requests": 2,
            "tokens_in": 110,
            "tokens_out": 55,
        },
        {
            "agent": "second-agent",
            "model": "echo-1",
            "provider": "echo",
            "requests": 1,
            "tokens_in": 1000,
            "tokens_out": 1,
        },
    ]


async def test_the_audit_log_refuses_update_and_delete(
    dsn: str, store: memory_store.PostgresRedisStore, names: tuple[str, str]
) -> None:
    tenant, agent = names
    await store.audit(
        tenant=tenant,
        agent=agent,
        subject="user|42",
        action="conversation.delete",
        detail={"conversation": "c-9", "at": dt.datetime(2024, 1, 2, tzinfo=dt.UTC)},
    )
    entry_id = await store.audits.append(
        tenant=tenant,
        agent=agent,
        subject="user|42",
        action="invoke",
        detail={},
    )
    entries = await store.audits.entries(tenant)
    assert [e["action"] for e in entries] == ["invoke", "conversation.delete"]
    assert entries[1]["detail"] == {"conversation": "c-9", "at": "2024-01-02 00:00:00+00:00"}

    conn = await asyncpg.connect(dsn)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("UPDATE audit_log SET action = 'forged' WHERE id = $1", entry_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("DELETE FROM audit_log WHERE id = $1", entry_id)
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await conn.execute("TRUNCATE audit_log")
        assert await conn.fetchval("SELECT count(*) FROM audit_log") == 2
    finally:
        await conn.close()
    assert [e["action"] for e in await store.audits.entries(tenant, agent=agent)] == [
        "invoke",
        "conversation.delete",
    ]


async def test_context_versions_are_written_when_the_layers_change(
    store: memory_store.PostgresRedisStore, names: tuple[str, str]
) -> None:
    tenant, agent = names
    layers = context.Layers(
        platform="platform",
        persona="You are John, the PM.",
        artifacts=(context.ArtifactLayer(name="brief.md", version="v1", content="brief"),),
    )
    first = await context.save_version(store.context_versions, layers, tenant=tenant, agent=agent)
    same = await context.save_version(store.context_versions, layers, tenant=tenant, agent=agent)
    changed = context.Layers(platform="platform", persona="You are John, the PM. Be terse.")
    second = await context.save_version(store.context_versions, changed, tenant=tenant, agent=agent)
    scoped = await context.save_version(
        store.context_versions, layers, tenant=tenant, agent=agent, conversation_id="c"
    )
    assert first == context.SavedVersion(1, created=True)
    assert same == context.SavedVersion(1, created=False)
    assert second == context.SavedVersion(2, created=True)
    assert scoped == context.SavedVersion(1, created=True)  # numbered per conversation

    latest = await store.context_versions.get(tenant=tenant, agent=agent)
    assert latest is not None
    assert latest["version"] == 2
    assert latest["layers"]["persona"] == "You are John, the PM. Be terse."
    old = await store.context_versions.get(tenant=tenant, agent=agent, version=1)
    assert old is not None
    assert old["layers"]["artifacts"][0]["name"] == "brief.md"
    assert old["sha256"] == layers.digest()

    # Replicas noticing the same change at once create one version, not several.
    racing = context.Layers(platform="platform", persona="Raced.")
    results = await asyncio.gather(
        *(
            context.save_version(store.context_versions, racing, tenant=tenant, agent=agent)
            for _ in range(8)
        )
    )
    assert sorted(r.created for r in results) == [False] * 7 + [True]
    assert {r.version for r in results} == {3}


async def test_ping_needs_both_stores(dsn: str, names: tuple[str, str]) -> None:
    dead_redis = "redis://127.0.0.1:1/0"  # nothing listens on port 1
    store = await memory_store.PostgresRedisStore.connect(postgres_dsn=dsn, redis_url=dead_redis)
    try:
        assert not await store.ping()
        tenant, agent = names
        # PostgreSQL still takes the turn; reads fall back to it.
        await store.append(
            turn("c", "user", "redis is down"), tenant=tenant, agent=agent, subject=OWNER
        )
        recent = await store.recent("c", tenant=tenant, agent=agent, limit=5, subject=OWNER)
        assert [t.content for t in recent] == ["redis is down"]
    finally:
        await store.close()


async def test_ping_is_true_when_both_answer(store: memory_store.PostgresRedisStore) -> None:
    assert await store.ping()


async def test_bad_names_are_refused(store: memory_store.PostgresRedisStore) -> None:
    with pytest.raises(ValueError, match="tenant"):
        await store.append(turn("c", "user", "x"), tenant="a:b", agent="agent", subject=OWNER)
    with pytest.raises(ValueError, match="conversation id"):
        await store.append(turn("", "user", "x"), tenant="t", agent="agent", subject=OWNER)
    assert await store.history("bad\nid", tenant="t", agent="agent", subject=OWNER) == []


async def test_the_store_connects_from_binding_settings(
    dsn: str, redis_url: str, names: tuple[str, str]
) -> None:
    pg = urllib.parse.urlsplit(dsn)
    rd = urllib.parse.urlsplit(redis_url)
    postgres = bindings.PostgresSettings(
        dsn=dsn,
        host=pg.hostname or "",
        port=pg.port or 5432,
        database=pg.path.lstrip("/"),
        username=pg.username or "",
        password=pg.password or "",
        ssl_mode="disable",
    )
    redis_settings = bindings.RedisSettings(
        url=redis_url, host=rd.hostname or "", port=rd.port or 6379, password=rd.password
    )
    store = await memory_store.PostgresRedisStore.from_settings(postgres, redis_settings)
    try:
        assert await store.ping()
        tenant, agent = names
        await store.append(turn("c", "user", "bound"), tenant=tenant, agent=agent, subject=OWNER)
        assert [
            t.content
            for t in await store.recent("c", tenant=tenant, agent=agent, limit=1, subject=OWNER)
        ] == ["bound"]
    finally:
        await store.close()


async def test_a_conversation_belongs_to_the_subject_that_started_it(
    store: memory_store.PostgresRedisStore, raw_redis: aioredis.Redis, names: tuple[str, str]
) -> None:
    """Issue 10, hole 6, in the store: another subject of the same tenant and agent
    neither reads, continues, lists nor deletes it; None (every subject) reaches it."""
    tenant, agent = names
    contents = await write_dialogue(store, "mine", 2, tenant=tenant, agent=agent)
    other = "auth0|other"

    with pytest.raises(ports.ConversationNotFoundError):
        await store.recent("mine", tenant=tenant, agent=agent, limit=5, subject=other)
    with pytest.raises(ports.ConversationNotFoundError):
        await store.append(
            turn("mine", "user", "let me in"), tenant=tenant, agent=agent, subject=other
        )
    assert await store.history("mine", tenant=tenant, agent=agent, subject=other) == []
    assert await store.list_conversations(tenant=tenant, agent=agent, subject=other) == []
    assert not await store.delete_conversation("mine", tenant=tenant, agent=agent, subject=other)
    assert (
        await raw_redis.exists(
            conversations.turns_key("mine", tenant=tenant, agent=agent, owner=other)
        )
        == 0
    ), "the other subject has no hot list of it either"

    # Nothing changed for the owner; every subject's view (None) sees it with its owner.
    history = await store.history("mine", tenant=tenant, agent=agent, subject=OWNER)
    assert [t.content for t in history] == contents
    [row] = await store.list_conversations(tenant=tenant, agent=agent, subject=None)
    assert (row["id"], row["owner"], row["turns"]) == ("mine", OWNER, 2)
    assert len(await store.history("mine", tenant=tenant, agent=agent, subject=None)) == 2
    assert await store.delete_conversation("mine", tenant=tenant, agent=agent, subject=None)
    assert (
        await raw_redis.exists(
            conversations.turns_key("mine", tenant=tenant, agent=agent, owner=OWNER)
        )
        == 0
    )


def turn_record(
    conversation: str, n: int, *, tenant: str, agent: str, subject: str = OWNER, turns: bool = True
) -> ports.TurnRecord:
    """What `turns.finish` hands the store for the n-th answer of a conversation."""
    asked = dt.datetime.now(dt.UTC)
    return ports.TurnRecord(
        tenant=tenant,
        agent=agent,
        subject=subject,
        turns=(
            ports.Turn(conversation, "user", f"question {n}\nwith details", asked),
            ports.Turn(
                conversation,
                "assistant",
                f"answer {n}",
                asked + dt.timedelta(milliseconds=5),
                model="echo-1",
            ),
        )
        if turns
        else (),
        usage=ports.UsageRecord(
            tenant=tenant,
            agent=agent,
            conversation_id=conversation,
            model="echo-1",
            provider="echo",
            tokens_in=10 + n,
            tokens_out=20 + n,
            latency_ms=7,
        ),
        action="agent.invoke",
        detail={"conversationId": conversation, "requestId": f"r-{n}", "tokensIn": 10 + n},
    )


class CountingPool:
    """The store's real pool, counting the statements sent through it."""

    def __init__(self, pool: object) -> None:
        self.pool = pool
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> object:
        if name in ("execute", "executemany", "fetch", "fetchval", "fetchrow", "acquire"):
            self.calls.append(name)
        return getattr(self.pool, name)


async def table_counts(dsn: str, tenant: str) -> dict[str, int]:
    conn = await asyncpg.connect(dsn)
    try:
        row = await conn.fetchrow(
            "SELECT (SELECT count(*) FROM conversations WHERE tenant = $1) AS conversations,"
            " (SELECT count(*) FROM messages WHERE tenant = $1) AS messages,"
            " (SELECT count(*) FROM usage_records WHERE tenant = $1) AS usage_records,"
            " (SELECT count(*) FROM audit_log WHERE tenant = $1) AS audit_log",
            tenant,
        )
        return {name: int(count) for name, count in row.items()}
    finally:
        await conn.close()


async def test_a_turns_record_is_one_statement_and_one_redis_call_and_a_replay_is_deduped(
    dsn: str,
    store: memory_store.PostgresRedisStore,
    raw_redis: aioredis.Redis,
    names: tuple[str, str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Issue 15, target 3: a turn's user and assistant turns, usage record and audit
    entry go to PostgreSQL as one statement and to Redis as one call, and store what
    `append` twice, `record_usage` and `audit` stored."""
    tenant, agent = names
    counting = CountingPool(store.pool)
    monkeypatch.setattr(store.conversations, "pool", counting)
    redis_commands: list[str] = []
    send = store.redis.execute_command

    async def counted(*args: object, **options: object) -> object:
        redis_commands.append(str(args[0]))
        return await send(*args, **options)

    monkeypatch.setattr(store.redis, "execute_command", counted)

    first, second = (turn_record("c-r", n, tenant=tenant, agent=agent) for n in (1, 2))
    await store.record_turn(first)
    assert counting.calls == ["fetchval"]
    assert [c.upper() for c in redis_commands] in (
        ["EVALSHA"],
        ["EVALSHA", "SCRIPT LOAD", "EVALSHA"],
    )
    await store.record_turn(second)

    conn = await asyncpg.connect(dsn)
    try:
        conversation = await conn.fetchrow(
            "SELECT title, last_seq, owner, created_at, updated_at FROM conversations "
            "WHERE tenant = $1 AND agent = $2 AND id = 'c-r'",
            tenant,
            agent,
        )
        messages = await conn.fetch(
            "SELECT seq, role, content, model, created_at FROM messages "
            "WHERE tenant = $1 AND agent = $2 AND conversation = 'c-r' ORDER BY seq",
            tenant,
            agent,
        )
        usage = await conn.fetch(
            "SELECT agent, conversation, model, provider, tokens_in, tokens_out, latency_ms "
            "FROM usage_records WHERE tenant = $1 ORDER BY id",
            tenant,
        )
        audit = await conn.fetch(
            "SELECT agent, subject, action, detail::text AS detail FROM audit_log "
            "WHERE tenant = $1 ORDER BY id",
            tenant,
        )
    finally:
        await conn.close()
    assert dict(conversation) == {
        "title": "question 1",
        "last_seq": 4,
        "owner": OWNER,
        "created_at": first.turns[0].created_at,
        "updated_at": second.turns[1].created_at,
    }
    assert [tuple(m) for m in messages] == [
        (seq, t.role, t.content, t.model, t.created_at)
        for seq, t in enumerate([*first.turns, *second.turns], start=1)
    ]
    assert [tuple(u) for u in usage] == [
        (agent, "c-r", "echo-1", "echo", 11, 21, 7),
        (agent, "c-r", "echo-1", "echo", 12, 22, 7),
    ]
    assert [(a["agent"], a["subject"], a["action"]) for a in audit] == [
        (agent, OWNER, "agent.invoke")
    ] * 2
    assert [json.loads(a["detail"]) for a in audit] == [first.detail, second.detail]

    key = conversations.turns_key("c-r", tenant=tenant, agent=agent, owner=OWNER)
    hot = [json.loads(x) for x in await raw_redis.lrange(key, 0, -1)]
    assert [(h["seq"], h["content"]) for h in hot] == [
        (1, "question 1\nwith details"),
        (2, "answer 1"),
        (3, "question 2\nwith details"),
        (4, "answer 2"),
    ]
    # A replay of the push (a retried call) stores nothing twice, in either order.
    await store.conversations.push("c-r", 3, second.turns, tenant=tenant, agent=agent, owner=OWNER)
    await store.conversations.push("c-r", 1, first.turns, tenant=tenant, agent=agent, owner=OWNER)
    assert await raw_redis.lrange(key, 0, -1) == [json.dumps(h, separators=(",", ":")) for h in hot]
    recent = await store.recent("c-r", tenant=tenant, agent=agent, limit=3, subject=OWNER)
    assert [t.content for t in recent] == ["answer 1", "question 2\nwith details", "answer 2"]


async def test_a_turns_record_for_another_subjects_conversation_stores_nothing(
    dsn: str, store: memory_store.PostgresRedisStore, names: tuple[str, str]
) -> None:
    tenant, agent = names
    await store.record_turn(turn_record("mine", 1, tenant=tenant, agent=agent))
    before = await table_counts(dsn, tenant)
    assert before == {"conversations": 1, "messages": 2, "usage_records": 1, "audit_log": 1}

    with pytest.raises(ports.ConversationNotFoundError, match="no conversation 'mine'"):
        await store.record_turn(
            turn_record("mine", 2, tenant=tenant, agent=agent, subject="auth0|other")
        )
    assert await table_counts(dsn, tenant) == before, "no turn, usage or audit row written"
    history = await store.history("mine", tenant=tenant, agent=agent, subject=None)
    assert [t.content for t in history] == ["question 1\nwith details", "answer 1"]


async def test_a_turns_record_without_turns_writes_usage_and_audit_only(
    dsn: str, store: memory_store.PostgresRedisStore, names: tuple[str, str]
) -> None:
    """An agent that keeps no memory: no conversation is opened (or checked)."""
    tenant, agent = names
    record = turn_record("c-none", 3, tenant=tenant, agent=agent, turns=False)
    await store.record_turn(record)
    assert await table_counts(dsn, tenant) == {
        "conversations": 0,
        "messages": 0,
        "usage_records": 1,
        "audit_log": 1,
    }
    assert await store.usage.tokens_this_month(tenant, agent=agent) == 13 + 23
    [entry] = await store.audits.entries(tenant)
    assert (entry["subject"], entry["action"], entry["detail"]) == (
        OWNER,
        "agent.invoke",
        record.detail,
    )


async def test_a_turns_record_that_fails_stores_nothing_and_raises(
    dsn: str, store: memory_store.PostgresRedisStore, names: tuple[str, str]
) -> None:
    """The usage row breaks a CHECK (negative tokens): the turns before it in the
    statement are not kept either, and asyncpg's error reaches the caller."""
    tenant, agent = names
    good = turn_record("c-bad", 1, tenant=tenant, agent=agent)
    bad = dataclasses.replace(good, usage=dataclasses.replace(good.usage, tokens_out=-1))
    with pytest.raises(asyncpg.CheckViolationError):
        await store.record_turn(bad)
    assert await table_counts(dsn, tenant) == {
        "conversations": 0,
        "messages": 0,
        "usage_records": 0,
        "audit_log": 0,
    }
    # A bad name is refused before anything is sent, as the parts refuse it.
    with pytest.raises(ValueError, match="not a valid name"):
        await store.record_turn(
            dataclasses.replace(good, usage=dataclasses.replace(good.usage, agent="a:b"))
        )
    with pytest.raises(ValueError, match="subject must be 1 to"):
        await store.record_turn(dataclasses.replace(good, subject=""))
    assert (await table_counts(dsn, tenant))["audit_log"] == 0


async def test_the_stores_pool_sends_no_reset_and_keeps_no_lock(
    dsn: str, store: memory_store.PostgresRedisStore, names: tuple[str, str]
) -> None:
    """A connection back in the store's pool is not reset with a statement of its own
    (a second round trip per request), and none of them holds the migrations' lock:
    PostgreSQL's view of the store's sessions after a turn's record."""
    tenant, agent = names
    await store.record_turn(turn_record("c-pool", 1, tenant=tenant, agent=agent))
    conn = await asyncpg.connect(dsn)
    try:
        sessions = await conn.fetch(
            "SELECT pid, state, query FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        locks = await conn.fetchval(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND database = "
            "(SELECT oid FROM pg_database WHERE datname = current_database())"
        )
    finally:
        await conn.close()
    assert sessions, "the store's pool has its sessions open"
    assert all(s["state"] == "idle" for s in sessions)
    last = [s["query"] for s in sessions]
    assert any("WITH conversation AS" in q for q in last), last
    assert not any("RESET ALL" in q or "pg_advisory_unlock_all" in q for q in last), last
    assert locks == 0


async def test_concurrent_turns_records_from_two_replicas_keep_each_turns_pair_together(
    dsn: str,
    redis_url: str,
    store: memory_store.PostgresRedisStore,
    raw_redis: aioredis.Redis,
    names: tuple[str, str],
) -> None:
    """Both turns of a record are numbered under one row lock: concurrent records of
    one conversation get distinct, contiguous pairs, and the hot list stays contiguous."""
    tenant, agent = names
    other = await memory_store.PostgresRedisStore.connect(postgres_dsn=dsn, redis_url=redis_url)
    try:
        await asyncio.gather(
            *(
                (store if n % 2 else other).record_turn(
                    turn_record("busy", n, tenant=tenant, agent=agent)
                )
                for n in range(16)
            )
        )
    finally:
        await other.close()
    history = await store.history("busy", tenant=tenant, agent=agent, subject=OWNER)
    assert len(history) == 32
    pairs = [(history[i].content, history[i + 1].content) for i in range(0, 32, 2)]
    assert sorted(pairs) == sorted(
        (f"question {n}\nwith details", f"answer {n}") for n in range(16)
    )
    key = conversations.turns_key("busy", tenant=tenant, agent=agent, owner=OWNER)
    cached = [json.loads(x) for x in await raw_redis.lrange(key, 0, -1)]
    assert [c["seq"] for c in cached] == list(range(13, 33))  # contiguous, newest 20
    assert await store.usage.tokens_this_month(tenant, agent=agent) == sum(
        30 + 2 * n for n in range(16)
    )
