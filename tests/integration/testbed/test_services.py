"""One real round trip per service of the test bed."""

from __future__ import annotations

import mailbox
import secrets
import smtplib
from email.message import EmailMessage

import asyncpg
import boto3
import httpx
import pytest
import redis.asyncio as aioredis
import stripe
from botocore.config import Config
from prometheus_client import CollectorRegistry, Gauge, push_to_gateway

from bmad_testbed.kubectl import eventually

pytestmark = pytest.mark.integration


async def test_postgres_sql_round_trip(postgres_url: str) -> None:
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute("CREATE TEMP TABLE roles (id int primary key, name text)")
        await conn.execute("INSERT INTO roles VALUES ($1, $2)", 7, "analyst")
        row = await conn.fetchrow("SELECT name FROM roles WHERE id = $1", 7)
        version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    assert row is not None
    assert row["name"] == "analyst"
    assert str(version).startswith("15")


async def test_postgres_rejects_a_wrong_password(testbed_env: dict[str, str]) -> None:
    url = testbed_env["BMAD_POSTGRES_URL"].replace(
        testbed_env["BMAD_POSTGRES_PASSWORD"], "wrong-password"
    )
    with pytest.raises(asyncpg.InvalidPasswordError):
        await asyncpg.connect(url)


async def test_redis_command_round_trip(redis_url: str) -> None:
    client = aioredis.from_url(redis_url, decode_responses=True)
    try:
        key = f"bmad:test:{secrets.token_hex(4)}"
        await client.set(key, "dev", ex=60)
        assert await client.get(key) == "dev"
        assert await client.xadd(f"{key}:stream", {"task": "1"})
        assert await client.xlen(f"{key}:stream") == 1
        info = await client.info("server")
        assert str(info["redis_version"]).startswith("7")
    finally:
        await client.aclose()


async def test_postgres_and_redis_serve_tls_with_the_services_ca(
    testbed_env: dict[str, str],
) -> None:
    """The TLS servers: PostgreSQL's URL verifies the certificate (verify-full with the
    CA) and the session is encrypted; Redis's TLS port answers with the CA and the host
    name checked; the plaintext PostgreSQL offers no TLS."""
    conn = await asyncpg.connect(testbed_env["BMAD_POSTGRES_TLS_URL"])
    try:
        encrypted = await conn.fetchval("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
    finally:
        await conn.close()
    assert encrypted is True
    plain = await asyncpg.connect(testbed_env["BMAD_POSTGRES_URL"])
    try:
        assert await plain.fetchval("SHOW ssl") == "off"
    finally:
        await plain.close()
    client = aioredis.from_url(
        testbed_env["BMAD_REDIS_TLS_URL"],
        ssl_ca_certs=testbed_env["BMAD_SERVICES_CA"],
        ssl_check_hostname=True,
    )
    try:
        assert await client.ping()
    finally:
        await client.aclose()


def test_promql_returns_a_sample_pushed_to_the_pushgateway(prometheus: dict[str, str]) -> None:
    job = f"bmad_test_{secrets.token_hex(4)}"
    registry = CollectorRegistry()
    gauge = Gauge("bmad_testbed_probe", "A value pushed by the test suite.", registry=registry)
    gauge.set(42.5)
    push_to_gateway(prometheus["pushgateway"].removeprefix("http://"), job=job, registry=registry)

    def sample() -> float | None:
        resp = httpx.get(
            f"{prometheus['prometheus']}/api/v1/query",
            params={"query": f'bmad_testbed_probe{{job="{job}"}}'},
            timeout=5,
        )
        resp.raise_for_status()
        result = resp.json()["data"]["result"]
        return float(result[0]["value"][1]) if result else None

    assert eventually(sample, timeout=30, what="the pushed sample in Prometheus") == 42.5


def test_s3_put_get_on_minio(s3: dict[str, str]) -> None:
    client = boto3.client(
        "s3",
        endpoint_url=s3["endpoint"],
        aws_access_key_id=s3["access_key"],
        aws_secret_access_key=s3["secret_key"],
        region_name=s3["region"],
        config=Config(s3={"addressing_style": "path"}),
    )
    bucket = f"bmad-test-{secrets.token_hex(4)}"
    client.create_bucket(Bucket=bucket)
    client.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    first = client.put_object(Bucket=bucket, Key="prd.md", Body=b"# PRD v1")
    second = client.put_object(Bucket=bucket, Key="prd.md", Body=b"# PRD v2")
    assert client.get_object(Bucket=bucket, Key="prd.md")["Body"].read() == b"# PRD v2"
    old = client.get_object(Bucket=bucket, Key="prd.md", VersionId=first["VersionId"])
    assert old["Body"].read() == b"# PRD v1"
    assert first["VersionId"] != second["VersionId"]


def test_stripe_customer_created_on_stripe_mock(stripe_api_base: str) -> None:
    client = stripe.StripeClient(
        "sk_test_123", base_addresses={"api": stripe_api_base}, max_network_retries=0
    )
    customer = client.v1.customers.create(
        params={"email": "tenant@example.com", "metadata": {"bmad_tenant": "acme"}}
    )
    assert customer.id.startswith("cus_")
    assert customer.object == "customer"
    fetched = client.v1.customers.retrieve(customer.id)
    assert fetched.object == "customer"


def test_stripe_mock_rejects_a_missing_key(stripe_api_base: str) -> None:
    resp = httpx.get(f"{stripe_api_base}/v1/customers", timeout=5)
    assert resp.status_code == 401


def test_message_delivered_to_the_smtp_server(smtp: dict[str, str]) -> None:
    subject = f"bmad test {secrets.token_hex(4)}"
    msg = EmailMessage()
    msg["From"] = "operator@bmad.test"
    msg["To"] = "admin@tenant.test"
    msg["Subject"] = subject
    msg.set_content("Your agents are ready.")
    with smtplib.SMTP(smtp["host"], int(smtp["port"]), timeout=10) as client:
        client.ehlo()
        refused = client.send_message(msg)
    assert refused == {}

    def delivered() -> bool:
        box = mailbox.Maildir(smtp["maildir"], create=False)
        return any(m["Subject"] == subject for m in box)

    assert eventually(delivered, timeout=10, what="the message in the Maildir")
