"""The Workflow kind: one run of a multi-agent workflow, BMAD style.

A Workflow lists steps; each names an Agent, the artifact it ``creates`` (or
``updates``) and the artifacts it ``requires``. The operator runs a step once its
requirements exist and the steps it ``dependsOn`` have finished, fans it out with
``repeat`` (one run per item an earlier artifact lists: per epic, per story), stops at
``approval`` gates until the step's id is added to ``spec.approvals``, retries with
exponential backoff and enforces a timeout per attempt. Artifacts are stored,
versioned, in an objectStorage Integration; the status holds references to them and
small figures only, never their content (etcd limits an object's size).
"""

from __future__ import annotations

import datetime
import typing
from typing import Literal

import pydantic

from bmad_crds.v1alpha1 import common

Phase = Literal["Pending", "Running", "AwaitingApproval", "Succeeded", "Failed", "Cancelled"]
PHASES: tuple[Phase, ...] = typing.get_args(Phase)
StepPhase = Literal[
    "Pending",
    "Running",
    "Retrying",
    "AwaitingApproval",
    "Succeeded",
    "Failed",
    "Skipped",
    "Cancelled",
]
STEP_PHASES: tuple[StepPhase, ...] = typing.get_args(StepPhase)
NotifyPhase = Literal["AwaitingApproval", "Succeeded", "Failed", "Cancelled"]
NOTIFY_PHASES: tuple[NotifyPhase, ...] = typing.get_args(NotifyPhase)

MAX_STEPS = 64
MAX_REQUIRES = 32
MAX_APPROVERS = 32
MAX_RECIPIENTS = 32
MAX_ITEMS = 100
MAX_OUTPUTS = 16
OUTPUT_VALUE_MAX_LENGTH = 256
ITEM_NAME_PATTERN = r"^[A-Za-z0-9][-._A-Za-z0-9]*$"
ITEM_NAME_MAX_LENGTH = 63
STEP_REASON_MAX_LENGTH = 64
# Artifact names are compared in the CEL rules below, at a cost that grows with their
# length: 128 characters keeps the rules within the API server's cost budget.
ARTIFACT_NAME_MAX_LENGTH = 128
ARTIFACT_NAME_PATTERN = r"^[A-Za-z0-9][-._A-Za-z0-9/]*$"

ArtifactName = typing.Annotated[
    str,
    pydantic.StringConstraints(
        min_length=1, max_length=ARTIFACT_NAME_MAX_LENGTH, pattern=ARTIFACT_NAME_PATTERN
    ),
]
"""The name of an artifact, as a relative path: "prd.md", "stories/1.1.md"."""

