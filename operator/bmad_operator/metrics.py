"""The operator's own Prometheus metrics: reconciles, durations, errors, queue, writes."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

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
