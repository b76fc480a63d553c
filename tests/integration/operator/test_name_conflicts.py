"""Issue 10, hole 9: the operator never adopts an object it did not create.

Before the fix, a pre-existing Service named like an Agent was overwritten with the
Agent's selector and ports and given the Agent as its controller owner, so deleting
the Agent made the garbage collector delete someone else's Service.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess

from .helpers import agent, condition

pytestmark = pytest.mark.integration


def _legacy_service(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "labels": {"app": "legacy-db"}},
        "spec": {"selector": {"app": "legacy-db"}, "ports": [{"name": "pg", "port": 5432}]},
    }


def _essence(svc: dict[str, Any]) -> dict[str, Any]:
    """What the operator must not touch: labels, annotations, owners, selector, ports."""
    meta = svc["metadata"]
    return {
        "uid": meta["uid"],
        "labels": meta.get("labels"),
        "annotations": meta.get("annotations"),
        "ownerReferences": meta.get("ownerReferences"),
        "selector": svc["spec"].get("selector"),
        "ports": svc["spec"].get("ports"),
        "managers": sorted(m["manager"] for m in meta.get("managedFields") or []),
    }


def test_name_conflict_a_service_named_like_the_agent_is_never_adopted(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    """On the code before the fix the Agent became Ready over the user's Service:
        AssertionError: timed out after 30s waiting for Ready=False NameConflict on the Agent
    (the Service had been given the Agent's selector and the Agent as controller owner)."""
    k = kubectl.in_namespace(namespace)
    k.apply(_legacy_service("pm"))
    before = _essence(k.json("get", "service", "pm"))
    k.apply(agent("pm", role="pm"))

    def conflicted() -> dict[str, Any] | None:
        ready = condition(k.json("get", "agent", "pm"), "Ready")
        return ready if ready and ready["reason"] == "NameConflict" else None

    ready = eventually(conflicted, timeout=30, what="Ready=False NameConflict on the Agent")
    assert ready["status"] == "False"
    assert "Service/pm" in ready["message"]
    assert "delete or rename" in ready["message"]
    assert _essence(k.json("get", "service", "pm")) == before
    # Nothing was applied: no Deployment runs under a name someone else holds.
    assert not k.exists("deployment", "pm")
    events = k.json("get", "events", "--field-selector", "involvedObject.name=pm")["items"]
    assert any("NameConflict" in e.get("message", "") for e in events)

    # Deleting the Agent leaves the Service alone: it never had the Agent as owner, so the
    # garbage collector has nothing to delete.
    k.run("delete", "agent", "pm", "--wait=true", "--timeout=60s", timeout=70)
    assert _essence(k.json("get", "service", "pm")) == before

    # Removing the conflicting Service lets a new Agent of that name converge.
    k.apply(agent("pm", role="pm"))
    eventually(conflicted, timeout=30, what="NameConflict on the new Agent")
    k.run("delete", "service", "pm", "--wait=true")
    k.run("wait", "--for=condition=Ready", "agent/pm", "--timeout=90s", timeout=100)
    svc = k.json("get", "service", "pm")
    uid = k.json("get", "agent", "pm")["metadata"]["uid"]
    assert [(o["kind"], o["uid"]) for o in svc["metadata"]["ownerReferences"]] == [("Agent", uid)]


def test_name_conflict_a_secret_named_like_a_binding_is_never_adopted(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, testbed_env: dict[str, str]
) -> None:
    """The Integration's binding Secret `<name>-binding`, held by someone else's Secret.

    On the code before the fix the user's Secret was overwritten with the binding and
    owned by the Integration, which became Ready:
        AssertionError: timed out after 60s waiting for NameConflict"""
    k = kubectl.in_namespace(namespace)
    k.run("create", "secret", "generic", "cache-binding", "--from-literal=mine=keep-me")
    before = k.json("get", "secret", "cache-binding")
    password = testbed_env["BMAD_REDIS_PASSWORD"]
    k.run("create", "secret", "generic", "cache-creds", f"--from-literal=password={password}")
    k.apply(
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "metadata": {"name": "cache"},
            "spec": {
                "type": "redis",
                "secretRef": {"name": "cache-creds"},
                "redis": {"host": "127.0.0.1", "port": int(testbed_env["BMAD_REDIS_PORT"])},
                "checkIntervalSeconds": 10,
            },
        }
    )

    def reason() -> str | None:
        ready = condition(k.json("get", "integration", "cache"), "Ready")
        return ready["reason"] if ready else None

    eventually(lambda: reason() == "NameConflict", timeout=60, what="NameConflict")
    after = k.json("get", "secret", "cache-binding")
    assert after["data"] == before["data"]
    assert after["metadata"].get("ownerReferences") is None
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    k.run("delete", "secret", "cache-binding", "--wait=true")
    eventually(lambda: reason() == "Checked", timeout=60, what="the binding published")
    binding = k.json("get", "secret", "cache-binding")
    assert json.dumps(binding["metadata"]["ownerReferences"]).count('"Integration"') == 1


