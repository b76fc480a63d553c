"""Benchmark: the agent runtime's POST /v1/invoke (echo model, in-process store, auth off)
against a bare FastAPI endpoint under the same uvicorn settings → requests/s, p50, p99.

The difference is what the runtime itself costs per request: middlewares (request id,
security headers, metrics, a span), validation, context assembly, the model router,
storing two turns, a usage record and an audit entry.

Run on demand (not in CI); loopback only, bounded by --seconds and --max-requests:

    .venv/bin/python bench/runtime.py --write docs/benchmarks.md

Each server runs in its own process (`--serve runtime|bare`, one uvicorn worker); the
load generator is an httpx async client with one connection per concurrent worker.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pydantic

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BODY = {"input": "Summarise the product brief in three bullet points"}


# --- the servers ----------------------------------------------------------------------


def runtime_app() -> Any:
    from bmad_runtime import app, settings
    from bmad_runtime.memory import inprocess
    from bmad_runtime.providers import echo, router

    return app.create_app(
        settings.RuntimeSettings(
            agent_name="bench-1", agent_namespace="bench", tenant="bench", memory_store="inProcess"
        ),
        store=inprocess.InProcessStore(),
        providers=router.ModelRouter([echo.EchoProvider()]),
        authenticator=None,
        limiter=None,
    )


class Ask(pydantic.BaseModel):
    input: str


class Answer(pydantic.BaseModel):
    output: str


def bare_app() -> Any:
    import fastapi

    app = fastapi.FastAPI()

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/v1/invoke")
    async def invoke(ask: Ask) -> Answer:
        return Answer(output=f"[echo-1] {ask.input}")

    return app


def serve(kind: str, port: int) -> None:
    import uvicorn

    app = runtime_app() if kind == "runtime" else bare_app()
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False, lifespan="on")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start(kind: str) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BMAD_", "OTEL_"))}
    proc = subprocess.Popen(
        [sys.executable, __file__, "--serve", kind, "--port", str(port)], env=env, cwd=REPO
    )
    url = f"http://{HOST}:{port}"
    # 120 s, not 30: on 2 shared cores under a load average near 20 the runtime's
    # imports alone took 15 s, and a first run also compiles the bytecode.
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"the {kind} server did not start on {url}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


# --- the load ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Result:
    concurrency: int
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    cpu_us: float  # the server's CPU time (user + system) per request

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


LOAD_GENERATOR = "httpx"


def cpu_seconds(server: psutil.Process) -> float:
    times = server.cpu_times()
    return float(times.user + times.system)


async def load(
    url: str, server: psutil.Process, *, concurrency: int, seconds: float, max_requests: int
) -> Result:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    latencies: list[float] = []
    errors = 0
    issued = 0
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=30) as client:
        for _ in range(min(200, max_requests)):  # warm up: connections, caches, JIT-free paths
            await client.post("/v1/invoke", json=BODY)
        deadline = time.perf_counter() + seconds

        async def worker() -> None:
            nonlocal errors, issued
            while time.perf_counter() < deadline and issued < max_requests:
                issued += 1
                started = time.perf_counter()
                response = await client.post("/v1/invoke", json=BODY)
                latencies.append(time.perf_counter() - started)
                if response.status_code != 200:
                    errors += 1

        cpu_before = cpu_seconds(server)
        begun = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - begun
        cpu = cpu_seconds(server) - cpu_before
    latencies.sort()
    cuts = (
        statistics.quantiles(latencies, n=100, method="inclusive")
        if len(latencies) > 1
        else [0.0] * 99
    )
    return Result(
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=elapsed,
        p50_ms=cuts[49] * 1000,
        p99_ms=cuts[98] * 1000,
        cpu_us=cpu / len(latencies) * 1e6 if latencies else 0.0,
    )


WRK_SCRIPT = """wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '%s'
"""


def _wrk_ms(text: str) -> float:
    value = float(text.rstrip("usm"))
    if text.endswith("us"):
        return value / 1000
    if text.endswith("ms"):
        return value
    return value * 1000  # seconds


def load_wrk(url: str, server: psutil.Process, *, concurrency: int, seconds: float) -> Result:
    """The same requests from wrk (C, one thread): the load generator costs far less CPU
    than an asyncio client, so the latencies say more about the server."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(WRK_SCRIPT % json.dumps(BODY))
        script = fh.name
    target = f"{url}/v1/invoke"
    subprocess.run(  # warm up
        ["wrk", "-t1", f"-c{concurrency}", "-d1s", "-s", script, target],
        capture_output=True,
        check=True,
    )
    cpu_before = cpu_seconds(server)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:.0f}s", "--latency", "-s", script, target],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    cpu = cpu_seconds(server) - cpu_before
    os.unlink(script)
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    elapsed = seconds
    errors_match = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    p50 = re.search(r"\s50%\s+(\S+)", out)
    p99 = re.search(r"\s99%\s+(\S+)", out)
    return Result(
        concurrency=concurrency,
        requests=requests,
        errors=int(errors_match.group(1)) if errors_match else 0,
        seconds=elapsed,
        p50_ms=_wrk_ms(p50.group(1)) if p50 else 0.0,
        p99_ms=_wrk_ms(p99.group(1)) if p99 else 0.0,
        cpu_us=cpu / requests * 1e6 if requests else 0.0,
    )


