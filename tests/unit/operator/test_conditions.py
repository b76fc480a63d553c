"""`conditions.merge`: the one setter of conditions, Kubernetes API conventions style.

`lastTransitionTime` says since when a condition has had its status; it moves only
when the status flips, not when the reason or message is reworded.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from bmad_operator import conditions
from bmad_operator.conditions import FALSE, TRUE, UNKNOWN, Cond

pytestmark = pytest.mark.unit

T0 = "2025-01-01T00:00:00Z"
T1 = "2025-01-01T00:05:00Z"


def _first(generation: int = 1) -> list[dict[str, Any]]:
    return conditions.merge(
        None,
        [
            Cond("Ready", FALSE, "RollingOut", "Rolling out: 0/1 updated, 0/1 ready."),
            Cond("Available", FALSE, "ReplicasUnavailable", "0/1 replicas are available."),
        ],
        generation=generation,
        timestamp=T0,
    )


def _by_type(conds: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in conds}


def test_first_merge_stamps_everything() -> None:
    merged = _first()
    assert merged == [
        {
            "type": "Ready",
            "status": "False",
            "reason": "RollingOut",
            "message": "Rolling out: 0/1 updated, 0/1 ready.",
            "lastTransitionTime": T0,
            "observedGeneration": 1,
        },
        {
            "type": "Available",
            "status": "False",
            "reason": "ReplicasUnavailable",
            "message": "0/1 replicas are available.",
            "lastTransitionTime": T0,
            "observedGeneration": 1,
        },
    ]


def test_transition_time_kept_when_status_unchanged_even_if_reason_and_message_change() -> None:
    merged = conditions.merge(
        _first(),
        [Cond("Ready", FALSE, "IntegrationNotFound", "Integration x not found.")],
        generation=2,
        timestamp=T1,
    )
    ready = _by_type(merged)["Ready"]
    assert ready["lastTransitionTime"] == T0
    assert ready["reason"] == "IntegrationNotFound"
    assert ready["message"] == "Integration x not found."
    assert ready["observedGeneration"] == 2


def test_transition_time_moves_when_status_flips() -> None:
    merged = conditions.merge(
        _first(),
        [Cond("Ready", TRUE, "AgentReady", "1/1 replicas are ready.")],
        generation=1,
        timestamp=T1,
    )
    assert _by_type(merged)["Ready"]["lastTransitionTime"] == T1
    back = conditions.merge(
        merged, [Cond("Ready", UNKNOWN, "InvalidSpec", "bad")], generation=1, timestamp="T2"
    )
    assert _by_type(back)["Ready"]["lastTransitionTime"] == "T2"


def test_other_condition_types_are_preserved() -> None:
    previous = [*_first(), {"type": "Custom", "status": "True", "reason": "Mine", "message": "m"}]
    merged = conditions.merge(
        previous, [Cond("Ready", TRUE, "AgentReady", "ok")], generation=4, timestamp=T1
    )
    types = [c["type"] for c in merged]
    assert types[0] == "Ready"
    assert sorted(types) == ["Available", "Custom", "Ready"]
    by_type = _by_type(merged)
    # Untouched conditions keep everything, including their own observedGeneration.
    assert by_type["Available"] == _by_type(_first())["Available"]
    assert by_type["Custom"] == {
        "type": "Custom",
        "status": "True",
        "reason": "Mine",
        "message": "m",
    }


def test_decided_order_is_kept_and_types_are_unique() -> None:
    decided = [
        Cond("Ready", TRUE, "AgentReady", "ok"),
        Cond("Available", TRUE, "MinimumReplicasAvailable", "ok"),
        Cond("Progressing", FALSE, "RolledOut", "ok"),
        Cond("IntegrationsReady", TRUE, "NoIntegrations", "ok"),
    ]
    merged = conditions.merge(_first(), decided, generation=1, timestamp=T1)
    assert [c["type"] for c in merged] == [c.type for c in decided]


def test_observed_generation_set_or_left_out() -> None:
    merged = conditions.merge(None, [Cond("Ready", TRUE, "R", "m")], generation=7, timestamp=T0)
    assert merged[0]["observedGeneration"] == 7
    merged = conditions.merge(None, [Cond("Ready", TRUE, "R", "m")], generation=None, timestamp=T0)
    assert "observedGeneration" not in merged[0]


def test_unchanged_pass_yields_an_identical_list() -> None:
    first = _first()
    again = conditions.merge(
        first,
        [
            Cond("Ready", FALSE, "RollingOut", "Rolling out: 0/1 updated, 0/1 ready."),
            Cond("Available", FALSE, "ReplicasUnavailable", "0/1 replicas are available."),
        ],
        generation=1,
        timestamp=T1,
    )
    assert again == first  # so the reconciler's "status unchanged" check holds


def test_previous_is_not_mutated() -> None:
    previous = _first()
    snapshot = [dict(c) for c in previous]
    conditions.merge(
        previous, [Cond("Ready", TRUE, "AgentReady", "ok")], generation=2, timestamp=T1
    )
    assert previous == snapshot


def test_default_timestamp_is_rfc3339_utc() -> None:
    merged = conditions.merge(None, [Cond("Ready", TRUE, "R", "m")], generation=1)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", merged[0]["lastTransitionTime"])


def test_missing_previous_transition_time_is_filled() -> None:
    previous = [{"type": "Ready", "status": "True", "reason": "AgentReady", "message": "ok"}]
    merged = conditions.merge(
        previous, [Cond("Ready", TRUE, "AgentReady", "ok")], generation=1, timestamp=T1
    )
    assert merged[0]["lastTransitionTime"] == T1


def test_find() -> None:
    conds = _first()
    found = conditions.find(conds, "Available")
    assert found is not None
    assert found["reason"] == "ReplicasUnavailable"
    assert conditions.find(conds, "Nope") is None
    assert conditions.find(None, "Ready") is None
