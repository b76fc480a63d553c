"""Throw-away PostgreSQL databases on the test bed's server: one per test that needs a
schema of its own, dropped afterwards."""

from __future__ import annotations

import contextlib
import secrets
import urllib.parse
from collections.abc import AsyncIterator

import asyncpg  # type: ignore[import-untyped]


def with_database(dsn: str, database: str) -> str:
    """`dsn` with its database replaced by `database`."""
    parts = urllib.parse.urlsplit(dsn)
    return urllib.parse.urlunsplit(parts._replace(path="/" + database))


@contextlib.asynccontextmanager
async def temporary(postgres_url: str, prefix: str) -> AsyncIterator[str]:
    """A new database `<prefix>_<random hex>` on the server of `postgres_url`: its URL.
    Dropped on exit, its open connections with it."""
    name = f"{prefix}_{secrets.token_hex(5)}"
    admin = await asyncpg.connect(postgres_url)
    try:
        # Identifiers cannot be parameters; the name is generated above.
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield with_database(postgres_url, name)
    finally:
        admin = await asyncpg.connect(postgres_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()
