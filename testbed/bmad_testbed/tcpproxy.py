"""A TCP front for several local servers, as a Service is for a Deployment's pods.

Tests run operator replicas as processes, each with its own webhook port; the API
server has one webhook URL. This listens on one loopback port and passes each
connection through (TLS untouched) to the next backend in turn that accepts it, so a
dead replica is skipped the way a Service skips a pod that is not ready. Loopback only.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
from collections import Counter

from bmad_testbed import procs

HOST = "127.0.0.1"


class TcpProxy:
    def __init__(self, backends: list[int]) -> None:
        self.backends = list(backends)
        self.port = procs.free_port()
        self.connections: Counter[int] = Counter()  # backend port -> connections passed
        self.unserved = 0  # connections no backend accepted
        self._turn = itertools.count()
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="tcp-proxy")
        self._server: asyncio.base_events.Server | None = None

    def __enter__(self) -> TcpProxy:
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the TCP proxy did not start")
        return self

    def __exit__(self, *_: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, HOST, self.port)
        )
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            # Connections still open are cut (their handlers cancelled and their sockets
            # closed) before the loop goes: nothing is left half-done behind it.
            self._server.close()
            handlers = asyncio.all_tasks(self._loop)
            for task in handlers:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*handlers, return_exceptions=True))
            self._loop.run_until_complete(self._server.wait_closed())
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        start = next(self._turn)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        for i in range(len(self.backends)):
            port = self.backends[(start + i) % len(self.backends)]
            try:
                upstream = await asyncio.wait_for(asyncio.open_connection(HOST, port), 2)
            except (OSError, TimeoutError):
                continue
            self.connections[port] += 1
            break
        if upstream is None:
            self.unserved += 1
            writer.close()
            return
        up_reader, up_writer = upstream

        async def pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, asyncio.IncompleteReadError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
                # One side is done sending, not necessarily done listening: pass the
                # half-close on, so the answer still comes back.
                if dst.can_write_eof():
                    dst.write_eof()

        try:
            await asyncio.gather(pump(reader, up_writer), pump(up_reader, writer))
        finally:
            for w in (up_writer, writer):
                with contextlib.suppress(OSError):
                    w.close()
