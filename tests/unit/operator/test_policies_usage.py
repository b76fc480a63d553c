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


def test_budget_warning_level_rounds_up_and_is_given_once_per_period() -> None:
    assert usage.warning_level(1000, 80) == 800
    assert usage.warning_level(999, 80) == 800  # 799.2: never before the percentage
    assert usage.warning_level(1000, 100) == 1000
    now = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)
    state = budget.decide(limit=999, used=799, now=now)
    below = usage.budget_warning(state, percent=80, warned_for=None)
    assert (below.condition.status, below.condition.reason, below.give) == (
        "False",
        "BelowWarningLevel",
        False,
    )
    state = budget.decide(limit=999, used=800, now=now)
    given = usage.budget_warning(state, percent=80, warned_for="2026-10-01T00:00:00Z")
    assert (given.condition.status, given.condition.reason, given.give) == (
        "True",
        "TokensPerMonthNearlyUsed",
        True,
    )
    assert given.warned_for == "2026-11-01T00:00:00Z"
    again = usage.budget_warning(state, percent=80, warned_for="2026-11-01T00:00:00Z")
    assert again.give is False
    assert again.condition == given.condition
    none = usage.budget_warning(None, percent=80, warned_for="2026-11-01T00:00:00Z")
    assert (none.condition.reason, none.give, none.warned_for) == (
        "NoTokenBudget",
        False,
        "2026-11-01T00:00:00Z",
    )
    subject, body = usage.warning_mail("acme", given)
    assert "acme" in subject
    assert given.condition.message in body


def test_a_cost_budget_reached_is_cost_per_month_reached() -> None:
    state = budget.decide(
        limit=None,
        used=5,
        now=NOW,
        cost_limit=decimal.Decimal("2"),
        cost_used=decimal.Decimal("2.5"),
        currency="EUR",
    )
    cond = usage.budget_condition(state)
    assert (cond.status, cond.reason) == ("True", usage.COST_PER_MONTH_REACHED)
    assert cond.message.startswith("2.5 of the tenant's 2 EUR this month are used")
    assert "spec.limits.costPerMonth is raised" in cond.message
    both = budget.decide(
        limit=100,
        used=5,
        now=NOW,
        cost_limit=decimal.Decimal("2"),
        cost_used=decimal.Decimal("1"),
        currency="EUR",
    )
    within = usage.budget_condition(both, tenant="acme")
    assert (within.status, within.reason) == ("False", usage.WITHIN_BUDGET)
    assert (
        within.message
        == "5 of tenant acme's 100 tokens and 1 of tenant acme's 2 EUR this month are used."
    )
    # No token budget: the warning comes from the cost budget (here already spent).
    warning = usage.budget_warning(state, percent=80, warned_for=None)
    assert (warning.condition.reason, warning.give) == ("CostPerMonthNearlyUsed", True)


def test_the_soft_warning_also_comes_from_the_cost_budget() -> None:
    now = dt.datetime(2026, 11, 30, 12, tzinfo=dt.UTC)

    def state(tokens: int, spent: str, *, limit: int | None = 1000) -> budget.State | None:
        return budget.decide(
            limit=limit,
            used=tokens,
            now=now,
            cost_limit=decimal.Decimal("10"),
            cost_used=decimal.Decimal(spent),
            currency="EUR",
        )

    assert usage.cost_warning_level(decimal.Decimal("10"), 75) == decimal.Decimal("7.5")
    below = usage.budget_warning(state(100, "7.49"), percent=75, warned_for=None)
    assert (below.condition.reason, below.give) == ("BelowWarningLevel", False)
    assert "the warning comes at 750" in below.condition.message
    assert "7.49 of its 10 EUR are spent; the warning comes at 7.5 EUR" in below.condition.message
    cost = usage.budget_warning(state(100, "7.5"), percent=75, warned_for=None)
    assert (cost.condition.status, cost.condition.reason, cost.give) == (
        "True",
        "CostPerMonthNearlyUsed",
        True,
    )
    assert "7.5 of the tenant's 10 EUR" in cost.condition.message
    assert "spec.limits.costPerMonth" in cost.condition.message
    assert cost.warned_for == "2026-11-01T00:00:00Z"
    subject, _ = usage.warning_mail("acme", cost)
    assert "cost budget" in subject
    # The tokens' level first: it names the tokens.
    both = usage.budget_warning(state(800, "9"), percent=75, warned_for=None)
    assert both.condition.reason == "TokensPerMonthNearlyUsed"
    # A cost budget alone warns too; once given for the month, not again.
    alone = usage.budget_warning(
        state(0, "8", limit=None), percent=75, warned_for="2026-11-01T00:00:00Z"
    )
    assert (alone.condition.reason, alone.give) == ("CostPerMonthNearlyUsed", False)
