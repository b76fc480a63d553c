"""The engine's values on the task wire: a dispatch becomes an `AgentTask`, a stored
result becomes a :class:`tasks.Result`. Pure: no Redis, no API server.

Where artifacts go is decided here, so that every attempt of a step writes the same
object key and each write is a new version of it: ``<prefix><artifact>`` for a step,
``<prefix>items/<item>/<artifact>`` for one item of a repeated step, where the prefix is
``spec.artifacts.prefix`` or ``<namespace>/<workflow>/``. A Workflow without
``spec.artifacts`` keeps its artifacts in the task results themselves: a step that
needs one gets its content in the task (``content``) instead of a reference.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

from bmad_crds.v1alpha1 import workflow as api
from bmad_integrations import taskwire
from bmad_operator.workflows import tasks

# outputs['step-id'].name and outputs.step.name, as conditions read them.
_INDEXED = re.compile(r"""outputs\s*\[\s*['"]([-a-z0-9]+)['"]\s*\]\s*\.\s*([A-Za-z_]\w*)""")
_DOTTED = re.compile(r"outputs\s*\.\s*([a-z0-9]+)\s*\.\s*([A-Za-z_]\w*)")


def prefix(workflow: api.Workflow) -> str:
    """The key prefix of the run's artifacts, ending in ``/``."""
    given = workflow.spec.artifacts.prefix if workflow.spec.artifacts else None
    if given:
        return given.strip("/") + "/"
    meta = workflow.metadata
    return f"{meta.namespace}/{meta.name}/"


def artifact_key(base: str, name: str, item: str | None) -> str:
    return f"{base}{name}" if item is None else f"{base}items/{item}/{name}"


def outputs_read(spec: api.WorkflowSpec) -> dict[str, list[str]]:
    """Per step id, the output names that some condition reads from it."""
    found: dict[str, list[str]] = {}
    for step in spec.steps:
        for pattern in (_INDEXED, _DOTTED):
            for step_id, name in pattern.findall(step.condition or ""):
                names = found.setdefault(step_id, [])
                if name not in names:
                    names.append(name)
    return found


def listing_steps(spec: api.WorkflowSpec) -> set[str]:
    """Ids of the steps whose artifact a later step repeats over: they list its items."""
    repeated = {step.repeat.over for step in spec.steps if step.repeat is not None}
    return {step.id for step in spec.steps if step.creates in repeated}


def agent_task(
    workflow: api.Workflow,
    dispatch: tasks.Dispatch,
    *,
    contents: Mapping[tuple[str, str | None], str] | None = None,
) -> taskwire.AgentTask:
    """The task of one dispatch; ``contents`` holds, by (step, item), the artifacts of a
    Workflow without object storage."""
    spec = workflow.spec
    integration = spec.artifacts.integration if spec.artifacts else None
    base = prefix(workflow)
    requires = [
        taskwire.ArtifactRef(
            name=ref.name,
            step=ref.step,
            item=ref.item,
            integration=integration if ref.uri else None,
            uri=ref.uri,
            version=ref.version,
            content=None if ref.uri else (contents or {}).get((ref.step, ref.item)),
        )
        for ref in dispatch.requires
    ]
    name = dispatch.creates or dispatch.updates
    target = (
        taskwire.ArtifactTarget(
            name=name,
            mode="creates" if dispatch.creates else "updates",
            integration=integration,
            key=artifact_key(base, name, dispatch.item) if integration else None,
        )
        if name
        else None
    )
    return taskwire.AgentTask(
        workflow=taskwire.WorkflowRef(
            namespace=workflow.metadata.namespace or "",
            name=workflow.metadata.name or "",
            uid=workflow.metadata.uid or "",
        ),
        step=dispatch.step,
        item=dispatch.item,
        attempt=dispatch.attempt,
        max_attempts=dispatch.max_attempts,
        description=dispatch.description,
        inputs=dict(dispatch.inputs),
        requires=requires,
        target=target,
        lists_items=dispatch.step in listing_steps(spec),
        outputs=outputs_read(spec).get(dispatch.step, []),
        timeout_seconds=dispatch.timeout_seconds,
    )


def result(stored: taskwire.TaskResult) -> tasks.Result:
    """What the engine makes of a stored result."""
    if stored.status != "succeeded":
        what = stored.error or stored.status
        if stored.status == "cancelled":
            what = f"cancelled: {what}"
        return tasks.Result(task_id=stored.task_id, succeeded=False, message=what)
    try:
        output = taskwire.decode_step_output(stored.output)
    except taskwire.WireError as exc:
        return tasks.Result(
            task_id=stored.task_id,
            succeeded=False,
            message=f"the result is not a step output ({exc})",
        )
    return tasks.Result(
        task_id=stored.task_id,
        succeeded=True,
        message=output.message,
        tokens_in=output.tokens_in,
        tokens_out=output.tokens_out,
        artifact_uri=output.artifact.uri if output.artifact else None,
        artifact_version=output.artifact.version if output.artifact else None,
        items=tuple(output.items) if output.items is not None else None,
        outputs=dict(output.outputs),
    )


def inline_content(stored: taskwire.TaskResult) -> str | None:
    """The artifact a result holds itself (a Workflow without object storage)."""
    if stored.status != "succeeded":
        return None
    try:
        return taskwire.decode_step_output(stored.output).content
    except taskwire.WireError:
        return None
