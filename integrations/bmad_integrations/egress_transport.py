"""The HTTP side of the egress policy: httpx transports that judge every request.

Apart from `egress` so that importing the policy (every Integration check does) does
not import httpx: only a client that is built needs these.
"""

from __future__ import annotations

import httpx

from bmad_integrations import egress


class AsyncTransport(httpx.AsyncBaseTransport):
    """Judges each request's destination, then sends it to the judged address."""

    def __init__(
        self, policy: egress.Policy, *, field: str, inner: httpx.AsyncBaseTransport
    ) -> None:
        self.policy = policy
        self.field = field
        self.inner = inner

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        destination = await self.policy.destination(
            request.url.host,
            egress.url_port(request.url),
            field=egress.field_of(request, self.field),
        )
        return await self.inner.handle_async_request(egress.pinned_request(request, destination))

    async def aclose(self) -> None:
        await self.inner.aclose()


class SyncTransport(httpx.BaseTransport):
    """`AsyncTransport` for the SDKs that run in a worker thread."""

    def __init__(self, policy: egress.Policy, *, field: str, inner: httpx.BaseTransport) -> None:
        self.policy = policy
        self.field = field
        self.inner = inner

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        destination = self.policy.destination_sync(
            request.url.host,
            egress.url_port(request.url),
            field=egress.field_of(request, self.field),
        )
        return self.inner.handle_request(egress.pinned_request(request, destination))

    def close(self) -> None:
        self.inner.close()
