"""The production app: settings from the environment, real clients connected at startup.

`create_default_app` is the factory uvicorn calls (`main.APP_FACTORY`). It reads the
settings, agent.json and the mounted bindings at once (a broken config fails before
serving) and builds the app with `app.create_app`; the app's lifespan then connects
the conversation store of the Agent's memory mode, the authenticator and the rate
limiter, starts the task consumer next to the HTTP API, and undoes all of it at
shutdown.

The memory mode is ``spec.memory.store`` (``BMAD_MEMORY_STORE``). ``durable`` needs
PostgreSQL and Redis: while either is not bound the runtime serves, but is not ready
(``/readyz`` says what to bind, and so does the log) and consumes no tasks; it never
falls back to keeping conversations in memory. ``inProcess`` keeps them in this
process (`memory.inprocess`) and needs nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import urllib.parse
from collections.abc import AsyncIterator, Mapping
from typing import Any

import fastapi
import redis.asyncio
from opentelemetry import trace

from bmad_integrations import taskwire
from bmad_integrations.usage import spool
from bmad_runtime import app as app_mod
from bmad_runtime import auth, ledger, ports, ratelimit, steps, turns
from bmad_runtime import bindings as bindings_mod
from bmad_runtime import config as config_mod
from bmad_runtime import settings as settings_mod
from bmad_runtime.api import deps
from bmad_runtime.bus import client as bus_client
from bmad_runtime.bus import consumer as bus_consumer
from bmad_runtime.memory import inprocess
from bmad_runtime.memory import store as memory_store
from bmad_runtime.providers import base as providers_base
from bmad_runtime.providers import router as providers_router

logger = logging.getLogger(__name__)


class UnavailableStore:
    """Stands in for the store while there is none to use: every call says why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason

    def _refuse(self) -> ports.StoreUnavailableError:
        return ports.StoreUnavailableError(self.reason)

    async def append(self, turn: ports.Turn, *, tenant: str, agent: str, subject: str) -> None:
        raise self._refuse()

    async def recent(
        self, conversation_id: str, *, tenant: str, agent: str, limit: int, subject: str
    ) -> list[ports.Turn]:
        raise self._refuse()

    async def history(
        self,
        conversation_id: str,
        *,
        tenant: str,
        agent: str,
        subject: str | None,
        limit: int = 100,
    ) -> list[ports.Turn]:
        raise self._refuse()

    async def list_conversations(
        self, *, tenant: str, agent: str, subject: str | None, limit: int = 50
    ) -> list[dict[str, Any]]:
        raise self._refuse()

    async def delete_conversation(
        self, conversation_id: str, *, tenant: str, agent: str, subject: str | None
    ) -> bool:
        raise self._refuse()

    async def record_usage(self, record: ports.UsageRecord) -> None:
        raise self._refuse()

    async def audit(
        self, *, tenant: str, agent: str, subject: str, action: str, detail: dict[str, Any]
    ) -> None:
        raise self._refuse()

    async def record_turn(self, record: ports.TurnRecord) -> None:
        raise self._refuse()

    async def ping(self) -> bool:
        return False


class RefusingAuthenticator:
    """Refuses every caller with one error: while starting, or without an issuer."""

    def __init__(self, status: int, code: str, message: str) -> None:
        self.status, self.code, self.message = status, code, message

    async def authenticate(self, authorization: str | None) -> ports.Principal:
        raise ports.AuthError(self.status, self.code, self.message)


