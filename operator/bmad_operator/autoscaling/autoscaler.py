"""The Autoscaler: evaluates every autoscaled Agent on its polling interval.

One shared scheduler (a heap of due times, not a timer per Agent) runs evaluations
when they are due, a few at a time; each Agent's next evaluation is its interval
later, jittered by ±10% so that hundreds of Agents created together do not query
Prometheus in lockstep. One evaluation:

1. reads the Agent from the operator's store (the watch keeps it current; no GET);
2. looks for another autoscaler of the same Agent (an HPA, a ScaledObject not ours):
   if there is one, it reports the conflict and leaves ``spec.replicas`` alone;
3. reads its metrics from Prometheus (and the queue depth and in-flight work when it
   scales to zero; at zero replicas the queue depth from the task stream itself, see
   ``streams``; a range query per metric in predictive mode), every failure kept as a
   reading with its reason;
4. decides (``decide.decide``, pure), capped by the Tenant's replica budget;
5. when the count changes, writes it through the Agent's **scale subresource** (as an
   HPA would) and posts one Event saying why, in words;
6. publishes the Agent's :class:`report.Report` (``status.autoscaling`` and the
   ``ScalingActive`` / ``ScalingLimited`` conditions) when what it says changed, or
   every ``status_refresh_seconds`` to refresh the metric values shown, and queues the
   Agent: the Agent reconciler writes it in its one status write (see ``report``).

The decision's history (recommendations, scale events, idle time) lives here, in
memory; after a restart the decision starts from the current count (see ``decide``).

The controller routes Agent events here through :meth:`watches` (this class takes
``add``/``forget`` like a work queue: an Agent is tracked while it is autoscaled by the
operator) and runs :meth:`run` as a task.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import heapq
import logging
import random
import time
import typing
from collections.abc import Callable, Hashable, Iterator, Mapping
from typing import Any, Protocol

import pydantic

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator import conditions, errors, metrics, watching
from bmad_operator.autoscaling import config as autoscaling_config
from bmad_operator.autoscaling import decide, forecast, prometheus, queries, reasons
from bmad_operator.autoscaling import report as scaling_report

logger = logging.getLogger(__name__)

Obj = dict[str, Any]
Key = tuple[str, str]  # (namespace, name)

JITTER = 0.1
CONCURRENCY = 8
STATUS_REFRESH_SECONDS = 60.0
# A range query's resolution: about 60 points over the lookback, never finer than 1 s.
RANGE_POINTS = 60


class Api(Protocol):
    """What the Autoscaler writes to the API server (``bmad_operator.kube.Kube`` has it)."""

    async def patch_scale(
        self, kind: str, namespace: str | None, name: str, replicas: int
    ) -> Obj: ...

    async def event(self, involved: Obj, *, type_: str, reason: str, message: str) -> None: ...


class Source(Protocol):
    """What the Autoscaler reads: the operator's store, kept current by the watches."""

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None: ...

    def items(self, kind: str) -> Iterator[tuple[Key, Obj]]: ...


class Metrics(Protocol):
    """What the Autoscaler needs of Prometheus (``prometheus.Client`` has it)."""

    async def value(self, promql: str, *, at: float | None = None) -> float: ...

    async def query_range(
        self, promql: str, *, start: float, end: float, step: float
    ) -> list[prometheus.Series]: ...


class Queues(Protocol):
    """The length of an Agent's task stream (``streams.StreamLengths`` has it); None
    when the Agent has no stream (it binds no Redis)."""

    async def length(self, body: Mapping[str, Any]) -> decide.Reading | None: ...


CapFor = Callable[[Obj], decide.Cap | None]
Notify = Callable[[Key], None]


