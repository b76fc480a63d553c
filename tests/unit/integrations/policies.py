"""Egress policies for the unit tests: every name resolves without asking any resolver.

`OPEN` is the operator's default policy with a resolver that answers one public
address for every name, so that checks against mock transports are judged (and
pinned) as in production without a DNS query leaving the process.
"""

from __future__ import annotations

from collections.abc import Sequence

import httpx

from bmad_integrations import egress

# A public address: judged like any Internet host. Nothing connects to it (the tests
# use mock transports and stand-in clients).
PUBLIC = "203.0.114.7"


def resolve_public(host: str, port: int) -> Sequence[str]:
    return [PUBLIC]


OPEN = egress.Policy(resolver=resolve_public)


def as_named(request: httpx.Request) -> str:
    """The URL a check asked for. The request itself went to the judged address
    (`PUBLIC`) with the name in its Host header."""
    assert request.url.host == PUBLIC
    return str(request.url.copy_with(netloc=request.headers["Host"].encode()))
