"""A stateful Stripe stand-in: a recording proxy in front of stripe-mock.

stripe-mock answers every request from Stripe's own OpenAPI fixtures, validates
parameters like Stripe and makes up fresh ids, but keeps nothing between calls: a
search never finds the customer created a moment ago, and an idempotency key means
nothing to it. Tests that count what was created need what Stripe itself does, so
this proxy forwards each request to stripe-mock (for validation and the response
shape) and adds Stripe's state on top:

- **idempotency**: the first answer to a key is kept; a request repeating the key is
  answered with that first answer without reaching stripe-mock (header
  ``Idempotent-Replayed: true``), and a repeat with other parameters gets Stripe's
  400 ``idempotency_error``; `expire_idempotency_keys` is "24 hours later";
- **customers and subscriptions**: created ones are kept, with the metadata, e-mail,
  name, customer and price of the request (stripe-mock does not echo them); customer
  search (``metadata['key']:'value'``) and the subscription list by customer are
  answered from that state. Search lags behind creates like Stripe's (``search_lag``
  seconds; Stripe documents up to a minute), which is what idempotency keys are for;
  cancelling sets a kept subscription's status to ``canceled``;
- **meter events**: each accepted ``POST /v1/billing/meter_events`` is kept with its
  identifier and value; `meter_totals` counts each identifier once, as Stripe bills,
  and `duplicate_identifiers` lists identifiers sent more than once (not counting
  idempotent replays). stripe-mock v0.203.0 serves this endpoint itself.

For crash tests, `hold` withholds the answers to one route (the work is done and kept,
the reply is not sent) until released, so a client can be killed between a create
and whatever it does with the answer; `fail_next` makes the next requests to a route
fail (429, 500, ...) before they reach stripe-mock.
Test aid only: it lives in the test bed, never in a shipped package.
"""

from __future__ import annotations

import http.client
import itertools
import json
import re
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_SEARCH_CLAUSE = re.compile(r"^metadata\['([^']+)'\]:'([^']*)'$")
_ENDED = ("canceled", "incomplete_expired")


@dataclass(frozen=True)
class Recorded:
    """One request as the proxy saw it, and what it answered."""

    method: str
    path: str
    query: dict[str, list[str]]
    idempotency_key: str | None
    form: dict[str, list[str]]
    status: int
    replayed: bool = False
    held: bool = False

    def param(self, name: str) -> str | None:
        values = self.form.get(name)
        return values[0] if values else None


@dataclass(frozen=True)
class _Request:
    method: str
    path: str
    query: dict[str, list[str]]
    form: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    key: str | None


@dataclass
class _Answer:
    status: int
    headers: list[tuple[str, str]]
    body: bytes


@dataclass
class MeterEvent:
    event_name: str
    customer_id: str | None
    value: int
    identifier: str | None
    timestamp: int | None
    idempotency_key: str | None


class Hold:
    """Answers to one route withheld until `release` (or the proxy closes)."""

    def __init__(self, method: str, path: str) -> None:
        self.method = method
        self.path = path
        self._released = threading.Event()
        self._lock = threading.Lock()
        self.count = 0

    def _enter(self) -> None:
        with self._lock:
            self.count += 1

    def wait(self) -> None:
        self._released.wait()

    def release(self) -> None:
        self._released.set()

    @property
    def released(self) -> bool:
        return self._released.is_set()


@dataclass
class _Fault:
    status: int
    body: dict[str, Any]
    remaining: int


@dataclass
class _State:
    customers: dict[str, dict[str, Any]] = field(default_factory=dict)
    created_at: dict[str, float] = field(default_factory=dict)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)
    meter_events: list[MeterEvent] = field(default_factory=list)
    keys: dict[str, tuple[str, _Answer]] = field(default_factory=dict)


def _form_fields(form: dict[str, list[str]], prefix: str) -> dict[str, str]:
    """``prefix[key]=value`` form fields as a dict (metadata[...], payload[...])."""
    found = {}
    for name, values in form.items():
        if name.startswith(prefix + "[") and name.endswith("]") and "][" not in name:
            found[name[len(prefix) + 1 : -1]] = values[0]
    return found


