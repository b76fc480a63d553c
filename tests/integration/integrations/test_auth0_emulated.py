"""The auth0 check against an OIDC issuer emulator this project wrote (HTTP and HTTPS).

`emulators.OidcIssuer` serves discovery, a JWKS and a client-credentials token
endpoint in Auth0's shapes, signing real RS256 tokens; it is not Auth0.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from jose import jwt

from bmad_crds.v1alpha1 import integration
from bmad_integrations import auth0, base
from bmad_testbed import procs

from .emulators import HttpServer, OidcIssuer, TlsMaterial, make_tls
from .policies import TESTBED

pytestmark = pytest.mark.integration

CLIENT_ID = "bmad-m2m"
CLIENT_SECRET = "cs-MARKER-b8e1f04a"
AUDIENCE = "https://agents.bmad.test"


def spec(issuer: str, **fields: Any) -> integration.Auth0:
    return integration.Auth0.model_validate({"issuer": issuer, "audience": AUDIENCE, **fields})


def creds(**data: str) -> base.Credentials:
    return base.Credentials(secret_name="auth0-creds", data=data)


@pytest.fixture
def issuer() -> Iterator[OidcIssuer]:
    oidc = OidcIssuer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE)
    with HttpServer(oidc.route) as server:
        oidc.bind(server.url)
        yield oidc


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls(tmp_path_factory.mktemp("oidc-tls"), name="oidc")


@pytest.fixture(scope="module")
def other_ca(tmp_path_factory: pytest.TempPathFactory) -> TlsMaterial:
    return make_tls(tmp_path_factory.mktemp("other-tls"), name="other")


@pytest.fixture
def https_issuer(tls: TlsMaterial) -> Iterator[OidcIssuer]:
    oidc = OidcIssuer(client_id=CLIENT_ID, client_secret=CLIENT_SECRET, audience=AUDIENCE)
    with HttpServer(oidc.route, tls=tls.server_context()) as server:
        oidc.bind(server.url)
        yield oidc


async def failure(block: integration.Auth0, secrets: base.Credentials) -> base.CheckError:
    with pytest.raises(base.CheckError) as caught:
        await auth0.check(block, secrets, timeout=5, policy=TESTBED)
    assert CLIENT_SECRET not in caught.value.message
    return caught.value


async def test_a_real_issuer_with_a_client_checks_ready(issuer: OidcIssuer) -> None:
    checked = await auth0.check(
        spec(issuer.issuer, clientId=CLIENT_ID),
        creds(clientSecret=CLIENT_SECRET),
        timeout=5,
        policy=TESTBED,
    )
    assert "1 RSA signing key" in checked.detail
    assert f"client {CLIENT_ID} obtained a token" in checked.detail


async def test_the_issuers_tokens_verify_against_the_bound_jwks(issuer: OidcIssuer) -> None:
    # What the agent runtime will do with the binding: fetch the JWKS, verify a token.
    data = auth0.binding(spec(issuer.issuer, clientId=CLIENT_ID), creds(clientSecret="x" * 8))
    async with httpx.AsyncClient(timeout=5) as http:
        token = (
            await http.post(
                data["tokenEndpoint"],
                data={
                    "grant_type": "client_credentials",
                    "client_id": data["clientId"],
                    "client_secret": CLIENT_SECRET,
                    "audience": data["audience"],
                },
            )
        ).json()["access_token"]
        jwks = (await http.get(data["jwksUri"])).json()
    claims = jwt.decode(
        token, jwks, algorithms=["RS256"], audience=data["audience"], issuer=data["issuer"]
    )
    assert claims["sub"] == f"{CLIENT_ID}@clients"


async def test_verification_only_needs_no_secret(issuer: OidcIssuer) -> None:
    await auth0.check(spec(issuer.issuer), creds(), timeout=5, policy=TESTBED)
    assert [(r.method, r.path) for r in issuer.requests] == [
        ("GET", "/.well-known/openid-configuration"),
        ("GET", "/.well-known/jwks.json"),
    ]


async def test_a_wrong_client_secret_is_authentication_failed(issuer: OidcIssuer) -> None:
    error = await failure(
        spec(issuer.issuer, clientId=CLIENT_ID), creds(clientSecret="cs-wrong-secret")
    )
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "access_denied" in error.message
    assert "cs-wrong-secret" not in error.message


async def test_an_unauthorized_audience_is_authentication_failed(issuer: OidcIssuer) -> None:
    block = integration.Auth0.model_validate(
        {"issuer": issuer.issuer, "audience": "https://other.api", "clientId": CLIENT_ID}
    )
    error = await failure(block, creds(clientSecret=CLIENT_SECRET))
    assert error.reason is base.Reason.AUTHENTICATION_FAILED
    assert "(access_denied)" in error.message  # an OAuth code; the description is not quoted
    assert "Service not enabled" not in error.message


async def test_an_issuer_announcing_another_name_is_invalid_configuration() -> None:
    oidc = OidcIssuer(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        audience=AUDIENCE,
        announced_issuer="https://tenant.auth0.example/",
    )
    with HttpServer(oidc.route) as server:
        oidc.bind(server.url)
        error = await failure(spec(oidc.issuer), creds())
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "names another issuer than" in error.message
    assert "tenant.auth0.example" not in error.message


async def test_a_jwks_without_rsa_keys_is_invalid_configuration() -> None:
    oidc = OidcIssuer(
        client_id=CLIENT_ID,
        client_secret=CLIENT_SECRET,
        audience=AUDIENCE,
        jwks_keys=[{"kty": "EC", "use": "sig", "crv": "P-256", "x": "AA", "y": "AA"}],
    )
    with HttpServer(oidc.route) as server:
        oidc.bind(server.url)
        error = await failure(spec(oidc.issuer), creds())
    assert error.reason is base.Reason.INVALID_CONFIGURATION
    assert "no RSA signing key" in error.message


async def test_a_closed_port_is_unreachable() -> None:
    port = procs.free_port()
    error = await failure(spec(f"http://127.0.0.1:{port}/"), creds())
    assert error.reason is base.Reason.UNREACHABLE
    assert f"127.0.0.1:{port}" in error.message


async def test_https_issuer_with_its_ca_checks_ready(
    https_issuer: OidcIssuer, tls: TlsMaterial
) -> None:
    assert https_issuer.issuer.startswith("https://")
    await auth0.check(
        spec(https_issuer.issuer, clientId=CLIENT_ID),
        creds(clientSecret=CLIENT_SECRET, **{"ca.crt": tls.ca_pem}),
        timeout=5,
        policy=TESTBED,
    )


@pytest.mark.parametrize("trust", ["other", "system"])
async def test_https_issuer_with_the_wrong_ca_is_a_tls_error(
    https_issuer: OidcIssuer, other_ca: TlsMaterial, trust: str
) -> None:
    data = {"ca.crt": other_ca.ca_pem} if trust == "other" else {}
    error = await failure(spec(https_issuer.issuer), creds(**data))
    assert error.reason is base.Reason.TLS_ERROR
    assert "'ca.crt'" in error.message


def test_the_emulators_write_their_keys_privately(tls: TlsMaterial) -> None:
    assert Path(tls.key_path).stat().st_mode & 0o077 == 0
