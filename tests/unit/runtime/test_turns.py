"""The use case "one turn", without HTTP: what it records, and its domain errors."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from typing import Any

import pydantic
import pytest

from bmad_runtime import config, context, ports, schemas, streams, telemetry, turns
from bmad_runtime.memory import inprocess
from bmad_runtime.providers import base, echo, router

pytestmark = pytest.mark.unit

TENANT, AGENT = "team-a", "analyst-1"
CALLER = ports.Principal(subject="alice", tenant=TENANT)


class RefusingLimiter:
    async def hit(self, *, tenant: str, agent: str, tokens: int = 0) -> float | None:
        return 2.5


def services(
    *chain: base.BaseProvider,
    agent_config: config.AgentConfig | None = None,
    limiter: ports.Limiter | None = None,
    concurrency: int | None = None,
) -> turns.Services:
    return turns.Services(
        tenant=TENANT,
        agent=AGENT,
        config=agent_config or config.echo_config(agent=AGENT),
        store=inprocess.InProcessStore(),
        router=router.ModelRouter(list(chain) or [echo.EchoProvider()]),
        limiter=limiter,
        metrics=telemetry.Metrics(),
        slots=asyncio.Semaphore(concurrency) if concurrency else None,
    )


def store_of(given: turns.Services) -> inprocess.InProcessStore:
    assert isinstance(given.store, inprocess.InProcessStore)
    return given.store


async def test_a_turn_answers_and_records_turns_usage_and_audit() -> None:
    given = services()
    body = schemas.InvokeRequest(input="plan the launch")

    answer = await turns.run(given, body, CALLER, request_id="r-1")

    assert answer.output == "[echo-1] plan the launch"
    store = store_of(given)
    history = await store.history(
        answer.conversation_id, tenant=TENANT, agent=AGENT, subject=CALLER.subject
    )
    assert [(t.role, t.content) for t in history] == [
        ("user", "plan the launch"),
        ("assistant", "[echo-1] plan the launch"),
    ]
    [usage] = store.usage
    assert (usage.tenant, usage.agent, usage.conversation_id) == (
        TENANT,
        AGENT,
        answer.conversation_id,
    )
    [audit] = store.audit_log
    assert audit["subject"] == "alice"
    assert audit["detail"]["requestId"] == "r-1"


def test_a_new_conversation_id_is_a_random_uuid4_in_hex() -> None:
    made = [schemas.new_conversation_id() for _ in range(2000)]
    assert len(set(made)) == len(made)
    for value in made:
        parsed = uuid.UUID(hex=value)
        assert parsed.hex == value  # 32 lowercase hex digits, as uuid4().hex
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122
    # Every bit that is not the version or the variant varies.
    ored = anded = int(made[0], 16)
    for value in made[1:]:
        ored |= int(value, 16)
        anded &= int(value, 16)
    free = ored & ~anded
    assert bin(free).count("1") == 128 - 6


async def test_the_agent_layer_follows_a_new_config() -> None:
    # The agent layer and the window are derived once per config object (a cache):
    # a config put in its place must be what the next turn is told.
    given = services(
        echo.EchoProvider(params={"echoSystem": True}),
        agent_config=config.parse(
            {"role": "pm", "instructions": "Be brief.", "model": {"provider": "echo", "name": "e"}}
        ),
    )
    first = await turns.run(given, schemas.InvokeRequest(input="hi"), CALLER, request_id=None)
    assert "Product Manager" in first.output
    assert "Be brief." in first.output

    given.config = config.parse(
        {
            "role": "qa",
            "persona": {"name": "Quinn"},
            "instructions": "Test everything.",
            "model": {"provider": "echo", "name": "e", "contextWindow": 8},
        }
    )
    with pytest.raises(context.ContextOverflowError):  # the new, tiny window
        await turns.prepare(given, schemas.InvokeRequest(input="hi"), CALLER, request_id=None)
    given.config = given.config.model_copy(
        update={"model": given.config.model.model_copy(update={"context_window": 4096})}
    )
    second = await turns.run(given, schemas.InvokeRequest(input="hi"), CALLER, request_id=None)
    assert "You are Quinn, the QA Engineer." in second.output
    assert "Test everything." in second.output
    assert "Product Manager" not in second.output
    assert "Be brief." not in second.output


class HeldProvider(echo.EchoProvider):
    """Answers only once released."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = asyncio.Event()
        self.release = asyncio.Event()

    async def complete(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> ports.Completion:
        self.asked.set()
        await self.release.wait()
        return await super().complete(messages, params=params)


def inflight(given: turns.Services) -> float | None:
    return given.metrics.registry.get_sample_value("bmad_agent_inflight")


async def test_inflight_counts_the_turns_at_the_model() -> None:
    held = HeldProvider()
    given = services(held)
    assert inflight(given) == 0
    running = asyncio.create_task(
        turns.run(given, schemas.InvokeRequest(input="hi"), CALLER, request_id=None)
    )
    await asyncio.wait_for(held.asked.wait(), timeout=10)
    assert inflight(given) == 1
    held.release.set()
    await asyncio.wait_for(running, timeout=10)
    assert inflight(given) == 0
    failing = services(echo.ScriptedProvider(fail_times=1))
    with pytest.raises(router.AllProvidersFailedError):
        await turns.run(failing, schemas.InvokeRequest(input="hi"), CALLER, request_id=None)
    assert inflight(failing) == 0  # a failed call ends too


async def test_a_refusing_limiter_is_a_rate_limited_error_with_the_wait() -> None:
    given = services(limiter=RefusingLimiter())
    with pytest.raises(turns.RateLimitedError) as refused:
        await turns.prepare(given, schemas.InvokeRequest(input="x"), CALLER, request_id=None)
    assert refused.value.wait == 2.5
    assert store_of(given).usage == []


async def test_a_context_that_cannot_fit_is_a_context_overflow_error() -> None:
    tiny = config.parse(
        {"role": "qa", "model": {"provider": "echo", "name": "echo-1", "contextWindow": 8}}
    )
    with pytest.raises(context.ContextOverflowError):
        await turns.prepare(
            services(agent_config=tiny),
            schemas.InvokeRequest(input="word " * 50),
            CALLER,
            request_id=None,
        )


async def test_every_slot_busy_is_refused_at_once_with_a_message() -> None:
    given = services(concurrency=1)
    assert given.slots is not None
    async with given.slots:
        with pytest.raises(turns.RateLimitedError, match=r"spec\.limits\.concurrency"):
            turns.check_capacity(given)
    turns.check_capacity(given)  # free again: no error


class FailingModel(echo.EchoProvider):
    async def complete(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> ports.Completion:
        raise base.ProviderError("down", provider="echo", model="echo-1", retryable=False)


async def test_every_model_failing_is_a_domain_error_and_nothing_is_recorded() -> None:
    given = services(FailingModel())
    with pytest.raises(router.AllProvidersFailedError):
        await turns.run(given, schemas.InvokeRequest(input="x"), CALLER, request_id=None)
    assert store_of(given).usage == []


async def test_a_task_runs_as_the_tenants_bus_principal_and_answers_the_invoke_json() -> None:
    given = services()

    output = await turns.run_task(given, {"input": "shard the PRD"})

    assert output["output"] == "[echo-1] shard the PRD"
    assert output["usage"]["tokensOut"] > 0
    assert set(output) >= {"conversationId", "model", "provider", "latencyMs"}
    [audit] = store_of(given).audit_log
    assert audit["subject"] == turns.TASK_SUBJECT


async def test_a_task_that_is_not_an_invoke_request_fails_validation() -> None:
    with pytest.raises(pydantic.ValidationError):
        await turns.run_task(services(), {"text": "no input field"})


async def test_a_stream_holds_a_slot_and_one_left_early_is_recorded_as_far_as_it_went() -> None:
    """Issue 10, hole 7 (the use case's side)."""
    given = services(echo.ScriptedProvider(["alpha beta gamma delta"]), concurrency=1)
    turn = await turns.prepare(given, schemas.InvokeRequest(input="go"), CALLER, request_id="r")
    answer = streams.stream(turn)
    first = await anext(answer)
    second = await anext(answer)
    assert given.slots is not None
    assert given.slots.locked(), "the stream holds the replica's only slot"

    await answer.aclose()  # the caller went away after two pieces
    await streams.drain(given)

    assert not given.slots.locked()
    assert isinstance(first, base.Delta)
    assert isinstance(second, base.Delta)
    sent = first.text + second.text
    assert (first.provider, first.model) == ("scripted", "scripted-1")
    store = store_of(given)
    [usage] = store.usage
    assert usage.tokens_out == context.estimate_tokens(sent)
    assert usage.tokens_in == context.count_tokens(turn.messages)
    [audit] = store.audit_log
    assert audit["detail"]["finishReason"] == "client_disconnected"
    history = await store.history(
        turn.conversation_id, tenant=TENANT, agent=AGENT, subject=CALLER.subject
    )
    assert [(t.role, t.content) for t in history] == [("user", "go"), ("assistant", sent)]


async def test_a_stream_that_ends_normally_is_recorded_once() -> None:
    given = services(concurrency=1)
    turn = await turns.prepare(given, schemas.InvokeRequest(input="hi"), CALLER, request_id="r")
    events = [event async for event in streams.stream(turn)]
    await streams.drain(given)

    assert isinstance(events[-1], schemas.InvokeResponse)
    store = store_of(given)
    assert len(store.usage) == 1
    assert store.audit_log[0]["detail"]["finishReason"] == "stop"
