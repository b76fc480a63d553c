"""Provision the test bed's binaries: build from the Go module proxy once, then cache.

No Docker and no registry here, so Kubernetes, kwok, stripe-mock and MinIO are built
from source with the local Go toolchain and kept under the cache directory by version:
a later run finds them and starts in seconds. The Go module and build caches are the
toolchain's own (GOMODCACHE, GOCACHE) and are kept between runs the same way.
The remaining servers come from Debian packages, installed by `scripts/bootstrap.sh`.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from importlib import resources
from pathlib import Path

KUBERNETES_VERSION = "1.33.13"
KWOK_VERSION = "v0.7.0"
STRIPE_MOCK_VERSION = "v0.203.0"
# MinIO publishes RELEASE tags, not semver, so the module proxy serves pseudo-versions.
MINIO_VERSION = "v0.0.0-20260212201848-7aac2a2c5b7c"

KUBE_BINARIES = ("kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
# The real node's Kubernetes parts, built the same way (and cached beside the above).
NODE_KUBE_BINARIES = ("kubelet", "kube-proxy")
# The NetworkPolicy enforcer of the real node (see docs/testbed.md for why this one).
KUBE_ROUTER_MODULE = "github.com/cloudnativelabs/kube-router/v2/cmd/kube-router"
KUBE_ROUTER_VERSION = "v2.1.0"

# Debian packages and the executables we need from each.
DEBIAN_EXECUTABLES = {
    "etcd-server": "/usr/bin/etcd",
    "redis-server": "/usr/bin/redis-server",
    "prometheus": "/usr/bin/prometheus",
    "prometheus-pushgateway": "/usr/bin/prometheus-pushgateway",
    "postgresql": "/usr/lib/postgresql/15/bin/postgres",
}

# The real node's parts that come from Debian packages: executable -> (package, path).
NODE_DEBIAN_EXECUTABLES = {
    "containerd": ("containerd", "/usr/bin/containerd"),
    "ctr": ("containerd", "/usr/bin/ctr"),
    "containerd-shim-runc-v2": ("containerd", "/usr/bin/containerd-shim-runc-v2"),
    "runc": ("runc", "/usr/sbin/runc"),
    "cni-bridge": ("containernetworking-plugins", "/usr/lib/cni/bridge"),
    "iptables": ("iptables", "/usr/sbin/iptables"),
    "iptables-save": ("iptables", "/usr/sbin/iptables-save"),
    "ipset": ("ipset", "/usr/sbin/ipset"),
    "conntrack": ("conntrack", "/usr/sbin/conntrack"),
    "nft": ("nftables", "/usr/sbin/nft"),
    "nsenter": ("util-linux", "/usr/bin/nsenter"),
    "ip": ("iproute2", "/usr/sbin/ip"),
    "gcc": ("gcc", "/usr/bin/gcc"),
}
# What builds the images (no Docker daemon, no registry): executable -> (package, path).
IMAGE_DEBIAN_EXECUTABLES = {
    "mmdebstrap": ("mmdebstrap", "/usr/bin/mmdebstrap"),
    "buildah": ("buildah", "/usr/bin/buildah"),
}


def cache_dir() -> Path:
    root = os.environ.get("BMAD_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bmad-testbed"
    )
    return Path(root)


def log(msg: str) -> None:
    print(f"[testbed] {msg}", file=sys.stderr, flush=True)


class BuildError(RuntimeError):
    pass


def _run_with_heartbeat(cmd: list[str], *, what: str, env: dict[str, str]) -> None:
    """Run a long build, echoing its output and a heartbeat so CI logs show progress."""
    started = time.monotonic()
    done = threading.Event()

    def beat() -> None:
        while not done.wait(30):
            log(f"still building {what} ({time.monotonic() - started:.0f}s)")

    t = threading.Thread(target=beat, daemon=True)
    t.start()
    try:
        proc = subprocess.run(cmd, env=env, check=False, stdin=subprocess.DEVNULL)
    finally:
        done.set()
    if proc.returncode != 0:
        raise BuildError(f"building {what} failed (exit {proc.returncode}): {' '.join(cmd)}")
    log(f"built {what} in {time.monotonic() - started:.0f}s")


def _go_env() -> dict[str, str]:
    if shutil.which("go") is None:
        raise BuildError("the Go toolchain is needed to build the test bed: install Go >= 1.24")
    env = dict(os.environ)
    env.setdefault("GONOSUMDB", "k8s.io,sigs.k8s.io")
    env["CGO_ENABLED"] = "0"
    env["GOFLAGS"] = "-buildvcs=false"
    return env


def _go_install(module: str, version: str, binary: str) -> Path:
    out = cache_dir() / "bin" / f"{binary}-{version}"
    target = out / binary
    if target.exists():
        return target
    out.mkdir(parents=True, exist_ok=True)
    env = _go_env()
    env["GOBIN"] = str(out)
    log(f"building {binary} {version} with go install (cached afterwards)")
    _run_with_heartbeat(
        ["go", "install", "-trimpath", "-ldflags=-s -w", f"{module}@{version}"],
        what=f"{binary} {version}",
        env=env,
    )
    if not target.exists():
        raise BuildError(f"go install of {module}@{version} produced no {binary}")
    return target


def _kube_from_assets(name: str) -> Path | None:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets:
        candidate = Path(assets) / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def _kubernetes(name: str, group: tuple[str, ...] = KUBE_BINARIES) -> Path:
    """One Kubernetes command; a miss builds every missing command of its `group` at once."""
    found = _kube_from_assets(name)
    if found:
        return found
    out = cache_dir() / "bin" / f"k8s-{KUBERNETES_VERSION}"
    target = out / name
    if target.exists():
        return target
    missing = [b for b in group if not (out / b).exists()]
    log(
        f"building Kubernetes {KUBERNETES_VERSION} ({', '.join(missing)}) from the Go module"
        " proxy; the first build on 2 cores takes 15-30 minutes, later runs use the cache"
    )
    script = resources.files("bmad_testbed") / "scripts" / "build-kubernetes.sh"
    with resources.as_file(script) as path:
        _run_with_heartbeat(
            ["bash", str(path), KUBERNETES_VERSION, str(out), *missing],
            what=f"Kubernetes {KUBERNETES_VERSION} ({', '.join(missing)})",
            env=_go_env(),
        )
    if not target.exists():
        raise BuildError(f"the Kubernetes build produced no {name}")
    return target


def _debian(package: str) -> Path:
    path = Path(DEBIAN_EXECUTABLES[package])
    if not path.exists():
        raise BuildError(
            f"{path} is missing: install the Debian package {package} "
            "(scripts/bootstrap.sh does it: sudo apt-get install -y " + package + ")"
        )
    return path


def debian_executable(name: str, table: dict[str, tuple[str, str]]) -> Path:
    package, path = table[name]
    found = Path(path)
    if not found.exists():
        raise BuildError(
            f"{found} is missing: install the Debian package {package} "
            f"(scripts/bootstrap.sh does it: sudo apt-get install -y {package})"
        )
    return found


def ensure_node() -> dict[str, Path]:
    """The real node: kubelet and kube-proxy (built), kube-router (built), Debian's parts."""
    found = {
        name: debian_executable(name, NODE_DEBIAN_EXECUTABLES) for name in NODE_DEBIAN_EXECUTABLES
    }
    found["cni-bin"] = found.pop("cni-bridge").parent
    for name in NODE_KUBE_BINARIES:
        found[name] = _kubernetes(name, NODE_KUBE_BINARIES)
    found["kube-router"] = _go_install(KUBE_ROUTER_MODULE, KUBE_ROUTER_VERSION, "kube-router")
    return found


