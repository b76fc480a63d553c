"""Run the operator as a child process against the test bed (tests, demo, benchmarks).

A real process, started the way users start it (`bmad operator run`), so tests can
kill it with SIGKILL mid-work, restart it, read its log and its /metrics.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from bmad_testbed import procs

COMMAND = (sys.executable, "-m", "bmad_cli.main", "operator", "run")
# Every test bed service listens on loopback, which the egress policy of Integration
# checks refuses unless allowed (BMAD_OPERATOR_EGRESS_ALLOW).
EGRESS_ALLOW = "127.0.0.0/8,::1"


def loopback_env(
    *,
    kubeconfig: str,
    health_port: int,
    metrics_port: int,
    webhook_port: int,
    resync_seconds: float,
    workers: int | None = None,
    prometheus_url: str | None = None,
) -> dict[str, str]:
    """The operator's settings for a run on this machine: every port on 127.0.0.1."""
    env = {
        "KUBECONFIG": kubeconfig,
        "BMAD_OPERATOR_RESYNC_SECONDS": str(resync_seconds),
        "BMAD_OPERATOR_METRICS_PORT": str(metrics_port),
        "BMAD_OPERATOR_HEALTH_PORT": str(health_port),
        "BMAD_OPERATOR_BIND_ADDRESS": "127.0.0.1",
        "BMAD_OPERATOR_WEBHOOK_PORT": str(webhook_port),
        "BMAD_OPERATOR_WEBHOOK_HOST": "127.0.0.1",
        "BMAD_OPERATOR_WEBHOOK_ADDRESS": "127.0.0.1",
        "BMAD_OPERATOR_EGRESS_ALLOW": EGRESS_ALLOW,
        "PYTHONUNBUFFERED": "1",
    }
    if workers is not None:
        env["BMAD_OPERATOR_WORKERS"] = str(workers)
    if prometheus_url:
        # The autoscaler's Prometheus: the test bed's.
        env["BMAD_OPERATOR_PROMETHEUS_URL"] = prometheus_url
    return env


class OperatorProcess:
    def __init__(
        self,
        *,
        kubeconfig: str,
        log_path: Path,
        resync_seconds: float = 5.0,
        workers: int = 16,
        prometheus_url: str | None = None,
        extra_env: dict[str, str] | None = None,
        start_timeout: float = 60.0,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.prometheus_url = prometheus_url
        self.log_path = log_path
        self.resync_seconds = resync_seconds
        self.workers = workers
        self.extra_env = extra_env or {}
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen[bytes] | None = None
        self.metrics_port = 0
        self.health_port = 0
        self.webhook_port = 0

    def start(self) -> None:
        self.metrics_port = procs.free_port()
        self.health_port = procs.free_port()
        self.webhook_port = procs.free_port()
        env = dict(os.environ)
        env.update(
            loopback_env(
                kubeconfig=self.kubeconfig,
                health_port=self.health_port,
                metrics_port=self.metrics_port,
                webhook_port=self.webhook_port,
                resync_seconds=self.resync_seconds,
                workers=self.workers,
                prometheus_url=self.prometheus_url,
            )
        )
        env.update(self.extra_env)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        # Its temporary files (the webhook's key pair) beside its log, so that a process
        # the test SIGKILLs leaves nothing in the machine's /tmp.
        self.tmp_dir.mkdir(exist_ok=True)
        env["TMPDIR"] = str(self.tmp_dir)
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                list(COMMAND),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"the operator exited with {self.proc.returncode}:\n"
                    + procs.log_tail(self.log_path)
                )
            if self.healthy():
                return
            time.sleep(0.2)
        self.stop()  # never leave an operator behind that did not start in time
        raise RuntimeError(f"the operator did not answer /healthz within {self.start_timeout:g}s")

    def healthy(self) -> bool:
        try:
            return procs.http_ok(f"http://127.0.0.1:{self.health_port}/healthz")
        except OSError:
            return False

    def metrics(self) -> dict[str, float]:
        """The operator's /metrics as {'name{labels}': value}."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as resp:
            text = resp.read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                key, _, value = line.rpartition(" ")
                out[key] = float(value)
        return out

    def metric_sum(self, prefix: str) -> float:
        return sum(v for k, v in self.metrics().items() if k.startswith(prefix))

    def kill(self) -> None:
        """SIGKILL: no cleanup handlers, exactly like an OOM kill or a node loss."""
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    @property
    def tmp_dir(self) -> Path:
        """The process's TMPDIR."""
        return self.log_path.parent / f"{self.log_path.stem}-tmp"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""
