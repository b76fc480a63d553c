"""`bmad workflow approve NAME STEP`: add a step's id to a Workflow's spec.approvals.

The same edit a GitOps commit or `kubectl edit` makes, for people at a terminal. It
reads the Workflow, checks that the step exists and has an approval gate, and writes
the new list with the resourceVersion it read (a merge patch replaces a list whole,
so a concurrent edit would otherwise be lost); on a conflict it reads again. The
edit is made as the user of the current kubeconfig context, which is who the
operator's admission check compares with the step's approvers.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from kubernetes_asyncio import config as k8s_config

from bmad_operator import errors, kube

ATTEMPTS = 5


class Outcome(NamedTuple):
    ok: bool
    message: str


def current_namespace() -> str:
    """The namespace of the current kubeconfig context, else "default"."""
    try:
        _, active = k8s_config.list_kube_config_contexts()
    except (k8s_config.ConfigException, OSError):
        return "default"
    return str(((active or {}).get("context") or {}).get("namespace") or "default")


def check_step(workflow: dict[str, Any], step: str) -> str | None:
    """Why ``step`` cannot be approved in ``workflow``, or None."""
    steps = (workflow.get("spec") or {}).get("steps") or []
    found = next((s for s in steps if s.get("id") == step), None)
    name = workflow["metadata"]["name"]
    if found is None:
        ids = ", ".join(str(s.get("id")) for s in steps)
        return f"Workflow {name} has no step {step!r} (its steps: {ids})"
    approval = found.get("approval")
    if approval is None or approval.get("required") is False:
        return f"step {step!r} of Workflow {name} has no approval gate: nothing to approve"
    return None


async def approve(api: kube.Kube, *, namespace: str, name: str, step: str) -> Outcome:
    """Add ``step`` to spec.approvals of the Workflow; an outcome to print."""
    for _ in range(ATTEMPTS):
        workflow = await api.get("Workflow", namespace, name)
        if workflow is None:
            return Outcome(False, f"Workflow {name} not found in namespace {namespace}")
        problem = check_step(workflow, step)
        if problem:
            return Outcome(False, problem)
        approved = list((workflow.get("spec") or {}).get("approvals") or [])
        if step in approved:
            return Outcome(True, f"step {step} of Workflow {name} was already approved")
        patch = {
            "metadata": {"resourceVersion": workflow["metadata"]["resourceVersion"]},
            "spec": {"approvals": [*approved, step]},
        }
        try:
            await api.merge_patch("Workflow", namespace, name, patch)
        except errors.ApiError as exc:
            if exc.status == 409:
                continue  # changed since we read it: read again
            return Outcome(False, f"the API server refused the approval: {exc.message}")
        phase = (workflow.get("status") or {}).get("phase")
        waiting = " (it was waiting for it)" if phase == "AwaitingApproval" else ""
        return Outcome(True, f"approved step {step} of Workflow {name}{waiting}")
    return Outcome(False, f"Workflow {name} kept changing: try again")


async def run_approve(*, namespace: str | None, name: str, step: str) -> Outcome:
    api = await kube.Kube.connect()
    try:
        return await approve(api, namespace=namespace or current_namespace(), name=name, step=step)
    finally:
        await api.close()
