"""What every reconciler shares: timing and counting a pass, writing status only when
it changed, posting an event without letting a refused event fail the pass, and what
they read of the usage ledger (`UsageSource`)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol

import pydantic

from bmad_integrations import stripe_webhooks
from bmad_integrations.usage import budget as usage_budget
from bmad_integrations.usage import reporter as usage_reporter
from bmad_integrations.usage import store as usage_store
from bmad_operator import conditions, diff, errors, events, kube, metrics, store
from bmad_operator.builders import meta

log = logging.getLogger(__name__)


async def measured(kind: str, what: str, work: Awaitable[None]) -> None:
    """Run one pass with the reconcile metrics; API errors are logged in one line."""
    with metrics.RECONCILE_SECONDS.labels(kind=kind).time():
        try:
            await work
        except errors.Requeue:  # a pass that asks to come back at a time: not an error
            metrics.RECONCILES.labels(kind=kind, result="ok").inc()
            raise
        except errors.ApiError as exc:
            metrics.RECONCILES.labels(kind=kind, result="error").inc()
            metrics.RECONCILE_ERRORS.labels(kind=kind, reason=exc.reason or "ApiError").inc()
            log.warning("%s %s: API error, will retry: %s", kind, what, exc)
            raise
        except Exception:
            metrics.RECONCILES.labels(kind=kind, result="error").inc()
            metrics.RECONCILE_ERRORS.labels(kind=kind, reason="Unexpected").inc()
            raise
        metrics.RECONCILES.labels(kind=kind, result="ok").inc()


async def write_status(
    api: kube.Kube, cache: store.Store, kind: str, body: Mapping[str, Any], status: dict[str, Any]
) -> None:
    """Patch the status subresource, unless every given field already has that value."""
    current = body.get("status") or {}
    if all(current.get(k) == v for k, v in status.items()):
        return
    meta = body["metadata"]
    updated = await api.patch_status(kind, meta.get("namespace"), meta["name"], status)
    if updated:
        cache.put(updated)


async def write_conditions(
    api: kube.Kube,
    cache: store.Store,
    kind: str,
    body: Mapping[str, Any],
    decided: Sequence[conditions.Cond],
) -> None:
    """A pass that ends early (an invalid spec, a refused apply): only the decided
    conditions, merged into the previous ones, for the generation it saw."""
    generation = body["metadata"].get("generation")
    previous = (body.get("status") or {}).get("conditions") or []
    await write_status(
        api,
        cache,
        kind,
        body,
        {
            "observedGeneration": generation,
            "conditions": conditions.merge(previous, decided, generation=generation),
        },
    )


async def post_event(api: kube.Kube, body: Mapping[str, Any], event: events.Event) -> None:
    """Post a decided event on `body`; a refused event is logged, never fails the pass."""
    try:
        await api.event(dict(body), type_=event.type, reason=event.reason, message=event.message)
    except errors.ApiError as exc:
        log.warning(
            "could not post event %s on %s %s: %s",
            event.reason,
            body.get("kind"),
            body["metadata"]["name"],
            exc,
        )


def describe_validation_error(exc: pydantic.ValidationError) -> str:
    """The first few problems of a spec, each with its field path, for a condition."""
    return "; ".join(
        f"spec.{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()[:5]
    )


async def observe(
    api: kube.Kube, cache: store.Store, kind: str, namespace: str | None, name: str
) -> dict[str, Any] | None:
    """The live object: from the watch cache, or (a miss) confirmed with one GET.

    Only objects with our managed-by label are kept from a GET: the watches of owned
    kinds select on it, so nothing would ever tell the cache that someone else's object
    changed or went away.
    """
    live = cache.get(kind, namespace, name)
    if live is None:
        live = await api.get(kind, namespace, name)
        if live is not None and meta.is_managed(live.get("metadata", {}).get("labels")):
            cache.put(live)
    return live


def controlled_by(live: Mapping[str, Any], owner_uid: str) -> bool:
    """Whether `live` names the object with `owner_uid` as its controller, which only
    the operator sets, on what it creates for that owner."""
    return any(
        ref.get("controller") and ref.get("uid") == owner_uid
        for ref in live.get("metadata", {}).get("ownerReferences") or []
    )


async def ensure(api: kube.Kube, cache: store.Store, obj: dict[str, Any]) -> dict[str, Any]:
    """Server-side apply `obj` unless the live object already holds it; the result."""
    meta = obj["metadata"]
    live = await observe(api, cache, obj["kind"], meta.get("namespace"), meta["name"])
    if live is not None and not diff.needs_apply(live, obj):
        return live
    applied = await api.apply(obj)
    cache.put(applied)
    return applied


class UsageSource(Protocol):
    """The usage ledger as the reconcilers see it (`bmad_operator.metering.Metering`)."""

    agent_url: str
    spool: bool  # the runtimes keep their records in a spool (BMAD_OPERATOR_USAGE_SPOOL)
    loaded: bool  # the ledger was read since this replica took the lease

    def usage_of_agent(self, namespace: str, name: str) -> usage_store.PeriodUsage | None: ...

    def usage_of_tenant(self, tenant: str) -> usage_store.PeriodUsage | None: ...

    def budget_of(self, tenant: str) -> usage_budget.State | None: ...

    def payment_of(self, customer_id: str) -> stripe_webhooks.PaymentState | None:
        """What Stripe's webhooks said about the customer (None: nothing unpaid)."""
        ...

    async def ensure_writer(
        self, *, namespace: str, agent: str, tenant: str, password: str
    ) -> None: ...

    def bill_to(self, tenant: str, target: usage_reporter.Target | None) -> None:
        """Where the tenant's usage is reported: its Stripe customer and account, a
        Target without a customer (not billed), or None (billing not set up yet: wait)."""
        ...
