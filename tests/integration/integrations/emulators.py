"""Emulators this project wrote of OpenAI, Anthropic, SendGrid, Mailgun and an OIDC
issuer (Auth0), plus a real SMTP server and TLS material, all on 127.0.0.1 only.

The checks must meet real sockets, real TLS and real SMTP conversations, but the
tests may not leave the machine. So each HTTP provider gets a small router, written
here from the provider's documentation, behind a real
`http.server.ThreadingHTTPServer` (optionally HTTPS). The routers answer in the
documented shapes, 401s included, but they are emulations: a test that uses one
says "emulated" in its file name, and proves the check against our reading of the
provider's API, not against the provider. SMTP is different: `SmtpServer` is a real
SMTP server (aiosmtpd) with an authenticator and, optionally, STARTTLS.
"""

from __future__ import annotations

import base64
import dataclasses
import datetime as dt
import http.server
import ipaddress
import json
import socket
import ssl
import threading
import urllib.parse
from collections.abc import Callable, Mapping
from email.message import Message
from pathlib import Path
from typing import Any, Self

from aiosmtpd import controller as smtp_controller
from aiosmtpd import handlers as smtp_handlers
from aiosmtpd import smtp as smtp_server
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from jose import jwt

from bmad_testbed import procs

LOOPBACK = "127.0.0.1"


# --- HTTP ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Request:
    method: str
    path: str
    query: Mapping[str, list[str]]
    headers: Message
    body: bytes

    def form(self) -> dict[str, str]:
        return dict(urllib.parse.parse_qsl(self.body.decode()))

    def bearer(self) -> str | None:
        value = self.headers.get("Authorization", "")
        return value[len("Bearer ") :] if value.startswith("Bearer ") else None

    def basic(self) -> tuple[str, str] | None:
        value = self.headers.get("Authorization", "")
        if not value.startswith("Basic "):
            return None
        user, _, password = base64.b64decode(value[len("Basic ") :]).decode().partition(":")
        return user, password


@dataclasses.dataclass(frozen=True)
class Reply:
    status: int
    body: Any = b""
    headers: Mapping[str, str] = dataclasses.field(default_factory=dict)

    def encoded(self) -> tuple[bytes, str]:
        if isinstance(self.body, bytes):
            return self.body, "application/octet-stream"
        if isinstance(self.body, str):
            return self.body.encode(), "text/plain; charset=utf-8"
        return json.dumps(self.body).encode(), "application/json"


Router = Callable[[Request], Reply]

NOT_FOUND = Reply(404, {"error": "not found"})


class HttpServer:
    """A ThreadingHTTPServer on 127.0.0.1 that hands every request to a router."""

    def __init__(self, router: Router, *, tls: ssl.SSLContext | None = None) -> None:
        self.router = router
        self.requests: list[Request] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                split = urllib.parse.urlsplit(self.path)
                length = int(self.headers.get("Content-Length") or 0)
                request = Request(
                    method=self.command,
                    path=split.path,
                    query=urllib.parse.parse_qs(split.query),
                    headers=self.headers,
                    body=self.rfile.read(length) if length else b"",
                )
                owner.requests.append(request)
                reply = owner.router(request)
                body, content_type = reply.encoded()
                self.send_response(reply.status)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                for name, value in reply.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_POST = do_PUT = do_HEAD = _serve  # noqa: N815 - BaseHTTPRequestHandler's names

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
                pass

        self._server = http.server.ThreadingHTTPServer((LOOPBACK, 0), Handler)
        self._server.daemon_threads = True
        if tls is not None:
            # The handshake then happens in the request's thread, not the accept loop.
            self._server.socket = tls.wrap_socket(
                self._server.socket, server_side=True, do_handshake_on_connect=False
            )
        self.port: int = self._server.server_address[1]
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://{LOOPBACK}:{self.port}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)


def _json_error(status: int, body: Any) -> Reply:
    return Reply(status, body)


def openai_router(*, api_key: str, models: list[str]) -> Router:
    """GET /v1/models as OpenAI answers it (and vLLM, Ollama, LiteLLM alike)."""

    def route(request: Request) -> Reply:
        if (request.method, request.path) != ("GET", "/v1/models"):
            return NOT_FOUND
        if request.bearer() != api_key:
            given = request.bearer() or ""
            masked = f"{given[:3]}*****{given[-4:]}" if len(given) > 8 else "*****"
            return _json_error(
                401,
                {
                    "error": {
                        "message": f"Incorrect API key provided: {masked}. You can find your "
                        "API key at https://platform.openai.com/account/api-keys.",
                        "type": "invalid_request_error",
                        "param": None,
                        "code": "invalid_api_key",
                    }
                },
            )
        return Reply(
            200,
            {
                "object": "list",
                "data": [
                    {"id": model, "object": "model", "created": 1686935002, "owned_by": "openai"}
                    for model in models
                ],
            },
        )

    return route


