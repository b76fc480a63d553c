"""The agent's rendered configuration (``agent.json``), as the runtime reads it.

The operator writes it into the agent's ConfigMap (`rendered_config` in
`bmad_operator.builders.agent`): the Agent's spec minus credentials, in the schema of
`bmad_crds.runtime_contract`. Unknown keys are ignored so that a newer operator does
not break an older runtime; the values the runtime relies on are validated there, and
a broken file is an error that names it. When the Agent takes its instructions from
a ConfigMap (``spec.instructionsFrom``), the operator projects that key next to
agent.json and `load` reads it into ``instructions``: the agent layer of the context.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic

from bmad_crds import runtime_contract as contract


class ConfigError(ValueError):
    """agent.json is missing or does not describe a usable agent."""


# The models of agent.json are the contract's, shared with the operator's builders.
Persona = contract.Persona
ModelRef = contract.ModelRef
ModelConfig = contract.ModelConfig
Limits = contract.Limits
Memory = contract.Memory


# The title each BMAD role goes by when the Agent gives no persona.
ROLE_TITLES: dict[str, str] = {
    "analyst": "Business Analyst",
    "pm": "Product Manager",
    "architect": "Architect",
    "ux-expert": "UX Expert",
    "po": "Product Owner",
    "sm": "Scrum Master",
    "dev": "Developer",
    "qa": "QA Engineer",
    "bmad-master": "BMAD Master",
    "bmad-orchestrator": "BMAD Orchestrator",
}


class AgentConfig(contract.AgentConfig):
    """agent.json as the contract defines it, with what the runtime makes of it."""

    def persona_text(self) -> str:
        """The agent's persona, for the agent layer of the context (instructions follow)."""
        persona = self.persona
        title = persona.title or ROLE_TITLES.get(self.role, self.role)
        intro = f"You are {persona.name}, the {title}." if persona.name else f"You are the {title}."
        lines = [intro]
        for label, value in (
            ("Identity", persona.identity),
            ("Style", persona.style),
            ("Focus", persona.focus),
        ):
            if value:
                lines.append(f"{label}: {value}")
        return "\n".join(lines)

    @property
    def context_window(self) -> int:
        """``model.contextWindow``, else the known window of the model, else a safe default."""
        return self.model.context_window or known_context_window(self.model.name)


# Context windows (tokens) of model families, by name prefix; the longest prefix wins.
KNOWN_CONTEXT_WINDOWS: dict[str, int] = {
    "gpt-3.5-turbo": 16_385,
    "gpt-4": 8_192,
    "gpt-4-turbo": 128_000,
    "gpt-4o": 128_000,
    "gpt-4.1": 1_047_576,
    "gpt-5": 400_000,
    "o1": 200_000,
    "o3": 200_000,
    "o4": 200_000,
    "claude": 200_000,
}
DEFAULT_CONTEXT_WINDOW = 8_192


def known_context_window(model: str) -> int:
    matches = [prefix for prefix in KNOWN_CONTEXT_WINDOWS if model.startswith(prefix)]
    return KNOWN_CONTEXT_WINDOWS[max(matches, key=len)] if matches else DEFAULT_CONTEXT_WINDOW


def echo_config(
    *, agent: str = "agent", role: str = "custom", model: str = "echo-1"
) -> AgentConfig:
    """A self-contained agent on the echo provider: demos, tests and benchmarks."""
    return AgentConfig(agent=agent, role=role, model=ModelConfig(provider="echo", name=model))


def parse(data: Any, *, source: str = "agent.json") -> AgentConfig:
    try:
        return AgentConfig.model_validate(data)
    except pydantic.ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc']) or '(root)'}: {err['msg']}"
            for err in exc.errors()
        )
        raise ConfigError(f"{source} is not a valid agent config: {problems}") from None


def load(path: Path) -> AgentConfig:
    """Read and validate agent.json (``$BMAD_AGENT_CONFIG``) and the instructions file
    it names."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{path} does not exist: set BMAD_AGENT_CONFIG to the agent.json the operator "
            "renders (mounted from the Agent's ConfigMap)"
        ) from None
    except OSError as exc:
        raise ConfigError(f"{path} cannot be read: {exc.strerror}") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not JSON (line {exc.lineno}: {exc.msg})") from None
    loaded = parse(data, source=str(path))
    if loaded.instructions_file is None:
        return loaded
    text = _instructions(path.parent / loaded.instructions_file, loaded.instructions_from)
    return loaded.model_copy(update={"instructions": text})


def _instructions(file: Path, ref: contract.InstructionsRef | None) -> str:
    """The instructions the operator projected next to agent.json (spec.instructionsFrom)."""
    source = f"key {ref.key!r} of ConfigMap {ref.name!r}" if ref else "spec.instructionsFrom"
    try:
        return file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"{file} does not exist: the agent's instructions ({source}) are mounted there "
            "by the operator; is the pod's config volume the one the operator renders?"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ConfigError(f"{file} ({source}) cannot be read: {reason}") from None
