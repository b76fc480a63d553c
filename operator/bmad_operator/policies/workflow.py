"""Pure decisions about a Workflow's references: which Redis carries each Agent's tasks,
and what is wrong with the Agents and Integrations the run names.

The engine checks the graph and that each step's Agent exists; this module checks what
the reconciler needs to dispatch: that each Agent binds a redis Integration (its task
bus) whose binding Secret is published, that it binds the objectStorage Integration
the run stores artifacts in, and that ``spec.artifacts`` and ``spec.notify`` name
Integrations of the right type. Each problem names the step (or the field) and what to
change; the engine reports them like its own (``Valid=False``) and dispatches nothing.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import NamedTuple

from bmad_crds.v1alpha1 import workflow as api
from bmad_operator import conditions
from bmad_operator.workflows import dag

NO_TASK_BUS = "NoTaskBus"
BINDING_NOT_PUBLISHED = "BindingNotPublished"
ARTIFACTS_NOT_BOUND = "ArtifactsNotBound"
INTEGRATION_NOT_FOUND = "IntegrationNotFound"
WRONG_INTEGRATION_TYPE = "WrongIntegrationType"
INVALID_SPEC = "InvalidSpec"


class IntegrationInfo(NamedTuple):
    """What the reconciler saw of one Integration in the Workflow's namespace."""

    type: str
    binding: bool
    """Whether its binding Secret exists (the last good one counts)."""


def task_bus(bound: Sequence[str], integrations: Mapping[str, IntegrationInfo]) -> str | None:
    """The redis Integration that carries an Agent's tasks: the first of its bound
    Integrations of type redis, by name, as the runtime picks it
    (`bmad_runtime.settings.RuntimeSettings.with_bindings`)."""
    for name in sorted(bound):
        info = integrations.get(name)
        if info is not None and info.type == "redis":
            return name
    return None


def problems(
    spec: api.WorkflowSpec,
    *,
    agents: Mapping[str, Sequence[str]],
    integrations: Mapping[str, IntegrationInfo],
) -> list[dag.DagError]:
    """What stops the run from dispatching, beyond the graph and missing Agents.

    ``agents``: the Agents of the namespace, each with the Integrations it binds.
    """
    found: list[dag.DagError] = []
    found.extend(_integration(spec, integrations))
    artifacts = spec.artifacts.integration if spec.artifacts else None
    seen: set[str] = set()
    for i, step in enumerate(spec.steps):
        bound = agents.get(step.agent)
        if bound is None or step.agent in seen:
            continue  # a missing Agent is the engine's AgentNotFound; one report per Agent
        seen.add(step.agent)
        field = f"spec.steps[{i}].agent"
        who = f"{field}: step {step.id!r} runs on Agent {step.agent!r}, which"
        bus = task_bus(bound, integrations)
        if bus is None:
            found.append(
                dag.DagError(
                    step.id,
                    field,
                    NO_TASK_BUS,
                    f"{who} binds no Integration of type redis, the bus its tasks travel on: "
                    "add one to the Agent's spec.integrations",
                )
            )
        elif not integrations[bus].binding:
            found.append(
                dag.DagError(
                    step.id,
                    field,
                    BINDING_NOT_PUBLISHED,
                    f"{who} takes tasks through Integration {bus!r}, whose binding Secret is "
                    "not published yet: it is once the Integration's check passes",
                )
            )
        if artifacts is not None and artifacts not in bound:
            found.append(
                dag.DagError(
                    step.id,
                    field,
                    ARTIFACTS_NOT_BOUND,
                    f"{who} does not bind Integration {artifacts!r} (spec.artifacts."
                    "integration), where steps read and write artifacts: add it to the "
                    "Agent's spec.integrations",
                )
            )
    return found


def _integration(
    spec: api.WorkflowSpec, integrations: Mapping[str, IntegrationInfo]
) -> list[dag.DagError]:
    found: list[dag.DagError] = []
    wanted = []
    if spec.artifacts is not None:
        wanted.append(("spec.artifacts.integration", spec.artifacts.integration, "objectStorage"))
    if spec.notify is not None:
        wanted.append(("spec.notify.integration", spec.notify.integration, "email"))
    for field, name, kind in wanted:
        info = integrations.get(name)
        if info is None:
            found.append(
                dag.DagError(
                    "",
                    field,
                    INTEGRATION_NOT_FOUND,
                    f"{field}: Integration {name!r} does not exist in the Workflow's "
                    f"namespace: create an Integration of type {kind} named {name!r}",
                )
            )
        elif info.type != kind:
            found.append(
                dag.DagError(
                    "",
                    field,
                    WRONG_INTEGRATION_TYPE,
                    f"{field}: Integration {name!r} is of type {info.type}, not {kind}: "
                    f"name an Integration of type {kind}",
                )
            )
    return found


def invalid_spec(message: str) -> list[conditions.Cond]:
    """A stored spec the model refuses (written before a rule existed): not Ready, not
    Valid, and the message says which field."""
    return [
        conditions.Cond("Ready", conditions.FALSE, INVALID_SPEC, message),
        conditions.Cond("Valid", conditions.FALSE, INVALID_SPEC, message),
    ]
