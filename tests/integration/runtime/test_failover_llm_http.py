"""The runtime against real HTTP servers on loopback that speak the OpenAI and Anthropic
APIs as documented: failover from a primary that keeps answering 500, Anthropic
success and 401, and a 429 whose Retry-After is waited out.

The app is the production one (`create_default_app`): agent.json and the llm bindings
are files, as the operator mounts them; only the datastores are left out (in-memory).
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import fastapi
import httpx
import pytest

from bmad_runtime import settings, wiring

pytestmark = pytest.mark.integration

KEY = "sk-loopback-test-key"

Answer = Callable[[dict[str, Any]], tuple[int, dict[str, str], bytes]]


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: dict[str, Any]
    at: float


@dataclass
class FakeLLM:
    """One HTTP server; per path, a list of answers given in order (the last repeats)."""

    scripts: dict[str, list[Answer]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    url: str = ""

    def on(self, path: str, *answers: Answer) -> None:
        self.scripts[path] = list(answers)

    def requests(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path == path]

    def answer(self, path: str, body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        script = self.scripts.get(path)
        if not script:
            return 404, {}, b'{"error": {"type": "not_found"}}'
        count = len(self.requests(path))
        return script[min(count, len(script)) - 1](body)


@pytest.fixture
def llm() -> Iterator[FakeLLM]:
    fake = FakeLLM()

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self._answer(f"GET {self.path}", {})

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self._answer(self.path, json.loads(self.rfile.read(length) or b"{}"))

        def _answer(self, path: str, body: dict[str, Any]) -> None:
            headers_seen = {k.lower(): v for k, v in self.headers.items()}
            fake.seen.append(Seen(path, headers_seen, body, time.monotonic()))
            status, headers, payload = fake.answer(path, body)
            self.send_response(status)
            headers = {"Content-Type": "application/json", **headers}
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield fake
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def openai_ok(text: str) -> Answer:
    """A chat completion in OpenAI's documented shape, streamed when asked."""

    def answer(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if body.get("stream"):
            words = text.split(" ")
            chunks = [
                {"choices": [{"index": 0, "delta": {"content": (" " if i else "") + w}}]}
                for i, w in enumerate(words)
            ]
            chunks.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})
            chunks.append({"choices": [], "usage": {"prompt_tokens": 21, "completion_tokens": 5}})
            payload = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
            return 200, {"Content-Type": "text/event-stream"}, payload.encode()
        return (
            200,
            {},
            json.dumps(
                {
                    "id": "chatcmpl-1",
                    "object": "chat.completion",
                    "model": body["model"],
                    "choices": [
                        {
                            "index": 0,
                            "message": {"role": "assistant", "content": text},
                            "finish_reason": "stop",
                        }
                    ],
                    "usage": {"prompt_tokens": 21, "completion_tokens": 5, "total_tokens": 26},
                }
            ).encode(),
        )

    return answer


