"""`reconcilers.agent.AgentReconciler` against an in-memory API server.

`FakeKube` (fake_kube.py, shared with the other reconcilers' tests) records every
call and behaves like the API server where it matters here. Each test drives passes
by hand and checks what the reconciler sent: which objects, which status, which events.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import datetime as dt
import json
from typing import Any

import pytest

from bmad_crds import runtime_contract as contract
from bmad_crds.v1alpha1 import agent as agent_api
from bmad_integrations import stripe_webhooks
from bmad_integrations.usage import budget as usage_budget
from bmad_integrations.usage import periods as usage_periods
from bmad_integrations.usage import store as usage_store
from bmad_operator import errors, store
from bmad_operator.builders import agent as builders
from bmad_operator.reconcilers import agent as agent_reconciler

from .fake_kube import FakeKube

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
NS = "team-a"
NAME = "mary"
IMAGE = "ghcr.io/bmad/agent-runtime:0.1.0"
# Open, as a demo agent: an agent with spec.auth.mode jwt (the default) is not ready
# without an auth0 Integration, which most of these tests do not bind.
SPEC: Obj = {
    "role": "analyst",
    "model": {"provider": "echo", "name": "echo-1"},
    "auth": {"mode": "none"},
}
OWNED = ["ServiceAccount", "ConfigMap", "Service", "PodDisruptionBudget", "Deployment"]


class Harness:
    """One Agent, its fake API server, the operator's store and the reconciler."""

    def __init__(self, spec: Obj | None = None, *, integrations: dict[str, Obj] | None = None):
        self.api = FakeKube()
        self.cache = store.Store()
        self.reconciler = agent_reconciler.AgentReconciler(
            api=self.api,  # type: ignore[arg-type]
            cache=self.cache,
            runtime_image=IMAGE,
        )
        body = {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Agent",
            "metadata": {
                "name": NAME,
                "namespace": NS,
                "uid": "uid-agent-mary",
                "generation": 1,
                "resourceVersion": self.api.next_rv(),
            },
            "spec": copy.deepcopy(spec if spec is not None else SPEC),
        }
        self.seed(body)
        for integration in (integrations or {}).values():
            self.seed(integration)

    def seed(self, obj: Obj) -> None:
        self.api.seed(obj, self.cache)

    def edit(self, kind: str, name: str, change: Any) -> None:
        """Someone changes a live object (the watch delivers the new version)."""
        obj = copy.deepcopy(self.api.objects[(kind, NS, name)])
        change(obj)
        obj["metadata"]["resourceVersion"] = self.api.next_rv()
        self.api.objects[(kind, NS, name)] = obj
        self.cache.put(copy.deepcopy(obj))

    def delete(self, kind: str, name: str) -> None:
        del self.api.objects[(kind, NS, name)]
        self.cache.remove(kind, NS, name)

    def update_spec(self, change: Any) -> None:
        def edit(body: Obj) -> None:
            change(body["spec"])
            body["metadata"]["generation"] += 1

        self.edit("Agent", NAME, edit)

    def make_available(self) -> None:
        """The Deployment controller finishes the rollout."""

        def roll(dep: Obj) -> None:
            n = dep["spec"]["replicas"]
            dep["status"] = {
                "observedGeneration": dep["metadata"]["generation"],
                "replicas": n,
                "readyReplicas": n,
                "availableReplicas": n,
                "updatedReplicas": n,
                "conditions": [
                    {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"},
                    {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
                ],
            }

        self.edit("Deployment", NAME, roll)

    async def run(self) -> None:
        self.api.reset()
        await self.reconciler.reconcile((NS, NAME))

    def live(self, kind: str, name: str = NAME) -> Obj:
        obj = self.cache.get(kind, NS, name)
        assert obj is not None, f"{kind}/{name} not in the store"
        return obj

    def status(self) -> Obj:
        status: Obj = self.live("Agent").get("status") or {}
        return status

    def condition(self, type_: str) -> Obj:
        found = [c for c in self.status().get("conditions", []) if c["type"] == type_]
        assert len(found) == 1, (type_, self.status())
        cond: Obj = found[0]
        return cond

    def event_reasons(self) -> list[str]:
        return [e["reason"] for e in self.api.events]

    def applied_kinds(self) -> list[str]:
        return [o["kind"] for o in self.api.applied]


def integration(
    name: str, ready: str = "True", message: str = "Reachable.", type_: str = "llm"
) -> Obj:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Integration",
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-int-{name}"},
        "spec": {"type": type_},
        "status": {
            "conditions": [
                {"type": "Ready", "status": ready, "reason": "Checked", "message": message}
            ]
        },
    }


def binding_secret(integration_name: str, rv: str) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": f"{integration_name}-binding",
            "namespace": NS,
            "uid": f"uid-secret-{integration_name}",
            "resourceVersion": rv,
            "labels": {"bmad.dev/integration": integration_name},
        },
        "data": {"token": "c2VjcmV0LXZhbHVl"},
    }


