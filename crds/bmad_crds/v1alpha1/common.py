"""Pieces every kind of ``bmad.dev/v1alpha1`` shares.

The models in this package are the API: the operator parses specs with them and the
CRD generator turns them into OpenAPI schemas. So every rule lives here once, on the
model, in two spellings that must agree: a Python check (run by pydantic when the
operator parses an object) and a CEL rule (run by the API server at admission, so
that ``kubectl apply`` refuses a bad object before any controller sees it).
:class:`Rule` keeps the two side by side.

Naming: attributes are snake_case, the JSON (and YAML) names are camelCase through
an alias generator. Dump with :func:`to_json` to get the Kubernetes spelling.
"""

from __future__ import annotations

import datetime
import re
from collections.abc import Callable, Sequence
from typing import Annotated, Any, ClassVar, Literal, NamedTuple, Self

import pydantic
from pydantic import alias_generators

GROUP = "bmad.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"

# The category `kubectl get bmad` lists: every kind of this group.
CATEGORY = "bmad"

# RFC 1123 label: what Kubernetes requires of namespace, Service and label-value names.
DNS1123_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS1123_LABEL_MAX_LENGTH = 63
# RFC 1123 subdomain: what Kubernetes requires of most object names (Secrets, ConfigMaps).
DNS1123_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
DNS1123_SUBDOMAIN_MAX_LENGTH = 253
# A resource quantity as Kubernetes parses it ("500m", "2Gi", "1e3"), never negative.
QUANTITY_PATTERN = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# The key of an entry in a Secret or a ConfigMap.
CONFIG_KEY_PATTERN = r"^[-._a-zA-Z0-9]+$"
CONFIG_KEY_MAX_LENGTH = 253
# An environment variable name, as a Pod's container accepts it.
ENV_VAR_NAME_PATTERN = r"^[-._a-zA-Z][-._a-zA-Z0-9]*$"
# An http(s) URL; deliberately loose (the operator's clients say what is wrong with it).
HTTP_URL_PATTERN = r"^https?://[^\s]+$"
URL_MAX_LENGTH = 2048
# metav1.Condition's own limits and patterns.
CONDITION_TYPE_PATTERN = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$"
)
CONDITION_REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"

DnsLabel = Annotated[
    str,
    pydantic.StringConstraints(
        min_length=1, max_length=DNS1123_LABEL_MAX_LENGTH, pattern=DNS1123_LABEL_PATTERN
    ),
]
"""A DNS-1123 label: lowercase letters, digits and '-', at most 63 characters."""

DnsSubdomain = Annotated[
    str,
    pydantic.StringConstraints(
        min_length=1, max_length=DNS1123_SUBDOMAIN_MAX_LENGTH, pattern=DNS1123_SUBDOMAIN_PATTERN
    ),
]
"""A DNS-1123 subdomain: DNS labels joined by dots, at most 253 characters."""

ConfigKey = Annotated[
    str,
    pydantic.StringConstraints(
        min_length=1, max_length=CONFIG_KEY_MAX_LENGTH, pattern=CONFIG_KEY_PATTERN
    ),
]
"""A key in a Secret or ConfigMap."""

HttpUrl = Annotated[
    str,
    pydantic.StringConstraints(min_length=8, max_length=URL_MAX_LENGTH, pattern=HTTP_URL_PATTERN),
]
"""An http:// or https:// URL, kept as written (no normalisation)."""

Text = Annotated[str, pydantic.StringConstraints(max_length=4096)]
"""A short free text (a sentence or a paragraph)."""

ShortText = Annotated[str, pydantic.StringConstraints(min_length=1, max_length=256)]
"""A name or a one-line value."""

IntOrString = Annotated[
    pydantic.StrictInt | pydantic.StrictStr,
    pydantic.WithJsonSchema({"x-kubernetes-int-or-string": True}),
]
"""An integer or a string, like Kubernetes' IntOrString."""

