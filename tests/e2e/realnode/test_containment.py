"""Network containment of the real node, read from routes and netfilter rules.

Nothing here sends a packet: containment is shown by what the kernel would do. The
node's namespace and its pods have no default route and no route outside the test
bed's range; the host does not forward (so even a packet that reached it from a pod
could go nowhere else); the host routes the test bed's range only into the node's
namespace (or nowhere); no NAT rule anywhere points outside that range.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from typing import Any

import pytest

from bmad_testbed import kubectl as kubectl_mod
from bmad_testbed import nodenet, relay, testbed

from .helpers import RealNode

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]

RANGE = ipaddress.ip_network(nodenet.NETWORK)
ALLOWED_IN_NODE = [
    ipaddress.ip_network(n)
    for n in (nodenet.LINK_NETWORK, nodenet.POD_NETWORK, nodenet.SERVICE_NETWORK)
]


def _dst(route: dict[str, Any]) -> str:
    return str(route.get("dst", ""))


def _within(net: ipaddress.IPv4Network | ipaddress.IPv6Network, allowed: list[Any]) -> bool:
    return any(net.version == a.version and net.subnet_of(a) for a in allowed)


def test_the_node_namespace_routes_only_the_test_beds_range(installed: RealNode) -> None:
    for route in nodenet.routes(node=True):
        dst = _dst(route)
        assert dst != "default", route
        if (
            route.get("type") in ("local", "broadcast", "multicast")
            or route.get("table") == "local"
        ):
            continue  # the namespace's own addresses
        net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
        assert _within(net, ALLOWED_IN_NODE), route
    assert nodenet.sysctl("net.ipv6.conf.all.disable_ipv6", node=True) == "1"
    # Only the loopback, the veth to the host, the pods' bridge and the pods' veths on it.
    for link in nodenet.links(node=True):
        name = link["ifname"]
        if name in ("lo", nodenet.NODE_IF, nodenet.BRIDGE):
            continue
        assert link.get("master") == nodenet.BRIDGE, link


def test_the_host_forwards_nothing_and_routes_the_range_only_into_the_node(
    installed: RealNode,
) -> None:
    assert nodenet.sysctl("net.ipv4.ip_forward", node=False) == "0"
    assert nodenet.sysctl(f"net.ipv4.conf.{nodenet.HOST_IF}.forwarding", node=False) == "0"
    seen = set()
    for route in nodenet.routes(node=False):
        dst = _dst(route)
        if dst in ("", "default") or ":" in dst:
            assert (
                route.get("dev") != nodenet.HOST_IF
                or route.get("table") == "local"
                or (":" in dst and dst.startswith("fe80"))
            ), route
            continue
        net = ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False)
        if not net.overlaps(RANGE):
            assert route.get("dev") != nodenet.HOST_IF, route
            continue
        seen.add((dst, route.get("type", "unicast")))
        if route.get("type") == "unreachable":
            assert dst == nodenet.NETWORK
        elif route.get("table") != "local":
            assert route["dev"] == nodenet.HOST_IF, route
            assert route.get("gateway") in (None, nodenet.NODE_ADDRESS), route
    assert (nodenet.NETWORK, "unreachable") in seen
    assert (nodenet.POD_NETWORK, "unicast") in seen


def _nat_targets(rules: str) -> list[str]:
    return re.findall(r"--to-(?:destination|source) (\S+)", rules)


def test_no_nat_rule_leads_outside_the_range(installed: RealNode) -> None:
    node_nat = nodenet.iptables_rules(node=True, table="nat")
    assert "KUBE-SERVICES" in node_nat  # kube-proxy is programming this namespace
    for target in _nat_targets(node_nat):
        address = ipaddress.ip_address(target.rsplit(":", 1)[0])
        assert address in RANGE, target
    # Masquerading in the node's namespace can only rewrite toward its own links: it has
    # no route off the machine (checked above).
    for line in node_nat.splitlines():
        if "MASQUERADE" in line or "SNAT" in line:
            assert line.startswith("-A KUBE-"), line
    # The host: no rule of ours at all.
    host_rules = nodenet.ruleset(node=False)
    assert "10.217." not in host_rules
    assert "bmad-" not in host_rules


def _pod_routes(kubectl: kubectl_mod.Kubectl, pod: str, ns: str) -> list[tuple[str, str]]:
    table = kubectl.out("exec", pod, "-n", ns, "--", "cat", "/proc/net/route")
    routes = []
    for line in table.splitlines()[1:]:
        fields = line.split()
        dst = socket.inet_ntoa(struct.pack("<L", int(fields[1], 16)))
        mask = socket.inet_ntoa(struct.pack("<L", int(fields[7], 16)))
        routes.append((str(ipaddress.ip_network(f"{dst}/{mask}")), fields[0]))
    return routes


def test_pods_route_only_to_the_pod_service_and_host_networks(installed: RealNode) -> None:
    kubectl = installed.kubectl
    pods = kubectl.json(
        "get", "pods", "-n", "bmad-demo", "-l", "app.kubernetes.io/instance=analyst"
    )
    pod = pods["items"][0]["metadata"]["name"]
    routes = _pod_routes(kubectl, pod, "bmad-demo")
    assert "0.0.0.0/0" not in [dst for dst, _ in routes]
    assert sorted(dst for dst, _ in routes) == sorted(
        [nodenet.LINK_NETWORK, nodenet.POD_NETWORK, nodenet.SERVICE_NETWORK]
    )


def test_the_relay_only_connects_to_loopback(installed: RealNode) -> None:
    assert relay.TARGET == "127.0.0.1"
    state = testbed.status(installed.directory)
    assert state is not None
    [rec] = [r for r in state["records"] if r["name"] == "relay"]
    argv = open(f"/proc/{rec['pid']}/cmdline", "rb").read().split(b"\0")  # noqa: SIM115
    assert nodenet.HOST_ADDRESS.encode() in argv
