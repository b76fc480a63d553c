"""Object storage (AWS S3, Google Cloud Storage's S3 API, MinIO) through boto3.

The check is HeadBucket with the Integration's keys; when the bucket is missing and
``createBucket`` is set it creates it (and turns versioning on when ``versioning``
is set), so that Workflow artifacts always land in a bucket that exists. boto3 is
synchronous: the whole exchange runs in a worker thread, bounded by botocore's own
connect/read timeouts and with retries switched off.
"""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

GCS_ENDPOINT = "https://storage.googleapis.com"
# GCS accepts any region in the signature; "auto" is what its documentation uses.
GCS_REGION = "auto"
DEFAULT_REGION = "us-east-1"

# Error codes S3-compatible servers answer when the keys are wrong or not allowed.
_AUTH_CODES = frozenset(
    {
        "403",
        "AccessDenied",
        "AllAccessDisabled",
        "InvalidAccessKeyId",
        "SignatureDoesNotMatch",
        "InvalidToken",
        "ExpiredToken",
        "InvalidSecurity",
        "AccountProblem",
    }
)
_MISSING_CODES = frozenset({"404", "NoSuchBucket", "NotFound"})
_REGION_CODES = frozenset(
    {
        "301",
        "PermanentRedirect",
        "AuthorizationHeaderMalformed",
        "IllegalLocationConstraintException",
    }
)


def region(block: integration.ObjectStorage) -> str:
    if block.region:
        return block.region
    return GCS_REGION if block.provider == "gcs" else DEFAULT_REGION


def endpoint(block: integration.ObjectStorage) -> str | None:
    """The URL the client talks to; None lets boto3 pick AWS's regional endpoint."""
    if block.endpoint:
        return block.endpoint
    if block.provider == "gcs":
        return GCS_ENDPOINT
    return None


def public_endpoint(block: integration.ObjectStorage) -> str:
    """The endpoint as the binding states it (AWS's regional one when none is set)."""
    found = endpoint(block)
    if found:
        return found
    where = region(block)
    return f"https://s3.{where}.amazonaws.com"


def path_style(block: integration.ObjectStorage) -> bool:
    return block.path_style or block.provider == "minio"


def client_config(block: integration.ObjectStorage, *, timeout: float) -> botocore.config.Config:
    """Timeouts on every socket operation, exactly one attempt, the addressing style."""
    return botocore.config.Config(
        region_name=region(block),
        connect_timeout=timeout,
        read_timeout=timeout,
        # total_max_attempts counts the first request: 1 means no retry at all
        # (botocore's "max_attempts" counts retries only, so 1 there would mean two).
        retries={"total_max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path" if path_style(block) else "auto"},
    )


def make_client(
    block: integration.ObjectStorage,
    creds: base.Credentials,
    *,
    timeout: float,
    verify: str | bool = True,
) -> S3Client:
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=endpoint(block),
        region_name=region(block),
        aws_access_key_id=creds.require("access_key_id"),
        aws_secret_access_key=creds.require("secret_access_key"),
        config=client_config(block, timeout=timeout),
        verify=verify,
    )


def _code(exc: botocore.exceptions.ClientError) -> tuple[str, int | None]:
    error: Any = exc.response.get("Error", {})
    meta: Any = exc.response.get("ResponseMetadata", {})
    return str(error.get("Code", "")), meta.get("HTTPStatusCode")


def error_for(
    exc: BaseException,
    *,
    block: integration.ObjectStorage,
    creds: base.Credentials,
    timeout: float,
) -> base.CheckError:
    """The CheckError for anything boto3 or the network raised during the check."""
    if isinstance(exc, base.CheckError):
        return exc
    where = public_endpoint(block)
    detail = base.said(exc, creds)
    if isinstance(exc, botocore.exceptions.ClientError):
        code, status = _code(exc)
        if code in _AUTH_CODES or status == 403:
            return base.CheckError(
                base.Reason.AUTHENTICATION_FAILED,
                f"{where} refused the keys for bucket {block.bucket!r} ({detail}): check the "
                f"keys {creds.key('access_key_id')!r} and {creds.key('secret_access_key')!r} "
                "of the credentials Secret, and that they may access (and, with createBucket, "
                "create) the bucket",
            )
        if code in _MISSING_CODES:
            return base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"bucket {block.bucket!r} does not exist at {where}: create it, or set "
                "spec.objectStorage.createBucket to true",
            )
        if code in _REGION_CODES:
            return base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"bucket {block.bucket!r} at {where} is not in region {region(block)!r} "
                f"({detail}): set spec.objectStorage.region to the bucket's region",
            )
        if code == "BucketAlreadyExists":
            return base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"bucket name {block.bucket!r} is taken by another account at {where}: "
                "choose another spec.objectStorage.bucket",
            )
        if status is not None and (status >= 500 or status == 429):
            return base.CheckError(
                base.Reason.UNREACHABLE,
                f"{where} answered {status} ({detail}); the check is retried",
            )
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{where} refused the request for bucket {block.bucket!r} ({detail}): check "
            "spec.objectStorage (provider, endpoint, region, pathStyle)",
        )
    if isinstance(exc, botocore.exceptions.SSLError):
        return base.CheckError(
            base.Reason.TLS_ERROR,
            f"TLS with {where} failed ({detail}): check that the endpoint presents a "
            f"certificate signed by a CA the operator trusts (key {creds.key('ca_cert')!r} "
            "of the credentials Secret), or use an http:// endpoint",
        )
    if isinstance(
        exc,
        botocore.exceptions.ConnectTimeoutError
        | botocore.exceptions.ReadTimeoutError
        | TimeoutError,
    ):
        return base.CheckError(
            base.Reason.TIMEOUT,
            f"{where} did not answer within {timeout:g}s: check spec.objectStorage.endpoint "
            "and that the network lets the operator reach it",
        )
    if isinstance(exc, botocore.exceptions.EndpointConnectionError):
        return base.CheckError(
            base.Reason.UNREACHABLE,
            f"cannot connect to {where} ({detail}): check spec.objectStorage.endpoint and "
            "that the server runs",
        )
    if isinstance(exc, ValueError | botocore.exceptions.ParamValidationError):
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"the object-storage client refused the settings ({detail}): check spec.objectStorage",
        )
    return base.CheckError(
        base.Reason.UNREACHABLE,
        f"cannot reach {where} ({type(exc).__name__}: {detail}): check "
        "spec.objectStorage.endpoint and that the server runs",
    )


