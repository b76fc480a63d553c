"""A turn's record, written at once: one PostgreSQL statement and one Redis call.

An answered turn leaves its user and assistant turns, a usage record and an audit
entry (`ports.TurnRecord`). Written one by one (`Conversations.append` twice,
`UsageLedger.record`, `AuditLog.append`) that is four transactions, fourteen
PostgreSQL round trips with the pool's own, and two Redis calls per request, and the
round trips were most of a request's CPU (docs/benchmarks.md). Here it is one
statement, whose data-modifying sub-statements commit together, and one call of the
conversations' push script for both turns:

* the conversation's row is created or advanced by as many turns as the record has,
  under its row lock, so ``seq`` order is still commit order and a turn's two turns
  are numbered next to each other;
* a conversation of another subject matches no row: then nothing at all is inserted
  (no turns, no usage, no audit entry) and `ports.ConversationNotFoundError` is raised,
  as `append` of its first turn would have;
* without turns (an agent that keeps no memory) only the usage record and the audit
  entry are written, and no conversation is touched (none is checked, as before).

The rows are those the parts write one by one (the same columns, the usage record
stamped with the database's now(), the audit detail as sorted JSON); a failure
anywhere stores nothing and raises what asyncpg raised. A Redis failure after the
commit is logged and the hot list dropped, exactly as for `append`.
"""

from __future__ import annotations

import json

from bmad_runtime import ports
from bmad_runtime.memory import conversations, scope

# $8..$11: the turns' roles, contents, models and times, oldest first; $12..$17, $20
# and $21 the usage record (its own tenant and agent, as `UsageLedger.record` writes
# them); $18 and $19 the audit entry. No row comes back when the conversation is
# another subject's, and then every sub-statement, reading FROM conversation, inserts
# nothing.
_WRITE_TURN = """
WITH conversation AS (
    INSERT INTO conversations AS c
        (tenant, agent, id, title, last_seq, created_at, updated_at, owner)
    VALUES ($1, $2, $3, $4, cardinality($8::text[]), $5, $6, $7)
    ON CONFLICT (tenant, agent, id) DO UPDATE
    SET last_seq = c.last_seq + EXCLUDED.last_seq,
        updated_at = GREATEST(c.updated_at, EXCLUDED.updated_at),
        title = COALESCE(c.title, EXCLUDED.title)
    WHERE c.owner = EXCLUDED.owner
    RETURNING last_seq
),
turns AS (
    INSERT INTO messages (tenant, agent, conversation, seq, role, content, model, created_at)
    SELECT $1, $2, $3, conversation.last_seq - cardinality($8::text[]) + t.n,
           t.role, t.content, t.model, t.created_at
    FROM conversation,
         unnest($8::text[], $9::text[], $10::text[], $11::timestamptz[])
             WITH ORDINALITY AS t (role, content, model, created_at, n)
),
usage AS (
    INSERT INTO usage_records
        (tenant, agent, conversation, model, provider, tokens_in, tokens_out, latency_ms)
    SELECT $20, $21, $12, $13, $14, $15, $16, $17
    FROM conversation
),
audit AS (
    INSERT INTO audit_log (tenant, agent, subject, action, detail)
    SELECT $1, $2, $7, $18, $19::jsonb
    FROM conversation
)
SELECT last_seq FROM conversation
"""

# A record without turns: its usage record and audit entry, together.
_WRITE_RECORDS = """
WITH usage AS (
    INSERT INTO usage_records
        (tenant, agent, conversation, model, provider, tokens_in, tokens_out, latency_ms)
    VALUES ($12, $13, $4, $5, $6, $7, $8, $9)
)
INSERT INTO audit_log (tenant, agent, subject, action, detail)
VALUES ($1, $2, $3, $10, $11::jsonb)
"""


def _checked(record: ports.TurnRecord) -> str | None:
    """What the parts check before they write (names, and with turns the conversation id
    and the subject); the conversation of the turns, None without turns."""
    scope.check_owner(record.tenant, record.agent)
    scope.check_owner(record.usage.tenant, record.usage.agent)
    if not record.turns:
        return None
    ids = {turn.conversation_id for turn in record.turns}
    if len(ids) > 1:
        raise ValueError(f"the turns of one record belong to one conversation, not {sorted(ids)}")
    conversation_id = scope.check_conversation_id(ids.pop())
    scope.check_subject(record.subject)
    return conversation_id


def _title(turns: tuple[ports.Turn, ...]) -> str | None:
    """The title the turns would give a new conversation, appended one by one."""
    return next((t for t in map(conversations.title, turns) if t is not None), None)


class TurnRecords:
    """Writes `ports.TurnRecord`s over the conversations' pool and Redis client."""

    def __init__(self, part: conversations.Conversations) -> None:
        self.conversations = part

    async def write(self, record: ports.TurnRecord) -> None:
        conversation_id = _checked(record)
        usage = record.usage
        detail = json.dumps(record.detail, default=str, sort_keys=True)
        pool = self.conversations.pool
        # The usage and audit rows' parameters, the same in both statements.
        rows = (
            usage.conversation_id,
            usage.model,
            usage.provider,
            usage.tokens_in,
            usage.tokens_out,
            usage.latency_ms,
            record.action,
            detail,
            usage.tenant,
            usage.agent,
        )
        if conversation_id is None:
            await pool.execute(_WRITE_RECORDS, record.tenant, record.agent, record.subject, *rows)
            return
        turns = record.turns
        times = [scope.utc(turn.created_at) for turn in turns]
        last_seq = await pool.fetchval(
            _WRITE_TURN,
            record.tenant,
            record.agent,
            conversation_id,
            _title(turns),
            times[0],
            max(times),
            record.subject,
            [turn.role for turn in turns],
            [turn.content for turn in turns],
            [turn.model for turn in turns],
            times,
            *rows,
        )
        if last_seq is None:
            raise ports.ConversationNotFoundError(
                f"this agent has no conversation {conversation_id!r}"
            )
        await self.conversations.push(
            conversation_id,
            int(last_seq) - len(turns) + 1,
            turns,
            tenant=record.tenant,
            agent=record.agent,
            owner=record.subject,
        )
