"""The PromQL of each metric type."""

from __future__ import annotations

import pytest

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.autoscaling import queries

pytestmark = pytest.mark.unit

DEV = queries.Selector("team-a", "dev")


def test_queue_depth_is_the_max_per_stream_not_a_sum_over_replicas() -> None:
    assert queries.queue_depth(DEV) == (
        'max by (namespace, agent) (bmad_agent_queue_depth{namespace="team-a",agent="dev"})'
    )


def test_inflight_is_summed_over_pods() -> None:
    assert queries.inflight(DEV) == 'sum(bmad_agent_inflight{namespace="team-a",agent="dev"})'


def test_tokens_per_minute_is_a_rate_times_sixty() -> None:
    assert queries.tokens_per_minute(DEV) == (
        'sum(rate(bmad_agent_tokens_total{namespace="team-a",agent="dev"}[1m])) * 60'
    )
    assert "[30s]" in queries.tokens_per_minute(DEV, window="30s")


def test_label_names_follow_the_selector() -> None:
    selector = queries.Selector("team-a", "dev", "kubernetes_namespace", "bmad_dev_agent")
    assert queries.queue_depth(selector) == (
        "max by (kubernetes_namespace, bmad_dev_agent) "
        '(bmad_agent_queue_depth{kubernetes_namespace="team-a",bmad_dev_agent="dev"})'
    )


def test_label_values_are_quoted() -> None:
    assert queries.quote('a"b\\c') == 'a\\"b\\\\c'


@pytest.mark.parametrize(
    ("metric", "expected"),
    [
        ({"type": "queueDepth", "target": 5}, queries.queue_depth(DEV)),
        ({"type": "inflight", "target": 2}, queries.inflight(DEV)),
        ({"type": "tokensPerMinute", "target": 100}, queries.tokens_per_minute(DEV)),
        ({"type": "promql", "query": "sum(up)", "targetValue": 1}, "sum(up)"),
    ],
)
def test_for_metric(metric: dict[str, object], expected: str) -> None:
    assert queries.for_metric(agent_api.AutoscalingMetric.model_validate(metric), DEV) == expected
