"""The ledger store against the test bed's real PostgreSQL."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
from decimal import Decimal
from typing import Any

import asyncpg  # type: ignore[import-untyped]
import pytest

from bmad_integrations.usage import migrations, prices, record, store

pytestmark = pytest.mark.integration

NOW = dt.datetime(2026, 3, 1, 0, 0, 0, 500_000, tzinfo=dt.UTC)  # just into March
TABLE = prices.parse(
    {
        "currency": "USD",
        "prices": [
            {"provider": "openai", "model": "gpt-4o", "inputPer1M": "2.5", "outputPer1M": "10"},
            {
                "provider": "anthropic",
                "model": "claude-*",
                "inputPer1M": "3",
                "outputPer1M": "15",
                "currency": "EUR",
            },
        ],
    }
)


def row(
    n: int,
    *,
    tenant: str = "acme",
    namespace: str = "acme-dev",
    agent: str = "analyst",
    at: dt.datetime = NOW,
    provider: str = "openai",
    model: str = "gpt-4o",
    tokens_in: int = 100,
    tokens_out: int = 10,
) -> store.LedgerRow:
    rec = record.UsageRecord(
        record_id=record.task_record_id(f"t{n}"),
        tenant=tenant,
        namespace=namespace,
        agent=agent,
        provider=provider,
        model=model,
        tokens_in=tokens_in,
        tokens_out=tokens_out,
        occurred_at=at,
        source="task",
    )
    return store.LedgerRow(
        rec,
        prices.apply(
            TABLE, provider=provider, model=model, tokens_in=tokens_in, tokens_out=tokens_out
        ),
    )


async def ledger_sums(
    ledger: store.LedgerStore,
) -> dict[tuple[Any, ...], tuple[int, int, int, Decimal]]:
    rows = await ledger.pool.fetch(
        """SELECT tenant, namespace, agent, date_trunc('month', occurred_at, 'UTC') AS p,
                  COALESCE(currency, '') AS c, count(*) AS n, sum(tokens_in) AS i,
                  sum(tokens_out) AS o, COALESCE(sum(cost), 0) AS cost
           FROM usage_ledger GROUP BY 1, 2, 3, 4, 5"""
    )
    return {
        (r["tenant"], r["namespace"], r["agent"], r["p"], r["c"]): (
            int(r["n"]),
            int(r["i"]),
            int(r["o"]),
            r["cost"],
        )
        for r in rows
    }


async def rollup_sums(
    ledger: store.LedgerStore,
) -> dict[tuple[Any, ...], tuple[int, int, int, Decimal]]:
    rows = await ledger.pool.fetch("SELECT * FROM usage_rollup")
    return {
        (r["tenant"], r["namespace"], r["agent"], r["period_start"], r["currency"]): (
            int(r["records"]),
            int(r["tokens_in"]),
            int(r["tokens_out"]),
            r["cost"],
        )
        for r in rows
    }


KEY = ("tenant", "namespace", "agent", "provider", "model")


async def model_sums(
    ledger: store.LedgerStore, table: str
) -> dict[tuple[Any, ...], tuple[int, int, int, Decimal]]:
    """Sums per tenant, agent, provider, model, month and currency: of the ledger's rows
    (``usage_ledger``), or as the model rollup keeps them (``usage_model_rollup``)."""
    if table == "usage_ledger":
        query = """SELECT tenant, namespace, agent, provider, model,
                          date_trunc('month', occurred_at, 'UTC') AS period_start,
                          COALESCE(currency, '') AS currency, count(*) AS records,
                          sum(tokens_in) AS tokens_in, sum(tokens_out) AS tokens_out,
                          COALESCE(sum(cost), 0) AS cost
                   FROM usage_ledger GROUP BY 1, 2, 3, 4, 5, 6, 7"""
    else:
        query = "SELECT * FROM usage_model_rollup"
    rows = await ledger.pool.fetch(query)
    return {
        (*(r[k] for k in KEY), r["period_start"], r["currency"]): (
            int(r["records"]),
            int(r["tokens_in"]),
            int(r["tokens_out"]),
            r["cost"],
        )
        for r in rows
    }


async def test_migrations_apply_once_and_refuse_an_edited_one(ledger_dsn: str) -> None:
    pool = await asyncpg.create_pool(ledger_dsn, min_size=1, max_size=4)
    try:
        results = await asyncio.gather(*(migrations.apply(pool) for _ in range(3)))
        # One applied them all, two found them done.
        assert sorted(map(tuple, results)) == [(), (), (1, 2)]
        edited = (dataclasses.replace(migrations.MIGRATIONS[0], sql="SELECT 1"),)
        with pytest.raises(migrations.MigrationError, match="add a new migration"):
            await migrations.apply(pool, edited)
    finally:
        await pool.close()


async def test_a_record_is_inserted_once_and_counted_once(ledger: store.LedgerStore) -> None:
    rows = [row(n) for n in range(50)]
    assert await ledger.insert(rows) == 50
    assert await ledger.insert(rows) == 0
    assert await ledger.insert([*rows[:10], row(50), row(50)]) == 1
    assert await ledger.pool.fetchval("SELECT count(*) FROM usage_ledger") == 51
    assert await rollup_sums(ledger) == await ledger_sums(ledger)
    assert await model_sums(ledger, "usage_model_rollup") == await model_sums(
        ledger, "usage_ledger"
    )


async def test_the_same_id_in_two_agents_is_two_records(ledger: store.LedgerStore) -> None:
    assert (
        await ledger.insert([row(1, agent="a"), row(1, agent="b"), row(1, namespace="other")]) == 3
    )


async def test_concurrent_overlapping_inserts_keep_each_record_once(
    ledger: store.LedgerStore,
) -> None:
    # Ten writers (ingester replicas, replays) insert overlapping windows of 300 records.
    windows = [[row(n, agent=f"a{n % 3}") for n in range(k * 20, k * 20 + 120)] for k in range(10)]
    inserted = await asyncio.gather(*(ledger.insert(w) for w in windows))
    distinct = {
        (r.record.namespace, r.record.agent, r.record.record_id) for w in windows for r in w
    }
    assert sum(inserted) == len(distinct) == 300
    assert await ledger.pool.fetchval("SELECT count(*) FROM usage_ledger") == 300
    assert await rollup_sums(ledger) == await ledger_sums(ledger)
    assert await model_sums(ledger, "usage_model_rollup") == await model_sums(
        ledger, "usage_ledger"
    )


async def test_usage_per_tenant_and_agent_this_and_last_month(ledger: store.LedgerStore) -> None:
    feb_last_instant = dt.datetime(2026, 2, 28, 23, 59, 59, 999_999, tzinfo=dt.UTC)
    january = dt.datetime(2026, 1, 31, 12, tzinfo=dt.UTC)
    await ledger.insert(
        [
            row(1, at=NOW),  # March
            row(
                2,
                at=NOW,
                agent="dev",
                provider="anthropic",
                model="claude-sonnet-4",
                tokens_in=1000,
                tokens_out=1000,
            ),
            row(3, at=NOW, model="unpriced-model"),
            row(4, at=feb_last_instant, tokens_in=1_000_000, tokens_out=0),  # February
            row(5, at=january),  # neither
            row(6, at=NOW, tenant="globex", namespace="globex"),
        ]
    )
    tenants = await ledger.tenant_usage(NOW)
    acme = tenants["acme"]
    assert acme.period_start == dt.datetime(2026, 3, 1, tzinfo=dt.UTC)
    assert (acme.this_period.records, acme.this_period.tokens_in, acme.this_period.tokens_out) == (
        3,
        1200,
        1020,
    )
    assert acme.this_period.cost == {"USD": Decimal("0.00035"), "EUR": Decimal("0.018")}
    assert acme.this_period.unpriced == 1
    assert (acme.last_period.records, acme.last_period.tokens) == (1, 1_000_000)
    assert acme.last_period.cost == {"USD": Decimal("2.5")}
    assert set(tenants) == {"acme", "globex"}
    assert (await ledger.tenant_usage(NOW, tenant="globex")).keys() == {"globex"}

    agents = await ledger.agent_usage(NOW, namespace="acme-dev")
    assert set(agents) == {("acme-dev", "analyst"), ("acme-dev", "dev")}
    assert agents[("acme-dev", "dev")].this_period.tokens == 2000
    assert agents[("acme-dev", "analyst")].last_period.tokens == 1_000_000

    by_model = await ledger.model_usage(NOW)
    acme_models = {k: v for k, v in by_model.items() if k.tenant == "acme"}
    assert set(acme_models) == {
        store.ModelKey("acme", "acme-dev", "analyst", "openai", "gpt-4o"),
        store.ModelKey("acme", "acme-dev", "dev", "anthropic", "claude-sonnet-4"),
        store.ModelKey("acme", "acme-dev", "analyst", "openai", "unpriced-model"),
    }
    gpt = acme_models[store.ModelKey("acme", "acme-dev", "analyst", "openai", "gpt-4o")]
    assert (gpt.this_period.records, gpt.this_period.tokens) == (1, 110)
    assert gpt.this_period.cost == {"USD": Decimal("0.00035")}
    assert gpt.last_period.tokens == 1_000_000
    claude = acme_models[store.ModelKey("acme", "acme-dev", "dev", "anthropic", "claude-sonnet-4")]
    assert claude.this_period.cost == {"EUR": Decimal("0.018")}
    unpriced = acme_models[
        store.ModelKey("acme", "acme-dev", "analyst", "openai", "unpriced-model")
    ]
    assert (unpriced.this_period.unpriced, unpriced.this_period.cost) == (1, {})
    # A month later, March is "last" and nothing is "this".
    april = await ledger.tenant_usage(dt.datetime(2026, 4, 2, tzinfo=dt.UTC))
    assert april["acme"].this_period == store.Totals()
    assert april["acme"].last_period.records == 3


async def test_unreported_rows_go_into_one_batch_each(ledger: store.LedgerStore) -> None:
    hour = dt.timedelta(hours=1)
    await ledger.insert(
        [row(n, at=NOW + (n % 3) * hour) for n in range(30)]
        + [row(n, tenant="globex", namespace="globex") for n in range(5)]
    )
    assert await ledger.unreported() == {"acme": 30, "globex": 5}
    # Two reporters at once: each row lands in exactly one batch.
    first, second = await asyncio.gather(
        ledger.reserve("acme", customer_id="cus_A", limit=20),
        ledger.reserve("acme", customer_id="cus_A", limit=20),
    )
    batches = first + second
    assert sum(b.records for b in batches) == 30
    assert sum(b.tokens_in for b in batches) == 3000
    assert await ledger.pool.fetchval(
        "SELECT count(DISTINCT batch_id) FROM usage_ledger WHERE tenant = 'acme'"
    ) == len(batches)
    assert {b.bucket_start for b in batches} == {
        NOW.replace(microsecond=0),
        *(NOW.replace(microsecond=0) + k * hour for k in (1, 2)),
    }
    for b in batches:
        assert b.event_time >= b.bucket_start
        assert b.costs["USD"] == Decimal("0.00035") * b.records
    assert await ledger.reserve("acme", customer_id="cus_A") == []
    assert await ledger.unreported() == {"globex": 5}

    pending = await ledger.pending(tenant="acme")
    assert {b.batch_id for b in pending} == {b.batch_id for b in batches}
    assert await ledger.mark_reported(pending[0].batch_id, at=NOW)
    assert not await ledger.mark_reported(pending[0].batch_id, at=NOW)  # once
    await ledger.mark_attempt(pending[1].batch_id, error="Stripe is unavailable (503)")
    after = {b.batch_id: b for b in await ledger.pending(tenant="acme")}
    assert pending[0].batch_id not in after
    assert after[pending[1].batch_id].attempts == 1
    assert after[pending[1].batch_id].last_error == "Stripe is unavailable (503)"

    unbilled = await ledger.reserve("globex", customer_id=None)
    assert [(b.state, b.records, b.customer_id) for b in unbilled] == [("unbilled", 5, None)]
    assert await ledger.pending(tenant="globex") == []
    assert await ledger.unreported() == {}


async def test_rejected_entries_are_kept_once(ledger: store.LedgerStore) -> None:
    bad = store.Rejected("bmad:usage:ns:a", "1-0", "WrongStream", "claimed ns/b", {"v": "1"})
    assert await ledger.insert([], [bad, bad]) == 0
    await ledger.insert([], [bad])
    rows = await ledger.pool.fetch("SELECT reason, fields::text AS f FROM usage_rejected")
    assert [(r["reason"], r["f"]) for r in rows] == [("WrongStream", '{"v": "1"}')]
