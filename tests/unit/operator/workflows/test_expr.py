"""Step conditions: CEL over inputs, outputs, step phases, artifacts and the item."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_operator.workflows import expr

pytestmark = pytest.mark.unit


def evaluate(text: str, **context: Any) -> bool:
    base: dict[str, Any] = {"inputs": {}, "outputs": {}, "steps": {}, "artifacts": []}
    return expr.evaluate(text, **{**base, **context})


@pytest.mark.parametrize(
    ("text", "context", "expected"),
    [
        ("has(inputs.user_wants_ux) && inputs.user_wants_ux", {}, False),
        (
            "has(inputs.user_wants_ux) && inputs.user_wants_ux",
            {"inputs": {"user_wants_ux": True}},
            True,
        ),
        ("inputs.depth > 2", {"inputs": {"depth": 3}}, True),
        (
            "outputs['arch'].suggests_prd_changes",
            {"outputs": {"arch": {"suggests_prd_changes": True}}},
            True,
        ),
        ("'front-end-spec.md' in artifacts", {"artifacts": ["prd.md"]}, False),
        ("steps['ux'] == 'Skipped'", {"steps": {"ux": "Skipped"}}, True),
        ("item.startsWith('1.')", {"item": "1.2"}, True),
        ("item == ''", {}, True),
        ("inputs.flags.all(f, f != 'skip-qa')", {"inputs": {"flags": ["fast"]}}, True),
    ],
)
def test_conditions_evaluate_over_the_run(
    text: str, context: dict[str, Any], expected: bool
) -> None:
    assert expr.check(text) is None
    assert evaluate(text, **context) is expected


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("inputs.", "is not a valid CEL expression"),
        ("1 +", "is not a valid CEL expression"),
        (
            "user_wants_ux",
            "names 'user_wants_ux', which is not a variable of conditions (inputs, outputs, "
            "steps, artifacts, item) (for an input, write has(inputs.user_wants_ux) && "
            "inputs.user_wants_ux)",
        ),
        ("secrets.token == 'x'", "names 'secrets'"),
    ],
)
def test_bad_conditions_are_refused_before_they_run(text: str, says: str) -> None:
    problem = expr.check(text)
    assert problem is not None
    assert says in problem


@pytest.mark.parametrize(
    ("text", "context", "says"),
    [
        ("inputs.missing", {}, "could not be evaluated: no such member in mapping: 'missing'"),
        ("inputs.n", {"inputs": {"n": 3}}, "evaluated to int 3, not a boolean"),
        ("inputs.n + 'a' == 'b'", {"inputs": {"n": 3}}, "could not be evaluated"),
    ],
)
def test_evaluation_errors_say_what_went_wrong(
    text: str, context: dict[str, Any], says: str
) -> None:
    with pytest.raises(expr.ExpressionError) as caught:
        evaluate(text, **context)
    assert says in str(caught.value)


def test_output_values_round_trip_through_the_status() -> None:
    for value in (True, False, 0, -12, "yes", "a b"):
        assert expr.decode_output(expr.encode_output(value)) == value
    assert expr.encode_output(True) == "true"
    assert expr.is_identifier("suggests_changes")
    assert not expr.is_identifier("suggests-changes")