def _error(status: int, kind: str, message: str, code: str | None = None) -> _Answer:
    err: dict[str, Any] = {"type": kind, "message": message}
    if code:
        err["code"] = code
    body = json.dumps({"error": err}).encode()
    return _Answer(status, [("Content-Type", "application/json")], body)


def _json(status: int, obj: Any) -> _Answer:
    return _Answer(status, [("Content-Type", "application/json")], json.dumps(obj).encode())


class StripeProxy:
    """Serve on 127.0.0.1 (a free port) in front of stripe-mock at ``upstream``."""

    def __init__(self, upstream: str, *, search_lag: float = 0.0) -> None:
        parsed = urllib.parse.urlsplit(upstream)
        self.upstream_host = parsed.hostname or "127.0.0.1"
        self.upstream_port = parsed.port or 80
        self.search_lag = search_lag
        self.records: list[Recorded] = []
        self._state = _State()
        self._lock = threading.Lock()
        self._holds: list[Hold] = []
        self._faults: dict[tuple[str, str], list[_Fault]] = {}
        self._ids = itertools.count(1)
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _serve(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                answer, record, hold = proxy._handle(
                    self.command, self.path, dict(self.headers.items()), body
                )
                with proxy._lock:
                    proxy.records.append(record)
                if hold is not None:
                    hold.wait()
                try:
                    self.send_response(answer.status)
                    for key, value in answer.headers:
                        self.send_header(key, value)
                    self.send_header("Content-Length", str(len(answer.body)))
                    self.end_headers()
                    self.wfile.write(answer.body)
                except OSError:
                    pass  # the client is gone (killed while we held its answer)

            do_GET = _serve  # noqa: N815
            do_POST = _serve  # noqa: N815
            do_DELETE = _serve  # noqa: N815

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    # -- lifecycle -------------------------------------------------------------------

    def __enter__(self) -> StripeProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        for hold in self._holds:
            hold.release()
        self.server.shutdown()
        self.server.server_close()

    # -- test controls ---------------------------------------------------------------

    def hold(self, method: str, path: str) -> Hold:
        """Withhold the answers to ``method path`` (after doing the work) until released."""
        hold = Hold(method, path)
        with self._lock:
            self._holds.append(hold)
        return hold

    def fail_next(
        self, method: str, path: str, *, status: int = 500, count: int = 1, code: str = "api_error"
    ) -> None:
        """The next ``count`` requests to a route get ``status`` without reaching Stripe."""
        kind = "rate_limit_error" if status == 429 else "api_error"
        body = {"error": {"type": kind, "code": code, "message": f"injected {status}"}}
        with self._lock:
            self._faults.setdefault((method, path), []).append(_Fault(status, body, count))

    def expire_idempotency_keys(self) -> None:
        """Forget every idempotency key, as Stripe does 24 hours after first use."""
        with self._lock:
            self._state.keys.clear()

    # -- what tests read -------------------------------------------------------------

    def calls(self, method: str, path: str) -> list[Recorded]:
        with self._lock:
            return [r for r in self.records if r.method == method and r.path == path]

    def creates(self, path: str) -> list[Recorded]:
        """Successful creates on ``path`` that made something (replays left out)."""
        return [c for c in self.calls("POST", path) if c.status == 200 and not c.replayed]

    def customers(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(json.dumps(c)) for c in self._state.customers.values()]

    def subscriptions(self) -> list[dict[str, Any]]:
        with self._lock:
            return [json.loads(json.dumps(s)) for s in self._state.subscriptions.values()]

    def meter_events(self) -> list[MeterEvent]:
        with self._lock:
            return list(self._state.meter_events)

    def duplicate_identifiers(self) -> list[str]:
        """Identifiers of meter events accepted more than once (replays not counted)."""
        seen: dict[str, int] = {}
        for event in self.meter_events():
            if event.identifier:
                seen[event.identifier] = seen.get(event.identifier, 0) + 1
        return sorted(k for k, n in seen.items() if n > 1)

    def meter_totals(self) -> dict[tuple[str, str | None], int]:
        """Value per (event name, customer), each identifier counted once (as billed)."""
        totals: dict[tuple[str, str | None], int] = {}
        counted: set[str] = set()
        for event in self.meter_events():
            if event.identifier:
                if event.identifier in counted:
                    continue
                counted.add(event.identifier)
            key = (event.event_name, event.customer_id)
            totals[key] = totals.get(key, 0) + event.value
        return totals

    # -- the work --------------------------------------------------------------------

    def _handle(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[_Answer, Recorded, Hold | None]:
        path, _, query_text = raw_path.partition("?")
        query = urllib.parse.parse_qs(query_text)
        form = urllib.parse.parse_qs(body.decode(errors="replace")) if method == "POST" else {}
        key = next((v for k, v in headers.items() if k.lower() == "idempotency-key"), None)

        def recorded(answer: _Answer, **extra: Any) -> Recorded:
            return Recorded(method, path, query, key, form, answer.status, **extra)

        fingerprint = json.dumps([method, path, sorted(form.items())])
        with self._lock:
            fault = self._take_fault(method, path)
            cached = self._state.keys.get(key) if key and method == "POST" else None
        if fault is not None:
            answer = _json(fault.status, fault.body)
            return answer, recorded(answer), None
        if cached is not None:
            first, answer = cached
            if first != fingerprint:
                answer = _error(
                    400,
                    "idempotency_error",
                    "Keys for idempotent requests can only be used with the same parameters "
                    "they were first used with.",
                )
                return answer, recorded(answer), None
            replay = _Answer(
                answer.status, [*answer.headers, ("Idempotent-Replayed", "true")], answer.body
            )
            return replay, recorded(replay, replayed=True), None

        answer = self._route(_Request(method, path, query, form, headers, body, key))
        hold = None
        with self._lock:
            if key and method == "POST" and answer.status < 500 and answer.status != 429:
                # Stripe keeps the first result of a key, errors included (not 5xx/429).
                self._state.keys.setdefault(key, (fingerprint, answer))
            for candidate in self._holds:
                if (candidate.method, candidate.path) == (method, path) and not candidate.released:
                    hold = candidate
                    break
        if hold is not None:
            hold._enter()
        return answer, recorded(answer, held=hold is not None), hold

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        queue = self._faults.get((method, path)) or []
        while queue and queue[0].remaining <= 0:
            queue.pop(0)
        if not queue:
            return None
        queue[0].remaining -= 1
        return queue[0]

    def _forward(self, req: _Request) -> _Answer:
        query = req.query
        target = req.path + ("?" + urllib.parse.urlencode(query, doseq=True) if query else "")
        conn = http.client.HTTPConnection(self.upstream_host, self.upstream_port, timeout=30)
        try:
            sent = {
                k: v for k, v in req.headers.items() if k.lower() not in ("host", "content-length")
            }
            conn.request(req.method, target, body=req.body or None, headers=sent)
            resp = conn.getresponse()
            data = resp.read()
            kept = [
                (k, v)
                for k, v in resp.getheaders()
                if k.lower() not in ("transfer-encoding", "connection", "content-length")
            ]
            return _Answer(resp.status, kept, data)
        finally:
            conn.close()

    def _route(self, req: _Request) -> _Answer:
        method, path, query, form = req.method, req.path, req.query, req.form
        if method == "GET" and path == "/v1/customers/search":
            return self._search_customers(query)
        if method == "GET" and path == "/v1/subscriptions":
            return self._list_subscriptions(query)
        parts = path.strip("/").split("/")
        if method in ("GET", "DELETE") and len(parts) == 3 and parts[1] == "subscriptions":
            return self._subscription(method, parts[2])
        answer = self._forward(req)
        if answer.status != 200 or method != "POST":
            return answer
        obj = json.loads(answer.body)
        if path == "/v1/customers":
            obj = self._keep_customer(obj, form)
        elif path == "/v1/subscriptions":
            obj = self._keep_subscription(obj, form)
        elif path == "/v1/billing/meter_events":
            obj = self._keep_meter_event(obj, form, req.key)
        else:
            return answer
        return _Answer(answer.status, answer.headers, json.dumps(obj).encode())

    def _keep_customer(self, obj: dict[str, Any], form: dict[str, list[str]]) -> dict[str, Any]:
        obj["metadata"] = _form_fields(form, "metadata")
        for name in ("email", "name"):
            if name in form:
                obj[name] = form[name][0]
        with self._lock:
            self._state.customers[obj["id"]] = obj
            self._state.created_at[obj["id"]] = time.monotonic()
        return obj

    def _keep_subscription(self, obj: dict[str, Any], form: dict[str, list[str]]) -> dict[str, Any]:
        obj["metadata"] = _form_fields(form, "metadata")
        obj["customer"] = form.get("customer", [obj.get("customer")])[0]
        obj["status"] = "active"
        price = form.get("items[0][price]", [None])[0]
        items = (obj.get("items") or {}).get("data") or []
        if price and items:
            items[0].setdefault("price", {})["id"] = price
            items[:] = items[:1]
        obj["created"] = int(time.time() * 1000) + next(self._ids)  # creation order
        with self._lock:
            self._state.subscriptions[obj["id"]] = obj
        return obj

    def _keep_meter_event(
        self, obj: dict[str, Any], form: dict[str, list[str]], key: str | None
    ) -> dict[str, Any]:
        payload = _form_fields(form, "payload")
        obj["payload"] = payload
        obj["identifier"] = form.get("identifier", [obj.get("identifier")])[0]
        timestamp = form.get("timestamp", [None])[0]
        if timestamp is not None:
            obj["timestamp"] = int(timestamp)
        event = MeterEvent(
            event_name=form.get("event_name", [""])[0],
            customer_id=payload.get("stripe_customer_id"),
            value=int(payload.get("value", "0")),
            identifier=form.get("identifier", [None])[0],
            timestamp=int(timestamp) if timestamp is not None else None,
            idempotency_key=key,
        )
        with self._lock:
            self._state.meter_events.append(event)
        return obj

    def _search_customers(self, query: dict[str, list[str]]) -> _Answer:
        text = (query.get("query") or [""])[0].strip()
        match = _SEARCH_CLAUSE.match(text)
        if match is None:
            return _error(
                400, "invalid_request_error", f"the stand-in searches metadata only: {text!r}"
            )
        name, value = match.groups()
        limit = int((query.get("limit") or ["10"])[0])
        visible_before = time.monotonic() - self.search_lag
        with self._lock:
            found = [
                c
                for cid, c in self._state.customers.items()
                if (c.get("metadata") or {}).get(name) == value
                and self._state.created_at[cid] <= visible_before
            ]
        return _json(
            200,
            {
                "object": "search_result",
                "url": "/v1/customers/search",
                "has_more": len(found) > limit,
                "data": found[:limit],
            },
        )

    def _list_subscriptions(self, query: dict[str, list[str]]) -> _Answer:
        customer = query["customer"][0] if query.get("customer") else None
        status = query["status"][0] if query.get("status") else None
        with self._lock:
            found = [
                s
                for s in self._state.subscriptions.values()
                if (customer is None or s.get("customer") == customer)
                and (
                    status == "all"
                    or (status is None and s.get("status") not in _ENDED)
                    or status == s.get("status")
                )
            ]
        found.sort(key=lambda s: s.get("created", 0), reverse=True)
        return _json(
            200,
            {"object": "list", "url": "/v1/subscriptions", "has_more": False, "data": found},
        )

    def _subscription(self, method: str, sub_id: str) -> _Answer:
        with self._lock:
            sub = self._state.subscriptions.get(sub_id)
            if sub is not None and method == "DELETE":
                sub["status"] = "canceled"
        if sub is None:
            return _error(
                404,
                "invalid_request_error",
                f"No such subscription: '{sub_id}'",
                code="resource_missing",
            )
        return _json(200, sub)


def serve(upstream: str, **options: Any) -> Iterator[StripeProxy]:
    """The proxy as a generator (for pytest fixtures): started, yielded, stopped."""
    with StripeProxy(upstream, **options) as proxy:
        yield proxy
