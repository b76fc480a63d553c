"""The test bed's TCP front (bmad_testbed.tcpproxy): bytes through, dead backends skipped."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator

import pytest

from bmad_testbed import procs, tcpproxy

pytestmark = pytest.mark.unit


class Echo(socketserver.ThreadingTCPServer):
    """Answers each line with its name and the line."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, name: bytes) -> None:
        self.name = name

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                for line in self.rfile:
                    self.wfile.write(name + b":" + line)

        super().__init__((tcpproxy.HOST, 0), Handler)

    @property
    def port(self) -> int:
        return int(self.server_address[1])


@pytest.fixture
def echoes() -> Iterator[list[Echo]]:
    servers = [Echo(b"a"), Echo(b"b")]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    yield servers
    for s in servers:
        s.shutdown()
        s.server_close()


def ask(port: int, line: bytes) -> bytes:
    with socket.create_connection((tcpproxy.HOST, port), timeout=10) as conn:
        conn.sendall(line)
        conn.shutdown(socket.SHUT_WR)
        chunks = []
        while chunk := conn.recv(4096):
            chunks.append(chunk)
    return b"".join(chunks)


def test_connections_go_to_each_backend_in_turn_with_the_bytes_untouched(
    echoes: list[Echo],
) -> None:
    a, b = echoes
    with tcpproxy.TcpProxy([a.port, b.port]) as front:
        answers = {ask(front.port, b"hello\n") for _ in range(4)}
        assert answers == {b"a:hello\n", b"b:hello\n"}
        assert front.connections == {a.port: 2, b.port: 2}
        assert front.unserved == 0


def test_a_backend_that_refuses_connections_is_skipped(echoes: list[Echo]) -> None:
    a, _ = echoes
    dead = procs.free_port()  # nothing listens there
    with tcpproxy.TcpProxy([dead, a.port]) as front:
        assert [ask(front.port, b"x\n") for _ in range(3)] == [b"a:x\n"] * 3
        assert front.connections == {a.port: 3}


def test_with_no_backend_alive_the_connection_is_closed_and_counted() -> None:
    with tcpproxy.TcpProxy([procs.free_port()]) as front:
        with socket.create_connection((tcpproxy.HOST, front.port), timeout=10) as conn:
            assert conn.recv(4096) == b""  # closed by the front
        assert front.unserved == 1


def test_leaving_cuts_connections_still_open(echoes: list[Echo]) -> None:
    a, _ = echoes
    with tcpproxy.TcpProxy([a.port]) as front:
        conn = socket.create_connection((tcpproxy.HOST, front.port), timeout=10)
        conn.sendall(b"x\n")
        assert conn.recv(4096) == b"a:x\n"
    with conn:
        assert conn.recv(4096) == b""  # the front closed it on its way out
