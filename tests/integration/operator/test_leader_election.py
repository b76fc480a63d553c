"""Leader election against the test bed's real kube-apiserver: coordination.k8s.io Leases.

Two electors in one process, each with its own connection, as two replicas would be.
A crashed leader is one whose elector is cancelled without releasing (what SIGKILL
leaves behind); a graceful one releases. The timings are the defaults (15 s lease,
10 s renew deadline, 2 s retry), so these tests take about half a minute.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from bmad_operator import leader
from bmad_testbed.kubectl import Kubectl

pytestmark = pytest.mark.integration

T = leader.Timings()
LONGEST_RETRY = T.retry_period * (1 + leader.JITTER)
# Room for a loaded machine: requests and wake-ups that come late.
MARGIN = 5.0


async def connect(kubeconfig: str) -> k8s_client.ApiClient:
    cfg = k8s_client.Configuration()
    await k8s_config.load_kube_config(config_file=kubeconfig, client_configuration=cfg)
    return k8s_client.ApiClient(configuration=cfg)


async def eventually(check: Callable[[], bool], *, within: float, what: str) -> float:
    """Seconds until `check()` held; fails after `within` seconds."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    while not check():
        if loop.time() - start > within:
            pytest.fail(f"{what}: not within {within:.1f}s")
        await asyncio.sleep(0.05)
    return loop.time() - start


def parse(micro_time: str) -> dt.datetime:
    return dt.datetime.strptime(micro_time, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)


class Replica:
    def __init__(self, api: k8s_client.ApiClient, namespace: str, name: str, who: str) -> None:
        self.events: list[str] = []
        self.elector = leader.LeaderElector(
            leader.KubeLeases(api),
            namespace=namespace,
            name=name,
            identity=who,
            on_started=lambda: self.events.append("started"),
            on_stopped=lambda: self.events.append("stopped"),
        )
        self.task = asyncio.create_task(self.elector.run())

    async def crash(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


@pytest.fixture
async def replicas(
    kubeconfig: str, namespace: str
) -> AsyncIterator[Callable[[str], Awaitable[Replica]]]:
    lease = f"bmad-operator-{secrets.token_hex(3)}"
    made: list[tuple[Replica, k8s_client.ApiClient]] = []

    async def make(who: str) -> Replica:
        api = await connect(kubeconfig)
        replica = Replica(api, namespace, lease, who)
        made.append((replica, api))
        return replica

    yield make
    for replica, api in made:
        await replica.crash()
        await api.close()


def lease_of(kubectl: Kubectl, namespace: str, replica: Replica) -> dict[str, Any]:
    spec: dict[str, Any] = kubectl.in_namespace(namespace).json(
        "get", "lease", replica.elector.name
    )["spec"]
    return spec


async def test_one_of_two_leads_and_the_standby_takes_over_from_a_crashed_leader(
    replicas: Callable[[str], Awaitable[Replica]], kubectl: Kubectl, namespace: str
) -> None:
    a, b = await replicas("replica-a"), await replicas("replica-b")
    await eventually(
        lambda: a.elector.is_leader or b.elector.is_leader,
        within=LONGEST_RETRY + MARGIN,
        what="one of the two to lead",
    )
    first, standby = (a, b) if a.elector.is_leader else (b, a)
    # Three renewals go by (read from the API server, polled with a deadline): the
    # standby must keep waiting all along, having seen who holds the Lease.
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 3 * LONGEST_RETRY + MARGIN
    renewals: set[str] = set()
    while len(renewals) < 4:
        spec = await asyncio.to_thread(lease_of, kubectl, namespace, first)
        renewals.add(spec["renewTime"])
        assert not standby.elector.is_leader
        if loop.time() > deadline:
            pytest.fail(f"the leader renewed {len(renewals) - 1} times, not 3")
        await asyncio.sleep(0.2)
    assert standby.elector.holder == first.elector.identity
    assert first.elector.is_leader
    assert not standby.elector.is_leader
    held = lease_of(kubectl, namespace, first)
    assert held["holderIdentity"] == first.elector.identity
    assert held["leaseDurationSeconds"] == 15
    assert held["leaseTransitions"] == 0

    await first.crash()
    last_renewal = parse(lease_of(kubectl, namespace, first)["renewTime"])
    took = await eventually(
        lambda: standby.elector.is_leader,
        within=T.lease_duration + LONGEST_RETRY + MARGIN,
        what="the standby to take the Lease of the crashed leader",
    )

    taken = lease_of(kubectl, namespace, standby)
    assert taken["holderIdentity"] == standby.elector.identity
    assert taken["leaseTransitions"] == 1
    # Not before the Lease expired: the standby waited a whole lease duration after the
    # leader's last renewal (both times written by this machine's clock).
    assert parse(taken["acquireTime"]) - last_renewal >= dt.timedelta(seconds=T.lease_duration)
    assert first.events == ["started", "stopped"]
    assert standby.events == ["started"]
    print(f"standby took the Lease {took:.1f}s after the leader was cancelled")


async def test_graceful_release_hands_over_without_waiting_for_expiry(
    replicas: Callable[[str], Awaitable[Replica]], kubectl: Kubectl, namespace: str
) -> None:
    a = await replicas("replica-a")
    await eventually(lambda: a.elector.is_leader, within=LONGEST_RETRY + MARGIN, what="a leads")
    b = await replicas("replica-b")
    await eventually(
        lambda: b.elector.holder == "replica-a",
        within=LONGEST_RETRY + MARGIN,
        what="b to read the Lease and find a holding it",
    )
    assert not b.elector.is_leader

    assert await a.elector.release()
    assert not a.elector.is_leader
    released = lease_of(kubectl, namespace, a)
    assert released.get("holderIdentity") in (None, "")
    took = await eventually(
        lambda: b.elector.is_leader,
        # Far less than a lease duration: the standby's next retry.
        within=LONGEST_RETRY + MARGIN,
        what="the standby to take the released Lease",
    )

    taken = lease_of(kubectl, namespace, b)
    assert taken["holderIdentity"] == "replica-b"
    assert taken["leaseTransitions"] == 1
    assert a.events == ["started", "stopped"]
    print(f"standby took the released Lease after {took:.1f}s")


async def test_the_lease_api_refuses_stale_and_duplicate_writes(
    kubeconfig: str, namespace: str
) -> None:
    """What the elector's safety rests on, from the real API server: 409 on a write
    with an old resourceVersion, 409 on creating a Lease that exists, None when absent."""
    api = await connect(kubeconfig)
    try:
        leases = leader.KubeLeases(api)
        assert await leases.get(namespace, "nobody-yet") is None
        body = {
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": {"name": "contested", "namespace": namespace},
            "spec": {"holderIdentity": "a", "leaseDurationSeconds": 15},
        }
        created = await leases.create(body)
        with pytest.raises(leader.Conflict):
            await leases.create(body)
        first = dict(created, spec={**created["spec"], "holderIdentity": "b"})
        second = dict(created, spec={**created["spec"], "holderIdentity": "c"})
        await leases.replace(first)
        with pytest.raises(leader.Conflict):
            await leases.replace(second)  # read the same version as `first`
        current = await leases.get(namespace, "contested")
        assert current is not None
        assert current["spec"]["holderIdentity"] == "b"
    finally:
        await api.close()
