"""The Tenant's decisions, pure: what a pass observed in; conditions, events, next step out."""

from __future__ import annotations

import datetime as dt

import pytest

from bmad_operator.conditions import FALSE, TRUE, Cond
from bmad_operator.policies import tenant as policy

pytestmark = pytest.mark.unit

BILLING_OK = policy.no_billing()
BILLING_BAD = policy.billing_failed("AuthenticationFailed", "Stripe refused the API key.")


def _ready(**kw: object) -> Cond:
    args: dict[str, object] = {
        "conflicts": [],
        "suspended": False,
        "billing": BILLING_OK,
        "namespaces": 2,
        "agents": 3,
    }
    args.update(kw)
    return policy.ready_condition(**args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("situation", "reason"),
    [
        ({}, "TenantReady"),
        ({"billing": BILLING_BAD}, "AuthenticationFailed"),
        ({"suspended": True, "billing": BILLING_BAD}, "Suspended"),
        (
            {"conflicts": ["x (tenant y)"], "suspended": True, "billing": BILLING_BAD},
            "NamespaceConflict",
        ),
    ],
    ids=["ready", "billing", "suspended-over-billing", "conflict-over-all"],
)
def test_ready_precedence_conflict_then_suspension_then_billing(
    situation: dict[str, object], reason: str
) -> None:
    ready = _ready(**situation)
    assert ready.reason == reason
    assert ready.status == (TRUE if reason == "TenantReady" else FALSE)


def test_ready_messages_say_what_to_change() -> None:
    assert _ready().message == "2 namespaces ready; 3 agents."
    conflict = _ready(conflicts=["shared (tenant globex)"]).message
    assert "shared (tenant globex)" in conflict
    assert "remove it from spec.namespaces" in conflict
    assert _ready(billing=BILLING_BAD).message == BILLING_BAD.message


def test_plan_keeps_unlabelled_and_own_namespaces_and_names_the_others() -> None:
    plan = policy.plan_namespaces(
        "acme", ["free", "mine", "theirs"], {"free": None, "mine": "acme", "theirs": "globex"}
    )
    assert plan.claimed == ["free", "mine"]
    assert plan.conflicts == ["theirs (tenant globex)"]


def test_only_labelled_namespaces_gone_from_the_spec_are_released() -> None:
    assert policy.to_release(["a", "b", "c"], ["a", "c", "d"]) == ["b"]


def test_quota_and_suspension_conditions() -> None:
    assert policy.quota_condition(quota=None, namespaces=2).reason == "NoQuota"
    applied = policy.quota_condition(quota="bmad-tenant-quota", namespaces=2)
    assert (applied.reason, applied.message) == (
        "QuotaApplied",
        "ResourceQuota bmad-tenant-quota applied in 2 namespaces.",
    )
    assert policy.suspended_condition(True)[1:3] == (TRUE, "SuspendedBySpec")
    assert policy.suspended_condition(False)[1:3] == (FALSE, "Active")


def test_events_only_for_conditions_that_appear_or_flip() -> None:
    previous = [
        {"type": "Ready", "status": "True", "reason": "TenantReady"},
        {"type": "BillingReady", "status": "True", "reason": "NoBilling"},
    ]
    unchanged = [_ready(), BILLING_OK]
    assert policy.pass_events(previous, unchanged, []) == []
    flipped = [_ready(billing=BILLING_BAD), BILLING_BAD]
    told = policy.pass_events(previous, flipped, ["old-ns"])
    assert [(e.type, e.reason) for e in told] == [
        ("Warning", "AuthenticationFailed"),
        ("Warning", "AuthenticationFailed"),
        ("Normal", "NamespacesReleased"),
    ]
    assert "old-ns" in told[-1].message
    first = policy.pass_events([], unchanged, [])
    assert [(e.type, e.reason) for e in first] == [
        ("Normal", "TenantReady"),
        ("Normal", "NoBilling"),
    ]


def test_deletion_is_retried_until_the_deadline_then_released() -> None:
    assert policy.deletion_outcome([], overdue=False) == (None, None, None)
    retry = policy.deletion_outcome(["namespace a: forbidden"], overdue=False)
    assert retry.retry_after == 15.0
    assert retry.condition is not None
    assert (retry.condition.reason, retry.condition.status) == ("DeletionFailed", FALSE)
    assert retry.event is not None
    assert retry.event.reason == "DeletionFailed"
    assert "namespace a: forbidden" in retry.condition.message
    give_up = policy.deletion_outcome(["namespace a: forbidden"], overdue=True)
    assert give_up.retry_after is None
    assert give_up.condition is None
    assert give_up.event is not None
    assert give_up.event.reason == "DeletionAbandoned"


def test_overdue_after_ten_minutes() -> None:
    now = dt.datetime(2025, 1, 1, 12, 0, 0, tzinfo=dt.UTC)
    assert not policy.overdue("2025-01-01T11:51:00Z", now)
    assert policy.overdue("2025-01-01T11:49:59Z", now)
