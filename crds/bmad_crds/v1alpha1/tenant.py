"""The Tenant kind: one customer of the platform (cluster-scoped).

A Tenant owns namespaces: the operator creates and labels them (Pod Security
``restricted``; an existing namespace only when a cluster admin handed it over with
the adoption label), puts a ResourceQuota, a LimitRange, a default-deny NetworkPolicy and
RBAC for the tenant's admins in each, keeps a Stripe customer and subscription through
a stripe Integration, and enforces the tenant's budgets. ``deletionPolicy`` says what
happens to the namespaces when the Tenant is deleted.
"""

from __future__ import annotations

import datetime
import typing
from typing import Literal

import pydantic

from bmad_crds.v1alpha1 import common

DeletionPolicy = Literal["Retain", "Delete"]
AdminKind = Literal["User", "Group"]

MAX_NAMESPACES = 64
MAX_ADMINS = 64
MAX_RECIPIENTS = 32
# The share of tokensPerMonth at which the tenant is warned, when warnAtPercent is omitted.
DEFAULT_WARN_AT_PERCENT = 80

# Tenants are label values on their namespaces and objects.
NAME_MAX_LENGTH = common.DNS1123_LABEL_MAX_LENGTH

# A namespace that exists already is taken over by a Tenant only when it carries this
# label with the Tenant's name: set by a cluster admin (only they can label namespaces).
ADOPT_LABEL = "bmad.dev/adopt-by-tenant"


class Admin(common.SpecModel):
    """A user or group that administers the tenant's namespaces."""

    kind: AdminKind = pydantic.Field(description="User or Group, as in an RBAC subject.")
    name: common.ShortText = pydantic.Field(
        description="Name of the user or group, as the cluster's authenticator reports it."
    )


class Quota(common.SpecModel):
    """Resource quota applied to each of the tenant's namespaces."""

    cpu: common.Quantity | None = pydantic.Field(
        default=None, description='CPU all pods of a namespace may request, for example "8".'
    )
    memory: common.Quantity | None = pydantic.Field(
        default=None, description='Memory all pods of a namespace may request, for example "16Gi".'
    )
    limits_cpu: common.Quantity | None = pydantic.Field(
        default=None, description="Sum of the CPU limits of all pods of a namespace."
    )
    limits_memory: common.Quantity | None = pydantic.Field(
        default=None, description="Sum of the memory limits of all pods of a namespace."
    )
    storage: common.Quantity | None = pydantic.Field(
        default=None, description="Storage all PersistentVolumeClaims of a namespace may request."
    )
    pods: common.Quantity | None = pydantic.Field(
        default=None, description="Most pods in a namespace."
    )
    services: common.Quantity | None = pydantic.Field(
        default=None, description="Most Services in a namespace."
    )
    persistent_volume_claims: common.Quantity | None = pydantic.Field(
        default=None, description="Most PersistentVolumeClaims in a namespace."
    )
    config_maps: common.Quantity | None = pydantic.Field(
        default=None, description="Most ConfigMaps in a namespace."
    )
    secrets: common.Quantity | None = pydantic.Field(
        default=None, description="Most Secrets in a namespace."
    )


class CostBudget(common.SpecModel):
    """A budget in money: an amount of one currency."""

    amount: str = pydantic.Field(
        max_length=25,
        pattern=r"^[0-9]{1,12}(\.[0-9]{1,12})?$",
        description='The amount, a decimal number as a string, for example "250.00".',
    )
    currency: str = pydantic.Field(
        max_length=3,
        pattern=r"^[A-Z]{3}$",
        description='ISO 4217 code of the currency, for example "USD".',
    )


