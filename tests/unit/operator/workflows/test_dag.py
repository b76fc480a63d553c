"""The graph derived from creates/updates/requires/dependsOn, and its errors."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_crds.v1alpha1 import workflow as api
from bmad_operator.workflows import dag

pytestmark = pytest.mark.unit


def steps(*specs: dict[str, Any]) -> list[api.Step]:
    """Steps built without the API's validation, as an object stored before a rule existed."""
    base: dict[str, Any] = {
        "agent": "pm",
        "creates": None,
        "updates": None,
        "requires": None,
        "depends_on": None,
        "repeat": None,
        "approval": None,
    }
    return [api.Step.model_construct(**{**base, **spec}) for spec in specs]


def errors(*specs: dict[str, Any]) -> list[dag.DagError]:
    with pytest.raises(dag.InvalidDagError) as caught:
        dag.build(steps(*specs))
    return list(caught.value.errors)


def test_order_follows_requirements_and_keeps_spec_order_between_independent_steps() -> None:
    graph = dag.build(
        steps(
            {"id": "arch", "creates": "arch.md", "requires": ["prd.md"]},
            {"id": "ux", "creates": "ux.md", "requires": ["prd.md"]},
            {"id": "prd", "creates": "prd.md", "requires": ["brief.md"]},
            {"id": "brief", "creates": "brief.md"},
            {"id": "notes"},
        )
    )
    # Whenever several steps are ready, the one listed first goes first.
    assert graph.order == ("brief", "prd", "arch", "ux", "notes")
    assert graph.upstream("arch") == {"prd": False}
    assert graph.creators["prd.md"] == "prd"


def test_readers_after_an_update_wait_for_it_and_readers_before_do_not() -> None:
    graph = dag.build(
        steps(
            {"id": "prd", "creates": "prd.md"},
            {"id": "early", "requires": ["prd.md"]},
            {"id": "arch", "creates": "arch.md", "requires": ["prd.md"]},
            {"id": "update-prd", "updates": "prd.md", "requires": ["arch.md"]},
            {"id": "shard", "creates": "stories", "requires": ["prd.md"]},
        )
    )
    assert graph.producers("early", "prd.md") == ("prd",)
    assert graph.producers("shard", "prd.md") == ("prd", "update-prd")
    assert set(graph.upstream("shard")) == {"prd", "update-prd"}
    assert set(graph.upstream("update-prd")) == {"prd", "arch"}
    assert graph.order.index("update-prd") < graph.order.index("shard")


def test_edges_between_steps_repeating_over_the_same_artifact_are_per_item() -> None:
    graph = dag.build(
        steps(
            {"id": "shard", "creates": "stories"},
            {"id": "draft", "creates": "story.md", "repeat": api.Repeat(over="stories")},
            {
                "id": "dev",
                "creates": "code",
                "requires": ["story.md"],
                "repeat": api.Repeat(over="stories"),
            },
            {"id": "retro", "requires": ["code"]},
            {
                "id": "gated",
                "creates": "gated.md",
                "repeat": api.Repeat(over="stories"),
                "approval": api.Approval(),
            },
            {"id": "after-gate", "requires": ["gated.md"], "repeat": api.Repeat(over="stories")},
        )
    )
    assert graph.upstream("draft") == {"shard": False}
    assert graph.upstream("dev") == {"draft": True, "shard": False}
    assert graph.upstream("retro") == {"dev": False}
    assert graph.upstream("after-gate") == {"gated": False, "shard": False}
    assert graph.needs("dev") == ("story.md", "stories")


def test_depends_on_orders_without_an_artifact() -> None:
    graph = dag.build(steps({"id": "b", "depends_on": ["a"]}, {"id": "a"}))
    assert graph.order == ("a", "b")
    [edge] = graph.edges["b"]
    assert (edge.upstream, edge.kind, edge.artifact) == ("a", "dependsOn", None)


@pytest.mark.parametrize(
    ("specs", "reason", "field", "text"),
    [
        (
            [{"id": "a", "requires": ["brief.md"]}],
            dag.REQUIREMENT_NOT_CREATED,
            "spec.steps[0].requires",
            "step 'a' requires 'brief.md', which no step creates",
        ),
        (
            [{"id": "a", "updates": "code"}],
            dag.UPDATE_TARGET_NOT_CREATED,
            "spec.steps[0].updates",
            "step 'a' updates 'code', which no step creates",
        ),
        (
            [{"id": "a"}, {"id": "dev", "repeat": api.Repeat(over="stories")}],
            dag.REPEAT_OVER_NOTHING,
            "spec.steps[1].repeat.over",
            "step 'dev' repeats over 'stories', which no step creates",
        ),
        (
            [{"id": "a", "depends_on": ["ghost"]}],
            dag.UNKNOWN_DEPENDENCY,
            "spec.steps[0].dependsOn",
            "step 'a' depends on 'ghost', which is not a step",
        ),
        (
            [{"id": "a", "creates": "x"}, {"id": "b", "creates": "x"}],
            dag.DUPLICATE_CREATOR,
            "spec.steps[1].creates",
            "step 'b' creates 'x', which step 'a' creates already",
        ),
        (
            [{"id": "a"}, {"id": "a"}],
            dag.DUPLICATE_STEP,
            "spec.steps[1].id",
            "step id 'a' is used twice",
        ),
        (
            [{"id": "a", "depends_on": ["a"]}],
            dag.CYCLE,
            "spec.steps[0].dependsOn",
            "steps a -> a form a cycle",
        ),
        (
            [
                {"id": "a", "creates": "a.md", "requires": ["c.md"]},
                {"id": "b", "creates": "b.md", "requires": ["a.md"]},
                {"id": "c", "creates": "c.md", "depends_on": ["b"]},
            ],
            dag.CYCLE,
            "spec.steps[0].requires",
            "steps c -> a -> b -> c form a cycle (through 'c.md')",
        ),
    ],
)
def test_invalid_graphs_name_the_step_and_the_field(
    specs: list[dict[str, Any]], reason: str, field: str, text: str
) -> None:
    [error] = errors(*specs)
    assert (error.reason, error.field) == (reason, field)
    assert error.message.startswith(f"{field}: ")
    assert text in error.message


def test_a_step_downstream_of_a_cycle_is_not_named_as_part_of_it() -> None:
    [error] = errors(
        {"id": "reader", "requires": ["b.md"]},
        {"id": "a", "creates": "a.md", "requires": ["b.md"]},
        {"id": "b", "creates": "b.md", "requires": ["a.md"]},
    )
    assert error.step == "a"
    assert "steps b -> a -> b form a cycle" in error.message


def test_every_problem_is_reported_at_once() -> None:
    found = errors(
        {"id": "a", "requires": ["x"]},
        {"id": "b", "depends_on": ["nope"]},
        {"id": "c", "repeat": api.Repeat(over="y")},
    )
    assert [e.step for e in found] == ["a", "b", "c"]
