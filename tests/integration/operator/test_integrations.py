"""Integrations checked by the operator with the real clients against real services.

Every case runs through the whole path: a Secret and an Integration applied with
kubectl, the operator (a separate process) checking the service, the status and
events it writes, the binding Secret it publishes, and the Agents that mount it.
"""

from __future__ import annotations

import base64
import json
import secrets as pysecrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from bmad_testbed import audit, procs
from bmad_testbed.kubectl import Kubectl, eventually
from bmad_testbed.operator_proc import OperatorProcess

from ..integrations import emulators
from .helpers import agent, condition

pytestmark = pytest.mark.integration


@dataclass
class Case:
    """How to declare one real service as an Integration, well and badly."""

    type: str
    block: Callable[[dict[str, str]], dict[str, Any]]
    good: Callable[[dict[str, str]], dict[str, str]]
    wrong: Callable[[dict[str, str], str], dict[str, str]]  # with a marker credential
    required_key: str
    unreachable: Callable[[dict[str, Any], int], dict[str, Any]]
    binding_keys: tuple[str, ...] = field(default=())


def _with_port(block: dict[str, Any], port: int) -> dict[str, Any]:
    return dict(block, port=port)


def _with_endpoint(block: dict[str, Any], port: int) -> dict[str, Any]:
    return dict(block, endpoint=f"http://127.0.0.1:{port}")


def _with_api_base(block: dict[str, Any], port: int) -> dict[str, Any]:
    return dict(block, apiBase=f"http://127.0.0.1:{port}")


CASES = {
    "postgres": Case(
        type="postgres",
        block=lambda env: {
            "host": "127.0.0.1",
            "port": int(env["BMAD_POSTGRES_PORT"]),
            "database": "postgres",
            "sslMode": "disable",
        },
        good=lambda env: {"username": "postgres", "password": env["BMAD_POSTGRES_PASSWORD"]},
        wrong=lambda env, marker: {"username": "postgres", "password": marker},
        required_key="password",
        unreachable=_with_port,
        binding_keys=("type", "host", "port", "database", "username", "password", "uri"),
    ),
    "redis": Case(
        type="redis",
        block=lambda env: {"host": "127.0.0.1", "port": int(env["BMAD_REDIS_PORT"])},
        good=lambda env: {"password": env["BMAD_REDIS_PASSWORD"]},
        wrong=lambda env, marker: {"password": marker},
        required_key="password",
        unreachable=_with_port,
        binding_keys=("type", "host", "port", "password", "uri"),
    ),
    "objectStorage": Case(
        type="objectStorage",
        block=lambda env: {
            "provider": "minio",
            "endpoint": env["BMAD_S3_ENDPOINT"],
            "region": "us-east-1",
            "bucket": f"bmad-it-{pysecrets.token_hex(4)}",
            "createBucket": True,
            "versioning": True,
        },
        good=lambda env: {
            "accessKeyId": env["BMAD_S3_ACCESS_KEY"],
            "secretAccessKey": env["BMAD_S3_SECRET_KEY"],
        },
        wrong=lambda env, marker: {
            "accessKeyId": env["BMAD_S3_ACCESS_KEY"],
            "secretAccessKey": marker,
        },
        required_key="secretAccessKey",
        unreachable=_with_endpoint,
        binding_keys=("type", "endpoint", "bucket"),
    ),
    "stripe": Case(
        type="stripe",
        block=lambda env: {"apiBase": env["BMAD_STRIPE_API_BASE"]},
        good=lambda env: {"apiKey": "sk_test_bmad"},
        # stripe-mock accepts any well-formed test key and refuses a malformed one.
        wrong=lambda env, marker: {"apiKey": marker},
        required_key="apiKey",
        unreachable=_with_api_base,
        binding_keys=("type",),
    ),
}


def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name},
        "type": "Opaque",
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def _integration(
    name: str, case: Case, block: dict[str, Any], secret: str, *, interval: int = 10
) -> dict[str, Any]:
    return {
        "apiVersion": "bmad.dev/v1alpha1",
        "kind": "Integration",
        "metadata": {"name": name},
        "spec": {
            "type": case.type,
            "secretRef": {"name": secret},
            case.type: block,
            "checkIntervalSeconds": interval,
        },
    }


def _ready(k: Kubectl, name: str, status: str, reason: str, timeout: float = 60) -> dict[str, Any]:
    def probe() -> dict[str, Any] | None:
        obj = k.json("get", "integration", name)
        cond = condition(obj, "Ready")
        if cond and cond["status"] == status and cond["reason"] == reason:
            return obj
        return None

    got: dict[str, Any] = eventually(
        probe, timeout=timeout, what=f"integration {name} Ready={status} ({reason})"
    )
    return got


