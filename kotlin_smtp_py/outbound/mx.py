"""MX resolution for direct delivery (RFC 5321 §5.1, RFC 7505), through twisted.names only.

``MxResolver.resolve(domain)`` returns either an ``MxResult`` (the hosts to try, in order) or a
``DeliveryStatus`` explaining why there is nowhere to go. Invariants:

* MX records are sorted by preference; records with equal preference are shuffled (RFC 5321).
* Implicit MX (the domain's own AAAA/A) is used only when the MX query answers NODATA; never on
  errors or timeouts.
* A Null MX (single ``MX 0 .``) is a permanent failure 5.1.10 and nothing is connected to.
* NXDOMAIN is permanent (5.1.2); SERVFAIL, refusal and timeouts are transient (4.4.3). All DNS
  failures carry reason ``dns``.
* Each host lists its IPv6 addresses before its IPv4 addresses; hosts without any address are
  skipped (transient 4.4.3 when a lookup failed, permanent 5.4.4 when DNS says they don't exist).
* Address literals (``[192.0.2.1]``) are returned as a single host without any DNS query.
"""

from __future__ import annotations

import ipaddress
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.names import client, dns, error
from twisted.names.common import ResolverBase

from kotlin_smtp_py.status import DeliveryStatus, Reason

log = Logger()


@dataclass(frozen=True)
class MxHost:
    """One place to connect to: the name (for TLS verification and logs) and its addresses."""

    name: str
    addresses: tuple[str, ...]
    preference: int = 0


@dataclass(frozen=True)
class MxResult:
    """The ordered hosts for a domain; ``implicit`` when they come from A/AAAA, not MX."""

    domain: str
    hosts: tuple[MxHost, ...]
    implicit: bool = False
    # Every MX name with its preference, before hosts without an address were dropped: the
    # mail-loop check must see our own name even where it has no A/AAAA record.
    names: tuple[tuple[int, str], ...] = ()


class _Lookup:
    """Outcome of one DNS query: records, NODATA (empty), or a failure class."""

    def __init__(self, records: list[Any], nxdomain: bool = False,
                 failure: str | None = None) -> None:
        self.records = records
        self.nxdomain = nxdomain
        self.failure = failure  # "timeout" | "servfail" | None


def parse_servers(servers: Sequence[str]) -> list[tuple[str, int]]:
    """``["127.0.0.1:5353", "[::1]:53", "192.0.2.1"]`` → ``[(host, port), ...]``."""
    out: list[tuple[str, int]] = []
    for item in servers:
        item = item.strip()
        host, port = item, 53
        if item.startswith("["):
            host, _, rest = item[1:].partition("]")
            if rest.startswith(":"):
                port = int(rest[1:])
        elif item.count(":") == 1:
            host, _, p = item.partition(":")
            port = int(p)
        out.append((host, port))
    return out


def make_resolver(servers: Sequence[str], reactor: Any = None) -> ResolverBase:
    """A twisted.names resolver for ``smtp.dns.servers`` (empty = /etc/resolv.conf)."""
    if servers:
        return client.Resolver(servers=parse_servers(servers), reactor=reactor)  # type: ignore[no-untyped-call]
    return client.Resolver(resolv="/etc/resolv.conf", reactor=reactor)  # type: ignore[no-untyped-call]


def _literal_host(domain: str) -> MxHost | None:
    if not (domain.startswith("[") and domain.endswith("]")):
        return None
    inner = domain[1:-1]
    if inner.lower().startswith("ipv6:"):
        inner = inner[5:]
    try:
        ip = ipaddress.ip_address(inner)
    except ValueError:
        return None
    return MxHost(str(ip), (str(ip),))


