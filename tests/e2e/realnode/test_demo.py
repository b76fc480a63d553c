"""The README's main-job command, end to end, on the real node.

`scripts/demo.sh` (run once by the `realnode` fixture) builds the image from the
Dockerfile, installs the operator in the cluster from manifests/default, applies the
samples and asks the analyst a question through its Service. This checks what it left
running and what it printed.
"""

from __future__ import annotations

import pytest

from .helpers import IMAGE, NODE_NAME, SYSTEM_NS, RealNode

pytestmark = [pytest.mark.e2e, pytest.mark.realnode]

ROLES = ("analyst", "pm", "architect", "ux-expert", "po", "sm", "dev", "qa")
QUESTION = "We want a tool that turns meeting notes into action items. Where do we start?"


def _running_on_node(pod: dict[str, object]) -> bool:
    spec, status = pod["spec"], pod["status"]
    assert isinstance(spec, dict)
    assert isinstance(status, dict)
    return spec.get("nodeName") == NODE_NAME and status.get("phase") == "Running"


def test_demo_runs_the_operator_and_every_sample_agent_on_the_real_node(
    installed: RealNode,
) -> None:
    rows = [line.split() for line in installed.demo.stdout.splitlines()]
    header = next(i for i, r in enumerate(rows) if r[:2] == ["NAME", "ROLE"])
    assert rows[header][:6] == ["NAME", "ROLE", "MODEL", "READY-REPLICAS", "DESIRED", "READY"]
    agents = {r[0]: r for r in rows[header + 1 : header + 1 + len(ROLES)]}
    assert sorted(agents) == sorted(ROLES)
    for name, row in agents.items():
        assert row[1] == name  # each sample plays its own role
        assert row[3:6] == ["1", "1", "True"], row

    kubectl = installed.kubectl
    operators = kubectl.json(
        "get", "pods", "-n", SYSTEM_NS, "-l", "app.kubernetes.io/name=bmad-operator"
    )["items"]
    assert [p for p in operators if _running_on_node(p)], operators
    for pod in operators:
        assert pod["spec"]["containers"][0]["image"] == IMAGE
        assert pod["spec"]["serviceAccountName"] == "bmad-operator"

    pods = kubectl.json("get", "pods", "-n", "bmad-demo", "-l", "app.kubernetes.io/name=bmad-agent")
    running = [p for p in pods["items"] if _running_on_node(p)]
    assert sorted(p["metadata"]["labels"]["app.kubernetes.io/instance"] for p in running) == sorted(
        ROLES
    )
    for pod in running:
        assert pod["spec"]["containers"][0]["image"] == IMAGE
        # The image the kubelet runs is the one containerd imported from the build.
        assert pod["status"]["containerStatuses"][0]["ready"] is True


def test_the_agents_log_shows_the_runtime_starting(installed: RealNode) -> None:
    log = installed.kubectl.out("logs", "deployment/analyst", "-n", "bmad-demo")
    assert "Uvicorn running on http://0.0.0.0:8080" in log, log[-2000:]
    assert "Application startup complete." in log
    # The demo printed the same log.
    assert "Uvicorn running on" in installed.demo.stdout


def test_the_analyst_answers_through_its_service(installed: RealNode) -> None:
    out = installed.demo.stdout
    assert f"[demo] you: {QUESTION}" in out
    marker = "[demo] analyst (via http://"
    assert marker in out, out[-3000:]
    answer = out.split(marker, 1)[1].splitlines()[1:]
    # The echo model answers with the question, tagged with its name.
    assert answer, out[-2000:]
    assert answer[0].startswith("[echo-1] "), answer
    assert QUESTION in answer[0]
    service = installed.kubectl.json("get", "service", "analyst", "-n", "bmad-demo")
    assert f"{marker}{service['spec']['clusterIP']}:80)" in out
