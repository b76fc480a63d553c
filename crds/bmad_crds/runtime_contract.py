"""The contract between the operator and the agent runtime: what one renders, the other reads.

The operator turns an Agent into a pod (`bmad_operator.builders.agent`); the runtime
in that pod (`bmad_runtime.settings`, `.config`, `.bindings`) reads what the pod was
given. Both import this module, so a name, a path or a field changed on one side only
fails a unit test (`tests/unit/operator/test_runtime_contract.py`), not a user.

What travels where, and why:

* **The environment** (the Deployment's pod template) carries the agent's identity
  (name, namespace, role, tenant) and where to find the rest. Tenant admins may read
  the Deployment but not change it, so this is where anything that decides whose
  data, streams and rate limits the agent uses belongs. The runtime reads these
  names exactly as written here (`EnvSettings`), and the Agent API refuses every
  reserved name in ``spec.runtime.env``, in any case
  (`bmad_crds.v1alpha1.agent.is_reserved_env`).
* **agent.json** (the key of the Agent's ConfigMap, mounted at `CONFIG_PATH`) carries
  what the agent does: persona, instructions, model chain, limits, memory. Tenant
  admins can edit ConfigMaps in their namespaces, so nothing in agent.json may decide
  identity or authentication; its ``agent`` and ``namespace`` are informational.
* **Next to agent.json**: the value of ``spec.instructionsFrom`` (a key of the user's
  ConfigMap), projected into the same directory as `INSTRUCTIONS_FILE` and named by
  agent.json's ``instructionsFile``.
* **The bindings** of ``spec.integrations``, one directory per Integration under
  `BINDING_ROOT` (servicebinding.io; the keys are `bmad_integrations.binding`'s).
* **Writable directories**: the root filesystem is read-only; `WRITABLE_DIRS` are
  the pod's own emptyDirs.

The identity in the task bus, the conversation store and the rate limiter is the
pair (tenant, `agent_key`): the tenant is the Tenant owning the namespace (or the
namespace when none does), so one Tenant's namespaces share its budgets and usage.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Self

import pydantic
import pydantic.alias_generators

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_crds.v1alpha1 import common

API_VERSION = common.API_VERSION
KIND: Literal["AgentConfig"] = "AgentConfig"

# --- where things are mounted in the agent container ---------------------------------
CONFIG_DIR = "/etc/bmad"
CONFIG_FILE = "agent.json"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_FILE}"
INSTRUCTIONS_FILE = "instructions.md"
"""spec.instructionsFrom's value, projected next to agent.json under this name."""
BINDING_ROOT = "/bindings"
TMP_DIR = "/tmp"  # noqa: S108 - the pod's own emptyDir
WRITABLE_DIRS: tuple[str, ...] = (TMP_DIR,)
HTTP_PORT = 8080

# --- the environment the operator sets -------------------------------------------------
AGENT_NAME = "BMAD_AGENT_NAME"
AGENT_NAMESPACE = "BMAD_AGENT_NAMESPACE"
AGENT_ROLE = "BMAD_AGENT_ROLE"
TENANT = "BMAD_TENANT"
AGENT_CONFIG = "BMAD_AGENT_CONFIG"
SERVICE_BINDING_ROOT = "SERVICE_BINDING_ROOT"
HTTP_PORT_ENV = "BMAD_HTTP_PORT"
MEMORY_STORE = "BMAD_MEMORY_STORE"
AUTH_MODE = "BMAD_AUTH_MODE"
"""The Agent's spec.auth.mode: jwt (the default) or none, chosen in the spec only."""
AUTH_ENABLED = "BMAD_AUTH_ENABLED"
"""No longer read (spec.auth.mode replaced it); reserved so that no Agent spec can set it."""

