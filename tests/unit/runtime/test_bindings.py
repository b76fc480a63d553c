"""The runtime's binding reader, on directories laid out as kubelet mounts Secrets."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import pytest

from bmad_crds.v1alpha1 import integration
from bmad_integrations import checks
from bmad_runtime import bindings

pytestmark = pytest.mark.unit


def write_plain(root: Path, name: str, data: Mapping[str, str]) -> Path:
    """A binding as plain files (how a developer or a test writes one by hand)."""
    directory = root / name
    directory.mkdir(parents=True)
    for key, value in data.items():
        (directory / key).write_text(value)
    return directory


def write_kubelet(root: Path, name: str, data: Mapping[str, str]) -> Path:
    """A binding as kubelet mounts a Secret volume: a hidden timestamped directory,
    ``..data`` pointing at it, and one visible symlink per key through ``..data``."""
    directory = root / name
    stamped = directory / "..2026_01_02_03_04_05.000000001"
    stamped.mkdir(parents=True)
    for key, value in data.items():
        (stamped / key).write_text(value)
    (directory / "..data").symlink_to(stamped.name)
    for key in data:
        (directory / key).symlink_to(Path("..data") / key)
    return directory


POSTGRES = {
    "type": "postgres",
    "provider": "postgresql",
    "host": "db.internal",
    "port": "5432",
    "database": "agents",
    "username": "bmad",
    "password": "pw-1234",
    "sslMode": "require",
    "uri": "postgresql://bmad:pw-1234@db.internal:5432/agents?sslmode=require",
}


def test_reads_a_kubelet_mounted_binding_and_skips_hidden_entries(tmp_path: Path) -> None:
    write_kubelet(tmp_path, "main-db", POSTGRES)
    found = bindings.read_bindings(tmp_path)
    assert list(found) == ["main-db"]
    binding = found["main-db"]
    assert dict(binding.data) == POSTGRES
    assert binding.type == "postgres"
    assert binding.provider == "postgresql"
    assert binding.path == tmp_path / "main-db"


def test_hidden_directories_and_stray_files_at_the_root_are_not_bindings(tmp_path: Path) -> None:
    write_plain(tmp_path, "cache", {"type": "redis", "host": "h", "port": "6379"})
    (tmp_path / "..data").mkdir()
    (tmp_path / "README").write_text("not a binding")
    assert list(bindings.read_bindings(tmp_path)) == ["cache"]


def test_a_dangling_symlink_is_not_a_key(tmp_path: Path) -> None:
    directory = write_plain(tmp_path, "cache", {"type": "redis"})
    (directory / "password").symlink_to("..data/password")  # the target is gone
    assert dict(bindings.read_bindings(tmp_path)["cache"].data) == {"type": "redis"}


def test_the_root_comes_from_service_binding_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_plain(tmp_path, "billing", {"type": "stripe"})
    monkeypatch.setenv("SERVICE_BINDING_ROOT", str(tmp_path))
    assert list(bindings.read_bindings()) == ["billing"]


def test_no_root_means_no_bindings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SERVICE_BINDING_ROOT", raising=False)
    assert bindings.read_bindings() == {}
    assert bindings.read_bindings(tmp_path / "absent") == {}


def test_postgres_settings(tmp_path: Path) -> None:
    write_kubelet(tmp_path, "main-db", {**POSTGRES, "ca.crt": "PEM"})
    settings = bindings.read_bindings(tmp_path)["main-db"].settings()
    assert settings == bindings.PostgresSettings(
        dsn=POSTGRES["uri"],
        host="db.internal",
        port=5432,
        database="agents",
        username="bmad",
        password="pw-1234",
        ssl_mode="require",
        ca_cert="PEM",
    )


def test_postgres_dsn_is_built_when_the_uri_is_absent(tmp_path: Path) -> None:
    data = {k: v for k, v in POSTGRES.items() if k != "uri"}
    data["password"] = "p@ss/word"
    write_plain(tmp_path, "db", data)
    settings = bindings.read_bindings(tmp_path)["db"].settings()
    assert isinstance(settings, bindings.PostgresSettings)
    assert settings.dsn == (
        "postgresql://bmad:p%40ss%2Fword@db.internal:5432/agents?sslmode=require"
    )


def test_a_missing_required_key_names_the_file(tmp_path: Path) -> None:
    data = {k: v for k, v in POSTGRES.items() if k != "password"}
    directory = write_kubelet(tmp_path, "main-db", data)
    binding = bindings.read_bindings(tmp_path)["main-db"]
    with pytest.raises(bindings.BindingError) as caught:
        binding.settings()
    assert str(directory / "password") in str(caught.value)
    assert "'main-db'" in str(caught.value)


def test_a_bad_port_names_the_file(tmp_path: Path) -> None:
    directory = write_plain(tmp_path, "db", {**POSTGRES, "port": "fivefourthreetwo"})
    with pytest.raises(bindings.BindingError, match=str(directory / "port")):
        bindings.read_bindings(tmp_path)["db"].settings()


def test_an_unknown_type_is_refused(tmp_path: Path) -> None:
    write_plain(tmp_path, "odd", {"type": "mongo"})
    with pytest.raises(bindings.BindingError, match="'mongo'"):
        bindings.read_bindings(tmp_path)["odd"].settings()


def test_no_type_file_is_an_error_naming_it(tmp_path: Path) -> None:
    directory = write_plain(tmp_path, "odd", {"host": "h"})
    with pytest.raises(bindings.BindingError, match=str(directory / "type")):
        bindings.read_bindings(tmp_path)["odd"].settings()


def test_redis_settings_with_defaults(tmp_path: Path) -> None:
    write_plain(tmp_path, "cache", {"type": "redis", "host": "cache.internal", "port": "6380"})
    settings = bindings.read_bindings(tmp_path)["cache"].settings()
    assert settings == bindings.RedisSettings(
        url="redis://cache.internal:6380/0", host="cache.internal", port=6380
    )


def test_an_invalid_flag_names_the_file(tmp_path: Path) -> None:
    directory = write_plain(
        tmp_path, "cache", {"type": "redis", "host": "h", "port": "1", "tls": "maybe"}
    )
    with pytest.raises(bindings.BindingError, match=str(directory / "tls")):
        bindings.read_bindings(tmp_path)["cache"].settings()


def test_email_requires_host_and_port_for_smtp_only(tmp_path: Path) -> None:
    write_plain(tmp_path, "smtp", {"type": "email", "provider": "smtp", "from": "a@b.test"})
    write_plain(
        tmp_path,
        "sendgrid",
        {"type": "email", "provider": "sendgrid", "from": "a@b.test", "apiKey": "SG.x"},
    )
    found = bindings.read_bindings(tmp_path)
    with pytest.raises(bindings.BindingError, match="host"):
        found["smtp"].settings()
    settings = found["sendgrid"].settings()
    assert isinstance(settings, bindings.EmailSettings)
    assert settings.api_key == "SG.x"
    assert settings.host is None


def test_of_type_selects_bindings_by_type(tmp_path: Path) -> None:
    write_plain(tmp_path, "b-db", {"type": "postgres"})
    write_plain(tmp_path, "a-db", {"type": "postgres"})
    write_plain(tmp_path, "cache", {"type": "redis"})
    found = bindings.of_type(bindings.read_bindings(tmp_path), "postgres")
    assert [b.name for b in found] == ["a-db", "b-db"]


# The operator's side and the runtime's side of the contract, end to end: what
# checks.binding_data publishes, mounted by "kubelet", reads back as typed settings.
ROUND_TRIP: dict[str, tuple[dict[str, object], dict[str, bytes], object]] = {
    "postgres": (
        {"postgres": {"host": "db.internal", "port": 6432, "database": "agents"}},
        {"username": b"bmad", "password": b"p@ss:1234"},
        bindings.PostgresSettings(
            dsn="postgresql://bmad:p%40ss%3A1234@db.internal:6432/agents?sslmode=prefer",
            host="db.internal",
            port=6432,
            database="agents",
            username="bmad",
            password="p@ss:1234",
            ssl_mode="prefer",
        ),
    ),
    "redis": (
        {"redis": {"host": "cache.internal", "db": 3, "tls": True}},
        {"password": b"pw-1234"},
        bindings.RedisSettings(
            url="rediss://:pw-1234@cache.internal:6379/3",
            host="cache.internal",
            port=6379,
            db=3,
            tls=True,
            password="pw-1234",
        ),
    ),
    "objectStorage": (
        {
            "objectStorage": {
                "provider": "minio",
                "endpoint": "http://minio.internal:9000",
                "bucket": "bmad-artifacts",
            }
        },
        {"accessKeyId": b"minio-key", "secretAccessKey": b"minio-secret"},
        bindings.ObjectStorageSettings(
            endpoint="http://minio.internal:9000",
            region="us-east-1",
            bucket="bmad-artifacts",
            access_key_id="minio-key",
            secret_access_key="minio-secret",
            path_style=True,
            provider="minio",
        ),
    ),
    "stripe": (
        {"stripe": {}},
        {"apiKey": b"sk_test_1234"},
        bindings.StripeSettings(api_key="sk_test_1234", api_base="https://api.stripe.com"),
    ),
}


@pytest.mark.parametrize("type_", list(ROUND_TRIP))
def test_what_the_operator_publishes_reads_back_as_settings(tmp_path: Path, type_: str) -> None:
    block, secret, expected = ROUND_TRIP[type_]
    spec = integration.IntegrationSpec.model_validate(
        {"type": type_, "secretRef": {"name": "creds"}, **block}
    )
    write_kubelet(tmp_path, "svc", checks.binding_data(spec, secret))
    assert bindings.read_bindings(tmp_path)["svc"].settings() == expected


@pytest.mark.parametrize("type_", ["auth0", "email", "llm"])
def test_the_other_types_read_back_too(tmp_path: Path, type_: str) -> None:
    bodies: dict[str, tuple[dict[str, object], dict[str, bytes]]] = {
        "auth0": (
            {"auth0": {"domain": "acme.eu.auth0.com", "audience": "https://api.acme.test"}},
            {},
        ),
        "email": (
            {"email": {"provider": "smtp", "host": "smtp.internal", "from": "noreply@acme.test"}},
            {"username": b"mailer", "password": b"pw-1234"},
        ),
        "llm": ({"llm": {"provider": "anthropic"}}, {"apiKey": b"sk-ant-1234"}),
    }
    block, secret = bodies[type_]
    spec = integration.IntegrationSpec.model_validate(
        {"type": type_, "secretRef": {"name": "creds"}, **block}
    )
    write_kubelet(tmp_path, "svc", checks.binding_data(spec, secret))
    settings = bindings.read_bindings(tmp_path)["svc"].settings()
    if isinstance(settings, bindings.Auth0Settings):
        assert settings.issuer.startswith("https://acme.eu.auth0.com")
        assert settings.audience == "https://api.acme.test"
        assert settings.jwks_uri.endswith("jwks.json")
    elif isinstance(settings, bindings.EmailSettings):
        assert settings.host == "smtp.internal"
        assert settings.port
        assert settings.from_address == "noreply@acme.test"
        assert settings.password == "pw-1234"
    else:
        assert isinstance(settings, bindings.LlmSettings)
        assert settings.provider == "anthropic"
        assert settings.api_key == "sk-ant-1234"
        assert settings.base_url.startswith("https://")


def test_values_are_read_verbatim(tmp_path: Path) -> None:
    write_plain(tmp_path, "s", {"type": "stripe", "apiKey": "sk_test_x\n", "apiBase": "http://x"})
    settings = bindings.read_bindings(tmp_path)["s"].settings()
    assert isinstance(settings, bindings.StripeSettings)
    assert settings.api_key == "sk_test_x\n"


def test_unreadable_root_entries_do_not_break_reading(tmp_path: Path) -> None:
    write_plain(tmp_path, "s", {"type": "stripe"})
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    assert list(bindings.read_bindings(tmp_path)) == ["s"]
