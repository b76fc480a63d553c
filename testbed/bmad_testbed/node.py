"""A real node beside the kwok nodes: pods that run, on this machine, contained.

containerd (with runc and the CNI bridge), the kubelet, kube-proxy and kube-router
(NetworkPolicy enforcement only) run in the network namespace of `nodenet`; the
kubelet registers the Node `bmad-node` with the test bed's apiserver. Everything they
write goes under `<run dir>/node`, except the few paths these programs fix for
themselves, which `stop` cleans up (see `_host_state`): the kubelet's device-plugin
directory and `/var/log/containers`, the CNI cache in `/var/lib/cni`, containerd's
shim sockets in `/run/containerd/s`, and the kernel settings the kubelet changes on
start (restored). Pod cgroups live under `/bmad-node` in every hierarchy, so that `stop`
can find and kill every process of every pod, then remove them.

Steering: in a test bed with a real node the kwok nodes carry the taint
`KWOK_TAINT`, so every pod goes to the real node unless it tolerates that taint. Pods
of the operator, the demo and the e2e tests land there exactly as they would in a
user's cluster, from unmodified manifests.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import yaml

from bmad_testbed import build, images, nodenet, pki, procs

NODE_NAME = "bmad-node"
NODE_LABEL = "bmad.dev/testbed-node"
KWOK_TAINT = {"key": "kwok.x-k8s.io/node", "value": "fake", "effect": "NoSchedule"}
CGROUP_ROOT = "bmad-node"
CGROUP_MOUNTS = Path("/sys/fs/cgroup")
CNI_NETWORK = "bmad-node"
KUBELET_PORT = 10250
NODE_CPU_SHARES = 8192
KUBE_ROUTER_HEALTH_PORT = 20244

# The kubelet sets these host-wide on start unless protectKernelDefaults; restored by stop.
KUBELET_SYSCTLS = (
    "vm.overcommit_memory",
    "vm.panic_on_oom",
    "kernel.panic",
    "kernel.panic_on_oops",
    "kernel.keys.root_maxkeys",
    "kernel.keys.root_maxbytes",
)
# Paths outside the run directory that these programs use whatever they are told.
SHARED_DIRS = (
    Path("/var/lib/kubelet"),
    Path("/var/log/containers"),
    Path("/var/lib/cni"),
    Path("/run/containerd"),
)
SHIM_SOCKETS = Path("/run/containerd/s")
HOST_STATE = "host-state.json"
PROCESS_NAMES = ("containerd", "kubelet", "kube-proxy", "kube-router")


class Paths:
    def __init__(self, run_dir: Path) -> None:
        self.root = run_dir / "node"
        self.containerd = self.root / "containerd"
        self.containerd_sock = self.containerd / "containerd.sock"
        self.kubelet = self.root / "kubelet"
        self.pod_logs = self.root / "pod-logs"
        self.cni_conf = self.root / "cni" / "net.d"
        self.cni_ipam = self.root / "cni" / "ipam"
        self.pki = run_dir / "pki"
        self.logs = run_dir / "logs"
        self.host_state = self.root / HOST_STATE


# --- host state: recorded before, restored after ---------------------------------------


def _read_sysctl(key: str) -> str | None:
    try:
        return Path("/proc/sys/" + key.replace(".", "/")).read_text().strip()
    except OSError:
        return None


def _record_host_state(paths: Paths) -> None:
    state = {
        "sysctls": {k: _read_sysctl(k) for k in KUBELET_SYSCTLS},
        "existed": [str(d) for d in SHARED_DIRS if d.exists()],
        "shim_sockets": sorted(p.name for p in SHIM_SOCKETS.glob("*")),
    }
    paths.host_state.write_text(json.dumps(state, indent=2))


def _restore_host_state(paths: Paths) -> None:
    try:
        state: dict[str, Any] = json.loads(paths.host_state.read_text())
    except (OSError, ValueError):
        return
    for key, value in state["sysctls"].items():
        if value is not None and _read_sysctl(key) != value:
            with contextlib.suppress(OSError):
                Path("/proc/sys/" + key.replace(".", "/")).write_text(value)
    for name in {p.name for p in SHIM_SOCKETS.glob("*")} - set(state["shim_sockets"]):
        with contextlib.suppress(OSError):
            (SHIM_SOCKETS / name).unlink()
    existed = set(state["existed"])
    results = Path("/var/lib/cni/results")
    for entry in results.glob(f"{CNI_NETWORK}-*"):
        entry.unlink(missing_ok=True)
    for link in Path("/var/log/containers").glob("*.log"):
        with contextlib.suppress(OSError):
            if link.is_symlink() and str(os.readlink(link)).startswith(str(paths.pod_logs)):
                link.unlink()
    for d in SHARED_DIRS:
        if str(d) not in existed and d.exists():
            _rmtree(d)


def _rmtree(path: Path) -> None:
    subprocess.run(["rm", "-rf", "--one-file-system", str(path)], check=False)


# --- cgroups -----------------------------------------------------------------------------


def _hierarchies() -> list[Path]:
    """Every mounted cgroup hierarchy (v1 controllers, the named systemd one, v2)."""
    found = []
    for line in Path("/proc/self/mounts").read_text().splitlines():
        fields = line.split()
        if fields[2] in ("cgroup", "cgroup2") and fields[1].startswith(str(CGROUP_MOUNTS)):
            found.append(Path(fields[1]))
    return found


def _make_cgroups() -> None:
    for hierarchy in _hierarchies():
        path = hierarchy / CGROUP_ROOT
        path.mkdir(exist_ok=True)
        # On a busy machine every host process outside a cgroup weighs 1024, as much as
        # the whole node: weigh the node like a few busy processes, or its pods starve
        # and miss their startup probes.
        if (path / "cpu.shares").exists():
            (path / "cpu.shares").write_text(str(NODE_CPU_SHARES))
        # A new v1 cpuset cgroup starts with no CPUs and no memory nodes.
        for knob in ("cpuset.cpus", "cpuset.mems"):
            if (path / knob).exists() and not (path / knob).read_text().strip():
                (path / knob).write_text((hierarchy / knob).read_text())


def _cgroup_dirs(root: Path) -> list[Path]:
    """Every cgroup below `root`, deepest first. os.walk shrugs off directories that
    vanish while it walks (runc and the kubelet remove cgroups as pods die)."""
    return [Path(d) for d, _, _ in os.walk(root, topdown=False)]


def _cgroup_pids() -> set[int]:
    pids: set[int] = set()
    for hierarchy in _hierarchies():
        for d in _cgroup_dirs(hierarchy / CGROUP_ROOT):
            with contextlib.suppress(OSError, ValueError):
                pids.update(int(p) for p in (d / "cgroup.procs").read_text().split())
    return pids


def _kill_pods() -> None:
    """SIGKILL every process in the node's cgroups (every container of every pod)."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        pids = _cgroup_pids()
        if not pids:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


