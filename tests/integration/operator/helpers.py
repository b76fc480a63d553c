"""Small builders of test objects, the Tenants helper and an async poll with a deadline,
shared by the operator's integration tests."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import secrets
import time
from collections.abc import Iterator, Sequence
from typing import Any

import httpx

from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.runtimes import ReplicaMirror


def agent(name: str, *, role: str = "dev", replicas: int = 1, **spec: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "role": role,
        "model": {"provider": "echo", "name": "echo-1"},
        # No datastores are bound in these tests: a durable agent would never be ready.
        "memory": {"store": "inProcess"},
        # No auth0 Integration is bound either: open, as the demo agents are.
        "auth": {"mode": "none"},
        "replicas": replicas,
    }
    body.update(spec)
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": body,
    }


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any] | None:
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == type_:
            return dict(cond)
    return None


def tenant(name: str, namespaces: list[str], **spec: Any) -> dict[str, Any]:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {"namespaces": namespaces, **spec},
    }


def wait_tenant(
    kubectl: Kubectl, name: str, cond_type: str = "Ready", status: str = "True", timeout: float = 60
) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = kubectl.json("get", "tenant", name)
        cond = condition(obj, cond_type)
        return obj if cond and cond["status"] == status else None

    found: dict[str, Any] = eventually(
        probe, timeout=timeout, what=f"tenant {name} {cond_type}={status}"
    )
    return found


class Tenants:
    """Creates uniquely named tenants and removes them (and their namespaces) after."""

    def __init__(self, kubectl: Kubectl) -> None:
        self.kubectl = kubectl
        self.names: list[str] = []
        self.namespaces: list[str] = []
        self.suffix = secrets.token_hex(3)

    def name(self, base: str) -> str:
        return f"{base}-{self.suffix}"

    def apply(self, doc: dict[str, Any]) -> None:
        self.names.append(doc["metadata"]["name"])
        self.namespaces.extend(doc["spec"]["namespaces"])
        self.kubectl.apply(doc)

    def cleanup(self) -> None:
        for name in self.names:
            self.kubectl.run(
                "delete", "tenant", name, "--ignore-not-found", "--wait=false", check=False
            )
        for ns in self.namespaces:
            self.kubectl.run(
                "delete", "namespace", ns, "--ignore-not-found", "--wait=false", check=False
            )


async def until(check: Any, *, within: float, what: str, every: float = 0.5) -> Any:
    """Poll the async `check` until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"{what}: not within {within:.0f} s (last: {last!r})")


@contextlib.contextmanager
def stripe_integration(
    kubectl: Kubectl,
    namespace: str,
    api_base: str,
    *,
    prefix: str,
    api_key: bytes,
    more: dict[str, bytes] | None = None,
) -> Iterator[str]:
    """A stripe Integration (and its key's Secret, with the keys of `more` too) in
    `namespace`, pointed at `api_base`; its name, removed again afterwards."""
    if not kubectl.exists("namespace", namespace):
        kubectl.run("create", "namespace", namespace)
    k = kubectl.in_namespace(namespace)
    name = f"{prefix}-{secrets.token_hex(3)}"
    k.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": name},
            "data": {
                key: base64.b64encode(value).decode()
                for key, value in {"apiKey": api_key, **(more or {})}.items()
            },
        }
    )
    k.apply(
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "metadata": {"name": name},
            "spec": {
                "type": "stripe",
                "secretRef": {"name": name},
                "stripe": {"apiBase": api_base},
            },
        }
    )
    try:
        yield name
    finally:
        k.run("delete", "integration", name, "--ignore-not-found", check=False)
        k.run("delete", "secret", name, "--ignore-not-found", check=False)


def env_of(deployment: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    if deployment is None:
        return {}
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    return {e["name"]: e for e in container.get("env") or []}


def bind_redis(k: Kubectl, testbed_env: dict[str, str]) -> None:
    """The test bed's Redis as an Integration named redis in k's namespace."""
    password = testbed_env["BMAD_REDIS_PASSWORD"].encode()
    k.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "redis-creds"},
            "data": {"password": base64.b64encode(password).decode()},
        }
    )
    k.apply(
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "metadata": {"name": "redis"},
            "spec": {
                "type": "redis",
                "secretRef": {"name": "redis-creds"},
                "redis": {"host": "127.0.0.1", "port": int(testbed_env["BMAD_REDIS_PORT"])},
            },
        }
    )


def ledger_env(testbed_env: dict[str, str], ledger_dsn: str) -> dict[str, str]:
    """An operator's settings for the usage ledger: the test bed's Redis and the given
    PostgreSQL database, the totals read and reported every second."""
    return {
        "BMAD_OPERATOR_USAGE_REDIS_URL": testbed_env["BMAD_REDIS_URL"],
        "BMAD_OPERATOR_LEDGER_DSN": ledger_dsn,
        "BMAD_OPERATOR_USAGE_POLL_SECONDS": "1",
        "BMAD_OPERATOR_USAGE_REPORT_SECONDS": "1",
    }


async def serving_ports(
    http: httpx.AsyncClient, mirrors: Sequence[ReplicaMirror]
) -> list[int] | None:
    """The port of each mirror's first runtime once every one answers /readyz with 200;
    None until then (for `until`)."""
    ports = [m.replicas[0].port for m in mirrors if m.replicas]
    if len(ports) != len(mirrors):
        return None
    for port in ports:
        try:
            if (await http.get(f"http://127.0.0.1:{port}/readyz")).status_code != 200:
                return None
        except httpx.TransportError:
            return None
    return ports
