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


def namespace(tenant: str, name: str) -> Obj:
    return {
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
    quota = resource_quota(tenant, ns, spec.quota)
    if quota is not None:
        objs.append(quota)
    objs.append(limit_range(tenant, ns))
    objs.extend(network_policies(tenant, ns, operator_namespace=operator_namespace))
    binding = role_binding(tenant, ns, spec.admins)
    if binding is not None:
        objs.append(binding)
    return objs