Quantity = Annotated[
    Annotated[pydantic.StrictInt, pydantic.Field(ge=0)]
    | Annotated[pydantic.StrictStr, pydantic.StringConstraints(pattern=QUANTITY_PATTERN)],
    pydantic.WithJsonSchema(
        {"x-kubernetes-int-or-string": True, "minimum": 0, "pattern": QUANTITY_PATTERN}
    ),
]
"""A non-negative Kubernetes resource quantity: an integer or a string like "500m", "2Gi"."""

FreeForm = Annotated[
    dict[str, Any],
    pydantic.WithJsonSchema({"type": "object", "x-kubernetes-preserve-unknown-fields": True}),
]
"""A free-form map: the API server keeps whatever it holds (no pruning)."""

RuleReason = Literal["FieldValueInvalid", "FieldValueForbidden", "FieldValueRequired"]


class Rule(NamedTuple):
    """One validation rule, in CEL for the API server and in Python for the operator.

    ``rule`` and ``check`` must accept and refuse the same objects: ``self`` in the
    CEL rule is the object the model describes, and ``check`` gets the parsed model
    (after defaults are applied, as the API server defaults before it validates).
    ``message`` names the field and says what to change.
    """

    rule: str
    message: str
    check: Callable[[Any], bool]
    field_path: str | None = None
    reason: RuleReason | None = None

    def to_schema(self) -> dict[str, str]:
        """The ``x-kubernetes-validations`` entry of this rule."""
        entry = {"rule": self.rule, "message": self.message}
        if self.field_path is not None:
            entry["fieldPath"] = self.field_path
        if self.reason is not None:
            entry["reason"] = self.reason
        return entry


def _add_cel_rules(schema: dict[str, Any], model: type[Any]) -> None:
    # pydantic calls this for every model class it renders: the rules of the class
    # being rendered become its x-kubernetes-validations.
    rules: Sequence[Rule] = getattr(model, "__cel_rules__", ())
    if rules:
        schema["x-kubernetes-validations"] = [rule.to_schema() for rule in rules]


class ApiModel(pydantic.BaseModel):
    """Base of every model: camelCase JSON names, CEL rules carried into the schema."""

    model_config = pydantic.ConfigDict(
        alias_generator=alias_generators.to_camel,
        populate_by_name=True,
        json_schema_extra=_add_cel_rules,
    )

    __cel_rules__: ClassVar[tuple[Rule, ...]] = ()

    @pydantic.model_validator(mode="after")
    def _check_cel_rules(self) -> Self:
        for rule in type(self).__cel_rules__:
            if not rule.check(self):
                raise ValueError(rule.message)
        return self


class SpecModel(ApiModel):
    """Base of what users write, validated as strictly as the API server does.

    Unknown fields are errors (the API server prunes them, and kubectl's default
    strict field validation refuses them), and values are not coerced: "5" is not an
    integer and "yes" is not a boolean, in the schema or here.
    """

    model_config = pydantic.ConfigDict(extra="forbid", strict=True)


class StatusModel(ApiModel):
    """Base of what the operator writes: tolerant of fields a newer operator added."""

    model_config = pydantic.ConfigDict(extra="ignore")


class PeriodTotals(StatusModel):
    """Usage of one billing period, from the platform's usage ledger (docs/billing.md)."""

    calls: int | None = pydantic.Field(default=None, ge=0, description="Model calls recorded.")
    tokens_in: int | None = pydantic.Field(default=None, ge=0, description="Input (prompt) tokens.")
    tokens_out: int | None = pydantic.Field(
        default=None, ge=0, description="Output (completion) tokens."
    )
    cost: dict[str, str] | None = pydantic.Field(
        default=None,
        description="Cost per currency (ISO 4217 code: decimal amount as a string), priced "
        "with the platform's price table when each call was recorded.",
    )
    unpriced_calls: int | None = pydantic.Field(
        default=None,
        ge=0,
        description="Calls of models the price table has no price for: in the tokens, not "
        "in the cost.",
    )


def to_json(model: pydantic.BaseModel) -> dict[str, Any]:
    """A model as Kubernetes spells it: camelCase names, no unset optional fields."""
    return model.model_dump(mode="json", by_alias=True, exclude_none=True)


