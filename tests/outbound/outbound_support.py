"""Loopback peers for outbound tests: an authoritative DNS server for ``.test``, SMTP sinks,
queue entries and a helper that runs RelayDelivery on the reactor thread."""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import CertSet, free_port, listen_udp_and_tcp, on_reactor, start_reactor
from outbound_sink import Behaviour, SinkFactory, server_tls
from twisted.internet import defer

from kotlin_smtp_py.config import (
    ConnectionCacheConfig,
    DnsConfig,
    OutboundTlsConfig,
    RelayConfig,
    SmtpConfig,
)
from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.spool.record import QueueEntry

ZONE = """
zone = [
    SOA('test', mname='ns.test', rname='root.test', serial=1, refresh=60, retry=60,
        expire=60, minimum=60),
    A('ns.test', '127.0.0.1'),
    A('mx.test', '127.0.0.1'),
    MX('normal.test', 10, 'mx.test'),
    MX('multi.test', 10, 'a.multi.test'),
    MX('multi.test', 10, 'b.multi.test'),
    MX('multi.test', 10, 'c.multi.test'),
    MX('multi.test', 5, 'first.multi.test'),
    MX('multi.test', 20, 'last.multi.test'),
    A('a.multi.test', '127.0.1.1'),
    A('b.multi.test', '127.0.1.2'),
    A('c.multi.test', '127.0.1.3'),
    A('first.multi.test', '127.0.1.4'),
    A('last.multi.test', '127.0.1.5'),
    AAAA('last.multi.test', '::1'),
    MX('deadfirst.test', 10, 'dead.test'),
    MX('deadfirst.test', 20, 'mx.test'),
    A('dead.test', '127.0.0.3'),
    MX('nullmx.test', 0, ''),
    A('amx.test', '127.0.0.1'),
    AAAA('amx.test', '::1'),
    MX('wrongname.test', 10, 'wrong.test'),
    A('wrong.test', '127.0.0.1'),
    MX('busy.test', 10, 'busy.mx.test'),
    MX('busy.test', 20, 'mx.test'),
    A('busy.mx.test', '127.0.0.4'),
    MX('badmx.test', 10, 'nohost.test'),
    A('nodata-only.test', '127.0.0.9'),
    TXT('empty.test', 'nothing here'),
]
"""


@dataclass
class DnsPorts:
    port: int  # authoritative server for .test (UDP + TCP)
    silent_port: int  # a UDP socket that never answers
    servfail_port: int  # a UDP server answering every query with SERVFAIL


def _servfail_protocol() -> Any:
    from twisted.internet.protocol import DatagramProtocol
    from twisted.names import dns

    class ServFail(DatagramProtocol):
        def datagramReceived(self, data: bytes, addr: Any) -> None:
            query = dns.Message()
            query.fromStr(data)
            reply = dns.Message(id=query.id, answer=1, rCode=dns.ESERVER)
            reply.queries = query.queries
            self.transport.write(reply.toStr(), addr)

    return ServFail()


@pytest.fixture(scope="session")
def dns_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DnsPorts]:
    start_reactor()
    from twisted.internet import reactor
    from twisted.names import authority, dns, server

    zonefile = tmp_path_factory.mktemp("dns") / "test.zone.py"
    zonefile.write_text(ZONE)
    def listen() -> list[Any]:
        auth = authority.PySourceAuthority(str(zonefile))
        factory = server.DNSServerFactory(authorities=[auth])
        factory.noisy = False
        udp, tcp = listen_udp_and_tcp(reactor, dns.DNSDatagramProtocol(factory), factory)
        servfail = reactor.listenUDP(0, _servfail_protocol(), interface="127.0.0.1")
        return [udp, tcp, servfail]

    ports = on_reactor(listen)
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    silent.bind(("127.0.0.1", 0))
    yield DnsPorts(ports[0].getHost().port, silent.getsockname()[1], ports[2].getHost().port)
    silent.close()
    on_reactor(lambda: defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports]))


@dataclass
class Sinks:
    """SMTP sinks sharing one port number on several loopback addresses."""

    port: int
    factories: dict[str, SinkFactory] = field(default_factory=dict)
    _listeners: list[Any] = field(default_factory=list)

    def start(self, interface: str = "127.0.0.1",
              behaviour: Behaviour | None = None) -> SinkFactory:
        from twisted.internet import reactor

        factory = SinkFactory(behaviour)
        factory.noisy = False
        self._listeners.append(on_reactor(reactor.listenTCP, self.port, factory,
                                          interface=interface))
        self.factories[interface] = factory
        return factory

    def stop(self) -> None:
        if self._listeners:
            on_reactor(lambda: defer.gatherResults(
                [defer.maybeDeferred(p.stopListening) for p in self._listeners]))


@pytest.fixture
def sinks() -> Iterator[Sinks]:
    start_reactor()
    s = Sinks(free_port())
    yield s
    s.stop()


@pytest.fixture
def tls_context(certs: CertSet) -> Any:
    return server_tls(str(certs.cert), str(certs.key))


@pytest.fixture
def make_config(dns_server: DnsPorts, sinks: Sinks, certs: CertSet) -> Callable[..., SmtpConfig]:
    def make(tls: dict[str, Any] | None = None, relay: dict[str, Any] | None = None,
             dns_port: int | None = None, dns_timeout_ms: int = 2000) -> SmtpConfig:
        tls_args: dict[str, Any] = {"ports": [sinks.port], "caFile": str(certs.ca_cert),
                                    "connectTimeoutMs": 2000, "readTimeoutMs": 2000}
        tls_args.update(tls or {})
        # Sessions end with QUIT here (tests read the sink's transcript); caching is tested
        # on its own with ``relay={"connectionCache": ...}``.
        relay_args: dict[str, Any] = {"enabled": True,
                                      "outboundTls": OutboundTlsConfig(**tls_args),
                                      "connectionCache": ConnectionCacheConfig(enabled=False)}
        relay_args.update(relay or {})
        return SmtpConfig(
            hostname="client.test",
            dns=DnsConfig(servers=[f"127.0.0.1:{dns_port or dns_server.port}"],
                          timeoutMs=dns_timeout_ms),
            relay=RelayConfig(**relay_args))
    return make


def make_entry(tmp_path: Path, recipients: list[str | Recipient], data: bytes,
               sender: str = "sender@origin.test", **envelope: Any) -> tuple[QueueEntry, str]:
    rcpts = tuple(r if isinstance(r, Recipient) else Recipient(r) for r in recipients)
    path = tmp_path / "message.eml"
    path.write_bytes(data)
    env = Envelope(sender=sender, recipients=rcpts, size=len(data), **envelope)
    return QueueEntry("Q1TESTQUEUEID", env, rcpts), str(path)


def deliver(config: SmtpConfig, entry: QueueEntry, path: str,
            recipients: list[Recipient] | None = None) -> Any:
    from twisted.internet import reactor

    from kotlin_smtp_py.outbound.relay import RelayDelivery

    async def go() -> Any:
        relay = RelayDelivery(config, reactor)
        return await relay.deliver(entry, path, recipients or list(entry.pending))

    return on_reactor(go)