class TenantLimits(common.SpecModel):
    """Budgets of the tenant, over all its namespaces."""

    agents: int | None = pydantic.Field(default=None, ge=0, description="Most Agents.")
    replicas: int | None = pydantic.Field(
        default=None, ge=0, description="Most agent replicas, summed over all Agents."
    )
    tokens_per_month: int | None = pydantic.Field(
        default=None,
        ge=0,
        description="Most LLM tokens (input + output) per billing month (UTC calendar "
        "month), over all the tenant's agents, counted by the platform's usage ledger. "
        "Once reached, the agents refuse new invocations (HTTP 429, code "
        "budget_exhausted) and tasks until the month ends or the limit is raised, and "
        "the Tenant and its Agents have BudgetExhausted=True. Enforced only when the "
        "operator meters usage (docs/billing.md).",
    )
    cost_per_month: CostBudget | None = pydantic.Field(
        default=None,
        description="Most cost per billing month (UTC calendar month), over all the "
        "tenant's agents, as the usage ledger prices their calls (the platform's price "
        "table) in this currency; calls priced in another currency or not priced do not "
        "count. Once reached, the agents refuse new work as for tokensPerMonth, and "
        "BudgetExhausted=True (CostPerMonthReached). Enforced only when the operator "
        "meters usage (docs/billing.md).",
    )
    warn_at_percent: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=100,
        description="Percentage of tokensPerMonth (and of costPerMonth) at which the "
        "tenant is warned, once per billing month, by whichever budget reaches it first: "
        "BudgetWarning=True, a BudgetWarning Event, and an e-mail through spec.notify "
        "when it is set. 80 when omitted.",
    )


EmailAddress = typing.Annotated[
    str, pydantic.StringConstraints(min_length=3, max_length=254, pattern=r"^[^@\s]+@[^@\s]+$")
]
"""An e-mail address, checked loosely (the mail server has the last word)."""


