"""The in-process store's bound: a full store drops the least recently updated conversation."""

from __future__ import annotations

import datetime as dt

import pytest

from bmad_runtime import ports
from bmad_runtime.memory import inprocess

pytestmark = pytest.mark.unit

TENANT, AGENT, SUBJECT = "team-a", "analyst-1", "alice"
T0 = dt.datetime(2026, 11, 30, 12, 0, tzinfo=dt.UTC)


async def write(store: inprocess.InProcessStore, conversation: str, minute: int) -> None:
    turn = ports.Turn(conversation, "user", f"hello {minute}", T0 + dt.timedelta(minutes=minute))
    await store.append(turn, tenant=TENANT, agent=AGENT, subject=SUBJECT)


async def ids(store: inprocess.InProcessStore) -> set[str]:
    listed = await store.list_conversations(tenant=TENANT, agent=AGENT, subject=SUBJECT)
    return {c["id"] for c in listed}


async def test_a_full_store_drops_the_least_recently_updated_conversation() -> None:
    store = inprocess.InProcessStore(max_conversations=3)
    await write(store, "a", 1)
    await write(store, "b", 2)
    await write(store, "c", 3)
    await write(store, "a", 4)  # a is now the most recently updated; b the least

    await write(store, "d", 5)

    assert await ids(store) == {"a", "c", "d"}
    await write(store, "e", 6)  # then c
    assert await ids(store) == {"a", "d", "e"}
    history = await store.history("a", tenant=TENANT, agent=AGENT, subject=SUBJECT)
    assert [t.content for t in history] == ["hello 1", "hello 4"]


async def test_a_store_below_its_bound_drops_nothing() -> None:
    store = inprocess.InProcessStore(max_conversations=3)
    for minute, conversation in enumerate(["a", "b", "a", "c", "b"]):
        await write(store, conversation, minute)

    assert await ids(store) == {"a", "b", "c"}


def record(conversation: str, minute: int, *, subject: str = SUBJECT) -> ports.TurnRecord:
    when = T0 + dt.timedelta(minutes=minute)
    return ports.TurnRecord(
        tenant=TENANT,
        agent=AGENT,
        subject=subject,
        turns=(
            ports.Turn(conversation, "user", f"question {minute}", when),
            ports.Turn(conversation, "assistant", f"answer {minute}", when, model="m"),
        ),
        usage=ports.UsageRecord(
            tenant=TENANT,
            agent=AGENT,
            conversation_id=conversation,
            model="m",
            provider="echo",
            tokens_in=2,
            tokens_out=2,
            latency_ms=1,
        ),
        action="agent.invoke",
        detail={"conversationId": conversation},
    )


async def test_a_recorded_turn_is_stored_and_its_conversation_updated_last() -> None:
    store = inprocess.InProcessStore(max_conversations=2)
    await store.record_turn(record("a", 1))
    await store.record_turn(record("b", 2))
    await store.record_turn(record("a", 3))  # a is the most recently updated; b the least

    await store.record_turn(record("c", 4))

    assert await ids(store) == {"a", "c"}
    history = await store.history("a", tenant=TENANT, agent=AGENT, subject=SUBJECT)
    assert [t.content for t in history] == ["question 1", "answer 1", "question 3", "answer 3"]
    listed = await store.list_conversations(tenant=TENANT, agent=AGENT, subject=SUBJECT)
    assert {c["id"]: (c["turns"], c["title"]) for c in listed} == {
        "a": (4, "question 1"),
        "c": (2, "question 4"),
    }
    assert [u.conversation_id for u in store.usage] == ["a", "b", "a", "c"]
    assert [e["detail"] for e in store.audit_log][-1] == {"conversationId": "c"}


async def test_a_turn_in_another_subjects_conversation_stores_nothing() -> None:
    store = inprocess.InProcessStore()
    await store.record_turn(record("a", 1))

    with pytest.raises(ports.ConversationNotFoundError):
        await store.record_turn(record("a", 2, subject="mallory"))

    history = await store.history("a", tenant=TENANT, agent=AGENT, subject=None)
    assert len(history) == 2
    assert len(store.usage) == len(store.audit_log) == 1
