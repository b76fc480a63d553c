"""The decisions: observed state in, (status, reason, message) of each condition out.

The table composes the policies exactly as the Agent reconciler does, so each row
reads as "an Agent in this situation shows these conditions".
"""

from __future__ import annotations

import re
import types
from typing import Any, NamedTuple

import pytest

from bmad_operator.conditions import FALSE, TRUE, UNKNOWN, Cond
from bmad_operator.policies import agent as policy
from bmad_operator.policies import integration as integration_policy
from bmad_operator.policies import tenant as tenant_policy

pytestmark = pytest.mark.unit

NS = "team-a"
Obj = dict[str, Any]


def deployment(
    *,
    replicas: int,
    ready: int | None = None,
    available: int | None = None,
    updated: int | None = None,
    generation: int = 2,
    observed: int | None = None,
    available_condition: str = TRUE,
) -> Obj:
    return {
        "metadata": {"name": "d", "generation": generation},
        "status": {
            "observedGeneration": generation if observed is None else observed,
            "replicas": replicas,
            "readyReplicas": replicas if ready is None else ready,
            "availableReplicas": replicas if available is None else available,
            "updatedReplicas": replicas if updated is None else updated,
            "conditions": [
                {"type": "Progressing", "status": "True", "reason": "NewReplicaSetAvailable"},
                {"type": "Available", "status": available_condition, "reason": "X"},
            ],
        },
    }


def evaluate(
    *, paused: bool, replicas: int, states: list[policy.IntegrationState], live: Obj | None
) -> dict[str, Cond]:
    desired = 0 if paused else replicas
    integrations = policy.integrations_condition(states, NS)
    available, progressing = policy.workload_conditions(
        desired=desired, paused=paused, observed=policy.rollout(live)
    )
    ready = policy.ready_condition(
        paused=paused,
        integrations=integrations,
        available=available,
        progressing=progressing,
        desired=desired,
    )
    return {c.type: c for c in (ready, available, progressing, integrations)}


OK = policy.IntegrationState("github", found=True, ready=TRUE, message="Reachable.")
OK2 = policy.IntegrationState("slack", found=True, ready=TRUE)
MISSING = policy.IntegrationState("jira", found=False, ready=None)
BROKEN = policy.IntegrationState("llm", found=True, ready=FALSE, message="SecretNotFound: no key")


class Row(NamedTuple):
    id: str
    paused: bool
    replicas: int
    states: list[policy.IntegrationState]
    live: Obj | None
    # type -> (status, reason); reason None: only the status is pinned
    expect: dict[str, tuple[str, str | None]]


