"""What the ingester accepts into the ledger, and what it refuses (pure rules)."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal

import pytest

from bmad_integrations.usage import acl, ingester, prices, record

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 6, 1, 0, 0, 5, tzinfo=dt.UTC)
KEY = record.stream_key("acme-dev", "analyst")
TABLE = prices.parse(
    {
        "currency": "USD",
        "prices": [
            {"provider": "openai", "model": "gpt-4o", "inputPer1M": "2", "outputPer1M": "8"}
        ],
    }
)


def fields(**changes: str) -> dict[str, str]:
    rec = record.UsageRecord(
        record_id="task:t1:0",
        tenant="acme-dev",
        namespace="acme-dev",
        agent="analyst",
        provider="openai",
        model="gpt-4o",
        tokens_in=1000,
        tokens_out=500,
        occurred_at=NOW - dt.timedelta(seconds=10),
        source="task",
    )
    data = record.encode(rec)
    data.update(changes)
    return data


def tenants(namespace: str) -> str:
    return {"acme-dev": "acme"}.get(namespace, namespace)


def test_the_tenant_is_the_namespace_owner_whatever_the_record_says() -> None:
    row = ingester.judge(KEY, fields(tenant="globex"), tenant_of=tenants, table=TABLE, now=NOW)
    assert row.record.tenant == "acme"
    assert row.cost is not None
    assert row.cost.amount == Decimal("0.006")  # 1000 * 2/1e6 + 500 * 8/1e6
    assert row.cost.price.currency == "USD"


@pytest.mark.parametrize("change", [{"namespace": "globex"}, {"agent": "dev"}])
def test_a_record_claiming_another_agent_is_refused(change: dict[str, str]) -> None:
    with pytest.raises(record.RecordError) as caught:
        ingester.judge(KEY, fields(**change), tenant_of=tenants, table=TABLE, now=NOW)
    assert caught.value.reason == "WrongStream"


def test_a_time_in_the_future_is_taken_as_now() -> None:
    ahead = (NOW + dt.timedelta(days=40)).isoformat()
    row = ingester.judge(KEY, fields(at=ahead), tenant_of=tenants, table=TABLE, now=NOW)
    assert row.record.occurred_at == NOW


def test_an_unpriced_model_is_metered_without_a_cost() -> None:
    row = ingester.judge(KEY, fields(model="gpt-5"), tenant_of=tenants, table=TABLE, now=NOW)
    assert row.cost is None
    assert row.record.tokens == 1500


def test_a_broken_entry_is_refused_with_its_reason() -> None:
    with pytest.raises(record.RecordError) as caught:
        ingester.judge(KEY, {"v": "1"}, tenant_of=tenants, table=TABLE, now=NOW)
    assert caught.value.reason == "Malformed"


def test_a_writer_may_only_append_to_its_own_stream() -> None:
    rules = acl.writer_rules("acme-dev", "analyst", "p" * 32)
    assert rules[0] == "reset"  # nothing left over from an earlier version of the user
    assert "%W~bmad:usage:acme-dev:analyst" in rules  # write-only, one key
    assert [r for r in rules if "~" in r] == ["%W~bmad:usage:acme-dev:analyst"]
    assert "-@all" in rules
    assert [r for r in rules if r.startswith("+")] == ["+xadd", "+ping"]
    assert "resetchannels" in rules
    assert not any("p" * 32 in r for r in rules)  # only the hash is sent
    assert any(r.startswith("#") and len(r) == 65 for r in rules)


def test_writer_passwords_are_long() -> None:
    with pytest.raises(ValueError, match="16"):
        acl.writer_rules("a", "b", "short")
    assert len(acl.new_password()) >= 40
