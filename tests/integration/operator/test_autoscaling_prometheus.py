"""The autoscaler's queries and Prometheus client against the test bed's real Prometheus.

Runtime metrics are pushed through the real Pushgateway (which Prometheus scrapes every
second, keeping the pushed labels), the way several replicas of one Agent would export
them, and read back with the queries the autoscaler evaluates.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import TypeVar

import httpx
import pytest

from bmad_operator.autoscaling import prometheus as prom
from bmad_operator.autoscaling import queries, reasons

pytestmark = pytest.mark.integration

T = TypeVar("T")
DEADLINE_SECONDS = 30.0


class Gateway:
    """Pushes one replica's metrics into the Pushgateway, grouped like a scrape would."""

    def __init__(self, url: str, namespace: str, agent: str) -> None:
        self.url = url.rstrip("/")
        self.namespace = namespace
        self.agent = agent
        self.groups: list[str] = []

    def group(self, pod: str) -> str:
        return (
            f"{self.url}/metrics/job/bmad-autoscaling-test/namespace/{self.namespace}"
            f"/agent/{self.agent}/instance/{pod}"
        )

    async def push(self, http: httpx.AsyncClient, pod: str, text: str) -> None:
        group = self.group(pod)
        response = await http.put(group, content=text.encode())
        response.raise_for_status()
        if group not in self.groups:
            self.groups.append(group)

    async def clear(self, http: httpx.AsyncClient) -> None:
        for group in self.groups:
            await http.delete(group)


async def eventually(read: Callable[[], Awaitable[T]], ok: Callable[[T], bool]) -> T:
    """Poll until `ok(read())`, or fail with the last value or error at the deadline."""
    deadline = time.monotonic() + DEADLINE_SECONDS
    last: object = None
    while time.monotonic() < deadline:
        try:
            value = await read()
        except prom.MetricError as exc:
            last = exc
        else:
            if ok(value):
                return value
            last = value
        await asyncio.sleep(0.5)
    raise AssertionError(f"not reached within {DEADLINE_SECONDS} s; last: {last!r}")


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


@pytest.fixture
async def gateway(prometheus: dict[str, str], http: httpx.AsyncClient) -> AsyncIterator[Gateway]:
    gw = Gateway(prometheus["pushgateway"], "team-autoscale", f"dev-{uuid.uuid4().hex[:8]}")
    yield gw
    await gw.clear(http)


@pytest.fixture
async def client(prometheus: dict[str, str]) -> AsyncIterator[prom.Client]:
    async with prom.Client(prometheus["prometheus"]) as c:
        yield c


GAUGES = """# TYPE bmad_agent_queue_depth gauge
bmad_agent_queue_depth {queue}
# TYPE bmad_agent_inflight gauge
bmad_agent_inflight {inflight}
"""


async def test_two_replicas_report_one_queue_and_their_own_inflight(
    gateway: Gateway, http: httpx.AsyncClient, client: prom.Client
) -> None:
    # Both replicas read the length of the same stream; each serves its own requests.
    await gateway.push(http, "dev-a", GAUGES.format(queue=48, inflight=2))
    await gateway.push(http, "dev-b", GAUGES.format(queue=48, inflight=3))
    selector = queries.Selector(gateway.namespace, gateway.agent)
    inflight = await eventually(lambda: client.value(queries.inflight(selector)), lambda v: v == 5)
    assert inflight == 5
    # Counted once, not 96.
    assert await client.value(queries.queue_depth(selector)) == 48


async def test_tokens_per_minute_follows_the_counter(
    gateway: Gateway, http: httpx.AsyncClient, client: prom.Client
) -> None:
    selector = queries.Selector(gateway.namespace, gateway.agent)
    counter = (
        "# TYPE bmad_agent_tokens_total counter\n"
        'bmad_agent_tokens_total{{direction="in",model="echo-1"}} {n}\n'
    )
    raw = f"sum(bmad_agent_tokens_total{selector.matchers()})"
    await gateway.push(http, "dev-a", counter.format(n=0))
    await eventually(lambda: client.value(raw), lambda v: v == 0)
    await gateway.push(http, "dev-a", counter.format(n=6000))
    rate = await eventually(
        lambda: client.value(queries.tokens_per_minute(selector)), lambda v: v > 0
    )
    assert rate > 0


async def test_a_syntax_error_is_query_failed_with_prometheus_text(
    client: prom.Client,
) -> None:
    with pytest.raises(prom.QueryFailedError) as caught:
        await client.value('sum(bmad_agent_queue_depth{agent="dev"')
    assert caught.value.reason == reasons.QUERY_FAILED
    assert "parse error" in str(caught.value)


async def test_no_matching_series_is_no_data(client: prom.Client) -> None:
    selector = queries.Selector("team-autoscale", f"nobody-{uuid.uuid4().hex[:8]}")
    with pytest.raises(prom.NoDataError) as caught:
        await client.value(queries.queue_depth(selector))
    assert caught.value.reason == reasons.NO_DATA


async def test_a_closed_port_is_prometheus_unavailable() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # Nothing listens there any more.
    async with prom.Client(f"http://127.0.0.1:{port}") as closed:
        with pytest.raises(prom.PrometheusUnavailableError) as caught:
            await closed.value("up")
    assert caught.value.reason == reasons.PROMETHEUS_UNAVAILABLE
    assert f"127.0.0.1:{port}" in str(caught.value)


async def test_a_range_query_returns_the_history(
    gateway: Gateway, http: httpx.AsyncClient, client: prom.Client
) -> None:
    selector = queries.Selector(gateway.namespace, gateway.agent)
    query = queries.queue_depth(selector)
    await gateway.push(http, "dev-a", GAUGES.format(queue=3, inflight=0))
    await eventually(lambda: client.value(query), lambda v: v == 3)
    await gateway.push(http, "dev-a", GAUGES.format(queue=7, inflight=0))
    await eventually(lambda: client.value(query), lambda v: v == 7)

    async def history() -> list[prom.Series]:
        now = time.time()
        return await client.query_range(query, start=now - 60, end=now, step=1)

    [series] = await eventually(history, lambda s: len(s) == 1)
    values = [v for _, v in series.points]
    assert 3 in values
    assert values[-1] == 7
    times = [t for t, _ in series.points]
    assert times == sorted(times)
