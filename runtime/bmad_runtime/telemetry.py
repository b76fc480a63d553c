"""Metrics and traces of one runtime app.

Metrics live in a `CollectorRegistry` of the app's own (not the process-global one),
so that a test process can run several apps side by side; ``/metrics`` serves it.
The operator's autoscaler reads ``bmad_agent_queue_depth``, ``bmad_agent_inflight`` and
``bmad_agent_tokens_total``, selecting the series of one Agent by their ``namespace``
and ``agent`` labels: every series an app serves carries both (`Metrics(labels=...)`),
so any scrape finds them, whether or not its relabelling adds them (a scrape that
sets a ``namespace`` target label of its own, the pod's, keeps the same value). They
also carry ``tenant``, which the dashboards select on (docs/billing.md).

Model calls are measured after the OpenTelemetry semantic conventions for generative
AI, with attribute names written the Prometheus way (``.`` as ``_``):
``gen_ai_client_token_usage`` (tokens per call, by ``gen_ai_token_type``) and
``gen_ai_client_operation_duration_seconds`` (one observation per provider tried, with
``error_type`` set when it failed). Their labels are bounded: operation, provider and
model names (a handful per agent), never a conversation or request id. The runtime
states no price (the operator's ingester applies the platform's price table), so cost
is an operator metric (`bmad_operator.metrics`).

Traces: an OpenTelemetry SDK `TracerProvider` per app, exporting over OTLP only when
``OTEL_EXPORTER_OTLP_ENDPOINT`` is set and an OTLP exporter package is installed (the
runtime does not depend on one: without it the spans are made and dropped). The
provider is not installed globally, so apps never fight over the global one.
"""

from __future__ import annotations

import bisect
import importlib
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

import prometheus_client
from opentelemetry import trace
from opentelemetry.sdk import resources
from opentelemetry.sdk import trace as sdk_trace
from opentelemetry.sdk.trace import export as sdk_export
from opentelemetry.sdk.trace import sampling
from prometheus_client import metrics, metrics_core, registry, utils

from bmad_runtime import ports

logger = logging.getLogger(__name__)

# LLM calls take from tens of milliseconds (cached, echo) to minutes (long answers).
REQUEST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
SERVICE_NAME = "bmad-agent-runtime"
# The labels that say whose series these are (the operator's autoscaler selects on them).
NAMESPACE_LABEL = "namespace"
AGENT_LABEL = "agent"
TENANT_LABEL = "tenant"
# The OpenTelemetry GenAI conventions' advised buckets: tokens by powers of 4,
# durations doubling from 10 ms.
TOKEN_BUCKETS = tuple(float(4**n) for n in range(14))
OPERATION_BUCKETS = tuple(0.01 * 2**n for n in range(14))
# gen_ai.operation.name of a chat completion (the only operation the runtime makes).
CHAT = "chat"

# OTEL_EXPORTER_OTLP_PROTOCOL value -> the module of its span exporter.
_EXPORTERS = {
    "http/protobuf": "opentelemetry.exporter.otlp.proto.http.trace_exporter",
    "grpc": "opentelemetry.exporter.otlp.proto.grpc.trace_exporter",
}


def agent_labels(*, namespace: str, agent: str, tenant: str | None = None) -> dict[str, str]:
    """The labels every series of one agent's replica carries (``tenant`` when given)."""
    labels = {NAMESPACE_LABEL: namespace, AGENT_LABEL: agent}
    if tenant:
        labels[TENANT_LABEL] = tenant
    return labels


class _Labelled(registry.Collector):
    """Every sample of ``inner`` with ``labels`` added (a sample's own labels win)."""

    def __init__(self, inner: prometheus_client.CollectorRegistry, labels: Mapping[str, str]):
        self.inner = inner
        self.labels = dict(labels)

    def collect(self) -> Iterator[metrics_core.Metric]:
        for family in self.inner.collect():
            labelled = metrics_core.Metric(
                family.name, family.documentation, family.type, family.unit
            )
            labelled.samples = [
                sample._replace(labels={**self.labels, **sample.labels})
                for sample in family.samples
            ]
            yield labelled


