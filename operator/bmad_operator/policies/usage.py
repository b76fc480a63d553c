"""What the usage ledger means for an Agent's and a Tenant's status (pure).

`status_usage` turns the ledger's totals into ``status.usage``; `budget_condition`
decides ``BudgetExhausted`` from the tenant's budget state
(`bmad_integrations.usage.budget.decide`); `budget_event` says what to post when it
flips; `budget_warning` decides the soft warning (``BudgetWarning``, given once per
billing month: an Event and an e-mail, `warning_mail`). The operator's metering loop
(`bmad_operator.metering`) decides the state and tells the agents; the reconcilers
only show it.
"""

from __future__ import annotations

import datetime as dt
import decimal
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from bmad_integrations.usage import budget, store
from bmad_operator import events
from bmad_operator.conditions import FALSE, TRUE, Cond, find

BUDGET_EXHAUSTED = "BudgetExhausted"
# Reasons of BudgetExhausted
TOKENS_PER_MONTH_REACHED = "TokensPerMonthReached"
COST_PER_MONTH_REACHED = "CostPerMonthReached"
WITHIN_BUDGET = "WithinBudget"
NO_TOKEN_BUDGET = "NoTokenBudget"  # noqa: S105 - a condition reason
# Events
EVENT_BUDGET_EXHAUSTED = "BudgetExhausted"
EVENT_BUDGET_RESTORED = "BudgetRestored"

BUDGET_WARNING = "BudgetWarning"
# Reasons of BudgetWarning (and NO_TOKEN_BUDGET)
TOKENS_PER_MONTH_NEARLY_USED = "TokensPerMonthNearlyUsed"
COST_PER_MONTH_NEARLY_USED = "CostPerMonthNearlyUsed"
BELOW_WARNING_LEVEL = "BelowWarningLevel"
# Events
EVENT_BUDGET_WARNING = "BudgetWarning"
EVENT_NOTIFICATION_FAILED = "NotificationFailed"


def _amount(value: decimal.Decimal) -> str:
    return format(value.normalize(), "f")


def totals(period: store.Totals) -> dict[str, Any]:
    shown: dict[str, Any] = {
        "calls": period.records,
        "tokensIn": period.tokens_in,
        "tokensOut": period.tokens_out,
    }
    if period.cost:
        shown["cost"] = {currency: _amount(v) for currency, v in sorted(period.cost.items())}
    if period.unpriced:
        shown["unpricedCalls"] = period.unpriced
    return shown


def status_usage(usage: store.PeriodUsage) -> dict[str, Any]:
    """``status.usage`` of an Agent (a Tenant's adds its counts of agents and replicas)."""
    return {
        "periodStart": usage.period_start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "thisPeriod": totals(usage.this_period),
        "lastPeriod": totals(usage.last_period),
    }


def _used(state: budget.State, whose: str) -> str:
    """What the budget state says is used, of each budget the tenant has."""
    parts = []
    if state.limit is not None:
        parts.append(f"{state.used} of {whose} {state.limit} tokens")
    if state.cost_limit is not None:
        parts.append(
            f"{budget.amount(state.cost_used)} of {whose} {budget.amount(state.cost_limit)} "
            f"{state.currency}"
        )
    return " and ".join(parts)


def budget_condition(state: budget.State | None, *, tenant: str | None = None) -> Cond:
    """BudgetExhausted of a Tenant (``tenant`` None) or of one of its Agents."""
    whose = "the tenant's" if tenant is None else f"tenant {tenant}'s"
    if state is None:
        return Cond(
            BUDGET_EXHAUSTED,
            FALSE,
            NO_TOKEN_BUDGET,
            f"{whose[0].upper()}{whose[1:]} spec.limits.tokensPerMonth and costPerMonth are "
            "not set.",
        )
    if state.exhausted:
        tokens = state.tokens_exhausted
        field = "tokensPerMonth" if tokens else "costPerMonth"
        return Cond(
            BUDGET_EXHAUSTED,
            TRUE,
            TOKENS_PER_MONTH_REACHED if tokens else COST_PER_MONTH_REACHED,
            f"{_used(state, whose)} this month are used: new "
            f"invocations and tasks are refused (HTTP 429, code budget_exhausted) until "
            f"{state.resets_at.strftime('%Y-%m-%dT%H:%M:%SZ')} or until "
            f"spec.limits.{field} is raised.",
        )
    return Cond(
        BUDGET_EXHAUSTED,
        FALSE,
        WITHIN_BUDGET,
        f"{_used(state, whose)} this month are used.",
    )


def budget_event(previous: Sequence[Mapping[str, Any]], cond: Cond) -> events.Event | None:
    """Warning when the budget became exhausted; Normal when work may resume."""
    before = find(previous, BUDGET_EXHAUSTED)
    was = before is not None and before.get("status") == TRUE
    if cond.status == TRUE and not was:
        return events.Event(events.WARNING, EVENT_BUDGET_EXHAUSTED, cond.message)
    if cond.status != TRUE and was:
        return events.Event(events.NORMAL, EVENT_BUDGET_RESTORED, cond.message)
    return None


