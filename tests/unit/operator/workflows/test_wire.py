"""The engine's values on the task wire, and the references a run needs (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_crds.v1alpha1 import workflow as api
from bmad_integrations import taskwire
from bmad_operator.policies import workflow as policy
from bmad_operator.workflows import tasks, wire

from .harness import UID, Run, workflow

pytestmark = pytest.mark.unit

SPEC: dict[str, Any] = {
    "artifacts": {"integration": "artifacts"},
    "inputs": {"project": "todo"},
    "steps": [
        {"id": "shard", "agent": "po", "creates": "stories"},
        {
            "id": "draft",
            "agent": "sm",
            "creates": "story.md",
            "requires": ["stories"],
            "repeat": {"over": "stories"},
            "description": "Draft the story.",
            "timeoutSeconds": 60,
        },
        {
            "id": "update",
            "agent": "pm",
            "updates": "story.md",
            "requires": ["story.md"],
            "repeat": {"over": "stories"},
            "condition": "outputs['shard'].needs_update && outputs.draft.ok == true",
        },
    ],
}


def test_a_dispatch_becomes_a_task_with_a_key_per_item_and_the_references() -> None:
    run = Run(SPEC)
    [shard] = run.tick().dispatch
    task = wire.agent_task(workflow(SPEC), shard)
    assert task.lists_items, "a later step repeats over what it creates"
    assert task.outputs == ["needs_update"]
    assert task.target == taskwire.ArtifactTarget(
        name="stories", mode="creates", integration="artifacts", key="team-a/run/stories"
    )
    run.answer(shard, items=("1.1", "1.2"), outputs={"needs_update": True})
    [draft] = run.tick().dispatch

    task = wire.agent_task(workflow(SPEC), draft)

    assert (task.step, task.item, task.attempt, task.max_attempts) == ("draft", "1.1", 1, 1)
    assert task.description == "Draft the story."
    assert task.timeout_seconds == 60
    assert task.target is not None
    assert task.target.key == "team-a/run/items/1.1/story.md"
    assert not task.lists_items
    [ref] = task.requires
    assert ref == taskwire.ArtifactRef(
        name="stories",
        step="shard",
        integration="artifacts",
        uri="s3://artifacts/team-a/run/stories",
        version="v-shard-None-1",
    )
    assert task.workflow == taskwire.WorkflowRef(namespace="team-a", name="run", uid=UID)


def test_an_update_writes_a_new_version_of_the_same_key() -> None:
    dispatch = tasks.Dispatch(
        task_id="t",
        step="update",
        item="1.2",
        attempt=2,
        max_attempts=3,
        agent="pm",
        description=None,
        inputs={},
        requires=(),
        creates=None,
        updates="story.md",
        timeout_seconds=None,
    )
    spec = {**SPEC, "artifacts": {"integration": "artifacts", "prefix": "/runs/todo/"}}
    task = wire.agent_task(workflow(spec), dispatch)
    assert task.target == taskwire.ArtifactTarget(
        name="story.md", mode="updates", integration="artifacts", key="runs/todo/items/1.2/story.md"
    )


def stored(
    status: str, output: dict[str, Any] | None = None, error: str | None = None
) -> taskwire.TaskResult:
    return taskwire.TaskResult(
        task_id="t",
        message_id="1-0",
        status=status,  # type: ignore[arg-type]
        output=output,
        error=error,
        consumer="c",
        attempt=1,
        finished_at=0.0,
    )


def test_stored_results_become_engine_results() -> None:
    output = taskwire.StepOutput(
        artifact=taskwire.StoredArtifact(uri="s3://b/k", version="v9", size=3),
        items=["1.1"],
        outputs={"ok": True},
        message="stored",
        tokens_in=4,
        tokens_out=2,
    )
    ok = wire.result(stored("succeeded", output.to_payload()))
    assert ok == tasks.Result(
        task_id="t",
        succeeded=True,
        message="stored",
        tokens_in=4,
        tokens_out=2,
        artifact_uri="s3://b/k",
        artifact_version="v9",
        items=("1.1",),
        outputs={"ok": True},
    )
    failed = wire.result(stored("failed", error="the agent could not do step x"))
    assert (failed.succeeded, failed.message) == (False, "the agent could not do step x")
    cancelled = wire.result(stored("cancelled", error="the run failed"))
    assert cancelled.message == "cancelled: the run failed"
    odd = wire.result(stored("succeeded", {"output": "an invoke answer"}))
    assert not odd.succeeded
    assert "the result is not a step output" in odd.message
    assert wire.inline_content(stored("succeeded", {"content": "# doc"})) == "# doc"
    assert wire.inline_content(stored("failed", error="x")) is None


def test_task_ids_parse_back_into_their_parts() -> None:
    assert tasks.parse_task_id(tasks.task_id(UID, "dev", "1.2", 3)) == (UID, "dev", "1.2", 3)
    assert tasks.parse_task_id(tasks.task_id(UID, "brief", None, 1)) == (UID, "brief", None, 1)
    for other in ("story-1", "wf:u:s:0", "wf:u:s:x", "wf::s:1", "wf:u:s:i:j:1", "x:u:s:1"):
        assert tasks.parse_task_id(other) is None


# --- references: task buses, artifacts, notifications --------------------------------


def info(kind: str, binding: bool = True) -> policy.IntegrationInfo:
    return policy.IntegrationInfo(kind, binding)


def test_an_agents_task_bus_is_its_first_redis_integration_by_name() -> None:
    integrations = {"b-bus": info("redis"), "a-db": info("postgres"), "c-bus": info("redis")}
    assert policy.task_bus(["c-bus", "a-db", "b-bus"], integrations) == "b-bus"
    assert policy.task_bus(["a-db", "missing"], integrations) is None


def test_each_agent_is_named_once_at_the_first_step_that_uses_it() -> None:
    spec = api.WorkflowSpec.model_validate(
        {
            "artifacts": {"integration": "s3"},
            "steps": [
                {"id": "a", "agent": "nobus", "creates": "a.md"},
                {"id": "b", "agent": "nobus", "creates": "b.md"},
                {"id": "c", "agent": "unpublished", "creates": "c.md"},
                {"id": "d", "agent": "ghost", "creates": "d.md"},
            ],
        }
    )
    found = policy.problems(
        spec,
        agents={"nobus": ["s3"], "unpublished": ["bus"]},
        integrations={"s3": info("objectStorage"), "bus": info("redis", binding=False)},
    )
    assert [(p.step, p.field, p.reason) for p in found] == [
        ("a", "spec.steps[0].agent", policy.NO_TASK_BUS),
        ("c", "spec.steps[2].agent", policy.BINDING_NOT_PUBLISHED),
        ("c", "spec.steps[2].agent", policy.ARTIFACTS_NOT_BOUND),
    ]
