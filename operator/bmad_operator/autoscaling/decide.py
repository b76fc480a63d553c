"""The autoscaler's decision: a pure function with the HorizontalPodAutoscaler's rules.

No I/O and no clock: the caller passes the time (``Observation.now``, seconds on any
clock it keeps using) and the history the previous call returned (``State``), and gets
the replica count, a reason word, a sentence for humans and the new history.

The rules, as the HPA documents and implements them:

1. Per metric, a proposal. Per-replica targets (``AverageValue``): the usage ratio is
   ``value / (current * target)``; inside the tolerance band (``|ratio - 1| <=
   tolerance``) the proposal is the current count, else ``ceil(value / target)``.
   Whole-query targets (``Value``): ratio ``value / target``, proposal
   ``ceil(current * ratio)`` outside the band.
2. The largest proposal across metrics wins. Missing data is handled conservatively:
   with no metric at all the count is held; with some missing, a scale-up that the
   present metrics ask for goes ahead, a scale-down does not.
3. Stabilization: every raw proposal is recorded; the count may rise only to the lowest
   proposal of the scale-up window and fall only to the highest of the scale-down
   window (defaults 0 s and 300 s), so short spikes and dips do not move it.
4. Rate policies per direction (``Pods``: ± value replicas per period; ``Percent``:
   ± value % of the count at the start of the period, the period's earlier changes
   counted from the scale events), ``selectPolicy`` Max (the policy allowing the most
   change), Min (the least) or Disabled (no change in that direction).
5. ``minReplicas`` / ``maxReplicas`` clamps, and an outside cap (a Tenant's replica
   budget). A count already outside the range goes straight back into it.

Beyond the HPA: scale to zero after ``idleSeconds`` with no queued and no in-flight work
(never on missing data), activation from zero when the queue depth exceeds the
activation threshold, and predictive scale-up from a forecast (never down). Unlike the
HPA, zero replicas do not switch autoscaling off for an agent that does not scale to
zero: it is brought back to ``minReplicas`` (``spec.paused`` is the off switch).

After a restart the history is empty; like the HPA, the first call records the current
count as a recommendation, so the scale-down window starts from today's size instead
of dropping at once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal, NamedTuple

from bmad_operator import conditions
from bmad_operator.autoscaling import reasons

TargetType = Literal["AverageValue", "Value"]
PolicyType = Literal["Pods", "Percent"]
SelectPolicy = Literal["Max", "Min", "Disabled"]

# Float noise (1.1 / 0.1 = 11.000000000000002) must not add a replica or leave the band.
_EPSILON = 1e-9


class Metric(NamedTuple):
    """One metric as the decision sees it."""

    name: str  # in words, for messages: "queue depth"
    type: str  # spec.autoscaling.metrics[].type, for the status
    target_type: TargetType
    target: float


class Reading(NamedTuple):
    """What was read for one metric: a value, or the reason there is none."""

    value: float | None = None
    error: str | None = None  # reasons.PROMETHEUS_UNAVAILABLE, QUERY_FAILED, NO_DATA
    detail: str = ""  # the error in words (Prometheus's own text for a bad query)
    forecast: float | None = None  # predictive mode: the value one scale-up time ahead


class Policy(NamedTuple):
    type: PolicyType
    value: int
    period_seconds: int


class Rules(NamedTuple):
    """Stabilization window and rate policies of one direction."""

    window_seconds: int
    policies: tuple[Policy, ...]
    select: SelectPolicy = "Max"


class Config(NamedTuple):
    """spec.autoscaling with every default filled in (see ``config.from_spec``)."""

    min_replicas: int
    max_replicas: int
    metrics: tuple[Metric, ...]
    scale_up: Rules
    scale_down: Rules
    tolerance: float = 0.1
    scale_to_zero: bool = False
    idle_seconds: int = 300
    activation_threshold: float = 0


class Cap(NamedTuple):
    """A limit from outside the Agent, such as its Tenant's replica budget."""

    replicas: int
    reason: str
    message: str  # says where the limit comes from: "the Tenant acme allows 6 replicas"


class Observation(NamedTuple):
    """Everything one evaluation saw."""

    now: float
    current_replicas: int
    readings: tuple[Reading, ...]  # one per Config.metrics, in order
    # The work signals that decide scaling to zero and waking from it.
    queue_depth: Reading = Reading()
    inflight: Reading = Reading()
    cap: Cap | None = None


