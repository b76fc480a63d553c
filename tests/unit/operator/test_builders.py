"""Properties every Agent build must have, whatever the spec.

The golden files pin one output per case; these tests pin the rules behind them
(ownership, labels, pod security, rollout triggers, binding mounts, what may and may
not reach the ConfigMap), so a golden rewrite cannot quietly drop one.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.builders import agent as builders

pytestmark = pytest.mark.unit

Obj = dict[str, Any]

FULL_SPEC: Obj = {
    "role": "pm",
    "persona": {"name": "John", "title": "Product Manager"},
    "instructions": "Write the PRD.",
    "model": {"provider": "openai", "name": "gpt-4o", "params": {"temperature": 0.1}},
    "integrations": ["github", "slack"],
    "replicas": 2,
    "limits": {"concurrency": 2},
    "memory": {"turns": 10},
    "resources": {"requests": {"cpu": "0.5", "memory": "1Gi"}},
    "runtime": {
        "image": "example.com/runtime:2",
        "env": [
            {"name": "LOG_LEVEL", "value": "info"},
            {
                "name": "API_TOKEN",
                "valueFrom": {"secretKeyRef": {"name": "pm-creds", "key": "token"}},
            },
        ],
    },
}
SPECS = {
    "minimal": {"role": "analyst", "model": {"provider": "echo", "name": "echo-1"}},
    "full": FULL_SPEC,
    "paused": {"role": "qa", "model": {"provider": "echo", "name": "e"}, "paused": True},
}


def _by_kind(objs: list[Obj]) -> dict[str, Obj]:
    kinds = [o["kind"] for o in objs]
    assert len(set(kinds)) == len(kinds), kinds
    return {o["kind"]: o for o in objs}


def _pod(objs: list[Obj]) -> Obj:
    pod: Obj = _by_kind(objs)["Deployment"]["spec"]["template"]
    return pod


def _container(objs: list[Obj]) -> Obj:
    container: Obj = _pod(objs)["spec"]["containers"][0]
    return container


def _config_hash(objs: list[Obj]) -> str:
    digest: str = _pod(objs)["metadata"]["annotations"][builders.CONFIG_HASH]
    return digest


def _env(objs: list[Obj]) -> dict[str, Obj]:
    return {e["name"]: e for e in _container(objs)["env"]}


# --- ownership and labels ------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(SPECS))
def test_every_object_is_owned_by_the_agent(case: str, make_body: Any) -> None:
    body = make_body(SPECS[case], name="owner-test", uid="uid-owner-test")
    objs = builders.build_all(
        body,
        agent_api.AgentSpec.model_validate(body["spec"]),
        image="img:1",
        bindings=["github"],
    )
    assert len(objs) == 5
    for obj in objs:
        refs = obj["metadata"]["ownerReferences"]
        assert len(refs) == 1, obj["kind"]
        (ref,) = refs
        assert ref["uid"] == "uid-owner-test"
        assert ref["controller"] is True
        assert ref["blockOwnerDeletion"] is True
        assert ref["kind"] == "Agent"
        assert ref["apiVersion"] == "bmad.dev/v1alpha1"
        assert ref["name"] == "owner-test"
        assert obj["metadata"]["namespace"] == body["metadata"]["namespace"]


@pytest.mark.parametrize("case", sorted(SPECS))
def test_every_object_and_the_pods_carry_the_agent_labels(
    case: str, build_agent_objects: Any
) -> None:
    objs = build_agent_objects(SPECS[case], name="labelled")
    pod_labels = _pod(objs)["metadata"]["labels"]
    for labels in [o["metadata"]["labels"] for o in objs] + [pod_labels]:
        assert labels["bmad.dev/agent"] == "labelled"
        assert labels["app.kubernetes.io/managed-by"] == "bmad-operator"
        assert labels["bmad.dev/role"] == SPECS[case]["role"]


def test_selectors_select_the_pods_and_nothing_mutable(build_agent_objects: Any) -> None:
    objs = _by_kind(build_agent_objects(FULL_SPEC, name="sel"))
    pod_labels = objs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    selectors = [
        objs["Deployment"]["spec"]["selector"]["matchLabels"],
        objs["Service"]["spec"]["selector"],
        objs["PodDisruptionBudget"]["spec"]["selector"]["matchLabels"],
    ]
    for selector in selectors:
        # The Deployment's selector is immutable: only the agent's name, never the role.
        assert selector == {"bmad.dev/agent": "sel"}
        assert selector.items() <= pod_labels.items()


# --- pod security ----------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(SPECS))
def test_pods_run_restricted(case: str, build_agent_objects: Any) -> None:
    objs = build_agent_objects(SPECS[case])
    pod_spec = _pod(objs)["spec"]
    assert pod_spec["automountServiceAccountToken"] is False
    assert pod_spec["securityContext"]["runAsNonRoot"] is True
    assert pod_spec["securityContext"]["runAsUser"] != 0
    assert pod_spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert len(pod_spec["containers"]) == 1
    for container in pod_spec["containers"]:
        sc = container["securityContext"]
        assert sc["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"] == {"drop": ["ALL"]}
    service_account = _by_kind(objs)["ServiceAccount"]
    assert service_account["automountServiceAccountToken"] is False
    assert pod_spec["serviceAccountName"] == service_account["metadata"]["name"]


def test_own_service_account_is_used_and_none_is_created(build_agent_objects: Any) -> None:
    spec = {**SPECS["minimal"], "runtime": {"serviceAccountName": "mine"}}
    objs = build_agent_objects(spec)
    assert "ServiceAccount" not in [o["kind"] for o in objs]
    assert _pod(objs)["spec"]["serviceAccountName"] == "mine"
    assert _pod(objs)["spec"]["automountServiceAccountToken"] is False


# --- replicas and image --------------------------------------------------------------


def test_paused_scales_to_zero(build_agent_objects: Any) -> None:
    spec = {**FULL_SPEC, "replicas": 4, "paused": True}
    assert _by_kind(build_agent_objects(spec))["Deployment"]["spec"]["replicas"] == 0
    spec["paused"] = False
    assert _by_kind(build_agent_objects(spec))["Deployment"]["spec"]["replicas"] == 4


def test_runtime_image_overrides_the_operator_default(build_agent_objects: Any) -> None:
    assert _container(build_agent_objects(FULL_SPEC, image="default:1"))["image"] == (
        "example.com/runtime:2"
    )
    assert _container(build_agent_objects(SPECS["minimal"], image="default:1"))["image"] == (
        "default:1"
    )


def test_resources_default_and_pass_through(build_agent_objects: Any) -> None:
    assert _container(build_agent_objects(SPECS["minimal"]))["resources"] == {
        "requests": {"cpu": "100m", "memory": "256Mi"},
        "limits": {"memory": "512Mi"},
    }
    spec = {**SPECS["minimal"], "resources": {"limits": {"cpu": 2, "memory": "1Gi"}}}
    # Integers become strings, as the API server stores quantities.
    assert _container(build_agent_objects(spec))["resources"] == {
        "limits": {"cpu": "2", "memory": "1Gi"}
    }


# --- the config hash -------------------------------------------------------------------


def test_config_hash_is_stable_for_the_same_inputs(build_agent_objects: Any) -> None:
    versions = {"github": "10", "slack": "20"}
    first = build_agent_objects(FULL_SPEC, bindings=["github", "slack"], secret_versions=versions)
    again = build_agent_objects(
        FULL_SPEC, bindings=["github", "slack"], secret_versions=dict(reversed(versions.items()))
    )
    assert _config_hash(first) == _config_hash(again)
    assert first == again


def test_config_hash_changes_with_the_instructions(build_agent_objects: Any) -> None:
    before = build_agent_objects(FULL_SPEC)
    after = build_agent_objects({**FULL_SPEC, "instructions": "Write the PRD. Then the epics."})
    assert _config_hash(before) != _config_hash(after)
    assert (
        _by_kind(before)["ConfigMap"]["data"]["agent.json"]
        != _by_kind(after)["ConfigMap"]["data"]["agent.json"]
    )


def test_config_hash_changes_with_the_persona_and_model(build_agent_objects: Any) -> None:
    base = _config_hash(build_agent_objects(FULL_SPEC))
    persona = {**FULL_SPEC, "persona": {"name": "Johnny"}}
    model = {**FULL_SPEC, "model": {"provider": "openai", "name": "gpt-4.1"}}
    assert _config_hash(build_agent_objects(persona)) != base
    assert _config_hash(build_agent_objects(model)) != base


def test_config_hash_changes_when_a_secret_version_changes(build_agent_objects: Any) -> None:
    bindings = ["github", "slack"]
    before = build_agent_objects(
        FULL_SPEC, bindings=bindings, secret_versions={"github": "10", "slack": "20"}
    )
    rotated = build_agent_objects(
        FULL_SPEC, bindings=bindings, secret_versions={"github": "11", "slack": "20"}
    )
    assert _config_hash(before) != _config_hash(rotated)
    # Only the pod template's annotation moves: nothing else about the objects.
    _pod(rotated)["metadata"]["annotations"] = _pod(before)["metadata"]["annotations"]
    assert before == rotated


def test_config_hash_changes_when_a_secret_appears(build_agent_objects: Any) -> None:
    without = build_agent_objects(FULL_SPEC, bindings=["github"], secret_versions={})
    with_secret = build_agent_objects(
        FULL_SPEC, bindings=["github"], secret_versions={"github": "1"}
    )
    assert _config_hash(without) != _config_hash(with_secret)


def test_config_hash_ignores_what_does_not_reach_the_pods_config(build_agent_objects: Any) -> None:
    base = _config_hash(build_agent_objects(FULL_SPEC))
    assert _config_hash(build_agent_objects({**FULL_SPEC, "replicas": 7})) == base
    assert _config_hash(build_agent_objects({**FULL_SPEC, "paused": True})) == base


def test_config_hash_unit() -> None:
    config = {"data": {"agent.json": "{}"}}
    assert builders.config_hash(config, {}) == builders.config_hash(dict(config), {})
    assert builders.config_hash(config, {"a": "1"}) != builders.config_hash(config, {"a": "2"})
    # The name and the version are not ambiguous when concatenated.
    assert builders.config_hash(config, {"a": "12"}) != builders.config_hash(config, {"a1": "2"})
    assert len(builders.config_hash(config, {})) == 16


# --- bindings --------------------------------------------------------------------------


def test_binding_secrets_are_mounted_under_the_binding_root(build_agent_objects: Any) -> None:
    objs = build_agent_objects(FULL_SPEC, bindings=["github", "slack"])
    pod_spec = _pod(objs)["spec"]
    volumes = {v["name"]: v for v in pod_spec["volumes"]}
    mounts = {m["mountPath"]: m for m in _container(objs)["volumeMounts"]}
    for integration in ("github", "slack"):
        mount = mounts[f"/bindings/{integration}"]
        assert mount["readOnly"] is True
        volume = volumes[mount["name"]]
        assert volume["secret"]["secretName"] == f"{integration}-binding"
    assert _env(objs)["SERVICE_BINDING_ROOT"]["value"] == "/bindings"


def test_no_binding_volume_without_bindings(build_agent_objects: Any) -> None:
    objs = build_agent_objects(FULL_SPEC, bindings=[])
    assert not [v for v in _pod(objs)["spec"]["volumes"] if "secret" in v]
    assert not [
        m for m in _container(objs)["volumeMounts"] if m["mountPath"].startswith("/bindings")
    ]


def test_volume_and_mount_names_are_consistent(build_agent_objects: Any) -> None:
    objs = build_agent_objects(FULL_SPEC, bindings=["github", "slack"])
    volume_names = [v["name"] for v in _pod(objs)["spec"]["volumes"]]
    mount_names = [m["name"] for m in _container(objs)["volumeMounts"]]
    assert len(set(volume_names)) == len(volume_names)
    assert set(mount_names) == set(volume_names)


def test_binding_volume_names_are_unique_for_long_integration_names(
    build_agent_objects: Any,
) -> None:
    prefix = "payments-provider-production-eu-west-1-primary-cluster-"  # 55 characters
    names = [f"{prefix}github", f"{prefix}gitlab"]
    spec = {**SPECS["minimal"], "integrations": names}
    objs = build_agent_objects(spec, bindings=names)
    volume_names = [v["name"] for v in _pod(objs)["spec"]["volumes"]]
    assert all(len(n) <= 63 for n in volume_names)
    assert len(set(volume_names)) == len(volume_names), volume_names


# --- environment -----------------------------------------------------------------------

OPERATOR_VARS = (
    "BMAD_AGENT_NAME",
    "BMAD_AGENT_NAMESPACE",
    "BMAD_AGENT_ROLE",
    "BMAD_TENANT",
    "BMAD_AGENT_CONFIG",
    "SERVICE_BINDING_ROOT",
    "BMAD_HTTP_PORT",
    "BMAD_MEMORY_STORE",
)
# What issue 10 (hole 2) found passed through: the exact-case filter let these in.
HOSTILE_VARS = ("bmad_agent_namespace", "Bmad_Tenant", "BMAD_AUTH_ENABLED", "service_binding_root")


def _spec_around_the_api(spec: dict[str, Any], env: list[dict[str, str]]) -> agent_api.AgentSpec:
    """A spec whose env skipped validation: the API refuses reserved names (CEL and the
    model's rule alike), so only an object stored before that rule still has them."""
    parsed = agent_api.AgentSpec.model_validate(spec)
    runtime = agent_api.Runtime.model_construct(
        env=[agent_api.EnvVar.model_construct(name=e["name"], value=e["value"]) for e in env]
    )
    return parsed.model_copy(update={"runtime": runtime})


def test_user_env_cannot_override_the_operators_variables(make_body: Any) -> None:
    hijack = [{"name": name, "value": "hijacked"} for name in (*OPERATOR_VARS, *HOSTILE_VARS)]
    body = make_body(SPECS["minimal"], name="true-name", namespace="true-ns")
    spec = _spec_around_the_api(SPECS["minimal"], [*hijack, {"name": "MINE", "value": "kept"}])

    objs = builders.build_all(body, spec, image="img", tenant="acme")

    env_list = _container(objs)["env"]
    names = [e["name"] for e in env_list]
    assert len(names) == len(set(names)), names
    env = _env(objs)
    assert env["BMAD_AGENT_NAME"] == {"name": "BMAD_AGENT_NAME", "value": "true-name"}
    assert env["BMAD_AGENT_NAMESPACE"]["value"] == "true-ns"
    assert env["BMAD_AGENT_ROLE"]["value"] == "analyst"
    assert env["BMAD_TENANT"]["value"] == "acme"
    assert env["BMAD_AGENT_CONFIG"]["value"] == "/etc/bmad/agent.json"
    assert all(e.get("value") != "hijacked" for e in env_list)
    assert not set(HOSTILE_VARS) & set(names)
    assert env["MINE"] == {"name": "MINE", "value": "kept"}


def test_reserved_env_names_are_split_off_a_stored_spec() -> None:
    raw = {
        **SPECS["minimal"],
        "runtime": {
            "image": "img:1",
            "env": [
                {"name": "Bmad_Tenant", "value": "x"},
                {"name": "KEEP", "value": "y"},
                {"name": "service_binding_root", "value": "/z"},
            ],
        },
    }
    clean, ignored = builders.split_reserved_env(raw)
    assert ignored == ["Bmad_Tenant", "service_binding_root"]
    assert clean["runtime"] == {"image": "img:1", "env": [{"name": "KEEP", "value": "y"}]}
    assert raw["runtime"]["env"][0]["name"] == "Bmad_Tenant"  # the input is left alone
    assert builders.split_reserved_env(SPECS["minimal"]) == (SPECS["minimal"], [])


def test_the_tenant_defaults_to_the_namespace(build_agent_objects: Any) -> None:
    env = _env(build_agent_objects(SPECS["minimal"], namespace="solo"))
    assert env["BMAD_TENANT"] == {"name": "BMAD_TENANT", "value": "solo"}


def test_user_env_from_secrets_stays_a_reference(build_agent_objects: Any) -> None:
    env = _env(build_agent_objects(FULL_SPEC))
    assert env["API_TOKEN"] == {
        "name": "API_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": "pm-creds", "key": "token"}},
    }
    assert env["LOG_LEVEL"] == {"name": "LOG_LEVEL", "value": "info"}


