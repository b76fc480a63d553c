"""Conversations: every turn durable in PostgreSQL, the recent ones hot in Redis.

Each `append` commits the turn to PostgreSQL first (``messages``, numbered by
``conversations.last_seq`` under the conversation's row lock, so ``seq`` order is
commit order), then pushes it onto a Redis list
``bmad:{tenant}:{agent}:conv:{owner digest}:{id}:turns`` trimmed to ``recent_turns``
whose TTL every write refreshes. `turn_records` does the same for a turn's two turns
at once, with its usage and audit rows: one statement, one `push`.

A conversation belongs to the subject whose turn created it (``conversations.owner``):
an append of another subject's turn is refused in the same statement that numbers it,
reads filter by owner in SQL, and the Redis list is keyed by a digest of the owner, so
a subject never even finds another subject's list.

The Redis list always holds a contiguous run of turns ending at the newest one it has
seen: a Lua script pushes a turn only when it directly follows the list's last one
(each entry carries its ``seq``). A gap — the key expired, Redis was flushed or
restarted, another replica's push failed — makes the writer rebuild the list from
PostgreSQL, and a rebuild never replaces a list that is already further along. So
`recent` can trust the list when it holds ``limit`` turns or starts at the first turn,
and otherwise reads PostgreSQL (and re-warms Redis). Any replica, any process, sees
the same conversation; losing Redis loses nothing.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import logging
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
import redis.exceptions

from bmad_runtime import ports
from bmad_runtime.memory import scope

logger = logging.getLogger(__name__)

TITLE_LENGTH = 80
MAX_RECENT_TURNS = 1000

# Push turns ARGV[4..] (numbered from ARGV[1] on; ARGV[2] the list's length, ARGV[3] its
# TTL) where they directly follow the list's last one, skipping those it has (a replay
# pushes nothing twice). 1: the list ends with the last of them; 0: there is a gap (the
# list is missing earlier turns), nothing was pushed, and the list must be rebuilt.
_APPEND_LUA = """
local last = redis.call('LINDEX', KEYS[1], -1)
local last_seq = 0
if last then last_seq = tonumber(cjson.decode(last)['seq']) end
local seq = tonumber(ARGV[1])
for i = 4, #ARGV do
  if seq > last_seq then
    if seq ~= last_seq + 1 then return 0 end
    redis.call('RPUSH', KEYS[1], ARGV[i])
    last_seq = seq
  end
  seq = seq + 1
end
redis.call('LTRIM', KEYS[1], -tonumber(ARGV[2]), -1)
redis.call('EXPIRE', KEYS[1], ARGV[3])
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

# No row comes back when the conversation exists and is another subject's.
_UPSERT_CONVERSATION = """
INSERT INTO conversations AS c
    (tenant, agent, id, title, last_seq, created_at, updated_at, owner)
VALUES ($1, $2, $3, $4, 1, $5, $5, $6)
ON CONFLICT (tenant, agent, id) DO UPDATE
SET last_seq = c.last_seq + 1,
    updated_at = GREATEST(c.updated_at, EXCLUDED.updated_at),
    title = COALESCE(c.title, EXCLUDED.title)
WHERE c.owner = EXCLUDED.owner
RETURNING last_seq
"""

_INSERT_MESSAGE = """
INSERT INTO messages (tenant, agent, conversation, seq, role, content, model, created_at)
VALUES ($1, $2, $3, $4, $5, $6, $7, $8)
"""

# $5: the owner to filter by; NULL for every owner's.
_LATEST_MESSAGES = """
SELECT m.seq, m.role, m.content, m.model, m.created_at
FROM messages m
JOIN conversations c ON c.tenant = m.tenant AND c.agent = m.agent AND c.id = m.conversation
WHERE m.tenant = $1 AND m.agent = $2 AND m.conversation = $3
  AND ($5::text IS NULL OR c.owner = $5)
ORDER BY m.seq DESC
LIMIT $4
"""

_LIST_CONVERSATIONS = """
SELECT id, title, last_seq, created_at, updated_at, owner
FROM conversations
WHERE tenant = $1 AND agent = $2 AND ($4::text IS NULL OR owner = $4)
ORDER BY updated_at DESC, id
LIMIT $3
"""

_GET_CONVERSATION = """
SELECT id, title, last_seq, created_at, updated_at, owner
FROM conversations
WHERE tenant = $1 AND agent = $2 AND id = $3 AND ($4::text IS NULL OR owner = $4)
"""

_OWNER = """
SELECT owner FROM conversations WHERE tenant = $1 AND agent = $2 AND id = $3
"""

_DELETE_CONVERSATION = """
DELETE FROM conversations
WHERE tenant = $1 AND agent = $2 AND id = $3 AND ($4::text IS NULL OR owner = $4)
RETURNING owner
"""

_DELETE_CONVERSATION_CONTEXT = """
DELETE FROM context_versions WHERE tenant = $1 AND agent = $2 AND conversation = $3
"""


