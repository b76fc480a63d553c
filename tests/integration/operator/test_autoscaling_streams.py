"""At zero replicas the autoscaler reads the agent's task stream from the test bed's
real Redis, through the binding Secret the operator publishes for the Integration."""

from __future__ import annotations

import base64
import uuid
from typing import Any

import pytest

from bmad_crds.v1alpha1 import integration as integration_api
from bmad_integrations import base, egress, redis_store, taskbus
from bmad_operator import store
from bmad_operator.autoscaling import reasons, streams

pytestmark = pytest.mark.integration

Obj = dict[str, Any]
NS = "team-streams"
LOOPBACK = egress.Policy.parse(allow=["127.0.0.0/8"])


def cache_for(env: dict[str, str], password: str, *, version: str = "1") -> store.Store:
    """The store as the operator's watches fill it: the Integration and the binding
    Secret built by the operator's own binding builder."""
    block = integration_api.Redis(host="127.0.0.1", port=int(env["BMAD_REDIS_PORT"]))
    data = redis_store.binding(block, base.Credentials("redis-creds", {"password": password}))
    cache = store.Store()
    cache.put({"kind": "Integration", "metadata": {"name": "cache", "namespace": NS},
               "spec": {"type": "redis"}})  # fmt: skip
    cache.put(
        {
            "kind": "Secret",
            "metadata": {"name": "cache-binding", "namespace": NS, "resourceVersion": version},
            "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
        }
    )
    return cache


def agent(name: str) -> Obj:
    return {"kind": "Agent", "metadata": {"name": name, "namespace": NS},
            "spec": {"integrations": ["cache"]}}  # fmt: skip


async def test_the_length_of_the_agents_stream_is_read_from_its_redis(
    testbed_env: dict[str, str], redis_url: str
) -> None:
    name = f"sleepy-{uuid.uuid4().hex[:6]}"
    lengths = streams.StreamLengths(
        cache_for(testbed_env, testbed_env["BMAD_REDIS_PASSWORD"]), policy=LOOPBACK
    )
    producer = taskbus.TaskProducer.from_url(redis_url, tenant=NS, agent=name)
    try:
        reading = await lengths.length(agent(name))
        assert reading is not None
        assert reading.value == 0  # no stream yet: nothing waits
        for i in range(3):
            await producer.submit(f"t-{i}", {"input": str(i)})
        reading = await lengths.length(agent(name))
        assert reading is not None
        assert reading.value == 3
    finally:
        await producer.redis.delete(producer.keys.stream)
        await producer.aclose()
        await lengths.aclose()


async def test_a_wrong_password_or_a_refused_destination_says_why_without_secrets(
    testbed_env: dict[str, str],
) -> None:
    wrong = streams.StreamLengths(cache_for(testbed_env, "not-the-password"), policy=LOOPBACK)
    refused = streams.StreamLengths(
        cache_for(testbed_env, testbed_env["BMAD_REDIS_PASSWORD"]), policy=egress.Policy()
    )
    try:
        for lengths in (wrong, refused):
            reading = await lengths.length(agent("dev"))
            assert reading is not None
            assert (reading.value, reading.error) == (None, reasons.QUEUE_UNAVAILABLE)
            assert "Integration cache" in reading.detail
            assert "not-the-password" not in reading.detail
            assert testbed_env["BMAD_REDIS_PASSWORD"] not in reading.detail
        refusal = await refused.length(agent("dev"))
        assert refusal is not None
        assert "egress policy" in refusal.detail
    finally:
        await wrong.aclose()
        await refused.aclose()
