"""The usage ledger's writers (Redis ACL users) after their Agents are deleted, against
real Redis servers: `Metering.prune_writers` removes the writer of an Agent that is gone
(at its second look, never at the first), Redis then refuses that writer's password,
the writers of Agents still there keep working, and `Metering.save_acl` makes a Redis
with an ACL file keep the writers left across a restart. The test bed's Redis, which
has no ACL file, gets one warning per term saying what that means. Last, the operator
itself (its own process, metering on, on the test bed's control plane and Redis)
removes the writer of an Agent deleted with kubectl.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import redis.asyncio as aioredis
from redis import exceptions as redis_errors

from bmad_integrations.usage import acl, record
from bmad_operator import metering, settings
from bmad_operator import store as cache_mod
from bmad_testbed import own_redis
from bmad_testbed.kubectl import Kubectl

from .conftest import StartOperator
from .helpers import Tenants, agent, tenant, until, wait_tenant

pytestmark = pytest.mark.integration


@pytest.fixture
def acl_redis(tmp_path: Path) -> Iterator[own_redis.OwnRedis]:
    """A Redis of the test's own whose users live in an ACL file."""
    server = own_redis.OwnRedis(tmp_path / "redis", acl_file=True)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def acl_path(server: own_redis.OwnRedis) -> Path:
    assert server.acl_path is not None
    return server.acl_path


def cached_agent(namespace: str, name: str) -> dict[str, object]:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name, "namespace": namespace},
    }


def meter_for(redis_url: str, cache: cache_mod.Store) -> metering.Metering:
    cfg = settings.OperatorSettings(
        usage_redis_url=redis_url, ledger_dsn="postgresql://unused@127.0.0.1:1/ledger"
    )
    return metering.Metering(cfg, cache, notify_agent=print, notify_tenant=print)


@pytest.fixture
async def meter(acl_redis: own_redis.OwnRedis) -> AsyncIterator[metering.Metering]:
    cache = cache_mod.Store()
    made = meter_for(acl_redis.url, cache)
    try:
        yield made
    finally:
        await made.aclose()


async def can_write(url: str, namespace: str, name: str, password: str) -> bool:
    """Whether the writer's credentials may append to its stream (the server decides)."""
    plain = url.split("@", 1)[1]
    client = aioredis.Redis.from_url(
        f"redis://{plain}", username=record.acl_user(namespace, name), password=password
    )
    try:
        await client.xadd(record.stream_key(namespace, name), {"probe": "1"})
    except (redis_errors.AuthenticationError, redis_errors.ResponseError):
        return False
    finally:
        await client.aclose()
    return True


async def test_a_deleted_agents_writer_is_removed_at_the_second_look_and_the_acl_saved(
    acl_redis: own_redis.OwnRedis, meter: metering.Metering
) -> None:
    namespace = f"team-{secrets.token_hex(3)}"
    meter.cache.put(cached_agent(namespace, "kept"))
    meter.cache.put(cached_agent(namespace, "gone"))
    passwords = {name: acl.new_password() for name in ("kept", "gone")}
    for name, password in passwords.items():
        await meter.ensure_writer(
            namespace=namespace, agent=name, tenant=namespace, password=password
        )
    await meter.save_acl()
    saved = acl_path(acl_redis).read_text()
    assert record.acl_user(namespace, "kept") in saved
    assert record.acl_user(namespace, "gone") in saved

    meter.cache.remove("Agent", namespace, "gone")  # the Agent was deleted
    assert await meter.prune_writers() == []  # a first look removes nothing
    assert await can_write(acl_redis.url, namespace, "gone", passwords["gone"])
    assert await meter.prune_writers() == [(namespace, "gone")]
    assert not await can_write(acl_redis.url, namespace, "gone", passwords["gone"])
    assert await can_write(acl_redis.url, namespace, "kept", passwords["kept"])
    assert await meter.prune_writers() == []  # nothing left to remove
    await meter.save_acl()
    assert record.acl_user(namespace, "gone") not in acl_path(acl_redis).read_text()

    # Redis restarted: the writer left comes back from the ACL file, the removed one not.
    await meter.aclose()
    acl_redis.stop()
    acl_redis.start()
    assert set(await acl.writers(meter.admin())) == {(namespace, "kept")}
    assert await can_write(acl_redis.url, namespace, "kept", passwords["kept"])
    assert not await can_write(acl_redis.url, namespace, "gone", passwords["gone"])


