"""The postgres check against the test bed's real PostgreSQL server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg
import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, checks
from bmad_testbed import pki, procs

from .policies import TESTBED

pytestmark = pytest.mark.integration


def pg_spec(env: dict[str, str], **block: Any) -> integration.IntegrationSpec:
    settings: dict[str, Any] = {
        "host": "127.0.0.1",
        "port": int(env["BMAD_POSTGRES_PORT"]),
        "database": "postgres",
        "sslMode": "disable",
    }
    settings.update(block)
    keys = settings.pop("keys", None)
    ref: dict[str, Any] = {"name": "pg-creds"}
    if keys:
        ref["keys"] = keys
    return integration.IntegrationSpec.model_validate(
        {"type": "postgres", "secretRef": ref, "postgres": settings}
    )


def services_ca(env: dict[str, str]) -> str:
    """The CA of the test bed's TLS servers."""
    return Path(env["BMAD_SERVICES_CA"]).read_text()


def good_secret(env: dict[str, str]) -> dict[str, bytes]:
    return {
        "username": env["BMAD_POSTGRES_USER"].encode(),
        "password": env["BMAD_POSTGRES_PASSWORD"].encode(),
    }


async def test_good_credentials_are_checked_with_the_server_version(
    testbed_env: dict[str, str],
) -> None:
    result = await checks.check_integration(
        pg_spec(testbed_env), good_secret(testbed_env), secret_found=True, policy=TESTBED
    )
    assert result.ok, result.message
    assert result.reason == base.Reason.CHECKED
    assert result.server_version is not None
    assert result.server_version.startswith("15")
    assert result.latency_ms >= 0
    assert testbed_env["BMAD_POSTGRES_PASSWORD"] not in result.message


async def test_prefer_falls_back_to_plaintext_on_a_server_without_tls(
    testbed_env: dict[str, str], tmp_path: Path
) -> None:
    """With or without a CA, prefer uses a server without TLS in plaintext, and the
    result says so (the operator turns it into Encrypted=False, PlaintextConnection)."""
    for ca in (None, services_ca(testbed_env)):
        secret = good_secret(testbed_env) | ({"ca.crt": ca.encode()} if ca else {})
        result = await checks.check_integration(
            pg_spec(testbed_env, sslMode="prefer"), secret, secret_found=True, policy=TESTBED
        )
        assert result.ok, result.message
        assert result.transport == base.Transport.PLAINTEXT


async def test_require_on_a_server_without_tls_is_a_tls_error(
    testbed_env: dict[str, str], postgres_url: str
) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        ssl_on = await conn.fetchval("SHOW ssl")
    finally:
        await conn.close()
    # The test bed's plaintext server (its TLS one is BMAD_POSTGRES_TLS_PORT).
    assert ssl_on == "off"
    for mode in ("require", "verify-ca", "verify-full"):
        result = await checks.check_integration(
            pg_spec(testbed_env, sslMode=mode),
            good_secret(testbed_env),
            secret_found=True,
            policy=TESTBED,
        )
        assert result.reason == base.Reason.TLS_ERROR, (mode, result.message)
        assert "sslMode" in result.message


