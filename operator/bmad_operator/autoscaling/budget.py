"""The most replicas a Tenant's budget leaves an autoscaled Agent, from the watch cache.

A Tenant's ``spec.limits.replicas`` bounds the sum of ``spec.replicas`` over its
Agents; the admission webhook refuses a scale beyond it. The autoscaler asks for no
more than what is left (the budget minus the other Agents' replicas), and says so in
``ScalingLimited`` (reason ``TenantLimit``) instead of having its scale refused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bmad_operator import store, tenancy
from bmad_operator.autoscaling import decide, reasons


def tenant_cap(cache: store.Store, body: Mapping[str, Any]) -> decide.Cap | None:
    """The Tenant's cap on this Agent's replicas; None outside a Tenant or without a budget."""
    meta = body["metadata"]
    namespace, name = str(meta["namespace"]), str(meta["name"])
    tenant = tenancy.tenant_of_namespace(cache, namespace)
    if tenant is None:
        return None
    limit = ((tenant.get("spec") or {}).get("limits") or {}).get("replicas")
    if limit is None:
        return None
    tenant_name = tenant["metadata"]["name"]
    others = tenancy.agent_usage(cache, tenant_name, leave_out=(namespace, name)).replicas
    room = max(int(limit) - others, 0)
    return decide.Cap(
        room,
        reasons.TENANT_LIMIT,
        f"Tenant {tenant_name} allows {limit} replicas in total (spec.limits.replicas) and "
        f"its other Agents run {others}, which leaves {room}",
    )
