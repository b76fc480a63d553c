"""The engine's decisions, pass by pass, against a bus the test answers by hand."""

from __future__ import annotations

import datetime as dt

import pytest

from bmad_crds.v1alpha1 import workflow as api
from bmad_operator.workflows import engine, tasks

from .harness import START, UID, Run, drive

pytestmark = pytest.mark.unit

CHAIN = {
    "steps": [
        {"id": "brief", "agent": "analyst", "creates": "project-brief.md"},
        {"id": "prd", "agent": "pm", "creates": "prd.md", "requires": ["project-brief.md"]},
        {
            "id": "architecture",
            "agent": "architect",
            "creates": "architecture.md",
            "requires": ["prd.md"],
        },
    ]
}


# --- a linear chain ------------------------------------------------------------------


def test_a_chain_runs_one_step_at_a_time_in_order() -> None:
    run = Run(CHAIN)
    first = run.tick()
    assert [d.step for d in first.dispatch] == ["brief"]
    assert run.phase() == "Running"
    assert run.step("prd").phase == "Pending"
    assert run.status is not None
    assert run.status.progress == "0/3"

    run.answer_all(first)
    second = run.tick(seconds=5)
    assert [d.step for d in second.dispatch] == ["prd"]
    assert run.step("brief").phase == "Succeeded"
    assert run.step("brief").artifact == "s3://artifacts/team-a/run/project-brief.md"
    assert run.step("brief").artifact_version == "v-brief-None-1"
    [ref] = second.dispatch[0].requires
    assert (ref.name, ref.step, ref.version) == ("project-brief.md", "brief", "v-brief-None-1")

    run.answer_all(second)
    third = run.tick(seconds=5)
    run.answer_all(third)
    run.tick(seconds=5)
    assert run.phase() == "Succeeded"
    assert run.status is not None
    assert run.status.progress == "3/3"
    assert run.status.totals is not None
    assert (run.status.totals.tokens_in, run.status.totals.tokens_out) == (30, 15)
    assert run.status.completion_time == START + dt.timedelta(seconds=15)
    assert run.condition("Succeeded").status == "True"
    assert run.condition("Ready").status == "True"
    assert run.condition("Failed").status == "False"
    assert [d.step for d in run.dispatched] == ["brief", "prd", "architecture"]
    assert "Succeeded" in run.reasons()


def test_task_ids_are_deterministic_per_step_item_and_attempt() -> None:
    run = Run(CHAIN)
    [dispatch] = run.tick().dispatch
    assert dispatch.task_id == f"wf:{UID}:brief:1" == tasks.task_id(UID, "brief", None, 1)
    assert tasks.task_id(UID, "dev", "1.2", 3) == f"wf:{UID}:dev:1.2:3"
    assert tasks.task_id(UID, "a-b", "c", 1) != tasks.task_id(UID, "a", "b-c", 1)
    with pytest.raises(ValueError, match="attempts count from 1"):
        tasks.task_id(UID, "dev", None, 0)
    with pytest.raises(ValueError, match="not a valid item name"):
        tasks.task_id(UID, "dev", "a:b", 1)


def test_a_pass_without_news_dispatches_nothing_twice() -> None:
    run = Run(CHAIN)
    run.tick()
    for _ in range(3):
        again = run.tick(seconds=30)
        assert again.dispatch == ()
        assert again.events == ()
    assert len(run.dispatched) == 1


def test_a_restart_from_the_written_status_never_redispatches_a_finished_step() -> None:
    run = Run(CHAIN)
    run.answer_all(run.tick())
    run.tick()  # brief succeeded, prd dispatched
    # A new operator process: the same status, the bus still holds brief's result.
    restarted = Run(CHAIN)
    restarted.status = run.status
    restarted.results = dict(run.results)
    restarted.now = run.now
    decision = restarted.tick(seconds=60)
    assert decision.dispatch == ()
    assert restarted.step("brief").phase == "Succeeded"
    assert restarted.step("prd").phase == "Running"
    assert tasks.outstanding(UID, restarted.status) == [f"wf:{UID}:prd:1"]


