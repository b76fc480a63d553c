"""The real node's configuration, as rendered: contained, and kept inside the run dir."""

from __future__ import annotations

import ipaddress
import json
import tarfile
from pathlib import Path

import pytest

from bmad_testbed import images, node, nodenet

pytestmark = pytest.mark.unit


def test_the_addresses_fit_inside_the_test_beds_range() -> None:
    whole = ipaddress.ip_network(nodenet.NETWORK)
    parts = [
        ipaddress.ip_network(n)
        for n in (nodenet.LINK_NETWORK, nodenet.POD_NETWORK, nodenet.SERVICE_NETWORK)
    ]
    for part in parts:
        assert part.subnet_of(whole)
    for i, a in enumerate(parts):
        for b in parts[i + 1 :]:
            assert not a.overlaps(b)
    link = ipaddress.ip_network(nodenet.LINK_NETWORK)
    assert ipaddress.ip_address(nodenet.HOST_ADDRESS) in link
    assert ipaddress.ip_address(nodenet.NODE_ADDRESS) in link
    assert ipaddress.ip_address(nodenet.BRIDGE_ADDRESS) in parts[1]
    assert ipaddress.ip_address(nodenet.KUBERNETES_SERVICE_ADDRESS) == next(parts[2].hosts())


def test_pods_get_no_gateway_no_masquerade_and_no_default_route(tmp_path: Path) -> None:
    conf = node.cni_config(node.Paths(tmp_path))
    [bridge] = conf["plugins"]
    assert bridge["type"] == "bridge"
    assert bridge["bridge"] == nodenet.BRIDGE
    assert bridge["isGateway"] is False
    assert bridge["isDefaultGateway"] is False
    assert bridge["ipMasq"] is False
    routes = [r["dst"] for r in bridge["ipam"]["routes"]]
    assert sorted(routes) == sorted([nodenet.SERVICE_NETWORK, nodenet.LINK_NETWORK])
    assert "0.0.0.0/0" not in routes
    assert bridge["ipam"]["dataDir"].startswith(str(tmp_path))


def test_kubelet_and_containerd_keep_their_state_in_the_run_dir(tmp_path: Path) -> None:
    paths = node.Paths(tmp_path)
    kubelet = node.kubelet_config(paths)
    for key in ("podLogsDir", "volumePluginDir", "resolvConf"):
        assert kubelet[key].startswith(str(tmp_path)), key
    assert kubelet["containerRuntimeEndpoint"] == f"unix://{paths.containerd_sock}"
    assert kubelet["address"] == nodenet.NODE_ADDRESS
    assert kubelet["readOnlyPort"] == 0
    assert kubelet["authentication"]["anonymous"]["enabled"] is False
    assert kubelet["cgroupRoot"] == "/" + node.CGROUP_ROOT
    assert kubelet["clusterDNS"] == ["127.0.0.1"]

    toml = node.containerd_config(
        paths, runc=Path("/usr/sbin/runc"), cni_bin=Path("/usr/lib/cni"), sandbox_image="x/p:1"
    )
    for line in toml.splitlines():
        if '= "/' in line and "BinaryName" not in line and "bin_dir" not in line:
            assert str(tmp_path) in line, line
    assert "restrict_oom_score_adj = true" in toml
    assert "netns_mounts_under_state_dir = true" in toml
    assert 'sandbox_image = "x/p:1"' in toml


def test_kube_proxy_leaves_host_wide_conntrack_settings_alone(tmp_path: Path) -> None:
    conf = node.kube_proxy_config(tmp_path / "kc")
    assert conf["conntrack"]["maxPerCore"] == 0
    assert conf["conntrack"]["min"] == 0
    assert conf["iptables"]["localhostNodePorts"] is False
    assert conf["clusterCIDR"] == nodenet.POD_NETWORK
    assert conf["nodePortAddresses"] == [f"{nodenet.NODE_ADDRESS}/32"]


def test_oci_archive_is_a_layout_containerd_can_import(tmp_path: Path) -> None:
    archive = tmp_path / "img.tar"
    images.write_oci_archive(
        archive,
        ref="docker.io/bmad-testbed/pause:abc",
        files={"pause": (b"\x7fELF...", 0o755)},
        config={"Entrypoint": ["/pause"]},
    )
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        index = json.load(tar.extractfile("index.json"))  # type: ignore[arg-type]
        [desc] = index["manifests"]
        digest = desc["digest"].split(":")[1]
        manifest = json.load(tar.extractfile(f"blobs/sha256/{digest}"))  # type: ignore[arg-type]
        layer = tar.extractfile("blobs/sha256/" + manifest["layers"][0]["digest"].split(":")[1])
        assert layer is not None
        with tarfile.open(fileobj=layer) as inner:
            [member] = inner.getmembers()
    assert "oci-layout" in names
    assert desc["annotations"]["io.containerd.image.name"] == "docker.io/bmad-testbed/pause:abc"
    assert member.name == "pause"
    assert member.mode == 0o755


def test_the_image_inputs_follow_the_dockerfile_and_dockerignore(tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(
        "FROM x AS b\nCOPY pyproject.toml README.md ./\nCOPY src/ src/\n"
        "FROM x\nCOPY --from=b /opt /opt\n"
    )
    (tmp_path / ".dockerignore").write_text("**/__pycache__\n**/*.pyc\ndocs\n")
    for rel in ("pyproject.toml", "README.md", "src/a.py", "src/__pycache__/a.pyc", "docs/x.md"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(rel)
    found = [p.relative_to(tmp_path).as_posix() for p in images.context_files(tmp_path)]
    assert found == [".dockerignore", "Dockerfile", "README.md", "pyproject.toml", "src/a.py"]
