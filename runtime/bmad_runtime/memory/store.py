"""The durable store: PostgreSQL and Redis clients, and the four parts that use them.

`PostgresRedisStore` is the runtime's `ports.ConversationStore` for the ``durable``
memory mode. It owns the clients (when it opened them with `connect`), brings the
schema up to date, answers the readiness ping, and hands each call to its part:
`conversations`, `usage`, `audits`, `context_versions`, and a turn's whole record
to `turn_records`. Reads beyond the port (a month's usage, the audit entries, one
context version) and context versions (`context_versions`, a `context.VersionStore`)
are on the parts themselves.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import urllib.parse
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import redis.asyncio as aioredis

from bmad_integrations import base as integrations_base
from bmad_integrations import postgres as pg
from bmad_runtime import bindings, migrations, ports
from bmad_runtime.memory import audit, context_versions, conversations, turn_records, usage

logger = logging.getLogger(__name__)

PING_TIMEOUT = 2.0


def postgres_transport(settings: bindings.PostgresSettings) -> pg.Transport:
    """How to reach a bound PostgreSQL: its sslMode with libpq's meaning and its CA
    honoured (`bmad_integrations.postgres.transport`, what the operator's check uses)."""
    return pg.transport(settings.ssl_mode, settings.ca_cert, server_name=settings.host)


def redis_tls_options(settings: bindings.RedisSettings | None) -> dict[str, Any]:
    """redis-py options for a bound Redis with TLS: its CA, the chain and host name checked."""
    if settings is None or not settings.tls:
        return {}
    options: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True}
    if settings.ca_cert:
        options["ssl_ca_data"] = settings.ca_cert
    return options