class _Series:
    """One labelled series of a `_Family`: a counter's ``value``, or a histogram's
    observations per bucket (not cumulative) in ``counts`` and their ``total``."""

    __slots__ = ("bounds", "counts", "created", "total", "value")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.value = 0.0
        self.counts = [0] * len(bounds)
        self.total = 0.0
        self.created = time.time()

    def observe(self, amount: float) -> None:
        """One histogram observation: its bucket (upper bounds, ``+Inf`` last) and sum."""
        self.counts[bisect.bisect_left(self.bounds, amount)] += 1
        self.total += amount


class _Family:
    """A labelled counter or histogram kept in plain numbers, exposed as
    prometheus_client's `Counter` or `Histogram` of the same name, labels and buckets
    would expose it (the same samples, in the same order, ``_created`` included).

    Not thread-safe, by design: the runtime updates its metrics on its event loop only,
    and a prometheus_client metric takes a lock on every step (`Metrics`). Observations
    are durations and token counts, never NaN: `bisect_left` finds the bucket.
    """

    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: tuple[str, ...],
        buckets: tuple[float, ...] | None = None,
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = labelnames
        self.kind = "counter" if buckets is None else "histogram"
        # A histogram's upper bounds, ``+Inf`` last (as prometheus_client adds it).
        self.bounds = () if buckets is None else (*(float(b) for b in buckets), math.inf)
        self._le = tuple(
            utils.floatToGoString(bound)  # type: ignore[no-untyped-call]
            for bound in self.bounds
        )
        self.series: dict[tuple[str, ...], _Series] = {}

    def child(self, *values: str) -> _Series:
        """The series of these label values (made, with its ``_created``, on first use)."""
        series = self.series.get(values)
        if series is None:
            series = self.series[values] = _Series(self.bounds)
        return series

    def metric(self) -> metrics_core.Metric:
        family = metrics_core.Metric(self.name, self.documentation, self.kind)
        created = metrics._use_created  # what prometheus_client's own metrics follow
        for values, series in list(self.series.items()):
            labels = list(zip(self.labelnames, values, strict=True))
            if self.kind == "counter":
                family.add_sample(self.name + "_total", dict(labels), float(series.value))
            else:
                cumulative = 0.0
                for le, count in zip(self._le, series.counts, strict=True):
                    cumulative += count
                    family.add_sample(
                        self.name + "_bucket", dict([*labels, ("le", le)]), cumulative
                    )
                family.add_sample(self.name + "_count", dict(labels), cumulative)
                if self.bounds[0] >= 0:
                    family.add_sample(self.name + "_sum", dict(labels), series.total)
            if created:
                family.add_sample(self.name + "_created", dict(labels), series.created)
        return family


class _Families(registry.Collector):
    """The `_Family` metrics of one registry, exposed in the order given."""

    def __init__(self, *families: _Family) -> None:
        self.families = families

    def describe(self) -> Iterator[metrics_core.Metric]:
        for family in self.families:
            yield metrics_core.Metric(family.name, family.documentation, family.kind)

    def collect(self) -> Iterator[metrics_core.Metric]:
        for family in self.families:
            yield family.metric()


_NEGATIVE = "Counters can only be incremented by non-negative amounts."


# The values of bmad_integrations.base.Transport (the telemetry layer does not import it).
DATASTORE_TRANSPORTS = ("tls-verified", "tls-unverified", "plaintext")