def pod_template(h: Harness) -> Obj:
    template: Obj = h.live("Deployment")["spec"]["template"]
    return template


async def ready_harness(spec: Obj | None = None, **kw: Any) -> Harness:
    h = Harness(spec, **kw)
    await h.run()
    h.make_available()
    await h.run()
    assert h.condition("Ready")["status"] == "True", h.status()
    return h


# --- the three passes of a new Agent -------------------------------------------------------


async def test_first_pass_applies_five_objects_writes_status_once_posts_created() -> None:
    h = Harness()
    await h.run()
    assert h.applied_kinds() == OWNED
    # Each created by an apply that only creates: no GET first (issue 15).
    assert [c[0] for c in h.api.calls].count("apply_new") == 5
    assert h.api.verbs("get") == []
    assert h.api.verbs("apply") == []
    assert len(h.api.verbs("patch_status")) == 1
    assert h.event_reasons() == ["Created"]
    (created,) = h.api.events
    assert created["type"] == "Normal"
    for kind in OWNED:
        assert kind in created["message"]
    # What was applied is exactly what the builders return, plus our applied-hash.
    body = h.live("Agent")
    spec = agent_api.AgentSpec.model_validate(body["spec"])
    applied = copy.deepcopy(h.api.applied)
    for obj in applied:
        digest = obj["metadata"]["annotations"].pop(agent_reconciler.APPLIED_HASH)
        assert len(digest) == 16
        if not obj["metadata"]["annotations"]:
            del obj["metadata"]["annotations"]
    built = builders.build_all(body, spec, image=IMAGE)
    # In the builders' order, but the Deployment last (its pods start once the rest is ours).
    assert applied == [o for o in built if o["kind"] != "Deployment"] + [
        o for o in built if o["kind"] == "Deployment"
    ]

    status = h.api.statuses[0]
    assert status["observedGeneration"] == 1
    assert status["desiredReplicas"] == 1
    assert status["replicas"] == 0
    assert status["readyReplicas"] == 0
    assert status["selector"] == "bmad.dev/agent=mary"
    assert status["endpoint"] == "http://mary.team-a.svc:80"
    assert [c["type"] for c in status["conditions"]] == [
        "Ready",
        "Available",
        "Progressing",
        "IntegrationsReady",
    ]
    assert h.condition("Ready")["status"] == "False"
    assert h.condition("Progressing")["status"] == "True"
    assert h.condition("IntegrationsReady")["reason"] == "NoIntegrations"
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])


async def test_second_pass_after_rollout_reports_ready() -> None:
    h = Harness()
    await h.run()
    first_conditions = {c["type"]: c for c in h.status()["conditions"]}
    h.make_available()
    await h.run()
    assert h.api.verbs("apply") == []
    assert len(h.api.verbs("patch_status")) == 1
    assert h.event_reasons() == ["Ready"]
    assert h.api.events[0]["type"] == "Normal"
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("True", "AgentReady")
    assert (h.condition("Available")["status"], h.condition("Available")["reason"]) == (
        "True",
        "MinimumReplicasAvailable",
    )
    assert h.condition("Progressing")["reason"] == "RolledOut"
    assert h.status()["replicas"] == 1
    assert h.status()["readyReplicas"] == 1
    # A condition whose status did not flip keeps its transition time.
    assert (
        h.condition("IntegrationsReady")["lastTransitionTime"]
        == first_conditions["IntegrationsReady"]["lastTransitionTime"]
    )


async def test_third_identical_pass_makes_no_calls() -> None:
    h = await ready_harness()
    status_before = copy.deepcopy(h.status())
    await h.run()
    assert h.api.calls == []
    # A watch event that changes nothing we look at (a new resourceVersion) neither.
    h.edit("Deployment", NAME, lambda d: d["metadata"].setdefault("annotations", {}).update(x="y"))
    await h.run()
    assert h.api.calls == []
    assert h.status() == status_before


