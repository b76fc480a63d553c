"""What Stripe's payment events mean for a Tenant: conditions and suspension (pure).

Input: the customer's `stripe_webhooks.PaymentState` (kept by the webhook inbox), the
time, and the grace period (an operator setting). Output: the ``PaymentFailed``
condition, an opinion on ``BillingReady`` (None: no opinion, the Stripe setup's
condition stands), whether the tenant is suspended for payment, and when to look
again (the moment a grace period ends), so the reconciler needs no polling.

- An invoice payment failed and no payment came after it: ``PaymentFailed=True``;
  once the grace period has passed since the first failure, the tenant is suspended
  (``PaymentOverdue``). A later ``invoice.paid`` clears both: work resumes.
- The subscription was cancelled, or Stripe gave up on it (``unpaid``,
  ``incomplete_expired``): ``BillingReady=False`` and, after the grace period from
  that event, suspension. A subscription that becomes active again resumes.
Reasons are constants, documented in docs/billing.md ("Webhooks"). The Tenant
reconciler applies the decision: ``PaymentFailed``, and ``Suspended=True`` with the
suspension's reason in its status, which the Agent reconciler honours like
``spec.suspended`` (`suspends`); the user's spec is never written.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bmad_integrations import stripe_webhooks
from bmad_operator import events
from bmad_operator.conditions import FALSE, TRUE, Cond, find

PAYMENT_FAILED = "PaymentFailed"
# Reasons.
PAYMENTS_CURRENT = "PaymentsCurrent"
INVOICE_PAYMENT_FAILED = "InvoicePaymentFailed"
PAYMENT_OVERDUE = "PaymentOverdue"
SUBSCRIPTION_CANCELED = "SubscriptionCanceled"
SUBSCRIPTION_UNPAID = "SubscriptionUnpaid"
BILLING_REMOVED = "BillingRemoved"

SUSPENDED = "Suspended"
# The reasons of a Suspended condition that payments set (docs/billing.md).
SUSPENSION_REASONS = frozenset({PAYMENT_OVERDUE, SUBSCRIPTION_CANCELED, SUBSCRIPTION_UNPAID})
PAYMENT_RESUMED = "PaymentResumed"

# Why a payment suspension was lifted, by the reason it had (the flip's Event).
_RESUMED_BECAUSE = {
    PAYMENT_OVERDUE: "an invoice was paid",
    SUBSCRIPTION_CANCELED: "the subscription is active again",
    SUBSCRIPTION_UNPAID: "the subscription is active again",
}

_GIVEN_UP = {
    "canceled": SUBSCRIPTION_CANCELED,
    "incomplete_expired": SUBSCRIPTION_CANCELED,
    "unpaid": SUBSCRIPTION_UNPAID,
}


@dataclass(frozen=True)
class PaymentDecision:
    payment_failed: Cond
    billing_ready: Cond | None
    suspend: bool
    suspend_reason: str | None
    suspend_message: str | None
    requeue_after: float | None


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def decide(
    state: stripe_webhooks.PaymentState | None, *, now: dt.datetime, grace: dt.timedelta
) -> PaymentDecision:
    """The Tenant's payment conditions and suspension at ``now``."""
    deadlines: list[dt.datetime] = []
    suspend_reason: str | None = None
    suspend_message: str | None = None
    billing_ready: Cond | None = None
    payment_failed = Cond(PAYMENT_FAILED, FALSE, PAYMENTS_CURRENT, "No unpaid invoice.")

    if state is not None and state.failed_since is not None:
        deadline = state.failed_since + grace
        if now >= deadline:
            suspend_reason = PAYMENT_OVERDUE
            suspend_message = (
                f"An invoice payment failed at {_stamp(state.failed_since)} and nothing was "
                f"paid within the grace period: the tenant's agents are suspended since "
                f"{_stamp(deadline)} until an invoice is paid."
            )
            payment_failed = Cond(PAYMENT_FAILED, TRUE, PAYMENT_OVERDUE, suspend_message)
        else:
            deadlines.append(deadline)
            payment_failed = Cond(
                PAYMENT_FAILED,
                TRUE,
                INVOICE_PAYMENT_FAILED,
                f"An invoice payment failed at {_stamp(state.failed_since)}: the tenant's "
                f"agents are suspended at {_stamp(deadline)} unless it is paid.",
            )

    given_up = _GIVEN_UP.get(state.subscription_status or "") if state is not None else None
    if state is not None and given_up is not None:
        since = state.subscription_status_at or now
        deadline = since + grace
        what = (
            "was cancelled" if given_up == SUBSCRIPTION_CANCELED else "is unpaid (Stripe gave up)"
        )
        message = (
            f"Stripe subscription {state.subscription_id or '?'} {what} at {_stamp(since)}: "
            "usage is not billed. Create a subscription for the tenant in Stripe (with "
            "metadata bmad_tenant_uid) or remove spec.billing."
        )
        billing_ready = Cond("BillingReady", FALSE, given_up, message)
        if now >= deadline:
            if suspend_reason is None:
                suspend_reason = given_up
                suspend_message = (
                    f"{message} The tenant's agents are suspended since {_stamp(deadline)}."
                )
        else:
            deadlines.append(deadline)

    requeue_after = None
    if suspend_reason is None and deadlines:
        requeue_after = max((min(deadlines) - now).total_seconds(), 0.0)
    return PaymentDecision(
        payment_failed=payment_failed,
        billing_ready=billing_ready,
        suspend=suspend_reason is not None,
        suspend_reason=suspend_reason,
        suspend_message=suspend_message,
        requeue_after=requeue_after,
    )


