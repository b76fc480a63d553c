"""What `bmad import` makes of v4 files is accepted by a real API server with our CRDs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from bmad_cli import importer
from bmad_crds.v1alpha1 import workflow as workflow_api
from bmad_operator.workflows import dag
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


def test_a_requirement_no_step_creates_passes_the_schema_and_the_operator_names_the_step(
    kubectl: Kubectl, crds: list[str], namespace: str
) -> None:
    """How steps relate is checked by the operator, not by the CRD's schema (its CEL
    rules made every status write slow): the API server stores a Workflow whose step
    requires what no step creates, and the operator's graph check, which marks such a
    Workflow Valid=False, names the step and the field, as the importer does."""
    result = importer.import_folder(FIXTURES, importer.Options())
    workflow = json.loads(json.dumps(result.workflows["greenfield-service"]))
    second = workflow["spec"]["steps"][1]
    second["requires"] = ["no-such-brief.md"]
    proc = kubectl.in_namespace(namespace).run(
        "apply", "--dry-run=server", "-f", "-", stdin=json.dumps(workflow), check=False
    )
    assert proc.returncode == 0, proc.stderr

    with pytest.raises(dag.InvalidDagError) as refused:
        dag.build(workflow_api.Workflow.model_validate(workflow).spec.steps)
    [error] = refused.value.errors
    assert (error.step, error.field) == (second["id"], "spec.steps[1].requires")
    assert error.reason == dag.REQUIREMENT_NOT_CREATED
    assert "'no-such-brief.md', which no step creates" in error.message
