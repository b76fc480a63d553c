"""Two operator replicas with leader election: the leader SIGKILLed during a rollout.

Issue 15's high-availability check, on the test bed's real API server. Two `bmad
operator run` processes share a Lease and one webhook certificate (a Secret); a TCP
front stands in for the webhook's Service, passing each connection to a replica that
accepts it. 200 Agents are created in batches in a tenant namespace (so every Agent
write goes through the budget webhook, whose failurePolicy is Fail); once 10 are Ready
the leader is SIGKILLed. Agent writes (the remaining creates, then annotations) go on
throughout and are counted. Then: the standby had reconciled nothing before the kill;
it took the Lease (its acquireTime) within 15 s of the kill; no write was refused; all
200 Agents become Ready, each with exactly one of each owned object and one ReplicaSet
per Deployment (no competing rollouts).

Lease timings here: lease 10 s, renew deadline 7 s, retry 1.5 s, so a standby takes
the Lease at most 10 + 1.5 x 1.2 = 11.8 s after it last saw the leader renew.
"""

from __future__ import annotations

import datetime as dt
import json
import secrets
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from bmad_operator.builders import meta
from bmad_operator.reconcilers import agent as agent_reconciler
from bmad_testbed import tcpproxy
from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess

from .helpers import agent, condition

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[3]
AGENTS = 200
ROLES = ("analyst", "pm", "architect", "ux-expert", "po", "sm", "dev", "qa")
TIMINGS = {
    "LEASE_DURATION_SECONDS": "10",
    "RENEW_DEADLINE_SECONDS": "7",
    "RETRY_PERIOD_SECONDS": "1.5",
}
TAKEOVER_WITHIN = 15.0  # issue 15
CREATE_BATCH = 10  # Agents per kubectl apply while the rollout is being written


def lease_holder(k: Kubectl) -> str | None:
    proc = k.run("get", "lease", "bmad-operator", "-o", "json", check=False)
    if proc.returncode != 0:
        return None
    holder: str | None = json.loads(proc.stdout)["spec"].get("holderIdentity")
    return holder


def parse_micro_time(text: str) -> float:
    """A Lease's MicroTime as seconds since the epoch."""
    moment = dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=dt.UTC)
    return moment.timestamp()


def grant_lease(kubectl: Kubectl, namespace: str, user: str) -> None:
    """The manifests' leader-election Role, in this namespace, for the operator's user."""
    rendered = kubectl.out("kustomize", str(REPO / "manifests" / "rbac"))
    for doc in yaml.safe_load_all(rendered):
        if doc and doc["kind"] in ("Role", "RoleBinding") and "leader" in doc["metadata"]["name"]:
            doc["metadata"]["namespace"] = namespace
            if doc["kind"] == "RoleBinding":
                doc["subjects"] = [
                    {"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": user}
                ]
            kubectl.apply(doc)


class Writer(threading.Thread):
    """Every Agent write of the test, one kubectl call after another, each counted: the
    Agents are created in batches (the rollout), then annotated (UPDATEs) until told to
    stop. All of them go through the webhook.

    Each call holds `lock`; the test kills the leader while holding it, so no write is
    in flight at the instant of the kill (a connection cut mid-request fails whatever
    serves it, Service or not). Every write after it needs a live replica's webhook."""

    def __init__(self, k: Kubectl, items: list[dict[str, Any]]) -> None:
        super().__init__(daemon=True)
        self.k = k
        self.items = items
        self.lock = threading.Lock()
        self.created = 0  # Agents created so far
        self.started: list[float] = []  # monotonic start of each call
        self.agents: list[int] = []  # Agents written by each call
        self.refused: list[str] = []
        self.stop_event = threading.Event()

    @property
    def attempts(self) -> int:
        return len(self.started)

    def agents_written(self, start: float, end: float) -> int:
        """Agent writes (creates and updates) tried by calls begun in [start, end]."""
        return sum(n for t, n in zip(self.started, self.agents, strict=True) if start <= t <= end)

    def _write(self, *args: str, agents: int = 1, stdin: str | None = None) -> bool:
        with self.lock:
            self.started.append(time.monotonic())
            self.agents.append(agents)
            proc = self.k.run(*args, stdin=stdin, check=False, timeout=300)
        if proc.returncode != 0:
            self.refused.append(proc.stderr.strip()[:300])
        return proc.returncode == 0

    def run(self) -> None:
        while self.created < len(self.items) and not self.stop_event.is_set():
            batch = self.items[self.created : self.created + CREATE_BATCH]
            doc = {"apiVersion": "v1", "kind": "List", "items": batch}
            self._write(
                "apply", "--server-side", "-f", "-", agents=len(batch), stdin=json.dumps(doc)
            )
            self.created += len(batch)
        i = 0
        while not self.stop_event.is_set():
            name = self.items[i % len(self.items)]["metadata"]["name"]
            self._write("annotate", "agent", name, f"ha-test/touch={i}", "--overwrite")
            i += 1


