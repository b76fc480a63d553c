"""The Autoscaler's pass and scheduler, against a fake store, API and Prometheus.

The fakes record every call, so the tests count writes: one scale and one Event per
change, one report handed to the Agent's reconciler per changed decision, none when
nothing changed. The Autoscaler writes no status itself (the reconciler does).
"""

from __future__ import annotations

import asyncio
import copy
import random
from collections.abc import Iterator
from typing import Any, NamedTuple

import pytest

from bmad_operator import conditions, errors, watching
from bmad_operator.autoscaling import autoscaler, decide, prometheus, queries, reasons

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
NS, NAME = "team-a", "dev"
SEL = queries.Selector(NS, NAME)
QUEUE = queries.queue_depth(SEL)
INFLIGHT = queries.inflight(SEL)


class FakeApi:
    """The writes the Autoscaler makes: /scale and Events. The Agent lives in `cache`."""

    def __init__(self, cache: FakeCache) -> None:
        self.cache = cache
        self.calls: list[tuple[str, Any]] = []
        self.fail_scale = False
        self.fail_events = False
        self.rv = 1

    async def patch_scale(self, kind: str, namespace: str | None, name: str, replicas: int) -> Obj:
        if self.fail_scale:
            raise RuntimeError("409 Conflict")
        self.calls.append(("scale", replicas))
        self.rv += 1
        body = self.cache.objects[("Agent", namespace or "", name)]
        body["spec"]["replicas"] = replicas
        body["metadata"]["resourceVersion"] = str(self.rv)
        return {"metadata": {"resourceVersion": str(self.rv)}, "spec": {"replicas": replicas}}

    async def event(self, involved: Obj, *, type_: str, reason: str, message: str) -> None:
        if self.fail_events:
            raise errors.ApiError(403, "Forbidden", "unable to create new content in namespace")
        self.calls.append(("event", (type_, reason, message)))

    def verbs(self, verb: str) -> list[Any]:
        return [arg for v, arg in self.calls if v == verb]


class FakeCache:
    """The operator's store: what the watches delivered, by (kind, namespace, name)."""

    def __init__(self, *objs: Obj) -> None:
        self.objects: dict[tuple[str, str, str], Obj] = {}
        for obj in objs:
            self.put(obj)

    def put(self, obj: Obj) -> None:
        meta = obj["metadata"]
        meta.setdefault("resourceVersion", "1")
        self.objects[(obj["kind"], meta.get("namespace", ""), meta["name"])] = obj

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        found = self.objects.get((kind, namespace or "", name))
        return copy.deepcopy(found) if found is not None else None

    def items(self, kind: str) -> Iterator[tuple[tuple[str, str], Obj]]:
        for (k, ns, name), obj in list(self.objects.items()):
            if k == kind:
                yield (ns, name), obj

    @property
    def agent(self) -> Obj:
        return self.objects[("Agent", NS, NAME)]


class FakeProm:
    def __init__(self, values: dict[str, float | prometheus.MetricError]) -> None:
        self.values = values
        self.ranges: dict[str, list[tuple[float, float]]] = {}
        self.asked: list[str] = []

    async def value(self, promql: str, *, at: float | None = None) -> float:
        self.asked.append(promql)
        found = self.values.get(promql, prometheus.NoDataError(f"no series match {promql}"))
        if isinstance(found, prometheus.MetricError):
            raise found
        return found

    async def query_range(
        self, promql: str, *, start: float, end: float, step: float
    ) -> list[prometheus.Series]:
        points = self.ranges.get(promql)
        if not points:
            raise prometheus.NoDataError("empty")
        return [prometheus.Series({}, tuple(points))]


