"""The ledger's usage as Prometheus gauges, for the cost and tenant dashboards.

Pure: `families` turns what the metering loop last read from the ledger (the rollups'
totals per tenant and per agent and model, this and last billing period), the
Tenants' token budgets, the usage streams' backlog and the rows not yet reported to
Stripe into metric families, which `bmad_operator.metrics.USAGE` serves whole. Labels
stay bounded: tenant, namespace, agent, provider, model, period (``this``, ``last``),
token type and currency; never a conversation or record id. Dashboards only: billing
reads the ledger, never these.
"""

from __future__ import annotations

from collections.abc import Mapping

from prometheus_client import metrics_core

from bmad_integrations.usage import store

PERIODS = ("this", "last")


def _periods(usage: store.PeriodUsage) -> tuple[tuple[str, store.Totals], ...]:
    return (("this", usage.this_period), ("last", usage.last_period))


def families(
    *,
    tenants: Mapping[str, store.PeriodUsage],
    models: Mapping[store.ModelKey, store.PeriodUsage],
    budgets: Mapping[str, int],
    backlog: Mapping[tuple[str, str], int],
    unreported: Mapping[str, int],
) -> list[metrics_core.Metric]:
    tenant_tokens = metrics_core.GaugeMetricFamily(
        "bmad_tenant_usage_tokens",
        "Tokens of the tenant's model calls in the billing period, from the ledger.",
        labels=["tenant", "period", "gen_ai_token_type"],
    )
    tenant_cost = metrics_core.GaugeMetricFamily(
        "bmad_tenant_usage_cost",
        "Cost of the tenant's model calls in the billing period, in units of the currency.",
        labels=["tenant", "period", "currency"],
    )
    tenant_unpriced = metrics_core.GaugeMetricFamily(
        "bmad_tenant_usage_unpriced_records",
        "The tenant's model calls in the billing period whose model has no price.",
        labels=["tenant", "period"],
    )
    for tenant, usage in sorted(tenants.items()):
        for period, totals in _periods(usage):
            tenant_tokens.add_metric([tenant, period, "input"], totals.tokens_in)
            tenant_tokens.add_metric([tenant, period, "output"], totals.tokens_out)
            for currency, amount in sorted(totals.cost.items()):
                tenant_cost.add_metric([tenant, period, currency], float(amount))
            tenant_unpriced.add_metric([tenant, period], totals.unpriced)
    budget = metrics_core.GaugeMetricFamily(
        "bmad_tenant_token_budget",
        "The Tenant's spec.limits.tokensPerMonth.",
        labels=["tenant"],
    )
    for tenant, limit in sorted(budgets.items()):
        budget.add_metric([tenant], limit)
    who = ["tenant", "namespace", "agent", "gen_ai_provider_name", "gen_ai_response_model"]
    model_tokens = metrics_core.GaugeMetricFamily(
        "bmad_usage_tokens",
        "Tokens of an agent's calls to one model in the billing period, from the ledger "
        "(the model as it answered).",
        labels=[*who, "period", "gen_ai_token_type"],
    )
    model_cost = metrics_core.GaugeMetricFamily(
        "bmad_usage_cost",
        "Cost of an agent's calls to one model in the billing period, in units of the currency.",
        labels=[*who, "period", "currency"],
    )
    model_unpriced = metrics_core.GaugeMetricFamily(
        "bmad_usage_unpriced_records",
        "An agent's calls to a model without a price in the billing period.",
        labels=[*who, "period"],
    )
    for key, usage in sorted(models.items()):
        for period, totals in _periods(usage):
            labels = [*key, period]
            model_tokens.add_metric([*labels, "input"], totals.tokens_in)
            model_tokens.add_metric([*labels, "output"], totals.tokens_out)
            for currency, amount in sorted(totals.cost.items()):
                model_cost.add_metric([*labels, currency], float(amount))
            model_unpriced.add_metric(labels, totals.unpriced)
    waiting = metrics_core.GaugeMetricFamily(
        "bmad_ledger_backlog_entries",
        "Usage stream entries not ingested into the ledger yet, per agent.",
        labels=["namespace", "agent"],
    )
    for (namespace, agent), entries in sorted(backlog.items()):
        waiting.add_metric([namespace, agent], entries)
    not_reported = metrics_core.GaugeMetricFamily(
        "bmad_stripe_unreported_records",
        "Ledger rows in no Stripe batch yet, per tenant (as of the last reporting pass).",
        labels=["tenant"],
    )
    for tenant, records in sorted(unreported.items()):
        not_reported.add_metric([tenant], records)
    return [
        tenant_tokens,
        tenant_cost,
        tenant_unpriced,
        budget,
        model_tokens,
        model_cost,
        model_unpriced,
        waiting,
        not_reported,
    ]
