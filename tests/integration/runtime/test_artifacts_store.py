"""`ArtifactStore` against the test bed's real MinIO, one versioned bucket per test."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

import boto3
import httpx
import pytest
from botocore.config import Config

from bmad_runtime import artifacts, bindings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

pytestmark = pytest.mark.integration


def admin(s3: dict[str, str]) -> S3Client:
    return boto3.client(
        "s3",
        endpoint_url=s3["endpoint"],
        aws_access_key_id=s3["access_key"],
        aws_secret_access_key=s3["secret_key"],
        region_name=s3["region"],
        config=Config(s3={"addressing_style": "path"}),
    )


@pytest.fixture
def bucket(s3: dict[str, str]) -> str:
    name = f"bmad-artifacts-{secrets.token_hex(5)}"
    client = admin(s3)
    client.create_bucket(Bucket=name)
    client.put_bucket_versioning(Bucket=name, VersioningConfiguration={"Status": "Enabled"})
    return name


def settings_for(s3: dict[str, str], bucket: str) -> bindings.ObjectStorageSettings:
    # What the runtime reads from an objectStorage binding for the test bed's MinIO.
    return bindings.ObjectStorageSettings(
        provider="minio",
        endpoint=s3["endpoint"],
        region=s3["region"],
        bucket=bucket,
        access_key_id=s3["access_key"],
        secret_access_key=s3["secret_key"],
        path_style=True,
    )


@pytest.fixture
def store(s3: dict[str, str], bucket: str) -> Iterator[artifacts.ArtifactStore]:
    opened = artifacts.ArtifactStore(
        settings_for(s3, bucket), tenant=f"acme-{secrets.token_hex(3)}", scope="greenfield"
    )
    try:
        yield opened
    finally:
        opened.close()


async def test_each_put_is_a_new_version_and_old_ones_stay_readable(
    store: artifacts.ArtifactStore,
) -> None:
    first = await store.put("prd.md", "# PRD\n\nversion one", content_type="text/markdown")
    second = await store.put("prd.md", "# PRD\n\nversion two", content_type="text/markdown")
    assert first != second
    assert artifacts.UNVERSIONED not in (first, second)

    latest = await store.get("prd.md")
    assert latest.version == second
    assert latest.text() == "# PRD\n\nversion two"
    assert latest.content_type == "text/markdown"
    old = await store.get("prd.md", version=first)
    assert old.version == first
    assert old.text() == "# PRD\n\nversion one"

    versions = await store.list_versions("prd.md")
    assert [v.version for v in versions] == [second, first]
    assert [v.is_latest for v in versions] == [True, False]
    assert versions[1].size == len(b"# PRD\n\nversion one")


async def test_keys_live_under_the_tenant_and_scope(
    s3: dict[str, str], bucket: str, store: artifacts.ArtifactStore
) -> None:
    await store.put("stories/1.1.md", b"story", metadata={"step": "sm"})
    await store.put("prd.md", "prd")
    await store.put("prd.md.bak", "not a version of prd.md")
    keys = [o["Key"] for o in admin(s3).list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert sorted(keys) == sorted(
        f"{store.tenant}/greenfield/{n}" for n in ("stories/1.1.md", "prd.md", "prd.md.bak")
    )
    assert await store.list_artifacts() == ["prd.md", "prd.md.bak", "stories/1.1.md"]
    assert await store.list_artifacts("stories") == ["stories/1.1.md"]
    assert len(await store.list_versions("prd.md")) == 1
    story = await store.get("stories/1.1.md")
    assert story.data == b"story"
    assert story.content_type == "application/octet-stream"
    assert story.metadata == {"step": "sm"}


async def test_presigned_urls_download_the_latest_or_an_old_version(
    store: artifacts.ArtifactStore,
) -> None:
    first = await store.put("architecture.md", "v1")
    await store.put("architecture.md", "v2")
    async with httpx.AsyncClient(timeout=10) as http:
        latest = await http.get(await store.presigned_url("architecture.md"))
        assert latest.status_code == 200
        assert latest.text == "v2"
        old = await http.get(await store.presigned_url("architecture.md", version=first))
        assert old.status_code == 200
        assert old.text == "v1"

        short = await store.presigned_url("architecture.md", expires=1)
        # Poll until the URL is refused: it must expire, within a generous deadline.
        deadline = time.monotonic() + 30
        while (expired := await http.get(short)).status_code == 200:
            assert time.monotonic() < deadline, "a URL that expires after 1 s still works"
            await asyncio.sleep(0.2)
        assert expired.status_code == 403


async def test_escaping_names_are_refused_and_nothing_is_written(
    s3: dict[str, str], bucket: str, store: artifacts.ArtifactStore
) -> None:
    for name in ("../other-tenant/prd.md", "/prd.md", "a/../../../x", "a//b"):
        with pytest.raises(artifacts.ArtifactKeyError):
            await store.put(name, "payload")
    assert admin(s3).list_objects_v2(Bucket=bucket).get("KeyCount", 0) == 0


async def test_other_tenants_and_missing_versions_are_not_found(
    s3: dict[str, str], bucket: str, store: artifacts.ArtifactStore
) -> None:
    version = await store.put("prd.md", "mine")
    other = artifacts.ArtifactStore(settings_for(s3, bucket), tenant="other", scope="greenfield")
    try:
        with pytest.raises(artifacts.ArtifactNotFoundError):
            await other.get("prd.md")
        assert await other.list_versions("prd.md") == []
        assert await other.list_artifacts() == []
    finally:
        other.close()
    with pytest.raises(artifacts.ArtifactNotFoundError):
        await store.get("missing.md")
    with pytest.raises(artifacts.ArtifactNotFoundError, match="version"):
        await store.get("prd.md", version="00000000-0000-0000-0000-000000000000")
    assert (await store.get("prd.md", version=version)).text() == "mine"
