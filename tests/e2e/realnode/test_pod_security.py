"""Pod security for real: agent pods run as uid 10001 on a read-only root filesystem,
under Pod Security `restricted` enforcement, and write only to their emptyDir."""

from __future__ import annotations

import json

import pytest

from bmad_testbed import kubectl as kubectl_mod

from .helpers import IMAGE, NODE_NAME, agent, agent_pods, wait_ready

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]


def _exec(kubectl: kubectl_mod.Kubectl, pod: str, ns: str, code: str) -> str:
    return kubectl.out("exec", pod, "-n", ns, "-c", "agent", "--", "python", "-c", code).strip()


def test_agent_pod_runs_as_10001_read_only_and_writes_only_to_its_empty_dir(
    real_kubectl: kubectl_mod.Kubectl, real_namespace: str
) -> None:
    kubectl, ns = real_kubectl, real_namespace
    enforced = kubectl.json("get", "namespace", ns)["metadata"]["labels"]
    assert enforced["pod-security.kubernetes.io/enforce"] == "restricted"
    kubectl.apply(agent("secure", ns))
    wait_ready(kubectl, "agent", "secure", ns)
    [pod] = [p for p in agent_pods(kubectl, "secure", ns) if p["status"]["phase"] == "Running"]
    assert pod["spec"]["nodeName"] == NODE_NAME
    name = pod["metadata"]["name"]

    ids = json.loads(
        _exec(
            kubectl,
            name,
            ns,
            "import os, json; print(json.dumps([os.getuid(), os.getgid(), os.geteuid()]))",
        )
    )
    assert ids == [10001, 10001, 10001]

    probe = (
        "import json\n"
        "out = {}\n"
        "for path in ('/opt/venv/x', '/home/bmad/x', '/etc/x', '/x', '/tmp/x'):\n"
        "    try:\n"
        "        open(path, 'w').write('x')\n"
        "        out[path] = 'written'\n"
        "    except OSError as e:\n"
        "        out[path] = e.strerror\n"
        "mounts = {l.split()[1]: l.split()[3].split(',')[0] for l in open('/proc/mounts')}\n"
        "print(json.dumps({'writes': out, 'root': mounts['/'], 'tmp': mounts.get('/tmp')}))\n"
    )
    seen = json.loads(_exec(kubectl, name, ns, probe))
    assert seen["root"] == "ro"
    assert seen["tmp"] == "rw"
    assert seen["writes"]["/tmp/x"] == "written"
    for path in ("/opt/venv/x", "/home/bmad/x", "/etc/x", "/x"):
        assert seen["writes"][path] in ("Read-only file system", "Permission denied"), seen
    # /tmp is the pod's emptyDir, not a directory of the image.
    volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in pod["spec"]["containers"][0]["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]]


def test_restricted_enforcement_refuses_a_root_pod_in_the_same_namespace(
    real_kubectl: kubectl_mod.Kubectl, real_namespace: str
) -> None:
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": "as-root", "namespace": real_namespace},
        "spec": {
            "containers": [
                {
                    "name": "c",
                    "image": IMAGE,
                    "securityContext": {"runAsUser": 0, "allowPrivilegeEscalation": True},
                }
            ]
        },
    }
    proc = real_kubectl.run("apply", "-f", "-", stdin=json.dumps(pod), check=False)
    assert proc.returncode != 0
    assert "violates PodSecurity" in proc.stderr
    assert "restricted" in proc.stderr
