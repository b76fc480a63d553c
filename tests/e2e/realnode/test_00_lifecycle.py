"""`up --real-node` then `down`: a pod really ran, and nothing of it is left.

First in this folder on purpose: it needs the machine's one real node for itself,
before the suite's shared test bed (started on first use of the `realnode` fixture)
takes it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from bmad_testbed import images, node, nodenet, procs, testbed
from bmad_testbed import kubectl as kubectl_mod
from bmad_testbed.kubectl import eventually

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]


def _host_snapshot(directory: Path) -> dict[str, Any]:
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, check=True)
    routes = subprocess.run(
        ["ip", "-j", "route", "show", "table", "all"], capture_output=True, text=True, check=True
    )
    links = subprocess.run(["ip", "-j", "link"], capture_output=True, text=True, check=True)
    mine = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if str(directory).encode() in (entry / "cmdline").read_bytes():
                    mine.append(entry.name)
            except OSError:
                continue
    return {
        "sysctls": {
            k: Path("/proc/sys/" + k.replace(".", "/")).read_text().strip()
            for k in node.KUBELET_SYSCTLS
        },
        "shared_dirs": {str(d): d.exists() for d in node.SHARED_DIRS},
        "netns": netns.stdout.split(),
        "routes": [r for r in json.loads(routes.stdout) if "10.217." in r.get("dst", "")],
        "links": [
            lk["ifname"] for lk in json.loads(links.stdout) if lk["ifname"].startswith("bmad-")
        ],
        "cgroups": sorted(str(p) for p in Path("/sys/fs/cgroup").glob(f"*/{node.CGROUP_ROOT}")),
        "mounts": [
            ln
            for ln in Path("/proc/self/mountinfo").read_text().splitlines()
            if str(directory) in ln
        ],
        "processes": mine,
        "owner_file": nodenet.OWNER_FILE.exists(),
    }


def test_real_node_runs_a_pod_and_down_leaves_nothing_behind(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    directory = Path(f"/tmp/bmad-rn-life-{os.getpid()}")
    # A real node whose test bed was killed (an earlier run on this machine ended
    # mid-way) is cleaned by `up` anyway; clean it first so that the snapshot below
    # is the machine's own state and not that leftover's.
    testbed.remove_stale_node()
    before = _host_snapshot(directory)
    assert before["netns"].count(nodenet.NETNS) == 0, "another real node runs on this machine"
    # A test bed of its own, whatever KUBECONFIG the session's test bed exported.
    monkeypatch.delenv("KUBECONFIG", raising=False)
    env = testbed.up(real_node=True, with_services=[], nodes=1, directory=directory)
    try:
        kubectl = kubectl_mod.Kubectl(env["BMAD_KUBECTL"], env["KUBECONFIG"])
        pause = images.ensure_pause()
        kubectl.apply(
            {
                "apiVersion": "v1",
                "kind": "Pod",
                "metadata": {"name": "sleeper", "namespace": "default"},
                "spec": {
                    "containers": [{"name": "c", "image": pause.ref, "imagePullPolicy": "Never"}],
                    "volumes": [{"name": "scratch", "emptyDir": {}}],
                },
            }
        )

        def running() -> bool:
            pod = kubectl.json("get", "pod", "sleeper", "-n", "default")
            return (
                pod["status"].get("phase") == "Running"
                and pod["spec"]["nodeName"] == node.NODE_NAME
            )

        eventually(running, timeout=120, what="a pod running on the real node")
        during = _host_snapshot(directory)
        assert nodenet.NETNS in during["netns"]
        assert during["cgroups"]  # the pod's cgroups, under the node's own root
        assert during["mounts"]  # its rootfs, sandbox namespace and volumes
    finally:
        stopped = testbed.down(directory=directory)
    assert {"containerd", "kubelet", "kube-proxy", "kube-router", "relay"} <= set(stopped)
    assert _host_snapshot(directory) == before
    assert not directory.exists()


def test_a_real_node_left_behind_by_killed_processes_is_cleaned_by_the_next_up(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A session that ends kills what it started; the namespace, mounts and cgroups of
    its real node stay. The next `up --real-node` removes them and starts its own."""
    first = Path(f"/tmp/bmad-rn-stale-{os.getpid()}")
    second = Path(f"/tmp/bmad-rn-next-{os.getpid()}")
    testbed.remove_stale_node()
    before = _host_snapshot(second)
    monkeypatch.delenv("KUBECONFIG", raising=False)
    testbed.up(real_node=True, with_services=[], nodes=1, directory=first)
    try:
        state = testbed.status(first)
        assert state is not None
        for rec in state["records"]:
            os.killpg(rec["pid"], signal.SIGKILL)
        eventually(
            lambda: not any(procs.is_alive(r) for r in state["records"]),
            timeout=30,
            what="every process of the first test bed killed",
        )
        assert nodenet.exists()  # left behind
        env = testbed.up(real_node=True, with_services=[], nodes=1, directory=second)
        assert env["BMAD_NODE_NAME"] == node.NODE_NAME
        assert nodenet.owned_by(second)
    finally:
        testbed.down(directory=second)
        testbed.down(directory=first)
    assert _host_snapshot(second) == before