def _remove_cgroups() -> None:
    for hierarchy in _hierarchies():
        for d in _cgroup_dirs(hierarchy / CGROUP_ROOT):
            with contextlib.suppress(OSError):
                d.rmdir()


# --- shims and mounts ----------------------------------------------------------------------


def _shim_pids(paths: Paths) -> list[int]:
    """containerd's shims for our containerd: their command line names its socket."""
    mine = str(paths.containerd_sock)
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if argv and argv[0].endswith(b"containerd-shim-runc-v2") and mine.encode() in argv:
            found.append(int(entry.name))
    return found


def _unmount_under(root: Path) -> None:
    """Lazily unmount everything mounted below `root`, deepest first."""
    prefix = str(root) + "/"
    for _ in range(3):
        mounts = []
        for line in Path("/proc/self/mountinfo").read_text().splitlines():
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(prefix):
                mounts.append(point)
        if not mounts:
            return
        for point in sorted(mounts, key=len, reverse=True):
            subprocess.run(["umount", "-l", point], capture_output=True, check=False)


# --- configuration files ---------------------------------------------------------------------


def _kubeconfig(path: Path, *, server: str, ca: Path, client: pki.CertPair) -> None:
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [
            {"name": "bmad", "cluster": {"server": server, "certificate-authority": str(ca)}}
        ],
        "users": [
            {
                "name": "u",
                "user": {"client-certificate": str(client.cert), "client-key": str(client.key)},
            }
        ],
        "contexts": [{"name": "bmad", "context": {"cluster": "bmad", "user": "u"}}],
        "current-context": "bmad",
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)


def containerd_config(paths: Paths, *, runc: Path, cni_bin: Path, sandbox_image: str) -> str:
    c = paths.containerd
    cri = '[plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{c / "root"}"
