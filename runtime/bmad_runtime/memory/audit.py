"""The audit log: who did what to which agent, append-only (the table refuses UPDATE
and DELETE), and never the text of a conversation: the log outlives conversations."""

from __future__ import annotations

import json
from typing import Any

from bmad_runtime.memory import scope

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


class AuditLog:
    """The ``audit_log`` table, over an asyncpg pool."""

    def __init__(self, *, pool: Any) -> None:
        self.pool = pool

    async def append(
        self, *, tenant: str, agent: str, subject: str, action: str, detail: dict[str, Any]
    ) -> int:
        """Append one entry; its id."""
        scope.check_owner(tenant, agent)
        payload = json.dumps(detail, default=str, sort_keys=True)
        entry_id = await self.pool.fetchval(_INSERT_AUDIT, tenant, agent, subject, action, payload)
        return int(entry_id)

    async def entries(
        self, tenant: str, *, agent: str | None = None, limit: int = 100
    ) -> list[dict[str, Any]]:
        """The tenant's latest audit entries, newest first."""
        scope.check_owner(tenant, agent)
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
