"""The operator's only door to the API server: server-side apply, status patches,
reads and events, for any kind, through `kubernetes_asyncio`'s ApiClient.

Everything is addressed by apiVersion/kind through a small table, so builders can
return plain manifests and this module needs no per-kind code. Every write is counted
in the operator's metrics by verb and kind.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any, NamedTuple
from urllib.parse import urlencode

import aiohttp
from kubernetes_asyncio import client as k8s_client
from kubernetes_asyncio import config as k8s_config

from bmad_operator import errors, metrics

FIELD_MANAGER = "bmad-operator"
# A resourceVersion no stored object has: etcd's revisions start at 1 with nothing
# stored, so the first object written has 2 or more (see `Kube.apply_new`).
ABSENT_VERSION = "1"

Obj = dict[str, Any]

# A request's whole time: connecting, sending, and reading the answer.
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=30)


def _jsonable(value: object) -> str:
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    raise TypeError(f"{type(value).__name__} is not JSON: a manifest holds JSON values only")


def _dumps(body: Any) -> bytes:
    return json.dumps(body, separators=(",", ":"), default=_jsonable).encode()


class ResourceInfo(NamedTuple):
    api_version: str
    plural: str
    namespaced: bool


RESOURCES: dict[str, ResourceInfo] = {
    "ServiceAccount": ResourceInfo("v1", "serviceaccounts", True),
    "ConfigMap": ResourceInfo("v1", "configmaps", True),
    "Secret": ResourceInfo("v1", "secrets", True),
    "Service": ResourceInfo("v1", "services", True),
    "Event": ResourceInfo("v1", "events", True),
    "Namespace": ResourceInfo("v1", "namespaces", False),
    "Deployment": ResourceInfo("apps/v1", "deployments", True),
    "PodDisruptionBudget": ResourceInfo("policy/v1", "poddisruptionbudgets", True),
    "ResourceQuota": ResourceInfo("v1", "resourcequotas", True),
    "LimitRange": ResourceInfo("v1", "limitranges", True),
    "NetworkPolicy": ResourceInfo("networking.k8s.io/v1", "networkpolicies", True),
    "RoleBinding": ResourceInfo("rbac.authorization.k8s.io/v1", "rolebindings", True),
    "ValidatingWebhookConfiguration": ResourceInfo(
        "admissionregistration.k8s.io/v1", "validatingwebhookconfigurations", False
    ),
    "Agent": ResourceInfo("bmad.dev/v1alpha1", "agents", True),
    "Integration": ResourceInfo("bmad.dev/v1alpha1", "integrations", True),
    "Workflow": ResourceInfo("bmad.dev/v1alpha1", "workflows", True),
    "Tenant": ResourceInfo("bmad.dev/v1alpha1", "tenants", False),
    "ServiceMonitor": ResourceInfo("monitoring.coreos.com/v1", "servicemonitors", True),
    "HorizontalPodAutoscaler": ResourceInfo("autoscaling/v2", "horizontalpodautoscalers", True),
    "ScaledObject": ResourceInfo("keda.sh/v1alpha1", "scaledobjects", True),
}


def _group_path(info: ResourceInfo) -> str:
    return "/api/v1" if info.api_version == "v1" else f"/apis/{info.api_version}"


def path_across_namespaces(kind: str) -> str:
    """The collection of `kind` in every namespace (or of a cluster-scoped kind)."""
    info = RESOURCES[kind]
    return f"{_group_path(info)}/{info.plural}"


def path_for(kind: str, namespace: str | None, name: str | None = None) -> str:
    info = RESOURCES[kind]
    base = _group_path(info)
    if info.namespaced:
        if not namespace:
            raise ValueError(f"{kind} is namespaced: a namespace is required")
        base += f"/namespaces/{namespace}"
    base += f"/{info.plural}"
    if name:
        base += f"/{name}"
    return base


class Kube:
    """A connection to one cluster."""

    def __init__(self, api: k8s_client.ApiClient) -> None:
        self.api = api
        self._host = str(api.configuration.host).rstrip("/")

    @classmethod
    async def connect(cls) -> Kube:
        try:
            k8s_config.load_incluster_config()  # type: ignore[no-untyped-call]
        except k8s_config.ConfigException:
            await k8s_config.load_kube_config()
        cfg = k8s_client.Configuration.get_default_copy()
        # Hundreds of agents reconcile at once: do not serialise on a small pool.
        cfg.connection_pool_maxsize = 64
        api = k8s_client.ApiClient(configuration=cfg)
        # The client's aiohttp session trusts the environment, which makes aiohttp
        # read ~/.netrc and the proxy variables in a worker thread on *every* request;
        # the API server is reached directly (proxies are not used for it).
        session = getattr(api.rest_client, "pool_manager", None)
        if session is not None and hasattr(session, "_trust_env"):
            session._trust_env = False
        return cls(api)

    async def close(self) -> None:
        await self.api.close()

    async def send(
        self,
        method: str,
        path: str,
        *,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
        data: bytes | None = None,
        limits: aiohttp.ClientTimeout = REQUEST_TIMEOUT,
    ) -> aiohttp.ClientResponse:
        """One HTTP request on the client's own session (its TLS and credentials), the
        response unread: `_call` reads it whole, a watch reads it line by line.

        The body goes as bytes we serialised. ApiClient.call_api would walk every body
        with sanitize_for_serialization (a Python call per field, for plain dicts that are
        JSON already) and then serialise it anyway."""
        headers = {"Content-Type": content_type, "Accept": "application/json"}
        params = list(query or ())
        await self.api.update_params_for_auth(headers, params, ["BearerToken"])
        url = self._host + path
        if params:
            url += "?" + urlencode(params)
        rest = self.api.rest_client
        extra: dict[str, Any] = {}
        if rest.server_hostname:
            extra["server_hostname"] = rest.server_hostname
        if rest.proxy:
            extra["proxy"] = rest.proxy
            if rest.proxy_headers:
                extra["proxy_headers"] = rest.proxy_headers
        session: aiohttp.ClientSession = rest.pool_manager
        return await session.request(
            method, url, data=data, headers=headers, timeout=limits, **extra
        )

    async def _call(
        self,
        method: str,
        path: str,
        *,
        kind: str,
        body: Any = None,
        query: list[tuple[str, str]] | None = None,
        content_type: str = "application/json",
    ) -> Obj:
        if method != "GET":
            metrics.API_WRITES.labels(verb=method, kind=kind).inc()
        payload = None if body is None else _dumps(body)
        try:
            resp = await self.send(
                method, path, query=query, content_type=content_type, data=payload
            )
            async with resp:
                raw = await resp.read()
                status = resp.status
        except (OSError, aiohttp.ClientError) as exc:
            raise errors.ApiError(0, "Unreachable", str(exc) or type(exc).__name__) from None
        if status >= 400:
            raise status_error(status, raw)
        return json.loads(raw) if raw else {}

    async def get_path(self, path: str, *, kind: str, query: list[tuple[str, str]]) -> Obj:
        """GET any path (a list across namespaces, a page of one): the decoded answer."""
        return await self._call("GET", path, kind=kind, query=query)

    async def get(self, kind: str, namespace: str | None, name: str) -> Obj | None:
        try:
            return await self._call("GET", path_for(kind, namespace, name), kind=kind)
        except errors.ApiError as exc:
            if exc.not_found:
                return None
            raise

    async def list(self, kind: str, namespace: str | None = None, selector: str = "") -> list[Obj]:
        query = [("labelSelector", selector)] if selector else []
        data = await self._call("GET", path_for(kind, namespace), kind=kind, query=query)
        items: list[Obj] = data.get("items", [])
        return items

    async def apply(self, obj: Obj) -> Obj:
        """Server-side apply with our single field manager (forcing over conflicts)."""
        kind = obj["kind"]
        meta = obj["metadata"]
        return await self._call(
            "PATCH",
            path_for(kind, meta.get("namespace"), meta["name"]),
            kind=kind,
            body=obj,
            query=[("fieldManager", FIELD_MANAGER), ("force", "true")],
            content_type="application/apply-patch+yaml",
        )

    async def apply_new(self, obj: Obj) -> Obj:
        """Server-side apply `obj` only if no object of its name exists: 409 Conflict
        (and nothing changed) otherwise, whoever made it.

        The applied object names a resourceVersion that no stored object has
        (`ABSENT_VERSION`): an apply takes a resourceVersion in the object as a
        precondition on the stored one, and when nothing is stored it creates the object
        (tests/integration/operator/test_kube_apply_new.py shows both on the test bed's
        API server). The result is owned as any apply's is, unlike a POST's, whose
        fields a later apply could not remove.
        """
        body = {**obj, "metadata": {**obj["metadata"], "resourceVersion": ABSENT_VERSION}}
        return await self.apply(body)

    async def create(self, obj: Obj) -> Obj:
        """Create `obj`; 409 AlreadyExists when its name is taken. Unlike an apply, it
        never changes an object that exists: a claim that only one caller can win."""
        kind = obj["kind"]
        return await self._call(
            "POST",
            path_for(kind, obj["metadata"].get("namespace")),
            kind=kind,
            body=obj,
            query=[("fieldManager", FIELD_MANAGER)],
        )

    async def patch_status(
        self,
        kind: str,
        namespace: str | None,
        name: str,
        status: Obj,
        *,
        resource_version: str | None = None,
    ) -> Obj:
        """Merge-patch the status; with `resource_version`, only if the object is unchanged
        since then (409 Conflict otherwise): for writers that share a status."""
        body: Obj = {"status": status}
        if resource_version is not None:
            body["metadata"] = {"resourceVersion": resource_version}
        return await self._call(
            "PATCH",
            path_for(kind, namespace, name) + "/status",
            kind=kind,
            body=body,
            content_type="application/merge-patch+json",
        )

    async def merge_patch(self, kind: str, namespace: str | None, name: str, patch: Obj) -> Obj:
        return await self._call(
            "PATCH",
            path_for(kind, namespace, name),
            kind=kind,
            body=patch,
            content_type="application/merge-patch+json",
        )

    async def patch_scale(self, kind: str, namespace: str | None, name: str, replicas: int) -> Obj:
        """Set the replica count through the scale subresource, as HPA and kubectl scale do."""
        return await self._call(
            "PATCH",
            path_for(kind, namespace, name) + "/scale",
            kind=kind,
            body={"spec": {"replicas": replicas}},
            content_type="application/merge-patch+json",
        )

    async def delete(self, kind: str, namespace: str | None, name: str) -> bool:
        try:
            await self._call(
                "DELETE",
                path_for(kind, namespace, name),
                kind=kind,
                body={"propagationPolicy": "Background"},
            )
        except errors.ApiError as exc:
            if exc.not_found:
                return False
            raise
        return True

    async def event(self, involved: Obj, *, type_: str, reason: str, message: str) -> None:
        """Post a core/v1 Event on `involved` (shown by `kubectl describe`)."""
        meta = involved["metadata"]
        namespace = meta.get("namespace") or "default"
        now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": f"{meta['name']}.", "namespace": namespace},
            "involvedObject": {
                "apiVersion": involved.get("apiVersion"),
                "kind": involved.get("kind"),
                "name": meta["name"],
                "namespace": meta.get("namespace"),
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": FIELD_MANAGER},
            "reportingComponent": FIELD_MANAGER,
            "reportingInstance": FIELD_MANAGER,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call("POST", path_for("Event", namespace), kind="Event", body=event)


def status_error(status: int, raw: bytes) -> errors.ApiError:
    """The error an answer of `status` >= 400 stands for, from its Status body."""
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        # An API group the server does not serve answers "404 page not found" as
        # text, not as a Status object (KEDA's CRD not installed, for example).
        data = {"reason": "NotFound" if status == 404 else "Error"}
    if not isinstance(data, dict):
        data = {}
    return errors.ApiError(
        status,
        str(data.get("reason") or "Error"),
        str(data.get("message") or raw[:200].decode(errors="replace").strip()),
    )
