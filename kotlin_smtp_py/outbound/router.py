"""Outbound routing: which next hop (smart host or direct MX) a recipient domain goes to.

Precedence (SPEC §2 ``smtp.relay.routes``): an exact ``routes[].domain`` match, then the ``"*"``
route, then ``defaultRoute``, then direct MX delivery. Route fields override ``outboundTls``.
``route_key`` names the next hop: recipients with equal keys may share one SMTP transaction (the
scheduler groups by it), and the per-destination connection limit counts per key.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from kotlin_smtp_py.config import RelayConfig, RouteConfig
from kotlin_smtp_py.envelope import canonical_domain
from kotlin_smtp_py.outbound.client import Credentials
from kotlin_smtp_py.outbound.tlspolicy import TlsPolicy, effective_policy


def recipient_domain(address: str) -> str:
    """The domain of ``local@domain`` in canonical (lower case, no trailing dot, A-label)
    form."""
    return canonical_domain(address.rpartition("@")[2])


@dataclass(frozen=True)
class NextHop:
    """Where a domain's mail goes: a smart host (``host`` set) or the domain's MX hosts."""

    key: str
    domain: str
    tls: TlsPolicy
    host: str | None = None
    port: int = 25
    credentials: Credentials | None = None

    @property
    def direct(self) -> bool:
        return self.host is None


class OutboundRouter:
    """Maps recipient domains to next hops from ``smtp.relay`` config."""

    def __init__(self, relay: RelayConfig) -> None:
        self._relay = relay
        self._exact: dict[str, RouteConfig] = {}
        self._wildcard: RouteConfig | None = None
        for route in relay.routes:
            domain = canonical_domain(route.domain)
            if domain == "*":
                self._wildcard = self._wildcard or route
            else:
                self._exact.setdefault(domain, route)

    def route_for(self, domain: str) -> RouteConfig | None:
        """The configured route for ``domain``, or None for direct MX delivery."""
        domain = canonical_domain(domain)
        route = self._exact.get(domain) or self._wildcard or self._relay.defaultRoute
        if route is not None and not route.host:
            return None
        return route

    def next_hop(self, domain: str) -> NextHop:
        domain = canonical_domain(domain)
        route = self.route_for(domain)
        tls = effective_policy(self._relay.outboundTls, route)
        if route is None:
            return NextHop(f"mx:{domain}", domain, tls)
        credentials = Credentials(route.username, route.password) if route.username else None
        tls_bits = "".join("1" if b else "0" for b in (
            tls.start_tls_enabled, tls.start_tls_required, tls.check_server_identity,
            tls.trust_all))
        # Credentials in full (as a digest): two routes to one host under different
        # passwords must not share a transaction.
        secret = hashlib.sha256(f"{route.username}\0{route.password}".encode()).hexdigest()[:16]
        key = (f"relay:{route.host.lower()}:{route.port}:{route.username}:{secret}:{tls_bits}:"
               f"{','.join(tls.trust_hosts)}")
        return NextHop(key, domain, tls, route.host, route.port, credentials)

    def route_key(self, domain: str) -> str:
        """Recipients whose domains have equal keys may travel in one transaction."""
        return self.next_hop(domain).key
