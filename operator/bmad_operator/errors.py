"""What can go wrong in a reconcile, in the categories the work queue acts on.

One module, imported by the API client (which raises `ApiError`), the reconcilers
(which raise `Requeue` and decide on `ApiError.retryable`) and the work queue (which
logs a `Transient` failure in one line and anything else with its traceback). Nothing
here imports the rest of the operator.
"""

from __future__ import annotations


class Transient(Exception):  # noqa: N818 - a category, raised as its subclasses
    """An expected failure the next pass may not meet: logged without a traceback."""


class Requeue(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a reconcile to be called again after `delay` seconds (not a failure)."""

    def __init__(self, delay: float, reason: str = "") -> None:
        super().__init__(reason)
        self.delay = delay


# HTTP statuses that say "try again" rather than "this request is wrong": the server
# was not reached (0), a conflicting write (409), throttling (429), server trouble (5xx).
RETRYABLE_STATUSES = frozenset({0, 409, 429})


class ApiError(Transient):
    """An API call failed; `status` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message

    @property
    def retryable(self) -> bool:
        """Worth the same request again later, as opposed to a refusal of the request."""
        return self.status in RETRYABLE_STATUSES or self.status >= 500

    @property
    def not_found(self) -> bool:
        return self.status == 404
