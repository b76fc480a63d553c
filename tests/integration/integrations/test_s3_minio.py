"""The objectStorage check against the test bed's real MinIO server (S3 API)."""

from __future__ import annotations

import secrets
from typing import Any

import boto3
import pytest
from botocore.config import Config

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, checks
from bmad_testbed import procs

from .policies import TESTBED

pytestmark = pytest.mark.integration


def bucket_name() -> str:
    return f"bmad-check-{secrets.token_hex(5)}"


def s3_spec(endpoint: str, bucket: str, **block: Any) -> integration.IntegrationSpec:
    settings: dict[str, Any] = {"provider": "minio", "endpoint": endpoint, "bucket": bucket}
    settings.update(block)
    return integration.IntegrationSpec.model_validate(
        {"type": "objectStorage", "secretRef": {"name": "s3-creds"}, "objectStorage": settings}
    )


def good_secret(s3: dict[str, str]) -> dict[str, bytes]:
    return {
        "accessKeyId": s3["access_key"].encode(),
        "secretAccessKey": s3["secret_key"].encode(),
    }


def admin(s3: dict[str, str]) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=s3["endpoint"],
        aws_access_key_id=s3["access_key"],
        aws_secret_access_key=s3["secret_key"],
        region_name=s3["region"],
        config=Config(s3={"addressing_style": "path"}),
    )


async def test_an_existing_bucket_is_checked(s3: dict[str, str]) -> None:
    bucket = bucket_name()
    admin(s3).create_bucket(Bucket=bucket)
    result = await checks.check_integration(
        s3_spec(s3["endpoint"], bucket), good_secret(s3), secret_found=True, policy=TESTBED
    )
    assert result.ok, result.message
    assert result.server_version is None  # its Server header is the server's words: not reported
    assert bucket in result.message
    assert s3["secret_key"] not in result.message


async def test_create_bucket_creates_it_with_versioning(s3: dict[str, str]) -> None:
    bucket = bucket_name()
    spec = s3_spec(s3["endpoint"], bucket, createBucket=True, versioning=True)
    result = await checks.check_integration(
        spec, good_secret(s3), secret_found=True, policy=TESTBED
    )
    assert result.ok, result.message
    assert "created" in result.message
    client = admin(s3)
    client.head_bucket(Bucket=bucket)
    assert client.get_bucket_versioning(Bucket=bucket).get("Status") == "Enabled"
    again = await checks.check_integration(spec, good_secret(s3), secret_found=True, policy=TESTBED)
    assert again.ok, again.message
    assert "created" not in again.message


async def test_create_bucket_without_versioning_leaves_it_unversioned(s3: dict[str, str]) -> None:
    bucket = bucket_name()
    result = await checks.check_integration(
        s3_spec(s3["endpoint"], bucket, createBucket=True),
        good_secret(s3),
        secret_found=True,
        policy=TESTBED,
    )
    assert result.ok, result.message
    assert admin(s3).get_bucket_versioning(Bucket=bucket).get("Status") is None


async def test_versioning_is_turned_on_for_an_existing_bucket(s3: dict[str, str]) -> None:
    bucket = bucket_name()
    admin(s3).create_bucket(Bucket=bucket)
    result = await checks.check_integration(
        s3_spec(s3["endpoint"], bucket, versioning=True),
        good_secret(s3),
        secret_found=True,
        policy=TESTBED,
    )
    assert result.ok, result.message
    assert admin(s3).get_bucket_versioning(Bucket=bucket).get("Status") == "Enabled"


async def test_a_missing_bucket_without_create_is_invalid_configuration(
    s3: dict[str, str],
) -> None:
    bucket = bucket_name()
    result = await checks.check_integration(
        s3_spec(s3["endpoint"], bucket), good_secret(s3), secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.INVALID_CONFIGURATION
    assert "createBucket" in result.message


@pytest.mark.parametrize("wrong", ["secretAccessKey", "accessKeyId"])
async def test_wrong_keys_are_authentication_failed(s3: dict[str, str], wrong: str) -> None:
    bucket = bucket_name()
    admin(s3).create_bucket(Bucket=bucket)
    secret = {**good_secret(s3), wrong: b"wrong-key-value-3"}
    result = await checks.check_integration(
        s3_spec(s3["endpoint"], bucket), secret, secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.AUTHENTICATION_FAILED, result.message
    assert "wrong-key-value-3" not in result.message


async def test_wrong_keys_for_a_missing_bucket_are_authentication_failed(
    s3: dict[str, str],
) -> None:
    secret = {**good_secret(s3), "secretAccessKey": b"wrong-key-value-4"}
    result = await checks.check_integration(
        s3_spec(s3["endpoint"], bucket_name(), createBucket=True),
        secret,
        secret_found=True,
        policy=TESTBED,
    )
    assert result.reason == base.Reason.AUTHENTICATION_FAILED, result.message


async def test_a_closed_port_is_unreachable(s3: dict[str, str]) -> None:
    endpoint = f"http://127.0.0.1:{procs.free_port()}"
    result = await checks.check_integration(
        s3_spec(endpoint, bucket_name()), good_secret(s3), secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.UNREACHABLE
    assert endpoint in result.message


async def test_a_missing_key_is_secret_key_missing(s3: dict[str, str]) -> None:
    secret = {"accessKeyId": s3["access_key"].encode()}
    result = await checks.check_integration(
        s3_spec(s3["endpoint"], bucket_name()), secret, secret_found=True, policy=TESTBED
    )
    assert result.reason == base.Reason.SECRET_KEY_MISSING
    assert "'secretAccessKey'" in result.message


async def test_a_missing_secret_is_secret_not_found(s3: dict[str, str]) -> None:
    result = await checks.check_integration(
        s3_spec(s3["endpoint"], bucket_name()), None, secret_found=False, policy=TESTBED
    )
    assert result.reason == base.Reason.SECRET_NOT_FOUND
    assert "'s3-creds'" in result.message


async def test_the_published_binding_reaches_the_bucket(s3: dict[str, str]) -> None:
    bucket = bucket_name()
    spec = s3_spec(s3["endpoint"], bucket, createBucket=True, region=s3["region"])
    assert (
        await checks.check_integration(spec, good_secret(s3), secret_found=True, policy=TESTBED)
    ).ok
    data = checks.binding_data(spec, good_secret(s3))
    client = boto3.client(
        "s3",
        endpoint_url=data["endpoint"],
        region_name=data["region"],
        aws_access_key_id=data["accessKeyId"],
        aws_secret_access_key=data["secretAccessKey"],
        config=Config(s3={"addressing_style": "path" if data["pathStyle"] == "true" else "auto"}),
    )
    client.put_object(Bucket=data["bucket"], Key="prd.md", Body=b"# PRD")
    assert client.get_object(Bucket=bucket, Key="prd.md")["Body"].read() == b"# PRD"
