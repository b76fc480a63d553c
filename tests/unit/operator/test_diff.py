"""`diff.needs_apply` and `diff.covers`: skip writes that change nothing, never skip one
that would.

"Live" objects here are what the API server hands back for a built object: the same
fields plus server-side defaults, metadata it owns, a status, and quantities in their
canonical form.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest

from bmad_operator import diff

pytestmark = pytest.mark.unit

Obj = dict[str, Any]

SPEC: Obj = {
    "role": "dev",
    "model": {"provider": "echo", "name": "echo-1"},
    "replicas": 2,
    "resources": {"requests": {"cpu": "0.5", "memory": "1Gi"}, "limits": {"cpu": 1}},
    "runtime": {"env": [{"name": "APP_VERSION", "value": "1.1"}]},
}

CANONICAL = {"0.5": "500m", 1: "1", "1": "1"}


def _served(obj: Obj) -> Obj:
    """What the API server stores for `obj`: ours, plus everything it adds."""
    live = copy.deepcopy(obj)
    meta = live["metadata"]
    meta.update(
        uid="live-uid",
        resourceVersion="4242",
        generation=3,
        creationTimestamp="2025-01-01T00:00:00Z",
        managedFields=[{"manager": "bmad-operator", "operation": "Apply"}],
    )
    meta["annotations"] = {"deployment.kubernetes.io/revision": "3"}
    meta["labels"]["added-by-someone"] = "else"
    kind = live["kind"]
    if kind == "Deployment":
        spec = live["spec"]
        spec["progressDeadlineSeconds"] = 600
        pod = spec["template"]["spec"]
        pod.update(
            restartPolicy="Always",
            dnsPolicy="ClusterFirst",
            schedulerName="default-scheduler",
        )
        spec["template"]["metadata"]["creationTimestamp"] = None
        for container in pod["containers"]:
            container.setdefault("imagePullPolicy", "IfNotPresent")
            container["terminationMessagePath"] = "/dev/termination-log"
            container["terminationMessagePolicy"] = "File"
            for group in container["resources"].values():
                for res, qty in list(group.items()):
                    group[res] = CANONICAL.get(qty, qty)
        live["status"] = {"observedGeneration": 3, "replicas": 2}
    elif kind == "Service":
        live["spec"].update(
            clusterIP="10.96.0.12",
            clusterIPs=["10.96.0.12"],
            sessionAffinity="None",
            ipFamilies=["IPv4"],
            ipFamilyPolicy="SingleStack",
            internalTrafficPolicy="Cluster",
        )
        live["status"] = {"loadBalancer": {}}
    elif kind == "ServiceAccount":
        live["secrets"] = []
    elif kind == "PodDisruptionBudget":
        live["status"] = {"currentHealthy": 2, "desiredHealthy": 1, "disruptionsAllowed": 1}
    return live


@pytest.fixture
def built(build_agent_objects: Any) -> dict[str, Obj]:
    objs = build_agent_objects(SPEC, bindings=["github"], secret_versions={"github": "7"})
    return {o["kind"]: o for o in objs}


def _deployment_container(obj: Obj) -> Obj:
    container: Obj = obj["spec"]["template"]["spec"]["containers"][0]
    return container


# --- covered: nothing to apply -------------------------------------------------------------


@pytest.mark.parametrize(
    "kind", ["ServiceAccount", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"]
)
def test_live_object_with_server_defaults_is_covered(kind: str, built: dict[str, Obj]) -> None:
    want = built[kind]
    live = _served(want)
    assert live != want  # the server did add things
    assert not diff.needs_apply(live, want)


def test_canonicalized_quantities_are_covered(built: dict[str, Obj]) -> None:
    live = _served(built["Deployment"])
    resources = _deployment_container(live)["resources"]
    assert resources["requests"]["cpu"] == "500m"  # the fixture did canonicalize
    assert _deployment_container(built["Deployment"])["resources"]["requests"]["cpu"] == "0.5"
    assert not diff.needs_apply(live, built["Deployment"])


def test_absent_object_needs_apply(built: dict[str, Obj]) -> None:
    assert diff.needs_apply(None, built["Deployment"])


# --- not covered: apply --------------------------------------------------------------------


def test_changed_image_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["Deployment"])
    _deployment_container(live)["image"] = "someone/else:latest"
    assert diff.needs_apply(live, built["Deployment"])


def test_changed_replicas_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["Deployment"])
    live["spec"]["replicas"] = 5
    assert diff.needs_apply(live, built["Deployment"])


def test_changed_config_hash_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["Deployment"])
    live["spec"]["template"]["metadata"]["annotations"]["bmad.dev/config-hash"] = "0" * 16
    assert diff.needs_apply(live, built["Deployment"])


@pytest.mark.parametrize("kind", ["ConfigMap", "Deployment", "Service"])
def test_changed_or_removed_label_needs_apply(kind: str, built: dict[str, Obj]) -> None:
    changed = _served(built[kind])
    changed["metadata"]["labels"]["bmad.dev/role"] = "qa"
    assert diff.needs_apply(changed, built[kind])
    removed = _served(built[kind])
    del removed["metadata"]["labels"]["app.kubernetes.io/managed-by"]
    assert diff.needs_apply(removed, built[kind])


def test_changed_annotation_needs_apply(built: dict[str, Obj]) -> None:
    want = copy.deepcopy(built["Service"])
    want["metadata"]["annotations"] = {"bmad.dev/note": "a"}
    live = _served(want)
    live["metadata"]["annotations"]["bmad.dev/note"] = "a"
    assert not diff.needs_apply(live, want)
    live["metadata"]["annotations"]["bmad.dev/note"] = "b"
    assert diff.needs_apply(live, want)


def test_changed_config_map_data_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["ConfigMap"])
    live["data"]["agent.json"] += " "
    assert diff.needs_apply(live, built["ConfigMap"])


def test_missing_owner_reference_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["Service"])
    del live["metadata"]["ownerReferences"]
    assert diff.needs_apply(live, built["Service"])


def test_owner_reference_to_another_uid_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["Service"])
    live["metadata"]["ownerReferences"][0]["uid"] = "uid-of-a-previous-agent"
    assert diff.needs_apply(live, built["Service"])


def test_extra_owner_reference_is_covered(built: dict[str, Obj]) -> None:
    live = _served(built["Service"])
    live["metadata"]["ownerReferences"].append({"kind": "Other", "uid": "x", "name": "o"})
    assert not diff.needs_apply(live, built["Service"])


def test_deleting_object_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["ConfigMap"])
    live["metadata"]["deletionTimestamp"] = "2025-01-01T00:00:00Z"
    assert diff.needs_apply(live, built["ConfigMap"])


def test_env_list_length_change_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["Deployment"])
    _deployment_container(live)["env"].append({"name": "INJECTED", "value": "x"})
    assert diff.needs_apply(live, built["Deployment"])
    live = _served(built["Deployment"])
    _deployment_container(live)["env"].pop()
    assert diff.needs_apply(live, built["Deployment"])


def test_removed_volume_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["Deployment"])
    live["spec"]["template"]["spec"]["volumes"].pop()
    assert diff.needs_apply(live, built["Deployment"])


def test_missing_field_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["Deployment"])
    del live["spec"]["template"]["spec"]["automountServiceAccountToken"]
    assert diff.needs_apply(live, built["Deployment"])


def test_changed_security_context_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["Deployment"])
    _deployment_container(live)["securityContext"]["readOnlyRootFilesystem"] = False
    assert diff.needs_apply(live, built["Deployment"])


def test_changed_env_value_that_looks_like_a_number_needs_apply(built: dict[str, Obj]) -> None:
    live = _served(built["Deployment"])
    env = {e["name"]: e for e in _deployment_container(live)["env"]}
    assert env["APP_VERSION"]["value"] == "1.1"
    env["APP_VERSION"]["value"] = "1.10"
    assert diff.needs_apply(live, built["Deployment"])


# --- covers: scalars --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("live", "want"),
    [
        ("500m", "0.5"),
        ("0.5", "500m"),
        ("1073741824", "1Gi"),
        ("1Gi", "1073741824"),
        (1073741824, "1Gi"),
        ("1024Mi", "1Gi"),
        ("1", 1),
        (1, "1"),
        ("1k", "1000"),
        ("100m", "0.1"),
        ("2", "2000m"),
        ("1.5Gi", "1536Mi"),
        (True, True),
        (0, 0),
        ("", ""),
    ],
)
def test_equal_scalars_are_covered(live: Any, want: Any) -> None:
    # Quantity equivalence applies inside resource maps (requests, limits, hard, ...).
    assert diff.covers({"requests": {"cpu": live}}, {"requests": {"cpu": want}})
    assert diff.covers(live, want, quantities=True)


@pytest.mark.parametrize(
    ("live", "want"),
    [
        (True, 1),
        (1, True),
        (False, 0),
        (0, False),
        ("true", True),
        (True, "true"),
        ("1Gi", "1G"),
        ("500m", "0.6"),
        ("1Mi", "1M"),
        (2, "1"),
        ("http", "https"),
        (None, "x"),
        ("x", None),
        ({}, "x"),
        ([], "x"),
    ],
)
def test_different_scalars_are_not_covered(live: Any, want: Any) -> None:
    assert not diff.covers(live, want)


def test_covers_dicts_by_key_and_lists_item_by_item() -> None:
    assert diff.covers({"a": 1, "b": 2}, {"a": 1})
    assert not diff.covers({"a": 1}, {"a": 1, "b": 2})
    assert not diff.covers({"a": 1}, {"a": 2})
    assert diff.covers([{"a": 1, "x": 0}, {"b": 2}], [{"a": 1}, {"b": 2}])
    assert not diff.covers([{"b": 2}, {"a": 1}], [{"a": 1}, {"b": 2}])  # order matters
    assert not diff.covers([1, 2, 3], [1, 2])
    assert not diff.covers([1, 2], [1, 2, 3])
    assert not diff.covers({"a": 1}, [1])
    assert not diff.covers([1], {"a": 1})
    assert diff.covers({"a": {"limits": {"c": "500m"}}}, {"a": {"limits": {"c": "0.5"}}})
    assert not diff.covers({"a": {"b": {"c": "500m"}}}, {"a": {"b": {"c": "0.5"}}})
    assert diff.covers({"anything": 1}, {})
    assert diff.covers([], [])


def test_quantity_values() -> None:
    assert diff.quantity("500m") == diff.quantity("0.5")
    assert diff.quantity("1Ki") == 1024
    assert diff.quantity("1e3") == 1000
    assert diff.quantity("http") is None
    assert diff.quantity("25%") is None
    assert diff.quantity("1.2.3") is None
