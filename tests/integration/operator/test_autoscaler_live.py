"""The Autoscaler's pass against the real apiserver and the real Prometheus.

Queue depth is pushed through the real Pushgateway, labelled as the Agent's replicas
would be; the Autoscaler (not yet wired into the operator, so driven here pass by
pass) reads it from Prometheus and writes spec.replicas through the Agent's scale
subresource, status.autoscaling (validated by the CRD's schema) and an Event.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from bmad_operator import kube
from bmad_operator.autoscaling import autoscaler, decide, reasons
from bmad_operator.autoscaling import prometheus as prom
from bmad_testbed.kubectl import Kubectl

from .helpers import agent, condition

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("crds")]

DEADLINE_SECONDS = 30.0


@pytest.fixture
async def api(
    testbed_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[kube.Kube]:
    monkeypatch.setenv("KUBECONFIG", testbed_env["KUBECONFIG"])
    client = await kube.Kube.connect()
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture
async def metrics(prometheus: dict[str, str]) -> AsyncIterator[prom.Client]:
    async with prom.Client(prometheus["prometheus"]) as client:
        yield client


@pytest.fixture
async def push(prometheus: dict[str, str]) -> AsyncIterator[Any]:
    groups: list[str] = []
    async with httpx.AsyncClient(timeout=10) as http:

        async def push_depth(namespace: str, name: str, depth: float) -> None:
            group = (
                f"{prometheus['pushgateway']}/metrics/job/bmad-autoscaler-test"
                f"/namespace/{namespace}/agent/{name}/instance/{name}-pod-a"
            )
            body = f"# TYPE bmad_agent_queue_depth gauge\nbmad_agent_queue_depth {depth}\n"
            (await http.put(group, content=body.encode())).raise_for_status()
            groups.append(group)

        yield push_depth
        for group in set(groups):
            await http.delete(group)


async def until(
    scaler: autoscaler.Autoscaler, namespace: str, name: str, done: Any
) -> decide.Decision:
    """Evaluate every 0.5 s until `done(decision)`; fail at the deadline with the last one."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    last = None
    while time.monotonic() < deadline:
        last = await scaler.evaluate(namespace, name)
        if last is not None and done(last):
            return last
        await asyncio.sleep(0.5)
    raise AssertionError(f"not reached within {DEADLINE_SECONDS} s; last decision: {last}")


def autoscaled(name: str, **autoscaling: Any) -> dict[str, Any]:
    return agent(name, replicas=1, autoscaling={"enabled": True, "maxReplicas": 10, **autoscaling})


async def test_a_queue_of_50_with_target_5_scales_the_agent_to_10_and_back_after_the_window(
    kubectl: Kubectl, namespace: str, api: kube.Kube, metrics: prom.Client,
    push: Any,
) -> None:  # fmt: skip
    k = kubectl.in_namespace(namespace)
    name = f"scaled-{uuid.uuid4().hex[:6]}"
    k.apply(
        autoscaled(
            name,
            metrics=[{"type": "queueDepth", "target": 5}],
            behavior={
                "scaleUp": {"policies": [{"type": "Pods", "value": 10, "periodSeconds": 15}]},
                "scaleDown": {"stabilizationWindowSeconds": 5},
            },
        )
    )
    scaler = autoscaler.Autoscaler(api, metrics)
    await push(namespace, name, 50)
    decision = await until(scaler, namespace, name, lambda d: d.desired == 10)
    assert decision.message == "queue depth 50 > 1 replicas × target 5: 1 → 10"  # noqa: RUF001

    live = k.json("get", "agents.bmad.dev", name)
    assert live["spec"]["replicas"] == 10
    auto = live["status"]["autoscaling"]
    assert (auto["desiredReplicas"], auto["reason"]) == (10, reasons.ABOVE_TARGET)
    assert auto["metrics"][0]["value"] == 50
    assert "lastScaleTime" in auto
    active = condition(live, "ScalingActive")
    assert active is not None
    assert active["status"] == "True"
    events = k.json("get", "events", "--field-selector", f"involvedObject.name={name}")["items"]
    # One Normal event per scale (a NoData Warning may precede it: the first passes can
    # run before Prometheus has scraped the pushed value).
    assert [(e["reason"], e["message"]) for e in events if e["type"] == "Normal"] == [
        (reasons.ABOVE_TARGET, "queue depth 50 > 1 replicas × target 5: 1 → 10")  # noqa: RUF001
    ]
    assert {e["reason"] for e in events if e["type"] == "Warning"} <= {reasons.NO_DATA}

    # The queue drains: held by the 5 s window first, then down to minReplicas.
    await push(namespace, name, 0)
    held = await until(scaler, namespace, name, lambda d: d.metrics[0].reading.value == 0)
    assert (held.desired, held.reason) == (10, reasons.SCALE_DOWN_STABILIZED)
    down = await until(scaler, namespace, name, lambda d: d.desired < 10)
    assert down.desired == 1
    assert k.json("get", "agents.bmad.dev", name)["spec"]["replicas"] == 1


async def test_prometheus_unreachable_holds_replicas_and_says_so(
    kubectl: Kubectl, namespace: str, api: kube.Kube
) -> None:
    k = kubectl.in_namespace(namespace)
    name = f"blind-{uuid.uuid4().hex[:6]}"
    k.apply(autoscaled(name))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    async with prom.Client(f"http://127.0.0.1:{port}") as closed:
        decision = await autoscaler.Autoscaler(api, closed).evaluate(namespace, name)
    assert decision is not None
    assert (decision.desired, decision.reason) == (1, reasons.PROMETHEUS_UNAVAILABLE)
    live = k.json("get", "agents.bmad.dev", name)
    assert live["spec"]["replicas"] == 1
    active = condition(live, "ScalingActive")
    assert active is not None
    assert (active["status"], active["reason"]) == ("False", reasons.PROMETHEUS_UNAVAILABLE)
    assert f"127.0.0.1:{port}" in active["message"]


async def test_a_promql_syntax_error_is_query_failed_naming_the_error(
    kubectl: Kubectl, namespace: str, api: kube.Kube, metrics: prom.Client
) -> None:
    k = kubectl.in_namespace(namespace)
    name = f"typo-{uuid.uuid4().hex[:6]}"
    k.apply(autoscaled(name, metrics=[{"type": "promql", "query": "sum(up", "targetValue": 1}]))
    decision = await autoscaler.Autoscaler(api, metrics).evaluate(namespace, name)
    assert decision is not None
    assert decision.reason == reasons.QUERY_FAILED
    active = condition(k.json("get", "agents.bmad.dev", name), "ScalingActive")
    assert active is not None
    assert (active["status"], active["reason"]) == ("False", reasons.QUERY_FAILED)
    assert "parse error" in active["message"]
