"""Where Integration checks may connect: the operator's egress policy.

A check runs inside the operator, whose namespace every tenant's NetworkPolicy admits,
and connects to a host and port that a tenant wrote. Unguarded, a tenant could point a
check at the cloud's metadata service, the API server, another tenant's agents or a
database inside the cluster, and read the answer in the Integration's status. So every
connection a check makes is judged first, by `Policy.destination`:

- The host is resolved once and every address it resolves to is judged. The client is
  then made to connect to exactly the judged address, so that a second DNS answer (DNS
  rebinding) cannot switch it. TLS still verifies the certificate against the name.
- An address that is not publicly routable (loopback, the private ranges, link-local
  with the metadata address 169.254.169.254, shared address space, unique-local IPv6,
  multicast, reserved…) is refused, and so is any address or name a deny rule names.
  An allow rule wins over both: it is how an administrator lets checks reach an
  in-cluster datastore, or the test bed's servers on loopback.
- With a list of ports, any other port is refused unless an allow rule names the
  destination.

The rules come from the operator's settings, named below. The clients are bound to the
policy where they are built: `egress_transport.AsyncTransport` and `SyncTransport` for
everything that speaks HTTP (httpx, the Stripe SDK, botocore), and each socket
client's own seam in its module (asyncpg, redis-py, smtplib).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple

from bmad_integrations import base, lazy

if TYPE_CHECKING:
    import httpx
else:  # imported when first used: the transports' module (egress_transport) imports it
    httpx = lazy.module("httpx")

ALLOW_SETTING = "BMAD_OPERATOR_EGRESS_ALLOW"
DENY_SETTING = "BMAD_OPERATOR_EGRESS_DENY"
PORTS_SETTING = "BMAD_OPERATOR_EGRESS_PORTS"

# The request extension that names the spec field a request's destination comes from.
FIELD_EXTENSION = "bmad.field"

Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
# host, port -> the addresses it resolves to, in the order to try them.
Resolver = Callable[[str, int], Sequence[str]]

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")
_LABEL = re.compile(r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def system_resolver(host: str, port: int) -> list[str]:
    """The addresses the operator's resolver gives for `host`, without duplicates."""
    found: list[str] = []
    for family, _, _, _, sockaddr in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6):
            address = str(sockaddr[0])
            if address not in found:
                found.append(address)
    return found


class Rule(NamedTuple):
    """One entry of an allow or deny list: an address range or a host name, and a port."""

    text: str
    network: Network | None
    name: str | None
    subdomains: bool
    port: int | None

    def names(self, host: str, port: int) -> bool:
        """Whether the rule is about this host name (never true for an address rule)."""
        if self.name is None or not self._port_matches(port):
            return False
        if self.subdomains:
            return host.endswith("." + self.name)
        return host == self.name

    def covers(self, address: Address, port: int) -> bool:
        if self.network is None or not self._port_matches(port):
            return False
        return any(
            candidate.version == self.network.version and candidate in self.network
            for candidate in (address, _embedded(address))
        )

    def _port_matches(self, port: int) -> bool:
        return self.port is None or self.port == port


