"""The autoscaler's queries find the runtime's series: the labels they select on are
the ones a runtime, started with the environment the operator renders, puts on them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import parser

from bmad_operator.autoscaling import queries
from bmad_runtime import app as runtime_app
from bmad_runtime import settings
from bmad_runtime.memory import inprocess
from bmad_runtime.providers import echo, router

pytestmark = pytest.mark.unit

Obj = dict[str, Any]


def test_the_runtimes_series_carry_the_labels_the_queries_select(
    build_agent_objects: Callable[..., list[Obj]],
) -> None:
    objects = build_agent_objects(name="dev", namespace="team-a")
    deployment = next(o for o in objects if o["kind"] == "Deployment")
    [container] = deployment["spec"]["template"]["spec"]["containers"]
    env = {var["name"]: var["value"] for var in container["env"] if "value" in var}
    runtime_settings = settings.RuntimeSettings(
        agent_name=env["BMAD_AGENT_NAME"], agent_namespace=env["BMAD_AGENT_NAMESPACE"]
    )
    app = runtime_app.create_app(
        runtime_settings,
        store=inprocess.InProcessStore(),
        providers=router.ModelRouter([echo.EchoProvider()], ready_ttl=0),
        authenticator=None,
        limiter=None,
    )
    metrics = app.state.runtime.metrics
    metrics.queue_depth.set(7)
    metrics.inflight.set(2)
    served = {
        sample.name: sample.labels
        for family in parser.text_string_to_metric_families(metrics.render().decode())
        for sample in family.samples
    }
    selector = queries.Selector("team-a", "dev")
    wanted = {selector.namespace_label: "team-a", selector.agent_label: "dev"}
    for name in (queries.QUEUE_DEPTH, queries.INFLIGHT):
        assert wanted.items() <= served[name].items(), (name, served[name])
