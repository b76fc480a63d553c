"""The runtime's model-call metrics on /metrics: OpenTelemetry GenAI names, token
counts equal to the answers', one duration per provider tried (failures named), ledger
writes by result, and only bounded labels (never a conversation or request id)."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator

import httpx
import pytest
from prometheus_client import parser

from bmad_runtime import app as app_mod
from bmad_runtime import ports, settings, telemetry
from bmad_runtime.memory import inprocess
from bmad_runtime.providers import echo, router

pytestmark = pytest.mark.unit

AGENT = {"tenant": "acme", "namespace": "team-a", "agent": "dev"}


@pytest.fixture(autouse=True)
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("BMAD_", "OTEL_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


class Ledger:
    def __init__(self) -> None:
        self.broken = False

    async def write(self, entry: ports.LedgerEntry) -> None:
        if self.broken:
            raise ports.LedgerUnavailableError("the usage ledger is unreachable")

    async def exhausted(self) -> ports.Budget | None:
        return None


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(s.labels), s.value)
        for family in parser.text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def value(text: str, name: str, **labels: str) -> float:
    found = [v for got, v in samples(text, name) if labels.items() <= got.items()]
    assert found, f"no {name} with {labels}"
    return sum(found)


def make_app(chain: list[echo.EchoProvider], ledger: Ledger) -> app_mod.fastapi.FastAPI:
    app = app_mod.create_app(
        settings.RuntimeSettings(
            agent_name="dev", agent_namespace="team-a", tenant="acme", auth_mode="none"
        ),
        store=inprocess.InProcessStore(),
        providers=router.ModelRouter(chain),
        authenticator=None,
        limiter=None,
    )
    app.state.runtime.ledger = ledger
    return app


@pytest.fixture
def ledger() -> Ledger:
    return Ledger()


@pytest.fixture
async def client(ledger: Ledger) -> AsyncIterator[httpx.AsyncClient]:
    app = make_app([echo.EchoProvider()], ledger)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            yield http


async def test_token_usage_counts_each_answer_by_token_type_with_the_agent_labels(
    client: httpx.AsyncClient,
) -> None:
    answers = []
    for text in ("hello there", "a longer question about the product brief"):
        response = await client.post("/v1/invoke", json={"input": text})
        assert response.status_code == 200, response.text
        answers.append(response.json()["usage"])
    streamed = await client.post("/v1/invoke", json={"input": "stream it", "stream": True})
    assert streamed.status_code == 200
    text = (await client.get("/metrics")).text
    model = {
        **AGENT,
        "gen_ai_operation_name": "chat",
        "gen_ai_provider_name": "echo",
        "gen_ai_request_model": "echo-1",
        "gen_ai_response_model": "echo-1",
    }
    tokens_in = sum(a["tokensIn"] for a in answers)
    tokens_out = sum(a["tokensOut"] for a in answers)
    assert value(text, "gen_ai_client_token_usage_count", **model, gen_ai_token_type="input") == 3
    assert value(text, "gen_ai_client_token_usage_sum", **model, gen_ai_token_type="input") > (
        tokens_in
    )  # and the streamed call's
    assert value(text, "gen_ai_client_token_usage_count", **model, gen_ai_token_type="output") == 3
    assert value(text, "gen_ai_client_token_usage_sum", **model, gen_ai_token_type="output") > (
        tokens_out
    )
    # One duration per model call, none failed; one ledger write per answer.
    call = {k: model[k] for k in ("gen_ai_operation_name", "gen_ai_provider_name")}
    assert (
        value(
            text,
            "gen_ai_client_operation_duration_seconds_count",
            **AGENT,
            **call,
            gen_ai_request_model="echo-1",
            error_type="",
        )
        == 3
    )
    assert value(text, "bmad_usage_ledger_writes_total", **AGENT, result="ok") == 3


async def test_the_token_sums_equal_the_answers_tokens(client: httpx.AsyncClient) -> None:
    response = await client.post("/v1/invoke", json={"input": "count these words please"})
    usage = response.json()["usage"]
    text = (await client.get("/metrics")).text
    assert (
        value(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="input") == usage["tokensIn"]
    )
    assert (
        value(text, "gen_ai_client_token_usage_sum", gen_ai_token_type="output")
        == usage["tokensOut"]
    )
    # The per-direction counter the autoscaler reads is kept.
    assert value(text, "bmad_agent_tokens_total", direction="in") == usage["tokensIn"]


async def test_a_failed_ledger_write_is_counted_failed(
    client: httpx.AsyncClient, ledger: Ledger
) -> None:
    ledger.broken = True
    assert (await client.post("/v1/invoke", json={"input": "hello"})).status_code == 503
    text = (await client.get("/metrics")).text
    assert value(text, "bmad_usage_ledger_writes_total", result="failed") == 1
    assert not [
        s for s in samples(text, "bmad_usage_ledger_writes_total") if s[0].get("result") == "ok"
    ]


async def test_a_provider_that_failed_over_has_a_duration_with_its_error_type(
    ledger: Ledger,
) -> None:
    chain = [
        echo.ScriptedProvider(["x"], fail_times=5, failure_status=503),
        echo.ScriptedProvider(["fine"], model="fallback-1"),
    ]
    app = make_app(list(chain), ledger)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as http:
            assert (await http.post("/v1/invoke", json={"input": "hi"})).status_code == 200
            text = (await http.get("/metrics")).text
    name = "gen_ai_client_operation_duration_seconds_count"
    assert value(text, name, gen_ai_request_model="scripted-1", error_type="503") == 1
    assert value(text, name, gen_ai_request_model="fallback-1", error_type="") == 1
    # The tokens are the model's that answered.
    assert value(text, "gen_ai_client_token_usage_count", gen_ai_request_model="fallback-1") == 2
    assert not [
        s
        for s in samples(text, "gen_ai_client_token_usage_count")
        if s[0]["gen_ai_request_model"] == "scripted-1"
    ]


async def test_gen_ai_series_carry_only_bounded_labels(client: httpx.AsyncClient) -> None:
    for _ in range(3):
        await client.post("/v1/invoke", json={"input": "hello"}, headers={"X-Request-Id": "r"})
    text = (await client.get("/metrics")).text
    allowed = {
        *AGENT,
        "le",
        "gen_ai_operation_name",
        "gen_ai_provider_name",
        "gen_ai_request_model",
        "gen_ai_response_model",
        "gen_ai_token_type",
        "error_type",
    }
    series = [
        labels
        for family in parser.text_string_to_metric_families(text)
        if family.name.startswith("gen_ai_")
        for labels, _ in samples(text, family.samples[0].name)
    ]
    assert series
    for labels in series:
        assert set(labels) <= allowed, labels
    # Three calls, three conversations: still one series per bucket and token type.
    counts = samples(text, "gen_ai_client_token_usage_count")
    assert len(counts) == 2


def test_without_a_tenant_the_labels_are_namespace_and_agent() -> None:
    assert telemetry.agent_labels(namespace="n", agent="a") == {"namespace": "n", "agent": "a"}
    assert telemetry.agent_labels(namespace="n", agent="a", tenant="t") == {
        "namespace": "n",
        "agent": "a",
        "tenant": "t",
    }


def test_the_requested_model_is_the_chain_entry_that_answered() -> None:
    chain = router.ModelRouter(
        [
            echo.EchoProvider("gpt-4o", name="openai"),
            echo.EchoProvider("gpt-4o-mini", name="openai"),
            echo.EchoProvider("claude-sonnet-4", name="anthropic"),
        ]
    )

    def answered(provider: str, model: str) -> ports.Completion:
        return ports.Completion("", ports.Usage(1, 1), model=model, provider=provider)

    assert chain.requested_model(answered("openai", "gpt-4o-2024-08-06")) == "gpt-4o"
    assert chain.requested_model(answered("openai", "gpt-4o-mini-2024-07-18")) == "gpt-4o-mini"
    assert chain.requested_model(answered("anthropic", "claude-x")) == "claude-sonnet-4"
    assert chain.requested_model(answered("other", "m-1")) == "m-1"


def test_a_chain_of_one_names_its_entry_or_what_answered() -> None:
    chain = router.ModelRouter([echo.EchoProvider("gpt-4o", name="openai")])

    def answered(provider: str, model: str) -> ports.Completion:
        return ports.Completion("", ports.Usage(1, 1), model=model, provider=provider)

    assert chain.requested_model(answered("openai", "gpt-4o-2024-08-06")) == "gpt-4o"
    assert chain.requested_model(answered("openai", "other-model")) == "gpt-4o"
    assert chain.requested_model(answered("other", "m-1")) == "m-1"
