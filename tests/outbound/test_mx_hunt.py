"""Bug hunt: next-hop resolution for relayed mail (RFC 5321 §5.1, RFC 7505 Null MX, RFC 3974).

A real authoritative DNS server (twisted.names, UDP + TCP on one loopback port) serves a zone
built for this hunt. Unlike the shared ``.test`` server it chases CNAMEs the way a recursive
resolver does, truncates UDP answers over 512 bytes with the TC bit (as real servers do for
clients without EDNS), and can be told to SERVFAIL, truncate or stay silent for one
(name, type). Every query is logged so tests can assert what was (not) asked. Receiving peers
are the scripted sinks of ``outbound_sink`` on 127.0.3.x / 127.0.4.x.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import listen_udp_and_tcp, on_reactor, start_reactor
from outbound_sink import Behaviour
from outbound_support import Sinks, deliver, make_entry
from twisted.internet import defer, protocol
from twisted.names import common, dns, server

from kotlin_smtp_py.config import ListenerConfig
from kotlin_smtp_py.outbound.relay import MAX_TARGETS
from kotlin_smtp_py.status import DeliveryStatus, FailureKind, Reason

BODY = b"From: a@origin.test\r\nSubject: mx hunt\r\n\r\nhello\r\n"
PRIM = "127.0.3.1"  # prim.hunt.test: the healthy fallback MX of many domains
US = "127.0.3.2"  # client.test: the relay's own host name (make_config's hostname)

# ------------------------------------------------------------------------------------------
# The zone


def _mx(pref: int, target: str | bytes) -> dns.Record_MX:
    return dns.Record_MX(pref, target.encode() if isinstance(target, str) else target)


def _a(address: str) -> dns.Record_A:
    return dns.Record_A(address)


def _cname(target: str) -> dns.Record_CNAME:
    return dns.Record_CNAME(target.encode())


def _zone() -> dict[bytes, list[Any]]:
    z: dict[str, list[Any]] = {
        "prim.hunt.test": [_a(PRIM)],
        "client.test": [_a(US)],
        # we are a backup MX / the best MX / tied with another host
        "backup.hunt.test": [_mx(10, "prim.hunt.test"), _mx(20, "client.test")],
        "best.hunt.test": [_mx(10, "CLIENT.TEST."), _mx(20, "prim.hunt.test")],
        "tie.hunt.test": [_mx(10, "prim.hunt.test"), _mx(10, "client.test")],
        # our name is the best MX but has no address record in DNS
        "noaddr-self.hunt.test": [_mx(10, "self-noaddr.hunt.test"),
                                  _mx(20, "prim.hunt.test")],
        # an alias of ours: a name we do not know, but the address we listen on
        "selfaddr.hunt.test": [_mx(10, "alias-of-me.hunt.test")],
        "alias-of-me.hunt.test": [_a("127.0.3.8")],
        # RFC 7505
        "null.hunt.test": [_mx(0, ""), _a(PRIM)],
        "mixednull.hunt.test": [_mx(0, ""), _mx(10, "prim.hunt.test")],
        # DNS errors (behaviours below)
        "servfailmx.hunt.test": [_a(PRIM)],
        "hostfail.hunt.test": [_mx(10, "sf-host.hunt.test")],
        "sf-host.hunt.test": [_a(PRIM)],
        "mixedfail.hunt.test": [_mx(10, "gone.hunt.test"), _mx(20, "sf-host.hunt.test")],
        "slowhost.hunt.test": [_mx(10, "slow-host.hunt.test"), _mx(20, "prim.hunt.test")],
        "slow-host.hunt.test": [_a("127.0.3.9")],
        # CNAMEs
        "cnamemx.hunt.test": [_mx(10, "alias.hunt.test")],
        "alias.hunt.test": [_cname("real.hunt.test")],
        "real.hunt.test": [_a("127.0.3.11")],
        "loopmx.hunt.test": [_mx(10, "loop1.hunt.test"), _mx(20, "prim.hunt.test")],
        "onlyloop.hunt.test": [_mx(10, "loop1.hunt.test")],
        "loop1.hunt.test": [_cname("loop2.hunt.test")],
        "loop2.hunt.test": [_cname("loop1.hunt.test")],
        "aliasdom.hunt.test": [_cname("realdom.hunt.test")],
        "realdom.hunt.test": [_mx(10, "real.hunt.test")],
        # an MX "name" that is IPv4 address text (RFC 5321 §5.1: MX names are domain names)
        "iptext.hunt.test": [_mx(10, "127.0.3.14"), _mx(20, "prim.hunt.test")],
        "iptextonly.hunt.test": [_mx(10, "127.0.3.14")],
        # UDP truncation
        "tc.hunt.test": [_mx(10, "prim.hunt.test")],
        # preference ordering
        "eq.hunt.test": [_mx(10, "e1.hunt.test"), _mx(10, "e2.hunt.test"),
                         _mx(10, "e3.hunt.test"), _mx(20, "e4.hunt.test")],
        "e1.hunt.test": [_a("127.0.3.21")],
        "e2.hunt.test": [_a("127.0.3.22")],
        "e3.hunt.test": [_a("127.0.3.23")],
        "e4.hunt.test": [_a("127.0.3.24")],
        # duplicates: one host at two preferences; two names for one address
        "dup.hunt.test": [_mx(10, "d.hunt.test"), _mx(20, "d.hunt.test"),
                          _mx(30, "prim.hunt.test")],
        "d.hunt.test": [_a("127.0.3.30")],
        "dupaddr.hunt.test": [_mx(10, "da1.hunt.test"), _mx(20, "da2.hunt.test"),
                              _mx(30, "prim.hunt.test")],
        "da1.hunt.test": [_a("127.0.3.31")],
        "da2.hunt.test": [_a("127.0.3.31")],
        # session-level failures
        "deadthen554.hunt.test": [_mx(10, "dead.hunt.test"), _mx(20, "r554.hunt.test")],
        "dead.hunt.test": [_a("127.0.3.40")],
        "r554.hunt.test": [_a("127.0.3.41")],
        "ehlo421.hunt.test": [_mx(10, "e421.hunt.test"), _mx(20, "prim.hunt.test")],
        "e421.hunt.test": [_a("127.0.3.42")],
        "allrefused.hunt.test": [_mx(10, "dead.hunt.test"), _mx(10, "dead2.hunt.test"),
                                 _mx(20, "dead3.hunt.test")],
        "dead2.hunt.test": [_a("127.0.3.43")],
        "dead3.hunt.test": [_a("127.0.3.44")],
        "silent3.hunt.test": [_mx(10, "s1.hunt.test"), _mx(10, "s2.hunt.test"),
                              _mx(20, "s3.hunt.test")],
        "s1.hunt.test": [_a("127.0.3.51")],
        "s2.hunt.test": [_a("127.0.3.52")],
        "s3.hunt.test": [_a("127.0.3.53")],
        # name forms: IDN A-labels, upper case and trailing dots, raw UTF-8 in a target
        "xn--bcher-hunt-9db.test": [_mx(10, "xn--mx--joa.hunt.test")],
        "xn--mx--joa.hunt.test": [_a("127.0.3.60")],
        "upper.hunt.test": [_mx(10, "MX-Upper.HUNT.Test.")],
        "mx-upper.hunt.test": [_a("127.0.3.61")],
        "rawutf8.hunt.test": [_mx(10, b"m\xc3\xbc.hunt.test")],
        # fifty MX hosts, preferences 1..50 (the answer needs TCP: > 512 bytes)
        "fifty.hunt.test": [_mx(i, f"m{i}.fifty.hunt.test") for i in range(1, 51)],
        **{f"m{i}.fifty.hunt.test": [_a(f"127.0.4.{i}")] for i in range(1, 51)},
    }
    return {k.lower().encode(): v for k, v in z.items()}


# (name, qtype) → "servfail" | "silent" | "truncate" (UDP only; TCP answers normally)
BEHAVIOUR: dict[tuple[str, int], str] = {
    ("servfailmx.hunt.test", dns.MX): "servfail",
    ("sf-host.hunt.test", dns.A): "servfail",
    ("sf-host.hunt.test", dns.AAAA): "servfail",
    ("slow-host.hunt.test", dns.A): "silent",
    ("slow-host.hunt.test", dns.AAAA): "silent",
    ("tc.hunt.test", dns.MX): "truncate",
}


class HuntAuthority(common.ResolverBase):
    """Authoritative data answered like a recursive resolver would: CNAME chains are followed
    (at most 8 links; a loop ends with the CNAMEs alone), unknown names are NXDOMAIN."""

    def __init__(self, zone: dict[bytes, list[Any]]) -> None:
        common.ResolverBase.__init__(self)  # type: ignore[no-untyped-call]
        self.zone = zone

    def _lookup(self, name: bytes, cls: int, type: int, timeout: Any = None) -> Any:
        current = name.lower()
        if current not in self.zone:
            return defer.fail(dns.AuthoritativeDomainError(name))
        answers: list[dns.RRHeader] = []
        for _ in range(8):
            records = self.zone.get(current)
            if records is None:
                break
            wanted = [r for r in records if r.TYPE == type]
            if wanted:
                answers += [dns.RRHeader(current, type, dns.IN, 60, r, auth=True)
                            for r in wanted]
                break
            cnames = [r for r in records if r.TYPE == dns.CNAME]
            if not cnames:
                break
            answers.append(dns.RRHeader(current, dns.CNAME, dns.IN, 60, cnames[0], auth=True))
            current = cnames[0].name.name.lower()
        return defer.succeed((answers, [], []))


class HuntDnsFactory(server.DNSServerFactory):
    def __init__(self, authority: HuntAuthority) -> None:
        server.DNSServerFactory.__init__(self, authorities=[authority])  # type: ignore[no-untyped-call]
        self.noisy = False
        self.queries: list[tuple[str, int, str]] = []  # (name, qtype, "udp"|"tcp")

    def handleQuery(self, message: Any, proto: Any, address: Any) -> Any:
        query = message.queries[0]
        name = query.name.name.lower().decode("latin-1")
        self.queries.append((name, query.type, "tcp" if address is None else "udp"))
        what = BEHAVIOUR.get((name, query.type))
        if what == "silent":
            return None
        if what == "servfail":
            self.sendReply(proto, self._responseFromMessage(message=message, rCode=dns.ESERVER),
                           address)
            return None
        if what == "truncate" and address is not None:
            reply = self._responseFromMessage(message=message)
            reply.trunc = 1
            self.sendReply(proto, reply, address)
            return None
        return server.DNSServerFactory.handleQuery(self, message, proto, address)

    def sendReply(self, proto: Any, message: Any, address: Any) -> None:
        # Without EDNS a UDP answer holds 512 bytes; real servers set TC and send no records.
        if address is not None and len(message.toStr()) > 512:
            message.answers, message.authority, message.additional = [], [], []
            message.trunc = 1
        server.DNSServerFactory.sendReply(self, proto, message, address)


@dataclasses.dataclass
class HuntDns:
    port: int
    factory: HuntDnsFactory

    def asked(self, name: str, qtype: int | None = None) -> list[tuple[str, int, str]]:
        return [q for q in self.factory.queries
                if q[0] == name and (qtype is None or q[1] == qtype)]


@pytest.fixture(scope="module")
def hunt_dns_server() -> Iterator[HuntDns]:
    start_reactor()
    from twisted.internet import reactor

    factory = HuntDnsFactory(HuntAuthority(_zone()))
    udp, tcp = on_reactor(lambda: listen_udp_and_tcp(
        reactor, dns.DNSDatagramProtocol(factory), factory))
    yield HuntDns(udp.getHost().port, factory)
    on_reactor(lambda: defer.gatherResults([defer.maybeDeferred(p.stopListening)
                                            for p in (udp, tcp)]))


@pytest.fixture
def hunt_dns(hunt_dns_server: HuntDns) -> HuntDns:
    hunt_dns_server.factory.queries.clear()
    return hunt_dns_server


@pytest.fixture
def cfg(make_config: Any, hunt_dns: HuntDns) -> Any:
    def make(dns_timeout_ms: int = 2000, read_ms: int = 1500, **kw: Any) -> Any:
        return make_config(dns_port=hunt_dns.port, dns_timeout_ms=dns_timeout_ms,
                           tls={"readTimeoutMs": read_ms, "connectTimeoutMs": 1000}, **kw)
    return make


def send(config: Any, tmp_path: Path, rcpt: str) -> DeliveryStatus:
    entry, path = make_entry(tmp_path, [rcpt], BODY)
    results = deliver(config, entry, path)
    assert len(results) == 1
    return results[0][1]  # type: ignore[no-any-return]


def summary(status: DeliveryStatus) -> tuple[FailureKind | None, str, Reason | None]:
    return (status.kind, status.enhanced, None if status.ok else status.reason)


class Silent(protocol.Protocol):
    """Accepts the connection and never greets."""


class CountingFactory(protocol.Factory):
    def __init__(self) -> None:
        self.connections = 0

    def buildProtocol(self, addr: Any) -> protocol.Protocol:
        self.connections += 1
        proto = Silent()
        proto.factory = self
        return proto


def listen_raw(sinks: Sinks, factory: protocol.Factory, interface: str) -> Any:
    from twisted.internet import reactor

    factory.noisy = False
    sinks._listeners.append(on_reactor(reactor.listenTCP, sinks.port, factory,
                                       interface=interface))
    return factory


def busy() -> Behaviour:
    return Behaviour(greeting=b"421 4.3.2 busy, try later")


# ------------------------------------------------------------------------------------------
# Mail loops: RFC 5321 §5.1 "The relay host MUST then inspect the list for any of the names or
# addresses by which it might be known in mail transactions. If a matching record is found, all
# records at that preference level and higher-numbered ones MUST be discarded from
# consideration. If there are no records left at that point, it is an error condition, and the
# message MUST be returned as undeliverable."


@pytest.mark.parametrize("domain", ["best.hunt.test", "tie.hunt.test"])
def test_we_are_the_best_mx_bounces_5_4_6_without_connecting(
        sinks: Sinks, cfg: Any, tmp_path: Path, domain: str) -> None:
    prim = sinks.start(PRIM)
    us = sinks.start(US)
    status = send(cfg(), tmp_path, f"u@{domain}")
    assert summary(status) == (FailureKind.PERMANENT, "5.4.6", Reason.DNS)
    assert prim.sessions == [] and us.sessions == []


def test_backup_mx_delivers_to_the_more_preferred_mx(sinks: Sinks, cfg: Any,
                                                     tmp_path: Path) -> None:
    prim = sinks.start(PRIM)
    us = sinks.start(US)
    status = send(cfg(), tmp_path, "u@backup.hunt.test")
    assert status.ok, status
    assert len(prim.transactions) == 1 and us.sessions == []


def test_best_mx_is_us_without_an_address_record_still_loops_back(
        sinks: Sinks, cfg: Any, tmp_path: Path) -> None:
    prim = sinks.start(PRIM)
    config = dataclasses.replace(cfg(), hostname="Self-NoAddr.hunt.test.")
    status = send(config, tmp_path, "u@noaddr-self.hunt.test")
    assert summary(status) == (FailureKind.PERMANENT, "5.4.6", Reason.DNS)
    assert prim.sessions == []


def test_mx_at_our_own_listening_address_is_a_loop(sinks: Sinks, cfg: Any,
                                                   tmp_path: Path) -> None:
    ourselves = sinks.start("127.0.3.8")  # stands in for our own listener
    config = dataclasses.replace(
        cfg(), listeners=[ListenerConfig(port=sinks.port, bindAddress="127.0.3.8")])
    status = send(config, tmp_path, "u@selfaddr.hunt.test")
    assert ourselves.sessions == []
    assert summary(status) == (FailureKind.PERMANENT, "5.4.6", Reason.DNS)


# ------------------------------------------------------------------------------------------
# RFC 7505 Null MX


def test_null_mx_bounces_5_1_10_without_address_fallback(sinks: Sinks, cfg: Any,
                                                         hunt_dns: HuntDns,
                                                         tmp_path: Path) -> None:
    prim = sinks.start(PRIM)  # the domain's own A record points here: it must stay unused
    status = send(cfg(), tmp_path, "u@NULL.Hunt.Test.")
    assert summary(status) == (FailureKind.PERMANENT, "5.1.10", Reason.DNS)
    assert status.code == 556
    assert prim.sessions == []
    assert [q[1] for q in hunt_dns.asked("null.hunt.test")] == [dns.MX]  # no A/AAAA fallback


def test_null_mx_beside_real_mx_never_looks_up_the_root(sinks: Sinks, cfg: Any,
                                                        hunt_dns: HuntDns,
                                                        tmp_path: Path) -> None:
    """RFC 7505 §3 forbids publishing both; the '.' target must never be used as a host."""
    prim = sinks.start(PRIM)
    status = send(cfg(), tmp_path, "u@mixednull.hunt.test")
    assert status.ok or summary(status) == (FailureKind.PERMANENT, "5.1.10", Reason.DNS)
    assert not hunt_dns.asked("")  # no A/AAAA query for the root name
    assert len(prim.transactions) == (1 if status.ok else 0)


# ------------------------------------------------------------------------------------------
# DNS failures: transient, never a bounce, never an implicit MX


def test_mx_servfail_is_transient_and_never_falls_back_to_the_a_record(
        sinks: Sinks, cfg: Any, hunt_dns: HuntDns, tmp_path: Path) -> None:
    prim = sinks.start(PRIM)
    status = send(cfg(), tmp_path, "u@servfailmx.hunt.test")
    assert summary(status) == (FailureKind.TRANSIENT, "4.4.3", Reason.DNS)
    assert prim.sessions == []
    assert not hunt_dns.asked("servfailmx.hunt.test", dns.A)


@pytest.mark.parametrize("domain", ["hostfail.hunt.test", "mixedfail.hunt.test"])
def test_mx_host_address_servfail_is_transient_not_5_4_4(sinks: Sinks, cfg: Any,
                                                         tmp_path: Path, domain: str) -> None:
    prim = sinks.start(PRIM)  # sf-host's real address: the SERVFAIL hides it
    status = send(cfg(), tmp_path, f"u@{domain}")
    assert summary(status) == (FailureKind.TRANSIENT, "4.4.3", Reason.DNS)
    assert status.code // 100 == 4
    assert prim.sessions == []


def test_silent_dns_for_one_mx_host_falls_through_within_the_dns_timeout(
        sinks: Sinks, cfg: Any, tmp_path: Path) -> None:
    slow = sinks.start("127.0.3.9")
    prim = sinks.start(PRIM)
    started = time.monotonic()
    status = send(cfg(dns_timeout_ms=500), tmp_path, "u@slowhost.hunt.test")
    elapsed = time.monotonic() - started
    assert status.ok and status.remote_mta == "prim.hunt.test"
    assert slow.sessions == [] and len(prim.transactions) == 1
    assert elapsed < 5.0, elapsed


def test_truncated_udp_answer_is_asked_again_over_tcp(sinks: Sinks, cfg: Any,
                                                      hunt_dns: HuntDns,
                                                      tmp_path: Path) -> None:
    prim = sinks.start(PRIM)
    status = send(cfg(), tmp_path, "u@tc.hunt.test")
    assert status.ok, status
    assert len(prim.transactions) == 1
    assert [q[2] for q in hunt_dns.asked("tc.hunt.test", dns.MX)] == ["udp", "tcp"]


# ------------------------------------------------------------------------------------------
# CNAMEs and odd MX names


def test_mx_target_that_is_a_cname_is_tolerated(sinks: Sinks, cfg: Any,
                                                tmp_path: Path) -> None:
    real = sinks.start("127.0.3.11")
    status = send(cfg(), tmp_path, "u@cnamemx.hunt.test")
    assert status.ok, status
    assert len(real.transactions) == 1


def test_recipient_domain_that_is_a_cname_uses_the_canonical_mx(sinks: Sinks, cfg: Any,
                                                                tmp_path: Path) -> None:
    """RFC 5321 §5.1: "If a CNAME record is found, the resulting name is processed as if it
    were the initial name" — the alias's MX, not an implicit MX of the alias."""
    real = sinks.start("127.0.3.11")
    status = send(cfg(), tmp_path, "u@aliasdom.hunt.test")
    assert status.ok and status.remote_mta == "real.hunt.test", status
    assert len(real.transactions) == 1


