"""The operator -> runtime contract on the real node (issue 11's must-shows): agent pods
of the project's image, rendered by the operator running in the cluster, bound to the
test bed's PostgreSQL and Redis through Integrations.

- an Agent with spec.instructionsFrom answers with those instructions;
- a conversation of an Agent bound to PostgreSQL and Redis survives deleting its pod;
- rotating the Redis password rolls the pods, which then consume tasks again;
- a pod started while Redis is down is not ready, and consumes its stream once Redis
  is back.

Pods reach the test bed's servers at `BMAD_NODE_HOST_ADDRESS` (the relay); the
in-cluster operator's egress policy refuses non-public addresses by default, so this
module allows that one address for the operator's Integration checks, as
docs/integrations.md tells a user with in-cluster datastores to do, and takes it back
at the end. Tasks are submitted from this machine to the same Redis on loopback.

The last test stops and restarts a Redis server of its own (the test bed's is shared by
every test), listening on loopback and on `BMAD_NODE_HOST_ADDRESS`, the test bed's end
of the node's veth, where pods reach it directly.
"""

from __future__ import annotations

import json
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as sync_redis

from bmad_crds import runtime_contract as contract
from bmad_integrations import taskbus
from bmad_testbed import build, procs
from bmad_testbed import kubectl as kubectl_mod
from bmad_testbed.kubectl import eventually

from .helpers import IMAGE, SYSTEM_NS, RealNode, agent, agent_pods, condition, wait_ready

# The first test of a session run alone also sets up the real-node test bed and runs
# the demo (minutes on a loaded machine); pytest-timeout counts fixture setup.
pytestmark = [pytest.mark.e2e, pytest.mark.realnode, pytest.mark.timeout(1500)]

INSTRUCTIONS = "Number every step.\nName the PRD section each step relies on.\n"


@pytest.fixture(scope="module")
def datastores(installed: RealNode) -> Iterator[RealNode]:
    """The operator may check Integrations at the node's host address while these run."""
    kubectl = installed.kubectl
    host = installed.env["BMAD_NODE_HOST_ADDRESS"]
    operator = ("-n", SYSTEM_NS, "deployment/bmad-operator")
    kubectl.run("set", "env", *operator, f"BMAD_OPERATOR_EGRESS_ALLOW={host}")
    kubectl.run("rollout", "status", *operator, "--timeout=300s", timeout=330)
    try:
        yield installed
    finally:
        kubectl.run("set", "env", *operator, "BMAD_OPERATOR_EGRESS_ALLOW-", check=False)
        kubectl.run("rollout", "status", *operator, "--timeout=300s", timeout=330, check=False)


@pytest.fixture
def redis_user(datastores: RealNode) -> Iterator[tuple[str, str, sync_redis.Redis]]:
    """A Redis ACL user of its own (name, password) and an admin client to change it."""
    admin = sync_redis.Redis.from_url(datastores.env["BMAD_REDIS_URL"], decode_responses=True)
    name, password = f"agent-{secrets.token_hex(3)}", secrets.token_hex(12)
    admin.acl_setuser(
        name,
        enabled=True,
        passwords=[f"+{password}"],
        keys=["*"],
        channels=["*"],
        commands=["+@all"],
    )
    try:
        yield name, password, admin
    finally:
        admin.acl_deluser(name)
        admin.close()


def secret(name: str, namespace: str, **data: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "stringData": data,
    }


def redis_integration(
    namespace: str, *, host: str, port: int | str, username: str | None = None
) -> dict[str, Any]:
    block: dict[str, Any] = {"host": host, "port": int(port)}
    if username:
        block["username"] = username
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Integration",
        "metadata": {"name": "cache", "namespace": namespace},
        "spec": {"type": "redis", "secretRef": {"name": "cache-creds"}, "redis": block},
    }


def bed_redis_integration(
    env: dict[str, str], namespace: str, *, username: str | None = None
) -> Any:
    """The Integration of the test bed's Redis, at the address pods reach it."""
    return redis_integration(
        namespace,
        host=env["BMAD_NODE_HOST_ADDRESS"],
        port=env["BMAD_REDIS_PORT"],
        username=username,
    )


