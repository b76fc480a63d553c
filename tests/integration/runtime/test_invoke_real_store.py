"""The production app on the test bed's real PostgreSQL and Redis (echo model).

Two app instances, each with its own connections (as two replicas would have), share
one conversation; every invocation leaves a usage record and an audit entry in
PostgreSQL; ``spec.limits`` is enforced through the real Redis limiter; the lengths of
the task bus's streams are exported on ``/metrics``.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import fastapi
import pytest
from redis import asyncio as aioredis

from bmad_integrations import taskwire
from bmad_runtime import auth, settings, wiring
from bmad_testbed import databases

from . import oidc
from .served import ready_soon, serve

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("BMAD_", "OTEL_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


@pytest.fixture
async def dsn(postgres_url: str) -> AsyncIterator[str]:
    async with databases.temporary(postgres_url, "bmad_app") as url:
        yield url


@pytest.fixture
def tenant() -> str:
    return f"acme-{secrets.token_hex(4)}"


def production_app(
    tmp_path: Path,
    tenant: str,
    dsn: str,
    redis_url: str,
    *,
    binding_root: Path | None = None,
    **agent: Any,
) -> fastapi.FastAPI:
    config_path = tmp_path / "agent.json"
    config_path.write_text(
        json.dumps({"role": "pm", "model": {"provider": "echo", "name": "echo-1"}, **agent})
    )
    return wiring.create_default_app(
        settings.RuntimeSettings(
            agent_name="pm-1",
            agent_namespace=tenant,
            agent_config=config_path,
            binding_root=binding_root or tmp_path / "no-bindings",
            auth_mode="none" if binding_root is None else "jwt",
            postgres_dsn=dsn,
            redis_url=redis_url,
        )
    )


async def test_two_replicas_share_a_conversation_and_account_for_it(
    tmp_path: Path, tenant: str, dsn: str, redis_url: str
) -> None:
    async for first in serve(production_app(tmp_path, tenant, dsn, redis_url)):
        opened = await first.post("/v1/invoke", json={"input": "Draft the PRD outline"})
        conversation = opened.json()["conversationId"]
        async for second in serve(production_app(tmp_path, tenant, dsn, redis_url)):
            ready = await ready_soon(second)
            continued = await second.post(
                "/v1/invoke",
                json={"input": "Add a risks section", "conversationId": conversation},
            )
            listed = await second.get("/v1/conversations")
            history = await second.get(f"/v1/conversations/{conversation}/messages")
        deleted = await first.delete(f"/v1/conversations/{conversation}")
        gone = await first.get(f"/v1/conversations/{conversation}/messages")

    assert opened.status_code == 200, opened.text
    assert ready.json() == {
        "status": "ready",
        "checks": {"store": True, "model": True, "auth": True, "bus": True},
        "models": [{"provider": "echo", "model": "echo-1", "reachable": True}],
        "memoryStore": "durable",
        "authMode": "none",
        # The test bed's plaintext servers, as the URLs say (no binding, no TLS).
        "datastores": {"postgres": "plaintext", "redis": "plaintext"},
        "message": None,
    }
    assert continued.status_code == 200, continued.text
    assert continued.json()["output"] == "[echo-1] Add a risks section"
    [summary] = listed.json()["conversations"]
    assert summary["conversationId"] == conversation
    assert summary["turns"] == 4
    assert summary["title"] == "Draft the PRD outline"
    assert [m["content"] for m in history.json()["messages"]] == [
        "Draft the PRD outline",
        "[echo-1] Draft the PRD outline",
        "Add a risks section",
        "[echo-1] Add a risks section",
    ]
    # The second replica sent the first one's turns to the model: more input tokens.
    assert continued.json()["usage"]["tokensIn"] > opened.json()["usage"]["tokensIn"] + 4
    assert deleted.status_code == 204
    assert gone.status_code == 404

    conn = await asyncpg.connect(dsn)
    try:
        usage = await conn.fetch(
            "SELECT agent, conversation, model, provider, tokens_in, tokens_out "
            "FROM usage_records WHERE tenant = $1 ORDER BY id",
            tenant,
        )
        audit = await conn.fetch(
            "SELECT subject, action, detail FROM audit_log WHERE tenant = $1 ORDER BY id", tenant
        )
    finally:
        await conn.close()
    assert [(r["agent"], r["conversation"], r["model"], r["provider"]) for r in usage] == [
        ("pm-1", conversation, "echo-1", "echo")
    ] * 2
    assert [r["tokens_out"] for r in usage] == [5, 5]
    assert [(r["subject"], r["action"]) for r in audit] == [
        ("anonymous", "agent.invoke"),
        ("anonymous", "agent.invoke"),
        ("anonymous", "conversation.delete"),
    ]
    detail = audit[0]["detail"]
    detail = json.loads(detail) if isinstance(detail, str) else detail
    assert detail["conversationId"] == conversation
    assert "PRD" not in json.dumps(detail)


async def test_spec_limits_are_enforced_through_redis(
    tmp_path: Path, tenant: str, dsn: str, redis_url: str
) -> None:
    app = production_app(tmp_path, tenant, dsn, redis_url, limits={"requestsPerMinute": 2})
    async for client in serve(app):
        answers = [await client.post("/v1/invoke", json={"input": "hi"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [200, 200, 429]
    refused = answers[-1]
    assert refused.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 60


async def test_a_second_subject_cannot_read_or_delete_the_firsts_conversation(
    tmp_path: Path, tenant: str, dsn: str, redis_url: str
) -> None:
    """Issue 10, hole 6, on PostgreSQL and Redis with real JWTs from a real issuer: two
    token holders of one tenant. Before the fix this test failed with:

        AssertionError: max read mia's conversation: 200
    """
    with oidc.running() as issuer:
        key = oidc.Key("k1")
        issuer.keys = [key.jwk()]
        binding = tmp_path / "bindings" / "login"
        binding.mkdir(parents=True)
        for name, value in {
            "type": "auth0",
            "issuer": issuer.url,
            "audience": oidc.AUDIENCE,
            "jwksUri": f"{issuer.url}keys",
        }.items():
            (binding / name).write_text(value)

        def token(subject: str, scopes: str) -> dict[str, str]:
            claims = issuer.claims(sub=subject, scope=scopes, **{auth.TENANT_CLAIM: tenant})
            return {"Authorization": f"Bearer {key.sign(claims)}"}

        own = "agent:invoke conversations:read conversations:delete"
        mia, max_ = token("auth0|mia", own), token("auth0|max", own)
        auditor = token("auth0|audit", "conversations:read conversations:read:all")
        app = production_app(tmp_path, tenant, dsn, redis_url, binding_root=tmp_path / "bindings")
        async for client in serve(app):
            opened = await client.post("/v1/invoke", json={"input": "mia's plan"}, headers=mia)
            conversation = opened.json()["conversationId"]
            path = f"/v1/conversations/{conversation}"
            read = await client.get(f"{path}/messages", headers=max_)
            listed = await client.get("/v1/conversations", headers=max_)
            continued = await client.post(
                "/v1/invoke",
                json={"input": "and then?", "conversationId": conversation},
                headers=max_,
            )
            deleted = await client.delete(path, headers=max_)
            kept = await client.get(f"{path}/messages", headers=mia)
            audited = await client.get(f"{path}/messages", headers=auditor)
            removed = await client.delete(path, headers=mia)

    assert opened.status_code == 200, opened.text
    assert read.status_code == 404, f"max read mia's conversation: {read.status_code}"
    assert read.json()["error"]["code"] == "conversation_not_found"
    assert listed.json()["conversations"] == []
    assert continued.status_code == 404, continued.text
    assert deleted.status_code == 404
    assert len(kept.json()["messages"]) == 2, "max's attempts changed nothing"
    assert audited.status_code == 200, "conversations:read:all reads every subject's"
    assert removed.status_code == 204, "the owner deletes her own"


def _sample(exposition: str, name: str) -> float | None:
    """The value of the one series of `name` (whatever its labels: every series carries
    the agent's namespace and name), None when it is not exposed."""
    found = re.search(rf"^{name}(?:{{[^}}]*}})? (\S+)$", exposition, flags=re.M)
    return float(found.group(1)) if found else None


async def test_the_lengths_of_the_task_stream_and_the_dead_letters_are_exported(
    tmp_path: Path, tenant: str, dsn: str, redis_url: str
) -> None:
    """Issue 10, hole 12 (the bus's streams: export their lengths). Before the fix
    only the task stream's length was exported, and this test failed with:

        AssertionError: timed out waiting for bmad_agent_dead_letters 1.0 on /metrics
    """
    keys = taskwire.Keys(tenant, "pm-1")
    redis = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:
        # An entry that is not a task: the consumer dead-letters it without running it.
        await redis.xadd(keys.stream, {"hello": "world"})
        async for client in serve(production_app(tmp_path, tenant, dsn, redis_url)):
            deadline = time.monotonic() + 30
            while True:
                text = (await client.get("/metrics")).text
                if _sample(text, "bmad_agent_dead_letters") == 1.0:
                    break
                assert time.monotonic() < deadline, (
                    "timed out waiting for bmad_agent_dead_letters 1.0 on /metrics"
                )
                await asyncio.sleep(0.2)
        assert _sample(text, "bmad_agent_queue_depth") == 0.0
        assert await redis.xlen(keys.dead) == 1
    finally:
        found = [key async for key in redis.scan_iter(match=f"{keys.prefix}:*", count=500)]
        if found:
            await redis.delete(*found)
        await redis.aclose()