def parse_rule(text: str, *, setting: str) -> Rule:
    """One entry: ``10.0.0.0/8``, ``10.1.2.3:5432``, ``[fd00::1]:443``, ``db.example.com``,
    ``.svc.cluster.local`` (its subdomains), ``*.example.com:443``…"""
    raw = text.strip()
    where = f"{setting} entry {raw!r}"
    if not raw:
        raise ValueError(f"{setting} has an empty entry: remove the extra comma")
    if "/" in raw and "://" in raw:
        raise ValueError(f"{where} is a URL: write only the host name or address (and :port)")
    target, port_text = raw, None
    if raw.startswith("["):
        close = raw.find("]")
        rest = raw[close + 1 :] if close > 0 else "?"
        if close < 0 or (rest and not rest.startswith(":")):
            raise ValueError(f"{where} is not [IPv6 address or range] or [...]:port")
        target, port_text = raw[1:close], (rest[1:] if rest else None)
    elif raw.count(":") == 1:
        target, port_text = raw.split(":")
    port = _port(port_text, where=where) if port_text is not None else None
    try:
        network = ipaddress.ip_network(target, strict=False)
    except ValueError:
        pass
    else:
        return Rule(raw, network, None, False, port)
    name = target.lower().rstrip(".")
    subdomains = name.startswith(("*.", "."))
    name = name.removeprefix("*").removeprefix(".")
    if not name or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(
            f"{where} is neither an IP address or range (10.0.0.0/8, fd00::/8) nor a host "
            "name (db.example.com, .svc.cluster.local for its subdomains), with an optional "
            ":port"
        )
    return Rule(raw, None, name, subdomains, port)


def _port(text: str, *, where: str) -> int:
    if not text.isdigit() or not 0 < int(text) < 65536:
        raise ValueError(f"{where} has port {text!r}: write a number from 1 to 65535")
    return int(text)


def _embedded(address: Address) -> Address:
    """The IPv4 address an IPv6 one carries to (mapped, NAT64, 6to4), else itself."""
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:
            return address.ipv4_mapped
        if address in _NAT64:
            return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if address.sixtofour is not None:
            return address.sixtofour
    return address


def is_public(address: Address) -> bool:
    """Globally routable unicast: what a check may reach without an allow rule."""
    for candidate in {address, _embedded(address)}:
        if not candidate.is_global or candidate.is_multicast:
            return False
        if isinstance(candidate, ipaddress.IPv6Address) and candidate in _IPV4_COMPATIBLE:
            return False
    return True


class Destination(NamedTuple):
    """A judged destination: the host as written and the one address to connect to."""

    host: str
    port: int
    address: str

    @property
    def pinned(self) -> bool:
        """Whether the client must be pointed at `address` instead of `host`."""
        return self.address != self.host