def test_cname_loop_mx_target_is_skipped_quickly(sinks: Sinks, cfg: Any, hunt_dns: HuntDns,
                                                 tmp_path: Path) -> None:
    prim = sinks.start(PRIM)
    started = time.monotonic()
    status = send(cfg(), tmp_path, "u@loopmx.hunt.test")
    assert status.ok and status.remote_mta == "prim.hunt.test", status
    assert time.monotonic() - started < 5.0
    assert len(prim.transactions) == 1
    # one A and one AAAA query for the looping name, never a chase of our own
    assert len(hunt_dns.asked("loop1.hunt.test")) == 2
    assert hunt_dns.asked("loop2.hunt.test") == []


def test_only_mx_is_a_cname_loop_fails_without_connecting(sinks: Sinks, cfg: Any,
                                                          tmp_path: Path) -> None:
    prim = sinks.start(PRIM)
    started = time.monotonic()
    status = send(cfg(), tmp_path, "u@onlyloop.hunt.test")
    assert not status.ok and status.reason == Reason.DNS
    assert status.kind in (FailureKind.PERMANENT, FailureKind.TRANSIENT)
    assert prim.sessions == []
    assert time.monotonic() - started < 5.0


def test_ip_address_text_as_mx_name_is_not_used_as_an_address(sinks: Sinks, cfg: Any,
                                                              tmp_path: Path) -> None:
    literal = sinks.start("127.0.3.14")
    prim = sinks.start(PRIM)
    status = send(cfg(), tmp_path, "u@iptext.hunt.test")
    assert status.ok and status.remote_mta == "prim.hunt.test", status
    assert literal.sessions == [] and len(prim.transactions) == 1