# --- the ConfigMap -----------------------------------------------------------------------


def test_config_map_holds_no_secret_values_only_names(build_agent_objects: Any) -> None:
    objs = build_agent_objects(
        FULL_SPEC,
        bindings=["github", "slack"],
        secret_versions={"github": "918273", "slack": "645382"},
    )
    config_map = _by_kind(objs)["ConfigMap"]
    assert set(config_map["data"]) == {"agent.json"}
    assert "binaryData" not in config_map
    text = config_map["data"]["agent.json"]
    config = json.loads(text)
    # Integrations appear by name; their Secrets are mounted, never copied.
    assert config["integrations"] == ["github", "slack"]
    assert config["bindingRoot"] == "/bindings"
    # The container env (which may reference Secrets) is not part of the config at all.
    for needle in ("pm-creds", "secretKeyRef", "valueFrom", "API_TOKEN", "918273", "645382"):
        assert needle not in text
    assert set(config) == {
        "apiVersion",
        "kind",
        "agent",
        "namespace",
        "role",
        "persona",
        "instructions",
        "model",
        "limits",
        "memory",
        "integrations",
        "bindingRoot",
    }


def test_instructions_from_a_config_map_are_projected_next_to_agent_json(
    build_agent_objects: Any,
) -> None:
    spec = {**SPECS["minimal"], "instructionsFrom": {"name": "prompts", "key": "analyst.md"}}
    objs = build_agent_objects(spec, name="mary")
    config = json.loads(_by_kind(objs)["ConfigMap"]["data"]["agent.json"])
    assert config["instructionsFrom"] == {"name": "prompts", "key": "analyst.md"}
    assert config["instructionsFile"] == "instructions.md"
    assert config["instructions"] == ""
    volumes = {v["name"]: v for v in _pod(objs)["spec"]["volumes"]}
    sources = volumes["config"]["projected"]["sources"]
    assert sources == [
        {"configMap": {"name": "mary-config"}},
        {
            "configMap": {
                "name": "prompts",
                "items": [{"key": "analyst.md", "path": "instructions.md"}],
                "optional": False,
            }
        },
    ]


