"""The leading operator pod force-deleted in the middle of a rollout of 20 agents.

The operator runs in the cluster (the demo installed it from manifests/default: two
replicas with leader election). While 20 new Agents are being rolled out, the pod that
holds the Lease is deleted with `--force --grace-period=0`: the standby takes the
Lease, the Deployment makes a new pod, and the 20 Agents converge with exactly one of
each object an Agent owns.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bmad_testbed import kubectl as kubectl_mod
from bmad_testbed.kubectl import eventually

from .helpers import NODE_NAME, SYSTEM_NS, agent, condition, diagnose

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]

COUNT = 20
OWNED = ("deployment", "service", "configmap", "serviceaccount", "poddisruptionbudget")
OPERATOR = "app.kubernetes.io/name=bmad-operator"


def _operator_pods(kubectl: kubectl_mod.Kubectl) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = kubectl.json("get", "pods", "-n", SYSTEM_NS, "-l", OPERATOR)[
        "items"
    ]
    return pods


def _leader(kubectl: kubectl_mod.Kubectl) -> str:
    """The Lease holder's identity: its pod name, "_", a uuid of its process."""
    lease = kubectl.json("get", "lease", "bmad-operator", "-n", SYSTEM_NS)
    return str(lease["spec"].get("holderIdentity") or "")


def _ready_agents(kubectl: kubectl_mod.Kubectl, ns: str) -> int:
    items = kubectl.json("get", "agents", "-n", ns)["items"]
    return sum(1 for a in items if (c := condition(a, "Ready")) and c["status"] == "True")


@pytest.mark.timeout(1200)
def test_force_deleted_operator_is_replaced_and_twenty_agents_converge(
    real_kubectl: kubectl_mod.Kubectl, real_namespace: str
) -> None:
    kubectl, ns = real_kubectl, real_namespace
    pods = _operator_pods(kubectl)
    leader = _leader(kubectl)
    [leading] = [p for p in pods if leader.startswith(p["metadata"]["name"] + "_")]
    old_uid = leading["metadata"]["uid"]

    names = [f"agent-{i:02d}" for i in range(COUNT)]
    kubectl.apply("\n---\n".join(json.dumps(agent(n, ns)) for n in names))
    # The rollout is under way: the operator has started making Deployments.
    eventually(
        lambda: kubectl.json("get", "deployments", "-n", ns)["items"],
        timeout=120,
        what="the first Deployment of the rollout",
    )
    ready_at_kill = _ready_agents(kubectl, ns)
    kubectl.run(
        "delete", "pod", "-n", SYSTEM_NS, leading["metadata"]["name"], "--force", "--grace-period=0"
    )
    assert ready_at_kill < COUNT  # it really was mid-rollout

    # Another replica takes the Lease (the standby, or the pod that replaces the leader).
    eventually(
        lambda: _leader(kubectl) != leader, timeout=180, interval=2, what="a new Lease holder"
    )

    def replaced() -> bool:
        fresh = [p for p in _operator_pods(kubectl) if p["metadata"]["uid"] != old_uid]
        return any(
            p["spec"]["nodeName"] == NODE_NAME
            and (c := condition(p, "Ready"))
            and c["status"] == "True"
            for p in fresh
        )

    eventually(replaced, timeout=180, interval=2, what="a new Ready operator pod")
    # 20 runtimes starting on 2 shared cores: minutes, not seconds, under CI's load.
    done = kubectl.run(
        "wait",
        "--for=condition=Ready",
        "agents",
        "--all",
        "-n",
        ns,
        "--timeout=780s",
        timeout=810,
        check=False,
    )
    assert done.returncode == 0, f"{done.stderr}\n{diagnose(kubectl, ns)}"
    assert _ready_agents(kubectl, ns) == COUNT

    for kind in OWNED:
        items = kubectl.json("get", kind, "-n", ns)["items"]
        owned: dict[str, int] = {}
        for obj in items:
            for ref in obj["metadata"].get("ownerReferences", []):
                if ref["kind"] == "Agent":
                    owned[ref["name"]] = owned.get(ref["name"], 0) + 1
        assert owned == dict.fromkeys(names, 1), (kind, owned)
    pods = kubectl.json("get", "pods", "-n", ns, "-l", "app.kubernetes.io/name=bmad-agent")["items"]
    running = [
        p for p in pods if p["status"]["phase"] == "Running" and p["spec"]["nodeName"] == NODE_NAME
    ]
    assert sorted(p["metadata"]["labels"]["app.kubernetes.io/instance"] for p in running) == names
