"""What the operator's RBAC grants against what the API server saw it do.

The test bed audits every request of the operator's own identity (Metadata level:
verb, resource, namespace, name, response code, the authorizer's decision). This
module turns that log into the calls the operator made and compares them with the
rules of the roles it is bound to, rule by rule and verb by verb (and name by name
where a rule lists `resourceNames`):

- a call the authorizer refused is a rule missing;
- a granted verb that no call used is a rule too many.

Some permissions are checked by the API server *inside* another request, and those
checks leave no audit event of their own. They are derived from the request that
made them (see `Implied`): a server-side apply that created its object (201) was
also authorised as `create` on that name; a RoleBinding written was also checked for
`bind` on the role it refers to (the RBAC escalation check); an object created with an
owner reference that blocks its owner's deletion was also checked for `update` on the
owner's `finalizers` (the OwnerReferencesPermissionEnforcement admission plugin).
"""

from __future__ import annotations

import re
import urllib.parse
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

WRITES = frozenset({"create", "update", "patch"})


class Call(NamedTuple):
    """One authorisation the operator needed: what RBAC matches a rule against."""

    verb: str
    group: str  # "" for the core group
    resource: str  # with the subresource: "agents/status"
    namespace: str  # "" for cluster-scoped objects and cluster-wide lists
    name: str  # "" for lists, watches and creates without a name

    def describe(self) -> str:
        where = f" in namespace {self.namespace}" if self.namespace else ""
        named = f" named {self.name}" if self.name else ""
        return f"{self.verb} {self.resource} (group {self.group or 'core'}){named}{where}"


class Grant(NamedTuple):
    """One verb of one rule, for one resource (and one name, with resourceNames)."""

    role: str  # "ClusterRole/bmad-operator" or "Role/bmad-system/bmad-operator"
    rule: int  # the rule's index in the role
    verb: str
    group: str
    resource: str
    name: str  # "" when the rule lists no resourceNames
    namespace: str  # "" when bound cluster-wide, else the RoleBinding's namespace

    def matches(self, call: Call) -> bool:
        return (
            self.verb == call.verb
            and self.group == call.group
            and self.resource == call.resource
            and (not self.name or self.name == call.name)
            and (not self.namespace or self.namespace == call.namespace)
        )

    def describe(self) -> str:
        named = f" resourceNames [{self.name}]" if self.name else ""
        where = f" (bound in namespace {self.namespace})" if self.namespace else ""
        return (
            f"{self.role} rule #{self.rule}: verb {self.verb} on {self.resource} "
            f"(group {self.group or 'core'}){named}{where}"
        )


@dataclass(frozen=True)
class Refusal:
    """A request (or a check inside one) that RBAC refused."""

    call: Call | None  # None when the message names no single verb and resource
    uri: str
    message: str

    def describe(self) -> str:
        what = self.call.describe() if self.call else "(see the message)"
        return f"{what}: {self.uri} -> {self.message}"


@dataclass(frozen=True)
class Implied:
    """Checks the API server makes inside a request, which the audit log does not show.

    `binds`: the roles ("ClusterRole/<name>") every RoleBinding the operator writes
    refers to; `finalizers`: (group, resource) of an owned kind -> (group, resource)
    of its owner, for objects created with a blocking owner reference.
    """

    binds: Sequence[str] = ()
    finalizers: Mapping[tuple[str, str], tuple[str, str]] = field(default_factory=dict)


@dataclass
class Report:
    calls: dict[Call, int]  # every call (made or implied) and how often
    examples: dict[Call, str]  # one request URI per call
    refused: list[Refusal]
    uncovered: list[Call]  # made (or implied) but matched by no rule of the roles
    unused: list[Grant]
    used_by: dict[Grant, list[Call]]
    requests: int  # audited requests of the operator

    @property
    def ok(self) -> bool:
        return not self.refused and not self.uncovered and not self.unused

    def failure_message(self, *, roles_file: str) -> str:
        lines = [
            f"The operator's RBAC ({roles_file}) does not match what it calls "
            f"({self.requests} audited requests of this session).",
        ]
        if self.refused:
            lines.append("")
            lines.append("Refused by RBAC, so add a rule for each (or stop making the call):")
            for refusal in self.refused:
                lines.append(f"  - {refusal.describe()}")
                if refusal.call is not None:
                    lines.append(f"      add: {suggest_rule(refusal.call)}")
        if self.uncovered:
            lines.append("")
            lines.append("Made, but no rule of these roles allows it, so add one for each:")
            for call in self.uncovered:
                lines.append(f"  - {call.describe()}: {self.examples.get(call, '')}")
                lines.append(f"      add: {suggest_rule(call)}")
        if self.unused:
            lines.append("")
            lines.append("Granted but never used, so remove each (or add a test that uses it):")
            for grant in self.unused:
                lines.append(f"  - {grant.describe()}")
        return "\n".join(lines)

    def markdown(self, roles: Sequence[Role]) -> str:
        """One table row per rule: what it grants and the calls seen that used it."""
        rows = [
            "| role | rule | API group | resources | names | verbs | calls seen (count) |",
            "|---|---|---|---|---|---|---|",
        ]
        for role in roles:
            for index, rule in enumerate(role.rules):
                grants = [g for g in self.used_by if g.role == role.ref and g.rule == index]
                seen: dict[Call, int] = {}
                for grant in grants:
                    for call in self.used_by[grant]:
                        seen[call] = self.calls.get(call, 0)
                summary = _summarise(seen)
                rows.append(
                    f"| {role.ref} | {index} | {_cell(rule.get('apiGroups'), core=True)} "
                    f"| {_cell(rule.get('resources'))} | {_cell(rule.get('resourceNames'))} "
                    f"| {_cell(rule.get('verbs'))} | {summary} |"
                )
        return "\n".join(rows) + "\n"


