"""The operator's Stripe webhook endpoint: ``POST /stripe/webhook`` (every replica).

A small aiohttp server of its own on ``stripe_webhook_port`` (plain HTTP: TLS ends at
the ingress in front of the Service), not kopf's admission server (TLS with a
certificate made for the API server, routes owned by kopf) nor the metrics port
(prometheus_client's bare server). Every replica serves it: the inbox is the ledger's
PostgreSQL, so whichever replica Stripe reaches records the event once, and the
leader's metering loop reads the payment states into the Tenants
(`metering.Metering.payment_of`).

The signing secrets are the ``webhookSecret`` keys of the stripe Integrations that a
Tenant's ``spec.billing`` names, read on every request (a rotation needs no restart).
Only those: a stripe Integration a tenant's user makes in their own namespace signs
nothing here. The secrets are never logged.
"""

from __future__ import annotations

import base64
import binascii
import logging
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from bmad_integrations import base as ibase
from bmad_integrations import stripe_webhooks
from bmad_integrations.usage import store as usage_store
from bmad_operator import errors, kube, metrics, settings, store

log = logging.getLogger(__name__)

PATH = "/stripe/webhook"


class Endpoint:
    """The endpoint's state: the API client, the watched store, the inbox's pool."""

    def __init__(self, api: kube.Kube, cache: store.Store, cfg: settings.OperatorSettings) -> None:
        self.api = api
        self.cache = cache
        self.cfg = cfg
        self._ledger: usage_store.LedgerStore | None = None
        self._runner: web.AppRunner | None = None

    async def inbox(self) -> stripe_webhooks.PaymentInbox:
        """The inbox, connected on first use (a database that is down answers 503)."""
        if self._ledger is None:
            self._ledger = await usage_store.LedgerStore.connect(
                self.cfg.ledger_dsn, min_size=1, max_size=2
            )
        return stripe_webhooks.PaymentInbox(self._ledger.pool)

    def billing_integrations(self) -> set[tuple[str, str]]:
        """(namespace, name) of every Integration a Tenant bills through."""
        found: set[tuple[str, str]] = set()
        for _, body in self.cache.items("Tenant"):
            billing = (body.get("spec") or {}).get("billing") or {}
            name = billing.get("integration")
            if isinstance(name, str) and name:
                ns = billing.get("integrationNamespace") or self.cfg.system_namespace
                found.add((str(ns), name))
        return found

    async def secrets(self) -> list[str]:
        """The webhook signing secrets of the billing Integrations (stripe ones only)."""
        found: list[str] = []
        for ns, name in sorted(self.billing_integrations()):
            integ = self.cache.get("Integration", ns, name)
            spec = (integ or {}).get("spec") or {}
            ref = spec.get("secretRef") or {}
            if spec.get("type") != "stripe" or not ref.get("name"):
                continue
            try:
                secret = await self.api.get("Secret", ns, str(ref["name"]))
            except errors.ApiError as exc:
                log.warning("Stripe webhook: Secret %s/%s unreadable: %s", ns, ref["name"], exc)
                continue
            value = _webhook_secret(secret, ref.get("keys") or {})
            if value:
                found.append(value)
        return found

    async def handle(self, request: web.Request) -> web.Response:
        if (
            request.content_length is not None
            and request.content_length > stripe_webhooks.MAX_BODY_BYTES
        ):
            return web.json_response(
                {"error": {"code": "too_large", "message": "the body is too large"}}, status=413
            )
        payload = await request.read()
        try:
            inbox: stripe_webhooks.Inbox = await self.inbox()
        except Exception as exc:  # the database: Stripe delivers again
            log.warning("Stripe webhook: the ledger is unreachable: %s", type(exc).__name__)
            inbox = _Unavailable()
        answer = await stripe_webhooks.handle(
            payload,
            request.headers.get(stripe_webhooks.SIGNATURE_HEADER),
            secrets=await self.secrets(),
            inbox=inbox,
        )
        if answer.status == 200:
            log.info(
                "Stripe webhook %s recorded%s",
                answer.body.get("id"),
                " (a duplicate)" if answer.body.get("duplicate") else "",
            )
        metrics.STRIPE_WEBHOOK_EVENTS.labels(
            type=_event_type(payload) if answer.status in (200, 503) else "",
            result=_result(answer),
        ).inc()
        return web.json_response(answer.body, status=answer.status)

    async def start(self) -> None:
        app = web.Application(client_max_size=stripe_webhooks.MAX_BODY_BYTES)
        app.router.add_post(PATH, self.handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.bind_address, self.cfg.stripe_webhook_port)
        await site.start()
        log.info(
            "serving the Stripe webhook on %s:%d%s",
            self.cfg.bind_address,
            self.cfg.stripe_webhook_port,
            PATH,
        )

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._ledger is not None:
            await self._ledger.close()
            self._ledger = None


def _result(answer: stripe_webhooks.Response) -> str:
    if answer.status == 200:
        return "duplicate" if answer.body.get("duplicate") else "accepted"
    return "unavailable" if answer.status == 503 else "refused"


def _event_type(payload: bytes) -> str:
    """The type of a verified event as a label: one of the handled four, else other."""
    try:
        kind = stripe_webhooks.parse(payload).type
    except stripe_webhooks.WebhookError:
        return "other"
    return kind if kind in stripe_webhooks.HANDLED else "other"


class _Unavailable:
    async def receive(self, event: stripe_webhooks.PaymentEvent) -> bool:
        raise ConnectionError("the ledger is unreachable")


def _webhook_secret(secret: Mapping[str, Any] | None, keys: Mapping[str, Any]) -> str | None:
    if secret is None:
        return None
    data: dict[str, str] = {}
    for key, value in (secret.get("data") or {}).items():
        try:
            data[key] = base64.b64decode(value).decode()
        except (binascii.Error, UnicodeDecodeError):
            continue
    names = {k: str(v) for k, v in keys.items() if v}
    logical = {"webhook_secret": names.get("webhookSecret", "")} if names else {}
    creds = ibase.Credentials(None, data, {k: v for k, v in logical.items() if v})
    return creds.get("webhook_secret") or None