class OwnRedis:
    """A Redis server of one test, on loopback and on the node's host address, which the
    test stops and starts again (same port, same password, no data kept)."""

    def __init__(self, directory: Path, host: str) -> None:
        self.directory = directory
        self.host = host
        self.port = procs.free_port()
        self.password = secrets.token_hex(12)
        self.conf = directory / "redis.conf"
        self.conf.write_text(
            f"bind 127.0.0.1 {host}\nport {self.port}\nrequirepass {self.password}\n"
            f'save ""\nappendonly no\ndir {directory}\ndaemonize no\n'
        )
        self.conf.chmod(0o600)
        self.url = f"redis://:{self.password}@127.0.0.1:{self.port}/0"
        self.process: subprocess.Popen[bytes] | None = None

    def _pings(self) -> bool:
        client = sync_redis.Redis.from_url(self.url, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except (sync_redis.ConnectionError, sync_redis.TimeoutError):
            return False
        finally:
            client.close()

    def start(self) -> None:
        log = (self.directory / "redis.log").open("ab")
        self.process = subprocess.Popen(
            [build.DEBIAN_EXECUTABLES["redis-server"], str(self.conf)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        log.close()
        eventually(self._pings, timeout=30, interval=0.2, what="our Redis to answer PING")

    def stop(self) -> None:
        if self.process is None:
            return
        self.process.terminate()  # redis-server shuts down on SIGTERM
        self.process.wait(timeout=30)
        self.process = None
        assert not self._pings(), "our Redis still answers after it stopped"


@pytest.fixture
def own_redis(datastores: RealNode, tmp_path: Path) -> Iterator[OwnRedis]:
    server = OwnRedis(tmp_path, datastores.env["BMAD_NODE_HOST_ADDRESS"])
    server.start()
    try:
        yield server
    finally:
        server.stop()


def postgres_integration(env: dict[str, str], namespace: str) -> dict[str, Any]:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Integration",
        "metadata": {"name": "db", "namespace": namespace},
        "spec": {
            "type": "postgres",
            "secretRef": {"name": "db-creds"},
            "postgres": {
                "host": env["BMAD_NODE_HOST_ADDRESS"],
                "port": int(env["BMAD_POSTGRES_PORT"]),
                "database": "postgres",
                "sslMode": "disable",
            },
        },
    }


def running_pods(kubectl: kubectl_mod.Kubectl, name: str, namespace: str) -> list[str]:
    return sorted(
        p["metadata"]["name"]
        for p in agent_pods(kubectl, name, namespace)
        if p["status"].get("phase") == "Running" and not p["metadata"].get("deletionTimestamp")
    )


def pod_ready(pod: dict[str, Any]) -> bool:
    return any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", [])
    )


def the_only_ready_pod(kubectl: kubectl_mod.Kubectl, name: str, namespace: str) -> str | None:
    """The name of the agent's one pod, once it is the only one and it is ready."""
    pods = agent_pods(kubectl, name, namespace)
    if len(pods) == 1 and pod_ready(pods[0]) and not pods[0]["metadata"].get("deletionTimestamp"):
        return str(pods[0]["metadata"]["name"])
    return None


def in_pod(
    kubectl: kubectl_mod.Kubectl,
    pod: str,
    namespace: str,
    method: str,
    path: str,
    *,
    body: Any = None,
) -> tuple[int, Any]:
    """An HTTP call to the agent from inside its own pod (loopback), status and JSON."""
    code = (
        "import json, sys, urllib.error, urllib.request\n"
        "method, path, body = sys.argv[1], sys.argv[2], sys.argv[3]\n"
        "data = body.encode() if body else None\n"
        "req = urllib.request.Request('http://127.0.0.1:8080' + path, data=data, method=method,\n"
        "                             headers={'Content-Type': 'application/json'})\n"
        "try:\n"
        "    with urllib.request.urlopen(req, timeout=30) as r:\n"
        "        print(json.dumps([r.status, json.load(r)]))\n"
        "except urllib.error.HTTPError as e:\n"
        "    print(json.dumps([e.code, json.load(e)]))\n"
    )
    out = kubectl.out(
        "exec",
        pod,
        "-n",
        namespace,
        "-c",
        "agent",
        "--",
        "python",
        "-c",
        code,
        method,
        path,
        json.dumps(body) if body is not None else "",
    )
    status, answer = json.loads(out.strip().splitlines()[-1])
    return int(status), answer


def ask_through_the_service(
    kubectl: kubectl_mod.Kubectl, name: str, namespace: str, text: str
) -> dict[str, Any]:
    """POST /v1/invoke from a one-shot client pod to the agent's ClusterIP Service."""
    svc = kubectl.json("get", "service", name, "-n", namespace)
    address = f"{svc['spec']['clusterIP']}:{svc['spec']['ports'][0]['port']}"
    client = f"ask-{secrets.token_hex(3)}"
    code = (
        "import json, sys, time, urllib.request\n"
        "req = urllib.request.Request('http://' + sys.argv[1] + '/v1/invoke',\n"
        "    data=json.dumps({'input': sys.argv[2]}).encode(),\n"
        "    headers={'Content-Type': 'application/json'})\n"
        "for attempt in range(30):\n"
        "    try:\n"
        "        with urllib.request.urlopen(req, timeout=30) as r:\n"
        "            print(json.dumps(json.load(r)))\n"
        "            break\n"
        "    except Exception as e:\n"
        "        time.sleep(1)\n"
    )
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": client, "namespace": namespace},
            "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "securityContext": {
                    "runAsNonRoot": True,
                    "runAsUser": 10001,
                    "runAsGroup": 10001,
                    "seccompProfile": {"type": "RuntimeDefault"},
                },
                "containers": [
                    {
                        "name": "ask",
                        "image": IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "-c", code, address, text],
                        "resources": {
                            "requests": {"cpu": "10m", "memory": "32Mi"},
                            "limits": {"memory": "128Mi"},
                        },
                        "securityContext": {
                            "allowPrivilegeEscalation": False,
                            "readOnlyRootFilesystem": True,
                            "capabilities": {"drop": ["ALL"]},
                        },
                    }
                ],
            },
        }
    )
    try:
        kubectl.run(
            "wait",
            "--for=jsonpath={.status.phase}=Succeeded",
            f"pod/{client}",
            "-n",
            namespace,
            "--timeout=240s",
            timeout=270,
        )
        lines = kubectl.out("logs", f"pod/{client}", "-n", namespace).strip().splitlines()
        assert lines, "the agent did not answer through its Service"
        answer: dict[str, Any] = json.loads(lines[-1])
        return answer
    finally:
        kubectl.run("delete", "pod", client, "-n", namespace, "--wait=false", check=False)