def test_a_new_version_of_the_instructions_config_map_rolls_the_pods(make_body: Any) -> None:
    spec_raw = {**SPECS["minimal"], "instructionsFrom": {"name": "prompts", "key": "a.md"}}
    body = make_body(spec_raw)
    spec = agent_api.AgentSpec.model_validate(spec_raw)

    def digest(version: str) -> str:
        objs = builders.build_all(body, spec, image="i:1", instructions_version=version)
        annotations = _pod(objs)["metadata"]["annotations"]
        return str(annotations[builders.CONFIG_HASH])

    assert digest("100") == digest("100")
    assert digest("100") != digest("101")


def test_config_map_is_mounted_read_only(build_agent_objects: Any) -> None:
    objs = build_agent_objects(SPECS["minimal"], name="cm")
    mounts = {m["name"]: m for m in _container(objs)["volumeMounts"]}
    volumes = {v["name"]: v for v in _pod(objs)["spec"]["volumes"]}
    assert mounts["config"]["readOnly"] is True
    assert volumes["config"]["configMap"]["name"] == _by_kind(objs)["ConfigMap"]["metadata"]["name"]
    assert _env(objs)["BMAD_AGENT_CONFIG"]["value"] == f"{mounts['config']['mountPath']}/agent.json"


def test_builders_are_pure(make_body: Any) -> None:
    body = make_body(FULL_SPEC)
    snapshot = json.dumps(body, sort_keys=True)
    spec = agent_api.AgentSpec.model_validate(body["spec"])
    first = builders.build_all(body, spec, image="i:1", bindings=["github"])
    first[2]["spec"]["replicas"] = 99  # mutating an output must not leak into the next
    second = builders.build_all(body, spec, image="i:1", bindings=["github"])
    assert second[2]["spec"]["replicas"] == 2
    assert json.dumps(body, sort_keys=True) == snapshot
