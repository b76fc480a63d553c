"""Who may approve a step: the admission check of Workflow edits (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_operator.workflows import approvals

pytestmark = pytest.mark.unit


def spec(approved: list[str] | None = None, approvers: list[str] | None = None) -> dict[str, Any]:
    gate: dict[str, Any] = {"prompt": "Is the PRD complete?"}
    if approvers is not None:
        gate["approvers"] = approvers
    body: dict[str, Any] = {
        "steps": [
            {"id": "brief", "agent": "analyst", "creates": "brief.md"},
            {"id": "prd", "agent": "pm", "creates": "prd.md", "approval": gate},
        ]
    }
    if approved is not None:
        body["approvals"] = approved
    return body


def test_an_approver_may_approve() -> None:
    old, new = spec(approvers=["alice"]), spec(["prd"], approvers=["alice"])
    assert approvals.refusal(old, new, user="alice") is None


def test_someone_else_is_refused_with_the_field_and_who_may() -> None:
    old, new = spec(approvers=["alice", "product-leads"]), spec(["prd"], ["alice", "product-leads"])
    assert approvals.refusal(old, new, user="bob") == (
        "bob may not approve step 'prd': spec.steps[1].approval.approvers allows alice, "
        "product-leads; ask one of them to add prd to spec.approvals"
    )


def test_a_group_among_the_approvers_lets_its_members_approve() -> None:
    old, new = spec(approvers=["product-leads"]), spec(["prd"], approvers=["product-leads"])
    assert approvals.refusal(old, new, user="carol", groups=["staff", "product-leads"]) is None


def test_an_edit_cannot_make_its_author_an_approver_and_approve_at_once() -> None:
    old, new = spec(approvers=["alice"]), spec(["prd"], approvers=["alice", "mallory"])
    assert approvals.refusal(old, new, user="mallory") is not None


def test_steps_without_approvers_and_removals_are_anyone_s() -> None:
    assert approvals.refusal(spec(), spec(["prd"]), user="bob") is None
    assert approvals.refusal(spec(["prd"], ["alice"]), spec([], ["alice"]), user="bob") is None
    unchanged = spec(["prd"], ["alice"])
    assert approvals.refusal(unchanged, unchanged, user="bob") is None


def test_a_workflow_created_with_approvals_is_judged_by_its_own_approvers() -> None:
    assert approvals.refusal(None, spec(["prd"], ["alice"]), user="bob") is not None
    assert approvals.refusal(None, spec(["prd"], ["alice"]), user="alice") is None
