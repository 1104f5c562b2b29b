"""Per-connection TLS requirements from recipient-domain policies, and checking the peer after the
handshake.

Without requirements the client behaves exactly as ``outboundTls`` says (``tlspolicy.py``). With
``TlsRequirements`` (MTA-STS, DANE, REQUIRETLS or TLS-RPT observation) it uses an
``InspectingCreator``: the handshake accepts any certificate but records OpenSSL's own PKIX
verdict for every chain element; after the handshake (and before MAIL FROM) ``check_peer`` decides:

* DANE records present → the chain must match one (``dane.verify_dane``); PKIX is irrelevant.
* ``pkix_names`` → the chain must verify against ``caFile``/the system store and the leaf must
  name one of them (MTA-STS: the MX host; REQUIRETLS to a smart host: the relay host).
* ``enforce=False`` (MTA-STS testing, TLS-RPT observation) → failures are only reported.

Result types are RFC 8460's (``certificate-host-mismatch``, ``certificate-expired``,
``certificate-not-trusted``, ``validation-failure``, ``starttls-not-supported``, ...).
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from typing import Any

from OpenSSL import SSL, crypto
from service_identity import VerificationError
from service_identity.cryptography import (
    verify_certificate_hostname,
    verify_certificate_ip_address,
)
from twisted.internet.interfaces import IOpenSSLClientConnectionCreator
from zope.interface import implementer

from kotlin_smtp_py.outbound.dane import Tlsa, verify_dane

_EXPIRED = {9, 10}  # X509_V_ERR_CERT_NOT_YET_VALID, X509_V_ERR_CERT_HAS_EXPIRED


@dataclass(frozen=True)
class TlsRequirements:
    """What a recipient domain's policies demand of one connection."""

    require_tls: bool = False  # STARTTLS must be offered and succeed
    enforce: bool = True  # failures are fatal (False: report only)
    pkix_names: tuple[str, ...] = ()  # PKIX chain + one of these names
    dane: tuple[Tlsa, ...] = ()  # usable TLSA records to match
    requiretls: bool = False  # RFC 8689: peer must advertise REQUIRETLS; failures bounce 5.7.30
    ca_file: str = ""
    policy_type: str = "no-policy-found"  # TLS-RPT: "sts" | "tlsa" | "no-policy-found"
    policy_domain: str = ""

    @property
    def inspect(self) -> bool:
        return bool(self.pkix_names or self.dane) or not self.enforce


@implementer(IOpenSSLClientConnectionCreator)
class InspectingCreator:
    """A TLS client creator that completes every handshake and remembers what it saw."""

    def __init__(self, server_name: str, ca_file: str = "") -> None:
        self.server_name = server_name
        ctx = SSL.Context(SSL.TLS_METHOD)
        ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
        if ca_file:
            ctx.load_verify_locations(ca_file)
        else:
            ctx.set_default_verify_paths()
        ctx.set_verify(SSL.VERIFY_PEER, self._verify)
        self._ctx = ctx
        self.pkix_errors: list[tuple[int, int]] = []  # (depth, X509 error number)
        self.connection: SSL.Connection | None = None

    def _verify(self, conn: Any, cert: Any, errno: int, depth: int, ok: int) -> bool:
        if not ok:
            self.pkix_errors.append((depth, errno))
        return True  # decided after the handshake, by check_peer

    def clientConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        conn = SSL.Connection(self._ctx, None)
        conn.set_app_data(tlsProtocol)
        if not _is_ip(self.server_name):
            conn.set_tlsext_host_name(self.server_name.encode("idna"))
        self.connection = conn
        return conn

    def chain(self) -> list[crypto.X509]:
        if self.connection is None:
            return []
        chain = self.connection.get_peer_cert_chain() or []
        if chain:
            return list(chain)
        leaf = self.connection.get_peer_certificate()
        return [leaf] if leaf is not None else []


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class PeerVerdict:
    result_type: str | None  # None = satisfied
    detail: str = ""
    authenticated: bool = False  # DANE or PKIX+name succeeded
    extra: dict[str, str] = field(default_factory=dict)


def pkix_verdict(creator: InspectingCreator, names: tuple[str, ...]) -> PeerVerdict:
    chain = creator.chain()
    if not chain:
        return PeerVerdict("validation-failure", "no peer certificate")
    if creator.pkix_errors:
        depth, errno = creator.pkix_errors[0]
        kind = "certificate-expired" if errno in _EXPIRED else "certificate-not-trusted"
        return PeerVerdict(kind, f"certificate verification failed at depth {depth} "
                                 f"(X509 error {errno})")
    for name in names:
        try:
            bare = name.strip("[]")
            if _is_ip(bare):  # a smart host given by address: its certificate's IP SAN
                verify_certificate_ip_address(chain[0].to_cryptography(), bare)
            else:
                verify_certificate_hostname(chain[0].to_cryptography(), name)
            return PeerVerdict(None, authenticated=True)
        except (VerificationError, ValueError):
            continue
    return PeerVerdict("certificate-host-mismatch",
                       f"certificate does not name {' or '.join(names)}")


def hop_verdict(tls: Any, creator: InspectingCreator, host: str) -> PeerVerdict:
    """What the hop's own ``outboundTls`` settings (``tlspolicy.TlsPolicy``) say of the peer,
    as their ``client_creator`` would have decided in the handshake: requirements that only
    observe (MTA-STS testing, TLS-RPT) must not accept more than no policy does."""
    if tls.trusts_blindly(host):
        return PeerVerdict(None)
    if tls.check_server_identity:
        return pkix_verdict(creator, (host,))
    if not creator.chain():
        return PeerVerdict("validation-failure", "no peer certificate")
    if creator.pkix_errors:
        depth, errno = creator.pkix_errors[0]
        return PeerVerdict("certificate-not-trusted", "certificate verification failed at "
                                                      f"depth {depth} (X509 error {errno})")
    return PeerVerdict(None)


def check_peer(req: TlsRequirements, creator: InspectingCreator, host: str) -> PeerVerdict:
    """The verdict on the peer's certificate under ``req`` (after the handshake)."""
    if req.dane:
        why = verify_dane(req.dane, creator.chain(), (host, req.policy_domain))
        if why is None:
            return PeerVerdict(None, authenticated=True)
        return PeerVerdict("validation-failure", f"DANE: {why}")
    names = req.pkix_names or (host,)
    verdict = pkix_verdict(creator, names)
    if req.pkix_names or verdict.result_type is None:
        return verdict
    return PeerVerdict(None, verdict.detail)  # nothing demanded: unauthenticated TLS is fine
