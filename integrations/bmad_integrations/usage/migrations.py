"""The ledger's schema in the platform PostgreSQL, brought up to date at start.

Migrations are ordered by version; each runs in one transaction with its row in
``bmad_ledger_migrations``, under a transaction-level advisory lock so two operator
replicas starting together take turns. A released migration is never edited: its
checksum is recorded and a database whose checksum differs is refused.

Tables:
* ``usage_ledger`` — one row per model call, keyed by (namespace, agent, record id);
  ``batch_id`` is set once the row is in a Stripe meter batch (or marked unbilled).
* ``usage_rollup`` — per tenant, agent, calendar month (UTC) and currency: the sums of
  the ledger rows, kept in the same statement that inserts them, so status
  aggregation reads a few rows per agent instead of the month's records.
* ``usage_model_rollup`` (migration 2) — the same sums per tenant, agent, provider,
  model, month and currency, for the metrics of cost by model; kept by the same
  statement, and filled from the ledger when the migration runs.
* ``usage_rejected`` — stream entries that did not decode or claimed another agent's
  identity: kept for audit, never billed.
* ``meter_batches`` — what was (or is being) reported to Stripe, with its state.
* ``stripe_webhook_events`` and ``stripe_payment_state`` — the webhook inbox (each
  event id once) and what it says per Stripe customer.
"""

from __future__ import annotations

from typing import Any

from bmad_integrations import schema

# pg_advisory_xact_lock's key for "bmad ledger schema" (ASCII "bmadlgr1").
LOCK_KEY = 0x626D61646C677231
TABLE = "bmad_ledger_migrations"


Migration = schema.Migration
MigrationError = schema.MigrationError


_LEDGER = """
CREATE TABLE meter_batches (
    batch_id      text        PRIMARY KEY,
    tenant        text        NOT NULL,
    customer_id   text,
    state         text        NOT NULL
                  CHECK (state IN ('pending', 'reported', 'unbilled', 'failed', 'stale')),
    records       integer     NOT NULL,
    tokens_in     bigint      NOT NULL,
    tokens_out    bigint      NOT NULL,
    costs         jsonb       NOT NULL DEFAULT '{}'::jsonb,
    bucket_start  timestamptz NOT NULL,
    event_time    timestamptz NOT NULL,
    created_at    timestamptz NOT NULL DEFAULT now(),
    reported_at   timestamptz,
    attempts      integer     NOT NULL DEFAULT 0,
    last_error    text,
    CHECK ((state = 'unbilled') = (customer_id IS NULL))
);
CREATE INDEX meter_batches_pending ON meter_batches (tenant, created_at)
    WHERE state = 'pending';

CREATE TABLE usage_ledger (
    namespace      text        NOT NULL,
    agent          text        NOT NULL,
    record_id      text        NOT NULL,
    tenant         text        NOT NULL,
    provider       text        NOT NULL,
    model          text        NOT NULL,
    tokens_in      bigint      NOT NULL CHECK (tokens_in >= 0),
    tokens_out     bigint      NOT NULL CHECK (tokens_out >= 0),
    cost           numeric(30, 12),
    currency       text,
    input_per_1m   numeric(30, 12),
    output_per_1m  numeric(30, 12),
    conversation   text,
    source         text        NOT NULL CHECK (source IN ('task', 'http')),
    occurred_at    timestamptz NOT NULL,
    ingested_at    timestamptz NOT NULL DEFAULT now(),
    batch_id       text        REFERENCES meter_batches (batch_id),
    PRIMARY KEY (namespace, agent, record_id),
    CHECK ((cost IS NULL) = (currency IS NULL))
);
CREATE INDEX usage_ledger_tenant_time ON usage_ledger (tenant, occurred_at);
CREATE INDEX usage_ledger_unreported ON usage_ledger (tenant, occurred_at)
    WHERE batch_id IS NULL;

CREATE TABLE usage_rollup (
    tenant        text        NOT NULL,
    namespace     text        NOT NULL,
    agent         text        NOT NULL,
    period_start  timestamptz NOT NULL,
    currency      text        NOT NULL,   -- '' for records without a price
    records       bigint      NOT NULL,
    tokens_in     bigint      NOT NULL,
    tokens_out    bigint      NOT NULL,
    cost          numeric(30, 12) NOT NULL,
    PRIMARY KEY (tenant, namespace, agent, period_start, currency)
);
CREATE INDEX usage_rollup_period ON usage_rollup (period_start);

CREATE TABLE usage_rejected (
    stream       text        NOT NULL,
    entry_id     text        NOT NULL,
    reason       text        NOT NULL,
    message      text        NOT NULL,
    fields       jsonb       NOT NULL,
    rejected_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (stream, entry_id)
);

CREATE TABLE stripe_webhook_events (
    event_id     text        PRIMARY KEY,
    type         text        NOT NULL,
    customer_id  text,
    created      timestamptz NOT NULL,
    received_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE stripe_payment_state (
    customer_id             text        PRIMARY KEY,
    failed_since            timestamptz,
    last_failure_at         timestamptz,
    last_paid_at            timestamptz,
    subscription_id         text,
    subscription_status     text,
    subscription_status_at  timestamptz,
    updated_at              timestamptz NOT NULL DEFAULT now()
);
"""

