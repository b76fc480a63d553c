"""The Integration kind: one third-party service the agents and the operator use.

An Integration names its type (postgres, redis, objectStorage, stripe, auth0, email,
llm), holds the non-secret settings in a block named exactly like the type, and
references a Secret for the credentials. The operator checks it with the real client,
reports Ready with a reason, and publishes a binding Secret (servicebinding.io layout)
that Agents mount. Credentials never appear in the spec or the status.
"""

from __future__ import annotations

import datetime
import typing
from typing import Literal

import pydantic

from bmad_crds.v1alpha1 import common

IntegrationType = Literal["postgres", "redis", "objectStorage", "stripe", "auth0", "email", "llm"]
TYPES: tuple[IntegrationType, ...] = typing.get_args(IntegrationType)

SslMode = Literal["disable", "allow", "prefer", "require", "verify-ca", "verify-full"]
ObjectStorageProvider = Literal["s3", "gcs", "minio"]
EmailProvider = Literal["smtp", "sendgrid", "mailgun"]
LlmProvider = Literal["openai", "anthropic", "openai-compatible"]

# Types whose client cannot work without a credential from the Secret.
SECRET_REQUIRED_TYPES: tuple[IntegrationType, ...] = ("postgres", "stripe")

# An S3/GCS bucket name (the common subset of both naming rules).
BUCKET_PATTERN = r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$"
HOST_MAX_LENGTH = 253
HOST_PATTERN = r"^[^\s/:]+$|^\[[0-9a-fA-F:.]+\]$"

Host = typing.Annotated[
    str,
    pydantic.StringConstraints(min_length=1, max_length=HOST_MAX_LENGTH, pattern=HOST_PATTERN),
]
"""A host name or an IP address, without scheme, port or path."""

Port = typing.Annotated[int, pydantic.Field(ge=1, le=65535)]


class SecretKeys(common.SpecModel):
    """Names of the keys in the Secret, when they differ from the defaults."""

    username: common.ConfigKey | None = pydantic.Field(
        default=None, description='Key holding the user name (default "username").'
    )
    password: common.ConfigKey | None = pydantic.Field(
        default=None, description='Key holding the password (default "password").'
    )
    api_key: common.ConfigKey | None = pydantic.Field(
        default=None, description='Key holding the API key (default "apiKey").'
    )
    access_key_id: common.ConfigKey | None = pydantic.Field(
        default=None,
        description='Key holding the object-storage access key (default "accessKeyId").',
    )
    secret_access_key: common.ConfigKey | None = pydantic.Field(
        default=None,
        description='Key holding the object-storage secret key (default "secretAccessKey").',
    )
    client_secret: common.ConfigKey | None = pydantic.Field(
        default=None, description='Key holding the OAuth client secret (default "clientSecret").'
    )
    webhook_secret: common.ConfigKey | None = pydantic.Field(
        default=None,
        description='Key holding the webhook signing secret (default "webhookSecret").',
    )
    ca_cert: common.ConfigKey | None = pydantic.Field(
        default=None, description='Key holding a PEM CA bundle to trust (default "ca.crt").'
    )


class IntegrationSecretRef(common.SpecModel):
    """The Secret, in the same namespace, that holds the credentials."""

    name: common.DnsSubdomain = pydantic.Field(
        description="Name of the Secret, in the same namespace."
    )
    keys: SecretKeys | None = pydantic.Field(
        default=None, description="Key names in the Secret, when they differ from the defaults."
    )


class Postgres(common.SpecModel):
    """A PostgreSQL database. Credentials: username and password in the Secret."""

    host: Host = pydantic.Field(description="Host name or IP address of the server.")
    port: Port = pydantic.Field(default=5432, description="TCP port of the server.")
    database: str = pydantic.Field(
        min_length=1, max_length=63, description="Name of the database to connect to."
    )
    ssl_mode: SslMode = pydantic.Field(
        default="prefer",
        description="libpq sslmode: disable, allow, prefer, require, verify-ca or verify-full.",
    )


