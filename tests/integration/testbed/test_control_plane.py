"""The control plane is real: scheduling, kwok nodes, controllers, CRDs."""

from __future__ import annotations

import json
import secrets
from typing import Any

import pytest

from bmad_testbed.kubectl import Kubectl, eventually

pytestmark = pytest.mark.integration


def test_kubectl_get_nodes_lists_the_fake_nodes(
    kubectl: Kubectl, testbed_env: dict[str, str]
) -> None:
    out = kubectl.out("get", "nodes")
    nodes = kubectl.json("get", "nodes")["items"]
    expected = int(testbed_env.get("BMAD_KWOK_NODES", "1"))
    assert len(nodes) >= expected
    if "BMAD_KWOK_NODES" in testbed_env:
        kwok = [
            n
            for n in nodes
            if n["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node") == "fake"
        ]
        assert len(kwok) == expected
        for node in kwok:
            assert node["metadata"]["name"] in out
    for line in out.splitlines()[1:]:
        assert " Ready " in f" {line} ", line


def test_deployment_becomes_available_on_kwok_nodes(kubectl: Kubectl, namespace: str) -> None:
    k = kubectl.in_namespace(namespace)
    deployment: dict[str, Any] = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "web"},
        "spec": {
            "replicas": 2,
            "selector": {"matchLabels": {"app": "web"}},
            "template": {
                "metadata": {"labels": {"app": "web"}},
                "spec": {"containers": [{"name": "web", "image": "bmad/agent-runtime:test"}]},
            },
        },
    }
    k.apply(deployment)
    k.run("wait", "--for=condition=Available", "deployment/web", "--timeout=90s", timeout=100)
    pods = k.json("get", "pods", "-l", "app=web")["items"]
    assert len(pods) == 2
    nodes = {n["metadata"]["name"]: n for n in kubectl.json("get", "nodes")["items"]}
    for pod in pods:
        assert pod["status"]["phase"] == "Running"
        node = nodes[pod["spec"]["nodeName"]]
        if node["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node"):
            assert node["metadata"]["annotations"]["kwok.x-k8s.io/node"] == "fake"


def test_namespace_is_created_deleted_and_disappears(kubectl: Kubectl) -> None:
    name = f"t-ns-lifecycle-{secrets.token_hex(3)}"
    kubectl.run("create", "namespace", name)
    kubectl.in_namespace(name).run("create", "configmap", "payload", "--from-literal=a=b")
    assert kubectl.exists("namespace", name)
    kubectl.run("delete", "namespace", name, "--wait=false")
    # Only the controller-manager's namespace controller empties and removes it.
    eventually(
        lambda: not kubectl.exists("namespace", name),
        timeout=90,
        what=f"namespace {name} to disappear",
    )


def test_crd_applied_and_object_round_trips(kubectl: Kubectl, namespace: str) -> None:
    group = f"t{secrets.token_hex(3)}.bmad.test"
    crd = {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"widgets.{group}"},
        "spec": {
            "group": group,
            "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "spec": {
                                    "type": "object",
                                    "properties": {"size": {"type": "integer", "minimum": 1}},
                                }
                            },
                        }
                    },
                }
            ],
        },
    }
    try:
        kubectl.apply(crd)
        kubectl.run("wait", "--for=condition=Established", f"crd/widgets.{group}", "--timeout=60s")
        k = kubectl.in_namespace(namespace)
        obj = {
            "apiVersion": f"{group}/v1",
            "kind": "Widget",
            "metadata": {"name": "w1"},
            "spec": {"size": 3},
        }
        eventually(
            lambda: k.run("apply", "-f", "-", stdin=json.dumps(obj), check=False).returncode == 0,
            timeout=30,
            what="the Widget to be accepted",
        )
        got = k.json("get", f"widgets.{group}", "w1")
        assert got["spec"] == {"size": 3}
        bad = dict(obj, metadata={"name": "w2"}, spec={"size": 0})
        proc = k.run("apply", "-f", "-", stdin=json.dumps(bad), check=False)
        assert proc.returncode != 0
        assert "spec.size" in proc.stderr
    finally:
        kubectl.run("delete", "crd", f"widgets.{group}", "--ignore-not-found", check=False)
