"""In-memory stand-ins for the runtime's ports, for unit tests, demos and benchmarks.

`InMemoryStore` is a `ports.ConversationStore` in dicts (one process, nothing
durable); `StaticAuthenticator` knows a fixed set of tokens; `CountingLimiter` allows
a fixed number of hits. None of them does I/O, so they work on any event loop.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from bmad_runtime import ports

_Key = tuple[str, str, str]  # tenant, agent, conversation


@dataclass
class _Conversation:
    created_at: dt.datetime
    updated_at: dt.datetime
    turns: list[ports.Turn] = field(default_factory=list)


class InMemoryStore:
    """A `ports.ConversationStore` in dicts; conversations are scoped by tenant and agent."""

    def __init__(self) -> None:
        self.conversations: dict[_Key, _Conversation] = {}
        self.usage: list[ports.UsageRecord] = []
        self.audit_log: list[dict[str, Any]] = []
        self.healthy = True

    async def append(self, turn: ports.Turn, *, tenant: str, agent: str) -> None:
        key = (tenant, agent, turn.conversation_id)
        conversation = self.conversations.get(key)
        if conversation is None:
            conversation = _Conversation(created_at=turn.created_at, updated_at=turn.created_at)
            self.conversations[key] = conversation
        conversation.turns.append(turn)
        conversation.updated_at = max(conversation.updated_at, turn.created_at)

    async def recent(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int
    ) -> list[ports.Turn]:
        if limit <= 0:
            return []
        conversation = self.conversations.get((tenant, agent, conversation_id))
        return list(conversation.turns[-limit:]) if conversation else []

    async def history(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int = 100
    ) -> list[ports.Turn]:
        """The latest ``limit`` turns, oldest first (as `memory.PostgresRedisStore`)."""
        if limit <= 0:
            return []
        conversation = self.conversations.get((tenant, agent, conversation_id))
        return list(conversation.turns[-limit:]) if conversation else []

    async def list_conversations(
        self, *, tenant: str, agent: str, limit: int = 50
    ) -> list[dict[str, Any]]:
        mine = [
            (key[2], conv)
            for key, conv in self.conversations.items()
            if key[0] == tenant and key[1] == agent
        ]
        mine.sort(key=lambda item: item[1].updated_at, reverse=True)
        # The shape of `memory.PostgresRedisStore.list_conversations`.
        return [
            {
                "id": conversation_id,
                "title": _title(conv.turns),
                "turns": len(conv.turns),
                "created_at": conv.created_at.isoformat(),
                "updated_at": conv.updated_at.isoformat(),
            }
            for conversation_id, conv in mine[: max(limit, 0)]
        ]

    async def delete_conversation(self, conversation_id: str, *, tenant: str, agent: str) -> bool:
        return self.conversations.pop((tenant, agent, conversation_id), None) is not None

    async def record_usage(self, record: ports.UsageRecord) -> None:
        self.usage.append(record)

    async def audit(
        self, *, tenant: str, agent: str, subject: str, action: str, detail: dict[str, Any]
    ) -> None:
        self.audit_log.append(
            {
                "tenant": tenant,
                "agent": agent,
                "subject": subject,
                "action": action,
                "detail": dict(detail),
            }
        )

    async def ping(self) -> bool:
        return self.healthy


def _title(turns: list[ports.Turn]) -> str | None:
    first = next((t.content for t in turns if t.role == "user"), None)
    return None if first is None else " ".join(first.split())[:80] or None


class StaticAuthenticator:
    """A `ports.Authenticator` that knows a fixed set of Bearer tokens."""

    def __init__(self, tokens: Mapping[str, ports.Principal]) -> None:
        self.tokens = dict(tokens)

    async def authenticate(self, authorization: str | None) -> ports.Principal:
        if not authorization:
            raise ports.AuthError(
                401, "missing_token", "send an Authorization: Bearer <token> header"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ports.AuthError(
                401, "invalid_request", "the Authorization header must be 'Bearer <token>'"
            )
        principal = self.tokens.get(token.strip())
        if principal is None:
            raise ports.AuthError(401, "invalid_token", "the token is not valid")
        return principal


class CountingLimiter:
    """A `ports.Limiter` allowing ``allow`` hits per tenant, then asking to wait ``wait``."""

    def __init__(self, allow: int, *, wait: float = 1.0) -> None:
        self.allow = allow
        self.wait = wait
        self.hits: list[tuple[str, str, int]] = []

    async def hit(self, *, tenant: str, agent: str, tokens: int = 0) -> float | None:
        self.hits.append((tenant, agent, tokens))
        count = sum(1 for t, a, _ in self.hits if t == tenant and a == agent)
        return None if count <= self.allow else self.wait
