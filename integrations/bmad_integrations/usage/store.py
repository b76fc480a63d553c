"""The ledger in the platform PostgreSQL: insert once, aggregate, batch for Stripe.

`insert` writes records with ``ON CONFLICT (namespace, agent, record_id) DO NOTHING``
and, in the same statement, adds exactly the rows it inserted to ``usage_rollup``
(per tenant, agent, month and currency). A record delivered twice — a task replayed
after a SIGKILL, an ingester that died between its commit and its XACK — is a
conflict the second time and changes nothing, rollup included.

Stripe reporting takes rows in two steps: `reserve` assigns unreported rows to
batches (one per tenant and time bucket, persisted before anything is sent, so a
retry resends the same batch with the same identifiers), and `mark_reported` closes a
batch once Stripe accepted all its meter events.

SQL is parameterised only; no value is ever formatted into a statement.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import secrets
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from bmad_integrations import lazy
from bmad_integrations.usage import migrations, periods, prices, record

if TYPE_CHECKING:
    import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
else:  # imported when first used: only where PostgreSQL is configured
    asyncpg = lazy.module("asyncpg")

BatchState = Literal["pending", "reported", "unbilled", "failed", "stale"]
ERROR_MAX_CHARS = 2_000


@dataclass(frozen=True)
class LedgerRow:
    """A record as the ledger keeps it: with its cost (None when unpriced)."""

    record: record.UsageRecord
    cost: prices.Cost | None


@dataclass(frozen=True)
class Rejected:
    """A stream entry that was refused: kept for audit, never billed."""

    stream: str
    entry_id: str
    reason: str
    message: str
    fields: Mapping[str, str]


@dataclass(frozen=True)
class Totals:
    records: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    cost: Mapping[str, decimal.Decimal] = field(default_factory=dict)
    unpriced: int = 0

    @property
    def tokens(self) -> int:
        return self.tokens_in + self.tokens_out

    def plus(self, other: Totals) -> Totals:
        cost = dict(self.cost)
        for currency, amount in other.cost.items():
            cost[currency] = cost.get(currency, decimal.Decimal(0)) + amount
        return Totals(
            records=self.records + other.records,
            tokens_in=self.tokens_in + other.tokens_in,
            tokens_out=self.tokens_out + other.tokens_out,
            cost=cost,
            unpriced=self.unpriced + other.unpriced,
        )


@dataclass(frozen=True)
class PeriodUsage:
    """This period's and last period's totals of one tenant or agent."""

    period_start: dt.datetime
    this_period: Totals
    last_period: Totals


class ModelKey(NamedTuple):
    """Whose usage of which model (`LedgerStore.model_usage`)."""

    tenant: str
    namespace: str
    agent: str
    provider: str
    model: str


@dataclass(frozen=True)
class Batch:
    batch_id: str
    tenant: str
    customer_id: str | None
    state: BatchState
    records: int
    tokens_in: int
    tokens_out: int
    costs: Mapping[str, decimal.Decimal]
    bucket_start: dt.datetime
    event_time: dt.datetime
    created_at: dt.datetime
    attempts: int = 0
    last_error: str | None = None


_INSERT = """
WITH incoming AS (
    SELECT * FROM unnest(
        $1::text[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[],
        $7::bigint[], $8::bigint[], $9::numeric[], $10::text[], $11::numeric[],
        $12::numeric[], $13::text[], $14::text[], $15::timestamptz[]
    ) AS t(namespace, agent, record_id, tenant, provider, model, tokens_in, tokens_out,
           cost, currency, input_per_1m, output_per_1m, conversation, source, occurred_at)
), inserted AS (
    INSERT INTO usage_ledger (namespace, agent, record_id, tenant, provider, model,
        tokens_in, tokens_out, cost, currency, input_per_1m, output_per_1m, conversation,
        source, occurred_at)
    SELECT * FROM incoming
    ON CONFLICT (namespace, agent, record_id) DO NOTHING
    RETURNING tenant, namespace, agent, provider, model, occurred_at, tokens_in, tokens_out,
        cost, currency
), sums AS (
    SELECT tenant, namespace, agent,
           date_trunc('month', occurred_at, 'UTC') AS period_start,
           COALESCE(currency, '') AS currency,
           count(*) AS records, sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out,
           COALESCE(sum(cost), 0) AS cost
    FROM inserted
    GROUP BY 1, 2, 3, 4, 5
), rolled AS (
    INSERT INTO usage_rollup AS r (tenant, namespace, agent, period_start, currency,
        records, tokens_in, tokens_out, cost)
    SELECT * FROM sums
    ON CONFLICT (tenant, namespace, agent, period_start, currency) DO UPDATE
    SET records = r.records + EXCLUDED.records,
        tokens_in = r.tokens_in + EXCLUDED.tokens_in,
        tokens_out = r.tokens_out + EXCLUDED.tokens_out,
        cost = r.cost + EXCLUDED.cost
    RETURNING 1
), model_sums AS (
    SELECT tenant, namespace, agent, provider, model,
           date_trunc('month', occurred_at, 'UTC') AS period_start,
           COALESCE(currency, '') AS currency,
           count(*) AS records, sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out,
           COALESCE(sum(cost), 0) AS cost
    FROM inserted
    GROUP BY 1, 2, 3, 4, 5, 6, 7
), model_rolled AS (
    INSERT INTO usage_model_rollup AS r (tenant, namespace, agent, provider, model,
        period_start, currency, records, tokens_in, tokens_out, cost)
    SELECT * FROM model_sums
    ON CONFLICT (tenant, namespace, agent, provider, model, period_start, currency)
    DO UPDATE
    SET records = r.records + EXCLUDED.records,
        tokens_in = r.tokens_in + EXCLUDED.tokens_in,
        tokens_out = r.tokens_out + EXCLUDED.tokens_out,
        cost = r.cost + EXCLUDED.cost
    RETURNING 1
)
SELECT COALESCE(sum(records), 0)::bigint FROM sums
"""

_REJECT = """
INSERT INTO usage_rejected (stream, entry_id, reason, message, fields)
SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::jsonb[])
ON CONFLICT (stream, entry_id) DO NOTHING
"""

_TENANT_TOTALS = """
SELECT tenant, period_start, currency, sum(records)::bigint AS records,
       sum(tokens_in)::bigint AS tokens_in, sum(tokens_out)::bigint AS tokens_out,
       sum(cost) AS cost
