"""The Prometheus client classifies every failure into a ScalingActive reason.

These use httpx's MockTransport to produce answers a real Prometheus gives rarely
(a 503, a proxy's HTML page); the integration test talks to the real one.
"""

from __future__ import annotations

import json
from collections.abc import Callable

import httpx
import pytest

from bmad_operator.autoscaling import prometheus, reasons

pytestmark = pytest.mark.unit

Handler = Callable[[httpx.Request], httpx.Response]


def client(handler: Handler, url: str = "http://prom.test:9090") -> prometheus.Client:
    return prometheus.Client(url, http=httpx.AsyncClient(transport=httpx.MockTransport(handler)))


def answer(status: int, body: object) -> Handler:
    def handle(request: httpx.Request) -> httpx.Response:
        return httpx.Response(status, json=body)

    return handle


def vector(*values: str, labels: dict[str, str] | None = None) -> dict[str, object]:
    return {
        "status": "success",
        "data": {
            "resultType": "vector",
            "result": [{"metric": labels or {}, "value": [1700000000.5, v]} for v in values],
        },
    }


async def test_a_value_is_read_with_a_post_form() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json=vector("48"))

    assert await client(handle).value("sum(x)", at=1700000000) == 48.0
    [request] = seen
    assert request.method == "POST"
    assert request.url.path == "/api/v1/query"
    assert dict(httpx.QueryParams(request.content.decode())) == {
        "query": "sum(x)",
        "time": "1700000000.000",
    }


async def test_a_scalar_is_a_value() -> None:
    body = {"status": "success", "data": {"resultType": "scalar", "result": [1.5, "7"]}}
    assert await client(answer(200, body)).value("7") == 7.0


@pytest.mark.parametrize(
    ("handler", "reason", "text"),
    [
        (answer(200, vector()), reasons.NO_DATA, "no series match"),
        (answer(200, vector("NaN")), reasons.NO_DATA, "NaN"),
        (answer(200, vector("+Inf")), reasons.QUERY_FAILED, "inf"),
        (answer(200, vector("1", "2")), reasons.QUERY_FAILED, "2 series, not one number"),
        (
            answer(
                400,
                {
                    "status": "error",
                    "errorType": "bad_data",
                    "error": '1:8: parse error: unexpected "}"',
                },
            ),
            reasons.QUERY_FAILED,
            '1:8: parse error: unexpected "}"',
        ),
        (
            answer(
                422,
                {"status": "error", "errorType": "execution", "error": "many-to-many matching"},
            ),
            reasons.QUERY_FAILED,
            "many-to-many matching",
        ),
        (
            answer(
                200,
                {"status": "success", "data": {"resultType": "matrix", "result": []}},
            ),
            reasons.QUERY_FAILED,
            "wrap it in a function such as rate()",
        ),
        (
            answer(503, {"status": "error", "errorType": "unavailable", "error": "starting"}),
            reasons.PROMETHEUS_UNAVAILABLE,
            "HTTP 503 (unavailable): starting",
        ),
        (
            lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"),
            reasons.PROMETHEUS_UNAVAILABLE,
            "did not answer as the Prometheus API (HTTP 502",
        ),
        (
            lambda request: httpx.Response(404, text="404 page not found"),
            reasons.PROMETHEUS_UNAVAILABLE,
            "did not answer as the Prometheus API (HTTP 404",
        ),
    ],
    ids=[
        "empty",
        "nan",
        "inf",
        "two-series",
        "bad-data",
        "execution",
        "range-vector",
        "503",
        "html-502",
        "not-found",
    ],
)
async def test_failures_are_classified(handler: Handler, reason: str, text: str) -> None:
    with pytest.raises(prometheus.MetricError) as caught:
        await client(handler).value("q")
    assert caught.value.reason == reason
    assert text in str(caught.value)


async def test_no_connection_is_unavailable_and_hides_credentials() -> None:
    def refuse(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    with pytest.raises(prometheus.PrometheusUnavailableError) as caught:
        await client(refuse, "http://scaler:s3cret@prom.test:9090/").value("q")
    assert "cannot reach Prometheus at http://prom.test:9090" in str(caught.value)
    assert "s3cret" not in str(caught.value)


async def test_a_timeout_is_unavailable() -> None:
    def slow(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("timed out", request=request)

    with pytest.raises(prometheus.PrometheusUnavailableError, match="did not answer within 5 s"):
        await client(slow).value("q")


async def test_a_range_query_returns_points_oldest_first() -> None:
    body = {
        "status": "success",
        "data": {
            "resultType": "matrix",
            "result": [{"metric": {"agent": "dev"}, "values": [[10, "1"], [15, "2.5"]]}],
        },
    }
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.content.decode())
        return httpx.Response(200, content=json.dumps(body))

    [series] = await client(handle).query_range("x", start=10, end=15, step=5)
    assert series == prometheus.Series({"agent": "dev"}, ((10.0, 1.0), (15.0, 2.5)))
    assert dict(httpx.QueryParams(seen[0])) == {
        "query": "x",
        "start": "10.000",
        "end": "15.000",
        "step": "5",
    }


async def test_an_empty_range_is_no_data() -> None:
    body = {"status": "success", "data": {"resultType": "matrix", "result": []}}
    with pytest.raises(prometheus.NoDataError):
        await client(answer(200, body)).query_range("x", start=1, end=2, step=1)
