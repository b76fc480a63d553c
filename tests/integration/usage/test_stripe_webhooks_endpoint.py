"""The Stripe webhook endpoint on aiohttp (loopback) with its inbox in the real
PostgreSQL: bad, stale and replayed deliveries change nothing; each event id counts once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from aiohttp import web

from bmad_integrations import stripe_webhooks as wh
from bmad_integrations.usage import store

pytestmark = pytest.mark.integration

SECRET = "whsec_endpoint_test_5f4e3d2c1b0a"


def event(event_id: str, kind: str, created: int, **obj: Any) -> bytes:
    return json.dumps(
        {
            "id": event_id,
            "object": "event",
            "type": kind,
            "created": created,
            "data": {"object": {"customer": "cus_W", **obj}},
        }
    ).encode()


def signed(payload: bytes, *, secret: str = SECRET, at: int | None = None) -> dict[str, str]:
    stamp = int(time.time()) if at is None else at
    return {wh.SIGNATURE_HEADER: f"t={stamp},v1={wh.signature(payload, secret, stamp)}"}


@pytest.fixture
async def endpoint(ledger: store.LedgerStore) -> AsyncIterator[tuple[str, wh.PaymentInbox]]:
    inbox = wh.PaymentInbox(ledger.pool)
    app = web.Application()
    app.router.add_post(
        "/stripe/webhook", wh.aiohttp_handler(secrets=lambda: [SECRET], inbox=inbox)
    )
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        yield f"http://127.0.0.1:{port}/stripe/webhook", inbox
    finally:
        await runner.cleanup()


async def counts(ledger: store.LedgerStore) -> tuple[int, int]:
    events = await ledger.pool.fetchval("SELECT count(*) FROM stripe_webhook_events")
    states = await ledger.pool.fetchval("SELECT count(*) FROM stripe_payment_state")
    return int(events), int(states)


async def test_bad_stale_and_replayed_deliveries_change_nothing(
    endpoint: tuple[str, wh.PaymentInbox], ledger: store.LedgerStore
) -> None:
    url, inbox = endpoint
    now = int(time.time())
    failed = event("evt_fail", wh.PAYMENT_FAILED, now - 60, subscription="sub_W")
    async with httpx.AsyncClient() as http:
        bad = await http.post(url, content=failed, headers=signed(failed, secret="whsec_wrong"))
        stale = await http.post(url, content=failed, headers=signed(failed, at=now - 3600))
        unsigned = await http.post(url, content=failed)
        tampered = await http.post(url, content=failed + b" ", headers=signed(failed))
        assert [r.status_code for r in (bad, stale, unsigned, tampered)] == [400] * 4
        assert [r.json()["error"]["code"] for r in (bad, stale)] == [
            "bad_signature",
            "stale_signature",
        ]
        assert await counts(ledger) == (0, 0)

        good = await http.post(url, content=failed, headers=signed(failed))
        assert (good.status_code, good.json()["duplicate"]) == (200, False)
        state = (await inbox.states(["cus_W"]))["cus_W"]
        assert state.failed_since is not None
        replayed = await http.post(url, content=failed, headers=signed(failed))
        assert (replayed.status_code, replayed.json()["duplicate"]) == (200, True)
        assert await counts(ledger) == (1, 1)
        assert (await inbox.states(["cus_W"]))["cus_W"] == state

        paid = event("evt_paid", wh.PAID, now)
        assert (await http.post(url, content=paid, headers=signed(paid))).status_code == 200
        assert (await inbox.states(["cus_W"]))["cus_W"].failed_since is None


async def test_one_event_delivered_twenty_times_at_once_is_applied_once(
    endpoint: tuple[str, wh.PaymentInbox], ledger: store.LedgerStore
) -> None:
    url, _ = endpoint
    now = int(time.time())
    failed = event("evt_burst", wh.PAYMENT_FAILED, now)
    async with httpx.AsyncClient() as http:
        answers = await asyncio.gather(
            *(http.post(url, content=failed, headers=signed(failed)) for _ in range(20))
        )
    assert [a.status_code for a in answers] == [200] * 20
    assert sum(not a.json()["duplicate"] for a in answers) == 1
    assert await counts(ledger) == (1, 1)


async def test_events_applied_out_of_order_keep_the_newest_facts(
    endpoint: tuple[str, wh.PaymentInbox],
) -> None:
    url, inbox = endpoint
    now = int(time.time())
    deliveries = [
        event("evt_u2", wh.SUBSCRIPTION_UPDATED, now, id="sub_W", status="active"),
        event("evt_d1", wh.SUBSCRIPTION_DELETED, now - 100, id="sub_W", status="active"),
        event("evt_p3", wh.PAID, now - 10),
        event("evt_f2", wh.PAYMENT_FAILED, now - 20),
    ]
    async with httpx.AsyncClient() as http:
        for payload in deliveries:
            assert (
                await http.post(url, content=payload, headers=signed(payload))
            ).status_code == 200
    state = (await inbox.states(["cus_W"]))["cus_W"]
    assert state.subscription_status == "active"  # the deletion was older
    assert state.failed_since is None  # the failure came before the payment


async def test_unknown_event_types_are_acknowledged_and_ignored(
    endpoint: tuple[str, wh.PaymentInbox], ledger: store.LedgerStore
) -> None:
    url, _ = endpoint
    payload = event("evt_other", "customer.created", int(time.time()))
    async with httpx.AsyncClient() as http:
        answer = await http.post(url, content=payload, headers=signed(payload))
    assert answer.status_code == 200
    assert await counts(ledger) == (1, 0)
