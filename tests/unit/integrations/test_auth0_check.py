from __future__ import annotations

import json
import ssl
import urllib.parse
from collections.abc import Callable
from typing import Any

import httpx
import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import auth0, base
from bmad_integrations import binding as layout

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
    handler: Handler, spec: integration.Auth0 | None = None, secrets: base.Credentials | None = None
) -> base.Checked:
    return await auth0.check(
        spec or block(),
        secrets or creds(),
        timeout=5,
        transport=httpx.MockTransport(handler),
    )


async def fails(
    handler: Handler, spec: integration.Auth0 | None = None, secrets: base.Credentials | None = None
) -> base.CheckError:
    with pytest.raises(base.CheckError) as caught:
        await run(handler, spec, secrets)
    assert SECRET not in caught.value.message
    return caught.value


async def test_an_issuer_with_an_rsa_signing_key_checks_ok() -> None:
    seen: list[httpx.Request] = []
    checked = await run(issuer_handler(seen=seen))
    assert "1 RSA signing key" in checked.detail
    assert [str(r.url) for r in seen] == [
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
    assert str(seen[0].url) == "https://acme.eu.auth0.com/.well-known/openid-configuration"
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
    assert str(seen[0].url) == f"{bare}/.well-known/openid-configuration"


async def test_a_different_announced_issuer_is_invalid_configuration() -> None:
    error = await fails(issuer_handler(document=discovery("https://other.example.test/")))
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "set spec.auth0.issuer to exactly 'https://other.example.test/'" in error.message


async def test_an_issuer_differing_only_by_the_slash_is_named_exactly() -> None:
    error = await fails(
        issuer_handler(document=discovery(ISSUER)), block(issuer=ISSUER.rstrip("/"))
    )
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert f"exactly {ISSUER!r}" in error.message


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


async def test_a_redirect_is_not_followed_and_names_the_target() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(301, headers={"Location": "https://elsewhere.example.test/x"})

    error = await fails(handle)
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "redirect to https://elsewhere.example.test/x" in error.message


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
    assert "audience is invalid" in error.message


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
    assert "set spec.auth0.issuer to 'https://login.acme.test/' instead" in error.message
