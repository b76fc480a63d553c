"""The real node's network: a network namespace of its own, joined to the host by a veth.

Containment is the point of this module. The kubelet, containerd, kube-proxy, the
NetworkPolicy enforcer and the pods' bridge all live in the network namespace
`bmad-node`; the only link out of it is a veth pair to the host, with an address on
each end. Inside, there is no default route: routes exist only for the pod subnet (on
the bridge), the Service range and the host's end of the veth. On the host, the pod and
Service ranges are routed into the namespace, everything else of `NETWORK` is
unreachable, and forwarding stays off (`net.ipv4.ip_forward` is per namespace: it is
on inside the node's namespace, where it routes between the veth and the bridge, and 0
on the host), so no packet from a pod can be forwarded anywhere by the host. Pods
reach the test bed's servers at `HOST_ADDRESS`, where `relay` listens for them.

All addresses are constants: there is one real node per machine.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import subprocess
from pathlib import Path
from typing import Any

NETNS = "bmad-node"
NETNS_PATH = Path("/run/netns") / NETNS
HOST_IF = "bmad-host0"
NODE_IF = "bmad-node0"
BRIDGE = "bmad-br0"

NETWORK = "10.217.0.0/16"
LINK_NETWORK = "10.217.0.0/30"
HOST_ADDRESS = "10.217.0.1"
NODE_ADDRESS = "10.217.0.2"
POD_NETWORK = "10.217.64.0/20"
BRIDGE_ADDRESS = "10.217.64.1"
SERVICE_NETWORK = "10.217.128.0/20"
# The first address of the Service range: the `kubernetes` Service's ClusterIP.
KUBERNETES_SERVICE_ADDRESS = "10.217.128.1"
# Below the metric of any real route: the fallback once the veth is gone.
UNREACHABLE_METRIC = 4000

# Written while the node's network exists: which test bed owns it.
OWNER_FILE = Path("/run") / "bmad-testbed-node.json"


class NetworkError(RuntimeError):
    """The node's network could not be made (or someone else's is in the way)."""


def _run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(list(args), capture_output=True, text=True, check=False, timeout=60)
    if check and proc.returncode != 0:
        raise NetworkError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def in_node(*args: str) -> list[str]:
    """A command line that runs `args` in the node's network namespace (and only that:
    the mount namespace stays the host's, so the kubelet and containerd see each
    other's mounts)."""
    return ["nsenter", f"--net={NETNS_PATH}", "--", *args]


def exists() -> bool:
    return NETNS_PATH.exists()


def owner() -> str | None:
    try:
        data: dict[str, Any] = json.loads(OWNER_FILE.read_text())
    except (OSError, ValueError):
        return None
    return str(data.get("run_dir", "")) or None


def owned_by(run_dir: Path) -> bool:
    """Whether the node's network (if any) is the one the test bed in `run_dir` made."""
    return owner() == str(run_dir)


def _overlapping_host_routes() -> list[str]:
    ours = ipaddress.ip_network(NETWORK)
    out = json.loads(_run("ip", "-j", "-4", "route", "show", "table", "all").stdout or "[]")
    clash = []
    for route in out:
        dst = route.get("dst", "")
        if dst in ("", "default") or route.get("type") in ("local", "broadcast"):
            continue
        if route.get("type") == "unreachable" and dst == NETWORK:
            continue  # our own fallback, left by a test bed that did not finish `down`
        try:
            net = ipaddress.ip_network(dst, strict=False)
        except ValueError:
            continue
        if net.overlaps(ours):
            clash.append(f"{dst} dev {route.get('dev', '?')}")
    return clash


def _write_sysctl_in_node(key: str, value: str) -> None:
    # /proc/sys/net shows the namespace of the process that reads it.
    path = "/proc/sys/" + key.replace(".", "/")
    _run(*in_node("sh", "-c", f"echo {value} > {path}"))


