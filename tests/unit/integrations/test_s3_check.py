"""Object storage: endpoints and addressing per provider, error mapping, binding layout."""

from __future__ import annotations

import ssl
from typing import Any

import botocore.exceptions
import httpx
import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import base, egress, object_storage
from bmad_integrations import binding as layout

from .policies import OPEN, PUBLIC

pytestmark = pytest.mark.unit

SECRET_KEY = "s3-MARKER-9f8e7d6c5b4a"  # must never show in a message


def block(**fields: Any) -> integration.ObjectStorage:
    spec: dict[str, Any] = {"provider": "s3", "bucket": "bmad-artifacts"}
    spec.update(fields)
    return integration.ObjectStorage.model_validate(spec)


def creds(**data: str) -> base.Credentials:
    values = {"accessKeyId": "AKIAEXAMPLE", "secretAccessKey": SECRET_KEY}
    values.update(data)
    return base.Credentials(secret_name="s3-creds", data=values)


def client_error(code: str, status: int, operation: str = "HeadBucket") -> Exception:
    return botocore.exceptions.ClientError(
        {
            "Error": {"Code": code, "Message": f"{code} happened"},
            "ResponseMetadata": {"HTTPStatusCode": status},
        },
        operation,
    )


def test_gcs_gets_its_default_endpoint_and_region() -> None:
    gcs = block(provider="gcs")
    assert object_storage.endpoint(gcs) == "https://storage.googleapis.com"
    assert object_storage.region(gcs) == "auto"
    assert object_storage.path_style(gcs) is False


def test_s3_without_endpoint_lets_boto_choose_and_binds_the_regional_url() -> None:
    s3 = block(region="eu-west-1")
    assert object_storage.endpoint(s3) is None
    assert object_storage.public_endpoint(s3) == "https://s3.eu-west-1.amazonaws.com"
    assert object_storage.region(block()) == "us-east-1"


def test_minio_is_always_path_style() -> None:
    minio = block(provider="minio", endpoint="http://127.0.0.1:9000")
    assert object_storage.path_style(minio) is True
    assert object_storage.path_style(block(pathStyle=True)) is True


def test_client_config_has_timeouts_no_retries_and_the_addressing_style() -> None:
    config = object_storage.client_config(
        block(provider="minio", endpoint="http://127.0.0.1:9000"), timeout=4
    )
    assert config.connect_timeout == 4
    assert config.read_timeout == 4
    assert config.retries == {"total_max_attempts": 1, "mode": "standard"}
    assert config.s3 == {"addressing_style": "path"}


def test_client_uses_the_endpoint_and_keys() -> None:
    client = object_storage.make_client(
        block(provider="minio", endpoint="http://127.0.0.1:9000", region="eu-central-1"),
        creds(),
        timeout=2,
        http=httpx.Client(),
    )
    try:
        assert client.meta.endpoint_url == "http://127.0.0.1:9000"
        assert client.meta.region_name == "eu-central-1"
        frozen = client._request_signer._credentials.get_frozen_credentials()
        assert frozen.access_key == "AKIAEXAMPLE"
        assert frozen.secret_key == SECRET_KEY
    finally:
        client.close()


def test_client_without_keys_is_secret_key_missing() -> None:
    lacking = base.Credentials(secret_name="s3-creds", data={"accessKeyId": "AKIAEXAMPLE"})
    with pytest.raises(base.CheckError) as caught:
        object_storage.make_client(block(), lacking, timeout=1, http=httpx.Client())
    assert caught.value.reason == base.Reason.SECRET_KEY_MISSING
    assert "'secretAccessKey'" in caught.value.message


def test_client_without_a_secret_ref_says_to_add_one() -> None:
    with pytest.raises(base.CheckError) as caught:
        object_storage.make_client(
            block(), base.Credentials(secret_name=None), timeout=1, http=httpx.Client()
        )
    assert caught.value.reason == base.Reason.INVALID_CONFIGURATION
    assert "spec.secretRef" in caught.value.message


def error(exc: BaseException, **fields: Any) -> base.CheckError:
    return object_storage.error_for(exc, block=block(**fields), creds=creds())


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (client_error("InvalidAccessKeyId", 403), base.Reason.AUTHENTICATION_FAILED),
        (client_error("SignatureDoesNotMatch", 403), base.Reason.AUTHENTICATION_FAILED),
        (client_error("403", 403), base.Reason.AUTHENTICATION_FAILED),
        (client_error("AccessDenied", 403, "CreateBucket"), base.Reason.AUTHENTICATION_FAILED),
        (client_error("404", 404), base.Reason.INVALID_CONFIGURATION),
        (
            client_error("NoSuchBucket", 404, "GetBucketVersioning"),
            base.Reason.INVALID_CONFIGURATION,
        ),
        (client_error("PermanentRedirect", 301), base.Reason.INVALID_CONFIGURATION),
        (
            client_error("BucketAlreadyExists", 409, "CreateBucket"),
            base.Reason.INVALID_CONFIGURATION,
        ),
        (client_error("InternalError", 500), base.Reason.UNREACHABLE),
        (client_error("SlowDown", 503), base.Reason.UNREACHABLE),
        (ValueError("Invalid endpoint: htp:/x"), base.Reason.INVALID_CONFIGURATION),
        (RuntimeError("surprise"), base.Reason.UNREACHABLE),
    ],
)
def test_driver_errors_map_to_reasons(exc: BaseException, reason: base.Reason) -> None:
    assert error(exc).reason == reason


