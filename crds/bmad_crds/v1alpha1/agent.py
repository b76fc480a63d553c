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

MetricType = Literal["queueDepth", "inflight", "tokensPerMinute", "promql"]
METRIC_TYPES: tuple[MetricType, ...] = typing.get_args(MetricType)
ScalingPolicyType = Literal["Pods", "Percent"]
SelectPolicy = Literal["Max", "Min", "Disabled"]
AutoscalingEngine = Literal["operator", "keda"]
# Where conversations are kept: PostgreSQL and Redis (durable), or the pod's memory.
MemoryStore = Literal["durable", "inProcess"]
MEMORY_STORES: tuple[MemoryStore, ...] = typing.get_args(MemoryStore)
DEFAULT_MEMORY_STORE: MemoryStore = "durable"
# Who may call the agent's HTTP API: holders of a JWT of its auth0 Integration, or anyone.
AuthMode = Literal["jwt", "none"]
AUTH_MODES: tuple[AuthMode, ...] = typing.get_args(AuthMode)
DEFAULT_AUTH_MODE: AuthMode = "jwt"
ImagePullPolicy = Literal["Always", "IfNotPresent", "Never"]

# Owned objects are named after the Agent, with suffixes; pods add their own hashes.
NAME_MAX_LENGTH = 52

MAX_INTEGRATIONS = 32
MAX_FALLBACKS = 8
MAX_METRICS = 8
MAX_SCALING_POLICIES = 8
# The most pods one Agent may ask for (spec.replicas, the autoscaler's bounds): a typo
# such as 100000 is refused by the API server instead of flooding the scheduler.
MAX_REPLICAS = 500

# Autoscaling defaults that depend on other fields, so the schema cannot hold them.
DEFAULT_SCALE_UP_WINDOW_SECONDS = 0
DEFAULT_SCALE_DOWN_WINDOW_SECONDS = 300
DEFAULT_IDLE_SECONDS = 300
DEFAULT_ACTIVATION_THRESHOLD = 0
DEFAULT_QUEUE_DEPTH_TARGET = 5.0
MAX_ENV = 64

# The agent runtime's own environment: the operator alone sets it (the agent's
# identity, tenant, auth and mounts; see `bmad_crds.runtime_contract`). The runtime
# reads BMAD_* names, and pydantic-settings would read them in any case, so a name is
# reserved whatever its case.
RESERVED_ENV_PREFIX = "BMAD_"
RESERVED_ENV_NAMES: tuple[str, ...] = ("SERVICE_BINDING_ROOT",)


def is_reserved_env(name: str) -> bool:
    """Whether an environment variable of the agent container is the operator's to set.

    Compares in upper case, as CEL's ``upperAscii`` does (names are ASCII: see
    `common.ENV_VAR_NAME_PATTERN`).
    """
    upper = name.upper()
    return upper.startswith(RESERVED_ENV_PREFIX) or upper in RESERVED_ENV_NAMES


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
    """One signal the autoscaler scales on, with the value it aims for."""

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
        common.Rule(
            rule=(
                "self.type == 'promql' || "
                "(has(self.target) && !has(self.targetValue) && !has(self.targetAverageValue))"
            ),
            message=(
                "spec.autoscaling.metrics[].target is required for queueDepth, inflight and "
                "tokensPerMinute (the value per replica to aim for); targetValue and "
                "targetAverageValue are only for type promql"
            ),
            check=lambda metric: (
                metric.type == "promql"
                or (
                    metric.target is not None
                    and metric.target_value is None
                    and metric.target_average_value is None
                )
            ),
            field_path=".target",
        ),
        common.Rule(
            rule=(
                "self.type != 'promql' || [has(self.target), has(self.targetValue), "
                "has(self.targetAverageValue)].filter(x, x).size() == 1"
            ),
            message=(
                "spec.autoscaling.metrics[] of type promql needs exactly one target: "
                "targetValue (the query's value to aim for) or targetAverageValue (its value "
                "per replica; the older target means the same)"
            ),
            check=lambda metric: (
                metric.type != "promql"
                or sum(
                    value is not None
                    for value in (metric.target, metric.target_value, metric.target_average_value)
                )
                == 1
            ),
            field_path=".targetValue",
        ),
    )

    type: MetricType = pydantic.Field(
        description=(
            "queueDepth: tasks on the agent's stream (waiting or being worked on), per "
            "replica; inflight: invocations and tasks being served, per replica; "
            "tokensPerMinute: LLM tokens spent per minute, per replica; promql: the value "
            "of query."
        )
    )
    target: float | None = pydantic.Field(
        default=None,
        gt=0,
        description=(
            "Value of the metric per replica the autoscaler aims for: desired replicas = "
            "ceil(total / target). Required for queueDepth, inflight and tokensPerMinute; "
            "for promql the same as targetAverageValue."
        ),
    )
    query: str | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="PromQL query returning one number; only for type promql.",
    )
    target_value: float | None = pydantic.Field(
        default=None,
        gt=0,
        description=(
            "promql only: the value of query to aim for, whatever the replica count: "
            "desired replicas = ceil(current replicas * value / targetValue)."
        ),
    )
    target_average_value: float | None = pydantic.Field(
        default=None,
        gt=0,
        description=(
            "promql only: the value of query per replica to aim for: desired replicas = "
            "ceil(value / targetAverageValue)."
        ),
    )


