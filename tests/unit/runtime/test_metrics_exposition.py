"""The metrics the runtime steps on every request are kept in plain numbers
(`telemetry._Family`), not prometheus_client metrics; /metrics must expose them exactly
as prometheus_client's own `Counter` and `Histogram` of the same name, labels and buckets
did: the same samples, values, label sets, bucket bounds, ``_created`` and order."""

from __future__ import annotations

import time

import prometheus_client
import pytest

from bmad_runtime import ports, telemetry

pytestmark = pytest.mark.unit

CREATED = 1700000000.25
LABELS = {"namespace": "team-a", "agent": "dev", "tenant": "acme"}


def steps(metrics: telemetry.Metrics) -> None:
    """A fixed sequence: bucket edges, a value above every bucket, several label sets."""
    metrics.queue_depth.set(3)
    metrics.turn_began()
    for route, status, seconds in [
        ("/v1/invoke", 200, 0.003),
        ("/v1/invoke", 200, 0.07),
        ("/v1/invoke", 422, 0.5),
        ("/healthz", 200, 400.0),
        ("/v1/invoke", 200, 0.005),  # exactly on a bound: counted in it
    ]:
        metrics.observe_request(route, status, seconds)
    for outcome in ("succeeded", "succeeded", "error", "rejected"):
        metrics.count_task(outcome)
    metrics.record_usage(
        ports.Completion("x", ports.Usage(12, 30), "echo-1", "echo"), request_model="echo"
    )
    metrics.record_usage(
        ports.Completion("x", ports.Usage(0, 100_000_000), "big", "openai"), request_model="big"
    )
    metrics.record_usage(
        ports.Completion("x", ports.Usage(16, 4), "echo-1", "echo"), request_model="echo"
    )
    metrics.record_operation(provider="echo", model="echo", seconds=0.02)
    metrics.record_operation(provider="openai", model="big", seconds=1000.0, error_type="timeout")
    metrics.record_operation(provider="echo", model="echo", seconds=0.01)
    for result in ("ok", "failed", "ok"):
        metrics.count_ledger_write(result)


def reference(metrics: telemetry.Metrics) -> bytes:
    """The same families and steps through prometheus_client's own metrics."""
    registry = prometheus_client.CollectorRegistry()
    made: dict[str, prometheus_client.Counter | prometheus_client.Histogram] = {}
    buckets = {
        "bmad_agent_request_seconds": telemetry.REQUEST_BUCKETS,
        "gen_ai_client_token_usage": telemetry.TOKEN_BUCKETS,
        "gen_ai_client_operation_duration_seconds": telemetry.OPERATION_BUCKETS,
    }
    for family in (
        metrics.request_seconds,
        metrics.tokens,
        metrics.tasks,
        metrics.token_usage,
        metrics.operation_duration,
        metrics.ledger_writes,
    ):
        if family.kind == "counter":
            made[family.name] = prometheus_client.Counter(
                family.name, family.documentation, family.labelnames, registry=registry
            )
        else:
            made[family.name] = prometheus_client.Histogram(
                family.name,
                family.documentation,
                family.labelnames,
                buckets=buckets[family.name],
                registry=registry,
            )
    request = made["bmad_agent_request_seconds"]
    for route, status, seconds in [
        ("/v1/invoke", "200", 0.003),
        ("/v1/invoke", "200", 0.07),
        ("/v1/invoke", "422", 0.5),
        ("/healthz", "200", 400.0),
        ("/v1/invoke", "200", 0.005),
    ]:
        request.labels(route, status).observe(seconds)  # type: ignore[union-attr]
    for outcome in ("succeeded", "succeeded", "error", "rejected"):
        made["bmad_agent_tasks"].labels(outcome).inc()  # type: ignore[union-attr]
    for provider, model, tokens_in, tokens_out in [
        ("echo", "echo-1", 12, 30),
        ("openai", "big", 0, 100_000_000),
        ("echo", "echo-1", 16, 4),
    ]:
        tokens = made["bmad_agent_tokens"]
        tokens.labels("in", model).inc(tokens_in)  # type: ignore[union-attr]
        tokens.labels("out", model).inc(tokens_out)  # type: ignore[union-attr]
        request_model = "echo" if provider == "echo" else "big"
        usage = made["gen_ai_client_token_usage"]
        for kind, amount in (("input", tokens_in), ("output", tokens_out)):
            usage.labels("chat", provider, request_model, model, kind).observe(amount)  # type: ignore[union-attr]
    duration = made["gen_ai_client_operation_duration_seconds"]
    for provider, model, seconds, error_type in [
        ("echo", "echo", 0.02, ""),
        ("openai", "big", 1000.0, "timeout"),
        ("echo", "echo", 0.01, ""),
    ]:
        duration.labels("chat", provider, model, error_type).observe(seconds)  # type: ignore[union-attr]
    for result in ("ok", "failed", "ok"):
        made["bmad_usage_ledger_writes"].labels(result).inc()  # type: ignore[union-attr]
    return prometheus_client.generate_latest(registry)


