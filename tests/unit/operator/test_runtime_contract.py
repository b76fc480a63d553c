"""The operator -> runtime contract, from both ends: what the builders render is what
the runtime reads.

Nothing here is written by hand on the operator's side: the agent.json, the
container's environment, the mounts and the binding Secret are taken from the
builders' output for an Agent and an Integration, laid out the way the kubelet would
(`tests/podlayout.py`: ConfigMap keys as files, projected volumes merged, Secret keys
as files under the mount path), and handed to the runtime's own readers. A field
renamed on one side only fails here; so does a spec field with no home, an env name
the runtime does not read, or a reserved name that gets through.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from bmad_crds import runtime_contract as contract
from bmad_crds.v1alpha1 import agent as agent_api
from bmad_crds.v1alpha1 import integration as integration_api
from bmad_integrations import checks
from bmad_operator.builders import agent as agent_builders
from bmad_operator.builders import integration as integration_builders
from bmad_runtime import bindings, config, settings, wiring
from bmad_runtime.api import deps

from ... import podlayout

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
BuildAgent = Callable[..., list[Obj]]  # the conftest fixture build_agent_objects
MakeBody = Callable[..., Obj]

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
INSTRUCTIONS = "Answer in numbered steps.\nCite the PRD section you rely on.\n"
FROM_CONFIG_MAP: Obj = {
    "role": "custom",
    "persona": {"name": "Quinn", "title": "Reviewer"},
    "instructionsFrom": {"name": "prompts", "key": "review.md"},
    "model": {"provider": "echo", "name": "echo-1", "params": {"echoSystem": True}},
    "memory": {"store": "inProcess"},
    "auth": {"mode": "none"},  # no auth0 Integration bound
}


@pytest.fixture
def _no_runtime_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.upper().startswith(("BMAD_", "OTEL_")) or name.upper() == "SERVICE_BINDING_ROOT":
            monkeypatch.delenv(name)


@pytest.fixture
def pod_environment(
    monkeypatch: pytest.MonkeyPatch, _no_runtime_environment: None
) -> Callable[[list[Obj], Path], None]:
    """Set the process environment to the rendered container's (paths under a root)."""

    def apply(objs: list[Obj], root: Path) -> None:
        for name, value in podlayout.environment(objs, root).items():
            monkeypatch.setenv(name, value)

    return apply


def test_the_runtime_reads_the_agent_json_the_operator_mounts(
    build_agent_objects: BuildAgent, tmp_path: Path
) -> None:
    objs = build_agent_objects(SPEC, name="winston", bindings=["cache", "claude"])
    config_map = podlayout.by_kind(objs)["ConfigMap"]
    pod = podlayout.by_kind(objs)["Deployment"]["spec"]["template"]["spec"]
    (volume,) = [v for v in pod["volumes"] if "configMap" in v]
    assert volume["configMap"]["name"] == config_map["metadata"]["name"]
    env = podlayout.environment(objs, tmp_path)
    podlayout.lay_out(tmp_path, objs, secrets={"cache-binding": {}, "claude-binding": {}})

    loaded = config.load(Path(env[contract.AGENT_CONFIG]))

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
    assert loaded.binding_root == contract.BINDING_ROOT
    # The same schema on both ends: what the builder wrote is the contract's model.
    assert contract.AgentConfig.model_validate(json.loads(config_map["data"]["agent.json"]))


