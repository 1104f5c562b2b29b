"""Bug hunt: outbound TLS policy decisions (MTA-STS, DANE, REQUIRETLS, TLS-Required: No,
smart-host routes) with real components on loopback.

* DNS: the suite's session zone (``tls_policy_support.PolicyZone``, served plainly and by an
  AD-setting stand-in for a validating resolver); this module adds its own names under
  ``hunt.tlsp.test`` (one fresh recipient domain per test, so nothing leaks between tests).
* PKI: a private CA made here (``_Pki``) with leaves for the MX hosts and every
  ``mta-sts.<domain>`` of this module, a wrong-name leaf, an expired leaf.
* HTTPS: a local twisted.web server whose replies are scripted per domain (status, content
  type, body, redirect), plus a second listener presenting a wrong-name certificate.
* SMTP: the scripted sink (tests/outbound/outbound_sink.py); 127.0.0.1 and 127.0.0.2 for
  two different MX hosts on the same port.

Note: twisted.names' server never truncates UDP answers (no TC bit) while our SecureDns reads
UDP with twisted's 512-byte buffer and twisted's parser silently drops records that do not fit;
a real resolver sets TC and we retry over TCP, so TLSA sets here are kept under 512 bytes.
"""

from __future__ import annotations

import datetime
import ipaddress
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from helpers import on_reactor, start_reactor
from OpenSSL import crypto
from outbound_sink import Behaviour
from outbound_support import make_entry
from tls_policy_support import Record_TLSA, make_relay, policy_config, relay_attempt
from twisted.internet import defer, ssl
from twisted.names import dns
from twisted.web import resource
from twisted.web.server import Site

from kotlin_smtp_py.outbound.dane import tlsa_for
from kotlin_smtp_py.status import Reason

BASE = "hunt.tlsp.test"
MX_A = f"mx.{BASE}"  # 127.0.0.1
MX_B = f"mx2.{BASE}"  # 127.0.0.2
DEEP = f"deep.sub.{BASE}"  # 127.0.0.1, two labels below BASE
NOWHERE = f"elsewhere.{BASE}"  # an MX name that no domain of ours uses
TAGS = tuple(f"d{i}" for i in range(80))
_next_tag = itertools.count()

MSG = b"Subject: hunt\r\n\r\nhello\r\n"
EXTS = ["PIPELINING", "SIZE 10000000", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES"]


# ------------------------------------------------------------------------------------------
# PKI


@dataclass
class Leaf:
    cert_path: Path
    key_path: Path
    x509: crypto.X509
    pkey: crypto.PKey

    def ctx(self, ca: crypto.X509 | None = None) -> ssl.CertificateOptions:
        return ssl.CertificateOptions(privateKey=self.pkey, certificate=self.x509,
                                      extraCertChain=[ca] if ca is not None else None)


@dataclass
class _Pki:
    ca_cert: Path  # what policy_config reads (outboundTls.caFile)
    ca: crypto.X509
    good: Leaf  # every MX host and mta-sts.<domain> of this module (+127.0.0.1)
    wrong: Leaf  # wrong.example, same CA
    expired: Leaf  # the MX hosts, expired yesterday
    other: Leaf  # another key for wrong.example (TLSA records that match nothing)


def _make_pki(directory: Path) -> _Pki:
    now = datetime.datetime.now(datetime.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "hunt test CA")])
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(days=30))
          .not_valid_after(now + datetime.timedelta(days=30))
          .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
          .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    ca_path = directory / "ca.pem"
    ca_pem = ca.public_bytes(serialization.Encoding.PEM)
    ca_path.write_bytes(ca_pem)

    def leaf(label: str, names: tuple[str, ...], before: float, after: float) -> Leaf:
        key = ec.generate_private_key(ec.SECP256R1())
        sans: list[x509.GeneralName] = [x509.DNSName(n) for n in names]
        sans.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
        cert = (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
                .issuer_name(ca.subject).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now + datetime.timedelta(days=before))
                .not_valid_after(now + datetime.timedelta(days=after))
                .add_extension(x509.SubjectAlternativeName(sans), critical=False)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .sign(ca_key, hashes.SHA256()))
        pem = cert.public_bytes(serialization.Encoding.PEM)
        kpem = key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.TraditionalOpenSSL,
                                 serialization.NoEncryption())
        (directory / f"{label}.pem").write_bytes(pem + ca_pem)
        (directory / f"{label}.key").write_bytes(kpem)
        return Leaf(directory / f"{label}.pem", directory / f"{label}.key",
                    crypto.load_certificate(crypto.FILETYPE_PEM, pem),
                    crypto.load_privatekey(crypto.FILETYPE_PEM, kpem))

    hosts = (MX_A, MX_B, DEEP)
    all_names = hosts + tuple(f"mta-sts.{t}.{BASE}" for t in TAGS)
    return _Pki(ca_path, crypto.load_certificate(crypto.FILETYPE_PEM, ca_pem),
                leaf("good", all_names, -1, 2), leaf("wrong", ("wrong.example",), -1, 2),
                leaf("expired", hosts, -10, -1), leaf("other", ("wrong.example",), -1, 2))


# ------------------------------------------------------------------------------------------
# HTTPS policy server with scripted replies


