"""What the task consumer reports and decides without I/O: its health for readiness,
the counts of a run, the failure that is final, and the retry rules.

Kept apart from the loop (`consumer`) so that readiness, logs and tests read these
without the loop's machinery.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ERROR_MAX_CHARS = 2_000


class TaskFailedError(Exception):
    """Raised by a handler for a task that failed for good (the agent could not do it,
    the payload is wrong): its failed result is stored now, it is not delivered again.
    Any other exception is retried on a later delivery, as if the consumer had died."""


@dataclass
class ConsumerHealth:
    """Whether the loop reads its stream now, and if not, why (for ``/readyz``)."""

    consuming: bool = False
    problem: str | None = "the task consumer has not reached Redis yet"

    def up(self) -> None:
        self.consuming, self.problem = True, None

    def down(self, problem: str) -> None:
        self.consuming, self.problem = False, problem


@dataclass
class ConsumeStats:
    """What one `consume` run did, for logs and tests."""

    read: int = 0
    claimed: int = 0
    succeeded: int = 0
    duplicates: int = 0
    """Tasks that finished but found a result already there (a second run)."""
    failed: int = 0
    """Handler errors left pending for a retry."""
    dead_lettered: int = 0
    abandoned: int = 0
    """In-flight tasks cancelled at shutdown, left pending for others to reclaim."""
    lost: int = 0
    """In-flight tasks cancelled because another consumer took their entry over."""
    skipped: int = 0
    """Tasks not run because they already had a result (cancelled, or finished elsewhere)."""
    refused: int = 0
    """Tasks whose handler raised `TaskFailedError`: failed at once, not retried."""

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


def describe_error(exc: BaseException, *, with_type: bool = True) -> str:
    text = f"{type(exc).__name__}: {exc}" if with_type else str(exc)
    return text if len(text) <= ERROR_MAX_CHARS else text[: ERROR_MAX_CHARS - 1] + "…"


def before_run(*, attempt: int, max_attempts: int) -> Literal["run", "dead"]:
    """A delivery past `max_attempts` is not run: earlier ones died without a word."""
    return "run" if attempt <= max_attempts else "dead"


def after_failure(*, attempt: int, max_attempts: int) -> Literal["retry", "dead"]:
    """A handler error on the last allowed attempt dead-letters; before it, retry."""
    return "dead" if attempt >= max_attempts else "retry"
