"""Which tenant owns what, answered from the operator's watch cache.

Shared by the Tenant reconciler (status.usage), the Agent reconciler (suspension),
the controller (which Agents to requeue) and the budget webhook (admission).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

from bmad_operator import store
from bmad_operator.builders import meta


class AgentUsage(NamedTuple):
    agents: int
    replicas: int


def tenant_name_of_namespace(cache: store.Store, namespace: str) -> str | None:
    ns = cache.get("Namespace", None, namespace)
    labels = (ns or {}).get("metadata", {}).get("labels") or {}
    name: str | None = labels.get(meta.TENANT_LABEL)
    return name


def tenant_of_namespace(cache: store.Store, namespace: str) -> Mapping[str, Any] | None:
    name = tenant_name_of_namespace(cache, namespace)
    return cache.get("Tenant", None, name) if name else None


def tenant_namespaces(cache: store.Store, tenant: str) -> list[str]:
    return sorted(
        name
        for (_, name), ns in cache.items("Namespace")
        if (ns["metadata"].get("labels") or {}).get(meta.TENANT_LABEL) == tenant
    )


def agent_usage(
    cache: store.Store, tenant: str, *, leave_out: tuple[str, str] | None = None
) -> AgentUsage:
    """Agents and their spec.replicas in the tenant's namespaces (`leave_out`: one key)."""
    namespaces = set(tenant_namespaces(cache, tenant))
    agents = replicas = 0
    for key, agent in cache.items("Agent"):
        if key[0] in namespaces and key != leave_out:
            agents += 1
            replicas += int((agent.get("spec") or {}).get("replicas", 1) or 0)
    return AgentUsage(agents, replicas)