@dataclass
class Reply:
    body: bytes = b""
    code: int = 200
    ctype: bytes | None = b"text/plain"
    location: bytes | None = None


class _Script(resource.Resource):
    isLeaf = True

    def __init__(self, web: HuntWeb) -> None:
        super().__init__()
        self.web = web

    def render_GET(self, request: Any) -> bytes:
        host = (request.getHeader("host") or "").split(":")[0].lower()
        domain = host.removeprefix("mta-sts.")
        self.web.fetches.append((domain, request.path))
        reply = self.web.replies.get(domain)
        if reply is None or request.path != b"/.well-known/mta-sts.txt":
            request.setResponseCode(404)
            return b"not here"
        request.setResponseCode(reply.code)
        if reply.location is not None:
            request.setHeader(b"location", reply.location)
        if reply.ctype is None:
            request.defaultContentType = None
        else:
            request.setHeader(b"content-type", reply.ctype)
        return reply.body


@dataclass
class HuntWeb:
    port: int = 0
    wrong_port: int = 0  # same content, certificate for wrong.example
    replies: dict[str, Reply] = None  # type: ignore[assignment]
    fetches: list[tuple[str, bytes]] = None  # type: ignore[assignment]

    def fetched(self, domain: str) -> int:
        return sum(1 for d, _ in self.fetches if d == domain)


def policy_text(mode: str, mx: tuple[str, ...], max_age: str = "86400", eol: str = "\r\n",
                extra: tuple[str, ...] = ()) -> bytes:
    lines = ["version: STSv1", f"mode: {mode}", *extra, *[f"mx: {m}" for m in mx],
             f"max_age: {max_age}"]
    return (eol.join(lines) + eol).encode()


# ------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> _Pki:
    return _make_pki(tmp_path_factory.mktemp("hunt-pki"))


@pytest.fixture(scope="module")
def zone(policy_dns: Any) -> Any:
    z = policy_dns.zone

    def add() -> None:
        if f"{MX_A}".encode() in z.records:
            return
        z.add(MX_A, dns.Record_A("127.0.0.1", ttl=60))
        z.add(MX_B, dns.Record_A("127.0.0.2", ttl=60))
        z.add(DEEP, dns.Record_A("127.0.0.1", ttl=60))
        z.add(NOWHERE, dns.Record_A("127.0.0.1", ttl=60))

    on_reactor(add)
    return z


@pytest.fixture(scope="module")
def web(pki: _Pki) -> Iterator[HuntWeb]:
    start_reactor()
    from twisted.internet import reactor

    hw = HuntWeb(replies={}, fetches=[])
    site = Site(_Script(hw))
    site.noisy = False
    good = on_reactor(reactor.listenSSL, 0, site, pki.good.ctx(pki.ca), interface="127.0.0.1")
    bad = on_reactor(reactor.listenSSL, 0, site, pki.wrong.ctx(pki.ca), interface="127.0.0.1")
    hw.port, hw.wrong_port = good.getHost().port, bad.getHost().port
    yield hw
    on_reactor(lambda: defer.gatherResults([defer.maybeDeferred(p.stopListening)
                                            for p in (good, bad)]))


def new_domain(zone: Any, *mx: tuple[int, str]) -> str:
    """A fresh recipient domain with the given MX records (default: MX_A)."""
    domain = f"{TAGS[next(_next_tag)]}.{BASE}"

    def add() -> None:
        for pref, host in mx or ((10, MX_A),):
            zone.add(domain, dns.Record_MX(pref, host, ttl=60))
        zone.add(f"mta-sts.{domain}", dns.Record_A("127.0.0.1", ttl=60))

    on_reactor(add)
    return domain


def set_txt(zone: Any, domain: str, *records: tuple[bytes, ...]) -> None:
    """``_mta-sts.<domain>`` TXT records; each tuple is one record's character-strings."""
    key = f"_mta-sts.{domain}".lower().encode()

    def put() -> None:
        zone.records[key] = [dns.Record_TXT(*strings, ttl=60) for strings in records]

    on_reactor(put)


def announce(zone: Any, domain: str, policy_id: str = "hunt1") -> None:
    set_txt(zone, domain, (f"v=STSv1; id={policy_id}".encode(),))


def set_tlsa(zone: Any, host: str, port: int, *rdata: bytes) -> None:
    name = f"_{port}._tcp.{host}"

    def put() -> None:
        zone.records[name.lower().encode()] = [Record_TLSA(d, ttl=60) for d in rdata]

    on_reactor(put)


def rdata(cert: crypto.X509, usage: int = 3, selector: int = 1, mtype: int = 1) -> bytes:
    rec = tlsa_for(cert, usage, selector, mtype)
    return bytes([rec.usage, rec.selector, rec.mtype]) + rec.data


def config(dns_port: int, sinks: Any, pki: _Pki, tmp_path: Path, web: HuntWeb | None = None,
           *, sts: bool = False, dane: bool = False, rpt: bool = False, wrong_web: bool = False,
           tls: dict[str, Any] | None = None) -> Any:
    policy: dict[str, Any] = {"mtaSts": {"enabled": sts}}
    if dane:
        policy["dane"] = {"enabled": True, "mode": "rfc7672"}
    if rpt:
        policy["tlsRpt"] = {"enabled": True}
    port = 0 if web is None else (web.wrong_port if wrong_web else web.port)
    return policy_config(dns_port, sinks.port, pki, tmp_path / "spool", policy, web_port=port,
                         tls=tls)


