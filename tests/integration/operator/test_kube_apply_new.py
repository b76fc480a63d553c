"""`Kube.apply_new` on the test bed's API server: an apply that only creates.

The Agent reconciler creates what its store misses with it instead of a GET before an
apply (issue 15): the name being taken, by anyone, must leave the object untouched.
"""

from __future__ import annotations

from typing import Any

import pytest

from bmad_operator import errors, kube
from bmad_testbed.kubectl import Kubectl

pytestmark = pytest.mark.integration


def config_map(namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": namespace},
        "data": data,
    }


async def test_apply_new_creates_what_is_absent_as_an_apply_owns_it(
    api: kube.Kube, namespace: str
) -> None:
    made = await api.apply_new(config_map(namespace, "fresh", {"a": "1", "b": "2"}))
    assert made["data"] == {"a": "1", "b": "2"}
    (entry,) = made["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"]) == (kube.FIELD_MANAGER, "Apply")
    # Owned as an apply's: a later apply without a key removes it (a POST's would not).
    later = await api.apply(config_map(namespace, "fresh", {"a": "1"}))
    assert later["data"] == {"a": "1"}


async def test_apply_new_refuses_a_name_taken_by_someone_else_and_changes_nothing(
    api: kube.Kube, namespace: str, kubectl: Kubectl
) -> None:
    k = kubectl.in_namespace(namespace)
    k.run("create", "configmap", "taken", "--from-literal=theirs=1")
    before = k.json("get", "configmap", "taken")
    with pytest.raises(errors.ApiError) as refused:
        await api.apply_new(config_map(namespace, "taken", {"ours": "1"}))
    assert refused.value.status == 409
    after = k.json("get", "configmap", "taken")
    assert after["data"] == {"theirs": "1"}
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]


async def test_apply_new_refuses_an_object_of_ours_too(api: kube.Kube, namespace: str) -> None:
    first = await api.apply_new(config_map(namespace, "again", {"a": "1"}))
    with pytest.raises(errors.ApiError) as refused:
        await api.apply_new(config_map(namespace, "again", {"a": "2"}))
    assert refused.value.status == 409
    live = await api.get("ConfigMap", namespace, "again")
    assert live is not None
    assert live["data"] == {"a": "1"}
    assert live["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
