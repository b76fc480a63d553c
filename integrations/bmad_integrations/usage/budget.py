"""A tenant's token budget: the operator's decision, and the key that tells its agents.

The operator (leader) compares each Tenant's ``spec.limits.tokensPerMonth`` (and
``costPerMonth``, in one currency) with the ledger's totals for the current period
(`decide`, pure) and writes the result into the
platform Redis under ``bmad:budget:<tenant>`` (`encode`). Every agent's ledger writer
may read that one key of its own tenant (see `acl.writer_rules`) and nothing else; the
runtime reads it with a short cache before it admits an invocation or a task
(`decode`, `State.refuses`).

The state carries the end of its period, so an agent refuses only until then even if
the operator is down when the period turns; a state that cannot be read or decoded
refuses nothing (the ledger write, which must succeed for any answer, fails anyway
when the platform Redis is down).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import json
from dataclasses import dataclass

from bmad_integrations.usage import periods, record

KEY_PREFIX = "bmad:budget"
CODE = "BudgetExhausted"


def key(tenant: str) -> str:
    """The platform Redis key holding a tenant's budget state."""
    if not tenant or any(c in tenant for c in ":*?[]\\ "):
        raise record.RecordError("InvalidName", f"tenant {tenant!r} is not an object name")
    return f"{KEY_PREFIX}:{tenant}"


@dataclass(frozen=True)
class State:
    """Whether a tenant's agents refuse work, and until when.

    ``limit``/``used`` are tokens (``limit`` None: no token budget); ``cost_limit``/
    ``cost_used`` the cost budget in ``currency`` (None: no cost budget)."""

    exhausted: bool
    limit: int | None
    used: int
    period_start: dt.datetime
    resets_at: dt.datetime
    cost_limit: decimal.Decimal | None = None
    cost_used: decimal.Decimal | None = None
    currency: str | None = None

    @property
    def tokens_exhausted(self) -> bool:
        return self.limit is not None and self.used >= self.limit

    @property
    def cost_exhausted(self) -> bool:
        return (
            self.cost_limit is not None
            and self.cost_used is not None
            and self.cost_used >= self.cost_limit
        )

    def refuses(self, now: dt.datetime) -> bool:
        return self.exhausted and now < self.resets_at

    def message(self) -> str:
        if self.cost_exhausted and not self.tokens_exhausted:
            return (
                f"the tenant's cost budget is used up: {amount(self.cost_used)} of "
                f"{amount(self.cost_limit)} {self.currency} this period "
                f"(spec.limits.costPerMonth); it resets at {self.resets_at.isoformat()}"
            )
        return (
            f"the tenant's token budget is used up: {self.used} of {self.limit} tokens this "
            f"period (spec.limits.tokensPerMonth); it resets at {self.resets_at.isoformat()}"
        )


def amount(value: decimal.Decimal | None) -> str:
    """A cost as text: no exponent, no trailing zeros."""
    if value is None:
        return "?"
    text = format(value, "f")
    return text.rstrip("0").rstrip(".") if "." in text else text


def decide(
    *,
    limit: int | None,
    used: int,
    now: dt.datetime,
    cost_limit: decimal.Decimal | None = None,
    cost_used: decimal.Decimal = decimal.Decimal(0),
    currency: str | None = None,
) -> State | None:
    """The budget state for a tenant with ``limit`` tokens a month that used ``used``
    this period (and a cost budget of ``cost_limit`` ``currency`` of which ``cost_used``
    is spent); None when it has neither budget."""
    if limit is None and cost_limit is None:
        return None
    period = periods.containing(now)
    state = State(
        exhausted=False,
        limit=limit,
        used=used,
        period_start=period.start,
        resets_at=period.end,
        cost_limit=cost_limit,
        cost_used=cost_used if cost_limit is not None else None,
        currency=currency if cost_limit is not None else None,
    )
    return dataclasses.replace(state, exhausted=state.tokens_exhausted or state.cost_exhausted)


def encode(state: State) -> str:
    data: dict[str, object] = {
        "exhausted": state.exhausted,
        "limit": state.limit,
        "used": state.used,
        "periodStart": state.period_start.isoformat(),
        "resetsAt": state.resets_at.isoformat(),
    }
    if state.cost_limit is not None:
        data["costLimit"] = str(state.cost_limit)
        data["costUsed"] = str(state.cost_used)
        data["currency"] = state.currency
    return json.dumps(data, sort_keys=True)


def decode(raw: str | bytes | None) -> State | None:
    """The state in a budget key; None when there is none or it does not decode."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        cost_limit = data.get("costLimit")
        return State(
            exhausted=bool(data["exhausted"]),
            limit=int(data["limit"]) if data["limit"] is not None else None,
            used=int(data["used"]),
            period_start=dt.datetime.fromisoformat(data["periodStart"]),
            resets_at=dt.datetime.fromisoformat(data["resetsAt"]),
            cost_limit=decimal.Decimal(cost_limit) if cost_limit is not None else None,
            cost_used=decimal.Decimal(data["costUsed"]) if cost_limit is not None else None,
            currency=str(data["currency"]) if cost_limit is not None else None,
        )
    except (ValueError, KeyError, TypeError, AttributeError, decimal.InvalidOperation):
        return None