def test_the_mounts_are_where_the_contract_says(build_agent_objects: BuildAgent) -> None:
    objs = build_agent_objects(SPEC, name="winston", bindings=["cache"])
    mounts = {m["mountPath"]: m for m in podlayout.container(objs)["volumeMounts"]}
    volumes = {
        v["name"]: v
        for v in podlayout.by_kind(objs)["Deployment"]["spec"]["template"]["spec"]["volumes"]
    }
    env = {e["name"]: e.get("value") for e in podlayout.container(objs)["env"]}
    assert mounts[contract.CONFIG_DIR]["readOnly"] is True
    assert env[contract.AGENT_CONFIG] == contract.CONFIG_PATH
    assert env[contract.SERVICE_BINDING_ROOT] == contract.BINDING_ROOT
    assert mounts[f"{contract.BINDING_ROOT}/cache"]["readOnly"] is True
    (port,) = podlayout.container(objs)["ports"]
    assert port["containerPort"] == contract.HTTP_PORT == int(env[contract.HTTP_PORT_ENV])
    # The root filesystem is read-only: the writable directories are the pod's emptyDirs.
    assert podlayout.container(objs)["securityContext"]["readOnlyRootFilesystem"] is True
    writable = {path for path, m in mounts.items() if not m.get("readOnly")}
    assert writable == set(contract.WRITABLE_DIRS)
    for path in contract.WRITABLE_DIRS:
        assert "emptyDir" in volumes[mounts[path]["name"]]


@pytest.mark.usefixtures("_no_runtime_environment")
def test_the_runtime_settings_are_the_environment_the_deployment_sets(
    build_agent_objects: BuildAgent,
    pod_environment: Callable[[list[Obj], Path], None],
    tmp_path: Path,
) -> None:
    objs = build_agent_objects(SPEC, name="winston")
    pod_environment(objs, tmp_path)

    loaded = settings.RuntimeSettings()

    assert (loaded.agent_name, loaded.agent_namespace, loaded.agent_role) == (
        "winston",
        "team-a",
        "architect",
    )
    assert loaded.http_port == contract.HTTP_PORT
    assert loaded.agent_config == podlayout.in_root(tmp_path, contract.CONFIG_PATH)
    assert loaded.binding_root == podlayout.in_root(tmp_path, contract.BINDING_ROOT)
    assert loaded.memory_store == "durable"


def test_every_variable_the_operator_sets_is_one_the_runtime_reads(
    build_agent_objects: BuildAgent,
) -> None:
    rendered = [e["name"] for e in podlayout.container(build_agent_objects(SPEC))["env"]]
    read = {settings.env_name(field) for field in settings.RuntimeSettings.model_fields}
    assert set(rendered) <= read, set(rendered) - read
    assert {
        e["name"]
        for e in contract.PodEnvironment(
            agent_name="a", agent_namespace="n", agent_role="dev", tenant="t"
        ).env()
    } == set(rendered)
    # ... and every one of them (and the auth switch) is reserved: no spec can set it.
    for name in [*rendered, contract.AUTH_ENABLED, contract.AUTH_MODE]:
        assert contract.is_reserved_env(name)
        assert contract.is_reserved_env(name.lower())


def test_every_spec_field_has_a_home() -> None:
    """A field added to the Agent API must be placed: in agent.json, or the operator's."""
    fields = set(agent_api.AgentSpec.model_fields)
    placed = contract.SPEC_FIELDS_IN_AGENT_JSON | contract.SPEC_FIELDS_OF_THE_OPERATOR
    assert fields == placed, fields ^ placed
    schema_fields = set(contract.AgentConfig.model_fields)
    assert schema_fields >= contract.SPEC_FIELDS_IN_AGENT_JSON


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
    podlayout.lay_out(
        tmp_path,
        objs,
        secrets={secret["metadata"]["name"]: podlayout.secret_data(secret)},
    )
    root = podlayout.in_root(tmp_path, contract.BINDING_ROOT)

    found = bindings.read_bindings(root)
    loaded = settings.RuntimeSettings(binding_root=root).with_bindings(found)

    assert list(found) == ["cache"]
    assert found["cache"].type == "redis"
    assert loaded.redis_url is not None
    assert loaded.redis_url.startswith("redis://")
    assert "10.0.0.7:6380/2" in loaded.redis_url
    assert found["cache"].redis().url == loaded.redis_url


# --- issue 11: instructionsFrom, the tenant ---------------------------------------------


