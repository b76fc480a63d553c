"""Every test carries a marker the test command selects (tests/conftest.py)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.unit


def _conftest() -> Any:
    path = Path(__file__).resolve().parents[1] / "conftest.py"
    spec = importlib.util.spec_from_file_location("suite_conftest", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class _Item:
    def __init__(self, nodeid: str, *markers: str) -> None:
        self.nodeid = nodeid
        self.markers = markers

    def get_closest_marker(self, name: str) -> object | None:
        return name if name in self.markers else None


def test_a_test_without_a_suite_marker_is_named() -> None:
    conftest = _conftest()
    items = [_Item("a::marked", "unit"), _Item("b::bare"), _Item("c::only_realnode", "realnode")]
    assert conftest.unmarked(items) == ["b::bare", "c::only_realnode"]


def test_collection_refuses_unmarked_tests_with_what_to_change() -> None:
    conftest = _conftest()
    with pytest.raises(pytest.UsageError, match=r"pytestmark = pytest.mark.unit.*b::bare"):
        conftest.pytest_collection_modifyitems(None, [_Item("a::ok", "e2e"), _Item("b::bare")])
    conftest.pytest_collection_modifyitems(None, [_Item("a::ok", "integration")])
