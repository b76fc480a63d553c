"""The workflow engine's decision, as a pure function: state in, next actions out.

:func:`decide` takes a parsed Workflow (spec and the status the last pass wrote), the
results that arrived for its tasks, the time, the Agents that exist and the approved
steps, and returns the new status with what to do now: tasks to dispatch, task ids
to cancel, Events to post, e-mails to send and when to look again. It never talks
to anything, so every rule below is unit-tested without a cluster:

- a step starts when the steps it waits for (:mod:`.dag`) have finished: Succeeded
  (after its approval, if any), Skipped, or Failed while ``optional``;
- a step whose required artifact was never created (its creator was skipped, or
  failed while optional) is Skipped; ``dependsOn`` only orders, it hands nothing over;
- ``condition`` (CEL, :mod:`.expr`) false: Skipped; an evaluation error fails the step;
- a repeated step runs once per item its ``over`` artifact lists, at most
  ``maxParallel`` at a time; items of pipelined steps wait for the same item only;
- a failed or timed-out attempt is retried after ``backoffSeconds * backoffFactor^n``
  (capped) until ``retries.limit`` is used up; then the step (or item) fails;
- a failed step that is not optional fails the run: its other attempts are cancelled;
- ``approval``: the step ends in AwaitingApproval until its id is in the approvals;
- ``suspend``: nothing new starts (no step, item or retry); running attempts finish;
- deletion: every running attempt is cancelled and the run ends Cancelled.

Only the current attempt's task id is looked up, so a late result of a timed-out
attempt, or a second delivery of a finished one, changes nothing.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Collection, Iterator, Mapping, Sequence
from typing import Any, NamedTuple, TypeVar

import pydantic

from bmad_crds.v1alpha1 import common
from bmad_crds.v1alpha1 import workflow as api
from bmad_operator import conditions
from bmad_operator.conditions import FALSE, TRUE, Cond
from bmad_operator.workflows import dag as dag_mod
from bmad_operator.workflows import expr, tasks

SHORT_MESSAGE = 512
ITEM_MESSAGE = 512
TERMINAL: frozenset[str] = frozenset({"Succeeded", "Failed", "Cancelled"})
_DONE_UNIT = frozenset({"Succeeded", "Skipped", "Failed", "Cancelled"})

# Condition types -----------------------------------------------------------------
READY = "Ready"
VALID = "Valid"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
AWAITING_APPROVAL = "AwaitingApproval"
SUSPENDED = "Suspended"

# Reasons of steps, items and conditions (CamelCase, documented in docs/workflows.md)
DISPATCHED = "Dispatched"
COMPLETED = "Completed"
APPROVED = "Approved"
NO_ITEMS = "NoItems"
APPROVAL_REQUIRED = "ApprovalRequired"
CONDITION_FALSE = "ConditionFalse"
CONDITION_ERROR = "ConditionError"
REQUIREMENT_MISSING = "RequirementMissing"
AGENT_FAILED = "AgentFailed"
TIMED_OUT = "TimedOut"
INVALID_RESULT = "InvalidResult"
ITEM_FAILED = "ItemFailed"
WORKFLOW_FAILED = "WorkflowFailed"
WORKFLOW_DELETED = "WorkflowDeleted"
AGENT_NOT_FOUND = "AgentNotFound"
INVALID_CONDITION = "InvalidCondition"
VALID_REASON = "Valid"
STEP_FAILED = "StepFailed"
NOT_SUSPENDED = "NotSuspended"
NO_APPROVAL_PENDING = "NoApprovalPending"
PENDING = "Pending"
RUNNING = "Running"

# Event reasons
EVENT_STARTED = "Started"
EVENT_STEP_STARTED = "StepStarted"
EVENT_STEP_SUCCEEDED = "StepSucceeded"
EVENT_STEP_SKIPPED = "StepSkipped"
EVENT_STEP_RETRYING = "StepRetrying"
EVENT_STEP_FAILED = "StepFailed"
EVENT_AWAITING_APPROVAL = "AwaitingApproval"
EVENT_APPROVED = "Approved"
EVENT_SUCCEEDED = "Succeeded"
EVENT_FAILED = "Failed"
EVENT_CANCELLED = "Cancelled"
EVENT_SUSPENDED = "Suspended"
EVENT_RESUMED = "Resumed"
EVENT_INVALID = "InvalidWorkflow"


class Event(NamedTuple):
    """A Kubernetes Event to post on the Workflow."""

    type: str  # Normal or Warning
    reason: str
    message: str


class Notification(NamedTuple):
    """An e-mail to send through spec.notify, because the run entered ``phase``."""

    phase: str
    subject: str
    body: str


@dataclasses.dataclass(frozen=True)
class Decision:
    """Everything one pass decided."""

    status: api.WorkflowStatus
    dispatch: tuple[tasks.Dispatch, ...]
    cancel: tuple[str, ...]
    events: tuple[Event, ...]
    notifications: tuple[Notification, ...]
    requeue_after: float | None
    """Seconds until a retry is due or an attempt times out; None when nothing is timed."""


def backoff_seconds(retries: api.Retries | None, failed_attempts: int) -> float:
    """Wait before the attempt after ``failed_attempts`` failures (exponential, capped)."""
    if retries is None:
        return 0.0
    delay = retries.backoff_seconds * retries.backoff_factor ** max(failed_attempts - 1, 0)
    return float(min(delay, retries.max_backoff_seconds))


def max_attempts(step: api.Step) -> int:
    return 1 + (step.retries.limit if step.retries is not None else 0)


def short(text: str, limit: int = SHORT_MESSAGE) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def decide(
    workflow: api.Workflow,
    *,
    results: Mapping[str, tasks.Result],
    now: dt.datetime,
    agents: Collection[str] | None = None,
    approvals: Collection[str] | None = None,
    deleting: bool = False,
    problems: Sequence[dag_mod.DagError] = (),
) -> Decision:
    """The next actions of one Workflow; see the module docstring for the rules.

    ``agents``: names of the Agents in the Workflow's namespace (None: not checked).
    ``approvals``: approved step ids, already checked against ``approvers`` by the
    caller; ``spec.approvals`` when None.
    ``problems``: what the caller found wrong with the references of the run (an Agent
    without a task bus, an Integration of the wrong type); they invalidate the run
    like the graph's own problems.
    """
    return _Pass(
        workflow,
        results=results,
        now=now,
        agents=agents,
        approvals=approvals,
        deleting=deleting,
        problems=problems,
    ).run()


Unit = api.StepStatus | api.ItemStatus
_M = TypeVar("_M", bound=pydantic.BaseModel)


def _copied(model: _M, *, exclude: set[str] | None = None) -> _M:
    """A deep copy of a status model: its dump validated again, several times faster than
    ``model_copy(deep=True)`` (copy.deepcopy), which was most of a pass over 50 steps."""
    return type(model).model_validate(model.model_dump(exclude=exclude))


class _Pass:
    """One decision: a mutable copy of the status, moved forward step by step."""

    def __init__(
        self,
        workflow: api.Workflow,
        *,
        results: Mapping[str, tasks.Result],
        now: dt.datetime,
        agents: Collection[str] | None,
        approvals: Collection[str] | None,
        deleting: bool,
        problems: Sequence[dag_mod.DagError] = (),
    ) -> None:
        if now.tzinfo is None:
            raise ValueError("now must be timezone-aware")
        self.uid = workflow.metadata.uid or ""
        self.name = workflow.metadata.name or ""
        self.namespace = workflow.metadata.namespace or ""
        self.generation = workflow.metadata.generation
        self.spec = workflow.spec
        self.prev = workflow.status or api.WorkflowStatus()
        # `_finish` puts the steps back from `states`: they are not copied twice.
        self.status = _copied(self.prev, exclude={"steps"})
        self.results = results
        self.now = now.astimezone(dt.UTC).replace(microsecond=0)
        self.agents = agents
        self.approvals = set(self.spec.approvals or ()) if approvals is None else set(approvals)
        self.deleting = deleting
        self.problems = tuple(problems)
        self.index = {step.id: i for i, step in enumerate(self.spec.steps)}
        self.by_id = {step.id: step for step in self.spec.steps}
        self.dispatch: list[tasks.Dispatch] = []
        self.cancel: list[str] = []
        self.events: list[Event] = []
        self.notifications: list[Notification] = []
        self.tokens_in = 0
        self.tokens_out = 0
        old = {s.id: s for s in self.prev.steps or []}
        self.states: dict[str, api.StepStatus] = {
            step.id: _copied(old[step.id])
            if step.id in old
            else api.StepStatus(id=step.id, phase="Pending")
            for step in self.spec.steps
        }

    # --- the pass ----------------------------------------------------------------

    def run(self) -> Decision:
        if self.prev.phase in TERMINAL:
            return self._decision(self.prev.model_copy(deep=True))
        errors = self._validate()
        if self.deleting:
            self._cancel_everything(WORKFLOW_DELETED, "The Workflow was deleted.")
            return self._finish(phase="Cancelled", errors=errors)
        if errors:
            return self._finish(phase=self.prev.phase or "Pending", errors=errors)
        self._collect()
        self._approve()
        for step_id in self.dag.order:
            self._advance(self.by_id[step_id])
        failed = self._failed_steps()
        if failed:
            step = failed[0]
            self._cancel_everything(
                WORKFLOW_FAILED, f"The run failed: step {step.id} failed before this finished."
            )
            return self._finish(phase="Failed", errors=[])
        return self._finish(phase=self._phase(), errors=[])

    def _validate(self) -> list[dag_mod.DagError]:
        errors: list[dag_mod.DagError] = []
        try:
            self.dag = dag_mod.build(self.spec.steps)
        except dag_mod.InvalidDagError as exc:
            errors.extend(exc.errors)
        for i, step in enumerate(self.spec.steps):
            if step.condition is not None:
                problem = expr.check(step.condition)
                if problem is not None:
                    field = f"spec.steps[{i}].condition"
                    errors.append(
                        dag_mod.DagError(
                            step.id,
                            field,
                            INVALID_CONDITION,
                            f"{field}: the condition of step {step.id!r} {problem}",
                        )
                    )
            if self.agents is not None and step.agent not in self.agents:
                field = f"spec.steps[{i}].agent"
                errors.append(
                    dag_mod.DagError(
                        step.id,
                        field,
                        AGENT_NOT_FOUND,
                        f"{field}: step {step.id!r} names Agent {step.agent!r}, which does not "
                        f"exist in namespace {self.namespace or 'of the Workflow'}: create it, "
                        "or name another Agent",
                    )
                )
        errors.extend(self.problems)
        return errors

    # --- results and timeouts ----------------------------------------------------

    def _units(self) -> Iterator[tuple[api.Step, Unit, str | None]]:
        for step in self.spec.steps:
            state = self.states[step.id]
            if step.repeat is None:
                yield step, state, None
            else:
                for item in state.items or []:
                    yield step, item, item.name

    def _collect(self) -> None:
        for step, unit, item in list(self._units()):
            if unit.phase != "Running" or not unit.attempts:
                continue
            tid = tasks.task_id(self.uid, step.id, item, unit.attempts)
            result = self.results.get(tid)
            if result is not None:
                self.tokens_in += max(result.tokens_in, 0)
                self.tokens_out += max(result.tokens_out, 0)
                unit.tokens = (
                    (unit.tokens or 0) + max(result.tokens_in, 0) + max(result.tokens_out, 0)
                )
                if not result.succeeded:
                    self._attempt_failed(
                        step, unit, item, AGENT_FAILED, result.message or "the agent failed"
                    )
                    continue
                problem = self._result_problem(step, result)
                if problem is not None:
                    self._attempt_failed(step, unit, item, INVALID_RESULT, problem)
                    continue
                self._attempt_succeeded(step, unit, item, result)
                continue
            if step.timeout_seconds is not None and unit.last_attempt_time is not None:
                deadline = unit.last_attempt_time + dt.timedelta(seconds=step.timeout_seconds)
                if self.now >= deadline:
                    self.cancel.append(tid)
                    self._attempt_failed(
                        step,
                        unit,
                        item,
                        TIMED_OUT,
                        f"no result within timeoutSeconds ({step.timeout_seconds}s)",
                    )

    def _result_problem(self, step: api.Step, result: tasks.Result) -> str | None:
        if len(result.outputs) > api.MAX_OUTPUTS:
            return f"the result reports {len(result.outputs)} outputs, at most {api.MAX_OUTPUTS}"
        for key, value in result.outputs.items():
            if not expr.is_identifier(key):
                return f"output name {key!r} is not an identifier (letters, digits, _)"
            if not isinstance(value, bool | int | str) or (
                isinstance(value, str) and len(value) > api.OUTPUT_VALUE_MAX_LENGTH
            ):
                return (
                    f"output {key!r} must be a boolean, an integer or a string of at most "
                    f"{api.OUTPUT_VALUE_MAX_LENGTH} characters"
                )
        if result.items is not None and step.creates is not None:
            if len(result.items) > api.MAX_ITEMS:
                return (
                    f"the artifact {step.creates} lists {len(result.items)} items, "
                    f"at most {api.MAX_ITEMS}"
                )
            for name in result.items:
                if not tasks.is_item_name(name):
                    return (
                        f"the artifact {step.creates} lists item {name!r}: item names are "
                        f"at most {api.ITEM_NAME_MAX_LENGTH} letters, digits, '-', '.' or '_'"
                    )
        return None

    def _label(self, step: api.Step, item: str | None) -> str:
        return f"step {step.id}" if item is None else f"step {step.id} item {item}"

    def _attempt_succeeded(
        self, step: api.Step, unit: Unit, item: str | None, result: tasks.Result
    ) -> None:
        state = self.states[step.id]
        unit.artifact = result.artifact_uri
        unit.artifact_version = result.artifact_version
        unit.message = short(result.message, ITEM_MESSAGE) if result.message else None
        if step.creates is not None and result.items is not None:
            listed = list(state.artifact_items or [])
            listed.extend(name for name in result.items if name not in listed)
            state.artifact_items = listed[: api.MAX_ITEMS]
        if item is not None:
            unit.phase = "Succeeded"
            unit.reason = COMPLETED
            unit.completion_time = self.now
            self._event("Normal", EVENT_STEP_SUCCEEDED, f"{self._label(step, item)} succeeded.")
            return
        assert isinstance(unit, api.StepStatus)
        if result.outputs:
            unit.outputs = {k: expr.encode_output(v) for k, v in result.outputs.items()}
        self._step_done(step, unit)

    def _step_done(self, step: api.Step, state: api.StepStatus) -> None:
        """The step's work is done: gate it for approval, or finish it."""
        gated = step.approval is not None and step.approval.required
        if gated and step.id not in self.approvals:
            state.phase = "AwaitingApproval"
            state.reason = APPROVAL_REQUIRED
            prompt = step.approval.prompt if step.approval and step.approval.prompt else ""
            state.message = short(
                f"Waiting for approval{': ' + prompt if prompt else ''}. To approve, add "
                f"{step.id} to spec.approvals."
            )
            self._event(
                "Normal",
                EVENT_AWAITING_APPROVAL,
                f"Step {step.id} waits for approval (add {step.id} to spec.approvals).",
            )
            self._notify_approval(step)
            return
        state.phase = "Succeeded"
        if gated:
            state.reason = APPROVED
        elif state.reason != NO_ITEMS:
            state.reason = COMPLETED
        state.completion_time = self.now
        self._event("Normal", EVENT_STEP_SUCCEEDED, f"Step {step.id} succeeded.")

    def _attempt_failed(
        self, step: api.Step, unit: Unit, item: str | None, reason: str, message: str
    ) -> None:
        attempts = unit.attempts or 1
        limit = max_attempts(step)
        what = {
            TIMED_OUT: "timed out",
            INVALID_RESULT: "returned an invalid result",
            CONDITION_ERROR: "could not evaluate its condition",
        }.get(reason, "failed")
        label = self._label(step, item)
        if reason != CONDITION_ERROR and attempts < limit:
            wait = backoff_seconds(step.retries, attempts)
            unit.phase = "Retrying"
            unit.reason = reason
            unit.next_attempt_time = self.now + dt.timedelta(seconds=wait)
            unit.message = short(
                f"attempt {attempts} of {limit} {what}: {message}; next attempt in {wait:g}s",
                ITEM_MESSAGE,
            )
            self._event("Warning", EVENT_STEP_RETRYING, f"{label}: {unit.message}")
            return
        unit.phase = "Failed"
        unit.reason = reason
        unit.completion_time = self.now
        unit.next_attempt_time = None
        tries = f" after {attempts} attempts" if attempts > 1 else ""
        unit.message = short(f"{what}{tries}: {message}", ITEM_MESSAGE)
        self._event("Warning", EVENT_STEP_FAILED, f"{label} {unit.message}")

    # --- approvals -----------------------------------------------------------------

    def _approve(self) -> None:
        for step in self.spec.steps:
            state = self.states[step.id]
            if state.phase == "AwaitingApproval" and step.id in self.approvals:
                state.phase = "Succeeded"
                state.reason = APPROVED
                state.message = "Approved."
                state.completion_time = self.now
                self._event("Normal", EVENT_APPROVED, f"Step {step.id} was approved.")

    # --- moving steps forward ------------------------------------------------------

    def _finished(self, step_id: str) -> bool:
        state = self.states[step_id]
        if state.phase in ("Succeeded", "Skipped"):
            return True
        return state.phase == "Failed" and self.by_id[step_id].optional

    def _item(self, step_id: str, item: str) -> api.ItemStatus | None:
        for it in self.states[step_id].items or []:
            if it.name == item:
                return it
        return None

    def _gate(self, step: api.Step, item: str | None) -> tuple[str, str]:
        """("wait" | "skip" | "go", why) for a step, or one item of a repeated step."""
        for upstream, pipelined in self.dag.upstream(step.id).items():
            if pipelined and item is not None:
                up_item = self._item(upstream, item)
                if up_item is None:
                    if not self._finished(upstream):
                        return "wait", f"waiting for step {upstream}"
                elif up_item.phase not in _DONE_UNIT:
                    return "wait", f"waiting for step {upstream} item {item}"
            elif not self._finished(upstream):
                return "wait", f"waiting for step {upstream}"
        for artifact in self.dag.needs(step.id):
            creator = self.dag.creators[artifact]
            if creator == step.id:
                continue
            if not self._exists(creator, step, item):
                state = self.states[creator]
                detail = state.phase.lower()
                if item is not None and self.dag.pipelined(creator, step.id):
                    up_item = self._item(creator, item)
                    detail = f"item {item} {up_item.phase.lower() if up_item else 'absent'}"
                return "skip", f"{artifact} was not created (step {creator}: {detail})"
        return "go", ""

    def _exists(self, creator: str, step: api.Step, item: str | None) -> bool:
        if item is not None and self.dag.pipelined(creator, step.id):
            up_item = self._item(creator, item)
            return up_item is not None and up_item.phase == "Succeeded"
        return self.states[creator].phase == "Succeeded"

    def _context(self, item: str | None) -> dict[str, Any]:
        outputs = {
            sid: {k: expr.decode_output(v) for k, v in (state.outputs or {}).items()}
            for sid, state in self.states.items()
            if state.outputs
        }
        artifacts = sorted(
            {
                name
                for name, creator in self.dag.creators.items()
                if self.states[creator].phase == "Succeeded"
            }
        )
        return {
            "inputs": dict(self.spec.inputs or {}),
            "outputs": outputs,
            "steps": {sid: state.phase for sid, state in self.states.items()},
            "artifacts": artifacts,
            "item": item or "",
        }

    def _condition(self, step: api.Step, item: str | None) -> tuple[bool, str | None]:
        """(holds, error) of the step's condition for this unit."""
        if step.condition is None:
            return True, None
        try:
            return expr.evaluate(step.condition, **self._context(item)), None
        except expr.ExpressionError as exc:
            field = f"spec.steps[{self.index[step.id]}].condition"
            return False, f"{field} {exc}"

    def _advance(self, step: api.Step) -> None:
        state = self.states[step.id]
        if step.repeat is not None:
            self._advance_repeat(step, state)
            return
        if state.phase == "Retrying":
            self._retry_if_due(step, state, None)
        elif state.phase == "Pending":
            self._start(step, state, None)

    def _start(self, step: api.Step, unit: Unit, item: str | None) -> bool:
        """Try to start a Pending unit; True when it was dispatched."""
        verdict, why = self._gate(step, item)
        if verdict == "wait":
            unit.message = why
            return False
        if verdict == "skip":
            self._skip(step, unit, item, REQUIREMENT_MISSING, why)
            return False
        holds, error = self._condition(step, item)
        if error is not None:
            unit.attempts = unit.attempts or 0
            self._attempt_failed(step, unit, item, CONDITION_ERROR, error)
            return False
        if not holds:
            self._skip(step, unit, item, CONDITION_FALSE, f"condition is false: {step.condition}")
            return False
        if self.spec.suspend:
            unit.message = "spec.suspend is true: not started"
            return False
        self._send(step, unit, item, 1)
        return True

    def _retry_if_due(self, step: api.Step, unit: Unit, item: str | None) -> None:
        if self.spec.suspend:
            return
        due = unit.next_attempt_time
        if due is None or self.now >= due:
            self._send(step, unit, item, (unit.attempts or 0) + 1)

    def _skip(self, step: api.Step, unit: Unit, item: str | None, reason: str, why: str) -> None:
        unit.phase = "Skipped"
        unit.reason = reason
        unit.message = short(why, ITEM_MESSAGE)
        unit.completion_time = self.now
        self._event("Normal", EVENT_STEP_SKIPPED, f"{self._label(step, item)} skipped: {why}")

    def _send(self, step: api.Step, unit: Unit, item: str | None, attempt: int) -> None:
        limit = max_attempts(step)
        tid = tasks.task_id(self.uid, step.id, item, attempt)
        self.dispatch.append(
            tasks.Dispatch(
                task_id=tid,
                step=step.id,
                item=item,
                attempt=attempt,
                max_attempts=limit,
                agent=step.agent,
                description=step.description,
                inputs=dict(self.spec.inputs or {}),
                requires=self._refs(step, item),
                creates=step.creates,
                updates=step.updates,
                timeout_seconds=step.timeout_seconds,
            )
        )
        unit.phase = "Running"
        unit.reason = DISPATCHED
        unit.attempts = attempt
        unit.start_time = unit.start_time or self.now
        unit.last_attempt_time = self.now
        unit.next_attempt_time = None
        unit.message = f"attempt {attempt} of {limit} on agent {step.agent}"
        state = self.states[step.id]
        state.start_time = state.start_time or self.now
        self.status.start_time = self.status.start_time or self.now
        self._event(
            "Normal", EVENT_STEP_STARTED, f"{self._label(step, item)} started: {unit.message}."
        )

    def _refs(self, step: api.Step, item: str | None) -> tuple[tasks.ArtifactRef, ...]:
        """The newest stored version of each artifact the unit needs."""
        refs: list[tasks.ArtifactRef] = []
        for artifact in self.dag.needs(step.id):
            newest: dict[str | None, tasks.ArtifactRef] = {}
            for producer in self.dag.producers(step.id, artifact):
                pstep, pstate = self.by_id[producer], self.states[producer]
                if pstep.repeat is not None:
                    per_item = item is not None and self.dag.pipelined(producer, step.id)
                    for it in pstate.items or []:
                        if it.phase == "Succeeded" and (not per_item or it.name == item):
                            newest[it.name] = tasks.ArtifactRef(
                                name=artifact,
                                step=producer,
                                item=it.name,
                                uri=it.artifact,
                                version=it.artifact_version,
                            )
                elif pstate.phase == "Succeeded":
                    newest[None] = tasks.ArtifactRef(
                        name=artifact,
                        step=producer,
                        uri=pstate.artifact,
                        version=pstate.artifact_version,
                    )
            refs.extend(newest.values())
        return tuple(refs)

    def _advance_repeat(self, step: api.Step, state: api.StepStatus) -> None:
        assert step.repeat is not None
        if state.phase in ("Succeeded", "Failed", "Skipped", "Cancelled", "AwaitingApproval"):
            return
        if state.items is None:
            verdict, why = self._gate_collection(step)
            if verdict == "wait":
                state.message = why
                return
            if verdict == "skip":
                self._skip(step, state, None, REQUIREMENT_MISSING, why)
                return
            creator = self.dag.creators[step.repeat.over]
            names = list(self.states[creator].artifact_items or [])
            state.items = [api.ItemStatus(name=name, phase="Pending") for name in names]
            if not names:
                state.reason = NO_ITEMS
                state.message = f"{step.repeat.over} lists no items"
                self._step_done(step, state)
                return
        items = state.items
        slots = step.repeat.max_parallel - sum(
            1 for it in items if it.phase in ("Running", "Retrying")
        )
        for it in items:
            if it.phase == "Retrying":
                self._retry_if_due(step, it, it.name)
            elif it.phase == "Pending" and slots > 0 and self._start(step, it, it.name):
                slots -= 1
        self._aggregate(step, state)

    def _gate_collection(self, step: api.Step) -> tuple[str, str]:
        """Whether a repeated step's items can be listed: its step-wide waits are over."""
        assert step.repeat is not None
        for upstream, pipelined in self.dag.upstream(step.id).items():
            if pipelined:
                continue  # waited for item by item
            if not self._finished(upstream):
                return "wait", f"waiting for step {upstream}"
        for artifact in self.dag.needs(step.id):
            creator = self.dag.creators[artifact]
            if self.dag.pipelined(creator, step.id):
                continue
            if self.states[creator].phase != "Succeeded":
                detail = self.states[creator].phase.lower()
                return "skip", f"{artifact} was not created (step {creator}: {detail})"
        return "go", ""

    def _aggregate(self, step: api.Step, state: api.StepStatus) -> None:
        """A repeated step's phase, attempts and tokens from its items."""
        items = state.items or []
        state.attempts = sum(it.attempts or 0 for it in items)
        state.tokens = sum(it.tokens or 0 for it in items) or state.tokens
        failed = [it for it in items if it.phase == "Failed"]
        if failed and not step.optional:
            first = failed[0]
            state.phase = "Failed"
            state.reason = ITEM_FAILED
            state.completion_time = self.now
            state.message = short(f"item {first.name} {first.message or 'failed'}")
            return
        if all(it.phase in _DONE_UNIT for it in items):
            if failed:
                state.phase = "Failed"
                state.reason = ITEM_FAILED
                state.completion_time = self.now
                names = ", ".join(it.name for it in failed)
                state.message = short(f"items {names} failed (the step is optional)")
                self._event(
                    "Warning", EVENT_STEP_FAILED, f"Step {step.id} failed: {state.message}."
                )
            elif all(it.phase == "Skipped" for it in items):
                state.phase = "Skipped"
                state.reason = items[0].reason
                state.completion_time = self.now
                state.message = "every item was skipped"
            else:
                done = sum(1 for it in items if it.phase == "Succeeded")
                state.message = f"{done} of {len(items)} items succeeded"
                self._step_done(step, state)
            return
        if any(it.phase != "Pending" for it in items):
            state.phase = "Running"
            state.reason = DISPATCHED
        active = sum(1 for it in items if it.phase in ("Running", "Retrying"))
        done = sum(1 for it in items if it.phase in _DONE_UNIT)
        state.message = f"{done} of {len(items)} items done, {active} running"

    # --- the end of a pass ---------------------------------------------------------

    def _failed_steps(self) -> list[api.Step]:
        return [
            step
            for step in self.spec.steps
            if self.states[step.id].phase == "Failed" and not step.optional
        ]

    def _cancel_everything(self, reason: str, message: str) -> None:
        for step, unit, item in list(self._units()):
            if unit.phase == "Running" and unit.attempts:
                self.cancel.append(tasks.task_id(self.uid, step.id, item, unit.attempts))
            if unit.phase in ("Pending", "Running", "Retrying", "AwaitingApproval"):
                unit.phase = "Cancelled"
                unit.reason = reason
                unit.message = message
                unit.completion_time = self.now
                unit.next_attempt_time = None
        for step in self.spec.steps:
            state = self.states[step.id]
            if step.repeat is not None and state.phase in ("Pending", "Running", "Retrying"):
                state.phase = "Cancelled"
                state.reason = reason
                state.message = message
                state.completion_time = self.now

    def _phase(self) -> api.Phase:
        phases = [self.states[s.id].phase for s in self.spec.steps]
        if all(self._finished(s.id) for s in self.spec.steps):
            return "Succeeded"
        if "AwaitingApproval" in phases:
            return "AwaitingApproval"
        if self.status.start_time is not None or any(p != "Pending" for p in phases):
            return "Running"
        return "Pending"

    def _done_count(self) -> int:
        return sum(1 for s in self.spec.steps if self._finished(s.id))

    def _finish(self, *, phase: api.Phase, errors: Sequence[dag_mod.DagError]) -> Decision:
        status = self.status
        status.observed_generation = self.generation
        status.steps = [self.states[step.id] for step in self.spec.steps]
        status.phase = phase
        total = len(self.spec.steps)
        done = self._done_count()
        status.progress = f"{done}/{total}"
        if phase in TERMINAL:
            status.completion_time = status.completion_time or self.now
        totals = status.totals or api.Totals()
        totals.steps = total
        totals.steps_completed = done
        totals.tokens_in = (totals.tokens_in or 0) + self.tokens_in
        totals.tokens_out = (totals.tokens_out or 0) + self.tokens_out
        status.totals = totals
        decided = self._conditions(phase, errors)
        merged = conditions.merge(
            [common.to_json(c) for c in self.prev.conditions],
            decided,
            generation=self.generation,
            timestamp=self.now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        )
        status.conditions = [common.Condition.model_validate(c) for c in merged]
        self._phase_events(phase, errors)
        return self._decision(status)

    def _decision(self, status: api.WorkflowStatus) -> Decision:
        return Decision(
            status=status,
            dispatch=tuple(self.dispatch),
            cancel=tuple(dict.fromkeys(self.cancel)),
            events=tuple(self.events),
            notifications=tuple(self.notifications),
            requeue_after=self._requeue_after(status),
        )

    def _requeue_after(self, status: api.WorkflowStatus) -> float | None:
        if status.phase in TERMINAL:
            return None
        times: list[dt.datetime] = []
        for step, unit, _ in self._units():
            if unit.phase == "Retrying" and unit.next_attempt_time and not self.spec.suspend:
                times.append(unit.next_attempt_time)
            if unit.phase == "Running" and step.timeout_seconds and unit.last_attempt_time:
                times.append(unit.last_attempt_time + dt.timedelta(seconds=step.timeout_seconds))
        if not times:
            return None
        return max((min(times) - self.now).total_seconds(), 0.0)

    def _conditions(self, phase: api.Phase, errors: Sequence[dag_mod.DagError]) -> list[Cond]:
        awaiting = [s.id for s in self.spec.steps if self.states[s.id].phase == "AwaitingApproval"]
        if errors:
            first = errors[0]
            message = short("; ".join(e.message for e in errors), 32000)
            valid = Cond(VALID, FALSE, first.reason, message)
            ready = Cond(READY, FALSE, first.reason, message)
        else:
            valid = Cond(VALID, TRUE, VALID_REASON, "The steps form a valid graph.")
            ready = self._ready(phase, awaiting)
        failed = self._failed_steps()
        if phase == "Failed" and failed:
            state = self.states[failed[0].id]
            failed_cond = Cond(
                FAILED,
                TRUE,
                STEP_FAILED,
                f"Step {failed[0].id} failed: {state.message or 'no message'}",
            )
        else:
            failed_cond = Cond(FAILED, FALSE, phase if phase != "Failed" else STEP_FAILED, "")
        succeeded = Cond(
            SUCCEEDED,
            TRUE if phase == "Succeeded" else FALSE,
            phase,
            f"{self._done_count()} of {len(self.spec.steps)} steps finished.",
        )
        approval = (
            Cond(
                AWAITING_APPROVAL,
                TRUE,
                APPROVAL_REQUIRED,
                f"Waiting for approval of step {', '.join(awaiting)}: add the id to "
                "spec.approvals.",
            )
            if awaiting
            else Cond(AWAITING_APPROVAL, FALSE, NO_APPROVAL_PENDING, "No step waits for approval.")
        )
        suspended = (
            Cond(SUSPENDED, TRUE, SUSPENDED, "spec.suspend is true: no new step starts.")
            if self.spec.suspend and phase not in TERMINAL
            else Cond(SUSPENDED, FALSE, NOT_SUSPENDED, "")
        )
        return [ready, valid, succeeded, failed_cond, approval, suspended]

    def _ready(self, phase: api.Phase, awaiting: Sequence[str]) -> Cond:
        done, total = self._done_count(), len(self.spec.steps)
        if phase == "Succeeded":
            return Cond(READY, TRUE, SUCCEEDED, f"All {total} steps finished.")
        if phase == "Failed":
            failed = self._failed_steps()
            name = failed[0].id if failed else "?"
            message = self.states[name].message if failed else ""
            return Cond(READY, FALSE, STEP_FAILED, f"Step {name} failed: {message}")
        if phase == "Cancelled":
            return Cond(READY, FALSE, "Cancelled", "The run was cancelled.")
        if phase == "AwaitingApproval":
            return Cond(
                READY,
                FALSE,
                APPROVAL_REQUIRED,
                f"Waiting for approval of step {', '.join(awaiting)}.",
            )
        if self.spec.suspend:
            return Cond(READY, FALSE, SUSPENDED, f"Suspended with {done} of {total} steps done.")
        reason = RUNNING if phase == "Running" else PENDING
        return Cond(READY, FALSE, reason, f"{done} of {total} steps finished.")

    def _phase_events(self, phase: api.Phase, errors: Sequence[dag_mod.DagError]) -> None:
        before = self.prev.phase
        if errors:
            old = conditions.find([common.to_json(c) for c in self.prev.conditions], VALID)
            message = "; ".join(e.message for e in errors)
            if old is None or old.get("message") != short(message, 32000):
                self._event("Warning", EVENT_INVALID, short(message))
        old_suspended = conditions.find(
            [common.to_json(c) for c in self.prev.conditions], SUSPENDED
        )
        was = bool(old_suspended and old_suspended.get("status") == TRUE)
        if self.spec.suspend and not was and phase not in TERMINAL:
            self._event("Normal", EVENT_SUSPENDED, "spec.suspend is true: no new step starts.")
        elif was and not self.spec.suspend:
            self._event("Normal", EVENT_RESUMED, "spec.suspend is false: the run goes on.")
        if phase == before:
            return
        total = len(self.spec.steps)
        if phase == "Running" and before in (None, "Pending"):
            self._event("Normal", EVENT_STARTED, f"The run started ({total} steps).")
        elif phase == "Succeeded":
            totals = self.status.totals or api.Totals()
            tokens = (totals.tokens_in or 0) + (totals.tokens_out or 0)
            self._event("Normal", EVENT_SUCCEEDED, f"All {total} steps finished ({tokens} tokens).")
            self._notify("Succeeded", "succeeded", f"All {total} steps finished.")
        elif phase == "Failed":
            failed = self._failed_steps()
            detail = (
                f"Step {failed[0].id} failed: {self.states[failed[0].id].message}"
                if failed
                else "The run failed."
            )
            self._event("Warning", EVENT_FAILED, detail)
            self._notify("Failed", "failed", detail)
        elif phase == "Cancelled":
            self._event("Normal", EVENT_CANCELLED, "The run was cancelled.")
            self._notify("Cancelled", "was cancelled", "The Workflow was deleted.")

    # --- events and notifications --------------------------------------------------

    def _event(self, type_: str, reason: str, message: str) -> None:
        self.events.append(Event(type_, reason, short(message, 1024)))

    def _notify(self, phase: str, verb: str, body: str) -> None:
        notify = self.spec.notify
        if notify is None or phase not in notify.phases:
            return
        self.notifications.append(
            Notification(
                phase,
                f"Workflow {self.namespace}/{self.name} {verb}",
                f"Workflow {self.name} in namespace {self.namespace}: {body}\n\n"
                f"kubectl describe workflow {self.name} -n {self.namespace}",
            )
        )

    def _notify_approval(self, step: api.Step) -> None:
        prompt = step.approval.prompt if step.approval and step.approval.prompt else ""
        ask = f"\n\n{prompt}" if prompt else ""
        approvers = (
            f"\n\nApprovers: {', '.join(step.approval.approvers)}."
            if step.approval and step.approval.approvers
            else ""
        )
        self._notify(
            "AwaitingApproval",
            f"step {step.id} waits for approval",
            f"step {step.id} (agent {step.agent}) finished and waits for approval.{ask}"
            f"{approvers}\n\nTo approve, add {step.id} to spec.approvals of the Workflow "
            f"(kubectl edit workflow {self.name} -n {self.namespace}, or a Git commit).",
        )
