"""Billing periods: calendar months in UTC, the same for every tenant.

`Tenant.spec.limits.tokensPerMonth` and `status.usage` count per calendar month (UTC).
Stripe invoices on the subscription's own cycle; meter events carry their time, so
Stripe puts each in its own period whatever ours is.
"""

from __future__ import annotations

import datetime as dt
from typing import NamedTuple


class Period(NamedTuple):
    start: dt.datetime
    end: dt.datetime


def _utc(when: dt.datetime) -> dt.datetime:
    if when.tzinfo is None:
        raise ValueError("a billing time must carry a time zone")
    return when.astimezone(dt.UTC)


def containing(when: dt.datetime) -> Period:
    """The month (UTC) that holds ``when``: [first instant, first instant of the next)."""
    at = _utc(when)
    start = at.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return Period(start, end)


def previous(period: Period) -> Period:
    """The month before ``period``."""
    return containing(period.start - dt.timedelta(microseconds=1))
