"""The Agent reconciler as the one writer of an Agent's status, autoscaling included.

The autoscaler's report (``status.autoscaling``, ``ScalingActive``, ``ScalingLimited``)
goes out in the reconciler's single status write of a pass; ``engine: keda`` applies the
Agent's ScaledObject and shows what KEDA says of it. Against the in-memory API server.
"""

from __future__ import annotations

from typing import Any

import pytest

from bmad_operator import conditions, errors, watching
from bmad_operator.autoscaling import reasons, report
from bmad_operator.reconcilers import agent as agent_reconciler

from .test_reconciler_agent import IMAGE, NAME, NS, SPEC, Harness

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
URL = "http://prometheus.monitoring.svc:9090"
AUTOSCALED: Obj = {**SPEC, "autoscaling": {"enabled": True, "maxReplicas": 5}}
KEDA: Obj = {**SPEC, "autoscaling": {"enabled": True, "maxReplicas": 5, "engine": "keda"}}

ACTIVE = conditions.Cond("ScalingActive", "True", "ValidMetrics", "Every metric has a value.")
LIMITED = conditions.Cond("ScalingLimited", "False", "DesiredWithinRange", "Within range.")
SHOWN = report.Report(
    {"desiredReplicas": 1, "reason": "WithinTolerance", "message": "queue depth 5 = 1 × 5"},  # noqa: RUF001
    (ACTIVE, LIMITED),
)


class Scaling:
    """Stands in for the Autoscaler: the report it last published."""

    def __init__(self, shown: report.Report | None) -> None:
        self.shown = shown

    def report(self, namespace: str, name: str) -> report.Report | None:
        return self.shown


def harness(spec: Obj, shown: report.Report | None = None, *, url: str = URL) -> Harness:
    h = Harness(spec)
    h.reconciler = agent_reconciler.AgentReconciler(
        api=h.api,  # type: ignore[arg-type]
        cache=h.cache,
        runtime_image=IMAGE,
        scaling=Scaling(shown),
        prometheus_url=url,
    )
    return h


def types(h: Harness) -> list[str]:
    return [c["type"] for c in h.status().get("conditions", [])]


async def test_the_autoscalers_report_goes_out_in_the_one_status_write_of_a_pass() -> None:
    h = harness(AUTOSCALED, SHOWN)
    await h.run()
    assert len(h.api.verbs("patch_status")) == 1
    assert h.status()["autoscaling"] == SHOWN.autoscaling
    assert types(h) == [
        "Ready", "Available", "Progressing", "IntegrationsReady", "ScalingActive", "ScalingLimited",
    ]  # fmt: skip
    assert h.condition("ScalingActive")["reason"] == "ValidMetrics"
    # Nothing changed: no write.
    await h.run()
    assert h.api.verbs("patch_status") == []


async def test_a_new_report_is_written_by_the_next_pass() -> None:
    scaling = Scaling(SHOWN)
    h = harness(AUTOSCALED, SHOWN)
    h.reconciler.scaling = scaling
    await h.run()
    down = conditions.Cond("ScalingActive", "False", reasons.PROMETHEUS_UNAVAILABLE, "No answer.")
    scaling.shown = report.Report({"desiredReplicas": 1, "reason": "PrometheusUnavailable"},
                                  (down, LIMITED))  # fmt: skip
    await h.run()
    assert len(h.api.verbs("patch_status")) == 1
    active = h.condition("ScalingActive")
    assert (active["status"], active["reason"]) == ("False", reasons.PROMETHEUS_UNAVAILABLE)


async def test_keys_a_new_report_lacks_leave_the_status() -> None:
    scaling = Scaling(report.Report({**SHOWN.autoscaling, "metrics": [{"type": "queueDepth"}]},
                                    SHOWN.conditions))  # fmt: skip
    h = harness(AUTOSCALED)
    h.reconciler.scaling = scaling
    await h.run()
    assert h.status()["autoscaling"]["metrics"] == [{"type": "queueDepth"}]
    scaling.shown = report.conflict(["HorizontalPodAutoscaler h (scaling its Agent)"], current=1)
    await h.run()
    assert h.status()["autoscaling"] == scaling.shown.autoscaling
    await h.run()
    assert h.api.verbs("patch_status") == []


async def test_before_the_first_report_the_status_keeps_what_it_shows() -> None:
    h = harness(AUTOSCALED, SHOWN)
    await h.run()
    h.reconciler.scaling = Scaling(None)  # an operator restart: no report yet
    h.make_available()
    await h.run()
    assert h.status()["autoscaling"] == SHOWN.autoscaling
    assert "ScalingActive" in types(h)
    assert "ScalingLimited" in types(h)


