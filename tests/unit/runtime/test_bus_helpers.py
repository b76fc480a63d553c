"""The consumer's pure parts: its config, entries it cannot decode, redis-py replies,
error texts and the retry decisions. The wire format itself is tested in
tests/unit/integrations/test_taskwire.py."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_integrations import taskwire
from bmad_runtime.bus import client, consumer, outcomes

pytestmark = pytest.mark.unit


# --- config -------------------------------------------------------------------------


def test_the_claim_interval_follows_min_idle_within_bounds() -> None:
    assert client.BusConfig(min_idle_ms=1000).claim_interval_s == 0.5
    assert client.BusConfig(min_idle_ms=50).claim_interval_s == 0.1
    assert client.BusConfig(min_idle_ms=600_000).claim_interval_s == 10.0
    assert client.BusConfig(min_idle_ms=1000, claim_interval_ms=70).claim_interval_s == 0.07


def test_results_are_kept_as_long_as_the_wire_format_says() -> None:
    assert client.BusConfig().result_ttl_s == taskwire.RESULT_TTL_S


@pytest.mark.parametrize(
    "fields",
    [{"min_idle_ms": 0}, {"max_attempts": 0}, {"result_ttl_s": 0}, {"claim_interval_ms": 0}],
)
def test_nonsense_config_is_refused(fields: dict[str, int]) -> None:
    with pytest.raises(ValueError, match="at least 1"):
        client.BusConfig(**fields)


# --- entries ------------------------------------------------------------------------


def test_a_good_entry_becomes_a_task() -> None:
    fields = taskwire.entry_fields("story-1", {"input": "hi"})
    task = client.decode_or_quarantine("5-1", fields, 2)
    assert not isinstance(task, client.Malformed)
    assert (task.task_id, task.attempt) == ("story-1", 2)


def test_an_entry_in_another_format_is_quarantined_with_its_fields() -> None:
    task = client.decode_or_quarantine(b"7-0", {b"oops": b"1"}, 1)
    assert isinstance(task, client.Malformed)
    assert task.message_id == "7-0"
    assert task.raw_fields == {"oops": "1"}
    assert "no valid task_id" in task.error


def test_long_errors_are_cut() -> None:
    text = consumer.describe_error(RuntimeError("x" * 5000))
    assert text.startswith("RuntimeError: xxx")
    assert len(text) == outcomes.ERROR_MAX_CHARS


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
    assert client.stream_entries(reply) == ENTRIES


@pytest.mark.parametrize("reply", [None, [], {}, {"s": [[]]}])
def test_empty_xreadgroup_replies_give_nothing(reply: Any) -> None:
    assert client.stream_entries(reply) == []


# --- decisions ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempt", "expected"), [(1, "retry"), (2, "retry"), (3, "dead"), (4, "dead")]
)
def test_a_failure_on_the_last_attempt_dead_letters(attempt: int, expected: str) -> None:
    assert consumer.after_failure(attempt=attempt, max_attempts=3) == expected


@pytest.mark.parametrize(("attempt", "expected"), [(1, "run"), (3, "run"), (4, "dead")])
def test_a_delivery_past_max_attempts_is_not_run(attempt: int, expected: str) -> None:
    assert consumer.before_run(attempt=attempt, max_attempts=3) == expected
