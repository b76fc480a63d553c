"""The Tenant's decisions: what its namespaces, billing and deletion came to in; its
conditions, the events to post and whether to retry or release a deletion out.

Reasons are constants, documented in docs/tenants.md ("Conditions" and "Events").
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

from bmad_crds.v1alpha1 import tenant as tenant_api
from bmad_integrations import base as ibase
from bmad_operator import events
from bmad_operator.conditions import FALSE, TRUE, Cond, find

# Reasons ---------------------------------------------------------------------------
TENANT_READY = "TenantReady"
SUSPENDED = "Suspended"
NAMESPACE_CONFLICT = "NamespaceConflict"
NAMESPACE_PROTECTED = "NamespaceProtected"
NAMESPACE_EXISTS = "NamespaceExists"
INVALID_SPEC = "InvalidSpec"
DELETION_FAILED = "DeletionFailed"
QUOTA_APPLIED = "QuotaApplied"
QUOTA_PENDING = "QuotaPending"
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
# Never a tenant's, whatever their labels say: Kubernetes' own (the `kube-` prefix is
# reserved to it) and `default`; the operator's own namespace is added by the caller.
SYSTEM_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})

CREATE = "Create"  # missing: create it, labelled for the tenant, in one call
HOLD = "Hold"  # labelled for the tenant: set it up
ADOPT = "Adopt"  # exists, unlabelled, handed over to the tenant or created for it
REFUSE = "Refuse"


class NamespaceView(NamedTuple):
    """What a pass saw of one namespace: whether it exists, and its two labels."""

    exists: bool
    tenant: str | None = None  # its bmad.dev/tenant label
    adopt_by: str | None = None  # its adoption label (bmad.dev/adopt-by-tenant)
    created_for: str | None = None  # the tenant the operator created it for, if any


class Refusal(NamedTuple):
    namespace: str
    reason: str  # NamespaceProtected, NamespaceConflict or NamespaceExists
    message: str  # names the namespace and what to do


class Claim(NamedTuple):
    action: str  # CREATE, HOLD, ADOPT or REFUSE
    refusal: Refusal | None = None


def protected(namespace: str, operator_namespace: str) -> bool:
    return (
        namespace in SYSTEM_NAMESPACES
        or namespace.startswith("kube-")
        or namespace == operator_namespace
    )


def claim(tenant: str, namespace: str, seen: NamespaceView, *, operator_namespace: str) -> Claim:
    """What the tenant may do with one namespace of its spec.

    A namespace is the tenant's only if the operator created it for the tenant (it
    carries the tenant's label and mark from its first write) or a cluster admin
    handed it over with the adoption label. Kubernetes' namespaces and the operator's
    own are never a tenant's, adoption label or not.
    """
    if protected(namespace, operator_namespace):
        return Claim(
            REFUSE,
            Refusal(
                namespace,
                NAMESPACE_PROTECTED,
                f"Namespace {namespace} is a system namespace (Kubernetes' or the operator's "
                "own) and is never given to a tenant: remove it from spec.namespaces.",
            ),
        )
    if not seen.exists:
        return Claim(CREATE)
    if seen.tenant == tenant:
        return Claim(HOLD)
    if seen.tenant:
        return Claim(
            REFUSE,
            Refusal(
                namespace,
                NAMESPACE_CONFLICT,
                f"Namespace {namespace} (tenant {seen.tenant}) belongs to another tenant: "
                "remove it from spec.namespaces or from the other tenant.",
            ),
        )
    if tenant in (seen.adopt_by, seen.created_for):
        # Handed over by an admin, or made for this tenant and its label lost since.
        return Claim(ADOPT)
    handed = f" (it is marked for adoption by tenant {seen.adopt_by})" if seen.adopt_by else ""
    return Claim(
        REFUSE,
        Refusal(
            namespace,
            NAMESPACE_EXISTS,
            f"Namespace {namespace} exists and was not created for tenant {tenant}{handed}: "
            "a cluster admin can hand it over with `kubectl label namespace "
            f"{namespace} {tenant_api.ADOPT_LABEL}={tenant}`, or use another name "
            "in spec.namespaces.",
        ),
    )


def to_release(labelled: Iterable[str], held: Sequence[str]) -> list[str]:
    """Namespaces labelled for the tenant that it does not hold (any more): gone from
    the spec, or refused (a system namespace labelled by an older operator)."""
    return [ns for ns in labelled if ns not in held]


def delete_on_release(
    tenant: str, namespace: str, created_for: str | None, *, operator_namespace: str
) -> bool:
    """With `deletionPolicy: Delete`, whether a released namespace is deleted: only one
    the operator created for this tenant (`created_for`: its mark), never an adopted or
    a system one. The others are released."""
    return created_for == tenant and not protected(namespace, operator_namespace)


# -- conditions -------------------------------------------------------------------
def invalid_spec(message: str) -> Cond:
    return Cond("Ready", FALSE, INVALID_SPEC, f"The spec is invalid: {message}")


def quota_counted(quota: Mapping[str, Any]) -> bool:
    """Whether Kubernetes' quota controller has counted a ResourceQuota as it now reads.
    Until then the API server refuses every create its limits cover ("status unknown
    for quota"), and it enforces `status.hard`, not `spec.hard`."""
    hard = (quota.get("spec") or {}).get("hard") or {}
    status = quota.get("status") or {}
    used = status.get("used") or {}
    return status.get("hard") == hard and all(key in used for key in hard)


def quota_condition(*, quota: str | None, namespaces: int, pending: Sequence[str] = ()) -> Cond:
    """`quota`: the name of the ResourceQuota the spec asks for, None when it asks none;
    `pending`: "namespace/name" of our ResourceQuotas not counted yet."""
    if pending:
        return Cond(
            "QuotaReady",
            FALSE,
            QUOTA_PENDING,
            f"Kubernetes has not counted ResourceQuota {', '.join(pending)} yet; until it "
            "has, creates that it limits are refused there. This takes a moment.",
        )
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


def suspended_condition(suspended: bool, payment: Cond | None = None) -> Cond:
    """`payment`: the suspension payments decided (`policies.payments.suspension`)."""
    if suspended:
        return Cond("Suspended", TRUE, SUSPENDED_BY_SPEC, "Agents are scaled to zero.")
    if payment is not None:
        return payment
    return Cond("Suspended", FALSE, ACTIVE, "Agents run as specified.")


# A refused namespace is reported under the gravest of the reasons present.
REFUSAL_PRECEDENCE = (NAMESPACE_PROTECTED, NAMESPACE_CONFLICT, NAMESPACE_EXISTS)


def ready_condition(
    *,
    refused: Sequence[Refusal],
    suspended: bool,
    billing: Cond,
    namespaces: int,
    agents: int,
    quota: Cond | None = None,
    payment_suspension: Cond | None = None,
) -> Cond:
    """Ready, in this order of precedence: a refused namespace, suspension, quotas not
    counted yet, billing, else ready. Every refused namespace is in the message, each
    with its fix."""
    if refused:
        reason = min(refused, key=lambda r: REFUSAL_PRECEDENCE.index(r.reason)).reason
        return Cond("Ready", FALSE, reason, " ".join(r.message for r in refused))
    if suspended:
        return Cond(
            "Ready",
            FALSE,
            SUSPENDED,
            "spec.suspended is true: the tenant's agents are scaled to zero.",
        )
    if payment_suspension is not None:
        return Cond("Ready", FALSE, payment_suspension.reason, payment_suspension.message)
    if quota is not None and quota.status != TRUE:
        return Cond("Ready", FALSE, quota.reason, quota.message)
    if billing.status != TRUE:
        return Cond("Ready", FALSE, billing.reason, billing.message)
    return Cond("Ready", TRUE, TENANT_READY, f"{namespaces} namespaces ready; {agents} agents.")


# -- events -----------------------------------------------------------------------
def pass_events(
    previous: Sequence[Mapping[str, Any]], decided: Sequence[Cond], released: Sequence[str]
) -> list[events.Event]:
    """An event per condition that appeared or flipped (Normal when True, Warning when
    not, with the condition's reason; none for a quota not counted yet), and one for
    released namespaces."""
    told: list[events.Event] = []
    for cond in decided:
        before = find(previous, cond.type)
        if before is not None and before.get("status") == cond.status:
            continue
        if cond.reason == QUOTA_PENDING:
            continue  # every new quota is briefly uncounted: nothing to warn about
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
