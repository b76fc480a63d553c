"""Fixtures of the operator's integration tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from bmad_testbed.kubectl import Kubectl

from .helpers import Tenants


@pytest.fixture
def tenants(kubectl: Kubectl, crds: list[str]) -> Iterator[Tenants]:
    """Uniquely named Tenants, deleted (with their namespaces) after the test."""
    t = Tenants(kubectl)
    try:
        yield t
    finally:
        t.cleanup()
