"""429 with ``Retry-After``, end to end: two uvicorn processes, one limit in the real Redis.

Each server is this very file run as a script (``python <this file> <job>``): a small
FastAPI app whose one endpoint asks a `ratelimit.RedisLimiter` before answering, the
way the runtime's app does. The server binds its own loopback socket on a free port,
prints the port, and serves; the test spreads a burst over both servers, as a Service
spreads requests over an Agent's replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

pytestmark = pytest.mark.integration

URL_ENV = "BMAD_TEST_RATELIMIT_REDIS_URL"


class Server:
    """One uvicorn process of the test app, on a loopback port it chose itself."""

    def __init__(self, job: dict[str, Any], env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, json.dumps(job)],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline().strip()
        if not line.isdigit():
            self.stop()
            raise AssertionError(f"the server did not start: {line!r}")
        self.url = f"http://127.0.0.1:{line}"

    def wait_ready(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert self.proc.poll() is None, "the server exited"
            time.sleep(0.05)
        raise AssertionError(f"{self.url} did not become ready")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def servers(redis_url: str, clean_env: dict[str, str]) -> Iterator[list[Server]]:
    job = {
        "prefix": f"test-rl-http-{secrets.token_hex(4)}",
        "limits": {"requests_per_minute": 12, "tokens_per_minute": None},
    }
    env = {**clean_env, URL_ENV: redis_url}
    started: list[Server] = []
    try:
        for _ in range(2):
            started.append(Server(job, env))
        for server in started:
            server.wait_ready()
        yield started
    finally:
        for server in started:
            server.stop()


async def test_a_burst_over_two_replicas_gets_429_with_retry_after(
    servers: list[Server],
) -> None:
    async with httpx.AsyncClient(timeout=10) as http:
        responses = await asyncio.gather(
            *(http.post(f"{servers[n % 2].url}/v1/invoke", json={"input": "hi"}) for n in range(30))
        )
    by_server = {s.url: [r for r in responses if str(r.url).startswith(s.url)] for s in servers}
    ok = [r for r in responses if r.status_code == 200]
    limited = [r for r in responses if r.status_code == 429]
    assert len(ok) == 12  # the limit of the Agent, not of each replica
    assert len(limited) == 18
    assert all(len(answers) == 15 for answers in by_server.values())
    for response in limited:
        retry_after = response.headers["Retry-After"]
        assert retry_after.isdigit()
        assert 1 <= int(retry_after) <= 5  # one request every 5 s
        body = response.json()
        assert body["code"] == "rate_limited"
        assert "agent requests" in body["message"]
    # Both replicas turned callers away: neither had a budget of its own.
    assert all(any(r.status_code == 429 for r in answers) for answers in by_server.values())


# --- the server -----------------------------------------------------------------------------


def build_app(job: dict[str, Any]) -> Any:
    import fastapi
    import fastapi.responses
    import redis.asyncio as aioredis

    from bmad_runtime import ratelimit

    client = aioredis.Redis.from_url(os.environ[URL_ENV])
    limiter = ratelimit.RedisLimiter(client, key_prefix=job["prefix"], **job["limits"])
    app = fastapi.FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/invoke", response_model=None)
    async def invoke() -> dict[str, str] | fastapi.responses.JSONResponse:
        decision = await limiter.decide(tenant="acme", agent="dev")
        if decision.retry_after is not None:
            return fastapi.responses.JSONResponse(
                status_code=429,
                headers={"Retry-After": ratelimit.retry_after_header(decision.retry_after)},
                content={
                    "code": "rate_limited",
                    "message": f"the {decision.limited_by} budget is spent: retry after "
                    f"{decision.retry_after:.1f} s",
                },
            )
        return {"output": "hi"}

    return app


def main() -> None:
    import uvicorn

    parser = argparse.ArgumentParser(description="serve the rate-limited test app")
    parser.add_argument("job", help="the job as JSON")
    job = json.loads(parser.parse_args().job)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    print(sock.getsockname()[1], flush=True)
    config = uvicorn.Config(build_app(job), log_level="warning", lifespan="off")
    uvicorn.Server(config).run(sockets=[sock])


if __name__ == "__main__":
    main()