FROM usage_rollup
WHERE period_start = ANY($1::timestamptz[]) AND ($2::text IS NULL OR tenant = $2)
GROUP BY tenant, period_start, currency
"""

_AGENT_TOTALS = """
SELECT namespace, agent, period_start, currency, sum(records)::bigint AS records,
       sum(tokens_in)::bigint AS tokens_in, sum(tokens_out)::bigint AS tokens_out,
       sum(cost) AS cost
FROM usage_rollup
WHERE period_start = ANY($1::timestamptz[]) AND ($2::text IS NULL OR namespace = $2)
GROUP BY namespace, agent, period_start, currency
"""

_MODEL_TOTALS = """
SELECT tenant, namespace, agent, provider, model, period_start, currency, records,
       tokens_in, tokens_out, cost
FROM usage_model_rollup
WHERE period_start = ANY($1::timestamptz[])
"""

_UNREPORTED = """
SELECT namespace, agent, record_id, occurred_at, tokens_in, tokens_out, cost, currency
FROM usage_ledger
WHERE tenant = $1 AND batch_id IS NULL
ORDER BY occurred_at
LIMIT $2
FOR UPDATE SKIP LOCKED
"""

_NEW_BATCH = """
INSERT INTO meter_batches (batch_id, tenant, customer_id, state, records, tokens_in,
    tokens_out, costs, bucket_start, event_time, reported_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8::jsonb, $9, $10,
        CASE WHEN $4 = 'unbilled' THEN now() END)