class ScalingPolicy(common.SpecModel):
    """How fast the replica count may change within a period."""

    type: ScalingPolicyType = pydantic.Field(
        description=(
            "Pods: change by at most value replicas per period; Percent: by at most value "
            "percent of the replicas at the start of the period."
        )
    )
    value: int = pydantic.Field(
        ge=1, le=100000, description="Replicas (Pods) or percent (Percent) per period."
    )
    period_seconds: int = pydantic.Field(
        ge=1,
        le=1800,
        description="Length of the period in seconds; changes made in it count against value.",
    )


class ScalingRules(common.SpecModel):
    """Stabilization and rate limits of one scaling direction."""

    stabilization_window_seconds: int | None = pydantic.Field(
        default=None,
        ge=0,
        le=3600,
        description=(
            "Seconds of past recommendations to consider: scaling up takes the lowest of "
            "them, scaling down the highest, so a short spike or dip does not move the "
            "count. Default 0 for scaleUp, 300 for scaleDown."
        ),
    )
    policies: list[ScalingPolicy] | None = pydantic.Field(
        default=None,
        min_length=1,
        max_length=MAX_SCALING_POLICIES,
        description=(
            "Rate limits; selectPolicy says which one applies. Default for scaleUp: 100 "
            "percent or 4 pods per 15 s (the larger); for scaleDown: 100 percent per 15 s."
        ),
    )
    select_policy: SelectPolicy = pydantic.Field(
        default="Max",
        description=(
            "Max: the policy allowing the largest change applies; Min: the smallest; "
            "Disabled: never scale in this direction."
        ),
    )


class ScalingBehavior(common.SpecModel):
    """Scale-up and scale-down rules, as in a HorizontalPodAutoscaler's behavior."""

    scale_up: ScalingRules | None = pydantic.Field(
        default=None, description="Rules for adding replicas."
    )
    scale_down: ScalingRules | None = pydantic.Field(
        default=None, description="Rules for removing replicas."
    )


class PredictiveScaling(common.SpecModel):
    """Scale up ahead of a rising metric, from its recent trend (never down)."""

    enabled: bool = pydantic.Field(
        default=False,
        description=(
            "Forecast each metric leadSeconds ahead from a range query (a least-squares "
            "line over lookbackSeconds) and scale up early when the forecast needs more "
            "replicas. A forecast never scales down."
        ),
    )
    lookback_seconds: int = pydantic.Field(
        default=300,
        ge=30,
        le=3600,
        description="Seconds of metric history the forecast is fitted on.",
    )
    lead_seconds: int = pydantic.Field(
        default=60,
        ge=1,
        le=1800,
        description=(
            "How far ahead to forecast: about the seconds a new replica takes to become ready."
        ),
    )


