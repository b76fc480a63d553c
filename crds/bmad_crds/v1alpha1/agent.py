"""The Agent kind: one BMAD agent role (analyst, pm, dev, ...) run as a workload.

An Agent says who the agent is (role, persona, instructions), which model it talks to
(with fallbacks), which Integrations it is bound to, and how it runs and scales. The
operator renders it into a ServiceAccount, a ConfigMap, a Deployment, a Service and a
PodDisruptionBudget; ``spec.replicas`` is exposed through the scale subresource so
``kubectl scale``, an HPA, KEDA or the operator's own autoscaler can drive it.
"""

from __future__ import annotations

import datetime
import typing
from typing import Literal

import pydantic

from bmad_crds.v1alpha1 import common

Role = Literal[
    "analyst",
    "pm",
    "architect",
    "ux-expert",
    "po",
    "sm",
    "dev",
    "qa",
    "bmad-master",
    "bmad-orchestrator",
    "custom",
]
ROLES: tuple[Role, ...] = typing.get_args(Role)

ModelProvider = Literal["openai", "anthropic", "openai-compatible", "echo"]
MODEL_PROVIDERS: tuple[ModelProvider, ...] = typing.get_args(ModelProvider)

MetricType = Literal["queueDepth", "inflight", "promql"]
# Where conversations are kept: PostgreSQL and Redis (durable), or the pod's memory.
MemoryStore = Literal["durable", "inProcess"]
MEMORY_STORES: tuple[MemoryStore, ...] = typing.get_args(MemoryStore)
DEFAULT_MEMORY_STORE: MemoryStore = "durable"
ImagePullPolicy = Literal["Always", "IfNotPresent", "Never"]

# Owned objects are named after the Agent, with suffixes; pods add their own hashes.
NAME_MAX_LENGTH = 52

MAX_INTEGRATIONS = 32
MAX_FALLBACKS = 8
MAX_METRICS = 8
MAX_ENV = 64


def _provider_needs_integration(where: str) -> common.Rule:
    return common.Rule(
        rule="self.provider != 'openai-compatible' || has(self.integration)",
        message=(
            f"{where}.integration is required when {where}.provider is 'openai-compatible': "
            "name the llm Integration that holds the endpoint's baseUrl"
        ),
        check=lambda model: model.provider != "openai-compatible" or model.integration is not None,
        field_path=".integration",
        reason="FieldValueRequired",
    )


class Persona(common.SpecModel):
    """Who the agent is, in BMAD's persona terms; rendered into its system prompt."""

    name: common.ShortText | None = pydantic.Field(
        default=None, description='Name the agent goes by, for example "Mary".'
    )
    title: common.ShortText | None = pydantic.Field(
        default=None, description='Job title, for example "Business Analyst".'
    )
    style: common.Text | None = pydantic.Field(
        default=None, description="How the agent communicates: tone, manner, habits."
    )
    identity: common.Text | None = pydantic.Field(
        default=None, description="What the agent is an expert in, in one or two sentences."
    )
    focus: common.Text | None = pydantic.Field(
        default=None, description="What the agent concentrates on and produces."
    )


class ModelFallback(common.SpecModel):
    """A model to use when the primary model fails or is rate limited."""

    __cel_rules__ = (_provider_needs_integration("spec.model.fallbacks[]"),)

    provider: ModelProvider = pydantic.Field(
        description="LLM provider: openai, anthropic, openai-compatible or echo (tests, demos)."
    )
    name: common.ShortText = pydantic.Field(
        description='Model name as the provider knows it, for example "gpt-4o-mini".'
    )
    integration: common.DnsLabel | None = pydantic.Field(
        default=None,
        description=(
            "Name of an Integration of type llm in the same namespace that holds the "
            "endpoint and the API key. Required for openai-compatible."
        ),
    )


class Model(common.SpecModel):
    """The LLM the agent talks to."""

    __cel_rules__ = (_provider_needs_integration("spec.model"),)

    provider: ModelProvider = pydantic.Field(
        description=(
            "LLM provider: openai, anthropic, openai-compatible (any endpoint speaking the "
            "OpenAI API) or echo (deterministic, for tests and demos)."
        )
    )
    name: common.ShortText = pydantic.Field(
        description='Model name as the provider knows it, for example "claude-sonnet-4-5".'
    )
    params: common.FreeForm | None = pydantic.Field(
        default=None,
        description=(
            "Provider parameters passed through as given, for example temperature: 0.2, "
            "maxTokens: 4096."
        ),
    )
    integration: common.DnsLabel | None = pydantic.Field(
        default=None,
        description=(
            "Name of an Integration of type llm in the same namespace that holds the "
            "endpoint and the API key. Required for openai-compatible; optional for "
            "openai and anthropic (default endpoint, key from that Integration)."
        ),
    )
    fallbacks: list[ModelFallback] | None = pydantic.Field(
        default=None,
        max_length=MAX_FALLBACKS,
        description="Models to try, in order, when this one fails or is rate limited.",
    )
    context_window: int | None = pydantic.Field(
        default=None,
        gt=0,
        description=(
            "Context window of the model in tokens. The runtime trims context to fit; "
            "when omitted, the runtime's known value for the model."
        ),
    )