def create_default_app(settings: settings_mod.RuntimeSettings | None = None) -> fastapi.FastAPI:
    """The production app: settings from the environment, real dependencies at startup.

    Reads agent.json and the bindings now (a broken config fails before serving), and
    connects the store, the authenticator and the limiter in the lifespan.
    """
    settings = settings or settings_mod.load()
    found = bindings_mod.read_bindings(settings.binding_root)
    agent_config = config_mod.load(settings.agent_config)
    policy = providers_base.RetryPolicy(
        attempts=settings.model_attempts,
        backoff=settings.model_backoff_seconds,
        backoff_max=settings.model_backoff_max_seconds,
        retry_after_max=settings.model_retry_after_max_seconds,
    )
    auth_on = settings.auth_mode == "jwt"
    model_router = providers_router.build(
        agent_config.model,
        found,
        policy=policy,
        timeout=settings.model_timeout_seconds,
        ready_ttl=settings.ready_cache_seconds,
    )

    @contextlib.asynccontextmanager
    async def connect(app: fastapi.FastAPI) -> AsyncIterator[None]:
        state: deps.RuntimeState = app.state.runtime
        async with contextlib.AsyncExitStack() as stack:
            state.store = await _connect_store(settings, agent_config, found, stack)
            if isinstance(state.store, memory_store.PostgresRedisStore):
                state.datastores = dict(state.store.transports)
                state.metrics.record_datastores(state.datastores)
            if auth_on:
                state.authenticator = await _authenticator(settings, found, stack)
                if isinstance(state.authenticator, RefusingAuthenticator):
                    state.auth_problem = state.authenticator.message
            else:
                logger.warning(
                    "spec.auth.mode is none: authentication is off, /v1/* is open to every "
                    "caller that reaches this agent, with every scope"
                )
            state.limiter = await _limiter(settings, agent_config, found, stack)
            state.ledger = _ledger(settings, stack)
            if isinstance(state.store, UnavailableStore):
                state.store_problem = state.store.reason
                logger.warning("the task consumer is not started: the store is not available")
            else:
                await _start_task_consumer(settings, state, stack, found)
            yield

    return app_mod.create_app(
        settings,
        store=UnavailableStore("the agent is starting: its store is not connected yet"),
        providers=model_router,
        authenticator=(
            RefusingAuthenticator(401, "starting", "the agent is starting: retry shortly")
            if auth_on
            else None
        ),
        limiter=None,
        config=agent_config,
        lifespan=connect,
    )


def missing_datastores(settings: settings_mod.RuntimeSettings) -> str:
    """Why the durable store cannot be connected (PostgreSQL or Redis is not bound),
    naming what to bind."""
    missing = [
        kind
        for kind, given in (("postgres", settings.postgres_dsn), ("redis", settings.redis_url))
        if not given
    ]
    if len(missing) != 1:
        bind = "Integrations of type postgres and redis"
    else:
        variable = "BMAD_POSTGRES_DSN" if missing == ["postgres"] else "BMAD_REDIS_URL"
        bind = f"an Integration of type {missing[0]} (or set {variable})"
    return (
        f"spec.memory.store is durable but no {' and no '.join(missing)} is bound: add "
        f"{bind} to spec.integrations, or set spec.memory.store: inProcess to keep "
        "conversations in this process only"
    )


async def _connect_store(
    settings: settings_mod.RuntimeSettings,
    agent_config: config_mod.AgentConfig,
    found: Mapping[str, bindings_mod.Binding],
    stack: contextlib.AsyncExitStack,
) -> ports.ConversationStore:
    """The store of the mode the Agent chose; an `UnavailableStore` saying why if none."""
    if settings.memory_store == "inProcess":
        logger.warning(
            "spec.memory.store is inProcess: conversations, usage and audit records are kept "
            "in this process only, lost on restart and not shared with other replicas"
        )
        return inprocess.InProcessStore()
    dsn, url = settings.postgres_dsn, settings.redis_url
    if not dsn or not url:
        problem = missing_datastores(settings)
        logger.error("not ready: %s", problem)
        return UnavailableStore(problem)
    postgres, redis_settings = bound_datastores(settings, found)
    store = await memory_store.PostgresRedisStore.connect(
        postgres_dsn=dsn,
        redis_url=url,
        recent_turns=max(agent_config.memory.turns, 1),
        ttl_seconds=agent_config.memory.ttl_seconds,
        postgres=postgres,
        redis_settings=redis_settings,
    )
    stack.push_async_callback(store.close)
    return store


