"""What an Agent's status shows of its autoscaling (pure): other autoscalers of the
Agent found by their scaleTargetRef, and the report of engine keda from what became of
its ScaledObject."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator import conditions
from bmad_operator.autoscaling import reasons, report

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
AGENT = "dev"


def hpa(name: str, ref: Obj, *, owner: str | None = None) -> Obj:
    meta: Obj = {"name": name, "namespace": "team-a"}
    if owner:
        meta["ownerReferences"] = [{"kind": "ScaledObject", "name": owner}]
    return {"kind": "HorizontalPodAutoscaler", "metadata": meta, "spec": {"scaleTargetRef": ref}}


def scaled_object(name: str, ref: Obj, *, ours: bool = False) -> Obj:
    meta: Obj = {"name": name, "namespace": "team-a"}
    if ours:
        meta["ownerReferences"] = [{"kind": "Agent", "name": AGENT}]
    return {"kind": "ScaledObject", "metadata": meta, "spec": {"scaleTargetRef": ref}}


AGENT_REF = {"apiVersion": "bmad.dev/v1alpha1", "kind": "Agent", "name": AGENT}
DEPLOYMENT_REF = {"apiVersion": "apps/v1", "kind": "Deployment", "name": AGENT}


@pytest.mark.parametrize(
    ("hpas", "scaled_objects", "found"),
    [
        ([], [], []),
        ([hpa("h", AGENT_REF)], [], ["HorizontalPodAutoscaler h (scaling its Agent)"]),
        ([hpa("h", DEPLOYMENT_REF)], [], ["HorizontalPodAutoscaler h (scaling its Deployment)"]),
        ([hpa("h", {**AGENT_REF, "name": "qa"})], [], []),  # another Agent
        ([hpa("h", {**AGENT_REF, "apiVersion": "other.io/v1"})], [], []),  # another kind
        # KEDA's HPA of our own ScaledObject, and our ScaledObject itself: not foreign.
        (
            [hpa("keda-hpa-dev", AGENT_REF, owner=AGENT)],
            [scaled_object(AGENT, AGENT_REF, ours=True)],
            [],
        ),
        # Someone else's ScaledObject: reported once (its HPA is KEDA's doing).
        (
            [hpa("keda-hpa-theirs", AGENT_REF, owner="theirs")],
            [scaled_object("theirs", AGENT_REF)],
            ["ScaledObject theirs (scaling its Agent)"],
        ),
        # A ScaledObject without kind targets a Deployment (KEDA's default).
        ([], [scaled_object("so", {"name": AGENT})], ["ScaledObject so (scaling its Deployment)"]),
    ],
    ids=[
        "none", "hpa-on-agent", "hpa-on-deployment", "other-agent", "other-kind", "ours",
        "their-scaledobject", "scaledobject-default-kind",
    ],
)  # fmt: skip
def test_foreign_scalers(hpas: list[Obj], scaled_objects: list[Obj], found: list[str]) -> None:
    assert report.foreign_scalers(AGENT, hpas, scaled_objects) == found


def test_a_conflict_holds_and_says_what_to_do() -> None:
    shown = report.conflict(["HorizontalPodAutoscaler h (scaling its Agent)"], current=3)
    assert shown.autoscaling == {
        "desiredReplicas": 3,
        "reason": reasons.CONFLICTING_SCALER,
        "message": "HorizontalPodAutoscaler h (scaling its Agent) also scales this Agent: "
        "holding 3 replicas",
    }
    [active] = shown.conditions
    assert (active.type, active.status, active.reason) == (
        "ScalingActive", "False", reasons.CONFLICTING_SCALER,
    )  # fmt: skip
    assert "spec.autoscaling.enabled: false" in active.message


URL = "http://prometheus:9090"


def keda_active(**kw: Any) -> conditions.Cond:
    [active] = report.keda(AGENT, **kw).conditions
    return active


@pytest.mark.parametrize(
    ("kw", "status", "reason", "words"),
    [
        ({}, "False", reasons.PROMETHEUS_UNAVAILABLE, "BMAD_OPERATOR_PROMETHEUS_URL"),
        ({"missing": True}, "False", reasons.KEDA_NOT_INSTALLED, "no scaledobjects.keda.sh"),
        ({"refused": "spec.x: unknown"}, "False", reasons.SCALED_OBJECT_REFUSED, "spec.x: unknown"),
        ({"scalers": ["HorizontalPodAutoscaler h"]}, "False", reasons.CONFLICTING_SCALER, "h"),
        ({"live": {}}, "Unknown", reasons.WAITING_FOR_KEDA, "is KEDA running?"),
        (
            {"live": {"status": {"conditions": [{"type": "Ready", "status": "True",
             "reason": "ScaledObjectReady", "message": "ScaledObject is ready for scaling"}]}}},
            "True", "ScaledObjectReady", "KEDA: ScaledObject is ready for scaling.",
        ),
        (
            {"live": {"status": {"conditions": [{"type": "Ready", "status": "False",
             "reason": "scaled object check failed", "message": "no triggers"}]}}},
            "False", reasons.KEDA_NOT_READY, "KEDA: no triggers.",
        ),
        (
            {"live": {}, "caveats": ["KEDA's HPA uses the cluster's tolerance (0.1)"]},
            "Unknown", reasons.WAITING_FOR_KEDA, "Note: KEDA's HPA uses the cluster's tolerance",
        ),
    ],
    ids=[
        "no-prometheus", "no-crd", "refused", "conflict", "waiting", "ready", "not-ready",
        "caveats",
    ],
)  # fmt: skip
def test_the_keda_report(kw: Obj, status: str, reason: str, words: str) -> None:
    if kw.keys() != set():
        kw = {"prometheus_url": URL, **kw}
    active = keda_active(**kw)
    assert (active.type, active.status, active.reason) == ("ScalingActive", status, reason)
    assert words in active.message


def test_keda_mode_says_keda_scales_in_the_status() -> None:
    shown = report.keda(AGENT, live={}, prometheus_url=URL)
    assert shown.autoscaling is not None
    assert shown.autoscaling["reason"] == reasons.MANAGED_BY_KEDA
    assert shown.autoscaling["message"].startswith("ScaledObject dev: ")


@pytest.mark.parametrize(
    ("spec", "autoscaled", "keda"),
    [
        ({}, False, False),
        ({"autoscaling": {"enabled": False}}, False, False),
        ({"autoscaling": {"enabled": True, "maxReplicas": 3}}, True, False),
        ({"autoscaling": {"enabled": True, "maxReplicas": 3}, "paused": True}, False, False),
        ({"autoscaling": {"enabled": True, "maxReplicas": 3, "engine": "keda"}}, True, True),
    ],
)
def test_which_agents_show_autoscaling(spec: Obj, autoscaled: bool, keda: bool) -> None:
    parsed = agent_api.AgentSpec.model_validate(
        {"role": "dev", "model": {"provider": "echo", "name": "echo-1"}, **spec}
    )
    assert report.autoscaled(parsed) is autoscaled
    assert report.keda_mode(parsed) is keda


def test_what_changes_a_report_is_not_the_metric_values() -> None:
    active = conditions.Cond("ScalingActive", "True", "ValidMetrics", "Every metric has a value.")
    one = report.Report(
        {"desiredReplicas": 3, "reason": "WithinTolerance", "metrics": [1]}, (active,)
    )
    two = report.Report(
        {"desiredReplicas": 3, "reason": "WithinTolerance", "metrics": [2]}, (active,)
    )
    three = report.Report({"desiredReplicas": 4, "reason": "AboveTarget"}, (active,))
    assert report.shown(one) == report.shown(two)
    assert report.shown(one) != report.shown(three)
