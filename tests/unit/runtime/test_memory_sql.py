"""The store's pure parts, and a guard: no value is ever formatted into SQL."""

from __future__ import annotations

import ast
import datetime as dt
import inspect
import re
import ssl

import pytest

from bmad_runtime import bindings, context, migrations, ports
from bmad_runtime.memory import (
    audit,
    context_versions,
    conversations,
    scope,
    store,
    turn_records,
    usage,
)

pytestmark = pytest.mark.unit

SQL_MODULES = [
    conversations,
    usage,
    audit,
    context_versions,
    store,
    turn_records,
    migrations,
    context,
]

_SQL = re.compile(
    r"\b(SELECT\s|INSERT\s+INTO|UPDATE\s+\w+\s+SET|DELETE\s+FROM|WHERE\s|VALUES\s*\(|"
    r"CREATE\s+(TABLE|INDEX|FUNCTION|TRIGGER)|ALTER\s+TABLE|DROP\s+(TABLE|INDEX)|"
    r"ORDER\s+BY|GROUP\s+BY|ON\s+CONFLICT)",
    re.IGNORECASE,
)


def formatted_sql(source: str) -> list[str]:
    """Every f-string, %-formatting or .format() call whose literal text looks like SQL."""
    found: list[str] = []
    for node in ast.walk(ast.parse(source)):
        literal = ""
        if isinstance(node, ast.JoinedStr):
            literal = "".join(
                v.value
                for v in node.values
                if isinstance(v, ast.Constant) and isinstance(v.value, str)
            )
        elif (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Mod | ast.Add)
            and isinstance(node.left, ast.Constant)
            and isinstance(node.left.value, str)
        ):
            literal = node.left.value
        elif (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "format"
            and isinstance(node.func.value, ast.Constant)
            and isinstance(node.func.value.value, str)
        ):
            literal = node.func.value.value
        if literal and _SQL.search(literal):
            found.append(ast.unparse(node))
    return found


def test_the_detector_catches_formatted_sql() -> None:
    bad = "\n".join(
        [
            'a = f"SELECT * FROM t WHERE id = {x}"',
            'b = "DELETE FROM t WHERE id = %s" % x',
            'c = "INSERT INTO t VALUES ({})".format(x)',
            'd = "SELECT * FROM t WHERE id = " + x',
            'e = f"the user {x} may not do that"',
        ]
    )
    assert len(formatted_sql(bad)) == 4


@pytest.mark.parametrize("module", SQL_MODULES, ids=lambda m: m.__name__)
def test_no_sql_is_built_by_formatting(module: object) -> None:
    offenders = formatted_sql(inspect.getsource(module))  # type: ignore[arg-type]
    assert offenders == [], f"SQL built by string formatting in {module}: {offenders}"


def test_turns_key_is_namespaced_by_tenant_agent_and_owner() -> None:
    key = conversations.turns_key("c-1", tenant="acme", agent="analyst", owner="auth0|mia")
    mia = conversations.owner_digest("auth0|mia")
    assert key == f"bmad:acme:analyst:conv:{mia}:c-1:turns"
    assert len(mia) == 24
    assert ":" not in mia
    assert mia != conversations.owner_digest("auth0|max")
    # A conversation id with colons stays unambiguous: tenant, agent and the owner's
    # digest cannot hold one.
    assert (
        conversations.turns_key("x:y", tenant="a", agent="b", owner="o:p")
        == f"bmad:a:b:conv:{conversations.owner_digest('o:p')}:x:y:turns"
    )


@pytest.mark.parametrize("bad", ["", "a:b", "a/b", "-a", "a b", "x" * 300])
def test_tenant_and_agent_names_are_checked(bad: str) -> None:
    with pytest.raises(ValueError, match="not a valid name"):
        scope.check_name(bad, "tenant")


def test_conversation_ids_are_checked() -> None:
    assert scope.valid_conversation_id("0192f0c4-uuid:with:colons and spaces")
    assert not scope.valid_conversation_id("")
    assert not scope.valid_conversation_id("a\nb")
    assert not scope.valid_conversation_id("x" * (scope.MAX_CONVERSATION_ID + 1))