def unique(items: Sequence[Any], *, field: str) -> None:
    """Raise when a list that Kubernetes treats as a set holds a value twice."""
    seen: set[Any] = set()
    for item in items:
        if item in seen:
            raise ValueError(f"{field} lists {item!r} twice: list each value once")
        seen.add(item)


# --- references --------------------------------------------------------------------


class LocalObjectReference(SpecModel):
    """A reference to an object by name, in the same namespace as the referrer."""

    name: DnsSubdomain = pydantic.Field(
        description="Name of the referenced object, in the same namespace."
    )


class SecretRef(SpecModel):
    """A reference to a Secret in the same namespace, optionally to one of its keys."""

    name: DnsSubdomain = pydantic.Field(description="Name of the Secret, in the same namespace.")
    key: ConfigKey | None = pydantic.Field(
        default=None,
        description="Key in the Secret. When omitted, the consumer's documented default key.",
    )


class SecretKeyRef(SpecModel):
    """A reference to one key of a Secret in the same namespace."""

    name: DnsSubdomain = pydantic.Field(description="Name of the Secret, in the same namespace.")
    key: ConfigKey = pydantic.Field(description="Key in the Secret whose value is used.")


class ConfigMapKeyRef(SpecModel):
    """A reference to one key of a ConfigMap in the same namespace."""

    name: DnsSubdomain = pydantic.Field(description="Name of the ConfigMap, in the same namespace.")
    key: ConfigKey = pydantic.Field(description="Key in the ConfigMap whose value is used.")


class ResourceRequirements(SpecModel):
    """Compute resources of a container, as in a Pod spec."""

    requests: dict[str, Quantity] | None = pydantic.Field(
        default=None,
        description=(
            "Minimum resources the scheduler reserves, by resource name "
            '(for example cpu: "250m", memory: "256Mi").'
        ),
        json_schema_extra={"maxProperties": 16},
    )
    limits: dict[str, Quantity] | None = pydantic.Field(
        default=None,
        description='Maximum resources the container may use, by resource name (memory: "1Gi").',
        json_schema_extra={"maxProperties": 16},
    )


# --- status ------------------------------------------------------------------------

ConditionStatus = Literal["True", "False", "Unknown"]


class Condition(StatusModel):
    """One aspect of an object's state, in the Kubernetes condition shape."""

    type: str = pydantic.Field(
        description=(
            "Type of the condition, CamelCase (Ready, Available, ...). "
            "Ready summarises the others on every kind."
        ),
        max_length=316,
        pattern=CONDITION_TYPE_PATTERN,
    )
    status: ConditionStatus = pydantic.Field(
        description="Whether the condition holds: True, False or Unknown."
    )
    reason: str = pydantic.Field(
        description=(
            "Why the condition has its status: one CamelCase word for machines "
            "(AuthenticationFailed, SecretNotFound, ...)."
        ),
        min_length=1,
        max_length=1024,
        pattern=CONDITION_REASON_PATTERN,
    )
    message: str = pydantic.Field(
        default="",
        description="Details for humans: what happened and, on failure, what to change.",
        max_length=32768,
    )
    last_transition_time: datetime.datetime = pydantic.Field(
        description="When status last changed (not when the condition was last checked)."
    )
    observed_generation: int | None = pydantic.Field(
        default=None,
        ge=0,
        description="metadata.generation of the object when the condition was set.",
    )


CONDITIONS_MAX_ITEMS = 16


def conditions_field() -> Any:
    """The ``conditions`` field of a status: a list keyed by ``type``."""
    return pydantic.Field(
        default_factory=list,
        description=(
            "Current state of the object, one entry per condition type. "
            "Ready summarises them: kubectl wait --for=condition=Ready."
        ),
        max_length=CONDITIONS_MAX_ITEMS,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )


def observed_generation_field() -> Any:
    """The ``observedGeneration`` field of a status."""
    return pydantic.Field(
        default=None,
        ge=0,
        description="metadata.generation of the spec the operator last acted on.",
    )