async def test_an_agent_back_before_the_second_look_keeps_its_writer(
    acl_redis: own_redis.OwnRedis, meter: metering.Metering
) -> None:
    namespace = f"team-{secrets.token_hex(3)}"
    password = acl.new_password()
    await meter.ensure_writer(namespace=namespace, agent="dev", tenant=namespace, password=password)
    assert await meter.prune_writers() == []  # not in the store: absent once
    meter.cache.put(cached_agent(namespace, "dev"))  # the watch caught up
    assert await meter.prune_writers() == []
    assert await meter.prune_writers() == []
    assert await can_write(acl_redis.url, namespace, "dev", password)


async def test_nothing_is_pruned_before_the_agents_are_listed(
    acl_redis: own_redis.OwnRedis, meter: metering.Metering
) -> None:
    namespace = f"team-{secrets.token_hex(3)}"
    await meter.ensure_writer(
        namespace=namespace, agent="sm", tenant=namespace, password=acl.new_password()
    )
    listed = False
    meter.agents_listed = lambda: listed
    assert await meter.prune_writers() == []
    assert await meter.prune_writers() == []  # two looks, but the store was not listed
    assert (namespace, "sm") in await acl.writers(meter.admin())
    listed = True
    assert await meter.prune_writers() == []  # the first look that counts
    assert await meter.prune_writers() == [(namespace, "sm")]


async def test_an_operator_watching_one_namespace_prunes_only_there(
    acl_redis: own_redis.OwnRedis,
) -> None:
    mine, other = f"mine-{secrets.token_hex(3)}", f"other-{secrets.token_hex(3)}"
    cfg = settings.OperatorSettings(
        usage_redis_url=acl_redis.url,
        ledger_dsn="postgresql://unused@127.0.0.1:1/ledger",
        namespace=mine,
    )
    meter = metering.Metering(cfg, cache_mod.Store(), notify_agent=print, notify_tenant=print)
    try:
        for namespace in (mine, other):
            await meter.ensure_writer(
                namespace=namespace, agent="qa", tenant=namespace, password=acl.new_password()
            )
        await meter.prune_writers()
        assert await meter.prune_writers() == [(mine, "qa")]
        assert (other, "qa") in await acl.writers(meter.admin())
    finally:
        await meter.aclose()


async def test_without_an_acl_file_the_operator_says_so_once(
    redis_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    namespace = f"team-{secrets.token_hex(3)}"
    meter = meter_for(redis_url, cache_mod.Store())
    try:
        with caplog.at_level(logging.WARNING, logger=metering.__name__):
            for name in ("a", "b"):
                await meter.ensure_writer(
                    namespace=namespace, agent=name, tenant=namespace, password=acl.new_password()
                )
                await meter.save_acl()
        warnings = [r.getMessage() for r in caplog.records if "no ACL file" in r.getMessage()]
        assert len(warnings) == 1, warnings
        assert "takes the lease again" in warnings[0]
    finally:
        for name in ("a", "b"):
            await acl.remove_writer(meter.admin(), namespace=namespace, agent=name)
        await meter.aclose()


async def test_the_operator_removes_the_writer_of_an_agent_deleted_with_kubectl(
    *,
    start_ledger_operator: StartOperator,
    kubectl: Kubectl,
    tenants: Tenants,
    redis_url: str,
) -> None:
    start_ledger_operator(BMAD_OPERATOR_USAGE_PRUNE_SECONDS="1")
    name = tenants.name("prune")
    namespace = f"{name}-work"
    tenants.apply(tenant(name, [namespace]))
    wait_tenant(kubectl, name)
    k = kubectl.in_namespace(namespace)
    k.apply(agent("analyst"))
    k.apply(agent("pm"))
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    try:

        async def writers() -> set[str]:
            return {a for ns, a in await acl.writers(admin) if ns == namespace}

        async def both() -> bool:
            return await writers() == {"analyst", "pm"}

        await until(both, within=60, what="the Agents' ledger writers")
        k.out("delete", "agent", "analyst", "--wait=true")

        async def only_pm() -> bool:
            return await writers() == {"pm"}

        await until(only_pm, within=30, what="the deleted Agent's writer removed")
    finally:
        for agent_name in await writers():
            await acl.remove_writer(admin, namespace=namespace, agent=agent_name)
        await admin.aclose()
