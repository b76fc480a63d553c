"""What every reconciler shares: timing and counting a pass, writing status only when
it changed, and posting an event without letting a refused event fail the pass."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Mapping
from typing import Any

from bmad_operator import kube, metrics, store

log = logging.getLogger(__name__)


async def measured(kind: str, what: str, work: Awaitable[None]) -> None:
    """Run one pass with the reconcile metrics; API errors are logged in one line."""
    with metrics.RECONCILE_SECONDS.labels(kind=kind).time():
        try:
            await work
        except kube.ApiError as exc:
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


async def post_event(
    api: kube.Kube, body: Mapping[str, Any], type_: str, reason: str, message: str
) -> None:
    try:
        await api.event(dict(body), type_=type_, reason=reason, message=message)
    except kube.ApiError as exc:
        log.warning(
            "could not post event %s on %s %s: %s",
            reason,
            body.get("kind"),
            body["metadata"]["name"],
            exc,
        )