class Recommendation(NamedTuple):
    at: float
    replicas: int


class ScaleEvent(NamedTuple):
    at: float
    change: int  # > 0: replicas added, < 0: removed


class State(NamedTuple):
    """The history the decision needs, returned updated by every call."""

    recommendations: tuple[Recommendation, ...] = ()
    events: tuple[ScaleEvent, ...] = ()
    idle_since: float | None = None
    # False until the first call, which records the current count as a recommendation.
    seeded: bool = False


class MetricResult(NamedTuple):
    """One metric's reading and what it proposes."""

    metric: Metric
    reading: Reading
    proposal: int | None  # None when the metric has no value
    predicted: bool = False  # the proposal comes from the forecast


class Decision(NamedTuple):
    """The outcome: the count to write, why, and the history to keep.

    ``state`` already holds the scale event of this decision: keep it only when the
    new count was written (on a failed write, call again with the old state).
    """

    current: int
    desired: int
    reason: str
    message: str
    active: conditions.Cond  # ScalingActive
    limited: conditions.Cond  # ScalingLimited
    metrics: tuple[MetricResult, ...]
    state: State

    @property
    def changed(self) -> bool:
        return self.desired != self.current


# --- arithmetic ------------------------------------------------------------------------


def _ceil(x: float) -> int:
    return math.ceil(x - _EPSILON)


def _within(ratio: float, tolerance: float) -> bool:
    return abs(ratio - 1.0) <= tolerance + _EPSILON


def _number(x: float) -> str:
    """48 for 48.0, 2.5 for 2.5, 0.33 for 1/3: what a person would write."""
    if math.isfinite(x) and x == round(x) and abs(x) < 1e15:
        return str(round(x))
    return f"{x:.2f}".rstrip("0").rstrip(".")


def propose(metric: Metric, value: float, current: int, tolerance: float) -> int:
    """The replica count one metric asks for (HPA's per-metric rule)."""
    if metric.target_type == "AverageValue":
        if current == 0:
            return _ceil(value / metric.target)
        if _within(value / (metric.target * current), tolerance):
            return current
        return _ceil(value / metric.target)
    ratio = value / metric.target
    if current == 0:
        return _ceil(ratio)
    if _within(ratio, tolerance):
        return current
    return _ceil(ratio * current)


def evaluate(metric: Metric, reading: Reading, current: int, tolerance: float) -> MetricResult:
    """One metric's proposal; a forecast only ever raises it above the current count."""
    if reading.value is None:
        return MetricResult(metric, reading, None)
    proposal = propose(metric, reading.value, current, tolerance)
    if reading.forecast is not None:
        ahead = propose(metric, reading.forecast, current, tolerance)
        if ahead > max(proposal, current):
            return MetricResult(metric, reading, ahead, predicted=True)
    return MetricResult(metric, reading, proposal)


def _changes(events: Sequence[ScaleEvent], period: int, now: float) -> tuple[int, int]:
    """(added, removed) within the last ``period`` seconds."""
    cutoff = now - period
    added = sum(e.change for e in events if e.at > cutoff and e.change > 0)
    removed = sum(-e.change for e in events if e.at > cutoff and e.change < 0)
    return added, removed


def _period_starts(
    current: int, events: Sequence[ScaleEvent], rules: Rules, now: float
) -> list[tuple[Policy, int]]:
    """Each policy with the replica count at the start of its period (now's count with
    the period's scale events undone)."""
    starts = []
    for policy in rules.policies:
        added, removed = _changes(events, policy.period_seconds, now)
        starts.append((policy, current - added + removed))
    return starts