def test_a_late_result_of_an_old_attempt_changes_nothing() -> None:
    spec = {
        "steps": [
            {
                "id": "dev",
                "agent": "dev",
                "creates": "code",
                "timeoutSeconds": 60,
                "retries": {"limit": 1, "backoffSeconds": 0},
            }
        ]
    }
    run = Run(spec)
    [first] = run.tick().dispatch
    decision = run.tick(seconds=61)  # timed out, and attempt 2 is due at once
    assert decision.cancel == (first.task_id,)
    [second] = decision.dispatch
    assert second.attempt == 2
    run.answer(first)  # attempt 1 finally answers
    assert run.tick().dispatch == ()
    assert run.step("dev").phase == "Running"
    assert run.step("dev").attempts == 2


# --- fan-out over items --------------------------------------------------------------

STORIES = {
    "steps": [
        {"id": "shard", "agent": "po", "creates": "stories"},
        {
            "id": "draft",
            "agent": "sm",
            "creates": "story.md",
            "requires": ["stories"],
            "repeat": {"over": "stories", "maxParallel": 2},
        },
        {
            "id": "implement",
            "agent": "dev",
            "creates": "code",
            "requires": ["story.md"],
            "repeat": {"over": "stories", "maxParallel": 2},
        },
        {
            "id": "review",
            "agent": "qa",
            "updates": "code",
            "requires": ["code"],
            "repeat": {"over": "stories"},
        },
        {"id": "retro", "agent": "po", "creates": "retro.md", "requires": ["code"]},
    ]
}


def test_a_repeat_over_two_stories_runs_one_cycle_per_story() -> None:
    run = Run(STORIES)
    [shard] = run.tick().dispatch
    run.answer(shard, items=("1.1", "1.2"))
    drafts = run.tick()
    assert sorted((d.step, d.item) for d in drafts.dispatch) == [
        ("draft", "1.1"),
        ("draft", "1.2"),
    ]
    assert run.step("shard").artifact_items == ["1.1", "1.2"]
    assert [i.name for i in run.step("draft").items or []] == ["1.1", "1.2"]
    assert run.step("draft").phase == "Running"

    # Story 1.1's draft is done: its implementation starts without waiting for 1.2.
    run.answer(drafts.dispatch[0])
    implement = run.tick()
    assert [(d.step, d.item) for d in implement.dispatch] == [("implement", "1.1")]
    story, stories = implement.dispatch[0].requires
    assert (story.name, story.item, story.step) == ("story.md", "1.1", "draft")
    assert (stories.name, stories.item, stories.step) == ("stories", None, "shard")
    assert run.item("draft", "1.2").phase == "Running"

    run.answer(implement.dispatch[0])
    review = run.tick()
    assert [(d.step, d.item) for d in review.dispatch] == [("review", "1.1")]
    assert [(r.name, r.item) for r in review.dispatch[0].requires] == [
        ("code", "1.1"),
        ("stories", None),
    ]

    drive(run)
    assert run.phase() == "Succeeded"
    assert run.step("implement").attempts == 2
    assert [i.phase for i in run.step("review").items or []] == ["Succeeded", "Succeeded"]
    # The retrospective gets every story's newest code: the review's versions.
    [retro] = run.dispatched_for("retro")
    assert sorted((r.item, r.step) for r in retro.requires) == [
        ("1.1", "review"),
        ("1.2", "review"),
    ]
    assert len(run.dispatched) == 1 + 2 + 2 + 2 + 1


def test_max_parallel_bounds_the_items_in_flight() -> None:
    spec = {
        "steps": [
            {"id": "shard", "agent": "po", "creates": "stories"},
            {"id": "dev", "agent": "dev", "repeat": {"over": "stories", "maxParallel": 2}},
        ]
    }
    run = Run(spec)
    run.answer(run.tick().dispatch[0], items=("a", "b", "c", "d", "e"))
    first = run.tick()
    assert [d.item for d in first.dispatch] == ["a", "b"]
    assert run.tick().dispatch == ()
    run.answer(first.dispatch[1])
    assert [d.item for d in run.tick().dispatch] == ["c"]
    assert run.step("dev").message == "1 of 5 items done, 2 running"


def test_a_repeat_over_an_empty_list_succeeds_with_no_items() -> None:
    spec = {
        "steps": [
            {"id": "shard", "agent": "po", "creates": "stories"},
            {"id": "dev", "agent": "dev", "repeat": {"over": "stories"}},
        ]
    }
    run = Run(spec)
    run.answer(run.tick().dispatch[0], items=())
    run.tick()
    assert run.step("dev").phase == "Succeeded"
    assert run.step("dev").reason == "NoItems"
    assert run.phase() == "Succeeded"