def attempt(cfg: Any, tmp_path: Path, domain: str, body: bytes = MSG,
            relay: Any = None, **envelope: Any) -> Any:
    entry, path = make_entry(tmp_path, [f"rcpt@{domain}"], body, **envelope)
    [(_, status)] = relay_attempt(relay or make_relay(cfg), entry, path)
    return status


def rpt_results(relay: Any, domain: str) -> list[tuple[str, str | None]]:
    """(policy-type, result-type or None for successes) recorded for ``domain``."""
    out: list[tuple[str, str | None]] = []
    for period in relay.policies.recorder.periods.values():
        for group in period.get(domain, {}).values():
            kind = group["policy"]["policy-type"]
            out += [(kind, None)] * group["success"]
            out += [(kind, f["result-type"]) for f in group["failures"].values()]
    return out


def tls_sink(sinks: Any, leaf: Leaf | None, interface: str = "127.0.0.1",
             extensions: list[str] | None = None, ca: crypto.X509 | None = None) -> Any:
    b = Behaviour(tls=leaf.ctx(ca) if leaf is not None else None)
    if extensions is not None:
        b.extensions = extensions
    return sinks.start(interface=interface, behaviour=b)


# ------------------------------------------------------------------------------------------
# MTA-STS: TXT record discovery (RFC 8461 §3.1)


def test_txt_split_into_several_strings_is_one_record(zone, policy_dns, sinks, pki, web,
                                                      tmp_path) -> None:
    """A TXT record made of several character-strings is their concatenation: the policy it
    announces (enforce, our MX not listed) applies."""
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("enforce", (NOWHERE,)))
    set_txt(zone, domain, (b"v=STSv1; ", b"id=split1;"))
    sink = tls_sink(sinks, pki.good)
    status = attempt(config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True),
                     tmp_path, domain)
    assert web.fetched(domain) == 1
    assert status.temporary and status.reason is Reason.POLICY and status.enhanced == "4.7.5"
    assert sink.sessions == []


def test_txt_other_records_are_ignored_but_two_sts_records_mean_no_policy(
        zone, policy_dns, sinks, pki, web, tmp_path) -> None:
    sink = tls_sink(sinks, pki.good)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True)
    # SPF and an unrelated record next to the single STS record: the policy applies.
    one = new_domain(zone)
    web.replies[one] = Reply(policy_text("enforce", (NOWHERE,)))
    set_txt(zone, one, (b"v=spf1 -all",), (b"some-verification=abc",), (b"v=STSv1; id=one1",))
    status = attempt(cfg, tmp_path, one)
    assert status.temporary and status.reason is Reason.POLICY, status
    # Two v=STSv1 records (RFC 8461 §3.1: the number is not one) → no policy, no fetch.
    two = new_domain(zone)
    web.replies[two] = Reply(policy_text("enforce", (NOWHERE,)))
    set_txt(zone, two, (b"v=STSv1; id=a1",), (b"v=STSv1; id=b2",))
    status = attempt(cfg, tmp_path, two)
    assert status.ok, status
    assert web.fetched(two) == 0
    assert len(sink.transactions) == 1


def test_txt_record_with_a_longer_version_token_is_discarded(zone, policy_dns, sinks, pki, web,
                                                             tmp_path) -> None:
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("enforce", (NOWHERE,)))
    set_txt(zone, domain, (b"v=STSv10; id=future1",), (b"v=STSv1; id=real1",))
    sink = tls_sink(sinks, pki.good)
    status = attempt(config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True),
                     tmp_path, domain)
    assert status.temporary and status.reason is Reason.POLICY, status
    assert sink.sessions == []


# ------------------------------------------------------------------------------------------
# MTA-STS: the policy file (RFC 8461 §3.2)


def test_lf_line_endings_and_unknown_keys_are_accepted(zone, policy_dns, sinks, pki, web,
                                                       tmp_path) -> None:
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("enforce", (NOWHERE,), eol="\n",
                                            extra=("x-future-key: whatever", "comment: a:b:c")))
    announce(zone, domain)
    sink = tls_sink(sinks, pki.good)
    status = attempt(config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True),
                     tmp_path, domain)
    assert status.temporary and status.reason is Reason.POLICY, status
    assert sink.sessions == []


def test_wildcard_mx_pattern_covers_exactly_one_label(zone, policy_dns, sinks, pki, web,
                                                      tmp_path) -> None:
    sink = tls_sink(sinks, pki.good)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True)
    one_label = new_domain(zone, (10, MX_A))
    two_labels = new_domain(zone, (10, DEEP))
    for d in (one_label, two_labels):
        web.replies[d] = Reply(policy_text("enforce", (f"*.{BASE}",)))
        announce(zone, d)
    assert attempt(cfg, tmp_path, one_label).ok
    assert [s.tls for s in sink.sessions] == [True]
    status = attempt(cfg, tmp_path, two_labels)  # deep.sub.hunt... is not *.hunt...
    assert status.temporary and status.reason is Reason.POLICY, status
    assert len(sink.sessions) == 1


