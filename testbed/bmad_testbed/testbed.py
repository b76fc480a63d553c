"""`up` and `down` for the whole test bed, and the state that links them.

`up` starts every server detached, waits until each one answers, records pid and
start time of each in `state.json`, and returns the KEY=value pairs that locate them.
`down` stops exactly the recorded processes (never by name) and removes the data.
If `KUBECONFIG` already points at someone else's cluster (kind, k3d, a real one),
no control plane is started and that cluster is used as it is.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import shutil
import sys
import time
import typing
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from bmad_testbed import build, cluster, images, node, nodenet, operator_proc, procs, services

STATE_FILE = "state.json"
ENV_FILE = "env"


def run_dir() -> Path:
    default = f"/tmp/bmad-testbed-{os.getuid()}"  # noqa: S108 - per-user, chmod'ed by up()
    return Path(os.environ.get("BMAD_TESTBED_DIR") or default)


def _load_state(directory: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads((directory / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return data


def _save_state(directory: Path, state: Mapping[str, Any]) -> None:
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.chmod(0o600)
    tmp.replace(directory / STATE_FILE)
    env_file = directory / ENV_FILE
    env_file.write_text(format_env(state.get("env", {})))
    env_file.chmod(0o600)


def format_env(env: Mapping[str, str], *, export: bool = False) -> str:
    prefix = "export " if export else ""
    return "".join(f"{prefix}{k}={shlex.quote(v)}\n" for k, v in env.items())


def status(directory: Path | None = None) -> dict[str, Any] | None:
    """The running test bed's state, or None when nothing of ours is up."""
    directory = directory or run_dir()
    state = _load_state(directory)
    if not state:
        return None
    alive = [procs.is_alive(r) for r in state["records"]]
    state["alive"] = alive
    return state


def _own_kubeconfig(directory: Path) -> str:
    return str(directory / "kubeconfig")


def external_kubeconfig(directory: Path) -> str | None:
    """The user's KUBECONFIG, unless it is unset or is the one this test bed wrote."""
    kc = os.environ.get("KUBECONFIG")
    if not kc or os.path.abspath(kc) == os.path.abspath(_own_kubeconfig(directory)):
        return None
    return kc


# The env keys whose ports the relay opens to the real node's pods (see `relay`).
RELAYED_PORTS = (
    "BMAD_APISERVER_PORT",
    "BMAD_POSTGRES_PORT",
    "BMAD_REDIS_PORT",
    "BMAD_S3_ENDPOINT",
    "BMAD_PROMETHEUS_URL",
    "BMAD_PUSHGATEWAY_URL",
    "BMAD_STRIPE_API_BASE",
    "BMAD_SMTP_PORT",
)


def relayed_ports(env: Mapping[str, str]) -> list[int]:
    ports = []
    for key in RELAYED_PORTS:
        value = env.get(key)
        if value:
            ports.append(int(value.rsplit(":", 1)[-1].split("/")[0]))
    return ports


