"""spec.autoscaling becomes the decision's settings with the documented defaults."""

from __future__ import annotations

import pytest

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.autoscaling import config, decide

pytestmark = pytest.mark.unit


def spec(**fields: object) -> agent_api.Autoscaling:
    return agent_api.Autoscaling.model_validate({"enabled": True, "maxReplicas": 10, **fields})


def test_defaults_are_the_hpas() -> None:
    cfg = config.from_spec(spec())
    assert cfg.min_replicas == 1
    assert cfg.max_replicas == 10
    assert cfg.tolerance == 0.1
    assert cfg.metrics == (decide.Metric("queue depth", "queueDepth", "AverageValue", 5.0),)
    assert cfg.scale_up == decide.Rules(
        0, (decide.Policy("Percent", 100, 15), decide.Policy("Pods", 4, 15)), "Max"
    )
    assert cfg.scale_down == decide.Rules(300, (decide.Policy("Percent", 100, 15),), "Max")
    assert cfg.scale_to_zero is False


def test_every_field_is_carried() -> None:
    cfg = config.from_spec(
        spec(
            minReplicas=0,
            idleSeconds=120,
            activationThreshold=3,
            tolerance=0.05,
            metrics=[
                {"type": "inflight", "target": 2},
                {"type": "tokensPerMinute", "target": 20000},
                {"type": "promql", "query": "up", "targetValue": 50},
                {"type": "promql", "query": "up", "targetAverageValue": 10},
                {"type": "promql", "query": "up", "target": 7},
            ],
            behavior={
                "scaleUp": {"stabilizationWindowSeconds": 30, "selectPolicy": "Min"},
                "scaleDown": {
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 60}],
                    "selectPolicy": "Disabled",
                },
            },
        )
    )
    assert cfg.metrics == (
        decide.Metric("in-flight requests", "inflight", "AverageValue", 2),
        decide.Metric("tokens per minute", "tokensPerMinute", "AverageValue", 20000),
        decide.Metric("promql metrics[2]", "promql", "Value", 50),
        decide.Metric("promql metrics[3]", "promql", "AverageValue", 10),
        decide.Metric("promql metrics[4]", "promql", "AverageValue", 7),
    )
    assert cfg.scale_up == decide.Rules(30, config.DEFAULT_SCALE_UP_POLICIES, "Min")
    assert cfg.scale_down == decide.Rules(300, (decide.Policy("Pods", 1, 60),), "Disabled")
    assert (cfg.scale_to_zero, cfg.idle_seconds, cfg.activation_threshold) == (True, 120, 3)
    assert cfg.tolerance == 0.05


def test_older_fields_still_work() -> None:
    cfg = config.from_spec(
        spec(
            minReplicas=2,
            scaleToZero=True,
            scaleUpStabilizationWindowSeconds=15,
            scaleDownStabilizationWindowSeconds=60,
        )
    )
    assert (cfg.scale_up.window_seconds, cfg.scale_down.window_seconds) == (15, 60)
    assert cfg.scale_to_zero is True
    assert cfg.min_replicas == 2
    assert (cfg.idle_seconds, cfg.activation_threshold) == (300, 0)


def test_max_replicas_is_required() -> None:
    with pytest.raises(ValueError, match="maxReplicas is required"):
        config.from_spec(agent_api.Autoscaling())
