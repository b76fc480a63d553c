"""Layered context: the order of the layers, trimming to the window, version digests."""

from __future__ import annotations

import datetime as dt
import math

import pytest

from bmad_runtime import context, ports

pytestmark = pytest.mark.unit


def user(text: str) -> ports.Message:
    return ports.Message("user", text)


def assistant(text: str) -> ports.Message:
    return ports.Message("assistant", text)


LAYERS = context.Layers(
    platform="Platform rules.",
    tenant="Tenant house style.",
    persona="You are Mary, the analyst.",
    instructions="Elicit requirements.",
    artifacts=(context.ArtifactLayer(name="prd.md", version="v3", content="# PRD"),),
)


def test_estimate_tokens_takes_the_larger_of_words_and_characters() -> None:
    assert context.estimate_tokens("") == 0
    assert context.estimate_tokens("one two three four five") == math.ceil(5 * 1.3)
    dense = "x" * 400  # one "word", many tokens
    assert context.estimate_tokens(dense) == 100
    assert context.message_tokens(user("hi")) == 2 + context.MESSAGE_OVERHEAD  # ceil(1.3)


def test_layers_come_outermost_first_then_the_conversation() -> None:
    conversation = [user("first question"), assistant("first answer"), user("now this")]
    messages = context.assemble(LAYERS, conversation, context_window=10_000)
    assert [m.role for m in messages] == ["system"] * 4 + ["user", "assistant", "user"]
    assert messages[0].content == "Platform rules."
    assert messages[1].content == "Tenant house style."
    assert messages[2].content == "You are Mary, the analyst.\n\nElicit requirements."
    assert messages[3].content.startswith("Workflow artifact prd.md (version v3):")
    assert messages[3].content.endswith("# PRD")
    assert messages[-1] == user("now this")


def test_empty_layers_are_left_out() -> None:
    messages = context.assemble(
        context.Layers(persona="Only a persona."), [user("hi")], context_window=1000
    )
    assert messages == [ports.Message("system", "Only a persona."), user("hi")]


def test_turns_from_the_store_are_accepted() -> None:
    now = dt.datetime.now(dt.UTC)
    turns = [
        ports.Turn("c1", "user", "hello", now),
        ports.Turn("c1", "assistant", "hi there", now, model="echo-1"),
        ports.Turn("c1", "user", "again", now),
    ]
    messages = context.assemble(context.Layers(), turns, context_window=1000)
    assert messages == [user("hello"), assistant("hi there"), user("again")]


def conversation_of(pairs: int) -> list[ports.Message]:
    turns: list[ports.Message] = []
    for i in range(pairs):
        turns += [user(f"question {i} " + "word " * 20), assistant(f"answer {i} " + "word " * 20)]
    return [*turns, user("the latest question")]


def test_the_oldest_turns_are_dropped_first() -> None:
    conversation = conversation_of(10)
    system = LAYERS.system_messages()
    full = context.count_tokens(system) + context.count_tokens(conversation)
    window = full - 100  # a few turns too many
    messages = context.assemble(LAYERS, conversation, context_window=window)
    assert context.count_tokens(messages) <= window
    assert messages[: len(system)] == system
    kept = messages[len(system) :]
    assert kept[-1] == user("the latest question")
    assert kept == conversation[-len(kept) :]  # a suffix: only the oldest went
    assert len(kept) < len(conversation)
    assert kept[0].role == "user"  # never starts with an orphaned answer


def test_a_known_system_cost_trims_as_counting_it_does() -> None:
    conversation = conversation_of(10)
    system = LAYERS.system_messages()
    cost = context.count_tokens(system)
    for window in (cost + 50, cost + 200, cost + 10_000):
        assert context.trim(
            system, conversation, context_window=window, system_tokens=cost
        ) == context.trim(system, conversation, context_window=window)
    # The cost given is the one used (an agent's layer counts its system messages once).
    with pytest.raises(context.ContextOverflowError):
        context.trim(system, conversation, context_window=cost + 50, system_tokens=cost + 50)