def test_only_mx_is_ip_address_text_bounces_without_connecting(sinks: Sinks, cfg: Any,
                                                               tmp_path: Path) -> None:
    literal = sinks.start("127.0.3.14")
    status = send(cfg(), tmp_path, "u@iptextonly.hunt.test")
    assert summary(status) == (FailureKind.PERMANENT, "5.4.4", Reason.DNS)
    assert literal.sessions == []


def test_idn_domain_and_mx_are_looked_up_as_a_labels(sinks: Sinks, cfg: Any,
                                                     hunt_dns: HuntDns,
                                                     tmp_path: Path) -> None:
    sink = sinks.start("127.0.3.60")
    status = send(cfg(), tmp_path, "u@Bücher-Hunt.test")
    assert status.ok and status.remote_mta == "xn--mx--joa.hunt.test", status
    assert len(sink.transactions) == 1
    assert hunt_dns.asked("xn--bcher-hunt-9db.test", dns.MX)


def test_upper_case_mx_target_with_trailing_dot(sinks: Sinks, cfg: Any,
                                                tmp_path: Path) -> None:
    sink = sinks.start("127.0.3.61")
    status = send(cfg(), tmp_path, "u@upper.hunt.test")
    assert status.ok and status.remote_mta == "mx-upper.hunt.test", status
    assert len(sink.transactions) == 1


