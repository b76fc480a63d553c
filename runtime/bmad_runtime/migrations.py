"""The runtime's PostgreSQL schema, brought up to date when a replica starts.

Every agent replica runs `apply` before it serves: the migrations below are ordered by
version, each runs in its own transaction together with its row in
``schema_migrations``, and a session-level advisory lock makes replicas that start at
the same moment take turns (the second one finds everything applied and does nothing).
A migration, once released, is never edited: its checksum is recorded, and a database
whose recorded checksum differs from the code's is refused rather than silently
diverging. Add a new `Migration` with the next version instead.

Tables (all keyed by tenant and agent, so that one database may serve many tenants):

* ``conversations`` — one row per conversation; ``last_seq`` numbers its messages,
  ``owner`` is the subject that started it.
* ``messages`` — the full history, ``seq`` 1, 2, … per conversation.
* ``context_versions`` — the system layers an agent ran with, a new version whenever
  they change (``layers_sha256`` makes the comparison cheap).
* ``usage_records`` — one row per model call, indexed for per-tenant monthly sums.
* ``audit_log`` — append-only: a trigger refuses UPDATE, DELETE and TRUNCATE.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

# pg_advisory_lock takes one bigint: a fixed number that means "bmad runtime schema".
# (The ASCII of "bmadmigr"; any constant works as long as nothing else uses it.)
LOCK_KEY = 0x626D61646D696772


class MigrationError(RuntimeError):
    """The schema cannot be brought up to date (lock timeout, an edited migration)."""


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


_INITIAL = """
CREATE TABLE conversations (
    tenant      text        NOT NULL,
    agent       text        NOT NULL,
    id          text        NOT NULL,
    title       text,
    last_seq    bigint      NOT NULL DEFAULT 0,
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, agent, id)
);
CREATE INDEX conversations_by_update ON conversations (tenant, agent, updated_at DESC);

CREATE TABLE messages (
    tenant        text        NOT NULL,
    agent         text        NOT NULL,
    conversation  text        NOT NULL,
    seq           bigint      NOT NULL,
    role          text        NOT NULL CHECK (role IN ('system', 'user', 'assistant')),
    content       text        NOT NULL,
    model         text,
    created_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant, agent, conversation, seq),
    FOREIGN KEY (tenant, agent, conversation)
        REFERENCES conversations (tenant, agent, id) ON DELETE CASCADE
);

CREATE TABLE context_versions (
    id             bigserial   PRIMARY KEY,
    tenant         text        NOT NULL,
    agent          text        NOT NULL,
    conversation   text,
    version        integer     NOT NULL,
    layers         jsonb       NOT NULL,
    layers_sha256  text        NOT NULL,
    created_at     timestamptz NOT NULL DEFAULT now()
);
CREATE UNIQUE INDEX context_versions_unique
    ON context_versions (tenant, agent, COALESCE(conversation, ''), version);

CREATE TABLE usage_records (
    id            bigserial   PRIMARY KEY,
    tenant        text        NOT NULL,
    agent         text        NOT NULL,
    conversation  text,
    model         text        NOT NULL,
    provider      text        NOT NULL,
    tokens_in     integer     NOT NULL CHECK (tokens_in >= 0),
    tokens_out    integer     NOT NULL CHECK (tokens_out >= 0),
    latency_ms    integer     NOT NULL CHECK (latency_ms >= 0),
    created_at    timestamptz NOT NULL DEFAULT now()
);
-- A month's sum for a tenant (or one agent of it) is an index range scan; INCLUDE lets
-- PostgreSQL answer it from the index alone.
CREATE INDEX usage_records_tenant_time
    ON usage_records (tenant, created_at) INCLUDE (tokens_in, tokens_out);
CREATE INDEX usage_records_tenant_agent_time
    ON usage_records (tenant, agent, created_at) INCLUDE (tokens_in, tokens_out);

CREATE TABLE audit_log (
    id       bigserial   PRIMARY KEY,
    at       timestamptz NOT NULL DEFAULT now(),
    tenant   text        NOT NULL,
    agent    text        NOT NULL,
    subject  text        NOT NULL,
    action   text        NOT NULL,
    detail   jsonb       NOT NULL DEFAULT '{}'::jsonb
);
CREATE INDEX audit_log_tenant_at ON audit_log (tenant, at);

