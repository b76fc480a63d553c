"""Read the Integrations bound into this pod, the servicebinding.io way.

The operator publishes one binding Secret per Integration; the Agent's pod mounts
each as a directory ``$SERVICE_BINDING_ROOT/<integration>/`` with one file per key.
kubelet builds such a directory out of a hidden timestamped directory, a ``..data``
symlink to it, and one symlink per key through ``..data`` (so that an update is one
atomic rename): the reader follows the visible names only and skips every hidden
entry. The key names are those of `bmad_integrations.binding`, the operator's side
of the same contract.

`read_bindings` returns the raw bindings; `Binding.settings` turns one into the typed
settings of its type, and a missing key is an error that names the file to look at.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from bmad_crds import runtime_contract as contract
from bmad_integrations import binding as layout

ROOT_ENV = contract.SERVICE_BINDING_ROOT


class BindingError(ValueError):
    """A binding is missing a key or holds a value that cannot be used."""


@dataclass(frozen=True, kw_only=True)
class PostgresSettings:
    """A PostgreSQL database: the libpq URI and its pieces."""

    dsn: str
    host: str
    port: int
    database: str
    username: str
    password: str
    ssl_mode: str
    ca_cert: str | None = None  # PEM, for sslmode verify-ca / verify-full


@dataclass(frozen=True, kw_only=True)
class RedisSettings:
    """A Redis server: a ``redis[s]://`` URL and its pieces."""

    url: str
    host: str
    port: int
    db: int = 0
    tls: bool = False
    username: str | None = None
    password: str | None = None
    ca_cert: str | None = None


@dataclass(frozen=True, kw_only=True)
class ObjectStorageSettings:
    """An S3-compatible bucket."""

    endpoint: str
    region: str
    bucket: str
    access_key_id: str
    secret_access_key: str
    path_style: bool = False
    provider: str = "s3"
    ca_cert: str | None = None


@dataclass(frozen=True, kw_only=True)
class StripeSettings:
    """The Stripe API of one account."""

    api_key: str
    api_base: str
    webhook_secret: str | None = None


@dataclass(frozen=True, kw_only=True)
class Auth0Settings:
    """An OIDC issuer whose tokens callers present (and, for M2M, its client)."""

    issuer: str
    audience: str
    jwks_uri: str
    client_id: str | None = None
    client_secret: str | None = None
    domain: str | None = None
    token_endpoint: str | None = None


@dataclass(frozen=True, kw_only=True)
class EmailSettings:
    """An e-mail sender: an SMTP server, or the SendGrid or Mailgun API."""

    provider: str
    host: str | None = None
    port: int | None = None
    username: str | None = None
    password: str | None = None
    api_key: str | None = None
    api_base: str | None = None
    domain: str | None = None
    from_address: str
    start_tls: bool = False


@dataclass(frozen=True, kw_only=True)
class LlmSettings:
    """An LLM API endpoint."""

    provider: str
    base_url: str
    api_key: str | None = None
    default_model: str | None = None


Settings = (
    PostgresSettings
    | RedisSettings
    | ObjectStorageSettings
    | StripeSettings
    | Auth0Settings
    | EmailSettings
    | LlmSettings
)


