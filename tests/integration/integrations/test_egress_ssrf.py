"""Issue 10, hole 3: an Integration check must not be a way into the cluster.

Checks run in the operator, whose namespace every tenant's NetworkPolicy admits, and
connect to hosts a tenant writes. Each test below is one way a hostile tenant could
make a check connect somewhere it must not and read the answer in the Integration's
status. A listener on 127.0.0.1 stands in for the cluster-internal service (loopback
is denied by the operator's default policy, like every private, link-local and other
non-public address); it answers with a marker, and the tests assert that the check
never connected to it, or, where it must connect, never quoted it.

Before the fix (5fc5cd7, where checks had no policy), the same tests run without one
failed, 12 of 12 hole tests (output shortened; ports vary):

    test_ssrf_llm_base_url_to_cluster_internal_refused: InvalidConfiguration, "the
      OpenAI-compatible endpoint at http://127.0.0.1:43375/v1/models answered 404 Not
      Found: INTERNAL-7f3a9c: …": the internal server was asked, and quoted
    test_ssrf_llm_base_url_with_a_query_string_refused: the server got GET
      /internal/admin?probe=/models: the query string swallowed the check's path
    test_ssrf_auth0_token_endpoint_on_another_origin_refused: InvalidConfiguration,
      "the issuer's token endpoint at http://127.0.0.1:44473/oauth/token answered 404
      Not Found: {'message': 'INTERNAL-7f3a9c', …}": the client secret was POSTed there
    test_ssrf_auth0_jwks_uri_on_another_origin_refused: "the issuer's JWKS at
      http://127.0.0.1:44065/keys answered 404 Not Found": the other origin was asked
    test_ssrf_redis_to_denied_address_refused: Unreachable, "cannot reach Redis at
      127.0.0.1:40165 (ResponseError: INTERNAL-7f3a9c) …"
    test_ssrf_redis_host_name_resolving_to_denied_address_refused: the same through
      the name localhost
    test_ssrf_postgres_to_denied_address_refused: Timeout after the probe accepted the
      connection
    test_ssrf_smtp_to_denied_address_refused: Checked (Ready=True), "the e-mail service
      INTERNAL-7f3a9c ESMTP answered the check": the banner in the status
    test_ssrf_s3_endpoint_to_denied_address_refused: the server got HEAD /bmad-probe
    test_ssrf_stripe_api_base_to_denied_address_refused: InvalidConfiguration, "Stripe
      at http://127.0.0.1:39713 refused the check's request (INTERNAL-7f3a9c) …"
    test_ssrf_redirect_to_denied_address_refused: the SDK (requests) followed the 302:
      the denied server got GET /v1/customers?limit=1
    test_ssrf_answers_of_an_allowed_destination_are_never_quoted: "cannot reach Redis
      at 127.0.0.1:34513 (ResponseError: INTERNAL-7f3a9c) …"
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, checks, egress

from .emulators import HttpServer, Reply, Request, Router, TcpProbe

pytestmark = pytest.mark.integration

INTERNAL = "INTERNAL-7f3a9c"
SECRET = "MARKER-ssrf-client-secret-1d9e"
ALLOW_SETTING = "BMAD_OPERATOR_EGRESS_ALLOW"

# The operator's policy when no BMAD_OPERATOR_EGRESS_* variable is set.
DEFAULT = egress.Policy()
# The test bed's: loopback allowed, so that checks reach the test bed's servers.
LOOPBACK_ALLOWED = egress.Policy.parse(allow=["127.0.0.0/8", "::1"])


def spec(type_: str, block: dict[str, Any], *, secret: bool = True) -> integration.IntegrationSpec:
    body: dict[str, Any] = {"type": type_, type_: block}
    if secret:
        body["secretRef"] = {"name": f"{type_.lower()}-creds"}
    return integration.IntegrationSpec.model_validate(body)


async def check(
    case: integration.IntegrationSpec, secret: dict[str, bytes] | None, policy: egress.Policy
) -> base.CheckResult:
    return await checks.check_integration(case, secret, secret_found=True, timeout=5, policy=policy)


def assert_refused(result: base.CheckResult) -> None:
    assert result.reason == base.Reason.DESTINATION_NOT_ALLOWED, result.message
    assert not result.ok
    assert INTERNAL not in result.message
    assert ALLOW_SETTING in result.message


def answering(status: int, body: Any, headers: dict[str, str] | None = None) -> Router:
    def route(request: Request) -> Reply:
        return Reply(status, body, headers or {})

    return route


@pytest.fixture
def internal_http() -> Iterator[HttpServer]:
    """An internal HTTP service that answers every request with the marker."""
    with HttpServer(answering(404, {"error": {"message": INTERNAL, "code": INTERNAL}})) as server:
        yield server


# --- llm ----------------------------------------------------------------------------


async def test_ssrf_llm_base_url_to_cluster_internal_refused(internal_http: HttpServer) -> None:
    case = spec(
        "llm", {"provider": "openai-compatible", "baseUrl": f"{internal_http.url}/v1"}, secret=False
    )
    result = await check(case, None, DEFAULT)
    assert_refused(result)
    assert "spec.llm.baseUrl" in result.message
    assert internal_http.requests == []


async def test_ssrf_llm_base_url_with_a_query_string_refused(internal_http: HttpServer) -> None:
    # Even where the host is allowed: "?…" would turn the path the check appends into
    # a query, so the tenant would choose the exact path the operator requests.
    base_url = f"{internal_http.url}/internal/admin?probe="
    case = spec("llm", {"provider": "openai-compatible", "baseUrl": base_url}, secret=False)
    result = await check(case, None, LOOPBACK_ALLOWED)
    assert result.reason == base.Reason.INVALID_CONFIGURATION, result.message
    assert "spec.llm.baseUrl" in result.message
    assert internal_http.requests == []


# --- auth0 --------------------------------------------------------------------------


def issuer_router(issuer: list[str], *, token_endpoint: str, jwks_uri: str) -> Router:
    """Discovery that names endpoints of the tenant's choosing; no keys of its own."""

    def route(request: Request) -> Reply:
        if request.path == "/.well-known/openid-configuration":
            return Reply(
                200,
                {"issuer": issuer[0], "jwks_uri": jwks_uri, "token_endpoint": token_endpoint},
            )
        if request.path == "/jwks.json":
            return Reply(200, {"keys": [{"kty": "RSA", "use": "sig", "n": "AQAB", "e": "AQAB"}]})
        return Reply(404, {})

    return route