def ensure_image_tools() -> dict[str, Path]:
    return {
        name: debian_executable(name, IMAGE_DEBIAN_EXECUTABLES) for name in IMAGE_DEBIAN_EXECUTABLES
    }


def ensure_control_plane() -> dict[str, Path]:
    etcd = _kube_from_assets("etcd") or _debian("etcd-server")
    return {
        "kube-apiserver": _kubernetes("kube-apiserver"),
        "kube-controller-manager": _kubernetes("kube-controller-manager"),
        "kube-scheduler": _kubernetes("kube-scheduler"),
        "kubectl": _kubernetes("kubectl"),
        "etcd": etcd,
        "kwok": _go_install("sigs.k8s.io/kwok/cmd/kwok", KWOK_VERSION, "kwok"),
    }


def ensure_services() -> dict[str, Path]:
    return {
        "stripe-mock": _go_install(
            "github.com/stripe/stripe-mock", STRIPE_MOCK_VERSION, "stripe-mock"
        ),
        "minio": _go_install("github.com/minio/minio", MINIO_VERSION, "minio"),
        "postgres": _debian("postgresql").parent,
        "redis-server": _debian("redis-server"),
        "prometheus": _debian("prometheus"),
        "pushgateway": _debian("prometheus-pushgateway"),
    }


def ensure_all() -> dict[str, Path]:
    found = ensure_control_plane()
    found.update(ensure_services())
    found.update(ensure_node())
    found.update(ensure_image_tools())
    return found
