"""Conversation memory: hot recent turns in Redis, everything durable in PostgreSQL.

`PostgresRedisStore` is the real `ports.ConversationStore`. Each `append` commits the
turn to PostgreSQL first (``messages``, numbered by ``conversations.last_seq`` under
the conversation's row lock, so ``seq`` order is commit order), then pushes it onto a
Redis list ``bmad:{tenant}:{agent}:conv:{id}:turns`` trimmed to ``recent_turns`` whose
TTL every write refreshes.

The Redis list always holds a contiguous run of turns ending at the newest one it has
seen: a Lua script pushes a turn only when it directly follows the list's last one
(each entry carries its ``seq``). A gap — the key expired, Redis was flushed or
restarted, another replica's push failed — makes the writer rebuild the list from
PostgreSQL, and a rebuild never replaces a list that is already further along. So
`recent` can trust the list when it holds ``limit`` turns or starts at the first turn,
and otherwise reads PostgreSQL (and re-warms Redis). Any replica, any process, sees
the same conversation; losing Redis loses nothing.

Everything is scoped by tenant and agent: a conversation of another tenant (or of
another agent of the same tenant) does not exist as far as a caller can tell — reads
return nothing and deletes return False, the HTTP layer's 404.

SQL is parameterised only (``$1``, ``$2``…); no value is ever formatted into a
statement, which a unit test checks on this module's source.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import re
import ssl
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import redis.asyncio as aioredis
import redis.exceptions

from bmad_runtime import bindings, context, migrations, ports

logger = logging.getLogger(__name__)

TITLE_LENGTH = 80
MAX_CONVERSATION_ID = 256
MAX_RECENT_TURNS = 1000
PING_TIMEOUT = 2.0

# Tenants and agents are Kubernetes object names; refusing ':' keeps Redis keys
# unambiguous (the conversation id comes last and may hold anything printable).
_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Push one turn if it directly follows the list's last one. 1: pushed or already
# there; 0: there is a gap (the list is missing earlier turns) and must be rebuilt.
_APPEND_LUA = """
local last = redis.call('LINDEX', KEYS[1], -1)
local last_seq = 0
if last then last_seq = tonumber(cjson.decode(last)['seq']) end
local seq = tonumber(ARGV[1])
if seq <= last_seq then
  redis.call('EXPIRE', KEYS[1], ARGV[4])
  return 1
end
if seq ~= last_seq + 1 then
  return 0
end
redis.call('RPUSH', KEYS[1], ARGV[2])
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[3]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[4])
return 1
"""

# Replace the list with turns read from PostgreSQL (ending at seq ARGV[1]) unless the
# list already reaches that far (a concurrent push or rebuild got there first).
_REBUILD_LUA = """
local last = redis.call('LINDEX', KEYS[1], -1)
if last and tonumber(cjson.decode(last)['seq']) >= tonumber(ARGV[1]) then
  redis.call('EXPIRE', KEYS[1], ARGV[2])
  return 0
end
redis.call('DEL', KEYS[1])
if #ARGV > 2 then
  redis.call('RPUSH', KEYS[1], unpack(ARGV, 3))
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
return 1
"""

_UPSERT_CONVERSATION = """
INSERT INTO conversations AS c (tenant, agent, id, title, last_seq, created_at, updated_at)
VALUES ($1, $2, $3, $4, 1, $5, $5)
ON CONFLICT (tenant, agent, id) DO UPDATE
SET last_seq = c.last_seq + 1,
    updated_at = GREATEST(c.updated_at, EXCLUDED.updated_at),
    title = COALESCE(c.title, EXCLUDED.title)
