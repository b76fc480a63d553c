"""`bmad workflow approve`: the edit it makes, against the in-memory API server."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_cli import workflows
from bmad_operator import errors, store

from ..operator.fake_kube import FakeKube

pytestmark = pytest.mark.unit

NS = "team-a"


def seeded(status: dict[str, Any] | None = None, approvals: list[str] | None = None) -> FakeKube:
    kube = FakeKube()
    body: dict[str, Any] = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {"name": "todo", "namespace": NS},
        "spec": {
            "steps": [
                {"id": "brief", "agent": "analyst", "creates": "brief.md"},
                {"id": "prd", "agent": "pm", "creates": "prd.md", "approval": {}},
            ],
            **({"approvals": approvals} if approvals is not None else {}),
        },
    }
    if status is not None:
        body["status"] = status
    kube.seed(body, store.Store())
    return kube


def approvals_of(kube: FakeKube) -> list[str]:
    found = kube.find("Workflow", NS, "todo")
    assert found is not None
    return list(found["spec"].get("approvals") or [])


async def test_approving_adds_the_step_with_the_version_it_read() -> None:
    kube = seeded({"phase": "AwaitingApproval"}, approvals=["other"])

    outcome = await workflows.approve(kube, namespace=NS, name="todo", step="prd")  # type: ignore[arg-type]

    assert outcome == (True, "approved step prd of Workflow todo (it was waiting for it)")
    assert approvals_of(kube) == ["other", "prd"]
    [(_, _, patch)] = kube.patches
    assert patch["metadata"]["resourceVersion"]  # a concurrent edit is a conflict


async def test_approving_twice_changes_nothing() -> None:
    kube = seeded(approvals=["prd"])
    outcome = await workflows.approve(kube, namespace=NS, name="todo", step="prd")  # type: ignore[arg-type]
    assert outcome.ok
    assert "already approved" in outcome.message
    assert kube.patches == []


@pytest.mark.parametrize(
    ("name", "step", "words"),
    [
        ("todo", "qa", "has no step 'qa' (its steps: brief, prd)"),
        ("todo", "brief", "has no approval gate"),
        ("gone", "prd", "Workflow gone not found in namespace team-a"),
    ],
)
async def test_what_cannot_be_approved_says_why(name: str, step: str, words: str) -> None:
    kube = seeded()
    outcome = await workflows.approve(kube, namespace=NS, name=name, step=step)  # type: ignore[arg-type]
    assert not outcome.ok
    assert words in outcome.message
    assert kube.patches == []


async def test_a_refusal_of_the_admission_check_is_shown() -> None:
    kube = seeded()
    refused = errors.ApiError(403, "Forbidden", "bob may not approve step 'prd': ...")

    async def refuse(*args: Any) -> dict[str, Any]:
        raise refused

    kube.merge_patch = refuse  # type: ignore[method-assign]
    outcome = await workflows.approve(kube, namespace=NS, name="todo", step="prd")  # type: ignore[arg-type]
    assert outcome == (
        False,
        "the API server refused the approval: bob may not approve step 'prd': ...",
    )