def test_missing_bucket_message_says_how_to_fix_it() -> None:
    found = error(client_error("404", 404))
    assert "'bmad-artifacts'" in found.message
    assert "createBucket" in found.message


def test_auth_message_names_the_key_names_and_quotes_nothing() -> None:
    found = error(client_error("SignatureDoesNotMatch", 403))
    assert "'accessKeyId'" in found.message
    assert "'secretAccessKey'" in found.message
    assert "(SignatureDoesNotMatch)" in found.message  # a code we recognise
    assert "happened" not in found.message  # the server's message
    leaked = error(RuntimeError(f"echoed {SECRET_KEY}"))
    assert SECRET_KEY not in leaked.message
    assert "echoed" not in leaked.message


# --- the whole check, sent through the egress policy ----------------------------------


def run(
    handler: Any, spec: integration.ObjectStorage, policy: egress.Policy = OPEN
) -> base.Checked:
    return object_storage.check_sync(
        spec, creds(), timeout=2, policy=policy, transport=httpx.MockTransport(handler)
    )


def test_every_request_goes_to_the_judged_address_signed_for_the_name() -> None:
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, headers={"Server": "INTERNAL-banner"})

    checked = run(handle, block(provider="minio", endpoint="https://minio.example.test:9000"))
    assert checked.detail == "bucket bmad-artifacts"
    assert checked.server_version is None  # the Server header is not reported
    assert [(r.method, r.url.host, r.url.path) for r in seen] == [
        ("HEAD", PUBLIC, "/bmad-artifacts")
    ]
    assert seen[0].headers["Host"] == "minio.example.test:9000"
    assert seen[0].extensions["sni_hostname"] == "minio.example.test"
    assert "Signature=" in seen[0].headers["Authorization"]


def test_a_missing_bucket_is_created_through_the_same_path() -> None:
    seen: list[str] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request.method)
        return httpx.Response(404 if request.method == "HEAD" else 200)

    spec = block(provider="minio", endpoint="http://minio.example.test", createBucket=True)
    assert run(handle, spec).detail == "bucket bmad-artifacts (created)"
    assert seen == ["HEAD", "PUT"]


def test_an_endpoint_resolving_to_the_metadata_address_is_refused() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise AssertionError("sent")

    policy = egress.Policy(resolver=lambda host, port: ["169.254.169.254"])
    with pytest.raises(base.CheckError) as caught:
        run(handle, block(provider="minio", endpoint="http://minio.example.test"), policy)
    assert caught.value.reason == base.Reason.DESTINATION_NOT_ALLOWED
    assert "spec.objectStorage.endpoint" in caught.value.message


def _tls_failure(request: httpx.Request) -> httpx.Response:
    error = ssl.SSLCertVerificationError(1, "certificate verify failed: INTERNAL.svc")
    error.verify_code = 62
    raise httpx.ConnectError("[SSL: CERTIFICATE_VERIFY_FAILED]", request=request) from error


def _raising(exc: Exception) -> Any:
    def handle(request: httpx.Request) -> httpx.Response:
        raise exc

    return handle


@pytest.mark.parametrize(
    ("handler", "reason"),
    [
        (_raising(httpx.ConnectError("[Errno 111] Connection refused")), base.Reason.UNREACHABLE),
        (_raising(httpx.ConnectTimeout("timed out")), base.Reason.TIMEOUT),
        (_raising(httpx.ReadTimeout("timed out")), base.Reason.TIMEOUT),
        (_tls_failure, base.Reason.TLS_ERROR),
    ],
)
def test_transport_failures_map_to_reasons(handler: Any, reason: base.Reason) -> None:
    with pytest.raises(base.CheckError) as caught:
        run(handler, block(provider="minio", endpoint="https://minio.example.test"))
    assert caught.value.reason == reason
    assert "minio.example.test" in caught.value.message
    assert "INTERNAL" not in caught.value.message
    if reason == base.Reason.TLS_ERROR:
        assert "does not name the host" in caught.value.message


def test_binding_has_the_object_storage_layout() -> None:
    data = object_storage.binding(
        block(provider="minio", endpoint="http://minio.internal:9000", region="eu-1"), creds()
    )
    assert layout.problems(data) == []
    assert data == {
        "type": "objectStorage",
        "provider": "minio",
        "endpoint": "http://minio.internal:9000",
        "region": "eu-1",
        "bucket": "bmad-artifacts",
        "pathStyle": "true",
        "accessKeyId": "AKIAEXAMPLE",
        "secretAccessKey": SECRET_KEY,
    }


def test_binding_for_gcs_states_the_default_endpoint() -> None:
    data = object_storage.binding(block(provider="gcs"), creds(**{"ca.crt": "PEM"}))
    assert data["endpoint"] == "https://storage.googleapis.com"
    assert data["pathStyle"] == "false"
    assert data["ca.crt"] == "PEM"
