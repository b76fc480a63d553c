"""The model chain of an agent: the primary, then ``model.fallbacks`` in order.

Each provider retries on its own (see `base.HttpProvider`); one that still fails hands
over to the next. A stream fails over only before its first piece of text: once the
caller has seen part of an answer, a failure is reported, not papered over with a
different model's answer. The `ports.Completion` names the provider and model that
served.

`build` turns the agent's ``model`` config and the mounted bindings into a router:
credentials come from the llm Integration named by ``integration`` (the binding's
``baseUrl`` and ``apiKey``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
from opentelemetry import trace

from bmad_runtime import bindings as bindings_mod
from bmad_runtime import config as config_mod
from bmad_runtime import ports
from bmad_runtime.providers import anthropic, base, echo, openai_compat

logger = logging.getLogger(__name__)


class AllProvidersFailedError(Exception):
    """Every model of the chain failed; `errors` in the order they were tried."""

    def __init__(self, errors: Sequence[base.ProviderError]) -> None:
        self.errors = list(errors)
        super().__init__(self.message)

    @property
    def message(self) -> str:
        tried = "; ".join(e.summary for e in self.errors) or "no model configured"
        return f"no model could answer ({tried})"

    @property
    def rate_limited(self) -> bool:
        return bool(self.errors) and all(e.status == 429 for e in self.errors)

    @property
    def retry_after(self) -> float | None:
        waits = [e.retry_after for e in self.errors if e.retry_after is not None]
        return min(waits) if waits else None


class CallObserver(Protocol):
    """Told of every call to one provider of the chain, answered or failed
    (`telemetry.Metrics.record_operation`)."""

    def __call__(
        self, *, provider: str, model: str, seconds: float, error_type: str = ""
    ) -> None: ...


def error_type(exc: base.ProviderError) -> str:
    """A failure's low-cardinality name: the HTTP status, else the exception's class."""
    return str(exc.status) if exc.status is not None else type(exc).__name__


@dataclass(frozen=True)
class Reachability:
    """Whether one model of the chain answered its API's probe."""

    provider: str
    model: str
    reachable: bool


async def _ping(provider: base.BaseProvider, within: float) -> bool:
    try:
        return await asyncio.wait_for(provider.ping(), timeout=within)
    except TimeoutError:
        logger.warning(
            "probe: %s/%s did not answer within %ss", provider.name, provider.model, within
        )
    except Exception as exc:
        logger.warning("probe: %s/%s failed: %s", provider.name, provider.model, type(exc).__name__)
    return False


