"""PostgreSQL: sslMode → asyncpg's ssl argument, error mapping, binding layout."""

from __future__ import annotations

import socket
import ssl
import urllib.parse
from typing import Any

import asyncpg
import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, postgres
from bmad_integrations import binding as layout

from .policies import OPEN, PUBLIC

pytestmark = pytest.mark.unit

PASSWORD = "pg-MARKER-p@ss/w:rd"  # must never show in a message


def block(**fields: Any) -> integration.Postgres:
    spec: dict[str, Any] = {"host": "db.internal", "port": 5433, "database": "agents"}
    spec.update(fields)
    return integration.Postgres.model_validate(spec)


def creds(**data: str) -> base.Credentials:
    values = {"username": "bmad", "password": PASSWORD}
    values.update(data)
    return base.Credentials(secret_name="pg-creds", data=values)


def test_disable_turns_tls_off() -> None:
    assert postgres.ssl_argument(block(sslMode="disable"), creds()) is False


@pytest.mark.parametrize("mode", ["allow", "prefer"])
def test_allow_and_prefer_keep_asyncpgs_own_fallback(mode: str) -> None:
    assert postgres.ssl_argument(block(sslMode=mode), creds()) == mode


def test_require_encrypts_without_verifying() -> None:
    context = postgres.ssl_argument(block(sslMode="require"), creds())
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_NONE
    assert context.check_hostname is False


def test_verify_ca_checks_the_chain_but_not_the_name() -> None:
    context = postgres.ssl_argument(block(sslMode="verify-ca"), creds())
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is False


def test_verify_full_checks_the_name_too() -> None:
    context = postgres.ssl_argument(block(sslMode="verify-full"), creds())
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED
    assert context.check_hostname is True


def test_the_handshake_names_the_host_although_the_socket_goes_to_an_address() -> None:
    context = postgres.ssl_argument(block(sslMode="verify-full"), creds())
    assert isinstance(context, ssl.SSLContext)
    # asyncpg names the address it connected to; the context puts the name back.
    tls = context.wrap_bio(ssl.MemoryBIO(), ssl.MemoryBIO(), server_hostname=PUBLIC)
    assert tls.server_hostname == "db.internal"


