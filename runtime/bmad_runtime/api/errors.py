"""Every error of the HTTP API has one body: ``{"error": {"code", "message", ...}}``.

`ApiError` is what a route raises on purpose; the exception handlers installed by
`install` turn it, FastAPI's own errors (404, 422, 413), authentication failures and
the use case's domain errors into that body. The request id that the middleware gave
the request is in every error body, so a caller can quote it.
"""

from __future__ import annotations

import datetime as dt
import http
from typing import Any

import fastapi
import fastapi.exceptions
import pydantic
import pydantic.alias_generators
from starlette import exceptions as starlette_exceptions
from starlette import requests as starlette_requests
from starlette import types as asgi

from bmad_runtime import context, ports, turns
from bmad_runtime.providers import router as providers_router

# Where the middleware keeps the request id in the ASGI scope.
REQUEST_ID_KEY = "bmad.request_id"


def request_id_of(scope: asgi.Scope) -> str | None:
    value = scope.get(REQUEST_ID_KEY)
    return value if isinstance(value, str) else None


class FieldError(pydantic.BaseModel):
    field: str = pydantic.Field(description="Where: body.input, query.limit, path.id, ...")
    message: str
    type: str = pydantic.Field(description="Machine-readable kind of problem.")


class ErrorDetail(pydantic.BaseModel):
    code: str = pydantic.Field(description="Machine-readable error code, snake_case.")
    message: str = pydantic.Field(description="What went wrong and, where possible, the fix.")
    request_id: str | None = pydantic.Field(
        default=None, description="Quote it when reporting a problem."
    )
    details: list[FieldError] | None = pydantic.Field(
        default=None, description="Per-field problems of a 422."
    )
    resets_at: str | None = pydantic.Field(
        default=None,
        description="With budget_exhausted: when the tenant's token budget resets (RFC 3339).",
    )

    model_config = pydantic.ConfigDict(
        alias_generator=pydantic.alias_generators.to_camel, populate_by_name=True
    )


class ErrorBody(pydantic.BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """An error a route raises on purpose: status, code and a message for the caller."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        *,
        headers: dict[str, str] | None = None,
        resets_at: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}
        self.resets_at = resets_at


def retry_after(wait: float) -> int:
    """Whole seconds for a ``Retry-After`` header: rounded up, at least 1."""
    return max(1, int(wait + 0.999))


def rate_limited(wait: float, *, message: str | None = None) -> ApiError:
    seconds = retry_after(wait)
    return ApiError(
        429,
        "rate_limited",
        message or f"the rate limit of this tenant is reached: retry in {seconds}s",
        headers={"Retry-After": str(seconds)},
    )


def model_failure(exc: providers_router.AllProvidersFailedError) -> ApiError:
    if exc.rate_limited:
        seconds = retry_after(exc.retry_after or 1.0)
        return ApiError(
            503,
            "model_rate_limited",
            f"every model of this agent is rate limited by its provider: retry in {seconds}s "
            f"({'; '.join(e.summary for e in exc.errors)})",
            headers={"Retry-After": str(seconds)},
        )
    return ApiError(502, "model_unavailable", exc.message)


_DESCRIPTIONS = {
    400: "The body cannot be read (for instance, it is not UTF-8).",
    401: "No, or an invalid, Bearer token.",
    403: "The token lacks the scope this call needs, or is for another tenant.",
    404: "No such conversation (of this caller, for this tenant and agent).",
    413: "The request body is larger than the runtime accepts.",
    422: "The request is invalid; `details` names each field.",
    429: "Rate limited: retry after `Retry-After` seconds; or the tenant's token budget is "
    "used up (code budget_exhausted, until `resetsAt`).",
    500: "Internal error; the body names the request id, nothing else.",
    502: "No model of the chain (primary and fallbacks) could answer.",
    503: "Every model of the chain is rate limited by its provider, or the agent's "
    "conversation store is not available (see /readyz), or the usage ledger cannot record "
    "the call (code usage_ledger_unavailable).",
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses` entries for the error statuses a route may answer."""
    out: dict[int | str, dict[str, Any]] = {}
    for status in statuses:
        entry: dict[str, Any] = {"model": ErrorBody, "description": _DESCRIPTIONS[status]}
        if status == 429:
            entry["headers"] = {
                "Retry-After": {
                    "description": "Seconds to wait before retrying.",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 1},
                }
            }
        out[status] = entry
    return out


def error_payload(
    code: str,
    message: str,
    *,
    request_id: str | None,
    details: list[FieldError] | None = None,
    resets_at: str | None = None,
) -> dict[str, Any]:
    detail = ErrorDetail(
        code=code, message=message, request_id=request_id, details=details, resets_at=resets_at
    )
    return ErrorBody(error=detail).model_dump(mode="json", by_alias=True, exclude_none=True)


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    request_id: str | None,
    headers: dict[str, str] | None = None,
    details: list[FieldError] | None = None,
    resets_at: str | None = None,
) -> fastapi.responses.JSONResponse:
    return fastapi.responses.JSONResponse(
        error_payload(code, message, request_id=request_id, details=details, resets_at=resets_at),
        status_code=status,
        headers=headers,
    )