# Someone else's object of each owned kind, each named like the object of its own Agent:
# (kind as kubectl names it, kind in the message, name, the kubectl create arguments).
_FOREIGN = [
    ("serviceaccount", "ServiceAccount", "c1", ["serviceaccount", "c1"]),
    ("configmap", "ConfigMap", "c2-config", ["configmap", "c2-config", "--from-literal=x=1"]),
    ("service", "Service", "c3", ["service", "clusterip", "c3", "--tcp=5432:5432"]),
    (
        "poddisruptionbudget",
        "PodDisruptionBudget",
        "c4",
        ["poddisruptionbudget", "c4", "--selector=app=legacy", "--min-available=1"],
    ),
    ("deployment", "Deployment", "c5", ["deployment", "c5", "--image=legacy:1"]),
]


def _untouched(obj: dict[str, Any]) -> dict[str, Any]:
    """What the operator must not change (controllers update the status of some kinds)."""
    meta = obj["metadata"]
    return {
        "uid": meta["uid"],
        "labels": meta.get("labels"),
        # the Deployment controller's own revision annotation comes and goes
        "annotations": {
            k: v
            for k, v in (meta.get("annotations") or {}).items()
            if not k.startswith("deployment.kubernetes.io/")
        },
        "ownerReferences": meta.get("ownerReferences"),
        "content": obj.get("spec", obj.get("data")),
        "ours": any(m["manager"] == "bmad-operator" for m in meta.get("managedFields") or []),
    }


def test_name_conflict_of_every_owned_kind_is_found_and_left_untouched(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    """The operator creates an Agent's objects with an apply that only creates (issue 15:
    no GET before); a name taken is refused by the API server, and only then read. Each
    kind's foreign object stays as it was, and no Deployment of the Agent is made (it
    comes last) unless the Deployment's own name is the one taken."""
    k = kubectl.in_namespace(namespace)
    before = {}
    for resource, _, name, create in _FOREIGN:
        k.run("create", *create)
        before[name] = _untouched(k.json("get", resource, name))
    agents = [f"c{i}" for i in range(1, 6)]
    for name in agents:
        k.apply(agent(name))

    def conflicts() -> dict[str, str] | None:
        found = {}
        for name in agents:
            ready = condition(k.json("get", "agent", name), "Ready")
            if not ready or ready["reason"] != "NameConflict":
                return None
            found[name] = ready["message"]
        return found

    messages = eventually(conflicts, timeout=90, what="NameConflict on all five Agents")
    for (resource, kind, name, _), agent_name in zip(_FOREIGN, agents, strict=True):
        assert f"{kind}/{name}" in messages[agent_name]
        assert _untouched(k.json("get", resource, name)) == before[name]
    for agent_name in agents[:4]:
        assert not k.exists("deployment", agent_name)
