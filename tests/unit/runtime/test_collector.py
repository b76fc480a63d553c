"""The runtime process's garbage-collector set-up (`bmad_runtime.collector`)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from typing import Any

import pytest

from bmad_runtime import collector, main

pytestmark = pytest.mark.unit


@pytest.fixture(autouse=True)
def _restore_collector() -> Iterator[None]:
    saved = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*saved)


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_tune_freezes_what_exists_and_sets_the_young_threshold() -> None:
    gc.unfreeze()
    _, middle, old = gc.get_threshold()
    assert collector.tune(5_000) is True
    assert gc.get_threshold() == (5_000, middle, old)
    assert gc.get_freeze_count() > 1_000  # at least this test process's modules


def test_cycles_made_after_tune_are_still_freed() -> None:
    collector.tune(5_000)
    cycle = _Cycle()
    gone = weakref.ref(cycle)
    del cycle
    gc.collect()
    assert gone() is None


def test_zero_keeps_pythons_settings() -> None:
    gc.unfreeze()
    before = gc.get_threshold()
    assert collector.tune(0) is False
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0


def test_a_negative_threshold_is_refused() -> None:
    with pytest.raises(ValueError, match="0"):
        collector.tune(-1)


def test_the_runtime_entry_point_tunes_before_it_serves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}

    def serve(app: str, **kwargs: Any) -> None:
        seen["app"] = app
        seen["threshold"] = gc.get_threshold()[0]
        seen["frozen"] = gc.get_freeze_count()

    gc.unfreeze()
    monkeypatch.setattr(main.uvicorn, "run", serve)
    monkeypatch.setenv("BMAD_GC_YOUNG_THRESHOLD", "4321")
    main.run()
    assert seen["app"] == "bmad_runtime.wiring:create_default_app"
    assert seen["threshold"] == 4321
    assert seen["frozen"] > 1_000


def test_the_runtime_entry_point_keeps_pythons_settings_when_told(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    seen: dict[str, Any] = {}
    gc.unfreeze()
    before = gc.get_threshold()
    monkeypatch.setattr(
        main.uvicorn, "run", lambda app, **kw: seen.update(threshold=gc.get_threshold())
    )
    monkeypatch.setenv("BMAD_GC_YOUNG_THRESHOLD", "0")
    main.run()
    assert seen["threshold"] == before
    assert gc.get_freeze_count() == 0