def test_policy_without_version_or_with_another_version_is_not_applied(
        zone, policy_dns, sinks, pki, web, tmp_path) -> None:
    sink = tls_sink(sinks, pki.good)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True, rpt=True)
    relay = make_relay(cfg)
    for body in (b"version: STSv2\r\nmode: enforce\r\nmx: elsewhere.hunt.tlsp.test\r\n"
                 b"max_age: 86400\r\n",
                 b"mode: enforce\r\nmx: elsewhere.hunt.tlsp.test\r\nmax_age: 86400\r\n"):
        domain = new_domain(zone)
        web.replies[domain] = Reply(body)
        announce(zone, domain)
        status = attempt(cfg, tmp_path, domain, relay=relay)
        assert status.ok, status
        assert ("no-policy-found", "sts-policy-invalid") in rpt_results(relay, domain)
    assert len(sink.transactions) == 2


def test_max_age_bounds(zone, policy_dns, sinks, pki, web, tmp_path) -> None:
    """max_age is 1*10DIGIT, at most 31557600: 11 digits is invalid (no policy), a 10-digit
    value above the limit is capped (the policy applies)."""
    import json

    sink = tls_sink(sinks, pki.good)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True)
    too_long = new_domain(zone)
    web.replies[too_long] = Reply(policy_text("enforce", (NOWHERE,), max_age="10000000000"))
    announce(zone, too_long)
    assert attempt(cfg, tmp_path, too_long).ok
    capped = new_domain(zone)
    web.replies[capped] = Reply(policy_text("enforce", (NOWHERE,), max_age="4000000000"))
    announce(zone, capped)
    status = attempt(cfg, tmp_path, capped)
    assert status.temporary and status.reason is Reason.POLICY, status
    cached = json.loads((tmp_path / "spool" / "mta-sts" / f"{capped}.json").read_text())
    assert cached["policy"]["max_age"] == 31557600
    assert len(sink.transactions) == 1


def test_max_age_with_non_ascii_digits_is_invalid(zone, policy_dns, sinks, pki, web,
                                                  tmp_path) -> None:
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("enforce", (NOWHERE,), max_age="١٢٣٤٥"))
    announce(zone, domain)
    sink = tls_sink(sinks, pki.good)
    status = attempt(config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True),
                     tmp_path, domain)
    assert status.ok, status  # invalid policy → no policy → delivered as usual
    assert len(sink.transactions) == 1


def test_max_age_with_superscript_digit_does_not_crash_delivery(zone, policy_dns, sinks, pki,
                                                                web, tmp_path) -> None:
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("enforce", (NOWHERE,), max_age="²"))
    announce(zone, domain)
    sink = tls_sink(sinks, pki.good)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True, rpt=True)
    relay = make_relay(cfg)
    status = attempt(cfg, tmp_path, domain, relay=relay)
    assert status.ok, status
    assert len(sink.transactions) == 1
    assert ("no-policy-found", "sts-policy-invalid") in rpt_results(relay, domain)


# ------------------------------------------------------------------------------------------
# MTA-STS: fetching (RFC 8461 §3.3)


def test_redirect_is_not_followed(zone, policy_dns, sinks, pki, web, tmp_path) -> None:
    target = new_domain(zone)  # serves a valid enforce policy at the redirect target
    web.replies[target] = Reply(policy_text("enforce", (NOWHERE,)))
    domain = new_domain(zone)
    web.replies[domain] = Reply(
        b"moved", code=301,
        location=f"https://mta-sts.{target}:{web.port}/.well-known/mta-sts.txt".encode())
    announce(zone, domain)
    sink = tls_sink(sinks, pki.good)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True, rpt=True)
    relay = make_relay(cfg)
    status = attempt(cfg, tmp_path, domain, relay=relay)
    assert status.ok, status
    assert web.fetched(domain) == 1 and web.fetched(target) == 0
    assert ("no-policy-found", "sts-policy-fetch-error") in rpt_results(relay, domain)
    assert len(sink.transactions) == 1


def test_content_type_must_be_text_plain(zone, policy_dns, sinks, pki, web, tmp_path) -> None:
    sink = tls_sink(sinks, pki.good)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True, rpt=True)
    relay = make_relay(cfg)
    for ctype in (b"text/html", None):
        domain = new_domain(zone)
        web.replies[domain] = Reply(policy_text("enforce", (NOWHERE,)), ctype=ctype)
        announce(zone, domain)
        status = attempt(cfg, tmp_path, domain, relay=relay)
        assert status.ok, (ctype, status)
        assert ("no-policy-found", "sts-policy-invalid") in rpt_results(relay, domain)
    # Parameters are ignored: text/plain with a charset is a policy.
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("enforce", (NOWHERE,)),
                                ctype=b"Text/Plain; charset=utf-8")
    announce(zone, domain)
    status = attempt(cfg, tmp_path, domain, relay=relay)
    assert status.temporary and status.reason is Reason.POLICY, status
    assert len(sink.transactions) == 2


