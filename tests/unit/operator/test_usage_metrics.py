"""The operator's usage metrics: the ledger's totals as gauges (per tenant, and per
agent and model), budgets, backlog and unreported rows; ingestion and reporting
counters; a snapshot that drops series gone from the ledger."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import prometheus_client
import pytest
from prometheus_client import parser

from bmad_integrations.usage import ingester, reporter, store
from bmad_operator import metering, metrics, usage_metrics

pytestmark = pytest.mark.unit

START = dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
GPT = store.ModelKey("acme", "acme-dev", "analyst", "openai", "gpt-4o")
ECHO = store.ModelKey("acme", "acme-dev", "dev", "echo", "echo-1")


def usage(this: store.Totals, last: store.Totals | None = None) -> store.PeriodUsage:
    return store.PeriodUsage(START, this, last or store.Totals())


def scrape(families: list[prometheus_client.metrics_core.Metric]) -> dict[str, float]:
    snapshot = metrics.Snapshot()
    snapshot.set(families)
    registry = prometheus_client.CollectorRegistry()
    registry.register(snapshot)
    text = prometheus_client.generate_latest(registry).decode()
    found = {}
    for family in parser.text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            found[f"{sample.name}{{{labels}}}"] = sample.value
    return found


def key(name: str, **labels: str) -> str:
    return f"{name}{{{','.join(f'{k}={v}' for k, v in sorted(labels.items()))}}}"


def test_tenant_and_model_totals_become_gauges_per_period_type_and_currency() -> None:
    gpt = store.Totals(records=2, tokens_in=100, tokens_out=10, cost={"USD": Decimal("0.35")})
    echo = store.Totals(records=3, tokens_in=7, tokens_out=5, unpriced=3)
    found = scrape(
        usage_metrics.families(
            tenants={"acme": usage(gpt.plus(echo), last=store.Totals(tokens_in=9))},
            models={GPT: usage(gpt), ECHO: usage(echo)},
            budgets={"acme": 1000},
            backlog={("acme-dev", "dev"): 4},
            unreported={"acme": 5},
        )
    )
    assert found["bmad_tenant_usage_tokens{gen_ai_token_type=input,period=this,tenant=acme}"] == 107
    assert found["bmad_tenant_usage_tokens{gen_ai_token_type=output,period=this,tenant=acme}"] == 15
    assert found["bmad_tenant_usage_tokens{gen_ai_token_type=input,period=last,tenant=acme}"] == 9
    assert found["bmad_tenant_usage_cost{currency=USD,period=this,tenant=acme}"] == 0.35
    assert found["bmad_tenant_usage_unpriced_records{period=this,tenant=acme}"] == 3
    assert found["bmad_tenant_token_budget{tenant=acme}"] == 1000
    gpt4o = {
        "tenant": "acme",
        "namespace": "acme-dev",
        "agent": "analyst",
        "gen_ai_provider_name": "openai",
        "gen_ai_response_model": "gpt-4o",
        "period": "this",
    }
    assert found[key("bmad_usage_tokens", **gpt4o, gen_ai_token_type="input")] == 100
    assert found[key("bmad_usage_tokens", **gpt4o, gen_ai_token_type="output")] == 10
    assert found[key("bmad_usage_cost", **gpt4o, currency="USD")] == 0.35
    # A model without a price has no cost series (not a cost of 0), and says so.
    assert not [k for k in found if k.startswith("bmad_usage_cost") and "echo-1" in k]
    assert [v for k, v in found.items() if "unpriced" in k and "echo-1" in k and "this" in k] == [3]
    assert found["bmad_ledger_backlog_entries{agent=dev,namespace=acme-dev}"] == 4
    assert found["bmad_stripe_unreported_records{tenant=acme}"] == 5


def test_a_snapshot_drops_series_that_are_gone() -> None:
    snapshot = metrics.Snapshot()
    registry = prometheus_client.CollectorRegistry()
    registry.register(snapshot)
    snapshot.set(
        usage_metrics.families(
            tenants={"acme": usage(store.Totals(tokens_in=1))},
            models={},
            budgets={"acme": 10},
            backlog={},
            unreported={},
        )
    )
    assert b'tenant="acme"' in prometheus_client.generate_latest(registry)
    snapshot.set(())  # leadership lost, or the tenant gone
    assert b"acme" not in prometheus_client.generate_latest(registry)


def value(name: str, **labels: str) -> float:
    got = prometheus_client.REGISTRY.get_sample_value(name, labels)
    return got or 0.0


def test_ingestion_and_reporting_passes_are_counted() -> None:
    before = {r: value("bmad_ledger_records_total", result=r) for r in ("inserted", "duplicate")}
    passes = value("bmad_ledger_ingest_seconds_count")
    metering.count_ingested(ingester.IngestStats(read=7, inserted=5, duplicates=1, rejected=1), 0.2)
    assert value("bmad_ledger_records_total", result="inserted") == before["inserted"] + 5
    assert value("bmad_ledger_records_total", result="duplicate") == before["duplicate"] + 1
    assert value("bmad_ledger_ingest_seconds_count") == passes + 1

    sent = value("bmad_stripe_meter_events_total", result="sent")
    failed = value("bmad_stripe_meter_batches_total", result="failed")
    metering.count_reported(
        reporter.ReportStats(batches_reported=2, batches_failed=1, events_sent=4)
    )
    assert value("bmad_stripe_meter_events_total", result="sent") == sent + 4
    assert value("bmad_stripe_meter_batches_total", result="failed") == failed + 1