def bound_datastores(
    settings: settings_mod.RuntimeSettings, found: Mapping[str, bindings_mod.Binding]
) -> tuple[bindings_mod.PostgresSettings | None, bindings_mod.RedisSettings | None]:
    """The bindings the datastore URLs in use came from, so that their sslMode, TLS flag
    and CA are honoured; None for a URL set explicitly (``BMAD_POSTGRES_DSN``,
    ``BMAD_REDIS_URL``), whose own parameters then decide."""
    postgres = next(
        (
            pg
            # The first binding of the type: the one `with_bindings` took the DSN from.
            for pg in (b.postgres() for b in bindings_mod.of_type(found, "postgres")[:1])
            if pg.dsn == settings.postgres_dsn
        ),
        None,
    )
    redis_settings = next(
        (
            rd
            for rd in (b.redis() for b in bindings_mod.of_type(found, "redis")[:1])
            if rd.url == settings.redis_url
        ),
        None,
    )
    return postgres, redis_settings


async def _authenticator(
    settings: settings_mod.RuntimeSettings,
    found: Mapping[str, bindings_mod.Binding],
    stack: contextlib.AsyncExitStack,
) -> ports.Authenticator:
    issuers = bindings_mod.of_type(found, "auth0")
    if not issuers:
        # Not a crash loop: the pod serves its probes and says what to change.
        problem = (
            "spec.auth.mode is jwt but no Integration of type auth0 is bound: add one to "
            "spec.integrations, or set spec.auth.mode: none to serve without "
            "authentication (demos only)"
        )
        logger.error("not ready: %s", problem)
        return RefusingAuthenticator(503, auth.AUTH_UNAVAILABLE, problem)
    if len(issuers) > 1:
        logger.warning(
            "several auth0 bindings (%s): tokens are verified against %r",
            ", ".join(b.name for b in issuers),
            issuers[0].name,
        )
    authenticator = auth.JwtAuthenticator.from_settings(
        issuers[0].auth0(), tenant=settings.effective_tenant
    )
    stack.push_async_callback(authenticator.aclose)
    return authenticator


async def _limiter(
    settings: settings_mod.RuntimeSettings,
    agent_config: config_mod.AgentConfig,
    found: Mapping[str, bindings_mod.Binding],
    stack: contextlib.AsyncExitStack,
) -> ports.Limiter | None:
    limits = agent_config.limits
    if limits.requests_per_minute is None and limits.tokens_per_minute is None:
        return None
    if not settings.redis_url:
        logger.warning("spec.limits is set but no redis is bound: rate limits are not enforced")
        return None
    _, bound = bound_datastores(settings, found)
    client = redis.asyncio.Redis.from_url(
        settings.redis_url, **memory_store.redis_tls_options(bound)
    )
    stack.push_async_callback(client.aclose)
    return ratelimit.RedisLimiter(
        client,
        requests_per_minute=limits.requests_per_minute,
        tokens_per_minute=limits.tokens_per_minute,
    )


def _ledger(
    settings: settings_mod.RuntimeSettings, stack: contextlib.AsyncExitStack
) -> ports.UsageLedger | None:
    """The platform's usage ledger when the operator configured one (BMAD_USAGE_LEDGER_*)."""
    if not settings.usage_ledger_url:
        return None
    if settings.usage_ledger_password is None:
        logger.error(
            "BMAD_USAGE_LEDGER_URL is set without BMAD_USAGE_LEDGER_PASSWORD: every answer "
            "is refused until the agent's usage ledger Secret is mounted"
        )
    password = (
        settings.usage_ledger_password.get_secret_value() if settings.usage_ledger_password else ""
    )
    connect = functools.partial(
        ledger.PlatformLedger.from_url,
        settings.usage_ledger_url,
        password=password,
        namespace=settings.agent_namespace,
        agent=settings.agent_name,
        tenant=settings.effective_tenant,
        cache_seconds=settings.usage_budget_cache_seconds,
    )
    spool_dir = settings.usage_ledger_spool
    try:
        platform = connect(spool_dir=spool_dir)
    except spool.SpoolError as exc:
        # The stricter way still keeps every record: each answer waits for Redis.
        logger.error("%s; until then every answer waits for the platform Redis", exc)
        platform, spool_dir = connect(spool_dir=None), None
    stack.push_async_callback(platform.aclose)
    where = urllib.parse.urlsplit(settings.usage_ledger_url).hostname or "?"
    if spool_dir is None:
        logger.info("usage records go to the platform ledger at %s", where)
    else:
        logger.info(
            "usage records are kept in the spool at %s and shipped to the platform ledger at %s",
            spool_dir,
            where,
        )
    return platform