CREATE FUNCTION audit_log_append_only() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'audit_log is append-only: % is not allowed', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
CREATE TRIGGER audit_log_no_update_delete
    BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION audit_log_append_only();
CREATE TRIGGER audit_log_no_truncate
    BEFORE TRUNCATE ON audit_log
    FOR EACH STATEMENT EXECUTE FUNCTION audit_log_append_only();
"""

# Conversations belong to the subject (the token's ``sub``) that started them. Rows
# from before have no owner: only a caller allowed every subject's conversations
# reaches them.
_CONVERSATION_OWNERS = """
ALTER TABLE conversations ADD COLUMN owner text;
CREATE INDEX conversations_by_owner ON conversations (tenant, agent, owner, updated_at DESC);
"""

MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "initial schema", _INITIAL),
    Migration(2, "conversation owners", _CONVERSATION_OWNERS),
)

_CREATE_LEDGER = """
CREATE TABLE IF NOT EXISTS schema_migrations (
    version     integer     PRIMARY KEY,
    name        text        NOT NULL,
    checksum    text        NOT NULL,
    applied_at  timestamptz NOT NULL DEFAULT now()
)
"""


def _check_order(migrations: tuple[Migration, ...]) -> None:
    versions = [m.version for m in migrations]
    if versions != sorted(set(versions)) or (versions and versions[0] < 1):
        raise MigrationError(f"migration versions must be unique and ascending: {versions}")


async def _lock(conn: Any, *, wait: float) -> None:
    # Poll pg_try_advisory_lock rather than wait in pg_advisory_lock with a client-side
    # timeout: cancelling a waiting pg_advisory_lock can race with its success and leave
    # the lock held by a connection that goes back to the pool.
    deadline = time.monotonic() + wait
    delay = 0.05
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1)", LOCK_KEY):
        if time.monotonic() >= deadline:
            raise MigrationError(
                f"another process has held the schema migration lock (advisory lock "
                f"{LOCK_KEY}) for more than {wait:g}s: is a replica stuck migrating?"
            )
        await asyncio.sleep(delay)
        delay = min(delay * 2, 1.0)


async def applied(conn: Any) -> dict[int, str]:
    """The versions recorded in ``schema_migrations`` and their checksums."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    if not exists:
        return {}
    rows = await conn.fetch("SELECT version, checksum FROM schema_migrations ORDER BY version")
    return {int(r["version"]): str(r["checksum"]) for r in rows}


async def apply(
    pool_or_conn: Any,
    *,
    migrations: tuple[Migration, ...] = MIGRATIONS,
    lock_timeout: float = 120.0,
) -> list[int]:
    """Apply every migration not yet applied; return the versions this call applied.

    Takes an asyncpg pool (one connection is used for the whole run) or a connection.
    """
    _check_order(migrations)
    if hasattr(pool_or_conn, "acquire"):
        async with pool_or_conn.acquire() as conn:
            return await _apply(conn, migrations, lock_timeout)
    return await _apply(pool_or_conn, migrations, lock_timeout)


async def _apply(conn: Any, migrations: tuple[Migration, ...], lock_timeout: float) -> list[int]:
    await _lock(conn, wait=lock_timeout)
    try:
        await conn.execute(_CREATE_LEDGER)
        done = await applied(conn)
        for version, checksum in done.items():
            known = next((m for m in migrations if m.version == version), None)
            if known is not None and known.checksum != checksum:
                raise MigrationError(
                    f"migration {version} ({known.name}) was applied with checksum "
                    f"{checksum[:12]}… but the code now has {known.checksum[:12]}…: released "
                    "migrations must not change; add a new migration instead"
                )
        newly: list[int] = []
        for migration in migrations:
            if migration.version in done:
                continue
            async with conn.transaction():
                await conn.execute(migration.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            logger.info("applied schema migration %d (%s)", migration.version, migration.name)
            newly.append(migration.version)
        return newly
    finally:
        await conn.fetchval("SELECT pg_advisory_unlock($1)", LOCK_KEY)