USAGE_LEDGER_URL = "BMAD_USAGE_LEDGER_URL"
"""The platform Redis of the usage ledger (docs/billing.md), without credentials. Set
only when the operator meters usage; the runtime then writes one record per model call
there, as the ACL user `bmad_integrations.usage.record.acl_user` of the agent."""
USAGE_LEDGER_PASSWORD = "BMAD_USAGE_LEDGER_PASSWORD"  # noqa: S105 - a variable's name
"""That user's password, from the key `USAGE_SECRET_KEY` of the Secret
`usage_secret_name` (the operator's, owned by the Agent): never a literal value."""
USAGE_LEDGER_SPOOL = "BMAD_USAGE_LEDGER_SPOOL"
"""Where the runtime keeps each usage record before its answer leaves and ships it from
(`bmad_integrations.usage.spool`): `USAGE_SPOOL_DIR`, a memory-backed emptyDir of the
pod's own (`USAGE_SPOOL_VOLUME`, at most `USAGE_SPOOL_SIZE_LIMIT`), which outlives a
restart of the container and, being memory, is never written back to a disk on the
answer's path. Set with `USAGE_LEDGER_URL` unless the operator's
``BMAD_OPERATOR_USAGE_SPOOL`` is false."""
USAGE_SPOOL_DIR = "/run/bmad/usage-ledger"
USAGE_SPOOL_VOLUME = "usage-spool"
USAGE_SPOOL_SIZE_LIMIT = "80Mi"  # two segments of 32 MiB (`spool.DEFAULT_SEGMENT_BYTES`)
USAGE_SECRET_KEY = "password"  # noqa: S105 - a Secret's key name
USAGE_SECRET_SUFFIX = "-usage-ledger"  # noqa: S105 - a name suffix

IDENTITY_ENV: tuple[str, ...] = (AGENT_NAME, AGENT_NAMESPACE, AGENT_ROLE, TENANT)
PATH_ENV: tuple[str, ...] = (AGENT_CONFIG, SERVICE_BINDING_ROOT, USAGE_LEDGER_SPOOL)
"""The variables whose values are paths inside the container."""


def is_reserved_env(name: str) -> bool:
    """Whether ``name`` is the operator's to set, in any case (the Agent API's rule)."""
    return agent_api.is_reserved_env(name)


def usage_secret_name(agent: str) -> str:
    """The Secret holding the agent's ledger writer password, in the agent's namespace."""
    return agent + USAGE_SECRET_SUFFIX


def agent_key(*, name: str, namespace: str, tenant: str | None) -> str:
    """The agent's name in its tenant's key space (bus streams, conversations, limits).

    A Tenant spans namespaces, and Agents in two of them may share a name: then the
    namespace qualifies it (``<namespace>.<name>``; neither holds a dot). An agent
    whose tenant is its namespace keeps its plain name.
    """
    if tenant is None or tenant == namespace:
        return name
    return f"{namespace}.{name}"


class PodEnvironment(pydantic.BaseModel):
    """The variables the operator sets on the agent container, as typed values."""

    model_config = pydantic.ConfigDict(frozen=True, extra="forbid")

    agent_name: str = pydantic.Field(min_length=1)
    agent_namespace: str = pydantic.Field(min_length=1)
    agent_role: str = pydantic.Field(min_length=1)
    tenant: str = pydantic.Field(min_length=1)
    agent_config: str = CONFIG_PATH
    binding_root: str = BINDING_ROOT
    http_port: int = HTTP_PORT
    memory_store: agent_api.MemoryStore = agent_api.DEFAULT_MEMORY_STORE
    auth_mode: agent_api.AuthMode = agent_api.DEFAULT_AUTH_MODE
    usage_ledger_url: str | None = None
    usage_spool: bool = True

    def env(self) -> list[dict[str, Any]]:
        """The container's ``env`` entries, in a stable order."""
        values: dict[str, str] = {
            AGENT_NAME: self.agent_name,
            AGENT_NAMESPACE: self.agent_namespace,
            AGENT_ROLE: self.agent_role,
            TENANT: self.tenant,
            AGENT_CONFIG: self.agent_config,
            SERVICE_BINDING_ROOT: self.binding_root,
            HTTP_PORT_ENV: str(self.http_port),
            MEMORY_STORE: self.memory_store,
            AUTH_MODE: self.auth_mode,
        }
        env: list[dict[str, Any]] = [
            {"name": name, "value": value} for name, value in values.items()
        ]
        if self.usage_ledger_url:
            env.append({"name": USAGE_LEDGER_URL, "value": self.usage_ledger_url})
            if self.usage_spool:
                env.append({"name": USAGE_LEDGER_SPOOL, "value": USAGE_SPOOL_DIR})
            env.append(
                {
                    "name": USAGE_LEDGER_PASSWORD,
                    "valueFrom": {
                        "secretKeyRef": {
                            "name": usage_secret_name(self.agent_name),
                            "key": USAGE_SECRET_KEY,
                        }
                    },
                }
            )
        return env


