"""`ratelimit.RedisLimiter` without a Redis: which budgets apply, their keys, the arguments
the script gets and how its reply is read. The decisions themselves are the script's,
tested against the real Redis in tests/integration/runtime/test_ratelimit_redis.py.
"""

from __future__ import annotations

from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from bmad_runtime import ports, ratelimit

pytestmark = pytest.mark.unit


class FakeScript:
    def __init__(self, reply: list[int]) -> None:
        self.reply = reply
        self.calls: list[tuple[list[str], list[Any]]] = []

    async def __call__(self, *, keys: list[str], args: list[Any]) -> list[int]:
        self.calls.append((keys, args))
        return self.reply


class FakeRedis:
    def __init__(self, reply: list[int]) -> None:
        self.script = FakeScript(reply)
        self.source = ""

    def register_script(self, source: str) -> FakeScript:
        self.source = source
        return self.script


def limiter(
    reply: list[int] | None = None, **limits: Any
) -> tuple[ratelimit.RedisLimiter, FakeScript]:
    fake = FakeRedis(reply or [0, 0])
    settings: dict[str, Any] = {"requests_per_minute": 60, "tokens_per_minute": 1000}
    settings.update(limits)
    made = ratelimit.RedisLimiter(cast(aioredis.Redis, fake), **settings)
    assert "TIME" in fake.source  # the script reads Redis's clock, not ours
    return made, fake.script


def test_it_satisfies_the_port() -> None:
    made, _ = limiter()
    port: ports.Limiter = made
    assert port is made


def test_every_budget_has_a_key_under_the_tenants_hash_tag() -> None:
    made, _ = limiter(tenant_requests_per_minute=600, tenant_tokens_per_minute=50_000)
    budgets = made.budgets(tenant="acme", agent="dev", requests=1, tokens=42)
    assert [(b.name, b.key, b.limit, b.cost) for b in budgets] == [
        ("tenant requests", "bmad:ratelimit:{acme}:requests", 600, 1),
        ("tenant tokens", "bmad:ratelimit:{acme}:tokens", 50_000, 42),
        ("agent requests", "bmad:ratelimit:{acme}:agent:dev:requests", 60, 1),
        ("agent tokens", "bmad:ratelimit:{acme}:agent:dev:tokens", 1000, 42),
    ]


def test_budgets_set_to_none_are_left_out() -> None:
    made, _ = limiter(tokens_per_minute=None, key_prefix="p")
    budgets = made.budgets(tenant="acme", agent="dev", requests=1, tokens=0)
    assert [b.key for b in budgets] == ["p:ratelimit:{acme}:agent:dev:requests"]


async def test_an_admitted_hit_runs_the_script_once_with_limits_and_costs() -> None:
    made, script = limiter(tenant_requests_per_minute=600)
    assert await made.hit(tenant="acme", agent="dev", tokens=7) is None
    [(keys, args)] = script.calls
    assert keys == [
        "bmad:ratelimit:{acme}:requests",
        "bmad:ratelimit:{acme}:agent:dev:requests",
        "bmad:ratelimit:{acme}:agent:dev:tokens",
    ]
    assert args == ["hit", 60_000_000, 600, 1, 60, 1, 1000, 7]


async def test_a_refusal_is_the_wait_in_seconds_and_names_the_budget() -> None:
    made, _ = limiter(reply=[2_500_001, 2], tenant_requests_per_minute=600)
    decision = await made.decide(tenant="acme", agent="dev")
    assert decision == ratelimit.Decision(retry_after=2.500001, limited_by="agent requests")
    assert await made.hit(tenant="acme", agent="dev") == pytest.approx(2.500001)


async def test_charge_books_tokens_only() -> None:
    made, script = limiter(tenant_tokens_per_minute=9000)
    await made.charge(tenant="acme", agent="dev", tokens=500)
    [(keys, args)] = script.calls
    assert keys == ["bmad:ratelimit:{acme}:tokens", "bmad:ratelimit:{acme}:agent:dev:tokens"]
    assert args == ["charge", 60_000_000, 9000, 500, 1000, 500]


async def test_no_budget_means_no_round_trip() -> None:
    made, script = limiter(requests_per_minute=None, tokens_per_minute=None)
    assert await made.hit(tenant="acme", agent="dev", tokens=10) is None
    await made.charge(tenant="acme", agent="dev", tokens=10)
    assert script.calls == []


@pytest.mark.parametrize("bad", [0, -5, 1.5, True, "60"])
def test_limits_must_be_positive_whole_numbers(bad: Any) -> None:
    with pytest.raises(ValueError, match="requests_per_minute"):
        limiter(requests_per_minute=bad)


def test_tenant_agent_and_tokens_are_checked() -> None:
    made, _ = limiter()
    with pytest.raises(ValueError, match="named"):
        made.budgets(tenant="", agent="dev", requests=1, tokens=0)
    with pytest.raises(ValueError, match="tokens"):
        made.budgets(tenant="acme", agent="dev", requests=1, tokens=-1)


@pytest.mark.parametrize(
    ("seconds", "header"), [(0.0001, "1"), (1.0, "1"), (1.2, "2"), (59.99, "60")]
)
def test_retry_after_is_whole_seconds_at_least_one(seconds: float, header: str) -> None:
    assert ratelimit.retry_after_header(seconds) == header
