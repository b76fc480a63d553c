"""The task wire format: key names, entry fields, and what is stored, both ways.

Producer (`bmad_integrations.taskbus`) and consumer (`bmad_runtime.bus`) import these
functions; a round trip here is what keeps the two sides in agreement.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bmad_integrations import taskwire

pytestmark = pytest.mark.unit


def result(**fields: Any) -> taskwire.TaskResult:
    values: dict[str, Any] = {
        "task_id": "story-1",
        "message_id": "1-0",
        "status": "succeeded",
        "output": {"text": "done"},
        "error": None,
        "consumer": "dev-0",
        "attempt": 1,
        "finished_at": 1700000000.5,
    }
    values.update(fields)
    return taskwire.TaskResult(**values)


# --- keys ---------------------------------------------------------------------------


def test_keys_live_under_the_tenant_and_agent() -> None:
    keys = taskwire.Keys("acme", "dev")
    assert keys.stream == "bmad:acme:dev:tasks"
    assert keys.group == taskwire.GROUP == "agents"
    assert keys.dead == "bmad:acme:dev:dead"
    assert keys.result("story-1") == "bmad:acme:dev:results:story-1"
    assert keys.submitted("story-1") == "bmad:acme:dev:submitted:story-1"


def test_kubernetes_names_with_dots_and_dashes_are_accepted() -> None:
    keys = taskwire.Keys("acme-corp.eu", "qa-2")
    assert keys.prefix == "bmad:acme-corp.eu:qa-2"


@pytest.mark.parametrize("name", ["", "Acme", "a:b", "a b", "-a", "a-", "a" * 254, "ä"])
def test_a_name_that_could_break_the_key_layout_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="Kubernetes object name"):
        taskwire.Keys(name, "dev")
    with pytest.raises(ValueError, match="agent"):
        taskwire.Keys("acme", name)


@pytest.mark.parametrize(
    "task_id",
    ["a", "wf/greenfield/epic-1:story-2", "x" * 256, "123e4567-e89b-12d3-a456-426614174000"],
)
def test_task_ids_are_printable_ascii(task_id: str) -> None:
    assert taskwire.validate_task_id(task_id) == task_id
    assert taskwire.is_task_id(task_id)


@pytest.mark.parametrize("task_id", ["", "a b", "tab\there", "x" * 257, "ü", "line\n"])
def test_task_ids_with_spaces_or_beyond_ascii_are_refused(task_id: str) -> None:
    assert not taskwire.is_task_id(task_id)
    with pytest.raises(ValueError, match="task id"):
        taskwire.Keys("acme", "dev").result(task_id)
    with pytest.raises(ValueError, match="task id"):
        taskwire.entry_fields(task_id, {})


# --- entries ------------------------------------------------------------------------


def test_what_a_producer_writes_is_what_a_consumer_reads() -> None:
    fields = taskwire.entry_fields("story-1", {"input": "hi", "conversationId": "c-1"})
    assert set(fields) == {taskwire.FIELD_TASK_ID, taskwire.FIELD_PAYLOAD}
    as_redis_returns_it = {k.encode(): v.encode() for k, v in fields.items()}

    task = taskwire.decode_entry(b"5-1", as_redis_returns_it, attempt=3)

    assert task == taskwire.Task(
        task_id="story-1",
        payload={"input": "hi", "conversationId": "c-1"},
        message_id="5-1",
        attempt=3,
    )


def test_flat_fields_are_what_xadd_and_the_scripts_take() -> None:
    fields = taskwire.entry_fields("t", {"a": 1})
    assert taskwire.flat(fields) == ["task_id", "t", "payload", '{"a":1}']


def test_payloads_must_be_json_objects() -> None:
    assert taskwire.encode_payload({"b": 1, "a": "x"}) == '{"a":"x","b":1}'
    with pytest.raises(taskwire.WireError, match="JSON-serialisable"):
        taskwire.encode_payload({"x": {1, 2}})


@pytest.mark.parametrize(
    ("fields", "match"),
    [
        ({"payload": "{}"}, "no valid task_id"),
        ({"task_id": "a b", "payload": "{}"}, "no valid task_id"),
        ({"task_id": "t"}, "not JSON"),
        ({"task_id": "t", "payload": "[1]"}, "not an object"),
        (None, "no valid task_id"),
    ],
)
def test_an_entry_in_another_format_is_a_wire_error(
    fields: dict[str, str] | None, match: str
) -> None:
    with pytest.raises(taskwire.WireError, match=match):
        taskwire.decode_entry("7-0", fields, attempt=1)


# --- results ------------------------------------------------------------------------


def test_a_result_round_trips() -> None:
    original = result(output={"text": "done", "n": [1, 2]})
    assert taskwire.decode_result(taskwire.encode_result(original)) == original
    assert taskwire.decode_result(taskwire.encode_result(original).encode()) == original


def test_a_failed_result_carries_the_error_and_no_output() -> None:
    failed = result(status="failed", output=None, error="RuntimeError: boom", attempt=5)
    decoded = taskwire.decode_result(taskwire.encode_result(failed))
    assert decoded.status == "failed"
    assert decoded.output is None
    assert decoded.error == "RuntimeError: boom"


def test_the_stored_result_is_plain_json_with_the_message_id() -> None:
    # The submit script reads `message_id` out of a stored result with cjson.
    data = json.loads(taskwire.encode_result(result()))
    assert data["message_id"] == "1-0"
    assert data["task_id"] == "story-1"


def test_an_output_that_is_not_json_is_a_wire_error() -> None:
    with pytest.raises(taskwire.WireError, match="not JSON"):
        taskwire.encode_result(result(output={"when": object()}))
    with pytest.raises(taskwire.WireError, match="not JSON"):
        taskwire.encode_result(result(output={"x": float("nan")}))


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '{"status": "succeeded"}',
        json.dumps({**json.loads(taskwire.encode_result(result())), "status": "maybe"}),
        json.dumps({**json.loads(taskwire.encode_result(result())), "output": [1]}),
    ],
)
def test_something_else_under_a_result_key_is_a_wire_error(raw: str) -> None:
    with pytest.raises(taskwire.WireError):
        taskwire.decode_result(raw)


# --- dead letters -------------------------------------------------------------------


def test_a_dead_letter_round_trips() -> None:
    written: dict[str, Any] = {
        "task_id": "story-1",
        "message_id": "9-0",
        "payload": '{"input":"x"}',
        "error": "RuntimeError: boom",
        "attempts": 5,
        "consumer": "dev-0",
    }
    fields = taskwire.dead_letter_fields(**written)
    letter = taskwire.decode_dead_letter(b"12-0", {k.encode(): v for k, v in fields.items()})
    assert letter == taskwire.DeadLetter(id="12-0", **written)


def test_a_result_of_a_delivery_is_failed_exactly_when_there_is_an_error() -> None:
    task = taskwire.Task(task_id="t", payload={}, message_id="3-0", attempt=2)
    ok = taskwire.result_of(task, consumer="c", finished_at=1.0, output={"x": 1})
    failed = taskwire.result_of(task, consumer="c", finished_at=2.0, error="E: no")
    assert (ok.status, ok.output, ok.error, ok.attempt) == ("succeeded", {"x": 1}, None, 2)
    assert (failed.status, failed.output, failed.error) == ("failed", None, "E: no")


def test_a_dead_letter_with_missing_fields_decodes_to_empty_values() -> None:
    letter = taskwire.decode_dead_letter("1-0", {})
    assert (letter.task_id, letter.attempts, letter.error) == ("", 0, "")


# --- cancellation and the finished channel -----------------------------------------


def test_a_cancellation_is_a_cancelled_result_no_consumer_wrote() -> None:
    cancelled = taskwire.cancelled_result("wf:u:prd:1", reason="timed out", finished_at=3.0)
    decoded = taskwire.decode_result(taskwire.encode_result(cancelled))
    assert decoded == cancelled
    assert (decoded.status, decoded.error, decoded.output) == ("cancelled", "timed out", None)
    assert decoded.consumer == taskwire.CANCELLED_BY
    with pytest.raises(ValueError, match="task id"):
        taskwire.cancelled_result("a b", reason="x", finished_at=0.0)


def test_the_finished_channel_names_its_agent() -> None:
    keys = taskwire.Keys("acme", "dev")
    assert keys.finished == "bmad:acme:dev:finished"
    assert taskwire.agent_of_channel(keys.finished) == ("acme", "dev")
    assert taskwire.FINISHED_PATTERN == "bmad:*:finished"
    for other in ("bmad:acme:dev:tasks", "x:acme:dev:finished", "bmad:acme:finished"):
        assert taskwire.agent_of_channel(other) is None


# --- workflow step tasks ------------------------------------------------------------


def step_task(**fields: Any) -> taskwire.AgentTask:
    values: dict[str, Any] = {
        "workflow": taskwire.WorkflowRef(namespace="team-a", name="todo", uid="u-1"),
        "step": "prd",
        "attempt": 1,
        "max_attempts": 3,
        "description": "Write the PRD.",
        "inputs": {"project": "todo"},
        "requires": [
            taskwire.ArtifactRef(
                name="project-brief.md",
                step="brief",
                integration="artifacts",
                uri="s3://bmad/team-a/todo/project-brief.md",
                version="v1",
            )
        ],
        "target": taskwire.ArtifactTarget(
            name="prd.md", mode="creates", integration="artifacts", key="team-a/todo/prd.md"
        ),
    }
    values.update(fields)
    return taskwire.AgentTask(**values)


def test_a_step_task_round_trips_through_the_stream_entry() -> None:
    task = step_task(item="1.1", lists_items=True, outputs=["suggests_prd_changes"])
    fields = taskwire.entry_fields("wf:u-1:prd:1.1:1", task.to_payload())
    entry = taskwire.decode_entry("1-0", fields, attempt=1)
    assert taskwire.is_agent_task(entry.payload)
    assert taskwire.decode_agent_task(entry.payload) == task
    wire = json.loads(fields["payload"])
    assert wire["kind"] == "workflowStep"
    assert wire["maxAttempts"] == 3  # camelCase, like the API
    assert wire["target"] == {
        "name": "prd.md",
        "mode": "creates",
        "integration": "artifacts",
        "key": "team-a/todo/prd.md",
    }
    assert "content" not in wire["requires"][0]  # references, not content


def test_an_invoke_payload_is_not_a_step_task() -> None:
    assert not taskwire.is_agent_task({"input": "hello"})
    with pytest.raises(taskwire.WireError, match="not a workflow step task: workflow"):
        taskwire.decode_agent_task({"kind": "workflowStep", "step": "x"})


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"attempt": 0}, "attempt"),
        ({"stepp": "x"}, "stepp"),
        ({"target": {"name": "a", "mode": "deletes"}}, "target.mode"),
    ],
)
def test_a_malformed_step_task_names_the_field(change: dict[str, Any], match: str) -> None:
    payload = {**step_task().to_payload(), **change}
    with pytest.raises(taskwire.WireError, match=match):
        taskwire.decode_agent_task(payload)


def test_a_step_output_round_trips_with_references_and_small_figures() -> None:
    output = taskwire.StepOutput(
        artifact=taskwire.StoredArtifact(uri="s3://bmad/k", version="v2", size=10),
        items=["1.1", "1.2"],
        outputs={"suggests_prd_changes": False, "epics": 2, "note": "ok"},
        message="PRD written",
        tokens_in=30,
        tokens_out=12,
        model="echo-1",
        provider="echo",
        latency_ms=7,
    )
    stored = taskwire.result_of(
        taskwire.Task(task_id="t", payload={}, message_id="1-0", attempt=1),
        consumer="c",
        finished_at=1.0,
        output=output.to_payload(),
    )
    decoded = taskwire.decode_result(taskwire.encode_result(stored))
    again = taskwire.decode_step_output(decoded.output)
    assert again == output
    assert again.outputs["suggests_prd_changes"] is False
    assert again.outputs["epics"] == 2


@pytest.mark.parametrize(
    ("output", "match"),
    [
        (None, "has no output"),
        ({"items": ["a b"]}, "items.0"),
        ({"items": [str(i) for i in range(101)]}, "items"),
        ({"outputs": {"not-an-id": 1}}, "not an identifier"),
        ({"outputs": {"x": "y" * 257}}, "longer than 256"),
        ({"outputs": {"x": [1]}}, "outputs.x"),
        ({"tokensIn": -1}, "tokensIn"),
    ],
)
def test_a_step_output_beyond_the_limits_is_a_wire_error(
    output: dict[str, Any] | None, match: str
) -> None:
    with pytest.raises(taskwire.WireError, match=match):
        taskwire.decode_step_output(output)
