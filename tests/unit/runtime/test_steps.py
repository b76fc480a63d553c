"""A workflow step as the runtime runs it: the prompt, the answer's bmad block, the output.

Without object storage here: the Workflow-without-artifacts mode (content in the
result) and a stand-in store; the real MinIO path is
tests/integration/runtime/test_steps_minio.py.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest

from bmad_integrations import taskwire
from bmad_runtime import steps
from bmad_runtime.bus import consumer
from bmad_runtime.providers import echo

from .test_turns import services

pytestmark = pytest.mark.unit

WORKFLOW = taskwire.WorkflowRef(namespace="team-a", name="todo", uid="u-1")


def agent_task(**fields: Any) -> taskwire.AgentTask:
    values: dict[str, Any] = {
        "workflow": WORKFLOW,
        "step": "shard",
        "attempt": 2,
        "max_attempts": 3,
        "description": "Shard the PRD into stories.",
        "inputs": {"project": "todo"},
        "target": taskwire.ArtifactTarget(name="stories", mode="creates"),
    }
    values.update(fields)
    return taskwire.AgentTask(**values)


def bus_task(
    step: taskwire.AgentTask | Mapping[str, Any], task_id: str = "wf:u-1:shard:2"
) -> taskwire.Task:
    payload = step.to_payload() if isinstance(step, taskwire.AgentTask) else dict(step)
    return taskwire.Task(task_id=task_id, payload=payload, message_id="1-0", attempt=1)


class MemoryStores(steps.ArtifactStores):
    """Object storage in a dict: (key, version) -> text."""

    def __init__(self) -> None:
        super().__init__({}, tenant="team-a")
        self.objects: dict[tuple[str, str], str] = {}

    async def read(self, ref: taskwire.ArtifactRef) -> str:
        if ref.content is not None:
            return ref.content
        assert ref.uri is not None
        _, key = steps.split_uri(ref.uri)
        return self.objects[(key, ref.version or "")]

    async def write(
        self,
        integration: str,
        key: str,
        name: str,
        content: str,
        *,
        metadata: Mapping[str, str],
    ) -> taskwire.StoredArtifact:
        version = f"v{sum(1 for k, _ in self.objects if k == key) + 1}"
        self.objects[(key, version)] = content
        return taskwire.StoredArtifact(
            uri=f"s3://bmad/{key}", version=version, size=len(content.encode())
        )


# --- the answer's bmad block ---------------------------------------------------------


def test_without_a_block_the_whole_answer_is_the_artifact() -> None:
    assert steps.parse_answer("  # PRD\n\nGoals.\n") == ("# PRD\n\nGoals.", steps.Declared())


def test_the_last_block_declares_items_and_outputs_and_leaves_the_document() -> None:
    answer = (
        "# Stories\n\nAn example:\n```bmad\nitems: [x]\n```\n\n1.1 Login\n1.2 Lists\n\n"
        '```bmad\nitems: ["1.1", 1.2, story-3]\noutputs: {suggests_prd_changes: false, '
        "epics: 2}\n```\n"
    )
    document, declared = steps.parse_answer(answer)
    assert declared.items == ["1.1", "1.2", "story-3"]
    assert declared.outputs == {"suggests_prd_changes": False, "epics": 2}
    assert declared.failed is None
    assert document.startswith("# Stories\n\nAn example:\n```bmad\nitems: [x]\n```")
    assert document.endswith("1.2 Lists")


@pytest.mark.parametrize(
    ("block", "match"),
    [
        ("items: [a\n", "not YAML"),
        ("- a\n", "YAML mapping"),
        ("stories: [a]\n", "key 'stories'"),
        ("items: a\n", "must be a list"),
        ("items: [[a]]\n", r"items\[0\]"),
        ("outputs: [a]\n", "mapping of names"),
        ("outputs: {x: [1]}\n", "output 'x'"),
    ],
)
def test_a_block_that_cannot_be_read_is_an_answer_error(block: str, match: str) -> None:
    with pytest.raises(steps.AnswerError, match=match):
        steps.parse_answer(f"doc\n```bmad\n{block}```\n")


def test_an_agent_may_declare_that_it_failed() -> None:
    _, declared = steps.parse_answer("```bmad\nfailed: the PRD has no goals\n```")
    assert declared.failed == "the PRD has no goals"


# --- the prompt ----------------------------------------------------------------------


def test_the_prompt_names_the_step_the_inputs_and_what_to_hand_back() -> None:
    text = steps.prompt(
        agent_task(
            item="1.1",
            lists_items=True,
            outputs=["suggests_prd_changes"],
            requires=[taskwire.ArtifactRef(name="prd.md", step="prd", content="# PRD")],
        )
    )
    assert text.startswith(
        "Workflow todo (namespace team-a), step shard, item 1.1 (attempt 2 of 3)."
    )
    assert "The workflow artifacts in your context: prd.md." in text
    assert "project: todo" in text
    assert "Shard the PRD into stories." in text
    assert "stored as the artifact stories" in text
    assert "key items" in text
    assert "suggests_prd_changes" in text
    assert "# PRD" not in text  # artifacts are context layers, not the message
    # The run's own words never open a bmad block: only a description can.
    assert steps.parse_answer(text)[1] == steps.Declared()


def test_the_description_comes_last_so_an_echo_repeats_its_block() -> None:
    scripted = "Shard it.\n```bmad\nitems: ['1.1', '1.2']\n```"
    text = steps.prompt(agent_task(description=scripted, lists_items=True))
    assert steps.parse_answer(text)[1].items == ["1.1", "1.2"]


# --- a whole step ----------------------------------------------------------------------


async def test_an_echo_step_stores_its_artifact_and_reports_items_and_tokens() -> None:
    stores = MemoryStores()
    given = services()
    step = agent_task(
        description="Shard the PRD.\n```bmad\nitems: ['1.1', '1.2']\noutputs: {epics: 1}\n```",
        lists_items=True,
        target=taskwire.ArtifactTarget(
            name="stories", mode="creates", integration="artifacts", key="team-a/todo/stories"
        ),
        requires=[
            taskwire.ArtifactRef(
                name="prd.md",
                step="prd",
                integration="artifacts",
                uri="s3://bmad/team-a/todo/prd.md",
                version="v0",
            )
        ],
    )
    stores.objects[("team-a/todo/prd.md", "v0")] = "# PRD of the todo service"

    output = taskwire.decode_step_output(await steps.run(given, stores, bus_task(step)))

    assert output.items == ["1.1", "1.2"]
    assert output.outputs == {"epics": 1}
    assert output.artifact == taskwire.StoredArtifact(
        uri="s3://bmad/team-a/todo/stories", version="v1", size=output.artifact.size
    )
    stored = stores.objects[("team-a/todo/stories", "v1")]
    assert stored.startswith("[echo-1] Workflow todo")
    assert "```bmad" not in stored  # the block is the engine's, not the document's
    assert output.tokens_in > 0
    assert output.tokens_out > 0
    assert (output.model, output.provider) == ("echo-1", "echo")
    assert output.message == f"stored stories version v1 ({output.artifact.size} bytes)"


async def test_required_artifacts_reach_the_model_as_context_layers() -> None:
    model = echo.ScriptedProvider(["# Architecture"])
    step = agent_task(
        target=taskwire.ArtifactTarget(name="architecture.md", mode="creates"),
        requires=[taskwire.ArtifactRef(name="prd.md", step="prd", content="# The PRD text")],
    )

    output = taskwire.decode_step_output(
        await steps.run(services(model), MemoryStores(), bus_task(step))
    )

    [messages] = model.calls
    system = [m.content for m in messages if m.role == "system"]
    assert any("prd.md (step prd)" in text and "# The PRD text" in text for text in system), system
    assert output.content == "# Architecture"  # no object storage: the content comes back
    assert output.artifact is None


@pytest.mark.parametrize(
    ("answer", "change", "match"),
    [
        ("```bmad\nfailed: the brief is empty\n```", {}, "could not do step shard: the brief"),
        ("# Stories", {"lists_items": True}, "lists no items"),
        ("```bmad\nitems: ['a b']\n```", {"lists_items": True}, "items.0"),
        ("```bmad\noops: 1\n```", {}, "key 'oops'"),
    ],
)
async def test_an_answer_the_engine_cannot_use_fails_the_task_for_good(
    answer: str, change: dict[str, Any], match: str
) -> None:
    model = echo.ScriptedProvider([answer])
    with pytest.raises(consumer.TaskFailedError, match=match):
        await steps.run(services(model), MemoryStores(), bus_task(agent_task(**change)))


async def test_a_model_chain_that_fails_fails_the_task_for_good() -> None:
    model = echo.ScriptedProvider(["never"], fail_times=10, failure_status=400)
    with pytest.raises(consumer.TaskFailedError, match="no model could answer"):
        await steps.run(services(model), MemoryStores(), bus_task(agent_task()))


async def test_a_payload_that_is_not_a_step_fails_the_task_naming_the_field() -> None:
    payload = {**agent_task().to_payload(), "attempt": 0}
    with pytest.raises(consumer.TaskFailedError, match="attempt"):
        await steps.run(services(), MemoryStores(), bus_task(payload))


async def test_an_artifacts_integration_that_is_not_bound_names_what_to_add() -> None:
    stores = steps.ArtifactStores({}, tenant="team-a")
    step = agent_task(
        target=taskwire.ArtifactTarget(
            name="stories", mode="creates", integration="artifacts", key="k"
        )
    )
    with pytest.raises(consumer.TaskFailedError, match="add 'artifacts' to the Agent's spec"):
        await steps.run(services(), stores, bus_task(step))


def test_an_artifact_uri_must_be_s3() -> None:
    assert steps.split_uri("s3://bmad/team-a/todo/stories%2F1.md") == (
        "bmad",
        "team-a/todo/stories/1.md",
    )
    for bad in ("http://x/y", "s3://bucket", "s3:///key"):
        with pytest.raises(consumer.TaskFailedError, match="not s3"):
            steps.split_uri(bad)
