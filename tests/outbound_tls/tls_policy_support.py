"""Loopback fixtures for the outbound TLS policy suite (MTA-STS, DANE, TLS-RPT, REQUIRETLS).

* ``PolicyZone``: an in-memory, mutable twisted.names authority for ``tlsp.test`` served twice —
  once plainly, once by a server that sets the AD bit on every reply. No validating resolver
  can run here (no signed zones, no trust anchor), so the AD-setting server *stands in* for one:
  it is exactly what our client trusts (a validating resolver on a trusted path).
* ``StsWeb``: a local HTTPS server (twisted.web, certificate made at test time for every
  ``mta-sts.<domain>``) serving per-domain policies, counting fetches, able to fail on demand.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from helpers import CertSet, listen_udp_and_tcp, make_certs, on_reactor, start_reactor
from twisted.internet import defer
from twisted.names import authority, dns, server
from twisted.web import resource
from twisted.web.server import Site

ZONE = "tlsp.test"
MX_HOST = f"mx.{ZONE}"
OTHER_MX = f"other.{ZONE}"
STS_DOMAINS = ("enforce", "testing", "rotate", "cached", "relaxed", "report", "rtls-sts", "warm")
PLAIN_DOMAINS = ("dane-ok", "dane-bad", "dane-ta", "dane-noad", "basic", "basic-none", "rtls",
                 "rtls-plain")


def dom(name: str) -> str:
    return f"{name}.{ZONE}"


class Record_TLSA(dns.UnknownRecord):  # twisted.names has no TLSA type: raw RDATA, type 52
    TYPE = 52


class PolicyZone(authority.FileAuthority):
    """Records kept in a dict the tests change while the server runs (on the reactor thread)."""

    def __init__(self) -> None:
        self.insecure: set[str] = set()  # names the AD server answers without AD (unsigned)
        super().__init__("")  # loadFile below ignores the name

    def loadFile(self, filename: str) -> None:
        soa = dns.Record_SOA(mname=f"ns.{ZONE}", rname=f"root.{ZONE}", serial=1, refresh=60,
                             retry=60, expire=60, minimum=60, ttl=60)
        self.soa = (ZONE.encode(), soa)
        self.records: dict[bytes, list[Any]] = {ZONE.encode(): [soa]}
        self.add(MX_HOST, dns.Record_A("127.0.0.1", ttl=60))
        self.add(OTHER_MX, dns.Record_A("127.0.0.1", ttl=60))
        for name in STS_DOMAINS + PLAIN_DOMAINS:
            self.add(dom(name), dns.Record_MX(10, MX_HOST, ttl=60))
            self.add(f"mta-sts.{dom(name)}", dns.Record_A("127.0.0.1", ttl=60))

    def add(self, name: str, record: Any) -> None:
        self.records.setdefault(name.lower().encode(), []).append(record)

    def set_txt(self, name: str, *texts: str) -> None:
        key = name.lower().encode()
        keep = [r for r in self.records.get(key, []) if not isinstance(r, dns.Record_TXT)]
        self.records[key] = keep + [dns.Record_TXT(t.encode(), ttl=60) for t in texts]

    def set_tlsa(self, name: str, *rdata: bytes) -> None:
        key = name.lower().encode()
        keep = [r for r in self.records.get(key, []) if not isinstance(r, Record_TLSA)]
        self.records[key] = keep + [Record_TLSA(d, ttl=60) for d in rdata]


class _AdServerFactory(server.DNSServerFactory):
    def __init__(self, authorities: list[PolicyZone]) -> None:
        super().__init__(authorities=authorities)  # type: ignore[no-untyped-call]
        self.zone = authorities[0]

    def sendReply(self, protocol: Any, message: Any, address: Any) -> None:
        names = {q.name.name.decode().lower() for q in message.queries}
        message.authenticData = not (names & self.zone.insecure)
        super().sendReply(protocol, message, address)  # type: ignore[no-untyped-call]


@dataclass
class PolicyDns:
    zone: PolicyZone
    plain_port: int
    ad_port: int

    def on(self, fn: Any, *args: Any) -> Any:
        return on_reactor(fn, *args)


@pytest.fixture(scope="session")
def policy_dns() -> Iterator[PolicyDns]:
    start_reactor()
    from twisted.internet import reactor

    def listen() -> tuple[PolicyZone, list[Any]]:
        zone = PolicyZone()
        ports = []
        for cls in (server.DNSServerFactory, _AdServerFactory):
            factory = cls(authorities=[zone])
            factory.noisy = False
            udp, tcp = listen_udp_and_tcp(reactor, dns.DNSDatagramProtocol(factory), factory)
            ports += [udp, tcp]
        return zone, ports

    zone, ports = on_reactor(listen)
    yield PolicyDns(zone, ports[0].getHost().port, ports[2].getHost().port)
    on_reactor(lambda: defer.gatherResults([defer.maybeDeferred(p.stopListening) for p in ports]))


@pytest.fixture(scope="session")
def policy_certs(tmp_path_factory: pytest.TempPathFactory) -> CertSet:
    names = (MX_HOST, *[f"mta-sts.{dom(d)}" for d in STS_DOMAINS + PLAIN_DOMAINS])
    return make_certs(tmp_path_factory.mktemp("policy-certs"), names)


class _Policies(resource.Resource):
    isLeaf = True

    def __init__(self, web: StsWeb) -> None:
        super().__init__()
        self.web = web

    def render_GET(self, request: Any) -> bytes:
        host = (request.getHeader("host") or "").split(":")[0].lower()
        domain = host.removeprefix("mta-sts.")
        self.web.fetches.append(domain)
        policy = self.web.policies.get(domain)
        if request.path != b"/.well-known/mta-sts.txt" or policy is None \
                or domain in self.web.failing:
            request.setResponseCode(503 if domain in self.web.failing else 404)
            return b"unavailable"
        request.setHeader(b"content-type", b"text/plain")
        return policy.encode()

    def render_POST(self, request: Any) -> bytes:  # TLS-RPT reports to an https: rua
        host = (request.getHeader("host") or "").split(":")[0].lower()
        self.web.posts.append((host, request.path, request.getHeader("content-type") or "",
                               request.content.read()))
        return b"thanks"


@dataclass
class StsWeb:
    port: int = 0
    policies: dict[str, str] = field(default_factory=dict)
    failing: set[str] = field(default_factory=set)
    fetches: list[str] = field(default_factory=list)
    # TLS-RPT POSTs: (host, path, content type, body)
    posts: list[tuple[str, bytes, str, bytes]] = field(default_factory=list)

    def serve(self, domain: str, mode: str, mx: tuple[str, ...] = (MX_HOST,),
              max_age: int = 86400) -> None:
        lines = ["version: STSv1", f"mode: {mode}", *[f"mx: {m}" for m in mx],
                 f"max_age: {max_age}"]
        self.policies[domain] = "\r\n".join(lines) + "\r\n"


@pytest.fixture(scope="session")
def sts_web(policy_certs: CertSet) -> Iterator[StsWeb]:
    start_reactor()
    from outbound_sink import server_tls
    from twisted.internet import reactor

    web = StsWeb()
    ctx = server_tls(str(policy_certs.cert), str(policy_certs.key))
    site = Site(_Policies(web))
    site.noisy = False
    port = on_reactor(reactor.listenSSL, 0, site, ctx, interface="127.0.0.1")
    web.port = port.getHost().port
    yield web
    on_reactor(port.stopListening)


def announce(policy_dns: PolicyDns, domain: str, policy_id: str) -> None:
    on_reactor(policy_dns.zone.set_txt, f"_mta-sts.{domain}", f"v=STSv1; id={policy_id}")


def policy_config(dns_port: int, sink_port: int, certs: CertSet, spool_dir: Path,
                  policy: dict[str, Any] | None = None, web_port: int = 0,
                  tls: dict[str, Any] | None = None) -> Any:
    from kotlin_smtp_py.config import (
        DaneConfig,
        DnsConfig,
        MtaStsConfig,
        OutboundPolicyConfig,
        OutboundTlsConfig,
        RelayConfig,
        SmtpConfig,
        SpoolConfig,
        TlsRptConfig,
    )

    p = policy or {}
    outbound = OutboundPolicyConfig(
        mtaSts=MtaStsConfig(**{"enabled": False, "httpsPortOverride": web_port,
                               "connectTimeoutMs": 2000, "readTimeoutMs": 2000,
                               **p.get("mtaSts", {})}),
        dane=DaneConfig(**p.get("dane", {})),
        tlsRpt=TlsRptConfig(**p.get("tlsRpt", {})))
    tls_args: dict[str, Any] = {"ports": [sink_port], "caFile": str(certs.ca_cert),
                                "connectTimeoutMs": 2000, "readTimeoutMs": 2000}
    tls_args.update(tls or {})
    return SmtpConfig(
        hostname="client.test", spool=SpoolConfig(dir=str(spool_dir)),
        dns=DnsConfig(servers=[f"127.0.0.1:{dns_port}"], timeoutMs=2000),
        relay=RelayConfig(enabled=True, outboundTls=OutboundTlsConfig(**tls_args),
                          outboundPolicy=outbound))


def relay_attempt(relay: Any, entry: Any, path: str) -> Any:
    """One delivery attempt with an existing RelayDelivery (on the reactor thread)."""
    async def go() -> Any:
        return await relay.deliver(entry, path, list(entry.pending))
    return on_reactor(go)


def make_relay(config: Any, clock: Any = None) -> Any:
    from twisted.internet import reactor

    from kotlin_smtp_py.outbound.relay import RelayDelivery

    return on_reactor(lambda: RelayDelivery(config, reactor, clock=clock))
