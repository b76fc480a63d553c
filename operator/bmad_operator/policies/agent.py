"""The Agent's decisions: its Deployment and Integrations observed in; its conditions,
the events to post and the reason of a refused apply out.

Reasons are constants, documented in docs/agents.md; messages are sentences that tell
the reader what is going on and, when something is wrong, what to change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

from bmad_operator import events
from bmad_operator.conditions import FALSE, TRUE, UNKNOWN, Cond, find

# Reasons ---------------------------------------------------------------------------
READY = "AgentReady"
PAUSED = "Paused"
TENANT_SUSPENDED = "TenantSuspended"
INVALID_SPEC = "InvalidSpec"
ROLLING_OUT = "RollingOut"
REPLICAS_UNAVAILABLE = "ReplicasUnavailable"
DEPLOYMENT_MISSING = "DeploymentMissing"
ROLLED_OUT = "RolledOut"
MINIMUM_AVAILABLE = "MinimumReplicasAvailable"
INTEGRATION_NOT_FOUND = "IntegrationNotFound"
INTEGRATION_NOT_READY = "IntegrationNotReady"
INTEGRATION_FORBIDDEN = "IntegrationForbidden"
INTEGRATIONS_READY = "IntegrationsReady"
AUTH_INTEGRATION_MISSING = "AuthIntegrationMissing"
NO_INTEGRATIONS = "NoIntegrations"
APPLY_FAILED = "ApplyFailed"
INSTRUCTIONS_NOT_FOUND = "InstructionsNotFound"
RESERVED_ENV_IGNORED = "ReservedEnvIgnored"
NAME_CONFLICT = "NameConflict"

# Event reasons (besides the condition reasons above) --------------------------------
EVENT_CREATED = "Created"
EVENT_UPDATED = "Updated"
EVENT_DRIFT_CORRECTED = "DriftCorrected"
EVENT_READY = "Ready"
EVENT_NOT_READY = "NotReady"


class IntegrationState(NamedTuple):
    name: str
    found: bool
    ready: str | None  # the Integration's Ready status, None when never checked
    message: str = ""
    type: str | None = None  # the Integration's spec.type, when found


def integrations_condition(
    states: Sequence[IntegrationState], namespace: str, *, auth_mode: str | None = None
) -> Cond:
    """`auth_mode`: the Agent's spec.auth.mode; ``jwt`` needs an auth0 Integration bound."""
    if auth_mode == "jwt" and not any(s.found and s.type == "auth0" for s in states):
        return Cond(
            "IntegrationsReady",
            FALSE,
            AUTH_INTEGRATION_MISSING,
            "spec.auth.mode is jwt but no Integration of type auth0 is in spec.integrations: "
            "the agent's API refuses every caller. Add an auth0 Integration, or set "
            "spec.auth.mode: none to serve without authentication (demos only).",
        )
    if not states:
        return Cond("IntegrationsReady", TRUE, NO_INTEGRATIONS, "The agent binds no integrations.")
    missing = [s.name for s in states if not s.found]
    if missing:
        names = ", ".join(missing)
        return Cond(
            "IntegrationsReady",
            FALSE,
            INTEGRATION_NOT_FOUND,
            f"Integration {names} not found in namespace {namespace}: create it there, or "
            "remove it from spec.integrations.",
        )
    unchecked = [s.name for s in states if s.ready is None]
    if unchecked:
        names = ", ".join(unchecked)
        return Cond(
            "IntegrationsReady",
            FALSE,
            INTEGRATION_NOT_READY,
            f"Integration {names} has not been checked yet: waiting for its first check.",
        )
    failing = [s for s in states if s.ready != TRUE]
    if failing:
        first = failing[0]
        detail = f": {first.message}" if first.message else ""
        names = ", ".join(s.name for s in failing)
        return Cond(
            "IntegrationsReady",
            FALSE,
            INTEGRATION_NOT_READY,
            f"Integration {names} is not ready{detail}",
        )
    names = ", ".join(s.name for s in states)
    return Cond("IntegrationsReady", TRUE, INTEGRATIONS_READY, f"Bound integrations: {names}.")