async def run_task(
    redis_url: str, *, tenant: str, agent_key: str, task_id: str, text: str, timeout_s: float
) -> Any:
    producer = taskbus.TaskProducer.from_url(redis_url, tenant=tenant, agent=agent_key)
    try:
        await producer.submit(task_id, {"input": text})
        return await producer.wait_result(task_id, timeout_s=timeout_s)
    finally:
        await producer.aclose()


# --- the must-shows -----------------------------------------------------------------------


def test_an_agent_with_instructions_from_a_config_map_answers_with_them(
    datastores: RealNode, real_namespace: str
) -> None:
    """Issue 11 (a) on the real node: without the ConfigMap the pod cannot mount its
    instructions and the Agent says so; with it, the answer shows them (echoSystem)."""
    kubectl, ns = datastores.kubectl, real_namespace
    kubectl.apply(
        agent(
            "reviewer",
            ns,
            role="custom",
            persona={"name": "Quinn", "title": "Reviewer"},
            instructionsFrom={"name": "prompts", "key": "reviewer.md"},
            model={"provider": "echo", "name": "echo-1", "params": {"echoSystem": True}},
            memory={"store": "inProcess"},
        )
    )
    eventually(
        lambda: (
            (condition(kubectl.json("get", "agent", "reviewer", "-n", ns), "Ready") or {}).get(
                "reason"
            )
            == "InstructionsNotFound"
        ),
        timeout=120,
        what="Ready=False InstructionsNotFound",
    )
    pods = eventually(
        lambda: agent_pods(kubectl, "reviewer", ns), timeout=120, what="the agent's pod"
    )
    assert all(p["status"].get("phase") == "Pending" for p in pods), pods  # cannot mount

    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "prompts", "namespace": ns},
            "data": {"reviewer.md": INSTRUCTIONS},
        }
    )
    wait_ready(kubectl, "agent", "reviewer", ns, timeout=420)
    answer = ask_through_the_service(kubectl, "reviewer", ns, "Review story 1.2")

    assert answer["output"].startswith("[echo-1] "), answer
    assert "You are Quinn, the Reviewer." in answer["output"], answer
    assert INSTRUCTIONS.strip() in answer["output"], answer
    assert answer["output"].endswith("Review story 1.2"), answer