@dataclass(frozen=True)
class Binding:
    """One mounted binding: its name (the Integration's), where it is, its keys."""

    name: str
    path: Path
    data: Mapping[str, str] = field(default_factory=dict)

    @property
    def type(self) -> str:
        return self.require(layout.TYPE)

    @property
    def provider(self) -> str | None:
        return self.get(layout.PROVIDER)

    def get(self, key: str) -> str | None:
        value = self.data.get(key)
        return value if value else None

    def require(self, key: str) -> str:
        value = self.get(key)
        if value is None:
            raise BindingError(
                f"{self.path / key} is missing or empty: the binding Secret of Integration "
                f"{self.name!r} has no key {key!r} (is the Integration Ready, and is this the "
                "binding of the type the agent expects?)"
            )
        return value

    def _number(self, key: str, raw: str) -> int:
        try:
            return int(raw.strip())
        except ValueError:
            raise BindingError(f"{self.path / key} holds {raw!r}, not a number") from None

    def _int(self, key: str) -> int:
        return self._number(key, self.require(key))

    def _optional_int(self, key: str) -> int | None:
        raw = self.get(key)
        return None if raw is None else self._number(key, raw)

    def _flag(self, key: str) -> bool:
        raw = self.get(key)
        if raw is None:
            return False
        value = raw.strip().lower()
        if value in ("true", "1", "yes"):
            return True
        if value in ("false", "0", "no"):
            return False
        raise BindingError(f"{self.path / key} holds {raw!r}, not true or false")

    def settings(self) -> Settings:
        """The typed settings of this binding's type."""
        kind = self.type
        reader = _READERS.get(kind)
        if reader is None:
            raise BindingError(
                f"{self.path / layout.TYPE} says {kind!r}, which this runtime does not know "
                f"(one of {', '.join(sorted(_READERS))})"
            )
        return reader(self)

    def postgres(self) -> PostgresSettings:
        host = self.require(layout.HOST)
        port = self._int(layout.PORT)
        database = self.require(layout.DATABASE)
        username = self.require(layout.USERNAME)
        password = self.require(layout.PASSWORD)
        ssl_mode = self.get(layout.SSL_MODE) or "prefer"
        dsn = self.get(layout.URI) or _postgres_dsn(
            host=host,
            port=port,
            database=database,
            username=username,
            password=password,
            ssl_mode=ssl_mode,
        )
        return PostgresSettings(
            dsn=dsn,
            host=host,
            port=port,
            database=database,
            username=username,
            password=password,
            ssl_mode=ssl_mode,
            ca_cert=self.get(layout.CA_CERT),
        )

    def redis(self) -> RedisSettings:
        host = self.require(layout.HOST)
        port = self._int(layout.PORT)
        db = self._optional_int(layout.DATABASE) or 0
        tls = self._flag(layout.TLS)
        username = self.get(layout.USERNAME)
        password = self.get(layout.PASSWORD)
        url = self.get(layout.URI) or _redis_url(
            host=host, port=port, db=db, tls=tls, username=username, password=password
        )
        return RedisSettings(
            url=url,
            host=host,
            port=port,
            db=db,
            tls=tls,
            username=username,
            password=password,
            ca_cert=self.get(layout.CA_CERT),
        )

    def object_storage(self) -> ObjectStorageSettings:
        return ObjectStorageSettings(
            provider=self.get(layout.PROVIDER) or "s3",
            endpoint=self.require(layout.ENDPOINT),
            region=self.require(layout.REGION),
            bucket=self.require(layout.BUCKET),
            access_key_id=self.require(layout.ACCESS_KEY_ID),
            secret_access_key=self.require(layout.SECRET_ACCESS_KEY),
            path_style=self._flag(layout.PATH_STYLE),
            ca_cert=self.get(layout.CA_CERT),
        )

    def stripe(self) -> StripeSettings:
        return StripeSettings(
            api_key=self.require(layout.API_KEY),
            api_base=self.require(layout.API_BASE),
            webhook_secret=self.get(layout.WEBHOOK_SECRET),
        )

    def auth0(self) -> Auth0Settings:
        return Auth0Settings(
            issuer=self.require(layout.ISSUER),
            audience=self.require(layout.AUDIENCE),
            jwks_uri=self.require(layout.JWKS_URI),
            domain=self.get(layout.DOMAIN),
            token_endpoint=self.get(layout.TOKEN_ENDPOINT),
            client_id=self.get(layout.CLIENT_ID),
            client_secret=self.get(layout.CLIENT_SECRET),
        )

    def email(self) -> EmailSettings:
        provider = self.require(layout.PROVIDER)
        smtp = provider == "smtp"
        return EmailSettings(
            provider=provider,
            from_address=self.require(layout.FROM),
            host=self.require(layout.HOST) if smtp else self.get(layout.HOST),
            port=self._int(layout.PORT) if smtp else self._optional_int(layout.PORT),
            username=self.get(layout.USERNAME),
            password=self.get(layout.PASSWORD),
            api_key=self.get(layout.API_KEY) if smtp else self.require(layout.API_KEY),
            api_base=self.get(layout.API_BASE),
            domain=self.require(layout.DOMAIN)
            if provider == "mailgun"
            else self.get(layout.DOMAIN),
            start_tls=self._flag(layout.START_TLS),
        )

    def llm(self) -> LlmSettings:
        return LlmSettings(
            provider=self.require(layout.PROVIDER),
            base_url=self.require(layout.BASE_URL),
            api_key=self.get(layout.API_KEY),
            default_model=self.get(layout.DEFAULT_MODEL),
        )


_READERS: Mapping[str, Callable[[Binding], Settings]] = {
    "postgres": Binding.postgres,
    "redis": Binding.redis,
    "objectStorage": Binding.object_storage,
    "stripe": Binding.stripe,
    "auth0": Binding.auth0,
    "email": Binding.email,
    "llm": Binding.llm,
}


def _postgres_dsn(
    *, host: str, port: int, database: str, username: str, password: str, ssl_mode: str
) -> str:
    quote = urllib.parse.quote
    return (
        f"postgresql://{quote(username, safe='')}:{quote(password, safe='')}@{_host(host)}:{port}"
        f"/{quote(database, safe='')}?sslmode={ssl_mode}"
    )


def _redis_url(
    *, host: str, port: int, db: int, tls: bool, username: str | None, password: str | None
) -> str:
    quote = urllib.parse.quote
    userinfo = ""
    if username or password:
        userinfo = quote(username or "", safe="")
        if password:
            userinfo += ":" + quote(password, safe="")
        userinfo += "@"
    return f"{'rediss' if tls else 'redis'}://{userinfo}{_host(host)}:{port}/{db}"


def _host(host: str) -> str:
    return f"[{host}]" if ":" in host and not host.startswith("[") else host


def root_from_env() -> Path | None:
    value = os.environ.get(ROOT_ENV)
    return Path(value) if value else None


def read_binding(path: Path) -> Binding:
    """One binding directory: every visible regular file (or symlink to one) is a key."""
    data: dict[str, str] = {}
    for entry in sorted(path.iterdir()):
        if entry.name.startswith("."):
            continue  # kubelet's ..data, ..<timestamp> and anything else hidden
        if not entry.is_file():  # follows symlinks; a dangling one is not a key
            continue
        data[entry.name] = entry.read_text(encoding="utf-8")
    return Binding(name=path.name, path=path, data=data)


def read_bindings(root: Path | None = None) -> dict[str, Binding]:
    """Every binding under ``root`` (default ``$SERVICE_BINDING_ROOT``), by name.

    No root, or a root that does not exist, means no bindings: an Agent that binds no
    Integration gets no volume at all.
    """
    base_dir = root if root is not None else root_from_env()
    if base_dir is None or not base_dir.is_dir():
        return {}
    found: dict[str, Binding] = {}
    for entry in sorted(base_dir.iterdir()):
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        found[entry.name] = read_binding(entry)
    return found


def of_type(bindings: Mapping[str, Binding], type_: str) -> list[Binding]:
    """The bindings of one type, by name (an Agent may bind several)."""
    return [b for _, b in sorted(bindings.items()) if b.get(layout.TYPE) == type_]