def _dsn_transport(dsn: str) -> pg.Transport:
    """A DSN given as it is (``BMAD_POSTGRES_DSN``): asyncpg reads its sslmode and
    sslrootcert; verify-ca and verify-full verify, and require with a sslrootcert."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(dsn).query)
    mode = (query.get("sslmode") or ["prefer"])[0]
    verified = mode.startswith("verify") or (mode == "require" and "sslrootcert" in query)
    return pg.Transport(ssl=None, plaintext_fallback=mode in ("allow", "prefer"), verified=verified)


async def _postgres_pool(dsn: str, way: pg.Transport, **options: Any) -> Any:
    """An asyncpg pool over `way`; with a CA under sslMode prefer, plaintext only when
    the server offers no TLS (asyncpg would not verify, or not fall back)."""
    if way.ssl is not None:
        options["ssl"] = way.ssl
    try:
        return await asyncpg.create_pool(dsn, **options)
    except ConnectionError as exc:
        if not (way.plaintext_fallback and way.ssl is not None and pg.refused_tls(exc)):
            raise
    return await asyncpg.create_pool(dsn, **{**options, "ssl": False})


async def keep_session(conn: Any) -> None:
    """How the store's own pool resets a connection it gets back: it sends nothing.

    asyncpg rolls back a transaction left open either way; its default reset sends one
    more statement on every release (advisory locks released, cursors closed, UNLISTEN,
    RESET ALL): a second round trip for each request's one write. Nothing the store
    sends leaves such state behind: no SET, LISTEN or cursor outside a transaction, and
    the one session lock, the schema migrations', is released before `connect` returns
    (when its release fails, `connect` closes the pool, and the lock with it).
    """


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
        self.pool = pool
        self.redis = redis_client
        self.conversations = conversations.Conversations(
            pool, redis_client, recent_turns=recent_turns, ttl_seconds=ttl_seconds
        )
        self.usage = usage.UsageLedger(pool=pool)
        self.audits = audit.AuditLog(pool=pool)
        self.context_versions = context_versions.ContextVersions(pool=pool)
        self.turn_records = turn_records.TurnRecords(self.conversations)
        self._owns_clients = owns_clients
        # How each connection travels, once `connect` has measured it.
        self.transports: dict[str, integrations_base.Transport] = {}

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
        postgres: bindings.PostgresSettings | None = None,
        redis_settings: bindings.RedisSettings | None = None,
    ) -> PostgresRedisStore:
        """Open a pool and a Redis client, bring the schema up to date, return the store.

        With the settings of a binding (``postgres``, ``redis_settings``), its sslMode,
        TLS flag and CA decide how to connect, over the URL's own ``sslmode``; without,
        the URLs alone do. `transports` then says how each connection travels, and a
        connection that is not encrypted is logged as a warning.
        """
        way = postgres_transport(postgres) if postgres else _dsn_transport(postgres_dsn)
        pool = await _postgres_pool(
            postgres_dsn,
            way,
            min_size=pool_min_size,
            max_size=pool_max_size,
            command_timeout=60,
            reset=keep_session,
        )
        client: aioredis.Redis | None = None
        try:
            await migrations.apply(pool, lock_timeout=migration_lock_timeout)
            encrypted = await pg.is_encrypted(pool)
            client = aioredis.Redis.from_url(
                redis_url,
                decode_responses=True,
                socket_timeout=10,
                socket_connect_timeout=5,
                health_check_interval=30,
                **redis_tls_options(redis_settings),
            )
            store = cls(
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
        tls = urllib.parse.urlsplit(redis_url).scheme == "rediss"
        store.transports = {
            "postgres": integrations_base.transport_of(encrypted=encrypted, verified=way.verified),
            "redis": integrations_base.transport_of(encrypted=tls, verified=tls),
        }
        for name, how in store.transports.items():
            if how == integrations_base.Transport.PLAINTEXT:
                logger.warning(
                    "the connection to %s is not encrypted (%s): conversations and "
                    "credentials travel in plaintext",
                    name,
                    "the server offers no TLS, and sslMode allows plaintext"
                    if name == "postgres" and way.plaintext_fallback
                    else "TLS is off in its binding or URL",
                )
        return store

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
            postgres=postgres,
            redis_settings=redis_settings,
        )

    async def close(self) -> None:
        if not self._owns_clients:
            return
        try:
            await self.redis.aclose()
        finally:
            await self.pool.close()

    # -- the port, handed to the parts ---------------------------------------------

    async def append(self, turn: ports.Turn, *, tenant: str, agent: str, subject: str) -> None:
        await self.conversations.append(turn, tenant=tenant, agent=agent, subject=subject)

    async def recent(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int, subject: str
    ) -> list[ports.Turn]:
        return await self.conversations.recent(
            conversation_id, tenant=tenant, agent=agent, limit=limit, subject=subject
        )

    async def history(
        self,
        conversation_id: str,
        *,
        tenant: str,
        agent: str,
        subject: str | None,
        limit: int = 100,
    ) -> list[ports.Turn]:
        return await self.conversations.history(
            conversation_id, tenant=tenant, agent=agent, subject=subject, limit=limit
        )

    async def list_conversations(
        self, *, tenant: str, agent: str, subject: str | None, limit: int = 50
    ) -> list[dict[str, Any]]:
        return await self.conversations.list_conversations(
            tenant=tenant, agent=agent, subject=subject, limit=limit
        )

    async def delete_conversation(
        self, conversation_id: str, *, tenant: str, agent: str, subject: str | None
    ) -> bool:
        return await self.conversations.delete_conversation(
            conversation_id, tenant=tenant, agent=agent, subject=subject
        )

    async def record_usage(
        self, record: ports.UsageRecord, *, at: dt.datetime | None = None
    ) -> None:
        await self.usage.record(record, at=at)

    async def audit(
        self, *, tenant: str, agent: str, subject: str, action: str, detail: dict[str, Any]
    ) -> None:
        await self.audits.append(
            tenant=tenant, agent=agent, subject=subject, action=action, detail=detail
        )

    async def record_turn(self, record: ports.TurnRecord) -> None:
        """The turns, usage record and audit entry in one PostgreSQL statement, then
        the turns in one Redis call (`turn_records`)."""
        await self.turn_records.write(record)

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
    # mypy proves the store satisfies the protocol it is used through.
    def _as_port(store: PostgresRedisStore) -> ports.ConversationStore:
        return store
