"""Predictive mode's forecaster: where a metric will be one scale-up time from now (pure).

Method: an ordinary least-squares line through the samples of the lookback window
(``spec.autoscaling.predictive.lookbackSeconds``, from a Prometheus range query),
evaluated ``leadSeconds`` after the last sample. Why this and not Holt's double
exponential smoothing:

- the signal it serves (tasks queued, requests in flight, tokens per minute while load
  ramps up) is close to linear over the few minutes a new replica needs to start, and a
  line is exactly what "one scale-up time ahead" extrapolates;
- it has no smoothing constants to tune per agent (Holt's needs two, and with the
  noisy 1-15 s samples of a gauge its trend term either jitters or, damped enough to
  be calm, lags like a regression anyway);
- it works on the irregular timestamps a range query returns after scrape gaps, where
  Holt's assumes evenly spaced steps.

Only a rising trend produces a forecast: the decision uses it to scale up early and
never to scale down, so a flat or falling line returns None.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

MIN_POINTS = 5


class Line(NamedTuple):
    """value = intercept + slope * (t - origin)."""

    origin: float
    intercept: float
    slope: float  # per second
    points: int

    def at(self, t: float) -> float:
        return self.intercept + self.slope * (t - self.origin)


def fit(points: Sequence[tuple[float, float]], *, min_points: int = MIN_POINTS) -> Line | None:
    """The least-squares line through (t, value) points; None with too few or no spread."""
    clean = [(t, v) for t, v in points if math.isfinite(t) and math.isfinite(v)]
    if len(clean) < min_points:
        return None
    origin = clean[-1][0]  # centred on the last sample: small numbers, exact arithmetic
    ts = [t - origin for t, _ in clean]
    vs = [v for _, v in clean]
    n = len(clean)
    mean_t = sum(ts) / n
    mean_v = sum(vs) / n
    spread = sum((t - mean_t) ** 2 for t in ts)
    if spread <= 0:
        return None
    slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(ts, vs, strict=True)) / spread
    return Line(origin=origin, intercept=mean_v - slope * mean_t, slope=slope, points=n)


def ahead(
    points: Sequence[tuple[float, float]],
    *,
    lead_seconds: float,
    min_points: int = MIN_POINTS,
) -> float | None:
    """The metric ``lead_seconds`` after the last point, if it is rising; else None."""
    line = fit(points, min_points=min_points)
    if line is None or line.slope <= 0:
        return None
    return max(line.at(line.origin + lead_seconds), 0.0)
