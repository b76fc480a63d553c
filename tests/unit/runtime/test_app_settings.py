"""Settings from the environment and bindings, agent.json, telemetry setup, and the
production app factory (`create_default_app`) on the echo provider without datastores."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import httpx
import pytest

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.builders import agent as agent_builders
from bmad_runtime import config, settings, telemetry, wiring
from bmad_runtime.api import deps
from bmad_runtime.memory import inprocess

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # RuntimeSettings reads BMAD_* (the test bed exports BMAD_REDIS_URL, for one).
    for name in list(os.environ):
        if name.startswith(("BMAD_", "OTEL_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


def write_binding(root: Path, name: str, **data: str) -> None:
    folder = root / name
    folder.mkdir(parents=True)
    for key, value in data.items():
        (folder / key).write_text(value)


def test_settings_come_from_the_operators_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("BMAD_AGENT_NAME", "dev-1")
    monkeypatch.setenv("BMAD_AGENT_NAMESPACE", "acme")
    monkeypatch.setenv("BMAD_AGENT_ROLE", "dev")
    monkeypatch.setenv("BMAD_AGENT_CONFIG", str(tmp_path / "agent.json"))
    monkeypatch.setenv("BMAD_HTTP_PORT", "9090")
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(tmp_path / "bindings"))
    write_binding(
        tmp_path / "bindings",
        "cache",
        type="redis",
        host="127.0.0.1",
        port="6379",
    )
    write_binding(
        tmp_path / "bindings",
        "db",
        type="postgres",
        host="127.0.0.1",
        port="5432",
        database="bmad",
        username="bmad",
        password="p@ss",
    )

    loaded = settings.load()

    assert (loaded.agent_name, loaded.agent_namespace, loaded.agent_role) == (
        "dev-1",
        "acme",
        "dev",
    )
    assert loaded.effective_tenant == "acme"
    assert loaded.http_port == 9090
    assert loaded.agent_config == tmp_path / "agent.json"
    assert loaded.redis_url == "redis://127.0.0.1:6379/0"
    assert loaded.postgres_dsn is not None
    assert loaded.postgres_dsn.startswith("postgresql://bmad:p%40ss@127.0.0.1:5432/bmad")
    assert loaded.max_request_bytes == 1024 * 1024
    assert loaded.auth_mode == "jwt"  # the default: never open unless the Agent says so


def test_explicit_urls_win_over_bindings(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("BMAD_REDIS_URL", "redis://explicit:1/2")
    monkeypatch.setenv("BMAD_TENANT", "globex")
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(tmp_path))
    write_binding(tmp_path, "cache", type="redis", host="127.0.0.1", port="6379")
    loaded = settings.load()
    assert loaded.redis_url == "redis://explicit:1/2"
    assert loaded.postgres_dsn is None
    assert loaded.effective_tenant == "globex"


def test_agent_json_as_the_operator_renders_it(tmp_path: Path) -> None:
    rendered = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "AgentConfig",
        "agent": "analyst-1",
        "namespace": "acme",
        "role": "analyst",
        "persona": {"name": "Mary", "focus": "market research"},
        "instructions": "",
        "instructionsFrom": None,
        "model": {
            "provider": "anthropic",
            "name": "claude-sonnet-4-5",
            "integration": "claude",
            "params": {"maxTokens": 2048},
            "fallbacks": [{"provider": "echo", "name": "echo-1"}],
        },
        "limits": {"requestsPerMinute": 60},
        "memory": {"turns": 10, "ttlSeconds": 600},
        "integrations": ["claude"],
        "bindingRoot": "/bindings",
        "somethingNewer": {"ignored": True},
    }
    path = tmp_path / "agent.json"
    path.write_text(json.dumps(rendered))

    loaded = config.load(path)

    assert loaded.role == "analyst"
    assert [(m.provider, m.name) for m in loaded.model.chain] == [
        ("anthropic", "claude-sonnet-4-5"),
        ("echo", "echo-1"),
    ]
    assert loaded.model.params == {"maxTokens": 2048}
    assert loaded.limits.requests_per_minute == 60
    assert loaded.memory.turns == 10
    assert loaded.context_window == 200_000  # known for claude models
    assert loaded.persona_text() == "You are Mary, the Business Analyst.\nFocus: market research"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        ("{not json", "is not JSON"),
        (json.dumps({"role": "pm", "model": {"provider": "gpt", "name": "x"}}), "model.provider"),
        (json.dumps({"role": "pm"}), "model: Field required"),
    ],
)
def test_a_broken_agent_json_names_the_problem(
    tmp_path: Path, content: str | None, message: str
) -> None:
    path = tmp_path / "agent.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(config.ConfigError, match=message):
        config.load(path)


def test_context_window_known_prefixes() -> None:
    assert config.known_context_window("gpt-4o-mini") == 128_000
    assert config.known_context_window("gpt-4") == 8_192
    assert config.known_context_window("some-local-model") == config.DEFAULT_CONTEXT_WINDOW


def test_tracing_without_an_endpoint_exports_nothing() -> None:
    traced = telemetry.tracing(agent="a", namespace="n", role="dev", env={})
    assert not traced.exporting
    traced.shutdown()


def test_tracing_with_an_endpoint_but_no_exporter_package_logs_and_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    env = {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"}
    with caplog.at_level(logging.WARNING):
        traced = telemetry.tracing(agent="a", namespace="n", role="dev", env=env)
    try:
        import opentelemetry.exporter.otlp.proto.http.trace_exporter  # noqa: F401
    except ImportError:
        assert not traced.exporting
        assert "no OTLP exporter is installed" in caplog.text
    else:  # pragma: no cover - only where the exporter happens to be installed
        assert traced.exporting
    traced.shutdown()


def agent_json(tmp_path: Path, **extra: Any) -> Path:
    path = tmp_path / "agent.json"
    data = {"role": "pm", "model": {"provider": "echo", "name": "echo-7"}, **extra}
    path.write_text(json.dumps(data))
    return path


async def test_default_app_in_process_mode_runs_on_echo_without_datastores(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime_settings = settings.RuntimeSettings(
        agent_name="pm-1",
        agent_namespace="acme",
        agent_config=agent_json(tmp_path),
        binding_root=tmp_path / "no-bindings",
        auth_mode="none",
        memory_store="inProcess",
    )
    app = wiring.create_default_app(runtime_settings)
    with caplog.at_level(logging.WARNING):
        async with app.router.lifespan_context(app):
            state: deps.RuntimeState = app.state.runtime
            assert isinstance(state.store, inprocess.InProcessStore)
            assert state.authenticator is None
            assert state.limiter is None
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
                answer = await client.post("/v1/invoke", json={"input": "hi"})
                ready = await client.get("/readyz")
    assert answer.json()["output"] == "[echo-7] hi"
    assert ready.status_code == 200
    assert ready.json()["memoryStore"] == "inProcess"
    assert "kept in this process only" in caplog.text
    assert "authentication is off" in caplog.text


async def test_default_app_verifies_tokens_with_the_auth0_binding(tmp_path: Path) -> None:
    write_binding(
        tmp_path / "bindings",
        "login",
        type="auth0",
        issuer="https://login.example.test/",
        audience="https://agents.example.test",
        jwksUri="http://127.0.0.1:9/.well-known/jwks.json",
        domain="login.example.test",
        tokenEndpoint="http://127.0.0.1:9/oauth/token",
    )
    runtime_settings = settings.RuntimeSettings(
        agent_namespace="acme",
        agent_config=agent_json(tmp_path),
        binding_root=tmp_path / "bindings",
    )
    app = wiring.create_default_app(runtime_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            refused = await client.post("/v1/invoke", json={"input": "hi"})
            document = (await client.get("/openapi.json")).json()
    assert refused.status_code == 401
    assert refused.json()["error"]["code"]
    assert "bearerAuth" in document["components"]["securitySchemes"]


async def probe_default_app(
    runtime_settings: settings.RuntimeSettings,
) -> tuple[httpx.Response, httpx.Response, deps.RuntimeState]:
    """/readyz and one invoke of the production app, and its state while it served."""
    app = wiring.create_default_app(runtime_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://a") as client:
            ready = await client.get("/readyz")
            answer = await client.post("/v1/invoke", json={"input": "hi"})
            listed = await client.get("/v1/conversations")
        assert listed.status_code == answer.status_code
        return ready, answer, app.state.runtime


async def test_durable_memory_without_datastores_serves_not_ready_and_says_what_to_bind(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime_settings = settings.RuntimeSettings(
        agent_config=agent_json(tmp_path), binding_root=tmp_path, auth_mode="none"
    )
    assert runtime_settings.memory_store == "durable"  # the default: never a silent fallback

    with caplog.at_level(logging.ERROR):
        ready, answer, state = await probe_default_app(runtime_settings)

    assert ready.status_code == 503
    body = ready.json()
    assert body["checks"]["store"] is False
    assert body["memoryStore"] == "durable"
    assert "no postgres and no redis is bound" in body["message"]
    assert "Integrations of type postgres and redis" in body["message"]
    assert "spec.memory.store: inProcess" in body["message"]
    assert "not ready: spec.memory.store is durable but no postgres and no redis" in caplog.text
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "store_unavailable"
    assert not isinstance(state.store, inprocess.InProcessStore)


async def test_durable_memory_with_half_a_datastore_names_the_missing_one(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runtime_settings = settings.RuntimeSettings(
        agent_config=agent_json(tmp_path),
        binding_root=tmp_path,
        auth_mode="none",
        redis_url="redis://127.0.0.1:1/0",
    )

    with caplog.at_level(logging.WARNING):
        ready, answer, _ = await probe_default_app(runtime_settings)

    assert ready.status_code == 503
    message = ready.json()["message"]
    assert "no postgres is bound" in message
    assert "an Integration of type postgres (or set BMAD_POSTGRES_DSN)" in message
    assert answer.json()["error"]["code"] == "store_unavailable"
    # Redis is bound, but tasks would only fail without the store: none are consumed.
    assert "the task consumer is not started" in caplog.text


def test_default_app_fails_fast_on_a_broken_config(tmp_path: Path) -> None:
    runtime_settings = settings.RuntimeSettings(agent_config=tmp_path / "missing.json")
    with pytest.raises(config.ConfigError, match="BMAD_AGENT_CONFIG"):
        wiring.create_default_app(runtime_settings)


@pytest.mark.parametrize("store", [None, "durable", "inProcess"])
def test_the_memory_mode_the_operator_renders_is_the_one_the_runtime_reads(
    monkeypatch: pytest.MonkeyPatch, store: str | None
) -> None:
    spec: dict[str, Any] = {"role": "dev", "model": {"provider": "echo", "name": "echo-1"}}
    if store is not None:
        spec["memory"] = {"store": store}
    body = {"metadata": {"name": "dev-1", "namespace": "acme", "uid": "u-1"}, "spec": spec}
    objects = agent_builders.build_all(
        body,
        agent_api.AgentSpec.model_validate(spec),
        image="bmad:test",
        bindings=[],
        secret_versions={},
    )
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    for var in container["env"]:
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])

    assert settings.RuntimeSettings().memory_store == (store or "durable")


async def test_the_agent_api_is_not_open_by_default(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Issue 10, hole 6: with no auth0 Integration bound, every caller got every scope.

    Unauthenticated is now a choice (spec.auth.mode: none); the default, jwt, without
    an auth0 binding serves nothing under /v1/ and says on /readyz what to bind. Before
    the fix this test failed with:

        AssertionError: assert 200 == 503 (the invoke was answered, unauthenticated)
    """
    runtime_settings = settings.RuntimeSettings(
        agent_config=agent_json(tmp_path),
        binding_root=tmp_path / "no-bindings",
        memory_store="inProcess",
    )
    with caplog.at_level(logging.WARNING):
        ready, answer, state = await probe_default_app(runtime_settings)

    assert answer.status_code == 503, f"{answer.status_code} (the invoke was answered)"
    assert answer.json()["error"]["code"] == "auth_unavailable"
    assert ready.status_code == 503
    body = ready.json()
    assert body["authMode"] == "jwt"
    assert body["checks"]["auth"] is False
    assert "no Integration of type auth0 is bound" in body["message"]
    assert "spec.auth.mode: none" in body["message"]
    assert "not ready: spec.auth.mode is jwt" in caplog.text
    assert state.authenticator is not None


@pytest.mark.parametrize("mode", [None, "jwt", "none"])
def test_the_auth_mode_the_operator_renders_is_the_one_the_runtime_reads(
    monkeypatch: pytest.MonkeyPatch, mode: str | None
) -> None:
    spec: dict[str, Any] = {"role": "dev", "model": {"provider": "echo", "name": "echo-1"}}
    if mode is not None:
        spec["auth"] = {"mode": mode}
    body = {"metadata": {"name": "dev-1", "namespace": "acme", "uid": "u-1"}, "spec": spec}
    objects = agent_builders.build_all(
        body,
        agent_api.AgentSpec.model_validate(spec),
        image="bmad:test",
        bindings=[],
        secret_versions={},
    )
    [deployment] = [o for o in objects if o["kind"] == "Deployment"]
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    for var in container["env"]:
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])

    assert settings.RuntimeSettings().auth_mode == (mode or "jwt")