class AutoscalingMetric(common.SpecModel):
    """One signal the autoscaler scales on."""

    __cel_rules__ = (
        common.Rule(
            rule="has(self.query) == (self.type == 'promql')",
            message=(
                "spec.autoscaling.metrics[].query is required when type is 'promql' and "
                "not allowed for the other types: set type: promql or remove query"
            ),
            check=lambda metric: (metric.query is not None) == (metric.type == "promql"),
            field_path=".query",
        ),
    )

    type: MetricType = pydantic.Field(
        description=(
            "queueDepth: pending tasks on the agent's stream per replica; inflight: "
            "requests being served per replica; promql: the value of query per replica."
        )
    )
    target: float = pydantic.Field(
        gt=0,
        description="Value of the metric per replica the autoscaler aims for.",
    )
    query: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="PromQL query returning one number; only for type promql.",
    )


class Autoscaling(common.SpecModel):
    """How the operator scales the agent from Prometheus metrics (HPA algorithm)."""

    __cel_rules__ = (
        common.Rule(
            rule=(
                "!has(self.minReplicas) || !has(self.maxReplicas) "
                "|| self.minReplicas <= self.maxReplicas"
            ),
            message=(
                "spec.autoscaling.minReplicas must not exceed spec.autoscaling.maxReplicas: "
                "lower minReplicas or raise maxReplicas"
            ),
            check=lambda a: a.max_replicas is None or a.min_replicas <= a.max_replicas,
            field_path=".minReplicas",
        ),
        common.Rule(
            rule="!has(self.enabled) || !self.enabled || has(self.maxReplicas)",
            message=(
                "spec.autoscaling.maxReplicas is required when spec.autoscaling.enabled is "
                "true: set the most replicas the autoscaler may run"
            ),
            check=lambda a: not a.enabled or a.max_replicas is not None,
            field_path=".maxReplicas",
            reason="FieldValueRequired",
        ),
    )

    enabled: bool = pydantic.Field(
        default=False,
        description=(
            "Whether the operator scales the agent. When false, spec.replicas is left to "
            "you (or to an HPA/KEDA through the scale subresource)."
        ),
    )
    min_replicas: int = pydantic.Field(
        default=1, ge=0, description="Fewest replicas while there is work."
    )
    max_replicas: int | None = pydantic.Field(
        default=None, ge=1, description="Most replicas. Required when enabled."
    )
    metrics: list[AutoscalingMetric] | None = pydantic.Field(
        default=None,
        max_length=MAX_METRICS,
        description=(
            "Signals to scale on; the largest desired count wins. "
            "When omitted: queueDepth with target 5."
        ),
    )
    scale_to_zero: bool = pydantic.Field(
        default=False,
        description=(
            "Scale to zero replicas when there has been no work for the scale-down "
            "stabilization window, and back to at least one on the first queued task."
        ),
    )
    scale_up_stabilization_window_seconds: int = pydantic.Field(
        default=0,
        ge=0,
        le=3600,
        description="Seconds of recommendations to consider before scaling up (the lowest wins).",
    )
    scale_down_stabilization_window_seconds: int = pydantic.Field(
        default=300,
        ge=0,
        le=3600,
        description=(
            "Seconds of recommendations to consider before scaling down (the highest wins)."
        ),
    )
    polling_interval_seconds: int = pydantic.Field(
        default=30, ge=1, le=3600, description="Seconds between two evaluations of the metrics."
    )


class Limits(common.SpecModel):
    """Rate and concurrency limits of one agent, across all its replicas."""

    requests_per_minute: int | None = pydantic.Field(
        default=None, ge=1, description="Most requests the agent accepts per minute."
    )
    tokens_per_minute: int | None = pydantic.Field(
        default=None, ge=1, description="Most LLM tokens (in + out) the agent spends per minute."
    )
    concurrency: int | None = pydantic.Field(
        default=None, ge=1, description="Most requests or tasks one replica handles at once."
    )


