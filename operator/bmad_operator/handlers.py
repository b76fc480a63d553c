"""kopf handlers: thin. Each translates a kopf event into a call on the Controller.

Only `on.event` handlers are used for our kinds: they neither add finalizers nor
write kopf's annotations, so watching an Agent costs no write. The Controller lives
in kopf's operator-wide memo, created at startup.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
import typing
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import kopf
from kopf._cogs.clients import errors as kopf_errors
from kopf._cogs.clients import watching as kopf_watching

from bmad_operator import (
    admission,
    controller,
    errors,
    informer,
    kube,
    leader,
    settings,
    stripe_endpoint,
)
from bmad_operator.builders import meta
from bmad_operator.builders import webhook as webhook_builders
from bmad_operator.policies import budget as policy_budget
from bmad_operator.workflows import approvals

MANAGED = meta.managed_labels()
# Where this process wrote its webhook certificate and key (removed at cleanup).
WEBHOOK_CERT_DIRS: list[Path] = []
MANAGED_SELECTOR = ",".join(f"{k}={v}" for k, v in sorted(MANAGED.items()))

log = logging.getLogger(__name__)


class NoDiffBaseStorage(kopf.AnnotationsDiffBaseStorage):
    """We register no change-detecting handlers (on.create/update/field), so kopf's
    per-event "essence" (a deep copy of every body, for diffs nobody reads) is skipped.
    Profiling 200 Agents showed it as the largest single cost in the operator."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return typing.cast(kopf.BodyEssence, {})


# How long a watch whose resource is gone waits before kopf asks again.
GONE_RESOURCE_PAUSE = 5.0


def tolerate_vanished_resources(
    watch: Callable[..., AsyncIterator[Any]],
) -> Callable[..., AsyncIterator[Any]]:
    """kopf's watch stream, except that a 404 ends the stream instead of the operator.

    A watched kind whose CRD is deleted (KEDA uninstalled, for one) answers a watch
    request with 404. kopf stops that kind's watcher once its CRD watch sees the
    deletion, but a watch that reconnects first gets the 404, and kopf lets it end the
    whole operator ("Multidimensional multitasker has failed: 404 page not found", seen
    in a CI run). Here the stream just ends: kopf's loop asks again after a pause, and
    the watcher is stopped when kopf notices the CRD is gone (or the kind is back).
    """

    async def stream(**kwargs: Any) -> AsyncIterator[Any]:
        try:
            async for event in watch(**kwargs):
                yield event
        except kopf_errors.APINotFoundError:
            log.info("%s is not served (its CRD was removed?): watching it again later",
                     kwargs.get("resource"))  # fmt: skip
            await asyncio.sleep(GONE_RESOURCE_PAUSE)

    return stream


if not getattr(kopf_watching.continuous_watch, "tolerates_vanished_resources", False):
    kopf_watching.continuous_watch = tolerate_vanished_resources(kopf_watching.continuous_watch)
    kopf_watching.continuous_watch.tolerates_vanished_resources = True  # type: ignore[attr-defined]


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
    # Its informers watch every kind but those kopf follows (`KOPF_WATCHED`).
    owned = informer.Informers(
        informer.Informer(api, kind, selector=selector, sink=ctl.on_event)
        for kind, selector in INFORMED
    )
    owned.start()
    memo["informers"] = owned
    if ctl.metering is not None:  # no ledger writer is pruned before the Agents are listed
        [agents] = [i for i in owned.informers if i.kind == "Agent"]
        ctl.metering.agents_listed = agents.listed.is_set
    if cfg.webhook_port:
        memo["webhook"] = await _serve_webhook(settings, api, cfg)
    if cfg.stripe_webhook_port:
        # Every replica: the inbox is the ledger's PostgreSQL (stripe_endpoint).
        stripe = stripe_endpoint.Endpoint(api, ctl.store, cfg)
        await stripe.start()
        memo["stripe_webhook"] = stripe
    if not cfg.leader_election:
        ctl.start()
        return
    # Every replica watches (its store is current) and serves the webhook; only the
    # Lease's holder reconciles: the controller starts when leadership is gained and
    # stops when it is lost.
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


