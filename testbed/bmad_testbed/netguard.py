"""Refuse, inside the test process, any connection that would leave this machine.

Tests talk to servers on loopback only, and to the host's end of the real node's veth
while that node's network exists (`nodenet.HOST_ADDRESS`, an address of this machine).
Installing this guard turns an accidental call to a public endpoint (a forgotten API
base, a library phoning home) into an immediate, named error instead of a hang or,
worse, a real request.
"""

from __future__ import annotations

import ipaddress
import socket
from typing import Any

from bmad_testbed import nodenet


class OffMachineConnectionError(ConnectionRefusedError):
    """A test tried to connect somewhere other than this machine."""


_original_connect = socket.socket.connect
_original_connect_ex = socket.socket.connect_ex
_installed = False


def _allowed(family: int, address: Any) -> bool:
    if family == getattr(socket, "AF_UNIX", None):
        return True
    if family not in (socket.AF_INET, socket.AF_INET6):
        return True
    host = address[0] if isinstance(address, tuple) else address
    if host in ("localhost", ""):
        return True
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        # A name: resolving it may already have left the machine; refuse it outright.
        return False
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if str(ip) == nodenet.HOST_ADDRESS:
        return nodenet.exists()
    return ip.is_loopback


def _check(sock: socket.socket, address: Any) -> None:
    if not _allowed(sock.family, address):
        raise OffMachineConnectionError(
            f"the test network guard refused a connection to {address!r}: tests may only "
            f"reach servers on loopback (127.0.0.0/8, ::1) or {nodenet.HOST_ADDRESS} while the "
            "real node runs"
        )


def _guarded_connect(self: socket.socket, address: Any) -> None:
    _check(self, address)
    _original_connect(self, address)


def _guarded_connect_ex(self: socket.socket, address: Any) -> int:
    _check(self, address)
    return _original_connect_ex(self, address)


def install() -> None:
    global _installed  # noqa: PLW0603 - one process-wide switch
    if _installed:
        return
    socket.socket.connect = _guarded_connect  # type: ignore[method-assign,assignment]
    socket.socket.connect_ex = _guarded_connect_ex  # type: ignore[method-assign,assignment]
    _installed = True


def uninstall() -> None:
    global _installed  # noqa: PLW0603
    socket.socket.connect = _original_connect  # type: ignore[method-assign]
    socket.socket.connect_ex = _original_connect_ex  # type: ignore[method-assign]
    _installed = False
