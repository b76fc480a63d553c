"""Builders of what a Tenant puts in each of its namespaces."""

from __future__ import annotations

import pytest

from bmad_crds.v1alpha1 import tenant as tenant_api
from bmad_operator.builders import tenant as builders

pytestmark = pytest.mark.unit


def _spec(**extra: object) -> tenant_api.TenantSpec:
    return tenant_api.TenantSpec.model_validate({"namespaces": ["acme-prod"], **extra})


def test_namespace_is_labelled_for_the_tenant_and_pod_security_restricted() -> None:
    ns = builders.namespace("acme", "acme-prod")
    labels = ns["metadata"]["labels"]
    assert labels["bmad.dev/tenant"] == "acme"
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert "ownerReferences" not in ns["metadata"]  # Retain must be able to keep it


def test_quota_maps_every_spec_field_to_its_quota_key() -> None:
    spec = _spec(
        quota={
            "cpu": "8",
            "memory": "16Gi",
            "limitsCpu": "16",
            "limitsMemory": "32Gi",
            "storage": "100Gi",
            "pods": 50,
            "services": 10,
            "persistentVolumeClaims": 5,
            "configMaps": 40,
            "secrets": 40,
        }
    )
    quota = builders.resource_quota("acme", "acme-prod", spec.quota)
    assert quota is not None
    assert quota["spec"]["hard"] == {
        "requests.cpu": "8",
        "requests.memory": "16Gi",
        "limits.cpu": "16",
        "limits.memory": "32Gi",
        "requests.storage": "100Gi",
        "pods": "50",
        "services": "10",
        "persistentvolumeclaims": "5",
        "configmaps": "40",
        "secrets": "40",
    }
    assert builders.resource_quota("acme", "acme-prod", None) is None


def test_network_policies_deny_by_default_and_allow_tenant_operator_monitoring() -> None:
    policies = {
        p["metadata"]["name"]: p["spec"]
        for p in builders.network_policies("acme", "acme-prod", operator_namespace="bmad-system")
    }
    assert policies["bmad-default-deny-ingress"] == {"podSelector": {}, "policyTypes": ["Ingress"]}
    sources = {
        name: spec["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"]
        for name, spec in policies.items()
        if "ingress" in spec
    }
    assert sources == {
        "bmad-allow-same-tenant": {"bmad.dev/tenant": "acme"},
        "bmad-allow-operator": {"kubernetes.io/metadata.name": "bmad-system"},
        "bmad-allow-monitoring": {"kubernetes.io/metadata.name": "monitoring"},
    }


def test_admins_are_bound_to_the_tenant_admin_role_in_the_namespace() -> None:
    spec = _spec(admins=[{"kind": "User", "name": "alice"}, {"kind": "Group", "name": "ops"}])
    binding = builders.role_binding("acme", "acme-prod", spec.admins)
    assert binding is not None
    assert binding["metadata"]["namespace"] == "acme-prod"
    assert binding["roleRef"]["name"] == "bmad-tenant-admin"
    assert binding["roleRef"]["kind"] == "ClusterRole"
    assert [(s["kind"], s["name"]) for s in binding["subjects"]] == [
        ("User", "alice"),
        ("Group", "ops"),
    ]
    assert builders.role_binding("acme", "acme-prod", None) is None


def test_every_namespaced_object_carries_the_tenant_label() -> None:
    spec = _spec(quota={"pods": 5}, admins=[{"kind": "User", "name": "alice"}])
    objs = builders.namespace_objects("acme", "acme-prod", spec, operator_namespace="bmad-system")
    assert [o["kind"] for o in objs] == [
        "ResourceQuota",
        "LimitRange",
        "NetworkPolicy",
        "NetworkPolicy",
        "NetworkPolicy",
        "NetworkPolicy",
        "RoleBinding",
    ]
    for obj in objs:
        assert obj["metadata"]["labels"]["bmad.dev/tenant"] == "acme"
        assert obj["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "bmad-operator"
        assert obj["metadata"]["namespace"] == "acme-prod"
