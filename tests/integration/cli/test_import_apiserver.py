"""What `bmad import` makes of v4 files is accepted by a real API server with our CRDs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bmad_cli import importer
from bmad_testbed.kubectl import Kubectl

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
FIXTURES = REPO / "tests" / "unit" / "cli" / "fixtures" / "bmad-core"
SAMPLES = REPO / "manifests" / "samples" / "workflows"


def test_imported_manifests_pass_server_side_validation(
    kubectl: Kubectl, crds: list[str], namespace: str
) -> None:
    result = importer.import_folder(FIXTURES, importer.Options())
    assert result.errors == []
    manifests = [manifest for _, manifest in result.manifests()]
    assert len(manifests) == 8
    k = kubectl.in_namespace(namespace)
    for manifest in manifests:
        proc = k.run(
            "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(manifest), check=False
        )
        assert proc.returncode == 0, f"{manifest['metadata']['name']}: {proc.stderr}"
        assert "(server dry run)" in proc.stdout


def test_the_workflow_samples_build_with_kustomize_and_pass_the_api_server(
    kubectl: Kubectl, crds: list[str]
) -> None:
    rendered = kubectl.out("kustomize", str(SAMPLES))
    docs = [d for d in yaml.safe_load_all(rendered) if d]
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in docs)
    assert ("Workflow", "greenfield-service") in kinds
    assert ("Namespace", "bmad-workflows") in kinds
    assert all(
        d["metadata"].get("namespace") == "bmad-workflows" for d in docs if d["kind"] != "Namespace"
    )
    # The namespace is not created (dry run): validate the objects in a namespace that
    # exists, which is what the schema check needs.
    for doc in docs:
        if doc["kind"] == "Namespace":
            continue
        doc["metadata"]["namespace"] = "default"
        proc = kubectl.run(
            "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(doc), check=False
        )
        assert proc.returncode == 0, f"{doc['metadata']['name']}: {proc.stderr}"


def test_a_manifest_the_importer_would_refuse_is_refused_by_the_api_server_too(
    kubectl: Kubectl, crds: list[str], namespace: str
) -> None:
    """The importer's check of requirements matches the CRD's CEL rule."""
    result = importer.import_folder(FIXTURES, importer.Options())
    workflow = json.loads(json.dumps(result.workflows["greenfield-service"]))
    workflow["spec"]["steps"][1]["requires"] = ["no-such-brief.md"]
    proc = kubectl.in_namespace(namespace).run(
        "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(workflow), check=False
    )
    assert proc.returncode != 0
    assert "spec.steps[].requires names an artifact that no step creates" in proc.stderr