def owner_digest(owner: str) -> str:
    """A subject as a key part: fixed length, no ':' (subjects may hold anything)."""
    return hashlib.sha256(owner.encode()).hexdigest()[:24]


def turns_key(conversation_id: str, *, tenant: str, agent: str, owner: str) -> str:
    """The Redis list of the recent turns of `owner`'s conversation."""
    return "bmad:" + ":".join(
        (tenant, agent, "conv", owner_digest(owner), conversation_id, "turns")
    )


def unowned_turns_key(conversation_id: str, *, tenant: str, agent: str) -> str:
    """Where lists were kept before conversations had owners (deleted with them)."""
    return "bmad:" + ":".join((tenant, agent, "conv", conversation_id, "turns"))


def title(turn: ports.Turn) -> str | None:
    """The start of a user turn's first line: the conversation's title."""
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
            "created_at": scope.utc(turn.created_at).isoformat(),
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
        "owner": row["owner"],
    }


class Conversations:
    """The conversation part of the store, over an asyncpg pool and a Redis client."""

    def __init__(
        self, pool: Any, redis_client: aioredis.Redis, *, recent_turns: int, ttl_seconds: int
    ) -> None:
        """``recent_turns`` kept hot in Redis per conversation, for ``ttl_seconds`` idle."""
        if not 1 <= recent_turns <= MAX_RECENT_TURNS:
            raise ValueError(f"recent_turns must be 1..{MAX_RECENT_TURNS}, not {recent_turns}")
        if ttl_seconds < 1:
            raise ValueError(f"ttl_seconds must be positive, not {ttl_seconds}")
        self.pool = pool
        self.redis = redis_client
        self.recent_turns = recent_turns
        self.ttl_seconds = ttl_seconds
        self._append_script = redis_client.register_script(_APPEND_LUA)
        self._rebuild_script = redis_client.register_script(_REBUILD_LUA)

    async def append(self, turn: ports.Turn, *, tenant: str, agent: str, subject: str) -> None:
        """Store one turn durably, then push it onto the conversation's recent list.

        The first turn makes `subject` the conversation's owner; a turn of another
        subject raises `ports.ConversationNotFoundError` and stores nothing. A Redis
        failure after the commit is logged, not raised: the turn is safe in PostgreSQL
        and `recent` finds it there.
        """
        scope.check_owner(tenant, agent)
        conversation_id = scope.check_conversation_id(turn.conversation_id)
        owner = scope.check_subject(subject)
        created_at = scope.utc(turn.created_at)
        async with self.pool.acquire() as conn, conn.transaction():
            seq = await conn.fetchval(
                _UPSERT_CONVERSATION,
                tenant,
                agent,
                conversation_id,
                title(turn),
                created_at,
                owner,
            )
            if seq is None:
                raise ports.ConversationNotFoundError(
                    f"this agent has no conversation {conversation_id!r}"
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
        await self.push(conversation_id, seq, (turn,), tenant=tenant, agent=agent, owner=owner)

    async def push(
        self,
        conversation_id: str,
        first_seq: int,
        turns: Sequence[ports.Turn],
        *,
        tenant: str,
        agent: str,
        owner: str,
    ) -> None:
        """Push turns just committed (numbered from `first_seq` on) onto the recent list
        in one call; a gap rebuilds it from PostgreSQL, a Redis failure is logged and
        drops it (not raised)."""
        key = turns_key(conversation_id, tenant=tenant, agent=agent, owner=owner)
        encoded = [_encode(first_seq + i, turn) for i, turn in enumerate(turns)]
        try:
            pushed = await self._append_script(
                keys=[key], args=[first_seq, self.recent_turns, self.ttl_seconds, *encoded]
            )
            if not pushed:
                await self._rebuild(conversation_id, tenant=tenant, agent=agent, owner=owner)
        except (redis.exceptions.RedisError, OSError) as exc:
            logger.warning(
                "turns %d to %d of conversation %r stored in PostgreSQL but not in Redis (%s)",
                first_seq,
                first_seq + len(turns) - 1,
                conversation_id,
                exc,
            )
            await self._forget(key)

    async def _forget(self, *keys: str) -> None:
        # A list that missed a turn must not be served: without it, readers go to
        # PostgreSQL (and rebuild). If Redis cannot even delete, it cannot serve either.
        with contextlib.suppress(redis.exceptions.RedisError, OSError):
            await self.redis.delete(*keys)

    async def _latest_rows(
        self, conversation_id: str, *, tenant: str, agent: str, owner: str | None, limit: int
    ) -> list[tuple[int, ports.Turn]]:
        rows = await self.pool.fetch(_LATEST_MESSAGES, tenant, agent, conversation_id, limit, owner)
        return [(int(r["seq"]), _row_turn(r, conversation_id)) for r in reversed(rows)]

    async def _rebuild(
        self,
        conversation_id: str,
        *,
        tenant: str,
        agent: str,
        owner: str,
        rows: Sequence[tuple[int, ports.Turn]] | None = None,
    ) -> None:
        if rows is None:
            rows = await self._latest_rows(
                conversation_id, tenant=tenant, agent=agent, owner=owner, limit=self.recent_turns
            )
        rows = list(rows)[-self.recent_turns :]
        if not rows:
            return
        await self._rebuild_script(
            keys=[turns_key(conversation_id, tenant=tenant, agent=agent, owner=owner)],
            args=[rows[-1][0], self.ttl_seconds, *(_encode(s, t) for s, t in rows)],
        )

    async def recent(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int, subject: str
    ) -> list[ports.Turn]:
        """The last ``limit`` turns of `subject`'s conversation, oldest first: from Redis
        when it has them all. [] for a conversation that does not exist yet;
        `ports.ConversationNotFoundError` for another subject's."""
        scope.check_owner(tenant, agent)
        owner = scope.check_subject(subject)
        if limit <= 0 or not scope.valid_conversation_id(conversation_id):
            return []
        key = turns_key(conversation_id, tenant=tenant, agent=agent, owner=owner)
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
            conversation_id,
            tenant=tenant,
            agent=agent,
            owner=owner,
            limit=max(limit, self.recent_turns),
        )
        if rows:
            try:
                await self._rebuild(
                    conversation_id, tenant=tenant, agent=agent, owner=owner, rows=rows
                )
            except (redis.exceptions.RedisError, OSError) as exc:
                logger.warning("recent turns of %r not re-warmed (%s)", conversation_id, exc)
            return [turn for _, turn in rows[-limit:]]
        existing = await self.pool.fetchrow(_OWNER, tenant, agent, conversation_id)
        if existing is not None and existing["owner"] != owner:
            raise ports.ConversationNotFoundError(
                f"this agent has no conversation {conversation_id!r}"
            )
        return []

    async def history(
        self,
        conversation_id: str,
        *,
        tenant: str,
        agent: str,
        subject: str | None,
        limit: int = 100,
    ) -> list[ports.Turn]:
        """The latest ``limit`` turns from PostgreSQL, oldest first: of `subject`'s
        conversation, or of anyone's when `subject` is None."""
        scope.check_owner(tenant, agent)
        if limit <= 0 or not scope.valid_conversation_id(conversation_id):
            return []
        rows = await self._latest_rows(
            conversation_id, tenant=tenant, agent=agent, owner=subject, limit=limit
        )
        return [turn for _, turn in rows]

    async def list_conversations(
        self, *, tenant: str, agent: str, subject: str | None, limit: int = 50
    ) -> list[dict[str, Any]]:
        """`subject`'s conversations (everyone's when None), most recently updated first.

        Each is ``{"id", "title", "turns", "created_at", "updated_at", "owner"}`` (times
        in ISO 8601 with offset, ``title`` the start of the first user message or None).
        """
        scope.check_owner(tenant, agent)
        if limit <= 0:
            return []
        rows = await self.pool.fetch(_LIST_CONVERSATIONS, tenant, agent, limit, subject)
        return [_conversation(r) for r in rows]

    async def get_conversation(
        self, conversation_id: str, *, tenant: str, agent: str, subject: str | None
    ) -> dict[str, Any] | None:
        """One conversation as `list_conversations` shows it, or None (404)."""
        scope.check_owner(tenant, agent)
        if not scope.valid_conversation_id(conversation_id):
            return None
        row = await self.pool.fetchrow(_GET_CONVERSATION, tenant, agent, conversation_id, subject)
        return None if row is None else _conversation(row)

    async def delete_conversation(
        self, conversation_id: str, *, tenant: str, agent: str, subject: str | None
    ) -> bool:
        """Delete a conversation, its messages, its context versions and its hot turns.

        False when this tenant's agent has no such conversation of `subject` (of anyone,
        when None). Usage records and the audit log keep their rows (billing and
        accountability outlive a conversation).
        """
        scope.check_owner(tenant, agent)
        if not scope.valid_conversation_id(conversation_id):
            return False
        owner = subject
        if owner is None:
            owner = await self.pool.fetchval(_OWNER, tenant, agent, conversation_id)
        keys = [unowned_turns_key(conversation_id, tenant=tenant, agent=agent)]
        if owner is not None:
            keys.append(turns_key(conversation_id, tenant=tenant, agent=agent, owner=owner))
        await self.redis.delete(*keys)  # raises while Redis is down: nothing half-deleted
        async with self.pool.acquire() as conn, conn.transaction():
            deleted = await conn.fetchrow(
                _DELETE_CONVERSATION, tenant, agent, conversation_id, subject
            )
            if deleted is not None:
                await conn.execute(_DELETE_CONVERSATION_CONTEXT, tenant, agent, conversation_id)
        # Again after the commit: an append racing with the delete may have pushed.
        await self._forget(*keys)
        return deleted is not None