state = "{c / "state"}"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs",
  "io.containerd.tracing.processor.v1.otlp", "io.containerd.internal.v1.tracing"]

[grpc]
  address = "{paths.containerd_sock}"

[ttrpc]
  address = "{c / "containerd.sock.ttrpc"}"

[plugins]
  [plugins."io.containerd.internal.v1.opt"]
    path = "{c / "opt"}"
  {cri}]
    sandbox_image = "{sandbox_image}"
    # No CAP_SYS_RESOURCE in the bounding set here: runc may not lower oom_score_adj.
    restrict_oom_score_adj = true
    netns_mounts_under_state_dir = true
    disable_apparmor = true
    stream_server_address = "127.0.0.1"
    stream_server_port = "0"
    {cri}.containerd]
      snapshotter = "overlayfs"
      default_runtime_name = "runc"
      {cri}.containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        {cri}.containerd.runtimes.runc.options]
          BinaryName = "{runc}"
          Root = "{c / "runc"}"
          SystemdCgroup = false
    {cri}.cni]
      bin_dir = "{cni_bin}"
      conf_dir = "{paths.cni_conf}"
      max_conf_num = 1
    {cri}.registry]
      config_path = "{c / "certs.d"}"
"""


def cni_config(paths: Paths) -> dict[str, Any]:
    """The pods' network: a bridge with no gateway role, no masquerade, no default route;
    routes only to the Service range and to the host's end of the veth."""
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge",
                "bridge": nodenet.BRIDGE,
                "isGateway": False,
                "isDefaultGateway": False,
                "ipMasq": False,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local",
                    "dataDir": str(paths.cni_ipam),
                    "ranges": [
                        [
                            {
                                "subnet": nodenet.POD_NETWORK,
                                "rangeStart": "10.217.64.10",
                                "gateway": nodenet.BRIDGE_ADDRESS,
                            }
                        ]
                    ],
                    "routes": [
                        {"dst": nodenet.SERVICE_NETWORK, "gw": nodenet.BRIDGE_ADDRESS},
                        {"dst": nodenet.LINK_NETWORK, "gw": nodenet.BRIDGE_ADDRESS},
                    ],
                },
            }
        ],
    }


def kubelet_config(paths: Paths) -> dict[str, Any]:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "address": nodenet.NODE_ADDRESS,
        "port": KUBELET_PORT,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "healthzPort": 10248,
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": False},
            "x509": {"clientCAFile": str(paths.pki / "ca.crt")},
        },
        # Only holders of a certificate of the test bed's CA get past authentication.
        "authorization": {"mode": "AlwaysAllow"},
        "cgroupDriver": "cgroupfs",
        "cgroupRoot": "/" + CGROUP_ROOT,
        "failCgroupV1": False,
        "failSwapOn": False,
        "makeIPTablesUtilChains": False,
        "containerRuntimeEndpoint": f"unix://{paths.containerd_sock}",
        "podLogsDir": str(paths.pod_logs),
        "volumePluginDir": str(paths.root / "volume-plugins"),
        # No cluster DNS here: pods ask a nameserver on their own loopback, which does
        # not exist, so no name is ever resolved off this machine.
        "resolvConf": str(paths.root / "resolv.conf"),
        "clusterDNS": ["127.0.0.1"],
        "clusterDomain": "cluster.local",
        "serializeImagePulls": False,
        "evictionHard": {
            "memory.available": "100Mi",
            "nodefs.available": "1%",
            "imagefs.available": "1%",
        },
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "kubeAPIQPS": 50,
        "kubeAPIBurst": 100,
        "nodeStatusUpdateFrequency": "5s",
        "registerNode": True,
        "maxPods": 110,
        "staticPodPath": "",
        "shutdownGracePeriod": "0s",
    }


def kube_proxy_config(kubeconfig: Path) -> dict[str, Any]:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        "mode": "iptables",
        "clusterCIDR": nodenet.POD_NETWORK,
        "hostnameOverride": NODE_NAME,
        "bindAddress": nodenet.NODE_ADDRESS,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "nodePortAddresses": [f"{nodenet.NODE_ADDRESS}/32"],
        # Zeros leave the kernel's conntrack settings alone (some are host-wide).
        "conntrack": {
            "maxPerCore": 0,
            "min": 0,
            "tcpEstablishedTimeout": "0s",
            "tcpCloseWaitTimeout": "0s",
        },
        "iptables": {"localhostNodePorts": False, "masqueradeAll": False},
    }


