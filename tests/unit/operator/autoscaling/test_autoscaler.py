"""The Autoscaler's pass and scheduler, against a fake API server and a fake Prometheus.

The fakes record every call, so the tests count writes: one scale and one Event per
change, one status write per changed decision, none when nothing changed.
"""

from __future__ import annotations

import asyncio
import copy
import random
from typing import Any

import pytest

from bmad_operator.autoscaling import autoscaler, decide, prometheus, queries, reasons

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
NS, NAME = "team-a", "dev"
SEL = queries.Selector(NS, NAME)
QUEUE = queries.queue_depth(SEL)
INFLIGHT = queries.inflight(SEL)


class ConflictError(Exception):
    status = 409


class FakeApi:
    def __init__(self, body: Obj) -> None:
        self.body = body
        self.calls: list[tuple[str, Any]] = []
        self.fail_scale = False
        if body:
            body["metadata"]["resourceVersion"] = "1"

    def _bump(self) -> None:
        meta = self.body["metadata"]
        meta["resourceVersion"] = str(int(meta["resourceVersion"]) + 1)

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        return copy.deepcopy(self.body) if self.body else None

    async def patch_scale(self, kind: str, namespace: str | None, name: str, replicas: int) -> Obj:
        if self.fail_scale:
            raise RuntimeError("409 Conflict")
        self.calls.append(("scale", replicas))
        self.body["spec"]["replicas"] = replicas
        self._bump()
        return {
            "metadata": {"resourceVersion": self.body["metadata"]["resourceVersion"]},
            "spec": {"replicas": replicas},
        }

    async def patch_status(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        status: Obj,
        *,
        resource_version: str | None = None,
    ) -> Obj:
        if (
            resource_version is not None
            and resource_version != self.body["metadata"]["resourceVersion"]
        ):
            self.calls.append(("conflict", resource_version))
            raise ConflictError("409 Conflict")
        self.calls.append(("status", copy.deepcopy(status)))
        self.body.setdefault("status", {}).update(status)
        self._bump()
        return self.body

    async def event(self, involved: Obj, *, type_: str, reason: str, message: str) -> None:
        self.calls.append(("event", (type_, reason, message)))

    def verbs(self, verb: str) -> list[Any]:
        return [arg for v, arg in self.calls if v == verb]


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


def make(body: Obj, values: dict[str, float | prometheus.MetricError], **kw: Any) -> tuple[
    autoscaler.Autoscaler, FakeApi, FakeProm, Clock
]:  # fmt: skip
    api, prom, clock = FakeApi(body), FakeProm(values), Clock()
    scaler = autoscaler.Autoscaler(
        api, prom, clock=clock, wall_clock=lambda: 1_750_000_000.0 + clock.now,
        rng=random.Random(1), **kw,
    )  # fmt: skip
    return scaler, api, prom, clock


async def test_a_queue_above_target_scales_through_the_scale_subresource_with_one_event() -> None:
    body = agent({"behavior": {"scaleUp": {"policies": [{"type": "Pods", "value": 10,
                                                         "periodSeconds": 15}]}}})  # fmt: skip
    scaler, api, _, _ = make(body, {QUEUE: 48})
    decision = await scaler.evaluate(NS, NAME)
    assert decision is not None
    assert api.verbs("scale") == [10]
    assert api.verbs("event") == [
        ("Normal", reasons.ABOVE_TARGET, "queue depth 48 > 4 replicas × target 5: 4 → 10")  # noqa: RUF001
    ]
    [status] = api.verbs("status")
    auto = status["autoscaling"]
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
    conds = {c["type"]: c for c in status["conditions"]}
    assert conds["ScalingActive"]["status"] == "True"
    assert conds["ScalingLimited"]["status"] == "False"
    assert conds["ScalingActive"]["observedGeneration"] == 3


async def test_an_unchanged_decision_writes_nothing() -> None:
    scaler, api, _, clock = make(agent({}), {QUEUE: 20})
    await scaler.evaluate(NS, NAME)
    assert [v for v, _ in api.calls] == ["status"]
    for _ in range(5):
        clock.now += 5
        await scaler.evaluate(NS, NAME)
    assert [v for v, _ in api.calls] == ["status"]
    # The metric values shown are refreshed once a minute.
    clock.now += 60
    await scaler.evaluate(NS, NAME)
    assert [v for v, _ in api.calls] == ["status", "status"]


async def test_conditions_dropped_by_another_writer_are_restored_on_the_next_pass() -> None:
    scaler, api, _, clock = make(agent({}), {QUEUE: 20})
    await scaler.evaluate(NS, NAME)
    # The reconciler writes its own conditions list, without the autoscaler's.
    api.body["status"]["conditions"] = [
        {"type": "Ready", "status": "True", "reason": "AgentReady", "message": "",
         "lastTransitionTime": "2025-01-01T00:00:00Z"}
    ]  # fmt: skip
    clock.now += 5
    await scaler.evaluate(NS, NAME)
    types = [c["type"] for c in api.verbs("status")[-1]["conditions"]]
    assert types == ["ScalingActive", "ScalingLimited", "Ready"]
    assert len(api.verbs("status")) == 2