RETURNING created_at
"""

_ASSIGN = """
UPDATE usage_ledger AS l SET batch_id = $1
FROM unnest($2::text[], $3::text[], $4::text[]) AS k(namespace, agent, record_id)
WHERE l.namespace = k.namespace AND l.agent = k.agent AND l.record_id = k.record_id
  AND l.batch_id IS NULL
"""

_BATCH_COLUMNS = """batch_id, tenant, customer_id, state, records, tokens_in, tokens_out,
    costs::text AS costs, bucket_start, event_time, created_at, attempts, last_error"""

_PENDING = f"""
SELECT {_BATCH_COLUMNS} FROM meter_batches
WHERE state = 'pending' AND ($1::text IS NULL OR tenant = $1)
ORDER BY created_at, batch_id
"""  # noqa: S608 - a constant column list, no value

_GET_BATCH = f"SELECT {_BATCH_COLUMNS} FROM meter_batches WHERE batch_id = $1"  # noqa: S608

_MARK_REPORTED = """
UPDATE meter_batches SET state = 'reported', reported_at = $2, attempts = attempts + 1,
    last_error = NULL
WHERE batch_id = $1 AND state = 'pending'
"""

_MARK_ATTEMPT = """
UPDATE meter_batches SET attempts = attempts + 1, last_error = $2,
    state = CASE WHEN $3::text IS NULL THEN state ELSE $3::text END