async def test_the_check_connects_to_the_address_it_judged(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Resolved once: a resolver that would answer differently later is not asked again."""
    answers = iter([[PUBLIC], ["10.0.0.1"]])
    asked: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        asked.append(host)
        return next(answers)

    connected: list[dict[str, Any]] = []

    async def connect(**options: Any) -> Any:
        connected.append(options)
        raise ConnectionRefusedError(111, "refused")

    monkeypatch.setattr(asyncpg, "connect", connect)
    with pytest.raises(base.CheckError) as caught:
        await postgres.check(block(), creds(), timeout=1, policy=egress.Policy(resolver=resolver))
    assert caught.value.reason == base.Reason.UNREACHABLE
    assert asked == ["db.internal"]
    assert [options["host"] for options in connected] == [PUBLIC]


async def test_a_host_resolving_to_a_private_address_is_never_connected(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async def connect(**options: Any) -> Any:
        raise AssertionError("connected")

    monkeypatch.setattr(asyncpg, "connect", connect)
    policy = egress.Policy(resolver=lambda host, port: ["10.96.0.10"])
    with pytest.raises(base.CheckError) as caught:
        await postgres.check(block(), creds(), timeout=1, policy=policy)
    assert caught.value.reason == base.Reason.DESTINATION_NOT_ALLOWED
    assert "spec.postgres.host" in caught.value.message
    assert "10.96.0.10" not in caught.value.message  # what the name resolved to stays ours


def test_a_ca_that_is_not_pem_is_invalid_configuration() -> None:
    with pytest.raises(base.CheckError) as caught:
        postgres.ssl_argument(block(sslMode="verify-full"), creds(**{"ca.crt": "not a pem"}))
    assert caught.value.reason == base.Reason.INVALID_CONFIGURATION
    assert "'ca.crt'" in caught.value.message


def test_the_ca_key_name_can_be_overridden() -> None:
    custom = base.Credentials(
        secret_name="pg-creds",
        data={"root.pem": "garbage"},
        key_names={"ca_cert": "root.pem"},
    )
    with pytest.raises(base.CheckError) as caught:
        postgres.ssl_argument(block(sslMode="verify-ca"), custom)
    assert "'root.pem'" in caught.value.message


def error(exc: BaseException, **fields: Any) -> base.CheckError:
    return postgres.error_for(exc, block=block(**fields), creds=creds(), timeout=7)


def postgres_error(cls: type[asyncpg.PostgresError], message: str) -> asyncpg.PostgresError:
    return cls(message)


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            postgres_error(asyncpg.InvalidPasswordError, "password authentication failed"),
            base.Reason.AUTHENTICATION_FAILED,
        ),
        (
            postgres_error(
                asyncpg.InvalidAuthorizationSpecificationError, 'role "x" does not exist'
            ),
            base.Reason.AUTHENTICATION_FAILED,
        ),
        (
            postgres_error(asyncpg.InvalidCatalogNameError, 'database "x" does not exist'),
            base.Reason.INVALID_CONFIGURATION,
        ),
        (ConnectionRefusedError(111, "Connect call failed"), base.Reason.UNREACHABLE),
        (socket.gaierror(-2, "Name or service not known"), base.Reason.UNREACHABLE),
        (TimeoutError(), base.Reason.TIMEOUT),
        (ssl.SSLCertVerificationError("certificate verify failed"), base.Reason.TLS_ERROR),
        (
            ConnectionError('PostgreSQL server at "db:5432" rejected SSL upgrade'),
            base.Reason.TLS_ERROR,
        ),
        (
            postgres_error(asyncpg.TooManyConnectionsError, "too many clients"),
            base.Reason.UNREACHABLE,
        ),
        (RuntimeError("something else"), base.Reason.UNREACHABLE),
    ],
)
def test_driver_errors_map_to_reasons(exc: BaseException, reason: base.Reason) -> None:
    assert error(exc).reason == reason


def test_what_the_server_said_is_never_quoted() -> None:
    found = error(asyncpg.InvalidPasswordError(f"INTERNAL words and {PASSWORD}"))
    assert PASSWORD not in found.message
    assert "INTERNAL" not in found.message
    assert "refused the login" in found.message


def test_timeout_message_names_the_bound_and_the_target() -> None:
    found = error(TimeoutError())
    assert "7s" in found.message
    assert "db.internal:5433/agents" in found.message


def test_tls_message_mentions_the_ca_key_for_verifying_modes() -> None:
    found = error(ssl.SSLCertVerificationError("verify failed"), sslMode="verify-full")
    assert "'ca.crt'" in found.message
    assert "sslMode" in found.message


def test_a_check_error_passes_through() -> None:
    original = base.CheckError(base.Reason.SECRET_KEY_MISSING, "add it")
    assert error(original) is original


async def test_missing_password_is_reported_before_connecting() -> None:
    lacking = base.Credentials(secret_name="pg-creds", data={"username": "bmad"})
    with pytest.raises(base.CheckError) as caught:
        await postgres.check(block(), lacking, timeout=1, policy=OPEN)
    assert caught.value.reason == base.Reason.SECRET_KEY_MISSING


def test_binding_has_the_postgres_layout() -> None:
    data = postgres.binding(block(sslMode="verify-full"), creds(**{"ca.crt": "PEM"}))
    assert layout.problems(data) == []
    assert data["type"] == "postgres"
    assert data["provider"] == "postgresql"
    assert data["host"] == "db.internal"
    assert data["port"] == "5433"
    assert data["database"] == "agents"
    assert data["username"] == "bmad"
    assert data["password"] == PASSWORD
    assert data["sslMode"] == "verify-full"
    assert data["ca.crt"] == "PEM"


def test_binding_uri_quotes_the_credentials() -> None:
    uri = postgres.binding(block(), creds())["uri"]
    parsed = urllib.parse.urlsplit(uri)
    assert parsed.scheme == "postgresql"
    assert urllib.parse.unquote(parsed.password or "") == PASSWORD
    assert parsed.username == "bmad"
    assert parsed.hostname == "db.internal"
    assert parsed.port == 5433
    assert parsed.path == "/agents"
    assert parsed.query == "sslmode=prefer"


def test_binding_uri_brackets_an_ipv6_host() -> None:
    uri = postgres.binding(block(host="[::1]"), creds())["uri"]
    assert "@[::1]:5433/" in uri
