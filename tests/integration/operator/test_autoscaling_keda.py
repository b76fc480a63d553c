"""The rendered KEDA ScaledObjects are accepted by KEDA's real CRD schema, unpruned.

The ScaledObject CRD comes from KEDA's own Go module (v2.16.1, never committed here),
installed on the test bed's apiserver. kubectl's strict field validation refuses
unknown fields, and reading the object back shows that nothing was pruned or changed.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.autoscaling import keda
from bmad_testbed import crds as third_party
from bmad_testbed.kubectl import Kubectl

pytestmark = pytest.mark.integration

PROMETHEUS = "http://prometheus.monitoring.svc:9090"

SPECS: dict[str, dict[str, Any]] = {
    "defaults": {"enabled": True, "engine": "keda", "maxReplicas": 5},
    "every-field": {
        "enabled": True,
        "engine": "keda",
        "minReplicas": 0,
        "maxReplicas": 20,
        "idleSeconds": 120,
        "activationThreshold": 2,
        "pollingIntervalSeconds": 10,
        "metrics": [
            {"type": "queueDepth", "target": 5},
            {"type": "inflight", "target": 2},
            {"type": "tokensPerMinute", "target": 20000},
            {"type": "promql", "query": "sum(rate(http_requests_total[1m]))", "targetValue": 50},
            {"type": "promql", "query": "sum(backlog)", "targetAverageValue": 2.5},
        ],
        "behavior": {
            "scaleUp": {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}]},
            "scaleDown": {"stabilizationWindowSeconds": 600, "selectPolicy": "Min"},
        },
    },
    "older-scale-to-zero": {
        "enabled": True,
        "engine": "keda",
        "minReplicas": 2,
        "maxReplicas": 6,
        "scaleToZero": True,
    },
}


@pytest.fixture(scope="module")
def keda_crd(kubectl: Kubectl) -> str:
    return third_party.install(kubectl, third_party.KEDA_SCALED_OBJECT)


def _contains(stored: Any, rendered: Any, path: str = "") -> list[str]:
    """Paths where the stored object lacks or changed a rendered value."""
    if isinstance(rendered, dict):
        if not isinstance(stored, dict):
            return [path]
        return [p for k, v in rendered.items() for p in _contains(stored.get(k), v, f"{path}.{k}")]
    if isinstance(rendered, list):
        if not isinstance(stored, list) or len(stored) != len(rendered):
            return [path]
        return [p for i, (s, r) in enumerate(zip(stored, rendered, strict=True))
                for p in _contains(s, r, f"{path}[{i}]")]  # fmt: skip
    return [] if stored == rendered else [path]


@pytest.mark.parametrize("case", sorted(SPECS))
@pytest.mark.usefixtures("crds", "keda_crd")
def test_the_scaled_object_is_accepted_as_rendered(
    case: str, kubectl: Kubectl, namespace: str, prometheus: dict[str, str]
) -> None:
    # The session's operator, when an earlier test started it, reconciles this Agent too
    # and applies its own ScaledObject: render with the server it is given, so that
    # both write the same object (with another address, whichever applies last wins).
    k = kubectl.in_namespace(namespace)
    name = f"keda-{case}"
    spec = {
        "role": "qa",
        "model": {"provider": "echo", "name": "echo-1"},
        "autoscaling": SPECS[case],
    }
    k.apply({"apiVersion": "bmad.dev/v1alpha1", "kind": "Agent",
             "metadata": {"name": name}, "spec": spec})  # fmt: skip
    agent = k.json("get", "agents.bmad.dev", name)
    rendered = keda.scaled_object(
        agent, agent_api.AgentSpec.model_validate(spec), server_address=prometheus["prometheus"]
    ).scaled_object

    proc = k.run(
        "apply", "--server-side", "--field-manager=bmad-operator", "-f", "-",
        stdin=json.dumps(rendered), check=False,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    stored = k.json("get", "scaledobjects.keda.sh", name)
    assert _contains(stored["spec"], rendered["spec"]) == []
    assert stored["metadata"]["ownerReferences"] == rendered["metadata"]["ownerReferences"]


def test_a_field_keda_does_not_know_is_refused(
    kubectl: Kubectl, crds: list[str], keda_crd: str, namespace: str
) -> None:
    # The check above can fail: a misspelt field does not slip through.
    body = {"metadata": {"name": "typo", "namespace": namespace, "uid": "u-1"}}
    spec = agent_api.AgentSpec.model_validate(
        {"role": "qa", "model": {"provider": "echo", "name": "echo-1"},
         "autoscaling": SPECS["defaults"]}
    )  # fmt: skip
    rendered = keda.scaled_object(body, spec, server_address=PROMETHEUS).scaled_object
    rendered["metadata"].pop("ownerReferences")
    rendered["spec"]["maxReplicas"] = 5  # KEDA calls it maxReplicaCount
    proc = kubectl.in_namespace(namespace).run(
        "apply", "--server-side", "-f", "-", stdin=json.dumps(rendered), check=False
    )
    assert proc.returncode != 0
    assert "maxReplicas" in proc.stderr
