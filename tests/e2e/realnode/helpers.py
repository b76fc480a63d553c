"""Helpers of the real-node suite: Agents small enough for 2 cores, one-shot client pods."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bmad_testbed import kubectl as kubectl_mod

REPO = Path(__file__).resolve().parents[3]
IMAGE = "bmad-operator:0.1.0"
SYSTEM_NS = "bmad-system"
NODE_NAME = "bmad-node"


def realnode_dir() -> Path:
    default = f"/tmp/bmad-realnode-{os.getuid()}"
    return Path(os.environ.get("BMAD_REALNODE_DIR") or default)


@dataclass(frozen=True)
class RealNode:
    directory: Path
    env: dict[str, str]
    kubectl: kubectl_mod.Kubectl
    demo: subprocess.CompletedProcess[str]
    demo_seconds: float


def agent(name: str, namespace: str, **spec: Any) -> dict[str, Any]:
    """An Agent on the echo model (no account needed), small enough for 2 cores."""
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "role": "analyst",
            "model": {"provider": "echo", "name": "echo-1"},
            # No auth0 Integration on the test bed: open, as the demo's agents are; and
            # no datastores unless a test binds them (durable is the API's default).
            "auth": {"mode": "none"},
            "memory": {"store": "inProcess"},
            "replicas": 1,
            "resources": {
                "requests": {"cpu": "10m", "memory": "96Mi"},
                "limits": {"memory": "384Mi"},
            },
            **spec,
        },
    }


def condition(obj: dict[str, Any], cond_type: str) -> dict[str, Any] | None:
    for cond in obj.get("status", {}).get("conditions", []):
        if cond["type"] == cond_type:
            found: dict[str, Any] = cond
            return found
    return None


def wait_ready(
    kubectl: kubectl_mod.Kubectl, kind: str, name: str, namespace: str, timeout: float = 240
) -> None:
    """`kubectl wait` for condition Ready; `namespace` empty for a cluster-scoped kind."""
    where = ["-n", namespace] if namespace else []
    try:
        kubectl.run(
            "wait",
            "--for=condition=Ready",
            f"{kind}/{name}",
            *where,
            f"--timeout={int(timeout)}s",
            timeout=timeout + 30,
        )
    except (kubectl_mod.KubectlError, subprocess.TimeoutExpired) as exc:
        raise AssertionError(
            f"{kind}/{name} not Ready: {exc}\n{diagnose(kubectl, namespace)}"
        ) from exc


def diagnose(kubectl: kubectl_mod.Kubectl, namespace: str) -> str:
    """What a human would look at when something on the real node is not Ready: the
    namespace's objects and Events, the node, and the operator pod with its last logs."""
    probes: list[tuple[str, ...]] = [
        ("get", "nodes", "-o", "wide"),
        ("get", "pods", "-n", SYSTEM_NS, "-o", "wide"),
        ("logs", "-n", SYSTEM_NS, "deployment/bmad-operator", "--tail=40"),
    ]
    if namespace:
        probes += [
            ("get", "agents,deployments,pods", "-n", namespace, "-o", "wide"),
            ("get", "agents", "-n", namespace, "-o", "jsonpath={.items[*].status.conditions}"),
            ("get", "events", "-n", namespace, "--sort-by=.lastTimestamp"),
        ]
    out = []
    for args in probes:
        proc = kubectl.run(*args, check=False, timeout=60)
        out.append(f"$ kubectl {' '.join(args)}\n{(proc.stdout + proc.stderr)[-3000:]}")
    return "\n".join(out)


def agent_pods(kubectl: kubectl_mod.Kubectl, name: str, namespace: str) -> list[dict[str, Any]]:
    pods: list[dict[str, Any]] = kubectl.json(
        "get", "pods", "-n", namespace, "-l", f"app.kubernetes.io/instance={name}"
    )["items"]
    return pods


def run_client(
    kubectl: kubectl_mod.Kubectl,
    namespace: str,
    checks: list[tuple[str, int]],
    *,
    timeout: float = 5,
) -> list[str]:
    """From one one-shot pod in `namespace`, GET each url of `checks` in turn, with up to
    `attempts` tries a second apart; one line per url: "OK <status>" as soon as a try is
    answered, else "FAIL <last error>".

    A policy enforcer admits a new pod's address a moment after the pod starts (it
    watches pods), so a request that must be allowed gets many tries; a request that
    must be refused, asked after an allowed one succeeded from the same pod, fails every
    try because of the policy and not because the enforcer has not seen the pod yet.
    """
    name = f"client-{secrets.token_hex(4)}"
    code = (
        "import sys, time, urllib.request\n"
        "for url, attempts in zip(sys.argv[1::2], sys.argv[2::2]):\n"
        "    result = None\n"
        "    for attempt in range(int(attempts)):\n"
        "        try:\n"
        f"            with urllib.request.urlopen(url, timeout={timeout}) as r:\n"
        "                result = f'OK {r.status}'\n"
        "                break\n"
        "        except Exception as e:\n"
        "            result = f'FAIL {type(e).__name__} {e}'\n"
        "            time.sleep(1)\n"
        "    print(result, flush=True)\n"
    )
    args = [str(a) for url, attempts in checks for a in (url, attempts)]
    total = sum(attempts for _, attempts in checks) * (timeout + 1)
    kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": name,
                "namespace": namespace,
                "labels": {"app": "bmad-e2e-client"},
            },
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
                        "name": "client",
                        "image": IMAGE,
                        "imagePullPolicy": "IfNotPresent",
                        "command": ["python", "-c", code, *args],
                        "resources": {
                            "requests": {"cpu": "10m", "memory": "32Mi"},
                            "limits": {"cpu": "500m", "memory": "128Mi"},
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
            f"pod/{name}",
            "-n",
            namespace,
            f"--timeout={int(120 + total)}s",
            timeout=150 + total,
        )
        return kubectl.out("logs", f"pod/{name}", "-n", namespace).strip().splitlines()
    finally:
        kubectl.run("delete", "pod", name, "-n", namespace, "--wait=false", check=False)


def service_url(
    kubectl: kubectl_mod.Kubectl, name: str, namespace: str, path: str = "/healthz"
) -> str:
    svc = kubectl.json("get", "service", name, "-n", namespace)
    port = svc["spec"]["ports"][0]["port"]
    return f"http://{svc['spec']['clusterIP']}:{port}{path}"


def as_json(text: str) -> Any:
    return json.loads(text)
