"""The dependency graph of a Workflow, derived from what its steps create, update and require.

BMAD workflows do not draw their graph: each step says which artifacts it needs and
which one it produces, and the order follows. A step depends on

- the step that ``creates`` each artifact it ``requires``, ``updates`` or repeats
  ``over``, and on every step listed *before it* that ``updates`` that artifact (so a
  reader after an update gets the updated version, as in BMAD's sequence);
- the steps it names in ``dependsOn`` (ordering only: no artifact is handed over).

An edge between two steps that repeat over the same artifact is *pipelined*: item i
of the later step waits for item i of the earlier one only (one sm -> dev -> qa
cycle per story), unless the earlier step has an approval gate, which holds for the
whole step.

Everything here is pure; :func:`build` either returns a :class:`Dag` or raises
:class:`InvalidDagError` with every problem found, each naming the step and the field.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Mapping, Sequence
from typing import Literal, NamedTuple

from bmad_crds.v1alpha1 import workflow as api

# Reasons, CamelCase, used as condition reasons by the engine ------------------------
DUPLICATE_STEP = "DuplicateStepId"
DUPLICATE_CREATOR = "DuplicateCreator"
REQUIREMENT_NOT_CREATED = "RequirementNotCreated"
UPDATE_TARGET_NOT_CREATED = "UpdateTargetNotCreated"
REPEAT_OVER_NOTHING = "RepeatOverNothing"
UNKNOWN_DEPENDENCY = "UnknownDependency"
CYCLE = "Cycle"

EdgeKind = Literal["requires", "updates", "repeat", "dependsOn"]


class DagError(NamedTuple):
    """One reason a workflow cannot run: which step, which field, what to change."""

    step: str
    field: str
    reason: str
    message: str


class InvalidDagError(ValueError):
    """The steps do not form a runnable graph; ``errors`` says why, step by step."""

    def __init__(self, errors: Sequence[DagError]) -> None:
        self.errors = tuple(errors)
        super().__init__("; ".join(error.message for error in self.errors))


class Edge(NamedTuple):
    """Why ``step`` waits for ``upstream``."""

    upstream: str
    kind: EdgeKind
    artifact: str | None
    pipelined: bool


@dataclasses.dataclass(frozen=True)
class Dag:
    """The graph of one workflow: steps, their order and what each waits for."""

    steps: Mapping[str, api.Step]
    index: Mapping[str, int]
    order: tuple[str, ...]
    edges: Mapping[str, tuple[Edge, ...]]
    creators: Mapping[str, str]

    def upstream(self, step_id: str) -> dict[str, bool]:
        """The steps ``step_id`` waits for, each with whether the wait is per item."""
        found: dict[str, bool] = {}
        for edge in self.edges[step_id]:
            found[edge.upstream] = found.get(edge.upstream, True) and edge.pipelined
        return found

    def needs(self, step_id: str) -> tuple[str, ...]:
        """The artifacts the step needs, in a stable order: requires, updates, repeat.over."""
        step = self.steps[step_id]
        names = list(step.requires or ())
        if step.updates is not None:
            names.append(step.updates)
        if step.repeat is not None:
            names.append(step.repeat.over)
        return tuple(dict.fromkeys(names))

    def producers(self, step_id: str, artifact: str) -> tuple[str, ...]:
        """Steps whose version of ``artifact`` ``step_id`` may get, oldest first.

        The creator, then the steps listed before ``step_id`` that update the artifact.
        """
        return _producers(self.steps, self.index, self.creators, step_id, artifact)

    def pipelined(self, upstream: str, step_id: str) -> bool:
        """Whether ``step_id``'s items each wait for the same item of ``upstream`` only."""
        return _pipelined(self.steps[upstream], self.steps[step_id])


def _pipelined(upstream: api.Step, step: api.Step) -> bool:
    gated = upstream.approval is not None and upstream.approval.required
    return (
        upstream.repeat is not None
        and step.repeat is not None
        and upstream.repeat.over == step.repeat.over
        and not gated
    )


def _producers(
    steps: Mapping[str, api.Step],
    index: Mapping[str, int],
    creators: Mapping[str, str],
    step_id: str,
    artifact: str,
) -> tuple[str, ...]:
    creator = creators.get(artifact)
    if creator is None:
        return ()
    updaters = [
        other.id
        for other in steps.values()
        if other.updates == artifact and other.id != step_id and index[other.id] < index[step_id]
    ]
    return (creator, *(u for u in updaters if u != creator))


def _field(index: int, name: str) -> str:
    return f"spec.steps[{index}].{name}"


