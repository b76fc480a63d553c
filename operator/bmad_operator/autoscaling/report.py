"""What an Agent's status shows of its autoscaling, decided without I/O.

The Agent reconciler is the one writer of an Agent's status: once per pass, only
when it changed. The autoscaler does not write status itself. It publishes a
:class:`Report` per Agent (``status.autoscaling`` and the ``ScalingActive`` /
``ScalingLimited`` conditions) and queues the Agent; the reconciler's next pass puts
the report into its single status write. Two writers merge-patching one conditions
list would drop each other's conditions (a merge patch replaces the whole list); one
writer cannot.

Also here: which other autoscalers target an Agent (an HPA, a ScaledObject not ours),
since the operator reports such a conflict instead of fighting it, and the report of
``engine: keda``, where KEDA scales and the operator shows what KEDA says.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator import conditions
from bmad_operator.autoscaling import decide, reasons

Obj = dict[str, Any]

CONDITION_TYPES = (reasons.SCALING_ACTIVE, reasons.SCALING_LIMITED)
AGENT_GROUP = "bmad.dev"


class Report(NamedTuple):
    """``status.autoscaling`` (None: none) and the scaling conditions of one Agent."""

    autoscaling: Obj | None
    conditions: tuple[conditions.Cond, ...]


# Not autoscaled: no status.autoscaling and no scaling conditions (an earlier spec's go).
NOT_AUTOSCALED = Report(None, ())


def status_patch(shown: Obj | None, wanted: Obj | None) -> Obj | None:
    """``status.autoscaling`` as a merge patch from what is shown to what is wanted.

    A merge patch merges objects key by key: a key the new report lacks (a conflict
    report has no ``metrics``) is sent as null, or the old value would stay.
    """
    if wanted is None:
        return None
    return {**{k: None for k in shown or {} if k not in wanted}, **wanted}


def autoscaled(spec: agent_api.AgentSpec) -> bool:
    """Whether anything autoscales the Agent (the operator or KEDA): then its status
    shows autoscaling; otherwise the reconciler removes what an earlier spec showed."""
    a = spec.autoscaling
    return bool(a is not None and a.enabled and a.max_replicas is not None and not spec.paused)


def keda_mode(spec: agent_api.AgentSpec) -> bool:
    a = spec.autoscaling
    return autoscaled(spec) and a is not None and a.engine == "keda"


# --- the operator's own decision -----------------------------------------------------


def metric_status(result: decide.MetricResult, current: int) -> Obj:
    reading, metric = result.reading, result.metric
    status: Obj = {
        "type": metric.type,
        "name": metric.name,
        "target": metric.target,
        "targetType": metric.target_type,
    }
    if reading.value is not None:
        status["value"] = reading.value
        if metric.target_type == "AverageValue" and current > 0:
            status["averageValue"] = round(reading.value / current, 3)
    if result.proposal is not None:
        status["desiredReplicas"] = result.proposal
    if reading.forecast is not None:
        status["forecast"] = reading.forecast
    if reading.error is not None:
        status["error"] = reading.error
    return status


def from_decision(decision: decide.Decision, *, last_scale_time: str | None) -> Report:
    autoscaling: Obj = {
        "desiredReplicas": decision.desired,
        "reason": decision.reason,
        "message": decision.message,
        "metrics": [metric_status(r, decision.current) for r in decision.metrics],
    }
    if last_scale_time:
        autoscaling["lastScaleTime"] = last_scale_time
    driver = next(
        (r for r in decision.metrics if r.proposal is not None and r.reading.value is not None),
        None,
    )
    if driver is not None and driver.reading.value is not None and decision.current > 0:
        autoscaling["currentMetricValue"] = round(driver.reading.value / decision.current, 3)
    return Report(autoscaling, (decision.active, decision.limited))


def shown(report: Report) -> tuple[Any, ...]:
    """What a person reads of a report, without the metric values that move every pass:
    a report is republished when this changes (or when the values are old)."""
    a = report.autoscaling or {}
    return (
        a.get("desiredReplicas"),
        a.get("reason"),
        a.get("lastScaleTime"),
        tuple((c.type, c.status, c.reason) for c in report.conditions),
    )


# --- other autoscalers ---------------------------------------------------------------


def _group(api_version: str | None) -> str:
    """ "bmad.dev" of "bmad.dev/v1alpha1"; "" of "v1" (the core group)."""
    return (api_version or "").rpartition("/")[0]


def _owned_by(obj: Mapping[str, Any], kind: str, name: str) -> bool:
    return any(
        ref.get("kind") == kind and ref.get("name") == name
        for ref in (obj.get("metadata") or {}).get("ownerReferences") or []
    )


def _targets(ref: Mapping[str, Any] | None, agent: str, *, default_kind: str) -> str | None:
    """What of the Agent's a scaleTargetRef points at: "Agent", "Deployment" or None."""
    if not ref or ref.get("name") != agent:
        return None
    kind = ref.get("kind") or default_kind
    group = _group(ref.get("apiVersion"))
    if kind == "Agent" and group in (AGENT_GROUP, ""):
        return "Agent"
    if kind == "Deployment" and group in ("apps", ""):
        return "Deployment"
    return None


