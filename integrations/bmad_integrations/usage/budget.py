"""A tenant's token budget: the operator's decision, and the key that tells its agents.

The operator (leader) compares each Tenant's ``spec.limits.tokensPerMonth`` with the
ledger's total for the current period (`decide`, pure) and writes the result into the
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

import datetime as dt
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
    """Whether a tenant's agents refuse work, and until when."""

    exhausted: bool
    limit: int
    used: int
    period_start: dt.datetime
    resets_at: dt.datetime

    def refuses(self, now: dt.datetime) -> bool:
        return self.exhausted and now < self.resets_at

    def message(self) -> str:
        return (
            f"the tenant's token budget is used up: {self.used} of {self.limit} tokens this "
            f"period (spec.limits.tokensPerMonth); it resets at {self.resets_at.isoformat()}"
        )


def decide(*, limit: int | None, used: int, now: dt.datetime) -> State | None:
    """The budget state for a tenant with ``limit`` tokens a month that used ``used``
    this period; None when it has no limit."""
    if limit is None:
        return None
    period = periods.containing(now)
    return State(
        exhausted=used >= limit,
        limit=limit,
        used=used,
        period_start=period.start,
        resets_at=period.end,
    )


def encode(state: State) -> str:
    return json.dumps(
        {
            "exhausted": state.exhausted,
            "limit": state.limit,
            "used": state.used,
            "periodStart": state.period_start.isoformat(),
            "resetsAt": state.resets_at.isoformat(),
        },
        sort_keys=True,
    )


def decode(raw: str | bytes | None) -> State | None:
    """The state in a budget key; None when there is none or it does not decode."""
    if raw is None:
        return None
    try:
        data = json.loads(raw)
        return State(
            exhausted=bool(data["exhausted"]),
            limit=int(data["limit"]),
            used=int(data["used"]),
            period_start=dt.datetime.fromisoformat(data["periodStart"]),
            resets_at=dt.datetime.fromisoformat(data["resetsAt"]),
        )
    except (ValueError, KeyError, TypeError):
        return None
