"""`bmad import`: BMAD-METHOD v4 agent and workflow files as Agents and Workflows.

A v4 ``bmad-core`` folder holds ``agents/<id>.md`` (Markdown around one YAML block
with ``agent``, ``persona``, ``commands``, ``dependencies``) and
``workflows/<id>.yaml`` (``workflow.sequence``: the steps, in order). The files were
written for a person driving agents in an IDE chat, so the mapping has to decide
what each construct means for an operator that runs them unattended; every decision
is listed below and in docs/workflows.md. Nothing is dropped silently: what cannot
be mapped is an error naming the file and the field, and what is kept only as a
note (a notes-only item, ``agent: various``) is written to an annotation of the
Workflow and reported as a warning.

Agents
    ``agent.id`` names the Agent; ``agent.name``/``title`` and ``persona.style``/
    ``identity``/``focus`` fill ``spec.persona``; ``persona.role``, ``whenToUse``,
    ``core_principles``, ``commands``, ``dependencies``, a ``customization`` and any
    other key become sections of ``spec.instructions``. ``activation-instructions``,
    ``IDE-FILE-RESOLUTION`` and ``REQUEST-RESOLUTION`` drive an IDE chat (greet, list
    commands, halt), which an agent taking tasks must not do: they are left out and
    named in the ``bmad.dev/import-omitted`` annotation.

Workflow steps (``workflow.sequence[i]``)
    ``agent`` -> ``agent`` (``a/b`` runs on ``a``, with a warning); ``creates``,
    ``updates`` -> the same (a trailing "(if needed)" becomes part of the
    description); ``requires`` -> ``requires``, where ``all_artifacts`` and
    ``all_artifacts_in_project`` stand for every artifact created before the step;
    ``validates`` -> ``requires`` (and the description); ``condition: name`` ->
    ``has(inputs.name) && inputs.name == true``, with ``name: false`` added to
    ``spec.inputs`` so that the switch is visible; ``optional`` -> ``optional``;
    ``repeats: for_each_x`` -> ``repeat.over`` the first artifact the step requires
    (the step that creates it lists the items); ``action``, ``notes``, ``uses`` and
    ``optional_steps`` -> ``description``.
    A step that requires or updates an artifact a repeated step creates repeats over
    the same artifact (BMAD's "repeat the SM -> Dev -> QA cycle for every story"), and
    every step waits for the step listed before it (``dependsOn``), as BMAD's
    sequence is followed in order.
    Items with no agent (``step: ...`` notes) and ``agent: various`` items are notes.
    ``routes`` (a choice between paths) cannot be expressed: an error.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pydantic
import yaml

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_crds.v1alpha1 import common
from bmad_crds.v1alpha1 import workflow as workflow_api

ANNOTATION_PREFIX = "bmad.dev/"
SOURCE = f"{ANNOTATION_PREFIX}import-source"
OMITTED = f"{ANNOTATION_PREFIX}import-omitted"
NOTES = f"{ANNOTATION_PREFIX}import-notes"
PART_OF = "app.kubernetes.io/part-of"

IDE_ONLY_KEYS = ("activation-instructions", "IDE-FILE-RESOLUTION", "REQUEST-RESOLUTION")
COLLECTIVE_ARTIFACTS = frozenset({"all_artifacts", "all_artifacts_in_project"})
SEQUENCE_KEYS = frozenset(
    {
        "agent",
        "step",
        "action",
        "creates",
        "updates",
        "requires",
        "validates",
        "uses",
        "condition",
        "optional",
        "optional_steps",
        "repeats",
        "notes",
        "routes",
    }
)
WORKFLOW_KEYS = frozenset(
    {
        "id",
        "name",
        "description",
        "type",
        "project_types",
        "sequence",
        "flow_diagram",
        "decision_guidance",
        "handoff_prompts",
    }
)
# Keys of `workflow` kept as annotations (information for people, not for the engine).
WORKFLOW_ANNOTATED = ("name", "description", "type", "project_types", "decision_guidance")

_YAML_BLOCK = re.compile(r"^```ya?ml[ \t]*\n(.*?)^```", re.MULTILINE | re.DOTALL)
_PARENTHETICAL = re.compile(r"^(?P<name>\S+)\s+\((?P<note>[^()]*)\)$")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_ARTIFACT = re.compile(workflow_api.ARTIFACT_NAME_PATTERN)


class ImportProblem(ValueError):  # noqa: N818 - an error, named for what users read
    """Something in a BMAD file that cannot be mapped: which file, which field, why."""

    def __init__(self, file: str, field: str, message: str) -> None:
        self.file = file
        self.field = field
        self.message = message
        super().__init__(f"{file}: {field}: {message}")


@dataclasses.dataclass(frozen=True)
class Approximation:
    """Something mapped with a loss a person should know about (also in an annotation)."""

    file: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}: {self.field}: {self.message}"


@dataclasses.dataclass
class Imported:
    """The manifests of one import, and what went wrong or was approximated."""

    agents: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    workflows: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    errors: list[ImportProblem] = dataclasses.field(default_factory=list)
    warnings: list[Approximation] = dataclasses.field(default_factory=list)

    def manifests(self) -> list[tuple[str, dict[str, Any]]]:
        """(file name, manifest), agents first, each group by name."""
        out = [(f"agent-{name}.yaml", self.agents[name]) for name in sorted(self.agents)]
        out += [(f"workflow-{name}.yaml", self.workflows[name]) for name in sorted(self.workflows)]
        return out


@dataclasses.dataclass(frozen=True, kw_only=True)
class Options:
    model_provider: agent_api.ModelProvider = "echo"
    model_name: str = "echo-1"
    artifacts_integration: str | None = None
    namespace: str | None = None
    part_of: str = "bmad"


# --- helpers ---------------------------------------------------------------------


def _slug(text: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")
    return slug[: common.DNS1123_LABEL_MAX_LENGTH].strip("-")


def _text(value: Any, file: str, field: str, *, limit: int | None = None) -> str:
    if not isinstance(value, str | int | float) or isinstance(value, bool):
        raise ImportProblem(file, field, f"expected a text, found {type(value).__name__}")
    text = str(value).strip()
    if limit is not None and len(text) > limit:
        raise ImportProblem(
            file, field, f"is {len(text)} characters long, at most {limit} fit: shorten it"
        )
    return text


def _validated(model: type[pydantic.BaseModel], obj: dict[str, Any], file: str) -> None:
    try:
        model.model_validate(obj)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise ImportProblem(
            file, where, f"the mapped manifest is invalid: {first['msg']}"
        ) from None


def _metadata(
    name: str, source: str, options: Options, annotations: Mapping[str, str]
) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name}
    if options.namespace:
        meta["namespace"] = options.namespace
    meta["labels"] = {PART_OF: options.part_of}
    meta["annotations"] = {SOURCE: source, **annotations}
    return meta


def _yaml_text(value: Any) -> str:
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=100).strip()


# --- agents ----------------------------------------------------------------------


def agent_block(text: str, file: str) -> dict[str, Any]:
    """The YAML block of a v4 agent file, parsed."""
    match = _YAML_BLOCK.search(text)
    if match is None:
        raise ImportProblem(
            file, "yaml block", "no ```yaml block with the agent definition was found"
        )
    try:
        block = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"yaml block, line {mark.line + 1}" if mark is not None else "yaml block"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ImportProblem(file, where, f"is not valid YAML: {problem}") from None
    if not isinstance(block, dict):
        raise ImportProblem(file, "yaml block", "must be a mapping with agent and persona")
    return block


def _list_section(title: str, value: Any, file: str, field: str) -> str:
    """A Markdown section from a list of texts, of one-key mappings, or a mapping."""
    if isinstance(value, Mapping):
        value = [{k: v} for k, v in value.items()]
    if not isinstance(value, list):
        raise ImportProblem(file, field, f"expected a list, found {type(value).__name__}")
    lines = [f"## {title}", ""]
    for i, entry in enumerate(value):
        if isinstance(entry, str | int | float) and not isinstance(entry, bool):
            lines.append(f"- {entry}")
        elif isinstance(entry, Mapping) and len(entry) == 1:
            [(key, detail)] = entry.items()
            if isinstance(detail, str | int | float) or detail is None:
                lines.append(f"- {key}: {detail}" if detail is not None else f"- {key}")
            else:
                lines.append(f"- {key}:")
                lines.extend(f"    {line}" for line in _yaml_text(detail).splitlines())
        else:
            raise ImportProblem(
                file, f"{field}[{i}]", "expected a text or a one-key mapping (name: description)"
            )
    return "\n".join(lines)


def _dependencies_section(value: Any, file: str) -> str:
    if not isinstance(value, Mapping):
        raise ImportProblem(
            file, "dependencies", "expected a mapping of kinds (tasks, templates, ...) to lists"
        )
    lines = ["## Dependencies", ""]
    for kind, names in value.items():
        if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise ImportProblem(file, f"dependencies.{kind}", "expected a list of file names")
        lines.append(f"- {kind}: {', '.join(names)}")
    return "\n".join(lines)


def map_agent(text: str, file: str, options: Options) -> dict[str, Any]:
    """One Agent manifest from the text of a v4 agent file."""
    block = agent_block(text, file)
    agent = block.get("agent")
    if not isinstance(agent, Mapping):
        raise ImportProblem(file, "agent", "is missing: the block must have agent.id and name")
    agent_id = agent.get("id")
    if not isinstance(agent_id, str) or not common.is_dns1123_label(
        agent_id, max_length=agent_api.NAME_MAX_LENGTH
    ):
        raise ImportProblem(
            file,
            "agent.id",
            f"{agent_id!r} cannot name an Agent: it must be a DNS-1123 label of at most "
            f"{agent_api.NAME_MAX_LENGTH} characters (lowercase letters, digits, '-')",
        )
    persona_block = block.get("persona", {})
    if persona_block is None:
        persona_block = {}
    if not isinstance(persona_block, Mapping):
        raise ImportProblem(file, "persona", "expected a mapping (role, style, identity, focus)")

    persona: dict[str, str] = {}
    for key, source, limit in (
        ("name", "agent.name", 256),
        ("title", "agent.title", 256),
    ):
        if agent.get(key) is not None:
            persona[key] = _text(agent[key], file, source, limit=limit)
    for key in ("style", "identity", "focus"):
        if persona_block.get(key) is not None:
            persona[key] = _text(persona_block[key], file, f"persona.{key}", limit=4096)

    sections: list[str] = []
    title = persona.get("title") or agent_id
    intro = [f"# {persona.get('name', agent_id)}, {title}"]
    if persona_block.get("role") is not None:
        intro.append("")
        intro.append(f"Role: {_text(persona_block['role'], file, 'persona.role')}")
    if agent.get("whenToUse") is not None:
        intro.append("")
        intro.append(f"Use this agent for: {_text(agent['whenToUse'], file, 'agent.whenToUse')}")
    sections.append("\n".join(intro))
    principles = persona_block.get("core_principles", block.get("core_principles"))
    if principles is not None:
        field = (
            "persona.core_principles" if "core_principles" in persona_block else ("core_principles")
        )
        sections.append(_list_section("Core principles", principles, file, field))
    if agent.get("customization") not in (None, ""):
        custom = _text(agent["customization"], file, "agent.customization")
        sections.append(f"## Customization (takes precedence over the rest)\n\n{custom}")
    if block.get("commands") is not None:
        sections.append(_list_section("Commands", block["commands"], file, "commands"))
    if block.get("dependencies") is not None:
        sections.append(_dependencies_section(block["dependencies"], file))

    known_agent = {"name", "id", "title", "icon", "whenToUse", "customization"}
    for key in agent:
        if key not in known_agent:
            raise ImportProblem(
                file, f"agent.{key}", "is not a field of a v4 agent: remove it or move it"
            )
    known_persona = {"role", "style", "identity", "focus", "core_principles"}
    for key in persona_block:
        if key not in known_persona:
            sections.append(f"## {key}\n\n{_yaml_text(persona_block[key])}")
    handled = {"agent", "persona", "core_principles", "commands", "dependencies"}
    omitted = [key for key in block if key in IDE_ONLY_KEYS]
    for key, value in block.items():
        if key in handled or key in IDE_ONLY_KEYS:
            continue
        sections.append(f"## {key}\n\n{_yaml_text(value)}")

    annotations: dict[str, str] = {}
    if agent.get("icon") is not None:
        annotations[f"{ANNOTATION_PREFIX}icon"] = _text(agent["icon"], file, "agent.icon")
    if omitted:
        annotations[OMITTED] = (
            ", ".join(omitted) + ": IDE chat activation, not used by an agent that takes tasks"
        )
    spec: dict[str, Any] = {
        "role": agent_id if agent_id in agent_api.ROLES else "custom",
        "persona": persona,
        "instructions": "\n\n".join(sections) + "\n",
        "model": {"provider": options.model_provider, "name": options.model_name},
    }
    if not persona:
        del spec["persona"]
    manifest = {
        "apiVersion": common.API_VERSION,
        "kind": "Agent",
        "metadata": _metadata(agent_id, file, options, annotations),
        "spec": spec,
    }
    _validated(agent_api.Agent, manifest, file)
    return manifest


# --- workflows -------------------------------------------------------------------


@dataclasses.dataclass
class _Step:
    index: int
    body: dict[str, Any]
    repeats: bool = False


def _artifact(value: Any, file: str, field: str) -> tuple[str, str | None]:
    """(artifact name, note in parentheses) from "prd.md (if needed)"."""
    text = _text(value, file, field)
    note: str | None = None
    match = _PARENTHETICAL.match(text)
    if match:
        text, note = match.group("name"), match.group("note")
    if not _ARTIFACT.match(text) or len(text) > workflow_api.ARTIFACT_NAME_MAX_LENGTH:
        raise ImportProblem(
            file,
            field,
            f"{text!r} cannot name an artifact: use at most "
            f"{workflow_api.ARTIFACT_NAME_MAX_LENGTH} letters, digits, '-', '.', '_' and '/'",
        )
    return text, note


def _names(value: Any, file: str, field: str) -> list[str]:
    if isinstance(value, list):
        return [_artifact(v, file, f"{field}[{i}]")[0] for i, v in enumerate(value)]
    return [_artifact(value, file, field)[0]]


def _note(item: Mapping[str, Any]) -> str:
    parts = [
        f"{key}: {item[key]}"
        for key in ("step", "agent", "action", "creates", "updates", "validates", "condition")
        if item.get(key) is not None
    ]
    notes = " ".join(str(item.get("notes", "")).split())
    return "; ".join(parts) + (f". Notes: {notes}" if notes else "")


def map_workflow(
    text: str, file: str, options: Options, *, agents: Iterable[str] | None = None
) -> tuple[dict[str, Any], list[Approximation]]:
    """One Workflow manifest from the text of a v4 workflow file, and its warnings."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark is not None else "document"
        problem = getattr(exc, "problem", None) or str(exc)
        raise ImportProblem(file, where, f"is not valid YAML: {problem}") from None
    if not isinstance(doc, Mapping) or not isinstance(doc.get("workflow"), Mapping):
        raise ImportProblem(file, "workflow", "is missing: the file must hold workflow.sequence")
    wf = doc["workflow"]
    for key in wf:
        if key not in WORKFLOW_KEYS:
            raise ImportProblem(
                file, f"workflow.{key}", "is not a field of a v4 workflow: remove it"
            )
    wf_id = wf.get("id")
    if not isinstance(wf_id, str) or not common.is_dns1123_label(wf_id):
        raise ImportProblem(
            file,
            "workflow.id",
            f"{wf_id!r} cannot name a Workflow: it must be a DNS-1123 label (lowercase "
            "letters, digits, '-')",
        )
    sequence = wf.get("sequence")
    if not isinstance(sequence, list) or not sequence:
        raise ImportProblem(file, "workflow.sequence", "must be a non-empty list of steps")

    known_agents = set(agents) if agents is not None else None
    warnings: list[Approximation] = []
    notes: list[str] = []
    steps: list[_Step] = []
    ids: set[str] = set()
    created: dict[str, str] = {}  # artifact -> step id
    repeated: dict[str, str] = {}  # artifact -> collection of the repeated step writing it
    inputs: dict[str, bool] = {}
    maybe: set[str] = set()  # ids of steps that may not run (a condition, or optional)
    waits_for: dict[str, list[str]] = {}  # step id -> steps it waits for, besides the previous

    for k, item in enumerate(sequence):
        where = f"workflow.sequence[{k}]"
        if not isinstance(item, Mapping):
            raise ImportProblem(file, where, "expected a mapping (agent, creates, ...)")
        for key in item:
            if key not in SEQUENCE_KEYS:
                raise ImportProblem(
                    file, f"{where}.{key}", "is not a field of a v4 workflow step: remove it"
                )
        if "routes" in item:
            raise ImportProblem(
                file,
                f"{where}.routes",
                "a choice between routes cannot be expressed by one Workflow: import one "
                "workflow per route (split the file)",
            )
        agent_value = item.get("agent")
        if agent_value is None or agent_value == "various":
            if any(item.get(key) is not None for key in ("creates", "requires", "repeats")):
                raise ImportProblem(
                    file,
                    f"{where}.agent",
                    "a step that creates, requires or repeats needs one agent to run it",
                )
            why = (
                "names no agent" if agent_value is None else 'names no single agent, only "various"'
            )
            notes.append(f"{where} is kept as a note, not run (it {why}): {_note(item)}")
            warnings.append(Approximation(file, where, f"kept as a note, not run: it {why}"))
            continue

        agent_text = _text(agent_value, file, f"{where}.agent")
        choices = [a.strip() for a in agent_text.split("/") if a.strip()]
        agent_name = choices[0] if choices else ""
        if not common.is_dns1123_label(agent_name):
            raise ImportProblem(
                file, f"{where}.agent", f"{agent_text!r} does not name an agent by its id"
            )
        if len(choices) > 1:
            notes.append(
                f"{where}: the file lets {agent_text} do this step; it runs on {agent_name}."
            )
            warnings.append(
                Approximation(
                    file, f"{where}.agent", f"{agent_text}: the step runs on {agent_name}"
                )
            )
        if known_agents is not None and agent_name not in known_agents:
            raise ImportProblem(
                file,
                f"{where}.agent",
                f"no agents/{agent_name}.md in the folder: add the agent file or change the step",
            )

        body: dict[str, Any] = {"agent": agent_name}
        description: list[str] = []
        after: list[str] = []
        if item.get("action") is not None:
            description.append(f"Action: {_text(item['action'], file, f'{where}.action')}.")
        requires: list[str] = []
        for field in ("requires", "validates"):
            if item.get(field) is None:
                continue
            for name in _names(item[field], file, f"{where}.{field}"):
                if name in COLLECTIVE_ARTIFACTS:
                    # Every artifact made so far; one whose step may not run (conditional
                    # or optional) is waited for, not required, or its absence would skip
                    # this step and everything after it.
                    for artifact, creator in created.items():
                        if creator in maybe:
                            after.append(creator)
                        else:
                            requires.append(artifact)
                elif name in created:
                    requires.append(name)
                else:
                    raise ImportProblem(
                        file,
                        f"{where}.{field}",
                        f"{name!r} is created by no earlier step of the workflow: add the step "
                        "that creates it, or remove it",
                    )
            if field == "validates":
                description.append(f"Validates: {item[field]}.")
        if item.get("creates") is not None:
            name, note = _artifact(item["creates"], file, f"{where}.creates")
            if name in created:
                raise ImportProblem(
                    file,
                    f"{where}.creates",
                    f"{name!r} is created by an earlier step already: use updates",
                )
            body["creates"] = name
            if note:
                description.append(f"Creates {name} ({note}).")
        if item.get("updates") is not None:
            name, note = _artifact(item["updates"], file, f"{where}.updates")
            if name not in created:
                raise ImportProblem(
                    file,
                    f"{where}.updates",
                    f"{name!r} is created by no earlier step of the workflow",
                )
            body["updates"] = name
            if note:
                description.append(f"Updates {name} ({note}).")
        requires = [r for r in dict.fromkeys(requires) if r != body.get("creates")]
        if requires:
            body["requires"] = requires
        if item.get("uses") is not None:
            description.append(f"Uses: {_text(item['uses'], file, f'{where}.uses')}.")
        if item.get("optional_steps") is not None:
            sub_steps = item["optional_steps"]
            if not isinstance(sub_steps, list):
                raise ImportProblem(file, f"{where}.optional_steps", "expected a list of names")
            description.append(f"Optional sub-steps: {', '.join(str(e) for e in sub_steps)}.")
        if item.get("notes") is not None:
            description.append(_text(item["notes"], file, f"{where}.notes"))
        if item.get("condition") is not None:
            condition = _text(item["condition"], file, f"{where}.condition")
            if not _IDENTIFIER.fullmatch(condition):
                raise ImportProblem(
                    file,
                    f"{where}.condition",
                    f"{condition!r} is not a condition name (letters, digits and _)",
                )
            body["condition"] = f"has(inputs.{condition}) && inputs.{condition} == true"
            inputs.setdefault(condition, False)
        if item.get("optional") is not None:
            if not isinstance(item["optional"], bool):
                raise ImportProblem(file, f"{where}.optional", "expected true or false")
            body["optional"] = item["optional"]
        over: str | None = None
        if item.get("repeats") is not None:
            repeats = _text(item["repeats"], file, f"{where}.repeats")
            if not repeats.startswith("for_each_"):
                raise ImportProblem(
                    file, f"{where}.repeats", f"{repeats!r}: only for_each_<thing> is understood"
                )
            if not requires:
                raise ImportProblem(
                    file,
                    f"{where}.repeats",
                    f"{repeats} repeats over the items of an artifact the step requires, "
                    "and this step requires none",
                )
            over = requires[0]
            description.append(f"Repeats {repeats.replace('_', ' ')}: once per item {over} lists.")
        else:
            inherited = {
                repeated[name]
                for name in [*requires, body.get("updates")]
                if name is not None and name in repeated
            }
            if len(inherited) > 1:
                raise ImportProblem(
                    file,
                    f"{where}.requires",
                    "reads artifacts of steps repeating over different collections",
                )
            over = next(iter(inherited), None)
        if over is not None:
            body["repeat"] = {"over": over}
        text_description = "\n".join(description)
        if text_description:
            if len(text_description) > 4096:
                raise ImportProblem(
                    file,
                    f"{where}.notes",
                    f"the step's description would be {len(text_description)} characters, "
                    "at most 4096: shorten the notes",
                )
            body["description"] = text_description

        base = _slug(str(item.get("step") or item.get("action") or "")) or _step_name(item, body)
        step_id = base or agent_name
        n = 2
        while step_id in ids:
            suffix = f"-{n}"
            step_id = base[: common.DNS1123_LABEL_MAX_LENGTH - len(suffix)] + suffix
            n += 1
        ids.add(step_id)
        body = {"id": step_id, **body}
        if "condition" in body or body.get("optional"):
            maybe.add(step_id)
        if after:
            waits_for[step_id] = list(dict.fromkeys(after))
        if "creates" in body:
            created[body["creates"]] = step_id
        if over is not None:
            for written in (body.get("creates"), body.get("updates")):
                if written is not None:
                    repeated[written] = over
        steps.append(_Step(k, _ordered(body), over is not None))

    if not steps:
        raise ImportProblem(file, "workflow.sequence", "has no step with an agent to run")
    # BMAD's sequence is followed in order: each step waits for the one listed before.
    for previous, current in itertools.pairwise(steps):
        wanted = set(current.body.get("requires", ()))
        if current.body.get("updates"):
            wanted.add(current.body["updates"])
        writes = {previous.body.get("creates"), previous.body.get("updates")} - {None}
        waits = list(waits_for.get(current.body["id"], ()))
        if not wanted & writes and previous.body["id"] not in waits:
            waits.append(previous.body["id"])
        if waits:
            current.body["dependsOn"] = waits
            current.body = _ordered(current.body)

    annotations: dict[str, str] = {}
    for key in WORKFLOW_ANNOTATED:
        if wf.get(key) is not None:
            value = wf[key]
            text_value = value if isinstance(value, str) else json.dumps(value)
            annotations[f"{ANNOTATION_PREFIX}{key.replace('_', '-')}"] = " ".join(
                str(text_value).split()
            )
    if wf.get("handoff_prompts") is not None:
        annotations[f"{ANNOTATION_PREFIX}handoff-prompts"] = json.dumps(
            wf["handoff_prompts"], ensure_ascii=False
        )
    if wf.get("flow_diagram") is not None:
        annotations[f"{ANNOTATION_PREFIX}flow-diagram"] = str(wf["flow_diagram"])
    if notes:
        annotations[NOTES] = "\n".join(notes)

    spec: dict[str, Any] = {}
    if options.artifacts_integration:
        spec["artifacts"] = {"integration": options.artifacts_integration}
    if inputs:
        spec["inputs"] = inputs
    spec["steps"] = [step.body for step in steps]
    manifest = {
        "apiVersion": common.API_VERSION,
        "kind": "Workflow",
        "metadata": _metadata(wf_id, file, options, annotations),
        "spec": spec,
    }
    _validated(workflow_api.Workflow, manifest, file)
    return manifest, warnings


