"""What payment events mean for a Tenant: PaymentFailed, BillingReady, suspension."""

from __future__ import annotations

import datetime as dt

import pytest

from bmad_integrations.stripe_webhooks import PaymentState
from bmad_operator.policies import payments

pytestmark = pytest.mark.unit

T0 = dt.datetime(2026, 5, 1, 12, 0, tzinfo=dt.UTC)
GRACE = dt.timedelta(days=3)


def test_no_state_or_a_paid_state_is_current() -> None:
    for state in (None, PaymentState("cus_A", last_paid_at=T0)):
        decision = payments.decide(state, now=T0, grace=GRACE)
        assert decision.payment_failed.status == "False"
        assert decision.payment_failed.reason == payments.PAYMENTS_CURRENT
        assert decision.billing_ready is None
        assert not decision.suspend
        assert decision.requeue_after is None


def test_a_failed_payment_warns_then_suspends_after_the_grace_period() -> None:
    state = PaymentState("cus_A", failed_since=T0, last_failure_at=T0)
    warned = payments.decide(state, now=T0 + dt.timedelta(hours=1), grace=GRACE)
    assert warned.payment_failed.status == "True"
    assert warned.payment_failed.reason == payments.INVOICE_PAYMENT_FAILED
    assert "2026-05-04T12:00:00Z" in warned.payment_failed.message
    assert not warned.suspend
    assert warned.requeue_after == (GRACE - dt.timedelta(hours=1)).total_seconds()

    overdue = payments.decide(state, now=T0 + GRACE, grace=GRACE)
    assert overdue.suspend
    assert overdue.suspend_reason == payments.PAYMENT_OVERDUE
    assert overdue.payment_failed.reason == payments.PAYMENT_OVERDUE
    assert overdue.requeue_after is None


def test_paying_resumes() -> None:
    paid = PaymentState("cus_A", failed_since=None, last_failure_at=T0, last_paid_at=T0)
    decision = payments.decide(paid, now=T0 + 2 * GRACE, grace=GRACE)
    assert not decision.suspend
    assert decision.payment_failed.status == "False"


def test_zero_grace_suspends_at_once() -> None:
    state = PaymentState("cus_A", failed_since=T0)
    assert payments.decide(state, now=T0, grace=dt.timedelta(0)).suspend


@pytest.mark.parametrize(
    ("status", "reason"),
    [
        ("canceled", payments.SUBSCRIPTION_CANCELED),
        ("incomplete_expired", payments.SUBSCRIPTION_CANCELED),
        ("unpaid", payments.SUBSCRIPTION_UNPAID),
    ],
)
def test_a_subscription_stripe_gave_up_on_is_not_billing_ready(status: str, reason: str) -> None:
    state = PaymentState(
        "cus_A", subscription_id="sub_1", subscription_status=status, subscription_status_at=T0
    )
    early = payments.decide(state, now=T0, grace=GRACE)
    assert early.billing_ready is not None
    assert (early.billing_ready.status, early.billing_ready.reason) == ("False", reason)
    assert "sub_1" in early.billing_ready.message
    assert not early.suspend
    assert early.requeue_after == GRACE.total_seconds()
    late = payments.decide(state, now=T0 + GRACE, grace=GRACE)
    assert late.suspend
    assert late.suspend_reason == reason


@pytest.mark.parametrize("status", ["active", "trialing", "past_due"])
def test_live_subscriptions_leave_billing_ready_alone(status: str) -> None:
    state = PaymentState("cus_A", subscription_status=status, subscription_status_at=T0)
    decision = payments.decide(state, now=T0 + 10 * GRACE, grace=GRACE)
    assert decision.billing_ready is None
    assert not decision.suspend


def test_the_earliest_deadline_is_when_to_look_again() -> None:
    state = PaymentState(
        "cus_A",
        failed_since=T0 + dt.timedelta(days=1),
        subscription_status="canceled",
        subscription_status_at=T0,
    )
    decision = payments.decide(state, now=T0, grace=GRACE)
    assert decision.requeue_after == GRACE.total_seconds()


