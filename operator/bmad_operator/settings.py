"""The operator's settings, from `BMAD_OPERATOR_*` environment variables."""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bmad_integrations import egress
from bmad_operator import leader

if TYPE_CHECKING:
    from bmad_integrations.usage import reporter


class OperatorSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="BMAD_OPERATOR_", extra="ignore")

    runtime_image: str = Field(
        default="bmad-operator:0.1.0",
        description="Image of the agent runtime, used when an Agent names none.",
    )
    resync_seconds: float = Field(
        default=60.0, gt=0, description="Every Agent is reconciled again this often (±10%)."
    )
    workers: int = Field(default=16, ge=1, le=256, description="Concurrent reconciles.")
    metrics_port: int = Field(default=8081, ge=0, le=65535, description="0 disables /metrics.")
    health_port: int = Field(default=8080, ge=0, le=65535, description="0 disables /healthz.")
    bind_address: str = Field(default="0.0.0.0", description="Address of /metrics and /healthz.")  # noqa: S104
    namespace: str = Field(default="", description="Watch only this namespace; empty: all.")
    system_namespace: str = Field(
        default="bmad-system",
        description="The operator's own namespace: billing Integrations and network allowances.",
    )
    workflow_poll_seconds: float = Field(
        default=10.0,
        gt=0,
        le=600,
        description="While a Workflow has attempts out, look for their results at least "
        "this often (a stored result is normally announced at once).",
    )
    webhook_port: int = Field(
        default=0, ge=0, le=65535, description="Port of the admission webhook; 0 disables it."
    )
    webhook_host: str = Field(
        default="127.0.0.1",
        description="Host name the API server uses to reach the webhook (and its cert SAN).",
    )
    webhook_address: str = Field(default="0.0.0.0", description="Address the webhook binds.")  # noqa: S104
    webhook_service: str = Field(
        default="",
        description="namespace/name of the Service in front of the webhook (in a cluster); "
        "when set, the API server reaches the webhook through it.",
    )
    webhook_url: str = Field(
        default="",
        description="Root URL of the webhook server; default https://<host>:<port>.",
    )
    leader_election: bool = Field(
        default=False,
        description="Run as one of several replicas: only the holder of a coordination.k8s.io "
        "Lease reconciles; every replica serves the admission webhook. Off: reconcile alone.",
    )
    lease_name: str = Field(default="bmad-operator", description="The Lease's name.")
    lease_namespace: str = Field(
        default="", description="The Lease's namespace; empty: the system namespace."
    )
    lease_duration_seconds: float = Field(
        default=15.0, gt=0, description="How long a Lease nobody renews stays taken."
    )
    renew_deadline_seconds: float = Field(
        default=10.0, gt=0, description="A leader that cannot renew for this long stops."
    )
    retry_period_seconds: float = Field(
        default=2.0, gt=0, description="How often the leader renews and candidates try."
    )
    leader_identity: str = Field(
        default="", description="This replica's name in the Lease; empty: pod name + uuid."
    )
    tracemalloc_dir: str = Field(
        default="",
        description="Profiling only: trace allocations and write a tracemalloc snapshot "
        "here on each SIGUSR1 (bmad_operator.profiling); empty: off.",
    )
    tracemalloc_frames: int = Field(
        default=25, ge=1, le=200, description="Frames kept per traced allocation."
    )
    prometheus_url: str = Field(
        default="",
        description="Prometheus the autoscaler reads Agents' metrics from (and KEDA "
        "ScaledObjects name), for example http://prometheus.monitoring.svc:9090; empty: "
        "autoscaled Agents are held at their count with ScalingActive=False.",
    )
    prometheus_timeout_seconds: float = Field(
        default=5.0, gt=0, le=60, description="How long one Prometheus query may take."
    )
    usage_redis_url: str = Field(
        default="",
        description="The platform Redis of the usage ledger, as the operator reaches it "
        "(an admin user: it makes each agent's writer and reads every usage stream), for "
        "example redis://:password@ledger-redis.bmad-system:6379/0; empty: usage is not "
        "metered (docs/billing.md).",
    )
    usage_agent_redis_url: str = Field(
        default="",
        description="The same Redis as the agents reach it, without credentials (each "
        "agent gets its own writer's password in a Secret); empty: usage_redis_url "
        "without its user and password.",
    )
    ledger_dsn: str = Field(
        default="",
        description="The platform PostgreSQL of the usage ledger; needed with usage_redis_url.",
    )
    prices_file: str = Field(
        default="",
        description="The price table (prices.yaml of the ConfigMap bmad-prices, mounted); "
        "read again when it changes. Empty: usage is metered in tokens, its cost unknown.",
    )
    usage_poll_seconds: float = Field(
        default=5.0,
        gt=0,
        le=60,
        description="How often the ledger's totals are read into status.usage and the "
        "tenants' token budgets decided.",
    )
    usage_report_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How often the ledger's unreported usage is sent to Stripe as meter "
        "events (billed Tenants) or set aside as unbilled (the others).",
    )
    stripe_meters: str = Field(
        default="",
        description="The Stripe meters usage is reported to, as <event name>=<quantity> "
        "pairs separated by commas; a quantity is tokens_in, tokens_out, tokens or "
        "cost:<currency>[:<scale>] (the cost in that currency times 10**scale, 6 by "
        "default). Empty: bmad_input_tokens=tokens_in,bmad_output_tokens=tokens_out.",
    )
    usage_spool: bool = Field(
        default=True,
        description="Whether each agent's runtime keeps its usage records in a spool in "
        "its pod (BMAD_USAGE_LEDGER_SPOOL) and ships them in the background (true), or "
        "answers only once the ledger's Redis acknowledged the record (false: each "
        "answer waits for a round trip to Redis).",
    )
    usage_prune_seconds: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="How often the ledger writers (Redis ACL users) of deleted Agents are "
        "looked for; one is removed when its Agent was missing at two looks in a row.",
    )
    stripe_webhook_port: int = Field(
        default=0,
        ge=0,
        le=65535,
        description="Port of the Stripe webhook endpoint (POST /stripe/webhook, plain HTTP "
        "on bind_address, behind the Service bmad-operator-stripe); 0 disables it. Needs the "
        "usage ledger: the webhook inbox is in its PostgreSQL.",
    )
    payment_grace_seconds: float = Field(
        default=259200.0,
        ge=0,
        description="How long a tenant with a failed invoice payment (or a cancelled "
        "subscription) keeps running before its agents are suspended.",
    )
    # Where Integration checks may connect (bmad_integrations.egress): comma-separated.
    egress_allow: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Destinations checks may reach although denied otherwise: address "
        "ranges, host names, .suffixes, each with an optional :port.",
    )
    egress_deny: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Destinations checks may not reach beyond the non-public addresses, "
        "such as the cluster's service and pod ranges when they are public addresses.",
    )
    egress_ports: Annotated[list[int], NoDecode] = Field(
        default_factory=list,
        description="The only ports checks may connect to (unless allowed); empty: any.",
    )

    @field_validator("egress_allow", "egress_deny", "egress_ports", mode="before")
    @classmethod
    def _comma_separated(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @model_validator(mode="after")
    def _egress_rules_parse(self) -> OperatorSettings:
        self.egress_policy()  # a bad entry stops the start, saying which one
        return self

    @model_validator(mode="after")
    def _lease_timings_hold(self) -> OperatorSettings:
        self.lease_timings()  # lease > renew deadline > 1.2 x retry, or say which
        return self

    def lease_timings(self) -> leader.Timings:
        return leader.Timings(
            lease_duration=self.lease_duration_seconds,
            renew_deadline=self.renew_deadline_seconds,
            retry_period=self.retry_period_seconds,
        )

    @model_validator(mode="after")
    def _ledger_needs_both(self) -> OperatorSettings:
        if bool(self.usage_redis_url) != bool(self.ledger_dsn):
            raise ValueError(
                "BMAD_OPERATOR_USAGE_REDIS_URL and BMAD_OPERATOR_LEDGER_DSN go together: set "
                "both to meter usage, or neither"
            )
        return self

    @model_validator(mode="after")
    def _stripe_webhook_needs_ledger(self) -> OperatorSettings:
        if self.stripe_webhook_port and not self.ledger_dsn:
            raise ValueError(
                "BMAD_OPERATOR_STRIPE_WEBHOOK_PORT needs the usage ledger (its webhook inbox "
                "is in BMAD_OPERATOR_LEDGER_DSN): set the ledger, or the port to 0"
            )
        return self

    @model_validator(mode="after")
    def _stripe_meters_parse(self) -> OperatorSettings:
        if self.stripe_meters.strip():
            try:
                self.meters()
            except ValueError as exc:
                raise ValueError(f"BMAD_OPERATOR_STRIPE_METERS: {exc}") from None
        return self

    def meters(self) -> tuple[reporter.Meter, ...]:
        """The Stripe meters of `stripe_meters` (`reporter.parse_meters`)."""
        from bmad_integrations.usage import reporter  # only where usage is reported

        return reporter.parse_meters(self.stripe_meters)

    @property
    def metering(self) -> bool:
        return bool(self.usage_redis_url)

    def agent_ledger_url(self) -> str:
        """The ledger's Redis URL the agents get: never with the operator's credentials."""
        url = self.usage_agent_redis_url or self.usage_redis_url
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = host + (f":{parts.port}" if parts.port else "")
        return urllib.parse.urlunsplit(parts._replace(netloc=netloc))

    def egress_policy(self) -> egress.Policy:
        return egress.Policy.parse(
            allow=self.egress_allow, deny=self.egress_deny, ports=self.egress_ports
        )


def load() -> OperatorSettings:
    return OperatorSettings()
