"""Context versions: each change of an agent's context layers, numbered 1, 2, ….

Versions count per (tenant, agent, conversation); a conversation of None versions the
agent's layers independently of any conversation. A save whose digest equals the
latest version's creates nothing. This is the `context.VersionStore` that
`context.save_version` writes to.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from bmad_runtime import context
from bmad_runtime.memory import scope

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


class ContextVersions:
    """The ``context_versions`` table, over an asyncpg pool."""

    def __init__(self, *, pool: Any) -> None:
        self.pool = pool

    async def save_context_version(self, snapshot: context.Snapshot) -> context.SavedVersion:
        """A new ``context_versions`` row unless the latest one has the same digest."""
        tenant, agent, conversation_id, layers, digest = snapshot
        scope.check_owner(tenant, agent)
        if conversation_id is not None:
            scope.check_conversation_id(conversation_id)
        key = conversation_id or ""
        async with self.pool.acquire() as conn, conn.transaction():
            # Serialise writers of the same (tenant, agent, conversation): two replicas
            # noticing the same change at once must not both take the next number.
            await conn.execute(_VERSION_LOCK, "\x1f".join((tenant, agent, key)))
            latest = await conn.fetchrow(_LATEST_CONTEXT_VERSION, tenant, agent, key)
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

    async def get(
        self,
        *,
        tenant: str,
        agent: str,
        conversation_id: str | None = None,
        version: int | None = None,
    ) -> dict[str, Any] | None:
        """One context version (the latest when ``version`` is None), or None."""
        scope.check_owner(tenant, agent)
        row = await self.pool.fetchrow(
            _GET_CONTEXT_VERSION, tenant, agent, conversation_id or "", version
        )
        if row is None:
            return None
        return {
            "version": int(row["version"]),
            "layers": json.loads(row["layers"]),
            "sha256": row["layers_sha256"],
            "created_at": row["created_at"].isoformat(),
        }


if TYPE_CHECKING:
    # mypy proves this is the protocol `context.save_version` writes through.
    def _as_version_store(versions: ContextVersions) -> context.VersionStore:
        return versions
