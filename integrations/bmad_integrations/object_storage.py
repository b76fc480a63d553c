"""Object storage (AWS S3, Google Cloud Storage's S3 API, MinIO) through boto3.

The check is HeadBucket with the Integration's keys; when the bucket is missing and
``createBucket`` is set it creates it (and turns versioning on when ``versioning``
is set), so that Workflow artifacts always land in a bucket that exists. boto3 is
synchronous: the whole exchange runs in a worker thread with retries switched off.
botocore signs each request; httpx sends it, through the egress policy and bounded by
the check's timeout (see `_sender`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import IO, TYPE_CHECKING, Any, cast

import boto3
import botocore.config
import botocore.exceptions
from botocore.awsrequest import AWSPreparedRequest, AWSResponse
from botocore.compat import HTTPHeaders

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, httpcheck, lazy

if TYPE_CHECKING:
    import httpx
else:  # imported when a client is first built: not at start
    httpx = lazy.module("httpx")

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

GCS_ENDPOINT = "https://storage.googleapis.com"
# GCS accepts any region in the signature; "auto" is what its documentation uses.
GCS_REGION = "auto"
DEFAULT_REGION = "us-east-1"
ENDPOINT_FIELD = "spec.objectStorage.endpoint"

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
    http: httpx.Client,
) -> S3Client:
    """A boto3 S3 client whose every request is sent by `http` (see `_sender`)."""
    session = boto3.session.Session()
    s3 = session.client(
        "s3",
        endpoint_url=endpoint(block),
        region_name=region(block),
        aws_access_key_id=creds.require("access_key_id"),
        aws_secret_access_key=creds.require("secret_access_key"),
        config=client_config(block, timeout=timeout),
    )
    # botocore's stubs type event handlers as returning None; a before-send handler
    # may return the response, which botocore then uses instead of sending.
    handler = cast(Callable[..., None], _sender(http, creds=creds, timeout=timeout))
    s3.meta.events.register_first("before-send.s3", handler)
    return s3


class _Body:
    """What botocore reads a response body from."""

    def __init__(self, content: bytes) -> None:
        self._content = content

    def stream(self, **_: Any) -> Iterator[bytes]:
        yield self._content

    def read(self, amt: int | None = None) -> bytes:
        content, self._content = self._content, b""
        return content


def _sender(
    http: httpx.Client, *, creds: base.Credentials, timeout: float
) -> Callable[..., AWSResponse]:
    """A botocore ``before-send`` handler that sends the signed request itself.

    botocore would open its own connections (urllib3), resolving the endpoint's name
    on its own. Sending through `http` puts every request, region redirects included,
    through the egress policy and onto the judged address. A handler that returns a
    response is what botocore uses instead of sending.
    """

    def send(request: AWSPreparedRequest, **_: Any) -> AWSResponse:
        headers = {
            name: value.decode() if isinstance(value, bytes) else str(value)
            for name, value in request.headers.items()
            if name.lower() != "expect"  # httpx sends the body at once
        }
        try:
            response = http.request(
                request.method, request.url, headers=headers, content=_content(request.body)
            )
        except (httpx.TransportError, httpx.InvalidURL) as exc:
            raise httpcheck.transport_error(
                exc, service="object storage", url=request.url, timeout=timeout, creds=creds
            ) from None
        received = HTTPHeaders()
        for name, value in response.headers.multi_items():
            received[name] = value
        return AWSResponse(request.url, response.status_code, received, _Body(response.content))

    return send


def _content(body: str | bytes | bytearray | IO[bytes] | IO[str] | None) -> bytes:
    if body is None:
        return b""
    if isinstance(body, bytes | bytearray):
        return bytes(body)
    if isinstance(body, str):
        return body.encode()
    read = body.read()
    return read.encode() if isinstance(read, str) else read


def _code(exc: botocore.exceptions.ClientError) -> tuple[str, int | None]:
    error: Any = exc.response.get("Error", {})
    meta: Any = exc.response.get("ResponseMetadata", {})
    return str(error.get("Code", "")), meta.get("HTTPStatusCode")


def error_for(
    exc: BaseException,
    *,
    block: integration.ObjectStorage,
    creds: base.Credentials,
) -> base.CheckError:
    """The CheckError for anything boto3 raised during the check.

    The error code the server answered decides the reason; a message shows it only
    when it is one of the codes recognised here, and never the server's message.
    """
    if isinstance(exc, base.CheckError):
        return exc
    where = public_endpoint(block)
    if isinstance(exc, botocore.exceptions.ClientError):
        code, status = _code(exc)
        if code in _AUTH_CODES or status == 403:
            return base.CheckError(
                base.Reason.AUTHENTICATION_FAILED,
                f"{where} refused the keys for bucket {block.bucket!r} "
                f"({code if code in _AUTH_CODES else status}): check the keys "
                f"{creds.key('access_key_id')!r} and {creds.key('secret_access_key')!r} of "
                "the credentials Secret, and that they may access (and, with createBucket, "
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
                f"({code}): set spec.objectStorage.region to the bucket's region",
            )
        if code == "BucketAlreadyExists":
            return base.CheckError(
                base.Reason.INVALID_CONFIGURATION,
                f"bucket name {block.bucket!r} is taken by another account at {where}: "
                "choose another spec.objectStorage.bucket",
            )
        if status is not None and (status >= 500 or status == 429):
            return base.CheckError(
                base.Reason.UNREACHABLE, f"{where} answered {status}; the check is retried"
            )
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            f"{where} refused the request for bucket {block.bucket!r}"
            + (f" ({status})" if status else "")
            + ": check spec.objectStorage (provider, endpoint, region, pathStyle)",
        )
    if isinstance(exc, ValueError | botocore.exceptions.ParamValidationError):
        return base.CheckError(
            base.Reason.INVALID_CONFIGURATION,
            "the object-storage client refused the settings: check spec.objectStorage",
        )
    return base.CheckError(
        base.Reason.UNREACHABLE,
        f"cannot reach {where} ({type(exc).__name__}): check spec.objectStorage.endpoint and "
        "that the server runs",
    )


def check_sync(
    block: integration.ObjectStorage,
    creds: base.Credentials,
    *,
    timeout: float,
    policy: egress.Policy,
    transport: httpx.BaseTransport | None = None,
) -> base.Checked:
    """The whole check, blocking: run it in a worker thread. `transport` replaces the
    network (tests); the egress policy still applies."""
    if block.endpoint:
        httpcheck.check_base_url(block.endpoint, field=ENDPOINT_FIELD)
    verify = httpcheck.verify_for(creds)
    with httpcheck.sync_client(
        timeout=timeout, policy=policy, field=ENDPOINT_FIELD, verify=verify, transport=transport
    ) as http:
        try:
            s3 = make_client(block, creds, timeout=timeout, http=http)
        except Exception as exc:
            raise error_for(exc, block=block, creds=creds) from None
        try:
            return _check_bucket(s3, block)
        except Exception as exc:
            raise error_for(exc, block=block, creds=creds) from None
        finally:
            s3.close()


def _check_bucket(s3: S3Client, block: integration.ObjectStorage) -> base.Checked:
    notes: list[str] = []
    try:
        s3.head_bucket(Bucket=block.bucket)
    except botocore.exceptions.ClientError as exc:
        if _code(exc)[0] not in _MISSING_CODES or not block.create_bucket:
            raise
        _create(s3, block)
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
    detail = f"bucket {block.bucket}" + (f" ({', '.join(notes)})" if notes else "")
    # No server version: the Server header is the server's own words.
    return base.Checked(detail=detail)


def _create(s3: S3Client, block: integration.ObjectStorage) -> None:
    where = region(block)
    try:
        if block.provider == "s3" and where != DEFAULT_REGION:
            # AWS wants the region spelled out for every region but us-east-1.
            s3.create_bucket(
                Bucket=block.bucket,
                CreateBucketConfiguration={"LocationConstraint": where},  # type: ignore[typeddict-item]
            )
        else:
            s3.create_bucket(Bucket=block.bucket)
    except botocore.exceptions.ClientError as exc:
        # BucketAlreadyOwnedByYou: created meanwhile by us (another check, a replica).
        if _code(exc)[0] != "BucketAlreadyOwnedByYou":
            raise


def _enable_versioning(s3: S3Client, block: integration.ObjectStorage) -> None:
    s3.put_bucket_versioning(Bucket=block.bucket, VersioningConfiguration={"Status": "Enabled"})


async def check(
    block: integration.ObjectStorage,
    creds: base.Credentials,
    *,
    timeout: float,  # noqa: ASYNC109 - bounds each network exchange, not the coroutine
    policy: egress.Policy,
) -> base.Checked:
    """HeadBucket; create the bucket (and enable versioning) when the block asks."""
    return await asyncio.to_thread(check_sync, block, creds, timeout=timeout, policy=policy)


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
