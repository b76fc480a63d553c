"""The test bed's replica mirror: a scale still running in its worker thread when the
mirror exits starts no process (it would outlive the test); the spool directory it gives
each replica is in the variable the runtime reads."""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest

from bmad_testbed import agents, runtimes

pytestmark = pytest.mark.unit


class NoApi:
    async def get(self, kind: str, namespace: str | None, name: str) -> None:
        return None


def test_a_scale_waiting_when_the_mirror_closes_starts_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(agents, "COMMAND", (sys.executable, "-c", "import time; time.sleep(60)"))
    mirror = runtimes.ReplicaMirror(NoApi(), "ns", "dev", workdir=tmp_path, targets_dir=tmp_path)
    with mirror._scaling:  # a scale in flight holds the lock
        late = threading.Thread(target=mirror._scale_to, args=(2, {}))
        late.start()
        mirror._closed = True  # what __aexit__ sets before its own scale to zero
    late.join(timeout=30)
    try:
        assert not late.is_alive()
        assert mirror.started == 0
        assert mirror.history == [0]
    finally:
        mirror._closed = False
        mirror._scale_to(0, None)


def test_the_spool_variable_the_test_bed_moves_is_the_runtimes() -> None:
    from bmad_crds import runtime_contract

    assert agents.SPOOL_ENV == runtime_contract.USAGE_LEDGER_SPOOL
