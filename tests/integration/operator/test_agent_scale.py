"""Many Agents: crash safety under SIGKILL, and resyncs that write nothing."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

import pytest

from bmad_testbed import audit
from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess

from .helpers import agent, condition

pytestmark = pytest.mark.integration

ROLES = ("analyst", "pm", "architect", "ux-expert", "po", "sm", "dev", "qa")


def _apply_many(k: Kubectl, count: int, prefix: str) -> list[str]:
    names = [f"{prefix}-{i:03d}" for i in range(count)]
    items = [agent(n, role=ROLES[i % len(ROLES)]) for i, n in enumerate(names)]
    k.apply({"apiVersion": "v1", "kind": "List", "items": items})
    return names


def _ready_count(k: Kubectl) -> int:
    n = 0
    for item in k.json("get", "agents")["items"]:
        for cond in (item.get("status") or {}).get("conditions") or []:
            if cond["type"] == "Ready" and cond["status"] == "True":
                n += 1
    return n


def _writes(operator: OperatorProcess) -> float:
    return operator.metric_sum("bmad_operator_api_writes_total")


def test_sigkill_while_reconciling_50_agents(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    k = kubectl.in_namespace(namespace)
    before = _writes(operator)
    names = _apply_many(k, 50, "crash")
    # Kill once the operator is visibly in the middle of the work.
    eventually(
        lambda: _writes(operator) - before >= 20,
        timeout=60,
        interval=0.02,
        what="the operator to start writing",
    )
    operator.kill()
    ready_at_kill = _ready_count(k)
    assert ready_at_kill < 50, "the operator finished before it was killed: not a crash test"
    operator.start()

    k.run("wait", "--for=condition=Ready", "agents", "--all", "--timeout=240s", timeout=250)
    assert _ready_count(k) == 50

    agents = {a["metadata"]["name"]: a["metadata"]["uid"] for a in k.json("get", "agents")["items"]}
    assert sorted(agents) == names
    for kind in ("serviceaccount", "configmap", "deployment", "service", "poddisruptionbudget"):
        items = k.json("get", kind, "-l", "app.kubernetes.io/managed-by=bmad-operator")["items"]
        owners = Counter(i["metadata"]["labels"]["bmad.dev/agent"] for i in items)
        # exactly one of each kind per Agent: no duplicates, none missing
        assert owners == Counter(names), kind
        for item in items:
            refs = item["metadata"]["ownerReferences"]
            assert len(refs) == 1, item["metadata"]["name"]
            assert refs[0]["uid"] == agents[item["metadata"]["labels"]["bmad.dev/agent"]]
    replicasets = k.json("get", "replicasets")["items"]
    assert len(replicasets) == 50  # one rollout each: no template churn after the restart
    pods = k.json("get", "pods")["items"]
    assert len(pods) == 50
    assert all(p["status"]["phase"] == "Running" for p in pods)
    assert "Traceback" not in operator.log_text()


def _settled(k: Kubectl, count: int) -> bool:
    """Every Agent's last pass is over: its status shows its Deployment's final state,
    and the Ready event (the last write of the pass that made it Ready) is posted."""
    agents = k.json("get", "agents")["items"]
    deployments = {d["metadata"]["name"]: d for d in k.json("get", "deployments")["items"]}
    if len(agents) != count:
        return False
    for item in agents:
        status = item.get("status") or {}
        ready = condition(item, "Ready")
        dep = deployments.get(item["metadata"]["name"]) or {"metadata": {}}
        dep_status = dep.get("status") or {}
        if not (
            ready
            and ready["status"] == "True"
            and status.get("observedGeneration") == item["metadata"]["generation"]
            and status.get("replicas") == dep_status.get("replicas") == 1
            and status.get("readyReplicas") == dep_status.get("readyReplicas") == 1
            and dep_status.get("availableReplicas") == dep_status.get("updatedReplicas") == 1
            and dep_status.get("observedGeneration") == dep["metadata"].get("generation")
        ):
            return False
    events = k.json("get", "events", "--field-selector", "reason=Ready")["items"]
    announced = {
        e["involvedObject"]["name"]
        for e in events
        if e["involvedObject"].get("kind") == "Agent"
        and (e.get("source") or {}).get("component") == "bmad-operator"
    }
    return len(announced) == count


def test_resync_of_100_unchanged_agents_writes_nothing(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, testbed_env: dict[str, str]
) -> None:
    k = kubectl.in_namespace(namespace)
    _apply_many(k, 100, "idle")
    k.run("wait", "--for=condition=Ready", "agents", "--all", "--timeout=300s", timeout=310)
    # No "quiet for two seconds": the state itself shows every pass is over.
    eventually(lambda: _settled(k, 100), timeout=120, what="every agent's last pass done")
    audit_log = testbed_env.get("BMAD_AUDIT_LOG")
    user = testbed_env.get("BMAD_OPERATOR_USER", "")
    offset = audit.size(audit_log) if audit_log else 0
    writes_before = _writes(operator)
    reconciles = 'bmad_operator_reconciles_total{kind="Agent",result="ok"}'
    reconciled_before = operator.metrics()[reconciles]

    # At least one full resync of every Agent (resync period plus its jitter). A pass
    # is counted when it has finished, its API calls included.
    eventually(
        lambda: operator.metrics()[reconciles] - reconciled_before >= 100,
        timeout=operator.resync_seconds * 3 + 10,
        what="a resync of all 100 agents",
    )
    assert _writes(operator) == writes_before
    if audit_log:
        # The apiserver writes its audit log before it answers (blocking mode).
        writes: list[dict[str, Any]] = audit.writes(
            audit_log, user=user, since=offset, namespace=namespace
        )
        shown = [json.dumps({k: w.get(k) for k in ("verb", "objectRef")}) for w in writes[:5]]
        assert writes == [], "\n".join(shown)
        # The audit log does see this user's reads: the measurement is live.
        assert audit.entries(audit_log)