def create(run_dir: Path) -> None:
    """Make the namespace, the veth, the bridge and the routes; refuse if one exists."""
    if exists():
        who = owner()
        raise NetworkError(
            f"a real node already runs on this machine (network namespace {NETNS}"
            + (f", test bed {who}" if who else "")
            + "): only one can run per machine; stop it with `bmad testbed down` "
            "(BMAD_TESTBED_DIR set to its run directory)"
        )
    clash = _overlapping_host_routes()
    if clash:
        raise NetworkError(
            f"the host already routes part of {NETWORK}, which the real node needs: "
            + ", ".join(clash)
        )
    OWNER_FILE.write_text(json.dumps({"run_dir": str(run_dir)}))
    remove_fallback_route(keep_owner=True)
    try:
        _run("ip", "netns", "add", NETNS)
        _run("ip", "link", "add", HOST_IF, "type", "veth", "peer", "name", NODE_IF, "netns", NETNS)
        # IPv4 only on the host's end too (the setting goes away with the link).
        Path(f"/proc/sys/net/ipv6/conf/{HOST_IF}/disable_ipv6").write_text("1")
        _run("ip", "addr", "add", f"{HOST_ADDRESS}/30", "dev", HOST_IF)
        _run("ip", "link", "set", HOST_IF, "up")
        node = ("ip", "-n", NETNS)
        # IPv4 only: no link-local IPv6 routes either, nothing to reason about there.
        _write_sysctl_in_node("net.ipv6.conf.all.disable_ipv6", "1")
        _write_sysctl_in_node("net.ipv6.conf.default.disable_ipv6", "1")
        _run(*node, "link", "set", "lo", "up")
        _run(*node, "addr", "add", f"{NODE_ADDRESS}/30", "dev", NODE_IF)
        _run(*node, "link", "set", NODE_IF, "up")
        _run(*node, "link", "add", BRIDGE, "type", "bridge")
        prefix = POD_NETWORK.split("/")[1]
        _run(*node, "addr", "add", f"{BRIDGE_ADDRESS}/{prefix}", "dev", BRIDGE)
        _run(*node, "link", "set", BRIDGE, "up")
        # Locally made packets to a ClusterIP need a route before kube-proxy's DNAT
        # (in OUTPUT) rewrites them; the Service range has no other route here.
        _run(*node, "route", "add", SERVICE_NETWORK, "dev", BRIDGE, "src", BRIDGE_ADDRESS)
        _write_sysctl_in_node("net.ipv4.ip_forward", "1")
        # Pod-to-pod traffic on the bridge must pass iptables, or replies from a
        # Service's backend are never un-NATed and NetworkPolicies never see it.
        _write_sysctl_in_node("net.bridge.bridge-nf-call-iptables", "1")
        _run("ip", "route", "add", POD_NETWORK, "via", NODE_ADDRESS, "dev", HOST_IF)
        _run("ip", "route", "add", SERVICE_NETWORK, "via", NODE_ADDRESS, "dev", HOST_IF)
        _run(
            "ip", "route", "add", "unreachable", NETWORK, "metric", str(UNREACHABLE_METRIC)
        )  # fmt: skip
    except BaseException:
        delete_links()
        remove_fallback_route()
        raise


def delete_links() -> None:
    """Remove the namespace (and with it the veth, the bridge and the routes through them)."""
    if exists():
        _run("ip", "netns", "delete", NETNS, check=False)
    with contextlib.suppress(FileNotFoundError):
        # A leftover host end (the namespace went away some other way).
        if Path(f"/sys/class/net/{HOST_IF}").exists():
            _run("ip", "link", "delete", HOST_IF, check=False)


def remove_fallback_route(*, keep_owner: bool = False) -> None:
    """Last of all, once nothing of the test bed can send to NETWORK any more."""
    _run(
        "ip", "route", "del", "unreachable", NETWORK, "metric", str(UNREACHABLE_METRIC), check=False
    )
    if not keep_owner:
        OWNER_FILE.unlink(missing_ok=True)


# --- what the containment test reads ------------------------------------------------


def routes(*, node: bool) -> list[dict[str, Any]]:
    """Every IPv4 and IPv6 route of every table, of the host or of the node's namespace."""
    base = ("ip", "-n", NETNS) if node else ("ip",)
    found: list[dict[str, Any]] = []
    for family in ("-4", "-6"):
        out = _run(*base, "-j", family, "route", "show", "table", "all").stdout
        found.extend(json.loads(out or "[]"))
    return found


def links(*, node: bool) -> list[dict[str, Any]]:
    base = ("ip", "-n", NETNS) if node else ("ip",)
    found: list[dict[str, Any]] = json.loads(_run(*base, "-j", "link", "show").stdout or "[]")
    return found


def sysctl(key: str, *, node: bool) -> str:
    path = "/proc/sys/" + key.replace(".", "/")
    if node:
        return _run(*in_node("cat", path)).stdout.strip()
    return Path(path).read_text().strip()


def ruleset(*, node: bool) -> str:
    """The netfilter rules, as nft prints them (iptables-nft rules included)."""
    cmd = ("nft", "list", "ruleset")
    return _run(*(in_node(*cmd) if node else cmd)).stdout


def iptables_rules(*, node: bool, table: str) -> str:
    cmd = ("iptables-save", "-t", table)
    return _run(*(in_node(*cmd) if node else cmd)).stdout
