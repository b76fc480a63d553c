"""A real Kubernetes control plane on loopback, with kwok nodes instead of kubelets.

etcd, kube-apiserver, kube-controller-manager and kube-scheduler are the real
binaries; kwok fakes the kubelets of a pool of nodes so that scheduled pods turn
Running. The controller-manager is not optional: without it namespaces never finish
terminating, owner references are never garbage-collected and Deployments never
create ReplicaSets.
"""

from __future__ import annotations

import json
import os
import ssl
import subprocess
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

from bmad_testbed import nodenet, pki, procs

KWOK_NODE_ANNOTATION = "kwok.x-k8s.io/node"
OPERATOR_USER = "bmad-operator"

# Only the operator's requests are audited, and only at Metadata level: enough to
# count its writes by verb and object without slowing the apiserver for the others.
AUDIT_POLICY = f"""apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: ["RequestReceived"]
rules:
  - level: Metadata
    users: ["{OPERATOR_USER}"]
  - level: None
"""


def _kubeconfig(path: Path, *, server: str, ca: Path, client: pki.CertPair, user: str) -> None:
    doc: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {
                "name": "bmad-testbed",
                "cluster": {"server": server, "certificate-authority": str(ca)},
            }
        ],
        "users": [
            {
                "name": user,
                "user": {
                    "client-certificate": str(client.cert),
                    "client-key": str(client.key),
                },
            }
        ],
        "contexts": [
            {"name": "bmad-testbed", "context": {"cluster": "bmad-testbed", "user": user}}
        ],
        "current-context": "bmad-testbed",
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)


def _https_ok(url: str, *, ca: Path, client: pki.CertPair) -> bool:
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(client.cert), str(client.key))
    with urllib.request.urlopen(url, context=ctx, timeout=2) as resp:  # noqa: S310 - https only
        return bool(resp.status == 200)


def fake_node(name: str, *, taint: dict[str, str] | None = None) -> dict[str, Any]:
    """A Node object that kwok takes over (it matches our annotation selector).

    With a real node in the test bed the kwok nodes carry `taint`, so that only pods
    that tolerate it are bound to them and everything else runs for real.
    """
    node: dict[str, Any] = {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_NODE_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "node-role.kubernetes.io/agent": "",
                "type": "kwok",
            },
        },
        "status": {
            "allocatable": {"cpu": "256", "memory": "1Ti", "pods": "1000"},
            "capacity": {"cpu": "256", "memory": "1Ti", "pods": "1000"},
        },
    }
    if taint:
        node["spec"] = {"taints": [taint]}
    return node


