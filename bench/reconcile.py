"""Benchmark: N Agents applied at once → seconds until all Ready, against the same
owned objects applied directly with `kubectl apply --server-side` → seconds until all
Deployments are Available. Also the operator's peak RSS.

Run on demand (not in CI), with the test bed up:

    set -a; eval "$(.venv/bin/bmad testbed up --services none --nodes 3)"; set +a
    .venv/bin/python bench/reconcile.py --agents 200 1000 --write docs/benchmarks.md

Each size uses fresh namespaces; the operator is started fresh for each size.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import secrets
import sys
import threading
import time
from pathlib import Path
from typing import Any

import psutil

from bmad_crds.v1alpha1 import agent as agent_api
from bmad_operator.builders import agent as builders
from bmad_testbed import operator_proc
from bmad_testbed.kubectl import Kubectl

ROLES = ("analyst", "pm", "architect", "ux-expert", "po", "sm", "dev", "qa")
REPO = Path(__file__).resolve().parent.parent


def agent_doc(name: str, i: int) -> dict[str, Any]:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Agent",
        "metadata": {"name": name},
        "spec": {
            "role": ROLES[i % len(ROLES)],
            "model": {"provider": "echo", "name": "echo-1"},
            "memory": {"store": "inProcess"},
            "auth": {"mode": "none"},
            "replicas": 1,
        },
    }


def count_ready_agents(k: Kubectl) -> int:
    n = 0
    for item in k.json("get", "agents")["items"]:
        for c in (item.get("status") or {}).get("conditions") or []:
            if c["type"] == "Ready" and c["status"] == "True":
                n += 1
    return n


def count_available_deployments(k: Kubectl) -> int:
    n = 0
    for item in k.json("get", "deployments")["items"]:
        for c in (item.get("status") or {}).get("conditions") or []:
            if c["type"] == "Available" and c["status"] == "True":
                n += 1
    return n


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.peak = 0
        self.cpu = 0.0
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.25):
            try:
                proc = psutil.Process(self.pid)
                rss = proc.memory_info().rss + sum(
                    c.memory_info().rss for c in proc.children(recursive=True)
                )
            except psutil.Error:
                continue
            self.peak = max(self.peak, rss)
            try:
                times = psutil.Process(self.pid).cpu_times()
                self.cpu = times.user + times.system
            except psutil.Error:
                pass


def wait_for(count: int, probe: Any, *, timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if probe() >= count:
            return time.monotonic() - start
        time.sleep(1)
    raise TimeoutError(f"not all {count} were ready within {timeout}s (got {probe()})")


def run_operator(kubectl: Kubectl, kubeconfig: str, n: int, tmp: Path) -> tuple[float, int]:
    ns = f"bench-op-{n}-{secrets.token_hex(2)}"
    kubectl.run("create", "namespace", ns)
    k = kubectl.in_namespace(ns)
    op = operator_proc.OperatorProcess(
        kubeconfig=kubeconfig,
        log_path=tmp / f"operator-{n}.log",
        resync_seconds=300,
        workers=32,
        # a shared 2-core machine can take minutes to start it; the clock starts later
        start_timeout=300,
    )
    op.start()
    assert op.pid is not None
    sampler = RssSampler(op.pid)
    sampler.start()
    try:
        docs = [agent_doc(f"a-{i:04d}", i) for i in range(n)]
        start = time.monotonic()
        k.run(
            "apply",
            "--server-side",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": docs}),
            timeout=600,
        )
        wait_for(n, lambda: count_ready_agents(k), timeout=1800)
        total = time.monotonic() - start  # from the moment the apply started
    finally:
        sampler.stop_event.set()
        sampler.join()
        op.stop()
        kubectl.run("delete", "namespace", ns, "--wait=false")
    print(f"operator CPU time: {sampler.cpu:.1f}s", file=sys.stderr)
    return total, sampler.peak


def run_direct(kubectl: Kubectl, n: int) -> float:
    """The same owned objects, applied straight away by kubectl: the floor we compare with."""
    ns = f"bench-direct-{n}-{secrets.token_hex(2)}"
    kubectl.run("create", "namespace", ns)
    k = kubectl.in_namespace(ns)
    objs: list[dict[str, Any]] = []
    for i in range(n):
        doc = agent_doc(f"a-{i:04d}", i)
        body = {
            "metadata": {
                "name": doc["metadata"]["name"],
                "namespace": ns,
                "uid": "00000000-0000-0000-0000-000000000000",
            }
        }
        spec = agent_api.AgentSpec.model_validate(doc["spec"])
        for obj in builders.build_all(body, spec, image="bmad-operator:0.1.0"):
            obj["metadata"].pop("ownerReferences", None)
            objs.append(obj)
    try:
        start = time.monotonic()
        k.run(
            "apply",
            "--server-side",
            "-f",
            "-",
            stdin=json.dumps({"apiVersion": "v1", "kind": "List", "items": objs}),
            timeout=900,
        )
        wait_for(n, lambda: count_available_deployments(k), timeout=1800)
        return time.monotonic() - start
    finally:
        kubectl.run("delete", "namespace", ns, "--wait=false")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--agents", type=int, nargs="+", default=[200, 1000])
    parser.add_argument("--write", type=Path, help="append the results to this Markdown file")
    args = parser.parse_args()
    kubeconfig = os.environ["KUBECONFIG"]
    operator_kc = os.environ.get("BMAD_OPERATOR_KUBECONFIG", kubeconfig)
    kubectl = Kubectl(os.environ.get("BMAD_KUBECTL", "kubectl"), kubeconfig)
    for path in sorted((REPO / "crds" / "bases").glob("bmad.dev_*.yaml")):
        kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(path))
    tmp = Path(os.environ.get("BMAD_TESTBED_DIR", "/tmp")) / "bench"  # noqa: S108
    rows = []
    for n in args.agents:
        direct = run_direct(kubectl, n)
        print(f"{n} objects sets via kubectl apply --server-side: {direct:.1f}s", file=sys.stderr)
        op_s, rss = run_operator(kubectl, operator_kc, n, tmp)
        print(
            f"{n} agents via the operator: {op_s:.1f}s, peak RSS {rss / 2**20:.0f} MiB",
            file=sys.stderr,
        )
        rows.append((n, op_s, direct, op_s / direct, rss))
    cpu = platform.processor() or platform.machine()
    lines = [
        f"\n### bench/reconcile — {dt.date.today().isoformat()}\n",
        f"Machine: {os.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB, {cpu}, Python "
        f"{platform.python_version()}; test bed control plane (kube-apiserver 1.33, "
        "etcd 3.4, kwok nodes) on the same machine.\n",
        "| agents | operator: apply → all Ready (s) | kubectl apply --server-side → all "
        "Available (s) | ratio | operator peak RSS (MiB) |",
        "|---:|---:|---:|---:|---:|",
    ]
    for n, op_s, direct, ratio, rss in rows:
        lines.append(f"| {n} | {op_s:.1f} | {direct:.1f} | {ratio:.2f} | {rss / 2**20:.0f} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with args.write.open("a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
