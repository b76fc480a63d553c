"""Artifact keys stay under the tenant's prefix; presigned URLs are signed locally."""

from __future__ import annotations

import urllib.parse

import pytest

from bmad_runtime import artifacts, bindings

pytestmark = pytest.mark.unit

SETTINGS = bindings.ObjectStorageSettings(
    endpoint="http://127.0.0.1:9",
    region="us-east-1",
    bucket="artifacts",
    access_key_id="AKIDEXAMPLE",
    secret_access_key="not-a-real-secret",
    provider="minio",
)


@pytest.mark.parametrize(
    "name", ["prd.md", "stories/1.2.md", "docs/architecture/backend.md", "a..b.md", ".hidden"]
)
def test_names_inside_the_prefix_are_accepted(name: str) -> None:
    key = artifacts.artifact_key(tenant="acme", scope="greenfield", name=name)
    assert key == f"acme/greenfield/{name}"


@pytest.mark.parametrize(
    "name",
    [
        "",
        "/etc/passwd",
        "../other-tenant/prd.md",
        "stories/../../escape.md",
        "stories/..",
        "..",
        "./prd.md",
        "stories//1.md",
        "stories/",
        "back\\slash.md",
        "new\nline.md",
        "nul\x00.md",
        "x" * 600,
    ],
)
def test_names_that_escape_or_are_malformed_are_refused(name: str) -> None:
    with pytest.raises(artifacts.ArtifactKeyError):
        artifacts.artifact_key(tenant="acme", scope="greenfield", name=name)


@pytest.mark.parametrize("segment", ["", "..", ".", "a/b", "-x", "x-", "a:b", "a..b"])
def test_tenant_and_scope_are_single_safe_segments(segment: str) -> None:
    with pytest.raises(artifacts.ArtifactKeyError):
        artifacts.artifact_key(tenant=segment, scope="wf", name="prd.md")
    with pytest.raises(artifacts.ArtifactKeyError):
        artifacts.artifact_key(tenant="acme", scope=segment, name="prd.md")


async def test_the_store_refuses_escaping_names_before_any_request() -> None:
    store = artifacts.ArtifactStore(SETTINGS, tenant="acme", scope="greenfield")
    try:
        assert store.prefix == "acme/greenfield/"
        for name in ("../x", "/x", "a/../../x"):
            with pytest.raises(artifacts.ArtifactKeyError):
                await store.put(name, b"data")
            with pytest.raises(artifacts.ArtifactKeyError):
                await store.get(name)
            with pytest.raises(artifacts.ArtifactKeyError):
                await store.list_versions(name)
            with pytest.raises(artifacts.ArtifactKeyError):
                await store.presigned_url(name)
    finally:
        store.close()


async def test_presigned_url_names_the_key_and_version() -> None:
    store = artifacts.ArtifactStore(SETTINGS, tenant="acme", scope="greenfield")
    try:
        url = await store.presigned_url("stories/1.2.md", version="v-123", expires=60)
    finally:
        store.close()
    parsed = urllib.parse.urlsplit(url)
    assert parsed.netloc == "127.0.0.1:9"
    assert parsed.path == "/artifacts/acme/greenfield/stories/1.2.md"
    query = urllib.parse.parse_qs(parsed.query)
    assert query["versionId"] == ["v-123"]
    assert query["X-Amz-Expires"] == ["60"]
    assert "not-a-real-secret" not in url


async def test_presigned_url_expiry_is_bounded() -> None:
    store = artifacts.ArtifactStore(SETTINGS, tenant="acme", scope="greenfield")
    try:
        with pytest.raises(ValueError, match="expires"):
            await store.presigned_url("prd.md", expires=0)
        with pytest.raises(ValueError, match="expires"):
            await store.presigned_url("prd.md", expires=artifacts.MAX_PRESIGN_SECONDS + 1)
    finally:
        store.close()


def test_a_ca_bundle_is_written_for_botocore_and_removed_on_close() -> None:
    pem = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    settings = bindings.ObjectStorageSettings(
        endpoint="https://127.0.0.1:9",
        region="us-east-1",
        bucket="artifacts",
        access_key_id="AKIDEXAMPLE",
        secret_access_key="not-a-real-secret",
        ca_cert=pem,
    )
    store = artifacts.ArtifactStore(settings, tenant="acme", scope="wf")
    path = store._ca_file
    assert path is not None
    with open(path) as handle:
        assert handle.read() == pem
    store.close()
    with pytest.raises(FileNotFoundError):
        open(path).close()


def test_for_scope_shares_the_client() -> None:
    store = artifacts.ArtifactStore(SETTINGS, tenant="acme", scope="agent-pm")
    other = store.for_scope("brownfield-service")
    try:
        assert other.client is store.client
        assert other.key("prd.md") == "acme/brownfield-service/prd.md"
        with pytest.raises(artifacts.ArtifactKeyError):
            store.for_scope("../x")
    finally:
        other.close()  # does not own the client
        store.close()