def _tenant(*conds: dict[str, str]) -> dict[str, object]:
    return {"status": {"conditions": list(conds)}}


def test_only_a_payment_suspension_in_status_suspends_the_agents() -> None:
    overdue = {"type": "Suspended", "status": "True", "reason": payments.PAYMENT_OVERDUE}
    by_spec = {"type": "Suspended", "status": "True", "reason": "SuspendedBySpec"}
    lifted = {"type": "Suspended", "status": "False", "reason": "Active"}
    assert payments.suspends(_tenant(overdue))
    assert not payments.suspends(_tenant(by_spec))  # spec.suspended says that itself
    assert not payments.suspends(_tenant(lifted))
    assert not payments.suspends(None)


def test_one_event_per_payment_flip_none_for_a_first_current_state() -> None:
    state = PaymentState("cus_A", failed_since=T0, last_failure_at=T0)
    warned = payments.decide(state, now=T0, grace=GRACE)
    overdue = payments.decide(state, now=T0 + GRACE, grace=GRACE)
    current = payments.decide(None, now=T0, grace=GRACE)
    suspension = payments.suspension(overdue)
    assert suspension is not None
    assert payments.suspension(warned) is None
    active = payments.Cond("Suspended", "False", "Active", "Agents run as specified.")

    def shown(*conds: payments.Cond) -> list[dict[str, str]]:
        return [{"type": c.type, "status": c.status, "reason": c.reason} for c in conds]

    assert payments.flip_events([], [current.payment_failed, active]) == []
    told = payments.flip_events(shown(current.payment_failed, active), [warned.payment_failed])
    assert [(e.type, e.reason) for e in told] == [("Warning", payments.INVOICE_PAYMENT_FAILED)]
    assert payments.flip_events(shown(warned.payment_failed), [overdue.payment_failed]) == []
    told = payments.flip_events(shown(active), [suspension])
    assert [(e.type, e.reason) for e in told] == [("Warning", payments.PAYMENT_OVERDUE)]
    told = payments.flip_events(
        shown(overdue.payment_failed, suspension), [current.payment_failed, active]
    )
    assert [(e.type, e.reason) for e in told] == [
        ("Normal", payments.PAYMENTS_CURRENT),
        ("Normal", payments.PAYMENT_RESUMED),
    ]
    assert told[1].message == "An invoice was paid: the tenant's agents run again."


def test_a_lifted_suspension_says_why_and_removed_billing_clears_payment_failed() -> None:
    active = payments.Cond("Suspended", "False", "Active", "Agents run as specified.")
    for reason, why in (
        (payments.SUBSCRIPTION_CANCELED, "The subscription is active again"),
        (payments.SUBSCRIPTION_UNPAID, "The subscription is active again"),
    ):
        previous = [{"type": "Suspended", "status": "True", "reason": reason}]
        (told,) = payments.flip_events(previous, [active])
        assert (told.reason, told.message) == (
            payments.PAYMENT_RESUMED,
            f"{why}: the tenant's agents run again.",
        )
    assert payments.billing_removed([]) is None
    previous = [
        {"type": "PaymentFailed", "status": "True", "reason": payments.PAYMENT_OVERDUE},
        {"type": "Suspended", "status": "True", "reason": payments.PAYMENT_OVERDUE},
    ]
    cleared = payments.billing_removed(previous)
    assert cleared is not None
    assert (cleared.status, cleared.reason) == ("False", payments.BILLING_REMOVED)
    told = payments.flip_events(previous, [cleared, active])
    assert [(e.type, e.reason) for e in told] == [
        ("Normal", payments.BILLING_REMOVED),
        ("Normal", payments.PAYMENT_RESUMED),
    ]
    assert told[1].message.startswith("The tenant's spec.billing was removed")