class Metrics:
    """The runtime's Prometheus metrics, in a registry of their own.

    With ``labels`` (`agent_labels`), ``/metrics`` serves every series with them.
    """

    def __init__(
        self,
        registry: prometheus_client.CollectorRegistry | None = None,
        *,
        process: bool = True,
        labels: Mapping[str, str] | None = None,
    ) -> None:
        self.registry = registry or prometheus_client.CollectorRegistry(auto_describe=True)
        self._served = self.registry
        if labels:
            self._served = prometheus_client.CollectorRegistry(auto_describe=False)
            self._served.register(_Labelled(self.registry, labels))
        if process:
            prometheus_client.ProcessCollector(registry=self.registry)
            prometheus_client.PlatformCollector(registry=self.registry)
        self.queue_depth = prometheus_client.Gauge(
            "bmad_agent_queue_depth",
            "Tasks on this agent's stream not answered yet (waiting or being worked on).",
            registry=self.registry,
        )
        self.dead_letters = prometheus_client.Gauge(
            "bmad_agent_dead_letters",
            "Entries on this agent's dead-letter stream (tasks that failed every attempt, "
            "and entries that are not tasks; the latest are kept).",
            registry=self.registry,
        )
        self.datastore_transport = prometheus_client.Gauge(
            "bmad_agent_datastore_transport",
            "How the connection to each datastore of the durable store travels: 1 for its "
            "transport (tls-verified, tls-unverified or plaintext), 0 for the others.",
            ["datastore", "transport"],
            registry=self.registry,
        )
        self.inflight = prometheus_client.Gauge(
            "bmad_agent_inflight",
            "Invocations and tasks this replica is serving right now.",
            registry=self.registry,
        )
        # Read at each scrape from a plain count (`turn_began`, `turn_ended`): a Gauge's
        # inc() and dec() take its lock and two checks, and every turn makes both.
        self._inflight = 0
        self.inflight.set_function(lambda: self._inflight)
        # The metrics every request or turn steps: plain numbers that the scrape reads
        # (`_Family`), not prometheus_client metrics, whose every step takes a lock and
        # validates (about 700 bytecodes of an echo invoke's 6,700 went there).
        self.request_seconds = _Family(
            "bmad_agent_request_seconds",
            "HTTP requests by route template and status code.",
            ("route", "status"),
            REQUEST_BUCKETS,
        )
        self.tokens = _Family(
            "bmad_agent_tokens",
            "LLM tokens spent, by direction (in: prompt, out: completion) and model.",
            ("direction", "model"),
        )
        self.tasks = _Family(
            "bmad_agent_tasks",
            "Tasks and invocations finished, by outcome (ok, error, rejected, ...).",
            ("outcome",),
        )
        self.token_usage = _Family(
            "gen_ai_client_token_usage",
            "Tokens per model call (OpenTelemetry gen_ai.client.token.usage), by token "
            "type (input: prompt, output: completion).",
            (
                "gen_ai_operation_name",
                "gen_ai_provider_name",
                "gen_ai_request_model",
                "gen_ai_response_model",
                "gen_ai_token_type",
            ),
            TOKEN_BUCKETS,
        )
        self.operation_duration = _Family(
            "gen_ai_client_operation_duration_seconds",
            "Duration of one model call to one provider (OpenTelemetry "
            "gen_ai.client.operation.duration); error_type is empty when it answered.",
            ("gen_ai_operation_name", "gen_ai_provider_name", "gen_ai_request_model", "error_type"),
            OPERATION_BUCKETS,
        )
        self.ledger_writes = _Family(
            "bmad_usage_ledger_writes",
            "Usage records appended to the platform ledger's stream, by result (ok, failed).",
            ("result",),
        )
        self.registry.register(
            _Families(
                self.request_seconds,
                self.tokens,
                self.tasks,
                self.token_usage,
                self.operation_duration,
                self.ledger_writes,
            )
        )
        # The series by the callers' keys, so a step is one dict lookup.
        self._request_series: dict[tuple[str, int], _Series] = {}
        self._token_usage_series: dict[tuple[str, str, str], tuple[_Series, _Series]] = {}
        self._token_series: dict[str, tuple[_Series, _Series]] = {}
        self._operation_series: dict[tuple[str, str, str], _Series] = {}

    def turn_began(self) -> None:
        """A model call of this replica started (``bmad_agent_inflight`` + 1)."""
        self._inflight += 1

    def turn_ended(self) -> None:
        """A model call of this replica ended, however (``bmad_agent_inflight`` - 1)."""
        self._inflight -= 1

    def observe_request(self, route: str, status: int, seconds: float) -> None:
        """One HTTP request into ``bmad_agent_request_seconds``."""
        series = self._request_series.get((route, status))
        if series is None:
            series = self.request_seconds.child(route, str(status))
            self._request_series[(route, status)] = series
        series.observe(seconds)

    def count_ledger_write(self, result: str) -> None:
        """One usage record written to the platform ledger (ok) or not (failed)."""
        self.ledger_writes.child(result).value += 1

    def count_task(self, outcome: str) -> None:
        """One finished task or invocation into ``bmad_agent_tasks``."""
        self.tasks.child(outcome).value += 1

    def record_datastores(self, transports: Mapping[str, str]) -> None:
        """One series per datastore: 1 for the way its connection travels, 0 for the others."""
        for datastore, how in transports.items():
            for each in DATASTORE_TRANSPORTS:
                self.datastore_transport.labels(datastore=datastore, transport=each).set(
                    1 if each == how else 0
                )

    def record_tokens(self, model: str, usage: ports.Usage) -> None:
        pair = self._token_series.get(model)
        if pair is None:
            pair = self._token_series[model] = (
                self.tokens.child("in", model),
                self.tokens.child("out", model),
            )
        # Refused below zero, as prometheus_client's `Counter.inc` refuses it.
        if usage.tokens_in < 0:
            raise ValueError(_NEGATIVE)
        pair[0].value += usage.tokens_in
        if usage.tokens_out < 0:
            raise ValueError(_NEGATIVE)
        pair[1].value += usage.tokens_out

    def record_usage(self, completion: ports.Completion, *, request_model: str) -> None:
        """The tokens of one answered model call (both the GenAI histogram and the
        per-direction counter the autoscaler reads)."""
        usage = completion.usage
        self.record_tokens(completion.model, usage)
        key = (completion.provider, request_model, completion.model)
        pair = self._token_usage_series.get(key)
        if pair is None:
            pair = self._token_usage_series[key] = (
                self.token_usage.child(CHAT, *key, "input"),
                self.token_usage.child(CHAT, *key, "output"),
            )
        pair[0].observe(usage.tokens_in)
        pair[1].observe(usage.tokens_out)

    def record_operation(
        self, *, provider: str, model: str, seconds: float, error_type: str = ""
    ) -> None:
        """One call to one provider of the chain; ``error_type`` names a failure."""
        key = (provider, model, error_type)
        series = self._operation_series.get(key)
        if series is None:
            series = self._operation_series[key] = self.operation_duration.child(CHAT, *key)
        series.observe(seconds)

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self._served)