def measure(kind: str, levels: list[int], seconds: float, max_requests: int) -> list[Result]:
    proc, url = start(kind)
    try:
        results = []
        for level in levels:
            if LOAD_GENERATOR == "wrk":
                result = load_wrk(url, psutil.Process(proc.pid), concurrency=level, seconds=seconds)
            else:
                result = asyncio.run(
                    load(
                        url,
                        psutil.Process(proc.pid),
                        concurrency=level,
                        seconds=seconds,
                        max_requests=max_requests,
                    )
                )
            print(
                f"{kind:7s} c={level:<3d} {result.rps:8.0f} req/s  p50 {result.p50_ms:6.2f} ms  "
                f"p99 {result.p99_ms:6.2f} ms  server CPU {result.cpu_us:5.0f} us/req  "
                f"({result.requests} requests, "
                f"{result.errors} errors)",
                file=sys.stderr,
            )
            results.append(result)
        return results
    finally:
        stop(proc)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--serve", choices=["runtime", "bare"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--seconds", type=float, default=5.0, help="per concurrency level")
    parser.add_argument("--max-requests", type=int, default=50_000, help="per level, at most")
    parser.add_argument("--write", type=Path, help="append the results to this Markdown file")
    parser.add_argument(
        "--load",
        choices=["wrk", "httpx"],
        default="wrk" if shutil.which("wrk") else "httpx",
        help="load generator: wrk (Debian package, default when installed) or httpx",
    )
    args = parser.parse_args()
    global LOAD_GENERATOR  # noqa: PLW0603 - chosen once per run
    LOAD_GENERATOR = args.load
    if args.serve:
        serve(args.serve, args.port)
        return 0

    runtime = measure("runtime", args.concurrency, args.seconds, args.max_requests)
    bare = measure("bare", args.concurrency, args.seconds, args.max_requests)
    cpu = platform.processor() or platform.machine()
    lines = [
        f"\n### bench/runtime — {dt.date.today().isoformat()}\n",
        f"Machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}; one "
        f"uvicorn worker per server, load generator ({LOAD_GENERATOR}) on the same machine "
        "over loopback, "
        f"{args.seconds:g}s per level. Runtime: POST /v1/invoke with the echo model, the "
        "in-process store, auth and limits off. Bare: a FastAPI endpoint that parses the same "
        "body and returns the echo. Throughput ratio: runtime / bare requests/s (the load "
        "generator shares the machine, so at high concurrency it may be the bottleneck); "
        "CPU ratio: the server's CPU time per request, runtime / bare.\n",
        "| concurrency | runtime req/s | runtime p50 / p99 (ms) | runtime CPU (µs/req) | "
        "bare req/s | bare p50 / p99 (ms) | bare CPU (µs/req) | throughput ratio | "
        "CPU ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for ours, theirs in zip(runtime, bare, strict=True):
        ratio = ours.rps / theirs.rps if theirs.rps else 0.0
        cpu_ratio = ours.cpu_us / theirs.cpu_us if theirs.cpu_us else 0.0
        lines.append(
            f"| {ours.concurrency} | {ours.rps:.0f} | {ours.p50_ms:.2f} / {ours.p99_ms:.2f} | "
            f"{ours.cpu_us:.0f} | {theirs.rps:.0f} | {theirs.p50_ms:.2f} / {theirs.p99_ms:.2f} "
            f"| {theirs.cpu_us:.0f} | {ratio:.2f} | {cpu_ratio:.2f} |"
        )
    errors = sum(r.errors for r in runtime + bare)
    if errors:
        lines.append(f"\n{errors} requests failed during the run: the numbers are suspect.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        with args.write.open("a") as fh:
            fh.write(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
