"""The operator -> runtime contract against the real API server and the operator process:
reserved environment names refused at admission (issue 10, hole 2), the namespace's
Tenant rendered for the runtime and spec.instructionsFrom mounted or reported
(issue 11)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess

from .helpers import agent, condition

pytestmark = pytest.mark.integration

RESERVED = ("bmad_agent_namespace", "Bmad_Tenant", "BMAD_AUTH_ENABLED", "service_binding_root")


@pytest.mark.parametrize("name", RESERVED)
def test_hole_2_reserved_env_names_in_any_case_are_refused_by_the_apiserver(
    kubectl: Kubectl, crds: list[str], namespace: str, name: str
) -> None:
    """Issue 10, hole 2: before the CEL rule the API server stored these and the
    operator passed the lower- and mixed-case ones to the runtime, which read them.
    On main (9ca8f9d), for each name: ``AssertionError: hostile was accepted`` (kubectl
    apply: ``agent.bmad.dev/hostile created``)."""
    k = kubectl.in_namespace(namespace)
    hostile = agent("hostile", runtime={"env": [{"name": name, "value": "victim"}]})
    proc = k.run("apply", "-f", "-", stdin=json.dumps(hostile), check=False)
    assert proc.returncode != 0, "hostile was accepted"
    assert "spec.runtime.env[0].name: Forbidden" in proc.stderr, proc.stderr
    assert "must not start with BMAD_" in proc.stderr
    assert not k.exists("agents.bmad.dev", "hostile")
    # Names that only look alike are the user's.
    fine = agent("fine", runtime={"env": [{"name": f"MY_{name.upper()}", "value": "x"}]})
    k.run("apply", "--dry-run=server", "-f", "-", stdin=json.dumps(fine))


def _deployment_env(k: Kubectl, name: str) -> dict[str, str]:
    """The agent container's environment; empty while the Deployment does not exist yet
    (the operator makes it moments after the Agent, later on a busy machine)."""
    if not k.exists("deployment", name):
        return {}
    deployment = k.json("get", "deployment", name)
    env = deployment["spec"]["template"]["spec"]["containers"][0]["env"]
    return {e["name"]: e.get("value", "") for e in env}


def test_the_namespaces_tenant_reaches_the_agent_pods(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    """Issue 11 (b): before, no BMAD_TENANT was rendered and the runtime used the
    namespace. On main (9ca8f9d): ``AssertionError: timed out after 60s waiting for the
    Deployment to name its namespace as the tenant``."""
    k = kubectl.in_namespace(namespace)
    k.apply(agent("pm", role="pm"))
    eventually(
        lambda: _deployment_env(k, "pm").get("BMAD_TENANT") == namespace,
        timeout=60,
        what="the Deployment to name its namespace as the tenant",
    )
    tenant = f"{namespace}-tenant"
    kubectl.run("label", "namespace", namespace, f"bmad.dev/tenant={tenant}")
    eventually(
        lambda: _deployment_env(k, "pm").get("BMAD_TENANT") == tenant,
        timeout=60,
        what="the Deployment to follow the namespace's tenant label",
    )


def _ready(k: Kubectl, name: str) -> dict[str, Any]:
    return condition(k.json("get", "agent", name), "Ready") or {}


def test_instructions_from_a_missing_config_map_is_a_condition_until_it_exists(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    """Issue 11 (a): before, the Agent went Ready with the instructions nowhere in its
    pods and no condition. On main (9ca8f9d): ``AssertionError: timed out after 60s
    waiting for Ready=False InstructionsNotFound``."""
    k = kubectl.in_namespace(namespace)
    ref = {"name": "review-prompts", "key": "qa.md"}
    k.apply(agent("quinn", role="custom", instructionsFrom=ref))
    eventually(
        lambda: _ready(k, "quinn").get("reason") == "InstructionsNotFound",
        timeout=60,
        what="Ready=False InstructionsNotFound",
    )
    ready = _ready(k, "quinn")
    assert ready["status"] == "False"
    assert "review-prompts" in ready["message"]
    assert "qa.md" in ready["message"]
    # The pods mount that key next to agent.json.
    volumes = k.json("get", "deployment", "quinn")["spec"]["template"]["spec"]["volumes"]
    (config,) = [v for v in volumes if v["name"] == "config"]
    sources = config["projected"]["sources"]
    assert sources[1]["configMap"]["name"] == "review-prompts"
    assert sources[1]["configMap"]["items"] == [{"key": "qa.md", "path": "instructions.md"}]
    agent_json = json.loads(k.json("get", "configmap", "quinn-config")["data"]["agent.json"])
    assert agent_json["instructionsFile"] == "instructions.md"

    k.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "review-prompts"},
            "data": {"qa.md": "Check every acceptance criterion."},
        }
    )
    eventually(
        lambda: _ready(k, "quinn").get("status") == "True",
        timeout=90,
        what="the Agent to become Ready once its instructions exist",
    )