def auth0_spec(issuer: str) -> integration.IntegrationSpec:
    return spec(
        "auth0", {"issuer": issuer, "audience": "https://agents.bmad.test", "clientId": "m2m"}
    )


async def test_ssrf_auth0_token_endpoint_on_another_origin_refused(
    internal_http: HttpServer,
) -> None:
    issuer: list[str] = []
    with HttpServer(answering(404, {})) as server:
        issuer.append(f"{server.url}/")
        server.router = issuer_router(
            issuer,
            token_endpoint=f"{internal_http.url}/oauth/token",
            jwks_uri=f"{server.url}/jwks.json",
        )
        secret = {"clientSecret": SECRET.encode()}
        result = await check(auth0_spec(issuer[0]), secret, LOOPBACK_ALLOWED)
    assert_refused(result)
    assert "token_endpoint" in result.message
    assert internal_http.requests == []  # the client secret never went there
    assert SECRET not in result.message


async def test_ssrf_auth0_jwks_uri_on_another_origin_refused(internal_http: HttpServer) -> None:
    issuer: list[str] = []
    with HttpServer(answering(404, {})) as server:
        issuer.append(f"{server.url}/")
        server.router = issuer_router(
            issuer, token_endpoint=f"{server.url}/oauth/token", jwks_uri=f"{internal_http.url}/keys"
        )
        result = await check(
            auth0_spec(issuer[0]), {"clientSecret": SECRET.encode()}, LOOPBACK_ALLOWED
        )
    assert_refused(result)
    assert "jwks_uri" in result.message
    assert internal_http.requests == []


async def test_auth0_endpoint_on_another_origin_is_followed_when_its_host_is_allowed(
    internal_http: HttpServer,
) -> None:
    """The exception an administrator can make: name the other origin in the allow list."""
    issuer: list[str] = []
    with HttpServer(answering(404, {})) as server:
        issuer.append(f"{server.url}/")
        server.router = issuer_router(
            issuer, token_endpoint=f"{server.url}/oauth/token", jwks_uri=f"{internal_http.url}/keys"
        )
        policy = egress.Policy.parse(
            allow=[f"127.0.0.1:{server.port}", f"127.0.0.1:{internal_http.port}"]
        )
        result = await check(auth0_spec(issuer[0]), {"clientSecret": SECRET.encode()}, policy)
    assert len(internal_http.requests) == 1, result.message
    assert result.reason == base.Reason.INVALID_CONFIGURATION  # it answered 404
    assert INTERNAL not in result.message


# --- redis, postgres, SMTP ----------------------------------------------------------


async def test_ssrf_redis_to_denied_address_refused() -> None:
    with TcpProbe(reply=f"-ERR {INTERNAL}\r\n".encode()) as probe:
        result = await check(
            spec("redis", {"host": "127.0.0.1", "port": probe.port}, secret=False), None, DEFAULT
        )
    assert_refused(result)
    assert "spec.redis.host" in result.message
    assert probe.connections == 0


async def test_ssrf_redis_host_name_resolving_to_denied_address_refused() -> None:
    # The name is judged by what it resolves to, not by how it is spelled.
    with TcpProbe(reply=f"-ERR {INTERNAL}\r\n".encode()) as probe:
        result = await check(
            spec("redis", {"host": "localhost", "port": probe.port}, secret=False), None, DEFAULT
        )
    assert_refused(result)
    assert probe.connections == 0