class Redis(common.SpecModel):
    """A Redis server. Credentials: password (optional) in the Secret."""

    host: Host = pydantic.Field(description="Host name or IP address of the server.")
    port: Port = pydantic.Field(default=6379, description="TCP port of the server.")
    db: int = pydantic.Field(default=0, ge=0, le=65535, description="Database number.")
    tls: bool = pydantic.Field(default=False, description="Connect with TLS (rediss://).")
    username: common.ShortText | None = pydantic.Field(
        default=None, description="ACL user name; the default user when omitted."
    )


class ObjectStorage(common.SpecModel):
    """An S3-compatible bucket. Credentials: accessKeyId and secretAccessKey in the Secret."""

    __cel_rules__ = (
        common.Rule(
            rule="self.provider != 'minio' || has(self.endpoint)",
            message=(
                "spec.objectStorage.endpoint is required when spec.objectStorage.provider is "
                "'minio': set the URL of the MinIO server"
            ),
            check=lambda block: block.provider != "minio" or block.endpoint is not None,
            field_path=".endpoint",
            reason="FieldValueRequired",
        ),
    )

    provider: ObjectStorageProvider = pydantic.Field(
        description="s3 (AWS or any S3 API), gcs (Google Cloud Storage's S3 API) or minio."
    )
    endpoint: common.HttpUrl | None = pydantic.Field(
        default=None,
        description="URL of the S3 API; the provider's public endpoint when omitted.",
    )
    region: common.ShortText | None = pydantic.Field(
        default=None, description='Region of the bucket, for example "eu-west-1".'
    )
    bucket: str = pydantic.Field(
        min_length=3, max_length=63, pattern=BUCKET_PATTERN, description="Name of the bucket."
    )
    create_bucket: bool = pydantic.Field(
        default=False, description="Create the bucket when it does not exist."
    )
    versioning: bool = pydantic.Field(
        default=False, description="Enable object versioning on the bucket."
    )
    path_style: bool = pydantic.Field(
        default=False,
        description="Address the bucket in the path (MinIO and most self-hosted servers need it).",
    )


class Stripe(common.SpecModel):
    """Stripe. Credentials: apiKey (and optionally webhookSecret) in the Secret."""

    api_base: common.HttpUrl | None = pydantic.Field(
        default=None,
        description="Base URL of the Stripe API; https://api.stripe.com when omitted.",
    )


class Auth0(common.SpecModel):
    """An Auth0 tenant (or any OIDC issuer) whose tokens callers present."""

    __cel_rules__ = (
        common.Rule(
            rule="has(self.domain) != has(self.issuer)",
            message="spec.auth0 needs exactly one of domain and issuer: keep one of them",
            check=lambda block: (block.domain is None) != (block.issuer is None),
        ),
    )

    domain: common.DnsSubdomain | None = pydantic.Field(
        default=None,
        description='Auth0 domain, for example "acme.eu.auth0.com". Or set issuer.',
    )
    issuer: common.HttpUrl | None = pydantic.Field(
        default=None,
        description="Issuer URL; its /.well-known/openid-configuration names the JWKS.",
    )
    audience: str = pydantic.Field(
        min_length=1,
        max_length=512,
        description="Audience (aud) that tokens must carry: the API identifier.",
    )
    client_id: common.ShortText | None = pydantic.Field(
        default=None,
        description="Client id, for machine-to-machine tokens (clientSecret in the Secret).",
    )


class Email(common.SpecModel):
    """An e-mail sender. Credentials: username and password (smtp) or apiKey in the Secret."""

    __cel_rules__ = (
        common.Rule(
            rule="self.provider != 'smtp' || has(self.host)",
            message=(
                "spec.email.host is required when spec.email.provider is 'smtp': "
                "set the SMTP server's host name"
            ),
            check=lambda block: block.provider != "smtp" or block.host is not None,
            field_path=".host",
            reason="FieldValueRequired",
        ),
        common.Rule(
            rule="self.provider != 'mailgun' || has(self.domain)",
            message=(
                "spec.email.domain is required when spec.email.provider is 'mailgun': "
                "set the Mailgun sending domain"
            ),
            check=lambda block: block.provider != "mailgun" or block.domain is not None,
            field_path=".domain",
            reason="FieldValueRequired",
        ),
    )

    provider: EmailProvider = pydantic.Field(description="smtp, sendgrid or mailgun.")
    host: Host | None = pydantic.Field(default=None, description="SMTP server; smtp only.")
    port: Port | None = pydantic.Field(
        default=None, description="SMTP port; 587 with startTLS, 25 without. smtp only."
    )
    start_tls: bool = pydantic.Field(
        default=False,
        alias="startTLS",
        description="Upgrade the SMTP connection with STARTTLS. smtp only.",
    )
    from_: str = pydantic.Field(
        alias="from",
        min_length=3,
        max_length=320,
        pattern=r"^[^@\s]+@[^@\s]+$",
        description='Sender address of the mails, for example "noreply@example.com".',
    )
    api_base: common.HttpUrl | None = pydantic.Field(
        default=None,
        description="Base URL of the SendGrid or Mailgun API; the public one when omitted.",
    )
    domain: common.DnsSubdomain | None = pydantic.Field(
        default=None, description="Mailgun sending domain; mailgun only."
    )


