"""Golden files pin every manifest the Agent builders return, field for field.

Each case below is an Agent (metadata, spec) plus what the reconciler hands the
builders (bound integrations, binding Secret versions). `golden/agent-<case>.yaml`
holds the full list `builders.agent.build_all` returns for it, in apply order.

A change to the builders that changes a golden file is a change to what runs in
users' clusters: review the diff of the golden files like code. To rewrite them
after an intended change, run

    BMAD_UPDATE_GOLDEN=1 .venv/bin/pytest tests/unit/operator/test_builders_golden.py

and commit the rewritten files with the change (the test passes while rewriting).
"""

from __future__ import annotations

import os
import pathlib
from typing import Any, NamedTuple

import pytest
import yaml

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.builders import agent as builders

pytestmark = pytest.mark.unit

GOLDEN = pathlib.Path(__file__).parent / "golden"
UPDATE = os.environ.get("BMAD_UPDATE_GOLDEN") == "1"
IMAGE = "ghcr.io/bmad/agent-runtime:0.1.0"


class Case(NamedTuple):
    name: str
    agent: str
    uid: str
    spec: dict[str, Any]
    bindings: tuple[str, ...] = ()
    secret_versions: dict[str, str] | None = None
    tenant: str | None = None
    instructions_version: str | None = None


CASES = (
    Case(
        name="minimal",
        agent="minimal",
        uid="0b0e6a4e-1111-4a3b-8c1d-000000000001",
        spec={"role": "analyst", "model": {"provider": "echo", "name": "echo-1"}},
    ),
    Case(
        name="full",
        agent="winston",
        uid="0b0e6a4e-2222-4a3b-8c1d-000000000002",
        spec={
            "role": "architect",
            "persona": {
                "name": "Winston",
                "title": "Architect",
                "style": "Pragmatic, draws boxes first.",
                "identity": "Designs systems that survive their second year.",
                "focus": "Architecture documents and technical decisions.",
            },
            "instructions": "# Winston\n\nWrite the architecture.\nKeep it short.\n",
            "model": {
                "provider": "anthropic",
                "name": "claude-sonnet-4-5",
                "params": {"temperature": 0.2, "maxTokens": 4096},
                "fallbacks": [{"provider": "openai", "name": "gpt-4o-mini"}],
            },
            "replicas": 2,
            "limits": {"requestsPerMinute": 60, "tokensPerMinute": 100000, "concurrency": 4},
            "memory": {"turns": 50, "ttlSeconds": 3600},
            "resources": {
                "requests": {"cpu": "250m", "memory": "512Mi"},
                "limits": {"cpu": 1, "memory": "1Gi"},
            },
            "runtime": {
                "image": "registry.example.com/bmad/runtime:1.2.3",
                "imagePullPolicy": "IfNotPresent",
                "env": [
                    {"name": "LOG_LEVEL", "value": "debug"},
                    {
                        "name": "EXTRA_TOKEN",
                        "valueFrom": {"secretKeyRef": {"name": "extra", "key": "token"}},
                    },
                    {
                        "name": "FEATURES",
                        "valueFrom": {"configMapKeyRef": {"name": "flags", "key": "features"}},
                    },
                ],
            },
        },
    ),
    Case(
        name="paused",
        agent="sleepy",
        uid="0b0e6a4e-3333-4a3b-8c1d-000000000003",
        spec={
            "role": "dev",
            "model": {"provider": "openai", "name": "gpt-4o"},
            "replicas": 3,
            "paused": True,
        },
    ),
    Case(
        name="bound",
        agent="james",
        uid="0b0e6a4e-4444-4a3b-8c1d-000000000004",
        spec={
            "role": "dev",
            "model": {
                "provider": "openai-compatible",
                "name": "llama-3.1-8b",
                "integration": "llm",
            },
            "integrations": ["github", "llm"],
        },
        bindings=("github", "llm"),
        secret_versions={"github": "4711", "llm": "815"},
        tenant="acme",
    ),
    Case(
        name="own-service-account",
        agent="quinn",
        uid="0b0e6a4e-5555-4a3b-8c1d-000000000005",
        spec={
            "role": "custom",
            "instructionsFrom": {"name": "prompts", "key": "qa.md"},
            "model": {"provider": "echo", "name": "echo-1"},
            "runtime": {"serviceAccountName": "qa-bot"},
        },
        instructions_version="31337",
    ),
)


class _Dumper(yaml.SafeDumper):
    """Readable golden files: multi-line strings (the rendered config) as blocks."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def _dump(objs: list[dict[str, Any]]) -> str:
    return yaml.dump(objs, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=100)


def _build(case: Case) -> list[dict[str, Any]]:
    body = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": case.agent, "namespace": "golden", "uid": case.uid},
        "spec": case.spec,
    }
    spec = agent_api.AgentSpec.model_validate(case.spec)
    return builders.build_all(
        body,
        spec,
        image=IMAGE,
        bindings=case.bindings,
        secret_versions=case.secret_versions,
        tenant=case.tenant,
        instructions_version=case.instructions_version,
    )


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_build_all_matches_golden_file(case: Case) -> None:
    path = GOLDEN / f"agent-{case.name}.yaml"
    built = _build(case)
    if UPDATE:
        path.write_text(_dump(built))
    assert path.exists(), f"{path} is missing: run with BMAD_UPDATE_GOLDEN=1 to write it"
    expected = yaml.safe_load(path.read_text())
    assert built == expected, (
        f"build_all output for case {case.name!r} differs from {path.name}; if the change is "
        "intended, rerun with BMAD_UPDATE_GOLDEN=1 and review the diff"
    )


def test_golden_files_round_trip() -> None:
    """What the dumper writes reads back as the same objects (no lossy formatting)."""
    for case in CASES:
        built = _build(case)
        assert yaml.safe_load(_dump(built)) == built


def test_no_stale_golden_files() -> None:
    expected = {f"agent-{c.name}.yaml" for c in CASES}
    on_disk = {p.name for p in GOLDEN.glob("agent-*.yaml")}
    assert on_disk == expected


def test_golden_cases_cover_what_they_claim() -> None:
    """The cases keep exercising what they are named for, even after a rewrite."""
    by_name = {c.name: yaml.safe_load((GOLDEN / f"agent-{c.name}.yaml").read_text()) for c in CASES}
    kinds = [o["kind"] for o in by_name["minimal"]]
    assert kinds == ["ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
    assert [o["kind"] for o in by_name["own-service-account"]] == kinds[1:]

    def deployment(case: str) -> dict[str, Any]:
        return next(o for o in by_name[case] if o["kind"] == "Deployment")

    assert deployment("paused")["spec"]["replicas"] == 0
    assert deployment("full")["spec"]["replicas"] == 2
    full_container = deployment("full")["spec"]["template"]["spec"]["containers"][0]
    assert full_container["image"] == "registry.example.com/bmad/runtime:1.2.3"
    assert deployment("minimal")["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    bound_env = deployment("bound")["spec"]["template"]["spec"]["containers"][0]["env"]
    assert {"name": "BMAD_TENANT", "value": "acme"} in bound_env
    own_volumes = deployment("own-service-account")["spec"]["template"]["spec"]["volumes"]
    assert [v["projected"] for v in own_volumes if v["name"] == "config"]
    bound_mounts = deployment("bound")["spec"]["template"]["spec"]["containers"][0]["volumeMounts"]
    assert {m["mountPath"] for m in bound_mounts} >= {"/bindings/github", "/bindings/llm"}
