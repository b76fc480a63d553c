"""Benchmark: the agent runtime's POST /v1/invoke (echo model, in-process store, auth off)
against a bare FastAPI endpoint under the same uvicorn settings → requests/s, p50, p99.

The difference is what the runtime itself costs per request: middlewares (request id,
security headers, metrics, a span), validation, context assembly, the model router,
storing two turns, a usage record and an audit entry.

Run on demand (not in CI); loopback only, bounded by --seconds and --max-requests:

    .venv/bin/python bench/runtime.py --write docs/benchmarks.md

Each server runs in its own process (`--serve runtime|store|bare`, one uvicorn worker);
the load generator is wrk when installed, else an httpx async client with one connection
per concurrent worker. Every server sets up Python's garbage collector as `bmad runtime`
does (`bmad_runtime.collector`: what exists frozen, young collections every 10,000 net
allocations), the bare endpoint too; `BENCH_GC_YOUNG_THRESHOLD=0` keeps Python's
settings in all of them.

Two tables. The first: the runtime with the in-process store. The second (`--tables
in-process real`, the default when the test bed's `BMAD_POSTGRES_URL` and
`BMAD_REDIS_URL` are set): the production app (`create_default_app`) with the test bed's
real PostgreSQL (a fresh database, migrated at start-up) and Redis bound, as an agent
pod has them. With `--profile` (needs py-spy) each runtime is profiled in a separate
pass at concurrency 16 after its measured levels, so the profiler does not distort the
table, and the report breaks the runtime's CPU per request down by where it went.

`--ledger on` gives each runtime the platform usage ledger (docs/billing.md) as the
operator would: the test bed's Redis (`BMAD_REDIS_URL`) as the ledger, an ACL user of
the agent's own made for the run, every answer's record kept in the server's own usage
spool (a directory in /dev/shm, as a pod's memory emptyDir) before it leaves and shipped to the
agent's usage stream every 20 ms, and the tenant's budget key read every 2 s
(``BENCH_LEDGER_WAIT=1``: the ledger without a spool, every answer waiting for Redis to
acknowledge its record; ``BENCH_SPOOL_INTERVAL``: another shipping interval, in
seconds). `--ledger both` measures
every table with the ledger off and then on, and adds a table of on / off: what the
ledger costs per request. Nothing ingests the stream during the run (that is the
operator's work, not the runtime's); it is deleted, with the ACL user, afterwards.

`--rounds N` repeats the whole run N times in turn (every table, then the bare
endpoint, per round) and reports, per level, the round with the median requests/s:
on this project's 2-core test machine one 5-second level moves by 15-25% from run to
run, and a bare endpoint measured once, after the runtimes, can land on a faster or a
slower stretch than they did.

`--bytecodes N` measures nothing of the above: it calls both apps in process as ASGI
(no server) N times and counts the Python bytecodes one request runs (sys.settrace
opcode events), per package; with `--ledger on` or `both`, the runtime's with the
ledger off and on instead, and the functions the difference ran. On a shared machine,
where requests/s and CPU time move with everyone's load, that count does not, so a
change's effect on the runtime's own work can be seen there; it leaves out C code and
the server (uvicorn, h11, sockets).
`--instructions N` calls both apps the same way under valgrind's callgrind and counts
the machine instructions one request runs: C code included, as deterministic, slower
(about a minute for 1,000 requests of each); it still leaves out the server. With
`--ledger on` or `both`, the runtime's with the ledger off and on (a pause after every
20 requests, in which the spool ships them, on both sides).
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import collections
import contextlib
import datetime as dt
import functools
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.parse
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import psutil
import pydantic
import report_file  # bench/, beside this script

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
BODY = {"input": "Summarise the product brief in three bullet points"}


# --- the servers ----------------------------------------------------------------------


# The ledger of a server with `--ledger on` (not BMAD_*: the server's env is cleaned of those).
LEDGER_URL = "BENCH_RUNTIME_LEDGER_URL"
LEDGER_PASSWORD = "BENCH_RUNTIME_LEDGER_PASSWORD"  # noqa: S105 - a variable's name
AGENT, NAMESPACE, TENANT = "bench-1", "bench", "bench"


def runtime_app() -> Any:
    from bmad_runtime import app, settings
    from bmad_runtime.memory import inprocess
    from bmad_runtime.providers import echo, router

    made = app.create_app(
        settings.RuntimeSettings(
            agent_name=AGENT, agent_namespace=NAMESPACE, tenant=TENANT, memory_store="inProcess"
        ),
        store=inprocess.InProcessStore(),
        providers=router.ModelRouter([echo.EchoProvider()]),
        authenticator=None,
        limiter=None,
    )
    stand_in = os.environ.get(LEDGER_STAND_IN)
    if stand_in:
        made.state.runtime.ledger = _stand_in_ledger(stand_in)
    elif os.environ.get(LEDGER_URL):
        made.state.runtime.ledger = _platform_ledger()
    return made


# The pod's spool is a memory-backed emptyDir (bmad_crds.runtime_contract.USAGE_SPOOL_DIR).
SPOOL_PARENT = "/dev/shm"  # noqa: S108 - a directory of the bench's own is made in it


def _spool_dir(parent: str | None = SPOOL_PARENT) -> str | None:
    """The server's own usage spool directory, in memory as the operator gives a pod
    one (removed when the server ends), unless ``BENCH_LEDGER_WAIT`` asks for the
    ledger that waits for Redis on every answer."""
    if os.environ.get(LEDGER_WAIT):
        return None
    folder = tempfile.mkdtemp(prefix="bench-spool-", dir=parent)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _platform_ledger(*, spool: bool = True) -> Any:
    """The agent's platform ledger on the bench's Redis, as the runtime makes it: with
    a spool of its own unless ``spool`` is false or ``BENCH_LEDGER_WAIT`` is set."""
    from bmad_runtime import ledger

    made = ledger.PlatformLedger.from_url(
        os.environ[LEDGER_URL],
        password=os.environ[LEDGER_PASSWORD],
        namespace=NAMESPACE,
        agent=AGENT,
        tenant=TENANT,
        spool_dir=_spool_dir() if spool else None,
    )
    interval = os.environ.get(SPOOL_INTERVAL)
    kept = getattr(made.writer.client, "spool", None)
    if interval and kept is not None:  # a spool that ships at another pace
        kept.interval = kept._delay = float(interval)
    return made


SPOOL_INTERVAL = "BENCH_SPOOL_INTERVAL"  # s between shipments (the runtime's: 0.02)


LEDGER_WAIT = "BENCH_LEDGER_WAIT"


LEDGER_STAND_IN = "BENCH_LEDGER_STAND_IN"
PING = b"*1\r\n$4\r\nPING\r\n"  # the command the ping stand-ins send


class _StandIn:
    """A stand-in ledger's budget and close: never exhausted, nothing to close."""

    async def exhausted(self) -> None:
        return None

    async def aclose(self) -> None:
        return None


