"""The runtime's process settings: who this agent is and where its services are.

Everything comes from the environment the operator writes into the pod, under the names
of `bmad_crds.runtime_contract` (``BMAD_AGENT_*``, ``BMAD_TENANT``, ``BMAD_HTTP_PORT``,
``BMAD_MEMORY_STORE``, ``BMAD_AUTH_MODE``, ``SERVICE_BINDING_ROOT``). Each setting is
read under exactly one name, in exactly that case (`env_name`): pydantic-settings would
also take ``Bmad_Tenant`` or ``bmad_agent_namespace`` for a setting, and the identity of
the agent (whose streams, conversations and budgets it uses) must be the operator's
alone. Datastores not given explicitly (``BMAD_REDIS_URL``, ``BMAD_POSTGRES_DSN``) are
taken from the bindings of type ``redis`` and ``postgres``.

Read through `load()`, never at import, so that tests construct `RuntimeSettings`
directly with the values they need.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pydantic
import pydantic.fields
import pydantic_settings

from bmad_crds import runtime_contract as contract
from bmad_crds.v1alpha1 import agent as agent_api
from bmad_runtime import bindings as bindings_mod
from bmad_runtime import collector

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
ENV_PREFIX = "BMAD_"
# Settings whose variable is not ENV_PREFIX + the field's name in upper case.
_ENV_NAMES: dict[str, str] = {"binding_root": contract.SERVICE_BINDING_ROOT}


def env_name(field: str) -> str:
    """The one environment variable a setting is read from."""
    return _ENV_NAMES.get(field, ENV_PREFIX + field.upper())


class ExactEnvironment(pydantic_settings.PydanticBaseSettingsSource):
    """The process environment, each setting under exactly its `env_name`.

    The environment of a Linux process is case-sensitive, and so is this source:
    ``bmad_agent_namespace`` or ``Bmad_Tenant`` set by anyone but the operator is not
    a setting.
    """

    def get_field_value(
        self, field: pydantic.fields.FieldInfo, field_name: str
    ) -> tuple[Any, str, bool]:
        name = env_name(field_name)
        return os.environ.get(name), name, False

    def __call__(self) -> dict[str, Any]:
        found: dict[str, Any] = {}
        for field_name, field in self.settings_cls.model_fields.items():
            value, _, _ = self.get_field_value(field, field_name)
            if value is not None:
                found[field_name] = value
        return found


class RuntimeSettings(pydantic_settings.BaseSettings):
    """One agent replica's settings; every field is an environment variable ``BMAD_<NAME>``."""

    model_config = pydantic_settings.SettingsConfigDict(extra="ignore", frozen=True)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[pydantic_settings.BaseSettings],
        init_settings: pydantic_settings.PydanticBaseSettingsSource,
        env_settings: pydantic_settings.PydanticBaseSettingsSource,
        dotenv_settings: pydantic_settings.PydanticBaseSettingsSource,
        file_secret_settings: pydantic_settings.PydanticBaseSettingsSource,
    ) -> tuple[pydantic_settings.PydanticBaseSettingsSource, ...]:
        # Arguments first (tests), then the environment by exact names; no .env file.
        return (init_settings, ExactEnvironment(settings_cls))

    agent_name: str = pydantic.Field(default="agent", min_length=1, max_length=253)
    agent_namespace: str = pydantic.Field(default="default", min_length=1, max_length=63)
    agent_role: str = pydantic.Field(default="custom", min_length=1)
    agent_config: Path = pydantic.Field(
        default=Path("/etc/bmad/agent.json"), description="The rendered agent.json."
    )
    tenant: str | None = pydantic.Field(
        default=None,
        description="Tenant the agent serves (the Tenant owning its namespace); the "
        "namespace when unset.",
    )
    binding_root: Path | None = pydantic.Field(
        default=None, description="SERVICE_BINDING_ROOT: where the bindings are mounted."
    )

    http_host: str = "0.0.0.0"  # noqa: S104 - a pod serves on its own network namespace
    http_port: int = pydantic.Field(default=8080, ge=1, le=65535)

    redis_url: str | None = None
    postgres_dsn: str | None = None
    memory_store: agent_api.MemoryStore = pydantic.Field(
        default=agent_api.DEFAULT_MEMORY_STORE,
        description="The Agent's spec.memory.store. durable: conversations in PostgreSQL "
        "and Redis, not ready until both are bound; inProcess: in this process only.",
    )

    auth_mode: agent_api.AuthMode = pydantic.Field(
        default=agent_api.DEFAULT_AUTH_MODE,
        description="The Agent's spec.auth.mode. jwt: /v1/* needs a Bearer JWT of the bound "
        "auth0 Integration (without one the runtime serves, but is not ready and refuses "
        "/v1/* with 503); none: no authentication, every caller gets every scope.",
    )
    max_request_bytes: int = pydantic.Field(default=MiB, ge=1024)
    task_bus_enabled: bool = pydantic.Field(
        default=True,
        description="Consume the agent's task stream (Redis Streams) next to the HTTP API "
        "whenever Redis is bound.",
    )
    task_min_idle_ms: int = pydantic.Field(
        default=30_000,
        ge=100,
        le=3_600_000,
        description="A task a replica took and has not finished after this long is taken "
        "over by another replica (its holder is presumed dead): longer than a task takes.",
    )

    task_attempt_timeout_seconds: float = pydantic.Field(
        default=1800.0,
        gt=0,
        le=86400,
        description="A task still running after this long is cancelled and counts as a failed "
        "attempt (retried, or dead-lettered on the last one). While it runs, its entry is "
        "kept claimed, so no other replica starts it.",
    )

    model_attempts: int = pydantic.Field(
        default=3, ge=1, le=10, description="Tries per model before failing over."
    )
    model_backoff_seconds: float = pydantic.Field(default=0.25, ge=0, le=60)
    model_backoff_max_seconds: float = pydantic.Field(default=4.0, ge=0, le=300)
    model_retry_after_max_seconds: float = pydantic.Field(
        default=30.0, ge=0, le=600, description="Longest Retry-After of a provider honoured."
    )
    model_timeout_seconds: float = pydantic.Field(default=120.0, gt=0, le=3600)
    ready_cache_seconds: float = pydantic.Field(
        default=10.0, ge=0, description="How long a model reachability probe is trusted."
    )

    usage_ledger_url: str | None = pydantic.Field(
        default=None,
        description="The platform Redis of the usage ledger (no credentials), set by the "
        "operator when it meters usage: every model call is then recorded there before "
        "its answer leaves, and the tenant's token budget is enforced.",
    )
    usage_ledger_password: pydantic.SecretStr | None = pydantic.Field(
        default=None, description="The password of this agent's ledger writer (a Secret)."
    )
    usage_ledger_spool: str | None = pydantic.Field(
        default=None,
        description="A directory of the pod's own (the operator sets one in its emptyDir) "
        "where each usage record is kept before its answer leaves and from which records "
        "are shipped to the ledger's Redis in the background "
        "(`bmad_integrations.usage.spool`); unset, every answer waits for Redis to "
        "acknowledge its record.",
    )
    usage_budget_cache_seconds: float = pydantic.Field(
        default=2.0,
        ge=0,
        le=60,
        description="How long the tenant's budget state read from the ledger's Redis is "
        "trusted before it is read again.",
    )

    gc_young_threshold: int = pydantic.Field(
        default=collector.DEFAULT_YOUNG_THRESHOLD,
        ge=0,
        description="Net allocations between two young collections of Python's garbage "
        "collector, which also freezes what exists before the runtime serves "
        "(`bmad_runtime.collector`); 0 keeps Python's defaults.",
    )

    @property
    def effective_tenant(self) -> str:
        return self.tenant or self.agent_namespace

    @property
    def agent_key(self) -> str:
        """The agent's name in its tenant's streams, conversations and rate limits."""
        return contract.agent_key(
            name=self.agent_name, namespace=self.agent_namespace, tenant=self.effective_tenant
        )

    def with_bindings(self, found: Mapping[str, bindings_mod.Binding]) -> RuntimeSettings:
        """Fill in the datastores that were not set explicitly from the bound Integrations."""
        update: dict[str, str] = {}
        if self.redis_url is None:
            redis = bindings_mod.of_type(found, "redis")
            if redis:
                update["redis_url"] = redis[0].redis().url
                _warn_if_several(redis, "redis")
        if self.postgres_dsn is None:
            postgres = bindings_mod.of_type(found, "postgres")
            if postgres:
                update["postgres_dsn"] = postgres[0].postgres().dsn
                _warn_if_several(postgres, "postgres")
        return self.model_copy(update=update) if update else self


def _warn_if_several(found: list[bindings_mod.Binding], kind: str) -> None:
    if len(found) > 1:
        logger.warning(
            "several %s bindings (%s): using %r; set BMAD_%s to choose",
            kind,
            ", ".join(b.name for b in found),
            found[0].name,
            "REDIS_URL" if kind == "redis" else "POSTGRES_DSN",
        )


def load() -> RuntimeSettings:
    """The settings of this process: the environment, then the mounted bindings."""
    settings = RuntimeSettings()
    return settings.with_bindings(bindings_mod.read_bindings(settings.binding_root))
