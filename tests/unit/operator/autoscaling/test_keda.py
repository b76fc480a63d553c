"""Golden files pin the KEDA ScaledObject rendered for ``engine: keda``.

To rewrite them after an intended change:

    BMAD_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/operator/autoscaling/test_keda.py

and review the diff like code: it is what KEDA will run in users' clusters.
"""

from __future__ import annotations

import os
import pathlib
from typing import Any

import pytest
import yaml

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.autoscaling import keda, queries

pytestmark = pytest.mark.unit

GOLDEN = pathlib.Path(__file__).parent / "golden"
UPDATE = os.environ.get("BMAD_UPDATE_GOLDEN") == "1"
PROMETHEUS = "http://prometheus.monitoring.svc:9090"
UID = "0b0e6a4e-7777-4a3b-8c1d-000000000007"

CASES: dict[str, dict[str, Any]] = {
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
            {"type": "tokensPerMinute", "target": 20000},
            {"type": "promql", "query": "sum(rate(http_requests_total[1m]))", "targetValue": 50},
            {"type": "promql", "query": "sum(backlog)", "targetAverageValue": 2.5},
        ],
        "behavior": {
            "scaleUp": {"policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}]},
            "scaleDown": {"stabilizationWindowSeconds": 600, "selectPolicy": "Min"},
        },
    },
    "zero-on-inflight-only": {
        "enabled": True,
        "engine": "keda",
        "minReplicas": 0,
        "maxReplicas": 3,
        "metrics": [{"type": "inflight", "target": 2}],
    },
    "older-scale-to-zero": {
        "enabled": True,
        "engine": "keda",
        "minReplicas": 2,
        "maxReplicas": 6,
        "scaleToZero": True,
        "scaleDownStabilizationWindowSeconds": 60,
    },
}


def render(name: str) -> keda.Rendered:
    body = {"metadata": {"name": "quinn", "namespace": "team-a", "uid": UID}}
    spec = agent_api.AgentSpec.model_validate(
        {"role": "qa", "model": {"provider": "echo", "name": "echo-1"}, "autoscaling": CASES[name]}
    )
    return keda.scaled_object(body, spec, server_address=PROMETHEUS)


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden(name: str) -> None:
    rendered = render(name)
    path = GOLDEN / f"scaledobject-{name}.yaml"
    text = yaml.safe_dump(rendered.scaled_object, sort_keys=False)
    if UPDATE:
        path.write_text(text)
    assert text == path.read_text(), f"{path.name} differs: rerun with BMAD_UPDATE_GOLDEN=1"


def test_it_scales_the_agent_through_its_scale_subresource() -> None:
    so = render("defaults").scaled_object
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    assert so["kind"] == "ScaledObject"
    assert so["spec"]["scaleTargetRef"] == {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "name": "quinn",
    }
    assert so["metadata"]["ownerReferences"][0]["uid"] == UID
    assert (so["spec"]["minReplicaCount"], so["spec"]["maxReplicaCount"]) == (1, 5)
    assert "cooldownPeriod" not in so["spec"]
    [trigger] = so["spec"]["triggers"]
    assert trigger == {
        "type": "prometheus",
        "name": "queue-depth",
        "metricType": "AverageValue",
        "metadata": {
            "serverAddress": PROMETHEUS,
            "query": queries.queue_depth(queries.Selector("team-a", "quinn")),
            "threshold": "5",
        },
    }


def test_the_behavior_is_written_out_with_defaults() -> None:
    behavior = render("every-field").scaled_object["spec"]["advanced"][
        "horizontalPodAutoscalerConfig"
    ]["behavior"]
    assert behavior["scaleUp"] == {
        "stabilizationWindowSeconds": 0,
        "selectPolicy": "Max",
        "policies": [{"type": "Pods", "value": 2, "periodSeconds": 30}],
    }
    assert behavior["scaleDown"] == {
        "stabilizationWindowSeconds": 600,
        "selectPolicy": "Min",
        "policies": [{"type": "Percent", "value": 100, "periodSeconds": 15}],
    }


def test_scale_to_zero_maps_to_min_zero_cooldown_and_activation() -> None:
    rendered = render("every-field")
    spec = rendered.scaled_object["spec"]
    assert (spec["minReplicaCount"], spec["cooldownPeriod"]) == (0, 120)
    triggers = {t["name"]: t for t in spec["triggers"]}
    assert triggers["queue-depth"]["metadata"]["activationThreshold"] == "2"
    # In-flight work keeps it from going to zero even though no metric scales on it.
    assert triggers["activation-inflight"]["metadata"]["threshold"] == "1000000000"
    assert triggers["promql-2"]["metricType"] == "Value"
    assert triggers["promql-3"]["metadata"]["threshold"] == "2.5"
    assert any("any trigger above 0" in caveat for caveat in rendered.caveats)


def test_waking_needs_the_queue_even_when_no_metric_scales_on_it() -> None:
    triggers = {
        t["name"]: t for t in render("zero-on-inflight-only").scaled_object["spec"]["triggers"]
    }
    assert set(triggers) == {"inflight", "activation-queue-depth"}
    assert triggers["activation-queue-depth"]["metadata"]["activationThreshold"] == "0"


def test_older_scale_to_zero_keeps_min_while_working() -> None:
    spec = render("older-scale-to-zero").scaled_object["spec"]
    assert (spec["minReplicaCount"], spec["idleReplicaCount"], spec["cooldownPeriod"]) == (
        2,
        0,
        300,
    )


def test_a_tolerance_keda_cannot_express_is_a_caveat() -> None:
    body = {"metadata": {"name": "quinn", "namespace": "team-a", "uid": UID}}
    spec = agent_api.AgentSpec.model_validate(
        {
            "role": "qa",
            "model": {"provider": "echo", "name": "echo-1"},
            "autoscaling": {**CASES["defaults"], "tolerance": 0.2},
        }
    )
    rendered = keda.scaled_object(body, spec, server_address=PROMETHEUS)
    assert rendered.caveats == (
        "KEDA's HPA uses the cluster's tolerance (0.1), not spec.autoscaling.tolerance 0.2",
    )
    assert render("defaults").caveats == ()