def up(
    *,
    with_cluster: bool = True,
    with_services: Iterable[str] = services.ALL_SERVICES,
    nodes: int = 3,
    real_node: bool = False,
    directory: Path | None = None,
) -> dict[str, str]:
    """Start what is asked for (or reuse what already runs) and return its env."""
    directory = directory or run_dir()
    wanted = list(with_services)
    unknown = sorted(set(wanted) - set(services.ALL_SERVICES))
    if unknown:
        raise ValueError(
            f"unknown service(s) {', '.join(unknown)}; choose from "
            + ", ".join(services.ALL_SERVICES)
        )
    current = status(directory)
    if current and all(current["alive"]):
        have = set(current.get("services", []))
        if (
            set(wanted) <= have
            and (not with_cluster or current.get("cluster"))
            and (not real_node or current.get("real_node"))
        ):
            env: dict[str, str] = current["env"]
            return env
    if current:
        # Something of ours is half up (a crash, a reboot): start clean.
        down(directory=directory)

    # Build (or find in the cache) everything before starting anything.
    external = external_kubeconfig(directory)
    binaries: dict[str, Path] = {}
    if with_cluster and not external:
        binaries.update(build.ensure_control_plane())
    elif with_cluster:
        build.log(f"using the cluster of KUBECONFIG={external}; not starting a control plane")
    if wanted:
        binaries.update(build.ensure_services())
    if real_node:
        if external or not with_cluster:
            raise ValueError("--real-node joins the test bed's own control plane: unset KUBECONFIG")
        binaries.update(build.ensure_node())
        images.ensure_pause()
        remove_stale_node()

    directory.mkdir(parents=True, exist_ok=True)
    # PostgreSQL runs as its own user when we are root: it must traverse this folder.
    directory.chmod(0o755)
    records: list[procs.ProcRecord] = []
    env = {"BMAD_TESTBED_DIR": str(directory)}
    state: dict[str, Any] = {
        "records": records,
        "env": env,
        "cluster": bool(with_cluster),
        "services": wanted,
        "real_node": real_node,
        "started": time.time(),
    }
    try:
        if real_node:
            build.log(f"making the real node's network namespace {nodenet.NETNS}")
            _save_state(directory, state)
            nodenet.create(directory)
        if with_cluster and not external:
            build.log("starting etcd, kube-apiserver, controller-manager, scheduler and kwok")
            env.update(
                cluster.start(
                    run_dir=directory,
                    binaries=binaries,
                    nodes=nodes,
                    records=records,
                    real_node=real_node,
                    kwok_taint=node.KWOK_TAINT if real_node else None,
                )
            )
            kubectl = binaries["kubectl"]
            bin_dir = directory / "bin"
            bin_dir.mkdir(exist_ok=True)
            link = bin_dir / "kubectl"
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to(kubectl)
            env["BMAD_KUBECTL"] = str(link)
            env["BMAD_KWOK_NODES"] = str(nodes)
        elif with_cluster and external:
            env["KUBECONFIG"] = external
            found = build._kube_from_assets("kubectl") or shutil.which("kubectl")
            if found is None:
                found = build.ensure_control_plane()["kubectl"]
            env["BMAD_KUBECTL"] = str(found)
        for name in wanted:
            build.log(f"starting {name}")
            env.update(services.STARTERS[name](directory, binaries, records))
            _save_state(directory, state)
        if real_node:
            _start_real_node(directory, binaries, env, records)
            _save_state(directory, state)
    except BaseException:
        _save_state(directory, state)
        down(directory=directory)
        raise
    _save_state(directory, state)
    return env


def _start_real_node(
    directory: Path,
    binaries: dict[str, Path],
    env: dict[str, str],
    records: list[procs.ProcRecord],
) -> None:
    ports = relayed_ports(env)
    build.log(
        f"relaying ports {', '.join(map(str, ports))} from {nodenet.HOST_ADDRESS} to loopback"
    )
    relay = procs.spawn(
        "relay",
        [sys.executable, "-m", "bmad_testbed.relay", nodenet.HOST_ADDRESS, *map(str, ports)],
        log_dir=directory / "logs",
    )
    records.append(relay)
    procs.wait_until(
        relay,
        lambda: all(procs.port_open(p, nodenet.HOST_ADDRESS) for p in ports),
        timeout=30,
        what="listening",
    )
    build.log(
        f"starting the real node {node.NODE_NAME}: containerd, kubelet, kube-proxy, kube-router"
    )
    env.update(
        node.start(
            run_dir=directory,
            binaries=binaries,
            api_port=int(env["BMAD_APISERVER_PORT"]),
            kubeconfig=env["KUBECONFIG"],
            records=records,
        )
    )


def remove_stale_node() -> None:
    """Clean up a real node whose test bed no longer runs (its processes were killed,
    say with the session that started them): its namespace, mounts and cgroups stay
    behind and would block every later `up --real-node` on this machine."""
    if not nodenet.exists():
        return
    previous = nodenet.owner()
    if previous:
        state = status(Path(previous))
        if state and any(state["alive"]):
            return  # a live test bed: nodenet.create refuses, naming it
    build.log(f"removing a real node left behind by {previous or 'an unknown test bed'}")
    if previous:
        node.stop(Path(previous), [])
        shutil.rmtree(node.Paths(Path(previous)).root, ignore_errors=True)
    nodenet.delete_links()
    nodenet.remove_fallback_route()


def load_image(*, directory: Path | None = None, repo: Path) -> images.Archive:
    """Build (or find) the project's image and import it into the running real node."""
    directory = directory or run_dir()
    state = _load_state(directory)
    if not state or not state.get("real_node"):
        raise procs.StartupError(
            "no real node runs in this test bed: start it with `bmad testbed up --real-node`"
        )
    archive = images.ensure_project_image(repo)
    node.import_image(directory, archive)
    return archive