def _reason_cycle(k: Kubectl, operator: OperatorProcess, case: Case, env: dict[str, str]) -> None:
    """Good → wrong credential → missing key → missing Secret → fixed → unreachable."""
    block = case.block(env)
    marker = f"sk_marker_{pysecrets.token_hex(8)}"

    # Good credentials: Ready=True, binding published.
    k.apply(_secret("creds", case.good(env)))
    k.apply(_integration("svc", case, block, "creds"))
    obj = _ready(k, "svc", "True", "Checked")
    assert obj["status"]["bindingSecretName"] == "svc-binding"
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]
    assert obj["status"]["lastCheckTime"]
    assert obj["status"]["latencyMs"] >= 0
    binding = k.json("get", "secret", "svc-binding")
    assert binding["type"] == f"servicebinding.io/{case.type}"
    decoded = {key: base64.b64decode(v).decode() for key, v in binding["data"].items()}
    for key in case.binding_keys:
        assert key in decoded, key
    assert decoded["type"] == case.type
    assert binding["metadata"]["ownerReferences"][0]["uid"] == obj["metadata"]["uid"]

    # A wrong credential, fixed in place: the Secret watch re-checks at once.
    k.apply(_secret("creds", case.wrong(env, marker)))
    obj = _ready(k, "svc", "False", "AuthenticationFailed", timeout=30)
    message = condition(obj, "Ready")["message"]
    assert marker not in message
    assert message

    # A missing key.
    data = case.good(env)
    data.pop(case.required_key)
    k.apply(_secret("creds", data))
    obj = _ready(k, "svc", "False", "SecretKeyMissing", timeout=30)
    assert case.required_key in condition(obj, "Ready")["message"]

    # A missing Secret.
    k.run("delete", "secret", "creds")
    obj = _ready(k, "svc", "False", "SecretNotFound", timeout=30)
    assert "creds" in condition(obj, "Ready")["message"]

    # Fixed: back to True without touching the operator.
    pid = operator.pid
    k.apply(_secret("creds", case.good(env)))
    _ready(k, "svc", "True", "Checked", timeout=30)
    assert operator.pid == pid

    # An unreachable host.
    closed = case.unreachable(block, procs.free_port())
    k.apply(_integration("svc", case, closed, "creds"))
    obj = _ready(k, "svc", "False", "Unreachable", timeout=60)
    assert obj["status"]["observedGeneration"] == obj["metadata"]["generation"]

    # Events only on flips, with our reasons; the marker nowhere.
    events = k.json("get", "events", "--field-selector", "involvedObject.name=svc")["items"]
    reasons = {e["reason"] for e in events if e["source"].get("component") == "bmad-operator"}
    assert {"Checked", "AuthenticationFailed", "Unreachable"} <= reasons
    for event in events:
        assert marker not in event.get("message", "")
    assert marker not in json.dumps(k.json("get", "integration", "svc")["status"])
    assert marker not in operator.log_text()


@pytest.mark.parametrize("case_name", sorted(CASES))
def test_integration_reasons_and_recovery(
    case_name: str,
    kubectl: Kubectl,
    namespace: str,
    operator: OperatorProcess,
    testbed_env: dict[str, str],
) -> None:
    _reason_cycle(kubectl.in_namespace(namespace), operator, CASES[case_name], testbed_env)