async def test_switching_autoscaling_off_removes_what_it_showed() -> None:
    h = harness(AUTOSCALED, SHOWN)
    await h.run()
    h.update_spec(lambda spec: spec["autoscaling"].update(enabled=False))
    await h.run()
    assert "autoscaling" not in h.status()
    assert "ScalingActive" not in types(h)
    assert "ScalingLimited" not in types(h)


async def test_keda_mode_applies_the_scaled_object_and_shows_what_keda_says() -> None:
    h = harness(KEDA)
    await h.run()
    assert "ScaledObject" in h.applied_kinds()
    applied = h.live("ScaledObject")
    assert applied["spec"]["scaleTargetRef"] == {
        "apiVersion": "bmad.dev/v1alpha1", "kind": "Agent", "name": NAME,
    }  # fmt: skip
    assert applied["spec"]["triggers"][0]["metadata"]["serverAddress"] == URL
    active = h.condition("ScalingActive")
    assert (active["status"], active["reason"]) == ("Unknown", reasons.WAITING_FOR_KEDA)
    assert h.status()["autoscaling"]["reason"] == reasons.MANAGED_BY_KEDA

    ready = {"type": "Ready", "status": "True", "reason": "ScaledObjectReady",
             "message": "ScaledObject is ready"}  # fmt: skip

    def keda_reports(so: Obj) -> None:
        so["status"] = {"conditions": [ready]}

    h.edit("ScaledObject", NAME, keda_reports)
    await h.run()
    assert "ScaledObject" not in h.applied_kinds()  # unchanged: not applied again
    active = h.condition("ScalingActive")
    assert (active["status"], active["reason"]) == ("True", "ScaledObjectReady")


async def test_keda_mode_without_keda_says_so_and_the_agent_still_serves() -> None:
    h = harness(KEDA)
    h.api.refuse["ScaledObject"] = errors.ApiError(
        404, "NotFound", "the server could not find the requested resource"
    )
    await h.run()
    h.make_available()
    await h.run()
    active = h.condition("ScalingActive")
    assert (active["status"], active["reason"]) == ("False", reasons.KEDA_NOT_INSTALLED)
    assert "install KEDA" in active["message"]
    assert h.condition("Ready")["status"] == "True"


async def test_keda_mode_without_a_prometheus_url_applies_nothing_and_says_what_to_set() -> None:
    h = harness(KEDA, url="")
    await h.run()
    assert "ScaledObject" not in h.applied_kinds()
    active = h.condition("ScalingActive")
    assert (active["status"], active["reason"]) == ("False", reasons.PROMETHEUS_UNAVAILABLE)
    assert "BMAD_OPERATOR_PROMETHEUS_URL" in active["message"]


async def test_leaving_keda_mode_deletes_the_scaled_object() -> None:
    h = harness(KEDA, SHOWN)
    await h.run()
    h.update_spec(lambda spec: spec["autoscaling"].update(engine="operator"))
    await h.run()
    assert ("ScaledObject", NS, NAME) in h.api.deleted
    assert h.cache.get("ScaledObject", NS, NAME) is None
    assert h.status()["autoscaling"] == SHOWN.autoscaling


async def test_keda_mode_reports_another_autoscaler_and_applies_nothing() -> None:
    h = harness(KEDA)
    h.seed(
        {
            "apiVersion": "autoscaling/v2",
            "kind": "HorizontalPodAutoscaler",
            "metadata": {"name": "theirs", "namespace": NS},
            "spec": {"scaleTargetRef": {"apiVersion": "apps/v1", "kind": "Deployment",
                                        "name": NAME}},
        }
    )  # fmt: skip
    await h.run()
    assert "ScaledObject" not in h.applied_kinds()
    active = h.condition("ScalingActive")
    assert (active["status"], active["reason"]) == ("False", reasons.CONFLICTING_SCALER)
    assert "HorizontalPodAutoscaler theirs (scaling its Deployment)" in active["message"]


def test_an_hpa_event_brings_back_the_agent_it_targets() -> None:
    h = harness(AUTOSCALED)
    ref = {"apiVersion": "bmad.dev/v1alpha1", "kind": "Agent"}
    declared = h.reconciler.watches()

    def event(name: str) -> watching.WatchEvent:
        body = {"spec": {"scaleTargetRef": {**ref, "name": name}}}
        return watching.WatchEvent("ADDED", "HorizontalPodAutoscaler", NS, "h", {}, body)

    assert watching.requests(declared, event(NAME)) == [watching.Request((NS, NAME))]
    assert watching.requests(declared, event("someone-else")) == []