def test_raw_utf8_mx_target_is_unusable_not_a_dns_outage(sinks: Sinks, cfg: Any,
                                                         hunt_dns: HuntDns,
                                                         tmp_path: Path) -> None:
    status = send(cfg(), tmp_path, "u@rawutf8.hunt.test")
    assert hunt_dns.asked("rawutf8.hunt.test", dns.MX)
    assert summary(status) == (FailureKind.PERMANENT, "5.4.4", Reason.DNS), status


# ------------------------------------------------------------------------------------------
# Preference order, per-attempt bounds, session-level fallbacks


def test_every_best_preference_host_is_tried_once_before_the_next_level(
        sinks: Sinks, cfg: Any, tmp_path: Path) -> None:
    best = [sinks.start(f"127.0.3.2{i}", busy()) for i in (1, 2, 3)]
    backup = sinks.start("127.0.3.24")
    status = send(cfg(), tmp_path, "u@eq.hunt.test")
    assert status.ok and status.remote_mta == "e4.hunt.test", status
    assert [len(f.sessions) for f in best] == [1, 1, 1]
    assert len(backup.transactions) == 1


def test_fifty_mx_hosts_are_bounded_and_tried_in_preference_order(
        sinks: Sinks, cfg: Any, hunt_dns: HuntDns, tmp_path: Path) -> None:
    hosts = [sinks.start(f"127.0.4.{i}", busy()) for i in range(1, 51)]
    started = time.monotonic()
    status = send(cfg(), tmp_path, "u@fifty.hunt.test")
    assert time.monotonic() - started < 15.0
    assert (status.kind, status.code) == (FailureKind.TRANSIENT, 421)
    counts = [len(f.sessions) for f in hosts]
    assert counts == [1] * MAX_TARGETS + [0] * (50 - MAX_TARGETS)
    # the 50-record answer does not fit in 512 bytes: it came over TCP
    assert "tcp" in [q[2] for q in hunt_dns.asked("fifty.hunt.test", dns.MX)]


