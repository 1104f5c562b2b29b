"""Open-relay battery against a running server: who may relay, and address tricks never do."""

from __future__ import annotations

import smtplib
import subprocess
import sys

import pytest
from e2e_support import PASSWORD, message, ssl_client_context
from outbound_sink import Behaviour

from kotlin_smtp_py import config as cfg

# Every way of sneaking a remote address past us. The remote part is always normal.test, whose MX
# is the sink: had anything been relayed, the sink would have seen a session.
# (path, expected reply code, expected enhanced status) for an unauthenticated client.
UNAUTHENTICATED = [
    # Through a local domain the local part is only ever a mailbox name (never re-parsed as a
    # route), so these are unknown local users: refused, but with 5.1.1 rather than 5.7.1.
    ("<carol%normal.test@localhost>", 550, "5.1.1"),  # percent hack
    ('<"carol@normal.test"@localhost>', 550, "5.1.1"),  # quoted local part
    ("<normal.test!carol@localhost>", 550, "5.1.1"),  # bang path
    # Remote domains: the relay policy answers.
    ("<carol%localhost@normal.test>", 550, "5.7.1"),  # percent hack in a remote local part
    ("<normal.test!carol@normal.test>", 550, "5.7.1"),  # bang path to a remote domain
    ("<@a.test,@b.test:user@normal.test>", 550, "5.7.1"),  # source route
    ("<user@[127.0.0.1]>", 550, "5.7.1"),  # address literal
    ("<user@[IPv6:::1]>", 550, "5.7.1"),  # IPv6 address literal
    ("<user@normal.test>", 550, "5.7.1"),  # plain remote domain
    # A trailing dot is not a valid domain (RFC 5321 §4.1.2): a syntax error, before policy.
    ("<user@normal.test.>", 501, "5.1.3"),
]
# Tricks stay refused even for an authenticated client or an allowlisted network.
TRICKS = [p for p, _, _ in UNAUTHENTICATED if p not in
          ("<user@normal.test>", "<@a.test,@b.test:user@normal.test>")]
REMOTE = "<user@normal.test>"


def _session(server, certs, login: bool) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.e2e.test", timeout=15)
    s.ehlo()
    s.starttls(context=ssl_client_context(certs))
    s.ehlo()
    if login:
        s.login("carol", PASSWORD)
    code, _ = s.docmd("MAIL FROM:<carol@localhost>")
    assert code == 250
    return s


def _rcpt(s: smtplib.SMTP, path: str) -> tuple[int, str]:
    code, text = s.docmd(f"RCPT TO:{path}")
    return code, text.decode()


def test_unauthenticated_battery_all_refused(e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour())
    server = e2e_server()
    with _session(server, certs, login=False) as s:
        got = [(path, *(lambda c, t: (c, t[:5]))(*_rcpt(s, path)))
               for path, _, _ in UNAUTHENTICATED]
        assert got == UNAUTHENTICATED
        assert s.docmd("DATA")[0] in (503, 554)
    server.settle()
    assert server.entries() == [] and sink.sessions == []


def test_address_tricks_refused_even_when_authenticated(e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour())
    server = e2e_server()
    with _session(server, certs, login=True) as s:
        for path in TRICKS:
            code, text = _rcpt(s, path)
            assert code in (501, 550) and text.startswith("5."), (path, code, text)
        assert s.docmd("DATA")[0] in (503, 554)
    server.settle()
    assert server.entries() == [] and sink.sessions == []


def test_source_route_is_stripped_never_followed(e2e_server, sinks, certs) -> None:
    """RFC 5321 §4.1.1.3: an authenticated client's source route is ignored, not used."""
    sink = sinks.start(behaviour=Behaviour())
    server = e2e_server()
    with _session(server, certs, login=True) as s:
        assert _rcpt(s, "<@a.test,@b.test:user@normal.test>")[0] == 250
        assert s.data(message("source route"))[0] == 250
    server.pump(lambda: sink.transactions, message="the relayed message")
    assert sink.transactions[0].rcpts == ["RCPT TO:<user@normal.test>"]


def test_authenticated_relay_accepted_and_delivered(e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour())
    server = e2e_server()
    with _session(server, certs, login=True) as s:
        assert _rcpt(s, REMOTE)[0] == 250
        assert s.data(message("authenticated relay"))[0] == 250
    server.pump(lambda: sink.transactions, message="the relayed message")
    assert sink.transactions[0].rcpts == ["RCPT TO:<user@normal.test>"]


def test_allowed_client_cidr_relays_without_auth(e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour())
    server = e2e_server({"smtp": {"relay": {"allowedClientCidrs": ["127.0.0.0/8"]}}})
    with _session(server, certs, login=False) as s:
        for path in TRICKS:  # the allowlist does not open the tricks
            code, text = _rcpt(s, path)
            assert code in (501, 550) and text.startswith("5."), (path, code, text)
        assert _rcpt(s, REMOTE)[0] == 250
        assert s.data(message("cidr relay"))[0] == 250
    server.pump(lambda: sink.transactions, message="the relayed message")
    assert sink.transactions[0].rcpts == ["RCPT TO:<user@normal.test>"]


def test_cidr_that_does_not_match_refuses(e2e_server, sinks, certs) -> None:
    sinks.start(behaviour=Behaviour())
    server = e2e_server({"smtp": {"relay": {"allowedClientCidrs": ["10.0.0.0/8"]}}})
    with _session(server, certs, login=False) as s:
        code, text = _rcpt(s, REMOTE)
        assert (code, text[:5]) == (550, "5.7.1")


OPEN = """
smtp:
  storage: {{mailboxDir: {d}/m, tempDir: {d}/t, listsDir: {d}/l}}
  spool: {{dir: {d}/s}}
  relay: {{enabled: true, requireAuthForRelay: false, failOnOpenRelay: true{extra}}}
"""


def test_fail_on_open_relay_refuses_the_config(tmp_path) -> None:
    with pytest.raises(cfg.ConfigError, match="failOnOpenRelay"):
        cfg.load_text(OPEN.format(d=tmp_path, extra=""))
    path = tmp_path / "open.yaml"
    path.write_text(OPEN.format(d=tmp_path, extra=""))
    proc = subprocess.run([sys.executable, "-m", "kotlin_smtp_py", "check-config", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0
    assert "failOnOpenRelay" in proc.stdout + proc.stderr
    # With an allowlist the relay is no longer open to anyone: the same guard lets it load.
    cfg.load_text(OPEN.format(d=tmp_path, extra=", allowedClientCidrs: [127.0.0.0/8]"))
