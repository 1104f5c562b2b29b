"""Outbound TLS policy: the effective settings for one next hop and the TLS context to use.

``smtp.relay.outboundTls`` gives the defaults; a matching route (``routes[]``/``defaultRoute``)
overrides any field it sets (``None`` = inherit). Invariants:

* ``trustAll`` (or the next hop listed in ``trustHosts``, or ``"*"`` in it) disables certificate
  verification entirely; this is the only path that does (``trustHosts`` follows JavaMail's
  ``mail.smtp.ssl.trust``: the listed hosts are trusted without verification).
* Otherwise the chain is always verified against ``caFile`` (when set) or the system store; with
  ``checkServerIdentity`` the certificate must also name the host we connected to
  (service_identity, via ``optionsForClientTLS``).
* A verification failure is never downgraded to plaintext: the attempt fails (transient, ``tls``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from twisted.internet import ssl
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator

from kotlin_smtp_py.config import OutboundTlsConfig, RouteConfig


@dataclass(frozen=True)
class TlsPolicy:
    """Effective outbound TLS settings for one next hop (timeouts in seconds)."""

    start_tls_enabled: bool = True
    start_tls_required: bool = False
    check_server_identity: bool = True
    trust_all: bool = False
    trust_hosts: tuple[str, ...] = ()
    ca_file: str = ""
    ports: tuple[int, ...] = (25,)
    connect_timeout: float = 15.0
    read_timeout: float = 15.0
    _roots: list[ssl.Certificate] = field(default_factory=list, compare=False, repr=False)

    def trusts_blindly(self, host: str) -> bool:
        """True when certificates from ``host`` are accepted without any verification."""
        hosts = {h.lower().rstrip(".") for h in self.trust_hosts}
        return self.trust_all or "*" in hosts or host.lower().rstrip(".") in hosts

    def client_creator(self, host: str) -> IOpenSSLClientConnectionCreator:
        """The TLS connection creator for a STARTTLS to ``host`` (the name we expect)."""
        if self.trusts_blindly(host):
            return ssl.CertificateOptions()
        root = self._trust_root()
        if self.check_server_identity:
            return ssl.optionsForClientTLS(host, trustRoot=root)
        return ssl.CertificateOptions(trustRoot=root)

    def _trust_root(self) -> Any:
        if not self.ca_file:
            return ssl.platformTrust()  # type: ignore[no-untyped-call]
        if not self._roots:
            # A small local file, read once per policy object (cached in the mutable field).
            with open(self.ca_file, "rb") as fh:
                self._roots.extend(_split_pem(fh.read()))
        return ssl.trustRootFromCertificates(self._roots)  # type: ignore[no-untyped-call]


def trust_root(ca_file: str) -> Any:
    """The PKIX trust root for ``caFile`` (empty = the platform store)."""
    if not ca_file:
        return ssl.platformTrust()  # type: ignore[no-untyped-call]
    with open(ca_file, "rb") as fh:  # small local file, read once at start-up
        return ssl.trustRootFromCertificates(_split_pem(fh.read()))  # type: ignore[no-untyped-call]


def _split_pem(data: bytes) -> list[ssl.Certificate]:
    end = b"-----END CERTIFICATE-----"
    certs: list[ssl.Certificate] = []
    for chunk in data.split(end):
        if b"-----BEGIN CERTIFICATE-----" in chunk:
            certs.append(ssl.Certificate.loadPEM(chunk.strip() + b"\n" + end + b"\n"))
    return certs


def effective_policy(outbound: OutboundTlsConfig, route: RouteConfig | None = None) -> TlsPolicy:
    """Merge ``outboundTls`` with a route's overrides. Routes use their own port only."""

    def pick(value: bool | None, default: bool) -> bool:
        return default if value is None else value

    trust_hosts = list(outbound.trustHosts)
    ports = tuple(outbound.ports) or (25,)
    if route is not None:
        if route.trustHosts is not None:
            trust_hosts = list(route.trustHosts)
        ports = (route.port,)
    return TlsPolicy(
        start_tls_enabled=pick(route.startTlsEnabled if route else None, outbound.startTlsEnabled),
        start_tls_required=pick(route.startTlsRequired if route else None,
                                outbound.startTlsRequired),
        check_server_identity=pick(route.checkServerIdentity if route else None,
                                   outbound.checkServerIdentity),
        trust_all=pick(route.trustAll if route else None, outbound.trustAll),
        trust_hosts=tuple(trust_hosts),
        ca_file=outbound.caFile,
        ports=ports,
        connect_timeout=outbound.connectTimeoutMs / 1000.0,
        read_timeout=outbound.readTimeoutMs / 1000.0,
    )
