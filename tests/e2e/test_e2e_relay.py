"""smtplib → our server (AUTH over STARTTLS) → spool → MX lookup → a TLS-verified sink."""

from __future__ import annotations

from e2e_support import HOSTNAME, message, split_received, submit
from outbound_sink import Behaviour, server_tls


def test_submission_relayed_byte_identical_over_verified_starttls(e2e_server, sinks,
                                                                 certs) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=server_tls(str(certs.cert), str(certs.key))))
    # startTlsRequired + checkServerIdentity: only a verified TLS session may carry the message.
    server = e2e_server({"smtp": {"relay": {"outboundTls": {"startTlsRequired": True,
                                                            "checkServerIdentity": True}}}})
    body = (b"Line one\r\n.leading dot survives\r\n..two dots\r\n"
            + "caf\u00e9 8bit\r\n".encode() + b"x" * 2000 + b"\r\n\r\nlast line\r\n")
    original = message("relay e2e", to="bob@normal.test", body=body)
    refused = submit(server, certs, "carol@localhost", ["bob@normal.test", "eve@normal.test"],
                     original, mail_options=("BODY=8BITMIME",))
    assert refused == {}
    server.pump(lambda: sink.transactions, message="the sink to receive the message")
    [txn] = sink.transactions
    session = next(s for s in sink.sessions if s.transactions)
    assert session.tls, "relayed without STARTTLS"
    assert session.commands[0] == f"EHLO {HOSTNAME}"
    assert txn.mail.startswith("MAIL FROM:<carol@localhost>")
    assert sorted(txn.rcpts) == ["RCPT TO:<bob@normal.test>", "RCPT TO:<eve@normal.test>"]
    received, rest = split_received(txn.body)
    assert rest == original, "relayed bytes differ from what was submitted"
    assert f"by {HOSTNAME}".encode() in received
    assert b"(authenticated)" in received
    # One Received only: the spool adds nothing else and the relay adds nothing at all.
    assert txn.body.count(b"\r\nReceived: ") == 0
    server.pump(lambda: not server.entries(), message="the queue entry to be completed")


def test_unverifiable_peer_is_not_given_the_message(e2e_server, sinks, certs) -> None:
    """The same path with a certificate for another host: TLS required → deferred, not sent."""
    sink = sinks.start(behaviour=Behaviour(tls=server_tls(str(certs.wrong_cert),
                                                          str(certs.wrong_key))))
    server = e2e_server({"smtp": {"relay": {"outboundTls": {"startTlsRequired": True}}}})
    submit(server, certs, "carol@localhost", ["bob@normal.test"], message("wrong cert"))
    entries = server.pump(lambda: [e for e in server.entries() if e.get("attempts")],
                          message="the entry to be deferred")
    assert entries[0]["attempts"] == 1
    assert sink.transactions == []
    assert any(s.commands and s.commands[-1].upper() != "DATA" for s in sink.sessions)