class Notify(common.SpecModel):
    """Who hears about the tenant's budget by e-mail, and through which Integration."""

    integration: common.DnsLabel = pydantic.Field(
        description="Name of an Integration of type email (provider smtp)."
    )
    integration_namespace: common.DnsLabel | None = pydantic.Field(
        default=None,
        description="Namespace of that Integration; the operator's own namespace when omitted.",
    )
    recipients: list[EmailAddress] = pydantic.Field(
        min_length=1,
        max_length=MAX_RECIPIENTS,
        description="Addresses the tenant's notifications go to.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )

    @pydantic.field_validator("recipients")
    @classmethod
    def _recipients_unique(cls, recipients: list[str]) -> list[str]:
        common.unique(recipients, field="spec.notify.recipients")
        return recipients


class Billing(common.SpecModel):
    """How the tenant is billed, through Stripe."""

    integration: common.DnsLabel = pydantic.Field(
        description="Name of an Integration of type stripe."
    )
    integration_namespace: common.DnsLabel | None = pydantic.Field(
        default=None,
        description="Namespace of that Integration; the operator's own namespace when omitted.",
    )
    price_id: common.ShortText = pydantic.Field(
        description='Stripe price of the subscription, for example "price_1234".'
    )
    email: str | None = pydantic.Field(
        default=None,
        min_length=3,
        max_length=320,
        pattern=r"^[^@\s]+@[^@\s]+$",
        description="Billing e-mail address of the Stripe customer.",
    )


class TenantSpec(common.SpecModel):
    """Desired state of a Tenant."""

    display_name: common.ShortText | None = pydantic.Field(
        default=None, description="Human-readable name of the customer."
    )
    namespaces: list[common.DnsLabel] = pydantic.Field(
        min_length=1,
        max_length=MAX_NAMESPACES,
        description=(
            "Namespaces of the tenant; the operator creates and labels them. A namespace "
            "that exists already is taken over only when a cluster admin labelled it "
            "bmad.dev/adopt-by-tenant=<tenant>; kube-*, default and the operator's own "
            "namespace never are."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    admins: list[Admin] | None = pydantic.Field(
        default=None,
        max_length=MAX_ADMINS,
        description="Users and groups given admin rights in the tenant's namespaces.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["kind", "name"],
        },
    )
    quota: Quota | None = pydantic.Field(
        default=None, description="ResourceQuota of each of the tenant's namespaces."
    )
    limits: TenantLimits | None = pydantic.Field(
        default=None, description="Budgets of the tenant (agents, replicas, tokens, cost)."
    )
    billing: Billing | None = pydantic.Field(
        default=None, description="Stripe billing; the tenant is not billed when omitted."
    )
    notify: Notify | None = pydantic.Field(
        default=None,
        description="E-mail notifications of the tenant (the budget warning); none when omitted.",
    )
    suspended: bool = pydantic.Field(
        default=False,
        description="Scale all the tenant's agents to zero and refuse new work.",
    )
    deletion_policy: DeletionPolicy = pydantic.Field(
        default="Retain",
        description=(
            "What deleting the Tenant (or removing a namespace from spec.namespaces) does to "
            "its namespaces: Retain keeps them, released from the tenant (label and admin "
            "RoleBinding removed), Delete deletes them with everything in them."
        ),
    )
    data_retention_days: int | None = pydantic.Field(
        default=None,
        ge=1,
        le=3650,
        description=(
            "Days conversations, artifacts and usage records are kept; forever when omitted."
        ),
    )

    @pydantic.field_validator("namespaces")
    @classmethod
    def _namespaces_unique(cls, namespaces: list[str]) -> list[str]:
        common.unique(namespaces, field="spec.namespaces")
        return namespaces

    @pydantic.field_validator("admins")
    @classmethod
    def _admins_unique(cls, admins: list[Admin] | None) -> list[Admin] | None:
        if admins is not None:
            common.unique([(admin.kind, admin.name) for admin in admins], field="spec.admins")
        return admins


class BillingStatus(common.StatusModel):
    """The tenant's objects in Stripe."""

    customer_id: str | None = pydantic.Field(default=None, description="Stripe customer id.")
    subscription_id: str | None = pydantic.Field(
        default=None, description="Stripe subscription id."
    )


class Usage(common.StatusModel):
    """What the tenant uses now, against spec.limits."""

    agents: int | None = pydantic.Field(default=None, ge=0, description="Agents now.")
    replicas: int | None = pydantic.Field(
        default=None, ge=0, description="Agent replicas now, summed over all Agents."
    )
    tokens_this_period: int | None = pydantic.Field(
        default=None,
        ge=0,
        description="LLM tokens (input + output) spent since periodStart, from the usage "
        "ledger; filled only when the operator meters usage (docs/billing.md).",
    )
    period_start: datetime.datetime | None = pydantic.Field(
        default=None, description="Start of the current billing month."
    )
    this_period: common.PeriodTotals | None = pydantic.Field(
        default=None, description="This billing month's usage, from the usage ledger."
    )
    last_period: common.PeriodTotals | None = pydantic.Field(
        default=None, description="Last billing month's usage, from the usage ledger."
    )
    warned_for_period: datetime.datetime | None = pydantic.Field(
        default=None,
        description="Start of the billing month whose budget warning was given (Event and "
        "e-mail): the warning is given once per month.",
    )


class TenantStatus(common.StatusModel):
    """Observed state of a Tenant."""

    observed_generation: int | None = common.observed_generation_field()
    namespaces: list[str] | None = pydantic.Field(
        default=None,
        max_length=MAX_NAMESPACES,
        description="Namespaces the operator has set up for the tenant.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    billing: BillingStatus | None = pydantic.Field(
        default=None, description="The tenant's Stripe objects."
    )
    usage: Usage | None = pydantic.Field(default=None, description="Current usage.")
    conditions: list[common.Condition] = common.conditions_field()


class Tenant(common.Resource):
    """A customer of the platform: namespaces, quotas, admins, billing and budgets."""

    __cel_rules__ = (
        common.name_rule(
            max_length=NAME_MAX_LENGTH,
            why="a Tenant's name is a label value on its namespaces",
        ),
    )

    kind: Literal["Tenant"] = pydantic.Field(default="Tenant", description="Tenant.")
    spec: TenantSpec = pydantic.Field(description="Desired state of the tenant.")
    status: TenantStatus | None = pydantic.Field(
        default=None, description="Observed state of the tenant, written by the operator."
    )


KIND = common.Kind(
    kind="Tenant",
    plural="tenants",
    singular="tenant",
    short_names=("btn",),
    scope="Cluster",
    printer_columns=(
        common.PrinterColumn(
            name="Display-Name",
            type="string",
            json_path=".spec.displayName",
            description="Human-readable name of the customer.",
        ),
        common.PrinterColumn(
            name="Namespaces",
            type="string",
            json_path=".status.namespaces",
            description="Namespaces set up for the tenant.",
            priority=1,
        ),
        *common.ready_columns(reason_priority=1),
        common.PrinterColumn(
            name="Billing",
            type="string",
            json_path='.status.conditions[?(@.type=="BillingReady")].status',
            description="Status of the BillingReady condition.",
        ),
        common.PrinterColumn(
            name="Suspended",
            type="boolean",
            json_path=".spec.suspended",
            description="Whether the tenant is suspended.",
            priority=1,
        ),
        common.AGE_COLUMN,
    ),
)