def test_month_bounds_are_utc_calendar_months() -> None:
    start, end = usage.month_bounds(dt.datetime(2024, 12, 31, 23, 59, tzinfo=dt.UTC))
    assert start == dt.datetime(2024, 12, 1, tzinfo=dt.UTC)
    assert end == dt.datetime(2025, 1, 1, tzinfo=dt.UTC)
    # 00:30 on 1 March in UTC+02:00 is still February in UTC.
    plus2 = dt.timezone(dt.timedelta(hours=2))
    start, end = usage.month_bounds(dt.datetime(2024, 3, 1, 0, 30, tzinfo=plus2))
    assert (start, end) == (
        dt.datetime(2024, 2, 1, tzinfo=dt.UTC),
        dt.datetime(2024, 3, 1, tzinfo=dt.UTC),
    )


def test_a_conversation_title_is_the_start_of_the_first_user_message() -> None:
    now = dt.datetime.now(dt.UTC)
    assert conversations.title(ports.Turn("c", "user", "Plan the launch\nwith details", now)) == (
        "Plan the launch"
    )
    long = conversations.title(ports.Turn("c", "user", "word " * 40, now))
    assert long is not None
    assert len(long) == conversations.TITLE_LENGTH
    assert conversations.title(ports.Turn("c", "assistant", "hello", now)) is None


def test_migrations_are_ordered_and_their_checksums_stable() -> None:
    versions = [m.version for m in migrations.MIGRATIONS]
    assert versions == sorted(set(versions))
    assert versions[0] == 1
    again = migrations.Migration(1, "x", migrations.MIGRATIONS[0].sql)
    assert again.checksum == migrations.MIGRATIONS[0].checksum


def test_out_of_order_migrations_are_refused() -> None:
    with pytest.raises(migrations.MigrationError):
        migrations._check_order(
            (migrations.Migration(2, "b", "SELECT 1"), migrations.Migration(1, "a", "SELECT 1"))
        )


def self_signed_ca() -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test ca")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def pg_settings(ssl_mode: str, ca_cert: str | None) -> bindings.PostgresSettings:
    return bindings.PostgresSettings(
        dsn=f"postgresql://u:p@db:5432/d?sslmode={ssl_mode}",
        host="db",
        port=5432,
        database="d",
        username="u",
        password="p",
        ssl_mode=ssl_mode,
        ca_cert=ca_cert,
    )


def test_a_binding_sslmode_and_ca_decide_the_transport() -> None:
    """Issue 10, hole 10: the CA is honoured in every mode that uses TLS, require
    verifies with a CA (libpq's verify-ca), and only allow/prefer may go plaintext."""
    ca = self_signed_ca()
    assert store.postgres_transport(pg_settings("disable", ca)).ssl is False
    for mode in ("allow", "prefer"):
        advisory = store.postgres_transport(pg_settings(mode, None))
        assert (advisory.ssl, advisory.plaintext_fallback, advisory.verified) == (mode, True, False)
    prefer = store.postgres_transport(pg_settings("prefer", ca))
    assert isinstance(prefer.ssl, ssl.SSLContext)
    assert prefer.ssl.verify_mode == ssl.CERT_REQUIRED
    assert (prefer.plaintext_fallback, prefer.verified) == (True, True)
    bare = store.postgres_transport(pg_settings("require", None))
    assert isinstance(bare.ssl, ssl.SSLContext)
    assert bare.ssl.verify_mode == ssl.CERT_NONE
    assert (bare.plaintext_fallback, bare.verified) == (False, False)
    for mode in ("require", "verify-ca"):
        chain_only = store.postgres_transport(pg_settings(mode, ca))
        assert isinstance(chain_only.ssl, ssl.SSLContext)
        assert chain_only.ssl.verify_mode == ssl.CERT_REQUIRED
        assert not chain_only.ssl.check_hostname
        assert (chain_only.plaintext_fallback, chain_only.verified) == (False, True)
    for given in (ca, None):  # without a CA: the system's trust store
        full = store.postgres_transport(pg_settings("verify-full", given))
        assert isinstance(full.ssl, ssl.SSLContext)
        assert full.ssl.check_hostname
        assert full.ssl.verify_mode == ssl.CERT_REQUIRED


def test_redis_tls_options_carry_the_binding_ca_and_check_the_host_name() -> None:
    ca = self_signed_ca()

    def redis(tls: bool, ca_cert: str | None) -> bindings.RedisSettings:
        return bindings.RedisSettings(
            url="rediss://h:1/0", host="h", port=1, tls=tls, ca_cert=ca_cert
        )

    assert store.redis_tls_options(None) == {}
    assert store.redis_tls_options(redis(False, ca)) == {}
    assert store.redis_tls_options(redis(True, ca)) == {
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
        "ssl_ca_data": ca,
    }
    assert "ssl_ca_data" not in store.redis_tls_options(redis(True, None))
