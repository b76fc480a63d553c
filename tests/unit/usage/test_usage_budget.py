"""Token budgets: the decision, the key's codec, the writer's read permission (pure)."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest

from bmad_integrations.usage import acl, budget, record

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)


def test_a_tenant_without_a_limit_has_no_budget_state() -> None:
    assert budget.decide(limit=None, used=10**9, now=NOW) is None


@pytest.mark.parametrize(
    ("used", "exhausted"), [(0, False), (999, False), (1000, True), (1004, True)]
)
def test_the_budget_is_exhausted_once_the_ledger_reaches_the_limit(
    used: int, exhausted: bool
) -> None:
    state = budget.decide(limit=1000, used=used, now=NOW)
    assert state is not None
    assert state.exhausted is exhausted
    assert state.period_start == dt.datetime(2026, 11, 1, tzinfo=dt.UTC)
    assert state.resets_at == dt.datetime(2026, 12, 1, tzinfo=dt.UTC)


def test_a_state_refuses_only_until_its_period_ends() -> None:
    state = budget.decide(limit=10, used=11, now=NOW)
    assert state is not None
    assert state.refuses(NOW)
    assert not state.refuses(dt.datetime(2026, 12, 1, tzinfo=dt.UTC))
    assert "resets at 2026-12-01T00:00:00+00:00" in state.message()


def test_the_key_round_trips_and_garbage_is_no_state() -> None:
    state = budget.decide(limit=1000, used=1200, now=NOW)
    assert state is not None
    assert budget.decode(budget.encode(state)) == state
    assert budget.decode(budget.encode(state).encode()) == state
    for junk in (None, "", "{}", "not json", '{"exhausted": true}', "[1]"):
        assert budget.decode(junk) is None


@pytest.mark.parametrize("tenant", ["", "a:b", "a*", "a b", "x?"])
def test_a_tenant_name_that_would_widen_the_key_is_refused(tenant: str) -> None:
    with pytest.raises(record.RecordError):
        budget.key(tenant)


def test_a_writer_with_a_tenant_may_get_that_tenants_budget_key_only() -> None:
    rules = acl.writer_rules("team-a", "dev", "p" * 20, tenant="acme")
    assert "%R~bmad:budget:acme" in rules
    assert "+get" in rules
    assert rules.index("-@all") < rules.index("+get")
    assert not any(r.startswith(("~", "%RW~")) for r in rules)
    without = acl.writer_rules("team-a", "dev", "p" * 20)
    assert "+get" not in without
    assert not any("budget" in r for r in without)


def test_a_cost_budget_is_exhausted_once_the_cost_in_its_currency_reaches_it() -> None:
    below = budget.decide(
        limit=None,
        used=10**6,
        now=NOW,
        cost_limit=decimal.Decimal("5.00"),
        cost_used=decimal.Decimal("4.999999"),
        currency="USD",
    )
    assert below is not None
    assert not below.exhausted
    assert (below.limit, below.tokens_exhausted, below.cost_exhausted) == (None, False, False)
    reached = budget.decide(
        limit=10**9,
        used=10,
        now=NOW,
        cost_limit=decimal.Decimal("5.00"),
        cost_used=decimal.Decimal("5.000001"),
        currency="USD",
    )
    assert reached is not None
    assert reached.exhausted
    assert reached.cost_exhausted
    assert not reached.tokens_exhausted
    assert reached.message() == (
        "the tenant's cost budget is used up: 5.000001 of 5 USD this period "
        "(spec.limits.costPerMonth); it resets at 2026-12-01T00:00:00+00:00"
    )
    # Round trip through the key, and a key written without a cost budget still reads.
    assert budget.decode(budget.encode(reached)) == reached
    tokens_only = budget.decide(limit=1000, used=1200, now=NOW)
    assert tokens_only is not None
    assert "costLimit" not in budget.encode(tokens_only)
    assert budget.decode(budget.encode(tokens_only)) == tokens_only
    broken = (
        '{"exhausted": true, "limit": 1, "used": 2, "periodStart": "2026-11-01T00:00:00+00:00", '
        '"resetsAt": "2026-12-01T00:00:00+00:00", "costLimit": "x", "costUsed": "1", '
        '"currency": "USD"}'
    )
    assert budget.decode(broken) is None
