"""`bmad runtime` processes with the usage spool (BMAD_USAGE_LEDGER_SPOOL), on the test
bed's real Redis: a record is kept in the spool before its answer leaves, so the
answers given while the ledger's Redis refuses the agent survive a SIGKILL of the
runtime and reach the ledger's stream, once each, from the runtime started next on the
same directory (as a container restarted in its pod, with its emptyDir); a runtime
stopped with SIGTERM ships what it kept before it exits."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis.asyncio as aioredis

from bmad_crds import runtime_contract as contract
from bmad_integrations.usage import acl, record
from bmad_testbed import agents, procs

pytestmark = pytest.mark.integration

AGENT = "analyst"


class Runtime:
    def __init__(self, proc: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.proc = proc
        self.url = url
        self.log = log

    def ask(self, n: int) -> int:
        answer = httpx.post(
            f"{self.url}/v1/invoke",
            json={"input": f"question {n}"},
            headers={"X-Request-Id": f"spool-{n}"},
            timeout=10,
        )
        return answer.status_code

    def signal(self, sig: signal.Signals) -> int:
        os.killpg(self.proc.pid, sig)
        return self.proc.wait(timeout=60)


@pytest.fixture
def runtimes(tmp_path: Path) -> Iterator[Callable[..., Runtime]]:
    started: list[Runtime] = []
    config = tmp_path / "agent.json"
    config.write_text(json.dumps({"role": "analyst", "model": {"provider": "echo", "name": "e"}}))
    (tmp_path / "bindings").mkdir()

    def start(namespace: str, ledger_url: str, password: str, spool: Path) -> Runtime:
        port = procs.free_port()
        base = {k: v for k, v in os.environ.items() if not k.startswith(("BMAD_", "OTEL_"))}
        env = {
            **base,
            contract.AGENT_NAME: AGENT,
            contract.AGENT_NAMESPACE: namespace,
            contract.AGENT_ROLE: "analyst",
            contract.TENANT: namespace,
            contract.AGENT_CONFIG: str(config),
            contract.SERVICE_BINDING_ROOT: str(tmp_path / "bindings"),
            contract.MEMORY_STORE: "inProcess",
            contract.AUTH_MODE: "none",
            contract.HTTP_PORT_ENV: str(port),
            "BMAD_HTTP_HOST": "127.0.0.1",
            contract.USAGE_LEDGER_URL: ledger_url,
            contract.USAGE_LEDGER_PASSWORD: password,
            contract.USAGE_LEDGER_SPOOL: str(spool),
        }
        log = tmp_path / f"runtime-{len(started)}.log"
        proc = agents.launch(env, log)
        running = agents.AgentProcess(AGENT, len(started), f"http://127.0.0.1:{port}", log, proc)
        runtime = Runtime(proc, running.url, log)
        started.append(runtime)
        agents.wait_ready(running, timeout=60)
        return runtime

    yield start
    for runtime in started:
        if runtime.proc.poll() is None:
            runtime.signal(signal.SIGKILL)


def plain(redis_url: str) -> str:
    parts = urllib.parse.urlsplit(redis_url)
    return urllib.parse.urlunsplit(parts._replace(netloc=f"{parts.hostname}:{parts.port}"))


async def stream_ids(admin: aioredis.Redis, namespace: str) -> list[str]:
    entries = await admin.xrange(record.stream_key(namespace, AGENT))
    return [fields["id"] for _, fields in entries]


async def until_ids(admin: aioredis.Redis, namespace: str, count: int) -> list[str]:
    """The stream's record ids once it holds ``count`` (and a moment later: no more)."""
    for _ in range(600):
        if len(await stream_ids(admin, namespace)) >= count:
            await asyncio.sleep(0.3)
            return await stream_ids(admin, namespace)
        await asyncio.sleep(0.05)
    raise AssertionError(f"the stream holds {len(await stream_ids(admin, namespace))} records")


async def test_answers_kept_in_the_spool_survive_a_sigkill_and_are_shipped_once_by_the_next(
    runtimes: Callable[..., Runtime],
    admin_redis: aioredis.Redis,
    redis_url: str,
    namespaces: Any,
    tmp_path: Path,
) -> None:
    namespace = namespaces.new("spool")
    password = acl.new_password()
    await acl.ensure_writer(
        admin_redis, namespace=namespace, agent=AGENT, password=password, tenant=namespace
    )
    spool_dir = tmp_path / "spool"
    first = runtimes(namespace, plain(redis_url), password, spool_dir)

    assert [first.ask(n) for n in range(5)] == [200] * 5
    shipped = await until_ids(admin_redis, namespace, 5)
    assert len(shipped) == 5

    # The ledger refuses the agent (its writer removed: Redis closes its connections).
    await acl.remove_writer(admin_redis, namespace=namespace, agent=AGENT)
    assert [first.ask(n) for n in range(5, 25)] == [200] * 20  # kept, not shipped
    assert len(await stream_ids(admin_redis, namespace)) == 5
    assert first.signal(signal.SIGKILL) == -signal.SIGKILL
    assert (spool_dir / "segment-0").exists()

    await acl.ensure_writer(
        admin_redis, namespace=namespace, agent=AGENT, password=password, tenant=namespace
    )
    second = runtimes(namespace, plain(redis_url), password, spool_dir)
    ids = await until_ids(admin_redis, namespace, 25)
    assert len(ids) == 25, ids
    assert len(set(ids)) == 25, "a record was shipped twice"
    assert set(shipped) < set(ids)
    assert "holds 20 records a previous process did not ship" in second.log.read_text()

    # A runtime stopped with SIGTERM ships what it kept before it exits: the next one
    # on the directory finds nothing.
    await acl.remove_writer(admin_redis, namespace=namespace, agent=AGENT)
    assert [second.ask(n) for n in range(25, 30)] == [200] * 5
    await acl.ensure_writer(
        admin_redis, namespace=namespace, agent=AGENT, password=password, tenant=namespace
    )
    # (uvicorn raises SIGTERM again once it has shut down: the process ends by it.)
    assert second.signal(signal.SIGTERM) in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in second.log.read_text()
    assert "could not be shipped" not in second.log.read_text()
    ids = await stream_ids(admin_redis, namespace)
    assert len(ids) == len(set(ids)) == 30
    third = runtimes(namespace, plain(redis_url), password, spool_dir)
    assert "did not ship" not in third.log.read_text()
    assert third.ask(30) == 200
    assert len(await until_ids(admin_redis, namespace, 31)) == 31
