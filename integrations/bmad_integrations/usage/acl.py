"""Redis ACL users that may append to exactly one agent's usage stream (operator side).

Each Agent gets its own user on the platform Redis, made by the operator with its admin
connection. The user may run XADD on one key, ``bmad:usage:<namespace>:<agent>``, with
a write-only key permission (``%W~``): it cannot read that stream, touch another key,
or run anything else but ``PING`` (redis-py's ``CLIENT SETINFO`` on connect is refused
and ignored by the client; Redis 7.0 does not know that command anyway). So a tenant
who reads the credentials out of its own namespace can append records for its own
agent and nothing more; which tenant they bill is decided by the ingester from the
stream key, never from the record.

Only the SHA-256 of the password is sent (``#<hash>``): Redis keeps no plaintext, and
the ACL, SLOWLOG and MONITOR never show one.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import TYPE_CHECKING

from bmad_integrations import lazy
from bmad_integrations.usage import budget, record

if TYPE_CHECKING:
    from redis import asyncio as aioredis
    from redis import exceptions as redis_errors
else:  # imported when first used: only where Redis is configured
    aioredis = lazy.module("redis.asyncio")
    redis_errors = lazy.module("redis.exceptions")

PASSWORD_BYTES = 32
WRITER_COMMANDS = ("+xadd", "+ping")
# With a tenant: GET on that tenant's budget key (read-only, `budget`), nothing else.
BUDGET_COMMANDS = ("+get",)


def new_password() -> str:
    return secrets.token_urlsafe(PASSWORD_BYTES)


def writer_rules(
    namespace: str, agent: str, password: str, *, tenant: str | None = None
) -> list[str]:
    """The ACL SETUSER rules of an agent's writer, from nothing (``reset``).

    With ``tenant``, the writer may also read (``%R~``, GET only) that tenant's budget
    key, which is how its runtime learns that the budget is used up.
    """
    if len(password) < 16:
        raise ValueError("a usage writer's password must have at least 16 characters")
    budget_rules = ["%R~" + budget.key(tenant), *BUDGET_COMMANDS] if tenant else []
    return [
        "reset",
        "on",
        "#" + hashlib.sha256(password.encode()).hexdigest(),
        "%W~" + record.stream_key(namespace, agent),
        *budget_rules[:1],
        "resetchannels",
        "-@all",
        *WRITER_COMMANDS,
        *budget_rules[1:],
    ]


async def ensure_writer(
    admin: aioredis.Redis,
    *,
    namespace: str,
    agent: str,
    password: str,
    tenant: str | None = None,
) -> str:
    """Create or reset the agent's writer; returns its user name. Idempotent."""
    user = record.acl_user(namespace, agent)
    rules = writer_rules(namespace, agent, password, tenant=tenant)
    await admin.execute_command("ACL", "SETUSER", user, *rules)  # type: ignore[no-untyped-call]
    return user


async def remove_writer(admin: aioredis.Redis, *, namespace: str, agent: str) -> bool:
    """Delete the agent's writer (its open connections are closed by Redis)."""
    return bool(await admin.acl_deluser(record.acl_user(namespace, agent)))


async def writers(admin: aioredis.Redis) -> list[tuple[str, str]]:
    """(namespace, agent) of every usage writer the Redis knows."""
    found = []
    for name in await admin.acl_users():
        user = name.decode() if isinstance(name, bytes) else str(name)
        prefix = record.ACL_USER_PREFIX + ":"
        if not user.startswith(prefix):
            continue
        try:
            found.append(record.parse_stream_key(record.STREAM_PREFIX + user[len(prefix) - 1 :]))
        except record.RecordError:
            continue
    return found


async def save(admin: aioredis.Redis) -> bool:
    """Persist the ACL when the Redis has an ACL file; False when it has none."""
    try:
        await admin.acl_save()
    except redis_errors.ResponseError as exc:
        if "ACL file" in str(exc) or "aclfile" in str(exc).lower():
            return False
        raise
    return True
