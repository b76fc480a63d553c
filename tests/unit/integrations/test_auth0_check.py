from __future__ import annotations

import json
import ssl
import urllib.parse
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import auth0, base, egress
from bmad_integrations import binding as layout

from .policies import OPEN, as_named

pytestmark = pytest.mark.unit

ISSUER = "https://issuer.example.test/"
SECRET = "cs-MARKER-7f3a9b1c2d"  # a client secret that must never show in a message
RSA_KEY = {"kty": "RSA", "use": "sig", "alg": "RS256", "kid": "k1", "n": "sXch", "e": "AQAB"}

Handler = Callable[[httpx.Request], httpx.Response]


def block(**fields: Any) -> integration.Auth0:
    spec: dict[str, Any] = {"issuer": ISSUER, "audience": "https://api.example.test"}
    spec.update(fields)
    return integration.Auth0.model_validate({k: v for k, v in spec.items() if v is not None})


def creds(**data: str) -> base.Credentials:
    return base.Credentials(secret_name="auth0-creds", data=data)


def discovery(issuer: str = ISSUER, **extra: Any) -> dict[str, Any]:
    document = {
        "issuer": issuer,
        "jwks_uri": f"{issuer}.well-known/jwks.json",
        "token_endpoint": f"{issuer}oauth/token",
    }
    document.update(extra)
    return {k: v for k, v in document.items() if v is not None}


def issuer_handler(
    *,
    document: dict[str, Any] | None = None,
    jwks: dict[str, Any] | None = None,
    token: Callable[[dict[str, str]], httpx.Response] | None = None,
    seen: list[httpx.Request] | None = None,
) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        path = request.url.path
        if path.endswith("/.well-known/openid-configuration"):
            return httpx.Response(200, json=document if document is not None else discovery())
        if path.endswith("/.well-known/jwks.json"):
            return httpx.Response(200, json=jwks if jwks is not None else {"keys": [RSA_KEY]})
        if path == "/oauth/token" and request.method == "POST" and token is not None:
            return token(dict(urllib.parse.parse_qsl(request.content.decode())))
        return httpx.Response(404, json={"error": "not_found"})

    return handle


async def run(
    handler: Handler,
    spec: integration.Auth0 | None = None,
    secrets: base.Credentials | None = None,
    policy: egress.Policy = OPEN,
) -> base.Checked:
    return await auth0.check(
        spec or block(),
        secrets or creds(),
        timeout=5,
        policy=policy,
        transport=httpx.MockTransport(handler),
    )


async def fails(
    handler: Handler,
    spec: integration.Auth0 | None = None,
    secrets: base.Credentials | None = None,
    policy: egress.Policy = OPEN,
) -> base.CheckError:
    with pytest.raises(base.CheckError) as caught:
        await run(handler, spec, secrets, policy)
    assert SECRET not in caught.value.message
    return caught.value


async def test_an_issuer_with_an_rsa_signing_key_checks_ok() -> None:
    seen: list[httpx.Request] = []
    checked = await run(issuer_handler(seen=seen))
    assert "1 RSA signing key" in checked.detail
    assert [as_named(r) for r in seen] == [
        f"{ISSUER}.well-known/openid-configuration",
        f"{ISSUER}.well-known/jwks.json",
    ]


async def test_the_domain_names_auth0s_https_issuer() -> None:
    seen: list[httpx.Request] = []
    domain_issuer = "https://acme.eu.auth0.com/"
    checked = await run(
        issuer_handler(document=discovery(domain_issuer), seen=seen),
        block(issuer=None, domain="acme.eu.auth0.com"),
    )
    assert as_named(seen[0]) == "https://acme.eu.auth0.com/.well-known/openid-configuration"
    assert domain_issuer in checked.detail


async def test_an_issuer_without_trailing_slash_is_joined_cleanly() -> None:
    seen: list[httpx.Request] = []
    bare = "https://login.example.test/realms/bmad"
    await run(
        issuer_handler(
            document=discovery(bare, jwks_uri=f"{bare}/.well-known/jwks.json"), seen=seen
        ),
        block(issuer=bare),
    )
    assert as_named(seen[0]) == f"{bare}/.well-known/openid-configuration"


async def test_a_different_announced_issuer_is_invalid_configuration() -> None:
    error = await fails(issuer_handler(document=discovery("https://other.example.test/")))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "names another issuer than 'https://issuer.example.test/'" in error.message
    assert "other.example.test" not in error.message  # the document's word, not quoted