WHERE batch_id = $1 AND state = 'pending'
"""

_UNREPORTED_COUNT = """
SELECT tenant, count(*)::bigint AS records FROM usage_ledger WHERE batch_id IS NULL
GROUP BY tenant
"""


def _money(value: Any) -> decimal.Decimal:
    return value if isinstance(value, decimal.Decimal) else decimal.Decimal(str(value))


def _totals_from(rows: Iterable[Any]) -> Totals:
    total = Totals()
    for row in rows:
        currency = row["currency"]
        total = total.plus(
            Totals(
                records=int(row["records"]),
                tokens_in=int(row["tokens_in"]),
                tokens_out=int(row["tokens_out"]),
                cost={currency: _money(row["cost"])} if currency else {},
                unpriced=0 if currency else int(row["records"]),
            )
        )
    return total


def _period_usage(rows: Sequence[Any], now: dt.datetime) -> PeriodUsage:
    this = periods.containing(now)
    return PeriodUsage(
        period_start=this.start,
        this_period=_totals_from(r for r in rows if r["period_start"] == this.start),
        last_period=_totals_from(r for r in rows if r["period_start"] != this.start),
    )


def _batch(row: Any) -> Batch:
    costs = {k: decimal.Decimal(v) for k, v in json.loads(row["costs"]).items()}
    return Batch(
        batch_id=row["batch_id"],
        tenant=row["tenant"],
        customer_id=row["customer_id"],
        state=row["state"],
        records=int(row["records"]),
        tokens_in=int(row["tokens_in"]),
        tokens_out=int(row["tokens_out"]),
        costs=costs,
        bucket_start=row["bucket_start"],
        event_time=row["event_time"],
        created_at=row["created_at"],
        attempts=int(row["attempts"]),
        last_error=row["last_error"],
    )


def bucket_of(when: dt.datetime, bucket_seconds: int) -> dt.datetime:
    """The start of the time bucket (UTC, aligned to the epoch) that holds ``when``."""
    seconds = int(when.timestamp()) // bucket_seconds * bucket_seconds
    return dt.datetime.fromtimestamp(seconds, dt.UTC)


def new_batch_id() -> str:
    return "mb_" + secrets.token_hex(12)


class LedgerStore:
    """The ledger over an asyncpg pool (owned when built by `connect`)."""

    def __init__(self, pool: Any, *, owns_pool: bool = False) -> None:
        self.pool = pool
        self._owns_pool = owns_pool

    @classmethod
    async def connect(
        cls,
        dsn: str,
        *,
        tls: ssl.SSLContext | None = None,
        min_size: int = 1,
        max_size: int = 5,
    ) -> LedgerStore:
        """Open a pool, bring the schema up to date, return the store."""
        options: dict[str, Any] = {} if tls is None else {"ssl": tls}
        pool = await asyncpg.create_pool(
            dsn, min_size=min_size, max_size=max_size, command_timeout=60, **options
        )
        try:
            await migrations.apply(pool)
        except BaseException:
            await pool.close()
            raise
        return cls(pool, owns_pool=True)

    async def close(self) -> None:
        if self._owns_pool:
            await self.pool.close()

    # -- writing ---------------------------------------------------------------------

    async def insert(self, rows: Sequence[LedgerRow], rejected: Sequence[Rejected] = ()) -> int:
        """Insert rows once (and keep rejected entries), in one transaction.

        Returns how many rows were new; rows already in the ledger are left alone.
        """
        unique: dict[tuple[str, str, str], LedgerRow] = {}
        for row in rows:
            rec = row.record
            unique.setdefault((rec.namespace, rec.agent, rec.record_id), row)
        items = list(unique.values())
        async with self.pool.acquire() as conn, conn.transaction():
            inserted = 0
            if items:
                inserted = int(
                    await conn.fetchval(
                        _INSERT,
                        [r.record.namespace for r in items],
                        [r.record.agent for r in items],
                        [r.record.record_id for r in items],
                        [r.record.tenant for r in items],
                        [r.record.provider for r in items],
                        [r.record.model for r in items],
                        [r.record.tokens_in for r in items],
                        [r.record.tokens_out for r in items],
                        [r.cost.amount if r.cost else None for r in items],
                        [r.cost.price.currency if r.cost else None for r in items],
                        [r.cost.price.input_per_1m if r.cost else None for r in items],
                        [r.cost.price.output_per_1m if r.cost else None for r in items],
                        [r.record.conversation for r in items],
                        [r.record.source for r in items],
                        [r.record.occurred_at for r in items],
                    )
                )
            if rejected:
                await conn.execute(
                    _REJECT,
                    [r.stream for r in rejected],
                    [r.entry_id for r in rejected],
                    [r.reason for r in rejected],
                    [r.message[:ERROR_MAX_CHARS] for r in rejected],
                    [json.dumps(dict(r.fields), sort_keys=True) for r in rejected],
                )
        return inserted

    # -- aggregation -----------------------------------------------------------------

    async def tenant_usage(
        self, now: dt.datetime, *, tenant: str | None = None
    ) -> dict[str, PeriodUsage]:
        """This and last month's totals per tenant (only tenants with usage)."""
        this = periods.containing(now)
        last = periods.previous(this)
        rows = await self.pool.fetch(_TENANT_TOTALS, [this.start, last.start], tenant)
        by_tenant: dict[str, list[Any]] = {}
        for row in rows:
            by_tenant.setdefault(row["tenant"], []).append(row)
        return {name: _period_usage(items, now) for name, items in by_tenant.items()}

    async def agent_usage(
        self, now: dt.datetime, *, namespace: str | None = None
    ) -> dict[tuple[str, str], PeriodUsage]:
        """This and last month's totals per (namespace, agent) with usage."""
        this = periods.containing(now)
        last = periods.previous(this)
        rows = await self.pool.fetch(_AGENT_TOTALS, [this.start, last.start], namespace)
        by_agent: dict[tuple[str, str], list[Any]] = {}
        for row in rows:
            by_agent.setdefault((row["namespace"], row["agent"]), []).append(row)
        return {key: _period_usage(items, now) for key, items in by_agent.items()}

    async def model_usage(self, now: dt.datetime) -> dict[ModelKey, PeriodUsage]:
        """This and last month's totals per (tenant, namespace, agent, provider, model)
        with usage: what the metrics of cost by model show."""
        this = periods.containing(now)
        last = periods.previous(this)
        rows = await self.pool.fetch(_MODEL_TOTALS, [this.start, last.start])
        by_model: dict[ModelKey, list[Any]] = {}
        for row in rows:
            key = ModelKey(
                row["tenant"], row["namespace"], row["agent"], row["provider"], row["model"]
            )
            by_model.setdefault(key, []).append(row)
        return {key: _period_usage(items, now) for key, items in by_model.items()}

    async def unreported(self) -> dict[str, int]:
        """Rows not yet in any batch, per tenant."""
        rows = await self.pool.fetch(_UNREPORTED_COUNT)
        return {row["tenant"]: int(row["records"]) for row in rows}

    # -- Stripe batches --------------------------------------------------------------

    async def reserve(
        self,
        tenant: str,
        *,
        customer_id: str | None,
        bucket_seconds: int = 3600,
        limit: int = 10_000,
    ) -> list[Batch]:
        """Put up to ``limit`` unreported rows of a tenant into new batches.

        One batch per time bucket of ``occurred_at``; its event time is the latest
        record's. With ``customer_id`` None (the tenant is not billed) the batches are
        ``unbilled`` and closed at once: metered, never reported.
        """
        if bucket_seconds < 1:
            raise ValueError("bucket_seconds must be positive")
        state: BatchState = "pending" if customer_id else "unbilled"
        made: list[Batch] = []
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(_UNREPORTED, tenant, limit)
            buckets: dict[dt.datetime, list[Any]] = {}
            for row in rows:
                buckets.setdefault(bucket_of(row["occurred_at"], bucket_seconds), []).append(row)
            for start, members in sorted(buckets.items()):
                costs: dict[str, decimal.Decimal] = {}
                for row in members:
                    if row["currency"]:
                        costs[row["currency"]] = costs.get(
                            row["currency"], decimal.Decimal(0)
                        ) + _money(row["cost"])
                batch_id = new_batch_id()
                tokens_in = sum(int(r["tokens_in"]) for r in members)
                tokens_out = sum(int(r["tokens_out"]) for r in members)
                event_time = max(r["occurred_at"] for r in members)
                created_at = await conn.fetchval(
                    _NEW_BATCH,
                    batch_id,
                    tenant,
                    customer_id,
                    state,
                    len(members),
                    tokens_in,
                    tokens_out,
                    json.dumps({k: str(v) for k, v in costs.items()}, sort_keys=True),
                    start,
                    event_time,
                )
                await conn.execute(
                    _ASSIGN,
                    batch_id,
                    [r["namespace"] for r in members],
                    [r["agent"] for r in members],
                    [r["record_id"] for r in members],
                )
                made.append(
                    Batch(
                        batch_id=batch_id,
                        tenant=tenant,
                        customer_id=customer_id,
                        state=state,
                        records=len(members),
                        tokens_in=tokens_in,
                        tokens_out=tokens_out,
                        costs=costs,
                        bucket_start=start,
                        event_time=event_time,
                        created_at=created_at,
                    )
                )
        return made

    async def pending(self, *, tenant: str | None = None) -> list[Batch]:
        """Batches reserved but not yet accepted by Stripe (oldest first)."""
        return [_batch(r) for r in await self.pool.fetch(_PENDING, tenant)]

    async def batch(self, batch_id: str) -> Batch | None:
        row = await self.pool.fetchrow(_GET_BATCH, batch_id)
        return None if row is None else _batch(row)

    async def mark_reported(self, batch_id: str, *, at: dt.datetime) -> bool:
        """Stripe accepted every meter event of the batch. False if it was not pending."""
        status = await self.pool.execute(_MARK_REPORTED, batch_id, at)
        return bool(status.endswith(" 1"))

    async def mark_attempt(
        self, batch_id: str, *, error: str, state: BatchState | None = None
    ) -> None:
        """A failed attempt: keep the error; ``state`` 'failed' or 'stale' closes it."""
        await self.pool.execute(_MARK_ATTEMPT, batch_id, error[:ERROR_MAX_CHARS], state)
