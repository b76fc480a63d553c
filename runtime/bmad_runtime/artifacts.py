"""Workflow artifacts (PRDs, architectures, stories…), versioned in object storage.

An `ArtifactStore` reads and writes one tenant's artifacts of one agent or workflow
("scope") in the bucket of an ``objectStorage`` binding. Every object lives under
``{tenant}/{scope}/{name}``; a name may have folders (``stories/1.2.md``) but can
never leave that prefix: empty, ``.`` and ``..`` segments, a leading ``/``,
backslashes and control characters are refused with `ArtifactKeyError` before any
request is made. The bucket is expected to have versioning enabled (the Integration's
``versioning: true``): each `put` then returns a new version id and old versions stay
readable; on an unversioned bucket the version id is S3's ``"null"``.

boto3 is synchronous: every call runs in a worker thread (`asyncio.to_thread`); one
client, which botocore allows to be shared between threads, serves them all.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import boto3
import botocore.config
import botocore.exceptions

from bmad_runtime import bindings

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

UNVERSIONED = "null"
MAX_NAME_LENGTH = 512
MAX_PRESIGN_SECONDS = 7 * 24 * 3600  # the longest SigV4 allows

_SEGMENT = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,251}[A-Za-z0-9])?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MISSING = frozenset({"NoSuchKey", "NoSuchVersion", "404", "NotFound"})


class ArtifactKeyError(ValueError):
    """A name (or tenant, or scope) that would not stay inside the tenant's prefix."""


class ArtifactNotFoundError(LookupError):
    """No such artifact, or no such version of it."""


@dataclass(frozen=True)
class Artifact:
    """One version of one artifact, with its content."""

    name: str
    version: str
    data: bytes
    content_type: str
    etag: str
    last_modified: dt.datetime | None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def text(self, encoding: str = "utf-8") -> str:
        return self.data.decode(encoding)


@dataclass(frozen=True)
class ArtifactVersion:
    """One stored version of an artifact (without its content)."""

    name: str
    version: str
    size: int
    etag: str
    last_modified: dt.datetime | None
    is_latest: bool


def check_segment(value: str, what: str) -> str:
    """A tenant or scope: one path segment of a Kubernetes-style name."""
    if not isinstance(value, str) or not _SEGMENT.match(value) or ".." in value:
        raise ArtifactKeyError(
            f"{what} {value!r} cannot be part of an artifact key: use letters, digits, '.', "
            "'_' and '-', starting and ending with a letter or digit"
        )
    return value


def check_name(name: str) -> str:
    """An artifact name relative to the prefix: folders allowed, escaping not."""
    if not isinstance(name, str) or not name:
        raise ArtifactKeyError("an artifact name must be a non-empty string")
    if len(name.encode()) > MAX_NAME_LENGTH:
        raise ArtifactKeyError(f"artifact name is longer than {MAX_NAME_LENGTH} bytes")
    if name.startswith("/"):
        raise ArtifactKeyError(f"artifact name {name!r} must be relative (no leading '/')")
    if "\\" in name or _CONTROL.search(name):
        raise ArtifactKeyError(f"artifact name {name!r} holds a backslash or a control character")
    for segment in name.split("/"):
        if segment in ("", ".", ".."):
            raise ArtifactKeyError(
                f"artifact name {name!r} has an empty, '.' or '..' segment: names stay "
                "inside the tenant's prefix"
            )
    return name


def artifact_key(*, tenant: str, scope: str, name: str) -> str:
    """``{tenant}/{scope}/{name}``, after checking that it cannot escape that prefix."""
    prefix = f"{check_segment(tenant, 'tenant')}/{check_segment(scope, 'scope')}/"
    return prefix + check_name(name)


def make_client(settings: bindings.ObjectStorageSettings, *, ca_file: str | None) -> S3Client:
    path_style = settings.path_style or settings.provider == "minio"
    config = botocore.config.Config(
        region_name=settings.region,
        signature_version="s3v4",
        connect_timeout=10,
        read_timeout=60,
        retries={"total_max_attempts": 3, "mode": "standard"},
        s3={"addressing_style": "path" if path_style else "auto"},
    )
    session = boto3.session.Session()
    return session.client(
        "s3",
        endpoint_url=settings.endpoint,
        region_name=settings.region,
        aws_access_key_id=settings.access_key_id,
        aws_secret_access_key=settings.secret_access_key,
        config=config,
        verify=ca_file if ca_file else True,
    )


def _code(exc: botocore.exceptions.ClientError) -> str:
    error: Any = exc.response.get("Error", {})
    return str(error.get("Code", ""))