@pytest.mark.parametrize(
    ("configured", "announced", "fix"),
    [
        (ISSUER.rstrip("/"), ISSUER, "set spec.auth0.issuer with the trailing slash"),
        (ISSUER, ISSUER.rstrip("/"), "set spec.auth0.issuer without the trailing slash"),
    ],
)
async def test_an_issuer_differing_only_by_the_slash_says_which_way(
    configured: str, announced: str, fix: str
) -> None:
    document = discovery(announced, jwks_uri=f"{ISSUER}.well-known/jwks.json")
    error = await fails(issuer_handler(document=document), block(issuer=configured))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert fix in error.message


@pytest.mark.parametrize(
    ("status", "body", "reason"),
    [
        (404, b"not here", base.Reason.INVALID_CONFIGURATION),
        (200, b"<html>login</html>", base.Reason.INVALID_CONFIGURATION),
        (200, b"[1, 2]", base.Reason.INVALID_CONFIGURATION),
        (503, b"down", base.Reason.UNREACHABLE),
        (429, b"slow down", base.Reason.UNREACHABLE),
    ],
)
async def test_a_bad_discovery_answer_maps_to_a_reason(
    status: int, body: bytes, reason: base.Reason
) -> None:
    error = await fails(lambda request: httpx.Response(status, content=body))
    assert error.reason is reason
    if reason is base.Reason.UNREACHABLE:
        assert str(status) in error.message
    else:
        assert "spec.auth0.issuer" in error.message


async def test_a_redirect_is_not_followed_nor_quoted() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(301, headers={"Location": "https://elsewhere.example.test/x"})

    error = await fails(handle)
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "301, a redirect, which checks do not follow" in error.message
    assert "elsewhere" not in error.message
    assert len(seen) == 1


async def test_a_discovery_without_jwks_uri_is_invalid_configuration() -> None:
    error = await fails(issuer_handler(document=discovery(jwks_uri=None)))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "jwks_uri" in error.message


@pytest.mark.parametrize(
    "keys",
    [
        [],
        [{"kty": "EC", "use": "sig", "crv": "P-256", "x": "a", "y": "b"}],
        [{**RSA_KEY, "use": "enc"}],
        [{"kty": "RSA", "use": "sig"}],  # no modulus
        ["not a key"],
    ],
)
async def test_a_jwks_without_rsa_signing_keys_is_invalid_configuration(
    keys: list[Any],
) -> None:
    error = await fails(issuer_handler(jwks={"keys": keys}))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "no RSA signing key" in error.message


async def test_an_rsa_key_without_use_counts_as_signing() -> None:
    key = {k: v for k, v in RSA_KEY.items() if k != "use"}
    extra = {"kty": "EC", "crv": "P-256", "x": "a", "y": "b"}
    checked = await run(issuer_handler(jwks={"keys": [key, extra, RSA_KEY]}))
    assert "2 RSA signing key" in checked.detail


async def test_a_jwks_that_is_not_a_key_set_is_invalid_configuration() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        if request.url.path.endswith("jwks.json"):
            return httpx.Response(200, json=[RSA_KEY])
        return issuer_handler()(request)

    error = await fails(handle)
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "not a JWK set" in error.message


async def test_a_client_secret_is_proven_with_a_client_credentials_grant() -> None:
    forms: list[dict[str, str]] = []

    def token(form: dict[str, str]) -> httpx.Response:
        forms.append(form)
        return httpx.Response(200, json={"access_token": "eyJ.x.y", "token_type": "Bearer"})

    checked = await run(
        issuer_handler(token=token), block(clientId="m2m-client"), creds(clientSecret=SECRET)
    )
    assert forms == [
        {
            "grant_type": "client_credentials",
            "client_id": "m2m-client",
            "client_secret": SECRET,
            "audience": "https://api.example.test",
        }
    ]
    assert "m2m-client obtained a token" in checked.detail


async def test_the_secret_key_name_can_be_overridden() -> None:
    forms: list[dict[str, str]] = []

    def token(form: dict[str, str]) -> httpx.Response:
        forms.append(form)
        return httpx.Response(200, json={"access_token": "eyJ.x.y"})

    secrets = base.Credentials(
        secret_name="auth0-creds",
        data={"m2m": SECRET},
        key_names={"client_secret": "m2m"},
    )
    await run(issuer_handler(token=token), block(clientId="m2m-client"), secrets)
    assert forms[0]["client_secret"] == SECRET