def anthropic_router(
    *, api_key: str, models: list[str], aliases: Mapping[str, str] | None = None
) -> Router:
    """GET /v1/models and /v1/models/{id} as Anthropic answers them."""
    aliases = dict(aliases or {})

    def entry(model: str) -> dict[str, Any]:
        return {
            "type": "model",
            "id": model,
            "display_name": model.replace("-", " ").title(),
            "created_at": "2025-02-19T00:00:00Z",
        }

    def route(request: Request) -> Reply:
        if request.method != "GET" or not request.path.startswith("/v1/models"):
            return NOT_FOUND
        if request.headers.get("anthropic-version") is None:
            return _json_error(
                400,
                {
                    "type": "error",
                    "error": {
                        "type": "invalid_request_error",
                        "message": "anthropic-version: header is required",
                    },
                },
            )
        if request.headers.get("x-api-key") != api_key:
            return _json_error(
                401,
                {
                    "type": "error",
                    "error": {"type": "authentication_error", "message": "invalid x-api-key"},
                },
            )
        if request.path == "/v1/models":
            return Reply(
                200,
                {
                    "data": [entry(model) for model in models],
                    "has_more": False,
                    "first_id": models[0] if models else None,
                    "last_id": models[-1] if models else None,
                },
            )
        wanted = urllib.parse.unquote(request.path[len("/v1/models/") :])
        resolved = aliases.get(wanted, wanted)
        if resolved in models:
            return Reply(200, entry(resolved))
        return _json_error(
            404,
            {
                "type": "error",
                "error": {"type": "not_found_error", "message": f"model: {wanted}"},
            },
        )

    return route


def sendgrid_router(*, api_key: str, scopes: list[str]) -> Router:
    """GET /v3/scopes as SendGrid answers it."""

    def route(request: Request) -> Reply:
        if (request.method, request.path) != ("GET", "/v3/scopes"):
            return NOT_FOUND
        if request.bearer() != api_key:
            return _json_error(
                401, {"errors": [{"field": None, "message": "authorization required"}]}
            )
        return Reply(200, {"scopes": scopes})

    return route


def mailgun_router(*, api_key: str, domain: str) -> Router:
    """GET /v3/domains/{domain} as Mailgun answers it (401 says just "Forbidden")."""

    def route(request: Request) -> Reply:
        if request.method != "GET" or not request.path.startswith("/v3/domains/"):
            return NOT_FOUND
        if request.basic() != ("api", api_key):
            return Reply(401, "Forbidden")
        asked = urllib.parse.unquote(request.path[len("/v3/domains/") :])
        if asked != domain:
            return _json_error(404, {"message": "Domain not found"})
        return Reply(
            200,
            {
                "domain": {
                    "name": domain,
                    "state": "active",
                    "type": "custom",
                    "smtp_login": f"postmaster@{domain}",
                    "created_at": "Thu, 13 Oct 2016 18:32:04 GMT",
                },
                "receiving_dns_records": [],
                "sending_dns_records": [],
            },
        )

    return route


def _b64uint(value: int) -> str:
    raw = value.to_bytes((value.bit_length() + 7) // 8, "big")
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class OidcIssuer:
    """An OIDC issuer with discovery, a JWKS of one RSA key, and a token endpoint.

    The token endpoint hands an RS256 access token to exactly one client (id and
    secret), for the configured audience; anyone else gets Auth0's access_denied.
    """

    def __init__(
        self,
        *,
        client_id: str,
        client_secret: str,
        audience: str,
        jwks_keys: list[dict[str, Any]] | None = None,
        announced_issuer: str | None = None,
    ) -> None:
        self.client_id = client_id
        self.client_secret = client_secret
        self.audience = audience
        self.kid = "test-key-1"
        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        numbers = self.key.public_key().public_numbers()
        self.jwks: dict[str, Any] = {
            "keys": jwks_keys
            if jwks_keys is not None
            else [
                {
                    "kty": "RSA",
                    "use": "sig",
                    "alg": "RS256",
                    "kid": self.kid,
                    "n": _b64uint(numbers.n),
                    "e": _b64uint(numbers.e),
                }
            ]
        }
        self.announced_issuer = announced_issuer
        self.issuer = ""  # known once the server listens
        self.requests: list[Request] = []

    def bind(self, url: str) -> None:
        self.issuer = url.rstrip("/") + "/"

    def issue(self, subject: str) -> str:
        pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ).decode()
        now = int(dt.datetime.now(dt.UTC).timestamp())
        claims = {
            "iss": self.issuer,
            "sub": subject,
            "aud": self.audience,
            "iat": now,
            "exp": now + 3600,
            "gty": "client-credentials",
        }
        token: str = jwt.encode(claims, pem, algorithm="RS256", headers={"kid": self.kid})
        return token

    def route(self, request: Request) -> Reply:
        self.requests.append(request)
        if (request.method, request.path) == ("GET", "/.well-known/openid-configuration"):
            return Reply(
                200,
                {
                    "issuer": self.announced_issuer or self.issuer,
                    "authorization_endpoint": f"{self.issuer}authorize",
                    "token_endpoint": f"{self.issuer}oauth/token",
                    "jwks_uri": f"{self.issuer}.well-known/jwks.json",
                    "response_types_supported": ["code", "token", "id_token"],
                    "subject_types_supported": ["public"],
                    "id_token_signing_alg_values_supported": ["HS256", "RS256"],
                },
            )
        if (request.method, request.path) == ("GET", "/.well-known/jwks.json"):
            return Reply(200, self.jwks)
        if (request.method, request.path) == ("POST", "/oauth/token"):
            form = request.form()
            if form.get("grant_type") != "client_credentials":
                return Reply(
                    403,
                    {
                        "error": "unsupported_grant_type",
                        "error_description": "Grant type not allowed for the client.",
                    },
                )
            if (form.get("client_id"), form.get("client_secret")) != (
                self.client_id,
                self.client_secret,
            ):
                return Reply(401, {"error": "access_denied", "error_description": "Unauthorized"})
            if form.get("audience") != self.audience:
                return Reply(
                    403,
                    {
                        "error": "access_denied",
                        "error_description": (
                            f"Service not enabled within domain: {form.get('audience')}"
                        ),
                    },
                )
            return Reply(
                200,
                {
                    "access_token": self.issue(f"{self.client_id}@clients"),
                    "expires_in": 86400,
                    "token_type": "Bearer",
                },
            )
        return NOT_FOUND


