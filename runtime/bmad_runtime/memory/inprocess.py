"""The store of the ``inProcess`` memory mode: everything in this process, nothing durable.

An Agent chooses it with ``spec.memory.store: inProcess`` (the runtime reads
``BMAD_MEMORY_STORE=inProcess``): for demos and trials without PostgreSQL and Redis.
Conversations, usage records and the audit log live in this replica's memory only:
another replica does not see them, a restart loses them, and they are bounded
(`MAX_CONVERSATIONS` conversations, the least recently updated dropped first;
`MAX_TURNS` turns each; the latest `MAX_RECORDS` usage records and audit entries).
It is never a fallback: the default mode, ``durable``, does not start serving
without its datastores (`wiring`).
"""

from __future__ import annotations

import collections
import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from bmad_runtime import ports
from bmad_runtime.memory import conversations as conversations_mod

MAX_CONVERSATIONS = 1_000
MAX_TURNS = conversations_mod.MAX_RECENT_TURNS
MAX_RECORDS = 10_000

_Key = tuple[str, str, str]  # tenant, agent, conversation


@dataclass
class Conversation:
    created_at: dt.datetime
    updated_at: dt.datetime
    owner: str
    title: str | None = None
    count: int = 0
    """Turns appended so far (the deque keeps only the latest `MAX_TURNS`)."""
    turns: collections.deque[ports.Turn] = field(
        default_factory=lambda: collections.deque(maxlen=MAX_TURNS)
    )


class InProcessStore:
    """A `ports.ConversationStore` in dicts; conversations are scoped by tenant and agent,
    and belong to the subject that started them."""

    def __init__(self, *, max_conversations: int = MAX_CONVERSATIONS) -> None:
        self.max_conversations = max_conversations
        # In the order of the last write: the least recently updated first (`_written`).
        self.conversations: collections.OrderedDict[_Key, Conversation] = collections.OrderedDict()
        self._usage: collections.deque[ports.UsageRecord] = collections.deque(maxlen=MAX_RECORDS)
        self._audit: collections.deque[dict[str, Any]] = collections.deque(maxlen=MAX_RECORDS)

    @property
    def usage(self) -> list[ports.UsageRecord]:
        """The latest usage records, oldest first."""
        return list(self._usage)

    @property
    def audit_log(self) -> list[dict[str, Any]]:
        """The latest audit entries, oldest first."""
        return list(self._audit)

    def _mine(
        self, conversation_id: str, *, tenant: str, agent: str, subject: str | None
    ) -> Conversation | None:
        conversation = self.conversations.get((tenant, agent, conversation_id))
        if conversation is None or subject not in (None, conversation.owner):
            return None
        return conversation

    def _check_not_foreign(self, key: _Key, subject: str) -> Conversation | None:
        conversation = self.conversations.get(key)
        if conversation is not None and conversation.owner != subject:
            raise ports.ConversationNotFoundError(f"this agent has no conversation {key[2]!r}")
        return conversation

    def _written(self, key: _Key, subject: str, created_at: dt.datetime) -> Conversation:
        """The conversation a turn is written to, made if new, now the most recently
        updated (the last in the eviction order)."""
        conversation = self._check_not_foreign(key, subject)
        if conversation is None:
            if len(self.conversations) >= self.max_conversations:
                # Kept in the order of the last write, so the least recently updated is
                # the first: O(1), not a scan of every conversation (the scan was a
                # quarter of an invoke's CPU once the store was full).
                self.conversations.popitem(last=False)
            conversation = Conversation(created_at=created_at, updated_at=created_at, owner=subject)
            self.conversations[key] = conversation
        else:
            self.conversations.move_to_end(key)
        return conversation

    @staticmethod
    def _add(conversation: Conversation, turn: ports.Turn) -> None:
        conversation.turns.append(turn)
        conversation.count += 1
        conversation.title = conversation.title or conversations_mod.title(turn)
        conversation.updated_at = max(conversation.updated_at, turn.created_at)

    async def append(self, turn: ports.Turn, *, tenant: str, agent: str, subject: str) -> None:
        key = (tenant, agent, turn.conversation_id)
        self._add(self._written(key, subject, turn.created_at), turn)

    async def recent(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int, subject: str
    ) -> list[ports.Turn]:
        self._check_not_foreign((tenant, agent, conversation_id), subject)
        return await self.history(
            conversation_id, tenant=tenant, agent=agent, subject=subject, limit=limit
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
        """The latest ``limit`` turns, oldest first (as the durable store answers)."""
        conversation = self._mine(conversation_id, tenant=tenant, agent=agent, subject=subject)
        if limit <= 0 or conversation is None:
            return []
        return list(conversation.turns)[-limit:]

    async def list_conversations(
        self, *, tenant: str, agent: str, subject: str | None, limit: int = 50
    ) -> list[dict[str, Any]]:
        mine = [
            (key[2], conv)
            for key, conv in self.conversations.items()
            if key[0] == tenant and key[1] == agent and subject in (None, conv.owner)
        ]
        mine.sort(key=lambda item: item[1].updated_at, reverse=True)
        # The shape of the durable store's `list_conversations`.
        return [
            {
                "id": conversation_id,
                "title": conv.title,
                "turns": conv.count,
                "created_at": conv.created_at.isoformat(),
                "updated_at": conv.updated_at.isoformat(),
                "owner": conv.owner,
            }
            for conversation_id, conv in mine[: max(limit, 0)]
        ]

    async def delete_conversation(
        self, conversation_id: str, *, tenant: str, agent: str, subject: str | None
    ) -> bool:
        if self._mine(conversation_id, tenant=tenant, agent=agent, subject=subject) is None:
            return False
        del self.conversations[(tenant, agent, conversation_id)]
        return True

    async def record_usage(self, record: ports.UsageRecord) -> None:
        self._usage.append(record)

    async def audit(
        self, *, tenant: str, agent: str, subject: str, action: str, detail: dict[str, Any]
    ) -> None:
        self._audit.append(
            {
                "tenant": tenant,
                "agent": agent,
                "subject": subject,
                "action": action,
                "detail": dict(detail),
            }
        )

    async def record_turn(self, record: ports.TurnRecord) -> None:
        """What `append` of each turn, `record_usage` and `audit` store, in that order;
        the turns without a coroutine each (a turn's two turns are of one conversation)."""
        key: _Key | None = None
        conversation: Conversation | None = None
        for turn in record.turns:
            if key is None or conversation is None or key[2] != turn.conversation_id:
                key = (record.tenant, record.agent, turn.conversation_id)
                conversation = self._written(key, record.subject, turn.created_at)
            self._add(conversation, turn)
        await self.record_usage(record.usage)
        await self.audit(
            tenant=record.tenant,
            agent=record.agent,
            subject=record.subject,
            action=record.action,
            detail=record.detail,
        )

    async def ping(self) -> bool:
        return True


if TYPE_CHECKING:
    # mypy proves the store satisfies the protocol it is used through.
    def _as_port(store: InProcessStore) -> ports.ConversationStore:
        return store