@pytest.mark.parametrize(
    ("status", "body"),
    [
        (401, {"error": "access_denied", "error_description": "Unauthorized"}),
        (403, {"error": "access_denied", "error_description": "Service not enabled"}),
        (400, {"error": "invalid_client", "error_description": f"bad secret {SECRET}"}),
        (400, {"error": "unauthorized_client", "error_description": "grant not allowed"}),
        (401, b"no body"),
    ],
)
async def test_a_refused_token_is_authentication_failed(status: int, body: Any) -> None:
    def token(form: dict[str, str]) -> httpx.Response:
        if isinstance(body, bytes):
            return httpx.Response(status, content=body)
        return httpx.Response(status, json=body)

    error = await fails(
        issuer_handler(token=token), block(clientId="m2m-client"), creds(clientSecret=SECRET)
    )
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "m2m-client" in error.message
    assert "'clientSecret'" in error.message


async def test_a_malformed_token_request_is_invalid_configuration() -> None:
    def token(form: dict[str, str]) -> httpx.Response:
        return httpx.Response(
            400, json={"error": "invalid_request", "error_description": "audience is invalid"}
        )

    error = await fails(
        issuer_handler(token=token), block(clientId="m2m-client"), creds(clientSecret=SECRET)
    )
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "OAuth error invalid_request" in error.message  # a code the RFC defines
    assert "audience is invalid" not in error.message  # the description is the server's


async def test_a_token_answer_without_access_token_is_invalid_configuration() -> None:
    error = await fails(
        issuer_handler(token=lambda form: httpx.Response(200, json={"ok": True})),
        block(clientId="m2m-client"),
        creds(clientSecret=SECRET),
    )
    assert error.reason is base.Reason.INVALID_CONFIGURATION


async def test_a_discovery_without_token_endpoint_fails_only_with_a_client() -> None:
    handler = issuer_handler(document=discovery(token_endpoint=None))
    await run(handler)
    error = await fails(handler, block(clientId="m2m-client"), creds(clientSecret=SECRET))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "token_endpoint" in error.message


@pytest.mark.parametrize(
    ("spec", "secrets"),
    [
        # verification only: a client id but no credentials Secret at all
        (block(clientId="m2m-client"), base.Credentials(secret_name=None)),
        (block(), creds(clientSecret=SECRET)),  # a secret, but no client id
    ],
)
async def test_no_token_is_requested_without_both_client_id_and_secret(
    spec: integration.Auth0, secrets: base.Credentials
) -> None:
    seen: list[httpx.Request] = []
    await run(issuer_handler(seen=seen), spec, secrets)
    assert all(r.method == "GET" for r in seen)


async def test_a_client_with_a_secret_ref_but_no_client_secret_is_a_missing_key() -> None:
    error = await fails(issuer_handler(), block(clientId="m2m-client"), creds())
    assert error.reason is base.Reason.SECRET_KEY_MISSING
    assert "clientSecret" in error.message


def _raising(exc: Exception) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc

    return handle


def _tls_failure(request: httpx.Request) -> httpx.Response:
    try:
        raise ssl.SSLCertVerificationError(1, "certificate verify failed: self-signed")
    except ssl.SSLError as exc:
        raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]", request=request) from exc


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (_raising(httpx.ConnectError("[Errno 111] Connection refused")), base.Reason.UNREACHABLE),
        (_raising(httpx.ConnectTimeout("timed out")), base.Reason.TIMEOUT),
        (_raising(httpx.ReadTimeout("timed out")), base.Reason.TIMEOUT),
        (_raising(httpx.RemoteProtocolError("peer closed")), base.Reason.UNREACHABLE),
        (_tls_failure, base.Reason.TLS_ERROR),
    ],
)
async def test_transport_failures_map_to_reasons(handler: Handler, reason: base.Reason) -> None:
    error = await fails(handler)
    assert error.reason is reason
    if reason is base.Reason.TLS_ERROR:
        assert "'ca.crt'" in error.message


async def test_a_ca_that_is_not_pem_is_invalid_configuration() -> None:
    error = await fails(issuer_handler(), secrets=creds(**{"ca.crt": "not a certificate"}))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "'ca.crt'" in error.message