EmailAddress = typing.Annotated[
    str, pydantic.StringConstraints(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
]
"""An e-mail address, checked loosely (the mail server has the last word)."""


class Repeat(common.SpecModel):
    """Run a step once per item an earlier artifact lists (BMAD's per-epic, per-story loops)."""

    over: ArtifactName = pydantic.Field(
        description=(
            'Artifact whose items the step runs over, for example "stories": the step '
            "that creates it reports the items it lists (epic or story ids), and this step "
            "runs once per item. When a step this one depends on repeats over the same "
            "artifact, item i waits only for that step's item i (one sm -> dev -> qa cycle "
            "per story)."
        ),
    )
    max_parallel: int = pydantic.Field(
        default=1, ge=1, le=64, description="Most iterations that run at the same time."
    )


class Approval(common.SpecModel):
    """A human gate after a step (BMAD's elicitation): the run waits for an approval."""

    required: bool = pydantic.Field(
        default=True, description="Whether the step's result needs a human approval."
    )
    approvers: list[common.ShortText] | None = pydantic.Field(
        default=None,
        max_length=MAX_APPROVERS,
        description=(
            "Users or groups allowed to approve; when omitted, anyone allowed to patch "
            "the Workflow."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    prompt: common.Text | None = pydantic.Field(
        default=None, description="What the approver is asked to check."
    )

    @pydantic.field_validator("approvers")
    @classmethod
    def _approvers_unique(cls, approvers: list[str] | None) -> list[str] | None:
        if approvers is not None:
            common.unique(approvers, field="spec.steps[].approval.approvers")
        return approvers


class Retries(common.SpecModel):
    """How often a failed or timed-out attempt is tried again, with exponential backoff."""

    __cel_rules__ = (
        common.Rule(
            rule="self.maxBackoffSeconds >= self.backoffSeconds",
            message=(
                "spec.steps[].retries.maxBackoffSeconds must be at least backoffSeconds: "
                "raise maxBackoffSeconds or lower backoffSeconds"
            ),
            check=lambda r: r.max_backoff_seconds >= r.backoff_seconds,
            field_path=".maxBackoffSeconds",
        ),
    )

    limit: int = pydantic.Field(
        default=0, ge=0, le=100, description="Retries after the first attempt; 0 never retries."
    )
    backoff_seconds: int = pydantic.Field(
        default=10,
        ge=0,
        le=86400,
        description=(
            "Seconds before the first retry; each further retry waits backoffFactor times "
            "longer, at most maxBackoffSeconds."
        ),
    )
    backoff_factor: float = pydantic.Field(
        default=2.0,
        ge=1,
        le=10,
        description="Factor by which the wait grows from one retry to the next (1 keeps it).",
    )
    max_backoff_seconds: int = pydantic.Field(
        default=3600, ge=0, le=86400, description="Longest wait before a retry, in seconds."
    )


class Step(common.SpecModel):
    """One step of the workflow: an agent producing (or updating) an artifact."""

    __cel_rules__ = (
        common.Rule(
            rule="!has(self.dependsOn) || !(self.id in self.dependsOn)",
            message=(
                "spec.steps[].dependsOn lists the step itself: a step cannot depend on itself"
            ),
            check=lambda s: s.depends_on is None or s.id not in s.depends_on,
            field_path=".dependsOn",
        ),
        common.Rule(
            rule="!has(self.creates) || !has(self.requires) || !(self.creates in self.requires)",
            message=(
                "spec.steps[].requires lists the artifact the step creates: a step cannot "
                "require its own output; remove it from requires"
            ),
            check=lambda s: s.creates is None or s.requires is None or s.creates not in s.requires,
            field_path=".requires",
        ),
        common.Rule(
            rule="!has(self.creates) || !has(self.updates) || self.creates != self.updates",
            message=(
                "spec.steps[].updates names the artifact the step creates: a step either "
                "creates an artifact or updates one an earlier step created"
            ),
            check=lambda s: s.creates is None or s.updates is None or s.creates != s.updates,
            field_path=".updates",
        ),
        common.Rule(
            rule="!has(self.repeat) || !has(self.creates) || self.repeat.over != self.creates",
            message=(
                "spec.steps[].repeat.over names the artifact the step creates: repeat over "
                "the items of an artifact an earlier step creates"
            ),
            check=lambda s: s.repeat is None or s.creates is None or s.repeat.over != s.creates,
            field_path=".repeat",
        ),
    )

    id: common.DnsLabel = pydantic.Field(
        description="Identifier of the step, unique in the workflow (a DNS label)."
    )
    agent: common.DnsLabel = pydantic.Field(
        description="Name of the Agent, in the same namespace, that performs the step."
    )
    description: common.Text | None = pydantic.Field(
        default=None,
        description="What the agent is asked to do in this step; given to it with the inputs.",
    )
    creates: ArtifactName | None = pydantic.Field(
        default=None, description='Artifact the step produces, for example "prd.md".'
    )
    updates: ArtifactName | None = pydantic.Field(
        default=None,
        description=(
            "Artifact, created by another step, of which this step writes a new version. "
            "Steps listed after it that require the artifact wait for it and get its version."
        ),
    )
    requires: list[ArtifactName] | None = pydantic.Field(
        default=None,
        max_length=MAX_REQUIRES,
        description=(
            "Artifacts that must exist before the step starts; the step gets references "
            "to them. A requirement whose creating step was skipped skips this step."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    depends_on: list[common.DnsLabel] | None = pydantic.Field(
        default=None,
        max_length=MAX_STEPS,
        description=(
            "Ids of steps that must have finished (succeeded, skipped, or failed while "
            "optional) before this one starts, besides those requires implies."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    condition: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=1024,
        description=(
            "A CEL expression; the step runs only when it is true, and is Skipped otherwise. "
            "It sees inputs (spec.inputs), outputs (outputs.<step id>.<name>: small values "
            "earlier steps reported), steps (steps.<step id>: the phase of each step), "
            "artifacts (names of the artifacts that exist) and item (the repeat item, or "
            '""). Example: has(inputs.user_wants_ux) && inputs.user_wants_ux.'
        ),
    )
    optional: bool = pydantic.Field(
        default=False,
        description="A failure of this step does not fail the workflow.",
    )
    repeat: Repeat | None = pydantic.Field(
        default=None, description="Run the step once per item an earlier artifact lists."
    )
    approval: Approval | None = pydantic.Field(
        default=None, description="Wait for a human approval after the step."
    )
    retries: Retries | None = pydantic.Field(
        default=None, description="Retry a failed or timed-out attempt."
    )
    timeout_seconds: int | None = pydantic.Field(
        default=None, ge=1, le=604800, description="Fail an attempt that runs longer than this."
    )

    @pydantic.field_validator("requires")
    @classmethod
    def _requires_unique(cls, requires: list[str] | None) -> list[str] | None:
        if requires is not None:
            common.unique(requires, field="spec.steps[].requires")
        return requires

    @pydantic.field_validator("depends_on")
    @classmethod
    def _depends_on_unique(cls, depends_on: list[str] | None) -> list[str] | None:
        if depends_on is not None:
            common.unique(depends_on, field="spec.steps[].dependsOn")
        return depends_on


class Artifacts(common.SpecModel):
    """Where the artifacts of the run are stored."""

    integration: common.DnsLabel = pydantic.Field(
        description="Name of an Integration of type objectStorage, in the same namespace."
    )
    prefix: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=512,
        description=(
            "Key prefix of the artifacts in the bucket; <namespace>/<workflow name>/ when omitted."
        ),
    )


def _default_notify_phases() -> list[NotifyPhase]:
    return ["AwaitingApproval", "Succeeded", "Failed"]


class Notify(common.SpecModel):
    """Who hears about the run, by e-mail, and when."""

    integration: common.DnsLabel = pydantic.Field(
        description="Name of an Integration of type email, in the same namespace."
    )
    recipients: list[EmailAddress] = pydantic.Field(
        min_length=1,
        max_length=MAX_RECIPIENTS,
        description="Addresses the notifications go to.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    phases: list[NotifyPhase] = pydantic.Field(
        default_factory=_default_notify_phases,
        min_length=1,
        max_length=len(NOTIFY_PHASES),
        description=(
            "Phases whose start sends a notification: AwaitingApproval (with the steps and "
            "their prompts), Succeeded, Failed, Cancelled."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    @pydantic.field_validator("recipients")
    @classmethod
    def _recipients_unique(cls, recipients: list[str]) -> list[str]:
        common.unique(recipients, field="spec.notify.recipients")
        return recipients

    @pydantic.field_validator("phases")
    @classmethod
    def _phases_unique(cls, phases: list[str]) -> list[str]:
        common.unique(phases, field="spec.notify.phases")
        return phases


class WorkflowSpec(common.SpecModel):
    """Desired state of a Workflow."""

    # The rules that relate steps to each other (one creator per artifact; every
    # requires, updates, repeat.over and dependsOn names something a step provides; no
    # cycle) are not CEL rules: the API server evaluates a CRD's rules on every write of
    # the object, status writes included, and these compare every step with every
    # other, which made each status write of a 50-step Workflow take seconds
    # (docs/benchmarks.md, bench/workflow). The operator checks them on every pass
    # (`bmad_operator.workflows.dag.build`) and reports a broken graph as Valid=False
    # naming the step and the field; nothing is dispatched until it is fixed.
    __cel_rules__ = (
        common.Rule(
            rule="!has(self.approvals) || self.approvals.all(a, self.steps.exists(s, s.id == a))",
            message=(
                "spec.approvals names a step that is not in spec.steps: approve a step by its id"
            ),
            check=lambda spec: set(spec.approvals or ()) <= {s.id for s in spec.steps},
            field_path=".approvals",
        ),
    )

    steps: list[Step] = pydantic.Field(
        min_length=1,
        max_length=MAX_STEPS,
        description=(
            "Steps of the workflow, in BMAD order; a step starts once its requirements exist "
            "and the steps it depends on have finished. The operator checks that they form "
            "a graph (one creating step per artifact; every requires, updates, repeat.over "
            "and dependsOn names an artifact a step creates or a step; no cycle) and "
            "reports a problem as the condition Valid=False, naming the step and the field; "
            "nothing runs until it is fixed."
        ),
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["id"],
        },
    )
    artifacts: Artifacts | None = pydantic.Field(
        default=None,
        description="Where artifacts are stored; kept in the operator's memory only when omitted.",
    )
    inputs: common.FreeForm | None = pydantic.Field(
        default=None,
        description="Free-form inputs of the run (project name, brief, ...), given to every step.",
    )
    approvals: list[common.DnsLabel] | None = pydantic.Field(
        default=None,
        max_length=MAX_STEPS,
        description=(
            "Ids of the steps whose approval was given: add a step's id to let the run go on "
            "past its approval gate (kubectl edit or patch, or a Git commit)."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    notify: Notify | None = pydantic.Field(
        default=None, description="E-mail notifications about the run."
    )
    suspend: bool = pydantic.Field(
        default=False,
        description="Start no new step, item or retry while true; running attempts finish.",
    )

    @pydantic.field_validator("steps")
    @classmethod
    def _step_ids_unique(cls, steps: list[Step]) -> list[Step]:
        common.unique([step.id for step in steps], field="spec.steps[].id")
        return steps

    @pydantic.field_validator("approvals")
    @classmethod
    def _approvals_unique(cls, approvals: list[str] | None) -> list[str] | None:
        if approvals is not None:
            common.unique(approvals, field="spec.approvals")
        return approvals


class ItemStatus(common.StatusModel):
    """Observed state of one item of a repeated step."""

    name: str = pydantic.Field(description="The item, as the artifact repeated over lists it.")
    phase: StepPhase = pydantic.Field(
        description="Pending, Running, Retrying, Succeeded, Failed, Skipped or Cancelled."
    )
    reason: str | None = pydantic.Field(
        default=None,
        max_length=STEP_REASON_MAX_LENGTH,
        description="Why the item is in its phase, one CamelCase word (TimedOut, AgentFailed).",
    )
    attempts: int | None = pydantic.Field(default=None, ge=0, description="Attempts made so far.")
    artifact: str | None = pydantic.Field(
        default=None, description="URI of the artifact version this item produced."
    )
    artifact_version: str | None = pydantic.Field(
        default=None, description="Version id of that artifact in the object store."
    )
    tokens: int | None = pydantic.Field(
        default=None, ge=0, description="LLM tokens (in + out) the item spent."
    )
    message: str | None = pydantic.Field(
        default=None, max_length=1024, description="Last news of the item, for humans."
    )
    start_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the first attempt started."
    )
    last_attempt_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the current attempt was dispatched."
    )
    next_attempt_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the next attempt is due (while Retrying)."
    )
    completion_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the item finished."
    )


class StepStatus(common.StatusModel):
    """Observed state of one step."""

    id: str = pydantic.Field(description="Identifier of the step (spec.steps[].id).")
    phase: StepPhase = pydantic.Field(
        description=(
            "Pending, Running, Retrying, AwaitingApproval, Succeeded, Failed, Skipped or Cancelled."
        )
    )
    reason: str | None = pydantic.Field(
        default=None,
        max_length=STEP_REASON_MAX_LENGTH,
        description=(
            "Why the step is in its phase, one CamelCase word (ConditionFalse, TimedOut, "
            "AgentFailed, Approved, ...)."
        ),
    )
    attempts: int | None = pydantic.Field(default=None, ge=0, description="Attempts made so far.")
    artifact: str | None = pydantic.Field(
        default=None,
        description="URI of the artifact version the step produced (s3://bucket/key).",
    )
    artifact_version: str | None = pydantic.Field(
        default=None, description="Version id of that artifact in the object store."
    )
    artifact_items: list[str] | None = pydantic.Field(
        default=None,
        max_length=MAX_ITEMS,
        description="Items the step's artifact lists, for steps that repeat over it.",
    )
    outputs: dict[str, str] | None = pydantic.Field(
        default=None,
        description=(
            "Small values the step reported for later conditions (at most 16, each at most "
            "256 characters); never the artifact itself."
        ),
        json_schema_extra={"maxProperties": MAX_OUTPUTS},
    )
    tokens: int | None = pydantic.Field(
        default=None, ge=0, description="LLM tokens (in + out) the step spent."
    )
    message: str | None = pydantic.Field(
        default=None, max_length=32768, description="Last news of the step, for humans."
    )
    start_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the first attempt started."
    )
    last_attempt_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the current attempt was dispatched."
    )
    next_attempt_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the next attempt is due (while Retrying)."
    )
    completion_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the step finished."
    )
    items: list[ItemStatus] | None = pydantic.Field(
        default=None,
        max_length=MAX_ITEMS,
        description="State of each item of a repeated step.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )


class Totals(common.StatusModel):
    """Sums over the run."""

    tokens_in: int | None = pydantic.Field(
        default=None, ge=0, description="LLM prompt tokens spent by all steps."
    )
    tokens_out: int | None = pydantic.Field(
        default=None, ge=0, description="LLM completion tokens spent by all steps."
    )
    steps: int | None = pydantic.Field(default=None, ge=0, description="Steps in the workflow.")
    steps_completed: int | None = pydantic.Field(
        default=None,
        ge=0,
        description="Steps that have finished: Succeeded, Skipped, or Failed while optional.",
    )


class WorkflowStatus(common.StatusModel):
    """Observed state of a Workflow."""

    observed_generation: int | None = common.observed_generation_field()
    phase: Phase | None = pydantic.Field(
        default=None,
        description="Pending, Running, AwaitingApproval, Succeeded, Failed or Cancelled.",
    )
    progress: str | None = pydantic.Field(
        default=None, description='Steps finished out of all steps, as "done/total".'
    )
    start_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the run started."
    )
    completion_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the run finished."
    )
    steps: list[StepStatus] | None = pydantic.Field(
        default=None,
        max_length=MAX_STEPS,
        description="State of each step.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["id"],
        },
    )
    totals: Totals | None = pydantic.Field(default=None, description="Sums over the run.")
    conditions: list[common.Condition] = common.conditions_field()