def test_a_result_listing_a_bad_item_fails_the_attempt() -> None:
    spec = {
        "steps": [
            {"id": "shard", "agent": "po", "creates": "stories"},
            {"id": "dev", "agent": "dev", "repeat": {"over": "stories"}},
        ]
    }
    run = Run(spec)
    run.answer(run.tick().dispatch[0], items=("story one",))
    run.tick()
    assert run.step("shard").phase == "Failed"
    assert run.step("shard").reason == "InvalidResult"
    assert "'story one'" in (run.step("shard").message or "")
    assert run.phase() == "Failed"


# --- failures, retries, timeouts -----------------------------------------------------


def test_a_step_failing_twice_then_succeeding_shows_three_attempts() -> None:
    spec = {
        "steps": [
            {
                "id": "architecture",
                "agent": "architect",
                "creates": "architecture.md",
                "retries": {"limit": 3, "backoffSeconds": 10, "backoffFactor": 3},
            }
        ]
    }
    run = Run(spec)
    [attempt1] = run.tick().dispatch
    run.answer(attempt1, ok=False, message="model overloaded")
    run.tick()
    state = run.step("architecture")
    assert (state.phase, state.reason, state.attempts) == ("Retrying", "AgentFailed", 1)
    assert state.next_attempt_time == START + dt.timedelta(seconds=10)
    assert "attempt 1 of 4 failed: model overloaded" in (state.message or "")
    assert run.last is not None
    assert run.last.requeue_after == 10

    assert run.tick(seconds=9).dispatch == ()  # backoff not over
    [attempt2] = run.tick(seconds=1).dispatch
    assert attempt2.attempt == 2
    assert attempt2.task_id == f"wf:{UID}:architecture:2"
    run.answer(attempt2, ok=False)
    run.tick()
    assert run.step("architecture").next_attempt_time == run.now + dt.timedelta(seconds=30)
    [attempt3] = run.tick(seconds=30).dispatch
    run.answer(attempt3)
    run.tick()
    state = run.step("architecture")
    assert (state.phase, state.attempts) == ("Succeeded", 3)
    assert state.tokens == 45
    assert run.phase() == "Succeeded"
    assert run.reasons().count("StepRetrying") == 2


def test_backoff_grows_by_the_factor_and_stops_at_the_cap() -> None:
    retries = api.Retries(limit=10, backoff_seconds=5, backoff_factor=2, max_backoff_seconds=30)
    assert [engine.backoff_seconds(retries, n) for n in range(1, 6)] == [5, 10, 20, 30, 30]
    assert engine.backoff_seconds(None, 3) == 0


def test_a_step_that_always_fails_fails_the_run_naming_it() -> None:
    spec = {
        "steps": [
            {"id": "brief", "agent": "analyst", "creates": "brief.md"},
            {
                "id": "prd",
                "agent": "pm",
                "creates": "prd.md",
                "requires": ["brief.md"],
                "retries": {"limit": 1, "backoffSeconds": 0},
            },
            {"id": "arch", "agent": "architect", "requires": ["prd.md"]},
        ]
    }
    run = Run(spec)
    run.answer_all(run.tick())
    for _ in range(2):
        decision = run.tick()
        run.answer_all(decision, ok=False, message="the PRD template is missing")
    run.tick()
    assert run.phase() == "Failed"
    prd = run.step("prd")
    assert (prd.phase, prd.reason, prd.attempts) == ("Failed", "AgentFailed", 2)
    failed = run.condition("Failed")
    assert failed.status == "True"
    assert failed.reason == "StepFailed"
    assert "Step prd failed" in failed.message
    assert "the PRD template is missing" in failed.message
    assert run.condition("Ready").reason == "StepFailed"
    assert run.step("arch").phase == "Cancelled"
    assert run.dispatched_for("arch") == []
    assert run.status is not None
    assert run.status.completion_time is not None
    # A finished run stays finished.
    assert run.tick(seconds=600).dispatch == ()
    assert run.phase() == "Failed"


