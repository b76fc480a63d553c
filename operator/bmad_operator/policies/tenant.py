"""The Tenant's decisions: what its namespaces, billing and deletion came to in; its
conditions, the events to post and whether to retry or release a deletion out.

Reasons are constants, documented in docs/tenants.md ("Conditions" and "Events").
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from bmad_integrations import base as ibase
from bmad_operator import events
from bmad_operator.conditions import FALSE, TRUE, Cond, find

# Reasons ---------------------------------------------------------------------------
TENANT_READY = "TenantReady"
SUSPENDED = "Suspended"
NAMESPACE_CONFLICT = "NamespaceConflict"
INVALID_SPEC = "InvalidSpec"
DELETION_FAILED = "DeletionFailed"
QUOTA_APPLIED = "QuotaApplied"
NO_QUOTA = "NoQuota"
NO_BILLING = "NoBilling"
SUBSCRIBED = "Subscribed"
SUSPENDED_BY_SPEC = "SuspendedBySpec"
ACTIVE = "Active"
# Billing reasons besides Stripe's own (`bmad_integrations.billing`).
INTEGRATION_NOT_FOUND = "IntegrationNotFound"
INVALID_CONFIGURATION = ibase.Reason.INVALID_CONFIGURATION
SECRET_NOT_FOUND = ibase.Reason.SECRET_NOT_FOUND
# Event reasons (besides the condition reasons above).
EVENT_NAMESPACES_RELEASED = "NamespacesReleased"
EVENT_DELETION_ABANDONED = "DeletionAbandoned"

# Deletion never blocks forever: retried this often, released after the deadline.
DELETION_RETRY_SECONDS = 15.0
FINALIZE_DEADLINE = dt.timedelta(minutes=10)


# -- namespaces -------------------------------------------------------------------
class NamespacePlan(NamedTuple):
    claimed: list[str]  # ours to set up: unlabelled, or labelled for this tenant
    conflicts: list[str]  # "<namespace> (tenant <other>)": labelled for another tenant


def plan_namespaces(
    tenant: str, wanted: Sequence[str], owners: Mapping[str, str | None]
) -> NamespacePlan:
    """Split the spec's namespaces by who holds them (`owners`: namespace -> tenant label)."""
    claimed: list[str] = []
    conflicts: list[str] = []
    for ns in wanted:
        owner = owners.get(ns)
        if owner not in (None, tenant):
            conflicts.append(f"{ns} (tenant {owner})")
        else:
            claimed.append(ns)
    return NamespacePlan(claimed, conflicts)


def to_release(labelled: Iterable[str], wanted: Sequence[str]) -> list[str]:
    """Namespaces labelled for the tenant that its spec no longer lists."""
    return [ns for ns in labelled if ns not in wanted]


# -- conditions -------------------------------------------------------------------
def invalid_spec(message: str) -> Cond:
    return Cond("Ready", FALSE, INVALID_SPEC, f"The spec is invalid: {message}")


def quota_condition(*, quota: str | None, namespaces: int) -> Cond:
    """`quota`: the name of the ResourceQuota the spec asks for, None when it asks none."""
    if quota is None:
        return Cond("QuotaReady", TRUE, NO_QUOTA, "spec.quota is empty: no ResourceQuota.")
    return Cond(
        "QuotaReady",
        TRUE,
        QUOTA_APPLIED,
        f"ResourceQuota {quota} applied in {namespaces} namespaces.",
    )


def no_billing() -> Cond:
    return Cond("BillingReady", TRUE, NO_BILLING, "spec.billing is not set.")


def billing_failed(reason: str, message: str) -> Cond:
    return Cond("BillingReady", FALSE, reason, message)


def subscribed(customer_id: str, price_id: str) -> Cond:
    return Cond(
        "BillingReady",
        TRUE,
        SUBSCRIBED,
        f"Stripe customer {customer_id} subscribed to {price_id}.",
    )


def billing_integration_not_found(namespace: str, name: str) -> Cond:
    return billing_failed(
        INTEGRATION_NOT_FOUND,
        f"stripe Integration {name} not found in namespace {namespace}: create it, or fix "
        "spec.billing.integration / spec.billing.integrationNamespace.",
    )


