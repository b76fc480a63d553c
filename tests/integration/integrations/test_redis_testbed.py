"""The redis check against the test bed's real Redis, on its plaintext and TLS ports.

The TLS port serves a certificate of the test bed's services CA (``$BMAD_SERVICES_CA``);
the module adds two ACL users of its own: one allowed the check's commands, one
allowed PING only.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import redis as sync_redis

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, checks
from bmad_testbed import pki, procs

from .policies import TESTBED

pytestmark = pytest.mark.integration


def redis_spec(host_port: tuple[str, int], **block: Any) -> integration.IntegrationSpec:
    settings: dict[str, Any] = {"host": host_port[0], "port": host_port[1]}
    settings.update(block)
    return integration.IntegrationSpec.model_validate(
        {"type": "redis", "secretRef": {"name": "redis-creds"}, "redis": settings}
    )


def plain(env: dict[str, str]) -> tuple[str, int]:
    return env["BMAD_REDIS_HOST"], int(env["BMAD_REDIS_PORT"])


async def test_the_right_password_is_checked_with_the_server_version(
    testbed_env: dict[str, str],
) -> None:
    secret = {"password": testbed_env["BMAD_REDIS_PASSWORD"].encode()}
    result = await checks.check_integration(
        redis_spec(plain(testbed_env)), secret, secret_found=True, policy=TESTBED
    )
    assert result.ok, result.message
    assert result.server_version is not None
    assert result.server_version.startswith("7")
    assert testbed_env["BMAD_REDIS_PASSWORD"] not in result.message


async def test_the_default_user_by_name_works_too(testbed_env: dict[str, str]) -> None:
    secret = {"password": testbed_env["BMAD_REDIS_PASSWORD"].encode()}
    result = await checks.check_integration(
        redis_spec(plain(testbed_env), username="default"),
        secret,
        secret_found=True,
        policy=TESTBED,
    )
    assert result.ok, result.message


async def test_a_wrong_password_is_authentication_failed(testbed_env: dict[str, str]) -> None:
    result = await checks.check_integration(
        redis_spec(plain(testbed_env)),
        {"password": b"wrong-password-2"},
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.AUTHENTICATION_FAILED
    assert "wrong-password-2" not in result.message


async def test_an_unknown_acl_user_is_authentication_failed(testbed_env: dict[str, str]) -> None:
    secret = {"password": testbed_env["BMAD_REDIS_PASSWORD"].encode()}
    result = await checks.check_integration(
        redis_spec(plain(testbed_env), username="nobody"), secret, secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.AUTHENTICATION_FAILED
    assert "'nobody'" in result.message


async def test_no_secret_for_a_protected_server_is_authentication_failed(
    testbed_env: dict[str, str],
) -> None:
    # Without spec.secretRef the check goes without a password; the server wants one.
    spec = integration.IntegrationSpec.model_validate(
        {"type": "redis", "redis": {"host": "127.0.0.1", "port": plain(testbed_env)[1]}}
    )
    result = await checks.check_integration(spec, None, secret_found=True, policy=TESTBED)
    assert result.reason == base.Reason.AUTHENTICATION_FAILED
    assert "'password'" in result.message


async def test_a_secret_without_the_password_is_secret_key_missing(
    testbed_env: dict[str, str],
) -> None:
    result = await checks.check_integration(
        redis_spec(plain(testbed_env)), {"other": b"x"}, secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.SECRET_KEY_MISSING
    assert "'password'" in result.message
    assert "redis-creds" in result.message


async def test_a_database_beyond_the_servers_count_is_invalid_configuration(
    testbed_env: dict[str, str],
) -> None:
    secret = {"password": testbed_env["BMAD_REDIS_PASSWORD"].encode()}
    result = await checks.check_integration(
        redis_spec(plain(testbed_env), db=4000), secret, secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.INVALID_CONFIGURATION
    assert "spec.redis.db" in result.message


async def test_a_closed_port_is_unreachable() -> None:
    result = await checks.check_integration(
        redis_spec(("127.0.0.1", procs.free_port())),
        {"password": b"x-1234"},
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.UNREACHABLE


async def test_tls_against_a_plaintext_server_fails_with_a_hint(
    testbed_env: dict[str, str],
) -> None:
    secret = {"password": testbed_env["BMAD_REDIS_PASSWORD"].encode()}
    result = await checks.check_integration(
        redis_spec(plain(testbed_env), tls=True),
        secret,
        secret_found=True,
        timeout=2,
        policy=TESTBED,
    )
    assert result.reason in (base.Reason.TLS_ERROR, base.Reason.TIMEOUT), result.message
    assert "tls" in result.message.lower()


async def test_a_missing_secret_is_secret_not_found(testbed_env: dict[str, str]) -> None:
    result = await checks.check_integration(
        redis_spec(plain(testbed_env)), None, secret_found=False, policy=TESTBED
    )
    assert result.reason == base.Reason.SECRET_NOT_FOUND
    assert "'redis-creds'" in result.message


async def test_the_published_uri_connects(testbed_env: dict[str, str]) -> None:
    secret = {"password": testbed_env["BMAD_REDIS_PASSWORD"].encode()}
    data = checks.binding_data(redis_spec(plain(testbed_env)), secret)
    client = sync_redis.Redis.from_url(data["uri"], socket_timeout=5)
    try:
        assert client.ping()
    finally:
        client.close()


class TlsRedis(NamedTuple):
    port: int
    ca_pem: str
    other_ca_pem: str
    password: str
    agent: str  # an ACL user allowed every command
    pinger: str  # an ACL user allowed PING only


@pytest.fixture(scope="module")
def tls_redis(
    testbed_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsRedis]:
    """The test bed's Redis on its TLS port (a certificate of the run's services CA),
    with two ACL users of this module's own, removed afterwards."""
    password = secrets.token_hex(12)
    suffix = secrets.token_hex(3)
    agent, pinger = f"agent-{suffix}", f"pinger-{suffix}"
    admin = sync_redis.Redis(
        host="127.0.0.1",
        port=int(testbed_env["BMAD_REDIS_PORT"]),
        password=testbed_env["BMAD_REDIS_PASSWORD"],
        socket_timeout=5,
    )
    admin.acl_setuser(
        agent, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
        commands=["+@all"],
    )  # fmt: skip
    admin.acl_setuser(
        pinger, enabled=True, passwords=[f"+{password}"], keys=["*"], channels=["*"],
        commands=["-@all", "+ping", "+hello", "+auth"],
    )  # fmt: skip
    other = pki.Pki(tmp_path_factory.mktemp("other-pki"))
    try:
        yield TlsRedis(
            port=int(testbed_env["BMAD_REDIS_TLS_PORT"]),
            ca_pem=Path(testbed_env["BMAD_SERVICES_CA"]).read_text(),
            other_ca_pem=other.ca.cert.read_text(),
            password=password,
            agent=agent,
            pinger=pinger,
        )
    finally:
        admin.acl_deluser(agent, pinger)
        admin.close()


