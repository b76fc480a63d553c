"""The OpenAI-compatible and Anthropic providers against `httpx.MockTransport`: request
shape, answers, streaming, usage, retries with backoff and Retry-After, errors."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bmad_runtime import ports
from bmad_runtime.providers import anthropic, base, openai_compat

pytestmark = pytest.mark.unit

KEY = "sk-test-0123456789"
MESSAGES = [
    ports.Message("system", "You are terse."),
    ports.Message("user", "Say hi"),
]

Handler = Callable[[httpx.Request], httpx.Response]


class Recorder:
    """A scripted upstream: answers in order, remembers each request."""

    def __init__(self, *answers: httpx.Response | Handler) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]
        return answer(request) if callable(answer) else answer

    def body(self, index: int = -1) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.requests[index].content)
        return data


class Sleeps:
    def __init__(self) -> None:
        self.waits: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def openai(
    recorder: Recorder, *, attempts: int = 3, params: dict[str, Any] | None = None
) -> tuple[openai_compat.OpenAICompatProvider, Sleeps]:
    sleeps = Sleeps()
    provider = openai_compat.OpenAICompatProvider(
        name="openai-compatible",
        model="gpt-test",
        base_url="http://llm.local/v1/",
        api_key=KEY,
        params=params,
        transport=httpx.MockTransport(recorder),
        policy=base.RetryPolicy(attempts=attempts, backoff=0.5, backoff_max=2),
        sleep=sleeps,
    )
    return provider, sleeps


def claude(recorder: Recorder, *, attempts: int = 2) -> anthropic.AnthropicProvider:
    return anthropic.AnthropicProvider(
        name="anthropic",
        model="claude-test",
        base_url="http://claude.local",
        api_key=KEY,
        transport=httpx.MockTransport(recorder),
        policy=base.RetryPolicy(attempts=attempts, backoff=0),
        sleep=Sleeps(),
    )


def chat_answer(text: str, *, prompt: int = 7, completion: int = 2) -> httpx.Response:
    return httpx.Response(
        200,
        json={
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "model": "gpt-test-2024",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": prompt, "completion_tokens": completion},
        },
    )


def sse_body(*events: tuple[str | None, Any]) -> bytes:
    out = []
    for event, data in events:
        payload = data if isinstance(data, str) else json.dumps(data)
        out.append((f"event: {event}\n" if event else "") + f"data: {payload}\n\n")
    return "".join(out).encode()


async def test_openai_request_shape_and_answer() -> None:
    recorder = Recorder(chat_answer("Hi!"))
    provider, _ = openai(recorder, params={"temperature": 0.2, "maxTokens": 99, "model": "x"})

    completion = await provider.complete(MESSAGES, params={"max_tokens": 5})

    request = recorder.requests[0]
    assert str(request.url) == "http://llm.local/v1/chat/completions"
    assert request.headers["authorization"] == f"Bearer {KEY}"
    assert recorder.body() == {
        "model": "gpt-test",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Say hi"},
        ],
        "temperature": 0.2,
        "max_tokens": 5,
    }
    assert completion == ports.Completion(
        text="Hi!",
        usage=ports.Usage(tokens_in=7, tokens_out=2),
        model="gpt-test",
        provider="openai-compatible",
    )
    await provider.aclose()


async def test_openai_streams_deltas_and_usage() -> None:
    chunks = sse_body(
        (None, {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        (None, {"choices": [{"index": 0, "delta": {"content": "Hel"}}]}),
        (None, {"choices": [{"index": 0, "delta": {"content": "lo"}, "finish_reason": "stop"}]}),
        (None, {"choices": [], "usage": {"prompt_tokens": 11, "completion_tokens": 1}}),
        (None, "[DONE]"),
    )
    recorder = Recorder(
        httpx.Response(200, content=chunks, headers={"content-type": "text/event-stream"})
    )
    provider, _ = openai(recorder)

    events = [e async for e in provider.stream_events(MESSAGES, params={})]

    assert recorder.body()["stream"] is True
    assert recorder.body()["stream_options"] == {"include_usage": True}
    assert events[:2] == [base.Delta("Hel"), base.Delta("lo")]
    done = events[-1]
    assert isinstance(done, ports.Completion)
    assert done.text == "Hello"
    assert done.usage == ports.Usage(tokens_in=11, tokens_out=1)
    assert [t async for t in provider.stream(MESSAGES, params={})] == ["Hel", "lo"]


async def test_openai_retries_5xx_with_backoff_then_succeeds() -> None:
    recorder = Recorder(
        httpx.Response(500, json={"error": {"type": "server_error", "message": "boom"}}),
        httpx.Response(502),
        chat_answer("third time"),
    )
    provider, sleeps = openai(recorder)

    completion = await provider.complete(MESSAGES, params={})

    assert completion.text == "third time"
    assert len(recorder.requests) == 3
    assert len(sleeps.waits) == 2
    assert 0.25 <= sleeps.waits[0] <= 0.5  # half to full of backoff * 2**0
    assert 0.5 <= sleeps.waits[1] <= 1.0


async def test_openai_honours_retry_after_on_429() -> None:
    recorder = Recorder(
        httpx.Response(429, headers={"Retry-After": "7"}, json={"error": {"code": "rate_limit"}}),
        chat_answer("ok"),
    )
    provider, sleeps = openai(recorder)
    assert (await provider.complete(MESSAGES, params={})).text == "ok"
    assert sleeps.waits == [7.0]


async def test_retry_after_is_capped_by_the_policy() -> None:
    assert base.RetryPolicy(retry_after_max=5).delay(1, 3600) == 5
    assert base.RetryPolicy().delay(1, 0.5) == 0.5


async def test_openai_gives_up_after_its_attempts_with_a_safe_error() -> None:
    recorder = Recorder(
        httpx.Response(503, json={"error": {"code": "overloaded", "message": f"key {KEY}"}})
    )
    provider, sleeps = openai(recorder, attempts=3)

    with pytest.raises(base.ProviderError) as caught:
        await provider.complete(MESSAGES, params={})

    assert len(recorder.requests) == 3
    assert len(sleeps.waits) == 2
    error = caught.value
    assert error.status == 503
    assert error.retryable
    assert error.code == "overloaded"
    assert KEY not in str(error)
    assert KEY not in error.summary
    assert error.summary == "openai-compatible/gpt-test: HTTP 503 (overloaded)"


async def test_openai_does_not_retry_a_401() -> None:
    recorder = Recorder(
        httpx.Response(401, json={"error": {"code": "invalid_api_key", "message": KEY[:8]}})
    )
    provider, sleeps = openai(recorder)
    with pytest.raises(base.ProviderError) as caught:
        await provider.complete(MESSAGES, params={})
    assert len(recorder.requests) == 1
    assert sleeps.waits == []
    assert caught.value.status == 401
    assert "API key" in caught.value.message
    assert KEY[:8] not in caught.value.message


async def test_transport_errors_are_retried() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    recorder = Recorder(refuse, chat_answer("back"))
    provider, sleeps = openai(recorder)
    assert (await provider.complete(MESSAGES, params={})).text == "back"
    assert len(sleeps.waits) == 1


async def test_a_non_json_answer_is_a_provider_error() -> None:
    provider, _ = openai(Recorder(httpx.Response(200, content=b"<html>")))
    with pytest.raises(base.ProviderError, match="not JSON"):
        await provider.complete(MESSAGES, params={})


async def test_anthropic_request_shape_and_answer() -> None:
    recorder = Recorder(
        httpx.Response(
            200,
            json={
                "id": "msg_1",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}],
                "stop_reason": "end_turn",
                "usage": {"input_tokens": 12, "output_tokens": 3},
            },
        )
    )
    provider = claude(recorder)

    completion = await provider.complete(MESSAGES, params={"stop": ["\n\n"], "temperature": 0})

    request = recorder.requests[0]
    assert str(request.url) == "http://claude.local/v1/messages"
    assert request.headers["x-api-key"] == KEY
    assert request.headers["anthropic-version"] == "2023-06-01"
    assert "authorization" not in request.headers
    assert recorder.body() == {
        "model": "claude-test",
        "max_tokens": anthropic.DEFAULT_MAX_TOKENS,
        "system": "You are terse.",
        "messages": [{"role": "user", "content": "Say hi"}],
        "stop_sequences": ["\n\n"],
        "temperature": 0,
    }
    assert completion.text == "Hi there"
    assert completion.usage == ports.Usage(tokens_in=12, tokens_out=3)
    assert completion.finish_reason == "end_turn"
    assert (completion.provider, completion.model) == ("anthropic", "claude-test")


async def test_anthropic_streams_content_block_deltas() -> None:
    events_body = sse_body(
        (
            "message_start",
            {
                "type": "message_start",
                "message": {"usage": {"input_tokens": 9, "output_tokens": 1}},
            },
        ),
        ("content_block_start", {"type": "content_block_start", "index": 0}),
        ("ping", {"type": "ping"}),
        (
            "content_block_delta",
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}},
        ),
        (
            "content_block_delta",
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": " you"}},
        ),
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn"},
                "usage": {"output_tokens": 2},
            },
        ),
        ("message_stop", {"type": "message_stop"}),
    )
    recorder = Recorder(httpx.Response(200, content=events_body))
    provider = claude(recorder)

    events = [e async for e in provider.stream_events(MESSAGES, params={})]

    assert recorder.body()["stream"] is True
    assert events[:2] == [base.Delta("Hi"), base.Delta(" you")]
    done = events[-1]
    assert isinstance(done, ports.Completion)
    assert done.text == "Hi you"
    assert done.usage == ports.Usage(tokens_in=9, tokens_out=2)
    assert done.finish_reason == "end_turn"


async def test_anthropic_error_event_mid_stream() -> None:
    body = sse_body(
        (
            "content_block_delta",
            {"type": "content_block_delta", "delta": {"type": "text_delta", "text": "Hi"}},
        ),
        ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "..."}}),
    )
    provider = claude(Recorder(httpx.Response(200, content=body)))
    seen: list[base.StreamEvent] = []

    async def consume() -> None:
        async for event in provider.stream_events(MESSAGES, params={}):
            seen.append(event)

    with pytest.raises(base.ProviderError) as caught:
        await consume()
    assert seen == [base.Delta("Hi")]
    assert caught.value.code == "overloaded_error"


async def test_anthropic_401_is_not_retried() -> None:
    recorder = Recorder(
        httpx.Response(
            401, json={"type": "error", "error": {"type": "authentication_error", "message": "x"}}
        )
    )
    provider = claude(recorder)
    with pytest.raises(base.ProviderError) as caught:
        await provider.complete(MESSAGES, params={})
    assert len(recorder.requests) == 1
    assert caught.value.status == 401
    assert caught.value.code == "authentication_error"


async def test_ping_is_true_for_any_non_5xx_answer() -> None:
    provider, _ = openai(Recorder(httpx.Response(401)))
    assert await provider.ping()
    down, _ = openai(Recorder(httpx.Response(503)))
    assert not await down.ping()
    assert await claude(Recorder(httpx.Response(200, json={"data": []}))).ping()


def test_parse_retry_after_seconds_and_dates() -> None:
    import datetime as dt

    now = dt.datetime(2026, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert base.parse_retry_after("3") == 3.0
    assert base.parse_retry_after(" 1.5 ") == 1.5
    assert base.parse_retry_after("Thu, 01 Jan 2026 12:00:10 GMT", now=now) == 10.0
    assert base.parse_retry_after("Thu, 01 Jan 2026 11:00:00 GMT", now=now) == 0.0
    assert base.parse_retry_after("soon") is None
    assert base.parse_retry_after(None) is None


async def test_iter_sse_follows_the_event_stream_rules() -> None:
    async def lines() -> Any:
        for line in [
            ": a comment",
            "event: one",
            "data: first",
            "data:second",
            "",
            "data: {}",
            "",
            "data: no blank line at the end",
        ]:
            yield line

    events = [e async for e in base.iter_sse(lines())]
    assert events == [
        ("one", "first\nsecond"),
        ("message", "{}"),
        ("message", "no blank line at the end"),
    ]


def test_merge_params_snake_cases_and_drops_reserved_keys() -> None:
    merged = base.merge_params(
        {"maxTokens": 10, "topP": 0.5, "model": "evil", "stream": True},
        {"max_tokens": 20, "temperature": None},
    )
    assert merged == {"max_tokens": 20, "top_p": 0.5}


def test_split_chunks_joins_back_exactly() -> None:
    for text in ["", "one", "[echo-1] hello  world ", "  lead\nnew line"]:
        assert "".join(base.split_chunks(text)) == text


def test_repr_never_shows_the_key() -> None:
    provider, _ = openai(Recorder(chat_answer("x")))
    assert KEY not in repr(provider)
