"""The operator's settings, from `BMAD_OPERATOR_*` environment variables."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


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


def load() -> OperatorSettings:
    return OperatorSettings()
