"""A driver for the pure workflow engine: a clock, a status, and a bus that answers.

`Run` keeps what the reconciler would keep between passes (the status it wrote) and
hands `engine.decide` the results of the tasks it dispatched, as a test says. Each
`tick()` is one reconcile pass; nothing runs unless a test answers a task.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Collection, Mapping
from typing import Any

from bmad_crds.v1alpha1 import common
from bmad_crds.v1alpha1 import workflow as api
from bmad_operator.workflows import engine, tasks

UID = "0b7d4a52-9c1e-4d55-8f0e-3a2b1c0d9e8f"
START = dt.datetime(2025, 3, 1, 12, 0, 0, tzinfo=dt.UTC)


def workflow(spec: Mapping[str, Any], *, name: str = "run", generation: int = 1) -> api.Workflow:
    return api.Workflow.model_validate(
        {
            "metadata": {
                "name": name,
                "namespace": "team-a",
                "uid": UID,
                "generation": generation,
            },
            "spec": dict(spec),
        }
    )


class Run:
    def __init__(
        self,
        spec: Mapping[str, Any],
        *,
        agents: Collection[str] | None = None,
    ) -> None:
        self.spec = dict(spec)
        self.status: api.WorkflowStatus | None = None
        self.now = START
        self.agents = agents
        self.results: dict[str, tasks.Result] = {}
        self.dispatched: list[tasks.Dispatch] = []
        self.cancelled: list[str] = []
        self.events: list[engine.Event] = []
        self.notifications: list[engine.Notification] = []
        self.last: engine.Decision | None = None

    def workflow(self) -> api.Workflow:
        obj = workflow(self.spec)
        obj.status = self.status
        return obj

    def tick(
        self,
        *,
        seconds: float = 0,
        deleting: bool = False,
        approvals: Collection[str] | None = None,
    ) -> engine.Decision:
        self.now += dt.timedelta(seconds=seconds)
        decision = engine.decide(
            self.workflow(),
            results=self.results,
            now=self.now,
            agents=self.agents,
            approvals=approvals,
            deleting=deleting,
        )
        # What the reconciler writes is what the next pass reads: round-trip it.
        self.status = api.WorkflowStatus.model_validate(common.to_json(decision.status))
        self.dispatched.extend(decision.dispatch)
        self.cancelled.extend(decision.cancel)
        self.events.extend(decision.events)
        self.notifications.extend(decision.notifications)
        self.last = decision
        return decision

    # --- answering tasks ----------------------------------------------------------

    def answer(
        self,
        dispatch: tasks.Dispatch,
        *,
        ok: bool = True,
        message: str = "",
        items: tuple[str, ...] | None = None,
        outputs: Mapping[str, Any] | None = None,
        tokens: tuple[int, int] = (10, 5),
    ) -> None:
        name = dispatch.creates or dispatch.updates or dispatch.step
        where = f"{dispatch.item}/" if dispatch.item else ""
        self.results[dispatch.task_id] = tasks.Result(
            task_id=dispatch.task_id,
            succeeded=ok,
            message=message or ("done" if ok else "boom"),
            tokens_in=tokens[0],
            tokens_out=tokens[1],
            artifact_uri=f"s3://artifacts/team-a/run/{where}{name}" if ok else None,
            artifact_version=f"v-{dispatch.step}-{dispatch.item}-{dispatch.attempt}"
            if ok
            else None,
            items=items,
            outputs=dict(outputs or {}),
        )

    def answer_all(self, decision: engine.Decision, **kw: Any) -> None:
        for dispatch in decision.dispatch:
            self.answer(dispatch, **kw)

    # --- reading the status ---------------------------------------------------------

    def step(self, step_id: str) -> api.StepStatus:
        assert self.status is not None
        assert self.status.steps is not None
        [found] = [s for s in self.status.steps if s.id == step_id]
        return found

    def item(self, step_id: str, name: str) -> api.ItemStatus:
        [found] = [i for i in self.step(step_id).items or [] if i.name == name]
        return found

    def phase(self) -> str | None:
        assert self.status is not None
        return self.status.phase

    def condition(self, type_: str) -> common.Condition:
        assert self.status is not None
        [found] = [c for c in self.status.conditions if c.type == type_]
        return found

    def reasons(self) -> list[str]:
        return [event.reason for event in self.events]

    def dispatched_for(self, step_id: str) -> list[tasks.Dispatch]:
        return [d for d in self.dispatched if d.step == step_id]


def drive(run: Run, *, limit: int = 50, **answer: Any) -> None:
    """Answer every open dispatch successfully until the run ends (or `limit` passes)."""
    run.tick()
    for _ in range(limit):
        if run.phase() in engine.TERMINAL:
            return
        for dispatch in run.dispatched:
            if dispatch.task_id not in run.results:
                run.answer(dispatch, **answer)
        run.tick(seconds=1)
    raise AssertionError(f"the run did not end in {limit} passes: {run.status}")
