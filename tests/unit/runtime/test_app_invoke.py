"""`POST /v1/invoke` and the conversation routes, with the echo provider and the fake store."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import fastapi
import httpx
import pytest

from bmad_runtime import app as app_mod
from bmad_runtime import config, context, ports, settings
from bmad_runtime.memory import inprocess
from bmad_runtime.providers import base, echo, router

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # RuntimeSettings reads BMAD_* (the test bed exports BMAD_REDIS_URL, for one).
    for name in list(os.environ):
        if name.startswith(("BMAD_", "OTEL_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


def make_settings(**overrides: Any) -> settings.RuntimeSettings:
    values: dict[str, Any] = {"agent_name": "analyst-1", "agent_namespace": "team-a"}
    values.update(overrides)
    return settings.RuntimeSettings(**values)


def make_app(
    store: ports.ConversationStore,
    *chain: base.BaseProvider,
    agent_config: config.AgentConfig | None = None,
) -> fastapi.FastAPI:
    return app_mod.create_app(
        make_settings(),
        store=store,
        providers=router.ModelRouter(list(chain) or [echo.EchoProvider()]),
        authenticator=None,
        limiter=None,
        config=agent_config,
    )


@pytest.fixture
async def store() -> inprocess.InProcessStore:
    return inprocess.InProcessStore()


async def serve(app: fastapi.FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            yield client


@pytest.fixture
async def client(store: inprocess.InProcessStore) -> AsyncIterator[httpx.AsyncClient]:
    async for c in serve(make_app(store)):
        yield c


def parse_sse(text: str) -> list[tuple[str, Any]]:
    events = []
    for block in text.split("\n\n"):
        if not block.strip():
            continue
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


async def test_invoke_answers_with_echo_and_usage(
    client: httpx.AsyncClient, store: inprocess.InProcessStore
) -> None:
    response = await client.post("/v1/invoke", json={"input": "hello there world"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["output"] == "[echo-1] hello there world"
    assert body["model"] == "echo-1"
    assert body["provider"] == "echo"
    assert body["usage"]["tokensOut"] == 4  # "[echo-1] hello there world"
    # The system layer ("You are the ...") is sent too and counted as input.
    assert body["usage"]["tokensIn"] > 3
    assert isinstance(body["latencyMs"], int)
    assert body["conversationId"]

    [usage] = store.usage
    assert (usage.tenant, usage.agent, usage.model, usage.provider) == (
        "team-a",
        "analyst-1",
        "echo-1",
        "echo",
    )
    assert usage.tokens_out == 4
    assert usage.conversation_id == body["conversationId"]
    [audit] = store.audit_log
    assert audit["action"] == "agent.invoke"
    assert audit["subject"] == "anonymous"
    assert "hello" not in json.dumps(audit)  # the audit log never holds the text


async def test_invoke_streams_server_sent_events(
    client: httpx.AsyncClient, store: inprocess.InProcessStore
) -> None:
    response = await client.post("/v1/invoke", json={"input": "stream me please", "stream": True})

    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/event-stream")
    assert response.headers["cache-control"] == "no-store"
    events = parse_sse(response.text)
    kinds = [kind for kind, _ in events]
    assert kinds[-1] == "done"
    assert set(kinds[:-1]) == {"delta"}
    assert len(kinds) > 2
    text = "".join(data["text"] for kind, data in events if kind == "delta")
    assert text == "[echo-1] stream me please"
    done = events[-1][1]
    assert done["output"] == text
    assert done["usage"]["tokensOut"] == 4
    assert len(store.usage) == 1


async def test_conversation_continues_on_a_second_app_sharing_the_store(
    store: inprocess.InProcessStore,
) -> None:
    first_model = echo.ScriptedProvider(["Mary here."], model="scripted-a")
    second_model = echo.ScriptedProvider(["Still Mary."], model="scripted-b")

    async for first in serve(make_app(store, first_model)):
        answer = await first.post("/v1/invoke", json={"input": "Hi, who are you?"})
        conversation = answer.json()["conversationId"]
    async for second in serve(make_app(store, second_model)):
        again = await second.post(
            "/v1/invoke", json={"input": "And what do you do?", "conversationId": conversation}
        )
        listed = await second.get("/v1/conversations")
        history = await second.get(f"/v1/conversations/{conversation}/messages")

    assert again.status_code == 200
    assert again.json()["conversationId"] == conversation
    [sent] = second_model.calls
    conversation_part = [(m.role, m.content) for m in sent if m.role != "system"]
    assert conversation_part == [
        ("user", "Hi, who are you?"),
        ("assistant", "Mary here."),
        ("user", "And what do you do?"),
    ]
    assert [c["conversationId"] for c in listed.json()["conversations"]] == [conversation]
    assert listed.json()["conversations"][0]["turns"] == 4
    messages = history.json()["messages"]
    assert [(m["role"], m["model"]) for m in messages] == [
        ("user", None),
        ("assistant", "scripted-a"),
        ("user", None),
        ("assistant", "scripted-b"),
    ]


async def test_persona_and_instructions_are_the_system_layer(
    store: inprocess.InProcessStore,
) -> None:
    model = echo.ScriptedProvider(["ok"])
    agent_config = config.parse(
        {
            "role": "analyst",
            "persona": {"name": "Mary", "style": "curious"},
            "instructions": "Always ask one question back.",
            "model": {"provider": "echo", "name": "echo-1", "params": {"temperature": 0.1}},
        }
    )
    async for client in serve(make_app(store, model, agent_config=agent_config)):
        await client.post("/v1/invoke", json={"input": "hi", "params": {"maxTokens": 50}})

    [sent] = model.calls
    assert sent[0].role == "system"
    assert "You are Mary, the Business Analyst." in sent[0].content
    assert "Always ask one question back." in sent[0].content
    assert model.params_seen == [{"max_tokens": 50}]


async def test_a_stateless_agent_keeps_no_turns(store: inprocess.InProcessStore) -> None:
    stateless = config.parse(
        {"role": "qa", "model": {"provider": "echo", "name": "echo-1"}, "memory": {"turns": 0}}
    )
    async for client in serve(make_app(store, agent_config=stateless)):
        response = await client.post("/v1/invoke", json={"input": "hello"})
    assert response.status_code == 200
    assert store.conversations == {}
    assert len(store.usage) == 1


async def test_failover_names_the_fallback_model(store: inprocess.InProcessStore) -> None:
    primary = echo.ScriptedProvider(["never"], model="primary-1", fail_times=99)
    fallback = echo.ScriptedProvider(["from the fallback"], model="fallback-1", name="echo")
    async for client in serve(make_app(store, primary, fallback)):
        response = await client.post("/v1/invoke", json={"input": "hi"})
    assert response.status_code == 200
    assert response.json()["model"] == "fallback-1"
    assert response.json()["output"] == "from the fallback"
    assert store.usage[0].model == "fallback-1"


async def test_every_model_failing_is_a_502_naming_them(store: inprocess.InProcessStore) -> None:
    primary = echo.ScriptedProvider(["x"], model="primary-1", fail_times=99)
    fallback = echo.ScriptedProvider(["x"], model="fallback-1", fail_times=99, failure_status=503)
    async for client in serve(make_app(store, primary, fallback)):
        response = await client.post("/v1/invoke", json={"input": "hi"})
        streamed = await client.post("/v1/invoke", json={"input": "hi", "stream": True})
    for answer in (response, streamed):
        assert answer.status_code == 502
        error = answer.json()["error"]
        assert error["code"] == "model_unavailable"
        assert "scripted/primary-1: HTTP 500" in error["message"]
        assert "scripted/fallback-1: HTTP 503" in error["message"]
    assert store.usage == []


async def test_every_model_rate_limited_is_a_503_with_retry_after(
    store: inprocess.InProcessStore,
) -> None:
    limited = echo.ScriptedProvider(["x"], fail_times=99, failure_status=429)
    async for client in serve(make_app(store, limited)):
        response = await client.post("/v1/invoke", json={"input": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "model_rate_limited"
    assert int(response.headers["retry-after"]) >= 1


class BreaksMidStream(echo.EchoProvider):
    async def stream_events(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> Any:
        yield base.Delta("half an ")
        raise base.ProviderError("stream broke off", provider=self.name, model=self.model)


async def test_a_stream_that_breaks_after_starting_ends_with_an_error_event(
    store: inprocess.InProcessStore,
) -> None:
    fallback = echo.ScriptedProvider(["unused"])
    async for client in serve(make_app(store, BreaksMidStream(), fallback)):
        response = await client.post("/v1/invoke", json={"input": "hi", "stream": True})
    events = parse_sse(response.text)
    assert events[0] == ("delta", {"text": "half an "})
    kind, data = events[-1]
    assert kind == "error"
    assert data["error"]["code"] == "model_failed"
    assert fallback.calls == []  # no second model's answer glued onto the first's
    # What the caller was sent was spent: it is on record, as far as it went.
    [usage] = store.usage
    assert usage.tokens_out == context.estimate_tokens("half an ")
    assert store.audit_log[-1]["detail"]["finishReason"] == "error"


async def test_unknown_conversation_is_404_and_delete_is_audited(
    client: httpx.AsyncClient, store: inprocess.InProcessStore
) -> None:
    missing = await client.get("/v1/conversations/nope/messages")
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "conversation_not_found"
    assert (await client.delete("/v1/conversations/nope")).status_code == 404

    created = await client.post("/v1/invoke", json={"input": "remember me"})
    conversation = created.json()["conversationId"]
    deleted = await client.delete(f"/v1/conversations/{conversation}")
    assert deleted.status_code == 204
    assert deleted.content == b""
    assert (await client.get(f"/v1/conversations/{conversation}/messages")).status_code == 404
    assert store.audit_log[-1]["action"] == "conversation.delete"
    assert store.audit_log[-1]["detail"] == {"conversationId": conversation}


async def test_conversations_of_another_tenant_are_invisible(
    store: inprocess.InProcessStore,
) -> None:
    other = ports.Turn("theirs", "user", "secret plans", dt.datetime.now(dt.UTC))
    await store.append(other, tenant="team-b", agent="analyst-1", subject="anonymous")
    async for client in serve(make_app(store)):
        listed = await client.get("/v1/conversations")
        read = await client.get("/v1/conversations/theirs/messages")
        deleted = await client.delete("/v1/conversations/theirs")
    assert listed.json() == {"conversations": []}
    assert read.status_code == 404
    assert deleted.status_code == 404
    assert ("team-b", "analyst-1", "theirs") in store.conversations


async def test_the_remembered_window_starts_with_a_question(
    store: inprocess.InProcessStore,
) -> None:
    model = echo.ScriptedProvider(["a1", "a2", "a3"])
    three_turns = config.parse(
        {"role": "qa", "model": {"provider": "echo", "name": "echo-1"}, "memory": {"turns": 3}}
    )
    async for client in serve(make_app(store, model, agent_config=three_turns)):
        first = await client.post("/v1/invoke", json={"input": "q1"})
        conversation = first.json()["conversationId"]
        for text in ("q2", "q3"):
            await client.post("/v1/invoke", json={"input": text, "conversationId": conversation})
    last = [(m.role, m.content) for m in model.calls[-1] if m.role != "system"]
    # The last three turns stored are a1, q2, a2: the leading answer is dropped.
    assert last == [("user", "q2"), ("assistant", "a2"), ("user", "q3")]


class _SlowEcho(echo.EchoProvider):
    """Echo that holds its model call open until released."""

    def __init__(self) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.entered = asyncio.Event()

    async def complete(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> ports.Completion:
        self.entered.set()
        await self.release.wait()
        return await super().complete(messages, params=params)


async def test_concurrency_limit_answers_429_while_every_slot_is_busy(
    store: inprocess.InProcessStore,
) -> None:
    slow = _SlowEcho()
    agent_config = config.echo_config(agent="analyst-1").model_copy(
        update={"limits": config.echo_config().limits.model_copy(update={"concurrency": 1})}
    )
    async for client in serve(make_app(store, slow, agent_config=agent_config)):
        first = asyncio.create_task(client.post("/v1/invoke", json={"input": "one"}))
        await asyncio.wait_for(slow.entered.wait(), timeout=5)
        busy = await client.post("/v1/invoke", json={"input": "two"})
        assert busy.status_code == 429
        assert busy.headers["Retry-After"] == "1"
        assert "spec.limits.concurrency" in busy.json()["error"]["message"]
        slow.release.set()
        done = await first
        assert done.status_code == 200
        after = await client.post("/v1/invoke", json={"input": "three"})
        assert after.status_code == 200