_MODEL_ROLLUP = """
CREATE TABLE usage_model_rollup (
    tenant        text        NOT NULL,
    namespace     text        NOT NULL,
    agent         text        NOT NULL,
    provider      text        NOT NULL,
    model         text        NOT NULL,
    period_start  timestamptz NOT NULL,
    currency      text        NOT NULL,   -- '' for records without a price
    records       bigint      NOT NULL,
    tokens_in     bigint      NOT NULL,
    tokens_out    bigint      NOT NULL,
    cost          numeric(30, 12) NOT NULL,
    PRIMARY KEY (tenant, namespace, agent, provider, model, period_start, currency)
);
CREATE INDEX usage_model_rollup_period ON usage_model_rollup (period_start);

INSERT INTO usage_model_rollup (tenant, namespace, agent, provider, model, period_start,
    currency, records, tokens_in, tokens_out, cost)
SELECT tenant, namespace, agent, provider, model, date_trunc('month', occurred_at, 'UTC'),
       COALESCE(currency, ''), count(*), sum(tokens_in), sum(tokens_out),
       COALESCE(sum(cost), 0)
FROM usage_ledger
GROUP BY 1, 2, 3, 4, 5, 6, 7;
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "usage ledger", _LEDGER),
    Migration(2, "usage rollup by model", _MODEL_ROLLUP),
)

_CREATE_TABLE = f"""
CREATE TABLE IF NOT EXISTS {TABLE} (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""
_LOCK = "SELECT pg_advisory_xact_lock($1)"
_APPLIED = f"SELECT version, checksum FROM {TABLE}"  # noqa: S608
_RECORD = f"INSERT INTO {TABLE} (version, name, checksum) VALUES ($1, $2, $3)"  # noqa: S608


async def apply(pool: Any, migrations: tuple[Migration, ...] = MIGRATIONS) -> list[int]:
    """Apply what is missing; the versions applied now (none when up to date)."""
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)):
        raise MigrationError(f"migration versions must be unique and ascending: {versions}")
    done: list[int] = []
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute(_LOCK, LOCK_KEY)
            await conn.execute(_CREATE_TABLE)
        for migration in migrations:
            async with conn.transaction():
                await conn.execute(_LOCK, LOCK_KEY)
                applied = {int(r["version"]): r["checksum"] for r in await conn.fetch(_APPLIED)}
                recorded = applied.get(migration.version)
                if recorded is not None:
                    if recorded != migration.checksum:
                        raise MigrationError(
                            f"ledger migration {migration.version} ({migration.name}) differs "
                            "from the one applied to this database: add a new migration "
                            "instead of editing a released one"
                        )
                    continue
                await conn.execute(migration.sql)
                await conn.execute(_RECORD, migration.version, migration.name, migration.checksum)
                done.append(migration.version)
    return done
