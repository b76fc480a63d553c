"""kopf handlers: thin. Each translates a kopf event into a call on the Controller.

Only `on.event` handlers are used for our kinds: they neither add finalizers nor
write kopf's annotations, so watching an Agent costs no write. The Controller lives
in kopf's operator-wide memo, created at startup.
"""

from __future__ import annotations

import logging
import typing
from collections.abc import Iterable
from typing import Any

import kopf

from bmad_operator import admission, controller, kube, settings

MANAGED = {"app.kubernetes.io/managed-by": "bmad-operator"}

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
    ctl.start()
    memo["controller"] = ctl
    if cfg.webhook_port:
        cert = admission.self_signed(cfg.webhook_host)
        settings.admission.server = kopf.WebhookServer(
            addr=cfg.webhook_address,
            port=cfg.webhook_port,
            host=cfg.webhook_host,
            certfile=str(cert.certfile),
            pkeyfile=str(cert.pkeyfile),
        )
        url = cfg.webhook_url or f"https://{cfg.webhook_host}:{cfg.webhook_port}"
        await api.apply(admission.webhook_configuration(url, cert.pem, service=cfg.webhook_service))


def settings_module_load() -> settings.OperatorSettings:
    return settings.load()


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    ctl = memo.get("controller")
    if ctl is not None:
        await ctl.stop()


def _feed(event: kopf.RawEvent, memo: Any) -> None:
    ctl = memo.get("controller")
    if ctl is not None:
        ctl.on_event(event)


@kopf.on.event("bmad.dev", "v1alpha1", "agents")
async def agent_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("bmad.dev", "v1alpha1", "tenants")
async def tenant_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("", "v1", "namespaces")
async def namespace_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("bmad.dev", "v1alpha1", "integrations")
async def integration_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("apps", "v1", "deployments", labels=MANAGED)
async def deployment_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("", "v1", "services", labels=MANAGED)
async def service_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("", "v1", "configmaps", labels=MANAGED)
async def configmap_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("", "v1", "serviceaccounts", labels=MANAGED)
async def serviceaccount_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED)
async def pdb_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.index("", "v1", "secrets")
async def secret_versions(
    name: str, namespace: str | None, meta: kopf.Meta, **_: Any
) -> dict[tuple[str | None, str], str | None]:
    """Every Secret's resourceVersion (never its data), kept current by the watch."""
    return {(namespace, name): meta.get("resourceVersion")}


@kopf.on.event("", "v1", "secrets")
async def secret_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    # A credentials Secret changed: the Integrations that use it are checked at once.
    _feed(event, memo)


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


@kopf.on.event("", "v1", "resourcequotas", labels=MANAGED)
async def quota_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("", "v1", "limitranges", labels=MANAGED)
async def limitrange_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("networking.k8s.io", "v1", "networkpolicies", labels=MANAGED)
async def networkpolicy_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)


@kopf.on.event("rbac.authorization.k8s.io", "v1", "rolebindings", labels=MANAGED)
async def rolebinding_event(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    _feed(event, memo)