def billing_removed(previous: Sequence[Mapping[str, Any]]) -> Cond | None:
    """``PaymentFailed`` of a Tenant whose ``spec.billing`` was removed: no payment is
    due any more, so a condition left from when it was billed is cleared; None when
    the status shows none."""
    if find(previous, PAYMENT_FAILED) is None:
        return None
    return Cond(
        PAYMENT_FAILED,
        FALSE,
        BILLING_REMOVED,
        "spec.billing was removed: the tenant is not billed and no payment is due.",
    )


def suspension(decision: PaymentDecision) -> Cond | None:
    """The Tenant's ``Suspended`` condition for a payment suspension; None: none."""
    if not decision.suspend or decision.suspend_reason is None:
        return None
    return Cond(SUSPENDED, TRUE, decision.suspend_reason, decision.suspend_message or "")


def shown_suspension(previous: Sequence[Mapping[str, Any]]) -> Cond | None:
    """The payment suspension the status shows (kept while a replica that took over has
    not read the payment states yet: the agents must not start for a moment)."""
    cond = find(previous, SUSPENDED)
    if cond is None or cond.get("status") != TRUE or cond.get("reason") not in SUSPENSION_REASONS:
        return None
    return Cond(SUSPENDED, TRUE, str(cond["reason"]), str(cond.get("message") or ""))


def suspends(tenant: Mapping[str, Any] | None) -> bool:
    """Whether the Tenant's status says payments suspended it (the Agent reconciler
    scales its agents to zero, as for ``spec.suspended``)."""
    if tenant is None:
        return False
    cond = find((tenant.get("status") or {}).get("conditions") or [], SUSPENDED)
    return bool(
        cond is not None and cond.get("status") == TRUE and cond.get("reason") in SUSPENSION_REASONS
    )


def flip_events(
    previous: Sequence[Mapping[str, Any]], decided: Sequence[Cond]
) -> list[events.Event]:
    """One Event per payment flip: ``PaymentFailed`` set or cleared, a payment
    suspension begun or lifted. A first ``PaymentFailed=False`` says nothing."""
    told: list[events.Event] = []
    removed = any(c.type == PAYMENT_FAILED and c.reason == BILLING_REMOVED for c in decided)
    for cond in decided:
        before = find(previous, cond.type)
        was = before is not None and before.get("status") == TRUE
        if cond.type == SUSPENDED:
            was = was and before is not None and before.get("reason") in SUSPENSION_REASONS
            now = cond.status == TRUE and cond.reason in SUSPENSION_REASONS
        else:
            now = cond.status == TRUE
        if was == now:
            continue
        if now:
            told.append(events.Event(events.WARNING, cond.reason, cond.message))
        else:
            message = cond.message
            if cond.type == SUSPENDED:
                message = (
                    "the tenant's spec.billing was removed"
                    if removed
                    else _RESUMED_BECAUSE.get(
                        str((before or {}).get("reason")), "the tenant's payments are current"
                    )
                )
                message = f"{message[0].upper()}{message[1:]}: the tenant's agents run again."
            reason = PAYMENT_RESUMED if cond.type == SUSPENDED else cond.reason
            told.append(events.Event(events.NORMAL, reason, message))
    return told
