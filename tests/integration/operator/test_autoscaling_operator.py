"""Autoscaling by the running operator, on the test bed: real control plane, real
Prometheus scraping real `bmad runtime` processes, real Redis streams.

The operator runs as its own process (the session's `operator` fixture) with the test
bed's Prometheus. `bmad_testbed.runtimes.ReplicaMirror` runs one `bmad runtime` process
per replica of the Agent's Deployment (kwok runs no containers) and Prometheus scrapes
them through a file_sd target file. Where a test is about something else than the runtime (the
Tenant's budget, a conflict, Prometheus going away), the queue depth is pushed through
the real Pushgateway instead, labelled as a runtime labels its own series.
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, NamedTuple

import httpx
import pytest

from bmad_integrations import taskbus
from bmad_operator import kube
from bmad_operator.autoscaling import reasons
from bmad_testbed import crds as third_party
from bmad_testbed import procs, testbed
from bmad_testbed.kubectl import Kubectl
from bmad_testbed.operator_proc import OperatorProcess
from bmad_testbed.runtimes import GatedModel, ReplicaMirror

from .helpers import agent, condition, until

pytestmark = [pytest.mark.integration]

Obj = dict[str, Any]
SCALE_REASONS = {
    reasons.ABOVE_TARGET, reasons.BELOW_TARGET, reasons.PREDICTED_SCALE_UP,
    reasons.SCALE_UP_STABILIZED, reasons.SCALE_DOWN_STABILIZED, reasons.SCALED_TO_ZERO,
    reasons.ACTIVATED, reasons.BELOW_MIN_REPLICAS, reasons.ABOVE_MAX_REPLICAS,
    reasons.TOO_MANY_REPLICAS, reasons.TOO_FEW_REPLICAS, reasons.TENANT_LIMIT,
    reasons.SCALE_UP_LIMIT, reasons.SCALE_DOWN_LIMIT,
}  # fmt: skip


class Scene(NamedTuple):
    """One test's namespace on the test bed, with the operator running."""

    k: Kubectl  # kubectl in the namespace
    kubectl: Kubectl  # cluster-wide
    namespace: str
    api: kube.Kube
    env: dict[str, str]
    tmp: Path

    def mirror(self, name: str) -> ReplicaMirror:
        return ReplicaMirror(
            self.api, self.namespace, name, workdir=self.tmp,
            targets_dir=Path(self.env["BMAD_PROMETHEUS_TARGETS_DIR"]),
        )  # fmt: skip

    def producer(self, name: str) -> taskbus.TaskProducer:
        return taskbus.TaskProducer.from_url(
            self.env["BMAD_REDIS_URL"], tenant=self.namespace, agent=name
        )


