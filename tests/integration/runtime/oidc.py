"""A real OIDC issuer on loopback for the runtime's tests: discovery, a JWKS the test
rotates, and RS256 tokens signed with keys the test generates (what Auth0 tokens need)."""

from __future__ import annotations

import base64
import contextlib
import http.server
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

from bmad_runtime import auth

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
        self.jwks_status = 200  # what /keys answers: anything else, an outage
        issuer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body: dict[str, Any]
                if self.path == "/.well-known/openid-configuration":
                    body = {"issuer": issuer.url, "jwks_uri": f"{issuer.url}keys"}
                elif self.path == "/keys":
                    issuer.jwks_requests += 1
                    if issuer.jwks_status != 200:
                        self.send_error(issuer.jwks_status)
                        return
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


@contextlib.contextmanager
def running() -> Iterator[Issuer]:
    """An issuer serving on loopback for the length of the block."""
    issuer = Issuer()
    issuer.thread.start()
    try:
        yield issuer
    finally:
        issuer.server.shutdown()
        issuer.server.server_close()