class ModelRouter:
    def __init__(
        self,
        chain: Sequence[base.BaseProvider],
        *,
        client: httpx.AsyncClient | None = None,
        ready_ttl: float = 10.0,
        tracer: trace.Tracer | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not chain:
            raise ValueError("a model router needs at least one provider")
        self.chain = list(chain)
        self.tracer: trace.Tracer = tracer or trace.NoOpTracer()
        # Set by the app to its metrics (`create_app`): every provider call is observed.
        self.observer: CallObserver | None = None
        self._client = client
        self._ready_ttl = ready_ttl
        self._clock = clock
        self._probed: tuple[float, tuple[Reachability, ...]] | None = None

    @property
    def primary(self) -> base.BaseProvider:
        return self.chain[0]

    def requested_model(self, completion: ports.Completion) -> str:
        """The model the chain asked for that gave ``completion``: the entry of the provider
        that answered (a provider may name the model longer, ``gpt-4o`` answered by
        ``gpt-4o-2024-08-06``)."""
        if len(self.chain) == 1:  # what the lists below come to for a chain of one
            only = self.chain[0]
            return only.model if only.name == completion.provider else completion.model
        same = [p.model for p in self.chain if p.name == completion.provider]
        prefixes = [model for model in same if completion.model.startswith(model)]
        if prefixes:
            return max(prefixes, key=len)  # gpt-4o-mini-…, not gpt-4o, when both are asked
        return same[0] if same else completion.model

    def _observe(
        self, provider: base.BaseProvider, began: float, exc: base.ProviderError | None = None
    ) -> None:
        if self.observer is not None:
            self.observer(
                provider=provider.name,
                model=provider.model,
                seconds=time.perf_counter() - began,
                error_type="" if exc is None else error_type(exc),
            )

    def _attributes(self, provider: base.BaseProvider, position: int) -> dict[str, Any]:
        return {
            "gen_ai.system": provider.name,
            "gen_ai.request.model": provider.model,
            "bmad.model.position": position,
        }

    async def complete(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> ports.Completion:
        errors: list[base.ProviderError] = []
        if isinstance(self.tracer, trace.NoOpTracer):  # no spans to make: skip their work
            for position, provider in enumerate(self.chain):
                began = time.perf_counter()
                try:
                    completion = await provider.complete(messages, params=params)
                except base.ProviderError as exc:
                    self._observe(provider, began, exc)
                    errors.append(exc)
                    self._log_failover(exc, position)
                    continue
                self._observe(provider, began)
                return completion
            raise AllProvidersFailedError(errors)
        for position, provider in enumerate(self.chain):
            with self.tracer.start_as_current_span(
                "model.complete",
                kind=trace.SpanKind.CLIENT,
                attributes=self._attributes(provider, position),
            ) as span:
                began = time.perf_counter()
                try:
                    completion = await provider.complete(messages, params=params)
                except base.ProviderError as exc:
                    self._observe(provider, began, exc)
                    span.set_status(trace.Status(trace.StatusCode.ERROR, exc.message))
                    errors.append(exc)
                    self._log_failover(exc, position)
                    continue
                self._observe(provider, began)
                _record_usage(span, completion)
                return completion
        raise AllProvidersFailedError(errors)

    async def stream_events(
        self, messages: Sequence[ports.Message], *, params: dict[str, Any]
    ) -> AsyncGenerator[base.StreamEvent, None]:
        errors: list[base.ProviderError] = []
        for position, provider in enumerate(self.chain):
            # Not a "current" span: this generator is resumed from the caller's
            # context at each step, and a context attached here could not be detached.
            span = self.tracer.start_span(
                "model.stream",
                kind=trace.SpanKind.CLIENT,
                attributes=self._attributes(provider, position),
            )
            started = False
            began = time.perf_counter()
            try:
                async with contextlib.aclosing(
                    provider.stream_events(messages, params=params)
                ) as events:
                    async for event in events:
                        started = True
                        if isinstance(event, ports.Completion):
                            # A stream's call is timed until its summary, the last event.
                            self._observe(provider, began)
                            _record_usage(span, event)
                            yield event
                        else:
                            yield base.Delta(event.text, provider.name, provider.model)
                return
            except base.ProviderError as exc:
                self._observe(provider, began, exc)
                span.set_status(trace.Status(trace.StatusCode.ERROR, exc.message))
                if started:
                    raise
                errors.append(exc)
                self._log_failover(exc, position)
            finally:
                span.end()
        raise AllProvidersFailedError(errors)

    def _log_failover(self, exc: base.ProviderError, position: int) -> None:
        if position + 1 < len(self.chain):
            nxt = self.chain[position + 1]
            logger.warning("%s; failing over to %s/%s", exc.summary, nxt.name, nxt.model)
        else:
            logger.warning("%s; no fallback left", exc.summary)

    async def probe(self, *, within: float = 2.0) -> tuple[Reachability, ...]:
        """Whether each model of the chain answers its API's probe, in chain order, each
        given `within` seconds (the answer is cached for ``ready_ttl`` seconds)."""
        now = self._clock()
        if self._probed is not None and now - self._probed[0] < self._ready_ttl:
            return self._probed[1]
        answers = await asyncio.gather(*(_ping(p, within) for p in self.chain))
        found = tuple(
            Reachability(p.name, p.model, ok) for p, ok in zip(self.chain, answers, strict=True)
        )
        self._probed = (now, found)
        return found

    async def aclose(self) -> None:
        for provider in self.chain:
            await provider.aclose()
        if self._client is not None:
            await self._client.aclose()


def _record_usage(span: trace.Span, completion: ports.Completion) -> None:
    span.set_attribute("gen_ai.response.model", completion.model)
    span.set_attribute("gen_ai.usage.input_tokens", completion.usage.tokens_in)
    span.set_attribute("gen_ai.usage.output_tokens", completion.usage.tokens_out)


def _llm_binding(
    ref: config_mod.ModelRef, found: Mapping[str, bindings_mod.Binding]
) -> bindings_mod.LlmSettings:
    where = f"model {ref.provider}/{ref.name}"
    if ref.integration is None:
        candidates = [
            b
            for b in bindings_mod.of_type(found, "llm")
            if (b.provider == "anthropic") == (ref.provider == "anthropic")
        ]
        if len(candidates) != 1:
            raise config_mod.ConfigError(
                f"{where} names no integration and {len(candidates)} llm bindings of that kind "
                "are mounted: set integration to the llm Integration that holds its API key"
            )
        binding = candidates[0]
    else:
        found_binding = found.get(ref.integration)
        if found_binding is None:
            raise config_mod.ConfigError(
                f"{where} uses Integration {ref.integration!r}, but no binding of that name is "
                f"mounted under ${bindings_mod.ROOT_ENV}: add it to spec.integrations"
            )
        binding = found_binding
    settings = binding.settings()
    if not isinstance(settings, bindings_mod.LlmSettings):
        raise config_mod.ConfigError(
            f"{where} uses Integration {binding.name!r}, which is of type {binding.type!r}, not llm"
        )
    if (settings.provider == "anthropic") != (ref.provider == "anthropic"):
        raise config_mod.ConfigError(
            f"{where} uses Integration {binding.name!r}, whose provider is "
            f"{settings.provider!r}: Anthropic models need an anthropic Integration and "
            "OpenAI-style models an openai or openai-compatible one"
        )
    return settings


def build_provider(
    ref: config_mod.ModelRef,
    llm: bindings_mod.LlmSettings | None,
    *,
    params: Mapping[str, Any],
    client: httpx.AsyncClient,
    policy: base.RetryPolicy,
) -> base.BaseProvider:
    if ref.provider == "echo" or llm is None:
        return echo.EchoProvider(ref.name, params=params)
    cls: type[base.HttpProvider] = (
        anthropic.AnthropicProvider
        if ref.provider == "anthropic"
        else openai_compat.OpenAICompatProvider
    )
    return cls(
        name=ref.provider,
        model=ref.name,
        base_url=llm.base_url,
        api_key=llm.api_key,
        params=params,
        client=client,
        policy=policy,
    )


def build(
    model: config_mod.ModelConfig,
    found: Mapping[str, bindings_mod.Binding],
    *,
    policy: base.RetryPolicy | None = None,
    timeout: float = 120.0,
    transport: httpx.AsyncBaseTransport | None = None,
    ready_ttl: float = 10.0,
) -> ModelRouter:
    """The router of an agent's model chain; the fallbacks share the primary's params.

    Raises `config.ConfigError` when a model's credentials are not mounted.
    """
    # Resolve every credential first: a broken chain fails before a client exists.
    resolved = [
        (ref, None if ref.provider == "echo" else _llm_binding(ref, found)) for ref in model.chain
    ]
    client = httpx.AsyncClient(
        transport=transport,
        timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)),
        limits=httpx.Limits(max_connections=200, max_keepalive_connections=50),
    )
    chain = [
        build_provider(
            ref, llm, params=model.params, client=client, policy=policy or base.RetryPolicy()
        )
        for ref, llm in resolved
    ]
    return ModelRouter(chain, client=client, ready_ttl=ready_ttl)
