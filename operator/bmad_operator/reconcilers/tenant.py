"""The Tenant reconciler: namespaces, their fences, budgets and the billing account.

One pass: make sure the finalizer is on; create and label every namespace of the
spec and apply its ResourceQuota, LimitRange, NetworkPolicies and admin RoleBinding;
release or delete namespaces that left the spec (per `deletionPolicy`); make sure the
Stripe customer and subscription exist (exactly once: ids in status, idempotency keys
from the uid); count usage; write status once.

Deletion runs through our finalizer and never blocks forever: errors become a
condition and an event, and after `FINALIZE_DEADLINE` the finalizer is released anyway.
"""

from __future__ import annotations

import base64
import datetime as dt
import logging
import typing
from collections.abc import Hashable, Mapping
from typing import Any

import pydantic

from bmad_crds.v1alpha1 import integration as integration_api
from bmad_crds.v1alpha1 import tenant as tenant_api
from bmad_integrations import base as ibase
from bmad_integrations import billing
from bmad_operator import conditions, errors, kube, store, tenancy
from bmad_operator.builders import meta
from bmad_operator.builders import tenant as builders
from bmad_operator.conditions import FALSE, TRUE, Cond
from bmad_operator.reconcilers import common

log = logging.getLogger(__name__)

KIND = "Tenant"
# Not kopf's own finalizer name: kopf removes that one from objects it has no
# deletion handlers for.
FINALIZER = "bmad.dev/tenant-cleanup"
FINALIZE_DEADLINE = dt.timedelta(minutes=10)