# --- the object --------------------------------------------------------------------


class ObjectMeta(pydantic.BaseModel):
    """The parts of metadata the operator reads; everything else is kept as is."""

    model_config = pydantic.ConfigDict(
        alias_generator=alias_generators.to_camel, populate_by_name=True, extra="allow"
    )

    name: str | None = None
    generate_name: str | None = None
    namespace: str | None = None
    uid: str | None = None
    generation: int | None = None
    resource_version: str | None = None
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class Resource(ApiModel):
    """Base of the root object of every kind: apiVersion, kind, metadata, spec, status."""

    model_config = pydantic.ConfigDict(extra="ignore")

    api_version: str = pydantic.Field(
        default=API_VERSION,
        description=("Versioned schema of this representation of an object: bmad.dev/v1alpha1."),
    )
    kind: str = pydantic.Field(description="Kind of the object.")
    metadata: ObjectMeta = pydantic.Field(
        default_factory=ObjectMeta, description="Standard object metadata."
    )


_DNS1123_LABEL = re.compile(DNS1123_LABEL_PATTERN)


def is_dns1123_label(value: str, *, max_length: int = DNS1123_LABEL_MAX_LENGTH) -> bool:
    """Whether a name is a DNS-1123 label of at most ``max_length`` characters."""
    return len(value) <= max_length and _DNS1123_LABEL.match(value) is not None


def name_rule(*, max_length: int, why: str) -> Rule:
    """The root rule that restricts ``metadata.name`` of a kind to a short DNS label.

    Kubernetes lets custom objects have any DNS-1123 subdomain as a name (253 chars,
    dots allowed); the names of the objects the operator derives from them are
    stricter. Only ``metadata.name`` and ``metadata.generateName`` are visible to CEL,
    and a rule's ``fieldPath`` cannot point into metadata (the schema has no properties
    there), so the message names the field instead.
    """
    return Rule(
        rule=(
            f"self.metadata.name.size() <= {max_length} && "
            f"self.metadata.name.matches('{DNS1123_LABEL_PATTERN}')"
        ),
        message=(
            f"metadata.name must be a DNS-1123 label of at most {max_length} characters "
            f"(lowercase letters, digits and '-', starting and ending with a letter or "
            f"digit): {why}"
        ),
        check=lambda obj: (
            obj.metadata.name is None or is_dns1123_label(obj.metadata.name, max_length=max_length)
        ),
    )


# --- what the generator needs to know of a kind -------------------------------------

PrinterColumnType = Literal["string", "integer", "number", "boolean", "date"]


class PrinterColumn(NamedTuple):
    """One column of ``kubectl get``."""

    name: str
    type: PrinterColumnType
    json_path: str
    description: str
    priority: int = 0


class Kind(NamedTuple):
    """Names and presentation of one kind; the schema comes from its root model."""

    kind: str
    plural: str
    singular: str
    short_names: tuple[str, ...]
    scope: Literal["Namespaced", "Cluster"]
    printer_columns: tuple[PrinterColumn, ...]
    scale: bool = False

    @property
    def crd_name(self) -> str:
        """metadata.name of the CustomResourceDefinition: ``<plural>.<group>``."""
        return f"{self.plural}.{GROUP}"


def ready_columns(*, reason_priority: int = 0) -> tuple[PrinterColumn, PrinterColumn]:
    """The Ready and Reason columns every kind shows, from the Ready condition."""
    return (
        PrinterColumn(
            name="Ready",
            type="string",
            json_path='.status.conditions[?(@.type=="Ready")].status',
            description="Status of the Ready condition: True, False or Unknown.",
        ),
        PrinterColumn(
            name="Reason",
            type="string",
            json_path='.status.conditions[?(@.type=="Ready")].reason',
            description="Reason of the Ready condition.",
            priority=reason_priority,
        ),
    )


AGE_COLUMN = PrinterColumn(
    name="Age",
    type="date",
    json_path=".metadata.creationTimestamp",
    description="Time since the object was created.",
)
