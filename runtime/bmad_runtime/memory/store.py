"""The durable store: PostgreSQL and Redis clients, and the four parts that use them.

`PostgresRedisStore` is the runtime's `ports.ConversationStore` for the ``durable``
memory mode. It owns the clients (when it
opened them with `connect`), brings the schema up to date, answers the readiness
ping, and hands each call to its part: `conversations`, `usage`, `audits`,
`context_versions`. Reads beyond the port (a month's usage, the audit entries, one
context version) and context versions (`context_versions`, a `context.VersionStore`)
are on the parts themselves.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import ssl
from typing import TYPE_CHECKING, Any

import asyncpg  # type: ignore[import-untyped]  # asyncpg ships no type information
import redis.asyncio as aioredis

from bmad_runtime import bindings, migrations, ports
from bmad_runtime.memory import audit, context_versions, conversations, usage

logger = logging.getLogger(__name__)

PING_TIMEOUT = 2.0


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
        self._owns_clients = owns_clients

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