# --- invalid spec ------------------------------------------------------------------------


async def test_invalid_spec_writes_invalid_spec_status_and_applies_nothing() -> None:
    h = Harness({**SPEC, "replicas": -1})
    await h.run()
    assert h.api.verbs("apply") == []
    assert h.api.verbs("get") == []
    assert len(h.api.verbs("patch_status")) == 1
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InvalidSpec")
    assert "spec.replicas" in ready["message"]
    assert h.condition("Available")["status"] == "Unknown"
    assert h.status()["observedGeneration"] == 1
    assert h.event_reasons() == ["InvalidSpec"]
    assert h.api.events[0]["type"] == "Warning"
    # Nothing changes: no second write, no second event.
    await h.run()
    assert h.api.calls == []


async def test_invalid_spec_names_every_bad_field() -> None:
    h = Harness({"role": "wizard", "model": {"provider": "echo", "name": "e"}, "replicas": "2"})
    await h.run()
    message = h.condition("Ready")["message"]
    assert "spec.role" in message
    assert "spec.replicas" in message


async def test_fixed_spec_is_applied_after_invalid_spec() -> None:
    h = Harness({**SPEC, "replicas": -1})
    await h.run()
    h.update_spec(lambda spec: spec.update(replicas=1))
    await h.run()
    assert h.applied_kinds() == OWNED
    assert h.status()["observedGeneration"] == 2
    assert h.condition("Ready")["reason"] != "InvalidSpec"


async def test_objects_created_after_a_fixed_invalid_spec_are_reported_created() -> None:
    h = Harness({**SPEC, "replicas": -1})
    await h.run()
    h.update_spec(lambda spec: spec.update(replicas=1))
    await h.run()
    assert "DriftCorrected" not in h.event_reasons()
    assert "Created" in h.event_reasons()


# --- integrations ------------------------------------------------------------------------


async def test_missing_integration_gives_integration_not_found() -> None:
    h = Harness({**SPEC, "integrations": ["github"]})
    await h.run()
    cond = h.condition("IntegrationsReady")
    assert (cond["status"], cond["reason"]) == ("False", "IntegrationNotFound")
    assert "github" in cond["message"]
    assert NS in cond["message"]
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "IntegrationNotFound")
    # The agent still runs, without the missing binding.
    assert h.applied_kinds() == OWNED
    assert not [v for v in pod_template(h)["spec"]["volumes"] if "secret" in v]
    assert "NotReady" in h.event_reasons()
    h.make_available()
    await h.run()
    assert h.condition("Ready")["reason"] == "IntegrationNotFound"


async def test_integration_created_later_is_bound() -> None:
    h = Harness({**SPEC, "integrations": ["github"]})
    await h.run()
    h.seed(integration("github"))
    h.seed(binding_secret("github", "77"))
    await h.run()
    assert h.applied_kinds() == ["Deployment"]
    mounts = pod_template(h)["spec"]["containers"][0]["volumeMounts"]
    assert {"name": "binding-github", "mountPath": "/bindings/github", "readOnly": True} in mounts
    cond = h.condition("IntegrationsReady")
    assert (cond["status"], cond["reason"]) == ("True", "IntegrationsReady")


async def test_integration_not_ready_carries_its_message() -> None:
    broken = integration("llm", ready="False", message="SecretNotFound: llm-creds is missing")
    h = Harness({**SPEC, "integrations": ["llm"]}, integrations={"llm": broken})
    await h.run()
    cond = h.condition("IntegrationsReady")
    assert (cond["status"], cond["reason"]) == ("False", "IntegrationNotReady")
    assert "SecretNotFound: llm-creds is missing" in cond["message"]
    assert h.condition("Ready")["reason"] == "IntegrationNotReady"
    # Bound anyway: the Secret may appear and the pods must already mount it.
    assert any(v.get("secret") for v in pod_template(h)["spec"]["volumes"])


