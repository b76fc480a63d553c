"""The tenant budget's decision: does this change to an Agent fit the tenant's budget?

Pure: the caller (`admission.BudgetWebhook`) reads the tenant's limits and its Agents
from the API server and hands them in. A change that does not raise usage (a scale
down, a label, a finalizer removed, the same size applied again) is never refused,
not even for a tenant already over its budget: only growth is held to it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

Key = tuple[str, str]  # (namespace, name)

# What an Agent without spec.replicas counts as (the CRD's default).
DEFAULT_REPLICAS = 1


class Limits(NamedTuple):
    agents: int | None
    replicas: int | None

    @classmethod
    def of(cls, tenant_spec: Mapping[str, Any]) -> Limits:
        limits = tenant_spec.get("limits") or {}
        agents, replicas = limits.get("agents"), limits.get("replicas")
        return cls(
            int(agents) if agents is not None else None,
            int(replicas) if replicas is not None else None,
        )

    @property
    def any(self) -> bool:
        return self.agents is not None or self.replicas is not None


class Change(NamedTuple):
    """One admission request: the Agent `key` created, or resized from `old_replicas`."""

    key: Key
    creating: bool
    old_replicas: int  # 0 when creating
    new_replicas: int


def agent_replicas(spec: Mapping[str, Any] | None) -> int:
    """An Agent's spec.replicas as the budget counts it."""
    value = (spec or {}).get("replicas", DEFAULT_REPLICAS)
    return int(value) if value is not None else DEFAULT_REPLICAS


def raises_usage(change: Change) -> bool:
    """Only a new Agent or more replicas can take the tenant over its budget."""
    return change.creating or change.new_replicas > change.old_replicas


def violation(tenant: str, limits: Limits, usage: Mapping[Key, int], change: Change) -> str | None:
    """Why `change` would take the tenant over its budget (`usage`: replicas of every
    Agent the tenant has, this one included if it exists), or None when it fits or does
    not raise usage."""
    if not raises_usage(change):
        return None
    others = {key: replicas for key, replicas in usage.items() if key != change.key}
    if change.creating and limits.agents is not None and len(others) + 1 > limits.agents:
        return (
            f"tenant {tenant} allows {limits.agents} Agents (spec.limits.agents) and this "
            f"would make {len(others) + 1}: delete an Agent or raise the tenant's budget"
        )
    total = sum(others.values()) + change.new_replicas
    if limits.replicas is not None and total > limits.replicas:
        return (
            f"tenant {tenant} allows {limits.replicas} replicas in total "
            f"(spec.limits.replicas) and this would make {total}: lower spec.replicas "
            "or raise the tenant's budget"
        )
    return None
