"""Make the test bed's loopback servers reachable from the real node's pods.

Every server of the test bed listens on 127.0.0.1 only, and pods cannot reach the
host's loopback. This process listens on the host's end of the node's veth
(`nodenet.HOST_ADDRESS`), on the same port numbers, and copies each connection to
127.0.0.1: the kube-apiserver, PostgreSQL, Redis, MinIO, Prometheus, the
Pushgateway, stripe-mock and the SMTP server then have one address for pods, and the
host needs no NAT rule for it. It never connects anywhere but loopback.

    python -m bmad_testbed.relay 10.217.0.1 6443 5432 ...
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Awaitable, Callable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]

TARGET = "127.0.0.1"
CHUNK = 64 * 1024


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(CHUNK):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        with contextlib.suppress(OSError, RuntimeError):
            if writer.can_write_eof():
                writer.write_eof()


def _handler(port: int) -> Handler:
    async def handle(client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        try:
            server_r, server_w = await asyncio.open_connection(TARGET, port)
        except OSError:
            client_w.close()
            return
        try:
            await asyncio.gather(_pipe(client_r, server_w), _pipe(server_r, client_w))
        finally:
            for w in (client_w, server_w):
                w.close()
                with contextlib.suppress(OSError, ConnectionError):
                    await w.wait_closed()

    return handle


async def serve(listen: str, ports: list[int]) -> None:
    servers = [
        await asyncio.start_server(_handler(p), listen, p, reuse_address=True) for p in ports
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"relay: {listen} -> {TARGET} on ports {' '.join(map(str, ports))}", flush=True)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print("usage: python -m bmad_testbed.relay LISTEN_ADDRESS PORT...", file=sys.stderr)
        return 2
    asyncio.run(serve(argv[0], [int(p) for p in argv[1:]]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
