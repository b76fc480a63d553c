from __future__ import annotations

import os
import shlex
import socket
import time
from pathlib import Path

import pytest

from bmad_testbed import netguard, procs, testbed

pytestmark = pytest.mark.unit


def test_stop_kills_the_whole_process_group(tmp_path: Path) -> None:
    # A parent that ignores SIGTERM and has a grandchild: both must be gone.
    script = "trap '' TERM; sleep 300 & sleep 300; wait"
    rec = procs.spawn("stubborn", ["bash", "-c", script], log_dir=tmp_path)
    procs.wait_until(
        rec, lambda: len(procs.group_members(rec["pid"])) >= 3, timeout=10, what="forked"
    )
    assert procs.is_alive(rec)
    procs.stop(rec, grace=0.5)
    assert not procs.is_alive(rec)
    assert procs.group_members(rec["pid"]) == []


def test_a_reused_pid_is_not_ours(tmp_path: Path) -> None:
    rec = procs.spawn("sleeper", ["sleep", "30"], log_dir=tmp_path)
    forged = procs.ProcRecord(
        name="x", pid=rec["pid"], start_time=rec["start_time"] + 1, log=rec["log"]
    )
    assert procs.is_alive(rec)
    assert not procs.is_alive(forged)
    procs.stop(forged)  # must not touch the real process
    assert procs.is_alive(rec)
    procs.stop(rec)
    assert not procs.is_alive(rec)


def test_wait_until_reports_an_early_exit_with_the_log(tmp_path: Path) -> None:
    rec = procs.spawn("crasher", ["bash", "-c", "echo boom-marker >&2; exit 3"], log_dir=tmp_path)
    with pytest.raises(procs.StartupError, match="boom-marker"):
        procs.wait_until(rec, lambda: False, timeout=10, what="ready")


def test_free_port_is_bindable() -> None:
    port = procs.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
    assert not procs.port_open(port)


def test_free_ports_are_never_ones_the_kernel_gives_outgoing_connections() -> None:
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    ports = [procs.free_port() for _ in range(200)]
    assert all(10_000 <= port < min(low, 30_000) for port in ports), ports
    assert len(set(ports)) == len(ports)  # none handed out twice


def test_a_port_taken_by_a_client_connection_is_not_handed_out() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        with socket.create_connection(server.getsockname()) as client:
            taken = client.getsockname()[1]  # the kernel's choice: an ephemeral port
            assert taken not in {procs.free_port() for _ in range(200)}


def test_env_lines_are_shell_safe() -> None:
    text = testbed.format_env({"A": "plain", "B": "has space'and quote"})
    env: dict[str, str] = {}
    for line in text.splitlines():
        key, value = line.split("=", 1)
        env[key] = shlex.split(value)[0]
    assert env == {"A": "plain", "B": "has space'and quote"}
    assert testbed.format_env({"A": "1"}, export=True) == "export A=1\n"


def test_own_kubeconfig_is_not_external(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    assert testbed.external_kubeconfig(tmp_path) is None
    monkeypatch.setenv("KUBECONFIG", "/home/me/.kube/kind")
    assert testbed.external_kubeconfig(tmp_path) == "/home/me/.kube/kind"
    monkeypatch.delenv("KUBECONFIG")
    assert testbed.external_kubeconfig(tmp_path) is None


def test_down_without_up_is_harmless(tmp_path: Path) -> None:
    assert testbed.down(directory=tmp_path / "nothing") == []


def test_network_guard_refuses_off_machine_addresses() -> None:
    # conftest installs the guard for the whole session.
    for target in [("192.0.2.10", 443), ("10.1.2.3", 80), ("8.8.8.8", 53)]:
        with socket.socket() as sock, pytest.raises(netguard.OffMachineConnectionError):
            sock.connect(target)
    with socket.socket() as sock, pytest.raises(netguard.OffMachineConnectionError):
        sock.connect(("example.com", 443))


def test_network_guard_allows_loopback() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        with socket.create_connection(server.getsockname(), timeout=2):
            pass


def test_spawned_processes_live_in_their_own_session(tmp_path: Path) -> None:
    rec = procs.spawn("sess", ["sleep", "30"], log_dir=tmp_path)
    try:
        assert os.getsid(rec["pid"]) == rec["pid"]
        assert os.getsid(rec["pid"]) != os.getsid(0)
    finally:
        procs.stop(rec)
    time.sleep(0)


def test_the_kubernetes_build_script_ships_inside_the_package() -> None:
    # `bmad testbed build` finds it through importlib.resources, in a wheel and in an
    # editable install alike; a cold machine depends on it.
    import subprocess
    from importlib import resources

    script = resources.files("bmad_testbed") / "scripts" / "build-kubernetes.sh"
    assert script.is_file()
    with resources.as_file(script) as path:
        assert subprocess.run(["bash", "-n", str(path)], check=False).returncode == 0