async def test_hole10_check_verifies_postgres_tls_with_the_secret_ca(
    testbed_env: dict[str, str], tmp_path: Path
) -> None:
    """Issue 10, hole 10, in the operator's check, against the test bed's PostgreSQL
    that serves TLS: with the CA of the credentials Secret every mode that uses TLS
    verifies the certificate (require too, as libpq does with a root certificate), a
    CA that did not sign it is refused (prefer too: it does not fall back), and
    require without a CA is reported as not verified. Before the fix prefer and
    require ignored the CA, and a certificate of another CA was accepted:

        AssertionError: ('prefer', 'PostgreSQL 15.18 answered the check: connected to
        127.0.0.1:44547/postgres')
    """
    ca = services_ca(testbed_env)
    other = pki.Pki(tmp_path / "other-ca").ca.cert.read_text()
    port = int(testbed_env["BMAD_POSTGRES_TLS_PORT"])

    async def check(mode: str, ca_pem: str | None) -> base.CheckResult:
        secret = good_secret(testbed_env) | ({"ca.crt": ca_pem.encode()} if ca_pem else {})
        return await checks.check_integration(
            pg_spec(testbed_env, port=port, sslMode=mode),
            secret,
            secret_found=True,
            policy=TESTBED,
        )

    for mode in ("prefer", "require", "verify-ca", "verify-full"):
        refused = await check(mode, other)
        assert refused.reason == base.Reason.TLS_ERROR, (mode, refused.message)
        assert "'ca.crt'" in refused.message, (mode, refused.message)
        verified = await check(mode, ca)
        assert verified.ok, (mode, verified.message)
        assert verified.transport == base.Transport.TLS_VERIFIED, mode
    unverified = await check("require", None)
    assert unverified.ok, unverified.message
    assert unverified.transport == base.Transport.TLS_UNVERIFIED


async def test_key_names_can_be_overridden(testbed_env: dict[str, str]) -> None:
    secret = {
        "PGUSER": testbed_env["BMAD_POSTGRES_USER"].encode(),
        "PGPASSWORD": testbed_env["BMAD_POSTGRES_PASSWORD"].encode(),
    }
    result = await checks.check_integration(
        pg_spec(testbed_env, keys={"username": "PGUSER", "password": "PGPASSWORD"}),
        secret,
        secret_found=True,
        policy=TESTBED,
    )
    assert result.ok, result.message


async def test_a_wrong_password_is_authentication_failed(testbed_env: dict[str, str]) -> None:
    secret = {**good_secret(testbed_env), "password": b"wrong-password-1"}
    result = await checks.check_integration(
        pg_spec(testbed_env), secret, secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.AUTHENTICATION_FAILED
    assert "'password'" in result.message
    assert "wrong-password-1" not in result.message


async def test_an_unknown_role_is_authentication_failed(testbed_env: dict[str, str]) -> None:
    secret = {"username": b"no_such_role_x", "password": b"whatever-1"}
    result = await checks.check_integration(
        pg_spec(testbed_env), secret, secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.AUTHENTICATION_FAILED


async def test_a_missing_database_is_invalid_configuration(testbed_env: dict[str, str]) -> None:
    result = await checks.check_integration(
        pg_spec(testbed_env, database="no_such_db_x"),
        good_secret(testbed_env),
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.INVALID_CONFIGURATION
    assert "spec.postgres.database" in result.message


async def test_a_closed_port_is_unreachable(testbed_env: dict[str, str]) -> None:
    result = await checks.check_integration(
        pg_spec(testbed_env, port=procs.free_port()),
        good_secret(testbed_env),
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.UNREACHABLE
    assert "refused" in result.message


async def test_a_missing_key_is_secret_key_missing(testbed_env: dict[str, str]) -> None:
    secret = {"username": testbed_env["BMAD_POSTGRES_USER"].encode()}
    result = await checks.check_integration(
        pg_spec(testbed_env), secret, secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.SECRET_KEY_MISSING
    assert "'password'" in result.message
    assert "pg-creds" in result.message


async def test_a_missing_secret_is_secret_not_found(testbed_env: dict[str, str]) -> None:
    result = await checks.check_integration(
        pg_spec(testbed_env), None, secret_found=False, policy=TESTBED
    )
    assert result.reason == base.Reason.SECRET_NOT_FOUND
    assert "'pg-creds'" in result.message
    assert "create it" in result.message


async def test_the_published_uri_connects(testbed_env: dict[str, str]) -> None:
    data = checks.binding_data(pg_spec(testbed_env), good_secret(testbed_env))
    conn = await asyncpg.connect(data["uri"])
    try:
        assert await conn.fetchval("SELECT 1") == 1
    finally:
        await conn.close()