async def test_tls_with_the_right_ca_and_an_acl_user_is_checked(tls_redis: TlsRedis) -> None:
    secret = {"password": tls_redis.password.encode(), "ca.crt": tls_redis.ca_pem.encode()}
    result = await checks.check_integration(
        redis_spec(("127.0.0.1", tls_redis.port), tls=True, username=tls_redis.agent),
        secret,
        secret_found=True,
        policy=TESTBED,
    )
    assert result.ok, result.message
    assert result.server_version is not None


async def test_hole10_check_says_how_the_redis_connection_travels(
    testbed_env: dict[str, str], tls_redis: TlsRedis
) -> None:
    """Issue 10, hole 10: the check reports whether the connection is encrypted (the
    operator writes it into the Integration's Encrypted condition). Before the fix:
    ``AttributeError: 'CheckResult' object has no attribute 'transport'``."""
    encrypted = await checks.check_integration(
        redis_spec(("127.0.0.1", tls_redis.port), tls=True, username=tls_redis.agent),
        {"password": tls_redis.password.encode(), "ca.crt": tls_redis.ca_pem.encode()},
        secret_found=True,
        policy=TESTBED,
    )
    plaintext = await checks.check_integration(
        redis_spec(plain(testbed_env)),
        {"password": testbed_env["BMAD_REDIS_PASSWORD"].encode()},
        secret_found=True,
        policy=TESTBED,
    )
    assert encrypted.ok, encrypted.message
    assert encrypted.transport == base.Transport.TLS_VERIFIED
    assert plaintext.ok, plaintext.message
    assert plaintext.transport == base.Transport.PLAINTEXT


async def test_tls_with_a_foreign_ca_is_a_tls_error(tls_redis: TlsRedis) -> None:
    secret = {"password": tls_redis.password.encode(), "ca.crt": tls_redis.other_ca_pem.encode()}
    result = await checks.check_integration(
        redis_spec(("127.0.0.1", tls_redis.port), tls=True, username=tls_redis.agent),
        secret,
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.TLS_ERROR, result.message
    assert "'ca.crt'" in result.message


async def test_tls_without_a_ca_does_not_trust_a_private_certificate(
    tls_redis: TlsRedis,
) -> None:
    result = await checks.check_integration(
        redis_spec(("127.0.0.1", tls_redis.port), tls=True, username=tls_redis.agent),
        {"password": tls_redis.password.encode()},
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.TLS_ERROR, result.message


async def test_an_acl_user_without_info_is_told_what_to_allow(tls_redis: TlsRedis) -> None:
    secret = {"password": tls_redis.password.encode(), "ca.crt": tls_redis.ca_pem.encode()}
    result = await checks.check_integration(
        redis_spec(("127.0.0.1", tls_redis.port), tls=True, username=tls_redis.pinger),
        secret,
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.AUTHENTICATION_FAILED, result.message
    assert "INFO" in result.message
