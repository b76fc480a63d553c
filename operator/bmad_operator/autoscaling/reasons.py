"""The words the autoscaler writes: condition types and CamelCase reasons.

``status.autoscaling.reason`` holds one of the decision reasons; the Agent's
``ScalingActive`` condition says whether metrics could be read (False with a metric
failure reason), ``ScalingLimited`` whether the count was held by a bound or a rate.
"""

from __future__ import annotations

from typing import Final

SCALING_ACTIVE: Final = "ScalingActive"
SCALING_LIMITED: Final = "ScalingLimited"

# Why a metric has no value (ScalingActive=False, MetricStatus.error).
PROMETHEUS_UNAVAILABLE: Final = "PrometheusUnavailable"  # no answer, or a 5xx
QUERY_FAILED: Final = "QueryFailed"  # Prometheus refused the query (4xx) or its result
NO_DATA: Final = "NoData"  # an empty result (no such series)
METRIC_FAILURES: Final = (PROMETHEUS_UNAVAILABLE, QUERY_FAILED, NO_DATA)

# ScalingActive=True.
VALID_METRICS: Final = "ValidMetrics"

# What the count is, and why (status.autoscaling.reason).
ABOVE_TARGET: Final = "AboveTarget"
BELOW_TARGET: Final = "BelowTarget"
WITHIN_TOLERANCE: Final = "WithinTolerance"
STEADY: Final = "Steady"  # outside the tolerance, yet the same count (rounding)
PREDICTED_SCALE_UP: Final = "PredictedScaleUp"
SCALE_UP_STABILIZED: Final = "ScaleUpStabilized"
SCALE_DOWN_STABILIZED: Final = "ScaleDownStabilized"
SCALED_TO_ZERO: Final = "ScaledToZero"
IDLE: Final = "Idle"
ACTIVATED: Final = "Activated"
BELOW_MIN_REPLICAS: Final = "BelowMinReplicas"
ABOVE_MAX_REPLICAS: Final = "AboveMaxReplicas"

# ScalingLimited=True (and the decision reason when the limit decided the count).
TOO_MANY_REPLICAS: Final = "TooManyReplicas"
TOO_FEW_REPLICAS: Final = "TooFewReplicas"
TENANT_LIMIT: Final = "TenantLimit"
SCALE_UP_LIMIT: Final = "ScaleUpLimit"
SCALE_DOWN_LIMIT: Final = "ScaleDownLimit"
SCALE_UP_DISABLED: Final = "ScaleUpDisabled"
SCALE_DOWN_DISABLED: Final = "ScaleDownDisabled"
# ScalingLimited=False.
DESIRED_WITHIN_RANGE: Final = "DesiredWithinRange"