def test_a_failing_optional_step_does_not_fail_the_run_and_skips_its_readers() -> None:
    spec = {
        "steps": [
            {"id": "ux", "agent": "ux-expert", "creates": "front-end-spec.md", "optional": True},
            {"id": "v0", "agent": "ux-expert", "requires": ["front-end-spec.md"]},
            {"id": "arch", "agent": "architect", "creates": "arch.md", "dependsOn": ["ux"]},
        ]
    }
    run = Run(spec)
    run.answer_all(run.tick(), ok=False)
    decision = run.tick()
    assert run.step("ux").phase == "Failed"
    assert run.step("v0").phase == "Skipped"
    assert run.step("v0").reason == "RequirementMissing"
    assert "front-end-spec.md was not created" in (run.step("v0").message or "")
    # dependsOn only orders: the architect runs after the failed optional step.
    assert [d.step for d in decision.dispatch] == ["arch"]
    run.answer_all(decision)
    run.tick()
    assert run.phase() == "Succeeded"
    assert run.status is not None
    assert run.status.progress == "3/3"


def test_a_step_past_its_timeout_is_retried_then_failed() -> None:
    spec = {
        "steps": [
            {
                "id": "dev",
                "agent": "dev",
                "creates": "code",
                "timeoutSeconds": 120,
                "retries": {"limit": 1, "backoffSeconds": 5},
            }
        ]
    }
    run = Run(spec)
    [first] = run.tick().dispatch
    assert first.timeout_seconds == 120
    assert run.last is not None
    assert run.last.requeue_after == 120
    assert run.tick(seconds=119).cancel == ()
    timed_out = run.tick(seconds=1)
    assert timed_out.cancel == (first.task_id,)
    assert run.step("dev").phase == "Retrying"
    assert run.step("dev").reason == "TimedOut"
    [second] = run.tick(seconds=5).dispatch
    assert second.attempt == 2
    final = run.tick(seconds=120)
    assert final.cancel == (second.task_id,)
    dev = run.step("dev")
    assert (dev.phase, dev.reason, dev.attempts) == ("Failed", "TimedOut", 2)
    assert "timed out after 2 attempts" in (dev.message or "")
    assert run.phase() == "Failed"


def test_a_failed_item_of_a_required_step_cancels_the_other_items() -> None:
    run = Run(STORIES)
    run.answer(run.tick().dispatch[0], items=("1.1", "1.2"))
    drafts = run.tick()
    run.answer(drafts.dispatch[0], ok=False, message="epic 1 is empty")
    decision = run.tick()
    assert run.phase() == "Failed"
    assert run.step("draft").reason == "ItemFailed"
    assert "item 1.1" in (run.step("draft").message or "")
    assert run.item("draft", "1.2").phase == "Cancelled"
    assert decision.cancel == (drafts.dispatch[1].task_id,)


def test_a_failed_item_of_an_optional_step_lets_the_others_finish() -> None:
    spec = {
        "steps": [
            {"id": "shard", "agent": "po", "creates": "stories"},
            {
                "id": "review",
                "agent": "qa",
                "optional": True,
                "repeat": {"over": "stories", "maxParallel": 2},
            },
        ]
    }
    run = Run(spec)
    run.answer(run.tick().dispatch[0], items=("a", "b"))
    items = run.tick()
    run.answer(items.dispatch[0], ok=False)
    run.tick()
    assert run.item("review", "b").phase == "Running"
    assert run.phase() == "Running"
    run.answer(items.dispatch[1])
    run.tick()
    assert run.step("review").phase == "Failed"
    assert run.phase() == "Succeeded"


# --- conditions ----------------------------------------------------------------------


def test_conditions_see_inputs_and_earlier_outputs() -> None:
    spec = {
        "inputs": {"user_wants_ux": False},
        "steps": [
            {"id": "arch", "agent": "architect", "creates": "arch.md"},
            {
                "id": "ux",
                "agent": "ux-expert",
                "dependsOn": ["arch"],
                "condition": "has(inputs.user_wants_ux) && inputs.user_wants_ux",
            },
            {
                "id": "update-prd",
                "agent": "pm",
                "requires": ["arch.md"],
                "condition": "outputs['arch'].suggests_prd_changes",
            },
            {
                "id": "note",
                "agent": "pm",
                "requires": ["arch.md"],
                "condition": "outputs['arch'].stories == 2 && 'arch.md' in artifacts",
            },
        ],
    }
    run = Run(spec)
    run.answer(run.tick().dispatch[0], outputs={"suggests_prd_changes": True, "stories": 2})
    decision = run.tick()
    assert run.step("arch").outputs == {"suggests_prd_changes": "true", "stories": "2"}
    assert run.step("ux").phase == "Skipped"
    assert run.step("ux").reason == "ConditionFalse"
    assert sorted(d.step for d in decision.dispatch) == ["note", "update-prd"]