async def test_jwt_auth_without_an_auth0_integration_is_not_ready() -> None:
    """Issue 10, hole 6 (the operator's side): the default auth mode needs an issuer."""
    spec = {k: v for k, v in SPEC.items() if k != "auth"}
    h = Harness({**spec, "integrations": ["llm"]}, integrations={"llm": integration("llm")})
    await h.run()
    h.make_available()
    await h.run()
    cond = h.condition("IntegrationsReady")
    assert (cond["status"], cond["reason"]) == ("False", "AuthIntegrationMissing")
    assert "spec.auth.mode: none" in cond["message"]
    assert h.condition("Ready")["reason"] == "AuthIntegrationMissing"
    env = pod_template(h)["spec"]["containers"][0]["env"]
    assert {"name": "BMAD_AUTH_MODE", "value": "jwt"} in env

    h.seed(integration("login", type_="auth0"))
    h.update_spec(lambda s: s.update(integrations=["llm", "login"]))
    await h.run()
    h.make_available()
    await h.run()
    assert h.condition("IntegrationsReady")["status"] == "True"
    assert h.condition("Ready")["reason"] == "AgentReady"


async def rotate_bound_secret() -> tuple[Harness, str]:
    """A Ready agent bound to github; its binding Secret changes; one more pass.
    Returns the harness and the pod template's config hash before the change."""
    spec = {**SPEC, "integrations": ["github"]}
    h = Harness(spec, integrations={"github": integration("github")})
    h.seed(binding_secret("github", "500"))
    await h.run()
    h.make_available()
    await h.run()
    before = pod_template(h)["metadata"]["annotations"][builders.CONFIG_HASH]
    h.edit("Secret", "github-binding", lambda s: s["data"].update(token="bmV3"))
    await h.run()
    return h, before


async def test_rotated_binding_secret_rolls_the_pods() -> None:
    h, before = await rotate_bound_secret()
    assert h.applied_kinds() == ["Deployment"]
    after = pod_template(h)["metadata"]["annotations"][builders.CONFIG_HASH]
    assert after != before
    # The Secret's content reaches neither the ConfigMap nor the Deployment.
    assert "bmV3" not in json.dumps(h.api.applied)
    assert "c2VjcmV0LXZhbHVl" not in json.dumps(h.live("ConfigMap", f"{NAME}-config"))


async def test_rotated_binding_secret_is_not_reported_as_drift() -> None:
    h, _ = await rotate_bound_secret()
    assert h.applied_kinds() == ["Deployment"]
    assert "DriftCorrected" not in h.event_reasons()


# --- spec changes, drift, pause -------------------------------------------------------------


async def test_spec_change_applies_what_changed_and_posts_updated() -> None:
    h = await ready_harness()
    h.update_spec(lambda spec: spec.update(instructions="Research the market."))
    await h.run()
    assert h.applied_kinds() == ["ConfigMap", "Deployment"]
    assert "Research the market." in h.live("ConfigMap", f"{NAME}-config")["data"]["agent.json"]
    assert "Updated" in h.event_reasons()
    assert "DriftCorrected" not in h.event_reasons()
    assert h.status()["observedGeneration"] == 2
    assert h.condition("Ready")["observedGeneration"] == 2
    # The Deployment's generation moved and it has not rolled out yet.
    assert h.condition("Progressing")["status"] == "True"
    assert h.event_reasons().count("RollingOut") == 1


async def test_edited_deployment_is_put_back_with_a_warning() -> None:
    h = await ready_harness()

    def tamper(dep: Obj) -> None:
        dep["spec"]["template"]["spec"]["containers"][0]["image"] = "evil:latest"

    h.edit("Deployment", NAME, tamper)
    await h.run()
    assert h.applied_kinds() == ["Deployment"]
    assert h.live("Deployment")["spec"]["template"]["spec"]["containers"][0]["image"] == IMAGE
    (drift,) = [e for e in h.api.events if e["reason"] == "DriftCorrected"]
    assert drift["type"] == "Warning"
    assert "Deployment/mary" in drift["message"]


async def test_deleted_service_is_recreated_with_a_warning() -> None:
    h = await ready_harness()
    h.delete("Service", NAME)
    await h.run()
    assert h.api.verbs("get") == []
    assert h.api.verbs("apply_new") == [("apply_new", "Service", NAME)]
    assert h.applied_kinds() == ["Service"]
    (drift,) = [e for e in h.api.events if e["reason"] == "DriftCorrected"]
    assert drift["type"] == "Warning"
    assert "Service/mary" in drift["message"]
    assert "Created" not in h.event_reasons()