@dataclass(frozen=True)
class Role:
    """A Role or ClusterRole and where it is bound for the operator."""

    kind: str  # Role or ClusterRole
    name: str
    namespace: str  # of a Role
    rules: list[dict[str, Any]]
    bound_in: tuple[str, ...]  # "" = cluster-wide (ClusterRoleBinding), else namespaces

    @property
    def ref(self) -> str:
        return (
            f"{self.kind}/{self.namespace}/{self.name}"
            if self.namespace
            else (f"{self.kind}/{self.name}")
        )

    def grants(self) -> list[Grant]:
        out: list[Grant] = []
        for index, rule in enumerate(self.rules):
            names = list(rule.get("resourceNames") or [""])
            for scope in self.bound_in:
                for group in rule.get("apiGroups") or []:
                    for resource in rule.get("resources") or []:
                        for verb in rule.get("verbs") or []:
                            for name in names:
                                out.append(
                                    Grant(self.ref, index, verb, group, resource, name, scope)
                                )
        return out


def roles_for_subject(
    docs: Iterable[Mapping[str, Any]], *, kind: str, name: str, namespace: str | None = None
) -> list[Role]:
    """The roles bound to one subject in a set of manifests, with where each is bound."""
    docs = [d for d in docs if d]
    by_ref = {
        (d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
        for d in docs
        if d.get("kind") in ("Role", "ClusterRole")
    }
    scopes: dict[tuple[str, str, str], list[str]] = defaultdict(list)
    for binding in docs:
        if binding.get("kind") not in ("RoleBinding", "ClusterRoleBinding"):
            continue
        if not any(_is_subject(s, kind, name, namespace) for s in binding.get("subjects") or []):
            continue
        ref = binding["roleRef"]
        bound_ns = binding["metadata"].get("namespace", "")
        scope = "" if binding["kind"] == "ClusterRoleBinding" else bound_ns
        role_ns = bound_ns if ref["kind"] == "Role" else ""
        scopes[(ref["kind"], role_ns, ref["name"])].append(scope)
    roles = []
    for key, bound in sorted(scopes.items()):
        doc = by_ref.get(key)
        if doc is None:
            raise ValueError(f"{key[0]} {key[2]} is bound but not defined in the manifests")
        roles.append(
            Role(key[0], key[2], key[1], list(doc.get("rules") or []), tuple(sorted(set(bound))))
        )
    return roles


def _is_subject(subject: Mapping[str, Any], kind: str, name: str, namespace: str | None) -> bool:
    if subject.get("kind") != kind or subject.get("name") != name:
        return False
    return kind != "ServiceAccount" or subject.get("namespace") == namespace


# -- the audit log -------------------------------------------------------------------


def _call_of(event: Mapping[str, Any]) -> Call | None:
    ref = event.get("objectRef")
    if not ref:
        return None
    resource = str(ref.get("resource") or "")
    if ref.get("subresource"):
        resource += f"/{ref['subresource']}"
    verb = str(event.get("verb") or "")
    name = str(ref.get("name") or "")
    if verb == "create" and not ref.get("subresource"):
        # The log names the object from the request body, but a POST is authorised
        # without a name: a rule with resourceNames never allows it.
        name = ""
    elif verb in ("list", "watch"):
        # Authorised with a name only when it selects one with metadata.name=...
        query = urllib.parse.parse_qs(urllib.parse.urlsplit(str(event.get("requestURI"))).query)
        field = ",".join(query.get("fieldSelector", []))
        picked = re.fullmatch(r"metadata\.name=([^,]+)", field)
        name = picked.group(1) if picked else ""
    return Call(
        verb=verb,
        group=str(ref.get("apiGroup") or ""),
        resource=resource,
        namespace=str(ref.get("namespace") or ""),
        name=name,
    )


# "User "x" cannot create resource "secrets" in API group "" in the namespace "ns""
_CANNOT = re.compile(
    r'cannot (?P<verb>\w+) resource "(?P<resource>[^"]+)" in API group "(?P<group>[^"]*)"'
    r'(?: in the namespace "(?P<namespace>[^"]*)")?'
)
# Refusals inside an allowed request that come from RBAC, not from the object's state.
_RBAC_INSIDE = ("cannot ", "attempting to grant RBAC permissions not currently held")


def _refusal(event: Mapping[str, Any], call: Call | None) -> Refusal | None:
    annotations = event.get("annotations") or {}
    status = event.get("responseStatus") or {}
    message = str(status.get("message") or annotations.get("authorization.k8s.io/reason") or "")
    uri = str(event.get("requestURI") or "")
    if annotations.get("authorization.k8s.io/decision") == "forbid":
        return Refusal(call, uri, message or "forbidden")
    if status.get("code") != 403 or not any(m in message for m in _RBAC_INSIDE):
        return None  # e.g. "namespace is being terminated": not a question of RBAC
    found = _CANNOT.search(message)
    if found is None:
        return Refusal(None, uri, message)
    resource = found["resource"]
    inner = Call(
        verb=found["verb"],
        group=found["group"],
        resource=resource,
        namespace=found["namespace"] or "",
        name=call.name if call and call.resource == resource else "",
    )
    return Refusal(inner, uri, message)


def analyse(
    events: Iterable[Mapping[str, Any]],
    *,
    user: str,
    roles: Sequence[Role],
    implied: Implied | None = None,
) -> Report:
    implied = implied or Implied()
    calls: dict[Call, int] = defaultdict(int)
    examples: dict[Call, str] = {}
    refused: list[Refusal] = []
    seen_ids: set[str] = set()
    requests = 0

    def add(call: Call, uri: str) -> None:
        calls[call] += 1
        examples.setdefault(call, uri)

    for event in events:
        if (event.get("user") or {}).get("username") != user:
            continue
        audit_id = str(event.get("auditID") or "")
        if audit_id in seen_ids:
            continue  # a watch logs ResponseStarted and, when it ends, ResponseComplete
        seen_ids.add(audit_id)
        requests += 1
        call = _call_of(event)
        uri = str(event.get("requestURI") or "")
        problem = _refusal(event, call)
        if problem is not None:
            refused.append(problem)
            continue
        if call is None:
            continue  # discovery (/api, /apis): granted to every authenticated user
        code = int((event.get("responseStatus") or {}).get("code") or 0)
        add(call, uri)
        if code >= 400:
            continue  # answered (404, 409, ...), so authorised; nothing was written
        created = call.verb == "create" or (call.verb == "patch" and code == 201)
        if call.verb == "patch" and code == 201:
            add(call._replace(verb="create"), uri)
        if (
            call.group == "rbac.authorization.k8s.io"
            and call.resource == "rolebindings"
            and call.verb in WRITES
        ):
            for role in implied.binds:
                kind, _, name = role.partition("/")
                resource = "clusterroles" if kind == "ClusterRole" else "roles"
                add(Call("bind", call.group, resource, call.namespace, name), uri)
        owner = implied.finalizers.get((call.group, call.resource))
        if owner is not None and created:
            add(Call("update", owner[0], owner[1], call.namespace, ""), uri)

    grants = [g for role in roles for g in role.grants()]
    used_by: dict[Grant, list[Call]] = {}
    for grant in grants:
        used_by[grant] = sorted(c for c in calls if grant.matches(c))
    unused = [g for g in grants if not used_by[g]]
    # Allowed when the log was written (the binding then may have been broader than
    # these roles), but no rule of these roles allows it: refused under them.
    uncovered = sorted(c for c in calls if not any(g.matches(c) for g in grants))
    return Report(
        calls=dict(calls),
        examples=examples,
        refused=_dedupe(refused),
        uncovered=uncovered,
        unused=unused,
        used_by=used_by,
        requests=requests,
    )


def _dedupe(refused: list[Refusal]) -> list[Refusal]:
    seen: set[tuple[Call | None, str]] = set()
    out = []
    for refusal in refused:
        key = (refusal.call, refusal.message if refusal.call is None else "")
        if key not in seen:
            seen.add(key)
            out.append(refusal)
    return out


def suggest_rule(call: Call) -> str:
    names = f', resourceNames: ["{call.name}"]' if call.name and call.verb != "list" else ""
    scope = (
        f" (in a Role of namespace {call.namespace}, or a ClusterRole if the namespace varies)"
        if call.namespace
        else ""
    )
    return (
        f'{{apiGroups: ["{call.group}"], resources: ["{call.resource}"]{names}, '
        f'verbs: ["{call.verb}"]}}{scope}'
    )


def _cell(values: Any, *, core: bool = False) -> str:
    if not values:
        return "—"
    return ", ".join("core" if core and v == "" else f"`{v}`" for v in values)


def _summarise(seen: Mapping[Call, int]) -> str:
    if not seen:
        return "**none**"
    per_verb: dict[str, int] = defaultdict(int)
    for call, count in seen.items():
        per_verb[call.verb] += count
    return ", ".join(f"{verb} ({count})" for verb, count in sorted(per_verb.items()))
