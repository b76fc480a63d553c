"""The operator's own Prometheus metrics: reconciles, durations, errors, queue, writes,
and usage from the platform ledger (docs/billing.md)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from prometheus_client import Counter, Gauge, Histogram, metrics_core, registry

RECONCILES = Counter(
    "bmad_operator_reconciles_total", "Reconcile passes by kind and result.", ["kind", "result"]
)
RECONCILE_SECONDS = Histogram(
    "bmad_operator_reconcile_duration_seconds",
    "Duration of one reconcile pass.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
RECONCILE_ERRORS = Counter(
    "bmad_operator_reconcile_errors_total",
    "Reconcile passes that failed, by reason.",
    ["kind", "reason"],
)
STATUS_WRITE_SECONDS = Histogram(
    "bmad_operator_status_write_duration_seconds",
    "Duration of one background write of a decided status with the Events it records.",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
QUEUE_DEPTH = Gauge("bmad_operator_queue_depth", "Keys waiting to be reconciled.", ["kind"])
API_WRITES = Counter(
    "bmad_operator_api_writes_total", "Write requests sent to the API server.", ["verb", "kind"]
)
AUTOSCALER_EVALUATIONS = Counter(
    "bmad_operator_autoscaler_evaluations_total",
    "Autoscaler evaluations of an Agent, by the reason of the decision.",
    ["reason"],
)
AUTOSCALER_SCALES = Counter(
    "bmad_operator_autoscaler_scales_total",
    "Replica counts the autoscaler wrote, by direction (up, down).",
    ["direction"],
)
STRIPE_WEBHOOK_EVENTS = Counter(
    "bmad_stripe_webhook_events_total",
    "Stripe webhook deliveries by event type (the four handled ones, else other; empty "
    "when refused before the body was trusted) and result (accepted, duplicate, refused, "
    "unavailable).",
    ["type", "result"],
)

# -- usage, from the platform ledger (the leader's metering loop; docs/billing.md) -------

LEDGER_RECORDS = Counter(
    "bmad_ledger_records_total",
    "Usage stream entries ingested, by result (inserted: new ledger rows; duplicate: "
    "already in the ledger; rejected: refused and kept aside).",
    ["result"],
)
LEDGER_INGEST_SECONDS = Histogram(
    "bmad_ledger_ingest_seconds",
    "Duration of one ingestion pass that read entries (read, price, insert, acknowledge).",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
STRIPE_METER_EVENTS = Counter(
    "bmad_stripe_meter_events_total",
    "Meter events Stripe accepted, by result (sent).",
    ["result"],
)
STRIPE_METER_BATCHES = Counter(
    "bmad_stripe_meter_batches_total",
    "Ledger batches the reporter finished a pass on, by result (reported, unbilled, "
    "failed, stale, deferred).",
    ["result"],
)


class Snapshot(registry.Collector):
    """Metric families computed elsewhere and replaced whole (`set`): series that are
    gone from the source vanish from the scrape, instead of lingering at a last value."""

    def __init__(self) -> None:
        self._families: tuple[metrics_core.Metric, ...] = ()

    def set(self, families: Iterable[metrics_core.Metric]) -> None:
        self._families = tuple(families)

    def collect(self) -> Iterator[metrics_core.Metric]:
        yield from self._families


# Usage per tenant and agent from the ledger (`bmad_operator.usage_metrics`), exported
# by the replica that leads the metering loop; empty on the others.
USAGE = Snapshot()
registry.REGISTRY.register(USAGE)