async def test_cache_miss_is_confirmed_with_a_get_before_applying() -> None:
    h = await ready_harness()
    # The operator restarted: the store lost the owned objects, the server has them.
    for kind in OWNED:
        h.cache.remove(kind, NS, NAME if kind != "ConfigMap" else f"{NAME}-config")
    await h.run()
    assert len(h.api.verbs("get")) == 5
    assert h.api.verbs("apply") == []
    assert h.api.verbs("patch_status") == []
    assert h.api.events == []


async def test_paused_agent_scales_to_zero() -> None:
    h = await ready_harness({**SPEC, "replicas": 2})
    h.update_spec(lambda spec: spec.update(paused=True))
    await h.run()
    assert h.applied_kinds() == ["Deployment"]
    assert h.live("Deployment")["spec"]["replicas"] == 0
    assert h.status()["desiredReplicas"] == 0
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "Paused")
    assert h.condition("Available")["reason"] == "Paused"
    assert "NotReady" in h.event_reasons()


# --- nothing to do / errors -------------------------------------------------------------------


async def test_unknown_or_deleting_agent_makes_no_calls() -> None:
    h = Harness()
    h.cache.remove("Agent", NS, NAME)
    await h.run()
    assert h.api.calls == []
    h = Harness()
    h.edit("Agent", NAME, lambda b: b["metadata"].update(deletionTimestamp="2025-01-01T00:00:00Z"))
    await h.run()
    assert h.api.calls == []


async def test_an_agent_in_a_terminating_namespace_makes_no_calls() -> None:
    """The namespace's deletion removes the Agent's objects before the Agent itself
    (each deletion an event that queues it again): re-creating them only earned a 403
    from the API server per pass, 9 per Agent in one CI run's audit log."""
    h = Harness()
    gone = namespace(None)
    gone["metadata"]["deletionTimestamp"] = "2026-11-30T11:24:31Z"
    h.seed(gone)
    await h.run()
    assert h.api.calls == []


async def test_refused_apply_raises_for_a_retry() -> None:
    h = Harness()
    h.api.refuse["Deployment"] = errors.ApiError(403, "Forbidden", 'exceeded quota: "compute"')
    # A refusal is not transient: the pass reports it and asks to be retried later.
    with pytest.raises(errors.Requeue):
        await h.run()
    assert h.applied_kinds() == ["ServiceAccount", "ConfigMap", "Service", "PodDisruptionBudget"]


async def test_refused_apply_is_reported_as_apply_failed() -> None:
    h = Harness()
    h.api.refuse["Deployment"] = errors.ApiError(403, "Forbidden", 'exceeded quota: "compute"')
    with contextlib.suppress(errors.Requeue):
        await h.run()
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ApplyFailed")
    assert "exceeded quota" in ready["message"]


async def test_a_refused_event_does_not_fail_the_pass() -> None:
    h = Harness()
    h.api.refuse_events = True
    await h.run()
    assert h.applied_kinds() == OWNED
    assert len(h.api.verbs("patch_status")) == 1
    assert h.api.verbs("event")  # it tried


# --- the runtime contract: tenant, instructionsFrom, reserved env (issues 10 and 11) -------


def pod_env(h: Harness) -> dict[str, str]:
    return {e["name"]: e.get("value", "") for e in pod_template(h)["spec"]["containers"][0]["env"]}


def namespace(tenant: str | None) -> Obj:
    labels = {"bmad.dev/tenant": tenant} if tenant else {}
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": NS, "labels": labels}}


async def test_the_namespaces_tenant_is_rendered_for_the_runtime() -> None:
    h = Harness()
    h.seed(namespace("acme"))
    await h.run()
    assert pod_env(h)["BMAD_TENANT"] == "acme"
    # The namespace moves to another tenant: the pods follow (the Namespace watch
    # brings the Agent back, see test_watching).
    h.seed(namespace("globex"))
    await h.run()
    assert h.applied_kinds() == ["Deployment"]
    assert pod_env(h)["BMAD_TENANT"] == "globex"


async def test_without_a_tenant_the_namespace_is_the_tenant() -> None:
    h = Harness()
    h.seed(namespace(None))
    await h.run()
    assert pod_env(h)["BMAD_TENANT"] == NS


FROM_CONFIG_MAP: Obj = {**SPEC, "instructionsFrom": {"name": "prompts", "key": "mary.md"}}


def user_config_map(h: Harness, data: dict[str, str]) -> None:
    """A user's ConfigMap: on the server only (the operator watches only its own)."""
    h.api.objects[("ConfigMap", NS, "prompts")] = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "prompts", "namespace": NS, "resourceVersion": h.api.next_rv()},
        "data": data,
    }


