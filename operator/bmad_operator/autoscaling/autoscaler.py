"""The Autoscaler: evaluates every autoscaled Agent on its polling interval.

One shared scheduler (a heap of due times, not a timer per Agent) runs evaluations
when they are due, a few at a time; each Agent's next evaluation is its interval
later, jittered by ±10% so that hundreds of Agents created together do not query
Prometheus in lockstep. One evaluation:

1. reads the Agent (fresh: ``spec.replicas`` may have been changed by hand);
2. reads its metrics from Prometheus (and the queue depth and in-flight work when it
   scales to zero; a range query per metric in predictive mode), every failure kept
   as a reading with its reason;
3. decides (``decide.decide``, pure);
4. when the count changes, writes it through the Agent's **scale subresource** (as an
   HPA would) and posts one Event saying why, in words;
5. writes ``status.autoscaling`` and the ``ScalingActive`` / ``ScalingLimited``
   conditions only when the decision changed (count, reason, a condition), or every
   ``status_refresh_seconds`` to refresh the metric values shown.

The decision's history (recommendations, scale events, idle time) lives here, in
memory; after a restart the decision starts from the current count (see ``decide``).

Not wired into the controller yet: the controller calls :meth:`Autoscaler.track` on
Agent events and :meth:`Autoscaler.forget` on deletion, and runs :meth:`Autoscaler.run`.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import pydantic

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator import conditions
from bmad_operator.autoscaling import config as autoscaling_config
from bmad_operator.autoscaling import decide, forecast, prometheus, queries

logger = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)

JITTER = 0.1
CONCURRENCY = 8
STATUS_REFRESH_SECONDS = 60.0
HTTP_CONFLICT = 409
# A range query's resolution: about 60 points over the lookback, never finer than 1 s.
RANGE_POINTS = 60


class Api(Protocol):
    """What the Autoscaler needs of the API server (``bmad_operator.kube.Kube`` has it)."""

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj | None: ...

    async def patch_scale(
        self, kind: str, namespace: str | None, name: str, replicas: int
    ) -> Obj: ...

    async def patch_status(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        status: Obj,
        *,
        resource_version: str | None = None,
    ) -> Obj: ...

    async def event(self, involved: Obj, *, type_: str, reason: str, message: str) -> None: ...


class Metrics(Protocol):
    """What the Autoscaler needs of Prometheus (``prometheus.Client`` has it)."""

    async def value(self, promql: str, *, at: float | None = None) -> float: ...

    async def query_range(
        self, promql: str, *, start: float, end: float, step: float
    ) -> list[prometheus.Series]: ...


CapFor = Callable[[Obj], decide.Cap | None]


class _Tracked:
    """What the Autoscaler keeps per Agent between evaluations."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.state = decide.State()
        self.active: tuple[str, str] | None = None  # ScalingActive as last written
        self.written_at = -float("inf")
        self.last_scale_time: str | None = None


class Schedule:
    """Due times of many keys in one heap; rescheduling a key supersedes its old entry."""

    def __init__(self) -> None:
        self._heap: list[tuple[float, int, Key]] = []
        self._due: dict[Key, float] = {}
        self._seq = 0

    def __len__(self) -> int:
        return len(self._due)

    def set(self, key: Key, due: float) -> None:
        self._due[key] = due
        self._seq += 1
        heapq.heappush(self._heap, (due, self._seq, key))

    def remove(self, key: Key) -> None:
        self._due.pop(key, None)

    def _clean(self) -> None:
        # Entries superseded by a later set() or a remove() are dropped lazily.
        while self._heap and self._due.get(self._heap[0][2]) != self._heap[0][0]:
            heapq.heappop(self._heap)

    def next_due(self) -> float | None:
        self._clean()
        return self._heap[0][0] if self._heap else None

    def pop_due(self, now: float) -> list[Key]:
        """Keys due at ``now``, earliest first; they leave the schedule until set again."""
        out = []
        self._clean()
        while self._heap and self._heap[0][0] <= now:
            _, _, key = heapq.heappop(self._heap)
            del self._due[key]
            out.append(key)
            self._clean()
        return out


def _metric_status(result: decide.MetricResult, current: int) -> Obj:
    reading, metric = result.reading, result.metric
    status: Obj = {
        "type": metric.type,
        "name": metric.name,
        "target": metric.target,
        "targetType": metric.target_type,
    }
    if reading.value is not None:
        status["value"] = reading.value
        if metric.target_type == "AverageValue" and current > 0:
            status["averageValue"] = round(reading.value / current, 3)
    if result.proposal is not None:
        status["desiredReplicas"] = result.proposal
    if reading.forecast is not None:
        status["forecast"] = reading.forecast
    if reading.error is not None:
        status["error"] = reading.error
    return status