_STEP_KEYS = (
    "id",
    "agent",
    "description",
    "creates",
    "updates",
    "requires",
    "dependsOn",
    "condition",
    "optional",
    "repeat",
)


def _ordered(body: Mapping[str, Any]) -> dict[str, Any]:
    """A step's keys in a fixed order: what it is, what it does, when it runs."""
    return {key: body[key] for key in _STEP_KEYS if key in body}


def _step_name(item: Mapping[str, Any], body: Mapping[str, Any]) -> str:
    """A step id for an item without step or action: from what it writes or checks."""

    def stem(name: Any) -> str:
        return _slug(str(name).rsplit("/", 1)[-1].split(".", 1)[0])

    if body.get("creates"):
        return stem(body["creates"])
    if body.get("updates"):
        return f"update-{stem(body['updates'])}"
    if item.get("validates") is not None:
        return f"validate-{stem(item['validates'])}"
    return str(body["agent"])


# --- a folder --------------------------------------------------------------------


def import_folder(
    folder: Path, options: Options, *, workflows: Sequence[str] | None = None
) -> Imported:
    """Every agent and workflow of a bmad-core folder (or the named workflows and
    the agents they use)."""
    result = Imported()
    agents_dir, workflows_dir = folder / "agents", folder / "workflows"
    if not agents_dir.is_dir() and not workflows_dir.is_dir():
        result.errors.append(
            ImportProblem(
                str(folder),
                "folder",
                "has neither agents/ nor workflows/: give the path of a bmad-core folder",
            )
        )
        return result
    agent_files = sorted(agents_dir.glob("*.md")) if agents_dir.is_dir() else []
    workflow_files = sorted(workflows_dir.glob("*.yaml")) if workflows_dir.is_dir() else []
    if workflows is not None:
        wanted = set(workflows)
        found = {p.stem for p in workflow_files}
        for name in sorted(wanted - found):
            result.errors.append(
                ImportProblem(
                    str(workflows_dir / f"{name}.yaml"), "file", "no such workflow in the folder"
                )
            )
        workflow_files = [p for p in workflow_files if p.stem in wanted]

    for path in agent_files:
        rel = str(path.relative_to(folder))
        try:
            manifest = map_agent(path.read_text(encoding="utf-8"), rel, options)
        except ImportProblem as exc:
            result.errors.append(exc)
            continue
        result.agents[manifest["metadata"]["name"]] = manifest

    used: set[str] = set()
    for path in workflow_files:
        rel = str(path.relative_to(folder))
        try:
            manifest, warnings = map_workflow(
                path.read_text(encoding="utf-8"), rel, options, agents=result.agents
            )
        except ImportProblem as exc:
            result.errors.append(exc)
            continue
        result.workflows[manifest["metadata"]["name"]] = manifest
        result.warnings.extend(warnings)
        used.update(step["agent"] for step in manifest["spec"]["steps"])
    if workflows is not None:
        result.agents = {name: m for name, m in result.agents.items() if name in used}
    return result


class _Dumper(yaml.SafeDumper):
    """Multi-line texts as literal blocks (|), so instructions read as written."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _represent_str)


def render(manifest: Mapping[str, Any]) -> str:
    """One manifest as YAML, keys in the order Kubernetes users expect."""
    source = manifest.get("metadata", {}).get("annotations", {}).get(SOURCE, "a BMAD file")
    header = f"# Generated by `bmad import` from {source}: change the source and import again.\n"
    return header + yaml.dump(
        dict(manifest), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100
    )