async def test_a_missing_instructions_config_map_is_a_condition_not_a_silent_run() -> None:
    """Issue 11 (a): before, the Agent became Ready with no instructions and no word."""
    h = Harness(FROM_CONFIG_MAP)
    await h.run()
    h.make_available()  # were the pods to start anyway, the Agent still says why not
    await h.run()
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InstructionsNotFound")
    assert "ConfigMap prompts" in ready["message"]
    assert "mary.md" in ready["message"]
    assert ("get", "ConfigMap", "prompts") in h.api.calls
    assert h.cache.get("ConfigMap", NS, "prompts") is None  # not kept: it is not watched
    # The pods mount the key; the kubelet holds them until it exists.
    (config,) = [v for v in pod_template(h)["spec"]["volumes"] if v["name"] == "config"]
    assert config["projected"]["sources"][1]["configMap"]["name"] == "prompts"


async def test_an_instructions_config_map_without_the_key_is_a_condition() -> None:
    h = Harness(FROM_CONFIG_MAP)
    user_config_map(h, {"other.md": "..."})
    await h.run()
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InstructionsNotFound")
    assert "has no key mary.md" in ready["message"]


async def test_instructions_created_later_make_the_agent_ready_and_roll_the_pods() -> None:
    h = Harness(FROM_CONFIG_MAP)
    await h.run()
    before = pod_template(h)["metadata"]["annotations"][builders.CONFIG_HASH]
    user_config_map(h, {"mary.md": "Interview the stakeholders first."})
    await h.run()
    assert h.applied_kinds() == ["Deployment"]
    h.make_available()
    await h.run()
    assert h.condition("Ready")["status"] == "True", h.status()
    assert pod_template(h)["metadata"]["annotations"][builders.CONFIG_HASH] != before
    # A new version of the instructions rolls the pods again (the runtime reads them
    # at start); the text itself never leaves the user's ConfigMap.
    rolled = pod_template(h)["metadata"]["annotations"][builders.CONFIG_HASH]
    user_config_map(h, {"mary.md": "Ask for the budget first."})
    await h.run()
    assert pod_template(h)["metadata"]["annotations"][builders.CONFIG_HASH] != rolled
    assert "budget" not in json.dumps(h.api.applied)


async def test_hole_2_reserved_env_of_a_stored_agent_is_dropped_and_reported() -> None:
    """Issue 10, hole 2: an Agent stored before the API refused reserved names is not
    left running with a forged identity: they are dropped and Ready says so."""
    env = [
        {"name": "bmad_agent_namespace", "value": "victim"},
        {"name": "Bmad_Tenant", "value": "victim"},
        {"name": "BMAD_AUTH_ENABLED", "value": "false"},
        {"name": "LOG_LEVEL", "value": "debug"},
    ]
    h = Harness({**SPEC, "runtime": {"env": env}})
    await h.run()
    rendered = pod_env(h)
    assert {"bmad_agent_namespace", "Bmad_Tenant", "BMAD_AUTH_ENABLED"}.isdisjoint(rendered)
    assert rendered["LOG_LEVEL"] == "debug"
    assert rendered["BMAD_AGENT_NAMESPACE"] == NS
    h.make_available()
    await h.run()
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReservedEnvIgnored")
    assert "BMAD_AUTH_ENABLED, Bmad_Tenant, bmad_agent_namespace" in ready["message"]
    assert h.condition("Available")["status"] == "True"  # it serves, as the operator's agent


# --- issue 10, hole 9: objects the operator did not create are never adopted ----------------


def foreign(kind: str, name: str = NAME) -> Obj:
    """An object someone else made, with the name the Agent's would have: no owner, no labels
    of ours (so the operator's label-filtered watch never delivers it)."""
    spec: Obj = {
        "Service": {"spec": {"selector": {"app": "legacy"}, "ports": [{"port": 5432}]}},
        "ServiceAccount": {},
    }[kind]
    return {
        "apiVersion": "v1",
        "kind": kind,
        "metadata": {"name": name, "namespace": NS, "uid": f"uid-foreign-{kind}"},
        **copy.deepcopy(spec),
    }


