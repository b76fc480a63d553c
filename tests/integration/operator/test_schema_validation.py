"""Invalid objects are refused at apply time by the real apiserver, naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from bmad_testbed.kubectl import Kubectl

pytestmark = pytest.mark.integration

CASES = Path(__file__).resolve().parents[2] / "unit" / "crds" / "cases"


def _docs(pattern: str) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for path in sorted(CASES.glob(pattern)):
        docs.extend(d for d in yaml.safe_load_all(path.read_text()) if d)
    return docs


INVALID = _docs("*-invalid.yaml")
VALID = _docs("*-valid.yaml")


def test_there_are_at_least_ten_invalid_agents() -> None:
    assert len([d for d in INVALID if d["kind"] == "Agent"]) >= 10


@pytest.mark.parametrize(
    "doc", INVALID, ids=[f"{d['kind']}-{d['metadata']['name']}" for d in INVALID]
)
def test_invalid_object_is_refused_naming_the_field(
    doc: dict[str, Any], kubectl: Kubectl, crds: list[str], namespace: str
) -> None:
    # The model's error says "spec.replica: ..."; the apiserver's `unknown field "spec.replica"`.
    expect = doc["metadata"]["annotations"]["test.bmad.dev/expect"].rstrip(":")
    k = kubectl if doc["kind"] == "Tenant" else kubectl.in_namespace(namespace)
    proc = k.run("apply", "-f", "-", stdin=json.dumps(doc), check=False)
    assert proc.returncode != 0, f"{doc['metadata']['name']} was accepted"
    assert expect in proc.stderr, proc.stderr
    # Nothing was stored.
    plural = {
        "Agent": "agents",
        "Integration": "integrations",
        "Workflow": "workflows",
        "Tenant": "tenants",
    }[doc["kind"]]
    assert not k.exists(f"{plural}.bmad.dev", doc["metadata"]["name"])


@pytest.mark.parametrize("doc", VALID, ids=[f"{d['kind']}-{d['metadata']['name']}" for d in VALID])
def test_valid_object_is_accepted(
    doc: dict[str, Any], kubectl: Kubectl, crds: list[str], namespace: str
) -> None:
    k = kubectl if doc["kind"] == "Tenant" else kubectl.in_namespace(namespace)
    proc = k.run("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(doc), check=False)
    assert proc.returncode == 0, proc.stderr


def test_hole12_replicas_above_the_maximum_are_refused_through_the_scale_subresource(
    kubectl: Kubectl, crds: list[str], namespace: str
) -> None:
    """Issue 10, hole 12: `kubectl scale agent --replicas=100000` was accepted (spec.replicas
    had no maximum). The API server validates the object the scale write produces
    against the schema, so the maximum holds there too, and the count stays."""
    k = kubectl.in_namespace(namespace)
    doc = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": "scaled"},
        "spec": {"role": "dev", "model": {"provider": "echo", "name": "echo-1"}, "replicas": 0},
    }
    k.run("apply", "-f", "-", stdin=json.dumps(doc))
    proc = k.run("scale", "agent", "scaled", "--replicas=100000", check=False)
    assert proc.returncode != 0, "100000 replicas were accepted"
    assert "spec.replicas" in proc.stderr, proc.stderr
    assert k.json("get", "agent", "scaled")["spec"]["replicas"] == 0
    # The maximum itself is accepted (dry run: no operator should start 500 pods here).
    k.run("scale", "agent", "scaled", "--replicas=500", "--dry-run=server")