def foreign_scalers(
    agent: str,
    hpas: Iterable[Mapping[str, Any]],
    scaled_objects: Iterable[Mapping[str, Any]],
) -> list[str]:
    """The autoscalers of others that target the Agent or its Deployment, in words.

    Ours are left out: the ScaledObject owned by the Agent (``engine: keda``) and the
    HPA KEDA makes for it (owned by that ScaledObject).
    """
    found: list[str] = []
    for so in scaled_objects:
        meta = so.get("metadata") or {}
        if _owned_by(so, "Agent", agent):
            continue
        # KEDA's scaleTargetRef defaults to a Deployment (apps/v1) in the same namespace.
        ref = (so.get("spec") or {}).get("scaleTargetRef")
        target = _targets(ref, agent, default_kind="Deployment")
        if target:
            found.append(f"ScaledObject {meta.get('name')} (scaling its {target})")
    for hpa in hpas:
        meta = hpa.get("metadata") or {}
        if any(ref.get("kind") == "ScaledObject" for ref in meta.get("ownerReferences") or []):
            continue  # KEDA's HPA of a ScaledObject: ours, or reported as that ScaledObject
        target = _targets((hpa.get("spec") or {}).get("scaleTargetRef"), agent, default_kind="")
        if target:
            found.append(f"HorizontalPodAutoscaler {meta.get('name')} (scaling its {target})")
    return sorted(found)


def conflict(scalers: list[str], *, current: int) -> Report:
    """Another autoscaler targets the Agent: say so, and leave spec.replicas alone."""
    them = "; ".join(scalers)
    message = (
        f"Also scaled by {them}: the operator does not scale this Agent while another "
        "autoscaler does. Delete the other one, or set spec.autoscaling.enabled: false to "
        "leave the Agent to it."
    )
    return Report(
        {
            "desiredReplicas": current,
            "reason": reasons.CONFLICTING_SCALER,
            "message": f"{them} also scales this Agent: holding {current} replicas",
        },
        (
            conditions.Cond(
                reasons.SCALING_ACTIVE, conditions.FALSE, reasons.CONFLICTING_SCALER, message
            ),
        ),
    )


# --- engine: keda --------------------------------------------------------------------


def _camel(word: str) -> bool:
    return bool(word) and word[0].isupper() and word.isalnum()


def keda(
    name: str,
    *,
    live: Mapping[str, Any] | None = None,
    caveats: Iterable[str] = (),
    scalers: list[str] | None = None,
    missing: bool = False,
    refused: str | None = None,
    prometheus_url: str = "",
) -> Report:
    """The Agent's report in KEDA mode, from what became of its ScaledObject ``name``."""

    def report(status: str, reason: str, message: str) -> Report:
        return Report(
            {"reason": reasons.MANAGED_BY_KEDA, "message": f"ScaledObject {name}: {message}"},
            (conditions.Cond(reasons.SCALING_ACTIVE, status, reason, message),),
        )

    if not prometheus_url:
        return report(
            conditions.FALSE,
            reasons.PROMETHEUS_UNAVAILABLE,
            "engine keda needs the Prometheus address KEDA should query: set "
            "BMAD_OPERATOR_PROMETHEUS_URL in the operator's settings",
        )
    if missing:
        return report(
            conditions.FALSE,
            reasons.KEDA_NOT_INSTALLED,
            "engine keda needs KEDA, but this cluster has no scaledobjects.keda.sh: install "
            "KEDA, or set spec.autoscaling.engine: operator",
        )
    if refused is not None:
        return report(
            conditions.FALSE,
            reasons.SCALED_OBJECT_REFUSED,
            f"the API server refused the ScaledObject: {refused}",
        )
    if scalers:
        message = (
            f"Also scaled by {'; '.join(scalers)}: two autoscalers of one Agent fight. "
            "Delete the other one, or set spec.autoscaling.enabled: false."
        )
        return Report(
            {"reason": reasons.CONFLICTING_SCALER, "message": message},
            (
                conditions.Cond(
                    reasons.SCALING_ACTIVE, conditions.FALSE, reasons.CONFLICTING_SCALER, message
                ),
            ),
        )
    notes = "".join(f" Note: {c}." for c in caveats)
    ready = conditions.find(((live or {}).get("status") or {}).get("conditions"), "Ready")
    if ready is None or ready.get("status") not in (conditions.TRUE, conditions.FALSE):
        return report(
            conditions.UNKNOWN,
            reasons.WAITING_FOR_KEDA,
            f"applied; KEDA has not reported on it yet (is KEDA running?).{notes}",
        )
    words = str(ready.get("message") or "").rstrip(".")
    their = str(ready.get("reason") or "")
    if ready.get("status") == conditions.TRUE:
        reason = their if _camel(their) else reasons.KEDA_READY
        return report(conditions.TRUE, reason, f"KEDA: {words or 'ready'}.{notes}")
    reason = their if _camel(their) else reasons.KEDA_NOT_READY
    return report(conditions.FALSE, reason, f"KEDA: {words or 'not ready'}.{notes}")
