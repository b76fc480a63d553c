"""Who may approve a step: the admission check on Workflow edits (pure).

An approval is a step id added to ``spec.approvals``. When the step lists
``approval.approvers``, the user who makes the edit must be one of them, or belong to
a group that is. The API server knows who that is (the admission request's
``userInfo``); ``managedFields`` only names field managers (``kubectl-edit``,
``kubectl-patch``, ``argocd-controller``), which are not people. So the operator's
validating webhook checks every CREATE and UPDATE of a Workflow whose steps name
approvers, and refuses an edit that adds an approval its author may not give. The
engine then trusts ``spec.approvals``: whatever is in it got past this check.

The approvers that count are those in force before the edit: an edit cannot add
its author to a step's approvers and approve the step in one go. A step that had no
approvers before the edit is judged by the approvers the edit gives it. Removing an
approval is never refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

WEBHOOK_ID = "workflow-approvers"
# The webhook is only called for Workflows that name approvers (before or after the
# edit), so that an operator that is down blocks no other Workflow edit.
MATCH_CONDITION = (
    "(has(object.spec.steps) && object.spec.steps.exists(s, has(s.approval) && "
    "has(s.approval.approvers))) || (oldObject != null && has(oldObject.spec.steps) && "
    "oldObject.spec.steps.exists(s, has(s.approval) && has(s.approval.approvers)))"
)


def _approvers(spec: Mapping[str, Any] | None) -> dict[str, tuple[int, list[str]]]:
    """Per step id: its index and its approvers (only steps that name some)."""
    found: dict[str, tuple[int, list[str]]] = {}
    for index, step in enumerate((spec or {}).get("steps") or []):
        approval = step.get("approval") or {}
        names = approval.get("approvers")
        if names:
            found[str(step.get("id"))] = (index, [str(n) for n in names])
    return found


def refusal(
    old_spec: Mapping[str, Any] | None,
    new_spec: Mapping[str, Any],
    *,
    user: str,
    groups: Sequence[str] = (),
) -> str | None:
    """Why ``user`` may not make this edit of ``spec.approvals``, or None when it may."""
    before = set((old_spec or {}).get("approvals") or [])
    added = [a for a in new_spec.get("approvals") or [] if a not in before]
    if not added:
        return None
    old_rules = _approvers(old_spec)
    new_rules = _approvers(new_spec)
    for step_id in added:
        rule = old_rules.get(step_id) or new_rules.get(step_id)
        if rule is None:
            continue
        index, approvers = rule
        if user in approvers or set(groups) & set(approvers):
            continue
        return (
            f"{user or 'this user'} may not approve step {step_id!r}: spec.steps[{index}]."
            f"approval.approvers allows {', '.join(approvers)}; ask one of them to add "
            f"{step_id} to spec.approvals"
        )
    return None