def _otlp_exporter(env: Mapping[str, str]) -> sdk_export.SpanExporter | None:
    wanted = env.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or env.get(
        "OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf"
    )
    order = [wanted, *(p for p in _EXPORTERS if p != wanted)]
    for protocol in order:
        module_name = _EXPORTERS.get(protocol)
        if module_name is None:
            continue
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        if protocol != wanted:
            logger.warning("no OTLP exporter for %s installed; exporting over %s", wanted, protocol)
        exporter: sdk_export.SpanExporter = module.OTLPSpanExporter()
        return exporter
    return None


@dataclass
class Tracing:
    provider: sdk_trace.TracerProvider
    tracer: trace.Tracer
    exporting: bool = field(default=False)

    def shutdown(self) -> None:
        self.provider.shutdown()


def tracing(
    *, agent: str, namespace: str, role: str, env: Mapping[str, str] | None = None
) -> Tracing:
    """This app's tracer: spans go to OTLP when ``OTEL_EXPORTER_OTLP_ENDPOINT`` is set."""
    env = os.environ if env is None else env
    resource = resources.Resource.create(
        {
            "service.name": env.get("OTEL_SERVICE_NAME") or SERVICE_NAME,
            "service.namespace": namespace,
            "bmad.agent": agent,
            "bmad.role": role,
        }
    )
    exporter: sdk_export.SpanExporter | None = None
    if env.get("OTEL_EXPORTER_OTLP_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"):
        exporter = _otlp_exporter(env)
        if exporter is None:
            logger.warning(
                "OTEL_EXPORTER_OTLP_ENDPOINT is set but no OTLP exporter is installed "
                "(pip install opentelemetry-exporter-otlp-proto-http): traces are not exported"
            )
    # Spans that no exporter takes are not recorded at all (unless a sampler is asked
    # for): a non-recording span costs next to nothing on the request path.
    sampler = None if exporter or env.get("OTEL_TRACES_SAMPLER") else sampling.ALWAYS_OFF
    # Shut down with the app (its lifespan), not at interpreter exit: apps come and go.
    provider = sdk_trace.TracerProvider(resource=resource, sampler=sampler, shutdown_on_exit=False)
    if exporter is not None:
        provider.add_span_processor(sdk_export.BatchSpanProcessor(exporter))
    # With nothing to record, a no-op tracer: the request path then skips span work
    # altogether (profiling showed spans at ~10% of an echo invoke's CPU).
    recording = sampler is None
    return Tracing(
        provider=provider,
        tracer=provider.get_tracer("bmad_runtime") if recording else trace.NoOpTracer(),
        exporting=exporter is not None,
    )