class Memory(common.SpecModel):
    """How much conversation the agent remembers, and where it keeps it."""

    store: MemoryStore = pydantic.Field(
        default=DEFAULT_MEMORY_STORE,
        description=(
            "Where conversations, usage records and the audit log are kept. durable: "
            "PostgreSQL and Redis, from Integrations of type postgres and redis in "
            "spec.integrations; the agent is not ready until both are bound. inProcess: "
            "in each replica's memory only, lost on restart and not shared between "
            "replicas (demos and trials without datastores)."
        ),
    )

    turns: int = pydantic.Field(
        default=20,
        ge=0,
        le=10000,
        description="Conversation turns kept in context; 0 makes the agent stateless.",
    )
    ttl_seconds: int = pydantic.Field(
        default=86400,
        ge=1,
        le=31536000,
        description="Seconds an idle conversation is kept before it is forgotten.",
    )


class EnvVarSource(common.SpecModel):
    """Where an environment variable's value comes from."""

    __cel_rules__ = (
        common.Rule(
            rule="has(self.secretKeyRef) != has(self.configMapKeyRef)",
            message=(
                "spec.runtime.env[].valueFrom needs exactly one of secretKeyRef and configMapKeyRef"
            ),
            check=lambda src: (src.secret_key_ref is None) != (src.config_map_key_ref is None),
        ),
    )

    secret_key_ref: common.SecretKeyRef | None = pydantic.Field(
        default=None, description="A key of a Secret in the same namespace."
    )
    config_map_key_ref: common.ConfigMapKeyRef | None = pydantic.Field(
        default=None, description="A key of a ConfigMap in the same namespace."
    )


class EnvVar(common.SpecModel):
    """An environment variable of the agent container."""

    __cel_rules__ = (
        common.Rule(
            rule="!(has(self.value) && has(self.valueFrom))",
            message="spec.runtime.env[] may set value or valueFrom, not both: remove one",
            check=lambda env: env.value is None or env.value_from is None,
        ),
    )

    name: str = pydantic.Field(
        min_length=1,
        max_length=256,
        pattern=common.ENV_VAR_NAME_PATTERN,
        description="Name of the variable.",
    )
    value: str | None = pydantic.Field(
        default=None, max_length=32768, description="Literal value. Never put credentials here."
    )
    value_from: EnvVarSource | None = pydantic.Field(
        default=None, description="Take the value from a Secret or a ConfigMap key."
    )


