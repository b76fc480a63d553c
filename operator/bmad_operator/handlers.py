"""kopf handlers: thin. Each translates a kopf event into a call on the Controller.

Only `on.event` handlers are used for our kinds: they neither add finalizers nor
write kopf's annotations, so watching an Agent costs no write. The Controller lives
in kopf's operator-wide memo, created at startup.
"""

from __future__ import annotations

import asyncio
import logging
import typing
from collections.abc import Iterable
from typing import Any

import kopf

from bmad_operator import admission, controller, kube, leader, settings
from bmad_operator.builders import meta

MANAGED = meta.managed_labels()

log = logging.getLogger(__name__)


class NoDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """We register no change-detecting handlers (on.create/update/field), so kopf's
    per-event "essence" (a deep copy of every body, for diffs nobody reads) is skipped.
    Profiling 200 Agents showed it as the largest single cost in the operator."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return typing.cast(kopf.BodyEssence, {})


def configure(kopf_settings: kopf.OperatorSettings) -> None:
    """kopf hygiene: our own prefixes, no chatter posted as events."""
    kopf_settings.persistence.finalizer = "bmad.dev/finalizer"
    kopf_settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="bmad.dev")
    kopf_settings.persistence.diffbase_storage = NoDiffBaseStorage(
        prefix="bmad.dev", key="last-handled-configuration"
    )
    # kopf turns its log lines into Kubernetes events: only warnings and worse.
    kopf_settings.posting.level = logging.WARNING
    kopf_settings.watching.server_timeout = 300
    kopf_settings.watching.client_timeout = 330
    kopf_settings.watching.connect_timeout = 30
    kopf_settings.networking.request_timeout = 60
    kopf_settings.batching.batch_window = 0.05


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: Any, **_: Any) -> None:
    configure(settings)
    cfg = memo.get("config") or settings_module_load()
    api = await kube.Kube.connect()
    ctl = controller.Controller(api, cfg)
    memo["controller"] = ctl
    if cfg.webhook_port:
        cert = await admission.shared_certificate(
            api, namespace=cfg.system_namespace, name=cfg.webhook_secret, host=cfg.webhook_host
        )
        settings.admission.server = kopf.WebhookServer(
            addr=cfg.webhook_address,
            port=cfg.webhook_port,
            host=cfg.webhook_host,
            certfile=str(cert.certfile),
            pkeyfile=str(cert.pkeyfile),
        )
        url = cfg.webhook_url or f"https://{cfg.webhook_host}:{cfg.webhook_port}"
        await api.apply(admission.webhook_configuration(url, cert.pem, service=cfg.webhook_service))
    if not cfg.leader_election:
        ctl.start()
        return
    # Every replica watches (its store serves the webhook); only the Lease's holder
    # reconciles: the controller starts when leadership is gained and stops when lost.
    elector = leader.LeaderElector(
        leader.KubeLeases(api.api),
        namespace=cfg.lease_namespace or cfg.system_namespace,
        name=cfg.lease_name,
        identity=cfg.leader_identity or None,
        timings=cfg.lease_timings(),
        on_started=ctl.start,
        on_stopped=ctl.pause,
    )
    memo["elector"] = elector
    memo["elector_task"] = asyncio.create_task(elector.run(), name="leader-election")


def settings_module_load() -> settings.OperatorSettings:
    return settings.load()


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    elector = memo.get("elector")
    if elector is not None:
        # Graceful: stop campaigning and reconciling, then hand the Lease over so a
        # standby need not wait for it to expire.
        await elector.release()
    ctl = memo.get("controller")
    if ctl is not None:
        await ctl.stop()


async def feed(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    """Every watched object goes to the controller: its store, then its work queues."""
    ctl = memo.get("controller")
    if ctl is not None:
        ctl.on_event(event)


# What the operator watches: (group, version, plural, only objects it manages). Users'
# Secrets are watched too: a changed credentials Secret re-checks its Integrations at once.
WATCHED: tuple[tuple[str, str, str, bool], ...] = (
    ("bmad.dev", "v1alpha1", "agents", False),
    ("bmad.dev", "v1alpha1", "tenants", False),
    ("bmad.dev", "v1alpha1", "integrations", False),
    ("", "v1", "namespaces", False),
    ("", "v1", "secrets", False),
    ("apps", "v1", "deployments", True),
    ("", "v1", "services", True),
    ("", "v1", "configmaps", True),
    ("", "v1", "serviceaccounts", True),
    ("policy", "v1", "poddisruptionbudgets", True),
    ("", "v1", "resourcequotas", True),
    ("", "v1", "limitranges", True),
    ("networking.k8s.io", "v1", "networkpolicies", True),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", True),
)
for _group, _version, _plural, _ours in WATCHED:
    kopf.on.event(
        _group, _version, _plural, id=f"feed-{_plural}", labels=MANAGED if _ours else None
    )(feed)


@kopf.index("", "v1", "secrets")
async def secret_versions(
    name: str, namespace: str | None, meta: kopf.Meta, **_: Any
) -> dict[tuple[str | None, str], str | None]:
    """Every Secret's resourceVersion (never its data), kept current by the watch."""
    return {(namespace, name): meta.get("resourceVersion")}


@kopf.on.validate(
    "bmad.dev", "v1alpha1", "agents", id=admission.WEBHOOK_ID, operations=["CREATE", "UPDATE"]
)
async def validate_agent_budget(
    body: kopf.Body, name: str, namespace: str | None, memo: Any, **_: Any
) -> None:
    """Refuse an Agent that would exceed its tenant's Agent or replica budget."""
    ctl = memo.get("controller")
    if ctl is None or namespace is None:
        return
    problem = admission.budget_violation(
        ctl.store,
        namespace=namespace,
        name=name or body.get("metadata", {}).get("name", ""),
        spec=dict(body.get("spec") or {}),
    )
    if problem:
        raise kopf.AdmissionError(problem, code=403)


@kopf.on.validate(
    "bmad.dev",
    "v1alpha1",
    "agents",
    id=admission.SCALE_WEBHOOK_ID,
    operations=["UPDATE"],
    subresource="scale",
)
async def validate_agent_scale(
    body: kopf.Body, name: str, namespace: str | None, memo: Any, **_: Any
) -> None:
    """`kubectl scale`, an HPA or KEDA go through agents/scale: the same replica budget."""
    ctl = memo.get("controller")
    if ctl is None or namespace is None:
        return
    agent = ctl.store.get("Agent", namespace, name) or {}
    spec = dict(agent.get("spec") or {})
    spec["replicas"] = (body.get("spec") or {}).get("replicas", spec.get("replicas", 1))
    problem = admission.budget_violation(ctl.store, namespace=namespace, name=name, spec=spec)
    if problem:
        raise kopf.AdmissionError(problem, code=403)
