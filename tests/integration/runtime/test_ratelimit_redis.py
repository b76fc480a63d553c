"""`ratelimit.RedisLimiter` on the test bed's real Redis, shared by several processes.

The cross-process tests run this very file as a worker (``python <this file> ...``):
each worker connects, loads the script, says ``ready`` and waits for ``go`` on stdin,
so that all of them fire their burst at the same moment; it then prints what it was
told (admitted, or the seconds to wait) as one JSON line. One of them may run with a
skewed wall clock, which changes nothing: the script reads Redis's clock.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import redis.asyncio as aioredis

from bmad_runtime import ratelimit

pytestmark = pytest.mark.integration

URL_ENV = "BMAD_TEST_RATELIMIT_REDIS_URL"  # the URL (with its password) goes by env, not argv


@dataclass
class Outcome:
    admitted: int
    waits: list[float]
    limited_by: list[str]


def prefix() -> str:
    return f"test-rl-{secrets.token_hex(4)}"


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_url)
    try:
        yield client
    finally:
        await client.aclose()


def run_workers(redis_url: str, jobs: list[dict[str, Any]], env: dict[str, str]) -> list[Outcome]:
    """Start one worker process per job, release them together, collect their outcomes."""
    child_env = {**env, URL_ENV: redis_url}
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, json.dumps(job)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=child_env,
        )
        for job in jobs
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                _, err = proc.communicate(timeout=30)
                raise AssertionError(f"worker did not start: {line!r} {err}")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outcomes = []
        for proc in procs:
            out, err = proc.communicate(timeout=60)
            assert proc.returncode == 0, err
            outcomes.append(Outcome(**json.loads(out.strip().splitlines()[-1])))
        return outcomes
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


async def burst(limiter: ratelimit.RedisLimiter, job: dict[str, Any]) -> Outcome:
    decisions = await asyncio.gather(
        *(
            limiter.decide(tenant=job["tenant"], agent=job["agent"], tokens=job.get("tokens", 0))
            for _ in range(job["hits"])
        )
    )
    admitted = [d for d in decisions if d.retry_after is None]
    refused = [d for d in decisions if d.retry_after is not None]
    return Outcome(
        admitted=len(admitted),
        waits=[d.retry_after for d in refused if d.retry_after is not None],
        limited_by=[d.limited_by or "" for d in refused],
    )


# --- two processes, one limit ---------------------------------------------------------------


def test_a_burst_from_two_processes_admits_exactly_the_limit(
    redis_url: str, clean_env: dict[str, str]
) -> None:
    limits = {"requests_per_minute": 10, "tokens_per_minute": None}
    job = {"prefix": prefix(), "limits": limits, "tenant": "acme", "agent": "dev", "hits": 20}
    outcomes = run_workers(redis_url, [job, {**job, "clock_skew": 3600}], clean_env)
    assert sum(o.admitted for o in outcomes) == 10
    waits = [w for o in outcomes for w in o.waits]
    assert len(waits) == 30
    # The bucket refills one request every 6 s: that (less the burst's duration) is the wait.
    assert all(0 < w <= 6.0 for w in waits), waits
    assert min(waits) > 4.0, waits
    assert {name for o in outcomes for name in o.limited_by} == {"agent requests"}


def test_the_tenant_budget_is_shared_by_two_agents_in_two_processes(
    redis_url: str, clean_env: dict[str, str]
) -> None:
    limits = {
        "requests_per_minute": 100,
        "tokens_per_minute": None,
        "tenant_requests_per_minute": 12,
    }
    job = {"prefix": prefix(), "limits": limits, "tenant": "acme", "hits": 15}
    outcomes = run_workers(
        redis_url, [{**job, "agent": "analyst"}, {**job, "agent": "architect"}], clean_env
    )
    assert sum(o.admitted for o in outcomes) == 12
    assert {name for o in outcomes for name in o.limited_by} == {"tenant requests"}
    assert all(0 < w <= 5.0 for o in outcomes for w in o.waits)


def test_token_budgets_hold_across_two_processes(redis_url: str, clean_env: dict[str, str]) -> None:
    limits = {"requests_per_minute": 1000, "tokens_per_minute": 1000}
    job = {"prefix": prefix(), "limits": limits, "tenant": "acme", "agent": "dev", "hits": 5}
    began = time.monotonic()
    outcomes = run_workers(redis_url, [{**job, "tokens": 100}, {**job, "tokens": 100}], clean_env)
    # 1000 tokens a minute, 100 per request: ten requests, whoever sends them.
    assert sum(o.admitted for o in outcomes) == 10
    more = run_workers(redis_url, [{**job, "tokens": 100, "hits": 20}], clean_env)
    elapsed = time.monotonic() - began
    # The bucket is empty after the burst and refills 100 tokens every 6 s: however slow
    # this machine was to start the next process, no more than that refill is admitted.
    assert more[0].admitted <= int(elapsed // 6)
    assert more[0].waits, "the burst emptied the bucket: the next requests wait"
    assert set(more[0].limited_by) == {"agent tokens"}
    assert all(0 < w <= 6.0 for w in more[0].waits)  # 100 tokens refill in 6 s


# --- one process: the semantics of the budgets -------------------------------------------


async def test_tokens_are_charged_and_a_refusal_says_how_long(
    redis: aioredis.Redis,
) -> None:
    limiter = ratelimit.RedisLimiter(
        redis, requests_per_minute=None, tokens_per_minute=1000, key_prefix=prefix()
    )
    for _ in range(3):
        assert await limiter.hit(tenant="acme", agent="dev", tokens=300) is None
    wait = await limiter.hit(tenant="acme", agent="dev", tokens=300)
    # 900 of 1000 spent; 300 more need 200 to refill, at 1000 a minute: 12 s.
    assert wait is not None
    assert 11.5 < wait <= 12.0
    assert await limiter.hit(tenant="acme", agent="dev", tokens=100) is None


async def test_a_refused_request_charges_no_budget(redis: aioredis.Redis) -> None:
    limiter = ratelimit.RedisLimiter(
        redis, requests_per_minute=2, tokens_per_minute=100, key_prefix=prefix()
    )
    assert await limiter.hit(tenant="acme", agent="dev", tokens=60) is None
    refused = await limiter.decide(tenant="acme", agent="dev", tokens=60)
    assert refused.limited_by == "agent tokens"
    # The refusal took neither a request nor tokens: 1 request and 40 tokens are left.
    assert await limiter.hit(tenant="acme", agent="dev", tokens=40) is None
    refused = await limiter.decide(tenant="acme", agent="dev", tokens=0)
    assert refused.limited_by == "agent requests"


async def test_the_tenant_budgets_bind_every_agent_of_the_tenant_only(
    redis: aioredis.Redis,
) -> None:
    limiter = ratelimit.RedisLimiter(
        redis,
        requests_per_minute=None,
        tokens_per_minute=None,
        tenant_requests_per_minute=100,
        tenant_tokens_per_minute=500,
        key_prefix=prefix(),
    )
    assert await limiter.hit(tenant="acme", agent="pm", tokens=300) is None
    assert await limiter.hit(tenant="acme", agent="qa", tokens=200) is None
    refused = await limiter.decide(tenant="acme", agent="sm", tokens=50)
    assert refused.limited_by == "tenant tokens"
    assert await limiter.hit(tenant="globex", agent="pm", tokens=500) is None


async def test_a_cost_above_the_whole_budget_passes_once_and_leaves_a_debt(
    redis: aioredis.Redis,
) -> None:
    limiter = ratelimit.RedisLimiter(
        redis, requests_per_minute=None, tokens_per_minute=600, key_prefix=prefix()
    )
    assert await limiter.hit(tenant="acme", agent="dev", tokens=1200) is None
    wait = await limiter.hit(tenant="acme", agent="dev")
    assert wait is not None
    assert 59.0 < wait <= 60.0  # 1200 tokens at 600 a minute: two minutes, one already covered


async def test_charged_usage_makes_later_requests_wait(redis: aioredis.Redis) -> None:
    limiter = ratelimit.RedisLimiter(
        redis, requests_per_minute=60, tokens_per_minute=1000, key_prefix=prefix()
    )
    assert await limiter.hit(tenant="acme", agent="dev") is None
    await limiter.charge(tenant="acme", agent="dev", tokens=1500)  # the model's answer
    decision = await limiter.decide(tenant="acme", agent="dev")
    assert decision.limited_by == "agent tokens"
    assert decision.retry_after is not None
    assert 29.0 < decision.retry_after <= 30.0


async def test_the_bucket_refills_after_the_wait(redis: aioredis.Redis) -> None:
    limiter = ratelimit.RedisLimiter(
        redis, requests_per_minute=60, tokens_per_minute=None, key_prefix=prefix()
    )
    results = await asyncio.gather(*(limiter.hit(tenant="acme", agent="dev") for _ in range(70)))
    assert sum(r is None for r in results) == 60
    wait = max(r for r in results if r is not None)
    assert 0 < wait <= 1.0  # one request a second
    await asyncio.sleep(wait + 0.01)
    assert await limiter.hit(tenant="acme", agent="dev") is None
    assert await limiter.hit(tenant="acme", agent="dev") is not None


async def test_state_follows_the_redis_clock_and_expires(redis: aioredis.Redis) -> None:
    key_prefix = prefix()
    limiter = ratelimit.RedisLimiter(
        redis, requests_per_minute=6, tokens_per_minute=None, key_prefix=key_prefix
    )
    assert await limiter.hit(tenant="acme", agent="dev") is None
    key = f"{key_prefix}:ratelimit:{{acme}}:agent:dev:requests"
    seconds, micros = await redis.time()
    server_now = seconds * 1_000_000 + micros
    stored = await redis.get(key)
    assert isinstance(stored, bytes)
    tat = float(stored)
    assert 9_000_000 < tat - server_now <= 10_000_000  # one request is 10 s of a 6/min bucket
    ttl = await redis.pttl(key)
    assert 9_000 < ttl <= 10_002
    assert await redis.keys(f"{key_prefix}:*") == [key.encode()]


# --- the worker -------------------------------------------------------------------------


async def _worker(job: dict[str, Any]) -> None:
    skew = float(job.get("clock_skew", 0))
    if skew:
        real = time.time
        time.time = lambda: real() + skew  # a replica whose clock is off
    client = aioredis.Redis.from_url(os.environ[URL_ENV], max_connections=64)
    try:
        limiter = ratelimit.RedisLimiter(client, key_prefix=job["prefix"], **job["limits"])
        # Connect and load the script before the start line, on a key of no test.
        await limiter.hit(tenant=f"warm-{secrets.token_hex(4)}", agent="up")
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        outcome = await burst(limiter, job)
        print(json.dumps(outcome.__dict__), flush=True)
    finally:
        await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser(description="fire a burst at a RedisLimiter")
    parser.add_argument("job", help="the job as JSON")
    asyncio.run(_worker(json.loads(parser.parse_args().job)))


if __name__ == "__main__":
    main()
