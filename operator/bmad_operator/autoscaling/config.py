"""``spec.autoscaling`` as the decision's settings, with every default filled in.

The defaults follow the HPA's: scale up by 100% or 4 pods per 15 s (the larger) with
no window, scale down by up to 100% per 15 s after a 300 s window, tolerance 0.1.
"""

from __future__ import annotations

from typing import Literal

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.autoscaling import decide

DEFAULT_SCALE_UP_POLICIES = (
    decide.Policy("Percent", 100, 15),
    decide.Policy("Pods", 4, 15),
)
DEFAULT_SCALE_DOWN_POLICIES = (decide.Policy("Percent", 100, 15),)

METRIC_NAMES = {
    "queueDepth": "queue depth",
    "inflight": "in-flight requests",
    "tokensPerMinute": "tokens per minute",
}


def metric_name(metric: agent_api.AutoscalingMetric, index: int) -> str:
    """The metric in words, for messages: "queue depth", "promql metrics[2]"."""
    return METRIC_NAMES.get(metric.type, f"{metric.type} metrics[{index}]")


def metric(spec: agent_api.AutoscalingMetric, index: int) -> decide.Metric:
    """One metric's target: per replica (AverageValue) unless a promql targetValue."""
    name = metric_name(spec, index)
    if spec.target_value is not None:
        return decide.Metric(name, spec.type, "Value", spec.target_value)
    target = spec.target_average_value if spec.target_average_value is not None else spec.target
    if target is None:  # the API's rules make this unreachable
        raise ValueError(f"spec.autoscaling.metrics[{index}] has no target")
    return decide.Metric(name, spec.type, "AverageValue", target)


def _rules(
    spec: agent_api.Autoscaling,
    direction: Literal["up", "down"],
) -> decide.Rules:
    behavior = spec.behavior or agent_api.ScalingBehavior()
    given = behavior.scale_up if direction == "up" else behavior.scale_down
    defaults = DEFAULT_SCALE_UP_POLICIES if direction == "up" else DEFAULT_SCALE_DOWN_POLICIES
    policies = (
        tuple(decide.Policy(p.type, p.value, p.period_seconds) for p in given.policies)
        if given is not None and given.policies
        else defaults
    )
    return decide.Rules(
        window_seconds=spec.stabilization_window_seconds(direction),
        policies=policies,
        select=given.select_policy if given is not None else "Max",
    )


def from_spec(spec: agent_api.Autoscaling) -> decide.Config:
    """The decision's settings; ``spec.max_replicas`` must be set (enabled specs have it)."""
    if spec.max_replicas is None:
        raise ValueError("spec.autoscaling.maxReplicas is required when autoscaling is enabled")
    return decide.Config(
        min_replicas=spec.min_replicas,
        max_replicas=spec.max_replicas,
        metrics=tuple(metric(m, i) for i, m in enumerate(spec.effective_metrics())),
        scale_up=_rules(spec, "up"),
        scale_down=_rules(spec, "down"),
        tolerance=spec.tolerance,
        scale_to_zero=spec.scales_to_zero(),
        idle_seconds=(
            agent_api.DEFAULT_IDLE_SECONDS if spec.idle_seconds is None else spec.idle_seconds
        ),
        activation_threshold=(
            agent_api.DEFAULT_ACTIVATION_THRESHOLD
            if spec.activation_threshold is None
            else spec.activation_threshold
        ),
    )