def scale_up_limit(current: int, events: Sequence[ScaleEvent], rules: Rules, now: float) -> int:
    """The most replicas the scale-up policies allow now."""
    if rules.select == "Disabled" or not rules.policies:
        return current
    proposals = [
        start + policy.value
        if policy.type == "Pods"
        # Rounded up, so a small count still grows (ceil in integers: exact).
        else -(-start * (100 + policy.value) // 100)
        for policy, start in _period_starts(current, events, rules, now)
    ]
    return max(proposals) if rules.select == "Max" else min(proposals)


def scale_down_limit(current: int, events: Sequence[ScaleEvent], rules: Rules, now: float) -> int:
    """The fewest replicas the scale-down policies allow now."""
    if rules.select == "Disabled" or not rules.policies:
        return current
    proposals = [
        start - policy.value if policy.type == "Pods" else start * (100 - policy.value) // 100
        for policy, start in _period_starts(current, events, rules, now)
    ]
    # Max selects the policy that removes the most, i.e. the lowest count.
    return min(proposals) if rules.select == "Max" else max(proposals)


def _policy_words(rules: Rules) -> str:
    parts = [
        f"{p.value} {'pods' if p.type == 'Pods' else '%'} per {p.period_seconds} s"
        for p in rules.policies
    ]
    if len(parts) > 1:
        return f"{' or '.join(parts)}, the {'larger' if rules.select == 'Max' else 'smaller'}"
    return parts[0] if parts else "no policy"


# --- history ---------------------------------------------------------------------------


def _prune(state: State, config: Config, now: float) -> State:
    """Forget what no window or period can look at any more (keeps the state bounded)."""
    keep_for = max(config.scale_up.window_seconds, config.scale_down.window_seconds)
    longest = max(
        (p.period_seconds for p in config.scale_up.policies + config.scale_down.policies),
        default=0,
    )
    recs = tuple(r for r in state.recommendations if r.at > now - keep_for)
    events = tuple(e for e in state.events if e.at > now - longest)
    return state._replace(recommendations=recs, events=events)


def _record(state: State, now: float, replicas: int) -> State:
    return state._replace(recommendations=(*state.recommendations, Recommendation(now, replicas)))


def _scaled(state: State, now: float, current: int, desired: int) -> State:
    if desired == current:
        return state
    return state._replace(events=(*state.events, ScaleEvent(now, desired - current)))


# --- messages --------------------------------------------------------------------------


def _describe(result: MetricResult, current: int) -> str:
    """A metric against its target in words: "queue depth 48 > 4 replicas x target 5"."""
    metric, value = result.metric, result.reading.value
    if value is None:
        detail = f": {result.reading.detail}" if result.reading.detail else ""
        return f"{metric.name}: {result.reading.error}{detail}"
    shown = result.reading.forecast if result.predicted else value
    assert shown is not None
    what = (
        f"{metric.name} forecast {_number(shown)}"
        if result.predicted
        else (f"{metric.name} {_number(shown)}")
    )
    target = _number(metric.target)
    if metric.target_type == "AverageValue":
        if current == 0:
            return f"{what} with target {target} per replica"
        aim = metric.target * current
        op = ">" if shown > aim + _EPSILON else "<" if shown < aim - _EPSILON else "="
        return f"{what} {op} {current} replicas × target {target}"  # noqa: RUF001
    op = ">" if shown > metric.target else "<" if shown < metric.target else "="
    return f"{what} {op} target {target}"


def _change(current: int, desired: int) -> str:
    if desired == current:
        return f"holding {current} replica{'' if current == 1 else 's'}"
    return f"{current} → {desired}"


def _failures_words(results: Sequence[MetricResult]) -> str:
    return "; ".join(_describe(r, 0) for r in results if r.reading.value is None)


def _active(results: Sequence[MetricResult], *extra: tuple[str, Reading]) -> conditions.Cond:
    for name, reading in extra:
        if reading.value is None and reading.error is not None:
            detail = f": {reading.detail}" if reading.detail else ""
            return conditions.Cond(
                reasons.SCALING_ACTIVE,
                conditions.FALSE,
                reading.error,
                f"Cannot read the {name}{detail}",
            )
    failed = [r for r in results if r.reading.value is None]
    if failed:
        first = failed[0].reading
        present = len(results) - len(failed)
        tail = (
            f" ({present} of {len(results)} metrics answered: the autoscaler may scale up "
            "on them, never down)"
            if present
            else " (no metric answered: the replica count is held)"
        )
        return conditions.Cond(
            reasons.SCALING_ACTIVE,
            conditions.FALSE,
            first.error or reasons.NO_DATA,
            f"Cannot read {_failures_words(failed)}{tail}",
        )
    return conditions.Cond(
        reasons.SCALING_ACTIVE,
        conditions.TRUE,
        reasons.VALID_METRICS,
        "Every metric has a value.",
    )


def _not_limited() -> conditions.Cond:
    return conditions.Cond(
        reasons.SCALING_LIMITED,
        conditions.FALSE,
        reasons.DESIRED_WITHIN_RANGE,
        "The desired count is within the allowed range and rate.",
    )


def _limited(reason: str, message: str) -> conditions.Cond:
    return conditions.Cond(reasons.SCALING_LIMITED, conditions.TRUE, reason, message)


# --- the decision ----------------------------------------------------------------------


class _Bounds(NamedTuple):
    floor: int  # fewest replicas while there is work
    ceiling: int
    ceiling_reason: str
    ceiling_words: str


def _bounds(config: Config, cap: Cap | None) -> _Bounds:
    floor = max(1, config.min_replicas) if config.scale_to_zero else config.min_replicas
    if cap is not None and cap.replicas < config.max_replicas:
        return _Bounds(floor, max(cap.replicas, 0), cap.reason, cap.message)
    return _Bounds(
        floor,
        config.max_replicas,
        reasons.TOO_MANY_REPLICAS,
        f"maxReplicas is {config.max_replicas}",
    )


def decide(config: Config, observation: Observation, state: State) -> Decision:
    """The replica count to run now, why, and the history for the next call."""
    if len(observation.readings) != len(config.metrics):
        raise ValueError(f"{len(observation.readings)} readings for {len(config.metrics)} metrics")
    now, current = observation.now, observation.current_replicas
    state = _prune(state, config, now)
    if not state.seeded:
        state = _record(state._replace(seeded=True), now, current)
    results = tuple(
        evaluate(m, r, current, config.tolerance)
        for m, r in zip(config.metrics, observation.readings, strict=True)
    )
    return _Pass(config, observation, results, _bounds(config, observation.cap)).run(state)


class _Pass(NamedTuple):
    """One evaluation: its inputs, and the steps of the decision as methods."""

    config: Config
    observation: Observation
    results: tuple[MetricResult, ...]
    bounds: _Bounds

    @property
    def now(self) -> float:
        return self.observation.now

    @property
    def current(self) -> int:
        return self.observation.current_replicas

    def done(
        self,
        desired: int,
        reason: str,
        message: str,
        *,
        state: State,
        limited: conditions.Cond | None = None,
        active: conditions.Cond | None = None,
    ) -> Decision:
        return Decision(
            current=self.current,
            desired=desired,
            reason=reason,
            message=message,
            active=active or _active(self.results),
            limited=limited or _not_limited(),
            metrics=self.results,
            state=_scaled(state, self.now, self.current, desired),
        )

    def run(self, state: State) -> Decision:
        config, bounds, now, current = self.config, self.bounds, self.now, self.current
        if current == 0 and config.scale_to_zero:
            return self.from_zero(state)

        # A count outside the range goes straight back into it, without windows or rates.
        if current > bounds.ceiling:
            message = (
                f"{current} replicas, but {bounds.ceiling_words}: "
                f"{_change(current, bounds.ceiling)}"
            )
            reason = (
                reasons.ABOVE_MAX_REPLICAS
                if bounds.ceiling_reason == reasons.TOO_MANY_REPLICAS
                else bounds.ceiling_reason
            )
            limited = _limited(bounds.ceiling_reason, message)
            return self.done(bounds.ceiling, reason, message, state=state, limited=limited)
        if current < bounds.floor:
            message = (
                f"{current} replicas, but minReplicas is {config.min_replicas}"
                f"{' (at least one while there is work)' if config.scale_to_zero else ''}: "
                f"{_change(current, bounds.floor)}"
            )
            limited = _limited(reasons.TOO_FEW_REPLICAS, message)
            return self.done(
                bounds.floor, reasons.BELOW_MIN_REPLICAS, message, state=state, limited=limited
            )

        # Scale to zero: idle means no queued and no in-flight work, both known.
        if config.scale_to_zero:
            idle = self.observation.queue_depth.value == 0 and self.observation.inflight.value == 0
            since = (state.idle_since if state.idle_since is not None else now) if idle else None
            state = state._replace(idle_since=since)
            if since is not None and now - since >= config.idle_seconds:
                message = (
                    f"no queued or in-flight work for {_number(now - since)} s "
                    f"(idleSeconds {config.idle_seconds}): {_change(current, 0)}"
                )
                return self.done(0, reasons.SCALED_TO_ZERO, message, state=_record(state, now, 0))

        valid = [r for r in self.results if r.proposal is not None]
        failed = [r for r in self.results if r.proposal is None]
        if not valid:
            first = failed[0].reading if failed else Reading(error=reasons.NO_DATA)
            message = (
                f"no metric could be read ({_failures_words(failed)}): {_change(current, current)}"
            )
            return self.done(current, first.error or reasons.NO_DATA, message, state=state)
        driver = max(valid, key=lambda r: r.proposal or 0)
        raw = driver.proposal or 0
        if failed and raw < current:
            message = (
                f"{_describe(driver, current)} would allow {raw}, but "
                f"{_failures_words(failed)}; never scaling down on missing metrics: "
                f"{_change(current, current)}"
            )
            reason = failed[0].reading.error or reasons.NO_DATA
            return self.done(current, reason, message, state=state)

        # Stabilization: up to the lowest proposal of the up window, down to the highest
        # of the down window (both windows include this proposal).
        up_cut = now - config.scale_up.window_seconds
        down_cut = now - config.scale_down.window_seconds
        up_bound = min([raw, *(r.replicas for r in state.recommendations if r.at > up_cut)])
        down_bound = max([raw, *(r.replicas for r in state.recommendations if r.at > down_cut)])
        stabilized = min(max(current, up_bound), down_bound)
        state = _record(state, now, raw)
        if stabilized > current:
            return self.up(state, driver, raw, stabilized)
        if stabilized < current:
            return self.down(state, driver, raw, stabilized)
        return self.hold(state, driver, raw, (up_bound, down_bound))

    def hold(
        self, state: State, driver: MetricResult, raw: int, window_bounds: tuple[int, int]
    ) -> Decision:
        config, current = self.config, self.current
        words = _describe(driver, current)
        if raw > current:
            reason = reasons.SCALE_UP_STABILIZED
            message = (
                f"{words} asks for {raw}, but the lowest recommendation of the last "
                f"{config.scale_up.window_seconds} s is {window_bounds[0]}: "
                f"{_change(current, current)}"
            )
        elif raw < current:
            reason = reasons.SCALE_DOWN_STABILIZED
            message = (
                f"{words} asks for {raw}, but the highest recommendation of the last "
                f"{config.scale_down.window_seconds} s is {window_bounds[1]}: "
                f"{_change(current, current)}"
            )
        elif all(
            r.proposal == current and _in_band(r, current, config.tolerance)
            for r in self.results
            if r.proposal is not None
        ):
            reason = reasons.WITHIN_TOLERANCE
            message = (
                f"{words}, within the tolerance of {_number(config.tolerance * 100)}%: "
                f"{_change(current, current)}"
            )
        else:
            reason = reasons.STEADY
            message = f"{words} asks for {raw}: {_change(current, current)}"
        return self.done(current, reason, message, state=state)

    def up(self, state: State, driver: MetricResult, raw: int, stabilized: int) -> Decision:
        config, bounds, current = self.config, self.bounds, self.current
        rate = max(scale_up_limit(current, state.events, config.scale_up, self.now), current)
        words = _describe(driver, current)
        base = reasons.PREDICTED_SCALE_UP if driver.predicted else reasons.ABOVE_TARGET
        if stabilized != raw:
            words += (
                f" asks for {raw}; the lowest recommendation of the last "
                f"{config.scale_up.window_seconds} s is {stabilized}"
            )
        if stabilized <= min(rate, bounds.ceiling):
            reason = base if stabilized == raw else reasons.SCALE_UP_STABILIZED
            message = f"{words}: {_change(current, stabilized)}"
            return self.done(stabilized, reason, message, state=state)
        if rate < bounds.ceiling:
            desired = rate
            if config.scale_up.select == "Disabled":
                reason = reasons.SCALE_UP_DISABLED
                why = "scaling up is disabled (behavior.scaleUp.selectPolicy: Disabled)"
            else:
                reason = reasons.SCALE_UP_LIMIT
                why = f"the scale-up rate ({_policy_words(config.scale_up)}) allows {rate} now"
        else:
            desired = bounds.ceiling
            reason = bounds.ceiling_reason
            why = bounds.ceiling_words
        message = f"{words}; {why}: {_change(current, desired)}"
        return self.done(desired, reason, message, state=state, limited=_limited(reason, message))

    def down(self, state: State, driver: MetricResult, raw: int, stabilized: int) -> Decision:
        config, bounds, current = self.config, self.bounds, self.current
        rate = min(scale_down_limit(current, state.events, config.scale_down, self.now), current)
        words = _describe(driver, current)
        if stabilized != raw:
            words += (
                f" asks for {raw}; the highest recommendation of the last "
                f"{config.scale_down.window_seconds} s is {stabilized}"
            )
        if stabilized >= max(rate, bounds.floor):
            reason = reasons.BELOW_TARGET if stabilized == raw else reasons.SCALE_DOWN_STABILIZED
            message = f"{words}: {_change(current, stabilized)}"
            return self.done(stabilized, reason, message, state=state)
        if rate > bounds.floor:
            desired = rate
            if config.scale_down.select == "Disabled":
                reason = reasons.SCALE_DOWN_DISABLED
                why = "scaling down is disabled (behavior.scaleDown.selectPolicy: Disabled)"
            else:
                reason = reasons.SCALE_DOWN_LIMIT
                why = f"the scale-down rate ({_policy_words(config.scale_down)}) allows {rate} now"
        else:
            desired = bounds.floor
            reason = reasons.TOO_FEW_REPLICAS
            if config.scale_to_zero:
                why = (
                    f"at least {bounds.floor} while there is work (zero after "
                    f"{config.idle_seconds} s idle)"
                )
            else:
                why = f"minReplicas is {config.min_replicas}"
        message = f"{words}; {why}: {_change(current, desired)}"
        return self.done(desired, reason, message, state=state, limited=_limited(reason, message))

    def from_zero(self, state: State) -> Decision:
        """At zero replicas: wake when more tasks wait than the activation threshold."""
        config, bounds, now = self.config, self.bounds, self.now
        q = self.observation.queue_depth
        state = state._replace(idle_since=None)
        if q.value is None:
            detail = f": {q.detail}" if q.detail else ""
            return self.done(
                0,
                q.error or reasons.NO_DATA,
                f"cannot read the queue depth ({q.error}{detail}): {_change(0, 0)}",
                state=state,
                active=_active(self.results, ("queue depth", q)),
            )
        threshold = _number(config.activation_threshold)
        if q.value <= config.activation_threshold:
            message = (
                f"queue depth {_number(q.value)} ≤ activation threshold {threshold}: "
                f"{_change(0, 0)}"
            )
            return self.done(0, reasons.IDLE, message, state=_record(state, now, 0))
        proposals = [r.proposal for r in self.results if r.proposal is not None]
        raw = max([bounds.floor, *proposals])
        # Waking skips the scale-up window (its recommendations are the zeros of the idle
        # time); the rate policies still apply, but never below one replica.
        rate = max(scale_up_limit(0, state.events, config.scale_up, now), bounds.floor)
        desired = min(raw, rate, bounds.ceiling)
        state = _record(state, now, raw)
        message = (
            f"queue depth {_number(q.value)} > activation threshold {threshold}: "
            f"{_change(0, desired)}"
        )
        if desired == raw:
            return self.done(desired, reasons.ACTIVATED, message, state=state)
        if desired == 0:  # an outside cap of zero: tasks wait, and the status says why
            message = f"{message} ({bounds.ceiling_words})"
            limited = _limited(bounds.ceiling_reason, message)
            return self.done(0, bounds.ceiling_reason, message, state=state, limited=limited)
        if desired == bounds.ceiling and bounds.ceiling < rate:
            reason, why = bounds.ceiling_reason, bounds.ceiling_words
        else:
            reason = reasons.SCALE_UP_LIMIT
            why = f"the scale-up rate ({_policy_words(config.scale_up)}) allows {rate} now"
        limited = _limited(reason, f"the metrics ask for {raw}; {why}")
        message = f"{message} (the metrics ask for {raw}; {why})"
        return self.done(desired, reasons.ACTIVATED, message, state=state, limited=limited)


def _in_band(result: MetricResult, current: int, tolerance: float) -> bool:
    value = result.reading.value
    if value is None or current == 0:
        return False
    metric = result.metric
    if metric.target_type == "AverageValue":
        return _within(value / (metric.target * current), tolerance)
    return _within(value / metric.target, tolerance)
