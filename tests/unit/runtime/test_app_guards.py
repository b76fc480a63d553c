"""The app's guard rails: auth and scopes, rate limits, size limit, error bodies, headers,
readiness, metrics and the OpenAPI document."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Mapping
from typing import Any

import fastapi
import httpx
import pytest

from bmad_runtime import app as app_mod
from bmad_runtime import context, ports, settings
from bmad_runtime.api import deps
from bmad_runtime.bus import consumer as bus_consumer
from bmad_runtime.memory import inprocess
from bmad_runtime.providers import base, echo, router

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    # RuntimeSettings reads BMAD_* (the test bed exports BMAD_REDIS_URL, for one).
    for name in list(os.environ):
        if name.startswith(("BMAD_", "OTEL_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


class StaticAuthenticator:
    """Knows a fixed set of Bearer tokens."""

    def __init__(self, tokens: Mapping[str, ports.Principal]) -> None:
        self.tokens = dict(tokens)

    async def authenticate(self, authorization: str | None) -> ports.Principal:
        if not authorization:
            raise ports.AuthError(
                401, "missing_token", "send an Authorization: Bearer <token> header"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise ports.AuthError(
                401, "invalid_request", "the Authorization header must be 'Bearer <token>'"
            )
        principal = self.tokens.get(token.strip())
        if principal is None:
            raise ports.AuthError(401, "invalid_token", "the token is not valid")
        return principal


class CountingLimiter:
    """Allows ``allow`` hits per tenant and agent, then asks to wait ``wait``."""

    def __init__(self, allow: int, *, wait: float = 1.0) -> None:
        self.allow = allow
        self.wait = wait
        self.hits: list[tuple[str, str, int]] = []

    async def hit(self, *, tenant: str, agent: str, tokens: int = 0) -> float | None:
        self.hits.append((tenant, agent, tokens))
        count = sum(1 for t, a, _ in self.hits if t == tenant and a == agent)
        return None if count <= self.allow else self.wait


class SwitchableStore(inprocess.InProcessStore):
    """An in-process store whose ping the test turns off and on."""

    healthy = True

    async def ping(self) -> bool:
        return self.healthy


TENANT = "team-a"
SECRET = "sk-live-do-not-leak-4242"

PRINCIPALS = {
    "all": ports.Principal("alice", TENANT, deps.ALL_SCOPES),
    "reader": ports.Principal("rita", TENANT, frozenset({deps.SCOPE_READ})),
    "invoker": ports.Principal("ivan", TENANT, frozenset({deps.SCOPE_INVOKE})),
    "other-tenant": ports.Principal("oscar", "team-b", deps.ALL_SCOPES),
}


def make_app(
    *,
    store: ports.ConversationStore | None = None,
    provider: base.BaseProvider | None = None,
    authenticator: ports.Authenticator | None = None,
    limiter: ports.Limiter | None = None,
    **overrides: Any,
) -> fastapi.FastAPI:
    values: dict[str, Any] = {"agent_name": "pm-1", "agent_namespace": TENANT}
    values.update(overrides)
    return app_mod.create_app(
        settings.RuntimeSettings(**values),
        store=store or inprocess.InProcessStore(),
        providers=router.ModelRouter([provider or echo.EchoProvider()], ready_ttl=0),
        authenticator=authenticator,
        limiter=limiter,
    )


async def serve(app: fastapi.FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            yield client


@pytest.fixture
async def secured() -> AsyncIterator[httpx.AsyncClient]:
    async for client in serve(make_app(authenticator=StaticAuthenticator(PRINCIPALS))):
        yield client


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def assert_error(response: httpx.Response, status: int, code: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error: dict[str, Any] = response.json()["error"]
    assert error["code"] == code
    assert error["message"]
    assert error["requestId"] == response.headers["x-request-id"]
    return error


async def test_without_a_token_every_v1_route_is_401(secured: httpx.AsyncClient) -> None:
    for method, path in [
        ("POST", "/v1/invoke"),
        ("GET", "/v1/conversations"),
        ("GET", "/v1/conversations/c1/messages"),
        ("DELETE", "/v1/conversations/c1"),
    ]:
        response = await secured.request(method, path, json={"input": "x"})
        assert_error(response, 401, "missing_token")
        assert response.headers["www-authenticate"].startswith("Bearer")


async def test_probes_need_no_token(secured: httpx.AsyncClient) -> None:
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json"):
        assert (await secured.get(path)).status_code == 200, path


async def test_scopes_are_enforced_per_route(secured: httpx.AsyncClient) -> None:
    invoked = await secured.post("/v1/invoke", json={"input": "hi"}, headers=bearer("invoker"))
    assert invoked.status_code == 200
    conversation = invoked.json()["conversationId"]

    error = assert_error(
        await secured.post("/v1/invoke", json={"input": "hi"}, headers=bearer("reader")),
        403,
        "insufficient_scope",
    )
    assert "agent:invoke" in error["message"]
    assert_error(
        await secured.get("/v1/conversations", headers=bearer("invoker")), 403, "insufficient_scope"
    )
    listed = await secured.get("/v1/conversations", headers=bearer("reader"))
    assert listed.status_code == 200
    assert_error(
        await secured.delete(f"/v1/conversations/{conversation}", headers=bearer("reader")),
        403,
        "insufficient_scope",
    )
    deleted = await secured.delete(f"/v1/conversations/{conversation}", headers=bearer("all"))
    assert deleted.status_code == 204


async def test_a_token_of_another_tenant_is_403(secured: httpx.AsyncClient) -> None:
    response = await secured.post(
        "/v1/invoke", json={"input": "hi"}, headers=bearer("other-tenant")
    )
    assert_error(response, 403, "wrong_tenant")


async def test_a_bad_token_is_401(secured: httpx.AsyncClient) -> None:
    assert_error(
        await secured.get("/v1/conversations", headers=bearer("forged")), 401, "invalid_token"
    )


async def test_auth_comes_before_body_validation(secured: httpx.AsyncClient) -> None:
    assert_error(await secured.post("/v1/invoke", json={"nope": 1}), 401, "missing_token")


async def test_auth_comes_before_the_body_is_read(secured: httpx.AsyncClient) -> None:
    # The invoke route's class authenticates first: no parse error, nor anything else
    # about the body, for a caller without a token.
    malformed = await secured.post(
        "/v1/invoke", content=b"{not json", headers={"Content-Type": "application/json"}
    )
    assert_error(malformed, 401, "missing_token")
    wrong_scope = await secured.post(
        "/v1/invoke",
        content=b"{not json",
        headers={"Content-Type": "application/json", **bearer("reader")},
    )
    assert_error(wrong_scope, 403, "insufficient_scope")
    # With a token that holds the scope, the body is read and refused as before.
    allowed = await secured.post(
        "/v1/invoke",
        content=b"{not json",
        headers={"Content-Type": "application/json", **bearer("invoker")},
    )
    assert_error(allowed, 422, "validation_error")


async def test_rate_limit_is_429_with_retry_after() -> None:
    limiter = CountingLimiter(allow=1, wait=2.2)
    async for client in serve(make_app(limiter=limiter)):
        first = await client.post("/v1/invoke", json={"input": "one two three"})
        second = await client.post("/v1/invoke", json={"input": "again"})
        streamed = await client.post("/v1/invoke", json={"input": "again", "stream": True})
    assert first.status_code == 200
    for refused in (second, streamed):
        assert_error(refused, 429, "rate_limited")
        assert refused.headers["retry-after"] == "3"
    assert limiter.hits[0] == (TENANT, "pm-1", context.estimate_tokens("one two three"))


async def test_a_short_wait_still_says_retry_after_one_second() -> None:
    async for client in serve(make_app(limiter=CountingLimiter(allow=0, wait=0.01))):
        response = await client.post("/v1/invoke", json={"input": "x"})
    assert response.headers["retry-after"] == "1"


async def test_security_headers_on_every_answer(secured: httpx.AsyncClient) -> None:
    answers = [
        await secured.get("/healthz"),
        await secured.get("/missing"),
        await secured.post("/v1/invoke", json={"input": "hi"}, headers=bearer("all")),
        await secured.post("/v1/invoke", json={"input": "x"}),
    ]
    for response in answers:
        assert response.headers["x-content-type-options"] == "nosniff"
        assert response.headers["cache-control"] == "no-store"
        assert response.headers["x-frame-options"] == "DENY"
        assert response.headers["referrer-policy"] == "no-referrer"
        assert response.headers["x-request-id"]


async def test_a_callers_request_id_is_kept_and_a_bad_one_replaced() -> None:
    async for client in serve(make_app()):
        kept = await client.get("/healthz", headers={"X-Request-ID": "abc-123"})
        replaced = await client.get("/healthz", headers={"X-Request-ID": "bad id\twith junk"})
    assert kept.headers["x-request-id"] == "abc-123"
    assert replaced.headers["x-request-id"] != "bad id\twith junk"


async def test_oversized_bodies_are_413() -> None:
    async for client in serve(make_app(max_request_bytes=2048)):
        declared = await client.post("/v1/invoke", json={"input": "x" * 4096})

        async def chunks() -> AsyncIterator[bytes]:
            yield b'{"input": "'
            for _ in range(10):
                yield b"y" * 1024
            yield b'"}'

        chunked = await client.post(
            "/v1/invoke", content=chunks(), headers={"Content-Type": "application/json"}
        )
    assert_error(declared, 413, "request_too_large")
    assert_error(chunked, 413, "request_too_large")


async def test_validation_errors_name_each_field() -> None:
    async for client in serve(make_app()):
        response = await client.post(
            "/v1/invoke",
            json={"conversationId": "bad id!", "params": {"temperature": 9, "apiKey": SECRET}},
        )
        bad_limit = await client.get("/v1/conversations", params={"limit": 0})
    error = assert_error(response, 422, "validation_error")
    fields = {d["field"] for d in error["details"]}
    assert {
        "body.input",
        "body.conversationId",
        "body.params.temperature",
        "body.params.apiKey",
    } <= fields
    assert SECRET not in response.text  # the input is never echoed
    assert_error(bad_limit, 422, "validation_error")
    assert bad_limit.json()["error"]["details"][0]["field"] == "query.limit"


async def test_malformed_json_is_422() -> None:
    async for client in serve(make_app()):
        response = await client.post(
            "/v1/invoke", content=b"{not json", headers={"Content-Type": "application/json"}
        )
    assert_error(response, 422, "validation_error")


class LeakyStore(inprocess.InProcessStore):
    async def record_usage(self, record: ports.UsageRecord) -> None:
        raise RuntimeError(f"connection to postgres://bmad:{SECRET}@db failed")


async def test_an_unexpected_error_is_a_bare_500(caplog: pytest.LogCaptureFixture) -> None:
    async for client in serve(make_app(store=LeakyStore())):
        response = await client.post("/v1/invoke", json={"input": "hi"})
        streamed = await client.post("/v1/invoke", json={"input": "hi", "stream": True})
    error = assert_error(response, 500, "internal_error")
    assert error["requestId"] in error["message"]
    assert SECRET not in response.text
    assert "Traceback" not in response.text
    assert response.headers["x-content-type-options"] == "nosniff"
    # A stream has already said 200: the failure is its last event, just as bare.
    assert streamed.status_code == 200
    assert "event: error" in streamed.text
    assert SECRET not in streamed.text
    assert "internal_error" in streamed.text
    assert SECRET in caplog.text  # ...but the operator's log has the details


async def test_readiness_follows_the_store_and_reports_the_models() -> None:
    store = SwitchableStore()
    model = echo.ScriptedProvider(["x"], reachable=True)
    async for client in serve(make_app(store=store, provider=model)):
        ready = await client.get("/readyz")
        store.healthy = False
        no_store = await client.get("/readyz")
        store.healthy = True
        model.reachable = False
        no_model = await client.get("/readyz")
        alive = await client.get("/healthz")
    assert ready.status_code == 200
    assert ready.json() == {
        "status": "ready",
        "checks": {"store": True, "model": True, "auth": True, "bus": None},
        "models": [{"provider": "scripted", "model": "scripted-1", "reachable": True}],
        "memoryStore": "durable",
        "authMode": "none",
        "datastores": {},
        "message": None,
    }
    assert no_store.status_code == 503
    assert no_store.json()["checks"] == {"store": False, "model": True, "auth": True, "bus": None}
    assert no_store.json()["message"] == "the conversation store does not answer"
    # Every replica shares the model APIs: their outage is reported, not made NotReady.
    assert no_model.status_code == 200
    assert no_model.json()["status"] == "ready"
    assert no_model.json()["checks"] == {"store": True, "model": False, "auth": True, "bus": None}
    assert no_model.json()["models"][0]["reachable"] is False
    assert "no model of the chain answers" in no_model.json()["message"]
    assert alive.status_code == 200
    assert alive.json() == {"status": "ok"}


async def test_readiness_follows_the_task_consumer() -> None:
    """A replica whose consumer cannot read its stream is not ready (issue 11)."""
    app = make_app()
    state: deps.RuntimeState = app.state.runtime
    state.bus = health = bus_consumer.ConsumerHealth()
    async for client in serve(app):
        starting = await client.get("/readyz")
        health.down(
            "the task bus (Redis) cannot be reached (ConnectionError): tasks are not consumed"
        )
        down = await client.get("/readyz")
        health.up()
        consuming = await client.get("/readyz")
    assert starting.status_code == 503
    assert starting.json()["checks"] == {"store": True, "model": True, "auth": True, "bus": False}
    assert starting.json()["message"] == "the task consumer has not reached Redis yet"
    assert down.status_code == 503
    assert "cannot be reached" in down.json()["message"]
    assert consuming.status_code == 200
    assert consuming.json()["checks"]["bus"] is True


async def test_metrics_count_requests_by_route_template_and_tokens() -> None:
    async for client in serve(make_app()):
        await client.post("/v1/invoke", json={"input": "one two"})
        await client.get("/v1/conversations/some-id/messages")
        await client.get("/no/such/route")
        text = (await client.get("/metrics")).text
    # Every series carries the agent's namespace and name (the autoscaler selects on
    # them) and its tenant (the dashboards do); the exposition sorts labels by name.
    who = 'agent="pm-1",namespace="team-a"'
    tenant = 'tenant="team-a"'  # no tenant set: the namespace's
    assert (
        f'bmad_agent_request_seconds_count{{{who},route="/v1/invoke",status="200",{tenant}}} 1.0'
    ) in text
    assert (
        f"bmad_agent_request_seconds_count{{{who},"
        f'route="/v1/conversations/{{conversation_id}}/messages",status="404",{tenant}}} 1.0'
    ) in text
    assert (
        f'bmad_agent_request_seconds_count{{{who},route="unmatched",status="404",{tenant}}} 1.0'
    ) in text
    assert (
        'bmad_agent_tokens_total{agent="pm-1",direction="out",model="echo-1",namespace="team-a",'
        f"{tenant}}} 3.0"
    ) in text
    assert f'bmad_agent_tasks_total{{{who},outcome="ok",{tenant}}} 1.0' in text
    assert f"bmad_agent_inflight{{{who},{tenant}}} 0.0" in text
    assert f"bmad_agent_queue_depth{{{who},{tenant}}} 0.0" in text
    assert f"bmad_agent_dead_letters{{{who},{tenant}}} 0.0" in text


async def test_two_apps_keep_their_own_metrics() -> None:
    async for first in serve(make_app()):
        async for second in serve(make_app()):
            await first.post("/v1/invoke", json={"input": "hi"})
            text = (await second.get("/metrics")).text
    assert 'outcome="ok"' not in text


async def test_openapi_documents_models_errors_and_the_bearer_scheme() -> None:
    async for client in serve(make_app(authenticator=StaticAuthenticator({}))):
        document = (await client.get("/openapi.json")).json()
    invoke = document["paths"]["/v1/invoke"]["post"]
    assert set(invoke["responses"]) >= {"200", "401", "403", "413", "422", "429", "500", "502"}
    assert "text/event-stream" in invoke["responses"]["200"]["content"]
    assert invoke["responses"]["429"]["headers"]["Retry-After"]["required"] is True
    assert invoke["security"] == [{"bearerAuth": []}]
    assert document["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    assert "security" not in document["paths"]["/healthz"]["get"]
    schemas = document["components"]["schemas"]
    assert {"InvokeRequest", "InvokeResponse", "ErrorBody", "ConversationList"} <= set(schemas)
    assert "HTTPValidationError" not in schemas
    assert set(schemas["InvokeRequest"]["required"]) == {"input"}


async def test_openapi_has_no_security_when_auth_is_off() -> None:
    async for client in serve(make_app()):
        document = (await client.get("/openapi.json")).json()
    assert "securitySchemes" not in document.get("components", {})
    assert "security" not in document["paths"]["/v1/invoke"]["post"]


SCOPED = {
    "mia": ports.Principal(
        "auth0|mia", TENANT, frozenset({deps.SCOPE_INVOKE, deps.SCOPE_READ, deps.SCOPE_DELETE})
    ),
    "max": ports.Principal(
        "auth0|max", TENANT, frozenset({deps.SCOPE_INVOKE, deps.SCOPE_READ, deps.SCOPE_DELETE})
    ),
    "auditor": ports.Principal(
        "auth0|audit",
        TENANT,
        frozenset(
            {
                deps.SCOPE_READ,
                deps.SCOPE_DELETE,
                "conversations:read:all",
                "conversations:delete:all",
            }
        ),
    ),
}


async def test_conversations_are_scoped_to_the_callers_subject() -> None:
    """Issue 10, hole 6: any token holder of the tenant read and deleted every
    conversation. Before the fix this test failed with:

        AssertionError: assert 200 == 404 (max read mia's messages)
    """
    app = make_app(authenticator=StaticAuthenticator(SCOPED))
    async for client in serve(app):
        opened = await client.post(
            "/v1/invoke", json={"input": "mia's secret plan"}, headers=bearer("mia")
        )
        conversation = opened.json()["conversationId"]
        path = f"/v1/conversations/{conversation}"
        read = await client.get(f"{path}/messages", headers=bearer("max"))
        listed = await client.get("/v1/conversations", headers=bearer("max"))
        continued = await client.post(
            "/v1/invoke",
            json={"input": "what did she say?", "conversationId": conversation},
            headers=bearer("max"),
        )
        deleted = await client.delete(path, headers=bearer("max"))
        still = await client.get(f"{path}/messages", headers=bearer("mia"))
        audited = await client.get(f"{path}/messages", headers=bearer("auditor"))
        everyone = await client.get("/v1/conversations", headers=bearer("auditor"))
        removed = await client.delete(path, headers=bearer("auditor"))
        gone = await client.get(f"{path}/messages", headers=bearer("mia"))

    assert opened.status_code == 200, opened.text
    assert read.status_code == 404, f"{read.status_code} (max read mia's messages)"
    assert_error(read, 404, "conversation_not_found")
    assert listed.json()["conversations"] == []
    assert_error(continued, 404, "conversation_not_found")
    assert_error(deleted, 404, "conversation_not_found")
    assert [m["content"] for m in still.json()["messages"]] == [
        "mia's secret plan",
        "[echo-1] mia's secret plan",
    ], "max's attempts changed nothing"
    assert audited.status_code == 200, "conversations:read:all reads every subject's"
    assert [c["conversationId"] for c in everyone.json()["conversations"]] == [conversation]
    assert removed.status_code == 204, "conversations:delete:all deletes every subject's"
    assert gone.status_code == 404