class Runtime(common.SpecModel):
    """How the agent-runtime container runs."""

    image: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=512,
        description="Container image of the agent runtime; the operator's default when omitted.",
    )
    image_pull_policy: ImagePullPolicy | None = pydantic.Field(
        default=None, description="Always, IfNotPresent or Never, as in a Pod spec."
    )
    env: list[EnvVar] | None = pydantic.Field(
        default=None,
        max_length=MAX_ENV,
        description="Extra environment variables of the agent container.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
    service_account_name: common.DnsSubdomain | None = pydantic.Field(
        default=None,
        description=(
            "ServiceAccount the pods run as. When omitted, the operator creates one "
            "named after the Agent."
        ),
    )

    @pydantic.field_validator("env")
    @classmethod
    def _env_names_unique(cls, env: list[EnvVar] | None) -> list[EnvVar] | None:
        if env is not None:
            common.unique([var.name for var in env], field="spec.runtime.env[].name")
        return env


class AgentSpec(common.SpecModel):
    """Desired state of an Agent."""

    __cel_rules__ = (
        common.Rule(
            rule="!(has(self.instructions) && has(self.instructionsFrom))",
            message=(
                "spec.instructions and spec.instructionsFrom are mutually exclusive: "
                "keep one of them"
            ),
            check=lambda spec: spec.instructions is None or spec.instructions_from is None,
            field_path=".instructionsFrom",
            reason="FieldValueForbidden",
        ),
        common.Rule(
            rule=("self.role != 'custom' || has(self.instructions) || has(self.instructionsFrom)"),
            message=(
                "spec.instructions or spec.instructionsFrom is required when spec.role is "
                "'custom': a custom agent has no built-in BMAD instructions"
            ),
            check=lambda spec: (
                spec.role != "custom"
                or spec.instructions is not None
                or spec.instructions_from is not None
            ),
            field_path=".instructions",
            reason="FieldValueRequired",
        ),
    )

    role: Role = pydantic.Field(
        description=(
            "BMAD role of the agent: analyst, pm, architect, ux-expert, po, sm, dev, qa, "
            "bmad-master, bmad-orchestrator, or custom (then instructions are required)."
        )
    )
    persona: Persona | None = pydantic.Field(
        default=None,
        description="Persona of the agent; the role's BMAD persona when omitted.",
    )
    instructions: str | None = pydantic.Field(
        default=None,
        max_length=131072,
        description=(
            "Instructions (system prompt) of the agent, in Markdown. "
            "Mutually exclusive with instructionsFrom."
        ),
    )
    instructions_from: common.ConfigMapKeyRef | None = pydantic.Field(
        default=None,
        description=(
            "Take the instructions from a ConfigMap key (for long or shared prompts). "
            "Mutually exclusive with instructions."
        ),
    )
    model: Model = pydantic.Field(description="The LLM the agent talks to.")
    integrations: list[common.DnsLabel] | None = pydantic.Field(
        default=None,
        max_length=MAX_INTEGRATIONS,
        description=(
            "Names of Integrations in the same namespace to bind: their binding Secrets "
            "are mounted under $SERVICE_BINDING_ROOT/<name>/."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    replicas: int = pydantic.Field(
        default=1,
        ge=0,
        description=(
            "Number of agent pods. Written by the autoscaler when spec.autoscaling.enabled; "
            "also settable with kubectl scale."
        ),
    )
    autoscaling: Autoscaling | None = pydantic.Field(
        default=None, description="Scale the agent from its workload."
    )
    limits: Limits | None = pydantic.Field(default=None, description="Rate and concurrency limits.")
    memory: Memory | None = pydantic.Field(
        default=None, description="Conversation memory of the agent."
    )
    resources: common.ResourceRequirements | None = pydantic.Field(
        default=None, description="CPU and memory of the agent container."
    )
    runtime: Runtime | None = pydantic.Field(
        default=None, description="Image, environment and identity of the agent pods."
    )
    paused: bool = pydantic.Field(
        default=False,
        description="Stop all pods of the agent (replicas go to 0) without deleting anything.",
    )

    @pydantic.field_validator("integrations")
    @classmethod
    def _integrations_unique(cls, names: list[str] | None) -> list[str] | None:
        if names is not None:
            common.unique(names, field="spec.integrations")
        return names


class AutoscalingStatus(common.StatusModel):
    """What the autoscaler last saw and decided."""

    last_scale_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the autoscaler last changed spec.replicas."
    )
    current_metric_value: float | None = pydantic.Field(
        default=None,
        description="Last value per replica of the metric that decided the count.",
    )
    desired_replicas: int | None = pydantic.Field(
        default=None, ge=0, description="Replica count the autoscaler last computed."
    )


class AgentStatus(common.StatusModel):
    """Observed state of an Agent."""

    observed_generation: int | None = common.observed_generation_field()
    replicas: int | None = pydantic.Field(
        default=None, ge=0, description="Agent pods that exist (the scale subresource reads it)."
    )
    ready_replicas: int | None = pydantic.Field(
        default=None, ge=0, description="Agent pods that are ready to serve."
    )
    desired_replicas: int | None = pydantic.Field(
        default=None,
        ge=0,
        description="Agent pods the operator wants: spec.replicas, or 0 while paused.",
    )
    selector: str | None = pydantic.Field(
        default=None,
        description="Label selector of the agent pods, for the scale subresource (HPA, KEDA).",
    )
    endpoint: str | None = pydantic.Field(
        default=None, description="In-cluster URL of the agent's HTTP API."
    )
    autoscaling: AutoscalingStatus | None = pydantic.Field(
        default=None, description="State of the autoscaler."
    )
    conditions: list[common.Condition] = common.conditions_field()


class Agent(common.Resource):
    """An AI agent with a BMAD role, run as a scalable workload."""

    __cel_rules__ = (
        common.name_rule(
            max_length=NAME_MAX_LENGTH,
            why="an Agent's Deployment, Service and ConfigMap are named after it",
        ),
    )

    kind: Literal["Agent"] = pydantic.Field(default="Agent", description="Agent.")
    spec: AgentSpec = pydantic.Field(description="Desired state of the agent.")
    status: AgentStatus | None = pydantic.Field(
        default=None, description="Observed state of the agent, written by the operator."
    )


KIND = common.Kind(
    kind="Agent",
    plural="agents",
    singular="agent",
    short_names=("bag",),
    scope="Namespaced",
    scale=True,
    printer_columns=(
        common.PrinterColumn(
            name="Role", type="string", json_path=".spec.role", description="BMAD role."
        ),
        common.PrinterColumn(
            name="Model", type="string", json_path=".spec.model.name", description="Model name."
        ),
        common.PrinterColumn(
            name="Ready-Replicas",
            type="integer",
            json_path=".status.readyReplicas",
            description="Agent pods ready to serve.",
        ),
        common.PrinterColumn(
            name="Desired",
            type="integer",
            json_path=".spec.replicas",
            description="Agent pods wanted (spec.replicas).",
        ),
        *common.ready_columns(reason_priority=1),
        common.AGE_COLUMN,
    ),
)