# --- TLS ----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class TlsMaterial:
    """A fresh CA and a serving certificate it signed for 127.0.0.1 and localhost."""

    ca_pem: str
    cert_path: Path
    key_path: Path

    def server_context(self) -> ssl.SSLContext:
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.load_cert_chain(self.cert_path, self.key_path)
        return context


def make_tls(directory: Path, *, name: str = "test") -> TlsMaterial:
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"{name} test CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)
        .sign(ca_key, hashes.SHA256())
    )
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [
                    x509.IPAddress(ipaddress.ip_address(LOOPBACK)),
                    x509.DNSName("localhost"),
                ]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False
        )
        .sign(ca_key, hashes.SHA256())
    )
    cert_path = directory / f"{name}.crt"
    key_path = directory / f"{name}.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    return TlsMaterial(
        ca_pem=ca_cert.public_bytes(serialization.Encoding.PEM).decode(),
        cert_path=cert_path,
        key_path=key_path,
    )


# --- SMTP ---------------------------------------------------------------------------


class SmtpServer:
    """aiosmtpd on 127.0.0.1 that accepts one user, and offers STARTTLS when given TLS.

    Without TLS, AUTH is offered in the clear (auth_require_tls=False); with TLS,
    STARTTLS is required before anything else, AUTH included.
    """

    def __init__(
        self,
        *,
        username: str | None = None,
        password: str | None = None,
        tls: TlsMaterial | None = None,
    ) -> None:
        self.username = username
        self.password = password
        self.port = procs.free_port()
        kwargs: dict[str, Any] = {}
        if username is not None:
            kwargs["authenticator"] = self._authenticate
        if tls is not None:
            kwargs["tls_context"] = tls.server_context()
            kwargs["require_starttls"] = True
        else:
            kwargs["auth_require_tls"] = False
        self._controller = smtp_controller.Controller(
            smtp_handlers.Sink(), hostname=LOOPBACK, port=self.port, **kwargs
        )

    def _authenticate(
        self,
        server: smtp_server.SMTP,
        session: smtp_server.Session,
        envelope: smtp_server.Envelope,
        mechanism: str,
        auth_data: Any,
    ) -> smtp_server.AuthResult:
        if isinstance(auth_data, smtp_server.LoginPassword):
            given = (auth_data.login.decode(), auth_data.password.decode())
            if given == (self.username, self.password):
                return smtp_server.AuthResult(success=True)
        return smtp_server.AuthResult(success=False, handled=False)

    def __enter__(self) -> Self:
        self._controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._controller.stop()


# --- a destination the operator must not reach --------------------------------------


class TcpProbe:
    """A loopback listener that stands in for a service a check must never reach.

    It counts the connections it accepts, sends `greeting` on each, and answers every
    chunk it receives with `reply`: enough for a client to read "the server's own
    words" (a banner, an error line) that a check could quote into a status.
    """

    def __init__(self, *, greeting: bytes = b"", reply: bytes = b"") -> None:
        self.greeting = greeting
        self.reply = reply
        self.connections = 0
        self._listener = socket.create_server((LOOPBACK, 0))
        self._listener.settimeout(0.05)
        self.port: int = self._listener.getsockname()[1]
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._accept, daemon=True)

    def _accept(self) -> None:
        while not self._stopped.is_set():
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            conn.settimeout(5)
            try:
                if self.greeting:
                    conn.sendall(self.greeting)
                while conn.recv(65536):
                    if self.reply:
                        conn.sendall(self.reply)
            except OSError:
                return

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stopped.set()
        self._listener.close()
        self._thread.join(timeout=5)