def build(steps: Sequence[api.Step]) -> Dag:
    """The graph of ``steps``; raises :class:`InvalidDagError` naming every bad step and field."""
    errors: list[DagError] = []
    by_id: dict[str, api.Step] = {}
    index: dict[str, int] = {}
    for i, step in enumerate(steps):
        if step.id in by_id:
            errors.append(
                DagError(
                    step.id,
                    _field(i, "id"),
                    DUPLICATE_STEP,
                    f"{_field(i, 'id')}: step id {step.id!r} is used twice: give every step "
                    "its own id",
                )
            )
            continue
        by_id[step.id] = step
        index[step.id] = i

    creators: dict[str, str] = {}
    for step in by_id.values():
        if step.creates is None:
            continue
        first = creators.setdefault(step.creates, step.id)
        if first != step.id:
            i = index[step.id]
            errors.append(
                DagError(
                    step.id,
                    _field(i, "creates"),
                    DUPLICATE_CREATOR,
                    f"{_field(i, 'creates')}: step {step.id!r} creates {step.creates!r}, which "
                    f"step {first!r} creates already: let the later step use updates instead",
                )
            )

    edges: dict[str, list[Edge]] = {step_id: [] for step_id in by_id}
    for step in by_id.values():
        i = index[step.id]
        needs: list[tuple[str, EdgeKind, str, str, str]] = [
            (artifact, "requires", "requires", REQUIREMENT_NOT_CREATED, "requires")
            for artifact in step.requires or ()
        ]
        if step.updates is not None:
            needs.append((step.updates, "updates", "updates", UPDATE_TARGET_NOT_CREATED, "updates"))
        if step.repeat is not None:
            needs.append(
                (step.repeat.over, "repeat", "repeat.over", REPEAT_OVER_NOTHING, "repeats over")
            )
        for artifact, kind, field, reason, verb in needs:
            found = _producers(by_id, index, creators, step.id, artifact)
            if not found:
                errors.append(
                    DagError(
                        step.id,
                        _field(i, field),
                        reason,
                        f"{_field(i, field)}: step {step.id!r} {verb} {artifact!r}, which no "
                        "step creates: add a step that creates it, or change the name",
                    )
                )
            # A step never waits for itself on account of its own update.
            edges[step.id].extend(
                Edge(producer, kind, artifact, _pipelined(by_id[producer], step))
                for producer in found
                if producer != step.id
            )
        for other in step.depends_on or ():
            if other not in by_id:
                errors.append(
                    DagError(
                        step.id,
                        _field(i, "dependsOn"),
                        UNKNOWN_DEPENDENCY,
                        f"{_field(i, 'dependsOn')}: step {step.id!r} depends on {other!r}, "
                        "which is not a step of this workflow: use the id of another step",
                    )
                )
                continue
            edges[step.id].append(Edge(other, "dependsOn", None, _pipelined(by_id[other], step)))

    order, cyclic = _topological(by_id, index, edges)
    if cyclic:
        errors.append(_cycle_error(by_id, index, edges, cyclic))
    if errors:
        raise InvalidDagError(errors)
    return Dag(
        steps=by_id,
        index=index,
        order=order,
        edges={k: tuple(v) for k, v in edges.items()},
        creators=creators,
    )


def _topological(
    steps: Mapping[str, api.Step], index: Mapping[str, int], edges: Mapping[str, list[Edge]]
) -> tuple[tuple[str, ...], set[str]]:
    """Kahn's algorithm, ties broken by spec order; returns (order, steps left on a cycle)."""
    waiting = {step_id: {e.upstream for e in edges[step_id]} for step_id in steps}
    downstream: dict[str, set[str]] = {step_id: set() for step_id in steps}
    for step_id, ups in waiting.items():
        for up in ups:
            downstream[up].add(step_id)
    ready = [(index[s], s) for s, ups in waiting.items() if not ups]
    heapq.heapify(ready)
    order: list[str] = []
    while ready:
        _, step_id = heapq.heappop(ready)
        order.append(step_id)
        for down in downstream[step_id]:
            waiting[down].discard(step_id)
            if not waiting[down]:
                heapq.heappush(ready, (index[down], down))
    return tuple(order), {s for s, ups in waiting.items() if ups}


def _cycle_error(
    steps: Mapping[str, api.Step],
    index: Mapping[str, int],
    edges: Mapping[str, list[Edge]],
    cyclic: set[str],
) -> DagError:
    """Name one cycle among ``cyclic``: walk upstream from its first step until a repeat."""
    start = min(cyclic, key=index.__getitem__)
    path = [start]
    seen = {start: 0}
    current = start
    while True:
        edge = min(
            (e for e in edges[current] if e.upstream in cyclic),
            key=lambda e: index[e.upstream],
        )
        current = edge.upstream
        if current in seen:
            loop = path[seen[current] :]
            break
        seen[current] = len(path)
        path.append(current)
    # ``loop`` lists steps each waiting for the next; report it in the order work
    # flows, starting just before its first step in spec order, which is the one named.
    ordered = list(reversed(loop))
    anchor = ordered.index(min(loop, key=index.__getitem__))
    ordered = ordered[anchor - 1 :] + ordered[: anchor - 1]  # anchor - 1 may be -1
    flow = [*ordered, ordered[0]]
    first = flow[1]
    edge = next(e for e in edges[first] if e.upstream == flow[0])
    field = {
        "requires": "requires",
        "updates": "updates",
        "repeat": "repeat.over",
        "dependsOn": "dependsOn",
    }[edge.kind]
    i = index[first]
    via = f" (through {edge.artifact!r})" if edge.artifact else ""
    return DagError(
        first,
        _field(i, field),
        CYCLE,
        f"{_field(i, field)}: steps {' -> '.join(flow)} form a cycle{via}: remove one of "
        "these dependencies",
    )
