"""The task wire format: how work for an agent travels over Redis, in one place.

Whoever submits tasks (the operator's workflow engine, tests, tools) and whoever runs
them (the agent runtime's consumer) import this module, so the two cannot disagree on
a key, a field or an encoding: a change here changes both, and the unit tests of both
sides see it. It is pure (no I/O); `bmad_integrations.taskbus` is the producer's
client and `bmad_runtime.bus` the consumer.

Key layout, for tenant ``T`` and agent ``A`` (both Kubernetes object names, so they
contain no ``:``):

=================================  =================================================
``bmad:T:A:tasks``                 the stream; consumer group ``agents``
``bmad:T:A:results:<task id>``     the result, a JSON string with a TTL
``bmad:T:A:dead``                  dead letters (a stream)
``bmad:T:A:submitted:<task id>``   the stream entry id of a submission (dedup), TTL
``bmad:T:A:finished``              pub/sub channel: the task id of each stored result
=================================  =================================================

A stream entry has two fields: ``task_id`` (the caller's idempotency key, 1-256
printable ASCII characters without spaces) and ``payload`` (a JSON object). The
result is a JSON object with ``task_id``, ``message_id``, ``status`` (``succeeded``,
``failed`` or ``cancelled``), ``output`` (an object or null), ``error`` (text or
null), ``consumer``, ``attempt`` and ``finished_at`` (Unix seconds). A dead letter is
a stream entry with ``task_id``, ``message_id``, ``payload``, ``error``, ``attempts``
and ``consumer``.

Cancelling a task stores a ``cancelled`` result under its id (only if none is there):
a consumer checks for a result before it runs a task and skips one that has it, and
the producer's submit script never enqueues an id that has a result. Whoever stores a
result publishes its task id on the ``finished`` channel, so that a producer waiting
for many results can wake up at once instead of polling; the channel is a hint
(pub/sub keeps nothing), the result key is the record.

The payload of a task is either the body of the runtime's ``POST /v1/invoke``
(without ``stream``), answered with the same answer, or an `AgentTask`: one attempt
of one step of a Workflow (``"kind": "workflowStep"``), answered with a `StepOutput`.

The keys of one agent are not in one Redis Cluster hash slot (that would need a hash
tag such as ``bmad:{T:A}:…``); the scripts that touch several of them need a single
Redis server or a cluster-aware layout, which this one is not yet.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic
from pydantic import alias_generators

PREFIX = "bmad"
GROUP = "agents"
TASK_ID_MAX_CHARS = 256
RESULT_TTL_S = 86_400
"""How long results, and the submission markers that deduplicate, are kept."""
MAX_QUEUE_DEPTH = 100_000
"""The most tasks an agent's stream holds (waiting plus in flight): a submission beyond
it is refused, never trimmed away (XADD MAXLEN would drop tasks nobody ran)."""

# Stream entry fields.
FIELD_TASK_ID = "task_id"
FIELD_PAYLOAD = "payload"
# Dead-letter fields, besides the two above.
FIELD_MESSAGE_ID = "message_id"
FIELD_ERROR = "error"
FIELD_ATTEMPTS = "attempts"
FIELD_CONSUMER = "consumer"

Status = Literal["succeeded", "failed", "cancelled"]
STATUSES: tuple[Status, ...] = ("succeeded", "failed", "cancelled")
CANCELLED_BY = "producer"
"""The ``consumer`` of a result that a cancellation stored (no consumer ran it)."""

# Kubernetes object names (DNS subdomains): lower-case alphanumerics, '-' and '.'.
_NAME = re.compile(r"[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?")
# Printable ASCII without spaces: ids end up in key names and log lines.
_TASK_ID = re.compile(rf"[!-~]{{1,{TASK_ID_MAX_CHARS}}}")


class WireError(Exception):
    """A task, result or dead letter that cannot be encoded or decoded."""


def validate_name(kind: str, value: str) -> str:
    if not _NAME.fullmatch(value):
        raise ValueError(
            f"{kind} {value!r} is not a Kubernetes object name "
            "(lower-case letters, digits, '-' and '.', at most 253 characters)"
        )
    return value


def is_task_id(value: str) -> bool:
    return bool(_TASK_ID.fullmatch(value))


def validate_task_id(task_id: str) -> str:
    if not is_task_id(task_id):
        raise ValueError(
            f"task id {task_id!r} must be 1-{TASK_ID_MAX_CHARS} printable ASCII "
            "characters without spaces"
        )
    return task_id


@dataclass(frozen=True)
class Keys:
    """The Redis key names of one agent's bus (see the module docstring)."""

    tenant: str
    agent: str

    def __post_init__(self) -> None:
        validate_name("tenant", self.tenant)
        validate_name("agent", self.agent)

    @property
    def prefix(self) -> str:
        return f"{PREFIX}:{self.tenant}:{self.agent}"

    @property
    def stream(self) -> str:
        return f"{self.prefix}:tasks"

    @property
    def dead(self) -> str:
        return f"{self.prefix}:dead"

    @property
    def group(self) -> str:
        return GROUP

    def result(self, task_id: str) -> str:
        return f"{self.prefix}:results:{validate_task_id(task_id)}"

    def submitted(self, task_id: str) -> str:
        return f"{self.prefix}:submitted:{validate_task_id(task_id)}"

    @property
    def finished(self) -> str:
        """The pub/sub channel on which each stored result's task id is published."""
        return f"{self.prefix}:finished"


