"""The models accept and refuse what the CRDs accept and refuse.

``cases/<kind>-valid.yaml`` and ``cases/<kind>-invalid.yaml`` hold whole objects. The
invalid ones carry a ``test.bmad.dev/expect`` annotation: a text that the models'
error report must contain, and that the API server's report contains too: the files
were checked against apiextensions-apiserver v0.33's own validation (schema, CEL,
list types, pruning) when they were written, and can be fed to a real API server
with ``kubectl apply --dry-run=server``.
"""

from __future__ import annotations

import datetime
import inspect
import pathlib
from typing import Any

import pydantic
import pytest
import yaml

from bmad_crds import v1alpha1
from bmad_crds.v1alpha1 import agent, common, integration, tenant, workflow

pytestmark = pytest.mark.unit

CASES = pathlib.Path(__file__).parent / "cases"
EXPECT = "test.bmad.dev/expect"


def _load(pattern: str) -> list[dict[str, Any]]:
    objects: list[dict[str, Any]] = []
    for path in sorted(CASES.glob(pattern)):
        objects.extend(doc for doc in yaml.safe_load_all(path.read_text()) if doc)
    return objects


VALID = _load("*-valid.yaml")
INVALID = _load("*-invalid.yaml")


def _id(obj: dict[str, Any]) -> str:
    return f"{obj['kind']}/{obj['metadata']['name']}"


def _report(error: pydantic.ValidationError) -> str:
    """The errors with Kubernetes-style paths (spec.steps[0].id), one per line."""
    lines = []
    for detail in error.errors():
        path = ""
        for part in detail["loc"]:
            if isinstance(part, int):
                path += f"[{part}]"
            else:
                path += f".{part}" if path else str(part)
        lines.append(f"{path}: {detail['msg']}")
    return "\n".join(lines)


def _parse(obj: dict[str, Any]) -> common.Resource:
    return v1alpha1.ROOT_MODELS[obj["kind"]].model_validate(obj)


def test_there_are_cases_for_every_kind() -> None:
    for kind in ("Agent", "Integration", "Workflow", "Tenant"):
        assert any(obj["kind"] == kind for obj in VALID)
        assert any(obj["kind"] == kind for obj in INVALID)


@pytest.mark.parametrize("obj", VALID, ids=_id)
def test_valid_objects_parse(obj: dict[str, Any]) -> None:
    parsed = _parse(obj)
    assert parsed.metadata.name == obj["metadata"]["name"]


@pytest.mark.parametrize("obj", INVALID, ids=_id)
def test_invalid_objects_are_refused_with_the_expected_error(obj: dict[str, Any]) -> None:
    expect = obj["metadata"]["annotations"][EXPECT]
    with pytest.raises(pydantic.ValidationError) as caught:
        _parse(obj)
    report = _report(caught.value)
    assert expect in report, report


def _rules() -> list[tuple[str, common.Rule]]:
    found: list[tuple[str, common.Rule]] = []
    for module in (agent, integration, workflow, tenant):
        for name, member in inspect.getmembers(module, inspect.isclass):
            if issubclass(member, common.ApiModel) and member.__module__ == module.__name__:
                found.extend((f"{name}[{i}]", rule) for i, rule in enumerate(member.__cel_rules__))
    return found


@pytest.mark.parametrize(("name", "rule"), _rules(), ids=[name for name, _ in _rules()])
def test_every_rule_is_exercised_by_an_invalid_case(name: str, rule: common.Rule) -> None:
    expects = [obj["metadata"]["annotations"][EXPECT] for obj in INVALID]
    assert any(expect in rule.message for expect in expects), (
        f"{name}: no case in {CASES} expects {rule.message!r}"
    )


# --- behaviour the operator relies on ---------------------------------------------------


def test_attributes_are_snake_case_and_json_is_camel_case() -> None:
    spec = agent.AgentSpec.model_validate(
        {
            "role": "dev",
            "model": {"provider": "echo", "name": "echo-1", "contextWindow": 8000},
            "instructionsFrom": {"name": "prompts", "key": "dev.md"},
        }
    )
    assert spec.model.context_window == 8000
    assert spec.instructions_from is not None
    dumped = common.to_json(spec)
    assert dumped["model"]["contextWindow"] == 8000
    assert dumped["instructionsFrom"] == {"name": "prompts", "key": "dev.md"}
    assert "instructions" not in dumped  # unset optionals are left out
    assert dumped["replicas"] == 1  # defaults are written out


def test_models_can_be_built_with_python_names() -> None:
    spec = agent.AgentSpec(
        role="qa",
        model=agent.Model(provider="echo", name="echo-1"),
        autoscaling=agent.Autoscaling(enabled=True, max_replicas=4, scale_to_zero=True),
    )
    assert common.to_json(spec)["autoscaling"]["maxReplicas"] == 4


def test_behavior_windows_win_over_the_older_fields() -> None:
    older = agent.Autoscaling.model_validate(
        {"scaleUpStabilizationWindowSeconds": 30, "scaleDownStabilizationWindowSeconds": 120}
    )
    assert older.stabilization_window_seconds("up") == 30
    assert older.stabilization_window_seconds("down") == 120
    both = agent.Autoscaling.model_validate(
        {
            "scaleDownStabilizationWindowSeconds": 120,
            "behavior": {"scaleDown": {"stabilizationWindowSeconds": 60}, "scaleUp": {}},
        }
    )
    assert both.stabilization_window_seconds("down") == 60
    assert both.stabilization_window_seconds("up") == 0