class TenantReconciler:
    def __init__(self, *, api: kube.Kube, cache: store.Store, operator_namespace: str) -> None:
        self.api = api
        self.cache = cache
        self.operator_namespace = operator_namespace

    async def reconcile(self, key: Hashable) -> None:
        _, name = typing.cast(tuple[str, str], key)
        await common.measured(KIND, name, self._reconcile(name))

    # -- the pass -------------------------------------------------------------------
    async def _reconcile(self, name: str) -> None:
        body = self.cache.get(KIND, None, name)
        if body is None:
            return
        meta = body["metadata"]
        generation = meta.get("generation")
        status = body.get("status") or {}
        previous = status.get("conditions") or []
        try:
            spec = tenant_api.TenantSpec.model_validate(body.get("spec") or {})
        except pydantic.ValidationError as exc:
            msg = common.describe_validation_error(exc)
            if meta.get("deletionTimestamp") and FINALIZER in (meta.get("finalizers") or []):
                # Nothing can be applied from an invalid spec: release, never hang.
                await self._event(
                    body,
                    "Warning",
                    "DeletionAbandoned",
                    f"The spec is invalid, the deletion policy was not applied: {msg}",
                )
                await self._patch_finalizers(
                    KIND,
                    None,
                    name,
                    {
                        "metadata": {
                            "finalizers": [
                                f for f in meta.get("finalizers") or [] if f != FINALIZER
                            ],
                            "resourceVersion": meta.get("resourceVersion"),
                        }
                    },
                )
                return
            ready = Cond("Ready", FALSE, "InvalidSpec", f"The spec is invalid: {msg}")
            await self._write_status(
                body,
                {
                    "observedGeneration": generation,
                    "conditions": conditions.merge(previous, [ready], generation=generation),
                },
            )
            return
        if meta.get("deletionTimestamp"):
            await self._finalize(body, spec)
            return
        if FINALIZER not in (meta.get("finalizers") or []):
            updated = await self._patch_finalizers(
                KIND,
                None,
                name,
                {
                    "metadata": {
                        "finalizers": [*(meta.get("finalizers") or []), FINALIZER],
                        "resourceVersion": meta.get("resourceVersion"),
                    }
                },
            )
            if updated is None:
                return
            self.cache.put(updated)
            body = updated

        conflicts: list[str] = []
        for ns in spec.namespaces:
            owner = self._namespace_owner(ns)
            if owner not in (None, name):
                conflicts.append(f"{ns} (tenant {owner})")
                continue
            await common.ensure(self.api, self.cache, builders.namespace(name, ns))
            for obj in builders.namespace_objects(
                name, ns, spec, operator_namespace=self.operator_namespace
            ):
                await common.ensure(self.api, self.cache, obj)
            await self._prune(name, ns, spec)
        released = await self._release_removed(name, spec)

        quota_cond = (
            Cond(
                "QuotaReady",
                TRUE,
                "QuotaApplied",
                f"ResourceQuota bmad-tenant-quota applied in {len(spec.namespaces)} namespaces.",
            )
            if builders.resource_quota(name, "x", spec.quota) is not None
            else Cond("QuotaReady", TRUE, "NoQuota", "spec.quota is empty: no ResourceQuota.")
        )
        billing_status, billing_cond = await self._billing(body, spec, status.get("billing"))
        usage = self._usage(name)
        decided_ready: Cond
        if conflicts:
            decided_ready = Cond(
                "Ready",
                FALSE,
                "NamespaceConflict",
                f"Namespace {', '.join(conflicts)} belongs to another tenant: remove it from "
                "spec.namespaces or from the other tenant.",
            )
        elif spec.suspended:
            decided_ready = Cond(
                "Ready",
                FALSE,
                "Suspended",
                "spec.suspended is true: the tenant's agents are scaled to zero.",
            )
        elif billing_cond.status != TRUE:
            decided_ready = Cond("Ready", FALSE, billing_cond.reason, billing_cond.message)
        else:
            decided_ready = Cond(
                "Ready",
                TRUE,
                "TenantReady",
                f"{len(spec.namespaces)} namespaces ready; {usage['agents']} agents.",
            )
        suspended = Cond(
            "Suspended",
            TRUE if spec.suspended else FALSE,
            "SuspendedBySpec" if spec.suspended else "Active",
            "Agents are scaled to zero." if spec.suspended else "Agents run as specified.",
        )
        new_status: dict[str, Any] = {
            "observedGeneration": generation,
            "namespaces": list(spec.namespaces),
            "usage": usage,
            "conditions": conditions.merge(
                previous,
                [decided_ready, quota_cond, billing_cond, suspended],
                generation=generation,
            ),
        }
        if billing_status:
            new_status["billing"] = billing_status
        await self._write_status(body, new_status)
        await self._events(body, previous, [decided_ready, billing_cond], released)

    def _namespace_owner(self, ns: str) -> str | None:
        obj = self.cache.get("Namespace", None, ns)
        if obj is None:
            return None
        return (obj["metadata"].get("labels") or {}).get(meta.TENANT_LABEL)

    async def _prune(self, tenant: str, ns: str, spec: tenant_api.TenantSpec) -> None:
        """Objects we made that the spec no longer asks for (quota or admins removed)."""
        if builders.resource_quota(tenant, ns, spec.quota) is None and (
            self.cache.get("ResourceQuota", ns, "bmad-tenant-quota")
            or await self.api.get("ResourceQuota", ns, "bmad-tenant-quota")
        ):
            await self.api.delete("ResourceQuota", ns, "bmad-tenant-quota")
            self.cache.remove("ResourceQuota", ns, "bmad-tenant-quota")
        if builders.role_binding(tenant, ns, spec.admins) is None and self.cache.get(
            "RoleBinding", ns, "bmad-tenant-admins"
        ):
            await self.api.delete("RoleBinding", ns, "bmad-tenant-admins")
            self.cache.remove("RoleBinding", ns, "bmad-tenant-admins")

    async def _release_removed(self, tenant: str, spec: tenant_api.TenantSpec) -> list[str]:
        """Namespaces labelled for this tenant but gone from its spec."""
        done = []
        for ns in tenancy.tenant_namespaces(self.cache, tenant):
            if ns in spec.namespaces:
                continue
            await self._drop_namespace(tenant, ns, spec.deletion_policy)
            done.append(ns)
        return done

    async def _drop_namespace(self, tenant: str, ns: str, policy: str) -> None:
        if policy == "Delete":
            await self.api.delete("Namespace", None, ns)
        else:
            # Retain: the namespace and its content stay; only our claim on it goes.
            await self.api.merge_patch(
                "Namespace", None, ns, {"metadata": {"labels": {meta.TENANT_LABEL: None}}}
            )
            for kind, obj_name in (("RoleBinding", "bmad-tenant-admins"),):
                await self.api.delete(kind, ns, obj_name)
        self.cache.remove("Namespace", None, ns)

    def _usage(self, tenant: str) -> dict[str, Any]:
        used = tenancy.agent_usage(self.cache, tenant)
        return {"agents": used.agents, "replicas": used.replicas, "tokensThisPeriod": 0}

    # -- billing --------------------------------------------------------------------
    async def _stripe_account(self, spec: tenant_api.TenantSpec) -> billing.StripeAccount:
        assert spec.billing is not None
        ns = spec.billing.integration_namespace or self.operator_namespace
        name = spec.billing.integration
        obj = self.cache.get("Integration", ns, name) or await self.api.get("Integration", ns, name)
        if obj is None:
            raise billing.BillingError(
                "IntegrationNotFound",
                f"stripe Integration {name} not found in namespace {ns}: create it, or fix "
                "spec.billing.integration / spec.billing.integrationNamespace.",
            )
        integ = integration_api.IntegrationSpec.model_validate(obj.get("spec") or {})
        if integ.type != "stripe" or integ.secret_ref is None:
            raise billing.BillingError(
                "InvalidConfiguration",
                f"Integration {ns}/{name} is of type {integ.type}: billing needs a stripe one.",
            )
        secret = await self.api.get("Secret", ns, integ.secret_ref.name)
        if secret is None:
            raise billing.BillingError(
                ibase.Reason.SECRET_NOT_FOUND,
                f"Secret {integ.secret_ref.name} of Integration {ns}/{name} does not exist.",
            )
        data = {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}
        keys = integ.secret_ref.keys.model_dump(exclude_none=True) if integ.secret_ref.keys else {}
        creds = ibase.Credentials(integ.secret_ref.name, data, keys)
        try:
            api_key = creds.require("api_key")
        except ibase.CheckError as exc:
            raise billing.BillingError(exc.reason, exc.message) from None
        api_base = integ.stripe.api_base if integ.stripe else None
        return billing.StripeAccount(api_key=api_key, api_base=str(api_base) if api_base else None)

    async def _billing(
        self, body: Mapping[str, Any], spec: tenant_api.TenantSpec, current: Any
    ) -> tuple[dict[str, Any] | None, Cond]:
        if spec.billing is None:
            return current, Cond("BillingReady", TRUE, "NoBilling", "spec.billing is not set.")
        meta = body["metadata"]
        state = dict(current or {})
        try:
            account = await self._stripe_account(spec)
            if not state.get("customerId"):
                state["customerId"] = await billing.ensure_customer(
                    account,
                    tenant=meta["name"],
                    tenant_uid=meta["uid"],
                    email=spec.billing.email,
                    name=spec.display_name or meta["name"],
                )
                # Keep the id at once: a crash before the subscription must not lose it.
                await self._write_status(body, {"billing": dict(state)})
            if not state.get("subscriptionId"):
                state["subscriptionId"] = await billing.ensure_subscription(
                    account,
                    customer_id=state["customerId"],
                    price_id=spec.billing.price_id,
                    tenant=meta["name"],
                    tenant_uid=meta["uid"],
                )
        except billing.BillingError as exc:
            return state or None, Cond("BillingReady", FALSE, str(exc.reason), exc.message)
        return state, Cond(
            "BillingReady",
            TRUE,
            "Subscribed",
            f"Stripe customer {state['customerId']} subscribed to {spec.billing.price_id}.",
        )

    # -- deletion -------------------------------------------------------------------
    async def _finalize(self, body: Mapping[str, Any], spec: tenant_api.TenantSpec) -> None:
        meta = body["metadata"]
        if FINALIZER not in (meta.get("finalizers") or []):
            return
        previous = (body.get("status") or {}).get("conditions") or []
        problems: list[str] = []
        # Only namespaces that carry this tenant's label: one listed in the spec but
        # claimed by another tenant (a conflict) is never touched.
        for ns in tenancy.tenant_namespaces(self.cache, meta["name"]):
            try:
                await self._drop_namespace(meta["name"], ns, spec.deletion_policy)
            except errors.ApiError as exc:
                if not exc.not_found:
                    problems.append(f"namespace {ns}: {exc.message}")
        if spec.deletion_policy == "Delete":
            sub = ((body.get("status") or {}).get("billing") or {}).get("subscriptionId")
            if sub and spec.billing is not None:
                try:
                    account = await self._stripe_account(spec)
                    await billing.cancel_subscription(account, sub)
                except billing.BillingError as exc:
                    problems.append(f"subscription {sub}: {exc.message}")
                else:
                    # Remember it is cancelled, so a retried pass does not cancel again.
                    current = dict((body.get("status") or {}).get("billing") or {})
                    current["subscriptionId"] = None
                    updated = await self.api.patch_status(
                        KIND, None, meta["name"], {"billing": current}
                    )
                    self.cache.put(updated)
                    body, meta = updated, updated["metadata"]
        started = _parse_time(meta["deletionTimestamp"])
        overdue = dt.datetime.now(dt.UTC) - started > FINALIZE_DEADLINE
        if problems and not overdue:
            cond = Cond(
                "Ready",
                FALSE,
                "DeletionFailed",
                "Deleting the tenant failed, retrying: " + "; ".join(problems),
            )
            await self._write_status(
                body,
                {
                    "conditions": conditions.merge(
                        previous, [cond], generation=meta.get("generation")
                    )
                },
            )
            await self._event(body, "Warning", "DeletionFailed", cond.message)
            raise errors.Requeue(15.0, "tenant deletion failed")
        if problems:
            await self._event(
                body,
                "Warning",
                "DeletionAbandoned",
                "Gave up after 10 minutes and released the tenant: " + "; ".join(problems),
            )
        finalizers = [f for f in meta.get("finalizers") or [] if f != FINALIZER]
        await self._patch_finalizers(
            KIND,
            None,
            meta["name"],
            {
                "metadata": {
                    "finalizers": finalizers,
                    "resourceVersion": meta.get("resourceVersion"),
                }
            },
        )

    async def _patch_finalizers(
        self, kind: str, namespace: str | None, name: str, patch: dict[str, Any]
    ) -> dict[str, Any] | None:
        """Patch finalizers; None when the object is already gone (deleted meanwhile)."""
        try:
            return await self.api.merge_patch(kind, namespace, name, patch)
        except errors.ApiError as exc:
            if exc.not_found:
                self.cache.remove(kind, namespace, name)
                return None
            raise

    # -- writes ---------------------------------------------------------------------
    async def _write_status(self, body: Mapping[str, Any], status: dict[str, Any]) -> None:
        await common.write_status(self.api, self.cache, KIND, body, status)

    async def _events(
        self,
        body: Mapping[str, Any],
        previous: list[Any],
        decided: list[Cond],
        released: list[str],
    ) -> None:
        for cond in decided:
            before = conditions.find(previous, cond.type)
            if before is not None and before.get("status") == cond.status:
                continue
            if cond.status == TRUE:
                await self._event(body, "Normal", cond.reason, cond.message)
            elif before is not None or cond.reason not in ("TenantReady",):
                await self._event(body, "Warning", cond.reason, cond.message)
        if released:
            await self._event(
                body,
                "Normal",
                "NamespacesReleased",
                f"Namespaces left the spec: {', '.join(released)}.",
            )

    async def _event(self, body: Mapping[str, Any], type_: str, reason: str, message: str) -> None:
        await common.post_event(self.api, body, type_, reason, message)


def _parse_time(text: str) -> dt.datetime:
    return dt.datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