def start(
    *,
    run_dir: Path,
    binaries: dict[str, Path],
    nodes: int,
    records: list[procs.ProcRecord],
    real_node: bool = False,
    kwok_taint: dict[str, str] | None = None,
) -> dict[str, str]:
    """Start the control plane; append every process to `records` as soon as it runs.

    With `real_node`, the apiserver is made for pods that really run (see `node`): it
    advertises the host's end of the node's veth (pods reach it there through the
    relay), serves the Service range of `nodenet`, keeps the `kubernetes` Service's
    endpoints, reaches webhooks at their pods' addresses and kubelets at their
    InternalIP (never a host name, which would be resolved off this machine).
    Returns the KEY=value pairs for the shell (KUBECONFIG and friends).
    """
    logs = run_dir / "logs"
    certs = pki.Pki(run_dir / "pki")
    api_port = procs.free_port()
    serving = certs.issue(
        "apiserver",
        cn="kube-apiserver",
        server=True,
        dns=(
            "localhost",
            "kubernetes",
            "kubernetes.default",
            "kubernetes.default.svc",
            "kubernetes.default.svc.cluster.local",
        ),
        ips=("127.0.0.1", "10.0.0.1", nodenet.HOST_ADDRESS, nodenet.KUBERNETES_SERVICE_ADDRESS),
    )
    kubelet_client = certs.issue(
        "apiserver-kubelet-client", cn="kube-apiserver-kubelet-client", org="system:masters"
    )
    if real_node:
        node_flags = [
            f"--advertise-address={nodenet.HOST_ADDRESS}",
            f"--service-cluster-ip-range={nodenet.SERVICE_NETWORK}",
            "--endpoint-reconciler-type=lease",
            "--enable-aggregator-routing=true",
        ]
    else:
        node_flags = [
            "--advertise-address=127.0.0.1",
            "--service-cluster-ip-range=10.0.0.0/16",
            "--endpoint-reconciler-type=none",
        ]
    admin = certs.issue("admin", cn="bmad-testbed-admin", org="system:masters")
    # With --use-service-account-credentials=false every controller acts as the
    # controller-manager itself, so it needs the rights of all of them.
    cm_cert = certs.issue(
        "controller-manager", cn="system:kube-controller-manager", org="system:masters"
    )
    sched_cert = certs.issue("scheduler", cn="system:kube-scheduler")
    kwok_cert = certs.issue("kwok", cn="kwok-controller", org="system:masters")
    # The operator gets an identity of its own, with no group: tests bind it to the
    # ClusterRole shipped in manifests/rbac, which proves that role is sufficient, and
    # the audit log tells its requests apart from everyone else's.
    operator_cert = certs.issue("operator", cn=OPERATOR_USER)
    sa = certs.service_account_keys()
    server = f"https://127.0.0.1:{api_port}"
    kubeconfig = run_dir / "kubeconfig"
    _kubeconfig(kubeconfig, server=server, ca=certs.ca.cert, client=admin, user="admin")
    cm_kc = run_dir / "controller-manager.kubeconfig"
    _kubeconfig(cm_kc, server=server, ca=certs.ca.cert, client=cm_cert, user="cm")
    sched_kc = run_dir / "scheduler.kubeconfig"
    _kubeconfig(sched_kc, server=server, ca=certs.ca.cert, client=sched_cert, user="sched")
    operator_kc = run_dir / "operator.kubeconfig"
    _kubeconfig(operator_kc, server=server, ca=certs.ca.cert, client=operator_cert, user="op")
    audit_policy = run_dir / "audit-policy.yaml"
    audit_policy.write_text(AUDIT_POLICY)
    audit_log = run_dir / "audit.log"
    kwok_kc = run_dir / "kwok.kubeconfig"
    _kubeconfig(kwok_kc, server=server, ca=certs.ca.cert, client=kwok_cert, user="kwok")

    # etcd ------------------------------------------------------------------
    etcd_port, etcd_peer = procs.free_port(), procs.free_port()
    etcd = procs.spawn(
        "etcd",
        [
            str(binaries["etcd"]),
            "--name=bmad",
            f"--data-dir={run_dir / 'etcd'}",
            f"--listen-client-urls=http://127.0.0.1:{etcd_port}",
            f"--advertise-client-urls=http://127.0.0.1:{etcd_port}",
            f"--listen-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-advertise-peer-urls=http://127.0.0.1:{etcd_peer}",
            f"--initial-cluster=bmad=http://127.0.0.1:{etcd_peer}",
            "--quota-backend-bytes=4294967296",
            "--snapshot-count=50000",
        ],
        log_dir=logs,
        env={"ETCD_UNSUPPORTED_ARCH": "", "ETCDCTL_API": "3"},
    )
    records.append(etcd)
    procs.wait_until(
        etcd,
        lambda: procs.http_ok(f"http://127.0.0.1:{etcd_port}/health"),
        timeout=30,
        what="healthy",
    )

    # kube-apiserver --------------------------------------------------------
    apiserver = procs.spawn(
        "kube-apiserver",
        [
            str(binaries["kube-apiserver"]),
            f"--etcd-servers=http://127.0.0.1:{etcd_port}",
            f"--secure-port={api_port}",
            "--bind-address=127.0.0.1",
            *node_flags,
            f"--kubelet-client-certificate={kubelet_client.cert}",
            f"--kubelet-client-key={kubelet_client.key}",
            "--kubelet-preferred-address-types=InternalIP",
            f"--tls-cert-file={serving.cert}",
            f"--tls-private-key-file={serving.key}",
            f"--client-ca-file={certs.ca.cert}",
            "--authorization-mode=RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={sa.cert}",
            f"--service-account-signing-key-file={sa.key}",
            "--allow-privileged=true",
            "--profiling=false",
            "--enable-priority-and-fairness=false",
            "--max-requests-inflight=2000",
            "--max-mutating-requests-inflight=1000",
            f"--cert-dir={run_dir / 'pki'}",
            f"--audit-policy-file={audit_policy}",
            f"--audit-log-path={audit_log}",
            "--audit-log-format=json",
            "--audit-log-maxsize=200",
            "--audit-log-maxbackup=1",
            "--audit-log-mode=blocking",
        ],
        log_dir=logs,
    )
    records.append(apiserver)
    procs.wait_until(
        apiserver,
        lambda: _https_ok(f"{server}/readyz", ca=certs.ca.cert, client=admin),
        timeout=120,
        what="ready (/readyz)",
    )

    # kube-controller-manager -------------------------------------------------
    cm = procs.spawn(
        "kube-controller-manager",
        [
            str(binaries["kube-controller-manager"]),
            f"--kubeconfig={cm_kc}",
            f"--authentication-kubeconfig={cm_kc}",
            f"--authorization-kubeconfig={cm_kc}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={procs.free_port()}",
            f"--service-account-private-key-file={sa.key}",
            f"--root-ca-file={certs.ca.cert}",
            "--use-service-account-credentials=false",
            "--controllers=*,-nodeipam,-service-lb-controller,-cloud-node-lifecycle",
            "--concurrent-deployment-syncs=20",
            "--concurrent-replicaset-syncs=20",
            "--concurrent-gc-syncs=40",
            "--concurrent-namespace-syncs=20",
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            f"--cert-dir={run_dir / 'pki'}",
        ],
        log_dir=logs,
    )
    records.append(cm)

    # kube-scheduler ----------------------------------------------------------
    sched = procs.spawn(
        "kube-scheduler",
        [
            str(binaries["kube-scheduler"]),
            f"--kubeconfig={sched_kc}",
            f"--authentication-kubeconfig={sched_kc}",
            f"--authorization-kubeconfig={sched_kc}",
            "--leader-elect=false",
            "--bind-address=127.0.0.1",
            f"--secure-port={procs.free_port()}",
            "--kube-api-qps=500",
            "--kube-api-burst=1000",
            f"--cert-dir={run_dir / 'pki'}",
        ],
        log_dir=logs,
    )
    records.append(sched)

    # kwok --------------------------------------------------------------------
    kwok = procs.spawn(
        "kwok",
        [
            str(binaries["kwok"]),
            f"--kubeconfig={kwok_kc}",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={KWOK_NODE_ANNOTATION}=fake",
            "--cidr=10.244.0.1/16",
            "--node-ip=127.0.0.1",
            f"--server-address=127.0.0.1:{procs.free_port()}",
            "--node-lease-duration-seconds=40",
        ],
        log_dir=logs,
        env={"HOME": str(run_dir)},  # kwok reads ~/.kwok/kwok.yaml; keep it ours
    )
    records.append(kwok)

    env = {
        "KUBECONFIG": str(kubeconfig),
        "BMAD_OPERATOR_KUBECONFIG": str(operator_kc),
        "BMAD_OPERATOR_USER": OPERATOR_USER,
        "BMAD_AUDIT_LOG": str(audit_log),
        "BMAD_APISERVER_PORT": str(api_port),
    }
    kubectl = str(binaries["kubectl"])
    node_docs = "\n---\n".join(
        json.dumps(fake_node(f"kwok-node-{i}", taint=kwok_taint)) for i in range(nodes)
    )
    _kubectl(kubectl, kubeconfig, ["apply", "-f", "-"], stdin=node_docs)
    _wait_nodes_ready(kubectl, kubeconfig, nodes, records=[cm, sched, kwok])
    _wait_default_sa(kubectl, kubeconfig, records=[cm])
    return env