@contextmanager
def _ca_file(creds: base.Credentials) -> Iterator[str | bool]:
    """botocore takes a CA bundle as a file only: write the Secret's one for the check."""
    ca = creds.get("ca_cert")
    if not ca:
        yield True
        return
    fd, path = tempfile.mkstemp(prefix="bmad-ca-", suffix=".pem")
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(ca)
        yield path
    finally:
        os.unlink(path)


def check_sync(
    block: integration.ObjectStorage, creds: base.Credentials, *, timeout: float
) -> base.Checked:
    """The whole check, blocking: run it in a worker thread."""
    with _ca_file(creds) as verify:
        try:
            s3 = make_client(block, creds, timeout=timeout, verify=verify)
        except Exception as exc:
            raise error_for(exc, block=block, creds=creds, timeout=timeout) from None
        try:
            return _check_bucket(s3, block)
        except Exception as exc:
            raise error_for(exc, block=block, creds=creds, timeout=timeout) from None
        finally:
            s3.close()


def _check_bucket(s3: S3Client, block: integration.ObjectStorage) -> base.Checked:
    notes: list[str] = []
    try:
        head = s3.head_bucket(Bucket=block.bucket)
        headers = head["ResponseMetadata"]["HTTPHeaders"]
    except botocore.exceptions.ClientError as exc:
        if _code(exc)[0] not in _MISSING_CODES or not block.create_bucket:
            raise
        headers = _create(s3, block)
        notes.append("created")
        if block.versioning:
            _enable_versioning(s3, block)
            notes.append("versioning enabled")
    else:
        if block.versioning:
            status = s3.get_bucket_versioning(Bucket=block.bucket).get("Status")
            if status != "Enabled":
                _enable_versioning(s3, block)
                notes.append("versioning enabled")
            else:
                notes.append("versioned")
    server = headers.get("server")
    detail = f"bucket {block.bucket}" + (f" ({', '.join(notes)})" if notes else "")
    return base.Checked(server_version=server or None, detail=detail)


def _create(s3: S3Client, block: integration.ObjectStorage) -> dict[str, str]:
    where = region(block)
    try:
        if block.provider == "s3" and where != DEFAULT_REGION:
            # AWS wants the region spelled out for every region but us-east-1.
            created = s3.create_bucket(
                Bucket=block.bucket,
                CreateBucketConfiguration={"LocationConstraint": where},  # type: ignore[typeddict-item]
            )
        else:
            created = s3.create_bucket(Bucket=block.bucket)
    except botocore.exceptions.ClientError as exc:
        if _code(exc)[0] != "BucketAlreadyOwnedByYou":
            raise
        return {}  # created meanwhile by us (another check, another replica)
    return dict(created["ResponseMetadata"]["HTTPHeaders"])


def _enable_versioning(s3: S3Client, block: integration.ObjectStorage) -> None:
    s3.put_bucket_versioning(Bucket=block.bucket, VersioningConfiguration={"Status": "Enabled"})


async def check(
    block: integration.ObjectStorage,
    creds: base.Credentials,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds each network exchange, not the coroutine
) -> base.Checked:
    """HeadBucket; create the bucket (and enable versioning) when the block asks."""
    return await asyncio.to_thread(check_sync, block, creds, timeout=timeout)


def binding(block: integration.ObjectStorage, creds: base.Credentials) -> dict[str, str]:
    """The binding Secret's data: where the bucket is and the keys to reach it."""
    data = {
        "type": "objectStorage",
        "provider": block.provider,
        "endpoint": public_endpoint(block),
        "region": region(block),
        "bucket": block.bucket,
        "pathStyle": "true" if path_style(block) else "false",
        "accessKeyId": creds.require("access_key_id"),
        "secretAccessKey": creds.require("secret_access_key"),
    }
    ca = creds.get("ca_cert")
    if ca:
        data["ca.crt"] = ca
    return data