class Autoscaler:
    """Evaluates every tracked Agent on its interval; see the module docstring."""

    def __init__(
        self,
        api: Api,
        metrics: Metrics,
        *,
        label_names: tuple[str, str] = ("namespace", "agent"),
        cap_for: CapFor | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        concurrency: int = CONCURRENCY,
        status_refresh_seconds: float = STATUS_REFRESH_SECONDS,
    ) -> None:
        self.api = api
        self.metrics = metrics
        self.label_names = label_names
        self.cap_for = cap_for
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.status_refresh_seconds = status_refresh_seconds
        self.schedule = Schedule()
        self.tracked: dict[Key, _Tracked] = {}
        self._limit = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()

    # --- which Agents ------------------------------------------------------------------

    def track(self, body: Mapping[str, Any]) -> bool:
        """Start, keep or stop evaluating an Agent after an event; True when tracked."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        interval = _interval(body)
        if interval is None:
            self.forget(*key)
            return False
        entry = self.tracked.get(key)
        if entry is None:
            self.tracked[key] = _Tracked(interval)
            # The first evaluation somewhere within one interval: spreads a crowd.
            self.schedule.set(key, self.clock() + self.rng.uniform(0, interval))
            self._wake.set()
        elif entry.interval != interval:
            entry.interval = interval
            self.schedule.set(key, self.clock() + self._jittered(interval))
            self._wake.set()
        return True

    def forget(self, namespace: str, name: str) -> None:
        self.tracked.pop((namespace, name), None)
        self.schedule.remove((namespace, name))

    def _jittered(self, interval: float) -> float:
        return interval * (1 + self.rng.uniform(-JITTER, JITTER))

    # --- the loop ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Evaluate Agents as they fall due until ``stop`` is set."""
        running: set[asyncio.Task[None]] = set()
        while not stop.is_set():
            now = self.clock()
            for key in self.schedule.pop_due(now):
                task = asyncio.create_task(self._evaluate_and_reschedule(key))
                running.add(task)
                task.add_done_callback(running.discard)
            due = self.schedule.next_due()
            timeout = None if due is None else max(due - self.clock(), 0.0)
            self._wake.clear()
            waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(self._wake.wait())]
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            for waiting in waits:
                waiting.cancel()
        for task in running:
            task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*running, return_exceptions=True)

    async def _evaluate_and_reschedule(self, key: Key) -> None:
        started = self.clock()
        try:
            async with self._limit:
                await self.evaluate(*key)
        except asyncio.CancelledError:
            raise
        except Exception:  # one Agent's failure must not stop the others
            logger.exception("autoscaling %s/%s failed", *key)
        entry = self.tracked.get(key)
        if entry is not None:
            self.schedule.set(key, started + self._jittered(entry.interval))
            self._wake.set()

    # --- one evaluation ----------------------------------------------------------------

    async def evaluate(self, namespace: str, name: str) -> decide.Decision | None:
        """One pass for one Agent; None when it is gone or no longer autoscaled here."""
        body = await self.api.get("Agent", namespace, name)
        if body is None or _interval(body) is None:
            self.forget(namespace, name)
            return None
        spec = agent_api.AgentSpec.model_validate(body["spec"])
        autoscaling = spec.autoscaling
        assert autoscaling is not None  # _interval checked it
        entry = self.tracked.setdefault((namespace, name), _Tracked(_interval(body) or 5))
        settings = autoscaling_config.from_spec(autoscaling)
        selector = queries.Selector(namespace, name, *self.label_names)
        now, wall = self.clock(), self.wall_clock()

        metrics = autoscaling.effective_metrics()
        promql = [queries.for_metric(m, selector) for m in metrics]
        work = [queries.queue_depth(selector), queries.inflight(selector)]
        wanted = list(dict.fromkeys(promql + (work if settings.scale_to_zero else [])))
        read = dict(
            zip(wanted, await asyncio.gather(*(self._read(q) for q in wanted)), strict=True)
        )
        readings = [read[q] for q in promql]
        predictive = autoscaling.predictive
        if predictive is not None and predictive.enabled:
            ahead = await asyncio.gather(
                *(
                    self._forecast(q, wall, predictive.lookback_seconds, predictive.lead_seconds)
                    if r.value is not None
                    else _none()
                    for q, r in zip(promql, readings, strict=True)
                )
            )
            readings = [r._replace(forecast=f) for r, f in zip(readings, ahead, strict=True)]
        observation = decide.Observation(
            now=now,
            current_replicas=spec.replicas,
            readings=tuple(readings),
            queue_depth=read.get(work[0], decide.Reading()),
            inflight=read.get(work[1], decide.Reading()),
            cap=self.cap_for(body) if self.cap_for else None,
        )
        decision = decide.decide(settings, observation, entry.state)

        if decision.changed:
            try:
                scale = await self.api.patch_scale("Agent", namespace, name, decision.desired)
            except Exception:
                # The history keeps no scale that did not happen; the next pass retries.
                entry.state = decision.state._replace(events=entry.state.events)
                raise
            entry.last_scale_time = _timestamp(wall)
            # A Scale's resourceVersion is the Agent's: the status write below follows it.
            version = (scale.get("metadata") or {}).get("resourceVersion")
            if version:
                body["metadata"]["resourceVersion"] = version
            await self.api.event(
                body, type_="Normal", reason=decision.reason, message=decision.message
            )
        entry.state = decision.state
        await self._write_status(body, entry, decision, now)
        return decision

    async def _read(self, promql: str) -> decide.Reading:
        try:
            return decide.Reading(value=await self.metrics.value(promql))
        except prometheus.MetricError as exc:
            return decide.Reading(error=exc.reason, detail=exc.message)

    async def _forecast(self, promql: str, now: float, lookback: int, lead: int) -> float | None:
        step = max(1.0, lookback / RANGE_POINTS)
        try:
            series = await self.metrics.query_range(
                promql, start=now - lookback, end=now, step=step
            )
        except prometheus.MetricError:
            return None  # no forecast: the reactive decision stands
        if len(series) != 1:
            return None
        return forecast.ahead(series[0].points, lead_seconds=lead)

    async def _write_status(
        self, body: Obj, entry: _Tracked, decision: decide.Decision, now: float
    ) -> None:
        """Write status.autoscaling and the two conditions when the live object differs.

        Compared with the Agent as read at the start of the pass (not with what this
        process wrote last): another writer of the Agent's status (the reconciler) that
        dropped or changed them is corrected on the next pass. The write carries the
        resourceVersion read, so it never overwrites a status written in between (a 409
        Conflict skips it; the next pass tries again with a fresh read).
        """
        old = body.get("status") or {}
        previous = old.get("autoscaling") or {}
        last_scale = entry.last_scale_time or previous.get("lastScaleTime")
        shown = (
            previous.get("desiredReplicas"),
            previous.get("reason"),
            _shown(old, decision.active.type),
            _shown(old, decision.limited.type),
            previous.get("lastScaleTime"),
        )
        said = (
            decision.desired,
            decision.reason,
            decision.active[1:3],
            decision.limited[1:3],
            last_scale,
        )
        if said == shown and now - entry.written_at < self.status_refresh_seconds:
            return
        autoscaling: Obj = {
            "desiredReplicas": decision.desired,
            "reason": decision.reason,
            "message": decision.message,
            "metrics": [_metric_status(r, decision.current) for r in decision.metrics],
        }
        if last_scale:
            autoscaling["lastScaleTime"] = last_scale
        driver = next(
            (r for r in decision.metrics if r.proposal is not None and r.reading.value is not None),
            None,
        )
        if driver is not None and driver.reading.value is not None and decision.current > 0:
            autoscaling["currentMetricValue"] = round(driver.reading.value / decision.current, 3)
        meta = body["metadata"]
        merged = conditions.merge(
            old.get("conditions"),
            [decision.active, decision.limited],
            generation=meta.get("generation"),
        )
        try:
            await self.api.patch_status(
                "Agent",
                meta["namespace"],
                meta["name"],
                {"autoscaling": autoscaling, "conditions": merged},
                resource_version=meta.get("resourceVersion"),
            )
        except Exception as exc:
            if getattr(exc, "status", None) != HTTP_CONFLICT:
                raise
            logger.debug(
                "status of %s/%s changed meanwhile; next pass", meta["namespace"], meta["name"]
            )
            return
        if decision.active.status == conditions.FALSE and entry.active != decision.active[1:3]:
            await self.api.event(
                body,
                type_="Warning",
                reason=decision.active.reason,
                message=decision.active.message,
            )
        entry.active, entry.written_at = decision.active[1:3], now


def _shown(status: Mapping[str, Any], type_: str) -> tuple[str, str] | None:
    found = conditions.find(status.get("conditions"), type_)
    return None if found is None else (str(found.get("status")), str(found.get("reason")))


async def _none() -> None:
    return None


def _timestamp(wall: float) -> str:
    return dt.datetime.fromtimestamp(wall, dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _interval(body: Mapping[str, Any]) -> float | None:
    """The polling interval when the operator autoscales this Agent, else None."""
    try:
        spec = agent_api.AgentSpec.model_validate(body.get("spec") or {})
    except pydantic.ValidationError:
        return None  # the reconciler reports an invalid spec
    a = spec.autoscaling
    if spec.paused or a is None or not a.enabled or a.engine != "operator":
        return None
    if a.max_replicas is None:
        return None
    return float(a.polling_interval_seconds)