def where(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _literal(host: str) -> Address | None:
    try:
        return ipaddress.ip_address(host)
    except ValueError:
        return None


@dataclasses.dataclass(frozen=True)
class Policy:
    """Allow and deny rules and the allowed ports; empty means the defaults only."""

    allow: tuple[Rule, ...] = ()
    deny: tuple[Rule, ...] = ()
    ports: frozenset[int] = frozenset()
    resolver: Resolver = dataclasses.field(default=system_resolver, compare=False, repr=False)

    @classmethod
    def parse(
        cls,
        *,
        allow: Iterable[str] = (),
        deny: Iterable[str] = (),
        ports: Iterable[int] = (),
        resolver: Resolver = system_resolver,
    ) -> Policy:
        """A policy from the settings' text; ValueError says which entry to fix."""
        wanted = frozenset(ports)
        bad = sorted(port for port in wanted if not 0 < port < 65536)
        if bad:
            raise ValueError(f"{PORTS_SETTING} has {bad[0]}: ports are 1 to 65535")
        return cls(
            allow=tuple(parse_rule(text, setting=ALLOW_SETTING) for text in allow),
            deny=tuple(parse_rule(text, setting=DENY_SETTING) for text in deny),
            ports=wanted,
            resolver=resolver,
        )

    def refusal(self, host: str, port: int, addresses: Sequence[Address]) -> str | None:
        """Why the destination is refused (a phrase naming the setting), or None."""
        name = None if _literal(host) is not None else host.lower().rstrip(".")
        if name is not None:
            if any(rule.names(name, port) for rule in self.allow):
                return None
            if any(rule.names(name, port) for rule in self.deny):
                return f"it matches {DENY_SETTING}; {ALLOW_SETTING} can make an exception"
        every_address_allowed = True
        for address in addresses:
            if any(rule.covers(address, port) for rule in self.allow):
                continue
            every_address_allowed = False
            if any(rule.covers(address, port) for rule in self.deny):
                return f"it matches {DENY_SETTING}; {ALLOW_SETTING} can make an exception"
            if not is_public(address):
                return (
                    "it is a loopback, private, link-local or other non-public address; "
                    f"{ALLOW_SETTING} can allow it"
                )
        if self.ports and port not in self.ports and not every_address_allowed:
            return f"port {port} is not in {PORTS_SETTING}; {ALLOW_SETTING} can allow it"
        return None

    def names(self, host: str, port: int) -> bool:
        """Whether an allow rule names this very destination (a host name, or one address).

        Broad ranges do not count: this is the test for following an endpoint that a
        server named on another origin (an OIDC discovery document's jwks_uri).
        """
        literal = _literal(host.strip("[]"))
        if literal is None:
            return any(rule.names(host.lower().rstrip("."), port) for rule in self.allow)
        return any(
            rule.network is not None
            and rule.network.num_addresses == 1
            and rule.covers(literal, port)
            for rule in self.allow
        )

    def judge(self, host: str, port: int, found: Sequence[str], *, field: str) -> Destination:
        """The destination to connect to, or the CheckError that refuses it."""
        addresses = [_address(text) for text in found]
        if not addresses:
            raise unresolvable(host, field=field)
        why = self.refusal(host, port, addresses)
        if why is not None:
            raise base.CheckError(
                base.Reason.DESTINATION_NOT_ALLOWED,
                f"the operator's egress policy does not let checks connect to "
                f"{where(host, port)} ({why}): point {field} at an allowed destination, or "
                "ask the operator's administrator to allow this one",
            )
        return Destination(host, port, found[0])

    def destination_sync(self, host: str, port: int, *, field: str) -> Destination:
        """Resolve (blocking) and judge: for clients that run in a worker thread."""
        host = host.strip("[]")
        literal = _literal(host)
        if literal is not None:
            return self.judge(host, port, [host], field=field)
        try:
            found = self.resolver(host, port)
        except (OSError, UnicodeError):
            raise unresolvable(host, field=field) from None
        return self.judge(host, port, found, field=field)

    async def destination(self, host: str, port: int, *, field: str) -> Destination:
        """Resolve (in a thread, as asyncio does) and judge."""
        if _literal(host.strip("[]")) is not None:
            return self.destination_sync(host, port, field=field)
        return await asyncio.to_thread(self.destination_sync, host, port, field=field)


def _address(text: str) -> Address:
    return ipaddress.ip_address(text.split("%", 1)[0])


def unresolvable(host: str, *, field: str) -> base.CheckError:
    return base.CheckError(
        base.Reason.UNREACHABLE, f"cannot resolve the host {host!r}: check {field}"
    )


# --- HTTP: every request through the policy ----------------------------------------


def url_port(url: httpx.URL) -> int:
    if url.scheme not in _DEFAULT_PORTS:
        raise httpx.UnsupportedProtocol(f"the scheme {url.scheme!r} is not http or https")
    return url.port or _DEFAULT_PORTS[url.scheme]


def pinned_request(request: httpx.Request, destination: Destination) -> httpx.Request:
    """The same request sent to the judged address, with the name kept for Host and TLS."""
    if not destination.pinned:
        return request
    extensions = dict(request.extensions)
    if request.url.scheme == "https":
        # httpcore verifies the certificate against (and sends SNI for) this name.
        extensions["sni_hostname"] = destination.host
    return httpx.Request(
        request.method,
        request.url.copy_with(host=destination.address),
        headers=request.headers,  # Host: stays the name, as it was built
        stream=request.stream,
        extensions=extensions,
    )


def field_of(request: httpx.Request, default: str) -> str:
    """The spec field a request's destination comes from (`FIELD_EXTENSION`), or `default`."""
    field = request.extensions.get(FIELD_EXTENSION)
    return field if isinstance(field, str) else default