def test_a_condition_that_fails_to_evaluate_fails_the_step_naming_the_field() -> None:
    spec = {
        "steps": [
            {"id": "a", "agent": "pm", "creates": "a.md"},
            {"id": "b", "agent": "pm", "requires": ["a.md"], "condition": "inputs.missing"},
        ]
    }
    run = Run(spec)
    run.answer_all(run.tick())
    run.tick()
    b = run.step("b")
    assert (b.phase, b.reason) == ("Failed", "ConditionError")
    assert "spec.steps[1].condition could not be evaluated" in (b.message or "")
    assert run.phase() == "Failed"


def test_a_condition_per_item_sees_the_item() -> None:
    spec = {
        "steps": [
            {"id": "shard", "agent": "po", "creates": "stories"},
            {
                "id": "dev",
                "agent": "dev",
                "repeat": {"over": "stories", "maxParallel": 4},
                "condition": "item.startsWith('1.')",
            },
        ]
    }
    run = Run(spec)
    run.answer(run.tick().dispatch[0], items=("1.1", "2.1", "1.2"))
    decision = run.tick()
    assert [d.item for d in decision.dispatch] == ["1.1", "1.2"]
    assert run.item("dev", "2.1").phase == "Skipped"


# --- approvals -----------------------------------------------------------------------

APPROVAL = {
    "notify": {"integration": "mail", "recipients": ["lead@example.com"]},
    "steps": [
        {
            "id": "prd",
            "agent": "pm",
            "creates": "prd.md",
            "approval": {"prompt": "Is the PRD complete?", "approvers": ["alice"]},
        },
        {"id": "arch", "agent": "architect", "requires": ["prd.md"]},
    ],
}


def test_the_run_waits_for_approval_then_goes_on() -> None:
    run = Run(APPROVAL)
    run.answer_all(run.tick())
    waiting = run.tick()
    assert waiting.dispatch == ()
    assert run.phase() == "AwaitingApproval"
    assert run.step("prd").phase == "AwaitingApproval"
    assert run.condition("AwaitingApproval").status == "True"
    assert run.condition("Ready").reason == "ApprovalRequired"
    [mail] = waiting.notifications
    assert mail.phase == "AwaitingApproval"
    assert "prd" in mail.subject
    assert "Is the PRD complete?" in mail.body
    assert "add prd to spec.approvals" in mail.body
    assert "kubectl edit workflow run -n team-a" in mail.body
    assert "alice" in mail.body
    assert run.tick(seconds=3600).dispatch == ()  # still waiting, no second mail
    assert run.notifications == [mail]

    run.spec["approvals"] = ["prd"]
    approved = run.tick()
    assert [d.step for d in approved.dispatch] == ["arch"]
    assert (run.step("prd").phase, run.step("prd").reason) == ("Succeeded", "Approved")
    assert run.phase() == "Running"
    assert run.condition("AwaitingApproval").status == "False"
    assert "Approved" in run.reasons()


def test_approvals_given_by_the_caller_take_precedence_over_the_spec() -> None:
    spec = {**APPROVAL, "approvals": ["prd"]}
    run = Run(spec)
    run.answer_all(run.tick())
    run.tick(approvals=())  # the caller found the edit was not made by an approver
    assert run.step("prd").phase == "AwaitingApproval"
    run.tick(approvals=("prd",))
    assert run.step("prd").phase == "Succeeded"


def test_an_approval_given_in_advance_lets_the_step_through() -> None:
    run = Run({**APPROVAL, "approvals": ["prd"]})
    run.answer_all(run.tick())
    decision = run.tick()
    assert [d.step for d in decision.dispatch] == ["arch"]
    assert run.step("prd").reason == "Approved"
    assert not any(n.phase == "AwaitingApproval" for n in run.notifications)