class FakeQueues:
    """The task stream's length, as `streams.StreamLengths` reads it from Redis."""

    def __init__(self, reading: decide.Reading | None) -> None:
        self.reading = reading
        self.asked = 0

    async def length(self, body: Any) -> decide.Reading | None:
        self.asked += 1
        return self.reading


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def agent(autoscaling: Obj, replicas: int = 4, **spec: Any) -> Obj:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": NAME, "namespace": NS, "uid": "u-1", "generation": 3},
        "spec": {
            "role": "dev",
            "model": {"provider": "echo", "name": "echo-1"},
            "replicas": replicas,
            "autoscaling": {"enabled": True, "maxReplicas": 10, **autoscaling},
            **spec,
        },
    }


class Made(NamedTuple):
    scaler: autoscaler.Autoscaler
    api: FakeApi
    prom: FakeProm
    clock: Clock
    cache: FakeCache
    notified: list[tuple[str, str]]


def make(body: Obj, values: dict[str, float | prometheus.MetricError], **kw: Any) -> Made:
    cache = FakeCache(body)
    api, prom, clock = FakeApi(cache), FakeProm(values), Clock()
    notified: list[tuple[str, str]] = []
    scaler = autoscaler.Autoscaler(
        api, prom, cache, notify=notified.append, clock=clock,
        wall_clock=lambda: 1_750_000_000.0 + clock.now, rng=random.Random(1), **kw,
    )  # fmt: skip
    return Made(scaler, api, prom, clock, cache, notified)


def shown(scaler: autoscaler.Autoscaler) -> tuple[Obj, dict[str, conditions.Cond]]:
    """The last report: status.autoscaling and the conditions by type."""
    found = scaler.report(NS, NAME)
    assert found is not None
    assert found.autoscaling is not None
    return found.autoscaling, {c.type: c for c in found.conditions}


async def test_a_queue_above_target_scales_through_the_scale_subresource_with_one_event() -> None:
    body = agent({"behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 10,
                                                         "periodSeconds": 15}]}}})  # fmt: skip
    m = make(body, {QUEUE: 48})
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    assert m.api.verbs("scale") == [10]
    assert m.api.verbs("event") == [
        ("Normal", reasons.ABOVE_TARGET, "queue depth 48 > 4 replicas × target 5: 4 → 10")  # noqa: RUF001
    ]
    # No status write of its own: the report goes to the Agent's reconciler.
    assert m.notified == [(NS, NAME)]
    auto, conds = shown(m.scaler)
    assert (auto["desiredReplicas"], auto["reason"]) == (10, reasons.ABOVE_TARGET)
    assert auto["lastScaleTime"] == "2025-06-15T15:23:20Z"
    assert auto["metrics"] == [
        {
            "type": "queueDepth",
            "name": "queue depth",
            "target": 5.0,
            "targetType": "AverageValue",
            "value": 48,
            "averageValue": 12.0,
            "desiredReplicas": 10,
        }
    ]
    assert conds["ScalingActive"].status == "True"
    assert conds["ScalingLimited"].status == "False"