class _YieldingLedger(_StandIn):
    """A ledger whose write only yields to the event loop once: what suspending the
    answer costs, with no record and no I/O."""

    def write(self, entry: Any) -> Coroutine[Any, Any, None]:
        return asyncio.sleep(0)


class _NoSocketClient:
    """A Redis client that takes commands as `resp.Client` does (packed by the writer, or
    packed here) and answers on the event loop's next turn, with no socket: the ledger's
    own code without the round trip."""

    def __init__(self) -> None:
        from bmad_integrations.usage import resp

        self.pack = resp.pack

    def execute_packed(self, command: bytes) -> Any:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        loop.call_soon(reply.set_result, "1-0")  # only the writer's XADDs come packed
        return reply

    def execute_command(self, *args: str | bytes | int) -> Any:
        self.pack(args)
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[Any] = loop.create_future()
        loop.call_soon(reply.set_result, "1-0" if args[0] == "XADD" else None)
        return reply

    async def aclose(self) -> None:
        return None


class _PingLedger:
    """A ledger whose write is one PING to the platform Redis over the ledger's own
    client and connection, awaited before the answer leaves: the least any write that
    waits for Redis's acknowledgement costs this runtime, with no record made."""

    def __init__(self, real: Any) -> None:
        self.real = real
        self.client = real.writer.client

    def write(self, entry: Any) -> Any:
        return self.client.execute_packed(PING)

    async def exhausted(self) -> Any:
        return await self.real.exhausted()

    async def aclose(self) -> None:
        await self.real.aclose()


class _WakeLedger(_StandIn):
    """A ledger whose write is answered by a thread of the server's own after a pause
    of about the PING's round trip (`time.sleep`), through the event loop's self-pipe:
    the request waits and the loop is woken by a socket, as by Redis's reply, with no
    other process and no TCP. Meaningful at concurrency 1 only: under load the thread
    waits for the GIL."""

    PAUSE = 40e-6

    def __init__(self) -> None:
        import queue
        import threading

        self.queue: queue.SimpleQueue[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]]
        self.queue = queue.SimpleQueue()
        threading.Thread(target=self._answer, daemon=True).start()

    def _answer(self) -> None:
        while True:
            loop, reply = self.queue.get()
            time.sleep(self.PAUSE)
            loop.call_soon_threadsafe(reply.set_result, None)

    def write(self, entry: Any) -> Any:
        loop = asyncio.get_running_loop()
        reply: asyncio.Future[None] = loop.create_future()
        self.queue.put((loop, reply))
        return reply


