"""Start detached server processes, wait for them, and stop them without leftovers.

`bmad testbed up` returns to the shell while the servers keep running, so every
server is started in its own session (its own process group) and recorded with its
pid *and* its start time: a pid alone may be reused by an unrelated process after a
reboot, and `down` must never signal something that is not ours.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TypedDict


class ProcRecord(TypedDict):
    """What `down` needs to find and stop one started server."""

    name: str
    pid: int
    start_time: int
    log: str


class StartupError(RuntimeError):
    """A server did not come up; the message names it and ends with its log tail."""


# Chosen ports lie below the kernel's ephemeral range (the local ports it gives outgoing
# connections) and below Kubernetes' NodePorts (30000-32767). A port the kernel chose
# (bind to 0) is in the ephemeral range: between the moment it is chosen and the moment a
# starting server binds it, seconds later, any client connecting anywhere may be given
# it as its local port, and the server fails with "address already in use" (seen once:
# an operator started by the test suite, 2026-12-01).
_PORT_FLOOR = 10_000
_PORT_CEILING = 30_000
_handed_out: set[int] = set()


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32_768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now, outside the range the
    kernel hands to outgoing connections, and not handed out before by this process."""
    ceiling = min(_ephemeral_floor(), _PORT_CEILING)
    for _ in range(500 if ceiling > _PORT_FLOOR else 0):
        port = random.randrange(_PORT_FLOOR, ceiling)  # noqa: S311 - a port, not a secret
        if port in _handed_out:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:  # a crowded machine
        sock.bind(("127.0.0.1", 0))
        chosen: int = sock.getsockname()[1]
        _handed_out.add(chosen)
        return chosen


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def http_ok(url: str, *, timeout: float = 2) -> bool:
    """Whether a loopback HTTP endpoint answers 200 (errors propagate: "not yet")."""
    with urllib.request.urlopen(url, timeout=timeout) as resp:  # noqa: S310 - loopback http
        return bool(resp.status == 200)


def proc_start_time(pid: int) -> int | None:
    """The start time of a process in clock ticks since boot (field 22 of stat)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after it.
    fields = raw[raw.rindex(")") + 2 :].split()
    return int(fields[19])


def is_alive(rec: ProcRecord) -> bool:
    started = proc_start_time(rec["pid"])
    if started is None or started != rec["start_time"]:
        return False
    # A zombie is dead for our purposes.
    try:
        state = Path(f"/proc/{rec['pid']}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def log_tail(path: str | Path, lines: int = 30) -> str:
    try:
        text = Path(path).read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def spawn(
    name: str,
    args: Sequence[str],
    *,
    log_dir: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
) -> ProcRecord:
    """Start `args` detached from our session, output appended to `<log_dir>/<name>.log`."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log_path = log_dir / f"{name}.log"
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(args),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
            close_fds=True,
        )
    started = proc_start_time(proc.pid)
    # Popen keeps a handle; we do not wait on it (the child outlives us), so make sure
    # Python does not warn about it being still running at interpreter exit.
    proc.returncode = 0
    return ProcRecord(name=name, pid=proc.pid, start_time=started or 0, log=str(log_path))


def wait_until(
    rec: ProcRecord,
    check: Callable[[], bool],
    *,
    timeout: float,
    what: str,
) -> None:
    """Poll `check` until it holds; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(rec):
            _reap(rec["pid"])
            raise StartupError(
                f"{rec['name']} exited before it was {what}; log {rec['log']}:\n"
                + log_tail(rec["log"])
            )
        try:
            if check():
                return
        except Exception:  # noqa: S110 - any failure of a probe means "not yet"
            pass
        time.sleep(0.2)
    raise StartupError(
        f"{rec['name']} was not {what} within {timeout:.0f}s; log {rec['log']}:\n"
        + log_tail(rec["log"])
    )


def _reap(pid: int) -> None:
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def stop(rec: ProcRecord, *, grace: float = 10.0) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left after `grace`."""
    if not is_alive(rec):
        _reap(rec["pid"])
        return
    pgid = rec["pid"]  # spawn() made each server a session (and group) leader
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        _reap(rec["pid"])
        if not is_alive(rec) and not _group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    for _ in range(50):
        _reap(rec["pid"])
        if not _group_alive(pgid):
            return
        time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is still in process group `pgid`."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def group_members(pgid: int) -> list[int]:
    """Pids of live processes in process group `pgid` (used by tests of `down`)."""
    found: list[int] = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "stat").read_text()
        except OSError:
            continue
        fields = raw[raw.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[2]) == pgid:
            found.append(int(entry.name))
    return found
