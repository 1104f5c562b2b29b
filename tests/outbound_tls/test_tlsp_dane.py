"""DANE (RFC 7672) with TLSA records in the loopback zone.

No validating resolver can run here (no signed zone, no trust anchor), so the "secure" answers
come from a stub DNS server that sets the AD bit on every reply (tls_policy_support.PolicyZone,
served twice: plain and AD). Our client trusts the AD bit of its configured resolver, which is
exactly what this stub exercises; DNSSEC validation itself is the resolver's job.
"""

from __future__ import annotations

from pathlib import Path

from OpenSSL import crypto
from outbound_sink import Behaviour, server_tls
from outbound_support import make_entry
from tls_policy_support import MX_HOST, dom, make_relay, on_reactor, policy_config, relay_attempt
from twisted.internet import ssl

from kotlin_smtp_py.outbound.dane import tlsa_for
from kotlin_smtp_py.status import Reason

MSG = b"Subject: dane\r\n\r\nhello\r\n"


def _leaf(path: Path) -> crypto.X509:
    return crypto.load_certificate(crypto.FILETYPE_PEM, path.read_bytes())


def _rdata(cert: crypto.X509, usage: int = 3, selector: int = 1, mtype: int = 1) -> bytes:
    rec = tlsa_for(cert, usage, selector, mtype)
    return bytes([rec.usage, rec.selector, rec.mtype]) + rec.data


def _tlsa(policy_dns, port: int, *rdata: bytes) -> None:
    on_reactor(policy_dns.zone.set_tlsa, f"_{port}._tcp.{MX_HOST}", *rdata)


def _config(dns_port, sinks, certs, tmp_path, mode="rfc7672"):
    return policy_config(dns_port, sinks.port, certs, tmp_path / "spool",
                         {"dane": {"enabled": True, "mode": mode}})


def _attempt(config, tmp_path, domain):
    entry, path = make_entry(tmp_path, [f"a@{domain}"], MSG)
    [(_, status)] = relay_attempt(make_relay(config), entry, path)
    return status


def test_tlsa_3_1_1_matching_is_delivered_even_with_a_non_pkix_name(policy_dns, sinks,
                                                                    policy_certs,
                                                                    tmp_path: Path) -> None:
    # DANE-EE: the key is what counts; the certificate names wrong.example (PKIX would fail).
    sink = sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.wrong_cert), str(policy_certs.wrong_key))))
    _tlsa(policy_dns, sinks.port, _rdata(_leaf(policy_certs.wrong_cert)))
    status = _attempt(_config(policy_dns.ad_port, sinks, policy_certs, tmp_path), tmp_path,
                      dom("dane-ok"))
    assert status.ok, status
    assert [s.tls for s in sink.sessions] == [True] and len(sink.transactions) == 1


def test_tlsa_3_1_1_not_matching_is_deferred(policy_dns, sinks, policy_certs,
                                             tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    _tlsa(policy_dns, sinks.port, _rdata(_leaf(policy_certs.wrong_cert)))
    status = _attempt(_config(policy_dns.ad_port, sinks, policy_certs, tmp_path), tmp_path,
                      dom("dane-bad"))
    assert status.temporary and status.reason is Reason.TLS, status
    assert "TLSA" in status.text, status
    assert sink.transactions == [], "nothing is sent to an unauthenticated peer"


def test_tlsa_without_ad_bit_is_ignored(policy_dns, sinks, policy_certs, tmp_path: Path) -> None:
    # The same non-matching TLSA record: ignored from the plain server, enforced with AD.
    sink = sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    _tlsa(policy_dns, sinks.port, _rdata(_leaf(policy_certs.wrong_cert)))
    plain = _attempt(_config(policy_dns.plain_port, sinks, policy_certs, tmp_path), tmp_path,
                     dom("dane-noad"))
    assert plain.ok, plain
    assert len(sink.transactions) == 1
    # Signed MX RRset but an unsigned TLSA answer (no AD on that reply only): still ignored.
    name = f"_{sinks.port}._tcp.{MX_HOST}"
    policy_dns.zone.insecure.add(name)
    try:
        mixed = _attempt(_config(policy_dns.ad_port, sinks, policy_certs, tmp_path), tmp_path,
                         dom("dane-noad"))
    finally:
        policy_dns.zone.insecure.discard(name)
    assert mixed.ok, mixed
    assert len(sink.transactions) == 2
    secure = _attempt(_config(policy_dns.ad_port, sinks, policy_certs, tmp_path), tmp_path,
                      dom("dane-noad"))
    assert secure.temporary and secure.reason is Reason.TLS, secure
    assert len(sink.transactions) == 2


def test_dane_ta_2_0_1_with_chain_to_the_anchor(policy_dns, sinks, policy_certs,
                                                tmp_path: Path) -> None:
    pem = policy_certs.cert.read_bytes()
    leaf = crypto.load_certificate(crypto.FILETYPE_PEM, pem)
    ca = _leaf(policy_certs.ca_cert)
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, policy_certs.key.read_bytes())
    ctx = ssl.CertificateOptions(privateKey=key, certificate=leaf, extraCertChain=[ca])
    sink = sinks.start(behaviour=Behaviour(tls=ctx))
    _tlsa(policy_dns, sinks.port, _rdata(ca, 2, 0, 1))
    status = _attempt(_config(policy_dns.ad_port, sinks, policy_certs, tmp_path), tmp_path,
                      dom("dane-ta"))
    assert status.ok, status
    assert len(sink.transactions) == 1
    # A TA record for a key that is not in the chain fails.
    _tlsa(policy_dns, sinks.port, _rdata(_leaf(policy_certs.wrong_cert), 2, 0, 1))
    status = _attempt(_config(policy_dns.ad_port, sinks, policy_certs, tmp_path), tmp_path,
                      dom("dane-ta"))
    assert status.temporary and status.reason is Reason.TLS, status


def test_basic_mode_tlsa_present_requires_tls(policy_dns, sinks, policy_certs,
                                              tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=None))  # no STARTTLS at all
    config = _config(policy_dns.plain_port, sinks, policy_certs, tmp_path, mode="basic")
    _tlsa(policy_dns, sinks.port)  # no TLSA: plaintext delivery is allowed (control)
    assert _attempt(config, tmp_path, dom("basic")).ok
    assert len(sink.transactions) == 1
    _tlsa(policy_dns, sinks.port, _rdata(_leaf(policy_certs.cert)))  # unauthenticated: fine
    status = _attempt(config, tmp_path, dom("basic"))
    assert status.temporary and status.reason is Reason.TLS, status
    assert len(sink.transactions) == 1
