"""LLM APIs: OpenAI, Anthropic, and any endpoint that speaks OpenAI's API.

Listing the models is the cheapest call that proves the key (no tokens are spent),
and it also tells whether spec.llm.defaultModel is served: a model that is not
there would fail every agent that relies on it, so the check fails first. Messages
name the status code the API answered, never its words: the provider's messages can
echo part of the key, and a tenant's baseUrl can point anywhere.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, httpcheck, lazy

if TYPE_CHECKING:
    import httpx
else:  # imported when a client is first built: not at start
    httpx = lazy.module("httpx")

OPENAI_BASE_URL = "https://api.openai.com/v1"
ANTHROPIC_BASE_URL = "https://api.anthropic.com"
ANTHROPIC_VERSION = "2023-06-01"
# Anthropic pages its model list; one page of the largest size holds them all today.
ANTHROPIC_PAGE_SIZE = 1000

_SERVICES = {
    "openai": "OpenAI",
    "anthropic": "Anthropic",
    "openai-compatible": "the OpenAI-compatible endpoint",
}


FIELD = "spec.llm.baseUrl"


def base_url(block: integration.Llm) -> str:
    """spec.llm.baseUrl, or the provider's public API."""
    if block.base_url:
        return block.base_url
    return ANTHROPIC_BASE_URL if block.provider == "anthropic" else OPENAI_BASE_URL


async def check(
    block: integration.Llm,
    creds: base.Credentials,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds each HTTP exchange, not the coroutine
    policy: egress.Policy,
    transport: httpx.AsyncBaseTransport | None = None,
) -> base.Checked:
    httpcheck.check_base_url(base_url(block), field=FIELD)
    # A self-hosted OpenAI-compatible server often runs without keys; the others never do.
    if block.provider == "openai-compatible":
        api_key = creds.get("api_key")
    else:
        api_key = creds.require("api_key")
    async with httpcheck.client(
        timeout=timeout, creds=creds, policy=policy, field=FIELD, transport=transport
    ) as http:
        if block.provider == "anthropic":
            return await _check_anthropic(http, block, creds, api_key=api_key or "")
        return await _check_openai(http, block, creds, api_key=api_key)


async def _check_openai(
    http: httpx.AsyncClient,
    block: integration.Llm,
    creds: base.Credentials,
    *,
    api_key: str | None,
) -> base.Checked:
    service = _SERVICES[block.provider]
    url = httpcheck.join(base_url(block), "models")
    headers = {"Accept": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    response = await httpcheck.send(http, "GET", url, service=service, creds=creds, headers=headers)
    _raise_for_status(
        response,
        block,
        creds,
        fix=(
            "check spec.llm.baseUrl: it is the API root that serves /models, which for "
            "OpenAI-compatible servers usually ends in /v1"
        ),
    )
    ids = _model_ids(httpcheck.read_json(response), url=url, service=service)
    model = block.default_model
    if model and model not in ids:
        raise _missing_model(model, ids, service=service)
    return base.Checked(detail=_detail(len(ids), model, has_more=False))


async def _check_anthropic(
    http: httpx.AsyncClient,
    block: integration.Llm,
    creds: base.Credentials,
    *,
    api_key: str,
) -> base.Checked:
    service = _SERVICES["anthropic"]
    root = base_url(block)
    url = httpcheck.join(root, "v1/models")
    headers = {
        "x-api-key": api_key,
        "anthropic-version": ANTHROPIC_VERSION,
        "Accept": "application/json",
    }
    fix = "check spec.llm.baseUrl: it is the API root, without /v1"
    response = await httpcheck.send(
        http,
        "GET",
        url,
        service=service,
        creds=creds,
        headers=headers,
        params={"limit": ANTHROPIC_PAGE_SIZE},
    )
    _raise_for_status(response, block, creds, fix=fix)
    body = httpcheck.read_json(response)
    ids = _model_ids(body, url=url, service=service)
    has_more = isinstance(body, dict) and body.get("has_more") is True
    model = block.default_model
    if model and model not in ids:
        # Not on this page: it may be on a later one, or an alias
        # ("claude-sonnet-4-0") that the model endpoint resolves.
        model_url = httpcheck.join(root, "v1/models/" + urllib.parse.quote(model, safe=""))
        response = await httpcheck.send(
            http, "GET", model_url, service=service, creds=creds, headers=headers
        )
        if response.status_code == 404:
            raise _missing_model(model, ids, service=service)
        _raise_for_status(response, block, creds, fix=fix)
    return base.Checked(detail=_detail(len(ids), model, has_more=has_more))


def _raise_for_status(
    response: httpx.Response,
    block: integration.Llm,
    creds: base.Credentials,
    *,
    fix: str,
) -> None:
    if response.status_code == 200:
        return
    service = _SERVICES[block.provider]
    if response.status_code in (401, 403):
        raise base.CheckError(
            base.Reason.AUTHENTICATION_FAILED,
            f"{service} rejected the API key ({response.status_code}): put a valid API key "
            f"in key {creds.key('api_key')!r} of {httpcheck.secret(creds)}",
        )
    raise httpcheck.unexpected(response, service=service, fix=fix)


def _model_ids(body: Any, *, url: str, service: str) -> list[str]:
    data = body.get("data") if isinstance(body, dict) else None
    if not isinstance(data, list):
        raise base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{service} at {httpcheck.display_url(url)} did not answer with a list of models: "
            "check spec.llm.baseUrl and spec.llm.provider",
        )
    return [
        entry["id"]
        for entry in data
        if isinstance(entry, dict) and isinstance(entry.get("id"), str)
    ]


def _missing_model(model: str, ids: list[str], *, service: str) -> base.CheckError:
    served = f"it lists {len(ids)} other model(s)" if ids else "it lists no models for this key"
    return base.CheckError(
        base.Reason.INVALID_CONFIGURATION,
        f"{service} does not serve model {model!r} ({served}): set spec.llm.defaultModel to "
        "a model it serves, or give the key access to that model",
    )


def _detail(count: int, model: str | None, *, has_more: bool) -> str:
    listed = f"{count}{'+' if has_more else ''} model(s) listed"
    return f"{listed}; default model {model} available" if model else listed


def binding(block: integration.Llm, creds: base.Credentials) -> dict[str, str]:
    """The binding Secret's data: the endpoint, the key and the default model."""
    data = {"type": "llm", "provider": block.provider, "baseUrl": base_url(block)}
    api_key = creds.get("api_key")
    if api_key:
        data["apiKey"] = api_key
    if block.default_model:
        data["defaultModel"] = block.default_model
    return data