@pytest.fixture
async def scene(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, testbed_env: dict[str, str],
    tmp_path: Path,
) -> AsyncIterator[Scene]:  # fmt: skip
    """The test's namespace, with the operator running and an admin API client."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBECONFIG", testbed_env["KUBECONFIG"])
        api = await kube.Kube.connect()
    try:
        yield Scene(kubectl.in_namespace(namespace), kubectl, namespace, api, testbed_env, tmp_path)
    finally:
        await api.close()


@pytest.fixture
async def push(prometheus: dict[str, str]) -> AsyncIterator[Any]:
    """Push bmad_agent_queue_depth for an Agent, as its replicas would export it."""
    groups: list[str] = []
    async with httpx.AsyncClient(timeout=10) as http:

        async def push_depth(namespace: str, name: str, depth: float) -> None:
            group = (
                f"{prometheus['pushgateway']}/metrics/job/bmad-autoscaling-test"
                f"/namespace/{namespace}/agent/{name}"
            )
            body = f"# TYPE bmad_agent_queue_depth gauge\nbmad_agent_queue_depth {depth}\n"
            (await http.put(group, content=body.encode())).raise_for_status()
            groups.append(group)

        yield push_depth
        for group in set(groups):
            await http.delete(group)


def secret(name: str, data: dict[str, str]) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def integration(name: str, type_: str, block: Obj, secret_name: str) -> Obj:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Integration",
        "metadata": {"name": name},
        "spec": {"type": type_, "secretRef": {"name": secret_name}, type_: block},
    }


def bind_redis(k: Kubectl, env: dict[str, str]) -> None:
    k.apply(secret("redis-creds", {"password": env["BMAD_REDIS_PASSWORD"]}))
    k.apply(
        integration(
            "redis", "redis", {"host": "127.0.0.1", "port": int(env["BMAD_REDIS_PORT"])},
            "redis-creds",
        )
    )  # fmt: skip


def bind_model(k: Kubectl, model: GatedModel) -> None:
    k.apply(secret("llm-creds", {"apiKey": model.api_key}))
    k.apply(
        integration(
            "llm", "llm",
            {"provider": "openai-compatible", "baseUrl": model.url, "defaultModel": model.model},
            "llm-creds",
        )
    )  # fmt: skip


async def live(api: kube.Kube, namespace: str, name: str, kind: str = "Agent") -> Obj:
    found = await api.get(kind, namespace, name)
    assert found is not None, f"{kind} {namespace}/{name} is gone"
    return found


def auto(body: Obj) -> Obj:
    shown: Obj = (body.get("status") or {}).get("autoscaling") or {}
    return shown


def scale_events(k: Kubectl, name: str) -> list[tuple[str, str]]:
    items = k.json(
        "get", "events", "--field-selector", f"involvedObject.kind=Agent,involvedObject.name={name}"
    )["items"]
    items.sort(key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["name"]))
    return [(e["reason"], e["message"]) for e in items if e["reason"] in SCALE_REASONS]


async def prometheus_value(url: str, promql: str) -> float | None:
    async with httpx.AsyncClient(timeout=5) as http:
        data = (await http.get(f"{url}/api/v1/query", params={"query": promql})).json()
    result = data["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def test_a_queue_of_50_at_target_5_goes_to_10_runtimes_and_back_after_the_window(
    scene: Scene,
) -> None:
    k, namespace, api, testbed_env = scene.k, scene.namespace, scene.api, scene.env
    name = "dev"
    bind_redis(k, testbed_env)
    with GatedModel(api_key=f"sk-{uuid.uuid4().hex}") as model:
        bind_model(k, model)
        k.apply(
            agent(
                name,
                replicas=1,
                model={"provider": "openai-compatible", "name": model.model, "integration": "llm"},
                integrations=["llm", "redis"],
                autoscaling={
                    "enabled": True,
                    "maxReplicas": 10,
                    "pollingIntervalSeconds": 2,
                    "metrics": [{"type": "queueDepth", "target": 5}],
                    "behavior": {
                        "scaleUp": {
                            "policies": [{"type": "Pods", "value": 10, "periodSeconds": 15}]
                        },
                        "scaleDown": {"stabilizationWindowSeconds": 20},
                    },
                },
            )
        )
        k.run("wait", "--for=condition=Ready", f"agent/{name}", "--timeout=120s", timeout=130)
        # Fifty tasks wait on the stream before the first replica runs; the model holds
        # every answer until the gate opens, so the queue stays at 50.
        producer = scene.producer(name)
        try:
            for i in range(50):
                await producer.submit(f"task-{i}", {"input": f"story {i}"})
            async with scene.mirror(name) as mirror:

                async def at_ten() -> Obj | None:
                    body = await live(api, namespace, name)
                    return body if body["spec"]["replicas"] == 10 else None

                body = await until(at_ten, within=120, what="the Agent at 10 replicas")
                deployment = await until(
                    lambda: _deployment_at(api, namespace, name, 10),
                    within=30,
                    what="the Deployment at 10 replicas",
                )
                assert deployment["spec"]["replicas"] == 10
                # Ten real runtime processes, each scraped by Prometheus.
                inflight = f'bmad_agent_inflight{{namespace="{namespace}",agent="{name}"}}'
                await until(
                    lambda: _equals(testbed_env["BMAD_PROMETHEUS_URL"], f"count({inflight})", 10),
                    within=120,
                    what=f"Prometheus scraping 10 runtimes\n{mirror.logs()}",
                )
                assert mirror.running == 10
                shown = auto(await live(api, namespace, name))
                assert shown["reason"] in (reasons.ABOVE_TARGET, reasons.WITHIN_TOLERANCE)
                assert scale_events(k, name) == [
                    (reasons.ABOVE_TARGET, "queue depth 50 > 1 replicas × target 5: 1 → 10")  # noqa: RUF001
                ]

                # The model answers: all fifty are answered, the queue drains.
                model.gate.set()
                for i in range(50):
                    result = await producer.wait_result(f"task-{i}", timeout_s=120)
                    assert result is not None, f"task-{i} was not answered"
                    assert result.status == "succeeded", result

                async def held() -> Obj | None:
                    body = await live(api, namespace, name)
                    said = auto(body)
                    return body if said.get("reason") == reasons.SCALE_DOWN_STABILIZED else None

                body = await until(held, within=60, what="the scale-down held by the window")
                assert body["spec"]["replicas"] == 10
                assert "the highest recommendation of the last 20 s is 10" in auto(body)["message"]

                async def at_one() -> Obj | None:
                    body = await live(api, namespace, name)
                    return body if body["spec"]["replicas"] == 1 else None

                await until(at_one, within=90, what="the Agent back at 1 replica")
                await until(
                    lambda: _deployment_at(api, namespace, name, 1),
                    within=30,
                    what="the Deployment at 1 replica",
                )
                assert [r for r, _ in scale_events(k, name)] == [
                    reasons.ABOVE_TARGET, reasons.TOO_FEW_REPLICAS,
                ]  # fmt: skip
                assert mirror.history[:2] == [1, 10]
        finally:
            await producer.aclose()


async def _deployment_at(api: kube.Kube, namespace: str, name: str, replicas: int) -> Obj | None:
    found = await api.get("Deployment", namespace, name)
    return found if found and found["spec"]["replicas"] == replicas else None


async def _equals(url: str, promql: str, wanted: float) -> bool:
    return await prometheus_value(url, promql) == wanted


async def test_at_zero_a_task_wakes_the_agent_and_is_answered(scene: Scene) -> None:
    k, namespace, api, testbed_env = scene.k, scene.namespace, scene.api, scene.env
    name = "sleepy"
    bind_redis(k, testbed_env)
    k.apply(
        agent(
            name,
            replicas=1,
            integrations=["redis"],
            autoscaling={
                "enabled": True,
                "minReplicas": 0,
                "maxReplicas": 3,
                "idleSeconds": 10,
                "pollingIntervalSeconds": 2,
            },
        )
    )
    k.run("wait", "--for=condition=Ready", f"agent/{name}", "--timeout=120s", timeout=130)
    producer = scene.producer(name)
    try:
        async with scene.mirror(name) as mirror:

            async def at_zero() -> Obj | None:
                body = await live(api, namespace, name)
                return body if body["spec"]["replicas"] == 0 else None

            body = await until(at_zero, within=120, what="the idle Agent at zero")
            assert scale_events(k, name)[0][0] == reasons.SCALED_TO_ZERO
            await until(lambda: _deployment_at(api, namespace, name, 0), within=30, what="no pods")

            async def no_runtime() -> bool:
                return mirror.running == 0

            await until(no_runtime, within=60, what="no runtime process")

            # At zero the queue depth comes from the stream itself: it says Idle.
            async def idle() -> Obj | None:
                body = await live(api, namespace, name)
                return body if auto(body).get("reason") == reasons.IDLE else None

            body = await until(idle, within=60, what="the Agent idle at zero")
            active = condition(body, "ScalingActive")
            assert active is not None
            assert (active["status"], active["reason"]) == ("True", reasons.VALID_METRICS)

            # Tasks submitted at zero are kept and answered after the wake-up.
            for i in range(3):
                await producer.submit(f"wake-{i}", {"input": f"wake up {i}"})
            for i in range(3):
                result = await producer.wait_result(f"wake-{i}", timeout_s=120)
                assert result is not None, f"wake-{i} was not answered\n{mirror.logs()}"
                assert result.status == "succeeded", result
                assert result.output is not None
                assert f"wake up {i}" in result.output["output"]
            woke = [m for r, m in scale_events(k, name) if r == reasons.ACTIVATED]
            assert woke, scale_events(k, name)
            assert woke[0].startswith("queue depth ")
            assert woke[0].endswith("0 → 1")
            # The runtimes followed: one, none, then one again to answer.
            first_zero = mirror.history.index(0)
            assert mirror.history[0] == 1
            assert any(n >= 1 for n in mirror.history[first_zero:])
    finally:
        await producer.aclose()


def autoscaled(name: str, **autoscaling: Any) -> Obj:
    return agent(
        name,
        replicas=1,
        autoscaling={"enabled": True, "maxReplicas": 10, "pollingIntervalSeconds": 2,
                     **autoscaling},
    )  # fmt: skip


async def until_replicas(api: kube.Kube, namespace: str, name: str, replicas: int) -> Obj:
    async def check() -> Obj | None:
        body = await live(api, namespace, name)
        return body if body["spec"]["replicas"] == replicas else None

    found: Obj = await until(check, within=90, what=f"{name} at {replicas} replicas")
    return found


async def until_active(api: kube.Kube, namespace: str, name: str, status: str, reason: str) -> Obj:
    async def check() -> Obj | None:
        body = await live(api, namespace, name)
        cond = condition(body, "ScalingActive")
        return body if cond and (cond["status"], cond["reason"]) == (status, reason) else None

    found: Obj = await until(check, within=90, what=f"{name}: ScalingActive={status} {reason}")
    return found


async def test_prometheus_stopped_mid_run_holds_the_replicas_and_recovers(
    scene: Scene, operator: OperatorProcess, push: Any
) -> None:
    k, namespace, api, testbed_env = scene.k, scene.namespace, scene.api, scene.env
    name = "steady"
    k.apply(autoscaled(name, metrics=[{"type": "queueDepth", "target": 5}]))
    await push(namespace, name, 15)
    await until_replicas(api, namespace, name, 3)
    await until_active(api, namespace, name, "True", reasons.VALID_METRICS)
    url = testbed_env["BMAD_PROMETHEUS_URL"]
    evaluations = 'bmad_operator_autoscaler_evaluations_total{reason="PrometheusUnavailable"}'
    seen: list[int] = []
    stopped = testbed.stop_server("prometheus")
    try:
        body = await until_active(api, namespace, name, "False", reasons.PROMETHEUS_UNAVAILABLE)
        assert url.removeprefix("http://") in condition(body, "ScalingActive")["message"]  # type: ignore[index]
        before = operator.metric_sum(evaluations)

        # Several evaluations while Prometheus is away: each one holds 3 replicas.
        async def evaluated_thrice() -> bool:
            seen.append((await live(api, namespace, name))["spec"]["replicas"])
            return operator.metric_sum(evaluations) >= before + 3

        await until(evaluated_thrice, within=60, what="three evaluations without Prometheus")
    finally:
        testbed.start_again(stopped, ready=lambda: procs.http_ok(f"{url}/-/ready"), timeout=120)

    async def recovered() -> Obj | None:
        body = await live(api, namespace, name)
        seen.append(body["spec"]["replicas"])
        cond = condition(body, "ScalingActive")
        return body if cond and cond["reason"] == reasons.VALID_METRICS else None

    await until(recovered, within=90, what="ScalingActive=True once Prometheus is back")
    assert set(seen) == {3}, seen  # held throughout: no scale to min, no flapping
    assert [r for r, _ in scale_events(k, name)] == [reasons.ABOVE_TARGET]
    warnings = [
        e["reason"]
        for e in k.json(
            "get", "events", "--field-selector",
            f"involvedObject.name={name},type=Warning",
        )["items"]
    ]  # fmt: skip
    assert warnings.count(reasons.PROMETHEUS_UNAVAILABLE) == 1


async def test_a_promql_syntax_error_is_query_failed_and_nothing_else_breaks(
    scene: Scene, push: Any
) -> None:
    k, namespace, api = scene.k, scene.namespace, scene.api
    k.apply(autoscaled("typo", metrics=[{"type": "promql", "query": "sum(up", "targetValue": 1}]))
    k.apply(autoscaled("fine", metrics=[{"type": "queueDepth", "target": 5}]))
    await push(namespace, "fine", 10)
    body = await until_active(api, namespace, "typo", "False", reasons.QUERY_FAILED)
    active = condition(body, "ScalingActive")
    assert active is not None
    assert "parse error" in active["message"]
    assert body["spec"]["replicas"] == 1
    k.run("wait", "--for=condition=Ready", "agent/typo", "--timeout=90s", timeout=100)
    # The other Agent, in the same namespace and the same operator, scales.
    await until_replicas(api, namespace, "fine", 2)
    await until_active(api, namespace, "fine", "True", reasons.VALID_METRICS)


async def test_a_tenant_budget_caps_the_autoscaler_and_scaling_limited_says_so(
    scene: Scene, push: Any
) -> None:
    kubectl, namespace, api = scene.kubectl, scene.namespace, scene.api
    tenant = f"budget-{uuid.uuid4().hex[:6]}"
    kubectl.apply(
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Tenant",
            "metadata": {"name": tenant},
            "spec": {"namespaces": [namespace], "limits": {"replicas": 4}},
        }
    )
    try:

        async def claimed() -> bool:
            ns = await api.get("Namespace", None, namespace)
            return bool(ns and (ns["metadata"].get("labels") or {}).get("bmad.dev/tenant"))

        await until(claimed, within=60, what="the namespace in the Tenant")
        k = kubectl.in_namespace(namespace)
        k.apply(agent("fixed", replicas=1))
        k.apply(autoscaled("greedy", metrics=[{"type": "queueDepth", "target": 5}]))
        await push(namespace, "greedy", 50)  # asks for 10

        async def limited() -> Obj | None:
            body = await live(api, namespace, "greedy")
            cond = condition(body, "ScalingLimited")
            return body if cond and cond["reason"] == reasons.TENANT_LIMIT else None

        body = await until(limited, within=90, what="ScalingLimited TenantLimit")
        cond = condition(body, "ScalingLimited")
        assert cond is not None
        assert cond["status"] == "True"
        assert f"Tenant {tenant} allows 4 replicas in total" in cond["message"]
        assert "which leaves 3" in cond["message"]
        await until_replicas(api, namespace, "greedy", 3)
        assert [r for r, _ in scale_events(k, "greedy")] == [reasons.TENANT_LIMIT]
        tenant_status = await api.get("Tenant", None, tenant)
        assert tenant_status is not None

        async def usage() -> bool:
            found = await api.get("Tenant", None, tenant)
            used = ((found or {}).get("status") or {}).get("usage") or {}
            return used.get("replicas") == 4

        await until(usage, within=60, what="the Tenant's usage at its budget of 4")
    finally:
        kubectl.run("delete", "tenant", tenant, "--ignore-not-found", "--wait=false", check=False)


async def test_an_hpa_on_the_same_agent_is_reported_and_not_fought(scene: Scene, push: Any) -> None:
    k, namespace, api = scene.k, scene.namespace, scene.api
    name = "shared"
    k.apply(autoscaled(name, metrics=[{"type": "queueDepth", "target": 5}]))
    await push(namespace, name, 10)
    await until_replicas(api, namespace, name, 2)
    hpa = {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": "users-hpa"},
        "spec": {
            "scaleTargetRef": {"apiVersion": "bmad.dev/v1alpha1", "kind": "Agent", "name": name},
            "minReplicas": 1,
            "maxReplicas": 5,
            "metrics": [
                {
                    "type": "Resource",
                    "resource": {
                        "name": "cpu",
                        "target": {"type": "Utilization", "averageUtilization": 50},
                    },
                }
            ],
        },
    }
    k.apply(hpa)
    body = await until_active(api, namespace, name, "False", reasons.CONFLICTING_SCALER)
    active = condition(body, "ScalingActive")
    assert active is not None
    assert "HorizontalPodAutoscaler users-hpa (scaling its Agent)" in active["message"]
    await push(namespace, name, 40)  # would ask for 8: the operator leaves it alone
    assert auto(body)["reason"] == reasons.CONFLICTING_SCALER
    k.run("delete", "hpa", "users-hpa")
    await until_active(api, namespace, name, "True", reasons.VALID_METRICS)
    await until_replicas(api, namespace, name, 8)
    # Nothing scaled the Agent while the HPA was there: the next step starts from 2,
    # then the default scale-up rate (4 pods per 15 s) takes it to 8.
    steps = [m.rsplit(": ", 1)[1] for _, m in scale_events(k, name)]
    assert steps[0] == "1 → 2", steps
    assert steps[1].startswith("2 → "), steps
    assert steps[-1].endswith(" → 8"), steps


async def test_engine_keda_says_keda_is_missing_then_applies_its_scaled_object(
    scene: Scene,
) -> None:
    k, kubectl, namespace, api = scene.k, scene.kubectl, scene.namespace, scene.api
    crd = third_party.KEDA_SCALED_OBJECT
    kubectl.run("delete", "crd", crd.name, "--ignore-not-found", "--wait=true", timeout=120)
    try:
        name = "kedaed"
        k.apply(agent(name, replicas=1, autoscaling={"enabled": True, "engine": "keda",
                                                      "maxReplicas": 4}))  # fmt: skip
        body = await until_active(api, namespace, name, "False", reasons.KEDA_NOT_INSTALLED)
        assert auto(body)["reason"] == reasons.MANAGED_BY_KEDA
        k.run("wait", "--for=condition=Ready", f"agent/{name}", "--timeout=90s", timeout=100)

        third_party.install(kubectl, crd)
        body = await until_active(api, namespace, name, "Unknown", reasons.WAITING_FOR_KEDA)
        scaled = await live(api, namespace, name, "ScaledObject")
        assert scaled["spec"]["scaleTargetRef"] == {
            "apiVersion": "bmad.dev/v1alpha1", "kind": "Agent", "name": name,
        }  # fmt: skip
        assert scaled["spec"]["maxReplicaCount"] == 4
        assert [o["kind"] for o in scaled["metadata"]["ownerReferences"]] == ["Agent"]
        server = scaled["spec"]["triggers"][0]["metadata"]["serverAddress"]
        assert server == scene.env["BMAD_PROMETHEUS_URL"]

        # Back to the operator's own autoscaler: the ScaledObject goes.
        k.run("patch", "agent", name, "--type=merge", "-p",
              '{"spec":{"autoscaling":{"engine":"operator"}}}')  # fmt: skip

        async def gone() -> bool:
            return await api.get("ScaledObject", namespace, name) is None

        await until(gone, within=60, what="the ScaledObject deleted")
    finally:
        third_party.install(kubectl, crd)
