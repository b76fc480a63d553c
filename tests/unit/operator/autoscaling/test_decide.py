"""The autoscaling decision against a table of the HPA's documented behaviour.

Every case names where the behaviour comes from: the HPA documentation's algorithm
details ("ratio ... tolerance"), its behaviour examples (stabilization windows, the
Percent/Pods policies, selectPolicy, "80 replicas, 10% per minute"), or the HPA
controller's rules (missing metrics, min/max, the initial recommendation), plus the
scale-to-zero and activation rules issue 12 adds.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from bmad_operator.autoscaling import config as autoscaling_config
from bmad_operator.autoscaling import decide, reasons

pytestmark = pytest.mark.unit

NOW = 10_000.0
QUEUE = decide.Metric("queue depth", "queueDepth", "AverageValue", 5)
INFLIGHT = decide.Metric("in-flight requests", "inflight", "AverageValue", 2)
RPS = decide.Metric("promql metrics[0]", "promql", "Value", 100)
UP = decide.Rules(0, autoscaling_config.DEFAULT_SCALE_UP_POLICIES)
DOWN = decide.Rules(300, autoscaling_config.DEFAULT_SCALE_DOWN_POLICIES)
NO_WINDOW_DOWN = DOWN._replace(window_seconds=0)
GENEROUS_UP = decide.Rules(0, (decide.Policy("Pods", 1000, 15),))


def config(**changes: object) -> decide.Config:
    base = decide.Config(
        min_replicas=1, max_replicas=10, metrics=(QUEUE,), scale_up=UP, scale_down=DOWN
    )
    return base._replace(**changes)


def value(x: float, forecast: float | None = None) -> decide.Reading:
    return decide.Reading(value=x, forecast=forecast)


def missing(reason: str = reasons.PROMETHEUS_UNAVAILABLE) -> decide.Reading:
    return decide.Reading(error=reason, detail="connection refused")


def recs(*pairs: tuple[float, int]) -> tuple[decide.Recommendation, ...]:
    """Recommendations ``seconds ago -> replicas``."""
    return tuple(decide.Recommendation(NOW - ago, n) for ago, n in pairs)


def events(*pairs: tuple[float, int]) -> tuple[decide.ScaleEvent, ...]:
    return tuple(decide.ScaleEvent(NOW - ago, change) for ago, change in pairs)


@dataclass
class Case:
    id: str
    current: int
    readings: tuple[decide.Reading, ...]
    desired: int
    reason: str
    config: decide.Config = field(default_factory=config)
    state: decide.State = field(default_factory=decide.State)
    limited: str | None = None  # ScalingLimited reason when True
    active: str = reasons.VALID_METRICS  # ScalingActive reason
    queue: decide.Reading = field(default_factory=decide.Reading)
    inflight: decide.Reading = field(default_factory=decide.Reading)
    cap: decide.Cap | None = None


def history(
    recommendations: tuple[decide.Recommendation, ...] = (),
    scale_events: tuple[decide.ScaleEvent, ...] = (),
    idle_since: float | None = None,
) -> decide.State:
    """The state of an autoscaler that has been running (not just restarted)."""
    return decide.State(recommendations, scale_events, idle_since, seeded=True)


# A history that holds nothing back: one recommendation equal to the current count.
def steady(current: int) -> decide.State:
    return history(recs((1, current)))


CASES = [
    # --- the ratio and the tolerance (HPA docs: algorithm details) ---------------------
    Case("tolerance-upper-edge-holds", 4, (value(22),), 4, reasons.WITHIN_TOLERANCE,
         state=steady(4)),
    Case("just-above-tolerance-scales-up", 4, (value(22.2),), 5, reasons.ABOVE_TARGET,
         state=steady(4)),
    Case("tolerance-lower-edge-holds", 4, (value(18),), 4, reasons.WITHIN_TOLERANCE,
         config=config(scale_down=NO_WINDOW_DOWN), state=steady(4)),
    Case("below-tolerance-same-count-after-rounding", 4, (value(17),), 4, reasons.STEADY,
         config=config(scale_down=NO_WINDOW_DOWN), state=steady(4)),
    Case("below-tolerance-scales-down", 4, (value(14),), 3, reasons.BELOW_TARGET,
         config=config(scale_down=NO_WINDOW_DOWN), state=steady(4)),
    Case("zero-tolerance-reacts-to-5-percent", 4, (value(21),), 5, reasons.ABOVE_TARGET,
         config=config(tolerance=0.0), state=steady(4)),
    Case("wide-tolerance-ignores-40-percent", 4, (value(28),), 4, reasons.WITHIN_TOLERANCE,
         config=config(tolerance=0.5), state=steady(4)),
    Case("value-target-double-metric-doubles-replicas", 3, (value(200),), 6,
         reasons.ABOVE_TARGET, config=config(metrics=(RPS,)), state=steady(3)),
    Case("value-target-half-metric-halves-replicas", 6, (value(50),), 3, reasons.BELOW_TARGET,
         config=config(metrics=(RPS,), scale_down=NO_WINDOW_DOWN), state=steady(6)),
    # --- min / max / outside caps -------------------------------------------------------
    Case("max-clamps", 8, (value(100),), 10, reasons.TOO_MANY_REPLICAS,
         state=steady(8), limited=reasons.TOO_MANY_REPLICAS),
    Case("min-clamps", 3, (value(0),), 2, reasons.TOO_FEW_REPLICAS,
         config=config(min_replicas=2, scale_down=NO_WINDOW_DOWN), state=steady(3),
         limited=reasons.TOO_FEW_REPLICAS),
    Case("above-max-goes-straight-to-max", 12, (value(100),), 10, reasons.ABOVE_MAX_REPLICAS,
         limited=reasons.TOO_MANY_REPLICAS),
    Case("below-min-goes-straight-to-min", 1, (value(0),), 3, reasons.BELOW_MIN_REPLICAS,
         config=config(min_replicas=3), limited=reasons.TOO_FEW_REPLICAS),
    Case("zero-without-scale-to-zero-goes-to-min", 0, (value(0),), 2,
         reasons.BELOW_MIN_REPLICAS, config=config(min_replicas=2),
         limited=reasons.TOO_FEW_REPLICAS),
    Case("tenant-budget-caps-below-max", 4, (value(100),), 6, reasons.TENANT_LIMIT,
         config=config(scale_up=GENEROUS_UP), state=steady(4), limited=reasons.TENANT_LIMIT,
         cap=decide.Cap(6, reasons.TENANT_LIMIT, "the Tenant acme allows 6 replicas")),
    Case("above-tenant-budget-goes-down-to-it", 8, (value(40),), 6, reasons.TENANT_LIMIT,
         limited=reasons.TENANT_LIMIT,
         cap=decide.Cap(6, reasons.TENANT_LIMIT, "the Tenant acme allows 6 replicas")),
    # --- several metrics: the largest proposal wins --------------------------------------
    Case("largest-of-two-proposals", 4, (value(15), value(14)), 7, reasons.ABOVE_TARGET,
         config=config(metrics=(QUEUE, INFLIGHT), scale_up=GENEROUS_UP), state=steady(4)),
    Case("one-up-one-down-goes-up", 4, (value(5), value(12)), 6, reasons.ABOVE_TARGET,
         config=config(metrics=(QUEUE, INFLIGHT)), state=steady(4)),
    # --- missing metrics: never down, up on what answered --------------------------------
    Case("all-missing-holds", 4, (missing(),), 4, reasons.PROMETHEUS_UNAVAILABLE,
         state=steady(4), active=reasons.PROMETHEUS_UNAVAILABLE),
    Case("partial-missing-never-scales-down", 4, (value(0), missing(reasons.QUERY_FAILED)), 4,
         reasons.QUERY_FAILED, config=config(metrics=(QUEUE, INFLIGHT),
                                             scale_down=NO_WINDOW_DOWN),
         state=steady(4), active=reasons.QUERY_FAILED),
    Case("partial-missing-still-scales-up", 4, (value(40), missing(reasons.NO_DATA)), 8,
         reasons.ABOVE_TARGET, config=config(metrics=(QUEUE, INFLIGHT)), state=steady(4),
         active=reasons.NO_DATA),
    # --- stabilization windows (HPA docs: stabilization window) -------------------------
    Case("down-window-holds-the-highest-recent", 8, (value(10),), 8,
         reasons.SCALE_DOWN_STABILIZED, state=history(recs((200, 8), (100, 8)))),
    Case("down-window-steps-to-the-highest-recent", 8, (value(10),), 6,
         reasons.SCALE_DOWN_STABILIZED, state=history(recs((301, 8), (250, 6), (100, 4)))),
    Case("down-window-expired-scales-down", 8, (value(10),), 2, reasons.BELOW_TARGET,
         state=history(recs((301, 8)))),
    Case("up-window-takes-the-lowest-recent", 4, (value(50),), 5, reasons.SCALE_UP_STABILIZED,
         config=config(scale_up=UP._replace(window_seconds=60)),
         state=history(recs((30, 5)))),
    Case("up-window-holds-when-a-recent-one-was-lower", 4, (value(50),), 4,
         reasons.SCALE_UP_STABILIZED, config=config(scale_up=UP._replace(window_seconds=60)),
         state=history(recs((30, 3)))),
    Case("restart-starts-the-down-window-from-today", 8, (value(10),), 8,
         reasons.SCALE_DOWN_STABILIZED),
    # --- rate policies (HPA docs: scaling policies, default behaviour) -------------------
    Case("default-up-is-4-pods-or-double-from-1", 1, (value(50),), 5, reasons.SCALE_UP_LIMIT,
         state=steady(1), limited=reasons.SCALE_UP_LIMIT),
    Case("default-up-is-double-from-8", 8, (value(500),), 16, reasons.SCALE_UP_LIMIT,
         config=config(max_replicas=100), state=steady(8), limited=reasons.SCALE_UP_LIMIT),
    Case("pods-policy-adds-at-most-value", 4, (value(50),), 6, reasons.SCALE_UP_LIMIT,
         config=config(scale_up=decide.Rules(0, (decide.Policy("Pods", 2, 60),))),
         state=steady(4), limited=reasons.SCALE_UP_LIMIT),
    Case("pods-policy-counts-changes-in-the-period", 4, (value(50),), 4, reasons.SCALE_UP_LIMIT,
         config=config(scale_up=decide.Rules(0, (decide.Policy("Pods", 2, 60),))),
         state=history(recs((1, 4)), events((30, 2))), limited=reasons.SCALE_UP_LIMIT),
    Case("pods-policy-forgets-changes-before-the-period", 4, (value(50),), 6,
         reasons.SCALE_UP_LIMIT,
         config=config(scale_up=decide.Rules(0, (decide.Policy("Pods", 2, 60),))),
         state=history(recs((1, 4)), events((61, 2))), limited=reasons.SCALE_UP_LIMIT),
    Case("percent-900-multiplies-by-10", 1, (value(5000),), 10, reasons.SCALE_UP_LIMIT,
         config=config(max_replicas=1000,
                       scale_up=decide.Rules(0, (decide.Policy("Percent", 900, 60),))),
         state=steady(1), limited=reasons.SCALE_UP_LIMIT),
    Case("percent-10-per-minute-from-80", 80, (value(50),), 72, reasons.SCALE_DOWN_LIMIT,
         config=config(max_replicas=100, scale_down=decide.Rules(
             0, (decide.Policy("Percent", 10, 60),))),
         state=steady(80), limited=reasons.SCALE_DOWN_LIMIT),
    Case("percent-10-from-72-rounds-the-change-up", 72, (value(50),), 64,
         reasons.SCALE_DOWN_LIMIT, config=config(max_replicas=100, scale_down=decide.Rules(
             0, (decide.Policy("Percent", 10, 60),))),
         state=history(recs((1, 72)), events((61, -8))), limited=reasons.SCALE_DOWN_LIMIT),
    Case("select-max-takes-the-bigger-drop", 80, (value(50),), 72, reasons.SCALE_DOWN_LIMIT,
         config=config(max_replicas=100, scale_down=decide.Rules(0, (
             decide.Policy("Percent", 10, 60), decide.Policy("Pods", 5, 60)), "Max")),
         state=steady(80), limited=reasons.SCALE_DOWN_LIMIT),
    Case("select-min-takes-the-smaller-drop", 80, (value(50),), 75, reasons.SCALE_DOWN_LIMIT,
         config=config(max_replicas=100, scale_down=decide.Rules(0, (
             decide.Policy("Percent", 10, 60), decide.Policy("Pods", 5, 60)), "Min")),
         state=steady(80), limited=reasons.SCALE_DOWN_LIMIT),
    Case("pods-policy-below-40-replicas-drops-4", 30, (value(5),), 26, reasons.SCALE_DOWN_LIMIT,
         config=config(max_replicas=100, scale_down=decide.Rules(0, (
             decide.Policy("Pods", 4, 60), decide.Policy("Percent", 10, 60)), "Max")),
         state=steady(30), limited=reasons.SCALE_DOWN_LIMIT),
    Case("scale-down-disabled", 8, (value(10),), 8, reasons.SCALE_DOWN_DISABLED,
         config=config(scale_down=decide.Rules(0, DOWN.policies, "Disabled")),
         state=steady(8), limited=reasons.SCALE_DOWN_DISABLED),
    Case("scale-up-disabled", 2, (value(50),), 2, reasons.SCALE_UP_DISABLED,
         config=config(scale_up=decide.Rules(0, UP.policies, "Disabled")),
         state=steady(2), limited=reasons.SCALE_UP_DISABLED),
    Case("scale-up-limit-counts-recent-scale-downs", 5, (value(45),), 9, reasons.ABOVE_TARGET,
         config=config(scale_up=decide.Rules(0, (decide.Policy("Pods", 2, 60),))),
         state=history(recs((1, 5)), events((30, -3)))),
    # --- scale to zero and activation (issue 12) -----------------------------------------
    Case("idle-not-long-enough-keeps-one", 1, (value(0),), 1, reasons.SCALE_DOWN_STABILIZED,
         config=config(min_replicas=0, scale_to_zero=True),
         state=history(recs((1, 1)), idle_since=NOW - 100),
         queue=value(0), inflight=value(0)),
    Case("idle-for-idle-seconds-goes-to-zero", 2, (value(0),), 0, reasons.SCALED_TO_ZERO,
         config=config(min_replicas=0, scale_to_zero=True),
         state=history(recs((1, 2)), idle_since=NOW - 300),
         queue=value(0), inflight=value(0)),
    Case("in-flight-work-is-not-idle", 1, (value(0),), 1, reasons.SCALE_DOWN_STABILIZED,
         config=config(min_replicas=0, scale_to_zero=True),
         state=history(recs((1, 1)), idle_since=NOW - 1000),
         queue=value(0), inflight=value(1)),
    Case("unknown-work-is-not-idle", 1, (missing(),), 1, reasons.PROMETHEUS_UNAVAILABLE,
         config=config(min_replicas=0, scale_to_zero=True),
         state=history(recs((1, 1)), idle_since=NOW - 1000),
         queue=missing(), inflight=value(0), active=reasons.PROMETHEUS_UNAVAILABLE),
    Case("at-zero-nothing-queued-stays", 0, (value(0),), 0, reasons.IDLE,
         config=config(min_replicas=0, scale_to_zero=True), queue=value(0)),
    Case("at-zero-first-task-wakes-one", 0, (value(1),), 1, reasons.ACTIVATED,
         config=config(min_replicas=0, scale_to_zero=True), queue=value(1)),
    Case("at-zero-below-activation-threshold-stays", 0, (value(3),), 0, reasons.IDLE,
         config=config(min_replicas=0, scale_to_zero=True, activation_threshold=5),
         queue=value(3)),
    Case("at-zero-above-activation-threshold-wakes", 0, (value(6),), 2, reasons.ACTIVATED,
         config=config(min_replicas=0, scale_to_zero=True, activation_threshold=5),
         queue=value(6)),
    Case("at-zero-a-burst-wakes-at-the-scale-up-rate", 0, (value(48),), 4, reasons.ACTIVATED,
         config=config(min_replicas=0, scale_to_zero=True), queue=value(48),
         limited=reasons.SCALE_UP_LIMIT),
    Case("at-zero-older-scale-to-zero-wakes-to-min", 0, (value(1),), 2, reasons.ACTIVATED,
         config=config(min_replicas=2, scale_to_zero=True), queue=value(1)),
    Case("at-zero-a-zero-budget-keeps-it-at-zero", 0, (value(4),), 0, reasons.TENANT_LIMIT,
         config=config(min_replicas=0, scale_to_zero=True), queue=value(4),
         limited=reasons.TENANT_LIMIT,
         cap=decide.Cap(0, reasons.TENANT_LIMIT, "the Tenant acme allows no more replicas")),
    Case("at-zero-unknown-queue-stays", 0, (missing(),), 0, reasons.PROMETHEUS_UNAVAILABLE,
         config=config(min_replicas=0, scale_to_zero=True), queue=missing(),
         active=reasons.PROMETHEUS_UNAVAILABLE),
    # --- predictive: up early, never down ------------------------------------------------
    Case("forecast-above-scales-up-early", 4, (value(20, forecast=40),), 8,
         reasons.PREDICTED_SCALE_UP, state=steady(4)),
    Case("forecast-below-never-scales-down", 4, (value(20, forecast=2),), 4,
         reasons.WITHIN_TOLERANCE, state=steady(4)),
    Case("forecast-below-the-reactive-proposal-is-ignored", 4, (value(40, forecast=25),), 8,
         reasons.ABOVE_TARGET, state=steady(4)),
]  # fmt: skip


def test_the_table_has_at_least_25_cases() -> None:
    assert len(CASES) >= 25
    assert len({case.id for case in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
def test_decision(case: Case) -> None:
    observation = decide.Observation(
        now=NOW,
        current_replicas=case.current,
        readings=case.readings,
        queue_depth=case.queue,
        inflight=case.inflight,
        cap=case.cap,
    )
    decision = decide.decide(case.config, observation, case.state)
    assert (decision.desired, decision.reason) == (case.desired, case.reason), decision.message
    if case.limited is None:
        assert decision.limited.status == "False", decision.limited
    else:
        assert (decision.limited.status, decision.limited.reason) == ("True", case.limited)
    assert decision.active.reason == case.active, decision.active
    assert decision.active.status == ("True" if case.active == reasons.VALID_METRICS else "False")
    assert decision.message
    # The history records the change when there is one, and only then.
    new_events = set(decision.state.events) - set(case.state.events)
    if decision.desired != case.current:
        assert new_events == {decide.ScaleEvent(NOW, decision.desired - case.current)}
    else:
        assert not new_events


# --- sequences: the decision applied over time ----------------------------------------


def simulate(cfg: decide.Config, current: int, values: list[float], *, every: float) -> list[int]:
    """Apply the decision once per `every` seconds to a metric that takes `values`."""
    state = decide.State()
    counts = [current]
    for i, x in enumerate(values):
        observation = decide.Observation(
            now=NOW + i * every, current_replicas=current, readings=(value(x),)
        )
        decision = decide.decide(cfg, observation, state)
        state, current = decision.state, decision.desired
        counts.append(current)
    return counts


def test_docs_example_80_replicas_down_by_10_percent_or_4_pods_per_minute() -> None:
    # Pods 4 or Percent 10 per minute, the larger change: 10% while above 40, 4 below.
    cfg = config(
        max_replicas=100,
        scale_down=decide.Rules(
            0, (decide.Policy("Pods", 4, 60), decide.Policy("Percent", 10, 60))
        ),
    )
    counts = simulate(cfg, 80, [50.0] * 20, every=60)
    assert counts[:16] == [80, 72, 64, 57, 51, 45, 40, 36, 32, 28, 24, 20, 16, 12, 10, 10]


def test_a_policy_period_spreads_one_change_over_several_evaluations() -> None:
    # Evaluated every 15 s, the 10%-per-minute policy still removes 8 per minute.
    cfg = config(max_replicas=100, scale_down=decide.Rules(0, (decide.Policy("Percent", 10, 60),)))
    counts = simulate(cfg, 80, [50.0] * 9, every=15)
    assert counts == [80, 72, 72, 72, 72, 64, 64, 64, 64, 57]


def test_docs_example_900_percent_multiplies_by_ten_per_period() -> None:
    cfg = config(max_replicas=1000, scale_up=decide.Rules(0, (decide.Policy("Percent", 900, 60),)))
    assert simulate(cfg, 1, [5000.0] * 4, every=60) == [1, 10, 100, 1000, 1000]


def test_a_dip_shorter_than_the_down_window_never_scales_down() -> None:
    # 10 minutes at 6 replicas' worth, a 4-minute dip to nothing, back up: no change.
    values = [30.0] * 60 + [0.0] * 24 + [30.0] * 60
    counts = simulate(config(), 6, values, every=10)
    assert set(counts) == {6}


def test_a_long_dip_scales_down_once_the_window_has_passed() -> None:
    values = [30.0] * 30 + [0.0] * 40
    counts = simulate(config(), 6, values, every=10)
    first_down = counts.index(1)
    # 30 polls of load, then the 300 s window (30 polls) of zeros must pass first.
    assert first_down > 30 + 29
    assert counts[first_down:] == [1] * (len(counts) - first_down)


def test_the_history_stays_bounded() -> None:
    cfg = config()
    state = decide.State()
    current = 2
    for i in range(5000):
        x = 40.0 if (i // 50) % 2 else 0.0
        decision = decide.decide(
            cfg,
            decide.Observation(now=NOW + 5 * i, current_replicas=current, readings=(value(x),)),
            state,
        )
        state, current = decision.state, decision.desired
    # 300 s of recommendations at one per 5 s, and the events of the last 15 s.
    assert len(state.recommendations) <= 61
    assert len(state.events) <= 3


# --- messages and details -------------------------------------------------------------


def test_the_message_says_the_decision_in_words() -> None:
    cfg = config(scale_up=GENEROUS_UP)
    observation = decide.Observation(now=NOW, current_replicas=4, readings=(value(48),))
    decision = decide.decide(cfg, observation, steady(4))
    assert decision.message == "queue depth 48 > 4 replicas × target 5: 4 → 10"  # noqa: RUF001
    assert decision.changed


def test_a_limited_message_names_the_limit() -> None:
    observation = decide.Observation(now=NOW, current_replicas=4, readings=(value(48),))
    decision = decide.decide(config(), observation, steady(4))
    assert decision.desired == 8
    assert "the scale-up rate (100 % per 15 s or 4 pods per 15 s, the larger) allows 8" in (
        decision.message
    )
    assert decision.limited.message == decision.message


def test_missing_metrics_are_named_with_prometheus_text() -> None:
    reading = decide.Reading(error=reasons.QUERY_FAILED, detail='1:5: parse error: unexpected "}"')
    observation = decide.Observation(now=NOW, current_replicas=3, readings=(reading,))
    decision = decide.decide(config(), observation, steady(3))
    assert decision.desired == 3
    assert decision.active.reason == reasons.QUERY_FAILED
    assert 'queue depth: QueryFailed: 1:5: parse error: unexpected "}"' in decision.active.message


def test_idle_time_is_kept_while_idle_and_reset_by_work() -> None:
    cfg = config(min_replicas=0, scale_to_zero=True, idle_seconds=60)
    state = history(recs((1, 1)))
    idle = decide.Observation(
        now=NOW, current_replicas=1, readings=(value(0),), queue_depth=value(0),
        inflight=value(0),
    )  # fmt: skip
    first = decide.decide(cfg, idle, state)
    assert first.state.idle_since == NOW
    later = decide.decide(cfg, idle._replace(now=NOW + 30), first.state)
    assert later.state.idle_since == NOW
    assert later.desired == 1
    busy = decide.decide(cfg, idle._replace(now=NOW + 40, inflight=value(1)), later.state)
    assert busy.state.idle_since is None
    again = decide.decide(cfg, idle._replace(now=NOW + 50), busy.state)
    assert again.state.idle_since == NOW + 50
    gone = decide.decide(cfg, idle._replace(now=NOW + 110), again.state)
    assert (gone.desired, gone.reason) == (0, reasons.SCALED_TO_ZERO)
    assert "no queued or in-flight work for 60 s" in gone.message


def test_readings_must_match_the_metrics() -> None:
    observation = decide.Observation(now=NOW, current_replicas=1, readings=())
    with pytest.raises(ValueError, match="0 readings for 1 metrics"):
        decide.decide(config(), observation, decide.State())


@pytest.mark.parametrize(
    ("metric", "x", "current", "expected"),
    [
        (QUEUE, 1.1, 1, 1),  # 1.1 / 5 = 0.22 of the target: ceil(0.22) = 1
        (decide.Metric("m", "promql", "AverageValue", 0.1), 1.1, 5, 11),  # not 12: float noise
        (decide.Metric("m", "promql", "Value", 0.1), 0.3, 1, 3),
        (QUEUE, 50, 0, 10),  # from zero: no tolerance, ceil(value / target)
        (RPS, 250, 0, 3),
    ],
)
def test_propose_is_exact_about_rounding(
    metric: decide.Metric, x: float, current: int, expected: int
) -> None:
    assert decide.propose(metric, x, current, 0.1) == expected
