"""The agent's rendered configuration (``agent.json``), as the runtime reads it.

The operator writes it into the agent's ConfigMap (`rendered_config` in
`bmad_operator.builders.agent`): the Agent's spec minus credentials. Unknown keys are
ignored so that a newer operator does not break an older runtime; the values the
runtime relies on are validated here, and a broken file is an error that names it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pydantic
import pydantic.alias_generators

from bmad_crds.v1alpha1 import agent as agent_api


class ConfigError(ValueError):
    """agent.json is missing or does not describe a usable agent."""


class _Model(pydantic.BaseModel):
    model_config = pydantic.ConfigDict(
        alias_generator=pydantic.alias_generators.to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        # The operator writes `"instructionsFrom": null` and may write other nulls:
        # a null means "not given", which is the field's default.
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data


class Persona(_Model):
    name: str | None = None
    title: str | None = None
    style: str | None = None
    identity: str | None = None
    focus: str | None = None


class ModelRef(_Model):
    """One model of the chain: the primary or a fallback."""

    provider: agent_api.ModelProvider
    name: str = pydantic.Field(min_length=1)
    integration: str | None = None


class ModelConfig(ModelRef):
    params: dict[str, Any] = pydantic.Field(default_factory=dict)
    fallbacks: list[ModelRef] = pydantic.Field(default_factory=list)
    context_window: int | None = pydantic.Field(default=None, gt=0)

    @property
    def chain(self) -> list[ModelRef]:
        """The primary, then the fallbacks, in the order they are tried."""
        primary = ModelRef(provider=self.provider, name=self.name, integration=self.integration)
        return [primary, *self.fallbacks]


class Limits(_Model):
    requests_per_minute: int | None = pydantic.Field(default=None, ge=1)
    tokens_per_minute: int | None = pydantic.Field(default=None, ge=1)
    concurrency: int | None = pydantic.Field(default=None, ge=1)


class Memory(_Model):
    turns: int = pydantic.Field(default=20, ge=0)
    ttl_seconds: int = pydantic.Field(default=86400, ge=1)


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


class AgentConfig(_Model):
    agent: str = "agent"
    namespace: str = "default"
    role: str = "custom"
    persona: Persona = pydantic.Field(default_factory=Persona)
    instructions: str = ""
    model: ModelConfig
    limits: Limits = pydantic.Field(default_factory=Limits)
    memory: Memory = pydantic.Field(default_factory=Memory)
    integrations: list[str] = pydantic.Field(default_factory=list)
    binding_root: str | None = None

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
    """Read and validate agent.json (``$BMAD_AGENT_CONFIG``)."""
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
    return parse(data, source=str(path))