class Llm(common.SpecModel):
    """An LLM API endpoint. Credentials: apiKey in the Secret."""

    __cel_rules__ = (
        common.Rule(
            rule="self.provider != 'openai-compatible' || has(self.baseUrl)",
            message=(
                "spec.llm.baseUrl is required when spec.llm.provider is 'openai-compatible': "
                "set the URL of the endpoint"
            ),
            check=lambda block: block.provider != "openai-compatible" or block.base_url is not None,
            field_path=".baseUrl",
            reason="FieldValueRequired",
        ),
    )

    provider: LlmProvider = pydantic.Field(description="openai, anthropic or openai-compatible.")
    base_url: common.HttpUrl | None = pydantic.Field(
        default=None,
        description="Base URL of the API; the provider's public one when omitted.",
    )
    default_model: common.ShortText | None = pydantic.Field(
        default=None,
        description="Model used to check the endpoint and by Agents that name no model.",
    )


def _block_rule(type_: IntegrationType) -> common.Rule:
    return common.Rule(
        rule=f"self.type != '{type_}' || has(self.{type_})",
        message=(
            f"spec.{type_} is required when spec.type is '{type_}': add the {type_} block "
            "with the service's settings, or change spec.type"
        ),
        check=lambda spec: spec.type != type_ or getattr(spec, _ATTRIBUTES[type_]) is not None,
        field_path=f".{type_}",
        reason="FieldValueRequired",
    )


# The Python attribute of each type's block (the JSON name is the type itself).
_ATTRIBUTES: dict[IntegrationType, str] = {
    "postgres": "postgres",
    "redis": "redis",
    "objectStorage": "object_storage",
    "stripe": "stripe",
    "auth0": "auth0",
    "email": "email",
    "llm": "llm",
}


def _count_blocks(spec: IntegrationSpec) -> int:
    return sum(getattr(spec, attribute) is not None for attribute in _ATTRIBUTES.values())