def test_http_error_and_oversized_policy_mean_no_policy(zone, policy_dns, sinks, pki, web,
                                                        tmp_path) -> None:
    sink = tls_sink(sinks, pki.good)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True, rpt=True)
    relay = make_relay(cfg)
    failing = new_domain(zone)
    web.replies[failing] = Reply(policy_text("enforce", (NOWHERE,)), code=500)
    announce(zone, failing)
    assert attempt(cfg, tmp_path, failing, relay=relay).ok
    assert ("no-policy-found", "sts-policy-fetch-error") in rpt_results(relay, failing)
    # A valid enforce policy padded past 64 KiB with unknown keys (which would be ignored).
    big = new_domain(zone)
    padding = tuple(f"x-pad{i}: {'p' * 100}" for i in range(700))
    web.replies[big] = Reply(policy_text("enforce", (NOWHERE,), extra=padding))
    assert len(web.replies[big].body) > 64 * 1024
    announce(zone, big)
    assert attempt(cfg, tmp_path, big, relay=relay).ok
    assert ("no-policy-found", "sts-policy-invalid") in rpt_results(relay, big)
    assert len(sink.transactions) == 2


def test_policy_host_with_wrong_certificate_is_no_policy(zone, policy_dns, sinks, pki, web,
                                                         tmp_path) -> None:
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("enforce", (NOWHERE,)))
    announce(zone, domain)
    sink = tls_sink(sinks, pki.good)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True, rpt=True,
                 wrong_web=True, tls={"trustAll": True})  # trustAll is for SMTP only
    relay = make_relay(cfg)
    status = attempt(cfg, tmp_path, domain, relay=relay)
    assert status.ok, status
    assert ("no-policy-found", "sts-webpki-invalid") in rpt_results(relay, domain)
    assert len(sink.transactions) == 1


# ------------------------------------------------------------------------------------------
# MTA-STS: applying the policy (RFC 8461 §4, §5)


def test_enforce_skips_unlisted_mx_and_uses_the_listed_one(zone, policy_dns, sinks, pki, web,
                                                           tmp_path) -> None:
    # MX_B (better preference, 127.0.0.2) is not in the policy; MX_A is.
    domain = new_domain(zone, (5, MX_B), (20, MX_A))
    web.replies[domain] = Reply(policy_text("enforce", (MX_A,)))
    announce(zone, domain)
    unlisted = tls_sink(sinks, pki.good, interface="127.0.0.2")
    listed = tls_sink(sinks, pki.good)
    status = attempt(config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True),
                     tmp_path, domain)
    assert status.ok, status
    assert unlisted.sessions == []
    assert [s.tls for s in listed.sessions] == [True] and len(listed.transactions) == 1


def test_enforce_first_mx_without_starttls_falls_to_the_next_never_cleartext(
        zone, policy_dns, sinks, pki, web, tmp_path) -> None:
    domain = new_domain(zone, (5, MX_B), (20, MX_A))
    web.replies[domain] = Reply(policy_text("enforce", (MX_A, MX_B)))
    announce(zone, domain)
    plain = tls_sink(sinks, None, interface="127.0.0.2")
    good = tls_sink(sinks, pki.good)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True, rpt=True)
    relay = make_relay(cfg)
    status = attempt(cfg, tmp_path, domain, relay=relay)
    assert status.ok, status
    assert len(plain.sessions) == 1 and plain.transactions == []
    assert not any(c.upper().startswith("MAIL") for c in plain.sessions[0].commands)
    assert len(good.transactions) == 1 and good.sessions[0].tls
    assert sorted(rpt_results(relay, domain), key=str) == sorted(
        [("sts", None), ("sts", "starttls-not-supported")], key=str)


def test_enforce_overrides_blind_trust_settings(zone, policy_dns, sinks, pki, web,
                                                tmp_path) -> None:
    """checkServerIdentity=false and trustHosts=["*"] (not only trustAll) are overridden by an
    enforce policy: a certificate for another name is refused."""
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("enforce", (MX_A,)))
    announce(zone, domain)
    sink = tls_sink(sinks, pki.wrong)
    for tls in ({"checkServerIdentity": False}, {"trustHosts": ["*"]}, {"trustHosts": [MX_A]}):
        status = attempt(config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True,
                                tls=tls), tmp_path, domain)
        assert status.temporary and status.reason is Reason.TLS, (tls, status)
    assert sink.transactions == []
    assert len(sink.sessions) == 3 and all(s.tls for s in sink.sessions)


def test_enforce_expired_certificate_is_deferred_and_reported(zone, policy_dns, sinks, pki, web,
                                                              tmp_path) -> None:
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("enforce", (MX_A,)))
    announce(zone, domain)
    sink = tls_sink(sinks, pki.expired)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True, rpt=True)
    relay = make_relay(cfg)
    status = attempt(cfg, tmp_path, domain, relay=relay)
    assert status.temporary and status.reason is Reason.TLS, status
    assert sink.transactions == []
    assert rpt_results(relay, domain) == [("sts", "certificate-expired")]


def test_testing_mode_without_starttls_is_delivered_and_reported(zone, policy_dns, sinks, pki,
                                                                 web, tmp_path) -> None:
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("testing", (MX_A,)))
    announce(zone, domain)
    sink = tls_sink(sinks, None)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True, rpt=True)
    relay = make_relay(cfg)
    status = attempt(cfg, tmp_path, domain, relay=relay)
    assert status.ok, status
    assert [s.tls for s in sink.sessions] == [False]
    assert rpt_results(relay, domain) == [("sts", "starttls-not-supported")]


