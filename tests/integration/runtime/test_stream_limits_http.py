"""Streamed invocations over real HTTP (uvicorn on loopback) with the durable store on
the test bed's PostgreSQL and Redis: a stream holds a concurrency slot, and a client
that goes away in the middle leaves the usage record, the audit entry and the turns of
what was spent.

Issue 10, hole 7. The model is a stand-in that streams three pieces and then waits
for more that never come (a long answer), so the test decides when the client leaves.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import httpx
import pytest
import uvicorn

from bmad_runtime import app as app_mod
from bmad_runtime import config, context, ports, settings
from bmad_runtime.memory import store as memory_store
from bmad_runtime.providers import base, router
from bmad_testbed import databases, procs

pytestmark = [pytest.mark.integration, pytest.mark.timeout(120)]

PIECES = ("one ", "two ", "three ")


@pytest.fixture(autouse=True)
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("BMAD_", "OTEL_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


class Trickle(base.BaseProvider):
    """Streams `PIECES`, then waits for the rest of a long answer until it is closed."""

    name = "trickle"
    model = "trickle-1"

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def complete(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> ports.Completion:
        text = "a whole answer"
        return ports.Completion(text, base.estimate_usage(messages, text), self.model, self.name)

    async def stream_events(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> AsyncGenerator[base.StreamEvent, None]:
        try:
            for piece in PIECES:
                yield base.Delta(piece)
            await asyncio.Event().wait()  # the rest of the answer never comes
        finally:
            self.closed.set()


@pytest.fixture
async def dsn(postgres_url: str) -> AsyncIterator[str]:
    async with databases.temporary(postgres_url, "bmad_sse") as url:
        yield url


@pytest.fixture
async def store(dsn: str, redis_url: str) -> AsyncIterator[memory_store.PostgresRedisStore]:
    opened = await memory_store.PostgresRedisStore.connect(postgres_dsn=dsn, redis_url=redis_url)
    try:
        yield opened
    finally:
        await opened.close()


async def until(check: Callable[[], Awaitable[bool]], *, what: str, timeout_s: float = 20) -> None:
    deadline = time.monotonic() + timeout_s
    while not await check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


async def running(app: Any) -> AsyncIterator[str]:
    """The app behind a real uvicorn server on a loopback port; yields its base URL."""
    port = procs.free_port()
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on")
    )
    serving = asyncio.create_task(server.serve())
    try:
        await until(lambda: asyncio.sleep(0, server.started), what="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=30)


def make_app(store: memory_store.PostgresRedisStore, tenant: str, model: Trickle) -> Any:
    return app_mod.create_app(
        settings.RuntimeSettings(agent_name="pm-1", agent_namespace=tenant),
        store=store,
        providers=router.ModelRouter([model]),
        authenticator=None,
        limiter=None,
        config=config.parse(
            {
                "role": "pm",
                "model": {"provider": "echo", "name": "trickle-1"},
                "limits": {"concurrency": 1},
            }
        ),
    )


async def read_pieces(streamed: httpx.Response) -> list[str]:
    """The text of the stream's delta events, until all of `PIECES` arrived."""
    assert streamed.status_code == 200
    seen: list[str] = []
    async for line in streamed.aiter_lines():
        if line.startswith("data: "):
            seen.append(json.loads(line[len("data: ") :])["text"])
        if len(seen) == len(PIECES):
            break
    return seen


async def _is_set(event: asyncio.Event) -> bool:
    return event.is_set()


async def test_a_stream_holds_a_concurrency_slot_until_it_ends(
    store: memory_store.PostgresRedisStore,
) -> None:
    """Before the fix (a stream took no slot) this test failed with:

    AssertionError: a second invoke while the stream runs: 200 (expected 429)
    """
    tenant, model = f"acme-{secrets.token_hex(4)}", Trickle()
    async for url in running(make_app(store, tenant, model)):
        async with httpx.AsyncClient(base_url=url, timeout=30) as client:
            async with client.stream(
                "POST", "/v1/invoke", json={"input": "write it all", "stream": True}
            ) as streamed:
                await read_pieces(streamed)
                second = await client.post("/v1/invoke", json={"input": "me too"})
            # The client has gone: the stream ends and gives its slot back.
            await until(lambda: _is_set(model.closed), what="the model stream to be closed")
            third = await client.post("/v1/invoke", json={"input": "now me"})

    assert second.status_code == 429, (
        f"a second invoke while the stream runs: {second.status_code} (expected 429)"
    )
    assert second.json()["error"]["code"] == "rate_limited"
    assert third.status_code == 200, third.text


async def test_a_client_that_drops_a_stream_leaves_records_of_what_was_spent(
    store: memory_store.PostgresRedisStore,
) -> None:
    """Before the fix (nothing was recorded unless the stream ended) this test failed
    with:

        AssertionError: timed out waiting for the dropped stream's audit entry
    """
    tenant, model = f"acme-{secrets.token_hex(4)}", Trickle()

    async def dropped() -> list[dict[str, Any]]:
        entries = await store.audits.entries(tenant)
        return [e for e in entries if e["detail"].get("finishReason") == "client_disconnected"]

    async for url in running(make_app(store, tenant, model)):
        async with (
            httpx.AsyncClient(base_url=url, timeout=30) as client,
            client.stream(
                "POST", "/v1/invoke", json={"input": "write it all", "stream": True}
            ) as streamed,
        ):
            sent = await read_pieces(streamed)
        await until(lambda: _is_set(model.closed), what="the model stream to be closed")
        await until(
            lambda: _truthy(dropped()), what="the dropped stream's audit entry", timeout_s=10
        )

    [entry] = await dropped()
    detail = entry["detail"]
    assert entry["action"] == "agent.invoke"
    assert entry["subject"] == "anonymous"
    assert detail["tokensOut"] == context.estimate_tokens("".join(sent))
    assert detail["tokensIn"] > 0
    assert (detail["model"], detail["provider"]) == ("trickle-1", "trickle")
    [usage] = await store.usage.monthly(tenant)
    assert (usage["model"], usage["requests"]) == ("trickle-1", 1)
    assert usage["tokens_out"] == detail["tokensOut"]
    assert usage["tokens_in"] == detail["tokensIn"]
    history = await store.history(
        detail["conversationId"], tenant=tenant, agent="pm-1", subject="anonymous"
    )
    assert [(t.role, t.content) for t in history] == [
        ("user", "write it all"),
        ("assistant", "".join(PIECES)),
    ], "the turns hold what the caller was sent"


async def _truthy(found: Awaitable[list[dict[str, Any]]]) -> bool:
    return bool(await found)
