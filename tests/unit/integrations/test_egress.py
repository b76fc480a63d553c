"""The egress policy of Integration checks: rules, defaults, resolution, pinning."""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence

import httpx
import pydantic
import pytest

from bmad_integrations import base, egress, egress_transport
from bmad_operator import settings

from .policies import OPEN, PUBLIC

pytestmark = pytest.mark.unit


def answering(*addresses: str) -> egress.Resolver:
    def resolve(host: str, port: int) -> Sequence[str]:
        return list(addresses)

    return resolve


def refused(policy: egress.Policy, host: str, port: int = 443) -> base.CheckError:
    with pytest.raises(base.CheckError) as caught:
        policy.destination_sync(host, port, field="spec.x.host")
    assert caught.value.reason is base.Reason.DESTINATION_NOT_ALLOWED
    return caught.value


# --- the defaults -------------------------------------------------------------------


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",  # loopback
        "::1",
        "10.96.0.1",  # RFC 1918: a typical service range
        "172.16.5.4",
        "192.168.1.1",
        "169.254.169.254",  # the cloud metadata service (link-local)
        "fd00:ec2::254",  # the same on AWS over IPv6 (unique local)
        "fe80::1",
        "100.64.0.10",  # shared address space (CGNAT, some pod ranges)
        "0.0.0.0",  # noqa: S104 - an address to refuse, not one to bind
        "::",
        "224.0.0.1",  # multicast
        "255.255.255.255",
        "::ffff:169.254.169.254",  # IPv4-mapped
        "64:ff9b::a9fe:a9fe",  # NAT64 of 169.254.169.254
        "2002:a9fe:a9fe::1",  # 6to4 of 169.254.169.254
        "::a00:1",  # IPv4-compatible 10.0.0.1
        "198.18.0.1",  # benchmarking
        "203.0.113.5",  # documentation
    ],
)
def test_non_public_addresses_are_refused_by_default(address: str) -> None:
    error = refused(egress.Policy(), address)
    assert egress.ALLOW_SETTING in error.message
    assert "spec.x.host" in error.message


@pytest.mark.parametrize("address", [PUBLIC, "8.8.8.8", "2606:4700::1111", "64:ff9b::808:808"])
def test_public_addresses_are_allowed_by_default(address: str) -> None:
    assert egress.Policy().destination_sync(address, 443, field="f").address == address


def test_a_name_is_judged_by_every_address_it_resolves_to() -> None:
    policy = egress.Policy(resolver=answering(PUBLIC, "10.0.0.7"))
    error = refused(policy, "mixed.example.test")
    assert "10.0.0.7" not in error.message  # the resolution is not reported
    assert "mixed.example.test:443" in error.message


def test_the_first_judged_address_is_the_one_to_connect_to() -> None:
    asked: list[str] = []

    def resolve(host: str, port: int) -> Sequence[str]:
        asked.append(host)
        return [PUBLIC, "8.8.8.8"]

    found = egress.Policy(resolver=resolve).destination_sync("api.example.test", 443, field="f")
    assert found == egress.Destination("api.example.test", 443, PUBLIC)
    assert found.pinned
    assert asked == ["api.example.test"]


def test_an_address_needs_no_resolver() -> None:
    def resolve(host: str, port: int) -> Sequence[str]:
        raise AssertionError("asked")

    found = egress.Policy(resolver=resolve).destination_sync("[2606:4700::1111]", 443, field="f")
    assert found.address == "2606:4700::1111"
    assert not found.pinned


def test_a_name_that_does_not_resolve_is_unreachable() -> None:
    def resolve(host: str, port: int) -> Sequence[str]:
        raise OSError(-2, "Name or service not known")

    with pytest.raises(base.CheckError) as caught:
        egress.Policy(resolver=resolve).destination_sync("nowhere.test", 5432, field="spec.x")
    assert caught.value.reason is base.Reason.UNREACHABLE
    assert "cannot resolve the host 'nowhere.test'" in caught.value.message


# --- allow, deny, ports -------------------------------------------------------------


def test_an_allowed_range_lets_a_private_address_through() -> None:
    policy = egress.Policy.parse(allow=["10.0.0.0/8"], resolver=answering("10.1.2.3"))
    assert policy.destination_sync("db.internal", 5432, field="f").address == "10.1.2.3"


def test_an_allowed_name_lets_whatever_it_resolves_to_through() -> None:
    policy = egress.Policy.parse(
        allow=["pg.shared.svc.cluster.local"], resolver=answering("10.96.4.4")
    )
    assert policy.destination_sync("pg.shared.svc.cluster.local", 5432, field="f")
    refused(policy, "other.shared.svc.cluster.local")


def test_a_suffix_allows_subdomains_only() -> None:
    policy = egress.Policy.parse(allow=[".db.internal"], resolver=answering("10.0.0.5"))
    assert policy.destination_sync("pg.db.internal", 5432, field="f")
    assert policy.destination_sync("PG.DB.internal.", 5432, field="f")  # case, final dot
    refused(policy, "db.internal", 5432)
    refused(policy, "evil-db.internal", 5432)


def test_an_allow_rule_with_a_port_allows_that_port_only() -> None:
    policy = egress.Policy.parse(allow=["10.1.2.3:5432"])
    assert policy.destination_sync("10.1.2.3", 5432, field="f")
    refused(policy, "10.1.2.3", 22)


