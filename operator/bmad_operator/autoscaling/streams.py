"""The length of an Agent's task stream, read from its Redis: the signal that works at zero.

At zero replicas no runtime pod exports ``bmad_agent_queue_depth``, so Prometheus has
no series and an agent woken by its metrics would sleep forever. The tasks themselves
wait on the agent's stream in Redis (``bmad_integrations.taskwire``: ``bmad:<tenant>:
<agent>:tasks``; acknowledged entries are deleted, so its length is the tasks not yet
answered, as the runtime's gauge reports it). The autoscaler reads that length here
while an agent that scales to zero is at zero.

The Redis is the one the agent's runtime uses: the first Integration of type redis in
``spec.integrations`` by name (the runtime takes the first redis binding by name), and
its binding Secret (``<integration>-binding``, which the operator itself publishes and
keeps in its watch cache), so the operator connects exactly as the pods do. The
connection goes through the operator's egress policy, like an Integration check's. The
tenant part of the key is the runtime's: ``BMAD_TENANT`` of the agent's Deployment when
it sets one, else the namespace.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Protocol

from bmad_crds.v1alpha1 import integration as integration_api
from bmad_integrations import base, egress, lazy, redis_store, taskwire
from bmad_operator.autoscaling import decide, reasons
from bmad_operator.builders import integration as integration_builders

if TYPE_CHECKING:
    import redis.asyncio as aioredis
else:  # imported when first used: only where Redis is configured
    aioredis = lazy.module("redis.asyncio")

Obj = dict[str, Any]
DEFAULT_TIMEOUT_SECONDS = 2.0


class Source(Protocol):
    """Where Integrations and binding Secrets are read from (the operator's store)."""

    def get(self, kind: str, namespace: str | None, name: str) -> Obj | None: ...


def redis_integration(cache: Source, body: Mapping[str, Any]) -> str | None:
    """The Integration of type redis the agent's runtime uses, if it binds one."""
    namespace = body["metadata"]["namespace"]
    for name in sorted((body.get("spec") or {}).get("integrations") or []):
        found = cache.get("Integration", namespace, name)
        if found is not None and (found.get("spec") or {}).get("type") == "redis":
            return str(name)
    return None


def tenant(cache: Source, namespace: str, agent: str) -> str:
    """The tenant in the agent's stream key, as its runtime computes it."""
    deployment = cache.get("Deployment", namespace, agent) or {}
    pod = ((deployment.get("spec") or {}).get("template") or {}).get("spec") or {}
    for container in pod.get("containers") or []:
        for var in container.get("env") or []:
            if var.get("name") == "BMAD_TENANT" and var.get("value"):
                return str(var["value"])
    return namespace


def _decoded(secret: Mapping[str, Any]) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}


class _Conn:
    def __init__(self, version: str, client: aioredis.Redis) -> None:
        self.version = version
        self.client = client
        self.lock = asyncio.Lock()


class StreamLengths:
    """Reads ``XLEN`` of agents' task streams, one cached connection per binding."""

    def __init__(
        self,
        cache: Source,
        *,
        policy: egress.Policy,
        timeout: float = DEFAULT_TIMEOUT_SECONDS,
    ) -> None:
        self.cache = cache
        self.policy = policy
        self.timeout = timeout
        self._conns: dict[tuple[str, str], _Conn] = {}

    async def aclose(self) -> None:
        for conn in self._conns.values():
            with contextlib.suppress(Exception):
                await conn.client.aclose()
        self._conns.clear()

    async def length(self, body: Mapping[str, Any]) -> decide.Reading | None:
        """The stream's length; None when the agent binds no Redis (it has no stream)."""
        meta = body["metadata"]
        namespace, agent = str(meta["namespace"]), str(meta["name"])
        integration = redis_integration(self.cache, body)
        if integration is None:
            return None
        secret_name = integration_builders.binding_secret_name(integration)
        secret = self.cache.get("Secret", namespace, secret_name)
        if secret is None:
            return decide.Reading(
                error=reasons.QUEUE_UNAVAILABLE,
                detail=f"the binding Secret {secret_name} of Integration {integration} does "
                "not exist yet (the Integration is not Ready)",
            )
        key = (namespace, integration)
        try:
            conn = await self._connection(key, secret)
            async with conn.lock:
                stream = taskwire.Keys(tenant(self.cache, namespace, agent), agent).stream
                depth = await conn.client.xlen(stream)
        except Exception as exc:
            await self._drop(key)
            return decide.Reading(error=reasons.QUEUE_UNAVAILABLE, detail=_words(exc, integration))
        return decide.Reading(value=float(depth))

    async def _connection(self, key: tuple[str, str], secret: Mapping[str, Any]) -> _Conn:
        version = str((secret.get("metadata") or {}).get("resourceVersion", ""))
        conn = self._conns.get(key)
        if conn is not None and conn.version == version:
            return conn
        await self._drop(key)
        data = _decoded(secret)
        block = integration_api.Redis(
            host=data["host"],
            port=int(data["port"]),
            db=int(data.get("database") or 0),
            tls=data.get("tls") == "true",
            username=data.get("username") or None,
        )
        creds = base.Credentials(
            None,
            {k: v for k, v in data.items() if k in ("password", "ca.crt")},
        )
        destination = await self.policy.destination(
            block.host.strip("[]"), block.port, field=f"Integration {key[1]}: spec.redis.host"
        )
        client = redis_store.client(block, creds, timeout=self.timeout, destination=destination)
        conn = _Conn(version, client)
        self._conns[key] = conn
        return conn

    async def _drop(self, key: tuple[str, str]) -> None:
        conn = self._conns.pop(key, None)
        if conn is not None:
            with contextlib.suppress(Exception):
                await conn.client.aclose()


def _words(exc: BaseException, integration: str) -> str:
    """Why the stream could not be read, without quoting what the server said."""
    if isinstance(exc, base.CheckError):
        return f"Integration {integration}: {exc.message}"
    if isinstance(exc, KeyError):
        return f"the binding Secret of Integration {integration} has no key {exc}"
    return (
        f"cannot read the task stream from the Redis of Integration {integration} "
        f"({type(exc).__name__})"
    )