def test_scale_to_zero_is_min_zero_or_the_older_flag() -> None:
    assert agent.Autoscaling.model_validate({"minReplicas": 0}).scales_to_zero()
    assert agent.Autoscaling.model_validate(
        {"minReplicas": 2, "scaleToZero": True}
    ).scales_to_zero()
    assert not agent.Autoscaling.model_validate({"minReplicas": 2}).scales_to_zero()


def test_defaults_match_the_schema_defaults() -> None:
    spec = agent.AgentSpec.model_validate(
        {"role": "dev", "model": {"provider": "echo", "name": "e"}, "autoscaling": {}}
    )
    assert spec.replicas == 1
    assert spec.paused is False
    assert spec.autoscaling is not None
    assert spec.autoscaling.min_replicas == 1
    assert spec.autoscaling.stabilization_window_seconds("down") == 300
    assert spec.autoscaling.stabilization_window_seconds("up") == 0
    assert spec.autoscaling.polling_interval_seconds == 5
    assert spec.autoscaling.tolerance == 0.1
    assert spec.autoscaling.engine == "operator"
    assert spec.autoscaling.scales_to_zero() is False
    [metric] = spec.autoscaling.effective_metrics()
    assert (metric.type, metric.target) == ("queueDepth", 5)
    ispec = integration.IntegrationSpec.model_validate(
        {
            "type": "postgres",
            "secretRef": {"name": "pg"},
            "postgres": {"host": "db", "database": "d"},
        }
    )
    assert ispec.check_interval_seconds == 300
    assert ispec.postgres is not None
    assert ispec.postgres.port == 5432
    assert ispec.postgres.ssl_mode == "prefer"
    tspec = tenant.TenantSpec.model_validate({"namespaces": ["a"]})
    assert tspec.deletion_policy == "Retain"
    assert tspec.suspended is False


def test_specs_are_strict_about_types() -> None:
    with pytest.raises(pydantic.ValidationError):
        agent.Limits.model_validate({"concurrency": "4"})
    with pytest.raises(pydantic.ValidationError):
        agent.AgentSpec.model_validate(
            {"role": "dev", "model": {"provider": "echo", "name": "e"}, "paused": 1}
        )


def test_integration_block_follows_the_type() -> None:
    spec = integration.IntegrationSpec.model_validate(
        {"type": "objectStorage", "objectStorage": {"provider": "s3", "bucket": "artifacts"}}
    )
    block = spec.block()
    assert isinstance(block, integration.ObjectStorage)
    assert block.bucket == "artifacts"
    assert common.to_json(spec)["objectStorage"]["pathStyle"] is False


def test_email_from_is_spelled_from() -> None:
    email = integration.Email.model_validate(
        {"provider": "smtp", "host": "mail", "from": "a@b.c", "startTLS": True}
    )
    assert email.from_ == "a@b.c"
    assert email.start_tls is True
    assert common.to_json(email)["from"] == "a@b.c"
    assert common.to_json(email)["startTLS"] is True


def test_status_parses_what_the_api_server_returns() -> None:
    status = agent.AgentStatus.model_validate(
        {
            "observedGeneration": 3,
            "replicas": 2,
            "readyReplicas": 1,
            "selector": "bmad.dev/agent=dev",
            "addedByANewerOperator": True,
            "conditions": [
                {
                    "type": "Ready",
                    "status": "False",
                    "reason": "ReplicasUnavailable",
                    "message": "1 of 2 replicas are ready",
                    "lastTransitionTime": "2025-01-02T03:04:05Z",
                    "observedGeneration": 3,
                }
            ],
        }
    )
    [ready] = status.conditions
    assert ready.last_transition_time == datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    assert common.to_json(ready)["lastTransitionTime"] == "2025-01-02T03:04:05Z"


def test_condition_reason_must_be_camel_case() -> None:
    with pytest.raises(pydantic.ValidationError):
        common.Condition.model_validate(
            {
                "type": "Ready",
                "status": "True",
                "reason": "not camel case",
                "lastTransitionTime": "2025-01-02T03:04:05Z",
            }
        )


def test_root_models_take_kopf_bodies() -> None:
    body = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Workflow",
        "metadata": {
            "name": "run-1",
            "namespace": "team-a",
            "uid": "0000",
            "generation": 2,
            "resourceVersion": "42",
            "creationTimestamp": "2025-01-02T03:04:05Z",
            "managedFields": [],
        },
        "spec": {"steps": [{"id": "prd", "agent": "pm"}]},
        "status": {"phase": "Running", "totals": {"steps": 1, "stepsCompleted": 0}},
    }
    parsed = workflow.Workflow.model_validate(body)
    assert parsed.metadata.namespace == "team-a"
    assert parsed.metadata.generation == 2
    assert parsed.status is not None
    assert parsed.status.phase == "Running"


def test_kinds_are_described_consistently() -> None:
    assert [kind.kind for kind in v1alpha1.KINDS] == list(v1alpha1.ROOT_MODELS)
    for kind in v1alpha1.KINDS:
        model = v1alpha1.ROOT_MODELS[kind.kind]
        assert model.model_fields["kind"].default == kind.kind
        assert kind.crd_name == f"{kind.plural}.bmad.dev"
    assert common.API_VERSION == "bmad.dev/v1alpha1"