class Rollout(NamedTuple):
    replicas: int
    ready: int
    available: int
    updated: int
    observed_current: bool
    available_condition: bool


def rollout(deployment: Mapping[str, Any] | None) -> Rollout | None:
    if deployment is None:
        return None
    status = deployment.get("status", {}) or {}
    generation = deployment.get("metadata", {}).get("generation", 0)
    avail = find(status.get("conditions"), "Available")
    return Rollout(
        replicas=int(status.get("replicas", 0) or 0),
        ready=int(status.get("readyReplicas", 0) or 0),
        available=int(status.get("availableReplicas", 0) or 0),
        updated=int(status.get("updatedReplicas", 0) or 0),
        observed_current=int(status.get("observedGeneration", 0) or 0) >= int(generation or 0),
        available_condition=bool(avail and avail.get("status") == TRUE),
    )


def workload_conditions(
    *, desired: int, paused: bool, observed: Rollout | None
) -> tuple[Cond, Cond]:
    """(Available, Progressing) from the Deployment's state."""
    if observed is None:
        return (
            Cond(
                "Available", FALSE, DEPLOYMENT_MISSING, "The agent's Deployment does not exist yet."
            ),
            Cond("Progressing", TRUE, ROLLING_OUT, "Creating the agent's Deployment."),
        )
    # The rollout is done once every pod runs the current template; a pod lost later
    # makes the agent unavailable, not "rolling out" again.
    done = (
        observed.observed_current and observed.updated >= desired and observed.replicas == desired
    )
    if paused:
        available = Cond("Available", FALSE, PAUSED, "spec.paused is true: scaled to zero.")
    elif observed.available >= desired and observed.available_condition:
        available = Cond(
            "Available",
            TRUE,
            MINIMUM_AVAILABLE,
            f"{observed.available}/{desired} replicas are available.",
        )
    else:
        available = Cond(
            "Available",
            FALSE,
            REPLICAS_UNAVAILABLE,
            f"{observed.available}/{desired} replicas are available.",
        )
    if done:
        progressing = Cond("Progressing", FALSE, ROLLED_OUT, f"{desired} replicas are up to date.")
    else:
        progressing = Cond(
            "Progressing",
            TRUE,
            ROLLING_OUT,
            f"Rolling out: {observed.updated}/{desired} updated, {observed.ready}/{desired} ready.",
        )
    return available, progressing


def instructions_problem(
    *, config_map: str, key: str, live: Mapping[str, Any] | None, namespace: str
) -> Cond | None:
    """spec.instructionsFrom names a ConfigMap key that the pods mount: is it there?

    The mount is not optional, so pods without it do not start; this says why.
    """
    if live is None:
        return Cond(
            "Ready",
            FALSE,
            INSTRUCTIONS_NOT_FOUND,
            f"ConfigMap {config_map} (spec.instructionsFrom) not found in namespace "
            f"{namespace}: the agent's pods cannot start without their instructions; create "
            f"it with the key {key}, or change spec.instructionsFrom.",
        )
    if key not in (live.get("data") or {}):
        return Cond(
            "Ready",
            FALSE,
            INSTRUCTIONS_NOT_FOUND,
            f"ConfigMap {config_map} has no key {key} (spec.instructionsFrom.key): the "
            "agent's pods cannot start without their instructions; add the key, or change "
            "spec.instructionsFrom.",
        )
    return None


def reserved_env_problem(names: Sequence[str]) -> Cond | None:
    """spec.runtime.env holds names that are the operator's (stored before the API
    refused them): they are not passed to the pods, and the spec should lose them."""
    if not names:
        return None
    return Cond(
        "Ready",
        FALSE,
        RESERVED_ENV_IGNORED,
        f"spec.runtime.env sets {', '.join(sorted(names))}: names starting with BMAD_ and "
        "SERVICE_BINDING_ROOT, in any case, are the operator's, so they were not passed to "
        "the agent; remove them from spec.runtime.env.",
    )


