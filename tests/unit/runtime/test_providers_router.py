"""The echo and scripted providers, the failover chain, and building it from bindings."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import pytest
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from bmad_runtime import bindings, config, ports
from bmad_runtime.providers import anthropic, base, echo, openai_compat, router

pytestmark = pytest.mark.unit

ASK = [ports.Message("system", "be brief"), ports.Message("user", "what is  BMAD")]


async def test_echo_is_deterministic_and_counts_words() -> None:
    provider = echo.EchoProvider("echo-1")
    first = await provider.complete(ASK, params={})
    second = await provider.complete(ASK, params={"temperature": 2})
    assert first == second
    assert first.text == "[echo-1] what is  BMAD"
    assert first.usage == ports.Usage(tokens_in=5, tokens_out=4)
    assert (first.provider, first.model) == ("echo", "echo-1")
    streamed = [t async for t in provider.stream(ASK, params={})]
    assert "".join(streamed) == first.text
    assert len(streamed) == 4
    assert await provider.ping()


async def test_scripted_answers_in_order_and_fails_first() -> None:
    provider = echo.ScriptedProvider(["one", "two"], fail_times=2)
    for _ in range(2):
        with pytest.raises(base.ProviderError) as caught:
            await provider.complete(ASK, params={})
        assert caught.value.retryable
    assert (await provider.complete(ASK, params={})).text == "one"
    assert (await provider.complete(ASK, params={})).text == "two"
    assert (await provider.complete(ASK, params={})).text == "two"
    assert provider.failures == 2
    assert len(provider.calls) == 5


async def test_router_fails_over_in_order_and_says_who_served() -> None:
    primary = echo.ScriptedProvider(["p"], model="primary", fail_times=1)
    second = echo.ScriptedProvider(["s"], model="second", fail_times=1)
    third = echo.ScriptedProvider(["t"], model="third")
    chain = router.ModelRouter([primary, second, third])

    completion = await chain.complete(ASK, params={})

    assert (completion.model, completion.text) == ("third", "t")
    assert [len(p.calls) for p in (primary, second, third)] == [1, 1, 1]
    # The primary is asked first again on the next call.
    assert (await chain.complete(ASK, params={})).model == "primary"


async def test_router_raises_with_every_error_when_all_fail() -> None:
    chain = router.ModelRouter(
        [
            echo.ScriptedProvider(["x"], model="a", fail_times=9, failure_status=429),
            echo.ScriptedProvider(["x"], model="b", fail_times=9, failure_status=401),
        ]
    )
    with pytest.raises(router.AllProvidersFailedError) as caught:
        await chain.complete(ASK, params={})
    assert [e.model for e in caught.value.errors] == ["a", "b"]
    assert not caught.value.rate_limited
    assert "scripted/a: HTTP 429" in caught.value.message


async def test_router_streams_fail_over_only_before_the_first_piece() -> None:
    primary = echo.ScriptedProvider(["never"], model="primary", fail_times=9)
    fallback = echo.ScriptedProvider(["from fallback"], model="fallback")
    chain = router.ModelRouter([primary, fallback])
    events = [e async for e in chain.stream_events(ASK, params={})]
    assert "".join(e.text for e in events if isinstance(e, base.Delta)) == "from fallback"
    last = events[-1]
    assert isinstance(last, ports.Completion)
    assert last.model == "fallback"


async def test_router_spans_one_per_model_call() -> None:
    exporter = InMemorySpanExporter()
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    chain = router.ModelRouter(
        [echo.ScriptedProvider(["x"], model="a", fail_times=1), echo.EchoProvider("b")],
        tracer=provider.get_tracer("test"),
    )
    await chain.complete(ASK, params={})
    [t async for t in chain.stream_events(ASK, params={})]
    spans = exporter.get_finished_spans()
    assert [(s.name, s.attributes["gen_ai.request.model"]) for s in spans] == [
        ("model.complete", "a"),
        ("model.complete", "b"),
        ("model.stream", "a"),
    ]
    assert not spans[0].status.is_ok
    assert spans[1].attributes["gen_ai.usage.output_tokens"] == 4


async def test_the_probe_of_the_chain_is_cached() -> None:
    now = [0.0]
    primary = echo.ScriptedProvider(["x"], reachable=True)
    fallback = echo.ScriptedProvider(["y"], model="fallback-1", reachable=True)
    chain = router.ModelRouter([primary, fallback], ready_ttl=10, clock=lambda: now[0])
    assert [p.reachable for p in await chain.probe()] == [True, True]
    primary.reachable = False
    now[0] = 5
    assert [p.reachable for p in await chain.probe()] == [True, True]  # cached
    now[0] = 11
    assert await chain.probe() == (
        router.Reachability("scripted", "scripted-1", reachable=False),
        router.Reachability("scripted", "fallback-1", reachable=True),
    )


class Hanging(echo.ScriptedProvider):
    async def ping(self) -> bool:
        await asyncio.Event().wait()
        return True


class Broken(echo.ScriptedProvider):
    async def ping(self) -> bool:
        raise OSError("connection refused")


async def test_a_probe_that_hangs_or_raises_counts_as_unreachable_and_spares_the_others() -> None:
    chain = router.ModelRouter(
        [
            Hanging(["x"]),
            Broken(["x"], model="broken-1"),
            echo.ScriptedProvider(["y"], model="ok-1"),
        ],
        ready_ttl=0,
    )
    assert [p.reachable for p in await chain.probe(within=0.05)] == [False, False, True]


def write_binding(root: Path, name: str, **data: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for key, value in data.items():
        (folder / key).write_text(value)


def model_config(**model: object) -> config.ModelConfig:
    return config.ModelConfig.model_validate(model)


async def test_build_reads_credentials_from_the_named_llm_binding(tmp_path: Path) -> None:
    write_binding(
        tmp_path,
        "openrouter",
        type="llm",
        provider="openai-compatible",
        baseUrl="http://127.0.0.1:9/v1",
        apiKey="sk-or",
    )
    write_binding(
        tmp_path,
        "claude",
        type="llm",
        provider="anthropic",
        baseUrl="http://127.0.0.1:9",
        apiKey="sk-ant",
    )
    found = bindings.read_bindings(tmp_path)
    chain = router.build(
        model_config(
            provider="openai-compatible",
            name="llama-3",
            integration="openrouter",
            params={"temperature": 0.3},
            fallbacks=[
                {"provider": "anthropic", "name": "claude-x", "integration": "claude"},
                {"provider": "echo", "name": "echo-1"},
            ],
        ),
        found,
    )
    try:
        first, second, third = chain.chain
        assert isinstance(first, openai_compat.OpenAICompatProvider)
        assert (first.name, first.model, first.base_url) == (
            "openai-compatible",
            "llama-3",
            "http://127.0.0.1:9/v1",
        )
        assert first.params == {"temperature": 0.3}
        assert isinstance(second, anthropic.AnthropicProvider)
        assert second.params == {"temperature": 0.3}  # fallbacks share the primary's params
        assert second._headers()["x-api-key"] == "sk-ant"
        assert isinstance(third, echo.EchoProvider)
    finally:
        await chain.aclose()


async def test_build_picks_the_only_matching_llm_binding_when_none_is_named(
    tmp_path: Path,
) -> None:
    write_binding(tmp_path, "oa", type="llm", provider="openai", baseUrl="http://127.0.0.1:9/v1")
    chain = router.build(
        model_config(provider="openai", name="gpt-4o"), bindings.read_bindings(tmp_path)
    )
    assert isinstance(chain.primary, openai_compat.OpenAICompatProvider)
    await chain.aclose()


@pytest.mark.parametrize(
    ("model", "message"),
    [
        ({"provider": "openai-compatible", "name": "m", "integration": "nope"}, "no binding"),
        ({"provider": "openai", "name": "m", "integration": "db"}, "not llm"),
        ({"provider": "anthropic", "name": "m", "integration": "oa"}, "anthropic Integration"),
        ({"provider": "anthropic", "name": "m"}, "names no integration"),
    ],
)
def test_build_explains_missing_credentials(
    tmp_path: Path, model: dict[str, str], message: str
) -> None:
    write_binding(tmp_path, "oa", type="llm", provider="openai", baseUrl="http://127.0.0.1:9")
    write_binding(
        tmp_path,
        "db",
        type="postgres",
        host="h",
        port="5432",
        database="d",
        username="u",
        password="p",
    )
    with pytest.raises(config.ConfigError, match=message):
        router.build(model_config(**model), bindings.read_bindings(tmp_path))


async def test_built_providers_share_one_injectable_transport() -> None:
    seen: list[str] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(str(request.url))
        return httpx.Response(200, json={"choices": [{"message": {"content": "hi"}}]})

    found = {
        "oa": bindings.Binding(
            name="oa",
            path=Path("/bindings/oa"),
            data={"type": "llm", "provider": "openai", "baseUrl": "http://127.0.0.1:9/v1"},
        )
    }
    chain = router.build(
        model_config(provider="openai", name="gpt-4o", integration="oa"),
        found,
        transport=httpx.MockTransport(handler),
    )
    completion = await chain.complete(ASK, params={})
    await chain.aclose()
    assert completion.text == "hi"
    assert completion.usage == ports.Usage(tokens_in=5, tokens_out=1)  # estimated
    assert seen == ["http://127.0.0.1:9/v1/chat/completions"]