# --- exception handlers ---------------------------------------------------------------


def _http_code(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return f"http_{status}"


async def _on_http_exception(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, starlette_exceptions.HTTPException)
    code = "request_too_large" if exc.status_code == 413 else _http_code(exc.status_code)
    message = exc.detail if isinstance(exc.detail, str) else _http_code(exc.status_code)
    if exc.status_code == 404 and message == "Not Found":
        message = f"no route {request.url.path}: see /openapi.json for this API"
    elif exc.status_code == 400 and message == "There was an error parsing the body":
        code, message = "unreadable_body", "the request body cannot be read: send UTF-8 JSON"
    return error_response(
        exc.status_code,
        code,
        message,
        request_id=request_id_of(request.scope),
        headers=dict(exc.headers) if exc.headers else None,
    )


def _field_path(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc) or "(request)"


async def _on_validation_error(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, fastapi.exceptions.RequestValidationError)
    # Never the offending input: it may be a secret the caller pasted in the wrong place.
    details = [
        FieldError(
            field=_field_path(err.get("loc", ())),
            message=str(err.get("msg", "invalid")),
            type=str(err.get("type", "invalid")),
        )
        for err in exc.errors()
    ]
    summary = "; ".join(f"{d.field}: {d.message}" for d in details[:5])
    more = f" (and {len(details) - 5} more)" if len(details) > 5 else ""
    return error_response(
        422,
        "validation_error",
        f"the request is invalid: {summary}{more}",
        request_id=request_id_of(request.scope),
        details=details,
    )


async def _on_auth_error(request: starlette_requests.Request, exc: Exception) -> fastapi.Response:
    assert isinstance(exc, ports.AuthError)
    headers = {"WWW-Authenticate": 'Bearer realm="bmad-agent"'} if exc.status == 401 else None
    return error_response(
        exc.status, exc.code, exc.message, request_id=request_id_of(request.scope), headers=headers
    )


async def _on_api_error(request: starlette_requests.Request, exc: Exception) -> fastapi.Response:
    assert isinstance(exc, ApiError)
    return error_response(
        exc.status,
        exc.code,
        exc.message,
        request_id=request_id_of(request.scope),
        headers=exc.headers or None,
        resets_at=exc.resets_at,
    )


async def _on_rate_limited(request: starlette_requests.Request, exc: Exception) -> fastapi.Response:
    assert isinstance(exc, turns.RateLimitedError)
    return await _on_api_error(request, rate_limited(exc.wait, message=exc.message))


def budget_exhausted(exc: turns.BudgetExhaustedError, *, now: dt.datetime) -> ApiError:
    """429 until the tenant's budget resets: the code, the reset time, Retry-After."""
    resets_at = exc.budget.resets_at
    return ApiError(
        429,
        turns.BudgetExhaustedError.CODE,
        exc.budget.message,
        headers={"Retry-After": str(retry_after((resets_at - now).total_seconds()))},
        resets_at=resets_at.isoformat(),
    )


async def _on_budget_exhausted(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, turns.BudgetExhaustedError)
    return await _on_api_error(request, budget_exhausted(exc, now=dt.datetime.now(dt.UTC)))


async def _on_ledger_unavailable(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, ports.LedgerUnavailableError)
    return await _on_api_error(request, ApiError(503, "usage_ledger_unavailable", str(exc)))


async def _on_context_overflow(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, context.ContextOverflowError)
    return await _on_api_error(request, ApiError(422, "context_overflow", str(exc)))


async def _on_store_unavailable(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, ports.StoreUnavailableError)
    return await _on_api_error(request, ApiError(503, "store_unavailable", str(exc)))


async def _on_conversation_not_found(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, ports.ConversationNotFoundError)
    return await _on_api_error(request, ApiError(404, "conversation_not_found", str(exc)))


async def _on_model_failure(
    request: starlette_requests.Request, exc: Exception
) -> fastapi.Response:
    assert isinstance(exc, providers_router.AllProvidersFailedError)
    return await _on_api_error(request, model_failure(exc))


def install(app: fastapi.FastAPI) -> None:
    """Register the handlers that give every error, the use case's too, the error body."""
    app.add_exception_handler(starlette_exceptions.HTTPException, _on_http_exception)
    app.add_exception_handler(fastapi.exceptions.RequestValidationError, _on_validation_error)
    app.add_exception_handler(ports.AuthError, _on_auth_error)
    app.add_exception_handler(ApiError, _on_api_error)
    app.add_exception_handler(turns.RateLimitedError, _on_rate_limited)
    app.add_exception_handler(turns.BudgetExhaustedError, _on_budget_exhausted)
    app.add_exception_handler(ports.LedgerUnavailableError, _on_ledger_unavailable)
    app.add_exception_handler(context.ContextOverflowError, _on_context_overflow)
    app.add_exception_handler(ports.StoreUnavailableError, _on_store_unavailable)
    app.add_exception_handler(ports.ConversationNotFoundError, _on_conversation_not_found)
    app.add_exception_handler(providers_router.AllProvidersFailedError, _on_model_failure)