def test_binding_of_a_domain_with_a_client() -> None:
    spec = block(issuer=None, domain="acme.eu.auth0.com", clientId="m2m-client")
    assert auth0.binding(spec, creds(clientSecret=SECRET)) == {
        "type": "auth0",
        "provider": "auth0",
        "issuer": "https://acme.eu.auth0.com/",
        "domain": "acme.eu.auth0.com",
        "audience": "https://api.example.test",
        "jwksUri": "https://acme.eu.auth0.com/.well-known/jwks.json",
        "tokenEndpoint": "https://acme.eu.auth0.com/oauth/token",
        "clientId": "m2m-client",
        "clientSecret": SECRET,
    }


def test_binding_of_an_issuer_without_credentials() -> None:
    data = auth0.binding(block(issuer="https://login.example.test:8443/realms/bmad"), creds())
    assert data == {
        "type": "auth0",
        "provider": "auth0",
        "issuer": "https://login.example.test:8443/realms/bmad",
        "domain": "login.example.test:8443",
        "audience": "https://api.example.test",
        "jwksUri": "https://login.example.test:8443/realms/bmad/.well-known/jwks.json",
        "tokenEndpoint": "https://login.example.test:8443/realms/bmad/oauth/token",
    }
    assert all(isinstance(v, str) for v in data.values())
    json.dumps(data)


@pytest.mark.parametrize(
    ("spec", "secrets"),
    [
        (
            block(issuer=None, domain="acme.eu.auth0.com", clientId="m2m"),
            creds(clientSecret=SECRET),
        ),
        (block(), creds()),
    ],
)
def test_bindings_follow_the_shared_layout(
    spec: integration.Auth0, secrets: base.Credentials
) -> None:
    assert layout.problems(auth0.binding(spec, secrets)) == []


async def test_a_discovery_without_issuer_is_invalid_configuration() -> None:
    document = {k: v for k, v in discovery().items() if k != "issuer"}
    error = await fails(issuer_handler(document=document))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "names no issuer" in error.message


async def test_a_domain_whose_issuer_differs_suggests_the_issuer_field() -> None:
    document = discovery("https://login.acme.test/")
    error = await fails(issuer_handler(document=document), block(issuer=None, domain="acme.test"))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "check spec.auth0.domain" in error.message
    assert "login.acme.test" not in error.message


# --- endpoints the discovery document names -----------------------------------------


@pytest.mark.parametrize(
    ("key", "url"),
    [
        ("jwks_uri", "https://keys.elsewhere.test/jwks.json"),
        ("jwks_uri", "http://issuer.example.test/.well-known/jwks.json"),  # scheme downgrade
        ("jwks_uri", "https://issuer.example.test:8443/.well-known/jwks.json"),  # other port
        ("token_endpoint", "https://tokens.elsewhere.test/oauth/token"),
    ],
)
async def test_an_endpoint_on_another_origin_is_not_followed(key: str, url: str) -> None:
    seen: list[httpx.Request] = []
    handler = issuer_handler(document=discovery(**{key: url}), seen=seen)
    error = await fails(handler, block(clientId="m2m"), creds(clientSecret=SECRET))
    assert error.reason is base.Reason.DESTINATION_NOT_ALLOWED
    assert key in error.message
    assert egress.ALLOW_SETTING in error.message
    assert "elsewhere" not in error.message
    assert all(request.headers["Host"] == "issuer.example.test" for request in seen)
    assert all(request.method == "GET" for request in seen)  # the secret was never sent


@pytest.mark.parametrize("rule", ["keys.elsewhere.test", ".elsewhere.test"])
async def test_an_endpoint_on_a_host_the_allow_list_names_is_followed(rule: str) -> None:
    seen: list[httpx.Request] = []
    handler = issuer_handler(
        document=discovery(jwks_uri="https://keys.elsewhere.test/.well-known/jwks.json"),
        seen=seen,
    )
    policy = egress.Policy.parse(allow=[rule], resolver=OPEN.resolver)
    await run(handler, policy=policy)
    assert [request.headers["Host"] for request in seen] == [
        "issuer.example.test",
        "keys.elsewhere.test",
    ]


async def test_a_broad_allowed_range_does_not_let_endpoints_leave_the_origin() -> None:
    handler = issuer_handler(document=discovery(jwks_uri="https://keys.elsewhere.test/k"))
    policy = egress.Policy.parse(allow=["0.0.0.0/0"], resolver=OPEN.resolver)
    error = await fails(handler, policy=policy)
    assert error.reason is base.Reason.DESTINATION_NOT_ALLOWED


async def test_an_endpoint_that_is_not_http_is_invalid_configuration() -> None:
    handler = issuer_handler(document=discovery(jwks_uri="file:///etc/passwd"))
    error = await fails(handler)
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "not an http(s) URL" in error.message