def test_a_conversation_survives_deleting_the_agents_pod(
    datastores: RealNode, real_namespace: str
) -> None:
    """Durable memory on the test bed's PostgreSQL and Redis, bound through Integrations
    whose binding Secrets the operator mounts into the pod."""
    kubectl, ns, env = datastores.kubectl, real_namespace, datastores.env
    kubectl.apply(
        secret(
            "db-creds",
            ns,
            username=env["BMAD_POSTGRES_USER"],
            password=env["BMAD_POSTGRES_PASSWORD"],
        )
    )
    kubectl.apply(secret("cache-creds", ns, password=env["BMAD_REDIS_PASSWORD"]))
    kubectl.apply(postgres_integration(env, ns))
    kubectl.apply(bed_redis_integration(env, ns))
    wait_ready(kubectl, "integration", "db", ns, timeout=180)
    wait_ready(kubectl, "integration", "cache", ns, timeout=180)
    kubectl.apply(
        agent("pm", ns, role="pm", integrations=["db", "cache"], memory={"store": "durable"})
    )
    wait_ready(kubectl, "agent", "pm", ns, timeout=300)
    first = eventually(
        lambda: the_only_ready_pod(kubectl, "pm", ns), timeout=120, what="one ready pod"
    )

    status, opened = in_pod(
        kubectl, first, ns, "POST", "/v1/invoke", body={"input": "Draft the PRD"}
    )
    assert status == 200, opened
    conversation = opened["conversationId"]

    kubectl.run("delete", "pod", first, "-n", ns, "--wait=true", timeout=120)
    second = eventually(
        lambda: (p := the_only_ready_pod(kubectl, "pm", ns)) != first and p,
        timeout=300,
        what="a new, ready pod in place of the deleted one",
    )

    status, history = in_pod(
        kubectl, second, ns, "GET", f"/v1/conversations/{conversation}/messages"
    )
    assert status == 200, history
    assert [(m["role"], m["content"]) for m in history["messages"]][:2] == [
        ("user", "Draft the PRD"),
        ("assistant", "[echo-1] Draft the PRD"),
    ], history
    status, follow = in_pod(
        kubectl,
        second,
        ns,
        "POST",
        "/v1/invoke",
        body={"input": "Now the epics", "conversationId": conversation},
    )
    assert status == 200, follow
    assert follow["conversationId"] == conversation
    status, history = in_pod(
        kubectl, second, ns, "GET", f"/v1/conversations/{conversation}/messages"
    )
    assert [m["content"] for m in history["messages"]] == [
        "Draft the PRD",
        "[echo-1] Draft the PRD",
        "Now the epics",
        "[echo-1] Now the epics",
    ], history


