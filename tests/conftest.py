"""Fixtures that hand tests the test bed, opt-in per test (never autouse).

If `bmad testbed up` already runs (the test command starts it), the fixtures use it;
otherwise the first test that asks for a server starts the whole test bed for the
session and stops it at the end. `KUBECONFIG` pointing at your own cluster (kind,
k3d, a real one) is honoured: no control plane is started then.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from bmad_testbed import kubectl as kubectl_mod
from bmad_testbed import netguard, operator_proc, testbed

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Nothing in the tests may reach outside this machine.
    netguard.install()


# The test command selects tests by these markers (scripts/test.sh): a test with none of
# them would be collected and never run.
SUITE_MARKERS = ("unit", "integration", "e2e", "rbac_audit")


def unmarked(items: list[pytest.Item]) -> list[str]:
    """The ids of the tests that carry none of `SUITE_MARKERS`."""
    return [
        item.nodeid
        for item in items
        if not any(item.get_closest_marker(name) for name in SUITE_MARKERS)
    ]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    missing = unmarked(items)
    if missing:
        raise pytest.UsageError(
            f"{len(missing)} test(s) carry none of the markers {', '.join(SUITE_MARKERS)}, so "
            "the test command would never run them; give the module a "
            "`pytestmark = pytest.mark.unit` (or integration, e2e): " + ", ".join(missing[:5])
        )


@pytest.fixture(scope="session")
def testbed_env() -> Iterator[dict[str, str]]:
    state = testbed.status()
    if state and all(state["alive"]):
        yield dict(state["env"])
        return
    env = testbed.up()
    try:
        yield env
    finally:
        testbed.down()


@pytest.fixture(scope="session")
def kubectl(testbed_env: dict[str, str]) -> kubectl_mod.Kubectl:
    return kubectl_mod.Kubectl(testbed_env["BMAD_KUBECTL"], testbed_env["KUBECONFIG"])


@pytest.fixture(scope="session")
def kubeconfig(testbed_env: dict[str, str]) -> str:
    return testbed_env["KUBECONFIG"]


@pytest.fixture
def namespace(kubectl: kubectl_mod.Kubectl, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace per test, deleted afterwards (without waiting for it)."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"t-{base}-{secrets.token_hex(3)}"
    kubectl.run("create", "namespace", name)
    try:
        yield name
    finally:
        kubectl.run("delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False)


@pytest.fixture(scope="session")
def postgres_url(testbed_env: dict[str, str]) -> str:
    return testbed_env["BMAD_POSTGRES_URL"]


@pytest.fixture(scope="session")
def redis_url(testbed_env: dict[str, str]) -> str:
    return testbed_env["BMAD_REDIS_URL"]


@pytest.fixture(scope="session")
def prometheus(testbed_env: dict[str, str]) -> dict[str, str]:
    return {
        "prometheus": testbed_env["BMAD_PROMETHEUS_URL"],
        "pushgateway": testbed_env["BMAD_PUSHGATEWAY_URL"],
    }


@pytest.fixture(scope="session")
def s3(testbed_env: dict[str, str]) -> dict[str, str]:
    return {
        "endpoint": testbed_env["BMAD_S3_ENDPOINT"],
        "access_key": testbed_env["BMAD_S3_ACCESS_KEY"],
        "secret_key": testbed_env["BMAD_S3_SECRET_KEY"],
        "region": testbed_env["BMAD_S3_REGION"],
    }


@pytest.fixture(scope="session")
def stripe_api_base(testbed_env: dict[str, str]) -> str:
    return testbed_env["BMAD_STRIPE_API_BASE"]


@pytest.fixture(scope="session")
def smtp(testbed_env: dict[str, str]) -> dict[str, str]:
    return {
        "host": testbed_env["BMAD_SMTP_HOST"],
        "port": testbed_env["BMAD_SMTP_PORT"],
        "maildir": testbed_env["BMAD_SMTP_MAILDIR"],
    }


@pytest.fixture
def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def clean_env() -> dict[str, str]:
    """The environment for child processes, without a KUBECONFIG of the caller's."""
    env = dict(os.environ)
    env.pop("KUBECONFIG", None)
    return env


@pytest.fixture(scope="session")
def crds(kubectl: kubectl_mod.Kubectl) -> list[str]:
    """The project's CRDs, installed with server-side apply and Established."""
    names = []
    for path in sorted((REPO / "crds" / "bases").glob("bmad.dev_*.yaml")):
        kubectl.run("apply", "--server-side", "--force-conflicts", "-f", str(path))
        names.append(f"{path.stem.split('_', 1)[1]}.bmad.dev")
    kubectl.run(
        "wait", "--for=condition=Established", *[f"crd/{n}" for n in names], "--timeout=60s"
    )
    return names


@pytest.fixture(scope="session")
def operator_kubeconfig(kubectl: kubectl_mod.Kubectl, testbed_env: dict[str, str]) -> str:
    """The operator's own identity, bound to the ClusterRole of manifests/rbac only."""
    own = testbed_env.get("BMAD_OPERATOR_KUBECONFIG")
    if not own:
        return testbed_env["KUBECONFIG"]  # a user's cluster: run as the caller
    rendered = kubectl.out("kustomize", str(REPO / "manifests" / "rbac"))
    import yaml

    roles = [d for d in yaml.safe_load_all(rendered) if d and d.get("kind") == "ClusterRole"]
    assert any(r["metadata"]["name"] == "bmad-operator" for r in roles)
    for role in roles:
        kubectl.apply(role)
    kubectl.apply(
        {
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "ClusterRoleBinding",
            "metadata": {"name": "bmad-operator-testbed"},
            "roleRef": {
                "apiGroup": "rbac.authorization.k8s.io",
                "kind": "ClusterRole",
                "name": "bmad-operator",
            },
            "subjects": [
                {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "User",
                    "name": testbed_env["BMAD_OPERATOR_USER"],
                }
            ],
        }
    )
    return own


@pytest.fixture(scope="session")
def operator(
    crds: list[str],
    operator_kubeconfig: str,
    testbed_env: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[operator_proc.OperatorProcess]:
    """The operator, running as its own process for the whole session (resync 5s),
    autoscaling from the test bed's Prometheus."""
    log = tmp_path_factory.mktemp("operator") / "operator.log"
    proc = operator_proc.OperatorProcess(
        kubeconfig=operator_kubeconfig,
        log_path=log,
        prometheus_url=testbed_env.get("BMAD_PROMETHEUS_URL"),
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
