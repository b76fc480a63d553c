"""An Agent becomes a running workload that kubectl explains, scales and repairs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess

from .helpers import agent, condition

pytestmark = pytest.mark.integration

OWNED = ("serviceaccount", "configmap", "deployment", "service", "poddisruptionbudget")


def _owned_names(k: Kubectl, name: str) -> dict[str, list[str]]:
    found = {}
    for kind in OWNED:
        items = k.json("get", kind, "-l", f"bmad.dev/agent={name}")["items"]
        found[kind] = sorted(i["metadata"]["name"] for i in items)
    return found


def test_kubectl_get_describe_explain_wait_and_scale(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    k = kubectl.in_namespace(namespace)
    k.apply(agent("analyst", role="analyst", replicas=1))
    k.run("wait", "--for=condition=Ready", "agent/analyst", "--timeout=90s", timeout=100)

    # Pods run on kwok nodes.
    pods = k.json("get", "pods", "-l", "bmad.dev/agent=analyst")["items"]
    assert [p["status"]["phase"] for p in pods] == ["Running"]
    node = kubectl.json("get", "node", pods[0]["spec"]["nodeName"])
    assert node["metadata"]["annotations"].get("kwok.x-k8s.io/node") == "fake"

    # get: role, model, ready/desired, Ready, age.
    table = k.out("get", "agents").splitlines()
    header = table[0].split()
    assert header[:6] == ["NAME", "ROLE", "MODEL", "READY-REPLICAS", "DESIRED", "READY"]
    assert header[-1] == "AGE"
    assert table[1].split()[:6] == ["analyst", "analyst", "echo-1", "1", "1", "True"]
    assert k.out("get", "bmad").count("analyst") >= 1  # the category

    # describe: conditions with reasons, and our events.
    described = k.out("describe", "agent", "analyst")
    for text in (
        "Type:",
        "Ready",
        "Reason:",
        "AgentReady",
        "MinimumReplicasAvailable",
        "NoIntegrations",
        "RolledOut",
    ):
        assert text in described, text
    events = described.split("Events:", 1)[1]
    assert "bmad-operator" in events
    assert "Created" in events
    assert "Ready" in events

    # explain teaches the API.
    explained = kubectl.out("explain", "agent.spec")
    for field in ("role", "model", "replicas", "autoscaling", "integrations", "paused"):
        assert f"{field}\t" in explained or f"  {field}" in explained, field
    assert "DESCRIPTION" in kubectl.out("explain", "agent.spec.model.provider")

    # scale through the scale subresource.
    k.run("scale", "agent", "analyst", "--replicas=3")
    eventually(
        lambda: k.json("get", "deployment", "analyst")["spec"]["replicas"] == 3,
        timeout=30,
        what="the Deployment to have 3 replicas",
    )
    eventually(
        lambda: (k.json("get", "agent", "analyst").get("status") or {}).get("replicas") == 3,
        timeout=60,
        what="status.replicas to follow",
    )
    k.run("wait", "--for=condition=Ready", "agent/analyst", "--timeout=60s", timeout=70)
    status = k.json("get", "agent", "analyst")["status"]
    assert status["readyReplicas"] == 3
    assert status["selector"] == "bmad.dev/agent=analyst"
    assert (
        status["observedGeneration"] == k.json("get", "agent", "analyst")["metadata"]["generation"]
    )
    scale = json.loads(
        k.out(
            "get", "--raw", f"/apis/bmad.dev/v1alpha1/namespaces/{namespace}/agents/analyst/scale"
        )
    )
    assert scale["status"]["replicas"] == 3
    assert scale["status"]["selector"] == "bmad.dev/agent=analyst"


def test_drift_is_undone_and_deletion_removes_everything(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    k = kubectl.in_namespace(namespace)
    k.apply(agent("dev", role="dev", replicas=2))
    k.run("wait", "--for=condition=Ready", "agent/dev", "--timeout=90s", timeout=100)
    original = k.json("get", "deployment", "dev")
    image = original["spec"]["template"]["spec"]["containers"][0]["image"]
    resync = operator.resync_seconds * 1.1 + 5  # one resync, with its jitter, plus slack

    # Deleted Deployment comes back.
    k.run("delete", "deployment", "dev", "--wait=true")
    back = eventually(
        lambda: k.run("get", "deployment", "dev", "-o", "json", check=False).stdout,
        timeout=resync,
        what="the Deployment to be recreated",
    )
    assert json.loads(back)["metadata"]["uid"] != original["metadata"]["uid"]

    # Edited image and replicas are restored.
    k.run("set", "image", "deployment/dev", "agent=evil.example/agent:1")
    k.run("scale", "deployment", "dev", "--replicas=7")

    def restored() -> bool:
        d = k.json("get", "deployment", "dev")
        return (
            d["spec"]["template"]["spec"]["containers"][0]["image"] == image
            and d["spec"]["replicas"] == 2
        )

    eventually(restored, timeout=resync, what="image and replicas restored")
    k.run("wait", "--for=condition=Ready", "agent/dev", "--timeout=60s", timeout=70)
    described = k.out("describe", "agent", "dev")
    assert "DriftCorrected" in described

    # Deleting the Agent removes every owned object (owner references + the GC).
    assert all(_owned_names(k, "dev").values())
    k.run("delete", "agent", "dev")
    eventually(
        lambda: not any(_owned_names(k, "dev").values()),
        timeout=60,
        what="every owned object to be garbage-collected",
    )


def test_paused_scales_to_zero_and_says_so(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    k = kubectl.in_namespace(namespace)
    k.apply(agent("qa", role="qa", replicas=2))
    k.run("wait", "--for=condition=Ready", "agent/qa", "--timeout=90s", timeout=100)
    k.run("patch", "agent", "qa", "--type=merge", "-p", '{"spec":{"paused":true}}')

    def paused() -> dict[str, Any] | None:
        a = k.json("get", "agent", "qa")
        ready = condition(a, "Ready")
        dep = k.json("get", "deployment", "qa")
        if ready and ready["reason"] == "Paused" and dep["spec"]["replicas"] == 0:
            return a
        return None

    a = eventually(paused, timeout=30, what="the agent to be paused")
    assert condition(a, "Ready")["status"] == "False"
    assert "paused" in condition(a, "Ready")["message"]
    eventually(
        lambda: not k.json("get", "pods", "-l", "bmad.dev/agent=qa")["items"],
        timeout=60,
        what="the pods to go",
    )
    k.run("patch", "agent", "qa", "--type=merge", "-p", '{"spec":{"paused":false}}')
    k.run("wait", "--for=condition=Ready", "agent/qa", "--timeout=60s", timeout=70)


def test_missing_integration_is_a_condition_and_recovers(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, testbed_env: dict[str, str]
) -> None:
    k = kubectl.in_namespace(namespace)
    k.apply(agent("architect", role="architect", integrations=["team-db"]))

    def not_found() -> dict[str, Any] | None:
        cond = condition(k.json("get", "agent", "architect"), "IntegrationsReady")
        return cond if cond and cond["reason"] == "IntegrationNotFound" else None

    cond = eventually(not_found, timeout=30, what="IntegrationNotFound")
    assert cond["status"] == "False"
    assert "team-db" in cond["message"]
    assert namespace in cond["message"]
    ready = condition(k.json("get", "agent", "architect"), "Ready")
    assert ready is not None
    assert ready["status"] == "False"
    assert ready["reason"] == "IntegrationNotFound"

    k.run(
        "create",
        "secret",
        "generic",
        "team-db-credentials",
        f"--from-literal=password={testbed_env['BMAD_REDIS_PASSWORD']}",
    )
    k.apply(
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "metadata": {"name": "team-db"},
            "spec": {
                "type": "redis",
                "secretRef": {"name": "team-db-credentials"},
                "redis": {"host": "127.0.0.1", "port": int(testbed_env["BMAD_REDIS_PORT"])},
            },
        }
    )
    k.run("wait", "--for=condition=Ready", "agent/architect", "--timeout=60s", timeout=70)
    cond = condition(k.json("get", "agent", "architect"), "IntegrationsReady")
    assert cond is not None
    assert cond["status"] == "True"
    log = operator.log_text()
    assert "Traceback" not in log


def test_no_traceback_in_the_operator_log(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    # Its own work, so that this holds run alone too: an Agent that becomes Ready and
    # one whose Integration is missing (a user error: a condition, never a traceback).
    k = kubectl.in_namespace(namespace)
    k.apply(agent("fine", role="po"))
    k.apply(agent("unbound", role="sm", integrations=["nowhere"]))
    k.run("wait", "--for=condition=Ready", "agent/fine", "--timeout=90s", timeout=100)

    def reported() -> bool:
        ready = condition(k.json("get", "agent", "unbound"), "Ready")
        return bool(ready and ready["reason"] == "IntegrationNotFound")

    eventually(reported, timeout=30, what="IntegrationNotFound on the unbound agent")
    assert "Traceback" not in operator.log_text()


def test_operator_exposes_its_metrics_and_liveness(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    assert operator.healthy()
    # Labelled metrics appear with their first sample: reconcile something first, so
    # this holds when run alone, not only after the other tests.
    k = kubectl.in_namespace(namespace)
    k.apply(agent("counted", role="qa"))
    k.run("wait", "--for=condition=Ready", "agent/counted", "--timeout=90s", timeout=100)
    names = {key.split("{", 1)[0] for key in operator.metrics()}
    for metric in (
        "bmad_operator_reconciles_total",
        "bmad_operator_reconcile_duration_seconds_bucket",
        "bmad_operator_queue_depth",
        "bmad_operator_api_writes_total",
    ):
        assert metric in names, metric