# --- start ---------------------------------------------------------------------------------------


def _kubectl(kubectl: Path, kubeconfig: str, *args: str, stdin: str | None = None) -> str:
    proc = subprocess.run(
        [str(kubectl), f"--kubeconfig={kubeconfig}", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if proc.returncode != 0:
        raise procs.StartupError(f"kubectl {' '.join(args)} failed: {proc.stderr.strip()}")
    return proc.stdout


def _node_ready(kubectl: Path, kubeconfig: str) -> bool:
    out = subprocess.run(
        [str(kubectl), f"--kubeconfig={kubeconfig}", "get", "node", NODE_NAME, "-o", "json"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if out.returncode != 0:
        return False
    conditions = json.loads(out.stdout).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def _chain_present(table: str, chain: str) -> bool:
    return f":{chain} " in nodenet.iptables_rules(node=True, table=table)


def start(
    *,
    run_dir: Path,
    binaries: dict[str, Path],
    api_port: int,
    kubeconfig: str,
    records: list[procs.ProcRecord],
) -> dict[str, str]:
    """Start containerd, the kubelet, kube-proxy and kube-router in the node's namespace."""
    paths = Paths(run_dir)
    for d in (
        paths.root,
        paths.containerd,
        paths.kubelet,
        paths.pod_logs,
        paths.cni_conf,
        paths.cni_ipam,
    ):
        d.mkdir(parents=True, exist_ok=True)
    _record_host_state(paths)
    _make_cgroups()
    certs = pki.Pki(paths.pki)
    server = f"https://{nodenet.HOST_ADDRESS}:{api_port}"
    ca = certs.ca.cert
    kubelet_kc = paths.root / "kubelet.kubeconfig"
    _kubeconfig(
        kubelet_kc,
        server=server,
        ca=ca,
        client=certs.issue("kubelet", cn=f"system:node:{NODE_NAME}", org="system:nodes"),
    )
    proxy_kc = paths.root / "kube-proxy.kubeconfig"
    _kubeconfig(
        proxy_kc, server=server, ca=ca, client=certs.issue("kube-proxy", cn="system:kube-proxy")
    )
    # kube-router reads pods, namespaces, nodes and policies cluster-wide: test bed
    # infrastructure, like kwok, it acts as an administrator.
    router_kc = paths.root / "kube-router.kubeconfig"
    _kubeconfig(
        router_kc,
        server=server,
        ca=ca,
        client=certs.issue("kube-router", cn="bmad-kube-router", org="system:masters"),
    )
    kubectl = binaries["kubectl"]
    _kubectl(
        kubectl,
        kubeconfig,
        "apply",
        "-f",
        "-",
        stdin=json.dumps(
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "bmad-testbed-node"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "system:node",
                },
                "subjects": [
                    {
                        "apiGroup": "rbac.authorization.k8s.io",
                        "kind": "User",
                        "name": f"system:node:{NODE_NAME}",
                    }
                ],
            }
        ),
    )

    # containerd ---------------------------------------------------------------------
    pause = images.ensure_pause()
    conf = paths.containerd / "config.toml"
    conf.write_text(
        containerd_config(
            paths, runc=binaries["runc"], cni_bin=binaries["cni-bin"], sandbox_image=pause.ref
        )
    )
    path_env = {"PATH": f"{binaries['containerd'].parent}:/usr/sbin:/usr/bin:/sbin:/bin"}
    containerd = procs.spawn(
        "containerd",
        nodenet.in_node(str(binaries["containerd"]), f"--config={conf}"),
        log_dir=paths.logs,
        env=path_env,
    )
    records.append(containerd)
    procs.wait_until(
        containerd,
        lambda: (
            subprocess.run(
                [str(binaries["ctr"]), f"--address={paths.containerd_sock}", "version"],
                capture_output=True,
                check=False,
                timeout=10,
            ).returncode
            == 0
        ),
        timeout=60,
        what="serving",
    )
    images.import_archive(pause, ctr=binaries["ctr"], address=paths.containerd_sock)
    (paths.cni_conf / "10-bmad-node.conflist").write_text(json.dumps(cni_config(paths), indent=2))

    # kubelet ----------------------------------------------------------------------------
    (paths.root / "resolv.conf").write_text(
        "nameserver 127.0.0.1\noptions ndots:1 attempts:1 timeout:1\n"
    )
    kubelet_conf = paths.root / "kubelet.yaml"
    kubelet_conf.write_text(yaml.safe_dump(kubelet_config(paths), sort_keys=False))
    kubelet = procs.spawn(
        "kubelet",
        nodenet.in_node(
            str(binaries["kubelet"]),
            f"--config={kubelet_conf}",
            f"--kubeconfig={kubelet_kc}",
            f"--root-dir={paths.kubelet}",
            f"--cert-dir={paths.kubelet / 'pki'}",
            f"--hostname-override={NODE_NAME}",
            f"--node-ip={nodenet.NODE_ADDRESS}",
            f"--node-labels={NODE_LABEL}=real",
            "--v=1",
        ),
        log_dir=paths.logs,
        env=path_env,
    )
    records.append(kubelet)
    procs.wait_until(
        kubelet,
        lambda: _node_ready(kubectl, kubeconfig),
        timeout=120,
        what=f"registered and Ready (Node {NODE_NAME})",
    )

    # kube-proxy and kube-router ---------------------------------------------------------------
    proxy_conf = paths.root / "kube-proxy.yaml"
    proxy_conf.write_text(yaml.safe_dump(kube_proxy_config(proxy_kc), sort_keys=False))
    proxy = procs.spawn(
        "kube-proxy",
        nodenet.in_node(str(binaries["kube-proxy"]), f"--config={proxy_conf}", "--v=1"),
        log_dir=paths.logs,
        env=path_env,
    )
    records.append(proxy)
    router = procs.spawn(
        "kube-router",
        nodenet.in_node(
            str(binaries["kube-router"]),
            f"--kubeconfig={router_kc}",
            "--run-firewall=true",
            "--run-router=false",
            "--run-service-proxy=false",
            "--enable-cni=false",
            "--enable-ipv6=false",
            f"--hostname-override={NODE_NAME}",
            f"--service-cluster-ip-range={nodenet.SERVICE_NETWORK}",
            f"--health-port={KUBE_ROUTER_HEALTH_PORT}",
            "--metrics-port=0",
            "--iptables-sync-period=30s",
        ),
        log_dir=paths.logs,
        env=path_env,
    )
    records.append(router)
    procs.wait_until(
        proxy,
        lambda: _chain_present("nat", "KUBE-SERVICES"),
        timeout=60,
        what="programming Services",
    )
    procs.wait_until(
        router,
        lambda: _chain_present("filter", "KUBE-ROUTER-FORWARD"),
        timeout=60,
        what="enforcing NetworkPolicies",
    )
    return {
        "BMAD_NODE_NAME": NODE_NAME,
        "BMAD_NODE_HOST_ADDRESS": nodenet.HOST_ADDRESS,
        "BMAD_NODE_CONTAINERD": str(paths.containerd_sock),
        "BMAD_NODE_NETNS": nodenet.NETNS,
    }


def import_image(run_dir: Path, archive: images.Archive) -> None:
    ctr = build.debian_executable("ctr", build.NODE_DEBIAN_EXECUTABLES)
    images.import_archive(archive, ctr=ctr, address=Paths(run_dir).containerd_sock)


# --- stop ---------------------------------------------------------------------------------------


def stop(run_dir: Path, records: list[procs.ProcRecord]) -> list[str]:
    """Stop the node's processes and every pod, and undo what they did outside run_dir.

    The network namespace itself is removed by the caller once the control plane
    (which may still dial pods) is down; see `nodenet`.
    """
    paths = Paths(run_dir)
    by_name = {r["name"]: r for r in records if r["name"] in PROCESS_NAMES}
    stopped = []
    for name in ("kubelet", "kube-router", "kube-proxy"):
        rec = by_name.get(name)
        if rec is not None:
            if procs.is_alive(rec):
                stopped.append(name)
            procs.stop(rec)
    _kill_pods()
    for pid in _shim_pids(paths):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    rec = by_name.get("containerd")
    if rec is not None:
        if procs.is_alive(rec):
            stopped.append("containerd")
        procs.stop(rec)
    _kill_pods()
    _unmount_under(paths.root)
    _remove_cgroups()
    _restore_host_state(paths)
    return stopped
