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
