"""The Tenant's decisions, pure: what a pass observed in; conditions, events, next step out."""

from __future__ import annotations

import datetime as dt

import pytest

from bmad_operator.conditions import FALSE, TRUE, Cond
from bmad_operator.policies import tenant as policy

pytestmark = pytest.mark.unit

BILLING_OK = policy.no_billing()
BILLING_BAD = policy.billing_failed("AuthenticationFailed", "Stripe refused the API key.")
OPERATOR_NS = "bmad-system"


def _refusal(namespace: str, seen: policy.NamespaceView) -> policy.Refusal:
    decided = policy.claim("acme", namespace, seen, operator_namespace=OPERATOR_NS)
    assert decided.action == policy.REFUSE
    assert decided.refusal is not None
    return decided.refusal


CONFLICT = _refusal("shared", policy.NamespaceView(True, tenant="globex"))
EXISTS = _refusal("legacy", policy.NamespaceView(True))
PROTECTED = _refusal("kube-system", policy.NamespaceView(True))


def _ready(**kw: object) -> Cond:
    args: dict[str, object] = {
        "refused": [],
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
            {"refused": [CONFLICT], "suspended": True, "billing": BILLING_BAD},
            "NamespaceConflict",
        ),
        ({"refused": [EXISTS, CONFLICT, PROTECTED]}, "NamespaceProtected"),
        ({"refused": [EXISTS, CONFLICT]}, "NamespaceConflict"),
    ],
    ids=[
        "ready",
        "billing",
        "suspended-over-billing",
        "conflict-over-all",
        "protected-first",
        "conflict-over-exists",
    ],
)
def test_ready_precedence_conflict_then_suspension_then_billing(
    situation: dict[str, object], reason: str
) -> None:
    ready = _ready(**situation)
    assert ready.reason == reason
    assert ready.status == (TRUE if reason == "TenantReady" else FALSE)


def test_ready_messages_say_what_to_change() -> None:
    assert _ready().message == "2 namespaces ready; 3 agents."
    conflict = _ready(refused=[CONFLICT]).message
    assert "shared (tenant globex)" in conflict
    assert "remove it from spec.namespaces" in conflict
    both = _ready(refused=[CONFLICT, EXISTS]).message
    assert "shared (tenant globex)" in both
    assert "kubectl label namespace legacy bmad.dev/adopt-by-tenant=acme" in both
    assert _ready(billing=BILLING_BAD).message == BILLING_BAD.message


@pytest.mark.parametrize(
    ("namespace", "seen", "action", "reason"),
    [
        ("new", policy.NamespaceView(False), policy.CREATE, None),
        ("mine", policy.NamespaceView(True, tenant="acme"), policy.HOLD, None),
        ("theirs", policy.NamespaceView(True, tenant="globex"), policy.REFUSE, "NamespaceConflict"),
        ("legacy", policy.NamespaceView(True), policy.REFUSE, "NamespaceExists"),
        (
            "handed",
            policy.NamespaceView(True, adopt_by="acme"),
            policy.ADOPT,
            None,
        ),
        # made for the tenant, its label removed since: put back
        ("relabel", policy.NamespaceView(True, created_for="acme"), policy.ADOPT, None),
        (
            "made-for-globex",
            policy.NamespaceView(True, created_for="globex"),
            policy.REFUSE,
            "NamespaceExists",
        ),
        (
            "to-globex",
            policy.NamespaceView(True, adopt_by="globex"),
            policy.REFUSE,
            "NamespaceExists",
        ),
        # Kubernetes' own and the operator's: never, not even labelled or handed over.
        (
            "kube-system",
            policy.NamespaceView(True, tenant="acme"),
            policy.REFUSE,
            "NamespaceProtected",
        ),
        ("kube-anything", policy.NamespaceView(False), policy.REFUSE, "NamespaceProtected"),
        (
            "default",
            policy.NamespaceView(True, adopt_by="acme"),
            policy.REFUSE,
            "NamespaceProtected",
        ),
        (
            OPERATOR_NS,
            policy.NamespaceView(True, adopt_by="acme"),
            policy.REFUSE,
            "NamespaceProtected",
        ),
    ],
)
def test_a_namespace_is_the_tenants_only_if_made_for_it_or_handed_over(
    namespace: str, seen: policy.NamespaceView, action: str, reason: str | None
) -> None:
    decided = policy.claim("acme", namespace, seen, operator_namespace=OPERATOR_NS)
    assert decided.action == action
    assert (decided.refusal.reason if decided.refusal else None) == reason
    if decided.refusal:
        assert decided.refusal.namespace == namespace
        assert f"Namespace {namespace} " in decided.refusal.message


def test_only_a_namespace_created_for_the_tenant_is_ever_deleted() -> None:
    def deleted(ns: str, created_for: str | None) -> bool:
        return policy.delete_on_release("acme", ns, created_for, operator_namespace=OPERATOR_NS)

    assert deleted("acme-prod", "acme")
    assert not deleted("adopted", None)
    assert not deleted("made-for-globex", "globex")
    assert not deleted("kube-system", "acme")
    assert not deleted(OPERATOR_NS, "acme")


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
