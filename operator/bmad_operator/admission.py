"""Admission: an Agent that would take its tenant over budget is refused at apply time
(the approvals of Workflows are reviewed by `workflows.approvals`, wired in handlers).

The webhook's I/O; the decision is `policies.budget`, the configuration and the TLS
Secret are `builders.webhook`. What makes the count hold:

- It is read from the API server at every review, never from the watch cache: the
  tenant of the namespace, the tenant's namespaces and their Agents. A cache that is
  empty (right after a start) or behind (a burst of creates faster than the watch)
  cannot let anything through.
- Reviews of one tenant run one at a time, and each admitted change is remembered for
  a few seconds, until the API server lists it: creates that arrive together cannot
  all count the same free slot. This holds within one operator process.
- Reviews that were waiting for their turn share one listing, taken after they all
  arrived: a burst of creates costs a few listings, not one each, and is answered
  within the API server's timeout. Such a listing is as fresh as a listing of each
  review's own, since every change admitted since it was taken is remembered.
- The number of Agents is also a per-namespace ResourceQuota `count/agents.bmad.dev`
  (`builders.tenant.agent_quota`), which the API server enforces atomically, with or
  without the webhook.

The webhook's certificate is made once and kept in the Secret
`bmad-operator-webhook-tls` of the operator's namespace; every start (and every
replica) serves that same certificate, so the configuration's caBundle stays put.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import ipaddress
import itertools
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bmad_operator import errors, kube
from bmad_operator.builders import meta
from bmad_operator.builders import webhook as builders
from bmad_operator.policies import budget

log = logging.getLogger(__name__)

WEBHOOK_ID = builders.BUDGET_PATH
SCALE_WEBHOOK_ID = builders.SCALE_BUDGET_PATH

VALIDITY = dt.timedelta(days=5 * 365)
# A start that finds less than this left makes a new certificate (and caBundle).
RENEW_BEFORE = dt.timedelta(days=90)
# How long an admitted change counts although the API server does not list it yet:
# longer than the API server's webhook timeout plus the write that follows.
HOLD_SECONDS = 15.0
# A listing is shared only while it is younger than this (well within HOLD_SECONDS, so
# every change admitted after it was taken is still remembered).
SHARE_SECONDS = HOLD_SECONDS / 3


# -- the certificate ------------------------------------------------------------------
class Certificate(NamedTuple):
    """A self-signed serving certificate (its own CA: the caBundle) and its key, PEM."""

    cert_pem: bytes
    key_pem: bytes


def self_signed(host: str, *, now: dt.datetime | None = None) -> Certificate:
    """A certificate for `host` (a DNS name or an IP address) that is its own CA."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = now or dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([_san(host)]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return Certificate(
        cert.public_bytes(serialization.Encoding.PEM),
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        ),
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def from_secret(secret: Mapping[str, Any]) -> Certificate | None:
    """The certificate kept in the TLS Secret, None when it holds none."""
    data = secret.get("data") or {}
    try:
        return Certificate(base64.b64decode(data["tls.crt"]), base64.b64decode(data["tls.key"]))
    except (KeyError, ValueError):
        return None


def usable(cert: Certificate, host: str, *, now: dt.datetime | None = None) -> bool:
    """Whether `cert` can keep serving `host`: it parses, names `host`, its key is its
    own, and it is valid for longer than RENEW_BEFORE."""
    now = now or dt.datetime.now(dt.UTC)
    try:
        parsed = x509.load_pem_x509_certificate(cert.cert_pem)
        key = serialization.load_pem_private_key(cert.key_pem, password=None)
        names = parsed.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    same_key = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    ) == parsed.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return (
        same_key
        and _san(host) in list(names)
        and parsed.not_valid_before_utc <= now
        and parsed.not_valid_after_utc - now > RENEW_BEFORE
    )


def write_files(cert: Certificate, directory: Path) -> tuple[Path, Path]:
    """The certificate and key as files (kopf's webhook server reads files)."""
    certfile, keyfile = directory / "tls.crt", directory / "tls.key"
    certfile.write_bytes(cert.cert_pem)
    keyfile.touch(mode=0o600)
    keyfile.chmod(0o600)
    keyfile.write_bytes(cert.key_pem)
    return certfile, keyfile


async def ensure_certificate(
    api: kube.Kube, *, namespace: str, host: str, _again: bool = True
) -> Certificate:
    """The webhook's certificate from its Secret in `namespace`; made and stored the
    first time, or when the stored one no longer fits `host` or is about to expire.

    Replicas starting together may race: the create fails with 409 for all but one,
    a replacement carries the resourceVersion it read; the losers use the winner's.
    """
    secret = await api.get("Secret", namespace, builders.TLS_SECRET_NAME)
    stored = from_secret(secret) if secret is not None else None
    if stored is not None and usable(stored, host):
        return stored
    fresh = self_signed(host)
    wanted = builders.tls_secret(namespace, fresh.cert_pem, fresh.key_pem)
    try:
        if secret is None:
            await api.create(wanted)
            log.info("webhook certificate for %s made and stored in %s", host, namespace)
        else:
            patch = {
                "metadata": {"resourceVersion": secret["metadata"]["resourceVersion"]},
                "data": wanted["data"],
            }
            await api.merge_patch("Secret", namespace, builders.TLS_SECRET_NAME, patch)
            log.info("webhook certificate for %s replaced (host changed or expiring)", host)
    except errors.ApiError as exc:
        if exc.status != 409 or not _again:
            raise
        return await ensure_certificate(api, namespace=namespace, host=host, _again=False)
    return fresh


