"""Run Agents' runtimes as processes on this machine, as their pods would run them.

For every Agent the operator renders a ConfigMap ``<agent>-config`` holding
``agent.json``, a Deployment whose container environment configures the runtime, and
a volume per bound Integration: its binding Secret ``<integration>-binding`` mounted
at ``$SERVICE_BINDING_ROOT/<integration>/``. On kwok nodes those pods "run" without
running anything. `start` reads what the operator rendered and starts
``bmad runtime`` with the same agent.json, the same environment (its port and the
paths moved to this machine) and the same bindings, as files; so a test or a
benchmark gets real consumers of each Agent's task stream, configured by the
operator, without a container runtime.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from bmad_testbed import procs
from bmad_testbed.kubectl import Kubectl, eventually

# The runtime's usage spool directory (bmad_crds.runtime_contract.USAGE_LEDGER_SPOOL):
# each runtime process the test bed starts gets one of its own.
SPOOL_ENV = "BMAD_USAGE_LEDGER_SPOOL"

COMMAND = (sys.executable, "-m", "bmad_cli.main", "runtime")


def launch(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    """``bmad runtime`` with exactly ``env``, its output appended to ``log``, in a
    process group of its own (so a SIGKILL of the group takes its children too)."""
    with log.open("ab") as out:
        return subprocess.Popen(
            list(COMMAND),
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )


@dataclass
class AgentProcess:
    """One replica of one Agent, as a child process."""

    agent: str
    replica: int
    url: str
    log: Path
    proc: subprocess.Popen[bytes]

    @property
    def consumer(self) -> str:
        """Its consumer name on the bus (the runtime uses host name and pid)."""
        import socket

        return f"{socket.gethostname()}-{self.proc.pid}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL: no graceful shutdown, exactly like an OOM kill or a lost node."""
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()


@dataclass(frozen=True)
class Rendered:
    """What the operator rendered for one Agent's pods."""

    agent_json: str
    env: dict[str, str]
    bindings: dict[str, dict[str, str]]


def rendered(kubectl: Kubectl, namespace: str, agent: str, *, timeout: float) -> Rendered:
    """agent.json, the container env and the bindings of ``agent``, once all exist."""

    def found() -> Rendered | None:
        body = kubectl.json("get", "agent", agent, "-n", namespace)
        config = kubectl.run(
            "get", "configmap", f"{agent}-config", "-n", namespace, "-o", "json", check=False
        )
        deployment = kubectl.run(
            "get", "deployment", agent, "-n", namespace, "-o", "json", check=False
        )
        if config.returncode or deployment.returncode:
            return None
        secrets: dict[str, dict[str, str]] = {}
        for integration in (body.get("spec") or {}).get("integrations") or []:
            secret = kubectl.run(
                "get",
                "secret",
                f"{integration}-binding",
                "-n",
                namespace,
                "-o",
                "json",
                check=False,
            )
            if secret.returncode:
                return None  # not published yet
            data = json.loads(secret.stdout).get("data") or {}
            secrets[integration] = {k: base64.b64decode(v).decode() for k, v in data.items()}
        [container] = json.loads(deployment.stdout)["spec"]["template"]["spec"]["containers"]
        return Rendered(
            agent_json=json.loads(config.stdout)["data"]["agent.json"],
            env={e["name"]: e["value"] for e in container.get("env") or [] if "value" in e},
            bindings=secrets,
        )

    result: Rendered = eventually(
        found, timeout=timeout, interval=0.5, what=f"what the operator renders for {agent}"
    )
    return result


def spawn(
    kubectl: Kubectl,
    namespace: str,
    agent: str,
    workdir: Path,
    *,
    replica: int = 0,
    extra_env: dict[str, str] | None = None,
    timeout: float = 120,
) -> AgentProcess:
    """Start one replica of ``agent`` (without waiting for it: see `wait_ready`)."""
    found = rendered(kubectl, namespace, agent, timeout=timeout)
    home = workdir / f"{agent}-{replica}"
    bindings_dir = home / "bindings"
    bindings_dir.mkdir(parents=True, exist_ok=True)
    for integration, data in found.bindings.items():
        folder = bindings_dir / integration
        folder.mkdir(exist_ok=True)
        for key, value in data.items():
            (folder / key).write_text(value)
    config = home / "agent.json"
    config.write_text(found.agent_json)
    port = procs.free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BMAD_") and k != "KUBECONFIG"}
    env.update(found.env)
    env.update(
        {
            "BMAD_AGENT_CONFIG": str(config),
            "SERVICE_BINDING_ROOT": str(bindings_dir),
            "BMAD_HTTP_HOST": "127.0.0.1",
            "BMAD_HTTP_PORT": str(port),
            # No auth0 Integration is bound in the test bed's agents.
            "BMAD_AUTH_ENABLED": "false",
            "PYTHONUNBUFFERED": "1",
        }
    )
    if SPOOL_ENV in env:
        # The usage spool in the replica's own emptyDir, as in its pod.
        env[SPOOL_ENV] = str(home / "usage-ledger")
    env.update(extra_env or {})
    log = home / "runtime.log"
    return AgentProcess(agent, replica, f"http://127.0.0.1:{port}", log, launch(env, log))


def wait_ready(running: AgentProcess, *, timeout: float = 120) -> AgentProcess:
    """Wait until the runtime answers /readyz (its task consumer then runs)."""
    deadline = time.monotonic() + timeout
    while True:
        if not running.alive():
            raise procs.StartupError(
                f"the runtime of Agent {running.agent} exited with "
                f"{running.proc.returncode}:\n" + procs.log_tail(running.log)
            )
        try:
            if procs.http_ok(f"{running.url}/readyz"):
                return running
        except OSError:
            pass
        if time.monotonic() > deadline:
            running.stop()
            raise procs.StartupError(
                f"the runtime of Agent {running.agent} was not ready within {timeout:g}s:\n"
                + procs.log_tail(running.log)
            )
        time.sleep(0.2)


def start(
    kubectl: Kubectl,
    namespace: str,
    agents: list[str],
    workdir: Path,
    *,
    timeout: float = 120,
) -> list[AgentProcess]:
    """One replica of each of ``agents``, started together, all ready."""
    spawned = [spawn(kubectl, namespace, agent, workdir, timeout=timeout) for agent in agents]
    try:
        return [wait_ready(one, timeout=timeout) for one in spawned]
    except Exception:
        for one in spawned:
            one.stop()
        raise