async def _start_task_consumer(
    settings: settings_mod.RuntimeSettings,
    state: deps.RuntimeState,
    stack: contextlib.AsyncExitStack,
    found: Mapping[str, bindings_mod.Binding],
) -> None:
    """Consume the agent's task stream next to the HTTP API, while Redis is bound.

    A task is a workflow step (`steps.run`, with the objectStorage Integrations bound
    here for its artifacts) or an invoke request (`turns.run_task`).

    Shutdown (the lifespan's end, on SIGTERM) stops reading, lets in-flight tasks finish
    within the grace period and leaves the rest pending for another replica.
    """
    if not settings.redis_url or not settings.task_bus_enabled:
        return
    _, bound = bound_datastores(settings, found)
    task_bus = bus_client.TaskBus.from_url(
        settings.redis_url,
        redis_options=memory_store.redis_tls_options(bound),
        tenant=state.tenant,
        agent=state.agent,
        config=bus_client.BusConfig(
            min_idle_ms=settings.task_min_idle_ms,
            attempt_timeout_ms=int(settings.task_attempt_timeout_seconds * 1000),
        ),
    )
    stop = asyncio.Event()
    consumer = f"{socket.gethostname()}-{os.getpid()}"
    stores = steps.ArtifactStores(found, tenant=state.tenant)
    # Not ready until the consumer reads the stream: a replica started while Redis is
    # unreachable keeps retrying, and says so in /readyz meanwhile.
    state.bus = health = bus_consumer.ConsumerHealth()

    async def handle(task: taskwire.Task) -> dict[str, Any]:
        # One span per task, as per request (a no-op without an exporter).
        with state.tracing.tracer.start_as_current_span(
            "task",
            kind=trace.SpanKind.CONSUMER,
            attributes={"bmad.task_id": task.task_id, "bmad.task_attempt": task.attempt},
        ):
            try:
                if taskwire.is_agent_task(task.payload):
                    return await steps.run(state, stores, task)
                return await turns.run_task(state, dict(task.payload), task_id=task.task_id)
            except turns.BudgetExhaustedError as exc:
                # Refused, not failed by chance: no redelivery would fare better.
                raise bus_consumer.TaskFailedError(f"{exc.CODE}: {exc}") from None

    async def depth() -> None:
        while not stop.is_set():
            with contextlib.suppress(Exception):
                state.metrics.queue_depth.set(await task_bus.queue_depth())
                state.metrics.dead_letters.set(await task_bus.dead_letter_count())
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=5)

    consuming = asyncio.create_task(
        bus_consumer.consume(
            task_bus, handle, consumer_name=consumer, stop=stop, grace_s=20.0, health=health
        ),
        name="task-consumer",
    )

    def stopped(task: asyncio.Task[bus_consumer.ConsumeStats]) -> None:
        if task.cancelled() or stop.is_set():
            return
        error = task.exception()
        reason = f": {type(error).__name__}" if error is not None else ""
        health.down(f"the task consumer stopped{reason}")
        logger.error("the task consumer stopped%s; tasks are not consumed", reason)

    consuming.add_done_callback(stopped)
    gauge = asyncio.create_task(depth(), name="queue-depth")

    async def shutdown() -> None:
        stop.set()
        for task in (consuming, gauge):
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await task
        await task_bus.aclose()
        stores.close()

    stack.push_async_callback(shutdown)