def test_reserved_answer_tokens_shrink_the_budget() -> None:
    conversation = conversation_of(10)
    window = context.count_tokens(LAYERS.system_messages()) + context.count_tokens(conversation)
    roomy = context.assemble(LAYERS, conversation, context_window=window)
    tight = context.assemble(LAYERS, conversation, context_window=window, reserve_tokens=400)
    assert len(roomy) == len(LAYERS.system_messages()) + len(conversation)
    assert len(tight) < len(roomy)
    assert context.count_tokens(tight) <= window - 400


def test_the_latest_user_message_is_never_cut_even_when_nothing_else_fits() -> None:
    conversation = conversation_of(5)
    system = LAYERS.system_messages()
    window = context.count_tokens(system) + context.message_tokens(conversation[-1])
    messages = context.assemble(LAYERS, conversation, context_window=window)
    assert messages == [*system, conversation[-1]]


def test_turns_after_the_latest_user_message_are_kept_too() -> None:
    conversation = [*conversation_of(3), assistant("a partial answer")]
    system = LAYERS.system_messages()
    window = context.count_tokens(system) + context.count_tokens(conversation[-2:])
    messages = context.assemble(LAYERS, conversation, context_window=window)
    assert messages[len(system) :] == conversation[-2:]


def test_what_cannot_fit_is_an_error_that_says_by_how_much() -> None:
    huge = user("word " * 5000)
    with pytest.raises(context.ContextOverflowError) as caught:
        context.assemble(LAYERS, [huge], context_window=1000)
    assert caught.value.budget == 1000
    assert caught.value.needed > 1000
    assert "contextWindow" in str(caught.value)


def test_a_window_must_be_positive() -> None:
    with pytest.raises(ValueError, match="contextWindow"):
        context.assemble(LAYERS, [user("hi")], context_window=0)


def test_digest_follows_the_layers() -> None:
    same = context.Layers(
        platform="Platform rules.",
        tenant="Tenant house style.",
        persona="You are Mary, the analyst.",
        instructions="Elicit requirements.",
        artifacts=(context.ArtifactLayer(name="prd.md", version="v3", content="# PRD"),),
    )
    assert same.digest() == LAYERS.digest()
    changed = context.Layers(
        platform="Platform rules.",
        tenant="Tenant house style.",
        persona="You are Mary, the analyst.",
        instructions="Elicit requirements.",
        artifacts=(context.ArtifactLayer(name="prd.md", version="v3", content="# PRD v2"),),
    )
    assert changed.digest() != LAYERS.digest()


def test_stored_layers_reference_artifacts_without_their_text() -> None:
    stored = LAYERS.to_json()
    assert stored["artifacts"] == [
        {"name": "prd.md", "version": "v3", "sha256": LAYERS.artifacts[0].sha256()}
    ]
    assert "# PRD" not in str(stored)


class FakeVersions:
    def __init__(self) -> None:
        self.rows: list[tuple[str | None, str]] = []

    async def save_context_version(self, snapshot: context.Snapshot) -> context.SavedVersion:
        conversation_id, digest = snapshot.conversation_id, snapshot.digest
        mine = [d for c, d in self.rows if c == conversation_id]
        if mine and mine[-1] == digest:
            return context.SavedVersion(len(mine), created=False)
        self.rows.append((conversation_id, digest))
        return context.SavedVersion(len(mine) + 1, created=True)


async def test_save_version_hands_the_digest_to_the_store() -> None:
    store = FakeVersions()
    first = await context.save_version(store, LAYERS, tenant="t", agent="a")
    again = await context.save_version(store, LAYERS, tenant="t", agent="a")
    other = await context.save_version(store, context.Layers(platform="new"), tenant="t", agent="a")
    assert first == context.SavedVersion(1, created=True)
    assert again == context.SavedVersion(1, created=False)
    assert other == context.SavedVersion(2, created=True)
