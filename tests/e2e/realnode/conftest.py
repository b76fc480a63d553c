"""The real-node suite: one test bed with a real node, set up by the demo itself.

`scripts/demo.sh` is the setup, run once per session: it starts the test bed with a
real node, builds the image from the Dockerfile, installs the operator in the cluster
from manifests/default and applies the samples. Every test here then works against
that cluster and the operator running in it, as a user's cluster would.

The test bed has its own run directory (`BMAD_REALNODE_DIR`, default
`/tmp/bmad-realnode-<uid>`), apart from the session's kwok test bed and its local
operator process, which would otherwise reconcile the same objects. It is stopped at
the end of the session. One real node runs per machine: stop any other first.
"""

from __future__ import annotations

import secrets
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from bmad_testbed import kubectl as kubectl_mod
from bmad_testbed import testbed

from .helpers import REPO, RealNode, realnode_dir


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Run this suite last: its test bed (and the demo's agents on the node) then lives
    only while these tests run, not through the whole session, and test_00_lifecycle
    (which needs the machine's one real node to itself) runs before it is started."""
    here = Path(__file__).parent
    mine = [item for item in items if here in Path(item.path).parents]
    if mine:
        items[:] = [item for item in items if here not in Path(item.path).parents] + mine


@pytest.fixture(scope="session")
def realnode(clean_env: dict[str, str]) -> Iterator[RealNode]:
    directory = realnode_dir()
    try:
        # Every service too, so that suites using datastores find them from pods. The
        # KUBECONFIG of the session's own test bed must not make this one "external".
        with pytest.MonkeyPatch.context() as mp:
            mp.delenv("KUBECONFIG", raising=False)
            env = testbed.up(real_node=True, directory=directory)
        started = time.monotonic()
        demo = subprocess.run(
            ["bash", str(REPO / "scripts" / "demo.sh")],
            env=dict(clean_env, BMAD_TESTBED_DIR=str(directory)),
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
            cwd=REPO,
        )
        seconds = time.monotonic() - started
        kubectl = kubectl_mod.Kubectl(env["BMAD_KUBECTL"], env["KUBECONFIG"])
        yield RealNode(directory, env, kubectl, demo, seconds)
    finally:
        testbed.down(directory=directory)


@pytest.fixture(scope="session")
def installed(realnode: RealNode) -> RealNode:
    """The demo finished: the operator runs in the cluster, the samples are Ready."""
    assert realnode.demo.returncode == 0, (
        f"scripts/demo.sh failed (exit {realnode.demo.returncode}):\n"
        + realnode.demo.stderr[-4000:]
    )
    return realnode


@pytest.fixture
def real_kubectl(installed: RealNode) -> kubectl_mod.Kubectl:
    return installed.kubectl


@pytest.fixture
def real_namespace(
    real_kubectl: kubectl_mod.Kubectl, request: pytest.FixtureRequest
) -> Iterator[str]:
    """A fresh namespace under Pod Security `restricted` enforcement, deleted afterwards."""
    base = "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:30].strip("-")
    name = f"rn-{base}-{secrets.token_hex(3)}"
    real_kubectl.apply(
        {
            "apiVersion": "v1",
            "kind": "Namespace",
            "metadata": {
                "name": name,
                "labels": {
                    "pod-security.kubernetes.io/enforce": "restricted",
                    "pod-security.kubernetes.io/enforce-version": "latest",
                },
            },
        }
    )
    try:
        yield name
    finally:
        real_kubectl.run(
            "delete", "namespace", name, "--wait=false", "--ignore-not-found", check=False
        )
