"""The example objects the package ships are valid."""

from __future__ import annotations

from typing import Any

import pytest

from bmad_crds import v1alpha1
from bmad_crds.v1alpha1 import agent, common, examples, integration

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "obj", examples.all_objects(), ids=lambda o: f"{o['kind']}/{o['metadata']['name']}"
)
def test_examples_parse(obj: dict[str, Any]) -> None:
    parsed = v1alpha1.ROOT_MODELS[obj["kind"]].model_validate(obj)
    assert parsed.api_version == common.API_VERSION


@pytest.mark.parametrize("role", agent.ROLES)
def test_there_is_an_example_per_role(role: agent.Role) -> None:
    spec = agent.AgentSpec.model_validate(examples.agent_spec(role))
    assert spec.role == role
    assert spec.persona is not None
    assert spec.persona.name


@pytest.mark.parametrize("type_", integration.TYPES)
def test_there_is_an_example_per_integration_type(type_: integration.IntegrationType) -> None:
    spec = integration.IntegrationSpec.model_validate(examples.integration_spec(type_))
    assert spec.type == type_
    spec.block()


def test_examples_are_fresh_copies() -> None:
    first = examples.integration_spec("postgres")
    first["postgres"]["host"] = "changed"
    assert examples.integration_spec("postgres")["postgres"]["host"] == "127.0.0.1"


def test_full_agent_example_round_trips() -> None:
    spec = agent.AgentSpec.model_validate(examples.full_agent_spec())
    assert agent.AgentSpec.model_validate(common.to_json(spec)) == spec