@pytest.mark.parametrize("domain,address", [("dup.hunt.test", "127.0.3.30"),
                                            ("dupaddr.hunt.test", "127.0.3.31")])
def test_a_host_listed_twice_is_tried_once_per_attempt(sinks: Sinks, cfg: Any,
                                                       tmp_path: Path, domain: str,
                                                       address: str) -> None:
    twice = sinks.start(address, busy())
    prim = sinks.start(PRIM)
    status = send(cfg(), tmp_path, f"u@{domain}")
    assert status.ok and status.remote_mta == "prim.hunt.test", status
    assert len(twice.sessions) == 1
    assert len(prim.transactions) == 1


def test_unreachable_primary_and_554_greeting_backup_is_transient(
        sinks: Sinks, cfg: Any, tmp_path: Path) -> None:
    refusing = sinks.start("127.0.3.41", Behaviour(greeting=b"554 5.7.1 no service for you"))
    status = send(cfg(), tmp_path, "u@deadthen554.hunt.test")  # 127.0.3.40: nothing listens
    assert len(refusing.sessions) == 1
    assert status.kind == FailureKind.TRANSIENT, status


def test_421_to_ehlo_moves_on_to_the_next_mx_in_the_same_attempt(
        sinks: Sinks, cfg: Any, tmp_path: Path) -> None:
    closing = sinks.start("127.0.3.42", Behaviour(ehlo_reply=b"421 4.3.2 shutting down"))
    prim = sinks.start(PRIM)
    status = send(cfg(), tmp_path, "u@ehlo421.hunt.test")
    assert status.ok and status.remote_mta == "prim.hunt.test", status
    assert len(closing.sessions) == 1 and closing.transactions == []
    assert not any(c.upper().startswith("HELO") for c in closing.sessions[0].commands)
    assert len(prim.transactions) == 1


def test_connection_refused_on_every_mx_is_transient_connect_4_4_1(cfg: Any,
                                                                   tmp_path: Path) -> None:
    status = send(cfg(), tmp_path, "u@allrefused.hunt.test")
    assert summary(status) == (FailureKind.TRANSIENT, "4.4.1", Reason.CONNECT)
    assert status.code // 100 == 4


def test_mx_hosts_that_never_greet_are_bounded_by_the_read_timeout(
        sinks: Sinks, cfg: Any, tmp_path: Path) -> None:
    silent = [listen_raw(sinks, CountingFactory(), f"127.0.3.5{i}") for i in (1, 2, 3)]
    started = time.monotonic()
    status = send(cfg(read_ms=400), tmp_path, "u@silent3.hunt.test")
    elapsed = time.monotonic() - started
    assert status.kind == FailureKind.TRANSIENT
    assert status.reason in (Reason.TIMEOUT, Reason.CONNECT)
    assert [f.connections for f in silent] == [1, 1, 1]
    assert elapsed < 3 * 0.4 + 3.0, elapsed

