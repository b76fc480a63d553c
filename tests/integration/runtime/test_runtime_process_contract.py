"""Real `bmad runtime` processes started from exactly what the operator's builders render
for an Agent, against a real Redis: the pod without Kubernetes.

Each process gets the rendered container's environment and volumes (agent.json, the
projected instructions, the binding Secret), laid out under a directory as the kubelet
would lay them out in the container (`tests/podlayout.py`); only the listening port is
moved off 8080, since the processes share this machine's network. The Redis of the
first test is its own redis-server, started only after the runtime, on a port chosen
in advance: a replica that starts during a Redis outage.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from bmad_crds import runtime_contract as contract
from bmad_crds.v1alpha1 import agent as agent_api
from bmad_crds.v1alpha1 import integration as integration_api
from bmad_integrations import checks, taskbus
from bmad_operator.builders import agent as agent_builders
from bmad_operator.builders import integration as integration_builders
from bmad_testbed import own_redis, procs
from bmad_testbed.kubectl import eventually

from ... import podlayout

pytestmark = pytest.mark.integration

INSTRUCTIONS = "Close every answer with the story id.\nNever estimate in hours.\n"
TENANT = "acme"
NAMESPACE = "team-a"


class Redis(NamedTuple):
    host: str
    port: int
    password: str
    url: str


class LateRedis(own_redis.OwnRedis):
    """A redis-server on a port chosen now, started when the test says so."""

    @property
    def address(self) -> Redis:
        return Redis("127.0.0.1", self.port, self.password, self.url)


@pytest.fixture
def late_redis(tmp_path: Path) -> Iterator[LateRedis]:
    server = LateRedis(tmp_path / "redis")
    try:
        yield server
    finally:
        server.stop()


def rendered_pod(
    root: Path, spec: dict[str, Any], *, name: str, redis: Redis | None
) -> list[dict[str, Any]]:
    """What the operator renders for the Agent (in NAMESPACE of TENANT), laid out under
    ``root``; with ``redis``, bound to a redis Integration ``cache`` pointing there."""
    secrets_by_name: dict[str, dict[str, bytes]] = {}
    bindings: list[str] = []
    if redis is not None:
        integration = {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "metadata": {"name": "cache", "namespace": NAMESPACE, "uid": "uid-cache"},
            "spec": {
                "type": "redis",
                "secretRef": {"name": "cache-creds"},
                "redis": {"host": redis.host, "port": redis.port},
            },
        }
        ispec = integration_api.IntegrationSpec.model_validate(integration["spec"])
        data = checks.binding_data(ispec, {"password": redis.password.encode()})
        secret = integration_builders.binding_secret(integration, ispec.type, data)
        secrets_by_name[secret["metadata"]["name"]] = podlayout.secret_data(secret)
        bindings = ["cache"]
        spec = {**spec, "integrations": ["cache"]}
    body = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name, "namespace": NAMESPACE, "uid": f"uid-{name}"},
        "spec": spec,
    }
    objs = agent_builders.build_all(
        body,
        agent_api.AgentSpec.model_validate(spec),
        image="unused",
        bindings=bindings,
        tenant=TENANT,
    )
    podlayout.lay_out(
        root,
        objs,
        config_maps={"prompts": {"reviewer.md": INSTRUCTIONS}},
        secrets=secrets_by_name,
    )
    return objs


class Runtime(NamedTuple):
    url: str
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture
def start_runtime(tmp_path: Path) -> Iterator[Any]:
    started: list[Runtime] = []

    def start(objs: list[dict[str, Any]], root: Path, **extra_env: str) -> Runtime:
        port = procs.free_port()
        base = {
            k: v
            for k, v in os.environ.items()
            if not (k.upper().startswith(("BMAD_", "OTEL_")) or k == "SERVICE_BINDING_ROOT")
        }
        env = {
            **base,
            **podlayout.environment(objs, root),
            contract.HTTP_PORT_ENV: str(port),  # the only change: a free port on loopback
            "BMAD_HTTP_HOST": "127.0.0.1",
            **extra_env,
        }
        log = tmp_path / f"runtime-{len(started)}.log"
        with log.open("wb") as out:
            process = subprocess.Popen(
                [sys.executable, "-m", "bmad_cli.main", "runtime"],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        runtime = Runtime(f"http://127.0.0.1:{port}", process, log)
        started.append(runtime)

        def serving() -> bool:
            assert process.poll() is None, f"the runtime exited: {log.read_text()[-2000:]}"
            try:
                return httpx.get(f"{runtime.url}/healthz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        eventually(serving, timeout=60, what=f"{runtime.url}/healthz")
        return runtime

    try:
        yield start
    finally:
        for runtime in started:
            runtime.process.terminate()
        for runtime in started:
            try:
                runtime.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                runtime.process.kill()


REVIEWER: dict[str, Any] = {
    "role": "custom",
    "persona": {"name": "Quinn", "title": "Reviewer"},
    "instructionsFrom": {"name": "prompts", "key": "reviewer.md"},
    "model": {"provider": "echo", "name": "echo-1", "params": {"echoSystem": True}},
    "memory": {"store": "inProcess"},
    "auth": {"mode": "none"},  # no auth0 Integration is bound
}


def readiness(runtime: Runtime) -> dict[str, Any]:
    answer = httpx.get(f"{runtime.url}/readyz", timeout=5)
    body: dict[str, Any] = answer.json()
    body["httpStatus"] = answer.status_code
    return body


def test_a_runtime_process_answers_with_its_instructions_from_a_config_map(
    tmp_path: Path, start_runtime: Any
) -> None:
    """Issue 11 (a), with a real process: on main (9ca8f9d) agent.json named the
    ConfigMap but the pod had no such file and the runtime no such reader, so the
    answer held no instructions."""
    objs = rendered_pod(tmp_path / "pod", REVIEWER, name="quinn", redis=None)
    runtime = start_runtime(objs, tmp_path / "pod")

    answer = httpx.post(f"{runtime.url}/v1/invoke", json={"input": "Review 1.2"}, timeout=30)

    assert answer.status_code == 200, answer.text
    output = answer.json()["output"]
    assert output.startswith("[echo-1] You are Quinn, the Reviewer.")
    assert INSTRUCTIONS.strip() in output
    assert output.endswith("Review 1.2")


async def test_a_runtime_started_while_redis_is_down_consumes_its_stream_once_redis_is_up(
    tmp_path: Path, start_runtime: Any, late_redis: LateRedis
) -> None:
    """Issue 11 (c): on main (9ca8f9d) the consumer's first Redis call ran before its
    retry loop, so a replica started during an outage lost its consumer at once and,
    with an inProcess store, reported ready while never reading its stream. A main
    runtime process, Redis down then up: ``readyz 200 {'store': True, 'model': True}``
    while down, ``no result within 30 s`` for a task once up, ``readyz 200`` still.
    Here it is not ready (``checks.bus`` false) until it consumes, and then answers
    the task, on the stream of the Tenant the operator rendered, with the instructions
    from the ConfigMap."""
    objs = rendered_pod(tmp_path / "pod", REVIEWER, name="quinn", redis=late_redis.address)
    runtime = start_runtime(objs, tmp_path / "pod")

    down = eventually(
        lambda: (r := readiness(runtime))["checks"].get("bus") is False and r,
        timeout=30,
        what="/readyz to report the bus down",
    )
    assert down["httpStatus"] == 503
    assert down["status"] == "not-ready"
    assert "task" in down["message"]

    late_redis.start()

    agent = contract.agent_key(name="quinn", namespace=NAMESPACE, tenant=TENANT)
    assert agent == "team-a.quinn"
    producer = taskbus.TaskProducer.from_url(late_redis.address.url, tenant=TENANT, agent=agent)
    try:
        await producer.submit("review-1", {"input": "Review story 1.3"})
        result = await producer.wait_result("review-1", timeout_s=90)
    finally:
        await producer.aclose()
    assert result.status == "succeeded", result
    assert result.output is not None
    assert INSTRUCTIONS.strip() in result.output["output"]
    assert result.output["output"].endswith("Review story 1.3")
    ready = eventually(
        lambda: (r := readiness(runtime))["httpStatus"] == 200 and r,
        timeout=30,
        what="/readyz to become ready",
    )
    assert ready["checks"]["bus"] is True


async def test_hole_2_a_runtime_process_keeps_the_identity_the_operator_rendered(
    tmp_path: Path, start_runtime: Any, redis_url: str, testbed_env: dict[str, str]
) -> None:
    """Issue 10, hole 2, with a real process: names a tenant might slip into the
    environment in another case are not settings. On main (9ca8f9d) pydantic-settings
    took ``Bmad_Tenant`` and ``bmad_agent_namespace`` as the tenant and namespace, and
    the task below, on the operator's stream, was never consumed."""
    redis = Redis(
        testbed_env["BMAD_REDIS_HOST"],
        int(testbed_env["BMAD_REDIS_PORT"]),
        testbed_env["BMAD_REDIS_PASSWORD"],
        redis_url,
    )
    name = f"pm-{secrets.token_hex(3)}"
    spec = {**REVIEWER, "role": "pm"}
    objs = rendered_pod(tmp_path / "pod", spec, name=name, redis=redis)
    runtime = start_runtime(
        objs, tmp_path / "pod", Bmad_Tenant="victim", bmad_agent_namespace="victim"
    )

    agent = contract.agent_key(name=name, namespace=NAMESPACE, tenant=TENANT)
    producer = taskbus.TaskProducer.from_url(redis_url, tenant=TENANT, agent=agent)
    try:
        await producer.submit("t-1", {"input": "Whose agent are you?"})
        result = await producer.wait_result("t-1", timeout_s=60)
    finally:
        await producer.aclose()
    assert result.status == "succeeded", result
    async with httpx.AsyncClient(timeout=10) as client:
        openapi = (await client.get(f"{runtime.url}/openapi.json")).json()
    assert f"in namespace '{NAMESPACE}'" in openapi["info"]["description"]
    assert json.dumps(openapi).count("victim") == 0
