"""What the workflow engine sends and receives: task ids, dispatches and results.

These are the engine's own values, independent of how they travel: the reconciler
turns a :class:`Dispatch` into a task on the agent's stream and a task result into a
:class:`Result` (the wire format is ``bmad_integrations``' business, shared with the
runtime).

Task ids are deterministic: one id per (workflow uid, step, item, attempt). The bus
enqueues an id once and stores its result once, so an operator that crashes between
dispatching and writing its status dispatches the same id again on restart, which is
harmless, and never runs a completed step a second time: the next pass finds the
result under the id that the status names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

from bmad_crds.v1alpha1 import workflow as api
from bmad_operator.workflows import expr

PREFIX = "wf"
_ITEM = re.compile(api.ITEM_NAME_PATTERN)


def is_item_name(name: str) -> bool:
    """Whether ``name`` can be an item of a repeated step (it ends up in task ids)."""
    return len(name) <= api.ITEM_NAME_MAX_LENGTH and _ITEM.fullmatch(name) is not None


def task_id(uid: str, step: str, item: str | None, attempt: int) -> str:
    """The task id of one attempt: ``wf:<uid>:<step>[:<item>]:<attempt>``.

    Step ids are DNS labels and items match :data:`api.ITEM_NAME_PATTERN`; neither
    holds a ``:``, so the two shapes never collide.
    """
    if not uid:
        raise ValueError("a workflow without metadata.uid has no task ids")
    if attempt < 1:
        raise ValueError(f"attempt {attempt} of step {step!r}: attempts count from 1")
    if item is None:
        return f"{PREFIX}:{uid}:{step}:{attempt}"
    if not is_item_name(item):
        raise ValueError(f"item {item!r} of step {step!r} is not a valid item name")
    return f"{PREFIX}:{uid}:{step}:{item}:{attempt}"


class TaskRef(NamedTuple):
    """What a task id says: whose attempt it is."""

    uid: str
    step: str
    item: str | None
    attempt: int


def parse_task_id(task_id: str) -> TaskRef | None:
    """The parts of a task id made by :func:`task_id`; None for any other id."""
    parts = task_id.split(":")
    if len(parts) not in (4, 5) or parts[0] != PREFIX or not parts[-1].isdigit():
        return None
    item = parts[3] if len(parts) == 5 else None
    attempt = int(parts[-1])
    if not parts[1] or not parts[2] or attempt < 1:
        return None
    return TaskRef(parts[1], parts[2], item, attempt)


def outstanding(uid: str, status: api.WorkflowStatus | None) -> list[str]:
    """Task ids of the attempts that run now: what deleting the Workflow cancels."""
    found: list[str] = []
    for step in (status.steps if status else None) or []:
        # A repeated step's own phase and attempts summarise its items.
        if step.items is None and step.phase == "Running" and step.attempts:
            found.append(task_id(uid, step.id, None, step.attempts))
        for item in step.items or []:
            if item.phase == "Running" and item.attempts:
                found.append(task_id(uid, step.id, item.name, item.attempts))
    return found


@dataclasses.dataclass(frozen=True, kw_only=True)
class ArtifactRef:
    """A reference to one stored version of an artifact, never its content."""

    name: str
    step: str
    item: str | None = None
    uri: str | None = None
    version: str | None = None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dispatch:
    """One attempt of a step (or of one item of a repeated step) to put on the bus."""

    task_id: str
    step: str
    item: str | None
    attempt: int
    max_attempts: int
    agent: str
    description: str | None
    inputs: Mapping[str, Any]
    requires: tuple[ArtifactRef, ...]
    creates: str | None
    updates: str | None
    timeout_seconds: int | None


@dataclasses.dataclass(frozen=True, kw_only=True)
class Result:
    """What came back for one task id."""

    task_id: str
    succeeded: bool
    message: str = ""
    tokens_in: int = 0
    tokens_out: int = 0
    artifact_uri: str | None = None
    artifact_version: str | None = None
    items: tuple[str, ...] | None = None
    """The items the created artifact lists (epics, stories), for steps repeating over it."""
    outputs: Mapping[str, expr.OutputValue] = dataclasses.field(default_factory=dict)
    """Small values for later conditions: at most 16, booleans, integers or short strings."""