def test_testing_mode_does_not_weaken_local_certificate_checks(zone, policy_dns, sinks, pki,
                                                               web, tmp_path) -> None:
    sink = tls_sink(sinks, pki.wrong)
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True, rpt=True)
    relay = make_relay(cfg)
    control = new_domain(zone)  # no MTA-STS at all: the local policy refuses the certificate
    status = attempt(cfg, tmp_path, control, relay=relay)
    assert status.temporary and status.reason is Reason.TLS, status
    assert sink.transactions == []
    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("testing", (MX_A,)))
    announce(zone, domain)
    status = attempt(cfg, tmp_path, domain, relay=relay)
    assert ("sts", "certificate-host-mismatch") in rpt_results(relay, domain)
    assert status.temporary and status.reason is Reason.TLS, status
    assert sink.transactions == [], "sent to a peer our own TLS settings reject"


# ------------------------------------------------------------------------------------------
# DANE (RFC 7672)


def test_dane_tlsa_without_starttls_is_deferred_never_cleartext(zone, policy_dns, sinks, pki,
                                                                tmp_path) -> None:
    domain = new_domain(zone, (10, MX_B))
    sink = tls_sink(sinks, None, interface="127.0.0.2")
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.good.x509))
    cfg = config(policy_dns.ad_port, sinks, pki, tmp_path, dane=True, rpt=True)
    relay = make_relay(cfg)
    status = attempt(cfg, tmp_path, domain, relay=relay)
    assert status.temporary and status.reason is Reason.TLS, status
    assert len(sink.sessions) == 1 and sink.transactions == []
    assert rpt_results(relay, domain) == [("tlsa", "starttls-not-supported")]


@pytest.mark.parametrize("selector,mtype", [(0, 1), (1, 2), (1, 0), (0, 0), (0, 2)])
def test_dane_ee_matching_variants(zone, policy_dns, sinks, pki, tmp_path, selector,
                                   mtype) -> None:
    """DANE-EE with every selector/matching type; the leaf names wrong.example (PKIX would
    fail) and a non-matching DANE-EE record sits next to the matching one. (Kept under 512
    bytes: the stub server does not set TC on large UDP answers, see the module notes.)"""
    domain = new_domain(zone, (10, MX_B))
    sink = tls_sink(sinks, pki.wrong, interface="127.0.0.2")
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.other.x509, 3, 1, 1),
             rdata(pki.wrong.x509, 3, selector, mtype))
    status = attempt(config(policy_dns.ad_port, sinks, pki, tmp_path, dane=True), tmp_path,
                     domain)
    assert status.ok, status
    assert len(sink.transactions) == 1 and sink.sessions[0].tls


def test_dane_ee_ignores_expiry(zone, policy_dns, sinks, pki, tmp_path) -> None:
    domain = new_domain(zone, (10, MX_B))
    sink = tls_sink(sinks, pki.expired, interface="127.0.0.2")
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.expired.x509))
    status = attempt(config(policy_dns.ad_port, sinks, pki, tmp_path, dane=True), tmp_path,
                     domain)
    assert status.ok, status  # RFC 7672 §3.1.1: no validity-period checks for DANE-EE
    assert len(sink.transactions) == 1


def test_dane_pkix_usages_are_unusable_but_tls_stays_mandatory(zone, policy_dns, sinks, pki,
                                                               tmp_path) -> None:
    """Only PKIX-TA(0)/PKIX-EE(1) records, none matching the peer: they are ignored
    (RFC 7672 §3.1.3) — with trustAll the wrong-name peer gets the mail over TLS — yet TLS is
    still required: the same records in front of a peer without STARTTLS defer."""
    cfg = config(policy_dns.ad_port, sinks, pki, tmp_path, dane=True, tls={"trustAll": True})
    domain = new_domain(zone, (10, MX_B))
    tls_peer = tls_sink(sinks, pki.wrong, interface="127.0.0.2")
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.other.x509, 1, 1, 1),
             rdata(pki.other.x509, 0, 0, 1))
    status = attempt(cfg, tmp_path, domain)
    assert status.ok, status
    assert len(tls_peer.transactions) == 1 and tls_peer.sessions[0].tls
    # Same unusable set, a peer without STARTTLS on MX_A.
    plain_domain = new_domain(zone, (10, MX_A))
    plain = tls_sink(sinks, None)
    set_tlsa(zone, MX_A, sinks.port, rdata(pki.other.x509, 1, 1, 1))
    try:
        status = attempt(cfg, tmp_path, plain_domain)
    finally:
        set_tlsa(zone, MX_A, sinks.port)
    assert status.temporary and status.reason is Reason.TLS, status
    assert plain.transactions == []


def test_dane_ta_requires_the_mx_name(zone, policy_dns, sinks, pki, tmp_path) -> None:
    """DANE-TA(2) pins the CA; the leaf chains to it but names wrong.example → refused
    (RFC 7672 §3.2.2); a leaf naming the MX host with the same anchor is accepted."""
    domain = new_domain(zone, (10, MX_B))
    sink = tls_sink(sinks, pki.wrong, interface="127.0.0.2", ca=pki.ca)
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.ca, 2, 1, 1))
    cfg = config(policy_dns.ad_port, sinks, pki, tmp_path, dane=True)
    status = attempt(cfg, tmp_path, domain)
    assert status.temporary and status.reason is Reason.TLS, status
    assert sink.transactions == []
    sink.behaviour.tls = pki.good.ctx(pki.ca)
    status = attempt(cfg, tmp_path, domain)
    assert status.ok, status
    assert len(sink.transactions) == 1