def _kubectl(kubectl: str, kubeconfig: Path, args: list[str], *, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [kubectl, f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        raise procs.StartupError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _check_alive(records: list[procs.ProcRecord]) -> None:
    for rec in records:
        if not procs.is_alive(rec):
            raise procs.StartupError(
                f"{rec['name']} exited; log {rec['log']}:\n" + procs.log_tail(rec["log"])
            )


def _wait_nodes_ready(
    kubectl: str, kubeconfig: Path, count: int, *, records: list[procs.ProcRecord]
) -> None:
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        _check_alive(records)
        out = json.loads(_kubectl(kubectl, kubeconfig, ["get", "nodes", "-o", "json"]))
        ready = 0
        for node in out["items"]:
            for cond in node.get("status", {}).get("conditions", []):
                if cond["type"] == "Ready" and cond["status"] == "True":
                    ready += 1
        if ready >= count:
            return
        time.sleep(0.5)
    raise procs.StartupError(f"the {count} kwok nodes did not become Ready within 90s")


def _wait_default_sa(kubectl: str, kubeconfig: Path, *, records: list[procs.ProcRecord]) -> None:
    """The controller-manager is working once it has made the default ServiceAccount."""
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        _check_alive(records)
        proc = subprocess.run(
            [
                kubectl,
                f"--kubeconfig={kubeconfig}",
                "get",
                "serviceaccount",
                "default",
                "-n",
                "default",
                "-o",
                "name",
            ],
            capture_output=True,
            text=True,
            check=False,
            timeout=30,
        )
        if proc.returncode == 0:
            return
        time.sleep(0.5)
    raise procs.StartupError("the controller-manager did not create the default ServiceAccount")


def kubectl_env(bin_dir: Path) -> dict[str, str]:
    return {"PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
