"""The task bus's pure parts: key names, what is stored, and the retry decisions."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bmad_runtime import bus

pytestmark = pytest.mark.unit


def result(**fields: Any) -> bus.TaskResult:
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
    return bus.TaskResult(**values)


# --- keys ---------------------------------------------------------------------------


def test_keys_live_under_the_tenant_and_agent() -> None:
    keys = bus.Keys("acme", "dev")
    assert keys.stream == "bmad:acme:dev:tasks"
    assert keys.group == "agents"
    assert keys.dead == "bmad:acme:dev:dead"
    assert keys.result("story-1") == "bmad:acme:dev:results:story-1"
    assert keys.submitted("story-1") == "bmad:acme:dev:submitted:story-1"
    assert keys.runs("story-1") == "bmad:acme:dev:runs:story-1"


def test_kubernetes_names_with_dots_and_dashes_are_accepted() -> None:
    keys = bus.Keys("acme-corp.eu", "qa-2")
    assert keys.prefix == "bmad:acme-corp.eu:qa-2"


@pytest.mark.parametrize("name", ["", "Acme", "a:b", "a b", "-a", "a-", "a" * 254, "ä"])
def test_a_name_that_could_break_the_key_layout_is_refused(name: str) -> None:
    with pytest.raises(ValueError, match="Kubernetes object name"):
        bus.Keys(name, "dev")
    with pytest.raises(ValueError, match="agent"):
        bus.Keys("acme", name)


@pytest.mark.parametrize(
    "task_id",
    ["a", "wf/greenfield/epic-1:story-2", "x" * 256, "123e4567-e89b-12d3-a456-426614174000"],
)
def test_task_ids_are_printable_ascii(task_id: str) -> None:
    assert bus.validate_task_id(task_id) == task_id


@pytest.mark.parametrize("task_id", ["", "a b", "tab\there", "x" * 257, "ü", "line\n"])
def test_task_ids_with_spaces_or_beyond_ascii_are_refused(task_id: str) -> None:
    with pytest.raises(ValueError, match="task id"):
        bus.Keys("acme", "dev").result(task_id)


# --- config -------------------------------------------------------------------------


def test_the_claim_interval_follows_min_idle_within_bounds() -> None:
    assert bus.BusConfig(min_idle_ms=1000).claim_interval_s == 0.5
    assert bus.BusConfig(min_idle_ms=50).claim_interval_s == 0.1
    assert bus.BusConfig(min_idle_ms=600_000).claim_interval_s == 10.0
    assert bus.BusConfig(min_idle_ms=1000, claim_interval_ms=70).claim_interval_s == 0.07


@pytest.mark.parametrize(
    "fields",
    [{"min_idle_ms": 0}, {"max_attempts": 0}, {"result_ttl_s": 0}, {"claim_interval_ms": 0}],
)
def test_nonsense_config_is_refused(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        bus.BusConfig(**fields)


# --- encoding -----------------------------------------------------------------------


def test_a_result_round_trips() -> None:
    original = result(output={"text": "done", "n": [1, 2]})
    assert bus.decode_result(bus.encode_result(original)) == original
    assert bus.decode_result(bus.encode_result(original).encode()) == original


def test_a_failed_result_carries_the_error_and_no_output() -> None:
    failed = result(status="failed", output=None, error="RuntimeError: boom", attempt=5)
    decoded = bus.decode_result(bus.encode_result(failed))
    assert decoded.status == "failed"
    assert decoded.output is None
    assert decoded.error == "RuntimeError: boom"


def test_the_stored_result_is_plain_json_with_the_message_id() -> None:
    # The submit script reads `message_id` out of a stored result with cjson.
    data = json.loads(bus.encode_result(result()))
    assert data["message_id"] == "1-0"
    assert data["task_id"] == "story-1"


def test_an_output_that_is_not_json_is_a_bus_error() -> None:
    with pytest.raises(bus.BusError, match="not JSON"):
        bus.encode_result(result(output={"when": object()}))
    with pytest.raises(bus.BusError, match="not JSON"):
        bus.encode_result(result(output={"x": float("nan")}))


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '{"status": "succeeded"}',
        json.dumps({**json.loads(bus.encode_result(result())), "status": "maybe"}),
        json.dumps({**json.loads(bus.encode_result(result())), "output": [1]}),
    ],
)
def test_something_else_under_a_result_key_is_a_bus_error(raw: str) -> None:
    with pytest.raises(bus.BusError):
        bus.decode_result(raw)


def test_payloads_must_be_json_objects() -> None:
    assert bus.encode_payload({"b": 1, "a": "x"}) == '{"a":"x","b":1}'
    with pytest.raises(bus.BusError, match="JSON-serialisable"):
        bus.encode_payload({"x": {1, 2}})


def test_an_entry_decodes_into_a_task_with_its_attempt() -> None:
    task = bus.decode_entry(
        b"5-1", {b"task_id": b"story-1", b"payload": b'{"input": "hi"}'}, attempt=3
    )
    assert task == bus.Task(task_id="story-1", payload={"input": "hi"}, message_id="5-1", attempt=3)


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
def test_an_entry_we_did_not_write_is_a_bus_error(
    fields: dict[str, str] | None, match: str
) -> None:
    with pytest.raises(bus.BusError, match=match):
        bus.decode_entry("7-0", fields, attempt=1)


def test_long_errors_are_cut() -> None:
    text = bus.describe_error(RuntimeError("x" * 5000))
    assert text.startswith("RuntimeError: xxx")
    assert len(text) == bus.ERROR_MAX_CHARS


# --- replies of redis-py ------------------------------------------------------------


ENTRIES = [("1-0", {"task_id": "a"}), ("2-0", {"task_id": "b"})]


@pytest.mark.parametrize(
    "reply",
    [
        [["bmad:t:a:tasks", ENTRIES]],  # RESP2
        {"bmad:t:a:tasks": ENTRIES},  # unified
        {"bmad:t:a:tasks": [ENTRIES]},  # legacy RESP3
    ],
)
def test_xreadgroup_replies_of_every_shape_give_the_entries(reply: Any) -> None:
    assert bus.stream_entries(reply) == ENTRIES


@pytest.mark.parametrize("reply", [None, [], {}, {"s": [[]]}])
def test_empty_xreadgroup_replies_give_nothing(reply: Any) -> None:
    assert bus.stream_entries(reply) == []


# --- decisions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, "retry"), (2, "retry"), (3, "dead"), (4, "dead")]
)
def test_a_failure_on_the_last_attempt_dead_letters(attempt: int, expected: str) -> None:
    assert bus.after_failure(attempt=attempt, max_attempts=3) == expected


@pytest.mark.parametrize(("attempt", "expected"), [(1, "run"), (3, "run"), (4, "dead")])
def test_a_delivery_past_max_attempts_is_not_run(attempt: int, expected: str) -> None:
    assert bus.before_run(attempt=attempt, max_attempts=3) == expected
