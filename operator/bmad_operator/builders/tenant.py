"""Pure builders of what a Tenant puts in each of its namespaces.

Namespaces carry no owner reference to the Tenant on purpose: with
`deletionPolicy: Retain` they must outlive it, and the garbage collector would not
let them. What lives inside a namespace is labelled with the tenant instead, and the
Tenant's finalizer applies the deletion policy.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from bmad_crds.v1alpha1 import tenant as tenant_api
from bmad_operator.builders import meta

Obj = dict[str, Any]

ADMIN_ROLE = "bmad-tenant-admin"
QUOTA_NAME = "bmad-tenant-quota"
AGENT_QUOTA_NAME = "bmad-tenant-agents"
# The API server's own count of Agents in a namespace (object-count quota of a CRD).
AGENT_COUNT = "count/agents.bmad.dev"
LIMITS_NAME = "bmad-tenant-limits"
ADMINS_BINDING_NAME = "bmad-tenant-admins"
MONITORING_NAMESPACE = "monitoring"

# spec.quota field → ResourceQuota key
QUOTA_KEYS: Mapping[str, str] = {
    "cpu": "requests.cpu",
    "memory": "requests.memory",
    "limits_cpu": "limits.cpu",
    "limits_memory": "limits.memory",
    "storage": "requests.storage",
    "pods": "pods",
    "services": "services",
    "persistent_volume_claims": "persistentvolumeclaims",
    "config_maps": "configmaps",
    "secrets": "secrets",
}


def labels(tenant: str) -> dict[str, str]:
    return {meta.TENANT_LABEL: tenant, **meta.managed_labels()}


def namespace(tenant: str, name: str, *, created: bool = False) -> Obj:
    """The tenant's namespace; `created`: the body that creates it, marked as made for
    the tenant (only such a namespace is ever deleted with the tenant)."""
    obj: Obj = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {
            "name": name,
            "labels": {
                **labels(tenant),
                "pod-security.kubernetes.io/enforce": "restricted",
                "pod-security.kubernetes.io/enforce-version": "latest",
                "pod-security.kubernetes.io/audit": "restricted",
                "pod-security.kubernetes.io/warn": "restricted",
            },
        },
    }
    if created:
        obj["metadata"]["annotations"] = {meta.CREATED_FOR_TENANT_ANNOTATION: tenant}
    return obj


def adoption_patch(tenant: str, resource_version: str) -> Obj:
    """The merge patch that hands an existing namespace to the tenant. The
    resourceVersion makes it conditional: a namespace changed since it was read (another
    Tenant claimed it, the adoption label was removed) is refused with 409 Conflict.
    The adoption label is used up."""
    return {
        "metadata": {
            "resourceVersion": resource_version,
            "labels": {meta.TENANT_LABEL: tenant, tenant_api.ADOPT_LABEL: None},
        }
    }


def _meta(tenant: str, name: str, ns: str) -> Obj:
    return meta.object_meta(name, ns, labels=labels(tenant))


def resource_quota(tenant: str, ns: str, quota: tenant_api.Quota | None) -> Obj | None:
    if quota is None:
        return None
    hard = {
        key: str(getattr(quota, field))
        for field, key in QUOTA_KEYS.items()
        if getattr(quota, field) is not None
    }
    if not hard:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _meta(tenant, QUOTA_NAME, ns),
        "spec": {"hard": hard},
    }


def agent_quota(tenant: str, ns: str, limits: tenant_api.TenantLimits | None) -> Obj | None:
    """The tenant's Agent budget as an object-count ResourceQuota in one namespace.

    The API server enforces it atomically, however many creates arrive at once, and
    also when the operator's webhook is down. It caps each namespace at the whole
    budget; across namespaces the webhook keeps the sum (see `admission`).
    """
    if limits is None or limits.agents is None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "ResourceQuota",
        "metadata": _meta(tenant, AGENT_QUOTA_NAME, ns),
        "spec": {"hard": {AGENT_COUNT: str(limits.agents)}},
    }


def limit_range(tenant: str, ns: str) -> Obj:
    """Defaults for containers that state no resources (the quota then still applies)."""
    return {
        "apiVersion": "v1",
        "kind": "LimitRange",
        "metadata": _meta(tenant, LIMITS_NAME, ns),
        "spec": {
            "limits": [
                {
                    "type": "Container",
                    "defaultRequest": {"cpu": "100m", "memory": "128Mi"},
                    "default": {"cpu": "1", "memory": "512Mi"},
                }
            ]
        },
    }


def network_policies(tenant: str, ns: str, *, operator_namespace: str) -> list[Obj]:
    def policy(name: str, spec: Obj) -> Obj:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": _meta(tenant, name, ns),
            "spec": spec,
        }

    def from_namespaces(selector: Obj) -> Obj:
        return {
            "podSelector": {},
            "policyTypes": ["Ingress"],
            "ingress": [{"from": [{"namespaceSelector": selector}]}],
        }

    return [
        policy("bmad-default-deny-ingress", {"podSelector": {}, "policyTypes": ["Ingress"]}),
        policy(
            "bmad-allow-same-tenant", from_namespaces({"matchLabels": {meta.TENANT_LABEL: tenant}})
        ),
        policy(
            "bmad-allow-operator",
            from_namespaces({"matchLabels": {"kubernetes.io/metadata.name": operator_namespace}}),
        ),
        policy(
            "bmad-allow-monitoring",
            from_namespaces({"matchLabels": {"kubernetes.io/metadata.name": MONITORING_NAMESPACE}}),
        ),
    ]


def role_binding(tenant: str, ns: str, admins: list[tenant_api.Admin] | None) -> Obj | None:
    if not admins:
        return None
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(tenant, ADMINS_BINDING_NAME, ns),
        "roleRef": {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": "ClusterRole",
            "name": ADMIN_ROLE,
        },
        "subjects": [
            {"apiGroup": "rbac.authorization.k8s.io", "kind": a.kind, "name": a.name}
            for a in admins
        ],
    }


def namespace_objects(
    tenant: str, ns: str, spec: tenant_api.TenantSpec, *, operator_namespace: str
) -> list[Obj]:
    """Everything inside one tenant namespace, in apply order."""
    objs: list[Obj] = []
    for quota in (resource_quota(tenant, ns, spec.quota), agent_quota(tenant, ns, spec.limits)):
        if quota is not None:
            objs.append(quota)
    objs.append(limit_range(tenant, ns))
    objs.extend(network_policies(tenant, ns, operator_namespace=operator_namespace))
    binding = role_binding(tenant, ns, spec.admins)
    if binding is not None:
        objs.append(binding)
    return objs
