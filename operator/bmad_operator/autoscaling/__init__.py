"""The operator's autoscaler: scales Agents from Prometheus metrics with the HPA's rules.

Layers, lowest first (each module imports only those below it):

- ``reasons``: the constant words of ``status.autoscaling.reason`` and of the
  ``ScalingActive`` / ``ScalingLimited`` conditions;
- ``decide``: the decision as a pure function (metrics and history in, replicas,
  reason, message and the updated history out), with the HPA's rules;
- ``forecast``: the predictive mode's pure forecaster over range-query samples;
- ``config``: ``spec.autoscaling`` turned into the decision's settings;
- ``queries``: the PromQL of each metric type (pure);
- ``keda``: the KEDA ScaledObject that expresses the same intent (pure builder);
- ``prometheus``: the async Prometheus HTTP API client, with errors classified into
  the reasons above.
"""
