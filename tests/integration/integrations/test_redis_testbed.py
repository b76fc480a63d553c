"""The redis check against the test bed's real Redis, and a real Redis speaking TLS.

The TLS server is one more redis-server (the test bed's own binary) started by this
module with a certificate from a throwaway CA and two ACL users: one allowed the
check's commands, one allowed PING only.
"""

from __future__ import annotations

import secrets
import shutil
import time
from collections.abc import Iterator
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


@pytest.fixture(scope="module")
def tls_redis(
    testbed_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[TlsRedis]:
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("no redis-server on PATH")
    work = tmp_path_factory.mktemp("tls-redis")
    authority = pki.Pki(work / "pki")
    served = authority.issue("redis", cn="127.0.0.1", server=True, ips=("127.0.0.1",))
    other = pki.Pki(work / "other-pki")
    port = procs.free_port()
    password = secrets.token_hex(12)
    conf = work / "redis.conf"
    conf.write_text(
        "bind 127.0.0.1\nport 0\n"
        f"tls-port {port}\ntls-cert-file {served.cert}\ntls-key-file {served.key}\n"
        f"tls-ca-cert-file {authority.ca.cert}\ntls-auth-clients no\n"
        f'save ""\nappendonly no\ndir {work}\ndaemonize no\n'
        "user default off\n"
        f"user agent on >{password} ~* &* +@all\n"
        f"user pinger on >{password} ~* &* -@all +ping +hello +auth\n"
    )
    conf.chmod(0o600)
    rec = procs.spawn("tls-redis", [binary, str(conf)], log_dir=work / "logs")
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                probe = sync_redis.Redis(
                    host="127.0.0.1",
                    port=port,
                    username="agent",
                    password=password,
                    ssl=True,
                    ssl_ca_certs=str(authority.ca.cert),
                    socket_timeout=2,
                )
                probe.ping()
                probe.close()
                break
            except (sync_redis.RedisError, OSError):
                if not procs.is_alive(rec) or time.monotonic() > deadline:
                    pytest.skip(
                        "redis-server with TLS did not start (built without TLS?): "
                        + procs.log_tail(rec["log"], 5)
                    )
                time.sleep(0.2)
        yield TlsRedis(
            port=port,
            ca_pem=authority.ca.cert.read_text(),
            other_ca_pem=other.ca.cert.read_text(),
            password=password,
        )
    finally:
        procs.stop(rec, grace=5)


async def test_tls_with_the_right_ca_and_an_acl_user_is_checked(tls_redis: TlsRedis) -> None:
    secret = {"password": tls_redis.password.encode(), "ca.crt": tls_redis.ca_pem.encode()}
    result = await checks.check_integration(
        redis_spec(("127.0.0.1", tls_redis.port), tls=True, username="agent"),
        secret,
        secret_found=True,
        policy=TESTBED,
    )
    assert result.ok, result.message
    assert result.server_version is not None


async def test_tls_with_a_foreign_ca_is_a_tls_error(tls_redis: TlsRedis) -> None:
    secret = {"password": tls_redis.password.encode(), "ca.crt": tls_redis.other_ca_pem.encode()}
    result = await checks.check_integration(
        redis_spec(("127.0.0.1", tls_redis.port), tls=True, username="agent"),
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
        redis_spec(("127.0.0.1", tls_redis.port), tls=True, username="agent"),
        {"password": tls_redis.password.encode()},
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.TLS_ERROR, result.message


async def test_an_acl_user_without_info_is_told_what_to_allow(tls_redis: TlsRedis) -> None:
    secret = {"password": tls_redis.password.encode(), "ca.crt": tls_redis.ca_pem.encode()}
    result = await checks.check_integration(
        redis_spec(("127.0.0.1", tls_redis.port), tls=True, username="pinger"),
        secret,
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.AUTHENTICATION_FAILED, result.message
    assert "INFO" in result.message