RETURNING last_seq
"""

_INSERT_MESSAGE = """
INSERT INTO messages (tenant, agent, conversation, seq, role, content, model, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""

_LATEST_MESSAGES = """
SELECT seq, role, content, model, created_at
FROM messages
WHERE tenant = $1 AND agent = $2 AND conversation = $3
ORDER BY seq DESC
LIMIT $4
"""

_LIST_CONVERSATIONS = """
SELECT id, title, last_seq, created_at, updated_at
FROM conversations
WHERE tenant = $1 AND agent = $2
ORDER BY updated_at DESC, id
LIMIT $3
"""

_GET_CONVERSATION = """
SELECT id, title, last_seq, created_at, updated_at
FROM conversations
WHERE tenant = $1 AND agent = $2 AND id = $3
"""

_DELETE_CONVERSATION = """
DELETE FROM conversations WHERE tenant = $1 AND agent = $2 AND id = $3 RETURNING id
"""

_DELETE_CONVERSATION_CONTEXT = """
DELETE FROM context_versions WHERE tenant = $1 AND agent = $2 AND conversation = $3
"""

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

_INSERT_AUDIT = """
INSERT INTO audit_log (tenant, agent, subject, action, detail)
VALUES ($1, $2, $3, $4, $5::jsonb)
RETURNING id
"""

_AUDIT_ENTRIES = """
SELECT id, at, tenant, agent, subject, action, detail::text AS detail
FROM audit_log
WHERE tenant = $1 AND ($2::text IS NULL OR agent = $2)
ORDER BY id DESC
LIMIT $3
"""

_VERSION_LOCK = "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))"

_LATEST_CONTEXT_VERSION = """
SELECT version, layers_sha256
FROM context_versions
WHERE tenant = $1 AND agent = $2 AND COALESCE(conversation, '') = $3
ORDER BY version DESC
LIMIT 1
"""

_INSERT_CONTEXT_VERSION = """
INSERT INTO context_versions (tenant, agent, conversation, version, layers, layers_sha256)
VALUES ($1, $2, $3, $4, $5::jsonb, $6)
"""

_GET_CONTEXT_VERSION = """
SELECT version, layers::text AS layers, layers_sha256, created_at
FROM context_versions
WHERE tenant = $1 AND agent = $2 AND COALESCE(conversation, '') = $3
  AND ($4::integer IS NULL OR version = $4)
ORDER BY version DESC
LIMIT 1
"""


def turns_key(conversation_id: str, *, tenant: str, agent: str) -> str:
    """The Redis list of a conversation's recent turns."""
    return "bmad:" + ":".join((tenant, agent, "conv", conversation_id, "turns"))


def check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(
            f"{what} {value!r} is not a valid name: use letters, digits, '.', '_' and '-' "
            "(starting and ending with a letter or digit, at most 253 characters)"
        )
    return value


def valid_conversation_id(value: str) -> bool:
    return (
        isinstance(value, str)
        and 0 < len(value) <= MAX_CONVERSATION_ID
        and not _CONTROL.search(value)
    )


def check_conversation_id(value: str) -> str:
    if not valid_conversation_id(value):
        raise ValueError(
            f"conversation id {value!r} is not valid: 1 to {MAX_CONVERSATION_ID} characters, "
            "no control characters"
        )
    return value


def postgres_ssl_context(settings: bindings.PostgresSettings) -> ssl.SSLContext | None:
    """A TLS context for a binding with its own CA, libpq's way; None leaves the DSN's
    ``sslmode`` in charge (asyncpg understands it, but cannot take a CA from it)."""
    if not settings.ca_cert or settings.ssl_mode in ("disable", "allow", "prefer"):
        return None
    tls = ssl.create_default_context(cadata=settings.ca_cert)
    # libpq: with a root certificate, "require" verifies the chain as verify-ca does;
    # only verify-full also checks the host name.
    tls.check_hostname = settings.ssl_mode == "verify-full"
    return tls


def _utc(when: dt.datetime) -> dt.datetime:
    # A naive datetime is taken to be UTC (what the runtime produces everywhere).
    return when.replace(tzinfo=dt.UTC) if when.tzinfo is None else when


def month_bounds(when: dt.datetime) -> tuple[dt.datetime, dt.datetime]:
    """The first instant of ``when``'s calendar month (UTC) and of the next one."""
    at = _utc(when).astimezone(dt.UTC)
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    if start.month == 12:
        end = start.replace(year=start.year + 1, month=1)
    else:
        end = start.replace(month=start.month + 1)
    return start, end


def _title(turn: ports.Turn) -> str | None:
    if turn.role != "user":
        return None
    first = turn.content.strip().splitlines()[0] if turn.content.strip() else ""
    if not first:
        return None
    return first if len(first) <= TITLE_LENGTH else first[: TITLE_LENGTH - 1] + "…"


def _encode(seq: int, turn: ports.Turn) -> str:
    return json.dumps(
        {
            "seq": seq,
            "role": turn.role,
            "content": turn.content,
            "model": turn.model,
            "created_at": _utc(turn.created_at).isoformat(),
        },
        separators=(",", ":"),
    )


def _decode(raw: str | bytes, conversation_id: str) -> tuple[int, ports.Turn]:
    data = json.loads(raw)
    turn = ports.Turn(
        conversation_id=conversation_id,
        role=data["role"],
        content=data["content"],
        created_at=dt.datetime.fromisoformat(data["created_at"]),
        model=data.get("model"),
    )
    return int(data["seq"]), turn


def _row_turn(row: Any, conversation_id: str) -> ports.Turn:
    return ports.Turn(
        conversation_id=conversation_id,
        role=row["role"],
        content=row["content"],
        created_at=row["created_at"],
        model=row["model"],
    )


def _conversation(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "title": row["title"],
        "turns": int(row["last_seq"]),
        "created_at": row["created_at"].isoformat(),
        "updated_at": row["updated_at"].isoformat(),
    }


class PostgresRedisStore:
    """`ports.ConversationStore` over an asyncpg pool and a redis.asyncio client.

    Build it with `connect` (which owns and later closes both clients and applies the
    schema migrations), or hand in clients the app already has (then `close` leaves
    them open; run `migrations.apply` yourself).
    """

    def __init__(
        self,
        *,
        pool: Any,
        redis_client: aioredis.Redis,
        recent_turns: int = 20,
        ttl_seconds: int = 86400,
        owns_clients: bool = False,
    ) -> None:
        if not 1 <= recent_turns <= MAX_RECENT_TURNS:
            raise ValueError(f"recent_turns must be 1..{MAX_RECENT_TURNS}, not {recent_turns}")
        if ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be positive, not {ttl_seconds}")
        self.pool = pool
        self.redis = redis_client
        self.recent_turns = recent_turns
        self.ttl_seconds = ttl_seconds
        self._owns_clients = owns_clients
        self._append_script = redis_client.register_script(_APPEND_LUA)
        self._rebuild_script = redis_client.register_script(_REBUILD_LUA)

    @classmethod
    async def connect(
        cls,
        *,
        postgres_dsn: str,
        redis_url: str,
        recent_turns: int = 20,
        ttl_seconds: int = 86400,
        pool_min_size: int = 1,
        pool_max_size: int = 10,
        migration_lock_timeout: float = 120.0,
        postgres_ssl: ssl.SSLContext | None = None,
        redis_ca_cert: str | None = None,
    ) -> PostgresRedisStore:
        """Open a pool and a Redis client, bring the schema up to date, return the store.

        ``postgres_ssl`` overrides the DSN's ``sslmode`` (needed for a private CA);
        ``redis_ca_cert`` is a PEM bundle for a ``rediss://`` URL.
        """
        pool_options: dict[str, Any] = {}
        if postgres_ssl is not None:
            pool_options["ssl"] = postgres_ssl
        pool = await asyncpg.create_pool(
            postgres_dsn,
            min_size=pool_min_size,
            max_size=pool_max_size,
            command_timeout=60,
            **pool_options,
        )
        client: aioredis.Redis | None = None
        try:
            await migrations.apply(pool, lock_timeout=migration_lock_timeout)
            redis_options: dict[str, Any] = {}
            if redis_ca_cert:
                redis_options["ssl_ca_data"] = redis_ca_cert
            client = aioredis.Redis.from_url(
                redis_url,
                decode_responses=True,
                socket_timeout=10,
                socket_connect_timeout=5,
                health_check_interval=30,
                **redis_options,
            )
            return cls(
                pool=pool,
                redis_client=client,
                recent_turns=recent_turns,
                ttl_seconds=ttl_seconds,
                owns_clients=True,
            )
        except BaseException:
            if client is not None:
                await client.aclose()
            await pool.close()
            raise

    @classmethod
    async def from_settings(
        cls,
        postgres: bindings.PostgresSettings,
        redis_settings: bindings.RedisSettings,
        *,
        recent_turns: int = 20,
        ttl_seconds: int = 86400,
    ) -> PostgresRedisStore:
        """`connect` with the settings of the postgres and redis bindings (CA included)."""
        return await cls.connect(
            postgres_dsn=postgres.dsn,
            redis_url=redis_settings.url,
            recent_turns=recent_turns,
            ttl_seconds=ttl_seconds,
            postgres_ssl=postgres_ssl_context(postgres),
            redis_ca_cert=redis_settings.ca_cert if redis_settings.tls else None,
        )

    async def close(self) -> None:
        if not self._owns_clients:
            return
        try:
            await self.redis.aclose()
        finally:
            await self.pool.close()

    # -- conversations -------------------------------------------------------------

    async def append(self, turn: ports.Turn, *, tenant: str, agent: str) -> None:
        """Store one turn durably, then push it onto the conversation's recent list.

        A Redis failure after the commit is logged, not raised: the turn is safe in
        PostgreSQL and `recent` finds it there.
        """
        check_name(tenant, "tenant")
        check_name(agent, "agent")
        conversation_id = check_conversation_id(turn.conversation_id)
        created_at = _utc(turn.created_at)
        async with self.pool.acquire() as conn, conn.transaction():
            seq = await conn.fetchval(
                _UPSERT_CONVERSATION, tenant, agent, conversation_id, _title(turn), created_at
            )
            await conn.execute(
                _INSERT_MESSAGE,
                tenant,
                agent,
                conversation_id,
                seq,
                turn.role,
                turn.content,
                turn.model,
                created_at,
            )
        key = turns_key(conversation_id, tenant=tenant, agent=agent)
        try:
            pushed = await self._append_script(
                keys=[key],
                args=[seq, _encode(seq, turn), self.recent_turns, self.ttl_seconds],
            )
            if not pushed:
                await self._rebuild(conversation_id, tenant=tenant, agent=agent)
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning(
                "turn %d of conversation %r stored in PostgreSQL but not in Redis (%s)",
                seq,
                conversation_id,
                exc,
            )
            await self._forget(key)

    async def _forget(self, key: str) -> None:
        # A list that missed a turn must not be served: without it, readers go to
        # PostgreSQL (and rebuild). If Redis cannot even delete, it cannot serve either.
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.redis.delete(key)

    async def _latest_rows(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int
    ) -> list[tuple[int, ports.Turn]]:
        rows = await self.pool.fetch(_LATEST_MESSAGES, tenant, agent, conversation_id, limit)
        return [(int(r["seq"]), _row_turn(r, conversation_id)) for r in reversed(rows)]

    async def _rebuild(
        self,
        conversation_id: str,
        *,
        tenant: str,
        agent: str,
        rows: Sequence[tuple[int, ports.Turn]] | None = None,
    ) -> None:
        if rows is None:
            rows = await self._latest_rows(
                conversation_id, tenant=tenant, agent=agent, limit=self.recent_turns
            )
        rows = list(rows)[-self.recent_turns :]
        if not rows:
            return
        await self._rebuild_script(
            keys=[turns_key(conversation_id, tenant=tenant, agent=agent)],
            args=[rows[-1][0], self.ttl_seconds, *(_encode(s, t) for s, t in rows)],
        )

    async def recent(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int
    ) -> list[ports.Turn]:
        """The last ``limit`` turns, oldest first: from Redis when it has them all."""
        check_name(tenant, "tenant")
        check_name(agent, "agent")
        if limit <= 0 or not valid_conversation_id(conversation_id):
            return []
        key = turns_key(conversation_id, tenant=tenant, agent=agent)
        try:
            raw = await self.redis.lrange(key, -limit, -1)
            cached = sorted(
                (_decode(item, conversation_id) for item in raw), key=lambda pair: pair[0]
            )
        except (redis.exceptions.RedisError, OSError, ValueError, KeyError) as exc:
            logger.warning("recent turns of %r not read from Redis (%s)", conversation_id, exc)
            cached = []
        if cached and (len(cached) >= limit or cached[0][0] == 1):
            return [turn for _, turn in cached[-limit:]]

        rows = await self._latest_rows(
            conversation_id, tenant=tenant, agent=agent, limit=max(limit, self.recent_turns)
        )
        if rows:
            try:
                await self._rebuild(conversation_id, tenant=tenant, agent=agent, rows=rows)
            except (redis.exceptions.RedisError, OSError) as exc:
                logger.warning("recent turns of %r not re-warmed (%s)", conversation_id, exc)
        return [turn for _, turn in rows[-limit:]]

    async def history(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int = 100
    ) -> list[ports.Turn]:
        """The latest ``limit`` turns from PostgreSQL, oldest first."""
        check_name(tenant, "tenant")
        check_name(agent, "agent")
        if limit <= 0 or not valid_conversation_id(conversation_id):
            return []
        rows = await self._latest_rows(conversation_id, tenant=tenant, agent=agent, limit=limit)
        return [turn for _, turn in rows]

    async def list_conversations(
        self, *, tenant: str, agent: str, limit: int = 50
    ) -> list[dict[str, Any]]:
        """The agent's conversations for this tenant, most recently updated first.

        Each is ``{"id", "title", "turns", "created_at", "updated_at"}`` (times in ISO
        8601 with offset, ``title`` the start of the first user message or None).
        """
        check_name(tenant, "tenant")
        check_name(agent, "agent")
        if limit <= 0:
            return []
        rows = await self.pool.fetch(_LIST_CONVERSATIONS, tenant, agent, limit)
        return [_conversation(r) for r in rows]

    async def get_conversation(
        self, conversation_id: str, *, tenant: str, agent: str
    ) -> dict[str, Any] | None:
        """One conversation as `list_conversations` shows it, or None (404)."""
        check_name(tenant, "tenant")
        check_name(agent, "agent")
        if not valid_conversation_id(conversation_id):
            return None
        row = await self.pool.fetchrow(_GET_CONVERSATION, tenant, agent, conversation_id)
        return None if row is None else _conversation(row)

    async def delete_conversation(self, conversation_id: str, *, tenant: str, agent: str) -> bool:
        """Delete a conversation, its messages, its context versions and its hot turns.

        False when this tenant's agent has no such conversation. Usage records and the
        audit log keep their rows (billing and accountability outlive a conversation).
        """
        check_name(tenant, "tenant")
        check_name(agent, "agent")
        if not valid_conversation_id(conversation_id):
            return False
        key = turns_key(conversation_id, tenant=tenant, agent=agent)
        await self.redis.delete(key)  # raises while Redis is down: nothing half-deleted
        async with self.pool.acquire() as conn, conn.transaction():
            deleted = await conn.fetchval(_DELETE_CONVERSATION, tenant, agent, conversation_id)
            if deleted is not None:
                await conn.execute(_DELETE_CONVERSATION_CONTEXT, tenant, agent, conversation_id)
        # Again after the commit: an append racing with the delete may have pushed.
        await self._forget(key)
        return deleted is not None

    # -- usage ---------------------------------------------------------------------

    async def record_usage(
        self, record: ports.UsageRecord, *, at: dt.datetime | None = None
    ) -> None:
        """One model call's usage (``at`` defaults to the database's now())."""
        check_name(record.tenant, "tenant")
        check_name(record.agent, "agent")
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
            None if at is None else _utc(at),
        )

    async def tokens_this_month(
        self, tenant: str, *, agent: str | None = None, now: dt.datetime | None = None
    ) -> int:
        """Tokens in plus out of the tenant (or one of its agents) this UTC month."""
        check_name(tenant, "tenant")
        start, end = month_bounds(now or dt.datetime.now(dt.UTC))
        if agent is None:
            total = await self.pool.fetchval(_TENANT_TOKENS, tenant, start, end)
        else:
            check_name(agent, "agent")
            total = await self.pool.fetchval(_AGENT_TOKENS, tenant, agent, start, end)
        return int(total)

    async def monthly_usage(
        self, tenant: str, *, now: dt.datetime | None = None
    ) -> list[dict[str, Any]]:
        """This UTC month's usage per agent, model and provider.

        Each is ``{"agent", "model", "provider", "requests", "tokens_in", "tokens_out"}``.
        """
        check_name(tenant, "tenant")
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

    # -- audit ---------------------------------------------------------------------

    async def audit(
        self, *, tenant: str, agent: str, subject: str, action: str, detail: dict[str, Any]
    ) -> None:
        """Append one entry to the audit log (which refuses UPDATE and DELETE)."""
        await self.audit_entry(
            tenant=tenant, agent=agent, subject=subject, action=action, detail=detail
        )

    async def audit_entry(
        self, *, tenant: str, agent: str, subject: str, action: str, detail: dict[str, Any]
    ) -> int:
        """`audit`, returning the new entry's id."""
        check_name(tenant, "tenant")
        check_name(agent, "agent")
        payload = json.dumps(detail, default=str, sort_keys=True)
        entry_id = await self.pool.fetchval(_INSERT_AUDIT, tenant, agent, subject, action, payload)
        return int(entry_id)

    async def audit_entries(
        self, tenant: str, *, agent: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The tenant's latest audit entries, newest first."""
        check_name(tenant, "tenant")
        if agent is not None:
            check_name(agent, "agent")
        rows = await self.pool.fetch(_AUDIT_ENTRIES, tenant, agent, limit)
        return [
            {
                "id": int(r["id"]),
                "at": r["at"].isoformat(),
                "tenant": r["tenant"],
                "agent": r["agent"],
                "subject": r["subject"],
                "action": r["action"],
                "detail": json.loads(r["detail"]),
            }
            for r in rows
        ]

    # -- context versions ----------------------------------------------------------

    async def save_context_version(
        self,
        *,
        tenant: str,
        agent: str,
        conversation_id: str | None,
        layers: dict[str, Any],
        digest: str,
    ) -> context.SavedVersion:
        """A new ``context_versions`` row unless the latest one has the same digest."""
        check_name(tenant, "tenant")
        check_name(agent, "agent")
        if conversation_id is not None:
            check_conversation_id(conversation_id)
        scope = conversation_id or ""
        async with self.pool.acquire() as conn, conn.transaction():
            # Serialise writers of the same (tenant, agent, conversation): two replicas
            # noticing the same change at once must not both take the next number.
            await conn.execute(_VERSION_LOCK, "\x1f".join((tenant, agent, scope)))
            latest = await conn.fetchrow(_LATEST_CONTEXT_VERSION, tenant, agent, scope)
            if latest is not None and latest["layers_sha256"] == digest:
                return context.SavedVersion(int(latest["version"]), created=False)
            version = 1 if latest is None else int(latest["version"]) + 1
            await conn.execute(
                _INSERT_CONTEXT_VERSION,
                tenant,
                agent,
                conversation_id,
                version,
                json.dumps(layers, sort_keys=True),
                digest,
            )
        return context.SavedVersion(version, created=True)

    async def context_version(
        self,
        *,
        tenant: str,
        agent: str,
        conversation_id: str | None = None,
        version: int | None = None,
    ) -> dict[str, Any] | None:
        """One context version (the latest when ``version`` is None), or None."""
        check_name(tenant, "tenant")
        check_name(agent, "agent")
        scope = conversation_id or ""
        row = await self.pool.fetchrow(_GET_CONTEXT_VERSION, tenant, agent, scope, version)
        if row is None:
            return None
        return {
            "version": int(row["version"]),
            "layers": json.loads(row["layers"]),
            "sha256": row["layers_sha256"],
            "created_at": row["created_at"].isoformat(),
        }

    # -- health --------------------------------------------------------------------

    async def ping(self) -> bool:
        """True when both PostgreSQL and Redis answer within `PING_TIMEOUT` seconds."""

        async def postgres() -> bool:
            return bool(await self.pool.fetchval("SELECT 1") == 1)

        async def hot() -> bool:
            return bool(await self.redis.ping())

        results = await asyncio.gather(
            asyncio.wait_for(postgres(), PING_TIMEOUT),
            asyncio.wait_for(hot(), PING_TIMEOUT),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                logger.warning("store ping failed: %s: %s", type(result).__name__, result)
        return all(result is True for result in results)


if TYPE_CHECKING:
    # mypy proves the store satisfies both protocols it is used through.
    def _as_port(store: PostgresRedisStore) -> ports.ConversationStore:
        return store

    def _as_version_store(store: PostgresRedisStore) -> context.VersionStore:
        return store
