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

from bmad_operator import errors, kube
from bmad_operator.autoscaling import autoscaler, decide, reasons
from bmad_operator.autoscaling import prometheus as prom
from bmad_testbed.kubectl import Kubectl

from .helpers import agent, condition

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("crds")]

DEADLINE_SECONDS = 30.0
DECISION_REASONS = {
    reasons.ABOVE_TARGET, reasons.BELOW_TARGET, reasons.PREDICTED_SCALE_UP,
    reasons.SCALE_UP_STABILIZED, reasons.SCALE_DOWN_STABILIZED, reasons.SCALED_TO_ZERO,
    reasons.ACTIVATED, reasons.BELOW_MIN_REPLICAS, reasons.ABOVE_MAX_REPLICAS,
    reasons.TOO_MANY_REPLICAS, reasons.TOO_FEW_REPLICAS, reasons.TENANT_LIMIT,
    reasons.SCALE_UP_LIMIT, reasons.SCALE_DOWN_LIMIT,
}  # fmt: skip


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


async def live_when(
    scaler: autoscaler.Autoscaler, k: Kubectl, namespace: str, name: str, ok: Any
) -> dict[str, Any]:
    """The live Agent once `ok(agent)`, evaluating again in between.

    The operator's reconciler (when the session runs one) writes the Agent's status too;
    a status write that loses the race (409) or is overwritten is redone by the next pass.
    """
    deadline = time.monotonic() + DEADLINE_SECONDS
    while time.monotonic() < deadline:
        live: dict[str, Any] = k.json("get", "agents.bmad.dev", name)
        if ok(live):
            return live
        await scaler.evaluate(namespace, name)
        await asyncio.sleep(0.5)
    raise AssertionError(f"not shown within {DEADLINE_SECONDS} s: {live.get('status')}")


async def shown(
    scaler: autoscaler.Autoscaler, k: Kubectl, namespace: str, name: str, type_: str
) -> dict[str, Any]:
    """A condition as the live Agent shows it."""
    live = await live_when(scaler, k, namespace, name, lambda a: condition(a, type_))
    found = condition(live, type_)
    assert found is not None
    return found


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

    live = await live_when(
        scaler, k, namespace, name,
        lambda a: (a.get("status") or {}).get("autoscaling", {}).get("desiredReplicas") == 10,
    )  # fmt: skip
    assert live["spec"]["replicas"] == 10
    auto = live["status"]["autoscaling"]
    assert (auto["desiredReplicas"], auto["reason"]) == (10, reasons.ABOVE_TARGET)
    assert auto["metrics"][0]["value"] == 50
    assert "lastScaleTime" in auto
    active = await shown(scaler, k, namespace, name, "ScalingActive")
    assert (active["status"], active["reason"]) == ("True", reasons.VALID_METRICS)
    events = k.json(
        "get", "events", "--field-selector", f"involvedObject.kind=Agent,involvedObject.name={name}"
    )["items"]
    # One Event per scale (the reconciler posts its own Ready/RollingOut events, and a
    # NoData Warning may come first: the first passes can run before Prometheus scraped).
    scaled = [
        (e["reason"], e["message"])
        for e in events
        if e["type"] == "Normal" and e["reason"] in DECISION_REASONS
    ]
    assert scaled == [
        (reasons.ABOVE_TARGET, "queue depth 50 > 1 replicas × target 5: 1 → 10")  # noqa: RUF001
    ]

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
        scaler = autoscaler.Autoscaler(api, closed)
        decision = await scaler.evaluate(namespace, name)
        assert decision is not None
        assert (decision.desired, decision.reason) == (1, reasons.PROMETHEUS_UNAVAILABLE)
        active = await shown(scaler, k, namespace, name, "ScalingActive")
    assert k.json("get", "agents.bmad.dev", name)["spec"]["replicas"] == 1
    assert (active["status"], active["reason"]) == ("False", reasons.PROMETHEUS_UNAVAILABLE)
    assert f"127.0.0.1:{port}" in active["message"]


async def test_a_promql_syntax_error_is_query_failed_naming_the_error(
    kubectl: Kubectl, namespace: str, api: kube.Kube, metrics: prom.Client
) -> None:
    k = kubectl.in_namespace(namespace)
    name = f"typo-{uuid.uuid4().hex[:6]}"
    k.apply(autoscaled(name, metrics=[{"type": "promql", "query": "sum(up", "targetValue": 1}]))
    scaler = autoscaler.Autoscaler(api, metrics)
    decision = await scaler.evaluate(namespace, name)
    assert decision is not None
    assert decision.reason == reasons.QUERY_FAILED
    active = await shown(scaler, k, namespace, name, "ScalingActive")
    assert (active["status"], active["reason"]) == ("False", reasons.QUERY_FAILED)
    assert "parse error" in active["message"]


async def test_a_status_write_with_a_stale_resource_version_is_refused(
    kubectl: Kubectl, namespace: str, api: kube.Kube
) -> None:
    # What keeps the autoscaler from overwriting a status written after its read.
    k = kubectl.in_namespace(namespace)
    name = f"stale-{uuid.uuid4().hex[:6]}"
    k.apply(autoscaled(name))
    read = await api.get("Agent", namespace, name)
    assert read is not None
    await api.patch_scale("Agent", namespace, name, 2)  # someone writes in between
    with pytest.raises(errors.ApiError) as caught:
        await api.patch_status(
            "Agent", namespace, name, {"autoscaling": {"reason": "Steady"}},
            resource_version=read["metadata"]["resourceVersion"],
        )  # fmt: skip
    assert caught.value.status == 409
    live = k.json("get", "agents.bmad.dev", name)
    assert "autoscaling" not in (live.get("status") or {})