def billing_integration_wrong_type(namespace: str, name: str, type_: str) -> Cond:
    return billing_failed(
        INVALID_CONFIGURATION,
        f"Integration {namespace}/{name} is of type {type_}: billing needs a stripe one.",
    )


def billing_integration_invalid(namespace: str, name: str, detail: str) -> Cond:
    return billing_failed(
        INVALID_CONFIGURATION,
        f"The spec of Integration {namespace}/{name} is invalid: {detail}",
    )


def billing_secret_not_found(namespace: str, name: str, secret: str) -> Cond:
    return billing_failed(
        SECRET_NOT_FOUND,
        f"Secret {secret} of Integration {namespace}/{name} does not exist.",
    )


def suspended_condition(suspended: bool) -> Cond:
    if suspended:
        return Cond("Suspended", TRUE, SUSPENDED_BY_SPEC, "Agents are scaled to zero.")
    return Cond("Suspended", FALSE, ACTIVE, "Agents run as specified.")


def ready_condition(
    *,
    conflicts: Sequence[str],
    suspended: bool,
    billing: Cond,
    namespaces: int,
    agents: int,
) -> Cond:
    """Ready, in this order of precedence: a conflict, suspension, billing, else ready."""
    if conflicts:
        return Cond(
            "Ready",
            FALSE,
            NAMESPACE_CONFLICT,
            f"Namespace {', '.join(conflicts)} belongs to another tenant: remove it from "
            "spec.namespaces or from the other tenant.",
        )
    if suspended:
        return Cond(
            "Ready",
            FALSE,
            SUSPENDED,
            "spec.suspended is true: the tenant's agents are scaled to zero.",
        )
    if billing.status != TRUE:
        return Cond("Ready", FALSE, billing.reason, billing.message)
    return Cond("Ready", TRUE, TENANT_READY, f"{namespaces} namespaces ready; {agents} agents.")


# -- events -----------------------------------------------------------------------
def pass_events(
    previous: Sequence[Mapping[str, Any]], decided: Sequence[Cond], released: Sequence[str]
) -> list[events.Event]:
    """An event per condition that appeared or flipped (Normal when True, Warning when
    not, with the condition's reason), and one for released namespaces."""
    told: list[events.Event] = []
    for cond in decided:
        before = find(previous, cond.type)
        if before is not None and before.get("status") == cond.status:
            continue
        type_ = events.NORMAL if cond.status == TRUE else events.WARNING
        told.append(events.Event(type_, cond.reason, cond.message))
    if released:
        told.append(
            events.Event(
                events.NORMAL,
                EVENT_NAMESPACES_RELEASED,
                f"Namespaces left the spec: {', '.join(released)}.",
            )
        )
    return told


# -- deletion ---------------------------------------------------------------------
class Deletion(NamedTuple):
    """What a finalizer pass does next: retry later (with a condition), or release."""

    retry_after: float | None
    condition: Cond | None
    event: events.Event | None


def overdue(deletion_timestamp: str, now: dt.datetime) -> bool:
    started = dt.datetime.strptime(deletion_timestamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    return now - started > FINALIZE_DEADLINE


def deletion_outcome(problems: Sequence[str], *, overdue: bool) -> Deletion:
    """Retry a failed deletion until the deadline; then release the finalizer anyway."""
    if not problems:
        return Deletion(None, None, None)
    detail = "; ".join(problems)
    if not overdue:
        message = "Deleting the tenant failed, retrying: " + detail
        return Deletion(
            DELETION_RETRY_SECONDS,
            Cond("Ready", FALSE, DELETION_FAILED, message),
            events.Event(events.WARNING, DELETION_FAILED, message),
        )
    return Deletion(
        None,
        None,
        events.Event(
            events.WARNING,
            EVENT_DELETION_ABANDONED,
            "Gave up after 10 minutes and released the tenant: " + detail,
        ),
    )


def invalid_spec_on_deletion(message: str) -> events.Event:
    """Nothing can be applied from an invalid spec: the finalizer is released."""
    return events.Event(
        events.WARNING,
        EVENT_DELETION_ABANDONED,
        f"The spec is invalid, the deletion policy was not applied: {message}",
    )