def ready_condition(
    *,
    paused: bool,
    integrations: Cond,
    available: Cond,
    progressing: Cond,
    desired: int,
    suspended_by: str | None = None,
    problems: Sequence[Cond | None] = (),
) -> Cond:
    """`suspended_by`: the name of the agent's tenant when that tenant is suspended;
    `problems`: Ready conditions of what is wrong with the spec's references (the
    first one that is not None wins)."""
    if suspended_by is not None:
        return Cond(
            "Ready",
            FALSE,
            TENANT_SUSPENDED,
            f"Tenant {suspended_by} is suspended: the agent is scaled to zero.",
        )
    if paused:
        return Cond("Ready", FALSE, PAUSED, "spec.paused is true: the agent is scaled to zero.")
    for problem in problems:
        if problem is not None:
            return problem
    if integrations.status != TRUE:
        return Cond("Ready", FALSE, integrations.reason, integrations.message)
    if progressing.status == TRUE:
        return Cond("Ready", FALSE, ROLLING_OUT, progressing.message)
    if desired > 0 and available.status != TRUE:
        return Cond("Ready", FALSE, available.reason, available.message)
    return Cond("Ready", TRUE, READY, f"{desired}/{desired} replicas are ready.")


def invalid_spec(message: str) -> list[Cond]:
    text = f"The spec is invalid: {message}"
    return [
        Cond("Ready", FALSE, INVALID_SPEC, text),
        Cond("Available", UNKNOWN, INVALID_SPEC, text),
        Cond("Progressing", FALSE, INVALID_SPEC, text),
    ]


def apply_failed(kind: str, message: str) -> Cond:
    """The API server refused an owned object (a quota, an admission webhook)."""
    return Cond(
        "Ready", FALSE, APPLY_FAILED, f"The API server refused the agent's {kind}: {message}"
    )


def name_conflict(objects: Sequence[str], namespace: str) -> Cond:
    """Objects the agent would own exist already and were not created for it (`objects`:
    `Kind/name` labels). They are never taken over: the operator would overwrite them,
    and the garbage collector would delete them with the agent."""
    names = ", ".join(objects)
    return Cond(
        "Ready",
        FALSE,
        NAME_CONFLICT,
        f"{names} in namespace {namespace} exists and was not created for this agent; "
        "nothing was applied and it was left untouched: delete or rename it, or give the "
        "agent another name.",
    )


def had_workload(previous: Sequence[Mapping[str, Any]]) -> bool:
    """Whether an earlier pass saw the Deployment (so a missing object means deletion)."""
    available = find(previous, "Available")
    return available is not None and available.get("reason") not in (
        DEPLOYMENT_MISSING,
        INVALID_SPEC,
    )


def apply_events(
    *, created: Sequence[str], updated: Sequence[str], drifted: Sequence[str]
) -> list[events.Event]:
    """What one pass applied, told on the Agent: `Kind/name` labels per group."""
    told: list[events.Event] = []
    if created:
        told.append(events.Event(events.NORMAL, EVENT_CREATED, f"Created {', '.join(created)}."))
    if updated:
        told.append(events.Event(events.NORMAL, EVENT_UPDATED, f"Applied {', '.join(updated)}."))
    if drifted:
        told.append(
            events.Event(
                events.WARNING,
                EVENT_DRIFT_CORRECTED,
                f"Restored {', '.join(drifted)}, changed or deleted outside the operator.",
            )
        )
    return told


def ready_event(before: Mapping[str, Any] | None, ready: Cond) -> events.Event | None:
    """The event when `Ready` changes status or reason (`before`: the previous Ready).

    Rolling out after having been Ready is news; rolling out from the start is not.
    """
    if (
        before is not None
        and before.get("status") == ready.status
        and before.get("reason") == ready.reason
    ):
        return None
    if ready.status == TRUE:
        return events.Event(events.NORMAL, EVENT_READY, ready.message)
    if ready.reason == INVALID_SPEC:
        return events.Event(events.WARNING, INVALID_SPEC, ready.message)
    if ready.reason in (ROLLING_OUT, DEPLOYMENT_MISSING):
        if before is not None and before.get("status") == TRUE:
            return events.Event(events.NORMAL, ROLLING_OUT, ready.message)
        return None
    return events.Event(events.WARNING, EVENT_NOT_READY, f"{ready.reason}: {ready.message}")
