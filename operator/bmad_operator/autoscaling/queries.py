"""The PromQL the autoscaler evaluates for each metric type (pure).

The agent runtime (``bmad_runtime.telemetry``) exports, per replica:

- ``bmad_agent_queue_depth`` (gauge): the length of the agent's task stream, i.e. tasks
  waiting or being worked on. The stream is shared by all replicas of the agent, so
  every replica reports the same number: summing over pods would count the queue once
  per replica (3 replicas, 10 tasks: 30). The query takes the **max per stream**
  (per namespace and agent) instead: the freshest of the replicas' readings, counted
  once.
- ``bmad_agent_inflight`` (gauge): invocations and tasks this replica is serving: a
  per-replica quantity, **summed** over the agent's pods.
- ``bmad_agent_tokens`` (counter, exposed as ``bmad_agent_tokens_total`` with labels
  ``direction`` and ``model``): tokens spent; ``rate()`` over a window, summed over
  pods, directions and models, times 60 gives tokens per minute.

Series must carry the Agent's namespace and name in the labels named by
:class:`Selector` (``namespace`` and ``agent`` by default). The runtime puts both on
every series it serves (``bmad_runtime.telemetry``), so any scrape of the pods finds
them; metrics pushed through a Pushgateway carry them in their grouping key.
"""

from __future__ import annotations

from typing import NamedTuple

from bmad_crds.v1alpha1 import agent as agent_api

QUEUE_DEPTH = "bmad_agent_queue_depth"
INFLIGHT = "bmad_agent_inflight"
TOKENS = "bmad_agent_tokens_total"

# Long enough for several scrapes at the usual 15-30 s interval, short enough to follow
# a change within a minute.
DEFAULT_RATE_WINDOW = "1m"


class Selector(NamedTuple):
    """Which series belong to one Agent."""

    namespace: str
    agent: str
    namespace_label: str = "namespace"
    agent_label: str = "agent"

    def matchers(self) -> str:
        """``{namespace="team-a",agent="dev"}``."""
        return (
            f'{{{self.namespace_label}="{quote(self.namespace)}",'
            f'{self.agent_label}="{quote(self.agent)}"}}'
        )


def quote(value: str) -> str:
    """A label value inside a double-quoted PromQL string."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def queue_depth(selector: Selector) -> str:
    """Tasks on the agent's stream: max per stream, since every replica reports it."""
    by = f"{selector.namespace_label}, {selector.agent_label}"
    return f"max by ({by}) ({QUEUE_DEPTH}{selector.matchers()})"


def inflight(selector: Selector) -> str:
    """Invocations and tasks being served, summed over the agent's pods."""
    return f"sum({INFLIGHT}{selector.matchers()})"


def tokens_per_minute(selector: Selector, *, window: str = DEFAULT_RATE_WINDOW) -> str:
    """Tokens spent per minute by the whole agent (all pods, directions and models)."""
    return f"sum(rate({TOKENS}{selector.matchers()}[{window}])) * 60"


def for_metric(
    metric: agent_api.AutoscalingMetric,
    selector: Selector,
    *,
    window: str = DEFAULT_RATE_WINDOW,
) -> str:
    """The query of one entry of ``spec.autoscaling.metrics``."""
    if metric.type == "queueDepth":
        return queue_depth(selector)
    if metric.type == "inflight":
        return inflight(selector)
    if metric.type == "tokensPerMinute":
        return tokens_per_minute(selector, window=window)
    if metric.query is None:  # the API's rules make this unreachable
        raise ValueError("a promql metric needs a query")
    return metric.query
