"""MX resolution against a real authoritative DNS server on loopback."""

from __future__ import annotations

from typing import Any

from helpers import on_reactor
from outbound_support import DnsPorts

from kotlin_smtp_py.outbound.mx import MxResolver, MxResult, make_resolver, parse_servers
from kotlin_smtp_py.status import DeliveryStatus, FailureKind, Reason


def resolve(port: int, domain: str, timeout: float = 10.0,
            shuffle: Any = None) -> MxResult | DeliveryStatus:
    from twisted.internet import reactor

    async def go() -> MxResult | DeliveryStatus:
        kwargs = {"shuffle": shuffle} if shuffle else {}
        mx = MxResolver(make_resolver([f"127.0.0.1:{port}"], reactor), reactor, timeout, **kwargs)
        return await mx.resolve(domain)

    return on_reactor(go)  # type: ignore[no-any-return]


def test_parse_servers() -> None:
    assert parse_servers(["127.0.0.1:5353", "[::1]:53", "192.0.2.1", "[::1]"]) == [
        ("127.0.0.1", 5353), ("::1", 53), ("192.0.2.1", 53), ("::1", 53)]


def test_normal_mx(dns_server: DnsPorts) -> None:
    result = resolve(dns_server.port, "normal.test")
    assert isinstance(result, MxResult)
    assert [(h.name, h.addresses) for h in result.hosts] == [("mx.test", ("127.0.0.1",))]
    assert not result.implicit


def test_preference_order_with_equal_preferences_shuffled(dns_server: DnsPorts) -> None:
    orders = set()
    for _ in range(40):
        result = resolve(dns_server.port, "MULTI.test.")
        assert isinstance(result, MxResult)
        names = [h.name for h in result.hosts]
        assert names[0] == "first.multi.test"
        assert names[-1] == "last.multi.test"
        assert sorted(names[1:4]) == ["a.multi.test", "b.multi.test", "c.multi.test"]
        orders.add(tuple(names[1:4]))
        if len(orders) > 1:
            break
    assert len(orders) > 1, "equal-preference MX hosts were never shuffled"


def test_ipv6_addresses_come_before_ipv4(dns_server: DnsPorts) -> None:
    result = resolve(dns_server.port, "multi.test", shuffle=lambda group: None)
    assert isinstance(result, MxResult)
    assert result.hosts[-1].addresses == ("::1", "127.0.1.5")


def test_implicit_mx_only_without_mx_records(dns_server: DnsPorts) -> None:
    result = resolve(dns_server.port, "amx.test")
    assert isinstance(result, MxResult) and result.implicit
    assert result.hosts[0].name == "amx.test"
    assert result.hosts[0].addresses == ("::1", "127.0.0.1")


def test_null_mx_is_permanent_5_1_10(dns_server: DnsPorts) -> None:
    result = resolve(dns_server.port, "nullmx.test")
    assert isinstance(result, DeliveryStatus)
    assert (result.kind, result.enhanced, result.reason) == (
        FailureKind.PERMANENT, "5.1.10", Reason.DNS)


def test_nxdomain_is_permanent(dns_server: DnsPorts) -> None:
    result = resolve(dns_server.port, "does-not-exist.test")
    assert isinstance(result, DeliveryStatus)
    assert (result.kind, result.enhanced, result.reason) == (
        FailureKind.PERMANENT, "5.1.2", Reason.DNS)


def test_no_mx_and_no_address_is_permanent(dns_server: DnsPorts) -> None:
    result = resolve(dns_server.port, "empty.test")
    assert isinstance(result, DeliveryStatus) and result.permanent


def test_mx_host_without_address_is_permanent_5_4_4(dns_server: DnsPorts) -> None:
    result = resolve(dns_server.port, "badmx.test")
    assert isinstance(result, DeliveryStatus)
    assert (result.kind, result.enhanced) == (FailureKind.PERMANENT, "5.4.4")


def test_timeout_is_transient(dns_server: DnsPorts) -> None:
    result = resolve(dns_server.silent_port, "normal.test", timeout=0.3)
    assert isinstance(result, DeliveryStatus)
    assert (result.kind, result.enhanced, result.reason) == (
        FailureKind.TRANSIENT, "4.4.3", Reason.DNS)


def test_servfail_is_transient(dns_server: DnsPorts) -> None:
    result = resolve(dns_server.servfail_port, "normal.test")
    assert isinstance(result, DeliveryStatus)
    assert (result.kind, result.reason) == (FailureKind.TRANSIENT, Reason.DNS)


def test_address_literal_needs_no_dns(dns_server: DnsPorts) -> None:
    result = resolve(dns_server.silent_port, "[127.0.0.1]", timeout=0.3)
    assert isinstance(result, MxResult)
    assert result.hosts[0].addresses == ("127.0.0.1",)
