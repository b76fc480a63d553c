"""`auth.JwtAuthenticator` against a real OIDC issuer on loopback, over real HTTP.

The issuer is a small threaded HTTP server serving the discovery document and a JWKS
that the test rotates; the authenticator makes its own httpx client, as it does in
an agent pod built from an ``auth0`` binding.
"""

from __future__ import annotations

import base64
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

from bmad_runtime import auth, bindings, ports

pytestmark = pytest.mark.integration

AUDIENCE = "https://agents.bmad.test"
TENANT = "acme"


def b64uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Key:
    def __init__(self, kid: str) -> None:
        self.kid = kid
        self.private = rsa.generate_private_key(public_exponent=65537, key_size=2048)

    def jwk(self) -> dict[str, str]:
        numbers = self.private.public_key().public_numbers()
        return {
            "kty": "RSA",
            "use": "sig",
            "alg": "RS256",
            "kid": self.kid,
            "n": b64uint(numbers.n),
            "e": b64uint(numbers.e),
        }

    def sign(self, claims: dict[str, Any]) -> str:
        pem = self.private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        token: str = jwt.encode(claims, pem, "RS256", headers={"kid": self.kid})
        return token


class Issuer:
    """Discovery and JWKS on 127.0.0.1, counting the JWKS requests."""

    def __init__(self) -> None:
        self.keys: list[dict[str, str]] = []
        self.jwks_requests = 0
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body: dict[str, Any]
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}keys"}
                elif self.path == "/keys":
                    issuer.jwks_requests += 1
                    body = {"keys": list(issuer.keys)}
                else:
                    self.send_error(404)
                    return
                data = json.dumps(body).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def claims(self, **overrides: Any) -> dict[str, Any]:
        now = int(time.time())
        return {
            "iss": self.url,
            "aud": AUDIENCE,
            "sub": "auth0|alice",
            "iat": now,
            "exp": now + 300,
            auth.TENANT_CLAIM: TENANT,
            "scope": "agents:invoke",
            **overrides,
        }


@pytest.fixture
def issuer() -> Iterator[Issuer]:
    oidc = Issuer()
    oidc.thread.start()
    try:
        yield oidc
    finally:
        oidc.server.shutdown()
        oidc.server.server_close()


async def test_discovery_rotation_and_refusals_over_real_http(issuer: Issuer) -> None:
    first, second = Key("2026-01"), Key("2026-02")
    issuer.keys = [first.jwk()]
    # The refresh interval runs on a clock the test moves: no sleeping.
    now = [1000.0]
    authenticator = auth.JwtAuthenticator(
        issuer=issuer.url,
        audience=AUDIENCE,
        tenant=TENANT,
        jwks_uri=None,
        min_refresh_interval=0.5,
        monotonic=lambda: now[0],
    )
    try:
        principal = await authenticator.authenticate(f"Bearer {first.sign(issuer.claims())}")
        assert principal == ports.Principal(
            subject="auth0|alice", tenant=TENANT, scopes=frozenset({"agents:invoke"})
        )
        assert issuer.jwks_requests == 1

        # The issuer rotates: a token signed with the new key triggers one refresh.
        issuer.keys = [first.jwk(), second.jwk()]
        now[0] += 0.6  # past min_refresh_interval
        token = second.sign(issuer.claims(sub="auth0|bob"))
        assert (await authenticator.authenticate(f"Bearer {token}")).subject == "auth0|bob"
        assert issuer.jwks_requests == 2

        # A token for another tenant is refused with 403, one for another API with 401.
        with pytest.raises(ports.AuthError) as caught:
            await authenticator.authenticate(
                f"Bearer {second.sign(issuer.claims(**{auth.TENANT_CLAIM: 'globex'}))}"
            )
        assert (caught.value.status, caught.value.code) == (403, auth.WRONG_TENANT)
        with pytest.raises(ports.AuthError) as caught:
            await authenticator.authenticate(
                f"Bearer {second.sign(issuer.claims(aud='https://other.api'))}"
            )
        assert (caught.value.status, caught.value.code) == (401, auth.WRONG_AUDIENCE)
        assert issuer.jwks_requests == 2
    finally:
        await authenticator.aclose()


async def test_the_binding_jwks_uri_is_used_as_is(issuer: Issuer) -> None:
    key = Key("only")
    issuer.keys = [key.jwk()]
    settings = bindings.Auth0Settings(
        issuer=issuer.url, audience=AUDIENCE, jwks_uri=f"{issuer.url}keys"
    )
    authenticator = auth.JwtAuthenticator.from_settings(settings, tenant=TENANT)
    try:
        token = key.sign(issuer.claims())
        assert (await authenticator.authenticate(f"Bearer {token}")).tenant == TENANT
        assert issuer.jwks_requests == 1
    finally:
        await authenticator.aclose()


async def test_an_issuer_that_is_down_is_503_not_401() -> None:
    settings = bindings.Auth0Settings(
        issuer="http://127.0.0.1:9/", audience=AUDIENCE, jwks_uri="http://127.0.0.1:9/keys"
    )
    authenticator = auth.JwtAuthenticator.from_settings(settings, tenant=TENANT)
    try:
        token = Key("k").sign({"iss": "x", "exp": int(time.time()) + 60})
        with pytest.raises(ports.AuthError) as caught:
            await authenticator.authenticate(f"Bearer {token}")
        assert (caught.value.status, caught.value.code) == (503, auth.AUTH_UNAVAILABLE)
    finally:
        await authenticator.aclose()