async def test_ssrf_postgres_to_denied_address_refused() -> None:
    block = {"host": "127.0.0.1", "port": 0, "database": "postgres", "sslMode": "disable"}
    with TcpProbe(reply=f"E{INTERNAL}\x00".encode()) as probe:
        block["port"] = probe.port
        result = await check(
            spec("postgres", block), {"username": b"postgres", "password": SECRET.encode()}, DEFAULT
        )
    assert_refused(result)
    assert "spec.postgres.host" in result.message
    assert probe.connections == 0


async def test_ssrf_smtp_to_denied_address_refused() -> None:
    with TcpProbe(
        greeting=f"220 probe.internal {INTERNAL} ESMTP\r\n".encode(),
        reply=f"250 {INTERNAL}\r\n".encode(),
    ) as probe:
        block = {"provider": "smtp", "host": "127.0.0.1", "port": probe.port, "from": "a@b.test"}
        result = await check(spec("email", block, secret=False), None, DEFAULT)
    assert_refused(result)
    assert "spec.email.host" in result.message
    assert probe.connections == 0
    assert result.server_version is None


# --- object storage and Stripe (synchronous SDKs in a worker thread) ----------------


async def test_ssrf_s3_endpoint_to_denied_address_refused() -> None:
    denied = (
        "<?xml version='1.0'?><Error><Code>AccessDenied</Code>"
        f"<Message>{INTERNAL}</Message></Error>"
    )
    with HttpServer(answering(403, denied.encode(), {"Server": INTERNAL})) as server:
        block = {"provider": "minio", "endpoint": server.url, "bucket": "bmad-probe"}
        keys = {"accessKeyId": b"AKIDEXAMPLE", "secretAccessKey": SECRET.encode()}
        result = await check(spec("objectStorage", block), keys, DEFAULT)
        assert server.requests == []
    assert_refused(result)
    assert "spec.objectStorage.endpoint" in result.message


async def test_ssrf_stripe_api_base_to_denied_address_refused(internal_http: HttpServer) -> None:
    result = await check(
        spec("stripe", {"apiBase": internal_http.url}), {"apiKey": b"sk_test_123"}, DEFAULT
    )
    assert_refused(result)
    assert "spec.stripe.apiBase" in result.message
    assert internal_http.requests == []


async def test_ssrf_redirect_to_denied_address_refused(internal_http: HttpServer) -> None:
    """An allowed server that redirects to a denied one: the redirect is not followed."""
    redirect = answering(302, b"", {"Location": f"{internal_http.url}/v1/customers?limit=1"})
    with HttpServer(redirect) as allowed:
        policy = egress.Policy.parse(allow=[f"127.0.0.1:{allowed.port}"])
        result = await check(
            spec("stripe", {"apiBase": allowed.url}), {"apiKey": b"sk_test_1"}, policy
        )
        assert len(allowed.requests) == 1
    assert internal_http.requests == []
    assert result.reason == base.Reason.INVALID_CONFIGURATION, result.message
    assert "redirect" in result.message
    assert str(internal_http.port) not in result.message  # the Location is not quoted


# --- where the destination is allowed, its answers are still not quoted -------------


async def test_ssrf_answers_of_an_allowed_destination_are_never_quoted(
    internal_http: HttpServer,
) -> None:
    """An administrator allowed the destination: the check connects, but whatever the
    server answers (error texts, banners, reason phrases) stays out of the status."""
    line = f"-ERR {INTERNAL}\r\n".encode()
    smtp = (f"220 probe {INTERNAL} ESMTP\r\n".encode(), f"250 {INTERNAL}\r\n".encode())
    with (
        TcpProbe(reply=line) as redis,
        TcpProbe(reply=line) as pg,
        TcpProbe(greeting=smtp[0], reply=smtp[1]) as mail,
    ):
        cases = [
            (spec("redis", {"host": "127.0.0.1", "port": redis.port}, secret=False), None),
            (
                spec(
                    "postgres",
                    {"host": "127.0.0.1", "port": pg.port, "database": "d", "sslMode": "disable"},
                ),
                {"username": b"u", "password": SECRET.encode()},
            ),
            (
                spec(
                    "email",
                    {"provider": "smtp", "host": "127.0.0.1", "port": mail.port, "from": "a@b.c"},
                    secret=False,
                ),
                None,
            ),
            (
                spec(
                    "llm",
                    {"provider": "openai-compatible", "baseUrl": f"{internal_http.url}/v1"},
                    secret=False,
                ),
                None,
            ),
            (spec("stripe", {"apiBase": internal_http.url}), {"apiKey": b"sk_test_1"}),
        ]
        results = [await check(case, secret, LOOPBACK_ALLOWED) for case, secret in cases]
    assert (redis.connections, pg.connections, mail.connections) == (1, 1, 1)
    assert len(internal_http.requests) == 2
    for result in results:
        assert INTERNAL not in result.message, result.message
        assert INTERNAL not in (result.server_version or ""), result.server_version
