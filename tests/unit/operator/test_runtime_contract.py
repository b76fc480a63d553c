"""The operator -> runtime contract, from both ends: what the builders render is what
the runtime reads.

Nothing here is written by hand on the operator's side: the agent.json, the
container's environment, the mounts and the binding Secret are taken from the
builders' output for an Agent and an Integration, laid out the way the kubelet would
(ConfigMap key as a file, Secret keys as files under the mount path), and handed to
the runtime's own readers. A field renamed on one side only fails here.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from bmad_crds.v1alpha1 import integration as integration_api
from bmad_integrations import checks
from bmad_operator.builders import agent as agent_builders
from bmad_operator.builders import integration as integration_builders
from bmad_runtime import bindings, config, settings

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
BuildAgent = Callable[..., list[Obj]]  # the conftest fixture build_agent_objects

SPEC: Obj = {
    "role": "architect",
    "persona": {"name": "Winston", "title": "Architect", "focus": "boundaries"},
    "instructions": "Draw the boxes first.",
    "model": {
        "provider": "anthropic",
        "name": "claude-sonnet-4-5",
        "integration": "claude",
        "params": {"maxTokens": 2048},
        "fallbacks": [{"provider": "echo", "name": "echo-1"}],
    },
    "integrations": ["cache", "claude"],
    "limits": {"requestsPerMinute": 60, "concurrency": 3},
    "memory": {"turns": 12},
}


def _by_kind(objs: list[Obj]) -> dict[str, Obj]:
    return {o["kind"]: o for o in objs}


def _container(objs: list[Obj]) -> Obj:
    container: Obj = _by_kind(objs)["Deployment"]["spec"]["template"]["spec"]["containers"][0]
    return container


def _mount_path(objs: list[Obj], volume: str) -> str:
    (path,) = [m["mountPath"] for m in _container(objs)["volumeMounts"] if m["name"] == volume]
    return str(path)


def _in(root: Path, absolute: str) -> Path:
    """Where an absolute path of the pod lands under `root` in this test."""
    return root / absolute.lstrip("/")


@pytest.fixture
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith(("BMAD_", "OTEL_")) or name == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


def test_the_runtime_reads_the_agent_json_the_operator_mounts(
    build_agent_objects: BuildAgent, tmp_path: Path
) -> None:
    objs = build_agent_objects(SPEC, name="winston", bindings=["cache", "claude"])
    config_map = _by_kind(objs)["ConfigMap"]
    pod = _by_kind(objs)["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    env = {e["name"]: e.get("value") for e in _container(objs)["env"]}
    # The file the runtime is told to read is the ConfigMap key, where it is mounted.
    config_path = Path(env["BMAD_AGENT_CONFIG"])
    mount = Path(_mount_path(objs, volume["name"]))
    assert config_path.parent == mount
    for key, text in config_map["data"].items():
        _in(tmp_path, str(mount / key)).parent.mkdir(parents=True, exist_ok=True)
        _in(tmp_path, str(mount / key)).write_text(text)

    loaded = config.load(_in(tmp_path, str(config_path)))

    assert (loaded.agent, loaded.namespace, loaded.role) == ("winston", "team-a", "architect")
    assert loaded.instructions == "Draw the boxes first."
    assert loaded.persona.name == "Winston"
    assert [(m.provider, m.name) for m in loaded.model.chain] == [
        ("anthropic", "claude-sonnet-4-5"),
        ("echo", "echo-1"),
    ]
    assert loaded.model.params == {"maxTokens": 2048}
    assert loaded.limits.requests_per_minute == 60
    assert loaded.memory.turns == 12
    assert loaded.integrations == ["cache", "claude"]
    assert loaded.binding_root == env["SERVICE_BINDING_ROOT"]


@pytest.mark.usefixtures("_no_runtime_environment")
def test_the_runtime_settings_are_the_environment_the_deployment_sets(
    build_agent_objects: BuildAgent, monkeypatch: pytest.MonkeyPatch
) -> None:
    objs = build_agent_objects(SPEC, name="winston")
    container = _container(objs)
    for var in container["env"]:
        if "value" in var:
            monkeypatch.setenv(var["name"], var["value"])

    loaded = settings.RuntimeSettings()

    assert (loaded.agent_name, loaded.agent_namespace, loaded.agent_role) == (
        "winston",
        "team-a",
        "architect",
    )
    (port,) = container["ports"]
    assert loaded.http_port == port["containerPort"]
    assert str(loaded.agent_config).endswith("/agent.json")
    assert str(loaded.binding_root) == agent_builders.BINDING_ROOT


@pytest.mark.usefixtures("_no_runtime_environment")
def test_the_runtime_reads_the_binding_secret_the_operator_publishes(
    build_agent_objects: BuildAgent, tmp_path: Path
) -> None:
    integration = {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Integration",
        "metadata": {"name": "cache", "namespace": "team-a", "uid": "uid-cache"},
        "spec": {
            "type": "redis",
            "secretRef": {"name": "cache-creds"},
            "redis": {"host": "10.0.0.7", "port": 6380, "db": 2},
        },
    }
    spec = integration_api.IntegrationSpec.model_validate(integration["spec"])
    data = checks.binding_data(spec, {"password": b"p@ss word"})
    secret = integration_builders.binding_secret(integration, spec.type, data)

    objs = build_agent_objects(SPEC, name="winston", bindings=["cache"])
    pod = _by_kind(objs)["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if v.get("secret")]
    assert volume["secret"]["secretName"] == secret["metadata"]["name"]
    # The kubelet writes each key of the Secret as a file where the volume is mounted.
    folder = _in(tmp_path, _mount_path(objs, volume["name"]))
    folder.mkdir(parents=True)
    for key, value in secret["data"].items():
        (folder / key).write_bytes(base64.b64decode(value))
    root = _in(tmp_path, agent_builders.BINDING_ROOT)

    found = bindings.read_bindings(root)
    loaded = settings.RuntimeSettings(binding_root=root).with_bindings(found)

    assert list(found) == ["cache"]
    assert found["cache"].type == "redis"
    assert loaded.redis_url is not None
    assert loaded.redis_url.startswith("redis://")
    assert "10.0.0.7:6380/2" in loaded.redis_url
    assert found["cache"].redis().url == loaded.redis_url
