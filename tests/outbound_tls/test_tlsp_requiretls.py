"""REQUIRETLS (RFC 8689) end to end through a real SmtpService, and ``TLS-Required: No``.

The MX RRset comes from the AD-setting stub resolver (see test_tlsp_dane.py for why a stub):
REQUIRETLS needs a DNSSEC-validated MX (or an MTA-STS policy) before anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from e2e_support import Dsn, E2EServer, make_server_factory, message, submit
from outbound_sink import Behaviour, server_tls
from outbound_support import make_entry
from tls_policy_support import (
    OTHER_MX,
    announce,
    dom,
    make_relay,
    policy_config,
    relay_attempt,
)

from kotlin_smtp_py.status import Reason

EXTS = ["PIPELINING", "SIZE 10000000", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES"]


@pytest.fixture
def server(tmp_path: Path, policy_certs, policy_dns, sinks) -> Iterator[Callable[..., E2EServer]]:
    yield from make_server_factory(tmp_path, policy_certs, policy_dns.ad_port, sinks.port)


def test_requiretls_to_a_peer_that_advertises_it(server, sinks, policy_certs) -> None:
    sink = sinks.start(behaviour=Behaviour(
        extensions=[*EXTS, "REQUIRETLS"],
        tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    srv = server()
    rcpt = f"bob@{dom('rtls')}"
    submit(srv, policy_certs, "carol@localhost", [rcpt], message("rtls ok", to=rcpt),
           mail_options=("REQUIRETLS",))
    [txn] = srv.pump(lambda: sink.transactions, message="the relayed message")
    assert txn.mail.split()[-1] == "REQUIRETLS", txn.mail
    [session] = sink.sessions
    assert session.tls
    srv.pump(lambda: not srv.entries(), message="an empty queue")
    assert srv.messages("carol") == [], "no DSN"


def test_requiretls_to_a_peer_without_it_bounces_5_7_30(server, sinks, policy_certs) -> None:
    sink = sinks.start(behaviour=Behaviour(
        extensions=EXTS, tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    srv = server()
    rcpt = f"bob@{dom('rtls')}"
    submit(srv, policy_certs, "carol@localhost", [rcpt], message("rtls no", to=rcpt),
           mail_options=("REQUIRETLS",))
    [raw] = srv.pump(lambda: srv.messages("carol"), message="the 5.7.30 DSN")
    dsn = Dsn(raw)
    assert dsn.one("Action") == "failed"
    assert dsn.one("Status") == "5.7.30"
    assert "REQUIRETLS" in dsn.one("Diagnostic-Code")
    assert sink.transactions == [], "the message never reached the peer"
    assert [s.tls for s in sink.sessions] == [True]
    assert not any(c.upper().startswith("MAIL") for s in sink.sessions for c in s.commands)


def test_requiretls_needs_a_validated_mx(policy_dns, sinks, policy_certs, tmp_path) -> None:
    sink = sinks.start(behaviour=Behaviour(
        extensions=[*EXTS, "REQUIRETLS"],
        tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    entry, path = make_entry(tmp_path, [f"a@{dom('rtls-plain')}"], b"Subject: x\r\n\r\nx\r\n",
                             requiretls=True)
    plain = policy_config(policy_dns.plain_port, sinks.port, policy_certs, tmp_path / "spool")
    [(_, status)] = relay_attempt(make_relay(plain), entry, path)
    assert status.permanent and status.enhanced == "5.7.30" and status.reason is Reason.TLS
    assert sink.sessions == []
    secure = policy_config(policy_dns.ad_port, sinks.port, policy_certs, tmp_path / "spool")
    [(_, status)] = relay_attempt(make_relay(secure), entry, path)
    assert status.ok, status


def test_tls_required_no_relaxes_domain_policy(policy_dns, sinks, policy_certs, sts_web,
                                               tmp_path: Path) -> None:
    domain = dom("relaxed")
    sts_web.serve(domain, "enforce", mx=(OTHER_MX,))  # our MX is not allowed by the policy
    announce(policy_dns, domain, "x1")
    sink = sinks.start(behaviour=Behaviour(
        tls=server_tls(str(policy_certs.cert), str(policy_certs.key))))
    config = policy_config(policy_dns.plain_port, sinks.port, policy_certs, tmp_path / "spool",
                           {"mtaSts": {"enabled": True}}, web_port=sts_web.port)
    relay = make_relay(config)
    entry, path = make_entry(tmp_path, [f"a@{domain}"], b"Subject: strict\r\n\r\nx\r\n")
    [(_, status)] = relay_attempt(relay, entry, path)
    assert status.temporary and status.reason is Reason.POLICY, status
    assert sink.sessions == []
    body = b"Subject: relaxed\r\ntls-required:  NO \r\n\r\nx\r\n"
    entry, path = make_entry(tmp_path, [f"a@{domain}"], body)
    [(_, status)] = relay_attempt(relay, entry, path)
    assert status.ok, status
    assert len(sink.transactions) == 1
    # With the REQUIRETLS parameter the header is ignored (RFC 8689 §4.1): policy applies.
    entry, path = make_entry(tmp_path, [f"a@{domain}"], body, requiretls=True)
    [(_, status)] = relay_attempt(relay, entry, path)
    assert status.permanent and status.enhanced == "5.7.30", status
    assert len(sink.transactions) == 1
