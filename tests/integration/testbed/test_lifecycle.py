"""`bmad testbed up` then `bmad testbed down` leaves nothing of ours running."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from bmad_testbed import procs, testbed

pytestmark = pytest.mark.integration


def _ours(run_dir: Path) -> list[str]:
    """Command lines of live processes that mention the run directory."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and str(run_dir) in cmdline:
            found.append(f"{entry.name}: {cmdline}")
    return found


def test_up_then_down_leaves_no_process(tmp_path: Path, clean_env: dict[str, str]) -> None:
    run_dir = tmp_path / "tb"
    env = dict(clean_env, BMAD_TESTBED_DIR=str(run_dir))
    bmad = [sys.executable, "-m", "bmad_cli.main", "testbed"]
    up = subprocess.run(
        [*bmad, "up", "--nodes", "1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert up.returncode == 0, up.stderr
    printed = dict(line.split("=", 1) for line in up.stdout.splitlines() if "=" in line)
    assert printed["KUBECONFIG"].strip("'") == str(run_dir / "kubeconfig")
    for key in (
        "BMAD_POSTGRES_URL",
        "BMAD_POSTGRES_TLS_URL",
        "BMAD_REDIS_URL",
        "BMAD_REDIS_TLS_URL",
        "BMAD_SERVICES_CA",
        "BMAD_PROMETHEUS_URL",
        "BMAD_PUSHGATEWAY_URL",
        "BMAD_S3_ENDPOINT",
        "BMAD_STRIPE_API_BASE",
        "BMAD_SMTP_PORT",
    ):
        assert key in printed

    state = testbed.status(run_dir)
    assert state is not None
    names = {r["name"] for r in state["records"]}
    assert {
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kube-scheduler",
        "kwok",
        "postgres",
        "postgres-tls",
        "redis",
        "prometheus",
        "pushgateway",
        "minio",
        "stripe-mock",
        "smtp",
    } <= names
    assert all(state["alive"]), state
    # `up` has returned, yet everything keeps running in the background.
    pids = [r["pid"] for r in state["records"]]
    assert _ours(run_dir)

    down = subprocess.run(
        [*bmad, "down"], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert down.returncode == 0, down.stderr
    for rec in state["records"]:
        assert not procs.is_alive(rec), rec["name"]
        assert procs.group_members(rec["pid"]) == [], rec["name"]
    assert _ours(run_dir) == []
    assert not run_dir.exists()
    for pid in pids:
        assert not Path(f"/proc/{pid}/cmdline").exists() or not procs.is_alive(
            next(r for r in state["records"] if r["pid"] == pid)
        )
