"""Redis: client settings, error mapping, binding layout."""

from __future__ import annotations

import socket
import ssl
import urllib.parse
from typing import Any

import pytest
from redis import exceptions as redis_errors

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, redis_store
from bmad_integrations import binding as layout

from .policies import PUBLIC

pytestmark = pytest.mark.unit

PASSWORD = "rd-MARKER-s3cr3t/:@"  # must never show in a message


def block(**fields: Any) -> integration.Redis:
    spec: dict[str, Any] = {"host": "cache.internal", "port": 6380, "db": 2}
    spec.update(fields)
    return integration.Redis.model_validate(spec)


def creds(**data: str) -> base.Credentials:
    return base.Credentials(secret_name="redis-creds", data=data)


JUDGED = egress.Destination("cache.internal", 6380, PUBLIC)


async def test_client_takes_tls_user_and_password_from_block_and_secret() -> None:
    client = redis_store.client(
        block(tls=True, username="agent"), creds(password=PASSWORD), timeout=3, destination=JUDGED
    )
    try:
        kwargs = client.connection_pool.connection_kwargs
        # The socket goes to the judged address; the TLS handshake names the host.
        assert kwargs["host"] == PUBLIC
        assert kwargs["server_hostname"] == "cache.internal"
        connection = client.connection_pool.make_connection()
        arguments = connection._connection_arguments()  # what asyncio.open_connection gets
        assert arguments["host"] == PUBLIC
        assert arguments["server_hostname"] == "cache.internal"
        assert isinstance(arguments["ssl"], ssl.SSLContext)
        assert kwargs["port"] == 6380
        assert kwargs["db"] == 2
        assert kwargs["username"] == "agent"
        assert kwargs["password"] == PASSWORD
        assert kwargs["socket_timeout"] == 3
        assert kwargs["socket_connect_timeout"] == 3
        assert arguments["ssl"].verify_mode == ssl.CERT_REQUIRED
        assert arguments["ssl"].check_hostname is True
    finally:
        await client.aclose()


async def test_without_a_secret_ref_the_client_sends_no_password() -> None:
    client = redis_store.client(
        block(), base.Credentials(secret_name=None), timeout=3, destination=JUDGED
    )
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["password"] is None
        assert kwargs["username"] is None
        assert "ssl_cert_reqs" not in kwargs
    finally:
        await client.aclose()


async def test_a_referenced_secret_must_hold_the_password() -> None:
    def resolver(host: str, port: int) -> list[str]:
        raise AssertionError("resolved before the Secret was read")

    with pytest.raises(base.CheckError) as caught:
        await redis_store.check(
            block(), creds(**{"ca.crt": "PEM"}), timeout=3, policy=egress.Policy(resolver=resolver)
        )
    assert caught.value.reason == base.Reason.SECRET_KEY_MISSING
    assert "'password'" in caught.value.message


def test_the_password_key_name_can_be_overridden() -> None:
    custom = base.Credentials(
        secret_name="redis-creds",
        data={"REDIS_PASS": PASSWORD},
        key_names={"password": "REDIS_PASS"},
    )
    assert redis_store.password(custom) == PASSWORD


def error(exc: BaseException, **fields: Any) -> base.CheckError:
    return redis_store.error_for(
        exc, block=block(**fields), creds=creds(password=PASSWORD), timeout=4
    )


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (
            redis_errors.AuthenticationError("invalid username-password pair"),
            base.Reason.AUTHENTICATION_FAILED,
        ),
        (
            redis_errors.ResponseError("WRONGPASS invalid username-password pair"),
            base.Reason.AUTHENTICATION_FAILED,
        ),
        (
            redis_errors.ResponseError("NOAUTH Authentication required."),
            base.Reason.AUTHENTICATION_FAILED,
        ),
        (
            redis_errors.NoPermissionError("this user has no permissions to run the info command"),
            base.Reason.AUTHENTICATION_FAILED,
        ),
        (redis_errors.ResponseError("DB index is out of range"), base.Reason.INVALID_CONFIGURATION),
        (redis_errors.TimeoutError("Timeout connecting to server"), base.Reason.TIMEOUT),
        (
            redis_errors.ConnectionError(
                "Error 111 connecting to 127.0.0.1:1. Connect call failed ('127.0.0.1', 1)."
            ),
            base.Reason.UNREACHABLE,
        ),
        (
            redis_errors.ConnectionError("Error -2 connecting to x:1. Name or service not known."),
            base.Reason.UNREACHABLE,
        ),
        (
            redis_errors.ConnectionError("Error 1 connecting: [SSL: WRONG_VERSION_NUMBER]"),
            base.Reason.TLS_ERROR,
        ),
        (RuntimeError("surprise"), base.Reason.UNREACHABLE),
    ],
)
def test_driver_errors_map_to_reasons(exc: BaseException, reason: base.Reason) -> None:
    assert error(exc).reason == reason