async def test_instructions_from_a_config_map_reach_the_models_system_prompt(
    build_agent_objects: BuildAgent,
    pod_environment: Callable[[list[Obj], Path], None],
    tmp_path: Path,
) -> None:
    """Issue 11 (a): spec.instructionsFrom was written into agent.json but neither
    mounted nor read, so the agent ran with no instructions. On main (9ca8f9d) the
    Deployment's volumes were ``[config (configMap), tmp (emptyDir)]`` and
    ``config.load(agent.json).instructions`` was ``''``."""
    objs = build_agent_objects(FROM_CONFIG_MAP, name="quinn")
    podlayout.lay_out(tmp_path, objs, config_maps={"prompts": {"review.md": INSTRUCTIONS}})
    pod_environment(objs, tmp_path)

    runtime_settings = settings.load()
    assert config.load(runtime_settings.agent_config).instructions == INSTRUCTIONS
    app = wiring.create_default_app(runtime_settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://agent") as client:
            answer = await client.post("/v1/invoke", json={"input": "Review story 1.2"})

    assert answer.status_code == 200, answer.text
    output = answer.json()["output"]
    # The echo model (echoSystem) shows its system prompt: the persona, then the
    # instructions from the ConfigMap, then the user's message.
    assert output.startswith("[echo-1] You are Quinn, the Reviewer.")
    assert INSTRUCTIONS.strip() in output
    assert output.endswith("Review story 1.2")


def test_a_missing_instructions_config_map_is_a_pod_that_does_not_start(
    build_agent_objects: BuildAgent, tmp_path: Path
) -> None:
    """Not an agent without instructions: the kubelet refuses the volume (the reconciler
    says why on the Agent, see test_reconciler_agent)."""
    objs = build_agent_objects(FROM_CONFIG_MAP, name="quinn")
    with pytest.raises(podlayout.MountError, match="ConfigMap prompts not found"):
        podlayout.lay_out(tmp_path, objs)
    with pytest.raises(podlayout.MountError, match=r"no key 'review\.md'"):
        podlayout.lay_out(tmp_path, objs, config_maps={"prompts": {"other.md": "x"}})


def test_agent_json_without_its_instructions_file_is_an_error_naming_the_config_map(
    build_agent_objects: BuildAgent, tmp_path: Path
) -> None:
    objs = build_agent_objects(FROM_CONFIG_MAP, name="quinn")
    path = tmp_path / "agent.json"
    path.write_text(podlayout.by_kind(objs)["ConfigMap"]["data"]["agent.json"])
    with pytest.raises(config.ConfigError, match=r"key 'review\.md' of ConfigMap 'prompts'"):
        config.load(path)


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", ".hidden", "a/b"])
def test_agent_json_may_only_name_a_file_next_to_it(tmp_path: Path, name: str) -> None:
    # Tenant admins may edit the Agent's ConfigMap: it must not make the runtime read
    # anything outside its config directory.
    path = tmp_path / "agent.json"
    path.write_text(
        json.dumps({"model": {"provider": "echo", "name": "e"}, "instructionsFile": name})
    )
    with pytest.raises(config.ConfigError, match="must be a file name"):
        config.load(path)


@pytest.mark.usefixtures("_no_runtime_environment")
def test_the_runtime_serves_the_tenant_the_operator_renders(
    make_body: MakeBody, pod_environment: Callable[[list[Obj], Path], None], tmp_path: Path
) -> None:
    """Issue 11 (b): the Tenant was never passed (BMAD_TENANT), so the runtime used the
    namespace and a tenant's namespaces got separate budgets. On main (9ca8f9d): no
    BMAD_TENANT in the rendered env, and the runtime's tenant was ``'team-a'``."""
    spec_raw = {
        "role": "dev",
        "model": {"provider": "echo", "name": "echo-1"},
        "memory": {"store": "inProcess"},
    }
    body = make_body(spec_raw, name="winston", namespace="team-a")
    spec = agent_api.AgentSpec.model_validate(body["spec"])
    objs = agent_builders.build_all(body, spec, image="img", tenant="acme")
    podlayout.lay_out(tmp_path, objs)
    pod_environment(objs, tmp_path)

    loaded = settings.load()

    assert loaded.effective_tenant == "acme"
    # One tenant, many namespaces: the namespace tells same-named Agents apart.
    assert loaded.agent_key == "team-a.winston"
    app = wiring.create_default_app(loaded)
    state: deps.RuntimeState = app.state.runtime
    assert (state.tenant, state.agent) == ("acme", "team-a.winston")


def test_agents_keep_their_plain_name_when_their_namespace_is_their_tenant() -> None:
    assert contract.agent_key(name="dev", namespace="solo", tenant="solo") == "dev"
    assert contract.agent_key(name="dev", namespace="solo", tenant=None) == "dev"
    keys = {
        contract.agent_key(name=name, namespace=namespace, tenant="acme")
        for name, namespace in [("dev", "acme"), ("dev", "acme-dev"), ("acme-dev", "dev")]
    }
    assert len(keys) == 3


# --- issue 10, hole 2: a tenant can set the runtime's identity -----------------------

HOSTILE = {
    "bmad_agent_namespace": "victim",
    "Bmad_Tenant": "victim",
    "BMAD_AUTH_ENABLED": "false",
    "bmad_auth_mode": "none",
    "bmad_agent_name": "victim-agent",
    "service_binding_root": "/tmp/forged",
}


def _around_the_api(spec: Obj, env: dict[str, str]) -> agent_api.AgentSpec:
    """A spec carrying reserved names, as only an object stored before the API's rule
    can (the API server and the model refuse them)."""
    parsed = agent_api.AgentSpec.model_validate(spec)
    runtime = agent_api.Runtime.model_construct(
        env=[agent_api.EnvVar.model_construct(name=k, value=v) for k, v in env.items()]
    )
    return parsed.model_copy(update={"runtime": runtime})


@pytest.mark.usefixtures("_no_runtime_environment")
def test_hole_2_a_tenant_cannot_set_the_runtimes_identity(
    make_body: MakeBody, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """Issue 10, hole 2. On main (9ca8f9d) the builder passed ``bmad_agent_namespace``
    and ``Bmad_Tenant`` through (its filter compared exact case) and pydantic-settings
    read them case-insensitively: the same steps gave
    ``AssertionError: ('victim', 'victim')`` for (agent_namespace, effective_tenant)."""
    body = make_body(SPEC, name="winston", namespace="team-a")
    spec = _around_the_api(SPEC, HOSTILE)

    objs = agent_builders.build_all(body, spec, image="img", tenant="acme")

    rendered = {e["name"] for e in podlayout.container(objs)["env"]}
    assert not rendered & set(HOSTILE), rendered & set(HOSTILE)
    # The reconciler takes them out before it parses a stored spec, and says so.
    raw = {**SPEC, "runtime": {"env": [{"name": k, "value": v} for k, v in HOSTILE.items()]}}
    clean, ignored = agent_builders.split_reserved_env(raw)
    assert ignored == list(HOSTILE)
    assert agent_api.AgentSpec.model_validate(clean).runtime == agent_api.Runtime(env=[])
    # Even were they in the environment, the runtime reads its settings by exact name:
    # any other spelling is not a setting. (An exact BMAD_* name can only come from
    # the Deployment, which tenant admins cannot edit: the builder is its only author.)
    for name, value in podlayout.environment(objs, tmp_path).items():
        monkeypatch.setenv(name, value)
    for name, value in HOSTILE.items():
        if name != name.upper():
            monkeypatch.setenv(name, value)
    loaded = settings.RuntimeSettings()
    assert (loaded.agent_namespace, loaded.effective_tenant) == ("team-a", "acme")
    assert loaded.agent_name == "winston"
    assert loaded.auth_mode == "jwt"  # the spec's choice (the default), not the forged one
    assert loaded.binding_root == podlayout.in_root(tmp_path, contract.BINDING_ROOT)


@pytest.mark.parametrize("name", [*HOSTILE, "SERVICE_BINDING_ROOT", "bmad_x"])
def test_hole_2_every_reserved_name_is_refused_by_the_api_in_any_case(name: str) -> None:
    with pytest.raises(ValueError, match=r"must not start with BMAD_"):
        agent_api.AgentSpec.model_validate(
            {**SPEC, "runtime": {"env": [{"name": name, "value": "x"}]}}
        )


@pytest.mark.usefixtures("_no_runtime_environment")
def test_the_usage_ledger_reaches_the_runtime_only_through_reserved_names_and_a_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    env = contract.PodEnvironment(
        agent_name="dev",
        agent_namespace="team-a",
        agent_role="dev",
        tenant="acme",
        usage_ledger_url="redis://ledger.bmad-system:6379/0",
    ).env()
    by_name = {e["name"]: e for e in env}
    assert by_name[contract.USAGE_LEDGER_URL]["value"] == "redis://ledger.bmad-system:6379/0"
    password = by_name[contract.USAGE_LEDGER_PASSWORD]
    assert "value" not in password  # never a literal: the Secret the operator owns
    ref = password["valueFrom"]["secretKeyRef"]
    assert ref == {"name": contract.usage_secret_name("dev"), "key": contract.USAGE_SECRET_KEY}
    body = {"metadata": {"name": "dev", "namespace": "team-a", "uid": "u-1"}}
    secret = agent_builders.usage_secret(
        body, agent_api.AgentSpec.model_validate(FROM_CONFIG_MAP), "p" * 32
    )
    assert secret["metadata"]["name"] == ref["name"]
    assert secret["stringData"] == {ref["key"]: "p" * 32}
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    # The spool in a memory emptyDir of the pod's own, which outlives a container's restart.
    assert by_name[contract.USAGE_LEDGER_SPOOL]["value"] == contract.USAGE_SPOOL_DIR
    pod = agent_builders.deployment(
        {"metadata": {"name": "dev", "namespace": "team-a", "uid": "u-1"}},
        agent_api.AgentSpec.model_validate(FROM_CONFIG_MAP),
        image="bmad/runtime:test",
        replicas=1,
        config_digest="d",
        usage_ledger_url="redis://ledger.bmad-system:6379/0",
    )["spec"]["template"]["spec"]
    [mount] = [
        m
        for m in pod["containers"][0]["volumeMounts"]
        if m["mountPath"] == contract.USAGE_SPOOL_DIR
    ]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert volume["emptyDir"] == {"medium": "Memory", "sizeLimit": contract.USAGE_SPOOL_SIZE_LIMIT}
    assert not mount.get("readOnly")
    read = {settings.env_name(field) for field in settings.RuntimeSettings.model_fields}
    for name in (
        contract.USAGE_LEDGER_URL,
        contract.USAGE_LEDGER_PASSWORD,
        contract.USAGE_LEDGER_SPOOL,
    ):
        assert name in read
        assert contract.is_reserved_env(name)
        assert contract.is_reserved_env(name.lower())
    monkeypatch.setenv(contract.USAGE_LEDGER_URL, "redis://ledger.bmad-system:6379/0")
    monkeypatch.setenv(contract.USAGE_LEDGER_PASSWORD, "s3cret-" * 4)
    loaded = settings.RuntimeSettings()
    assert loaded.usage_ledger_url == "redis://ledger.bmad-system:6379/0"
    assert loaded.usage_ledger_password is not None
    assert "s3cret" not in repr(loaded)
    # Without a ledger the pod gets neither variable.
    plain = contract.PodEnvironment(
        agent_name="dev", agent_namespace="team-a", agent_role="dev", tenant="acme"
    ).env()
    assert not {
        contract.USAGE_LEDGER_URL,
        contract.USAGE_LEDGER_PASSWORD,
        contract.USAGE_LEDGER_SPOOL,
    } & {e["name"] for e in plain}
