"""DANE for SMTP (RFC 7672): TLSA lookup and certificate matching.

``mode: rfc7672`` (default): TLSA records at ``_<port>._tcp.<mx host>`` count only when the MX
RRset *and* the TLSA RRset were DNSSEC-authenticated (the AD bit from a validating resolver,
see ``dnssec.py``). Then:

* STARTTLS is mandatory and the peer's chain must match a *usable* record: DANE-EE(3) against the
  leaf (no name or expiry checks, RFC 7672 §3.1.1) or DANE-TA(2) against a chain certificate, with
  the leaf then verified up to that trust anchor and its name checked against the MX host
  (§3.1.2). Selectors 0 (certificate) and 1 (SPKI); matching types 0 (full), 1 (SHA-256),
  2 (SHA-512). PKIX-TA(0)/PKIX-EE(1) and unknown parameters are unusable (§3.1.3).
* Authenticated TLSA records of which none is usable: TLS is still mandatory, unauthenticated.
* A failed (SERVFAIL/timeout) TLSA lookup for a host of a secure MX RRset makes that host
  unusable (§2.2) — a transient ``tls`` failure for it.
* Unauthenticated TLSA answers are ignored and logged.

``mode: basic`` keeps the seed behaviour: any TLSA answer (authenticated or not) makes STARTTLS
mandatory, with ordinary ``outboundTls`` certificate checks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from service_identity import VerificationError
from service_identity.cryptography import verify_certificate_hostname
from twisted.logger import Logger

from kotlin_smtp_py.outbound.dnssec import TLSA, SecureDns

log = Logger()


@dataclass(frozen=True)
class Tlsa:
    usage: int
    selector: int
    mtype: int
    data: bytes

    @property
    def usable(self) -> bool:
        return self.usage in (2, 3) and self.selector in (0, 1) and self.mtype in (0, 1, 2) \
            and (self.mtype != 1 or len(self.data) == 32) \
            and (self.mtype != 2 or len(self.data) == 64)

    def text(self) -> str:
        return f"{self.usage} {self.selector} {self.mtype} {self.data.hex()}"


@dataclass(frozen=True)
class TlsaLookup:
    """``records`` present; ``secure`` when DNSSEC-authenticated; ``failed`` on lookup errors."""

    name: str
    records: tuple[Tlsa, ...] = ()
    secure: bool = False
    failed: bool = False

    @property
    def usable(self) -> tuple[Tlsa, ...]:
        return tuple(r for r in self.records if r.usable)


def parse_tlsa(rdata: bytes) -> Tlsa | None:
    if len(rdata) < 3:
        return None
    return Tlsa(rdata[0], rdata[1], rdata[2], bytes(rdata[3:]))


class DaneResolver:
    def __init__(self, dns: SecureDns) -> None:
        self.dns = dns

    async def mx_secure(self, domain: str) -> bool:
        """True when the MX RRset (or its NODATA) of ``domain`` is DNSSEC-authenticated."""
        answer = await self.dns.query(domain, 15)
        return answer.ok and answer.authenticated

    async def tlsa(self, host: str, port: int) -> TlsaLookup:
        name = f"_{port}._tcp.{host}"
        answer = await self.dns.query(name, TLSA)
        if answer.status == "failure":
            return TlsaLookup(name, failed=True)
        records = tuple(r for r in (parse_tlsa(getattr(p, "data", b"")) for p in answer.records)
                        if r is not None)
        if records and not answer.authenticated:
            log.info("ignoring unauthenticated TLSA records at {name} (no AD bit)", name=name)
        return TlsaLookup(name, records, secure=answer.authenticated and answer.ok)


def _selected(cert: crypto.X509, selector: int) -> bytes:
    c = cert.to_cryptography()
    if selector == 0:
        return c.public_bytes(serialization.Encoding.DER)
    return c.public_key().public_bytes(serialization.Encoding.DER,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)


def _digest(data: bytes, mtype: int) -> bytes:
    if mtype == 1:
        return hashlib.sha256(data).digest()
    if mtype == 2:
        return hashlib.sha512(data).digest()
    return data


def record_matches(record: Tlsa, cert: crypto.X509) -> bool:
    return _digest(_selected(cert, record.selector), record.mtype) == record.data


def tlsa_for(cert: crypto.X509, usage: int = 3, selector: int = 1, mtype: int = 1) -> Tlsa:
    """The TLSA record that matches ``cert`` (handy for operators and tests)."""
    return Tlsa(usage, selector, mtype, _digest(_selected(cert, selector), mtype))


def verify_dane(records: tuple[Tlsa, ...], chain: list[crypto.X509],
                names: tuple[str, ...]) -> str | None:
    """None when ``chain`` (leaf first) satisfies one usable record, else why not."""
    if not chain:
        return "no peer certificate"
    leaf = chain[0]
    for rec in records:
        if not rec.usable:
            continue
        if rec.usage == 3 and record_matches(rec, leaf):
            return None
        if rec.usage == 2:
            for i, ta in enumerate(chain):
                if i == 0 and len(chain) > 1:
                    continue
                if record_matches(rec, ta) and _chains_to(leaf, chain[1:i], ta) \
                        and _name_ok(leaf, names):
                    return None
    return "no TLSA record matches the peer certificate chain"


def _chains_to(leaf: crypto.X509, middle: list[crypto.X509], anchor: crypto.X509) -> bool:
    if leaf is anchor:
        return True
    store = crypto.X509Store()
    store.add_cert(anchor)
    store.set_flags(crypto.X509StoreFlags.PARTIAL_CHAIN)
    try:
        crypto.X509StoreContext(store, leaf, middle).verify_certificate()
    except crypto.X509StoreContextError:
        return False
    return True


def _name_ok(leaf: crypto.X509, names: tuple[str, ...]) -> bool:
    for name in names:
        try:
            verify_certificate_hostname(leaf.to_cryptography(), name)
            return True
        except (VerificationError, ValueError):
            continue
    return False