class Workflow(common.Resource):
    """One run of a multi-agent BMAD workflow."""

    __cel_rules__ = (
        common.name_rule(
            max_length=common.DNS1123_LABEL_MAX_LENGTH,
            why="a Workflow's name is a label value on the objects its run creates",
        ),
    )

    kind: Literal["Workflow"] = pydantic.Field(default="Workflow", description="Workflow.")
    spec: WorkflowSpec = pydantic.Field(description="Desired state of the workflow run.")
    status: WorkflowStatus | None = pydantic.Field(
        default=None, description="Observed state of the run, written by the operator."
    )


KIND = common.Kind(
    kind="Workflow",
    plural="workflows",
    singular="workflow",
    short_names=("bwf",),
    scope="Namespaced",
    printer_columns=(
        common.PrinterColumn(
            name="Phase", type="string", json_path=".status.phase", description="Phase of the run."
        ),
        common.PrinterColumn(
            name="Progress",
            type="string",
            json_path=".status.progress",
            description="Steps finished out of all steps.",
        ),
        *common.ready_columns(reason_priority=1),
        common.PrinterColumn(
            name="Tokens-Out",
            type="integer",
            json_path=".status.totals.tokensOut",
            description="LLM completion tokens spent.",
            priority=1,
        ),
        common.AGE_COLUMN,
    ),
)
