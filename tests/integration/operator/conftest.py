"""Fixtures of the operator's integration tests."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import pytest

from bmad_operator import kube
from bmad_testbed import databases
from bmad_testbed.kubectl import Kubectl
from bmad_testbed.operator_proc import OperatorProcess

from .helpers import Tenants, ledger_env


@pytest.fixture
def tenants(kubectl: Kubectl, crds: list[str]) -> Iterator[Tenants]:
    """Uniquely named Tenants, deleted (with their namespaces) after the test."""
    t = Tenants(kubectl)
    try:
        yield t
    finally:
        t.cleanup()


@pytest.fixture
async def ledger_dsn(postgres_url: str) -> AsyncIterator[str]:
    async with databases.temporary(postgres_url, "bmad_ledger") as url:
        yield url


StartOperator = Callable[..., OperatorProcess]


@pytest.fixture
def start_ledger_operator(  # noqa: PLR0917 - fixtures are positional
    no_other_operator: None,
    crds: list[str],
    operator_kubeconfig: str,
    testbed_env: dict[str, str],
    ledger_dsn: str,
    tmp_path: Path,
) -> Iterator[StartOperator]:
    """Starts the operator with the usage ledger configured (the test bed's Redis and a
    fresh PostgreSQL database, the totals read and reported every second), plus the
    settings given as keywords; every operator it started is stopped after the test."""
    started: list[OperatorProcess] = []

    def start(**more_env: str) -> OperatorProcess:
        proc = OperatorProcess(
            kubeconfig=operator_kubeconfig,
            log_path=tmp_path / "operator.log",
            extra_env={**ledger_env(testbed_env, ledger_dsn), **more_env},
        )
        started.append(proc)
        proc.start()
        return proc

    try:
        yield start
    finally:
        for proc in started:
            proc.stop()


@pytest.fixture
def metering_operator(start_ledger_operator: StartOperator) -> OperatorProcess:
    """The operator with the usage ledger configured and nothing else."""
    return start_ledger_operator()


@pytest.fixture
async def api(testbed_env: dict[str, str]) -> AsyncIterator[kube.Kube]:
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KUBECONFIG", testbed_env["KUBECONFIG"])
        client = await kube.Kube.connect()
    try:
        yield client
    finally:
        await client.close()


def _session_operator(request: pytest.FixtureRequest) -> OperatorProcess | None:
    """The session's operator if an earlier test started it (without starting it)."""
    defs = request._fixturemanager.getfixturedefs("operator", request.node) or ()
    for fixturedef in defs:
        cached = getattr(fixturedef, "cached_result", None)
        if cached and isinstance(cached[0], OperatorProcess):
            return cached[0]
    return None


@pytest.fixture
def no_other_operator(request: pytest.FixtureRequest) -> Iterator[None]:
    """The session's operator watches every namespace: it must not reconcile what a
    test's own operator process does (the HA replicas; an operator with the ledger,
    whose Tenant status the session's one, without payments, would write back). Stopped
    for the test, started again after."""
    running = _session_operator(request)
    if running is not None:
        running.stop()
    yield
    if running is not None:
        running.start()
