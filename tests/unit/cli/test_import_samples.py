"""manifests/samples/workflows is what `bmad import` makes of the fixtures, kept current."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bmad_cli import importer
from bmad_crds.v1alpha1 import agent as agent_api
from bmad_crds.v1alpha1 import workflow as workflow_api

pytestmark = pytest.mark.unit

REPO = Path(__file__).resolve().parents[3]
SAMPLES = REPO / "manifests" / "samples" / "workflows"
FIXTURES = Path(__file__).parent / "fixtures" / "bmad-core"
REGENERATE = (
    "bmad import tests/unit/cli/fixtures/bmad-core --workflow greenfield-service "
    "-o manifests/samples/workflows"
)


def generated() -> dict[str, str]:
    result = importer.import_folder(FIXTURES, importer.Options(), workflows=["greenfield-service"])
    assert result.errors == []
    return {name: importer.render(manifest) for name, manifest in result.manifests()}


def test_the_samples_are_what_the_importer_makes_of_the_fixtures() -> None:
    expected = generated()
    on_disk = {p.name: p.read_text(encoding="utf-8") for p in SAMPLES.glob("*-*.yaml")}
    assert sorted(on_disk) == sorted(expected), f"stale samples: run {REGENERATE}"
    for name, text in expected.items():
        assert on_disk[name] == text, f"{name} is stale: run {REGENERATE}"


def test_the_kustomization_lists_every_sample_and_its_namespace() -> None:
    kustomization = yaml.safe_load((SAMPLES / "kustomization.yaml").read_text())
    assert kustomization["namespace"] == "bmad-workflows"
    assert sorted(kustomization["resources"]) == sorted(["namespace.yaml", *generated()])
    namespace = yaml.safe_load((SAMPLES / "namespace.yaml").read_text())
    assert namespace["metadata"]["name"] == "bmad-workflows"


def test_the_samples_are_valid_and_run_without_credentials() -> None:
    for path in sorted(SAMPLES.glob("agent-*.yaml")):
        agent = agent_api.Agent.model_validate(yaml.safe_load(path.read_text()))
        assert agent.spec.model.provider == "echo", path.name
        assert agent.metadata.namespace is None, "samples take their namespace from kustomize"
    wf = workflow_api.Workflow.model_validate(
        yaml.safe_load((SAMPLES / "workflow-greenfield-service.yaml").read_text())
    )
    agents = {p.stem.removeprefix("agent-") for p in SAMPLES.glob("agent-*.yaml")}
    assert {step.agent for step in wf.spec.steps} == agents