class IntegrationSpec(common.SpecModel):
    """Desired state of an Integration."""

    __cel_rules__ = (
        *(_block_rule(type_) for type_ in TYPES),
        common.Rule(
            rule=(
                "[" + ", ".join(f"has(self.{type_})" for type_ in TYPES) + "]"
                ".filter(x, x).size() <= 1"
            ),
            message=(
                "only the block named by spec.type may be set: remove the other blocks among "
                + ", ".join(f"spec.{type_}" for type_ in TYPES)
            ),
            check=lambda spec: _count_blocks(spec) <= 1,
            reason="FieldValueForbidden",
        ),
        common.Rule(
            rule=(
                "!(self.type in [" + ", ".join(f"'{t}'" for t in SECRET_REQUIRED_TYPES) + "])"
                " || has(self.secretRef)"
            ),
            message=(
                "spec.secretRef is required when spec.type is "
                + " or ".join(f"'{t}'" for t in SECRET_REQUIRED_TYPES)
                + ": name the Secret that holds the credentials"
            ),
            check=lambda spec: (
                spec.type not in SECRET_REQUIRED_TYPES or spec.secret_ref is not None
            ),
            field_path=".secretRef",
            reason="FieldValueRequired",
        ),
    )

    type: IntegrationType = pydantic.Field(
        description=(
            "Kind of service: postgres, redis, objectStorage, stripe, auth0, email or llm. "
            "The block of the same name holds its settings."
        )
    )
    secret_ref: IntegrationSecretRef | None = pydantic.Field(
        default=None,
        description=(
            "Secret with the credentials. Required for postgres and stripe; optional where "
            "the service may run without credentials."
        ),
    )
    postgres: Postgres | None = pydantic.Field(
        default=None, description="Settings of a postgres Integration."
    )
    redis: Redis | None = pydantic.Field(
        default=None, description="Settings of a redis Integration."
    )
    object_storage: ObjectStorage | None = pydantic.Field(
        default=None, description="Settings of an objectStorage Integration."
    )
    stripe: Stripe | None = pydantic.Field(
        default=None,
        description="Settings of a stripe Integration (may be empty: stripe: {}).",
    )
    auth0: Auth0 | None = pydantic.Field(
        default=None, description="Settings of an auth0 Integration."
    )
    email: Email | None = pydantic.Field(
        default=None, description="Settings of an email Integration."
    )
    llm: Llm | None = pydantic.Field(default=None, description="Settings of an llm Integration.")
    check_interval_seconds: int = pydantic.Field(
        default=300,
        ge=10,
        le=86400,
        description="Seconds between two health checks of the service.",
    )

    def block(self) -> pydantic.BaseModel:
        """The settings block named by ``type`` (present once the spec validated)."""
        found: pydantic.BaseModel | None = getattr(self, _ATTRIBUTES[self.type])
        if found is None:  # only reachable on an unvalidated model_construct()
            raise ValueError(f"spec.{self.type} is required when spec.type is '{self.type}'")
        return found


class IntegrationStatus(common.StatusModel):
    """Observed state of an Integration."""

    observed_generation: int | None = common.observed_generation_field()
    last_check_time: datetime.datetime | None = pydantic.Field(
        default=None, description="When the service was last checked."
    )
    latency_ms: int | None = pydantic.Field(
        default=None, ge=0, description="Duration of the last check, in milliseconds."
    )
    server_version: str | None = pydantic.Field(
        default=None, description="Version the service reported, where it reports one."
    )
    binding_secret_name: str | None = pydantic.Field(
        default=None,
        description="Name of the binding Secret (servicebinding.io layout) Agents mount.",
    )
    conditions: list[common.Condition] = common.conditions_field()


class Integration(common.Resource):
    """A third-party service, checked by the operator and bound into Agents."""

    __cel_rules__ = (
        common.name_rule(
            max_length=common.DNS1123_LABEL_MAX_LENGTH,
            why=(
                "an Integration's name is a directory under $SERVICE_BINDING_ROOT and a label value"
            ),
        ),
    )

    kind: Literal["Integration"] = pydantic.Field(default="Integration", description="Integration.")
    spec: IntegrationSpec = pydantic.Field(description="Desired state of the integration.")
    status: IntegrationStatus | None = pydantic.Field(
        default=None, description="Observed state of the integration, written by the operator."
    )


KIND = common.Kind(
    kind="Integration",
    plural="integrations",
    singular="integration",
    short_names=("bint",),
    scope="Namespaced",
    printer_columns=(
        common.PrinterColumn(
            name="Type", type="string", json_path=".spec.type", description="Kind of service."
        ),
        # The blocks that have a provider (objectStorage, email, llm) show it; the
        # API server prints the first match of the wildcard, and nothing for the others.
        common.PrinterColumn(
            name="Provider",
            type="string",
            json_path=".spec.*.provider",
            description="Provider of the service, for the types that have one.",
        ),
        *common.ready_columns(),
        common.PrinterColumn(
            name="Latency-Ms",
            type="integer",
            json_path=".status.latencyMs",
            description="Duration of the last check, in milliseconds.",
            priority=1,
        ),
        common.PrinterColumn(
            name="Version",
            type="string",
            json_path=".status.serverVersion",
            description="Version the service reported.",
            priority=1,
        ),
        common.PrinterColumn(
            name="Last-Check",
            type="date",
            json_path=".status.lastCheckTime",
            description="Time since the last check.",
        ),
        common.AGE_COLUMN,
    ),
)
