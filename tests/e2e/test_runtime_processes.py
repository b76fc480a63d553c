"""Two real `bmad runtime` processes sharing PostgreSQL and Redis: a conversation
started on one continues on the other, as it would across agent pods."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from bmad_integrations import taskbus
from bmad_testbed import procs
from bmad_testbed.kubectl import eventually

pytestmark = pytest.mark.e2e

RATE_LIMIT = 6


@pytest.fixture
def runtimes(tmp_path: Path, postgres_url: str, redis_url: str) -> Iterator[list[str]]:
    config = tmp_path / "agent.json"
    config.write_text(
        json.dumps(
            {
                "role": "pm",
                "persona": {"name": "John", "title": "Product Manager"},
                "model": {"provider": "echo", "name": "echo-1"},
                # Shared by both processes through Redis (one bucket per tenant and agent).
                "limits": {"requestsPerMinute": RATE_LIMIT},
            }
        )
    )
    bindings = tmp_path / "bindings"
    bindings.mkdir()
    suffix = secrets.token_hex(3)
    base_env = {k: v for k, v in os.environ.items() if not k.startswith("BMAD_")}
    started: list[subprocess.Popen[bytes]] = []
    urls: list[str] = []
    try:
        for i in range(2):
            port = procs.free_port()
            env = dict(
                base_env,
                BMAD_AGENT_NAME=f"pm-{suffix}",
                BMAD_AGENT_NAMESPACE=f"acme-{suffix}",
                BMAD_AGENT_ROLE="pm",
                BMAD_AGENT_CONFIG=str(config),
                SERVICE_BINDING_ROOT=str(bindings),
                BMAD_HTTP_HOST="127.0.0.1",
                BMAD_HTTP_PORT=str(port),
                BMAD_POSTGRES_DSN=postgres_url,
                BMAD_REDIS_URL=redis_url,
                BMAD_AUTH_MODE="none",
            )
            log = (tmp_path / f"runtime-{i}.log").open("wb")
            started.append(
                subprocess.Popen(
                    [sys.executable, "-m", "bmad_cli.main", "runtime"],
                    env=env,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                )
            )
            urls.append(f"http://127.0.0.1:{port}")
        for url, proc in zip(urls, started, strict=True):

            def ready(url: str = url, proc: subprocess.Popen[bytes] = proc) -> bool:
                assert proc.poll() is None, "the runtime exited"
                try:
                    return httpx.get(f"{url}/readyz", timeout=2).status_code == 200
                except httpx.HTTPError:
                    return False

            eventually(ready, timeout=60, what=f"{url}/readyz")
        urls.append(f"pm-{suffix}")  # the agent
        urls.append(f"acme-{suffix}")  # its tenant (the namespace)
        yield urls
    finally:
        for proc in started:
            proc.terminate()
        for proc in started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()


def test_a_conversation_continues_on_a_second_runtime_process(runtimes: list[str]) -> None:
    first, second = runtimes[:2]
    answer = httpx.post(f"{first}/v1/invoke", json={"input": "Draft the brief"}, timeout=30)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert "Draft the brief" in body["output"]
    assert body["model"] == "echo-1"
    assert body["usage"]["tokensIn"] > 0
    assert body["usage"]["tokensOut"] > 0
    conversation = body["conversationId"]

    follow = httpx.post(
        f"{second}/v1/invoke",
        json={"input": "Now the epics", "conversationId": conversation},
        timeout=30,
    )
    assert follow.status_code == 200, follow.text
    assert follow.json()["conversationId"] == conversation

    messages = httpx.get(f"{second}/v1/conversations/{conversation}/messages", timeout=10)
    assert messages.status_code == 200, messages.text
    items = messages.json()
    items = items.get("messages", items) if isinstance(items, dict) else items
    contents = [m["content"] for m in items]
    assert contents[0] == "Draft the brief"  # the first process's turn, seen by the second
    assert "Now the epics" in contents
    assert len(contents) == 4


async def test_a_task_on_the_bus_is_answered_by_a_runtime_process(
    runtimes: list[str], redis_url: str
) -> None:
    first, _, agent, tenant = runtimes
    # The producer any submitter uses (the operator's workflow engine among them).
    producer = taskbus.TaskProducer.from_url(redis_url, tenant=tenant, agent=agent)
    try:
        await producer.submit("task-1", {"input": "Shard the PRD"})
        result = await producer.wait_result("task-1", timeout_s=30)
    finally:
        await producer.aclose()
    assert result is not None
    assert result.status == "succeeded", result
    assert result.output is not None
    assert "Shard the PRD" in result.output["output"]
    assert result.output["usage"]["tokensOut"] > 0
    async with httpx.AsyncClient(timeout=10) as client:
        metrics = (await client.get(f"{first}/metrics")).text
    assert "bmad_agent_queue_depth" in metrics


async def test_a_burst_over_the_limit_gets_429_with_the_limit_shared_by_both_processes(
    runtimes: list[str],
) -> None:
    first, second = runtimes[:2]
    async with httpx.AsyncClient(timeout=30) as client:
        answers = [
            await client.post(f"{url}/v1/invoke", json={"input": f"burst {i}"})
            for i, url in enumerate([first, second] * 7)
        ]
    ok = [a for a in answers if a.status_code == 200]
    limited = [a for a in answers if a.status_code == 429]
    assert len(ok) == RATE_LIMIT  # one budget for the agent, whichever replica is asked
    assert len(limited) == len(answers) - RATE_LIMIT
    assert [a for a in answers[1::2] if a.status_code == 429]  # the second refuses too
    for answer in limited:
        assert int(answer.headers["Retry-After"]) >= 1
        error = answer.json()["error"]
        assert error["code"] == "rate_limited"
        assert error["message"]
