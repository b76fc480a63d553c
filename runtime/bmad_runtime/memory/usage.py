"""The usage ledger: one row per model call, read back per tenant and month.

Every answer's tokens are a ``usage_records`` row (tenant, agent, conversation,
model, provider, tokens in and out, latency). Months are UTC calendar months.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from bmad_runtime import ports
from bmad_runtime.memory import scope

_INSERT_USAGE = """
INSERT INTO usage_records
    (tenant, agent, conversation, model, provider, tokens_in, tokens_out, latency_ms,
     created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8, COALESCE($9, now()))
"""

_TENANT_TOKENS = """
SELECT COALESCE(SUM(tokens_in::bigint + tokens_out::bigint), 0)
FROM usage_records
WHERE tenant = $1 AND created_at >= $2 AND created_at < $3
"""

_AGENT_TOKENS = """
SELECT COALESCE(SUM(tokens_in::bigint + tokens_out::bigint), 0)
FROM usage_records
WHERE tenant = $1 AND agent = $2 AND created_at >= $3 AND created_at < $4
"""

_MONTHLY_USAGE = """
SELECT agent, model, provider, count(*) AS requests,
       COALESCE(SUM(tokens_in::bigint), 0) AS tokens_in,
       COALESCE(SUM(tokens_out::bigint), 0) AS tokens_out
FROM usage_records
WHERE tenant = $1 AND created_at >= $2 AND created_at < $3
GROUP BY agent, model, provider
ORDER BY agent, model, provider
"""


def month_bounds(when: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The first instant of ``when``'s calendar month (UTC) and of the next one."""
    at = scope.utc(when).astimezone(dt.UTC)
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        end = start.replace(year=start.year + 1, month=1)
    else:
        end = start.replace(month=start.month + 1)
    return start, end


class UsageLedger:
    """The ``usage_records`` table, over an asyncpg pool."""

    def __init__(self, *, pool: Any) -> None:
        self.pool = pool

    async def record(self, record: ports.UsageRecord, *, at: dt.datetime | None = None) -> None:
        """One model call's usage (``at`` defaults to the database's now())."""
        scope.check_owner(record.tenant, record.agent)
        await self.pool.execute(
            _INSERT_USAGE,
            record.tenant,
            record.agent,
            record.conversation_id,
            record.model,
            record.provider,
            record.tokens_in,
            record.tokens_out,
            record.latency_ms,
            None if at is None else scope.utc(at),
        )

    async def tokens_this_month(
        self, tenant: str, *, agent: str | None = None, now: dt.datetime | None = None
    ) -> int:
        """Tokens in plus out of the tenant (or one of its agents) this UTC month."""
        scope.check_owner(tenant, agent)
        start, end = month_bounds(now or dt.datetime.now(dt.UTC))
        if agent is None:
            total = await self.pool.fetchval(_TENANT_TOKENS, tenant, start, end)
        else:
            total = await self.pool.fetchval(_AGENT_TOKENS, tenant, agent, start, end)
        return int(total)

    async def monthly(self, tenant: str, *, now: dt.datetime | None = None) -> list[dict[str, Any]]:
        """This UTC month's usage per agent, model and provider.

        Each is ``{"agent", "model", "provider", "requests", "tokens_in", "tokens_out"}``.
        """
        scope.check_owner(tenant)
        start, end = month_bounds(now or dt.datetime.now(dt.UTC))
        rows = await self.pool.fetch(_MONTHLY_USAGE, tenant, start, end)
        return [
            {
                "agent": r["agent"],
                "model": r["model"],
                "provider": r["provider"],
                "requests": int(r["requests"]),
                "tokens_in": int(r["tokens_in"]),
                "tokens_out": int(r["tokens_out"]),
            }
            for r in rows
        ]