class _SyncPingLedger(_StandIn):
    """A ledger whose write is one PING over a socket of its own, made without
    suspending the request: a blocking send and receive (``block``: the thread sleeps
    in the kernel, the event loop takes no turn), or a receive polled until the reply
    is in (``spin``: nothing sleeps). What waiting costs apart from asyncio. When the
    server stops, the round trips it measured go to its standard error."""

    def __init__(self, *, spin: bool) -> None:
        from bmad_integrations.usage import record, resp

        where = urllib.parse.urlsplit(os.environ[LEDGER_URL])
        self.sock = socket.create_connection((where.hostname, where.port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.sendall(
            resp.pack(("AUTH", record.acl_user(NAMESPACE, AGENT), os.environ[LEDGER_PASSWORD]))
        )
        if self.sock.recv(64) != b"+OK\r\n":
            raise SystemExit("the stand-in's AUTH was refused")
        self.spin = spin
        self.sock.setblocking(not spin)
        self.round_trips: list[int] = []  # ns
        atexit.register(self._report)

    async def write(self, entry: Any) -> None:
        began = time.perf_counter_ns()
        self.sock.send(PING)
        while True:
            try:
                self.sock.recv(64)  # "+PONG\r\n" (7 bytes) comes in one segment
                break
            except BlockingIOError:
                continue
        self.round_trips.append(time.perf_counter_ns() - began)

    def _report(self) -> None:
        took = sorted(self.round_trips)
        if took:
            at = [took[len(took) * q // 100] / 1e3 for q in (10, 50, 90, 99)]
            print(
                f"stand-in {'spin' if self.spin else 'block'}: {len(took)} round trips, "
                "p10 / p50 / p90 / p99 %.0f / %.0f / %.0f / %.0f µs" % tuple(at),
                file=sys.stderr,
            )


class _SpoolingClient:
    """The platform ledger's client made a sketch of a spooled ledger (``spool``): each
    record is appended to a file (one ``write``, kept by the kernel if the process is
    killed) and its reply is ready at once, so the answer does not wait for Redis; the
    records of the last few milliseconds are shipped over the real client in the
    background, and the file is emptied once everything sent is acknowledged. What
    such a design would cost a request; not the product's ledger (no recovery, no
    limit, no retry)."""

    DELAY = float(os.environ.get("BENCH_SPOOL_DELAY", "0.002"))  # s

    def __init__(self, real: Any) -> None:
        self.real = real
        fd, self.path = tempfile.mkstemp(prefix="bench-spool-")
        os.close(fd)
        self.fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        atexit.register(os.unlink, self.path)
        self.pending: list[bytes] = []
        self.in_flight = 0
        self.shipping: asyncio.TimerHandle | None = None
        self.shipments: set[asyncio.Future[None]] = set()

    def _keep(self, command: bytes) -> None:
        os.write(self.fd, command)

    def execute_packed(self, command: bytes) -> Any:
        self._keep(command)
        self.pending.append(command)
        loop = asyncio.get_running_loop()
        if self.shipping is None:
            self.shipping = loop.call_later(self.DELAY, self._ship)
        done: asyncio.Future[str] = loop.create_future()
        done.set_result("0-1")
        return done

    def _ship(self) -> None:
        self.shipping = None
        batch, self.pending = self.pending, []
        self.in_flight += len(batch)
        replies = [self.real.execute_packed(command) for command in batch]
        shipment = asyncio.ensure_future(self._acknowledged(replies))
        self.shipments.add(shipment)
        shipment.add_done_callback(self.shipments.discard)

    async def _acknowledged(self, replies: list[Any]) -> None:
        await asyncio.gather(*replies)
        self.in_flight -= len(replies)
        if not self.in_flight and not self.pending:
            os.ftruncate(self.fd, 0)

    def execute_command(self, *args: Any) -> Any:
        return self.real.execute_command(*args)

    async def aclose(self) -> None:
        await self.real.aclose()


class _MappedSpoolingClient(_SpoolingClient):
    """``mmap``: the spool sketch with the record copied into a shared memory map of
    the file (no system call a request; the kernel keeps the pages if the process is
    killed) instead of a ``write``."""

    SIZE = 64 << 20

    def __init__(self, real: Any) -> None:
        import mmap

        super().__init__(real)
        os.ftruncate(self.fd, 0)
        fd = os.open(self.path, os.O_RDWR)
        os.ftruncate(fd, self.SIZE)
        self.map = mmap.mmap(fd, self.SIZE)
        os.close(fd)
        self.offset = 0

    def _keep(self, command: bytes) -> None:
        end = self.offset + len(command)
        if end > self.SIZE:
            end, self.offset = len(command), 0
        self.map[self.offset : end] = command
        self.offset = end

    async def _acknowledged(self, replies: list[Any]) -> None:
        await asyncio.gather(*replies)
        self.in_flight -= len(replies)


def _stand_in_ledger(kind: str) -> Any:
    from bmad_integrations.usage import writer
    from bmad_runtime import ledger

    if kind == "yield":
        return _YieldingLedger()
    if kind == "no-socket":
        return ledger.PlatformLedger(
            writer.LedgerWriter(_NoSocketClient(), namespace=NAMESPACE, agent=AGENT),
            tenant=TENANT,
        )
    if kind == "ping":
        return _PingLedger(_platform_ledger(spool=False))
    if kind == "wake":
        return _WakeLedger()
    if kind == "wait":
        return _platform_ledger(spool=False)
    if kind == "disk":
        # The spool on a disk's file system (an emptyDir without medium Memory).
        from bmad_runtime import ledger

        return ledger.PlatformLedger.from_url(
            os.environ[LEDGER_URL],
            password=os.environ[LEDGER_PASSWORD],
            namespace=NAMESPACE,
            agent=AGENT,
            tenant=TENANT,
            spool_dir=_spool_dir(None),
        )
    if kind in ("ship-100ms", "no-ship"):
        made = _platform_ledger()
        every = 0.1 if kind == "ship-100ms" else 3600.0  # no-ship: none during a run
        made.writer.client.spool.interval = made.writer.client.spool._delay = every
        return made
    if kind in ("spool", "mmap"):
        # The platform ledger's own client, under a writer of the spooling client's.
        client = _platform_ledger(spool=False).writer.client
        spooling = _SpoolingClient if kind == "spool" else _MappedSpoolingClient
        return ledger.PlatformLedger(
            writer.LedgerWriter(
                spooling(client), namespace=NAMESPACE, agent=AGENT, owns_client=True
            ),
            tenant=TENANT,
        )
    if kind in ("block", "spin"):
        return _SyncPingLedger(spin=kind == "spin")
    raise SystemExit(
        f"{LEDGER_STAND_IN} is yield, no-socket, ping, wake, block, spin, spool, mmap, "
        f"wait, disk, ship-100ms or no-ship, not {kind!r}"
    )


class BenchLedger:
    """The agent's usage ledger for a run: its ACL user on the platform Redis (as the
    operator makes it), removed with its stream afterwards; `env` is what a server needs."""

    def __init__(self, admin_url: str) -> None:
        import secrets

        self.admin_url = admin_url
        self.password = secrets.token_hex(16)

    async def _run(self, *, setup: bool) -> None:
        from redis import asyncio as aioredis

        from bmad_integrations.usage import acl, record

        admin = aioredis.Redis.from_url(self.admin_url)
        try:
            if setup:
                await acl.ensure_writer(
                    admin, namespace=NAMESPACE, agent=AGENT, password=self.password, tenant=TENANT
                )
            else:
                await admin.delete(record.stream_key(NAMESPACE, AGENT))
                await acl.remove_writer(admin, namespace=NAMESPACE, agent=AGENT)
        finally:
            await admin.aclose()

    def __enter__(self) -> dict[str, str]:
        asyncio.run(self._run(setup=True))
        parts = urllib.parse.urlsplit(self.admin_url)
        host = parts.netloc.rpartition("@")[2]  # the agent's URL carries no credentials
        return {
            LEDGER_URL: urllib.parse.urlunsplit(parts._replace(netloc=host)),
            LEDGER_PASSWORD: self.password,
        }

    def __exit__(self, *_: object) -> None:
        asyncio.run(self._run(setup=False))


class Ask(pydantic.BaseModel):
    input: str


class Answer(pydantic.BaseModel):
    output: str


GC_THRESHOLD = "BENCH_GC_YOUNG_THRESHOLD"
GC_STATS = "BENCH_GC_STATS"  # a file: the server writes its collections' count and time
STORE_DSN = "BENCH_RUNTIME_POSTGRES_DSN"  # not BMAD_*: the server's env is cleaned of those
STORE_REDIS = "BENCH_RUNTIME_REDIS_URL"


def store_app() -> Any:
    """The production app with the real PostgreSQL and Redis bound (auth off, echo model)."""
    from bmad_runtime import settings, wiring

    folder = Path(tempfile.mkdtemp(prefix="bench-runtime-"))
    # Removed when the server ends (`serve` exits on the bench's SIGTERM).
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    config = folder / "agent.json"
    config.write_text(json.dumps({"role": "pm", "model": {"provider": "echo", "name": "echo-1"}}))
    stand_in = os.environ.get(LEDGER_STAND_IN)
    if stand_in:
        # The stand-in ledger where the production app makes its ledger at start-up.
        def stand_in_ledger(_: object, stack: contextlib.AsyncExitStack) -> Any:
            made = _stand_in_ledger(stand_in)
            stack.push_async_callback(made.aclose)
            return made

        wiring._ledger = stand_in_ledger  # type: ignore[assignment]
    return wiring.create_default_app(
        settings.RuntimeSettings(
            agent_name=AGENT,
            agent_namespace=NAMESPACE,
            # The ledger's tenant is the bench's; the store's rows a tenant of their own.
            tenant=TENANT if os.environ.get(LEDGER_URL) else f"bench-{os.getpid()}",
            agent_config=config,
            binding_root=folder / "no-bindings",
            auth_mode="none",
            postgres_dsn=os.environ[STORE_DSN],
            redis_url=os.environ[STORE_REDIS],
            usage_ledger_url=os.environ.get(LEDGER_URL) or None,
            usage_ledger_password=os.environ.get(LEDGER_PASSWORD) or None,
            usage_ledger_spool=_spool_dir() if os.environ.get(LEDGER_URL) else None,
        )
    )


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

    from bmad_runtime import collector

    app = {"runtime": runtime_app, "store": store_app, "bare": bare_app}[kind]()
    # The collector as `bmad runtime` sets it up (`bmad_runtime.collector`), for the bare
    # endpoint too: the ratios compare the runtime's work with FastAPI's, not two
    # settings of the collector. BENCH_GC_YOUNG_THRESHOLD=0 keeps Python's.
    collector.tune(_gc_threshold())
    if os.environ.get(GC_STATS):
        _count_collections(Path(os.environ[GC_STATS]))
    # uvicorn shuts down on the bench's SIGTERM and then raises it again under the handler
    # it found: a handler that exits lets the process end normally (atexit runs).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False, lifespan="on")


def _count_collections(report: Path) -> None:
    """Time every collection of this server's garbage collector; written as JSON to
    ``report`` when the server exits (`serve` exits normally on SIGTERM)."""
    import gc

    started = [0.0]
    totals = {"collections": 0, "seconds": 0.0}

    def callback(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            totals["collections"] += 1
            totals["seconds"] += time.perf_counter() - started[0]

    gc.callbacks.append(callback)
    atexit.register(lambda: report.write_text(json.dumps(totals)))


def _gc_threshold() -> int:
    """The young-generation threshold every bench server sets (`GC_THRESHOLD`)."""
    from bmad_runtime import collector

    return int(os.environ.get(GC_THRESHOLD, collector.DEFAULT_YOUNG_THRESHOLD))


def _collector_line() -> str:
    threshold = _gc_threshold()
    if threshold == 0:
        return "Python's settings"
    return f"as `bmad runtime` sets it (frozen at start, young every {threshold:,})"


class Pinning:
    """``--pin``: the server under test on a CPU of its own; this process, the load
    generator (its child) and the test bed's Redis and PostgreSQL (found by their
    listening ports, with their children) on the others, as in a cluster where the agent
    pod's CPU is not shared with the platform's datastores or its callers. Undone on exit.
    """

    def __init__(self) -> None:
        cpus = sorted(os.sched_getaffinity(0))
        if len(cpus) < 2:
            raise SystemExit("--pin needs at least 2 CPUs")
        self.server = {cpus[-1]}
        self.others = set(cpus[:-1])
        self._saved: list[tuple[psutil.Process, list[int]]] = []

    def services(self) -> list[psutil.Process]:
        ports = {
            int(os.environ[name])
            for name in ("BMAD_REDIS_PORT", "BMAD_POSTGRES_PORT")
            if os.environ.get(name)
        }
        found: list[psutil.Process] = []
        for conn in psutil.net_connections(kind="tcp"):
            listening = conn.status == psutil.CONN_LISTEN and conn.pid is not None
            if listening and conn.laddr and conn.laddr.port in ports:
                proc = psutil.Process(conn.pid)
                found += [proc, *proc.children(recursive=True)]
        return found

    def __enter__(self) -> Pinning:
        for proc in [psutil.Process(), *self.services()]:
            with contextlib.suppress(psutil.Error):
                self._saved.append((proc, proc.cpu_affinity()))
                proc.cpu_affinity(sorted(self.others))
        return self

    def __exit__(self, *_: object) -> None:
        for proc, cpus in self._saved:
            with contextlib.suppress(psutil.Error):
                proc.cpu_affinity(cpus)

    def line(self) -> str:
        return (
            f"the server pinned to CPU {min(self.server)}, the load generator and the test "
            f"bed's datastores to CPU {', '.join(map(str, sorted(self.others)))}"
        )


PINNING: Pinning | None = None


def pin() -> None:
    """Pin this run (`Pinning`), undone when the process exits."""
    global PINNING  # noqa: PLW0603 - set once per run
    PINNING = Pinning().__enter__()
    atexit.register(PINNING.__exit__)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start(
    kind: str,
    extra_env: dict[str, str] | None = None,
    *,
    under: Callable[[list[str]], list[str]] = lambda command: command,
    within: float = 120,
) -> tuple[subprocess.Popen[bytes], str]:
    """A server of ``kind`` (its command wrapped by ``under``, e.g. `_callgrind`), once
    it answers /healthz, and its URL."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BMAD_", "OTEL_"))}
    env.update(extra_env or {})
    proc = subprocess.Popen(
        under([sys.executable, __file__, "--serve", kind, "--port", str(port)]), env=env, cwd=REPO
    )
    if PINNING is not None:
        os.sched_setaffinity(proc.pid, PINNING.server)
    url = f"http://{HOST}:{port}"
    # 120 s, not 30: on 2 shared cores under a load average near 20 the runtime's
    # imports alone took 15 s, and a first run also compiles the bytecode.
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.terminate()
    raise RuntimeError(f"the {kind} server did not start on {url}")


def stop(proc: subprocess.Popen[bytes], *, grace: float = 10) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=grace)
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


# --- where the time goes ---------------------------------------------------------------

# Where a sample's innermost frame is decides what it is charged to (py-spy --full-filenames).
CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("PostgreSQL client (asyncpg)", ("/asyncpg/",)),
    ("Redis client (redis-py)", ("/redis/",)),
    ("HTTP server (uvicorn, h11, httptools)", ("/uvicorn/", "/h11/", "/httptools/")),
    ("web framework (Starlette, FastAPI)", ("/starlette/", "/fastapi/")),
    ("validation, serialisation (pydantic)", ("/pydantic/", "/pydantic_core/")),
    ("metrics (prometheus_client)", ("/prometheus_client/",)),
    ("tracing (opentelemetry)", ("/opentelemetry/",)),
    ("the runtime's own code", ("/bmad_runtime/", "/bmad_crds/", "/bmad_integrations/")),
    ("logging", ("/logging/",)),
    ("JSON", ("/json/",)),
    ("event loop, sockets (asyncio)", ("/asyncio/", "/selectors.py", "/socket.py", "/ssl.py")),
)
FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^():]+):(?P<line>\d+)\)$")


@dataclass(frozen=True)
class Breakdown:
    samples: int
    by_category: list[tuple[str, int]]  # innermost frame's category → samples
    inclusive: list[tuple[str, int]]  # a runtime function anywhere on the stack → samples
    inclusive_packages: list[tuple[str, int]]  # a package anywhere on the stack → samples
    leaves: dict[str, list[tuple[str, int]]]  # per category: its busiest innermost frames


def _category(path: str) -> str:
    for name, markers in CATEGORIES:
        if any(m in path for m in markers):
            return name
    return "other (standard library, the rest)"


def parse_profile(text: str) -> Breakdown:
    """py-spy's raw (collapsed) stacks: `frame;frame;...;frame count`, outermost first."""
    by_category: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    packages: collections.Counter[str] = collections.Counter()
    leaves: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    total = 0
    for line in text.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [m for m in (FRAME.match(f) for f in stack.split(";")) if m]
        if not frames:
            continue
        total += count
        leaf = frames[-1]
        by_category[_category(leaf["file"])] += count
        where = leaf["file"].rsplit("/site-packages/", 1)[-1].rsplit("/lib/python3", 1)[-1]
        leaves[_category(leaf["file"])][f"{leaf['func']} ({where.lstrip('/')})"] += count
        seen_functions = set()
        seen_packages = set()
        for frame in frames:
            path = frame["file"]
            if "/bmad_runtime/" in path:
                module = path.split("/bmad_runtime/", 1)[1].removesuffix(".py").replace("/", ".")
                seen_functions.add(f"{module}.{frame['func']}")
            for name, markers in CATEGORIES:
                if any(m in path for m in markers):
                    seen_packages.add(name)
        for name in seen_functions:
            inclusive[name] += count
        for name in seen_packages:
            packages[name] += count
    return Breakdown(
        samples=total,
        by_category=by_category.most_common(),
        inclusive=inclusive.most_common(15),
        inclusive_packages=packages.most_common(),
        leaves={k: v.most_common(3) for k, v in leaves.items()},
    )


def py_spy() -> str | None:
    found = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    return found if Path(found).exists() else None


def record_stacks(
    pid: int, *, rate: int, seconds: float, load: Callable[[], object], full_filenames: bool
) -> str:
    """py-spy's raw stacks of the server ``pid`` (sampled without pausing it, at ``rate``
    per second) while ``load`` runs for about ``seconds``."""
    spy = py_spy()
    if spy is None:
        raise SystemExit("profiling needs py-spy: pip install py-spy (the bench extra)")
    with tempfile.TemporaryDirectory(prefix="bench-profile-") as folder:
        out = Path(folder) / "stacks.txt"
        recorder = subprocess.Popen(
            [
                spy,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--duration",
                f"{seconds + 1:.0f}",
                "--format",
                "raw",
                *(["--full-filenames"] if full_filenames else []),
                "--nonblocking",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        time.sleep(1.0)  # attached
        load()
        _, err = recorder.communicate(timeout=seconds + 60)
        if recorder.returncode != 0 or not out.exists():
            raise RuntimeError(f"py-spy failed: {err.decode(errors='replace')[-500:]}")
        return out.read_text()


def profile(url: str, pid: int, *, seconds: float, concurrency: int) -> Breakdown:
    """Sample the server with py-spy (not pausing it) while loading it; parse the stacks."""

    def run_load() -> None:
        if LOAD_GENERATOR == "wrk":
            load_wrk(url, psutil.Process(pid), concurrency=concurrency, seconds=seconds)
        else:
            asyncio.run(
                load(
                    url,
                    psutil.Process(pid),
                    concurrency=concurrency,
                    seconds=seconds,
                    max_requests=10**9,
                )
            )

    return parse_profile(
        record_stacks(pid, rate=200, seconds=seconds, load=run_load, full_filenames=True)
    )


def breakdown_lines(title: str, result: Result, found: Breakdown) -> list[str]:
    """The profile as CPU µs per request: each share of the samples times the measured
    CPU per request at the same concurrency."""

    def us(count: int) -> str:
        return f"{result.cpu_us * count / found.samples:.0f}" if found.samples else "—"

    def pct(count: int) -> str:
        return f"{100 * count / found.samples:.0f}%" if found.samples else "—"

    lines = [
        f"\n{title}: {found.samples:,} py-spy samples at concurrency {result.concurrency}; "
        f"the shares times the {result.cpu_us:.0f} µs of server CPU per request measured "
        "above at that concurrency.\n",
        "| where the CPU went (innermost frame) | share | µs/request | mostly |",
        "|---|---:|---:|---|",
    ]
    for name, c in found.by_category:
        mostly = ", ".join(
            f"`{leaf.split(' (')[0]}` {pct(n)}" for leaf, n in found.leaves.get(name, [])
        )
        lines.append(f"| {name} | {pct(c)} | {us(c)} | {mostly} |")
    lines += [
        "",
        "| with this on the stack (inclusive) | share | µs/request |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {pct(c)} | {us(c)} |" for name, c in found.inclusive_packages]
    lines += [f"| `bmad_runtime.{name}` | {pct(c)} | {us(c)} |" for name, c in found.inclusive]
    return lines


# --- a run -------------------------------------------------------------------------------


def median_results(rounds: list[list[Result]]) -> list[Result]:
    """Per level, the result of the round with the median requests/s (its own p50, p99
    and CPU with it)."""
    chosen = []
    for level in zip(*rounds, strict=True):
        ordered = sorted(level, key=lambda r: r.rps)
        chosen.append(ordered[(len(ordered) - 1) // 2])
    return chosen


def measure(
    kind: str,
    levels: list[int],
    seconds: float,
    max_requests: int,
    *,
    extra_env: dict[str, str] | None = None,
    profile_seconds: float = 0.0,
) -> tuple[list[Result], Breakdown | None]:
    proc, url = start(kind, extra_env)
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
        found = None
        if profile_seconds:
            found = profile(url, proc.pid, seconds=profile_seconds, concurrency=PROFILE_LEVEL)
        return results, found
    finally:
        stop(proc)


PROFILE_LEVEL = 16


# --- work per request that load does not move ----------------------------------------


def in_process(kind: str) -> Callable[[], Coroutine[Any, Any, int]]:
    """One POST /v1/invoke into the app, called in process as ASGI (no server, no
    sockets), as a coroutine function that returns the status."""
    app = {"runtime": runtime_app, "bare": bare_app}[kind]()
    raw = json.dumps(BODY).encode()

    async def one() -> int:
        sent = False
        status = 0

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:  # the app never asks again for a whole body
                raise RuntimeError("receive() after the whole body")
            sent = True
            return {"type": "http.request", "body": raw, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]

        scope = {
            "type": "http",
            "asgi": {"version": "3.0", "spec_version": "2.3"},
            "http_version": "1.1",
            "server": (HOST, 8000),
            "client": (HOST, 40000),
            "scheme": "http",
            "method": "POST",
            "root_path": "",
            "path": "/v1/invoke",
            "raw_path": b"/v1/invoke",
            "query_string": b"",
            "headers": [
                (b"host", f"{HOST}:8000".encode()),
                (b"content-type", b"application/json"),
                (b"content-length", str(len(raw)).encode()),
            ],
            "state": {},
        }
        await app(scope, receive, send)
        return status

    return one


def count_bytecodes(
    kind: str, requests: int, *, key: Callable[[Any], str] | None = None
) -> tuple[float, list[tuple[str, float]]]:
    """Python bytecodes one POST /v1/invoke runs through the app, called in process as
    ASGI (no server, no load generator, no sockets): per request, and per package.

    Counted with ``sys.settrace`` opcode events after 300 warm-up requests. C code
    (pydantic-core, the json and re modules) counts as the one call that reaches it,
    and uvicorn and h11 are outside the app: this is the part of the CPU the runtime's
    own code decides, and it does not move with the machine's load.
    """
    one = in_process(kind)
    counts: collections.Counter[str] = collections.Counter()
    name_of = key or (lambda code: _package_of(code.co_filename))

    def trace(frame: Any, event: str, arg: Any) -> Any:
        frame.f_trace_opcodes = True
        return opcode

    def opcode(frame: Any, event: str, arg: Any) -> Any:
        if event == "opcode":
            counts[name_of(frame.f_code)] += 1
        return opcode

    async def run() -> None:
        for _ in range(300):
            if await one() != 200:
                raise RuntimeError(f"the {kind} app did not answer 200")
        sys.settrace(trace)
        try:
            for _ in range(requests):
                await one()
        finally:
            sys.settrace(None)

    asyncio.run(run())
    total = sum(counts.values()) / requests
    return total, [(name, n / requests) for name, n in counts.most_common()]


def _package_of(path: str) -> str:
    for marker in ("/bmad_runtime/", "/bmad_integrations/", "/site-packages/"):
        if marker in path:
            rest = path.split(marker, 1)[1]
            top = rest.split("/", 1)[0].removesuffix(".py")
            return f"{marker.strip('/')}.{top}" if marker.startswith("/bmad_") else top
    return "standard library, generated code"


def _function_of(code: Any) -> str:
    return f"{Path(code.co_filename).name}:{code.co_name}"


def ledger_bytecode_lines(requests: int) -> list[str]:
    """The runtime's bytecodes per request with the usage ledger off and on (the test
    bed's Redis, an ACL user made for the run), and the functions the difference ran."""
    off_total, off = count_bytecodes("runtime", requests, key=_function_of)
    saved = dict(os.environ)
    try:
        with BenchLedger(os.environ["BMAD_REDIS_URL"]) as env:
            os.environ.update(env)
            on_total, on = count_bytecodes("runtime", requests, key=_function_of)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    before, after = dict(off), dict(on)
    grown = sorted(after, key=lambda name: before.get(name, 0.0) - after[name])
    lines = [
        f"Python bytecodes per POST /v1/invoke of the runtime, called in process "
        f"({requests} requests): ledger off {off_total:,.0f}, on {on_total:,.0f} "
        f"({on_total - off_total:+,.0f}; the on side includes the event loop's turn while "
        "Redis answers).\n",
        "| function | off | on | on - off |",
        "|---|---:|---:|---:|",
    ]
    lines += [
        f"| `{name}` | {before.get(name, 0.0):,.0f} | {after[name]:,.0f} | "
        f"{after[name] - before.get(name, 0.0):+,.0f} |"
        for name in grown[:20]
    ]
    return lines


def bytecode_lines(requests: int) -> list[str]:
    """Both apps' bytecodes per request, and where the runtime's went."""
    bare_total, _ = count_bytecodes("bare", requests)
    runtime_total, parts = count_bytecodes("runtime", requests)
    lines = [
        f"Python bytecodes per POST /v1/invoke, the ASGI app called in process "
        f"({requests} requests, sys.settrace opcode events; no server): runtime "
        f"{runtime_total:,.0f}, bare {bare_total:,.0f}, ratio {runtime_total / bare_total:.2f}."
        "\n",
        "| the runtime's bytecodes in | per request |",
        "|---|---:|",
    ]
    lines += [f"| {name} | {count:,.0f} |" for name, count in parts[:12]]
    return lines


# Past the in-process store's bound (1,000 conversations): its eviction is in the count.
INSTRUCTION_WARMUP = 1_200


# With the ledger: a pause after every this many requests, in which the usage spool
# ships them (one shipment of about as many records as a served run's at 1,000
# requests/s, shipping every 20 ms); the same pauses without it.
SHIPMENT_RECORDS = 20
SHIPMENT_PAUSE = 0.03  # s: longer than the spool's interval (0.02)


def instructions_child(kind: str, requests: int) -> None:
    """Run under callgrind (`count_instructions`): warm up, then ``requests`` requests with
    the instrumentation on, so only they are counted; a pause of `SHIPMENT_PAUSE` after
    every `SHIPMENT_RECORDS` when ``BENCH_PAUSES`` is set (`ledger_instruction_lines`)."""
    one = in_process(kind)
    pauses = bool(os.environ.get("BENCH_PAUSES"))

    def instrument(state: str) -> None:
        subprocess.run(
            ["callgrind_control", "-i", state, str(os.getpid())], check=True, capture_output=True
        )

    async def run() -> None:
        for _ in range(INSTRUCTION_WARMUP):
            if await one() != 200:
                raise RuntimeError(f"the {kind} app did not answer 200")
        if pauses:
            await asyncio.sleep(SHIPMENT_PAUSE)
        instrument("on")
        for n in range(1, requests + 1):
            await one()
            if pauses and n % SHIPMENT_RECORDS == 0:
                await asyncio.sleep(SHIPMENT_PAUSE)
        instrument("off")

    asyncio.run(run())


def _callgrind(folder: str, command: list[str]) -> list[str]:
    """``command`` under valgrind's callgrind, counting nothing until ``callgrind_control
    -i on``, its count written into ``folder``."""
    return [
        "valgrind",
        "--tool=callgrind",
        "--instr-atstart=no",
        f"--callgrind-out-file={folder}/callgrind.%p",
        *command,
    ]


def count_instructions(kind: str, requests: int) -> float:
    """Machine instructions one POST /v1/invoke runs in the app called in process as
    `count_bytecodes` calls it (valgrind's callgrind, instructions executed, "Ir"): C
    included (pydantic-core, the interpreter's own work per bytecode, an exception
    raised and caught, ``object.__setattr__``), and as deterministic as the bytecodes.
    A run of no requests is subtracted (what switching the count on and off costs)."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("--instructions needs valgrind (Debian package valgrind)")
    totals = []
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as folder:
        for n in (0, requests):
            run = subprocess.run(
                _callgrind(
                    folder, [sys.executable, __file__, "--instructions-child", kind, str(n)]
                ),
                check=True,
                capture_output=True,
                text=True,
            )
            found = re.search(r"Collected : (\d+)", run.stderr)
            if found is None:
                raise RuntimeError(f"no instruction count from callgrind:\n{run.stderr[-2000:]}")
            totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) / requests


def ledger_instruction_lines(requests: int) -> list[str]:
    """The runtime's machine instructions per request with the usage ledger off and on
    (its spool, shipping every `SHIPMENT_RECORDS` requests as a served run does), the
    test bed's Redis as the ledger's: the server's CPU the ledger adds, C and the
    shipment included, counted rather than timed (not the kernel's side of a socket)."""
    saved = dict(os.environ)
    try:
        os.environ["BENCH_PAUSES"] = "1"
        off = count_instructions("runtime", requests)
        with BenchLedger(os.environ["BMAD_REDIS_URL"]) as env:
            os.environ.update(env)
            on = count_instructions("runtime", requests)
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return [
        f"Machine instructions per POST /v1/invoke of the runtime, called in process "
        f"({requests} requests after {INSTRUCTION_WARMUP:,}, a pause every "
        f"{SHIPMENT_RECORDS} in which the spool ships them; valgrind callgrind Ir): ledger "
        f"off {off:,.0f}, on {on:,.0f} ({on - off:+,.0f}, on / off {on / off:.3f})."
    ]


def count_served_instructions(
    concurrency: int, seconds: float, extra_env: dict[str, str]
) -> tuple[float, float]:
    """Machine instructions the whole server process runs per request (uvicorn, h11, the
    app, its ledger; callgrind's "Ir", the kernel's side of its system calls not
    counted), loaded by wrk at ``concurrency`` over loopback for ``seconds`` after a
    warm-up; and the requests per second it served under valgrind (about fifty times
    slower than without)."""
    if not (shutil.which("valgrind") and shutil.which("callgrind_control")):
        raise SystemExit("--served-instructions needs valgrind (Debian package valgrind)")
    with tempfile.TemporaryDirectory(prefix="bench-callgrind-") as folder:
        proc, url = start(
            "runtime",
            extra_env,
            under=functools.partial(_callgrind, folder),
            within=600,  # the runtime's imports under valgrind
        )
        try:
            with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
                fh.write(WRK_SCRIPT % json.dumps(BODY))
                script = fh.name
            target = f"{url}/v1/invoke"
            wrk = ["wrk", "-t1", f"-c{concurrency}", "--timeout", "30s", "-s", script, target]
            subprocess.run([*wrk, "-d20s"], capture_output=True, check=True)  # warm up
            control = ["callgrind_control", "-i"]
            subprocess.run([*control, "on", str(proc.pid)], check=True, capture_output=True)
            out = subprocess.run(
                [*wrk, f"-d{seconds:.0f}s"], capture_output=True, text=True, check=True
            ).stdout
            subprocess.run([*control, "off", str(proc.pid)], check=True, capture_output=True)
            os.unlink(script)
        finally:
            stop(proc, grace=120)  # callgrind writes its count as the server exits
        counts = [
            int(line.split()[1])
            for path in Path(folder).glob("callgrind.*")
            for line in path.read_text().splitlines()
            if line.startswith("totals:")
        ]
    requests = int(re.search(r"(\d+) requests in", out).group(1))  # type: ignore[union-attr]
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors or not requests:
        raise RuntimeError(f"the runtime under valgrind did not answer every request:\n{out}")
    if len(counts) != 1:
        raise RuntimeError(f"no instruction count from callgrind (found {counts})")
    return counts[0] / requests, requests / seconds


def served_instruction_lines(concurrency: list[int], seconds: float) -> list[str]:
    """The served runtime's instructions per request, ledger off and on (its spool in
    memory; shipping every `SERVED_SPOOL_INTERVAL`, which under valgrind's slowdown
    gathers about as many records a shipment as 20 ms does at full speed)."""
    lines = [
        "Machine instructions per POST /v1/invoke of the served runtime (the whole server "
        f"process under valgrind callgrind, wrk over loopback, {seconds:.0f} s per side "
        f"after 20 s of warm-up; the spool shipping every {SERVED_SPOOL_INTERVAL} s):\n",
        "| concurrency | off | on | on / off | req/s under valgrind: off / on |",
        "|---:|---:|---:|---:|---:|",
    ]
    for level in concurrency:
        off, off_rate = count_served_instructions(level, seconds, {})
        with BenchLedger(os.environ["BMAD_REDIS_URL"]) as env:
            on, on_rate = count_served_instructions(
                level, seconds, {**env, SPOOL_INTERVAL: str(SERVED_SPOOL_INTERVAL)}
            )
        lines.append(
            f"| {level} | {off:,.0f} | {on:,.0f} | {on / off:.3f} | "
            f"{off_rate:.0f} / {on_rate:.0f} |"
        )
    return lines


SERVED_SPOOL_INTERVAL = 1.0


def instruction_lines(requests: int) -> list[str]:
    bare = count_instructions("bare", requests)
    runtime = count_instructions("runtime", requests)
    return [
        f"Machine instructions per POST /v1/invoke, the ASGI app called in process "
        f"({requests} requests after {INSTRUCTION_WARMUP:,}, valgrind callgrind Ir; no "
        f"server): runtime {runtime:,.0f}, bare {bare:,.0f}, ratio {runtime / bare:.2f}."
    ]


class Database:
    """A fresh PostgreSQL database on the test bed's server, dropped afterwards."""

    def __init__(self, admin_url: str) -> None:
        self.admin_url = admin_url
        self.name = f"bench_runtime_{os.getpid()}_{int(time.time())}"

    async def _admin(self, sql: str) -> None:
        import asyncpg  # type: ignore[import-untyped]

        conn = await asyncpg.connect(self.admin_url)
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    def __enter__(self) -> str:
        asyncio.run(self._admin(f'CREATE DATABASE "{self.name}"'))  # a generated name
        parts = urllib.parse.urlsplit(self.admin_url)
        return urllib.parse.urlunsplit(parts._replace(path="/" + self.name))

    def __exit__(self, *_: object) -> None:
        asyncio.run(self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)'))


def table(rows: list[tuple[Result, Result]], *, ours: str = "runtime") -> list[str]:
    lines = [
        f"| concurrency | {ours} req/s | {ours} p50 / p99 (ms) | {ours} CPU (µs/req) | "
        "bare req/s | bare p50 / p99 (ms) | bare CPU (µs/req) | throughput ratio | "
        "CPU ratio |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for mine, theirs in rows:
        ratio = mine.rps / theirs.rps if theirs.rps else 0.0
        cpu_ratio = mine.cpu_us / theirs.cpu_us if theirs.cpu_us else 0.0
        lines.append(
            f"| {mine.concurrency} | {mine.rps:.0f} | {mine.p50_ms:.2f} / {mine.p99_ms:.2f} | "
            f"{mine.cpu_us:.0f} | {theirs.rps:.0f} | {theirs.p50_ms:.2f} / {theirs.p99_ms:.2f} "
            f"| {theirs.cpu_us:.0f} | {ratio:.2f} | {cpu_ratio:.2f} |"
        )
    return lines


def ledger_table(on: list[Result], off: list[Result]) -> list[str]:
    lines = [
        "| concurrency | off req/s | on req/s | off p50 / p99 (ms) | on p50 / p99 (ms) | "
        "off CPU (µs/req) | on CPU (µs/req) | throughput on / off | CPU on / off |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for yes, no in zip(on, off, strict=True):
        ratio = yes.rps / no.rps if no.rps else 0.0
        cpu_ratio = yes.cpu_us / no.cpu_us if no.cpu_us else 0.0
        lines.append(
            f"| {yes.concurrency} | {no.rps:.0f} | {yes.rps:.0f} | "
            f"{no.p50_ms:.2f} / {no.p99_ms:.2f} | {yes.p50_ms:.2f} / {yes.p99_ms:.2f} | "
            f"{no.cpu_us:.0f} | {yes.cpu_us:.0f} | {ratio:.2f} | {cpu_ratio:.2f} |"
        )
    return lines


SECTION = "bench/runtime — the agent runtime against a bare FastAPI endpoint"


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--serve", choices=["runtime", "store", "bare"], help=argparse.SUPPRESS)
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
    have_store = bool(os.environ.get("BMAD_POSTGRES_URL") and os.environ.get("BMAD_REDIS_URL"))
    parser.add_argument(
        "--tables",
        nargs="+",
        choices=["in-process", "real"],
        default=["in-process", "real"] if have_store else ["in-process"],
        help="in-process store, and/or the test bed's real PostgreSQL and Redis",
    )
    parser.add_argument(
        "--profile",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="profile each runtime with py-spy this long at concurrency 16, after its levels",
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every table and the bare endpoint this many times in turn; each "
        "level's row is the round with the median requests/s",
    )
    parser.add_argument(
        "--ledger",
        choices=["off", "on", "both"],
        default="off",
        help="the platform usage ledger (the test bed's Redis): off, on, or both (each table "
        "measured off then on, and a table of on / off)",
    )
    parser.add_argument(
        "--bytecodes",
        type=int,
        default=0,
        metavar="REQUESTS",
        help="only count the Python bytecodes per request of both apps, called in process "
        "(no server; the machine's load does not move it), and print them",
    )
    parser.add_argument(
        "--instructions",
        type=int,
        default=0,
        metavar="REQUESTS",
        help="only count the machine instructions per request of both apps, called in "
        "process under valgrind's callgrind (C included; deterministic), and print them",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="each server on a CPU of its own; this process, the load generator and the "
        "test bed's Redis and PostgreSQL on the others (`Pinning`)",
    )
    parser.add_argument("--instructions-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument(
        "--served-instructions",
        type=float,
        metavar="SECONDS",
        help="only count the machine instructions per request of the served runtime, "
        "ledger off and on, under valgrind (at --concurrency levels, this long each)",
    )
    args = parser.parse_args()
    global LOAD_GENERATOR  # noqa: PLW0603 - chosen once per run
    LOAD_GENERATOR = args.load
    if args.serve:
        serve(args.serve, args.port)
        return 0
    if args.bytecodes:
        if args.ledger == "off":
            print("\n".join(bytecode_lines(args.bytecodes)))
        elif not os.environ.get("BMAD_REDIS_URL"):
            raise SystemExit("--bytecodes with --ledger needs the test bed's Redis")
        else:
            print("\n".join(ledger_bytecode_lines(args.bytecodes)))
        return 0
    if args.instructions_child:
        instructions_child(args.instructions_child[0], int(args.instructions_child[1]))
        return 0
    if args.served_instructions:
        if not os.environ.get("BMAD_REDIS_URL"):
            raise SystemExit("--served-instructions needs the test bed's Redis")
        print("\n".join(served_instruction_lines(args.concurrency, args.served_instructions)))
        return 0
    if args.instructions:
        if args.ledger == "off":
            print("\n".join(instruction_lines(args.instructions)))
        elif not os.environ.get("BMAD_REDIS_URL"):
            raise SystemExit("--instructions with --ledger needs the test bed's Redis")
        else:
            print("\n".join(ledger_instruction_lines(args.instructions)))
        return 0
    if "real" in args.tables and not have_store:
        raise SystemExit(
            "the real-store table needs the test bed's PostgreSQL and Redis: "
            'set -a; eval "$(.venv/bin/bmad testbed up --no-cluster --services postgres,redis)"'
        )

    if args.ledger != "off" and not os.environ.get("BMAD_REDIS_URL"):
        raise SystemExit(
            "--ledger needs the test bed's Redis as the platform ledger: "
            'set -a; eval "$(.venv/bin/bmad testbed up --no-cluster --services postgres,redis)"'
        )
    ledger_states = {"off": [False], "on": [True], "both": [False, True]}[args.ledger]
    if args.pin:
        pin()

    # Every round measures each table and then the bare endpoint, so that a drift of the
    # machine's speed during the run reaches both sides of every ratio; each level's
    # result is the round with the median throughput (`median_results`).
    rounds: dict[str, list[tuple[list[Result], Breakdown | None]]] = {}
    bare_rounds: list[list[Result]] = []
    for round_no in range(args.rounds):
        profile = args.profile if round_no == 0 else 0.0
        for name in args.tables:
            for with_ledger in ledger_states:
                key = f"{name}, ledger on" if with_ledger else name
                with contextlib.ExitStack() as stack:
                    env = (
                        stack.enter_context(BenchLedger(os.environ["BMAD_REDIS_URL"]))
                        if with_ledger
                        else {}
                    )
                    if name == "in-process":
                        kind, extra = "runtime", env
                    else:
                        dsn = stack.enter_context(Database(os.environ["BMAD_POSTGRES_URL"]))
                        kind = "store"
                        extra = {STORE_DSN: dsn, STORE_REDIS: os.environ["BMAD_REDIS_URL"], **env}
                    rounds.setdefault(key, []).append(
                        measure(
                            kind,
                            args.concurrency,
                            args.seconds,
                            args.max_requests,
                            extra_env=extra,
                            profile_seconds=profile,
                        )
                    )
        bare_rounds.append(measure("bare", args.concurrency, args.seconds, args.max_requests)[0])
    measured = {
        key: (median_results([r for r, _ in got]), got[0][1]) for key, got in rounds.items()
    }
    bare = median_results(bare_rounds)
    cpu = platform.processor() or platform.machine()
    load_avg = os.getloadavg()[0]
    lines = [
        f"\n### bench/runtime — {dt.date.today().isoformat()}\n",
        f"Machine: {os.cpu_count()} cores, {cpu}, Python {platform.python_version()}; one "
        f"uvicorn worker per server, load generator ({LOAD_GENERATOR}) on the same machine "
        "over loopback, "
        f"garbage collector: {_collector_line()}, "
        + (f"{PINNING.line()}, " if PINNING is not None else "CPUs not pinned, ")
        + f"{args.seconds:g}s per level"
        + (
            f", {args.rounds} rounds (each: every table, then the bare endpoint), each "
            "level's row the round with the median requests/s"
            if args.rounds > 1
            else ""
        )
        + f"; 1-minute load average {load_avg:.1f} at the end (2 "
        "cores: above 2, other work shared the machine). Runtime: POST /v1/invoke with the "
        "echo model, auth and limits off. Bare: a FastAPI endpoint that parses the same "
        "body and returns the echo. Throughput ratio: runtime / bare requests/s (the load "
        "generator shares the machine, so at high concurrency it may be the bottleneck); "
        "CPU ratio: the server's CPU time per request, runtime / bare.\n",
    ]
    titles = {
        "in-process": "In-process store (conversations kept in the runtime's memory)",
        "real": "Real store: the test bed's PostgreSQL and Redis bound (create_default_app; "
        "a fresh migrated database; every request opens a conversation, stores two turns, "
        "a usage record and an audit entry)",
    }
    for key, (results, found) in measured.items():
        name, _, with_ledger = key.partition(", ")
        how = (
            "appended to the test bed's Redis as the agent's ACL user before it leaves"
            if os.environ.get(LEDGER_WAIT)
            else "kept in the server's usage spool before it leaves and shipped to the test "
            "bed's Redis as the agent's ACL user every 20 ms"
        )
        title = titles[name] + (
            f"; with the usage ledger (every answer {how}, the budget key read every 2 s)"
            if with_ledger
            else ""
        )
        lines += [f"{title}:\n", *table(list(zip(results, bare, strict=True))), ""]
        at_level = [r for r in results if r.concurrency == PROFILE_LEVEL]
        if found is not None and at_level:
            lines += breakdown_lines(f"Profile, {name} store", at_level[0], found)
            lines.append("")
    for name in args.tables:
        if name in measured and f"{name}, ledger on" in measured:
            off, on = measured[name][0], measured[f"{name}, ledger on"][0]
            lines += [
                f"Usage ledger on / off, {name} store (ratio above 1: the ledger costs more "
                "per request):\n",
                *ledger_table(on, off),
                "",
            ]
    errors = sum(r.errors for results, _ in measured.values() for r in results)
    errors += sum(r.errors for r in bare)
    if errors:
        lines.append(f"\n{errors} requests failed during the run: the numbers are suspect.")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write:
        report_file.add_to_section(args.write, SECTION, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
