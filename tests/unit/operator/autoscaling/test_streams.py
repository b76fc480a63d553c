"""Which Redis and which stream key the autoscaler reads at zero replicas: the runtime's.

The read itself (XLEN against a real Redis) is in
tests/integration/operator/test_autoscaling_streams.py.
"""

from __future__ import annotations

import base64
from typing import Any

import pytest

from bmad_integrations import egress
from bmad_operator import store
from bmad_operator.autoscaling import reasons, streams

pytestmark = pytest.mark.unit

Obj = dict[str, Any]
NS = "team-a"


def integration(name: str, type_: str) -> Obj:
    return {"kind": "Integration", "metadata": {"name": name, "namespace": NS},
            "spec": {"type": type_}}  # fmt: skip


def agent(*integrations: str) -> Obj:
    return {"kind": "Agent", "metadata": {"name": "dev", "namespace": NS},
            "spec": {"integrations": list(integrations)}}  # fmt: skip


def cache_with(*objs: Obj) -> store.Store:
    cache = store.Store()
    for obj in objs:
        cache.put(obj)
    return cache


def test_the_first_redis_integration_by_name_as_the_runtime_picks_its_binding() -> None:
    cache = cache_with(
        integration("pg", "postgres"),
        integration("z-redis", "redis"),
        integration("cache", "redis"),
    )
    assert streams.redis_integration(cache, agent("pg", "z-redis", "cache")) == "cache"
    assert streams.redis_integration(cache, agent("pg")) is None
    assert streams.redis_integration(cache, agent("missing")) is None


def test_the_tenant_of_the_key_is_the_runtimes() -> None:
    cache = store.Store()
    assert streams.tenant(cache, NS, "dev") == NS
    env = [{"name": "BMAD_AGENT_NAME", "value": "dev"}, {"name": "BMAD_TENANT", "value": "acme"}]
    pod = {"containers": [{"name": "agent", "env": env}]}
    cache.put(
        {
            "kind": "Deployment",
            "metadata": {"name": "dev", "namespace": NS},
            "spec": {"template": {"spec": pod}},
        }
    )
    assert streams.tenant(cache, NS, "dev") == "acme"


async def test_no_redis_means_no_stream_and_a_missing_binding_says_so() -> None:
    cache = cache_with(integration("cache", "redis"))
    lengths = streams.StreamLengths(cache, policy=egress.Policy())
    assert await lengths.length(agent()) is None
    reading = await lengths.length(agent("cache"))
    assert reading is not None
    assert (reading.value, reading.error) == (None, reasons.QUEUE_UNAVAILABLE)
    assert "cache-binding" in reading.detail


async def test_the_egress_policy_applies_to_the_stream_read() -> None:
    data = {
        "type": "redis",
        "host": "127.0.0.1",
        "port": "6379",
        "database": "0",
        "tls": "false",
        "uri": "redis://127.0.0.1:6379/0",
        "password": "s3cret-pass",
    }
    secret = {
        "kind": "Secret",
        "metadata": {"name": "cache-binding", "namespace": NS, "resourceVersion": "7"},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }
    cache = cache_with(integration("cache", "redis"), secret)
    lengths = streams.StreamLengths(cache, policy=egress.Policy())  # loopback is refused
    reading = await lengths.length(agent("cache"))
    assert reading is not None
    assert reading.error == reasons.QUEUE_UNAVAILABLE
    assert "egress policy" in reading.detail
    assert "s3cret-pass" not in reading.detail