def test_dane_takes_precedence_over_mta_sts(zone, policy_dns, sinks, pki, web,
                                            tmp_path) -> None:
    cfg = config(policy_dns.ad_port, sinks, pki, tmp_path, web, sts=True, dane=True)
    # (a) DANE-EE matches a wrong-name certificate; MTA-STS enforce does not even list the
    # host: DANE decides, delivered.
    domain = new_domain(zone, (10, MX_B))
    web.replies[domain] = Reply(policy_text("enforce", (NOWHERE,)))
    announce(zone, domain)
    sink = tls_sink(sinks, pki.wrong, interface="127.0.0.2")
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.wrong.x509))
    status = attempt(cfg, tmp_path, domain)
    assert status.ok, status
    assert len(sink.transactions) == 1
    # (b) DANE mismatch; the certificate is PKIX-valid for the MX and MTA-STS enforce lists it:
    # the failed DANE check is not rescued by MTA-STS.
    sink.behaviour.tls = pki.good.ctx(pki.ca)
    web.replies[domain] = Reply(policy_text("enforce", (MX_B,)))
    announce(zone, domain, "hunt2")
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.other.x509))
    status = attempt(cfg, tmp_path, domain)
    assert status.temporary and status.reason is Reason.TLS, status
    assert len(sink.transactions) == 1


def test_dane_needs_a_signed_mx_rrset(zone, policy_dns, sinks, pki, tmp_path) -> None:
    """Authenticated TLSA but an unauthenticated MX RRset: no DANE (RFC 7672 §2.2.1)."""
    domain = new_domain(zone, (10, MX_B))
    sink = tls_sink(sinks, pki.good, interface="127.0.0.2")
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.other.x509))
    cfg = config(policy_dns.ad_port, sinks, pki, tmp_path, dane=True)
    status = attempt(cfg, tmp_path, domain)
    assert status.temporary and status.reason is Reason.TLS, status  # control: DANE applies
    policy_dns.zone.insecure.add(domain)
    try:
        status = attempt(cfg, tmp_path, domain)
    finally:
        policy_dns.zone.insecure.discard(domain)
    assert status.ok, status
    assert len(sink.transactions) == 1


# ------------------------------------------------------------------------------------------
# REQUIRETLS (RFC 8689) and TLS-Required: No


def test_requiretls_over_dane_passes_the_parameter_or_bounces(zone, policy_dns, sinks, pki,
                                                              tmp_path) -> None:
    domain = new_domain(zone, (10, MX_B))
    sink = tls_sink(sinks, pki.wrong, interface="127.0.0.2",
                    extensions=[*EXTS, "REQUIRETLS"])
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.wrong.x509))
    cfg = config(policy_dns.ad_port, sinks, pki, tmp_path, dane=True)
    status = attempt(cfg, tmp_path, domain, requiretls=True)
    assert status.ok, status
    [txn] = sink.transactions
    assert "REQUIRETLS" in txn.mail.upper().split()
    # The peer stops advertising REQUIRETLS: 5.7.30, permanent, no MAIL at all.
    sink.behaviour.extensions = list(EXTS)
    status = attempt(cfg, tmp_path, domain, requiretls=True)
    assert status.permanent and status.enhanced == "5.7.30" and status.reason is Reason.TLS
    assert len(sink.transactions) == 1
    assert not any(c.upper().startswith("MAIL") for c in sink.sessions[-1].commands)


def test_requiretls_treats_sts_testing_as_enforce(zone, policy_dns, sinks, pki, web,
                                                  tmp_path) -> None:
    """Plain DNS (no AD): only the MTA-STS policy authenticates the MX, and under REQUIRETLS a
    testing policy is enforced: an unlisted MX or a wrong certificate bounce with 5.7.30."""
    cfg = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True)
    sink = tls_sink(sinks, pki.good, extensions=[*EXTS, "REQUIRETLS"])
    unlisted = new_domain(zone)
    web.replies[unlisted] = Reply(policy_text("testing", (NOWHERE,)))
    announce(zone, unlisted)
    status = attempt(cfg, tmp_path, unlisted, requiretls=True)
    assert status.permanent and status.enhanced == "5.7.30", status
    assert sink.sessions == []
    listed = new_domain(zone)
    web.replies[listed] = Reply(policy_text("testing", (MX_A,)))
    announce(zone, listed)
    assert attempt(cfg, tmp_path, listed, requiretls=True).ok
    sink.behaviour.tls = pki.wrong.ctx(pki.ca)
    status = attempt(cfg, tmp_path, listed, requiretls=True)
    assert status.permanent and status.enhanced == "5.7.30", status
    assert len(sink.transactions) == 1


def test_requiretls_with_only_unusable_tlsa_still_needs_an_authenticated_peer(
        zone, policy_dns, sinks, pki, tmp_path) -> None:
    domain = new_domain(zone, (10, MX_B))
    sink = tls_sink(sinks, pki.wrong, interface="127.0.0.2",
                    extensions=[*EXTS, "REQUIRETLS"])
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.wrong.x509, 1, 1, 1))  # PKIX-EE: unusable
    cfg = config(policy_dns.ad_port, sinks, pki, tmp_path, dane=True, tls={"trustAll": True})
    status = attempt(cfg, tmp_path, domain, requiretls=True)
    assert status.permanent and status.enhanced == "5.7.30", status
    assert sink.transactions == [], "REQUIRETLS message given to an unauthenticated peer"


