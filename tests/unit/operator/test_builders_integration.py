"""The Integration's builders (its binding Secret) and the metadata helper all builders use."""

from __future__ import annotations

import base64

import pytest

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_crds.v1alpha1 import tenant as tenant_api
from bmad_operator.builders import agent as agent_builders
from bmad_operator.builders import integration as builders
from bmad_operator.builders import meta
from bmad_operator.builders import tenant as tenant_builders

pytestmark = pytest.mark.unit

BODY = {
    "apiVersion": "bmad.dev/v1alpha1",
    "kind": "Integration",
    "metadata": {"name": "team-db", "namespace": "team-a", "uid": "uid-int-team-db"},
}


def test_binding_secret_is_owned_labelled_and_in_the_servicebinding_layout() -> None:
    secret = builders.binding_secret(BODY, "postgres", {"password": "p@ss", "host": "db"})
    assert secret["kind"] == "Secret"
    assert secret["type"] == "servicebinding.io/postgres"
    md = secret["metadata"]
    assert (md["name"], md["namespace"]) == ("team-db-binding", "team-a")
    assert md["labels"] == {
        "app.kubernetes.io/managed-by": "bmad-operator",
        "app.kubernetes.io/component": "binding",
        "bmad.dev/integration": "team-db",
    }
    assert md["ownerReferences"] == [
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Integration",
            "name": "team-db",
            "uid": "uid-int-team-db",
            "controller": True,
            "blockOwnerDeletion": True,
        }
    ]
    # Keys sorted, values base64 as the API server stores them.
    assert list(secret["data"]) == ["host", "password"]
    assert base64.b64decode(secret["data"]["password"]).decode() == "p@ss"


def test_the_agent_mounts_the_secret_the_integration_publishes() -> None:
    published = builders.binding_secret(BODY, "redis", {})["metadata"]["name"]
    assert published == builders.binding_secret_name("team-db")
    spec = agent_api.AgentSpec.model_validate(
        {
            "role": "dev",
            "model": {"provider": "echo", "name": "echo-1"},
            "integrations": ["team-db"],
        }
    )
    agent = {"metadata": {"name": "amelia", "namespace": "team-a", "uid": "uid-agent"}}
    deployment = agent_builders.deployment(
        agent, spec, image="img", replicas=1, config_digest="x", bindings=["team-db"]
    )
    volumes = deployment["spec"]["template"]["spec"]["volumes"]
    assert published in [v["secret"]["secretName"] for v in volumes if "secret" in v]


def test_every_builder_marks_its_objects_with_the_one_managed_by_label() -> None:
    spec = agent_api.AgentSpec.model_validate(
        {"role": "dev", "model": {"provider": "echo", "name": "echo-1"}}
    )
    agent = {"metadata": {"name": "amelia", "namespace": "team-a", "uid": "uid-agent"}}
    tenant_spec = tenant_api.TenantSpec.model_validate(
        {"namespaces": ["acme-prod"], "admins": [{"kind": "User", "name": "alice"}]}
    )
    built = [
        *agent_builders.build_all(agent, spec, image="img"),
        *tenant_builders.namespace_objects(
            "acme", "acme-prod", tenant_spec, operator_namespace="bmad-system"
        ),
        tenant_builders.namespace("acme", "acme-prod"),
        builders.binding_secret(BODY, "redis", {}),
    ]
    for obj in built:
        assert meta.is_managed(obj["metadata"]["labels"]), obj["kind"]
    owned_by_agent = [o for o in built if o["metadata"].get("labels", {}).get(meta.AGENT_LABEL)]
    assert len(owned_by_agent) == 5
    for obj in owned_by_agent:
        assert obj["metadata"]["ownerReferences"] == [meta.owner_reference("Agent", agent)]


def test_object_meta_without_an_owner_has_no_owner_references() -> None:
    md = meta.object_meta("q", "ns", labels=meta.managed_labels())
    assert md == {
        "name": "q",
        "namespace": "ns",
        "labels": {"app.kubernetes.io/managed-by": "bmad-operator"},
    }
    assert not meta.is_managed({"app.kubernetes.io/managed-by": "helm"})
    assert not meta.is_managed(None)