def test_notifications_go_out_on_the_phases_asked_for() -> None:
    spec = {
        "notify": {"integration": "mail", "recipients": ["a@example.com"], "phases": ["Failed"]},
        "steps": [{"id": "a", "agent": "pm"}],
    }
    ok = Run(spec)
    drive(ok)
    assert ok.notifications == []
    bad = Run(spec)
    bad.answer_all(bad.tick(), ok=False, message="no model")
    bad.tick()
    [mail] = bad.notifications
    assert mail.phase == "Failed"
    assert "no model" in mail.body
    done = Run({**spec, "notify": {**spec["notify"], "phases": ["Succeeded"]}})
    drive(done)
    assert [n.phase for n in done.notifications] == ["Succeeded"]


# --- suspend and cancellation --------------------------------------------------------


def test_suspend_starts_nothing_new_and_lets_running_attempts_finish() -> None:
    run = Run(CHAIN)
    [brief] = run.tick().dispatch
    run.spec["suspend"] = True
    run.answer(brief)
    decision = run.tick()
    assert decision.dispatch == ()
    assert run.step("brief").phase == "Succeeded"
    assert run.step("prd").phase == "Pending"
    assert run.condition("Suspended").status == "True"
    assert run.condition("Ready").reason == "Suspended"
    assert "Suspended" in run.reasons()
    assert run.tick(seconds=3600).dispatch == ()

    run.spec["suspend"] = False
    resumed = run.tick()
    assert [d.step for d in resumed.dispatch] == ["prd"]
    assert run.condition("Suspended").status == "False"
    assert "Resumed" in run.reasons()


def test_suspend_holds_retries_that_are_due() -> None:
    spec = {
        "steps": [{"id": "a", "agent": "pm", "retries": {"limit": 2, "backoffSeconds": 1}}],
    }
    run = Run(spec)
    run.answer_all(run.tick(), ok=False)
    run.tick()
    run.spec["suspend"] = True
    assert run.tick(seconds=60).dispatch == ()
    assert run.last is not None
    assert run.last.requeue_after is None
    run.spec["suspend"] = False
    assert [d.attempt for d in run.tick().dispatch] == [2]


def test_deleting_cancels_the_outstanding_tasks() -> None:
    run = Run(STORIES)
    run.answer(run.tick().dispatch[0], items=("1.1", "1.2"))
    drafts = run.tick()
    assert sorted(tasks.outstanding(UID, run.status)) == sorted(d.task_id for d in drafts.dispatch)
    decision = run.tick(deleting=True)
    assert sorted(decision.cancel) == sorted(d.task_id for d in drafts.dispatch)
    assert run.phase() == "Cancelled"
    assert run.item("draft", "1.1").phase == "Cancelled"
    assert run.step("implement").phase == "Cancelled"
    assert run.step("shard").phase == "Succeeded"
    assert tasks.outstanding(UID, run.status) == []


# --- invalid workflows ---------------------------------------------------------------


def _invalid(spec: dict[str, object]) -> api.Workflow:
    """A Workflow the API would refuse, built without validation (as an old object)."""
    steps = [
        api.Step.model_construct(
            **{
                "depends_on": None,
                "requires": None,
                "creates": None,
                "updates": None,
                "repeat": None,
                "approval": None,
                "retries": None,
                "timeout_seconds": None,
                "condition": None,
                "optional": False,
                "description": None,
                **step,
            }
        )
        for step in spec["steps"]  # type: ignore[attr-defined]
    ]
    return api.Workflow.model_construct(
        metadata=api.common.ObjectMeta(name="bad", namespace="team-a", uid=UID, generation=1),
        spec=api.WorkflowSpec.model_construct(
            steps=steps, inputs=None, approvals=None, suspend=False, notify=None
        ),
        status=None,
    )