ROWS = [
    Row(
        "all-good",
        False,
        2,
        [],
        deployment(replicas=2),
        {
            "Ready": (TRUE, "AgentReady"),
            "Available": (TRUE, "MinimumReplicasAvailable"),
            "Progressing": (FALSE, "RolledOut"),
            "IntegrationsReady": (TRUE, "NoIntegrations"),
        },
    ),
    Row(
        "all-good-bound",
        False,
        1,
        [OK, OK2],
        deployment(replicas=1),
        {
            "Ready": (TRUE, "AgentReady"),
            "Available": (TRUE, "MinimumReplicasAvailable"),
            "Progressing": (FALSE, "RolledOut"),
            "IntegrationsReady": (TRUE, "IntegrationsReady"),
        },
    ),
    Row(
        "integration-not-found",
        False,
        1,
        [OK, MISSING],
        deployment(replicas=1),
        {
            "Ready": (FALSE, "IntegrationNotFound"),
            "Available": (TRUE, "MinimumReplicasAvailable"),
            "Progressing": (FALSE, "RolledOut"),
            "IntegrationsReady": (FALSE, "IntegrationNotFound"),
        },
    ),
    Row(
        "integration-not-ready",
        False,
        1,
        [OK, BROKEN],
        deployment(replicas=1),
        {
            "Ready": (FALSE, "IntegrationNotReady"),
            "Available": (TRUE, "MinimumReplicasAvailable"),
            "IntegrationsReady": (FALSE, "IntegrationNotReady"),
        },
    ),
    Row(
        "not-found-before-not-ready",
        False,
        1,
        [BROKEN, MISSING],
        deployment(replicas=1),
        {
            "Ready": (FALSE, "IntegrationNotFound"),
            "IntegrationsReady": (FALSE, "IntegrationNotFound"),
        },
    ),
    Row(
        "paused-scaled-down",
        True,
        3,
        [],
        deployment(replicas=0),
        {
            "Ready": (FALSE, "Paused"),
            "Available": (FALSE, "Paused"),
            "Progressing": (FALSE, "RolledOut"),
            "IntegrationsReady": (TRUE, "NoIntegrations"),
        },
    ),
    Row(
        "paused-scaling-down",
        True,
        3,
        [],
        deployment(replicas=3, observed=1),
        {
            "Ready": (FALSE, "Paused"),
            "Available": (FALSE, "Paused"),
            "Progressing": (TRUE, "RollingOut"),
        },
    ),
    Row(
        "paused-wins-over-integrations",
        True,
        1,
        [MISSING],
        deployment(replicas=0),
        {"Ready": (FALSE, "Paused"), "IntegrationsReady": (FALSE, "IntegrationNotFound")},
    ),
    Row(
        "rollout-incomplete",
        False,
        2,
        [OK],
        deployment(replicas=2, updated=1, ready=1, available=1),
        {
            "Ready": (FALSE, "RollingOut"),
            "Available": (FALSE, "ReplicasUnavailable"),
            "Progressing": (TRUE, "RollingOut"),
            "IntegrationsReady": (TRUE, "IntegrationsReady"),
        },
    ),
    Row(
        "rollout-surging",
        False,
        2,
        [],
        deployment(replicas=3, updated=1, ready=3, available=3),
        {
            "Ready": (FALSE, "RollingOut"),
            "Available": (TRUE, "MinimumReplicasAvailable"),
            "Progressing": (TRUE, "RollingOut"),
        },
    ),
    Row(
        "rollout-not-observed-yet",
        False,
        2,
        [],
        deployment(replicas=2, generation=5, observed=4),
        {"Ready": (FALSE, "RollingOut"), "Progressing": (TRUE, "RollingOut")},
    ),
    Row(
        "deployment-missing",
        False,
        1,
        [],
        None,
        {
            "Ready": (FALSE, None),
            "Available": (FALSE, "DeploymentMissing"),
            "Progressing": (TRUE, "RollingOut"),
        },
    ),
    Row(
        "available-condition-false",
        False,
        2,
        [],
        deployment(replicas=2, available_condition=FALSE),
        {
            "Ready": (FALSE, "ReplicasUnavailable"),
            "Available": (FALSE, "ReplicasUnavailable"),
            "Progressing": (FALSE, "RolledOut"),
        },
    ),
    Row(
        "zero-replicas",
        False,
        0,
        [],
        deployment(replicas=0),
        {
            "Ready": (TRUE, "AgentReady"),
            "Available": (TRUE, "MinimumReplicasAvailable"),
            "Progressing": (FALSE, "RolledOut"),
        },
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=[r.id for r in ROWS])
def test_condition_table(row: Row) -> None:
    got = evaluate(paused=row.paused, replicas=row.replicas, states=row.states, live=row.live)
    assert sorted(got) == ["Available", "IntegrationsReady", "Progressing", "Ready"]
    for type_, (status, reason) in row.expect.items():
        assert got[type_].status == status, (type_, got[type_])
        if reason is not None:
            assert got[type_].reason == reason, (type_, got[type_])
        assert got[type_].message, type_


def test_pod_lost_after_rollout_is_replicas_unavailable_not_rolling_out() -> None:
    live = deployment(replicas=2, ready=1, available=1, updated=2, available_condition=FALSE)
    got = evaluate(paused=False, replicas=2, states=[], live=live)
    assert got["Available"].reason == "ReplicasUnavailable"
    assert got["Progressing"] == Cond(
        "Progressing", FALSE, "RolledOut", "2 replicas are up to date."
    )
    assert got["Ready"].reason == "ReplicasUnavailable"


# --- messages ---------------------------------------------------------------------------


def test_integration_not_found_says_what_and_where_and_what_to_change() -> None:
    cond = policy.integrations_condition([OK, MISSING], NS)
    assert cond.reason == "IntegrationNotFound"
    assert "jira" in cond.message
    assert "github" not in cond.message
    assert NS in cond.message
    assert "create" in cond.message.lower()
    assert "spec.integrations" in cond.message


def test_integration_not_found_names_all_missing() -> None:
    other = policy.IntegrationState("confluence", found=False, ready=None)
    cond = policy.integrations_condition([MISSING, OK, other], "ns-x")
    assert "jira" in cond.message
    assert "confluence" in cond.message
    assert "ns-x" in cond.message


def test_integration_not_ready_carries_the_integrations_message() -> None:
    cond = policy.integrations_condition([OK, BROKEN], NS)
    assert cond == Cond(
        "IntegrationsReady",
        FALSE,
        "IntegrationNotReady",
        "Integration llm is not ready: SecretNotFound: no key",
    )
    bare = policy.IntegrationState("llm", found=True, ready=FALSE)
    assert policy.integrations_condition([bare], NS).message == "Integration llm is not ready"


def test_ready_repeats_the_integrations_reason_and_message() -> None:
    got = evaluate(paused=False, replicas=1, states=[BROKEN], live=deployment(replicas=1))
    assert got["Ready"].reason == got["IntegrationsReady"].reason
    assert got["Ready"].message == got["IntegrationsReady"].message


def test_integrations_ready_lists_the_bound_integrations() -> None:
    cond = policy.integrations_condition([OK, OK2], NS)
    assert "github" in cond.message
    assert "slack" in cond.message


def test_paused_message_says_how_it_got_there() -> None:
    got = evaluate(paused=True, replicas=2, states=[], live=deployment(replicas=0))
    assert "spec.paused" in got["Ready"].message
    assert "spec.paused" in got["Available"].message


def test_rollout_messages_count_replicas() -> None:
    got = evaluate(
        paused=False,
        replicas=3,
        states=[],
        live=deployment(replicas=3, updated=1, ready=2, available=2),
    )
    assert got["Progressing"].message == "Rolling out: 1/3 updated, 2/3 ready."
    assert got["Available"].message == "2/3 replicas are available."
    assert got["Ready"].message == got["Progressing"].message
    done = evaluate(paused=False, replicas=3, states=[], live=deployment(replicas=3))
    assert done["Ready"].message == "3/3 replicas are ready."


def test_invalid_spec() -> None:
    conds = policy.invalid_spec("spec.replicas: must be >= 0")
    by_type = {c.type: c for c in conds}
    assert by_type["Ready"].status == FALSE
    assert by_type["Available"].status == UNKNOWN
    assert by_type["Progressing"].status == FALSE
    for cond in conds:
        assert cond.reason == "InvalidSpec"
        assert "spec.replicas: must be >= 0" in cond.message
    assert conds[0].type == "Ready"


def test_rollout_of_a_fresh_deployment() -> None:
    fresh = {"metadata": {"generation": 1}}
    observed = policy.rollout(fresh)
    assert observed == policy.Rollout(0, 0, 0, 0, observed_current=False, available_condition=False)
    assert policy.rollout(None) is None
    got = evaluate(paused=False, replicas=1, states=[], live=fresh)
    assert got["Progressing"].reason == "RollingOut"
    assert got["Ready"].status == FALSE


@pytest.mark.parametrize(
    ("module", "at_least"),
    [(policy, 15), (tenant_policy, 15), (integration_policy, 4)],
    ids=["agent", "tenant", "integration"],
)
def test_reasons_are_one_camel_case_word(module: types.ModuleType, at_least: int) -> None:
    reasons = [
        value for name, value in vars(module).items() if name.isupper() and isinstance(value, str)
    ]
    assert len(reasons) >= at_least
    for reason in reasons:
        assert re.fullmatch(r"[A-Z][a-z]+(?:[A-Z][a-z]+)*", reason), reason


def test_a_suspended_tenant_wins_over_everything_else() -> None:
    integrations = policy.integrations_condition([], "team-a")
    available, progressing = policy.workload_conditions(desired=0, paused=False, observed=None)
    ready = policy.ready_condition(
        paused=True,
        integrations=integrations,
        available=available,
        progressing=progressing,
        desired=0,
        suspended_by="acme",
    )
    assert (ready.status, ready.reason) == ("False", "TenantSuspended")
    assert "acme" in ready.message


def test_jwt_auth_needs_a_bound_auth0_integration() -> None:
    login = policy.IntegrationState("login", found=True, ready=TRUE, type="auth0")
    gone = policy.IntegrationState("login", found=False, ready=None)
    for states in ([], [OK], [OK, gone]):
        cond = policy.integrations_condition(states, NS, auth_mode="jwt")
        assert (cond.status, cond.reason) == (FALSE, "AuthIntegrationMissing"), states
        assert "spec.auth.mode: none" in cond.message
        assert "auth0" in cond.message
    assert policy.integrations_condition([OK, login], NS, auth_mode="jwt").status == TRUE
    assert policy.integrations_condition([], NS, auth_mode="none").reason == "NoIntegrations"