def start_operator(
    *, kubeconfig: str, directory: Path | None = None, resync_seconds: float = 30.0
) -> procs.ProcRecord:
    """Start `bmad operator run` detached and record it, so `down` stops it too."""
    directory = directory or run_dir()
    state = _load_state(directory)
    if state is None:
        raise procs.StartupError("the test bed is not up: run `bmad testbed up` first")
    for rec in state["records"]:
        if rec["name"] == "bmad-operator" and procs.is_alive(rec):
            return typing.cast(procs.ProcRecord, rec)
    health, metrics_port = procs.free_port(), procs.free_port()
    rec = procs.spawn(
        "bmad-operator",
        operator_proc.COMMAND,
        log_dir=directory / "logs",
        env=operator_proc.loopback_env(
            kubeconfig=kubeconfig,
            health_port=health,
            metrics_port=metrics_port,
            webhook_port=procs.free_port(),
            resync_seconds=resync_seconds,
            prometheus_url=state["env"].get("BMAD_PROMETHEUS_URL"),
        ),
    )
    state["records"].append(rec)
    state["env"]["BMAD_OPERATOR_METRICS_URL"] = f"http://127.0.0.1:{metrics_port}/metrics"
    _save_state(directory, state)
    procs.wait_until(
        rec,
        lambda: procs.http_ok(f"http://127.0.0.1:{health}/healthz"),
        timeout=60,
        what="healthy (/healthz)",
    )
    return rec


class Stopped(typing.NamedTuple):
    """A recorded server stopped by `stop_server`: what `start_again` needs."""

    name: str
    args: list[str]
    log_dir: Path


def stop_server(name: str, *, directory: Path | None = None) -> Stopped:
    """Stop one running server of the test bed, keeping its data and its record.

    For tests of what happens while a service is down (Prometheus stopped mid-run):
    `start_again` starts the same command line again, on the same port and data.
    """
    directory = directory or run_dir()
    state = _load_state(directory)
    found = [r for r in (state or {}).get("records", []) if r["name"] == name]
    if not found or not procs.is_alive(found[-1]):
        raise procs.StartupError(f"the test bed runs no {name}")
    rec = found[-1]
    raw = Path(f"/proc/{rec['pid']}/cmdline").read_bytes()
    args = [part.decode() for part in raw.split(b"\0") if part]
    procs.stop(rec)
    return Stopped(name, args, Path(rec["log"]).parent)


def start_again(
    stopped: Stopped,
    *,
    ready: Callable[[], bool],
    directory: Path | None = None,
    timeout: float = 60,
) -> procs.ProcRecord:
    """Start a server `stop_server` stopped, record it in place of the old one, and
    wait until `ready()`."""
    directory = directory or run_dir()
    rec = procs.spawn(stopped.name, stopped.args, log_dir=stopped.log_dir)
    state = _load_state(directory)
    if state is not None:
        state["records"] = [rec if r["name"] == stopped.name else r for r in state["records"]]
        _save_state(directory, state)
    procs.wait_until(rec, ready, timeout=timeout, what="ready")
    return rec


def down(*, directory: Path | None = None, keep_data: bool = False) -> list[str]:
    """Stop every process `up` recorded; return the names of those that were running."""
    directory = directory or run_dir()
    state = _load_state(directory)
    stopped: list[str] = []
    if state:
        # Never touch a real node that another test bed owns (one runs per machine).
        own_node = bool(state.get("real_node")) and nodenet.owned_by(directory)
        if own_node:
            # The pods and the node's processes first, while the apiserver still answers.
            try:
                stopped += node.stop(directory, state["records"])
            except Exception as exc:  # stop the rest whatever happened
                build.log(f"cleaning up the real node failed ({exc!r}); stopping the rest")
        # Reverse order: kwok and controllers before the apiserver, the apiserver before etcd.
        for rec in reversed(state["records"]):
            if procs.is_alive(rec):
                stopped.append(rec["name"])
            procs.stop(rec)
        pg_data = state.get("env", {}).get("BMAD_POSTGRES_DATA")
        if pg_data and not keep_data and Path(pg_data).parent.name.startswith("bmad-pg-"):
            shutil.rmtree(Path(pg_data).parent, ignore_errors=True)
        if own_node:
            # Only now: the apiserver may have dialled pods until it stopped.
            nodenet.delete_links()
            nodenet.remove_fallback_route()
        (directory / STATE_FILE).unlink(missing_ok=True)
        (directory / ENV_FILE).unlink(missing_ok=True)
    if not keep_data and directory.exists():
        shutil.rmtree(directory, ignore_errors=True)
    return stopped
