"""The Tenant's replica budget as a cap on one autoscaled Agent, from the store."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_operator import store
from bmad_operator.autoscaling import budget, reasons
from bmad_operator.builders import meta

pytestmark = pytest.mark.unit

Obj = dict[str, Any]


def agent(namespace: str, name: str, replicas: int) -> Obj:
    return {
        "kind": "Agent",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"replicas": replicas},
    }


def cache_with(limits: Obj | None) -> store.Store:
    cache = store.Store()
    cache.put({"kind": "Tenant", "metadata": {"name": "acme"}, "spec": {"limits": limits or {}}})
    for ns in ("acme-a", "acme-b"):
        cache.put(
            {"kind": "Namespace", "metadata": {"name": ns, "labels": {meta.TENANT_LABEL: "acme"}}}
        )
    cache.put(agent("acme-a", "dev", 4))
    cache.put(agent("acme-a", "qa", 2))
    cache.put(agent("acme-b", "pm", 1))
    cache.put(agent("elsewhere", "pm", 50))  # not the tenant's
    return cache


def test_the_cap_is_what_the_other_agents_leave() -> None:
    cap = budget.tenant_cap(cache_with({"replicas": 8}), agent("acme-a", "dev", 4))
    assert cap is not None
    assert (cap.replicas, cap.reason) == (5, reasons.TENANT_LIMIT)
    assert cap.message == (
        "Tenant acme allows 8 replicas in total (spec.limits.replicas) and its other "
        "Agents run 3, which leaves 5"
    )


def test_an_exhausted_budget_leaves_zero() -> None:
    cap = budget.tenant_cap(cache_with({"replicas": 2}), agent("acme-a", "dev", 4))
    assert cap is not None
    assert cap.replicas == 0


@pytest.mark.parametrize(
    ("limits", "namespace"),
    [({}, "acme-a"), ({"agents": 5}, "acme-a"), ({"replicas": 8}, "elsewhere")],
    ids=["no-limits", "no-replica-limit", "no-tenant"],
)
def test_no_cap_without_a_replica_budget(limits: Obj, namespace: str) -> None:
    assert budget.tenant_cap(cache_with(limits), agent(namespace, "dev", 4)) is None