@pytest.mark.parametrize("kind", ["Service", "ServiceAccount"])
async def test_name_conflict_a_foreign_object_named_like_the_agent_is_left_untouched(
    kind: str,
) -> None:
    """Hole 9: a pre-existing Service or ServiceAccount named like the Agent was overwritten
    and given the Agent as owner (so the garbage collector deleted it with the Agent).

    On the code before the fix:
        assert h.api.applied == []
        AssertionError: assert [{'apiVersion': 'v1', 'kind': 'ServiceAccount', ...
    """
    h = Harness()
    before = foreign(kind)
    h.api.objects[(kind, NS, NAME)] = copy.deepcopy(before)  # on the server, not in the store
    await h.run()
    # Created in order until the name is found taken, the Deployment last: no pod of the
    # Agent runs (it would run as a foreign account); what was made is the Agent's own,
    # collected with it. Before issue 15 (a GET per object first) nothing was applied.
    assert h.applied_kinds() == OWNED[: OWNED.index(kind)]
    assert h.api.verbs("apply") == []
    assert h.api.verbs("get") == [("get", kind, NAME)]
    assert h.api.objects[(kind, NS, NAME)] == before
    ready = h.condition("Ready")
    assert ready["status"] == "False"
    assert ready["reason"] == "NameConflict"
    assert f"{kind}/{NAME}" in ready["message"]
    assert "delete or rename" in ready["message"]
    assert h.event_reasons() == ["NotReady"]
    # The foreign object is not kept in the store: nothing would ever tell it that it left.
    assert h.cache.get(kind, NS, NAME) is None


async def test_name_conflict_clears_once_the_foreign_object_is_gone() -> None:
    """Hole 9: removing the conflicting object lets the Agent converge."""
    h = Harness()
    h.api.objects[("Service", NS, NAME)] = foreign("Service")
    await h.run()
    assert h.condition("Ready")["reason"] == "NameConflict"
    del h.api.objects[("Service", NS, NAME)]
    await h.run()
    # What came before the Service in the order was made by the first pass.
    assert h.applied_kinds() == OWNED[OWNED.index("Service") :]
    assert all(h.live(k, NAME if k != "ConfigMap" else f"{NAME}-config") for k in OWNED)
    service = h.live("Service")
    assert service["metadata"]["ownerReferences"][0]["uid"] == "uid-agent-mary"
    assert h.condition("Ready")["reason"] != "NameConflict"


async def test_an_object_of_a_previous_agent_of_the_same_name_is_a_conflict_too() -> None:
    """Its owner reference names another uid (the garbage collector is about to delete it):
    it is not ours to take over either."""
    h = Harness()
    old = foreign("Service")
    old["metadata"]["ownerReferences"] = [
        {
            "apiVersion": "bmad.dev/v1alpha1",
            "kind": "Agent",
            "name": NAME,
            "uid": "uid-old",
            "controller": True,
        }
    ]
    h.api.objects[("Service", NS, NAME)] = copy.deepcopy(old)
    await h.run()
    assert h.api.objects[("Service", NS, NAME)] == old
    assert h.condition("Ready")["reason"] == "NameConflict"


# --- the usage ledger (issue 14) -------------------------------------------------------


class FakeUsage:
    """The metering loop as the reconciler sees it (`common.UsageSource`)."""

    agent_url = "redis://ledger.bmad-system:6379/0"

    def __init__(self) -> None:
        self.loaded = True
        self.spool = True
        self.writers: list[dict[str, str]] = []
        self.usage: usage_store.PeriodUsage | None = None
        self.budget: usage_budget.State | None = None

    def usage_of_agent(self, namespace: str, name: str) -> usage_store.PeriodUsage | None:
        return self.usage

    def usage_of_tenant(self, tenant: str) -> usage_store.PeriodUsage | None:
        return self.usage

    def budget_of(self, tenant: str) -> usage_budget.State | None:
        return self.budget

    def payment_of(self, customer_id: str) -> stripe_webhooks.PaymentState | None:
        return None

    async def ensure_writer(
        self, *, namespace: str, agent: str, tenant: str, password: str
    ) -> None:
        self.writers.append(
            {"namespace": namespace, "agent": agent, "tenant": tenant, "password": password}
        )

    def bill_to(self, tenant: str, target: Any) -> None:
        pass


def metered() -> tuple[Harness, FakeUsage]:
    h = Harness()
    usage = FakeUsage()
    h.reconciler.usage = usage
    return h, usage


