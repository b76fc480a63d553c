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
=================================  =================================================

A stream entry has two fields: ``task_id`` (the caller's idempotency key, 1-256
printable ASCII characters without spaces) and ``payload`` (a JSON object). The
result is a JSON object with ``task_id``, ``message_id``, ``status`` (``succeeded``
or ``failed``), ``output`` (an object or null), ``error`` (text or null),
``consumer``, ``attempt`` and ``finished_at`` (Unix seconds). A dead letter is a
stream entry with ``task_id``, ``message_id``, ``payload``, ``error``, ``attempts``
and ``consumer``.

For an agent task, the payload is the body of the runtime's ``POST /v1/invoke``
(without ``stream``) and a succeeded result's output is its answer.

The keys of one agent are not in one Redis Cluster hash slot (that would need a hash
tag such as ``bmad:{T:A}:…``); the scripts that touch several of them need a single
Redis server or a cluster-aware layout, which this one is not yet.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

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

Status = Literal["succeeded", "failed"]
STATUSES: tuple[Status, ...] = ("succeeded", "failed")

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