FINISHED_PATTERN = f"{PREFIX}:*:finished"
"""PSUBSCRIBE pattern of the ``finished`` channels of every agent on one Redis server."""


def agent_of_channel(channel: str) -> tuple[str, str] | None:
    """(tenant, agent) of a ``finished`` channel name, None for any other name."""
    parts = channel.split(":")
    if len(parts) != 4 or parts[0] != PREFIX or parts[3] != "finished":
        return None
    return parts[1], parts[2]


@dataclass(frozen=True, kw_only=True)
class Task:
    """One delivery of a task. `attempt` is the group's delivery count (1 = first)."""

    task_id: str
    payload: dict[str, Any]
    message_id: str
    attempt: int


@dataclass(frozen=True, kw_only=True)
class TaskResult:
    """What is stored under the result key: the handler's output, or the last error."""

    task_id: str
    message_id: str
    status: Status
    output: dict[str, Any] | None
    error: str | None
    consumer: str
    attempt: int
    finished_at: float


def result_of(
    task: Task,
    *,
    consumer: str,
    finished_at: float,
    output: dict[str, Any] | None = None,
    error: str | None = None,
) -> TaskResult:
    """The result of one delivery of ``task``: failed when there is an error."""
    return TaskResult(
        task_id=task.task_id,
        message_id=task.message_id,
        status="failed" if error is not None else "succeeded",
        output=None if error is not None else output,
        error=error,
        consumer=consumer,
        attempt=task.attempt,
        finished_at=finished_at,
    )


def cancelled_result(task_id: str, *, reason: str, finished_at: float) -> TaskResult:
    """What cancelling ``task_id`` stores: a result no consumer produced."""
    return TaskResult(
        task_id=validate_task_id(task_id),
        message_id="",
        status="cancelled",
        output=None,
        error=reason,
        consumer=CANCELLED_BY,
        attempt=0,
        finished_at=finished_at,
    )


@dataclass(frozen=True, kw_only=True)
class DeadLetter:
    """One entry of the dead-letter stream."""

    id: str
    task_id: str
    message_id: str
    payload: str
    error: str
    attempts: int
    consumer: str


def text(value: Any) -> str:
    """A Redis reply element as text, whether the client decodes responses or not."""
    if isinstance(value, bytes):
        return value.decode()
    return str(value)


def text_fields(fields: Mapping[Any, Any] | None) -> dict[str, str]:
    return {text(k): text(v) for k, v in (fields or {}).items()}


def flat(fields: Mapping[str, str]) -> list[str]:
    """Fields as the flat name, value, name, value... list XADD (and a script) takes."""
    return [item for pair in fields.items() for item in pair]


