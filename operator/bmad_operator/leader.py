"""Leader election over a coordination.k8s.io/v1 Lease, as client-go's leaderelection does it.

Two or more operator replicas run; only the one holding the Lease reconciles. The Lease
records who holds it (`holderIdentity`), for how long a holder that stops renewing
keeps it (`leaseDurationSeconds`), when the holder took it (`acquireTime`), when it
last renewed it (`renewTime`) and how often it changed hands (`leaseTransitions`).

The rules, those of client-go:

- A candidate reads the Lease every retry period (with jitter). It takes a Lease that
  does not exist, has no holder, or has not changed for `leaseDurationSeconds` *as
  measured on the candidate's own clock since it last saw the record change*. Times
  written in the Lease are never compared with the local clock, so clocks that
  disagree between machines do not matter.
- Every write carries the resourceVersion that was read (optimistic concurrency): of
  two candidates that saw the same expired Lease, the API server lets one update it
  and answers 409 Conflict to the other.
- The leader renews every retry period. If it has not managed to renew within the
  renew deadline (shorter than the lease duration), it stops leading at once, before
  any other replica may take the Lease. It also stops at once when it reads the Lease
  and finds another holder.
- On a graceful shutdown the leader releases the Lease (no holder, duration 1 s), so a
  standby takes it at its next retry instead of waiting for the Lease to expire.

`on_started` and `on_stopped` are called when leadership is gained and lost; `leading`
is an asyncio.Event that is set exactly while this replica leads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import inspect
import json
import logging
import os
import random
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio.client import exceptions as k8s_exceptions

log = logging.getLogger(__name__)

Obj = dict[str, Any]
Callback = Callable[[], Awaitable[None] | None]

API_VERSION = "coordination.k8s.io/v1"
# A candidate waits between retry_period and retry_period * (1 + JITTER) between tries,
# so that candidates started together do not keep colliding.
JITTER = 0.2


@dataclasses.dataclass(frozen=True)
class Timings:
    """client-go's defaults: lease 15 s, renew deadline 10 s, retry 2 s."""

    lease_duration: float = 15.0
    renew_deadline: float = 10.0
    retry_period: float = 2.0

    def __post_init__(self) -> None:
        if self.retry_period <= 0:
            raise ValueError("the retry period must be positive")
        if self.renew_deadline <= self.retry_period * (1 + JITTER):
            raise ValueError(
                f"the renew deadline ({self.renew_deadline:g}s) must be longer than "
                f"{1 + JITTER:g} x the retry period ({self.retry_period:g}s)"
            )
        if self.lease_duration <= self.renew_deadline:
            raise ValueError(
                f"the lease duration ({self.lease_duration:g}s) must be longer than the "
                f"renew deadline ({self.renew_deadline:g}s): a leader that cannot renew must "
                "stop before another replica may take over"
            )


class Conflict(Exception):  # noqa: N818 - what the API server says (409)
    """Someone else wrote the Lease first (stale resourceVersion, or it already exists)."""


class LeaseError(Exception):
    """The Lease could not be read or written (unreachable, refused, server error)."""


class Leases(Protocol):
    """What the elector needs from the API server: one Lease, read and written whole."""

    async def get(self, namespace: str, name: str) -> Obj | None: ...

    async def create(self, lease: Obj) -> Obj: ...

    async def replace(self, lease: Obj) -> Obj: ...


def default_identity() -> str:
    """Unique per process, readable: the host (the pod's name in a cluster) and a uuid."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}_{uuid.uuid4()}"


def micro_time(moment: dt.datetime) -> str:
    """The Lease's MicroTime format: RFC 3339 with microseconds, in UTC."""
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _utc_now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


async def _call(callback: Callback | None) -> None:
    if callback is None:
        return
    result = callback()
    if inspect.isawaitable(result):
        await result