class _Tracked:
    """What the Autoscaler keeps per Agent between evaluations."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.state = decide.State()
        self.active: tuple[str, str] | None = None  # ScalingActive as last published
        self.published_at = -float("inf")
        self.last_scale_time: str | None = None
        # The Agent's resourceVersion and count after our last scale: until the store
        # has caught up with that write, the count is the one written.
        self.scaled: tuple[int, int] | None = None


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


class Autoscaler:
    """Evaluates every tracked Agent on its interval; see the module docstring."""

    def __init__(
        self,
        api: Api,
        metrics: Metrics,
        cache: Source,
        *,
        queues: Queues | None = None,
        notify: Notify | None = None,
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
        self.cache = cache
        self.queues = queues
        self.notify = notify
        self.label_names = label_names
        self.cap_for = cap_for
        self.clock = clock
        self.wall_clock = wall_clock
        self.rng = rng or random.Random()  # noqa: S311 - jitter, not secrets
        self.status_refresh_seconds = status_refresh_seconds
        self.schedule = Schedule()
        self.tracked: dict[Key, _Tracked] = {}
        self.reports: dict[Key, scaling_report.Report] = {}
        self._limit = asyncio.Semaphore(concurrency)
        self._wake = asyncio.Event()

    # --- which Agents: Agent events, routed like a work queue's ------------------------

    def watches(self) -> list[watching.Watch]:
        """Every Agent event comes here (``add``); a deleted Agent is forgotten."""
        return [watching.primary("Agent", on_delete=watching.FORGET)]

    def add(self, key: Hashable) -> None:
        namespace, name = _key(key)
        body = self.cache.get("Agent", namespace, name)
        if body is None:
            self.forget(key)
        else:
            self.track(body)

    def add_after(self, key: Hashable, delay: float) -> None:
        self.add(key)  # the schedule decides when an Agent is evaluated

    def forget(self, key: Hashable) -> None:
        key = _key(key)
        self.tracked.pop(key, None)
        self.reports.pop(key, None)
        self.schedule.remove(key)

    def track(self, body: Mapping[str, Any]) -> bool:
        """Start, keep or stop evaluating an Agent after an event; True when tracked."""
        meta = body.get("metadata") or {}
        key = (str(meta.get("namespace")), str(meta.get("name")))
        interval = _interval(body)
        if interval is None:
            self.forget(key)
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

    def report(self, namespace: str, name: str) -> scaling_report.Report | None:
        """What the Agent's status should show, as last published; None before the
        first evaluation (the status then keeps what it shows)."""
        return self.reports.get((namespace, name))

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

    async def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        """Post an Event on the Agent; a refused one (its namespace is being deleted, a
        quota on events) is logged and never fails the evaluation."""
        try:
            await self.api.event(dict(body), type_=type_, reason=reason, message=message)
        except errors.ApiError as exc:
            logger.warning(
                "could not post event %s on Agent %s: %s", reason, body["metadata"]["name"], exc
            )

    async def _evaluate_and_reschedule(self, key: Key) -> None:
        started = self.clock()
        try:
            async with self._limit:
                await self.evaluate(*key)
        except asyncio.CancelledError:
            raise
        except errors.ApiError as exc:  # the API server said no: its answer says why
            logger.warning("autoscaling %s/%s failed: %s", *key, exc)
        except Exception:  # one Agent's failure must not stop the others
            logger.exception("autoscaling %s/%s failed", *key)
        entry = self.tracked.get(key)
        if entry is not None:
            self.schedule.set(key, started + self._jittered(entry.interval))
            self._wake.set()

    # --- one evaluation ----------------------------------------------------------------

    async def evaluate(self, namespace: str, name: str) -> decide.Decision | None:
        """One pass for one Agent; None when it is gone, no longer autoscaled here, or
        scaled by another autoscaler (then its report says so)."""
        key = (namespace, name)
        body = self.cache.get("Agent", namespace, name)
        interval = None if body is None else _interval(body)
        if body is None or interval is None or body["metadata"].get("deletionTimestamp"):
            self.forget(key)
            return None
        spec = agent_api.AgentSpec.model_validate(body["spec"])
        autoscaling = spec.autoscaling
        assert autoscaling is not None  # _interval checked it
        entry = self.tracked.get(key)
        if entry is None:
            entry = self.tracked[key] = _Tracked(interval)
        if entry.last_scale_time is None:
            shown = (body.get("status") or {}).get("autoscaling") or {}
            entry.last_scale_time = shown.get("lastScaleTime")
        current = self._current(body, entry, spec.replicas)
        now, wall = self.clock(), self.wall_clock()

        scalers = scaling_report.foreign_scalers(
            name,
            self._in(namespace, "HorizontalPodAutoscaler"),
            self._in(namespace, "ScaledObject"),
        )
        if scalers:
            metrics.AUTOSCALER_EVALUATIONS.labels(reason=reasons.CONFLICTING_SCALER).inc()
            await self._publish(body, entry, scaling_report.conflict(scalers, current=current), now)
            return None

        settings = autoscaling_config.from_spec(autoscaling)
        selector = queries.Selector(namespace, name, *self.label_names)
        metric_specs = autoscaling.effective_metrics()
        promql = [queries.for_metric(m, selector) for m in metric_specs]
        work = [queries.queue_depth(selector), queries.inflight(selector)]
        wanted = list(dict.fromkeys(promql + (work if settings.scale_to_zero else [])))
        read = dict(
            zip(wanted, await asyncio.gather(*(self._read(q) for q in wanted)), strict=True)
        )
        queue_depth = read.get(work[0], decide.Reading())
        readings = [read[q] for q in promql]
        if settings.scale_to_zero and current == 0:
            queue_depth, readings = await self._at_zero(body, metric_specs, queue_depth, readings)
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
            current_replicas=current,
            readings=tuple(readings),
            queue_depth=queue_depth,
            inflight=read.get(work[1], decide.Reading()),
            cap=self.cap_for(body) if self.cap_for else None,
        )
        decision = decide.decide(settings, observation, entry.state)
        metrics.AUTOSCALER_EVALUATIONS.labels(reason=decision.reason).inc()

        if decision.changed:
            try:
                scale = await self.api.patch_scale("Agent", namespace, name, decision.desired)
            except Exception:
                # The history keeps no scale that did not happen; the next pass retries.
                entry.state = decision.state._replace(events=entry.state.events)
                raise
            entry.last_scale_time = _timestamp(wall)
            direction = "up" if decision.desired > decision.current else "down"
            metrics.AUTOSCALER_SCALES.labels(direction=direction).inc()
            version = _version((scale.get("metadata") or {}).get("resourceVersion"))
            if version is not None:
                entry.scaled = (version, decision.desired)
            await self._event(body, "Normal", decision.reason, decision.message)
        entry.state = decision.state
        shown = scaling_report.from_decision(decision, last_scale_time=entry.last_scale_time)
        await self._publish(body, entry, shown, now)
        return decision

    def _in(self, namespace: str, kind: str) -> list[Obj]:
        return [obj for (ns, _), obj in self.cache.items(kind) if ns == namespace]

    def _current(self, body: Mapping[str, Any], entry: _Tracked, replicas: int) -> int:
        """spec.replicas, or the count we wrote when the store has not seen it yet."""
        if entry.scaled is not None:
            seen = _version(body["metadata"].get("resourceVersion"))
            if seen is not None and seen < entry.scaled[0]:
                return entry.scaled[1]
            entry.scaled = None
        return replicas

    async def _at_zero(
        self,
        body: Mapping[str, Any],
        metrics: list[agent_api.AutoscalingMetric],
        queue_depth: decide.Reading,
        readings: list[decide.Reading],
    ) -> tuple[decide.Reading, list[decide.Reading]]:
        """At zero replicas no pod exports the queue depth: read the task stream itself.

        The stream's length stands in for the queue depth, and for every queueDepth
        metric that Prometheus has no data for, so the agent wakes to the count the
        queue asks for at once.
        """
        if self.queues is None or queue_depth.value is not None:
            return queue_depth, readings
        stream = await self.queues.length(body)
        if stream is None:
            return queue_depth, readings
        if stream.value is None:
            return stream, readings
        filled = [
            stream if m.type == "queueDepth" and r.value is None else r
            for m, r in zip(metrics, readings, strict=True)
        ]
        return stream, filled

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

    async def _publish(
        self, body: Mapping[str, Any], entry: _Tracked, shown: scaling_report.Report, now: float
    ) -> None:
        """Hand the report to the Agent's status writer when what it says changed (or
        its metric values are old), and say once, as a Warning, why scaling stopped."""
        meta = body["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        before = self.reports.get(key)
        fresh = now - entry.published_at < self.status_refresh_seconds
        if (
            before is not None
            and scaling_report.shown(before) == scaling_report.shown(shown)
            and fresh
        ):
            return
        self.reports[key] = shown
        entry.published_at = now
        if self.notify is not None:
            self.notify(key)
        active = next((c for c in shown.conditions if c.type == reasons.SCALING_ACTIVE), None)
        said = None if active is None else (active.status, active.reason)
        if active is not None and active.status == conditions.FALSE and entry.active != said:
            await self._event(body, "Warning", active.reason, active.message)
        entry.active = said


def _key(key: Hashable) -> Key:
    namespace, name = typing.cast(Key, key)
    return (str(namespace), str(name))


def _version(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


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