# --- agent.json ---------------------------------------------------------------------
_FILE_NAME = re.compile(r"[A-Za-z0-9_][-._A-Za-z0-9]*")


class _Model(pydantic.BaseModel):
    """agent.json's models: camelCase in the file, unknown keys ignored (a newer
    operator must not break an older runtime), a null meaning "not given"."""

    model_config = pydantic.ConfigDict(
        alias_generator=pydantic.alias_generators.to_camel,
        populate_by_name=True,
        extra="ignore",
        frozen=True,
    )

    @pydantic.model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
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


class InstructionsRef(_Model):
    """Where spec.instructionsFrom points: for messages, the value is in the file."""

    name: str
    key: str


class AgentConfig(_Model):
    """agent.json: what the agent does. Never its identity (see the module docstring)."""

    api_version: str = API_VERSION
    kind: Literal["AgentConfig"] = KIND
    agent: str = "agent"
    namespace: str = "default"
    role: str = "custom"
    persona: Persona = pydantic.Field(default_factory=Persona)
    instructions: str = ""
    instructions_from: InstructionsRef | None = None
    instructions_file: str | None = pydantic.Field(
        default=None,
        description="A file next to agent.json holding the instructions (instructionsFrom).",
    )
    model: ModelConfig
    limits: Limits = pydantic.Field(default_factory=Limits)
    memory: Memory = pydantic.Field(default_factory=Memory)
    integrations: list[str] = pydantic.Field(default_factory=list)
    binding_root: str | None = None

    @pydantic.field_validator("instructions_file")
    @classmethod
    def _a_name_in_the_config_directory(cls, value: str | None) -> str | None:
        # A file name only: agent.json sits in a ConfigMap tenants may edit, and must
        # not make the runtime read anything outside its own config directory.
        if value is not None and not _FILE_NAME.fullmatch(value):
            raise ValueError(f"{value!r} must be a file name in agent.json's directory")
        return value

    @pydantic.model_validator(mode="after")
    def _one_source_of_instructions(self) -> Self:
        if self.instructions and self.instructions_file:
            raise ValueError("instructions and instructionsFile are mutually exclusive")
        return self

    def rendered(self) -> dict[str, Any]:
        """The JSON object written into the ConfigMap (camelCase, nothing null)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def agent_config(*, agent: str, namespace: str, spec: agent_api.AgentSpec) -> AgentConfig:
    """agent.json of an Agent: its spec minus what only the operator acts on."""
    model = spec.model.model_dump(mode="json", by_alias=True, exclude_none=True)
    ref = spec.instructions_from
    return AgentConfig(
        agent=agent,
        namespace=namespace,
        role=spec.role,
        persona=Persona.model_validate(
            spec.persona.model_dump(mode="json", by_alias=True) if spec.persona else {}
        ),
        instructions=spec.instructions or "",
        instructions_from=InstructionsRef(name=ref.name, key=ref.key) if ref else None,
        instructions_file=INSTRUCTIONS_FILE if ref else None,
        model=ModelConfig.model_validate(model),
        limits=Limits.model_validate(
            spec.limits.model_dump(mode="json", by_alias=True) if spec.limits else {}
        ),
        memory=Memory.model_validate(
            spec.memory.model_dump(mode="json", by_alias=True) if spec.memory else {}
        ),
        integrations=list(spec.integrations or []),
        binding_root=BINDING_ROOT,
    )


# Every field of the Agent's spec, and where it goes: a field added to the API must be
# placed here, or the contract test fails.
SPEC_FIELDS_IN_AGENT_JSON: frozenset[str] = frozenset(
    {
        "role",
        "persona",
        "instructions",
        "instructions_from",
        "model",
        "limits",
        "memory",
        "integrations",
    }
)
SPEC_FIELDS_OF_THE_OPERATOR: frozenset[str] = frozenset(
    {"replicas", "autoscaling", "resources", "runtime", "paused", "auth"}
)
"""Acted on by the operator (the Deployment, the scaler, the pod's environment); the
runtime reads none of them from agent.json. ``memory.store`` also travels as
`MEMORY_STORE`, ``auth.mode`` only as `AUTH_MODE`."""