def _scales_to_zero(a: Autoscaling) -> bool:
    return a.min_replicas == 0 or a.scale_to_zero


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
        common.Rule(
            rule=(
                "(!has(self.idleSeconds) && !has(self.activationThreshold)) "
                "|| (has(self.minReplicas) && self.minReplicas == 0) "
                "|| (has(self.scaleToZero) && self.scaleToZero)"
            ),
            message=(
                "spec.autoscaling.idleSeconds and activationThreshold apply only to an agent "
                "that scales to zero: set minReplicas: 0 or remove them"
            ),
            check=lambda a: (
                (a.idle_seconds is None and a.activation_threshold is None) or _scales_to_zero(a)
            ),
            field_path=".idleSeconds",
            reason="FieldValueForbidden",
        ),
        common.Rule(
            rule=(
                "!has(self.engine) || self.engine != 'keda' || !has(self.predictive) "
                "|| !self.predictive.enabled"
            ),
            message=(
                "spec.autoscaling.predictive is not available with engine keda (KEDA does not "
                "forecast): use engine operator or disable predictive"
            ),
            check=lambda a: a.engine != "keda" or a.predictive is None or not a.predictive.enabled,
            field_path=".predictive",
            reason="FieldValueForbidden",
        ),
    )

    enabled: bool = pydantic.Field(
        default=False,
        description=(
            "Whether the agent is autoscaled. When false, spec.replicas is left to you (or "
            "to an HPA/KEDA that you attach through the scale subresource). When true, "
            "another autoscaler targeting the agent is reported (ScalingActive=False, "
            "ConflictingScaler) and not fought."
        ),
    )
    engine: AutoscalingEngine = pydantic.Field(
        default="operator",
        description=(
            "operator: the operator evaluates the metrics every pollingIntervalSeconds and "
            "writes spec.replicas through the scale subresource; keda: the operator applies "
            "a KEDA ScaledObject with the same intent and KEDA scales (needs KEDA; without "
            "it ScalingActive=False with reason KEDANotInstalled)."
        ),
    )
    min_replicas: int = pydantic.Field(
        default=1,
        ge=0,
        le=MAX_REPLICAS,
        description=(
            "Fewest replicas. 0 lets the agent scale to zero after idleSeconds without "
            "work, and back to at least one when a task waits on its stream."
        ),
    )
    max_replicas: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=MAX_REPLICAS,
        description=f"Most replicas (at most {MAX_REPLICAS}). Required when enabled.",
    )
    metrics: list[AutoscalingMetric] | None = pydantic.Field(
        default=None,
        max_length=MAX_METRICS,
        description=(
            "Signals to scale on; the largest desired count wins. "
            "When omitted: queueDepth with target 5."
        ),
    )
    tolerance: float = pydantic.Field(
        default=0.1,
        ge=0,
        lt=1,
        description=(
            "No change while every metric is within this fraction of its target "
            "(0.1: between 90% and 110%), so small wobbles do not resize the agent."
        ),
    )
    behavior: ScalingBehavior | None = pydantic.Field(
        default=None,
        description=(
            "Stabilization windows and rate limits per direction, as in an HPA. "
            "Wins over the older scaleUp/scaleDownStabilizationWindowSeconds."
        ),
    )
    idle_seconds: int | None = pydantic.Field(
        default=None,
        ge=0,
        le=86400,
        description=(
            "Only when scaling to zero: seconds without queued or in-flight work before "
            "the agent goes to zero replicas. Default 300."
        ),
    )
    activation_threshold: int | None = pydantic.Field(
        default=None,
        ge=0,
        le=1000000,
        description=(
            "Only when scaling to zero: at zero replicas, the agent wakes when more than "
            "this many tasks wait on its stream. Default 0: the first task wakes it."
        ),
    )
    scale_to_zero: bool = pydantic.Field(
        default=False,
        description=(
            "Older spelling of scaling to zero: go to zero replicas after idleSeconds "
            "without work and keep at least minReplicas (at least one) while there is work."
        ),
    )
    scale_up_stabilization_window_seconds: int | None = pydantic.Field(
        default=None,
        ge=0,
        le=3600,
        description=(
            "Older spelling of behavior.scaleUp.stabilizationWindowSeconds, which wins "
            "when both are set."
        ),
    )
    scale_down_stabilization_window_seconds: int | None = pydantic.Field(
        default=None,
        ge=0,
        le=3600,
        description=(
            "Older spelling of behavior.scaleDown.stabilizationWindowSeconds, which wins "
            "when both are set."
        ),
    )
    polling_interval_seconds: int = pydantic.Field(
        default=5, ge=1, le=3600, description="Seconds between two evaluations of the metrics."
    )
    predictive: PredictiveScaling | None = pydantic.Field(
        default=None,
        description="Scale up ahead of a rising metric (off by default).",
    )

    def scales_to_zero(self) -> bool:
        """Whether the agent goes to zero replicas when idle (minReplicas 0 or scaleToZero)."""
        return _scales_to_zero(self)

    def stabilization_window_seconds(self, direction: Literal["up", "down"]) -> int:
        """The window in force: behavior's, else the older field's, else the default."""
        behavior = self.behavior or ScalingBehavior()
        if direction == "up":
            rules, older = behavior.scale_up, self.scale_up_stabilization_window_seconds
            default = DEFAULT_SCALE_UP_WINDOW_SECONDS
        else:
            rules, older = behavior.scale_down, self.scale_down_stabilization_window_seconds
            default = DEFAULT_SCALE_DOWN_WINDOW_SECONDS
        if rules is not None and rules.stabilization_window_seconds is not None:
            return rules.stabilization_window_seconds
        return default if older is None else older

    def effective_metrics(self) -> list[AutoscalingMetric]:
        """The metrics in force: the listed ones, or queue depth with target 5."""
        if self.metrics:
            return list(self.metrics)
        return [AutoscalingMetric(type="queueDepth", target=DEFAULT_QUEUE_DEPTH_TARGET)]


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