async def test_a_refused_event_neither_fails_the_evaluation_nor_loses_the_scale(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A namespace being deleted refuses new Events: the scale and the report stand, and
    the log says so in one line, without a traceback (CI found one in the operator log)."""
    m = make(agent({}), {QUEUE: 48})
    m.api.fail_events = True
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    assert m.api.verbs("scale") == [8]  # 4 -> 8: the default scale-up policy's doubling
    assert m.notified == [(NS, NAME)]
    assert "could not post event" in caplog.text
    assert "Traceback" not in caplog.text


async def test_the_agent_is_read_from_the_store_and_a_store_behind_our_scale_is_not_rescaled() -> (
    None
):
    m = make(agent({}), {QUEUE: 48})
    await m.scaler.evaluate(NS, NAME)
    assert m.api.verbs("scale") == [8]
    # The watch has not delivered our own write yet: the store still says 4.
    m.cache.agent["spec"]["replicas"] = 4
    m.cache.agent["metadata"]["resourceVersion"] = "1"
    m.prom.values[QUEUE] = 40
    m.clock.now += 5
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    assert (decision.current, decision.desired) == (8, 8)
    assert m.api.verbs("scale") == [8]


async def test_an_unchanged_decision_publishes_nothing_new() -> None:
    m = make(agent({}), {QUEUE: 20})
    await m.scaler.evaluate(NS, NAME)
    assert m.notified == [(NS, NAME)]
    for _ in range(5):
        m.clock.now += 5
        await m.scaler.evaluate(NS, NAME)
    assert m.notified == [(NS, NAME)]
    # The metric values shown are refreshed once a minute.
    m.clock.now += 60
    await m.scaler.evaluate(NS, NAME)
    assert len(m.notified) == 2
    assert m.api.calls == []


async def test_prometheus_down_holds_the_count_and_says_why_once() -> None:
    down = prometheus.PrometheusUnavailableError("cannot reach Prometheus at http://p:9090")
    m = make(agent({}), {QUEUE: 20})
    await m.scaler.evaluate(NS, NAME)
    m.prom.values[QUEUE] = down
    for _ in range(3):
        m.clock.now += 5
        decision = await m.scaler.evaluate(NS, NAME)
        assert decision is not None
        assert decision.desired == 4
    assert m.api.verbs("scale") == []
    assert len(m.notified) == 2
    _, conds = shown(m.scaler)
    active = conds["ScalingActive"]
    assert (active.status, active.reason) == ("False", reasons.PROMETHEUS_UNAVAILABLE)
    assert "cannot reach Prometheus at http://p:9090" in active.message
    assert [e[:2] for e in m.api.verbs("event")] == [("Warning", reasons.PROMETHEUS_UNAVAILABLE)]
    # Recovery.
    m.prom.values[QUEUE] = 20
    m.clock.now += 5
    await m.scaler.evaluate(NS, NAME)
    assert shown(m.scaler)[1]["ScalingActive"].status == "True"
    assert len(m.notified) == 3


async def test_without_a_prometheus_url_every_agent_is_held_and_told_what_to_set() -> None:
    m = make(agent({}), {})
    m.scaler.metrics = prometheus.Unconfigured()
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    assert decision.desired == 4
    active = shown(m.scaler)[1]["ScalingActive"]
    assert (active.status, active.reason) == ("False", reasons.PROMETHEUS_UNAVAILABLE)
    assert "BMAD_OPERATOR_PROMETHEUS_URL" in active.message


async def test_a_failed_scale_is_not_remembered_as_a_scale_event() -> None:
    m = make(agent({}), {QUEUE: 48})
    m.api.fail_scale = True
    with pytest.raises(RuntimeError):
        await m.scaler.evaluate(NS, NAME)
    assert m.scaler.tracked[(NS, NAME)].state.events == ()
    assert m.api.verbs("event") == []
    m.api.fail_scale = False
    m.clock.now += 1
    await m.scaler.evaluate(NS, NAME)
    assert m.api.verbs("scale") == [8]  # the rate limit still allows the full step


async def test_scale_to_zero_reads_the_work_signals_and_at_zero_the_stream_itself() -> None:
    body = agent({"minReplicas": 0, "idleSeconds": 30}, replicas=1)
    queues = FakeQueues(decide.Reading(value=0))
    m = make(body, {QUEUE: 0, INFLIGHT: 0}, queues=queues)
    await m.scaler.evaluate(NS, NAME)
    assert set(m.prom.asked) == {QUEUE, INFLIGHT}
    assert queues.asked == 0  # one replica exports the queue depth
    m.clock.now += 30
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    assert (decision.desired, decision.reason) == (0, reasons.SCALED_TO_ZERO)
    assert m.api.verbs("scale") == [0]
    # At zero no pod exports the metric: Prometheus has no series, the stream has.
    del m.prom.values[QUEUE], m.prom.values[INFLIGHT]
    m.clock.now += 5
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    assert (decision.desired, decision.reason) == (0, reasons.IDLE)
    assert queues.asked == 1
    queues.reading = decide.Reading(value=12)
    m.clock.now += 5
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    # Straight to the count the queue asks for (12 tasks, target 5), not just one.
    assert (decision.desired, decision.reason) == (3, reasons.ACTIVATED)
    assert m.api.verbs("scale") == [0, 3]
    assert shown(m.scaler)[0]["metrics"][0]["value"] == 12


async def test_at_zero_an_unreadable_stream_holds_and_says_why() -> None:
    body = agent({"minReplicas": 0}, replicas=0)
    why = "cannot read the task stream from the Redis of Integration redis (ConnectionError)"
    queues = FakeQueues(decide.Reading(error=reasons.QUEUE_UNAVAILABLE, detail=why))
    m = make(body, {}, queues=queues)
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    assert (decision.desired, decision.reason) == (0, reasons.QUEUE_UNAVAILABLE)
    active = shown(m.scaler)[1]["ScalingActive"]
    assert (active.status, active.reason) == ("False", reasons.QUEUE_UNAVAILABLE)
    assert why in active.message


async def test_at_zero_without_a_stream_the_metrics_decide() -> None:
    body = agent({"minReplicas": 0}, replicas=0)
    queues = FakeQueues(None)  # no Redis bound: no task stream
    m = make(body, {QUEUE: 3}, queues=queues)  # pushed from elsewhere
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    assert (decision.desired, decision.reason) == (1, reasons.ACTIVATED)
    assert queues.asked == 0  # Prometheus answered


async def test_predictive_mode_forecasts_from_a_range_query() -> None:
    body = agent({"predictive": {"enabled": True, "leadSeconds": 60}}, replicas=6)
    m = make(body, {QUEUE: 29})
    m.prom.ranges[QUEUE] = [(m.clock.now - 145 + 5 * i, i * 1.0) for i in range(30)]
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    assert (decision.desired, decision.reason) == (9, reasons.PREDICTED_SCALE_UP)


async def test_a_tenant_cap_limits_and_says_so() -> None:
    cap = decide.Cap(5, reasons.TENANT_LIMIT, "the Tenant acme allows 5 replicas")
    m = make(agent({}), {QUEUE: 100}, cap_for=lambda body: cap)
    decision = await m.scaler.evaluate(NS, NAME)
    assert decision is not None
    assert m.api.verbs("scale") == [5]
    limited = shown(m.scaler)[1]["ScalingLimited"]
    assert (limited.status, limited.reason) == ("True", reasons.TENANT_LIMIT)
    assert "the Tenant acme allows 5 replicas" in limited.message


def hpa(name: str, target: Obj, **meta: Any) -> Obj:
    return {
        "apiVersion": "autoscaling/v2",
        "kind": "HorizontalPodAutoscaler",
        "metadata": {"name": name, "namespace": NS, **meta},
        "spec": {"scaleTargetRef": target, "minReplicas": 1, "maxReplicas": 3},
    }


async def test_another_autoscaler_of_the_agent_is_reported_and_not_fought() -> None:
    m = make(agent({}), {QUEUE: 48})
    m.cache.put(hpa("dev-hpa", {"apiVersion": "bmad.dev/v1alpha1", "kind": "Agent", "name": NAME}))
    for _ in range(2):
        assert await m.scaler.evaluate(NS, NAME) is None
        m.clock.now += 5
    assert m.api.verbs("scale") == []
    assert m.prom.asked == []
    auto, conds = shown(m.scaler)
    active = conds["ScalingActive"]
    assert (active.status, active.reason) == ("False", reasons.CONFLICTING_SCALER)
    assert "HorizontalPodAutoscaler dev-hpa (scaling its Agent)" in active.message
    assert "ScalingLimited" not in conds
    assert (auto["desiredReplicas"], auto["reason"]) == (4, reasons.CONFLICTING_SCALER)
    assert [e[:2] for e in m.api.verbs("event")] == [("Warning", reasons.CONFLICTING_SCALER)]
    # The HPA goes: the operator scales again.
    del m.cache.objects[("HorizontalPodAutoscaler", NS, "dev-hpa")]
    await m.scaler.evaluate(NS, NAME)
    assert m.api.verbs("scale") == [8]


@pytest.mark.parametrize(
    "change",
    [
        {"paused": True},
        {"autoscaling": {"enabled": False}},
        {"autoscaling": {"enabled": True, "maxReplicas": 3, "engine": "keda"}},
    ],
    ids=["paused", "disabled", "keda"],
)
async def test_agents_not_autoscaled_here_are_dropped(change: Obj) -> None:
    m = make(agent({}), {QUEUE: 100})
    m.scaler.add((NS, NAME))
    await m.scaler.evaluate(NS, NAME)
    assert m.scaler.report(NS, NAME) is not None
    m.cache.agent["spec"].update(change)
    m.scaler.add((NS, NAME))  # the Agent's event, routed through the declared watch
    assert (NS, NAME) not in m.scaler.tracked
    assert m.scaler.report(NS, NAME) is None
    assert await m.scaler.evaluate(NS, NAME) is None
    assert len(m.scaler.schedule) == 0


async def test_agent_events_track_and_a_deletion_forgets() -> None:
    m = make(agent({}), {QUEUE: 100})
    event = watching.WatchEvent("ADDED", "Agent", NS, NAME, {}, m.cache.agent)
    for request in watching.requests(m.scaler.watches(), event):
        assert not request.forget
        m.scaler.add(request.key)
    assert (NS, NAME) in m.scaler.tracked
    assert len(m.scaler.schedule) == 1
    await m.scaler.evaluate(NS, NAME)
    gone = event._replace(type="DELETED")
    for request in watching.requests(m.scaler.watches(), gone):
        assert request.forget
        m.scaler.forget(request.key)
    assert (NS, NAME) not in m.scaler.tracked
    assert m.scaler.report(NS, NAME) is None
    assert len(m.scaler.schedule) == 0


def test_the_schedule_pops_due_keys_in_order_and_supersedes_old_entries() -> None:
    schedule = autoscaler.Schedule()
    schedule.set(("a", "1"), 10)
    schedule.set(("a", "2"), 5)
    schedule.set(("a", "1"), 3)  # rescheduled earlier: the entry at 10 is stale
    schedule.set(("a", "3"), 20)
    schedule.remove(("a", "3"))
    assert schedule.next_due() == 3
    assert schedule.pop_due(4) == [("a", "1")]
    assert schedule.pop_due(9) == [("a", "2")]
    assert schedule.pop_due(100) == []
    assert schedule.next_due() is None
    assert len(schedule) == 0


def test_tracking_spreads_first_evaluations_over_one_interval() -> None:
    scaler, clock = make(agent({}), {}).scaler, Clock()
    scaler.clock = clock
    for i in range(50):
        body = agent({"pollingIntervalSeconds": 10})
        body["metadata"]["name"] = f"dev-{i}"
        assert scaler.track(body)
    dues = []
    while (due := scaler.schedule.next_due()) is not None:
        dues.append(due)
        scaler.schedule.pop_due(due)
    assert len(dues) == 50
    assert all(clock.now <= d <= clock.now + 10 for d in dues)
    assert max(dues) - min(dues) > 5  # spread, not all at once


async def test_run_evaluates_each_agent_on_its_interval_until_stopped() -> None:
    # Real time, short intervals: the loop must evaluate an agent several times.
    body = agent({"pollingIntervalSeconds": 1})
    cache = FakeCache(body)
    api, prom = FakeApi(cache), FakeProm({QUEUE: 20})
    scaler = autoscaler.Autoscaler(api, prom, cache, rng=random.Random(2))
    scaler.track(body)
    stop = asyncio.Event()
    runner = asyncio.create_task(scaler.run(stop))
    deadline = asyncio.get_running_loop().time() + 10
    while prom.asked.count(QUEUE) < 3:
        assert asyncio.get_running_loop().time() < deadline, prom.asked
        await asyncio.sleep(0.05)
    stop.set()
    await asyncio.wait_for(runner, 5)
    assert runner.done()