def test_requiretls_to_a_peer_without_starttls_bounces(zone, policy_dns, sinks, pki,
                                                       tmp_path) -> None:
    """Validated MX (AD), no DANE/MTA-STS: PKIX path; a peer without STARTTLS → 5.7.30."""
    domain = new_domain(zone, (10, MX_B))
    sink = tls_sink(sinks, None, interface="127.0.0.2", extensions=[*EXTS, "REQUIRETLS"])
    status = attempt(config(policy_dns.ad_port, sinks, pki, tmp_path), tmp_path, domain,
                     requiretls=True)
    assert status.permanent and status.enhanced == "5.7.30" and status.reason is Reason.TLS
    assert sink.transactions == []


def test_tls_required_no_ignores_dane_but_only_in_the_header(zone, policy_dns, sinks, pki,
                                                             tmp_path) -> None:
    domain = new_domain(zone, (10, MX_B))
    sink = tls_sink(sinks, pki.good, interface="127.0.0.2")
    set_tlsa(zone, MX_B, sinks.port, rdata(pki.other.x509))  # DANE mismatch
    cfg = config(policy_dns.ad_port, sinks, pki, tmp_path, dane=True)
    # In the body, not the header: no effect, DANE defers.
    body_only = b"Subject: x\r\n\r\nTLS-Required: No\r\n"
    status = attempt(cfg, tmp_path, domain, body_only)
    assert status.temporary and status.reason is Reason.TLS, status
    # Folded into another field: no effect either.
    folded = b"Subject: x\r\nX-Note: see\r\n TLS-Required: No\r\n\r\nbody\r\n"
    status = attempt(cfg, tmp_path, domain, folded)
    assert status.temporary and status.reason is Reason.TLS, status
    assert sink.transactions == []
    # The real header field: DANE ignored; our own settings (PKIX for the MX name) still hold.
    status = attempt(cfg, tmp_path, domain, b"TLS-Required: no\r\nSubject: x\r\n\r\nbody\r\n")
    assert status.ok, status
    assert len(sink.transactions) == 1 and sink.sessions[-1].tls


# ------------------------------------------------------------------------------------------
# Smart-host routes and trust settings


def _with_routes(cfg: Any, *routes: Any) -> Any:
    return replace(cfg, relay=replace(cfg.relay, routes=list(routes)))


def test_smart_host_route_uses_its_own_tls_settings_not_the_domain_policy(
        zone, policy_dns, sinks, pki, web, tmp_path) -> None:
    from kotlin_smtp_py.config import RouteConfig

    domain = new_domain(zone)
    web.replies[domain] = Reply(policy_text("enforce", (NOWHERE,)))
    announce(zone, domain)
    sink = tls_sink(sinks, None)
    base = config(policy_dns.plain_port, sinks, pki, tmp_path, web, sts=True)
    cfg = _with_routes(base, RouteConfig(domain=domain, host=MX_A, port=sinks.port,
                                         startTlsRequired=True))
    status = attempt(cfg, tmp_path, domain)
    assert status.temporary and status.reason is Reason.TLS, status  # the route's setting
    assert sink.transactions == []
    sink.behaviour.tls = pki.good.ctx(pki.ca)
    status = attempt(cfg, tmp_path, domain)
    assert status.ok, status  # the MTA-STS policy (which excludes MX_A) is not consulted
    assert web.fetched(domain) == 0
    assert len(sink.transactions) == 1 and sink.sessions[-1].tls


def test_requiretls_through_a_smart_host_given_by_ip_address(zone, policy_dns, sinks, pki,
                                                             tmp_path) -> None:
    from kotlin_smtp_py.config import RouteConfig

    domain = new_domain(zone)
    sink = tls_sink(sinks, pki.good, extensions=[*EXTS, "REQUIRETLS"])
    cfg = _with_routes(config(policy_dns.plain_port, sinks, pki, tmp_path),
                       RouteConfig(domain=domain, host="127.0.0.1", port=sinks.port))
    assert attempt(cfg, tmp_path, domain).ok  # control: PKIX + IP SAN verified without REQUIRETLS
    assert sink.sessions[-1].tls
    status = attempt(cfg, tmp_path, domain, requiretls=True)
    assert status.ok, status
    assert "REQUIRETLS" in sink.transactions[-1].mail.upper().split()


def test_fail_on_trust_all_also_refuses_trust_hosts_star(tmp_path) -> None:
    from kotlin_smtp_py.config import (
        Config,
        OutboundTlsConfig,
        RelayConfig,
        SmtpConfig,
        SpoolConfig,
        validate,
    )

    def problems(**tls: Any) -> list[str]:
        cfg = Config(smtp=SmtpConfig(spool=SpoolConfig(dir=str(tmp_path / "spool")),
                                     relay=RelayConfig(outboundTls=OutboundTlsConfig(
                                         failOnTrustAll=True, **tls))))
        return [p for p in validate(cfg) if "trust" in p.lower()]

    assert problems(trustAll=True)  # control
    assert problems(trustHosts=["*"])