async def test_a_metered_agent_gets_its_writer_a_secret_and_the_two_variables() -> None:
    h, usage = metered()
    await h.run()
    secret = h.live("Secret", contract.usage_secret_name(NAME))
    password = base64.b64decode(secret["data"][contract.USAGE_SECRET_KEY]).decode()
    assert len(password) >= 32
    assert secret["metadata"]["ownerReferences"][0]["uid"] == "uid-agent-mary"
    assert usage.writers == [{"namespace": NS, "agent": NAME, "tenant": NS, "password": password}]
    [container] = pod_template(h)["spec"]["containers"]
    env = {e["name"]: e for e in container["env"]}
    assert env[contract.USAGE_LEDGER_URL]["value"] == usage.agent_url
    assert (
        env[contract.USAGE_LEDGER_PASSWORD]["valueFrom"]["secretKeyRef"]["name"]
        == (secret["metadata"]["name"])
    )
    assert env[contract.USAGE_LEDGER_SPOOL]["value"] == contract.USAGE_SPOOL_DIR
    assert {"name": contract.USAGE_SPOOL_VOLUME, "mountPath": contract.USAGE_SPOOL_DIR} in (
        container["volumeMounts"]
    )
    assert password not in json.dumps(pod_template(h))
    # The next pass keeps the password: no new Secret, the same writer.
    await h.run()
    assert "Secret" not in h.applied_kinds()
    assert usage.writers[-1]["password"] == password


async def test_an_operator_without_the_spool_renders_no_spool_variable() -> None:
    """BMAD_OPERATOR_USAGE_SPOOL=false: every answer waits for the ledger's Redis."""
    h, usage = metered()
    usage.spool = False
    await h.run()
    [container] = pod_template(h)["spec"]["containers"]
    names = {e["name"] for e in container["env"]}
    assert contract.USAGE_LEDGER_URL in names
    assert contract.USAGE_LEDGER_SPOOL not in names
    volumes = {v["name"] for v in pod_template(h)["spec"]["volumes"]}
    assert contract.USAGE_SPOOL_VOLUME not in volumes


async def test_someone_elses_secret_under_the_ledger_name_is_a_name_conflict() -> None:
    h, usage = metered()
    h.seed(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": contract.usage_secret_name(NAME), "namespace": NS},
            "data": {contract.USAGE_SECRET_KEY: base64.b64encode(b"x" * 32).decode()},
        }
    )
    await h.run()
    ready = h.condition("Ready")
    assert (ready["status"], ready["reason"]) == ("False", "NameConflict")
    assert f"Secret/{contract.usage_secret_name(NAME)}" in ready["message"]
    assert usage.writers == []


async def test_usage_and_the_budget_reach_the_agents_status_with_an_event_on_the_flip() -> None:
    h, usage = metered()
    now = dt.datetime.now(dt.UTC)
    usage.usage = usage_store.PeriodUsage(
        period_start=usage_periods.containing(now).start,
        this_period=usage_store.Totals(records=2, tokens_in=700, tokens_out=400),
        last_period=usage_store.Totals(),
    )
    usage.budget = usage_budget.decide(limit=1000, used=1100, now=now)
    await h.run()
    assert h.status()["usage"]["thisPeriod"] == {"calls": 2, "tokensIn": 700, "tokensOut": 400}
    cond = h.condition("BudgetExhausted")
    assert (cond["status"], cond["reason"]) == ("True", "TokensPerMonthReached")
    assert "BudgetExhausted" in h.event_reasons()
    await h.run()  # unchanged: no second event, no status write
    assert "BudgetExhausted" not in h.event_reasons()
    assert not h.api.verbs("patch_status")
    usage.budget = usage_budget.decide(limit=5000, used=1100, now=now)
    await h.run()
    assert h.condition("BudgetExhausted")["status"] == "False"
    assert "BudgetRestored" in h.event_reasons()


async def test_before_the_ledger_is_read_the_budget_condition_is_left_as_shown() -> None:
    h, usage = metered()
    usage.budget = usage_budget.decide(limit=1000, used=1100, now=dt.datetime.now(dt.UTC))
    await h.run()
    assert h.condition("BudgetExhausted")["status"] == "True"
    # A replica takes over: it has not read the ledger yet, and knows no budget.
    usage.loaded, usage.budget = False, None
    await h.run()
    assert h.condition("BudgetExhausted")["status"] == "True"
    assert "BudgetRestored" not in h.event_reasons()
