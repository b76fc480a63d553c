"""Redis: client settings, error mapping, binding layout."""

from __future__ import annotations

import socket
import ssl
import urllib.parse
from typing import Any

import pytest
from redis import exceptions as redis_errors

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, redis_store
from bmad_integrations import binding as layout

pytestmark = pytest.mark.unit

PASSWORD = "rd-MARKER-s3cr3t/:@"  # must never show in a message


def block(**fields: Any) -> integration.Redis:
    spec: dict[str, Any] = {"host": "cache.internal", "port": 6380, "db": 2}
    spec.update(fields)
    return integration.Redis.model_validate(spec)


def creds(**data: str) -> base.Credentials:
    return base.Credentials(secret_name="redis-creds", data=data)


async def test_client_takes_tls_user_and_password_from_block_and_secret() -> None:
    client = redis_store.client(
        block(tls=True, username="agent"), creds(password=PASSWORD), timeout=3
    )
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["host"] == "cache.internal"
        assert kwargs["port"] == 6380
        assert kwargs["db"] == 2
        assert kwargs["username"] == "agent"
        assert kwargs["password"] == PASSWORD
        assert kwargs["socket_timeout"] == 3
        assert kwargs["socket_connect_timeout"] == 3
        assert "ssl_cert_reqs" in kwargs  # only SSL connections take these
    finally:
        await client.aclose()


async def test_without_a_secret_ref_the_client_sends_no_password() -> None:
    client = redis_store.client(block(), base.Credentials(secret_name=None), timeout=3)
    try:
        kwargs = client.connection_pool.connection_kwargs
        assert kwargs["password"] is None
        assert kwargs["username"] is None
        assert "ssl_cert_reqs" not in kwargs
    finally:
        await client.aclose()


def test_a_referenced_secret_must_hold_the_password() -> None:
    with pytest.raises(base.CheckError) as caught:
        redis_store.client(block(), creds(**{"ca.crt": "PEM"}), timeout=3)
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


def test_auth_message_names_the_acl_user_and_redacts() -> None:
    found = error(redis_errors.AuthenticationError(f"WRONGPASS {PASSWORD}"), username="agent")
    assert "'agent'" in found.message
    assert PASSWORD not in found.message


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
