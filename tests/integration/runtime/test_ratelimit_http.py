"""429 with ``Retry-After`` from the product's own app, the limit kept in the real Redis.

Two apps built by `wiring.create_default_app` (what `bmad runtime` serves), each with
its own lifespan and its own Redis client, stand for two replicas of one Agent: the
burst is spread over both, as a Service spreads requests over an Agent's pods, and
the Agent's ``spec.limits.requestsPerMinute`` holds for the two together. (The same
with two real `bmad runtime` processes: tests/e2e/test_runtime_processes.py.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from bmad_runtime import settings, wiring

pytestmark = pytest.mark.integration

LIMIT = 12  # requests per minute: one every 5 s once the burst is spent


@contextlib.asynccontextmanager
async def replica(
    tmp_path: Path, redis_url: str, *, agent: str, namespace: str
) -> AsyncIterator[httpx.AsyncClient]:
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "role": "dev",
                "model": {"provider": "echo", "name": "echo-1"},
                "limits": {"requestsPerMinute": LIMIT},
            }
        )
    )
    app = wiring.create_default_app(
        settings.RuntimeSettings(
            agent_name=agent,
            agent_namespace=namespace,
            agent_config=config,
            binding_root=tmp_path / "no-bindings",
            auth_mode="none",
            redis_url=redis_url,
            memory_store="inProcess",  # this test is about the limit, not the store
            task_bus_enabled=False,
        )
    )
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            yield client


async def test_a_burst_over_two_replicas_of_the_product_app_gets_429_with_retry_after(
    tmp_path: Path, redis_url: str
) -> None:
    agent, namespace = f"dev-{secrets.token_hex(3)}", f"acme-{secrets.token_hex(3)}"
    async with (
        replica(tmp_path, redis_url, agent=agent, namespace=namespace) as first,
        replica(tmp_path, redis_url, agent=agent, namespace=namespace) as second,
    ):
        replicas = (first, second)
        answers = await asyncio.gather(
            *(replicas[n % 2].post("/v1/invoke", json={"input": f"hi {n}"}) for n in range(30))
        )

    ok = [a for a in answers if a.status_code == 200]
    limited = [a for a in answers if a.status_code == 429]
    assert len(ok) == LIMIT  # the limit of the Agent, not of each replica
    assert len(limited) == 30 - LIMIT
    for answer in limited:
        retry_after = answer.headers["Retry-After"]
        assert retry_after.isdigit()
        assert 1 <= int(retry_after) <= 5  # one request every 5 s
        error = answer.json()["error"]
        assert error["code"] == "rate_limited"
        assert f"retry in {retry_after}s" in error["message"]
    # Both replicas turned callers away: neither had a budget of its own.
    assert any(a.status_code == 429 for a in answers[0::2])
    assert any(a.status_code == 429 for a in answers[1::2])
