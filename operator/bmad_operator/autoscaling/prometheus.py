"""A small async client of the Prometheus HTTP API, with errors the autoscaler can report.

Only the two calls the autoscaler needs: ``/api/v1/query`` (instant) and
``/api/v1/query_range`` (history for the forecaster). Every failure is a
:class:`MetricError` whose ``reason`` is the word of the Agent's ``ScalingActive``
condition:

- ``PrometheusUnavailable``: no answer (connection refused, timeout), a 5xx, or an
  answer that is not the Prometheus API (wrong URL, a proxy's page, 401/403/404);
- ``QueryFailed``: Prometheus refused the query (400 ``bad_data``, 422 ``execution``),
  with Prometheus's own error text, or returned a result the autoscaler cannot use
  (a range vector, several series where one number is needed);
- ``NoData``: the query matched no series, or its value is NaN.

The ``httpx.AsyncClient`` is injected (tests point it anywhere); messages show the
server's address without any user:password part.
"""

from __future__ import annotations

import math
import urllib.parse
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, NamedTuple

from bmad_integrations import lazy
from bmad_operator.autoscaling import reasons

if TYPE_CHECKING:
    import httpx
else:  # imported when a client is first built: not at start
    httpx = lazy.module("httpx")

DEFAULT_TIMEOUT_SECONDS = 5.0


class MetricError(Exception):
    """A metric could not be read; ``reason`` is a ScalingActive reason."""

    reason: str = reasons.PROMETHEUS_UNAVAILABLE

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class PrometheusUnavailableError(MetricError):
    reason = reasons.PROMETHEUS_UNAVAILABLE


class QueryFailedError(MetricError):
    reason = reasons.QUERY_FAILED


class NoDataError(MetricError):
    reason = reasons.NO_DATA


class Sample(NamedTuple):
    """One series of an instant vector (or a scalar: no labels)."""

    labels: Mapping[str, str]
    timestamp: float
    value: float


class Series(NamedTuple):
    """One series of a range query: (timestamp, value) points, oldest first."""

    labels: Mapping[str, str]
    points: tuple[tuple[float, float], ...]


def redact(url: str) -> str:
    """The URL without user:password, for messages."""
    parts = urllib.parse.urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    return urllib.parse.urlunsplit(parts._replace(netloc=host))


def _number(text: Any) -> float:
    # Prometheus sends sample values as strings: "1", "NaN", "+Inf".
    try:
        return float(text)
    except (TypeError, ValueError) as exc:
        raise QueryFailedError(
            f"Prometheus returned a value that is not a number: {text!r}"
        ) from exc


class Client:
    """Prometheus at ``base_url`` (for example ``http://prometheus:9090``)."""

    def __init__(
        self,
        base_url: str,
        *,
        http: httpx.AsyncClient | None = None,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self._owned = http is None
        self._http = http or httpx.AsyncClient(timeout=timeout)
        self._timeout = timeout

    async def aclose(self) -> None:
        if self._owned:
            await self._http.aclose()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def where(self) -> str:
        return redact(self.base_url)

    async def _call(self, endpoint: str, form: Mapping[str, str]) -> dict[str, Any]:
        url = f"{self.base_url}/api/v1/{endpoint}"
        try:
            # POST with a form: the same API as GET, without URL length limits for
            # long queries.
            response = await self._http.post(url, data=dict(form), timeout=self._timeout)
        except httpx.TimeoutException as exc:
            raise PrometheusUnavailableError(
                f"Prometheus at {self.where} did not answer within {self._timeout:g} s"
            ) from exc
        except httpx.TransportError as exc:
            raise PrometheusUnavailableError(
                f"cannot reach Prometheus at {self.where}: {type(exc).__name__}: {exc}"
            ) from exc
        try:
            body = response.json()
        except ValueError:
            body = None
        if not isinstance(body, dict) or "status" not in body:
            raise PrometheusUnavailableError(
                f"{self.where} did not answer as the Prometheus API "
                f"(HTTP {response.status_code} to /api/v1/{endpoint})"
            )
        if body["status"] == "success" and response.status_code < 300:
            data = body.get("data")
            if not isinstance(data, dict):
                raise PrometheusUnavailableError(f"Prometheus at {self.where} sent no data")
            return data
        error = str(body.get("error") or f"HTTP {response.status_code}")
        kind = str(body.get("errorType") or "")
        if response.status_code in (400, 422) or kind in ("bad_data", "execution"):
            raise QueryFailedError(error)
        raise PrometheusUnavailableError(
            f"Prometheus at {self.where} answered HTTP {response.status_code}"
            f"{f' ({kind})' if kind else ''}: {error}"
        )

    async def query(self, promql: str, *, at: float | None = None) -> list[Sample]:
        """The instant vector (or scalar) of ``promql``; NoData when it is empty."""
        form = {"query": promql}
        if at is not None:
            form["time"] = f"{at:.3f}"
        data = await self._call("query", form)
        kind, result = data.get("resultType"), data.get("result")
        if kind == "scalar" and isinstance(result, list) and len(result) == 2:
            return [Sample({}, float(result[0]), _number(result[1]))]
        if kind != "vector" or not isinstance(result, list):
            hint = (
                ": it selects a range (x[5m]); wrap it in a function such as rate() or "
                "avg_over_time()"
                if kind == "matrix"
                else ""
            )
            raise QueryFailedError(f"the query returns a {kind}, not an instant vector{hint}")
        if not result:
            raise NoDataError(f"no series match {promql}")
        return [
            Sample(
                dict(item.get("metric") or {}), float(item["value"][0]), _number(item["value"][1])
            )
            for item in result
        ]

    async def value(self, promql: str, *, at: float | None = None) -> float:
        """The one number ``promql`` returns."""
        samples = await self.query(promql, at=at)
        if len(samples) > 1:
            raise QueryFailedError(
                f"the query returns {len(samples)} series, not one number: aggregate it, "
                "for example with sum(...) or max(...)"
            )
        number = samples[0].value
        if math.isnan(number):
            raise NoDataError(f"the query's value is NaN: {promql}")
        if math.isinf(number):
            raise QueryFailedError(f"the query's value is {number}: {promql}")
        return number

    async def query_range(
        self, promql: str, *, start: float, end: float, step: float
    ) -> list[Series]:
        """The series of ``promql`` from ``start`` to ``end``; NoData when none."""
        data = await self._call(
            "query_range",
            {"query": promql, "start": f"{start:.3f}", "end": f"{end:.3f}", "step": f"{step:g}"},
        )
        result = data.get("result")
        if data.get("resultType") != "matrix" or not isinstance(result, list):
            raise QueryFailedError(f"the range query returned a {data.get('resultType')}")
        if not result:
            raise NoDataError(f"no series match {promql} between {start:.0f} and {end:.0f}")
        return [
            Series(
                dict(item.get("metric") or {}),
                tuple((float(t), _number(v)) for t, v in item.get("values") or []),
            )
            for item in result
        ]


class Unconfigured:
    """Stands in for Prometheus when the operator has none: every read says what to set."""

    MESSAGE = (
        "the operator has no Prometheus to read metrics from: set "
        "BMAD_OPERATOR_PROMETHEUS_URL in its settings"
    )

    async def aclose(self) -> None:
        return None

    async def value(self, promql: str, *, at: float | None = None) -> float:
        raise PrometheusUnavailableError(self.MESSAGE)

    async def query_range(
        self, promql: str, *, start: float, end: float, step: float
    ) -> list[Series]:
        raise PrometheusUnavailableError(self.MESSAGE)