def test_a_tls_error_in_the_cause_chain_is_a_tls_error() -> None:
    wrapped = redis_errors.ConnectionError("connection failed")
    wrapped.__cause__ = ssl.SSLError(1, "handshake failure")
    assert error(wrapped, tls=True).reason == base.Reason.TLS_ERROR


def test_a_refusal_in_the_cause_chain_is_unreachable() -> None:
    wrapped = redis_errors.ConnectionError("connection failed")
    wrapped.__cause__ = socket.gaierror(-2, "unknown host")
    found = error(wrapped)
    assert found.reason == base.Reason.UNREACHABLE
    assert "spec.redis.host" in found.message


def test_a_timeout_with_tls_hints_at_a_plaintext_server() -> None:
    assert "tls" in error(redis_errors.TimeoutError("t"), tls=True).message


def test_auth_message_names_the_acl_user_and_quotes_nothing() -> None:
    found = error(redis_errors.AuthenticationError(f"WRONGPASS {PASSWORD}"), username="agent")
    assert "'agent'" in found.message
    assert PASSWORD not in found.message
    assert "WRONGPASS" not in found.message


async def test_a_host_resolving_to_loopback_is_never_connected() -> None:
    policy = egress.Policy(resolver=lambda host, port: ["127.0.0.1"])
    with pytest.raises(base.CheckError) as caught:
        await redis_store.check(block(), creds(password=PASSWORD), timeout=3, policy=policy)
    assert caught.value.reason == base.Reason.DESTINATION_NOT_ALLOWED
    assert "spec.redis.host" in caught.value.message


def test_binding_has_the_redis_layout() -> None:
    data = redis_store.binding(block(tls=True, username="agent"), creds(password=PASSWORD))
    assert layout.problems(data) == []
    assert data["type"] == "redis"
    assert data["provider"] == "redis"
    assert data["host"] == "cache.internal"
    assert data["port"] == "6380"
    assert data["database"] == "2"
    assert data["tls"] == "true"
    assert data["username"] == "agent"
    assert data["password"] == PASSWORD
    parsed = urllib.parse.urlsplit(data["uri"])
    assert parsed.scheme == "rediss"
    assert parsed.username == "agent"
    assert urllib.parse.unquote(parsed.password or "") == PASSWORD
    assert parsed.hostname == "cache.internal"
    assert parsed.port == 6380
    assert parsed.path == "/2"


def test_binding_without_credentials_has_a_bare_uri() -> None:
    data = redis_store.binding(block(), creds())
    assert layout.problems(data) == []
    assert data["uri"] == "redis://cache.internal:6380/2"
    assert data["tls"] == "false"
    assert "password" not in data
    assert "username" not in data


def test_binding_with_password_only() -> None:
    data = redis_store.binding(block(db=0), creds(password="abcd"))
    assert data["uri"] == "redis://:abcd@cache.internal:6380/0"


def test_binding_carries_the_ca_only_with_tls() -> None:
    assert "ca.crt" not in redis_store.binding(block(), creds(**{"ca.crt": "PEM"}))
    assert redis_store.binding(block(tls=True), creds(**{"ca.crt": "PEM"}))["ca.crt"] == "PEM"
