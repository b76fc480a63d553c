"""Admission: an Agent that would exceed its tenant's budget is refused at apply time.

Served by kopf's webhook server, on every replica, with one self-signed certificate
kept in a Secret (made by the first replica to start, reused by the others and after
restarts), so the webhook configuration's caBundle holds whichever replica answers.
The ValidatingWebhookConfiguration is ours (not kopf's managed one) so that it only
selects tenant namespaces: an operator that is down then blocks nobody else's Agents.
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bmad_operator import errors, kube, store, tenancy
from bmad_operator.builders import meta

WEBHOOK_ID = "agent-budget"
SCALE_WEBHOOK_ID = "agent-budget-scale"
CONFIG_NAME = "bmad-operator"


class Certificate(NamedTuple):
    certfile: Path
    pkeyfile: Path
    pem: bytes


def self_signed(host: str, directory: Path | None = None) -> Certificate:
    """A certificate for `host` that is its own CA (the caBundle of the webhook)."""
    cert_pem, key_pem = _make_pair(host)
    return _write(cert_pem, key_pem, directory)


def _write(cert_pem: bytes, key_pem: bytes, directory: Path | None = None) -> Certificate:
    folder = directory or Path(tempfile.mkdtemp(prefix="bmad-webhook-"))
    certfile, pkeyfile = folder / "tls.crt", folder / "tls.key"
    certfile.write_bytes(cert_pem)
    pkeyfile.touch(mode=0o600)
    pkeyfile.write_bytes(key_pem)
    return Certificate(certfile, pkeyfile, cert_pem)


# A stored certificate this close to its end is replaced at the next start.
RENEW_BEFORE = dt.timedelta(days=30)


def _usable(cert_pem: bytes, host: str) -> bool:
    """Whether a stored certificate names `host` and is not about to expire."""
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
        names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except (ValueError, x509.ExtensionNotFound):
        return False
    try:
        wanted: Any = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        wanted = x509.DNSName(host)
    return wanted in names and cert.not_valid_after_utc - dt.datetime.now(dt.UTC) > RENEW_BEFORE


async def shared_certificate(
    api: kube.Kube, *, namespace: str, name: str, host: str, directory: Path | None = None
) -> Certificate:
    """The webhook's certificate and key, the same for every replica and every restart.

    Kept in a `kubernetes.io/tls` Secret: the first replica to start makes it (create
    fails with 409 for a replica that lost the race, which then reads the winner's), so
    the caBundle of the webhook configuration stays valid whichever replica answers.
    A stored certificate for another host, or within 30 days of its end, is replaced
    (the write carries the resourceVersion read, so two replicas cannot both replace it).
    """
    for _ in range(5):
        secret = await api.get("Secret", namespace, name)
        data = (secret or {}).get("data") or {}
        if data.get("tls.crt") and data.get("tls.key"):
            cert_pem = base64.b64decode(data["tls.crt"])
            if _usable(cert_pem, host):
                return _write(cert_pem, base64.b64decode(data["tls.key"]), directory)
        cert_pem, key_pem = _make_pair(host)
        encoded = {
            "tls.crt": base64.b64encode(cert_pem).decode(),
            "tls.key": base64.b64encode(key_pem).decode(),
        }
        try:
            if secret is None:
                await api.create(
                    {
                        "apiVersion": "v1",
                        "kind": "Secret",
                        "type": "kubernetes.io/tls",
                        "metadata": {
                            "name": name,
                            "namespace": namespace,
                            "labels": meta.managed_labels(),
                        },
                        "data": encoded,
                    }
                )
            else:
                await api.merge_patch(
                    "Secret",
                    namespace,
                    name,
                    {
                        "metadata": {"resourceVersion": secret["metadata"]["resourceVersion"]},
                        "data": encoded,
                    },
                )
        except errors.ApiError as exc:
            if exc.status == 409:
                continue  # another replica wrote it first: use theirs
            raise
        return _write(cert_pem, key_pem, directory)
    raise errors.ApiError(409, "Conflict", f"Secret {namespace}/{name} kept changing")


def _make_pair(host: str) -> tuple[bytes, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)])
    try:
        san: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        san = x509.DNSName(host)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName([san]), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def webhook_configuration(
    url: str, ca_pem: bytes, *, service: str = "", service_port: int = 443
) -> dict[str, Any]:
    """`url` is the webhook server's root; `service` ("namespace/name") wins when given.

    Two webhooks: Agents created or changed, and their scale subresource (`kubectl
    scale`, HPA, KEDA), both held to the tenant's budget.
    """

    def client(path: str) -> dict[str, Any]:
        config: dict[str, Any] = {"caBundle": base64.b64encode(ca_pem).decode()}
        if service:
            ns, name = service.split("/", 1)
            config["service"] = {
                "namespace": ns,
                "name": name,
                "path": f"/{path}",
                "port": service_port,
            }
        else:
            config["url"] = f"{url.rstrip('/')}/{path}"
        return config

    def webhook(name: str, path: str, resource: str, operations: list[str]) -> dict[str, Any]:
        return {
            "name": name,
            "admissionReviewVersions": ["v1"],
            "sideEffects": "None",
            "failurePolicy": "Fail",
            "timeoutSeconds": 5,
            "clientConfig": client(path),
            "namespaceSelector": {
                "matchExpressions": [{"key": meta.TENANT_LABEL, "operator": "Exists"}]
            },
            "rules": [
                {
                    "apiGroups": ["bmad.dev"],
                    "apiVersions": ["v1alpha1"],
                    "operations": operations,
                    "resources": [resource],
                    "scope": "Namespaced",
                }
            ],
        }

    return {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "ValidatingWebhookConfiguration",
        "metadata": {
            "name": CONFIG_NAME,
            "labels": meta.managed_labels(),
        },
        "webhooks": [
            webhook("agent-budget.bmad.dev", WEBHOOK_ID, "agents", ["CREATE", "UPDATE"]),
            webhook("agent-scale-budget.bmad.dev", SCALE_WEBHOOK_ID, "agents/scale", ["UPDATE"]),
        ],
    }


def budget_violation(
    cache: store.Store, *, namespace: str, name: str, spec: Mapping[str, Any]
) -> str | None:
    """Why this Agent (created or changed) would exceed its tenant's budget, if it would."""
    tenant = tenancy.tenant_of_namespace(cache, namespace)
    if tenant is None:
        return None
    tenant_name = tenant["metadata"]["name"]
    limits = (tenant.get("spec") or {}).get("limits") or {}
    others = tenancy.agent_usage(cache, tenant_name, leave_out=(namespace, name))
    agents = others.agents + 1
    replicas = others.replicas + int(spec.get("replicas", 1) or 0)
    max_agents = limits.get("agents")
    if max_agents is not None and agents > int(max_agents):
        return (
            f"tenant {tenant_name} allows {max_agents} Agents (spec.limits.agents) and this "
            f"would make {agents}: delete an Agent or raise the tenant's budget"
        )
    max_replicas = limits.get("replicas")
    if max_replicas is not None and replicas > int(max_replicas):
        return (
            f"tenant {tenant_name} allows {max_replicas} replicas in total "
            f"(spec.limits.replicas) and this would make {replicas}: lower spec.replicas "
            "or raise the tenant's budget"
        )
    return None