def _stamp(when: dt.datetime) -> str:
    return when.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def warning_level(limit: int, percent: int) -> int:
    """The tokens at which a tenant with ``limit`` tokens a month is warned (rounded up:
    a warning never comes before the percentage is reached)."""
    return -(-limit * percent // 100)


@dataclass(frozen=True)
class BudgetWarning:
    """The soft warning's condition, whether to give it now (Event and e-mail), and the
    billing month it was last given for (``status.usage.warnedForPeriod``)."""

    condition: Cond
    give: bool
    warned_for: str | None


def cost_warning_level(limit: decimal.Decimal, percent: int) -> decimal.Decimal:
    """The cost at which a tenant with a cost budget of ``limit`` is warned."""
    return limit * percent / 100


def budget_warning(
    state: budget.State | None, *, percent: int, warned_for: str | None
) -> BudgetWarning:
    """``BudgetWarning`` of a Tenant whose budget state is ``state`` and that was last
    warned for the month starting ``warned_for``: given once per month, when the
    tokens used reach ``percent`` of ``tokensPerMonth`` or the cost ``percent`` of
    ``costPerMonth``, whichever comes first."""
    if state is None or (state.limit is None and state.cost_limit is None):
        cond = Cond(
            BUDGET_WARNING,
            FALSE,
            NO_TOKEN_BUDGET,
            "The tenant's spec.limits.tokensPerMonth and costPerMonth are not set.",
        )
        return BudgetWarning(cond, give=False, warned_for=warned_for)
    level = warning_level(state.limit, percent) if state.limit is not None else None
    cost_level = (
        cost_warning_level(state.cost_limit, percent) if state.cost_limit is not None else None
    )
    tokens_near = level is not None and state.used >= level
    cost_near = (
        cost_level is not None and state.cost_used is not None and state.cost_used >= cost_level
    )
    if not (tokens_near or cost_near):
        parts = []
        if state.limit is not None:
            parts.append(
                f"{state.used} of the tenant's {state.limit} tokens this month are used; the "
                f"warning comes at {level}"
            )
        if state.cost_limit is not None:
            parts.append(
                f"{budget.amount(state.cost_used)} of its {budget.amount(state.cost_limit)} "
                f"{state.currency} are spent; the warning comes at "
                f"{budget.amount(cost_level)} {state.currency}"
            )
        cond = Cond(
            BUDGET_WARNING,
            FALSE,
            BELOW_WARNING_LEVEL,
            "; ".join(parts) + f" ({percent}%, spec.limits.warnAtPercent).",
        )
        return BudgetWarning(cond, give=False, warned_for=warned_for)
    if tokens_near:
        reason = TOKENS_PER_MONTH_NEARLY_USED
        message = (
            f"{state.used} of the tenant's {state.limit} tokens this month are used, at "
            f"least {percent}% (spec.limits.warnAtPercent): new invocations and tasks are "
            f"refused from {state.limit} tokens until {_stamp(state.resets_at)}, unless "
            "spec.limits.tokensPerMonth is raised."
        )
    else:
        reason = COST_PER_MONTH_NEARLY_USED
        message = (
            f"{budget.amount(state.cost_used)} of the tenant's "
            f"{budget.amount(state.cost_limit)} {state.currency} this month are spent, at "
            f"least {percent}% (spec.limits.warnAtPercent): new invocations and tasks are "
            f"refused from {budget.amount(state.cost_limit)} {state.currency} until "
            f"{_stamp(state.resets_at)}, unless spec.limits.costPerMonth is raised."
        )
    cond = Cond(BUDGET_WARNING, TRUE, reason, message)
    period = _stamp(state.period_start)
    return BudgetWarning(cond, give=warned_for != period, warned_for=period)


def warning_event(warning: BudgetWarning) -> events.Event:
    return events.Event(events.WARNING, EVENT_BUDGET_WARNING, warning.condition.message)


def warning_mail(tenant: str, warning: BudgetWarning) -> tuple[str, str]:
    """Subject and body of the budget warning's e-mail."""
    what = "cost" if warning.condition.reason == COST_PER_MONTH_NEARLY_USED else "token"
    subject = f"BMAD tenant {tenant}: {what} budget at warning level"
    body = (
        f"Tenant {tenant}: {warning.condition.message}\n\n"
        "This warning is sent once per billing month (UTC calendar month).\n"
    )
    return subject, body


def notification_failed(detail: str) -> events.Event:
    return events.Event(
        events.WARNING,
        EVENT_NOTIFICATION_FAILED,
        f"The budget warning e-mail was not sent: {detail}",
    )