class Auth(common.SpecModel):
    """Who may call the agent's HTTP API (/v1/*)."""

    mode: AuthMode = pydantic.Field(
        default=DEFAULT_AUTH_MODE,
        description=(
            "jwt: callers present a Bearer JWT of the auth0 Integration in "
            "spec.integrations (the agent is not ready without one), and each caller sees "
            "its own conversations only. none: no authentication at all; every caller "
            "that reaches the agent's Service may invoke it and read and delete every "
            "conversation (demos and trials only)."
        ),
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
        common.Rule(
            rule=(
                f"!self.name.upperAscii().startsWith('{RESERVED_ENV_PREFIX}') && "
                + " && ".join(f"self.name.upperAscii() != '{n}'" for n in RESERVED_ENV_NAMES)
            ),
            message=(
                f"spec.runtime.env[].name must not start with {RESERVED_ENV_PREFIX} or be "
                f"{' or '.join(RESERVED_ENV_NAMES)}, in any case: the operator alone sets the "
                "agent runtime's own variables (its identity, tenant, authentication and "
                "mounts); rename or remove the variable"
            ),
            check=lambda env: not is_reserved_env(env.name),
            field_path=".name",
            reason="FieldValueForbidden",
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
        description=(
            "Extra environment variables of the agent container. Names starting with "
            "BMAD_ and SERVICE_BINDING_ROOT, in any case, are the operator's and refused."
        ),
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
        le=MAX_REPLICAS,
        description=(
            f"Number of agent pods, at most {MAX_REPLICAS} (also through kubectl scale). "
            "Written by the autoscaler when spec.autoscaling.enabled; "
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
    auth: Auth | None = pydantic.Field(
        default=None,
        description="Who may call the agent's HTTP API; a JWT of its auth0 Integration when "
        "omitted.",
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


class MetricStatus(common.StatusModel):
    """What the autoscaler last read for one metric and what it proposed from it."""

    type: str = pydantic.Field(description="Type of the metric, as in spec.autoscaling.metrics.")
    name: str | None = pydantic.Field(
        default=None, description='The metric in words, for example "queue depth".'
    )
    value: float | None = pydantic.Field(
        default=None,
        description="Last value read: the total over the agent for per-replica targets.",
    )
    average_value: float | None = pydantic.Field(
        default=None, description="The value per replica (for per-replica targets)."
    )
    target: float | None = pydantic.Field(default=None, description="The target aimed for.")
    target_type: str | None = pydantic.Field(
        default=None,
        description="AverageValue (target per replica) or Value (target for the whole query).",
    )
    desired_replicas: int | None = pydantic.Field(
        default=None, ge=0, description="Replicas this metric alone asks for."
    )
    forecast: float | None = pydantic.Field(
        default=None, description="Forecast value of the metric (predictive mode)."
    )
    error: str | None = pydantic.Field(
        default=None,
        description=(
            "Why the metric has no value: PrometheusUnavailable, QueryFailed, NoData or "
            "QueueUnavailable (the task stream read at zero replicas)."
        ),
    )


class AutoscalingStatus(common.StatusModel):
    """What the autoscaler last saw and decided.

    Its conditions on the Agent: ScalingActive (False with reason PrometheusUnavailable,
    QueryFailed or NoData when metrics are missing) and ScalingLimited (True when the
    count was held at minReplicas, maxReplicas, a Tenant budget or a rate limit).
    """

    last_scale_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the autoscaler last changed spec.replicas."
    )
    current_metric_value: float | None = pydantic.Field(
        default=None,
        description=(
            "Last value per replica of the metric that decided the count (see metrics for all)."
        ),
    )
    desired_replicas: int | None = pydantic.Field(
        default=None, ge=0, description="Replica count the autoscaler last computed."
    )
    metrics: list[MetricStatus] | None = pydantic.Field(
        default=None,
        max_length=MAX_METRICS + 2,
        description=(
            "Last value of every metric in spec.autoscaling.metrics, plus the queue depth "
            "and in-flight work that decide scaling to zero."
        ),
    )
    reason: str | None = pydantic.Field(
        default=None,
        max_length=1024,
        pattern=common.CONDITION_REASON_PATTERN,
        description=(
            "Why the count is what it is, one CamelCase word (AboveTarget, BelowTarget, "
            "WithinTolerance, ScaleDownStabilized, TooManyReplicas, ScaledToZero, ...)."
        ),
    )
    message: str | None = pydantic.Field(
        default=None,
        max_length=32768,
        description=(
            'The last decision in words, for example "queue depth 48 > 4 replicas × '  # noqa: RUF001
            'target 5: 4 → 10".'
        ),
    )


class AgentUsage(common.StatusModel):
    """The agent's usage from the platform's usage ledger, filled only when the operator
    meters usage (docs/billing.md)."""

    period_start: datetime.datetime | None = pydantic.Field(
        default=None, description="Start of the current billing month (UTC)."
    )
    this_period: common.PeriodTotals | None = pydantic.Field(
        default=None, description="This billing month's usage."
    )
    last_period: common.PeriodTotals | None = pydantic.Field(
        default=None, description="Last billing month's usage."
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
    usage: AgentUsage | None = pydantic.Field(
        default=None, description="Model calls, tokens and cost from the usage ledger."
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
        common.PrinterColumn(
            name="Autoscaling",
            type="string",
            json_path=".status.autoscaling.reason",
            description=(
                "Last autoscaling decision (AboveTarget, ScaleDownStabilized, ...); "
                "empty when not autoscaled."
            ),
        ),
        common.PrinterColumn(
            name="Min",
            type="integer",
            json_path=".spec.autoscaling.minReplicas",
            description="Fewest replicas the autoscaler keeps.",
            priority=1,
        ),
        common.PrinterColumn(
            name="Max",
            type="integer",
            json_path=".spec.autoscaling.maxReplicas",
            description="Most replicas the autoscaler may run.",
            priority=1,
        ),
        common.AGE_COLUMN,
    ),
)