class LeaderElector:
    def __init__(
        self,
        leases: Leases,
        *,
        namespace: str,
        name: str,
        identity: str | None = None,
        timings: Timings | None = None,
        on_started: Callback | None = None,
        on_stopped: Callback | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], dt.datetime] = _utc_now,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.leases = leases
        self.namespace = namespace
        self.name = name
        self.identity = identity or default_identity()
        self.timings = timings or Timings()
        self.on_started = on_started
        self.on_stopped = on_stopped
        self.leading = asyncio.Event()
        self._clock = clock
        self._wall = wall
        self._sleep = sleep
        self._lease: Obj | None = None  # the last Lease read or written, with its version
        self._observed: tuple[Any, ...] | None = None  # the record part of it
        self._observed_at = 0.0  # our clock when the record last changed
        self._stop_lock = asyncio.Lock()
        self._runner: asyncio.Task[Any] | None = None

    @property
    def is_leader(self) -> bool:
        return self.leading.is_set()

    @property
    def holder(self) -> str:
        """Who holds the Lease, as last seen ("" when nobody)."""
        spec = (self._lease or {}).get("spec") or {}
        return str(spec.get("holderIdentity") or "")

    # -- the loop ---------------------------------------------------------------------
    async def run(self) -> None:
        """Campaign, lead until the Lease is lost, campaign again; forever.

        Cancelling it stops leading (the `on_stopped` callback runs) but does not
        release the Lease: that is what a crash looks like to the others. Call
        `release()` for a graceful hand-over.
        """
        self._runner = asyncio.current_task()
        try:
            while True:
                await self._acquire()
                await self._start_leading()
                await self._renew_until_lost()
                await self._stop_leading("the Lease could not be renewed")
        finally:
            if self.is_leader:
                await asyncio.shield(self._stop_leading("the elector was stopped"))

    async def _acquire(self) -> None:
        while True:
            if await self._try_acquire_or_renew(renewing=False):
                return
            wait = self.timings.retry_period * (1 + random.uniform(0, JITTER))  # noqa: S311
            expires_in = self._expires_in()
            if expires_in is not None:
                # Held by someone who may have stopped renewing: look again right when
                # it would expire rather than up to a retry period later.
                wait = min(wait, max(expires_in, 0.0) + 0.05)
            await self._sleep(wait)

    async def _renew_until_lost(self) -> None:
        """client-go's renew loop: every retry period, try to renew until the renew
        deadline; give up leadership the moment that deadline passes (or another
        holder shows up)."""
        while True:
            await self._sleep(self.timings.retry_period)  # it was just written
            deadline = self._clock() + self.timings.renew_deadline
            while True:
                remaining = deadline - self._clock()
                if remaining <= 0:
                    return
                try:
                    renewed = await asyncio.wait_for(
                        self._try_acquire_or_renew(renewing=True), remaining
                    )
                except TimeoutError:
                    return
                if renewed:
                    break
                if self.holder != self.identity:
                    return  # someone else holds it now: stop at once
                await self._sleep(min(self.timings.retry_period, max(0.0, remaining)))

    # -- one try ------------------------------------------------------------------------
    async def _try_acquire_or_renew(self, *, renewing: bool) -> bool:
        """One read and (maybe) one write. Renewing, a Lease found with another holder
        is never taken back: that holder may be leading, so we stop instead."""
        now = self._wall()
        try:
            current = await self.leases.get(self.namespace, self.name)
        except LeaseError as exc:
            log.warning("reading Lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        if current is None:
            lease = self._record(None, now)
            try:
                self._remember(await self.leases.create(lease))
            except (Conflict, LeaseError) as exc:
                log.info("creating Lease %s/%s: %s", self.namespace, self.name, exc)
                return False
            return True

        self._remember(current)
        spec = current.get("spec") or {}
        holder = str(spec.get("holderIdentity") or "")
        duration = float(spec.get("leaseDurationSeconds") or 0)
        if holder != self.identity and (
            renewing or (holder and self._observed_at + duration > self._clock())
        ):
            return False  # held by someone else, who renewed it recently enough
        lease = self._record(current, now)
        try:
            self._remember(await self.leases.replace(lease))
        except (Conflict, LeaseError) as exc:
            log.info("updating Lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        return True

    def _record(self, current: Obj | None, now: dt.datetime) -> Obj:
        """The Lease with us as holder: acquireTime and leaseTransitions carried over
        when we already held it, moved on when we take it from someone (or nobody)."""
        spec = (current or {}).get("spec") or {}
        ours = spec.get("holderIdentity") == self.identity
        transitions = int(spec.get("leaseTransitions") or 0)
        metadata: Obj = {"name": self.name, "namespace": self.namespace}
        if current is not None:
            # The version we read: if anyone wrote in between, the server refuses (409).
            metadata["resourceVersion"] = current["metadata"]["resourceVersion"]
        return {
            "apiVersion": API_VERSION,
            "kind": "Lease",
            "metadata": metadata,
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": round(self.timings.lease_duration),
                "acquireTime": spec.get("acquireTime") if ours else micro_time(now),
                "renewTime": micro_time(now),
                "leaseTransitions": transitions if ours or current is None else transitions + 1,
            },
        }

    def _expires_in(self) -> float | None:
        """Seconds until the Lease, as last seen held by another, may be taken."""
        spec = (self._lease or {}).get("spec") or {}
        holder = spec.get("holderIdentity")
        if not holder or holder == self.identity:
            return None
        duration = float(spec.get("leaseDurationSeconds") or 0)
        return self._observed_at + duration - self._clock()

    def _remember(self, lease: Obj) -> None:
        self._lease = lease
        spec = lease.get("spec") or {}
        record = tuple(
            spec.get(k)
            for k in (
                "holderIdentity",
                "leaseDurationSeconds",
                "acquireTime",
                "renewTime",
                "leaseTransitions",
            )
        )
        if record != self._observed:
            self._observed = record
            self._observed_at = self._clock()

    # -- leadership changes ------------------------------------------------------------
    async def _start_leading(self) -> None:
        log.warning("%s now leads (Lease %s/%s)", self.identity, self.namespace, self.name)
        self.leading.set()
        await _call(self.on_started)

    async def _stop_leading(self, why: str) -> None:
        async with self._stop_lock:
            if not self.is_leader:
                return
            # First: nothing may reconcile any more. Then tell whoever listens.
            self.leading.clear()
            log.warning("%s no longer leads: %s", self.identity, why)
            await _call(self.on_stopped)

    async def release(self) -> bool:
        """Graceful shutdown: stop campaigning and leading, then hand the Lease back (no
        holder), so a standby takes it at its next retry rather than after the lease
        duration. Returns whether the Lease was released (False if we did not hold it)."""
        was_leader = self.is_leader
        runner = self._runner
        if runner is not None and runner is not asyncio.current_task() and not runner.done():
            # No renewal or new campaign may race the release: stop the loop first
            # (which stops leading, so nothing reconciles from here on).
            runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await runner
        await self._stop_leading("releasing the Lease")
        lease = self._lease
        if not was_leader or lease is None:
            return False
        spec = lease.get("spec") or {}
        if spec.get("holderIdentity") != self.identity:
            return False
        now = micro_time(self._wall())
        released = {
            "apiVersion": API_VERSION,
            "kind": "Lease",
            "metadata": {
                "name": self.name,
                "namespace": self.namespace,
                "resourceVersion": lease["metadata"]["resourceVersion"],
            },
            "spec": {
                "holderIdentity": None,
                "leaseDurationSeconds": 1,
                "acquireTime": now,
                "renewTime": now,
                "leaseTransitions": int(spec.get("leaseTransitions") or 0),
            },
        }
        try:
            self._remember(await self.leases.replace(released))
        except (Conflict, LeaseError) as exc:
            log.warning("releasing Lease %s/%s: %s", self.namespace, self.name, exc)
            return False
        log.warning("%s released Lease %s/%s", self.identity, self.namespace, self.name)
        return True


class KubeLeases:
    """`Leases` on the API server, through kubernetes_asyncio's ApiClient."""

    def __init__(self, api: k8s_client.ApiClient, *, request_timeout: float = 10.0) -> None:
        self.api = api
        self.request_timeout = request_timeout

    @staticmethod
    def _path(namespace: str, name: str | None = None) -> str:
        path = f"/apis/{API_VERSION}/namespaces/{namespace}/leases"
        return f"{path}/{name}" if name else path

    async def _request(self, method: str, path: str, body: Obj | None = None) -> Obj | None:
        try:
            resp = await self.api.call_api(
                path,
                method,
                header_params={"Content-Type": "application/json", "Accept": "application/json"},
                body=body,
                auth_settings=["BearerToken"],
                _preload_content=False,
                _request_timeout=self.request_timeout,
            )
            raw = await resp.read()
        except k8s_exceptions.ApiException as exc:
            text = exc.body or b""
            status, raw = int(exc.status or 0), text if isinstance(text, bytes) else text.encode()
        except (OSError, TimeoutError) as exc:
            raise LeaseError(f"the API server was not reached: {exc}") from None
        else:
            status = int(resp.status)
        if status == 404 and method == "GET":
            return None
        if status == 409:
            raise Conflict(_message(raw))
        if status >= 400:
            raise LeaseError(f"{status}: {_message(raw)}")
        data: Obj = json.loads(raw)
        return data

    async def get(self, namespace: str, name: str) -> Obj | None:
        return await self._request("GET", self._path(namespace, name))

    async def create(self, lease: Obj) -> Obj:
        meta = lease["metadata"]
        created = await self._request("POST", self._path(meta["namespace"]), lease)
        assert created is not None
        return created

    async def replace(self, lease: Obj) -> Obj:
        meta = lease["metadata"]
        replaced = await self._request("PUT", self._path(meta["namespace"], meta["name"]), lease)
        assert replaced is not None
        return replaced


def _message(raw: bytes) -> str:
    with contextlib.suppress(ValueError, AttributeError):
        return str(json.loads(raw).get("message") or raw[:200])
    return raw[:200].decode(errors="replace")