async def _serve_webhook(
    kopf_settings: kopf.OperatorSettings, api: kube.Kube, cfg: settings.OperatorSettings
) -> admission.Endpoint:
    """Serve the budget webhook with the certificate kept in the operator's namespace,
    and apply its configuration, owned by that namespace (uninstalling removes both)."""
    system_ns = await api.get("Namespace", None, cfg.system_namespace)
    if system_ns is None:
        # A run outside the cluster (in a cluster the install makes the namespace).
        log.info("creating the operator's namespace %s", cfg.system_namespace)
        system_ns = await api.create(
            {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": cfg.system_namespace}}
        )
    cert = await admission.ensure_certificate(
        api, namespace=cfg.system_namespace, host=cfg.webhook_host
    )
    # kopf's server reads the pair from files: a private directory, removed at cleanup.
    cert_dir = Path(tempfile.mkdtemp(prefix="bmad-webhook-"))
    WEBHOOK_CERT_DIRS.append(cert_dir)
    certfile, keyfile = admission.write_files(cert, cert_dir)
    kopf_settings.admission.server = kopf.WebhookServer(
        addr=cfg.webhook_address,
        port=cfg.webhook_port,
        host=cfg.webhook_host,
        certfile=str(certfile),
        pkeyfile=str(keyfile),
    )
    url = cfg.webhook_url or f"https://{cfg.webhook_host}:{cfg.webhook_port}"
    await api.apply(
        webhook_builders.configuration(
            cert.cert_pem,
            owner=system_ns,
            url=url,
            service=cfg.webhook_service,
            approvers=(approvals.WEBHOOK_ID, approvals.MATCH_CONDITION),
        )
    )
    return admission.Endpoint(
        cfg.webhook_address, cfg.webhook_port, cfg.webhook_host, cert.cert_pem
    )


def settings_module_load() -> settings.OperatorSettings:
    return settings.load()


@kopf.on.cleanup()
async def cleanup(memo: Any, **_: Any) -> None:
    while WEBHOOK_CERT_DIRS:
        shutil.rmtree(WEBHOOK_CERT_DIRS.pop(), ignore_errors=True)
    elector = memo.get("elector")
    if elector is not None:
        # Graceful: stop campaigning and reconciling, then hand the Lease over so a
        # standby need not wait for it to expire.
        await elector.release()
    stripe = memo.get("stripe_webhook")
    if stripe is not None:
        await stripe.stop()
    owned = memo.get("informers")
    if owned is not None:
        await owned.stop()
    ctl = memo.get("controller")
    if ctl is None:
        return
    cfg = memo.get("config") or settings_module_load()
    if memo.get("webhook") is not None and not cfg.webhook_service:
        # Served by this process alone (outside a cluster, on a URL): its configuration
        # goes with it. In a cluster it stays for the next replica or start.
        try:
            await ctl.api.delete(
                "ValidatingWebhookConfiguration", None, webhook_builders.CONFIG_NAME
            )
        except errors.ApiError as exc:
            log.warning("could not remove the webhook configuration: %s", exc)
    await ctl.stop()


@kopf.on.probe(id="webhook")
async def webhook_serving(memo: Any, **_: Any) -> str:
    """Part of /healthz (the liveness and readiness probes): the webhook answers a TLS
    handshake verified as the API server verifies it. /healthz fails while it does not.

    A permanent error, so that kopf answers at once instead of retrying the probe."""
    endpoint = memo.get("webhook")
    if endpoint is None:
        cfg = memo.get("config") or settings_module_load()
        if cfg.webhook_port:
            raise kopf.PermanentError("the budget webhook is not set up yet")
        return "disabled"
    try:
        await admission.check_serving(endpoint)
    except (OSError, TimeoutError) as exc:  # ssl.SSLError is an OSError
        raise kopf.PermanentError(f"the budget webhook does not serve: {exc}") from None
    return "serving"


async def feed(event: kopf.RawEvent, memo: Any, **_: Any) -> None:
    """Every watched object goes to the controller: its store, then its work queues."""
    ctl = memo.get("controller")
    if ctl is not None:
        ctl.on_event(event)


# What the operator watches: (group, version, plural, only objects it manages). The
# kinds it manages are selected by the API server with its labels, not filtered here:
# otherwise every Deployment, Service, ConfigMap and Secret of the cluster would be
# listed and streamed to the operator only to be dropped (memory, CPU, and for Secrets,
# data). Of the Secrets, only its own (the binding Secrets it publishes, its webhook
# certificate): an Integration reads its user's credentials Secret by name on each pass
# instead.
WATCHED: tuple[tuple[str, str, str, bool], ...] = (
    ("bmad.dev", "v1alpha1", "agents", False),
    ("bmad.dev", "v1alpha1", "tenants", False),
    ("bmad.dev", "v1alpha1", "integrations", False),
    ("bmad.dev", "v1alpha1", "workflows", False),
    ("", "v1", "namespaces", False),
    ("", "v1", "secrets", True),
    ("apps", "v1", "deployments", True),
    ("", "v1", "services", True),
    ("", "v1", "configmaps", True),
    ("", "v1", "serviceaccounts", True),
    ("policy", "v1", "poddisruptionbudgets", True),
    ("", "v1", "resourcequotas", True),
    ("", "v1", "limitranges", True),
    ("networking.k8s.io", "v1", "networkpolicies", True),
    ("rbac.authorization.k8s.io", "v1", "rolebindings", True),
    # Other autoscalers of an Agent (a conflict the autoscaler reports), and the
    # ScaledObjects of engine keda; kopf watches these once KEDA's CRD exists.
    ("autoscaling", "v2", "horizontalpodautoscalers", False),
    ("keda.sh", "v1alpha1", "scaledobjects", False),
)
# Watched by kopf: kinds whose CRD may be missing or installed later (kopf follows the
# CRDs it serves and starts or stops that kind's watch). The rest by `informer`.
KOPF_WATCHED = frozenset({"scaledobjects"})
_KIND_OF_PLURAL = {info.plural: kind for kind, info in kube.RESOURCES.items()}
INFORMED: tuple[tuple[str, str], ...] = tuple(
    (_KIND_OF_PLURAL[plural], MANAGED_SELECTOR if ours else "")
    for _group, _version, plural, ours in WATCHED
    if plural not in KOPF_WATCHED
)
for _group, _version, _plural, _ours in WATCHED:
    if _plural in KOPF_WATCHED:
        kopf.on.event(
            _group, _version, _plural, id=f"feed-{_plural}", labels=MANAGED if _ours else None
        )(feed)


@kopf.on.validate(
    "bmad.dev", "v1alpha1", "agents", id=admission.WEBHOOK_ID, operations=["CREATE", "UPDATE"]
)
async def validate_agent_budget(
    *,
    body: kopf.Body,
    name: str,
    namespace: str | None,
    memo: Any,
    old: kopf.Body | None = None,
    operation: str | None = None,
    dryrun: bool = False,
    **_: Any,
) -> None:
    """Refuse an Agent create, or an update to more replicas, beyond its tenant's budget."""
    if namespace is None:
        return
    webhook = _budget(memo)
    name = name or body.get("metadata", {}).get("name", "")
    creating = operation == "CREATE"
    if creating:
        old_replicas = 0
    elif old is not None:
        old_replicas = policy_budget.agent_replicas(old.get("spec"))
    else:
        old_replicas = await webhook.current_replicas(namespace, name)
    change = policy_budget.Change(
        (namespace, name), creating, old_replicas, policy_budget.agent_replicas(body.get("spec"))
    )
    problem = await webhook.review(namespace, change, dry_run=bool(dryrun))
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
    *,
    body: kopf.Body,
    name: str,
    namespace: str | None,
    memo: Any,
    old: kopf.Body | None = None,
    dryrun: bool = False,
    **_: Any,
) -> None:
    """`kubectl scale`, an HPA or KEDA go through agents/scale: the same replica budget."""
    if namespace is None:
        return
    webhook = _budget(memo)
    new_replicas = int((body.get("spec") or {}).get("replicas") or 0)
    if old is not None:
        old_replicas = int((old.get("spec") or {}).get("replicas") or 0)
    else:
        old_replicas = await webhook.current_replicas(namespace, name)
    change = policy_budget.Change((namespace, name), False, old_replicas, new_replicas)
    problem = await webhook.review(namespace, change, dry_run=bool(dryrun))
    if problem:
        raise kopf.AdmissionError(problem, code=403)


def _budget(memo: Any) -> admission.BudgetWebhook:
    ctl = memo.get("controller")
    if ctl is None:
        # Only growth is sent here: refusing it until the operator is up fails closed.
        raise kopf.AdmissionError("the budget webhook is starting: retry in a moment", code=503)
    webhook: admission.BudgetWebhook = ctl.budget
    return webhook


@kopf.on.validate(
    "bmad.dev",
    "v1alpha1",
    "workflows",
    id=approvals.WEBHOOK_ID,
    operations=["CREATE", "UPDATE"],
)
async def validate_workflow_approvals(
    body: kopf.Body, userinfo: kopf.UserInfo, **kwargs: Any
) -> None:
    """Refuse an approval (a step id added to spec.approvals) by someone not among the
    step's approvers: the API server says who makes the edit, managedFields do not."""
    old: Any = kwargs.get("old")
    problem = approvals.refusal(
        dict(old.get("spec") or {}) if old else None,
        dict(body.get("spec") or {}),
        user=str(userinfo.get("username") or ""),
        groups=[str(g) for g in userinfo.get("groups") or []],
    )
    if problem:
        raise kopf.AdmissionError(problem, code=403)