# -- serving ----------------------------------------------------------------------------
class Endpoint(NamedTuple):
    """Where this process serves the webhook, and what the API server must see there."""

    address: str
    port: int
    host: str  # the name the certificate is for
    ca_pem: bytes


async def check_serving(endpoint: Endpoint, *, wait: float = 3.0, retry: float = 0.1) -> None:
    """A TLS handshake with the local webhook server, verified as the API server would
    (the caBundle, the host name): raises when the webhook does not serve within `wait`
    seconds. A refused connection is tried again meanwhile (right after the start, kopf
    opens the webhook's port a moment after the health endpoint's); a failed handshake
    is not."""
    context = ssl.create_default_context(cadata=endpoint.ca_pem.decode())
    address = endpoint.address
    if address in ("", "0.0.0.0", "::"):  # noqa: S104 - the catch-all: connect locally
        address = "127.0.0.1"
    deadline = time.monotonic() + wait
    while True:
        try:
            async with asyncio.timeout(max(deadline - time.monotonic(), 0.01)):
                _, writer = await asyncio.open_connection(
                    address, endpoint.port, ssl=context, server_hostname=endpoint.host
                )
            break
        except ConnectionRefusedError:
            if time.monotonic() + retry >= deadline:
                raise
            await asyncio.sleep(retry)
    writer.close()
    # The handshake succeeded; how the close goes does not matter.
    with contextlib.suppress(OSError, TimeoutError):
        async with asyncio.timeout(wait):
            await writer.wait_closed()


# -- the budget -------------------------------------------------------------------------
class BudgetWebhook:
    """Reviews Agent creates and resizes against their tenant's budget."""

    def __init__(
        self,
        api: kube.Kube,
        *,
        hold_seconds: float = HOLD_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.api = api
        self.hold_seconds = hold_seconds
        self.clock = clock
        self._locks: dict[str, asyncio.Lock] = {}
        # tenant -> Agent -> (replicas admitted, until when it counts without a listing)
        self._admitted: dict[str, dict[budget.Key, tuple[int, float]]] = {}
        # Orders arrivals and listings: a listing serves the reviews that arrived
        # before it started. tenant -> (its start in this order, when, what it listed)
        self._order = itertools.count()
        self._listings: dict[str, tuple[int, float, dict[budget.Key, int]]] = {}

    async def current_replicas(self, namespace: str, name: str) -> int:
        agent = await self.api.get("Agent", namespace, name)
        return budget.agent_replicas((agent or {}).get("spec"))

    async def review(
        self, namespace: str, change: budget.Change, *, dry_run: bool = False
    ) -> str | None:
        """Why `change` would take the tenant over its budget; None when it may pass."""
        if not budget.raises_usage(change):
            return None  # never refuse what keeps or lowers usage: no read needed
        arrived = next(self._order)
        found = await self._tenant_of(namespace)
        if found is None:
            return None
        tenant, limits = found
        if not limits.any:
            return None
        async with self._locks.setdefault(tenant, asyncio.Lock()):
            usage = self._with_admitted(tenant, await self._listing_after(tenant, arrived))
            problem = budget.violation(tenant, limits, usage, change)
            if problem is None and not dry_run:
                until = self.clock() + self.hold_seconds
                self._admitted.setdefault(tenant, {})[change.key] = (change.new_replicas, until)
            return problem

    async def _tenant_of(self, namespace: str) -> tuple[str, budget.Limits] | None:
        ns = await self.api.get("Namespace", None, namespace)
        name = ((ns or {}).get("metadata", {}).get("labels") or {}).get(meta.TENANT_LABEL)
        if not name:
            return None
        tenant = await self.api.get("Tenant", None, name)
        if tenant is None:
            return None
        return name, budget.Limits.of(tenant.get("spec") or {})

    async def _listing_after(self, tenant: str, arrived: int) -> dict[budget.Key, int]:
        """A listing of the tenant's Agents started after the review `arrived`: the one
        another review took meanwhile if there is one and it is recent, else a new one.
        Called with the tenant's lock held."""
        shared = self._listings.get(tenant)
        if (
            shared is not None
            and shared[0] > arrived
            and self.clock() - shared[1] < min(SHARE_SECONDS, self.hold_seconds / 3)
        ):
            return shared[2]
        started, when = next(self._order), self.clock()
        listed = await self._listed_usage(tenant)
        self._listings[tenant] = (started, when, listed)
        return listed

    async def _listed_usage(self, tenant: str) -> dict[budget.Key, int]:
        """Every Agent of the tenant's namespaces with its replicas, as the API server has
        them now (a LIST is read from storage, not from a cache)."""
        selector = f"{meta.TENANT_LABEL}={tenant}"
        usage: dict[budget.Key, int] = {}
        for ns in await self.api.list("Namespace", selector=selector):
            ns_name = ns["metadata"]["name"]
            for agent in await self.api.list("Agent", ns_name):
                key = (ns_name, agent["metadata"]["name"])
                usage[key] = budget.agent_replicas(agent.get("spec"))
        return usage

    def _with_admitted(self, tenant: str, listed: dict[budget.Key, int]) -> dict[budget.Key, int]:
        """The listing plus what was admitted but is not listed as such yet."""
        now = self.clock()
        ledger = self._admitted.get(tenant, {})
        usage = dict(listed)
        for key, (replicas, until) in list(ledger.items()):
            if until <= now or listed.get(key) == replicas:
                del ledger[key]  # stored as admitted, or given up on (refused later on)
                continue
            usage[key] = max(usage.get(key, 0), replicas)
        return usage
