"""The Workflow kind: one run of a multi-agent workflow, BMAD style.

A Workflow lists steps; each names an Agent, the artifact it ``creates`` and the
artifacts it ``requires``. The operator runs a step once its requirements exist,
fans it out with ``repeat`` (one run per epic or story), stops at ``approval`` gates
until a human approves, retries with backoff and enforces timeouts. Artifacts are
stored, versioned, in an objectStorage Integration.
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
    "Pending", "Running", "AwaitingApproval", "Succeeded", "Failed", "Skipped", "Cancelled"
]
STEP_PHASES: tuple[StepPhase, ...] = typing.get_args(StepPhase)

MAX_STEPS = 64
MAX_REQUIRES = 32
MAX_APPROVERS = 32

ArtifactName = typing.Annotated[
    str,
    pydantic.StringConstraints(
        min_length=1, max_length=253, pattern=r"^[A-Za-z0-9][-._A-Za-z0-9/]*$"
    ),
]
"""The name of an artifact, as a relative path: "prd.md", "stories/1.1.md"."""


class Repeat(common.SpecModel):
    """Run a step once per item of a collection (BMAD's per-epic, per-story loops)."""

    over: str = pydantic.Field(
        min_length=1,
        max_length=253,
        description=(
            "What to iterate over: the name of a collection artifacts define, for example "
            '"epics" or "stories".'
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
    """How often a failed step is tried again."""

    limit: int = pydantic.Field(
        default=0, ge=0, le=100, description="Retries after the first attempt; 0 never retries."
    )
    backoff_seconds: int = pydantic.Field(
        default=10,
        ge=0,
        le=86400,
        description="Seconds before the first retry; doubled for each further retry.",
    )


class Step(common.SpecModel):
    """One step of the workflow: an agent producing an artifact."""

    id: common.DnsLabel = pydantic.Field(
        description="Identifier of the step, unique in the workflow (a DNS label)."
    )
    agent: common.DnsLabel = pydantic.Field(
        description="Name of the Agent, in the same namespace, that performs the step."
    )
    creates: ArtifactName | None = pydantic.Field(
        default=None, description='Artifact the step produces, for example "prd.md".'
    )
    requires: list[ArtifactName] | None = pydantic.Field(
        default=None,
        max_length=MAX_REQUIRES,
        description="Artifacts that must exist before the step starts.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    condition: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=1024,
        description=(
            "Run the step only when this condition holds (BMAD's condition names, "
            'for example "user_wants_ux"); the step is Skipped otherwise.'
        ),
    )
    optional: bool = pydantic.Field(
        default=False,
        description="A failure of this step does not fail the workflow.",
    )
    repeat: Repeat | None = pydantic.Field(
        default=None, description="Run the step once per item of a collection."
    )
    approval: Approval | None = pydantic.Field(
        default=None, description="Wait for a human approval after the step."
    )
    retries: Retries | None = pydantic.Field(default=None, description="Retry a failed step.")
    timeout_seconds: int | None = pydantic.Field(
        default=None, ge=1, le=604800, description="Fail an attempt that runs longer than this."
    )

    @pydantic.field_validator("requires")
    @classmethod
    def _requires_unique(cls, requires: list[str] | None) -> list[str] | None:
        if requires is not None:
            common.unique(requires, field="spec.steps[].requires")
        return requires


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


class WorkflowSpec(common.SpecModel):
    """Desired state of a Workflow."""

    steps: list[Step] = pydantic.Field(
        min_length=1,
        max_length=MAX_STEPS,
        description=(
            "Steps of the workflow, in BMAD order; a step starts once its requirements exist."
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
    suspend: bool = pydantic.Field(
        default=False,
        description="Start no new step while true; running steps finish.",
    )

    @pydantic.field_validator("steps")
    @classmethod
    def _step_ids_unique(cls, steps: list[Step]) -> list[Step]:
        common.unique([step.id for step in steps], field="spec.steps[].id")
        return steps


class StepStatus(common.StatusModel):
    """Observed state of one step."""

    id: str = pydantic.Field(description="Identifier of the step (spec.steps[].id).")
    phase: StepPhase = pydantic.Field(
        description=("Pending, Running, AwaitingApproval, Succeeded, Failed, Skipped or Cancelled.")
    )
    attempts: int | None = pydantic.Field(default=None, ge=0, description="Attempts made so far.")
    artifact: str | None = pydantic.Field(
        default=None, description="Storage key of the artifact the step produced, with version."
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
    completion_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the step finished."
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
        default=None, ge=0, description="Steps that have finished: Succeeded or Skipped."
    )


class WorkflowStatus(common.StatusModel):
    """Observed state of a Workflow."""

    observed_generation: int | None = common.observed_generation_field()
    phase: Phase | None = pydantic.Field(
        default=None,
        description="Pending, Running, AwaitingApproval, Succeeded, Failed or Cancelled.",
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
            name="Completed",
            type="integer",
            json_path=".status.totals.stepsCompleted",
            description="Steps finished.",
        ),
        common.PrinterColumn(
            name="Steps",
            type="integer",
            json_path=".status.totals.steps",
            description="Steps in the workflow.",
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
