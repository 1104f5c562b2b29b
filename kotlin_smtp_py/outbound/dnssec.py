"""DNS queries that report whether the answer was DNSSEC-authenticated (the AD bit).

MTA-STS (TXT), TLS-RPT (TXT) and DANE (TLSA, and the MX RRset's security) need the raw DNS
message, which twisted.names' ``lookup*`` API hides. ``SecureDns.query`` sends one query with the
AD bit set (RFC 6840 §5.7: a validating resolver then reports AD=1 for validated data) to the
configured resolvers (``smtp.dns.servers``, else /etc/resolv.conf) and returns the records of the
asked type plus ``authenticated``.

This module does not validate DNSSEC itself: like Postfix and Exim, it trusts the AD bit of a
*validating resolver on a trusted path* (normally 127.0.0.1). Invariants:

* An answer is ``authenticated`` only when the AD bit is set in the reply; never otherwise.
* Truncated UDP answers are retried over TCP; failures (timeout, SERVFAIL, REFUSED) are
  ``status="failure"`` (callers decide), NXDOMAIN is ``status="nxdomain"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import dns

from kotlin_smtp_py.outbound.mx import parse_servers

log = Logger()

TLSA = 52


@dataclass(frozen=True)
class DnsAnswer:
    """Records of the asked type (payload objects), the AD bit, and the outcome class."""

    records: tuple[Any, ...] = ()
    authenticated: bool = False
    status: str = "ok"  # "ok" | "nxdomain" | "failure"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _AdDatagramProtocol(dns.DNSDatagramProtocol):
    """twisted.names' UDP client with the AD bit set in every query."""

    def writeMessage(self, message: Any, address: Any) -> None:
        message.authenticData = True
        super().writeMessage(message, address)  # type: ignore[no-untyped-call]


class _NoController:
    def messageReceived(self, message: Any, protocol: Any, address: Any = None) -> None:
        pass  # late/unsolicited replies are ignored

    def connectionMade(self, protocol: Any) -> None:
        pass

    def connectionLost(self, protocol: Any) -> None:
        pass


class _AdStreamProtocol(dns.DNSProtocol):
    def writeMessage(self, message: Any) -> None:
        message.authenticData = True
        super().writeMessage(message)  # type: ignore[no-untyped-call]

    def connectionMade(self) -> None:
        super().connectionMade()  # type: ignore[no-untyped-call]
        self.ready.callback(self)

    def __init__(self, controller: Any, reactor: Any) -> None:
        super().__init__(controller, reactor)  # type: ignore[no-untyped-call]
        self.ready: defer.Deferred[_AdStreamProtocol] = defer.Deferred()


def _resolv_conf_servers(path: str = "/etc/resolv.conf") -> list[tuple[str, int]]:
    out: list[tuple[str, int]] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as fh:  # small local file
            for line in fh:
                parts = line.split()
                if len(parts) >= 2 and parts[0] == "nameserver":
                    out.append((parts[1], 53))
    except OSError:
        pass
    return out or [("127.0.0.1", 53)]


@dataclass
class SecureDns:
    """AD-aware queries; ``servers`` as in ``smtp.dns.servers`` (``host:port``)."""

    servers: Sequence[str]
    reactor: Any
    timeout: float = 5.0
    _parsed: list[tuple[str, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._parsed = parse_servers(self.servers) if self.servers else _resolv_conf_servers()

    async def query(self, name: str, qtype: int) -> DnsAnswer:
        last = DnsAnswer(status="failure", detail="no resolver")
        for server in self._parsed:
            last = await self._query_one(server, name, qtype)
            if last.status != "failure":
                return last
        return last

    async def _query_one(self, server: tuple[str, int], name: str, qtype: int) -> DnsAnswer:
        query = dns.Query(name.encode("idna") if not name.isascii() else name.encode(), qtype,
                          dns.IN)
        proto = _AdDatagramProtocol(_NoController(), reactor=self.reactor)  # type: ignore[no-untyped-call]
        try:
            d: defer.Deferred[Any] = proto.query(server, [query], timeout=self.timeout)  # type: ignore[no-untyped-call]
            d.addTimeout(self.timeout + 0.5, self.reactor)
            message = await d
            if message.trunc:
                message = await self._tcp(server, query)
        except Exception as exc:
            return DnsAnswer(status="failure", detail=f"{type(exc).__name__}: {exc}"[:200])
        finally:
            if proto.transport is not None:
                proto.transport.stopListening()
        return _answer(message, name, qtype)

    async def _tcp(self, server: tuple[str, int], query: Any) -> Any:
        proto = _AdStreamProtocol(_NoController(), self.reactor)
        ep: Any = (endpoints.TCP6ClientEndpoint(self.reactor, server[0], server[1],  # type: ignore[no-untyped-call]
                                                timeout=self.timeout)
                   if ":" in server[0] else
                   endpoints.TCP4ClientEndpoint(self.reactor, server[0], server[1],
                                                timeout=self.timeout))
        connected: defer.Deferred[Any] = endpoints.connectProtocol(ep, proto)  # type: ignore[no-untyped-call]
        connected.addTimeout(self.timeout + 0.5, self.reactor)
        await connected
        try:
            d: defer.Deferred[Any] = proto.query([query], timeout=self.timeout)  # type: ignore[no-untyped-call]
            d.addTimeout(self.timeout + 0.5, self.reactor)
            return await d
        finally:
            if proto.transport is not None:
                proto.transport.loseConnection()


def _answer(message: Any, name: str, qtype: int) -> DnsAnswer:
    ad = bool(getattr(message, "authenticData", False))
    if message.rCode == dns.ENAME:
        return DnsAnswer(authenticated=ad, status="nxdomain")
    if message.rCode != dns.OK:
        return DnsAnswer(status="failure", detail=f"rcode {message.rCode}")
    records = tuple(rr.payload for rr in message.answers if rr.type == qtype)
    return DnsAnswer(records, authenticated=ad)


def txt_strings(answer: DnsAnswer) -> list[str]:
    """Each TXT record's character-strings joined (RFC 7208 §3.3 style), decoded leniently."""
    out = []
    for rec in answer.records:
        data = getattr(rec, "data", ())
        out.append(b"".join(data).decode("utf-8", "replace"))
    return out


def make_secure_dns(servers: Sequence[str], reactor: IReactorTime, timeout: float) -> SecureDns:
    return SecureDns(list(servers), reactor, timeout)