class ArtifactStore:
    """Versioned artifacts of one tenant's agent or workflow in one bucket."""

    def __init__(
        self,
        settings: bindings.ObjectStorageSettings,
        *,
        tenant: str,
        scope: str,
        client: S3Client | None = None,
    ) -> None:
        self.settings = settings
        self.bucket = settings.bucket
        self.tenant = check_segment(tenant, "tenant")
        self.scope = check_segment(scope, "scope")
        self._ca_file: str | None = None
        self._owns_client = client is None
        if client is None:
            if settings.ca_cert:
                # botocore takes a CA bundle as a file only.
                fd, self._ca_file = tempfile.mkstemp(prefix="bmad-s3-ca-", suffix=".pem")
                with os.fdopen(fd, "w") as handle:
                    handle.write(settings.ca_cert)
            client = make_client(settings, ca_file=self._ca_file)
        self.client: S3Client = client

    @property
    def prefix(self) -> str:
        return f"{self.tenant}/{self.scope}/"

    def key(self, name: str) -> str:
        return artifact_key(tenant=self.tenant, scope=self.scope, name=name)

    def for_scope(self, scope: str) -> ArtifactStore:
        """The same tenant and bucket, another agent or workflow (sharing the client)."""
        return ArtifactStore(self.settings, tenant=self.tenant, scope=scope, client=self.client)

    def close(self) -> None:
        if self._owns_client:
            self.client.close()
        if self._ca_file:
            os.unlink(self._ca_file)
            self._ca_file = None

    async def put(
        self,
        name: str,
        data: bytes | str,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Store a new version of ``name``; return its version id."""
        return await self.put_key(
            self.key(name), data, content_type=content_type, metadata=metadata
        )

    async def put_key(
        self,
        key: str,
        data: bytes | str,
        *,
        content_type: str | None = None,
        metadata: Mapping[str, str] | None = None,
    ) -> str:
        """Store a new version under a key someone else chose (a workflow step's
        artifact, keyed by the operator); the key is checked like a name."""
        key = check_name(key)
        if isinstance(data, str):
            body = data.encode()
            kind = content_type or "text/plain; charset=utf-8"
        else:
            body = bytes(data)
            kind = content_type or "application/octet-stream"

        def call() -> str:
            response = self.client.put_object(
                Bucket=self.bucket,
                Key=key,
                Body=body,
                ContentType=kind,
                Metadata=dict(metadata or {}),
            )
            return response.get("VersionId") or UNVERSIONED

        return await asyncio.to_thread(call)

    async def get(self, name: str, version: str | None = None) -> Artifact:
        """The latest version of ``name``, or the given one."""
        return await self._get(self.key(name), version, name=name)

    async def get_key(self, key: str, version: str | None = None) -> Artifact:
        """The latest version under ``key`` (checked like a name), or the given one."""
        key = check_name(key)
        return await self._get(key, version, name=key)

    async def _get(self, key: str, version: str | None, *, name: str) -> Artifact:
        def call() -> Artifact:
            extra: dict[str, Any] = {"VersionId": version} if version else {}
            try:
                response = self.client.get_object(Bucket=self.bucket, Key=key, **extra)
            except botocore.exceptions.ClientError as exc:
                code = _code(exc)
                if code in _MISSING or (version and code == "InvalidArgument"):
                    which = f" version {version!r}" if version else ""
                    under = f" under {self.prefix!r}" if name != key else ""
                    raise ArtifactNotFoundError(
                        f"artifact {name!r}{which} not found{under} in bucket {self.bucket!r}"
                    ) from None
                raise
            with response["Body"] as stream:
                content = stream.read()
            return Artifact(
                name=name,
                version=response.get("VersionId") or UNVERSIONED,
                data=content,
                content_type=response.get("ContentType", "application/octet-stream"),
                etag=response.get("ETag", "").strip('"'),
                last_modified=response.get("LastModified"),
                metadata=dict(response.get("Metadata", {})),
            )

        return await asyncio.to_thread(call)

    async def list_versions(self, name: str) -> list[ArtifactVersion]:
        """Every stored version of ``name``, newest first (deleted ones left out)."""
        key = self.key(name)

        def call() -> list[ArtifactVersion]:
            found: list[ArtifactVersion] = []
            paginator = self.client.get_paginator("list_object_versions")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=key):
                for entry in page.get("Versions", []):
                    if entry.get("Key") != key:
                        continue  # the prefix also matches "name.bak", "name/…"
                    found.append(
                        ArtifactVersion(
                            name=name,
                            version=entry.get("VersionId") or UNVERSIONED,
                            size=int(entry.get("Size", 0)),
                            etag=entry.get("ETag", "").strip('"'),
                            last_modified=entry.get("LastModified"),
                            is_latest=bool(entry.get("IsLatest")),
                        )
                    )
            epoch = dt.datetime.min.replace(tzinfo=dt.UTC)
            found.sort(key=lambda v: (v.is_latest, v.last_modified or epoch), reverse=True)
            return found

        return await asyncio.to_thread(call)

    async def list_artifacts(self, folder: str = "") -> list[str]:
        """The names of the artifacts under this prefix (or one of its folders)."""
        base = self.prefix + (check_name(folder.rstrip("/")) + "/" if folder else "")

        def call() -> list[str]:
            names: list[str] = []
            paginator = self.client.get_paginator("list_objects_v2")
            for page in paginator.paginate(Bucket=self.bucket, Prefix=base):
                names.extend(
                    entry["Key"][len(self.prefix) :]
                    for entry in page.get("Contents", [])
                    if "Key" in entry
                )
            return sorted(names)

        return await asyncio.to_thread(call)

    async def presigned_url(self, name: str, version: str | None = None, expires: int = 300) -> str:
        """A URL that GETs ``name`` (or one version of it) for ``expires`` seconds."""
        if not 1 <= expires <= MAX_PRESIGN_SECONDS:
            raise ValueError(f"expires must be 1..{MAX_PRESIGN_SECONDS} seconds, not {expires}")
        key = self.key(name)
        params: dict[str, Any] = {"Bucket": self.bucket, "Key": key}
        if version:
            params["VersionId"] = version

        def call() -> str:
            return self.client.generate_presigned_url(
                "get_object", Params=params, ExpiresIn=expires, HttpMethod="GET"
            )

        return await asyncio.to_thread(call)
