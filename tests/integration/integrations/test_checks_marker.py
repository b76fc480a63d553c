"""No credential value in any message: drive every failure with a marker secret.

One unique marker stands in for the password / secret key / API key of each type;
the checks run against the test bed's real servers (and closed ports), and the marker
must not appear in any `CheckResult.message`, whatever the reason.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, checks
from bmad_testbed import procs

from .policies import TESTBED

pytestmark = pytest.mark.integration


Case = tuple[str, integration.IntegrationSpec, dict[str, bytes] | None, bool]


def spec(type_: str, block: dict[str, Any]) -> integration.IntegrationSpec:
    return integration.IntegrationSpec.model_validate(
        {"type": type_, "secretRef": {"name": f"{type_.lower()}-creds"}, type_: block}
    )


async def test_the_marker_appears_in_no_message(
    testbed_env: dict[str, str], s3: dict[str, str], stripe_api_base: str
) -> None:
    marker = f"MARKER{secrets.token_hex(8)}"
    closed = procs.free_port()
    pg = {
        "host": "127.0.0.1",
        "port": int(testbed_env["BMAD_POSTGRES_PORT"]),
        "database": "postgres",
    }
    redis = {"host": "127.0.0.1", "port": int(testbed_env["BMAD_REDIS_PORT"])}
    minio = {"provider": "minio", "endpoint": s3["endpoint"], "bucket": "bmad-marker-check"}
    pg_user = testbed_env["BMAD_POSTGRES_USER"].encode()
    s3_key = s3["access_key"].encode()

    m = marker.encode()
    pg_closed = {**pg, "port": closed}
    pg_tls = {**pg, "sslMode": "require"}
    redis_user = {**redis, "username": "agent"}
    minio_create = {**minio, "createBucket": True}
    minio_closed = {**minio, "endpoint": f"http://127.0.0.1:{closed}"}
    mock = {"apiBase": stripe_api_base}
    mock_closed = {"apiBase": f"http://127.0.0.1:{closed}"}
    cases: list[Case] = [
        # postgres: wrong password, the marker as user name too, a closed port, TLS
        # refused by the server, a missing key, a missing Secret.
        ("pg-password", spec("postgres", pg), {"username": pg_user, "password": m}, True),
        ("pg-user", spec("postgres", pg), {"username": m, "password": m}, True),
        ("pg-closed", spec("postgres", pg_closed), {"username": pg_user, "password": m}, True),
        ("pg-tls", spec("postgres", pg_tls), {"username": pg_user, "password": m}, True),
        ("pg-missing-key", spec("postgres", pg), {"password": m}, True),
        ("pg-no-secret", spec("postgres", pg), None, False),
        # redis: wrong password, an unknown ACL user, a closed port, TLS to plaintext.
        ("redis-password", spec("redis", redis), {"password": m}, True),
        ("redis-user", spec("redis", redis_user), {"password": m}, True),
        ("redis-closed", spec("redis", {**redis, "port": closed}), {"password": m}, True),
        ("redis-tls", spec("redis", {**redis, "tls": True}), {"password": m}, True),
        # objectStorage: wrong secret key, the marker as access key id, a closed port,
        # a missing key.
        (
            "s3-secret",
            spec("objectStorage", minio),
            {"accessKeyId": s3_key, "secretAccessKey": m},
            True,
        ),
        (
            "s3-create",
            spec("objectStorage", minio_create),
            {"accessKeyId": m, "secretAccessKey": m},
            True,
        ),
        (
            "s3-closed",
            spec("objectStorage", minio_closed),
            {"accessKeyId": s3_key, "secretAccessKey": m},
            True,
        ),
        ("s3-missing-key", spec("objectStorage", minio), {"secretAccessKey": m}, True),
        # stripe: stripe-mock echoes a refused key in its error (malformed or live-mode).
        ("stripe-malformed", spec("stripe", mock), {"apiKey": m}, True),
        ("stripe-live", spec("stripe", mock), {"apiKey": b"sk_live_" + m}, True),
        ("stripe-closed", spec("stripe", mock_closed), {"apiKey": b"sk_test_" + m}, True),
    ]

    reasons: dict[str, base.Reason] = {}
    for name, case_spec, secret, found in cases:
        result = await checks.check_integration(
            case_spec, secret, secret_found=found, timeout=15, policy=TESTBED
        )
        assert not result.ok, name
        assert marker not in result.message, (name, result.message)
        assert "\n" not in result.message, name
        assert result.message, name
        reasons[name] = result.reason

    assert reasons["pg-password"] == base.Reason.AUTHENTICATION_FAILED
    assert reasons["pg-user"] == base.Reason.AUTHENTICATION_FAILED
    assert reasons["pg-closed"] == base.Reason.UNREACHABLE
    assert reasons["pg-tls"] == base.Reason.TLS_ERROR
    assert reasons["pg-missing-key"] == base.Reason.SECRET_KEY_MISSING
    assert reasons["pg-no-secret"] == base.Reason.SECRET_NOT_FOUND
    assert reasons["redis-password"] == base.Reason.AUTHENTICATION_FAILED
    assert reasons["redis-user"] == base.Reason.AUTHENTICATION_FAILED
    assert reasons["redis-closed"] == base.Reason.UNREACHABLE
    assert reasons["s3-secret"] == base.Reason.AUTHENTICATION_FAILED
    assert reasons["s3-create"] == base.Reason.AUTHENTICATION_FAILED
    assert reasons["s3-closed"] == base.Reason.UNREACHABLE
    assert reasons["s3-missing-key"] == base.Reason.SECRET_KEY_MISSING
    assert reasons["stripe-malformed"] == base.Reason.AUTHENTICATION_FAILED
    assert reasons["stripe-live"] == base.Reason.AUTHENTICATION_FAILED
    assert reasons["stripe-closed"] == base.Reason.UNREACHABLE
