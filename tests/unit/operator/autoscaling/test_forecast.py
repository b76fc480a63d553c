"""The forecaster extrapolates a rising trend one scale-up time ahead, and nothing else."""

from __future__ import annotations

import random

import pytest

from bmad_operator.autoscaling import decide, forecast

pytestmark = pytest.mark.unit


def ramp(
    slope: float, *, start: float = 0.0, n: int = 60, step: float = 5.0
) -> list[tuple[float, float]]:
    return [(1000.0 + i * step, start + slope * i * step) for i in range(n)]


def test_a_clean_ramp_is_extrapolated_exactly() -> None:
    points = ramp(0.5)  # +0.5 per second, last value 147.5 at t=1295
    assert forecast.ahead(points, lead_seconds=60) == pytest.approx(147.5 + 30)


@pytest.mark.parametrize("slope", [0.0, -0.2])
def test_flat_or_falling_gives_no_forecast(slope: float) -> None:
    assert forecast.ahead(ramp(slope, start=100), lead_seconds=60) is None


def test_too_few_points_give_no_forecast() -> None:
    assert forecast.ahead(ramp(1, n=4), lead_seconds=60) is None
    assert forecast.ahead(ramp(1, n=5), lead_seconds=60) is not None


def test_points_at_one_instant_give_no_forecast() -> None:
    assert forecast.ahead([(5.0, float(v)) for v in range(10)], lead_seconds=60) is None


def test_gaps_and_nans_are_tolerated() -> None:
    points = [p for i, p in enumerate(ramp(0.5)) if i % 7 != 4]  # scrape gaps (the last one kept)
    points.insert(10, (1050.0, float("nan")))
    assert forecast.ahead(points, lead_seconds=60) == pytest.approx(147.5 + 30)


def test_noise_around_a_ramp_still_forecasts_the_trend() -> None:
    rng = random.Random(12)
    points = [(t, v + rng.uniform(-5, 5)) for t, v in ramp(0.5)]
    predicted = forecast.ahead(points, lead_seconds=60)
    assert predicted is not None
    assert predicted == pytest.approx(177.5, abs=6)


def test_a_forecast_is_never_negative() -> None:
    line = forecast.fit(ramp(0.1, start=-100))
    assert line is not None
    assert forecast.ahead(ramp(0.1, start=-100), lead_seconds=1) == 0.0


def test_the_decision_scales_up_early_on_the_forecast_and_never_down() -> None:
    metric = decide.Metric("queue depth", "queueDepth", "AverageValue", 5)
    cfg = decide.Config(
        min_replicas=1,
        max_replicas=20,
        metrics=(metric,),
        scale_up=decide.Rules(0, (decide.Policy("Pods", 100, 15),)),
        scale_down=decide.Rules(0, (decide.Policy("Percent", 100, 15),)),
    )
    rising = ramp(0.2, start=0, n=30)  # at 29 * 5 * 0.2 = 29 now, 41 a minute ahead
    now_value = rising[-1][1]
    ahead = forecast.ahead(rising, lead_seconds=60)
    observation = decide.Observation(
        now=rising[-1][0],
        current_replicas=6,
        readings=(decide.Reading(value=now_value, forecast=ahead),),
    )
    decision = decide.decide(cfg, observation, decide.State(seeded=True))
    assert (decision.desired, decision.reason) == (9, "PredictedScaleUp")
    assert "queue depth forecast 41" in decision.message

    falling = [(t, 100 - v) for t, v in rising]
    observation = observation._replace(
        readings=(
            decide.Reading(value=falling[-1][1], forecast=forecast.ahead(falling, lead_seconds=60)),
        )
    )
    assert forecast.ahead(falling, lead_seconds=60) is None
    decision = decide.decide(cfg, observation, decide.State(seeded=True))
    assert decision.desired == 15  # 71 / 5, from the value itself