def encode_payload(payload: Mapping[str, Any]) -> str:
    try:
        return json.dumps(dict(payload), separators=(",", ":"), sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise WireError(f"the task payload is not JSON-serialisable: {exc}") from exc


def entry_fields(task_id: str, payload: Mapping[str, Any]) -> dict[str, str]:
    """The fields of the stream entry of one task."""
    return {FIELD_TASK_ID: validate_task_id(task_id), FIELD_PAYLOAD: encode_payload(payload)}


def decode_entry(message_id: Any, fields: Mapping[Any, Any] | None, *, attempt: int) -> Task:
    """A stream entry as the handler sees it; `WireError` for an entry not in this format."""
    mid = text(message_id)
    data = text_fields(fields)
    task_id = data.get(FIELD_TASK_ID, "")
    if not is_task_id(task_id):
        raise WireError(f"entry {mid} has no valid {FIELD_TASK_ID}")
    try:
        payload = json.loads(data.get(FIELD_PAYLOAD, ""))
    except ValueError as exc:
        raise WireError(f"entry {mid} (task {task_id}) has a payload that is not JSON") from exc
    if not isinstance(payload, dict):
        raise WireError(f"entry {mid} (task {task_id}) has a payload that is not an object")
    return Task(task_id=task_id, payload=payload, message_id=mid, attempt=attempt)


def encode_result(result: TaskResult) -> str:
    data = {
        "task_id": result.task_id,
        "message_id": result.message_id,
        "status": result.status,
        "output": result.output,
        "error": result.error,
        "consumer": result.consumer,
        "attempt": result.attempt,
        "finished_at": result.finished_at,
    }
    try:
        return json.dumps(data, separators=(",", ":"), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise WireError(f"the result of task {result.task_id} is not JSON: {exc}") from exc


def decode_result(raw: str | bytes) -> TaskResult:
    try:
        data = json.loads(raw)
        status = data["status"]
        if status not in STATUSES:
            raise WireError(f"unknown result status {status!r}")
        output = data.get("output")
        if output is not None and not isinstance(output, dict):
            raise WireError("the result output is not an object")
        return TaskResult(
            task_id=str(data["task_id"]),
            message_id=str(data["message_id"]),
            status=status,
            output=output,
            error=data.get("error"),
            consumer=str(data["consumer"]),
            attempt=int(data["attempt"]),
            finished_at=float(data["finished_at"]),
        )
    except (ValueError, KeyError, TypeError) as exc:
        raise WireError(f"not a task result: {exc}") from exc


def dead_letter_fields(
    *, task_id: str, message_id: str, payload: str, error: str, attempts: int, consumer: str
) -> dict[str, str]:
    """The fields of one dead-letter entry (``task_id`` empty for an undecodable entry)."""
    return {
        FIELD_TASK_ID: task_id,
        FIELD_MESSAGE_ID: message_id,
        FIELD_PAYLOAD: payload,
        FIELD_ERROR: error,
        FIELD_ATTEMPTS: str(attempts),
        FIELD_CONSUMER: consumer,
    }


def decode_dead_letter(entry_id: Any, fields: Mapping[Any, Any] | None) -> DeadLetter:
    data = text_fields(fields)
    return DeadLetter(
        id=text(entry_id),
        task_id=data.get(FIELD_TASK_ID, ""),
        message_id=data.get(FIELD_MESSAGE_ID, ""),
        payload=data.get(FIELD_PAYLOAD, ""),
        error=data.get(FIELD_ERROR, ""),
        attempts=int(data.get(FIELD_ATTEMPTS, "0") or 0),
        consumer=data.get(FIELD_CONSUMER, ""),
    )


# --- workflow steps: the payload of an agent task and the output of its result -------
#
# The operator's workflow engine puts one `AgentTask` per attempt of a step (or of one
# item of a repeated step) on the step's Agent's stream; the runtime runs it as one
# turn and stores the answer as the step's artifact, and the result's output is a
# `StepOutput`. Artifacts travel by reference (object storage URI and version id):
# the operator never handles their content, except for a Workflow without
# ``spec.artifacts``, whose artifacts live in the results themselves (``content``).

AGENT_TASK_KIND: Literal["workflowStep"] = "workflowStep"
MAX_OUTPUTS = 16
OUTPUT_VALUE_MAX_CHARS = 256
MAX_ITEMS = 100
ITEM_MAX_CHARS = 63
MESSAGE_MAX_CHARS = 512
INLINE_CONTENT_MAX_BYTES = 1024 * 1024
"""The largest artifact a Workflow without object storage keeps in a result."""

OutputValue = bool | int | str
Item = Annotated[
    str,
    pydantic.StringConstraints(
        min_length=1, max_length=ITEM_MAX_CHARS, pattern=r"^[A-Za-z0-9][-._A-Za-z0-9]*$"
    ),
]


class _Wire(pydantic.BaseModel):
    """camelCase on the wire, like the API; unknown fields refused (a typo is an error)."""

    model_config = pydantic.ConfigDict(
        alias_generator=alias_generators.to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def to_payload(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class WorkflowRef(_Wire):
    """The Workflow a task belongs to."""

    namespace: str
    name: str
    uid: str


class ArtifactRef(_Wire):
    """One stored version of an artifact a step needs: where it is, never what it says.

    ``uri`` is ``s3://<bucket>/<key>`` in the objectStorage Integration ``integration``
    (bound into the agent) and ``version`` its version id. ``content`` is set only for
    a Workflow without object storage.
    """

    name: str
    step: str
    item: str | None = None
    integration: str | None = None
    uri: str | None = None
    version: str | None = None
    content: str | None = None


class ArtifactTarget(_Wire):
    """Where the step's answer is stored: ``key`` in the bucket of ``integration``.

    Without ``integration`` (a Workflow without object storage) the answer comes back
    in the result's ``content`` instead.
    """

    name: str = pydantic.Field(description="The artifact: spec.steps[].creates or updates.")
    mode: Literal["creates", "updates"]
    integration: str | None = None
    key: str | None = None


class AgentTask(_Wire):
    """One attempt of one workflow step (or of one item of a repeated step)."""

    kind: Literal["workflowStep"] = AGENT_TASK_KIND
    workflow: WorkflowRef
    step: str
    item: str | None = None
    attempt: int = pydantic.Field(ge=1)
    max_attempts: int = pydantic.Field(ge=1)
    description: str | None = None
    inputs: dict[str, Any] = pydantic.Field(default_factory=dict)
    requires: list[ArtifactRef] = pydantic.Field(default_factory=list)
    target: ArtifactTarget | None = None
    lists_items: bool = pydantic.Field(
        default=False,
        description="A later step repeats over this step's artifact: the answer lists items.",
    )
    outputs: list[str] = pydantic.Field(
        default_factory=list,
        description="Names of outputs later conditions read from this step.",
    )
    timeout_seconds: int | None = None


def is_agent_task(payload: Mapping[str, Any]) -> bool:
    """Whether a task's payload is an `AgentTask` (rather than an invoke request)."""
    return payload.get("kind") == AGENT_TASK_KIND


def decode_agent_task(payload: Mapping[str, Any]) -> AgentTask:
    """The payload as an `AgentTask`; `WireError` naming the field if it is not one."""
    try:
        return AgentTask.model_validate(dict(payload))
    except pydantic.ValidationError as exc:
        raise WireError(f"not a workflow step task: {_first_problem(exc)}") from None


class StoredArtifact(_Wire):
    """The version of the artifact a step wrote."""

    uri: str
    version: str
    size: int = pydantic.Field(ge=0)


class StepOutput(_Wire):
    """The output of a succeeded workflow step task: references and small figures."""

    artifact: StoredArtifact | None = None
    content: str | None = pydantic.Field(
        default=None,
        max_length=INLINE_CONTENT_MAX_BYTES,
        description="The answer itself, only for a Workflow without object storage.",
    )
    items: list[Item] | None = pydantic.Field(default=None, max_length=MAX_ITEMS)
    outputs: dict[str, OutputValue] = pydantic.Field(default_factory=dict, max_length=MAX_OUTPUTS)
    message: str = pydantic.Field(default="", max_length=MESSAGE_MAX_CHARS)
    tokens_in: int = pydantic.Field(default=0, ge=0)
    tokens_out: int = pydantic.Field(default=0, ge=0)
    model: str | None = None
    provider: str | None = None
    latency_ms: int = pydantic.Field(
        default=0, ge=0, description="The agent's own time: reading, the turn, storing."
    )

    @pydantic.field_validator("outputs")
    @classmethod
    def _small_values(cls, outputs: dict[str, OutputValue]) -> dict[str, OutputValue]:
        for name, value in outputs.items():
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,62}", name):
                raise ValueError(f"output name {name!r} is not an identifier (letters, digits, _)")
            if isinstance(value, str) and len(value) > OUTPUT_VALUE_MAX_CHARS:
                raise ValueError(
                    f"output {name!r} is longer than {OUTPUT_VALUE_MAX_CHARS} characters"
                )
        return outputs


def decode_step_output(output: Mapping[str, Any] | None) -> StepOutput:
    """A result's output as a `StepOutput`; `WireError` naming the field if it is not one."""
    if output is None:
        raise WireError("a succeeded workflow step result has no output")
    try:
        return StepOutput.model_validate(dict(output))
    except pydantic.ValidationError as exc:
        raise WireError(f"not a workflow step output: {_first_problem(exc)}") from None


def _first_problem(exc: pydantic.ValidationError) -> str:
    errors = exc.errors()
    if not errors:
        return str(exc)
    first = errors[0]
    where = ".".join(str(p) for p in first["loc"]) or "(the object)"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg']}{more}"
