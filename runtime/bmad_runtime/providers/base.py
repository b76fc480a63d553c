"""What every model provider shares: errors, retries, streaming events, SSE parsing.

A provider serves one model. `complete` answers at once; `stream_events` yields the
answer as `Delta`s and ends with the `ports.Completion` (text, usage, who served it),
and `stream` (the `ports.Provider` protocol) is its text-only view. HTTP providers
retry 429, 408 and 5xx answers and transport errors with exponential backoff,
honouring ``Retry-After``; what still fails is a `ProviderError`, and the router
(`router.py`) hands over to the next model of the chain.

Errors never carry what the upstream said in prose: an API's message may echo part of
the key or of the prompt. They carry the status and the upstream's error code only.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import datetime as dt
import email.utils
import json
import logging
import random
import re
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bmad_runtime import ports

logger = logging.getLogger(__name__)

Sleep = Callable[[float], Awaitable[None]]

# Keys a caller may never set through params: the provider owns them.
RESERVED_PARAMS = frozenset({"model", "messages", "stream", "stream_options", "system"})
RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 529})
_CODE = re.compile(r"^[A-Za-z0-9_.\-]{1,64}$")


class ProviderError(Exception):
    """A model call failed (after this provider's retries)."""

    def __init__(
        self,
        message: str,
        *,
        provider: str,
        model: str,
        status: int | None = None,
        retryable: bool = False,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.provider = provider
        self.model = model
        self.status = status
        self.retryable = retryable
        self.retry_after = retry_after
        self.code = code

    @property
    def summary(self) -> str:
        """Safe to show a caller: which model, what went wrong, no upstream prose."""
        return f"{self.provider}/{self.model}: {self.message}"


@dataclass(frozen=True)
class Delta:
    """A piece of a streamed answer; the router names the provider and model that sent
    it (what a stream the caller leaves early is accounted to)."""

    text: str
    provider: str = ""
    model: str = ""


StreamEvent = Delta | ports.Completion


@dataclass(frozen=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently one provider retries before it gives up."""

    attempts: int = 3
    backoff: float = 0.25
    backoff_max: float = 4.0
    retry_after_max: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (1-based)."""
        if retry_after is not None:
            return max(0.0, min(retry_after, self.retry_after_max))
        ceiling = min(self.backoff_max, self.backoff * 2.0 ** (attempt - 1))
        # Full jitter in the upper half: replicas that failed together retry apart.
        jitter = random.random()  # noqa: S311 - jitter, not secrecy
        return ceiling * (0.5 + jitter / 2)


def parse_retry_after(value: str | None, *, now: dt.datetime | None = None) -> float | None:
    """``Retry-After`` as seconds: delta-seconds or an HTTP date (RFC 9110 §10.2.3)."""
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    current = now or dt.datetime.now(dt.UTC)
    return max(0.0, (when - current).total_seconds())


def word_count(text: str) -> int:
    return len(text.split())


def estimate_usage(messages: Sequence[ports.Message], text: str) -> ports.Usage:
    """Whitespace words as tokens: for providers (or streams) that report no usage."""
    return ports.Usage(
        tokens_in=sum(word_count(m.content) for m in messages), tokens_out=word_count(text)
    )


def snake_case(key: str) -> str:
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).lower()


def merge_params(*layers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Later layers win; camelCase keys (as in an Agent's spec) become the APIs' snake_case."""
    merged: dict[str, Any] = {}
    for layer in layers:
        for key, value in (layer or {}).items():
            name = snake_case(key)
            if name in RESERVED_PARAMS or value is None:
                continue
            merged[name] = value
    return merged


def split_chunks(text: str) -> list[str]:
    """Word-sized pieces that join back to exactly ``text``."""
    return [piece for piece in re.split(r"(?<=\s)(?=\S)", text) if piece]


class BaseProvider(abc.ABC):
    """A model behind some API; satisfies `ports.Provider`."""

    name: str
    model: str

    @abc.abstractmethod
    async def complete(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> ports.Completion: ...

    @abc.abstractmethod
    def stream_events(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> AsyncGenerator[StreamEvent, None]: ...

    async def stream(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> AsyncIterator[str]:
        async with contextlib.aclosing(self.stream_events(messages, params=params)) as events:
            async for event in events:
                if isinstance(event, Delta):
                    yield event.text

    async def ping(self) -> bool:
        """Whether the model's API answers at all (readiness)."""
        return True

    async def aclose(self) -> None:
        return None


async def iter_sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of a ``text/event-stream``, per the WHATWG parsing rules."""
    event = ""
    data: list[str] = []
    async for raw in lines:
        line = raw.rstrip("\r")
        if not line:
            if data:
                yield event or "message", "\n".join(data)
            event, data = "", []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if field == "event":
            event = value
        elif field == "data":
            data.append(value)
    if data:
        yield event or "message", "\n".join(data)


class HttpProvider(BaseProvider):
    """A provider behind an HTTP API: one shared `httpx.AsyncClient`, retries, errors."""

    def __init__(
        self,
        *,
        name: str,
        model: str,
        base_url: str,
        api_key: str | None = None,
        params: Mapping[str, Any] | None = None,
        client: httpx.AsyncClient | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        policy: RetryPolicy | None = None,
        timeout: float = 120.0,
        sleep: Sleep = asyncio.sleep,
    ) -> None:
        self.name = name
        self.model = model
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key
        self.params = dict(params or {})
        self.policy = policy or RetryPolicy()
        self._sleep = sleep
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(transport=transport, timeout=timeout)

    def __repr__(self) -> str:  # never the key
        return f"{type(self).__name__}(name={self.name!r}, model={self.model!r})"

    @abc.abstractmethod
    def _headers(self) -> dict[str, str]: ...

    def _error(self, message: str, **kwargs: Any) -> ProviderError:
        return ProviderError(message, provider=self.name, model=self.model, **kwargs)

    def _status_error(self, response: httpx.Response, body: bytes) -> ProviderError:
        status = response.status_code
        code = upstream_code(body)
        detail = f"HTTP {status}" + (f" ({code})" if code else "")
        if status in (401, 403):
            detail += ": the API key of the llm Integration was refused"
        return self._error(
            detail,
            status=status,
            retryable=status in RETRYABLE_STATUS,
            retry_after=parse_retry_after(response.headers.get("retry-after")),
            code=code,
        )

    async def _retrying(
        self, attempt_once: Callable[[], Awaitable[httpx.Response]]
    ) -> httpx.Response:
        """Run one exchange until it gives a 2xx answer or the policy gives up.

        The returned response is open (it may be a stream): the caller closes it.
        """
        last: ProviderError | None = None
        for attempt in range(1, self.policy.attempts + 1):
            try:
                response = await attempt_once()
            except httpx.TimeoutException:
                last = self._error("timed out", retryable=True)
            except httpx.TransportError as exc:
                last = self._error(f"unreachable ({type(exc).__name__})", retryable=True)
            else:
                if response.is_success:
                    return response
                body = await response.aread()
                await response.aclose()
                last = self._status_error(response, body)
            if not last.retryable or attempt == self.policy.attempts:
                break
            delay = self.policy.delay(attempt, last.retry_after)
            logger.info(
                "%s/%s attempt %d failed (%s); retrying in %.2fs",
                self.name,
                self.model,
                attempt,
                last.message,
                delay,
            )
            await self._sleep(delay)
        assert last is not None
        raise last

    async def _post(self, path: str, body: dict[str, Any], *, stream: bool) -> httpx.Response:
        url = f"{self.base_url}/{path.lstrip('/')}"
        headers = {"Accept": "text/event-stream" if stream else "application/json"}
        headers.update(self._headers())

        async def once() -> httpx.Response:
            request = self._client.build_request("POST", url, json=body, headers=headers)
            return await self._client.send(request, stream=stream)

        return await self._retrying(once)

    async def _post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        response = await self._post(path, body, stream=False)
        try:
            data = response.json()
        except ValueError:
            raise self._error("answered with something that is not JSON") from None
        if not isinstance(data, dict):
            raise self._error("answered with JSON that is not an object")
        return data

    async def _sse(self, path: str, body: dict[str, Any]) -> AsyncGenerator[tuple[str, str], None]:
        response = await self._post(path, body, stream=True)
        try:
            async for pair in iter_sse(response.aiter_lines()):
                yield pair
        except httpx.HTTPError as exc:
            raise self._error(f"stream broke off ({type(exc).__name__})") from None
        finally:
            await response.aclose()

    async def _get_ok(self, path: str) -> bool:
        try:
            response = await self._client.get(
                f"{self.base_url}/{path.lstrip('/')}", headers=self._headers(), timeout=5.0
            )
        except httpx.HTTPError:
            return False
        # Any answer but a server error means the API is there; a bad key shows on use.
        return response.status_code < 500

    async def aclose(self) -> None:
        if self._owns_client:
            await self._client.aclose()


def upstream_code(body: bytes) -> str | None:
    """The upstream's machine-readable error code (``error.code`` or ``error.type``)."""
    try:
        data = json.loads(body)
    except ValueError:
        return None
    error = data.get("error") if isinstance(data, dict) else None
    if not isinstance(error, dict):
        return None
    for key in ("code", "type"):
        value = error.get(key)
        if isinstance(value, str) and _CODE.match(value):
            return value
    return None


def usage_of(raw: Any, key_in: str, key_out: str) -> ports.Usage | None:
    if not isinstance(raw, dict):
        return None
    tokens_in, tokens_out = raw.get(key_in), raw.get(key_out)
    if isinstance(tokens_in, int) and isinstance(tokens_out, int):
        return ports.Usage(tokens_in=tokens_in, tokens_out=tokens_out)
    return None
