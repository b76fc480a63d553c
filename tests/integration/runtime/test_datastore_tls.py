"""Issue 10, hole 10: the runtime's connections to its bound PostgreSQL and Redis honour
the binding's sslMode, TLS flag and CA, against the test bed's servers that speak TLS
with a CA of their own (``$BMAD_SERVICES_CA``).

The app is the production one (`wiring.create_default_app`), its bindings written the
way the operator writes them (`checks.binding_data`) into a directory laid out as
kubelet mounts them, so every client the runtime opens (store, rate limiter, task
bus) is built from them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import secrets
import ssl
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import fastapi
import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import checks
from bmad_runtime import bindings, settings, wiring
from bmad_testbed import databases, pki

from .served import ready_soon, serve

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("BMAD_", "OTEL_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


@pytest.fixture
def tenant() -> str:
    return f"tls-{secrets.token_hex(4)}"


@pytest.fixture
def ca_pem(testbed_env: dict[str, str]) -> str:
    return Path(testbed_env["BMAD_SERVICES_CA"]).read_text()


@pytest.fixture
def other_ca_pem(tmp_path: Path) -> str:
    """A CA that signed nothing the test bed serves."""
    return pki.Pki(tmp_path / "other-ca").ca.cert.read_text()


@pytest.fixture
async def tls_database(testbed_env: dict[str, str]) -> AsyncIterator[str]:
    """A database of its own on the PostgreSQL that serves TLS: its name."""
    async with databases.temporary(testbed_env["BMAD_POSTGRES_TLS_URL"], "bmad_tls") as url:
        yield urllib.parse.urlsplit(url).path.lstrip("/")


@pytest.fixture
async def plain_database(postgres_url: str) -> AsyncIterator[str]:
    async with databases.temporary(postgres_url, "bmad_plain") as url:
        yield urllib.parse.urlsplit(url).path.lstrip("/")


def write_binding(
    root: Path, name: str, spec: Mapping[str, Any], secret: Mapping[str, str]
) -> None:
    """The binding Secret the operator would publish, mounted as kubelet mounts it."""
    data = checks.binding_data(
        integration.IntegrationSpec.model_validate(spec),
        {k: v.encode() for k, v in secret.items()},
    )
    directory = root / name
    directory.mkdir(parents=True)
    for key, value in data.items():
        (directory / key).write_text(value)


def bind_postgres(
    root: Path, env: dict[str, str], *, port: str, database: str, ssl_mode: str, ca: str | None
) -> None:
    secret = {"username": env["BMAD_POSTGRES_USER"], "password": env["BMAD_POSTGRES_PASSWORD"]}
    if ca is not None:
        secret["ca.crt"] = ca
    spec = {
        "type": "postgres",
        "secretRef": {"name": "pg"},
        "postgres": {"host": "localhost", "port": int(port), "database": database},
    }
    spec["postgres"]["sslMode"] = ssl_mode
    write_binding(root, "db", spec, secret)


def bind_redis(root: Path, env: dict[str, str], *, tls: bool, ca: str | None) -> None:
    secret = {"password": env["BMAD_REDIS_PASSWORD"]}
    if ca is not None:
        secret["ca.crt"] = ca
    port = env["BMAD_REDIS_TLS_PORT" if tls else "BMAD_REDIS_PORT"]
    spec = {
        "type": "redis",
        "secretRef": {"name": "cache"},
        "redis": {"host": "localhost", "port": int(port), "tls": tls},
    }
    write_binding(root, "cache", spec, secret)


def production_app(tmp_path: Path, tenant: str, root: Path) -> fastapi.FastAPI:
    config_path = tmp_path / "agent.json"
    config_path.write_text(
        json.dumps(
            {
                "role": "pm",
                "model": {"provider": "echo", "name": "echo-1"},
                "limits": {"requestsPerMinute": 1000},
            }
        )
    )
    found = bindings.read_bindings(root)
    return wiring.create_default_app(
        settings.RuntimeSettings(
            agent_name="pm-1",
            agent_namespace=tenant,
            agent_config=config_path,
            binding_root=root,
            auth_mode="none",
        ).with_bindings(found)
    )


async def test_hole10_runtime_verifies_postgres_and_redis_tls_with_the_binding_ca(
    tmp_path: Path, testbed_env: dict[str, str], tenant: str, tls_database: str, ca_pem: str
) -> None:
    """PostgreSQL with sslMode verify-full and Redis with tls, each with the CA in its
    binding: the store, the limiter and the task bus connect, and /readyz says both
    connections are encrypted with the certificate verified. Before the fix the
    runtime connected from the URI alone and never saw the CA:

        asyncpg.exceptions._base.ClientConfigurationError: root certificate file
        "~/.postgresql/root.crt" does not exist or cannot be accessed
    """
    root = tmp_path / "bindings"
    bind_postgres(
        root,
        testbed_env,
        port=testbed_env["BMAD_POSTGRES_TLS_PORT"],
        database=tls_database,
        ssl_mode="verify-full",
        ca=ca_pem,
    )
    bind_redis(root, testbed_env, tls=True, ca=ca_pem)
    async for client in serve(production_app(tmp_path, tenant, root)):
        ready = await ready_soon(client)
        invoked = await client.post("/v1/invoke", json={"input": "over TLS"})
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["bus"] is True
    assert ready.json()["datastores"] == {"postgres": "tls-verified", "redis": "tls-verified"}
    assert invoked.status_code == 200, invoked.text


async def test_hole10_runtime_refuses_a_postgres_certificate_the_binding_ca_did_not_sign(
    tmp_path: Path,
    testbed_env: dict[str, str],
    *,
    tenant: str,
    tls_database: str,
    ca_pem: str,
    other_ca_pem: str,
) -> None:
    """sslMode require with a CA in the binding verifies the chain (libpq's meaning of
    require with a root certificate): a server whose certificate that CA did not sign
    is refused. Before the fix asyncpg's require encrypted without verifying, and the
    store connected (this test failed with ``DID NOT RAISE``)."""
    root = tmp_path / "bindings"
    bind_postgres(
        root,
        testbed_env,
        port=testbed_env["BMAD_POSTGRES_TLS_PORT"],
        database=tls_database,
        ssl_mode="require",
        ca=other_ca_pem,
    )
    bind_redis(root, testbed_env, tls=True, ca=ca_pem)
    with pytest.raises(ssl.SSLCertVerificationError):
        async for _ in serve(production_app(tmp_path, tenant, root)):
            pass


async def test_hole10_runtime_does_not_reach_redis_whose_certificate_the_ca_did_not_sign(
    tmp_path: Path,
    testbed_env: dict[str, str],
    *,
    tenant: str,
    tls_database: str,
    ca_pem: str,
    other_ca_pem: str,
) -> None:
    """Redis with tls and a CA that did not sign its certificate: the store does not
    answer, so the replica is not ready (and serves no task)."""
    root = tmp_path / "bindings"
    bind_postgres(
        root,
        testbed_env,
        port=testbed_env["BMAD_POSTGRES_TLS_PORT"],
        database=tls_database,
        ssl_mode="verify-full",
        ca=ca_pem,
    )
    bind_redis(root, testbed_env, tls=True, ca=other_ca_pem)
    async for client in serve(production_app(tmp_path, tenant, root)):
        answer = await client.get("/readyz")
    assert answer.status_code == 503, answer.text
    assert answer.json()["checks"]["store"] is False


async def test_hole10_runtime_reports_plaintext_when_prefer_meets_a_server_without_tls(
    tmp_path: Path,
    testbed_env: dict[str, str],
    *,
    tenant: str,
    plain_database: str,
    ca_pem: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """sslMode prefer on the plaintext PostgreSQL (and Redis without tls): the runtime
    serves, and says so in /readyz and in a warning that holds no secret. Before the
    fix the fallback was silent (``KeyError: 'datastores'``: /readyz had no such field
    and nothing was logged). /metrics says it too (bmad_agent_datastore_transport)."""
    root = tmp_path / "bindings"
    bind_postgres(
        root,
        testbed_env,
        port=testbed_env["BMAD_POSTGRES_PORT"],
        database=plain_database,
        ssl_mode="prefer",
        ca=ca_pem,
    )
    bind_redis(root, testbed_env, tls=False, ca=None)
    with caplog.at_level(logging.WARNING):
        async for client in serve(production_app(tmp_path, tenant, root)):
            ready = await ready_soon(client)
            metrics = (await client.get("/metrics")).text
    assert ready.status_code == 200, ready.text
    assert ready.json()["datastores"] == {"postgres": "plaintext", "redis": "plaintext"}
    for datastore in ("postgres", "redis"):
        shown = re.search(
            rf'^bmad_agent_datastore_transport{{[^}}]*datastore="{datastore}"[^}}]*'
            rf'transport="plaintext"[^}}]*}} (\S+)$',
            metrics,
            re.MULTILINE,
        )
        assert shown is not None, metrics
        assert float(shown.group(1)) == 1.0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert any("postgres is not encrypted" in w for w in warnings), warnings
    assert any("redis is not encrypted" in w for w in warnings), warnings
    for secret in (testbed_env["BMAD_POSTGRES_PASSWORD"], testbed_env["BMAD_REDIS_PASSWORD"]):
        assert not any(secret in w for w in warnings)
