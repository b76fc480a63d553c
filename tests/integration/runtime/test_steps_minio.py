"""Workflow steps run by the runtime against the test bed's real MinIO.

The objectStorage binding is laid out on disk the way kubelet mounts it; the step
reads what it requires by URI and version id, and stores its answer as a new version
of the key the task names.
"""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest

from bmad_integrations import binding as layout
from bmad_integrations import taskwire
from bmad_runtime import bindings, config, steps, telemetry, turns
from bmad_runtime.bus import consumer
from bmad_runtime.memory import inprocess
from bmad_runtime.providers import echo, router

from .test_artifacts_store import admin

pytestmark = pytest.mark.integration


def echo_services() -> turns.Services:
    return turns.Services(
        tenant="team-a",
        agent="pm",
        config=config.echo_config(agent="pm"),
        store=inprocess.InProcessStore(),
        router=router.ModelRouter([echo.EchoProvider()]),
        limiter=None,
        metrics=telemetry.Metrics(),
    )


@pytest.fixture
def bucket(s3: dict[str, str]) -> str:
    name = f"bmad-steps-{secrets.token_hex(5)}"
    client = admin(s3)
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


@pytest.fixture
def stores(tmp_path: Path, s3: dict[str, str], bucket: str) -> steps.ArtifactStores:
    folder = tmp_path / "bindings" / "artifacts"
    folder.mkdir(parents=True)
    for key, value in {
        layout.TYPE: "objectStorage",
        layout.PROVIDER: "minio",
        layout.ENDPOINT: s3["endpoint"],
        layout.REGION: s3["region"],
        layout.BUCKET: bucket,
        layout.PATH_STYLE: "true",
        layout.ACCESS_KEY_ID: s3["access_key"],
        layout.SECRET_ACCESS_KEY: s3["secret_key"],
    }.items():
        (folder / key).write_text(value)
    return steps.ArtifactStores(bindings.read_bindings(tmp_path / "bindings"), tenant="team-a")


def step(name: str, **fields: object) -> taskwire.Task:
    values: dict[str, object] = {
        "workflow": taskwire.WorkflowRef(namespace="team-a", name="todo", uid="u-1"),
        "step": name,
        "attempt": 1,
        "max_attempts": 1,
    }
    values.update(fields)
    payload = taskwire.AgentTask.model_validate(values).to_payload()
    return taskwire.Task(task_id=f"wf:u-1:{name}:1", payload=payload, message_id="1-0", attempt=1)


def target(name: str, mode: str = "creates") -> taskwire.ArtifactTarget:
    return taskwire.ArtifactTarget(
        name=name, mode=mode, integration="artifacts", key=f"team-a/todo/{name}"
    )


async def test_steps_hand_artifacts_to_each_other_through_versioned_objects(
    stores: steps.ArtifactStores, s3: dict[str, str], bucket: str
) -> None:
    services = echo_services()
    try:
        brief = taskwire.decode_step_output(
            await steps.run(
                services,
                stores,
                step("brief", description="Write the brief.", target=target("brief.md")),
            )
        )
        assert brief.artifact is not None
        assert brief.artifact.uri == f"s3://{bucket}/team-a/todo/brief.md"
        ref = taskwire.ArtifactRef(
            name="brief.md",
            step="brief",
            integration="artifacts",
            uri=brief.artifact.uri,
            version=brief.artifact.version,
        )
        prd = taskwire.decode_step_output(
            await steps.run(services, stores, step("prd", target=target("prd.md"), requires=[ref]))
        )
        update = taskwire.decode_step_output(
            await steps.run(
                services,
                stores,
                step("update-prd", target=target("prd.md", "updates"), requires=[ref]),
            )
        )
    finally:
        stores.close()

    assert prd.artifact is not None
    assert update.artifact is not None
    assert prd.artifact.uri == update.artifact.uri
    assert prd.artifact.version != update.artifact.version
    versions = admin(s3).list_object_versions(Bucket=bucket, Prefix="team-a/todo/prd.md")
    ids = {v["VersionId"] for v in versions.get("Versions", [])}
    assert ids == {prd.artifact.version, update.artifact.version}
    old = admin(s3).get_object(
        Bucket=bucket, Key="team-a/todo/prd.md", VersionId=prd.artifact.version
    )
    assert old["Body"].read().decode().startswith("[echo-1] Workflow todo")
    assert old["Metadata"] == {"workflow": "todo", "step": "prd", "task": "wf:u-1:prd:1"}


async def test_a_version_that_is_not_there_fails_the_step_for_good(
    stores: steps.ArtifactStores, bucket: str
) -> None:
    missing = taskwire.ArtifactRef(
        name="brief.md",
        step="brief",
        integration="artifacts",
        uri=f"s3://{bucket}/team-a/todo/brief.md",
        version="no-such-version",
    )
    try:
        with pytest.raises(consumer.TaskFailedError, match="not found in bucket"):
            await steps.run(
                echo_services(), stores, step("prd", target=target("prd.md"), requires=[missing])
            )
        other = missing.model_copy(update={"uri": "s3://another-bucket/x", "version": "v"})
        with pytest.raises(consumer.TaskFailedError, match="binds bucket"):
            await steps.run(echo_services(), stores, step("prd", requires=[other]))
    finally:
        stores.close()