def test_email_smtp_with_auth_reasons_and_recovery(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    with emulators.SmtpServer(username="mailer", password="smtp-pass-1") as server:
        case = Case(
            type="email",
            block=lambda env: {
                "provider": "smtp",
                "host": "127.0.0.1",
                "port": server.port,
                "from": "agents@bmad.test",
            },
            good=lambda env: {"username": "mailer", "password": "smtp-pass-1"},
            wrong=lambda env, marker: {"username": "mailer", "password": marker},
            required_key="password",
            unreachable=_with_port,
            binding_keys=("type", "provider", "host", "port", "username", "password", "from"),
        )
        _reason_cycle(kubectl.in_namespace(namespace), operator, case, {})


def test_auth0_reasons_and_recovery(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess
) -> None:
    oidc = emulators.OidcIssuer(
        client_id="bmad-ops", client_secret="oidc-secret-1", audience="https://agents.bmad.test"
    )
    with emulators.HttpServer(oidc.route) as server:
        oidc.bind(server.url)
        case = Case(
            type="auth0",
            block=lambda env: {
                "issuer": oidc.issuer,
                "audience": "https://agents.bmad.test",
                "clientId": "bmad-ops",
            },
            good=lambda env: {"clientSecret": "oidc-secret-1"},
            wrong=lambda env, marker: {"clientSecret": marker},
            required_key="clientSecret",
            unreachable=lambda block, port: dict(block, issuer=f"http://127.0.0.1:{port}/"),
            binding_keys=("type", "issuer", "audience", "jwksUri", "clientId"),
        )
        _reason_cycle(kubectl.in_namespace(namespace), operator, case, {})


def _stripe(
    name: str, env: dict[str, str], key: str, *, interval: int = 10
) -> list[dict[str, Any]]:
    return [
        _secret(f"{name}-creds", {"apiKey": key}),
        _integration(
            name, CASES["stripe"], CASES["stripe"].block(env), f"{name}-creds", interval=interval
        ),
    ]


def test_agent_mounts_three_bindings_and_rolls_when_credentials_rotate(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, testbed_env: dict[str, str]
) -> None:
    k = kubectl.in_namespace(namespace)
    env = testbed_env
    for case_name, name in (("postgres", "db"), ("redis", "cache")):
        case = CASES[case_name]
        k.apply(_secret(f"{name}-creds", case.good(env)))
        k.apply(_integration(name, case, case.block(env), f"{name}-creds"))
    # An hour between timed checks: only a new version of its Secret, read on a pass,
    # can have it checked again in this test.
    for doc in _stripe("billing", env, "sk_test_first", interval=3600):
        k.apply(doc)
    k.apply(agent("pm", role="pm", integrations=["db", "cache", "billing"]))
    k.run("wait", "--for=condition=Ready", "agent/pm", "--timeout=90s", timeout=100)

    dep = k.json("get", "deployment", "pm")
    pod_spec = dep["spec"]["template"]["spec"]
    secrets_mounted = {v["secret"]["secretName"] for v in pod_spec["volumes"] if "secret" in v}
    assert secrets_mounted == {"db-binding", "cache-binding", "billing-binding"}
    mounts = {m["mountPath"] for m in pod_spec["containers"][0]["volumeMounts"]}
    assert {"/bindings/db", "/bindings/cache", "/bindings/billing"} <= mounts
    env_vars = {e["name"]: e.get("value") for e in pod_spec["containers"][0]["env"]}
    assert env_vars["SERVICE_BINDING_ROOT"] == "/bindings"
    cond = condition(k.json("get", "agent", "pm"), "IntegrationsReady")
    assert cond is not None
    assert cond["status"] == "True"

    before_hash = dep["spec"]["template"]["metadata"]["annotations"]["bmad.dev/config-hash"]
    before_pods = {p["metadata"]["name"] for p in k.json("get", "pods")["items"]}
    binding_before = k.json("get", "secret", "billing-binding")["metadata"]["resourceVersion"]

    # Rotate the billing key: the Integration's next pass (the resync, 5 s here) reads
    # the Secret by name, sees a new version and checks again at once (its timer is an
    # hour away; the binding Secret is only rewritten after a successful check), and
    # the agent rolls.
    k.apply(_secret("billing-creds", {"apiKey": "sk_test_second"}))

    def rolled() -> bool:
        d = k.json("get", "deployment", "pm")
        return d["spec"]["template"]["metadata"]["annotations"]["bmad.dev/config-hash"] != (
            before_hash
        )

    eventually(rolled, timeout=60, what="the pod template hash to change")
    assert k.json("get", "secret", "billing-binding")["metadata"]["resourceVersion"] != (
        binding_before
    )
    k.run("rollout", "status", "deployment/pm", "--timeout=60s", timeout=70)
    after_pods = {
        p["metadata"]["name"]
        for p in k.json("get", "pods")["items"]
        if p["status"]["phase"] == "Running"
    }
    assert after_pods
    assert not (after_pods & before_pods)


def test_an_agent_cannot_bind_an_integration_of_another_namespace(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, testbed_env: dict[str, str]
) -> None:
    other = f"{namespace[:50]}-other"
    kubectl.run("create", "namespace", other)
    try:
        for doc in _stripe("shared", testbed_env, "sk_test_other"):
            kubectl.in_namespace(other).apply(doc)
        k = kubectl.in_namespace(namespace)
        k.apply(agent("sm", role="sm", integrations=["shared"]))

        def refused() -> dict[str, Any] | None:
            cond = condition(k.json("get", "agent", "sm"), "IntegrationsReady")
            return cond if cond and cond["reason"] == "IntegrationNotFound" else None

        cond = eventually(refused, timeout=30, what="IntegrationNotFound")
        assert namespace in cond["message"]
        dep = k.json("get", "deployment", "sm")
        assert not [v for v in dep["spec"]["template"]["spec"]["volumes"] if "secret" in v]
        # A namespaced reference cannot even be written down.
        bad = agent("sm2", role="sm", integrations=[f"{other}/shared"])
        proc = k.run("apply", "-f", "-", stdin=json.dumps(bad), check=False)
        assert proc.returncode != 0
        assert "spec.integrations" in proc.stderr
    finally:
        kubectl.run("delete", "namespace", other, "--wait=false", check=False)


def test_hole10_integration_status_says_whether_the_datastore_connection_is_encrypted(
    kubectl: Kubectl,
    namespace: str,
    operator: OperatorProcess,
    testbed_env: dict[str, str],
) -> None:
    """Issue 10, hole 10: an Integration's status says how the operator's check reached
    the datastore. The test bed's TLS PostgreSQL with the CA in the Secret and
    verify-full: Encrypted=True, TlsVerified; the plaintext PostgreSQL under sslMode
    prefer and Redis without tls: Encrypted=False, PlaintextConnection. Before the fix
    no Encrypted condition was written (the wait for it timed out)."""
    k = kubectl.in_namespace(namespace)
    env = testbed_env
    ca = Path(env["BMAD_SERVICES_CA"]).read_text()
    pg_case, redis_case = CASES["postgres"], CASES["redis"]
    k.apply(_secret("pg-tls", {**pg_case.good(env), "ca.crt": ca}))
    k.apply(_secret("pg", pg_case.good(env)))
    k.apply(_secret("cache", redis_case.good(env)))
    tls_block = {
        **pg_case.block(env),
        "port": int(env["BMAD_POSTGRES_TLS_PORT"]),
        "sslMode": "verify-full",
    }
    k.apply(_integration("db-tls", pg_case, tls_block, "pg-tls"))
    k.apply(_integration("db-plain", pg_case, {**pg_case.block(env), "sslMode": "prefer"}, "pg"))
    k.apply(_integration("cache-plain", redis_case, redis_case.block(env), "cache"))

    def encrypted(name: str) -> dict[str, Any]:
        found: dict[str, Any] = eventually(
            lambda: condition(k.json("get", "integration", name), "Encrypted"),
            timeout=60,
            what=f"integration {name} has an Encrypted condition",
        )
        return found

    assert condition(_ready(k, "db-tls", "True", "Checked"), "Ready")
    tls = encrypted("db-tls")
    assert (tls["status"], tls["reason"]) == ("True", "TlsVerified"), tls
    for name in ("db-plain", "cache-plain"):
        plain = encrypted(name)
        assert (plain["status"], plain["reason"]) == ("False", "PlaintextConnection"), plain
        assert condition(k.json("get", "integration", name), "Ready")["status"] == "True"
    assert env["BMAD_POSTGRES_PASSWORD"] not in json.dumps(
        [k.json("get", "integration", n)["status"] for n in ("db-tls", "db-plain")]
    )


def test_hole12_the_operator_lists_and_watches_only_the_secrets_it_manages(
    kubectl: Kubectl, namespace: str, operator: OperatorProcess, testbed_env: dict[str, str]
) -> None:
    """Issue 10, hole 12: the operator listed and watched every Secret of the cluster
    (memory, and every tenant's credentials streamed to it). Now the API server selects
    only the Secrets it manages (binding Secrets, its webhook certificate); a user's
    credentials Secret is read by name when an Integration's pass needs it.

    Before the change this failed: the operator's Secret watch had no labelSelector
    (`/api/v1/secrets?watch=true&allowWatchBookmarks=true&...`)."""
    # An Integration whose credentials the operator must read: it is checked, so the
    # operator made its Secret calls (and has been watching since it started).
    for doc in _stripe("billing", testbed_env, "sk_test_watch"):
        kubectl.in_namespace(namespace).apply(doc)
    kubectl.in_namespace(namespace).run(
        "wait", "--for=condition=Ready", "integration/billing", "--timeout=90s", timeout=100
    )
    log = testbed_env["BMAD_AUDIT_LOG"]
    collections = [
        ev
        for ev in audit.entries(log)
        if ev.get("user", {}).get("username") == testbed_env["BMAD_OPERATOR_USER"]
        and ev.get("objectRef", {}).get("resource") == "secrets"
        and ev.get("verb") in ("list", "watch")
    ]
    assert collections, "the operator neither listed nor watched Secrets: nothing to check"
    for ev in collections:
        query = parse_qs(urlsplit(ev["requestURI"]).query)
        assert query.get("labelSelector") == ["app.kubernetes.io/managed-by=bmad-operator"], ev[
            "requestURI"
        ]
    reads = [
        ev
        for ev in audit.entries(log)
        if ev.get("user", {}).get("username") == testbed_env["BMAD_OPERATOR_USER"]
        and ev.get("verb") == "get"
        and ev.get("objectRef", {}).get("resource") == "secrets"
        and ev.get("objectRef", {}).get("namespace") == namespace
        and ev.get("objectRef", {}).get("name") == "billing-creds"
    ]
    assert reads, "the Integration's credentials Secret was not read by name"
