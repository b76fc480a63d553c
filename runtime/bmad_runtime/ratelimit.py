"""Rate limits per agent and per tenant, decided in Redis for all replicas at once.

An Agent's ``spec.limits`` (requests and tokens per minute) and its Tenant's budgets
hold for the Agent as a whole, however many replicas serve it; so no replica decides
on its own. Each request runs one Lua script in Redis that checks every budget that
applies (tenant requests, tenant tokens, agent requests, agent tokens) and either
admits the request and charges all of them, or refuses and charges none: the script
is the only place a decision is made, and Redis runs scripts one at a time.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket written as one
timestamp per budget). A budget of ``L`` per minute is a bucket of ``L`` units that
refills one unit every ``60 s / L``; its whole state is the "theoretical arrival
time" (TAT): when the bucket would be full again. A cost of ``c`` units is admitted
when ``max(TAT, now) + c * 60 s / L - now <= 60 s``, and then moves TAT forward by
``c * 60 s / L``; a refusal says how long until that holds. So a full bucket admits
a burst of exactly ``L``, and after that one unit per ``60 s / L``. The clock is
Redis's own (``TIME`` inside the script): replicas whose clocks disagree still agree
on every decision. A request costs one unit of each request budget and ``tokens``
units of each token budget; a cost larger than a whole budget is admitted only on a
full bucket and leaves the bucket in debt, so the next requests wait it out.

Tokens are usually known only after the model answered: `RedisLimiter.charge` books
them then, without counting a request and without refusing (they are spent
already), and the next requests wait while the token budget is in debt.

All keys of one tenant share the Redis Cluster hash tag ``{<tenant>}``, so the script
may touch them together on a cluster too. Redis 5 or later is needed (scripts that
read ``TIME`` before writing). A Redis error propagates: the app decides whether a
missing Redis means "admit" or "refuse".
"""

from __future__ import annotations

import math
from typing import Final, NamedTuple

import redis.asyncio as aioredis

WINDOW_SECONDS: Final = 60
"""Budgets are per minute: a full bucket holds one minute's worth."""

# KEYS: one per budget. ARGV: mode ("hit" or "charge"), the window in microseconds,
# then a limit (units per window) and a cost (units now) per key, in KEYS order.
# Returns {0, 0} when admitted, else {microseconds to wait, 1-based index of the
# budget that needs the longest wait}. TATs are microseconds of Redis time, written
# with %.17g so that they read back as the same double; ``slack`` absorbs the
# rounding of adding fractional intervals (a microsecond-scale error, far below a
# millisecond, on budgets refilled in seconds).
_SCRIPT: Final = """
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000000 + tonumber(time[2])
local charge = ARGV[1] == 'charge'
local window = tonumber(ARGV[2])
local slack = 1000
local worst, worst_index = 0, 0
local tats = {}
for i, key in ipairs(KEYS) do
  local limit = tonumber(ARGV[1 + 2 * i])
  local cost = tonumber(ARGV[2 + 2 * i])
  local interval = window / limit
  local tat = tonumber(redis.call('GET', key) or '0') or 0
  if tat < now then tat = now end
  local over = tat + math.min(cost, limit) * interval - now - window
  if over > slack and over > worst then
    worst, worst_index = over, i
  end
  tats[i] = tat + cost * interval
end
if worst_index > 0 and not charge then
  return {math.ceil(worst), worst_index}
end
for i, key in ipairs(KEYS) do
  local ttl = math.ceil((tats[i] - now) / 1000) + 1
  if ttl > 1 then
    redis.call('SET', key, string.format('%.17g', tats[i]), 'PX', ttl)
  end
end
return {0, 0}
"""


class Budget(NamedTuple):
    """One budget the script checks: what it is called, its key, limit and cost now."""

    name: str
    key: str
    limit: int
    cost: int


class Decision(NamedTuple):
    """A request admitted (``retry_after`` None) or refused, and by which budget."""

    retry_after: float | None
    limited_by: str | None = None


