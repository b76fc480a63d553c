"""The README's main-job command, end to end, on a control plane of its own."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from bmad_testbed import testbed

pytestmark = pytest.mark.e2e

REPO = Path(__file__).resolve().parents[2]
ROLES = ("analyst", "pm", "architect", "ux-expert", "po", "sm", "dev", "qa")


def test_demo_brings_up_the_operator_and_every_sample_agent_ready(
    tmp_path: Path, clean_env: dict[str, str]
) -> None:
    run_dir = Path(f"/tmp/bmad-e2e-{tmp_path.name}")
    env = dict(clean_env, BMAD_TESTBED_DIR=str(run_dir))
    try:
        proc = subprocess.run(
            ["bash", str(REPO / "scripts" / "demo.sh")],
            env=env,
            capture_output=True,
            text=True,
            timeout=900,
            check=False,
            cwd=REPO,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        rows = [line.split() for line in proc.stdout.splitlines()]
        assert rows[0][:6] == ["NAME", "ROLE", "MODEL", "READY-REPLICAS", "DESIRED", "READY"]
        agents = {r[0]: r for r in rows[1:]}
        assert sorted(agents) == sorted(ROLES)
        for name, row in agents.items():
            assert row[1] == name  # each sample plays its own role
            assert row[3:6] == ["1", "1", "True"], row
        state = testbed.status(run_dir)
        assert state is not None
        assert any(r["name"] == "bmad-operator" for r in state["records"])
        assert all(state["alive"])
    finally:
        down = subprocess.run(
            [str(REPO / ".venv" / "bin" / "bmad"), "testbed", "down"],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
    assert down.returncode == 0, down.stderr
    assert "bmad-operator" in down.stderr
    assert not run_dir.exists()
