"""The operator's usage-ledger settings: both stores or neither; agents never get the
operator's credentials."""

from __future__ import annotations

import decimal
from pathlib import Path

import pydantic
import pytest

from bmad_integrations import billing
from bmad_integrations.usage import prices, reporter
from bmad_operator import metering, settings, store

pytestmark = pytest.mark.unit

API = "bmad.dev/v1alpha1"


def test_metering_is_off_by_default() -> None:
    assert not settings.OperatorSettings().metering


def test_the_ledger_needs_both_redis_and_postgresql() -> None:
    with pytest.raises(pydantic.ValidationError, match="go together"):
        settings.OperatorSettings(usage_redis_url="redis://127.0.0.1:6379/0")
    with pytest.raises(pydantic.ValidationError, match="go together"):
        settings.OperatorSettings(ledger_dsn="postgresql://x@127.0.0.1/ledger")


@pytest.mark.parametrize(
    ("operator_url", "agent_url", "expected"),
    [
        ("redis://admin:pw@10.0.0.5:6380/2", "", "redis://10.0.0.5:6380/2"),
        ("redis://:pw@ledger:6379/0", "", "redis://ledger:6379/0"),
        ("rediss://:pw@ledger/0", "", "rediss://ledger/0"),
        ("redis://:pw@127.0.0.1:1/0", "redis://u:p@ledger.svc:6379/0", "redis://ledger.svc:6379/0"),
    ],
)
def test_agents_get_the_ledger_url_without_credentials(
    operator_url: str, agent_url: str, expected: str
) -> None:
    cfg = settings.OperatorSettings(
        usage_redis_url=operator_url,
        usage_agent_redis_url=agent_url,
        ledger_dsn="postgresql://x@127.0.0.1/ledger",
    )
    assert cfg.metering
    assert cfg.agent_ledger_url() == expected


def price_table(currency: str, price: str) -> str:
    return (
        f"currency: {currency}\nprices:\n"
        f'  - {{provider: echo, model: "*", inputPer1M: "{price}", outputPer1M: "{price}"}}\n'
    )


def test_the_price_file_is_read_again_when_it_changes_and_a_bad_one_keeps_the_last(
    tmp_path: Path,
) -> None:
    path = tmp_path / "prices.yaml"
    path.write_text(price_table("USD", "1"))
    table = metering.PriceFile(str(path))
    first = table()
    assert first is not prices.EMPTY
    path.write_text("prices: [{provider: echo}]\n")  # refused: the last table stays
    assert table() is first
    path.write_text(price_table("EUR", "12.5"))  # another size: seen even within one tick
    assert table() is not first
    assert metering.PriceFile("")() is prices.EMPTY


def test_what_is_reported_to_stripe_and_what_waits() -> None:
    cache = store.Store()
    for tenant in ("billed", "unbilled", "pending"):
        cache.put(
            {"apiVersion": "bmad.dev/v1alpha1", "kind": "Tenant", "metadata": {"name": tenant}}
        )
    cfg = settings.OperatorSettings(
        usage_redis_url="redis://127.0.0.1:1/0", ledger_dsn="postgresql://x@127.0.0.1/l"
    )
    meter = metering.Metering(cfg, cache, notify_agent=print, notify_tenant=print)
    account = billing.StripeAccount(api_key="sk_test_x")
    meter.bill_to("billed", reporter.Target(customer_id="cus_1", account=account))
    meter.bill_to("unbilled", reporter.Target(customer_id=None))
    meter.bill_to("pending", None)  # billing not in place yet
    targets = meter.report_targets({"billed", "unbilled", "pending", "unknown-tenant", "team-x"})
    assert targets["billed"].customer_id == "cus_1"
    assert targets["unbilled"].customer_id is None
    assert "pending" not in targets  # never marked unbilled while its customer is coming
    # A namespace without a Tenant is metered, not billed.
    assert targets["team-x"].customer_id is None
    assert targets["unknown-tenant"].customer_id is None


def test_the_stripe_webhook_port_needs_the_ledger() -> None:
    assert settings.OperatorSettings().stripe_webhook_port == 0
    with pytest.raises(pydantic.ValidationError, match="STRIPE_WEBHOOK_PORT needs the usage"):
        settings.OperatorSettings(stripe_webhook_port=8082)
    cfg = settings.OperatorSettings(
        stripe_webhook_port=8082,
        usage_redis_url="redis://127.0.0.1:6379/0",
        ledger_dsn="postgresql://x@127.0.0.1/ledger",
        payment_grace_seconds=60,
    )
    assert cfg.stripe_webhook_port == 8082
    assert cfg.payment_grace_seconds == 60


def test_the_cost_budget_is_read_from_the_tenants_limits() -> None:
    def tenant(limits: object) -> dict[str, object]:
        return {"spec": {"limits": limits}}

    assert metering.cost_per_month(
        tenant({"costPerMonth": {"amount": "2.50", "currency": "USD"}})
    ) == (
        decimal.Decimal("2.50"),
        "USD",
    )
    assert metering.cost_per_month(tenant({"tokensPerMonth": 5})) is None
    assert (
        metering.cost_per_month(tenant({"costPerMonth": {"amount": "x", "currency": "USD"}}))
        is None
    )
    assert metering.cost_per_month({}) is None


def test_the_stripe_meters_default_to_input_and_output_tokens() -> None:
    assert settings.OperatorSettings().meters() == reporter.DEFAULT_METERS


def test_the_stripe_meters_setting_names_event_names_and_quantities() -> None:
    cfg = settings.OperatorSettings(
        stripe_meters="bmad_input_tokens=tokens_in, bmad_tokens=tokens,"
        "bmad_cost_usd=cost:USD,bmad_cost_eur_cents=cost:EUR:2"
    )
    assert cfg.meters() == (
        reporter.Meter("bmad_input_tokens", "tokens_in"),
        reporter.Meter("bmad_tokens", "tokens"),
        reporter.Meter("bmad_cost_usd", "cost", currency="USD", scale=6),
        reporter.Meter("bmad_cost_eur_cents", "cost", currency="EUR", scale=2),
    )


@pytest.mark.parametrize(
    ("setting", "says"),
    [
        ("bmad_tokens", "is not <event name>=<quantity>"),
        ("=tokens", "is not <event name>=<quantity>"),
        ("bmad_tokens=words", "the quantity 'words' is not one of"),
        ("bmad_tokens=tokens:USD", "only a cost meter takes a currency"),
        ("bmad_cost=cost", "names an ISO 4217 currency"),
        ("bmad_cost=cost:usd", "names an ISO 4217 currency"),
        ("bmad_cost=cost:ÄÖÜ", "names an ISO 4217 currency"),  # the price table's rule
        ("bmad_cost=cost:USD:12", "the scale is a whole number from 0 to 9"),
        ("a=tokens,a=tokens_in", "the event name 'a' is given twice"),
        (f"{'x' * 101}=tokens", "1-100 characters"),
    ],
)
def test_a_bad_stripe_meters_setting_stops_the_start_saying_what_to_change(
    setting: str, says: str
) -> None:
    with pytest.raises(pydantic.ValidationError, match="BMAD_OPERATOR_STRIPE_METERS") as info:
        settings.OperatorSettings(stripe_meters=setting)
    assert says in str(info.value)