def retry_after_header(seconds: float) -> str:
    """The ``Retry-After`` value (whole seconds, at least 1) for a refusal's wait."""
    return str(max(1, math.ceil(seconds)))


def _limit(name: str, value: int | None) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive whole number or None, not {value!r}")
    return value


class RedisLimiter:
    """`ports.Limiter` over one Redis shared by every replica of every agent.

    ``None`` for a limit means no such budget; the tenant budgets are shared by every
    agent of the tenant, the agent budgets by the replicas of one agent.
    """

    def __init__(
        self,
        redis: aioredis.Redis,
        *,
        requests_per_minute: int | None,
        tokens_per_minute: int | None,
        tenant_requests_per_minute: int | None = None,
        tenant_tokens_per_minute: int | None = None,
        key_prefix: str = "bmad",
    ) -> None:
        self.redis = redis
        self.requests_per_minute = _limit("requests_per_minute", requests_per_minute)
        self.tokens_per_minute = _limit("tokens_per_minute", tokens_per_minute)
        self.tenant_requests_per_minute = _limit(
            "tenant_requests_per_minute", tenant_requests_per_minute
        )
        self.tenant_tokens_per_minute = _limit("tenant_tokens_per_minute", tenant_tokens_per_minute)
        self.key_prefix = key_prefix
        self._script = redis.register_script(_SCRIPT)

    def budgets(self, *, tenant: str, agent: str, requests: int, tokens: int) -> list[Budget]:
        """The budgets that apply to this tenant and agent, with what this call costs."""
        if not tenant or not agent:
            raise ValueError("tenant and agent must be named")
        if tokens < 0:
            raise ValueError(f"tokens must be >= 0, not {tokens}")
        base = f"{self.key_prefix}:ratelimit:{{{tenant}}}"
        wanted = [
            ("tenant requests", f"{base}:requests", self.tenant_requests_per_minute, requests),
            ("tenant tokens", f"{base}:tokens", self.tenant_tokens_per_minute, tokens),
            (
                "agent requests",
                f"{base}:agent:{agent}:requests",
                self.requests_per_minute,
                requests,
            ),
            ("agent tokens", f"{base}:agent:{agent}:tokens", self.tokens_per_minute, tokens),
        ]
        return [
            Budget(name=name, key=key, limit=limit, cost=cost)
            for name, key, limit, cost in wanted
            if limit is not None
        ]

    async def decide(self, *, tenant: str, agent: str, tokens: int = 0) -> Decision:
        """Admit one request costing ``tokens`` (charging every budget) or refuse it."""
        budgets = self.budgets(tenant=tenant, agent=agent, requests=1, tokens=tokens)
        wait_us, index = await self._run("hit", budgets)
        if wait_us <= 0:
            return Decision(retry_after=None)
        return Decision(retry_after=wait_us / 1_000_000, limited_by=budgets[index - 1].name)

    async def hit(self, *, tenant: str, agent: str, tokens: int = 0) -> float | None:
        """Count one request (and tokens); None when allowed, else seconds to wait."""
        return (await self.decide(tenant=tenant, agent=agent, tokens=tokens)).retry_after

    async def charge(self, *, tenant: str, agent: str, tokens: int) -> None:
        """Book tokens already spent (a model's usage): never refused, may leave a debt."""
        budgets = self.budgets(tenant=tenant, agent=agent, requests=0, tokens=tokens)
        await self._run("charge", [b for b in budgets if b.name.endswith("tokens")])

    async def _run(self, mode: str, budgets: list[Budget]) -> tuple[int, int]:
        if not budgets:
            return 0, 0
        args: list[str | int] = [mode, WINDOW_SECONDS * 1_000_000]
        for budget in budgets:
            args += [budget.limit, budget.cost]
        reply = await self._script(keys=[b.key for b in budgets], args=args)
        wait_us, index = reply
        return int(wait_us), int(index)
