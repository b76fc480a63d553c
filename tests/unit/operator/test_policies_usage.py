"""status.usage and BudgetExhausted from the ledger (pure)."""

from __future__ import annotations

import datetime as dt
import decimal

import pytest

from bmad_integrations.usage import budget, store
from bmad_operator import conditions, events
from bmad_operator.policies import usage

pytestmark = pytest.mark.unit

NOW = dt.datetime(2026, 11, 30, 10, 0, tzinfo=dt.UTC)


def test_status_usage_shows_both_periods_and_cost_per_currency() -> None:
    shown = usage.status_usage(
        store.PeriodUsage(
            period_start=dt.datetime(2026, 11, 1, tzinfo=dt.UTC),
            this_period=store.Totals(
                records=3,
                tokens_in=100,
                tokens_out=50,
                cost={"USD": decimal.Decimal("0.000750000000")},
                unpriced=1,
            ),
            last_period=store.Totals(),
        )
    )
    assert shown == {
        "periodStart": "2026-11-01T00:00:00Z",
        "thisPeriod": {
            "calls": 3,
            "tokensIn": 100,
            "tokensOut": 50,
            "cost": {"USD": "0.00075"},
            "unpricedCalls": 1,
        },
        "lastPeriod": {"calls": 0, "tokensIn": 0, "tokensOut": 0},
    }


def test_budget_condition_and_its_events() -> None:
    none = usage.budget_condition(None)
    assert (none.status, none.reason) == (conditions.FALSE, usage.NO_TOKEN_BUDGET)
    within = usage.budget_condition(budget.decide(limit=1000, used=10, now=NOW))
    assert (within.status, within.reason) == (conditions.FALSE, usage.WITHIN_BUDGET)
    over = usage.budget_condition(budget.decide(limit=1000, used=1004, now=NOW), tenant="acme")
    assert (over.status, over.reason) == (conditions.TRUE, usage.TOKENS_PER_MONTH_REACHED)
    assert "1004 of tenant acme's 1000 tokens" in over.message
    assert "2026-12-01T00:00:00Z" in over.message
    assert usage.budget_event([], within) is None
    flipped = usage.budget_event([], over)
    assert flipped is not None
    assert (flipped.type, flipped.reason) == (events.WARNING, "BudgetExhausted")
    shown = conditions.merge([], [over], generation=1)
    assert usage.budget_event(shown, over) is None
    restored = usage.budget_event(shown, within)
    assert restored is not None
    assert (restored.type, restored.reason) == (events.NORMAL, "BudgetRestored")
