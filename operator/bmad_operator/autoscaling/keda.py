"""``engine: keda``: the same scaling intent as a KEDA ScaledObject (pure builder).

The ScaledObject targets the Agent itself through its scale subresource
(``scaleTargetRef: {apiVersion: bmad.dev/v1alpha1, kind: Agent}``), so KEDA's HPA writes
``spec.replicas`` just as the operator's own autoscaler would. Each metric becomes a
``prometheus`` trigger with the query of ``queries`` and the target as ``threshold``
(``metricType`` AverageValue for per-replica targets, Value for ``targetValue``); the
behavior is written out in full (windows, policies, selectPolicy), defaults included,
so KEDA's HPA follows the same rates as the operator.

Scale to zero maps to ``minReplicaCount: 0`` (or ``idleReplicaCount: 0`` with the older
``scaleToZero`` and a positive ``minReplicas``) and ``cooldownPeriod: idleSeconds``.
KEDA scales to zero when no trigger is *active* (value above its
``activationThreshold``) for the cooldown period, and wakes when one is. To keep the
operator's meaning of idle (no queued and no in-flight work) and of waking (more tasks
queued than ``activationThreshold``), the ScaledObject always carries a queue-depth and
an in-flight trigger; those not among the Agent's metrics are *activation-only*: their
threshold is so high that they never ask for more than one replica.

What KEDA cannot express is returned as caveats (for a condition message): a tolerance
other than the HPA's cluster-wide 0.1; and that any trigger above 0 (not only the queue)
counts as activity for KEDA.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.autoscaling import config as autoscaling_config
from bmad_operator.autoscaling import decide, queries
from bmad_operator.builders import agent as builders
from bmad_operator.builders import meta

Obj = dict[str, Any]

API_VERSION = "keda.sh/v1alpha1"
KIND = "ScaledObject"
CRD_NAME = "scaledobjects.keda.sh"
# The tolerance of every HPA in a cluster (kube-controller-manager's
# --horizontal-pod-autoscaler-tolerance); KEDA's HPA has no field for another one.
HPA_TOLERANCE = 0.1
# An activation-only trigger's threshold: it never asks for more than one replica.
ACTIVATION_ONLY_THRESHOLD = 1_000_000_000

TRIGGER_NAMES = {
    "queueDepth": "queue-depth",
    "inflight": "inflight",
    "tokensPerMinute": "tokens-per-minute",
}


class Rendered(NamedTuple):
    scaled_object: Obj
    caveats: tuple[str, ...]


def _number(x: float) -> str:
    """KEDA reads trigger metadata as strings: "5", "2.5", never "1e+09"."""
    if x == int(x):
        return str(int(x))
    return repr(float(x))


def _rules(rules: decide.Rules) -> Obj:
    return {
        "stabilizationWindowSeconds": rules.window_seconds,
        "selectPolicy": rules.select,
        "policies": [
            {"type": p.type, "value": p.value, "periodSeconds": p.period_seconds}
            for p in rules.policies
        ],
    }


def _trigger(name: str, query: str, server: str, threshold: str, metric_type: str) -> Obj:
    return {
        "type": "prometheus",
        "name": name,
        "metricType": metric_type,
        "metadata": {"serverAddress": server, "query": query, "threshold": threshold},
    }


def scaled_object(
    body: Mapping[str, Any],
    spec: agent_api.AgentSpec,
    *,
    server_address: str,
    selector: queries.Selector | None = None,
    rate_window: str = queries.DEFAULT_RATE_WINDOW,
) -> Rendered:
    """The ScaledObject of an Agent whose ``spec.autoscaling.engine`` is keda."""
    autoscaling = spec.autoscaling
    if autoscaling is None or autoscaling.max_replicas is None:
        raise ValueError("spec.autoscaling with maxReplicas is required for a ScaledObject")
    name, namespace = body["metadata"]["name"], body["metadata"]["namespace"]
    selector = selector or queries.Selector(namespace, name)
    settings = autoscaling_config.from_spec(autoscaling)
    zero = settings.scale_to_zero

    triggers: list[Obj] = []
    types: set[str] = set()
    for index, (metric, rule) in enumerate(
        zip(autoscaling.effective_metrics(), settings.metrics, strict=True)
    ):
        types.add(metric.type)
        trigger = _trigger(
            TRIGGER_NAMES.get(metric.type, f"promql-{index}"),
            queries.for_metric(metric, selector, window=rate_window),
            server_address,
            _number(rule.target),
            rule.target_type,
        )
        if zero and metric.type == "queueDepth":
            trigger["metadata"]["activationThreshold"] = _number(settings.activation_threshold)
        triggers.append(trigger)
    if zero:
        # The work signals that decide idle and wake-up, when no metric carries them.
        if "queueDepth" not in types:
            trigger = _trigger(
                "activation-queue-depth",
                queries.queue_depth(selector),
                server_address,
                str(ACTIVATION_ONLY_THRESHOLD),
                "AverageValue",
            )
            trigger["metadata"]["activationThreshold"] = _number(settings.activation_threshold)
            triggers.append(trigger)
        if "inflight" not in types:
            triggers.append(
                _trigger(
                    "activation-inflight",
                    queries.inflight(selector),
                    server_address,
                    str(ACTIVATION_ONLY_THRESHOLD),
                    "AverageValue",
                )
            )

    so_spec: Obj = {
        "scaleTargetRef": {
            "apiVersion": meta.API_VERSION,
            "kind": "Agent",
            "name": name,
        },
        "pollingInterval": autoscaling.polling_interval_seconds,
        "minReplicaCount": settings.min_replicas,
        "maxReplicaCount": settings.max_replicas,
        "advanced": {
            "horizontalPodAutoscalerConfig": {
                "behavior": {
                    "scaleUp": _rules(settings.scale_up),
                    "scaleDown": _rules(settings.scale_down),
                }
            }
        },
        "triggers": triggers,
    }
    if zero:
        so_spec["cooldownPeriod"] = settings.idle_seconds
        if autoscaling.min_replicas > 0:
            so_spec["idleReplicaCount"] = 0

    caveats: list[str] = []
    if abs(settings.tolerance - HPA_TOLERANCE) > 1e-9:
        caveats.append(
            f"KEDA's HPA uses the cluster's tolerance ({HPA_TOLERANCE:g}), not "
            f"spec.autoscaling.tolerance {settings.tolerance:g}"
        )
    if zero and types - {"queueDepth", "inflight"}:
        caveats.append(
            "KEDA counts any trigger above 0 as activity, not only queued tasks: a metric "
            "other than the queue can keep the agent from going to zero or wake it"
        )
    return Rendered(
        scaled_object={
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": builders.labels(name, spec.role),
                "ownerReferences": [meta.owner_reference("Agent", body)],
            },
            "spec": so_spec,
        },
        caveats=tuple(caveats),
    )