@pytest.mark.parametrize(
    ("steps", "reason", "field"),
    [
        (
            [
                {"id": "a", "agent": "pm", "creates": "a.md", "requires": ["b.md"]},
                {"id": "b", "agent": "pm", "creates": "b.md", "requires": ["a.md"]},
            ],
            "Cycle",
            "spec.steps[0].requires",
        ),
        (
            [{"id": "a", "agent": "pm", "requires": ["brief.md"]}],
            "RequirementNotCreated",
            "spec.steps[0].requires",
        ),
        (
            [{"id": "a", "agent": "pm", "repeat": api.Repeat(over="stories")}],
            "RepeatOverNothing",
            "spec.steps[0].repeat.over",
        ),
        (
            [{"id": "a", "agent": "pm", "depends_on": ["b"]}],
            "UnknownDependency",
            "spec.steps[0].dependsOn",
        ),
    ],
)
def test_an_invalid_workflow_gets_a_condition_naming_step_and_field_and_dispatches_nothing(
    steps: list[dict[str, object]], reason: str, field: str
) -> None:
    decision = engine.decide(
        _invalid({"steps": steps}), results={}, now=START, agents=None, deleting=False
    )
    assert decision.dispatch == ()
    [valid] = [c for c in decision.status.conditions if c.type == "Valid"]
    assert (valid.status, valid.reason) == ("False", reason)
    assert field in valid.message
    assert "step 'a'" in valid.message or "a ->" in valid.message
    [ready] = [c for c in decision.status.conditions if c.type == "Ready"]
    assert (ready.status, ready.reason) == ("False", reason)
    assert decision.status.phase == "Pending"
    assert [e.reason for e in decision.events] == ["InvalidWorkflow"]


def test_a_step_naming_a_missing_agent_stops_the_run_until_the_agent_exists() -> None:
    run = Run(CHAIN, agents={"analyst", "pm"})
    assert run.tick().dispatch == ()
    valid = run.condition("Valid")
    assert (valid.status, valid.reason) == ("False", "AgentNotFound")
    assert "spec.steps[2].agent" in valid.message
    assert "'architect'" in valid.message
    assert run.reasons() == ["InvalidWorkflow"]
    assert run.tick(seconds=30).events == ()  # said once
    run.agents = {"analyst", "pm", "architect"}
    assert [d.step for d in run.tick().dispatch] == ["brief"]
    assert run.condition("Valid").status == "True"


def test_a_condition_that_does_not_parse_is_reported_before_anything_runs() -> None:
    spec = {"steps": [{"id": "ux", "agent": "ux-expert", "condition": "user_wants_ux"}]}
    run = Run(spec)
    assert run.tick().dispatch == ()
    valid = run.condition("Valid")
    assert valid.reason == "InvalidCondition"
    assert "spec.steps[0].condition" in valid.message
    assert "has(inputs.user_wants_ux) && inputs.user_wants_ux" in valid.message


def test_status_round_trips_through_the_api_model() -> None:
    run = Run(STORIES)
    run.answer(run.tick().dispatch[0], items=("1.1",))
    run.tick()
    assert run.status is not None
    assert api.WorkflowStatus.model_validate(run.status.model_dump(by_alias=True)) == run.status
    assert {"Succeeded", "Failed", "Cancelled"} == engine.TERMINAL


def test_outputs_that_do_not_fit_fail_the_attempt() -> None:
    run = Run({"steps": [{"id": "arch", "agent": "architect", "creates": "arch.md"}]})
    run.answer(run.tick().dispatch[0], outputs={"suggests-changes": True})
    run.tick()
    arch = run.step("arch")
    assert (arch.phase, arch.reason) == ("Failed", "InvalidResult")
    assert "'suggests-changes' is not an identifier" in (arch.message or "")


def test_a_spec_that_becomes_invalid_mid_run_stops_new_work_until_fixed() -> None:
    run = Run(CHAIN)
    [brief] = run.tick().dispatch
    run.spec = {
        "steps": [*CHAIN["steps"], {"id": "ux", "agent": "ux-expert", "condition": "wants_ux"}]
    }
    run.answer(brief)
    assert run.tick().dispatch == ()
    assert run.condition("Valid").reason == "InvalidCondition"
    assert run.phase() == "Running"
    assert run.step("brief").phase == "Running"  # its result waits for a valid spec
    run.spec["steps"][-1]["condition"] = "has(inputs.wants_ux) && inputs.wants_ux"
    decision = run.tick()
    assert run.step("brief").phase == "Succeeded"
    assert [d.step for d in decision.dispatch] == ["prd"]
    assert run.step("ux").phase == "Skipped"