def test_a_deny_rule_refuses_public_destinations_and_allow_makes_exceptions() -> None:
    policy = egress.Policy.parse(
        deny=["203.0.114.0/24", ".corp.example", "8.8.8.8:53"],
        allow=["203.0.114.7"],
        resolver=answering(PUBLIC),
    )
    assert policy.destination_sync(PUBLIC, 443, field="f")
    error = refused(policy, "203.0.114.8")
    assert egress.DENY_SETTING in error.message
    refused(policy, "wiki.corp.example")
    refused(policy, "8.8.8.8", 53)
    assert policy.destination_sync("8.8.8.8", 443, field="f")


def test_a_list_of_ports_refuses_the_others_unless_allowed() -> None:
    policy = egress.Policy.parse(ports=[443, 5432], allow=["10.0.0.9"])
    assert policy.destination_sync(PUBLIC, 443, field="f")
    error = refused(policy, PUBLIC, 8080)
    assert egress.PORTS_SETTING in error.message
    assert policy.destination_sync("10.0.0.9", 8080, field="f")  # named by an allow rule


def test_names_means_a_host_or_a_single_address_not_a_range() -> None:
    policy = egress.Policy.parse(allow=["10.0.0.0/8", "10.1.1.1", "keys.example.test:443"])
    assert not policy.names("10.2.2.2", 443)
    assert policy.names("10.1.1.1", 8443)
    assert policy.names("keys.example.test", 443)
    assert not policy.names("keys.example.test", 80)


@pytest.mark.parametrize(
    ("text", "network", "name", "subdomains", "port"),
    [
        ("10.0.0.0/8", "10.0.0.0/8", None, False, None),
        ("10.96.0.1/12", "10.96.0.0/12", None, False, None),  # host bits are forgiven
        ("10.1.2.3:5432", "10.1.2.3/32", None, False, 5432),
        ("fd00::/8", "fd00::/8", None, False, None),
        ("[fd00::1]:443", "fd00::1/128", None, False, 443),
        ("[::1]", "::1/128", None, False, None),
        ("DB.Example.Test.", None, "db.example.test", False, None),
        (".svc.cluster.local", None, "svc.cluster.local", True, None),
        ("*.example.test:443", None, "example.test", True, 443),
    ],
)
def test_rules_parse(
    text: str, network: str | None, name: str | None, subdomains: bool, port: int | None
) -> None:
    rule = egress.parse_rule(text, setting=egress.ALLOW_SETTING)
    assert rule.network == (ipaddress.ip_network(network) if network else None)
    assert (rule.name, rule.subdomains, rule.port) == (name, subdomains, port)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("", "empty entry"),
        ("10.0.0.0/8:0", "port '0'"),
        ("db.example.test:http", "port 'http'"),
        ("[fd00::1", "[IPv6"),
        ("bad host!", "neither an IP address"),
        ("http://db.example.test", "is a URL"),
    ],
)
def test_a_bad_rule_says_which_entry_and_what_to_write(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=egress.DENY_SETTING) as caught:
        egress.parse_rule(text, setting=egress.DENY_SETTING)
    assert says in str(caught.value)


# --- HTTP: judged and pinned per request --------------------------------------------


async def test_every_hop_of_a_followed_redirect_is_judged() -> None:
    """The checks follow no redirect; were a client to follow one, the hop is judged."""
    seen: list[httpx.Request] = []

    def handle(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest"})

    transport = egress_transport.AsyncTransport(OPEN, field="f", inner=httpx.MockTransport(handle))
    async with httpx.AsyncClient(transport=transport, follow_redirects=True) as client:
        with pytest.raises(base.CheckError) as caught:
            await client.get("https://api.example.test/")
    assert caught.value.reason is base.Reason.DESTINATION_NOT_ALLOWED
    assert len(seen) == 1


def test_a_pinned_request_keeps_the_name_for_host_and_tls() -> None:
    request = httpx.Request("POST", "https://api.example.test:8443/v1?a=1", content=b"{}")
    pinned = egress.pinned_request(
        request, egress.Destination("api.example.test", 8443, "2606:4700::1111")
    )
    assert str(pinned.url) == "https://[2606:4700::1111]:8443/v1?a=1"
    assert pinned.headers["Host"] == "api.example.test:8443"
    assert pinned.extensions["sni_hostname"] == "api.example.test"
    assert pinned.read() == b"{}"


def test_a_scheme_other_than_http_is_refused_before_resolving() -> None:
    with pytest.raises(httpx.UnsupportedProtocol):
        egress.url_port(httpx.URL("gopher://example.test/"))


# --- the operator's settings --------------------------------------------------------


def test_the_operator_reads_the_settings_the_messages_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(egress.ALLOW_SETTING, "127.0.0.0/8, ::1 ,pg.shared.svc.cluster.local:5432")
    monkeypatch.setenv(egress.DENY_SETTING, "203.0.114.0/24")
    monkeypatch.setenv(egress.PORTS_SETTING, "443,5432")
    policy = settings.OperatorSettings().egress_policy()
    assert [rule.text for rule in policy.allow] == [
        "127.0.0.0/8",
        "::1",
        "pg.shared.svc.cluster.local:5432",
    ]
    assert [rule.text for rule in policy.deny] == ["203.0.114.0/24"]
    assert policy.ports == frozenset({443, 5432})


def test_without_settings_the_operator_allows_no_internal_destination(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in (egress.ALLOW_SETTING, egress.DENY_SETTING, egress.PORTS_SETTING):
        monkeypatch.delenv(name, raising=False)
    assert settings.OperatorSettings().egress_policy() == egress.Policy()


def test_a_bad_entry_stops_the_operator_with_a_message(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(egress.ALLOW_SETTING, "10.0.0.0/8,not a host")
    with pytest.raises(pydantic.ValidationError, match=egress.ALLOW_SETTING):
        settings.OperatorSettings()
