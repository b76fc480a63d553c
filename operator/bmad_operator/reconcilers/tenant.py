"""The Tenant reconciler: namespaces, their fences, budgets and the billing account.

One pass: make sure the finalizer is on; create and label every namespace of the
spec and apply its ResourceQuota, LimitRange, NetworkPolicies and admin RoleBinding;
release or delete namespaces that left the spec (per `deletionPolicy`); make sure the
Stripe customer and subscription exist (exactly once: ids in status, idempotency keys
from the uid); count usage; decide the conditions and events (`policies.tenant`);
give the budget warning once a month (an Event, and an e-mail through
``spec.notify``'s email Integration, sent before the status that records it); write
status once.

Deletion runs through our finalizer and never blocks forever: errors become a
condition and an event, and after `policies.tenant.FINALIZE_DEADLINE` the finalizer
is released anyway.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import typing
from collections.abc import Hashable, Mapping
from typing import Any

import pydantic

from bmad_crds.v1alpha1 import integration as integration_api
from bmad_crds.v1alpha1 import tenant as tenant_api
from bmad_integrations import base as ibase
from bmad_integrations import billing, egress
from bmad_integrations import email as email_mod
from bmad_integrations.usage import reporter as usage_reporter
from bmad_operator import conditions, errors, events, kube, settings, store, tenancy, watching
from bmad_operator.builders import integration as integration_builders
from bmad_operator.builders import meta
from bmad_operator.builders import tenant as builders
from bmad_operator.conditions import Cond
from bmad_operator.policies import payments as payment_policy
from bmad_operator.policies import tenant as policy
from bmad_operator.policies import usage as usage_policy
from bmad_operator.reconcilers import common

log = logging.getLogger(__name__)

KIND = "Tenant"
# Not kopf's own finalizer name: kopf removes that one from objects it has no
# deletion handlers for.
FINALIZER = "bmad.dev/tenant-cleanup"
# The fences a tenant puts in each namespace: a change to one brings the tenant back.
FENCE_KINDS = ("ResourceQuota", "LimitRange", "NetworkPolicy", "RoleBinding")


class BillingSetupError(Exception):
    """Billing is not in place; `condition` is the BillingReady condition that says why."""

    def __init__(self, condition: Cond) -> None:
        super().__init__(condition.message)
        self.condition = condition


class TenantReconciler:
    def __init__(
        self,
        *,
        api: kube.Kube,
        cache: store.Store,
        operator_namespace: str,
        usage: common.UsageSource | None = None,
        payment_grace: dt.timedelta = dt.timedelta(days=3),
        egress_policy: egress.Policy | None = None,
    ) -> None:
        self.api = api
        self.cache = cache
        self.operator_namespace = operator_namespace
        # The usage ledger, when the operator meters usage (docs/billing.md).
        self.usage = usage
        # How long a failed payment runs on before the agents are suspended.
        self.payment_grace = payment_grace
        # Where the budget warning's e-mail may go (the operator's settings when None).
        self._egress_policy = egress_policy

    def watches(self) -> list[watching.Watch]:
        """The events that bring a Tenant back (kubebuilder's SetupWithManager)."""
        return [
            watching.primary(KIND, on_delete=watching.QUEUE),
            # an Agent came or went in one of its namespaces: its usage changed
            watching.mapped("Agent", self._tenant_of_agent),
            # its namespaces: labelled, relabelled, deleted, or handed over for adoption
            watching.mapped("Namespace", _tenant_or_adopter),
            # drift in a tenant's fences: put them back
            *(watching.mapped(kind, _tenant_label) for kind in FENCE_KINDS),
        ]

    def _tenant_of_agent(self, event: watching.WatchEvent) -> list[watching.Request]:
        tenant = tenancy.tenant_of_namespace(self.cache, event.namespace)
        return [watching.Request(("", tenant["metadata"]["name"]))] if tenant else []

    async def reconcile(self, key: Hashable) -> None:
        _, name = typing.cast(tuple[str, str], key)
        await common.measured(KIND, name, self._reconcile(name))

    # -- the pass -------------------------------------------------------------------
    async def _reconcile(self, name: str) -> None:
        body = self.cache.get(KIND, None, name)
        if body is None:
            return
        tenant_meta = body["metadata"]
        generation = tenant_meta.get("generation")
        status = body.get("status") or {}
        previous = status.get("conditions") or []
        try:
            spec = tenant_api.TenantSpec.model_validate(body.get("spec") or {})
        except pydantic.ValidationError as exc:
            msg = common.describe_validation_error(exc)
            if tenant_meta.get("deletionTimestamp") and FINALIZER in _finalizers(body):
                # Nothing can be applied from an invalid spec: release, never hang.
                await common.post_event(self.api, body, policy.invalid_spec_on_deletion(msg))
                await self._release(body)
                return
            await common.write_conditions(
                self.api, self.cache, KIND, body, [policy.invalid_spec(msg)]
            )
            return
        if tenant_meta.get("deletionTimestamp"):
            await self._finalize(body, spec)
            return
        if FINALIZER not in _finalizers(body):
            updated = await self._set_finalizers(body, [*_finalizers(body), FINALIZER])
            if updated is None:
                return
            body = updated

        held: list[str] = []
        refused: list[policy.Refusal] = []
        for ns in spec.namespaces:
            refusal = await self._claim(name, ns)
            if refusal is not None:
                refused.append(refusal)
                continue
            held.append(ns)
            await common.ensure(self.api, self.cache, builders.namespace(name, ns))
            for obj in builders.namespace_objects(
                name, ns, spec, operator_namespace=self.operator_namespace
            ):
                await common.ensure(self.api, self.cache, obj)
            await self._prune(name, ns, spec)
        released = policy.to_release(tenancy.tenant_namespaces(self.cache, name), held)
        for ns in released:
            await self._drop_namespace(name, ns, spec.deletion_policy)

        has_quota = builders.resource_quota(name, "x", spec.quota) is not None
        quota_cond = policy.quota_condition(
            quota=builders.QUOTA_NAME if has_quota else None,
            namespaces=len(held),
            pending=self._quotas_not_counted(held),
        )
        billing_status, billing_cond, account = await self._billing(
            body, spec, status.get("billing")
        )
        if self.usage is not None:
            self.usage.bill_to(name, _report_target(spec, billing_status, account))
        usage = self._usage(name)
        payment = self._payment(spec, billing_status)
        payment_suspension: Cond | None = None
        if payment is not None:
            payment_suspension = payment_policy.suspension(payment)
            if payment.billing_ready is not None and billing_cond.status == conditions.TRUE:
                billing_cond = payment.billing_ready
        elif spec.billing is not None and self.usage is not None and not self.usage.loaded:
            # A takeover: keep a payment suspension until the states are read.
            payment_suspension = payment_policy.shown_suspension(previous)
        ready = policy.ready_condition(
            refused=refused,
            suspended=spec.suspended,
            billing=billing_cond,
            namespaces=len(held),
            agents=usage["agents"],
            quota=quota_cond,
            payment_suspension=payment_suspension,
        )
        suspended = policy.suspended_condition(spec.suspended, payment_suspension)
        decided = [ready, quota_cond, billing_cond, suspended]
        payment_failed = (
            payment.payment_failed
            if payment is not None
            else payment_policy.billing_removed(previous)
            if spec.billing is None
            else None
        )
        if payment_failed is not None:
            decided.append(payment_failed)
        # Until the ledger is read (a takeover), BudgetExhausted stays as it is shown.
        budget_cond = (
            usage_policy.budget_condition(self.usage.budget_of(name))
            if self.usage is not None and self.usage.loaded
            else None
        )
        if budget_cond is not None:
            decided.append(budget_cond)
        warning = self._warning(name, spec, status)
        if warning is not None:
            decided.append(warning.condition)
            if warning.warned_for is not None:
                usage["warnedForPeriod"] = warning.warned_for
            if warning.give:
                # Before the status that records it: a crash in between gives it again
                # (the e-mail with the same Message-ID).
                for event in await self._give_warning(body, spec, warning):
                    await common.post_event(self.api, body, event)
        new_status: dict[str, Any] = {
            "observedGeneration": generation,
            "namespaces": held,
            "usage": usage,
            "conditions": conditions.merge(previous, decided, generation=generation),
        }
        if billing_status:
            new_status["billing"] = billing_status
        await self._write_status(body, new_status)
        for event in policy.pass_events(previous, [ready, billing_cond], released):
            await common.post_event(self.api, body, event)
        if budget_cond is not None:
            budget_event = usage_policy.budget_event(previous, budget_cond)
            if budget_event is not None:
                await common.post_event(self.api, body, budget_event)
        if payment_failed is not None:
            for event in payment_policy.flip_events(previous, [payment_failed, suspended]):
                await common.post_event(self.api, body, event)
        if payment is not None and payment.requeue_after is not None:
            # Back when the grace period ends: the suspension needs no poll.
            raise errors.Requeue(payment.requeue_after + 0.5, "payment grace period")

    def _warning(
        self, name: str, spec: tenant_api.TenantSpec, status: Mapping[str, Any]
    ) -> usage_policy.BudgetWarning | None:
        """The soft budget warning; None until the ledger is read (a takeover: the
        condition stays as it is shown)."""
        if self.usage is None or not self.usage.loaded:
            return None
        percent = (spec.limits.warn_at_percent if spec.limits else None) or (
            tenant_api.DEFAULT_WARN_AT_PERCENT
        )
        warned_for = (status.get("usage") or {}).get("warnedForPeriod")
        return usage_policy.budget_warning(
            self.usage.budget_of(name),
            percent=percent,
            warned_for=str(warned_for) if warned_for else None,
        )

    async def _give_warning(
        self,
        body: Mapping[str, Any],
        spec: tenant_api.TenantSpec,
        warning: usage_policy.BudgetWarning,
    ) -> list[events.Event]:
        """The warning's Event, and its e-mail when ``spec.notify`` is set (an Event
        saying why when it could not be sent)."""
        told = [usage_policy.warning_event(warning)]
        if spec.notify is None:
            return told
        notify = spec.notify
        tenant_meta = body["metadata"]
        ns = notify.integration_namespace or self.operator_namespace
        subject, text = usage_policy.warning_mail(tenant_meta["name"], warning)
        digest = hashlib.sha256(
            f"{tenant_meta.get('uid')}:budget-warning:{warning.warned_for}".encode()
        )
        binding = integration_builders.binding_secret_name(notify.integration)
        try:
            try:
                secret = await self.api.get("Secret", ns, binding)
            except errors.ApiError as exc:
                if exc.retryable:
                    raise  # the pass is retried; nothing was said yet
                raise email_mod.SendError(
                    f"the binding Secret {ns}/{binding} could not be read: {exc.message}"
                ) from None
            data = {
                k: base64.b64decode(v).decode()
                for k, v in ((secret or {}).get("data") or {}).items()
            }
            if data.get("type") != "email":
                raise email_mod.SendError(
                    f"Integration {ns}/{notify.integration} (spec.notify.integration) has not "
                    "published an email binding: check that it exists, is of type email and "
                    "is Ready"
                )
            mail = email_mod.Mail(
                sender=data.get("from", ""),
                recipients=tuple(notify.recipients),
                subject=subject,
                body=text,
                message_id=f"<{digest.hexdigest()[:32]}@bmad-operator>",
            )
            await email_mod.send(data, mail, policy=self._egress())
        except email_mod.SendError as exc:
            told.append(usage_policy.notification_failed(str(exc)))
        return told

    def _egress(self) -> egress.Policy:
        if self._egress_policy is None:
            self._egress_policy = settings.load().egress_policy()
        return self._egress_policy

    def _payment(
        self, spec: tenant_api.TenantSpec, billing_status: Mapping[str, Any] | None
    ) -> payment_policy.PaymentDecision | None:
        """What Stripe's webhooks mean for a billed Tenant; None until the ledger is read
        (a takeover: the conditions stay as they are shown) or without a customer."""
        customer = (billing_status or {}).get("customerId")
        if spec.billing is None or not customer or self.usage is None or not self.usage.loaded:
            return None
        return payment_policy.decide(
            self.usage.payment_of(str(customer)),
            now=dt.datetime.now(dt.UTC),
            grace=self.payment_grace,
        )

    def _quotas_not_counted(self, namespaces: list[str]) -> list[str]:
        """Our ResourceQuotas the quota controller has not counted yet (their status
        comes back as a watch event, which brings the Tenant back)."""
        return [
            f"{ns}/{quota_name}"
            for ns in namespaces
            for quota_name in (builders.QUOTA_NAME, builders.AGENT_QUOTA_NAME)
            if (quota := self.cache.get("ResourceQuota", ns, quota_name)) is not None
            and not policy.quota_counted(quota)
        ]

    async def _prune(self, tenant: str, ns: str, spec: tenant_api.TenantSpec) -> None:
        """Objects we made that the spec no longer asks for (quota, agent budget or admins
        removed). Our ResourceQuotas are watched: one the store has not seen yet comes
        back as an event, which brings the Tenant back."""
        for quota_name, wanted in (
            (builders.QUOTA_NAME, builders.resource_quota(tenant, ns, spec.quota)),
            (builders.AGENT_QUOTA_NAME, builders.agent_quota(tenant, ns, spec.limits)),
        ):
            if wanted is None and self.cache.get("ResourceQuota", ns, quota_name):
                await self.api.delete("ResourceQuota", ns, quota_name)
                self.cache.remove("ResourceQuota", ns, quota_name)
        if builders.role_binding(tenant, ns, spec.admins) is None and self.cache.get(
            "RoleBinding", ns, builders.ADMINS_BINDING_NAME
        ):
            await self.api.delete("RoleBinding", ns, builders.ADMINS_BINDING_NAME)
            self.cache.remove("RoleBinding", ns, builders.ADMINS_BINDING_NAME)

    async def _claim(self, tenant: str, ns: str) -> policy.Refusal | None:
        """Make `ns` the tenant's if it may be (`policy.claim`); why not, otherwise.

        Both ways of claiming are single conditional writes, so two Tenants racing for
        one namespace cannot both win: a create fails with 409 AlreadyExists if the
        name was taken meanwhile, an adoption patch with 409 Conflict if the namespace
        changed since it was read.
        """
        live = await common.observe(self.api, self.cache, "Namespace", None, ns)
        decided = policy.claim(
            tenant, ns, _namespace_view(live), operator_namespace=self.operator_namespace
        )
        if decided.action == policy.CREATE:
            try:
                created = await self.api.create(builders.namespace(tenant, ns, created=True))
            except errors.ApiError as exc:
                if exc.status != 409:
                    raise
                # Someone else created it first: judge what is there now.
                live = await self.api.get("Namespace", None, ns)
                decided = policy.claim(
                    tenant, ns, _namespace_view(live), operator_namespace=self.operator_namespace
                )
                if decided.action != policy.HOLD and decided.refusal is None:
                    raise  # it changed again (deleted, marked for adoption): retry the pass
            else:
                self.cache.put(created)
        elif decided.action == policy.ADOPT:
            assert live is not None
            patch = builders.adoption_patch(tenant, live["metadata"]["resourceVersion"])
            self.cache.put(await self.api.merge_patch("Namespace", None, ns, patch))
        return decided.refusal

    async def _drop_namespace(self, tenant: str, ns: str, deletion_policy: str) -> None:
        live = self.cache.get("Namespace", None, ns) or {}
        created_for = (live.get("metadata", {}).get("annotations") or {}).get(
            meta.CREATED_FOR_TENANT_ANNOTATION
        )
        if deletion_policy == "Delete" and policy.delete_on_release(
            tenant, ns, created_for, operator_namespace=self.operator_namespace
        ):
            await self.api.delete("Namespace", None, ns)
        else:
            # Retain: the namespace and its content stay; only our claim on it goes.
            await self.api.merge_patch(
                "Namespace", None, ns, {"metadata": {"labels": {meta.TENANT_LABEL: None}}}
            )
            await self.api.delete("RoleBinding", ns, builders.ADMINS_BINDING_NAME)
        self.cache.remove("Namespace", None, ns)

    def _usage(self, tenant: str) -> dict[str, Any]:
        used = tenancy.agent_usage(self.cache, tenant)
        shown: dict[str, Any] = {
            "agents": used.agents,
            "replicas": used.replicas,
            "tokensThisPeriod": 0,
        }
        ledger = self.usage.usage_of_tenant(tenant) if self.usage is not None else None
        if ledger is not None:
            shown.update(usage_policy.status_usage(ledger))
            shown["tokensThisPeriod"] = ledger.this_period.tokens
        elif self.usage is not None:
            # Not read yet (a takeover): keep what the status shows of the ledger.
            current = ((self.cache.get(KIND, None, tenant) or {}).get("status") or {}).get("usage")
            for field in (
                "tokensThisPeriod",
                "periodStart",
                "thisPeriod",
                "lastPeriod",
                "warnedForPeriod",
            ):
                if current and field in current:
                    shown[field] = current[field]
        return shown

    # -- billing --------------------------------------------------------------------
    async def _stripe_account(self, spec: tenant_api.TenantSpec) -> billing.StripeAccount:
        """The Stripe account of the billing Integration; `BillingSetupError` when unusable."""
        assert spec.billing is not None
        ns = spec.billing.integration_namespace or self.operator_namespace
        name = spec.billing.integration
        obj = self.cache.get("Integration", ns, name) or await self.api.get("Integration", ns, name)
        if obj is None:
            raise BillingSetupError(policy.billing_integration_not_found(ns, name))
        try:
            integ = integration_api.IntegrationSpec.model_validate(obj.get("spec") or {})
        except pydantic.ValidationError as exc:
            detail = common.describe_validation_error(exc)
            raise BillingSetupError(policy.billing_integration_invalid(ns, name, detail)) from None
        if integ.type != "stripe" or integ.secret_ref is None:
            raise BillingSetupError(policy.billing_integration_wrong_type(ns, name, integ.type))
        secret = await self.api.get("Secret", ns, integ.secret_ref.name)
        if secret is None:
            raise BillingSetupError(
                policy.billing_secret_not_found(ns, name, integ.secret_ref.name)
            )
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        keys = integ.secret_ref.keys.model_dump(exclude_none=True) if integ.secret_ref.keys else {}
        creds = ibase.Credentials(integ.secret_ref.name, data, keys)
        try:
            api_key = creds.require("api_key")
        except ibase.CheckError as exc:
            raise BillingSetupError(policy.billing_failed(str(exc.reason), exc.message)) from None
        api_base = integ.stripe.api_base if integ.stripe else None
        return billing.StripeAccount(api_key=api_key, api_base=str(api_base) if api_base else None)

    async def _billing(
        self, body: Mapping[str, Any], spec: tenant_api.TenantSpec, current: Any
    ) -> tuple[dict[str, Any] | None, Cond, billing.StripeAccount | None]:
        """The billing status, BillingReady, and the Stripe account once it is in place."""
        if spec.billing is None:
            return current, policy.no_billing(), None
        tenant_meta = body["metadata"]
        state = dict(current or {})
        try:
            account = await self._stripe_account(spec)
            if not state.get("customerId"):
                state["customerId"] = await billing.ensure_customer(
                    account,
                    tenant=tenant_meta["name"],
                    tenant_uid=tenant_meta["uid"],
                    email=spec.billing.email,
                    name=spec.display_name or tenant_meta["name"],
                )
                # Keep the id at once: a crash before the subscription must not lose it.
                await self._write_status(body, {"billing": dict(state)})
            if not state.get("subscriptionId"):
                state["subscriptionId"] = await billing.ensure_subscription(
                    account,
                    customer_id=state["customerId"],
                    price_id=spec.billing.price_id,
                    tenant=tenant_meta["name"],
                    tenant_uid=tenant_meta["uid"],
                )
        except BillingSetupError as problem:
            return state or None, problem.condition, None
        except billing.BillingError as exc:
            return state or None, policy.billing_failed(str(exc.reason), exc.message), None
        return state, policy.subscribed(state["customerId"], spec.billing.price_id), account

    # -- deletion -------------------------------------------------------------------
    async def _finalize(self, body: Mapping[str, Any], spec: tenant_api.TenantSpec) -> None:
        if FINALIZER not in _finalizers(body):
            return
        tenant = body["metadata"]["name"]
        previous = (body.get("status") or {}).get("conditions") or []
        problems: list[str] = []
        # Only namespaces that carry this tenant's label: one listed in the spec but
        # claimed by another tenant (a conflict) is never touched.
        for ns in tenancy.tenant_namespaces(self.cache, tenant):
            try:
                await self._drop_namespace(tenant, ns, spec.deletion_policy)
            except errors.ApiError as exc:
                if not exc.not_found:
                    problems.append(f"namespace {ns}: {exc.message}")
        if spec.deletion_policy == "Delete":
            sub = ((body.get("status") or {}).get("billing") or {}).get("subscriptionId")
            if sub and spec.billing is not None:
                try:
                    account = await self._stripe_account(spec)
                    await billing.cancel_subscription(account, sub)
                except BillingSetupError as problem:
                    problems.append(f"subscription {sub}: {problem.condition.message}")
                except billing.BillingError as exc:
                    problems.append(f"subscription {sub}: {exc.message}")
                else:
                    # Remember it is cancelled, so a retried pass does not cancel again.
                    current = dict((body.get("status") or {}).get("billing") or {})
                    current["subscriptionId"] = None
                    body = await self.api.patch_status(KIND, None, tenant, {"billing": current})
                    self.cache.put(body)
        outcome = policy.deletion_outcome(
            problems,
            overdue=policy.overdue(body["metadata"]["deletionTimestamp"], dt.datetime.now(dt.UTC)),
        )
        if outcome.condition is not None:
            await self._write_status(
                body,
                {
                    "conditions": conditions.merge(
                        previous, [outcome.condition], generation=body["metadata"].get("generation")
                    )
                },
            )
        if outcome.event is not None:
            await common.post_event(self.api, body, outcome.event)
        if outcome.retry_after is not None:
            raise errors.Requeue(outcome.retry_after, "tenant deletion failed")
        await self._release(body)

    async def _release(self, body: Mapping[str, Any]) -> None:
        """Take our finalizer off: the API server then deletes the Tenant."""
        await self._set_finalizers(body, [f for f in _finalizers(body) if f != FINALIZER])

    async def _set_finalizers(
        self, body: Mapping[str, Any], finalizers: list[str]
    ) -> dict[str, Any] | None:
        """The Tenant with `finalizers`; None when it is already gone (deleted meanwhile).

        The patch carries the resourceVersion we read: a concurrent change to the
        finalizers makes it fail with 409 (and the pass is retried) instead of losing one.
        """
        name = body["metadata"]["name"]
        patch = {
            "metadata": {
                "finalizers": finalizers,
                "resourceVersion": body["metadata"].get("resourceVersion"),
            }
        }
        try:
            updated = await self.api.merge_patch(KIND, None, name, patch)
        except errors.ApiError as exc:
            if exc.not_found:
                self.cache.remove(KIND, None, name)
                return None
            raise
        self.cache.put(updated)
        return updated

    # -- writes ---------------------------------------------------------------------
    async def _write_status(self, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        await common.write_status(self.api, self.cache, KIND, body, status)


def _finalizers(body: Mapping[str, Any]) -> list[str]:
    return list(body["metadata"].get("finalizers") or [])


def _namespace_view(live: Mapping[str, Any] | None) -> policy.NamespaceView:
    if live is None:
        return policy.NamespaceView(exists=False)
    labels = live.get("metadata", {}).get("labels") or {}
    notes = live.get("metadata", {}).get("annotations") or {}
    return policy.NamespaceView(
        exists=True,
        tenant=labels.get(meta.TENANT_LABEL),
        adopt_by=labels.get(tenant_api.ADOPT_LABEL),
        created_for=notes.get(meta.CREATED_FOR_TENANT_ANNOTATION),
    )


def _tenant_or_adopter(event: watching.WatchEvent) -> list[watching.Request]:
    names = {event.labels.get(meta.TENANT_LABEL), event.labels.get(tenant_api.ADOPT_LABEL)}
    return [watching.Request(("", tenant)) for tenant in sorted(n for n in names if n)]


def _tenant_label(event: watching.WatchEvent) -> list[watching.Request]:
    tenant = event.labels.get(meta.TENANT_LABEL)
    return [watching.Request(("", tenant))] if tenant else []


def _report_target(
    spec: tenant_api.TenantSpec,
    billing_status: Mapping[str, Any] | None,
    account: billing.StripeAccount | None,
) -> usage_reporter.Target | None:
    """Where the ledger reports the tenant's usage; None: not yet (billing not in place)."""
    if spec.billing is None:
        return usage_reporter.Target(customer_id=None)
    customer = (billing_status or {}).get("customerId")
    if account is None or not customer:
        return None
    return usage_reporter.Target(customer_id=str(customer), account=account)