def test_the_plain_families_expose_what_prometheus_clients_own_metrics_did(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(time, "time", lambda: CREATED)
    metrics = telemetry.Metrics(process=False)
    steps(metrics)
    served = metrics.render().decode()
    expected = reference(metrics).decode()

    assert expected in served  # the six families, whole and in order, after the gauges
    assert served.index("# HELP bmad_agent_inflight") < served.index(
        "# HELP bmad_agent_request_seconds"
    )


def test_the_exposition_lines_of_a_fixed_sequence(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(time, "time", lambda: CREATED)
    metrics = telemetry.Metrics(process=False, labels=LABELS)
    steps(metrics)
    lines = set(metrics.render().decode().splitlines())

    mine = 'agent="dev",namespace="team-a"'
    invoke = f'{mine},route="/v1/invoke",status="200",tenant="acme"'
    health = f'{mine},route="/healthz",status="200",tenant="acme"'
    expected = {
        "# TYPE bmad_agent_request_seconds histogram",
        'bmad_agent_request_seconds_bucket{agent="dev",le="0.005",namespace="team-a",'
        'route="/v1/invoke",status="200",tenant="acme"} 2.0',
        'bmad_agent_request_seconds_bucket{agent="dev",le="0.1",namespace="team-a",'
        'route="/v1/invoke",status="200",tenant="acme"} 3.0',
        'bmad_agent_request_seconds_bucket{agent="dev",le="300.0",namespace="team-a",'
        'route="/healthz",status="200",tenant="acme"} 0.0',
        'bmad_agent_request_seconds_bucket{agent="dev",le="+Inf",namespace="team-a",'
        'route="/healthz",status="200",tenant="acme"} 1.0',
        f"bmad_agent_request_seconds_count{{{invoke}}} 3.0",
        f"bmad_agent_request_seconds_sum{{{health}}} 400.0",
        f"bmad_agent_request_seconds_created{{{invoke}}} 1.70000000025e+09",
        "# TYPE bmad_agent_tokens_total counter",
        'bmad_agent_tokens_total{agent="dev",direction="in",model="echo-1",namespace="team-a",'
        'tenant="acme"} 28.0',
        'bmad_agent_tasks_total{agent="dev",namespace="team-a",outcome="succeeded",'
        'tenant="acme"} 2.0',
        'gen_ai_client_token_usage_bucket{agent="dev",gen_ai_operation_name="chat",'
        'gen_ai_provider_name="openai",gen_ai_request_model="big",gen_ai_response_model="big",'
        'gen_ai_token_type="output",le="+Inf",namespace="team-a",tenant="acme"} 1.0',
        'gen_ai_client_token_usage_bucket{agent="dev",gen_ai_operation_name="chat",'
        'gen_ai_provider_name="openai",gen_ai_request_model="big",gen_ai_response_model="big",'
        'gen_ai_token_type="output",le="6.7108864e+07",namespace="team-a",tenant="acme"} 0.0',
        'gen_ai_client_operation_duration_seconds_count{agent="dev",error_type="",'
        'gen_ai_operation_name="chat",gen_ai_provider_name="echo",gen_ai_request_model="echo",'
        'namespace="team-a",tenant="acme"} 2.0',
        'bmad_usage_ledger_writes_total{agent="dev",namespace="team-a",result="ok",'
        'tenant="acme"} 2.0',
    }
    assert expected <= lines, sorted(expected - lines)


def test_a_negative_token_count_is_refused_as_a_counter_refuses_it() -> None:
    metrics = telemetry.Metrics(process=False)
    with pytest.raises(ValueError, match="non-negative"):
        metrics.record_tokens("m", ports.Usage(-1, 2))