def reconciles(op: OperatorProcess) -> float:
    return op.metric_sum("bmad_operator_reconciles_total")


@pytest.fixture
def webhook_configuration(kubectl: Kubectl, no_other_operator: None) -> Iterator[None]:
    """The webhook configuration is cluster-wide: put back what was there before.

    Put back before the session's operator starts again (it depends on
    `no_other_operator`, so it is torn down first): that operator serves its webhook on
    a new port and applies its own configuration when it starts, and a configuration
    restored after that would send the API server to the old, closed port (CI saw every
    later Agent write in tenant namespaces refused)."""
    proc = kubectl.run(
        "get", "validatingwebhookconfiguration", "bmad-operator", "-o", "json", check=False
    )
    before = json.loads(proc.stdout) if proc.returncode == 0 else None
    yield
    if before is None:
        kubectl.run("delete", "validatingwebhookconfiguration", "bmad-operator", check=False)
    else:
        for key in ("resourceVersion", "uid", "creationTimestamp", "generation", "managedFields"):
            before["metadata"].pop(key, None)
        kubectl.run(
            "apply",
            "--server-side",
            "--force-conflicts",
            "--field-manager=bmad-operator",
            "-f",
            "-",
            stdin=json.dumps(before),
        )


@pytest.mark.usefixtures("crds", "webhook_configuration")
def test_standby_takes_over_from_a_sigkilled_leader_mid_rollout(
    kubectl: Kubectl,
    namespace: str,
    operator_kubeconfig: str,
    testbed_env: dict[str, str],
    tmp_path: Path,
) -> None:
    system = kubectl.in_namespace(namespace)
    grant_lease(kubectl, namespace, testbed_env.get("BMAD_OPERATOR_USER", ""))
    tenant_ns = f"{namespace}-agents"[:63]
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": tenant_ns,
                "labels": {meta.TENANT_LABEL: f"ha-{secrets.token_hex(3)}"},
            },
        }
    )
    k = kubectl.in_namespace(tenant_ns)
    replicas: dict[str, OperatorProcess] = {}
    try:
        with tcpproxy.TcpProxy([]) as front:
            for who in ("replica-a", "replica-b"):
                op = replicas[who] = OperatorProcess(
                    kubeconfig=operator_kubeconfig,
                    log_path=tmp_path / f"{who}.log",
                    resync_seconds=60,
                )
                op.extra_env = {
                    "BMAD_OPERATOR_LEADER_ELECTION": "true",
                    "BMAD_OPERATOR_LEADER_IDENTITY": who,
                    "BMAD_OPERATOR_LEASE_NAMESPACE": namespace,
                    "BMAD_OPERATOR_SYSTEM_NAMESPACE": namespace,
                    "BMAD_OPERATOR_WEBHOOK_URL": f"https://127.0.0.1:{front.port}",
                    **{f"BMAD_OPERATOR_{key}": v for key, v in TIMINGS.items()},
                }
                op.start()
                front.backends.append(op.webhook_port)  # before any Agent is written
                if who == "replica-a":
                    eventually(
                        lambda: lease_holder(system) == "replica-a",
                        timeout=30,
                        what="replica-a to take the Lease",
                    )
            assert lease_holder(system) == "replica-a"
            hooks = kubectl.json("get", "validatingwebhookconfiguration", "bmad-operator")
            for hook in hooks["webhooks"]:
                # Fail: a write that no replica answers is refused, so admitted writes
                # below were each answered by a live replica's webhook.
                assert hook["failurePolicy"] == "Fail"
                assert hook["clientConfig"]["url"].startswith(f"https://127.0.0.1:{front.port}/")

            names = [f"ha-{i:03d}" for i in range(AGENTS)]
            items = [agent(n, role=ROLES[i % len(ROLES)]) for i, n in enumerate(names)]

            def ready() -> int:
                return sum(
                    1
                    for item in k.json("get", "agents")["items"]
                    if (condition(item, "Ready") or {}).get("status") == "True"
                )

            writer = Writer(k, items)
            writer.start()
            eventually(
                lambda: ready() >= 10, timeout=600, interval=1, what="the rollout to be under way"
            )
            with writer.lock:
                ready_at_kill = ready()
                # The standby watched but reconciled nothing: only the leader works.
                assert reconciles(replicas["replica-b"]) == 0
                assert reconciles(replicas["replica-a"]) > 0
                replicas["replica-a"].kill()
                killed, killed_wall = time.monotonic(), time.time()
            assert ready_at_kill < AGENTS, "the rollout ended before the kill: not mid-rollout"
            # Waited for generously (this machine is shared); the takeover itself is timed
            # by the Lease's acquireTime, written by the standby with this machine's clock.
            eventually(
                lambda: lease_holder(system) == "replica-b",
                timeout=120,
                interval=0.5,
                what="replica-b to take the Lease",
            )
            acquired = system.json("get", "lease", "bmad-operator")["spec"]["acquireTime"]
            took = parse_micro_time(acquired) - killed_wall
            assert took <= TAKEOVER_WITHIN, f"the standby took the Lease {took:.1f}s after the kill"
            took_at = killed + took
            # Every Agent created, and writes go on for a while under the new leader: the
            # webhook never depended on who leads.
            eventually(
                lambda: (
                    writer.created == AGENTS and sum(1 for t in writer.started if t > took_at) >= 5
                ),
                timeout=900,
                what="all Agents created and 5 writes after the takeover",
            )
            writer.stop_event.set()
            writer.join(300)
            assert not writer.is_alive()

            eventually(lambda: ready() == AGENTS, timeout=1200, interval=5, what="all 200 Ready")
            assert reconciles(replicas["replica-b"]) > 0
            served = {who: front.connections[op.webhook_port] for who, op in replicas.items()}
            unserved = front.unserved

        lease = system.json("get", "lease", "bmad-operator")["spec"]
        assert lease["holderIdentity"] == "replica-b"
        assert lease["leaseTransitions"] == 1
        assert writer.refused == [], f"{len(writer.refused)} refused: {writer.refused[:3]}"
        owned: dict[str, Counter[str]] = {}
        for kind in agent_reconciler.OWNED_KINDS:
            objs = k.json("get", kind.lower(), "-l", meta.AGENT_LABEL)["items"]
            owned[kind] = Counter(o["metadata"]["labels"][meta.AGENT_LABEL] for o in objs)
            assert set(owned[kind]) == set(names), kind
            assert set(owned[kind].values()) == {1}, kind
        # One rollout per Agent: nobody rewrote a Deployment's template behind the other.
        sets = k.json("get", "replicasets")["items"]
        owners = Counter(o["metadata"]["ownerReferences"][0]["name"] for o in sets)
        assert owners == Counter(names)
        leaderless = writer.agents_written(killed, took_at)
        assert leaderless > 0, "no Agent write was tried while nobody led"
        assert unserved == 0
        print(
            f"standby held the Lease {took:.1f}s after the kill ({ready_at_kill} of {AGENTS} "
            f"Ready at the kill); Agent writes: {leaderless} while nobody led, "
            f"{sum(writer.agents)} in all in {writer.attempts} kubectl calls, "
            f"{len(writer.refused)} refused; webhook connections per replica: {served}"
        )
    finally:
        for op in replicas.values():
            op.stop()
        kubectl.run("delete", "namespace", tenant_ns, "--wait=false", check=False)
