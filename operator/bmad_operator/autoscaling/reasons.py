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
# The agent's task stream could not be read (scale to zero: the queue depth at zero).
QUEUE_UNAVAILABLE: Final = "QueueUnavailable"
METRIC_FAILURES: Final = (PROMETHEUS_UNAVAILABLE, QUERY_FAILED, NO_DATA, QUEUE_UNAVAILABLE)

# ScalingActive=False: something else scales the Agent (an HPA, another ScaledObject);
# the operator reports it and leaves spec.replicas alone.
CONFLICTING_SCALER: Final = "ConflictingScaler"

# engine: keda (ScalingActive, and status.autoscaling.reason).
KEDA_NOT_INSTALLED: Final = "KEDANotInstalled"  # no scaledobjects.keda.sh in the cluster
SCALED_OBJECT_REFUSED: Final = "ScaledObjectRefused"  # the API server refused it
WAITING_FOR_KEDA: Final = "WaitingForKEDA"  # applied; KEDA has not reported on it yet
KEDA_READY: Final = "KEDAReady"  # KEDA reports the ScaledObject Ready (its own reason
KEDA_NOT_READY: Final = "KEDANotReady"  # is in the message when it is not CamelCase)
MANAGED_BY_KEDA: Final = "ManagedByKEDA"

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