class MxResolver:
    """Resolve a recipient domain to the ordered list of hosts to try."""

    def __init__(self, resolver: Any, clock: IReactorTime, timeout: float = 5.0,
                 shuffle: Callable[[list[Any]], None] = random.shuffle) -> None:
        self._resolver = resolver
        self._clock = clock
        self._timeout = timeout
        self._shuffle = shuffle

    async def _query(self, kind: int, name: str) -> _Lookup:
        method = {dns.MX: self._resolver.lookupMailExchange,
                  dns.A: self._resolver.lookupAddress,
                  dns.AAAA: self._resolver.lookupIPV6Address}[kind]
        d: defer.Deferred[Any] = defer.maybeDeferred(method, name, timeout=(self._timeout,))
        d.addTimeout(self._timeout + 0.5, self._clock)
        try:
            answers, _authority, _additional = await d
        except error.DNSNameError:
            return _Lookup([], nxdomain=True)
        except (defer.TimeoutError, error.DNSQueryTimeoutError):
            return _Lookup([], failure="timeout")
        except Exception as exc:  # SERVFAIL, REFUSED, format errors, network errors
            log.info("dns query {qtype} {qname} failed: {error}", qtype=dns.QUERY_TYPES[kind],
                     qname=name, error=repr(exc))
            return _Lookup([], failure="servfail")
        return _Lookup([rr.payload for rr in answers if rr.type == kind])

    async def addresses(self, name: str) -> tuple[tuple[str, ...], _Lookup, _Lookup]:
        """IPv6 then IPv4 addresses of ``name`` plus both raw lookups (for error classing)."""
        six, four = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self._query(dns.AAAA, name)),
            defer.Deferred.fromCoroutine(self._query(dns.A, name)),
        ])
        addrs = [r.dottedQuad() if hasattr(r, "dottedQuad") else _ipv6_text(r)
                 for r in [*six.records, *four.records]]
        return tuple(dict.fromkeys(addrs)), six, four

    async def resolve(self, domain: str) -> MxResult | DeliveryStatus:
        domain = domain.lower().rstrip(".")
        literal = _literal_host(domain)
        if literal is not None:
            return MxResult(domain, (literal,), implicit=True)
        mx = await self._query(dns.MX, domain)
        if mx.nxdomain:
            return DeliveryStatus.permanent_failure(
                Reason.DNS, f"domain {domain} does not exist", "5.1.2", 550,
                diagnostic=f"x-dns; NXDOMAIN for {domain}")
        if mx.failure:
            return _transient_dns(domain, f"MX lookup {mx.failure}")
        if not mx.records:
            return await self._implicit(domain)
        targets = [(int(r.preference), _host_name(r.name.name)) for r in mx.records]
        if len(targets) == 1 and targets[0][1] == "":
            return DeliveryStatus.permanent_failure(
                Reason.DNS, f"domain {domain} does not accept mail (null MX)", "5.1.10", 556,
                diagnostic=f"x-dns; null MX for {domain}")
        # None: not a host name at all (raw 8-bit bytes); it can never be reached, so it is
        # skipped like a host without an address, not taken for a DNS outage.
        usable = [(p, n) for p, n in targets if n is not None and n != ""]
        ordered = self._order(usable)
        found = await self._hosts(domain, ordered)
        if isinstance(found, MxResult):
            return MxResult(found.domain, found.hosts, found.implicit, tuple(ordered))
        return found

    def _order(self, targets: list[tuple[int, str]]) -> list[tuple[int, str]]:
        # One place per name, at its best preference: a host listed twice is tried once.
        best: dict[str, int] = {}
        for pref, name in targets:
            if name not in best or pref < best[name]:
                best[name] = pref
        by_pref: dict[int, list[tuple[int, str]]] = {}
        for name, pref in best.items():
            by_pref.setdefault(pref, []).append((pref, name))
        ordered: list[tuple[int, str]] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            self._shuffle(group)
            ordered.extend(group)
        return ordered

    async def _hosts(self, domain: str,
                     targets: list[tuple[int, str]]) -> MxResult | DeliveryStatus:
        looked = await defer.gatherResults([
            defer.Deferred.fromCoroutine(self.addresses(name)) for _, name in targets])
        hosts: list[MxHost] = []
        temporary = False
        for (pref, name), (addrs, six, four) in zip(targets, looked, strict=True):
            if addrs:
                hosts.append(MxHost(name, addrs, pref))
            elif six.failure or four.failure:
                temporary = True
        if hosts:
            return MxResult(domain, tuple(hosts))
        if temporary:
            return _transient_dns(domain, "address lookup of the MX hosts failed")
        return DeliveryStatus.permanent_failure(
            Reason.DNS, f"no MX host of {domain} has an address", "5.4.4", 550,
            diagnostic=f"x-dns; MX hosts of {domain} have no A/AAAA records")

    async def _implicit(self, domain: str) -> MxResult | DeliveryStatus:
        addrs, six, four = await self.addresses(domain)
        if addrs:
            return MxResult(domain, (MxHost(domain, addrs),), implicit=True)
        if six.failure or four.failure:
            return _transient_dns(domain, "A/AAAA lookup failed")
        return DeliveryStatus.permanent_failure(
            Reason.DNS, f"domain {domain} has no MX and no address", "5.1.2", 550,
            diagnostic=f"x-dns; no MX/A/AAAA for {domain}")


def _host_name(raw: bytes) -> str | None:
    """An MX target as a lower-case name without the final dot; "" for the root (Null MX),
    None for bytes that are no host name (8-bit: an A-label is ASCII)."""
    try:
        return raw.decode("ascii").rstrip(".").lower()
    except UnicodeDecodeError:
        return None


def _ipv6_text(record: Any) -> str:
    return str(ipaddress.IPv6Address(record.address))


def _transient_dns(domain: str, why: str) -> DeliveryStatus:
    return DeliveryStatus.transient(Reason.DNS, f"DNS failure for {domain}: {why}", "4.4.3", 451,
                                    diagnostic=f"x-dns; {why}")
