"""Versioned SQL migrations: the record both PostgreSQL schemas are made of.

The runtime's conversation store (`bmad_runtime.migrations`) and the platform's usage
ledger (`bmad_integrations.usage.migrations`) each keep an ordered tuple of these and
apply them with their own runner; a migration's checksum lets a runner refuse a
database whose applied migration was edited afterwards.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass


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