async def test_rotating_the_redis_password_rolls_the_pods_and_they_consume_tasks_again(
    datastores: RealNode,
    real_namespace: str,
    redis_user: tuple[str, str, sync_redis.Redis],
) -> None:
    """The agent's namespace belongs to a tenant: its stream is the tenant's (issue 11 b)."""
    kubectl, ns, env = datastores.kubectl, real_namespace, datastores.env
    user, password, admin = redis_user
    tenant = f"tenant-{secrets.token_hex(3)}"
    kubectl.run("label", "namespace", ns, f"bmad.dev/tenant={tenant}")
    kubectl.apply(secret("cache-creds", ns, password=password))
    kubectl.apply(bed_redis_integration(env, ns, username=user))
    wait_ready(kubectl, "integration", "cache", ns, timeout=180)
    kubectl.apply(agent("sm", ns, role="sm", integrations=["cache"], memory={"store": "inProcess"}))
    wait_ready(kubectl, "agent", "sm", ns, timeout=300)
    before = eventually(
        lambda: the_only_ready_pod(kubectl, "sm", ns), timeout=120, what="one ready pod"
    )
    key = contract.agent_key(name="sm", namespace=ns, tenant=tenant)
    assert key == f"{ns}.sm"

    first = await run_task(
        env["BMAD_REDIS_URL"],
        tenant=tenant,
        agent_key=key,
        task_id="t-1",
        text="Draft story 1.1",
        timeout_s=120,
    )
    assert first.status == "succeeded", first
    assert first.consumer.startswith(f"{before}-"), first

    rotated = secrets.token_hex(12)
    admin.acl_setuser(user, enabled=True, reset_passwords=True, passwords=[f"+{rotated}"])
    kubectl.apply(secret("cache-creds", ns, password=rotated))
    after = eventually(
        lambda: (p := the_only_ready_pod(kubectl, "sm", ns)) not in (None, before) and p,
        timeout=420,
        what="the pods to roll onto the rotated password",
    )

    second = await run_task(
        env["BMAD_REDIS_URL"],
        tenant=tenant,
        agent_key=key,
        task_id="t-2",
        text="Draft story 1.2",
        timeout_s=120,
    )
    assert second.status == "succeeded", second
    assert second.consumer.startswith(f"{after}-"), second
    assert second.output is not None
    assert "Draft story 1.2" in second.output["output"], second


async def test_a_pod_started_while_redis_is_down_is_not_ready_and_consumes_once_it_is_back(
    datastores: RealNode, real_namespace: str, own_redis: OwnRedis
) -> None:
    """Issue 11 (c) on the real node: the Integration is checked and bound while Redis
    runs; Redis stops; the agent's pod starts, runs, and is not ready (its /readyz says
    the task bus cannot be reached); Redis starts again, and that same pod, never
    restarted, consumes a task from its stream and becomes ready."""
    kubectl, ns = datastores.kubectl, real_namespace
    kubectl.apply(secret("cache-creds", ns, password=own_redis.password))
    kubectl.apply(redis_integration(ns, host=own_redis.host, port=own_redis.port))
    wait_ready(kubectl, "integration", "cache", ns, timeout=180)

    own_redis.stop()
    kubectl.apply(agent("qa", ns, role="qa", integrations=["cache"], memory={"store": "inProcess"}))
    pod = eventually(
        lambda: (p := running_pods(kubectl, "qa", ns)) and p[0],
        timeout=300,
        what="the agent pod to run",
    )

    def bus_down() -> tuple[int, Any] | None:
        try:
            status, body = in_pod(kubectl, pod, ns, "GET", "/readyz")
        except kubectl_mod.KubectlError:
            return None  # the runtime is not listening yet
        return (status, body) if body["checks"].get("bus") is False else None

    status, readiness = eventually(bus_down, timeout=180, what="/readyz to report the bus down")
    assert status == 503, readiness
    assert readiness["status"] == "not-ready", readiness
    assert "Redis" in readiness["message"], readiness
    [live] = agent_pods(kubectl, "qa", ns)
    assert not pod_ready(live), live["status"]

    own_redis.start()
    key = contract.agent_key(name="qa", namespace=ns, tenant=ns)
    result = await run_task(
        own_redis.url,
        tenant=ns,
        agent_key=key,
        task_id="t-1",
        text="Review story 2.1",
        timeout_s=180,
    )
    assert result.status == "succeeded", result
    assert result.consumer.startswith(f"{pod}-"), result  # the pod that started without Redis

    live = eventually(
        lambda: (p := agent_pods(kubectl, "qa", ns)) and pod_ready(p[0]) and p[0],
        timeout=180,
        what="the pod to become ready",
    )
    assert live["metadata"]["name"] == pod
    assert live["status"]["containerStatuses"][0]["restartCount"] == 0, live["status"]