async def test_a_status_changed_meanwhile_is_not_overwritten() -> None:
    scaler, api, _, clock = make(agent({}), {QUEUE: 20})
    real_get = api.get

    async def stale_get(kind: str, namespace: str | None, name: str) -> Obj | None:
        body = await real_get(kind, namespace, name)
        api._bump()  # someone writes between our read and our write
        return body

    api.get = stale_get  # type: ignore[method-assign]
    await scaler.evaluate(NS, NAME)
    assert [v for v, _ in api.calls] == ["conflict"]
    api.get = real_get  # type: ignore[method-assign]
    clock.now += 5
    await scaler.evaluate(NS, NAME)
    assert [v for v, _ in api.calls] == ["conflict", "status"]


async def test_prometheus_down_holds_the_count_and_says_why_once() -> None:
    down = prometheus.PrometheusUnavailableError("cannot reach Prometheus at http://p:9090")
    scaler, api, prom, clock = make(agent({}), {QUEUE: 20})
    await scaler.evaluate(NS, NAME)
    prom.values[QUEUE] = down
    for _ in range(3):
        clock.now += 5
        decision = await scaler.evaluate(NS, NAME)
        assert decision is not None
        assert decision.desired == 4
    assert api.verbs("scale") == []
    statuses = api.verbs("status")
    assert len(statuses) == 2
    active = {c["type"]: c for c in statuses[-1]["conditions"]}["ScalingActive"]
    assert (active["status"], active["reason"]) == ("False", reasons.PROMETHEUS_UNAVAILABLE)
    assert "cannot reach Prometheus at http://p:9090" in active["message"]
    assert [e[:2] for e in api.verbs("event")] == [("Warning", reasons.PROMETHEUS_UNAVAILABLE)]
    # Recovery.
    prom.values[QUEUE] = 20
    clock.now += 5
    await scaler.evaluate(NS, NAME)
    active = {c["type"]: c for c in api.verbs("status")[-1]["conditions"]}["ScalingActive"]
    assert active["status"] == "True"


async def test_a_failed_scale_is_not_remembered_as_a_scale_event() -> None:
    scaler, api, _, clock = make(agent({}), {QUEUE: 48})
    api.fail_scale = True
    with pytest.raises(RuntimeError):
        await scaler.evaluate(NS, NAME)
    assert scaler.tracked[(NS, NAME)].state.events == ()
    assert api.verbs("event") == []
    api.fail_scale = False
    clock.now += 1
    await scaler.evaluate(NS, NAME)
    assert api.verbs("scale") == [8]  # the rate limit still allows the full step


async def test_scale_to_zero_reads_the_work_signals_and_wakes_on_a_task() -> None:
    body = agent({"minReplicas": 0, "idleSeconds": 30}, replicas=1)
    scaler, api, prom, clock = make(body, {QUEUE: 0, INFLIGHT: 0})
    await scaler.evaluate(NS, NAME)
    assert set(prom.asked) == {QUEUE, INFLIGHT}
    clock.now += 30
    decision = await scaler.evaluate(NS, NAME)
    assert decision is not None
    assert (decision.desired, decision.reason) == (0, reasons.SCALED_TO_ZERO)
    assert api.verbs("scale") == [0]
    prom.values[QUEUE] = 1
    clock.now += 5
    decision = await scaler.evaluate(NS, NAME)
    assert decision is not None
    assert (decision.desired, decision.reason) == (1, reasons.ACTIVATED)
    assert api.verbs("scale") == [0, 1]


async def test_predictive_mode_forecasts_from_a_range_query() -> None:
    body = agent({"predictive": {"enabled": True, "leadSeconds": 60}}, replicas=6)
    scaler, _, prom, clock = make(body, {QUEUE: 29})
    prom.ranges[QUEUE] = [(clock.now - 145 + 5 * i, i * 1.0) for i in range(30)]
    decision = await scaler.evaluate(NS, NAME)
    assert decision is not None
    assert (decision.desired, decision.reason) == (9, reasons.PREDICTED_SCALE_UP)


async def test_a_tenant_cap_limits_and_says_so() -> None:
    cap = decide.Cap(5, reasons.TENANT_LIMIT, "the Tenant acme allows 5 replicas")
    scaler, api, _, _ = make(agent({}), {QUEUE: 100}, cap_for=lambda body: cap)
    decision = await scaler.evaluate(NS, NAME)
    assert decision is not None
    assert api.verbs("scale") == [5]
    limited = {c["type"]: c for c in api.verbs("status")[0]["conditions"]}["ScalingLimited"]
    assert (limited["status"], limited["reason"]) == ("True", reasons.TENANT_LIMIT)
    assert "the Tenant acme allows 5 replicas" in limited["message"]


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
    body = agent({})
    body["spec"].update(change)
    scaler, api, _, _ = make(body, {QUEUE: 100})
    assert scaler.track(body) is False
    assert await scaler.evaluate(NS, NAME) is None
    assert api.calls == []
    assert (NS, NAME) not in scaler.tracked


async def test_a_deleted_agent_is_forgotten() -> None:
    scaler, api, _, _ = make(agent({}), {QUEUE: 100})
    scaler.track(api.body)
    api.body = {}
    assert await scaler.evaluate(NS, NAME) is None
    assert len(scaler.schedule) == 0


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
    scaler, _, _, clock = make(agent({}), {})
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
    api, prom = FakeApi(body), FakeProm({QUEUE: 20})
    scaler = autoscaler.Autoscaler(api, prom, rng=random.Random(2))
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