def failing(status: int, kind: str, headers: dict[str, str] | None = None) -> Answer:
    def answer(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        error = {"error": {"message": f"upstream says {KEY}", "type": kind, "code": None}}
        return status, headers or {}, json.dumps(error).encode()

    return answer


def anthropic_ok(text: str) -> Answer:
    def answer(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        if body.get("stream"):
            events = [
                (
                    "message_start",
                    {
                        "type": "message_start",
                        "message": {"usage": {"input_tokens": 17, "output_tokens": 1}},
                    },
                ),
                (
                    "content_block_start",
                    {
                        "type": "content_block_start",
                        "index": 0,
                        "content_block": {"type": "text", "text": ""},
                    },
                ),
                (
                    "content_block_delta",
                    {
                        "type": "content_block_delta",
                        "index": 0,
                        "delta": {"type": "text_delta", "text": text},
                    },
                ),
                ("content_block_stop", {"type": "content_block_stop", "index": 0}),
                (
                    "message_delta",
                    {
                        "type": "message_delta",
                        "delta": {"stop_reason": "end_turn"},
                        "usage": {"output_tokens": 4},
                    },
                ),
                ("message_stop", {"type": "message_stop"}),
            ]
            payload = "".join(f"event: {e}\ndata: {json.dumps(d)}\n\n" for e, d in events)
            return 200, {"Content-Type": "text/event-stream"}, payload.encode()
        message = {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": body["model"],
            "content": [{"type": "text", "text": text}],
            "stop_reason": "end_turn",
            "usage": {"input_tokens": 17, "output_tokens": 4},
        }
        return 200, {}, json.dumps(message).encode()

    return answer


def anthropic_401() -> Answer:
    def answer(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        error = {
            "type": "error",
            "error": {"type": "authentication_error", "message": "invalid x-api-key"},
        }
        return 401, {}, json.dumps(error).encode()

    return answer


def write_binding(root: Path, name: str, **data: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for key, value in data.items():
        (folder / key).write_text(value)


@pytest.fixture(autouse=True)
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("BMAD_", "OTEL_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


def production_app(tmp_path: Path, model: dict[str, Any], **overrides: Any) -> fastapi.FastAPI:
    config_path = tmp_path / "agent.json"
    config_path.write_text(json.dumps({"agent": "dev-1", "role": "dev", "model": model}))
    values: dict[str, Any] = {
        "agent_name": "dev-1",
        "agent_namespace": "acme",
        "agent_config": config_path,
        "binding_root": tmp_path / "bindings",
        "auth_mode": "none",
        "memory_store": "inProcess",  # no datastores: these tests are about the models
        "model_backoff_seconds": 0.01,
        "model_backoff_max_seconds": 0.05,
    }
    values.update(overrides)
    return wiring.create_default_app(settings.RuntimeSettings(**values))


async def serve(app: fastapi.FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(
            transport=transport, base_url="http://agent", timeout=30
        ) as client:
            yield client


def two_openai_endpoints(tmp_path: Path, llm: FakeLLM) -> dict[str, Any]:
    write_binding(
        tmp_path / "bindings",
        "primary-llm",
        type="llm",
        provider="openai-compatible",
        baseUrl=f"{llm.url}/primary/v1",
        apiKey=KEY,
    )
    write_binding(
        tmp_path / "bindings",
        "fallback-llm",
        type="llm",
        provider="openai-compatible",
        baseUrl=f"{llm.url}/fallback/v1",
        apiKey=KEY + "-2",
    )
    return {
        "provider": "openai-compatible",
        "name": "gpt-primary",
        "integration": "primary-llm",
        "params": {"temperature": 0.2},
        "fallbacks": [
            {"provider": "openai-compatible", "name": "gpt-fallback", "integration": "fallback-llm"}
        ],
    }


async def test_primary_answering_500_three_times_fails_over_to_the_fallback(
    tmp_path: Path, llm: FakeLLM
) -> None:
    model = two_openai_endpoints(tmp_path, llm)
    llm.on("/primary/v1/chat/completions", failing(500, "server_error"))
    llm.on("/fallback/v1/chat/completions", openai_ok("Hello from the fallback"))

    async for client in serve(production_app(tmp_path, model, model_attempts=3)):
        response = await client.post("/v1/invoke", json={"input": "Say hello"})

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == "gpt-fallback"
    assert body["provider"] == "openai-compatible"
    assert body["output"] == "Hello from the fallback"
    assert body["usage"] == {"tokensIn": 21, "tokensOut": 5}
    primary = llm.requests("/primary/v1/chat/completions")
    fallback = llm.requests("/fallback/v1/chat/completions")
    assert len(primary) == 3
    assert len(fallback) == 1
    assert primary[0].headers["authorization"] == f"Bearer {KEY}"
    assert fallback[0].headers["authorization"] == f"Bearer {KEY}-2"
    assert fallback[0].body["model"] == "gpt-fallback"
    assert fallback[0].body["temperature"] == 0.2
    assert fallback[0].body["messages"][-1] == {"role": "user", "content": "Say hello"}
    assert KEY not in response.text


async def test_a_stream_fails_over_before_its_first_piece(tmp_path: Path, llm: FakeLLM) -> None:
    model = two_openai_endpoints(tmp_path, llm)
    llm.on("/primary/v1/chat/completions", failing(503, "overloaded"))
    llm.on("/fallback/v1/chat/completions", openai_ok("streamed from the fallback"))

    async for client in serve(production_app(tmp_path, model, model_attempts=2)):
        response = await client.post("/v1/invoke", json={"input": "Stream", "stream": True})

    assert response.status_code == 200
    blocks = [b for b in response.text.split("\n\n") if b.strip()]
    deltas = [json.loads(b.split("data: ", 1)[1])["text"] for b in blocks if "event: delta" in b]
    assert "".join(deltas) == "streamed from the fallback"
    done = json.loads(blocks[-1].split("data: ", 1)[1])
    assert blocks[-1].startswith("event: done")
    assert done["model"] == "gpt-fallback"
    assert done["usage"] == {"tokensIn": 21, "tokensOut": 5}
    assert len(llm.requests("/primary/v1/chat/completions")) == 2
    assert llm.requests("/fallback/v1/chat/completions")[0].body["stream"] is True


async def test_every_model_failing_is_a_502(tmp_path: Path, llm: FakeLLM) -> None:
    model = two_openai_endpoints(tmp_path, llm)
    llm.on("/primary/v1/chat/completions", failing(500, "server_error"))
    llm.on("/fallback/v1/chat/completions", failing(400, "invalid_request_error"))

    async for client in serve(production_app(tmp_path, model, model_attempts=2)):
        response = await client.post("/v1/invoke", json={"input": "hi"})

    assert response.status_code == 502
    error = response.json()["error"]
    assert error["code"] == "model_unavailable"
    assert "gpt-primary: HTTP 500 (server_error)" in error["message"]
    assert "gpt-fallback: HTTP 400 (invalid_request_error)" in error["message"]
    assert KEY not in response.text
    assert len(llm.requests("/fallback/v1/chat/completions")) == 1  # a 400 is not retried


def anthropic_agent(tmp_path: Path, llm: FakeLLM) -> dict[str, Any]:
    write_binding(
        tmp_path / "bindings",
        "claude",
        type="llm",
        provider="anthropic",
        baseUrl=llm.url,
        apiKey=KEY,
    )
    return {"provider": "anthropic", "name": "claude-sonnet-4-5", "integration": "claude"}


async def test_anthropic_messages_api_success(tmp_path: Path, llm: FakeLLM) -> None:
    model = anthropic_agent(tmp_path, llm)
    llm.on("/v1/messages", anthropic_ok("Hi, I am Claude."))

    async for client in serve(production_app(tmp_path, model)):
        response = await client.post("/v1/invoke", json={"input": "Who are you?"})
        streamed = await client.post("/v1/invoke", json={"input": "Again", "stream": True})

    assert response.status_code == 200
    body = response.json()
    assert (body["model"], body["provider"], body["output"]) == (
        "claude-sonnet-4-5",
        "anthropic",
        "Hi, I am Claude.",
    )
    assert body["usage"] == {"tokensIn": 17, "tokensOut": 4}
    first = llm.requests("/v1/messages")[0]
    assert first.headers["x-api-key"] == KEY
    assert first.headers["anthropic-version"] == "2023-06-01"
    assert first.body["system"].startswith("You are the Developer.")
    assert first.body["messages"] == [{"role": "user", "content": "Who are you?"}]
    assert first.body["max_tokens"] > 0
    assert "event: done" in streamed.text
    done = json.loads(streamed.text.strip().split("\n\n")[-1].split("data: ", 1)[1])
    assert done["output"] == "Hi, I am Claude."
    assert done["usage"] == {"tokensIn": 17, "tokensOut": 4}


async def test_anthropic_401_is_reported_without_retrying(tmp_path: Path, llm: FakeLLM) -> None:
    model = anthropic_agent(tmp_path, llm)
    llm.on("/v1/messages", anthropic_401())

    async for client in serve(production_app(tmp_path, model, model_attempts=3)):
        response = await client.post("/v1/invoke", json={"input": "hi"})

    assert response.status_code == 502
    error = response.json()["error"]
    assert "anthropic/claude-sonnet-4-5: HTTP 401 (authentication_error)" in error["message"]
    assert "API key" in error["message"]
    assert len(llm.requests("/v1/messages")) == 1


async def test_a_429_is_retried_after_its_retry_after(tmp_path: Path, llm: FakeLLM) -> None:
    model = anthropic_agent(tmp_path, llm)
    llm.on(
        "/v1/messages",
        failing(429, "rate_limit_error", headers={"Retry-After": "1"}),
        anthropic_ok("worth the wait"),
    )

    async for client in serve(production_app(tmp_path, model, model_attempts=3)):
        response = await client.post("/v1/invoke", json={"input": "hi"})

    assert response.status_code == 200
    assert response.json()["output"] == "worth the wait"
    first, second = llm.requests("/v1/messages")
    # The backoff alone would be ~0.01s: the second try waited for Retry-After.
    assert second.at - first.at >= 0.95


async def test_a_retry_after_longer_than_the_cap_is_shortened(tmp_path: Path, llm: FakeLLM) -> None:
    model = anthropic_agent(tmp_path, llm)
    llm.on(
        "/v1/messages",
        failing(429, "rate_limit_error", headers={"Retry-After": "3600"}),
        anthropic_ok("ok"),
    )
    app = production_app(tmp_path, model, model_attempts=2, model_retry_after_max_seconds=0.2)
    async for client in serve(app):
        # Capped, the retry waits 0.2 s; honoured, it would wait an hour: the deadline
        # only tells the two apart, it is no speed target.
        response = await asyncio.wait_for(client.post("/v1/invoke", json={"input": "hi"}), 60)
    assert response.status_code == 200
    assert len(llm.requests("/v1/messages")) == 2


def models_list(status: int) -> Answer:
    def answer(body: dict[str, Any]) -> tuple[int, dict[str, str], bytes]:
        return status, {}, json.dumps({"data": [{"id": "claude-sonnet-4-5"}]}).encode()

    return answer


async def test_readiness_probes_the_models_api_and_reports_an_outage(
    tmp_path: Path, llm: FakeLLM
) -> None:
    model = anthropic_agent(tmp_path, llm)
    llm.on("GET /v1/models", models_list(200))
    async for client in serve(production_app(tmp_path, model, ready_cache_seconds=0)):
        ready = await client.get("/readyz")
        llm.on("GET /v1/models", models_list(503))
        unreachable = await client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["models"] == [
        {"provider": "anthropic", "model": "claude-sonnet-4-5", "reachable": True}
    ]
    # Reported, and the replica stays in its Service: the model API is no part of it.
    assert unreachable.status_code == 200, unreachable.text
    body = unreachable.json()
    assert body["checks"] == {"store": True, "model": False, "auth": True, "bus": None}
    assert "no model of the chain answers" in body["message"]
    probe = llm.requests("GET /v1/models")[0]
    assert probe.headers["x-api-key"] == KEY


async def test_a_primary_model_outage_leaves_the_replica_ready_for_its_fallback(
    tmp_path: Path, llm: FakeLLM
) -> None:
    """Issue 10, hole 11: readiness followed the primary model alone, so an outage of
    its API took every replica out of its Service and the fallback never served. Before
    the fix this test failed with:

        AssertionError: the primary's outage: 503 {"status":"not-ready",
        "checks":{"store":true,"model":false,"auth":true},"memoryStore":"inProcess",
        "authMode":"none","message":"the primary model's API cannot be reached"}
    """
    model = two_openai_endpoints(tmp_path, llm)
    llm.on("GET /primary/v1/models", models_list(200))
    llm.on("GET /fallback/v1/models", models_list(200))
    llm.on("/primary/v1/chat/completions", failing(503, "server_error"))
    llm.on("/fallback/v1/chat/completions", openai_ok("the fallback serves"))
    app = production_app(tmp_path, model, ready_cache_seconds=0, model_attempts=1)
    async for client in serve(app):
        ready = await client.get("/readyz")
        llm.on("GET /primary/v1/models", models_list(503))  # the primary's API goes down
        outage = await client.get("/readyz")
        served = await client.post("/v1/invoke", json={"input": "hi"})

    assert ready.status_code == 200, ready.text
    assert outage.status_code == 200, f"the primary's outage: {outage.status_code} {outage.text}"
    body = outage.json()
    assert body["status"] == "ready"
    assert body["checks"] == {"store": True, "model": True, "auth": True, "bus": None}
    assert body["models"] == [
        {"provider": "openai-compatible", "model": "gpt-primary", "reachable": False},
        {"provider": "openai-compatible", "model": "gpt-fallback", "reachable": True},
    ]
    assert body["message"] is None
    assert served.status_code == 200, served.text
    assert served.json()["model"] == "gpt-fallback"
    # Each model's probe went to its own API with its own key.
    [primary_probe, *_] = llm.requests("GET /primary/v1/models")
    [fallback_probe, *_] = llm.requests("GET /fallback/v1/models")
    assert primary_probe.headers["authorization"] == f"Bearer {KEY}"
    assert fallback_probe.headers["authorization"] == f"Bearer {KEY}-2"
