"""The inbound ESMTP session over real loopback sockets (smtplib and raw sockets)."""

from __future__ import annotations

import base64
import json
import os
import re
import smtplib
import ssl
from typing import Any

import pytest
from helpers import on_reactor, wait_until
from protocol_support import Client, Server
from twisted.internet import defer, reactor

from kotlin_smtp_py.inbound.auth import hash_password

ENHANCED = re.compile(r"^\d\.\d{1,3}\.\d{1,3} ")
# Local mail is queued instead of delivered before the 250, for tests that look at the queue.
QUEUED: dict[str, Any] = {"smtp": {"spool": {"directLocalDelivery": False}}}


def ehlo(c: Client, name: str = "client.test") -> list[str]:
    c.reply()  # greeting
    code, lines = c.cmd(f"EHLO {name}")
    assert code == 250
    return lines


def body_of(msg: bytes) -> bytes:
    return msg.split(b"\r\n\r\n", 1)[1]


# -- EHLO and basic verbs ----------------------------------------------------------------------


def test_ehlo_advertises_extensions_and_starttls_only_before_tls(make_server: Any,
                                                                 certs: Any) -> None:
    srv: Server = make_server()
    c = Client(srv.port)
    lines = ehlo(c)
    keywords = {ln.split(" ")[0] for ln in lines[1:]}
    assert {"PIPELINING", "8BITMIME", "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING", "DSN",
            "STARTTLS"} <= keywords
    assert "SIZE 1000000" in lines
    assert "AUTH" not in keywords, "AUTH must not be offered before TLS"
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    code, lines = c.cmd("EHLO client.test")
    keywords = {ln.split(" ")[0] for ln in lines[1:]}
    assert code == 250 and "STARTTLS" not in keywords
    assert "AUTH PLAIN LOGIN" in lines
    assert c.cmd("STARTTLS")[0] == 503


def test_every_non_greeting_reply_has_an_enhanced_code(make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    ehlo(c)
    for command in ["NOOP", "HELP", "RSET", "VRFY alice", "EXPN list", "ETRN x", "FOO",
                    "MAIL FROM:<a@b.test> FOO=BAR", "RCPT TO:<alice@localhost>",
                    "MAIL FROM:<a@b.test>", "RCPT TO:<nobody@localhost>",
                    "RCPT TO:<alice@localhost>", "RSET", "DATA"]:
        code, lines = c.cmd(command)
        assert ENHANCED.match(lines[-1]), (command, code, lines)
    code, lines = c.cmd("QUIT")
    assert code == 221 and ENHANCED.match(lines[0])


def test_noop_help_rset_quit_and_unknown(make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    ehlo(c)
    assert c.cmd("NOOP")[0] == 250
    assert c.cmd("HELP")[0] == 214
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("VRFY alice")[0] == 502
    assert c.cmd("XYZZY")[0] == 500
    assert c.cmd("QUIT")[0] == 221
    assert c.closed()


def test_smtplib_delivers_to_maildir_with_received_and_added_headers(make_server: Any) -> None:
    srv = make_server()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.ehlo("client.test")
        code, _ = s.mail("sender@remote.test")
        s.rcpt("alice@localhost")
        code, resp = s.data(b"Subject: hi\r\n\r\nhello\r\n.dotted\r\n")
    assert code == 250
    qid = re.search(rb"queued as (\w+)", resp)
    assert qid
    (msg,) = srv.wait_messages("alice", 1)
    assert msg.startswith(b"Return-Path: <sender@remote.test>\r\nDelivered-To: alice@localhost")
    assert b"Received: from client.test ([127.0.0.1])" in msg
    assert b"id " + qid.group(1) in msg
    assert b"\r\nMessage-ID: <" in msg and b"\r\nDate: " in msg
    assert body_of(msg) == b"hello\r\n.dotted\r\n"


def test_existing_message_id_and_date_are_kept(make_server: Any) -> None:
    srv = make_server()
    original = (b"Message-ID: <abc@client.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                b"Subject: x\r\n\r\nbody\r\n")
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("a@remote.test", ["alice@localhost"], original)
    (msg,) = srv.wait_messages("alice", 1)
    assert msg.count(b"Message-ID:") == 1 and msg.count(b"Date:") == 1
    assert msg.endswith(original)


def test_local_recipient_rules(make_server: Any) -> None:
    srv = make_server()
    (srv.root / "lists" / "team").write_text("# the team\nalice@localhost\nbob@example.test\n")
    c = Client(srv.port)
    ehlo(c)
    assert c.cmd("MAIL FROM:<x@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<nobody@localhost>")[:1] == (550,)
    assert c.cmd("RCPT TO:<Postmaster>")[0] == 250
    assert c.cmd("RCPT TO:<postmaster@example.test>")[0] == 250
    assert c.cmd("RCPT TO:<ALICE@LOCALHOST>")[0] == 250
    assert c.cmd("RCPT TO:<alice+tag@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<team@localhost>")[0] == 250
    code, lines = c.cmd("RCPT TO:<someone@elsewhere.test>")
    assert (code, lines[0][:5]) == (550, "5.7.1")
    for trick in ["<../../etc@localhost>", "<alice%other.test@localhost>",
                  '<"alice@other.test"@localhost>', "<other.test!alice@localhost>",
                  "<alice@localhost.>", "<alice@[127.0.0.1]>", "<@a.test,@b.test:x@other.test>"]:
        code, _ = c.cmd(f"RCPT TO:{trick}")
        assert code in (501, 550), trick
    c.cmd("DATA")
    c.send(b"Subject: team\r\n\r\nhi team\r\n.\r\n")
    assert c.reply()[0] == 250
    # alice is named three times (directly, +tag, via the list): one copy per mailbox.
    wait_until(lambda: srv.messages("bob") and srv.messages("postmaster"),
               message="list expansion")
    assert len(srv.messages("alice")) == 1 and len(srv.messages("bob")) == 1


# -- MAIL/RCPT parameters ----------------------------------------------------------------------


def test_mail_parameters(make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    ehlo(c)
    assert c.cmd("MAIL FROM:<a@remote.test> SIZE=2000000")[:1] == (552,)
    assert c.cmd("MAIL FROM:<a@remote.test> SIZE=abc")[0] == 501
    assert c.cmd("MAIL FROM:<a@remote.test> BODY=BINARYMIME")[0] == 501
    assert c.cmd("MAIL FROM:<a@remote.test> FOO=bar")[0] == 555
    assert c.cmd("MAIL FROM:<a@remote.test> RET=MAYBE")[0] == 501
    assert c.cmd("MAIL FROM:<jösé@remote.test>".encode())[0] == 553
    code, lines = c.cmd("MAIL FROM:<jösé@bücher.test> SMTPUTF8 BODY=8BITMIME".encode())
    assert code == 250, lines
    assert c.cmd("RCPT TO:<alice@localhost> FOO=1")[0] == 555
    assert c.cmd("RCPT TO:<alice@localhost> NOTIFY=NEVER,SUCCESS")[0] == 501
    assert c.cmd("RCPT TO:<alice@localhost> NOTIFY=SUCCESS,DELAY ORCPT=rfc822;alice@localhost"
                 )[0] == 250
    assert c.cmd("RSET")[0] == 250
    assert c.cmd("MAIL FROM:<> RET=HDRS ENVID=env+2B1")[0] == 250


def test_dsn_parameters_are_stored_with_the_envelope(make_server: Any) -> None:
    srv = make_server(QUEUED)
    srv.service.scheduler.paused = True
    c = Client(srv.port)
    ehlo(c)
    assert c.cmd("MAIL FROM:<a@remote.test> RET=HDRS ENVID=abc123 BODY=8BITMIME")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost> NOTIFY=FAILURE,DELAY "
                 "ORCPT=rfc822;alice@localhost")[0] == 250
    c.cmd("DATA")
    c.send(b"Subject: x\r\n\r\n\xc3\xa9t\xc3\xa9\r\n.\r\n")
    assert c.reply()[0] == 250
    (path,) = srv.spool_entries()
    data = json.loads(path.read_text())
    env = data["envelope"]
    assert (env["ret"], env["envid"], env["body"]) == ("HDRS", "abc123", "8BITMIME")
    assert data["pending"] == [{"address": "alice@localhost", "notify": ["FAILURE", "DELAY"],
                                "orcpt": "rfc822;alice@localhost"}]


def test_too_many_recipients(make_server: Any) -> None:
    srv = make_server({"smtp": {"limits": {"maxRecipients": 2}}})
    c = Client(srv.port)
    ehlo(c)
    c.cmd("MAIL FROM:<a@remote.test>")
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<bob@localhost>")[0] == 250
    code, lines = c.cmd("RCPT TO:<postmaster@localhost>")
    assert (code, lines[0][:5]) == (452, "4.5.3")


# -- pipelining --------------------------------------------------------------------------------


class SlowPolicy:
    """Wraps the real recipient policy and answers after a delay (asynchronous validation)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self.inner = inner
        self.delay = delay

    def check_recipient(self, session: Any, sender: Any, rcpt: Any) -> Any:
        d: defer.Deferred[Any] = defer.Deferred()
        reactor.callLater(self.delay, d.callback, None)  # type: ignore[attr-defined]
        return d.addCallback(lambda _: self.inner.check_recipient(session, sender, rcpt))


def test_pipelined_transaction_with_slow_validation_replies_in_order(make_server: Any) -> None:
    srv = make_server()
    for f in srv.service.factories:
        f.recipient_policy = SlowPolicy(f.recipient_policy, 0.2)
    c = Client(srv.port)
    c.reply()
    c.send(b"EHLO client.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>\r\n"
           b"RCPT TO:<nobody@localhost>\r\nRCPT TO:<bob@localhost>\r\nDATA\r\n"
           b"Subject: pipelined\r\n\r\nRCPT TO:<evil@localhost>\r\n.\r\nQUIT\r\n")
    assert c.replies(8) == [250, 250, 250, 550, 250, 354, 250, 221]
    assert c.closed()
    (msg,) = srv.wait_messages("alice", 1)
    assert b"RCPT TO:<evil@localhost>" in msg
    srv.wait_messages("bob", 1)


def test_many_pipelined_transactions_in_one_write(make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    c.reply()
    one = (b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n"
           b"Subject: n\r\n\r\nbody\r\n.\r\n")
    c.send(b"EHLO c.test\r\n" + one * 20 + b"QUIT\r\n")
    codes = c.replies(1 + 4 * 20 + 1)
    assert codes == [250] + [250, 250, 354, 250] * 20 + [221]
    srv.wait_messages("alice", 20)


# -- STARTTLS ----------------------------------------------------------------------------------


def test_starttls_discards_pipelined_plaintext_and_resets_session(make_server: Any,
                                                                  certs: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    ehlo(c)
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@remote.test>\r\n")
    assert c.reply()[0] == 220
    assert c.buf == b"", "nothing may follow the 220 in plaintext"
    c.starttls(certs.ca_cert)
    # The session was reset: no EHLO, no MAIL survived; the injected MAIL was never executed.
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 503
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 503
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 503
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250


def test_implicit_tls_listener_does_not_offer_starttls(make_server: Any, certs: Any) -> None:
    srv = make_server({"smtp": {"listeners": [
        {"port": 0, "bindAddress": "127.0.0.1"},
        {"port": 0, "bindAddress": "127.0.0.1", "implicitTls": True}]}})
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    with smtplib.SMTP_SSL("127.0.0.1", srv.port_of(1), context=ctx) as s:
        s._host = "localhost"  # verify against the certificate name
        code, resp = s.ehlo("client.test")
        assert code == 250 and b"STARTTLS" not in resp and b"AUTH PLAIN LOGIN" in resp
        s.sendmail("a@remote.test", ["alice@localhost"], b"Subject: tls\r\n\r\nx\r\n")
    (msg,) = srv.wait_messages("alice", 1)
    assert b"with ESMTPS" in msg and b"(using TLSv1." in msg


def test_tls_handshake_timeout_closes_silent_client(make_server: Any) -> None:
    srv = make_server({"smtp": {"ssl": {"handshakeTimeoutMs": 300}, "listeners": [
        {"port": 0, "bindAddress": "127.0.0.1", "implicitTls": True}]}})
    c = Client(srv.port)
    assert c.closed(timeout=10)


# -- framing, limits, smuggling ----------------------------------------------------------------


def test_overlong_command_line_is_refused_and_session_continues(make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    ehlo(c)
    c.send(b"NOOP " + b"x" * 5000 + b"\r\nNOOP\r\n")
    assert c.replies(2) == [500, 250]
    c.send(b"MAIL FROM:<a@remote.test> " + b"X" * 100000)  # no CRLF at all, then the rest
    c.send(b"\r\nNOOP\r\n")
    assert c.replies(2) == [500, 250]


def test_overlong_body_line_fails_message_and_stays_in_data(make_server: Any) -> None:
    srv = make_server({"smtp": {"limits": {"maxMessageSizeBytes": 5_000_000}}})
    c = Client(srv.port)
    ehlo(c)
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: long\r\n\r\n" + b"A" * 40000 + b"\r\nMAIL FROM:<evil@remote.test>\r\n"
           b"RCPT TO:<bob@localhost>\r\nDATA\r\nsmuggled\r\n.\r\nNOOP\r\n")
    code, lines = c.reply()
    assert code == 554 and lines[0].startswith("5.6.0")
    assert c.reply()[0] == 250  # the NOOP: exactly one reply for the whole DATA
    assert c.cmd("RSET")[0] == 250
    assert srv.messages("bob") == [] and srv.spool_entries() == []


SMUGGLING_ENDINGS = [b"\n.\n", b"\r.\r", b"\r\n.\r", b"\n.\r\n", b"\r.\r\n", b"\n.\r",
                     b"\r\n.\n", b"\r\n\x00.\r\n"]


@pytest.mark.parametrize("ending", SMUGGLING_ENDINGS, ids=[repr(e) for e in SMUGGLING_ENDINGS])
def test_smuggling_endings_never_end_data(make_server: Any, ending: bytes) -> None:
    srv = make_server()
    c = Client(srv.port)
    ehlo(c)
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    c.cmd("DATA")
    c.send(b"Subject: smuggle\r\n\r\nhello" + ending + b"MAIL FROM:<evil@remote.test>\r\n"
           b"RCPT TO:<bob@localhost>\r\nDATA\r\nSubject: smuggled\r\n\r\nx\r\n.\r\nNOOP\r\n")
    code, lines = c.reply()
    if ending == b"\r\n\x00.\r\n":
        assert code == 250  # not an ending, but legal content: one message
    else:
        assert code == 550 and lines[0].startswith("5.6.0"), lines
    assert c.reply()[0] == 250  # NOOP
    assert srv.messages("bob") == []
    if code == 250:
        (msg,) = srv.wait_messages("alice", 1)
        assert b"MAIL FROM:<evil@remote.test>" in msg


def test_data_over_size_limit_is_552_and_session_continues(make_server: Any) -> None:
    srv = make_server({"smtp": {"limits": {"maxMessageSizeBytes": 10000}}})
    c = Client(srv.port)
    ehlo(c)
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    c.cmd("DATA")
    c.send(b"Subject: big\r\n\r\n" + (b"y" * 99 + b"\r\n") * 200 + b".\r\n")
    code, lines = c.reply()
    assert (code, lines[0][:5]) == (552, "5.3.4")
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    c.cmd("DATA")
    c.send(b"Subject: small\r\n\r\nok\r\n.\r\n")
    assert c.reply()[0] == 250


def test_storage_failure_is_451_never_5xx(make_server: Any) -> None:
    """The spool file is created by the commit (off the reactor), so a broken spool shows at
    the end of DATA: 451, the message is not accepted, and the session goes on. (With
    direct local delivery the spool is not needed for alice: see test_direct_delivery.)"""
    import shutil

    srv = make_server(QUEUED)
    shutil.rmtree(srv.root / "spool")
    c = Client(srv.port)
    ehlo(c)
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: lost?\r\n\r\nno\r\n.\r\n")
    code, lines = c.reply()
    assert (code, lines[0][:5]) == (451, "4.3.0")
    assert c.cmd("NOOP")[0] == 250
    assert srv.messages("alice") == []


# -- BDAT --------------------------------------------------------------------------------------


def test_bdat_chunks_are_delivered_byte_exact(make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    ehlo(c)
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    part1 = b"Subject: chunks\r\n\r\n.line starting with a dot\r\n"
    part2 = b"BDAT 5 LAST\r\nnot a command\r\n"
    c.send(b"BDAT %d\r\n" % len(part1) + part1)
    assert c.reply()[0] == 250
    c.send(b"BDAT %d LAST\r\n" % len(part2) + part2)
    code, lines = c.reply()
    assert code == 250 and "queued as" in lines[0]
    (msg,) = srv.wait_messages("alice", 1)
    assert msg.endswith(b".line starting with a dot\r\n" + part2)
    # DATA after BDAT in one transaction is refused; BDAT without RCPT still consumes the chunk.
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    c.send(b"BDAT 4\r\nabcd")
    assert c.reply()[0] == 250
    assert c.cmd("DATA")[0] == 503
    assert c.cmd("RSET")[0] == 250
    c.send(b"BDAT 12 LAST\r\nNOOP\r\nNOOP\r\n")
    assert c.reply()[0] == 503
    assert c.cmd("NOOP")[0] == 250


def test_bdat_size_limit_across_chunks_and_bare_lf(make_server: Any) -> None:
    srv = make_server({"smtp": {"limits": {"maxMessageSizeBytes": 10000}}})
    c = Client(srv.port)
    ehlo(c)
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    chunk = (b"z" * 98 + b"\r\n") * 60
    c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
    assert c.reply()[0] == 250
    c.send(b"BDAT %d LAST\r\n" % len(chunk) + chunk)
    assert c.reply()[:1] == (552,)
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    bad = b"Subject: x\r\n\r\nbare\nlf\r\n"
    c.send(b"BDAT %d LAST\r\n" % len(bad) + bad)
    code, lines = c.reply()
    assert (code, lines[0][:5]) == (550, "5.6.0")
    assert srv.spool_entries() == []


def test_bdat_crlf_split_between_chunks_is_fine_and_bare_cr_is_not(make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    ehlo(c)

    def send(chunks: list[bytes]) -> tuple[int, list[str]]:
        c.cmd("MAIL FROM:<a@remote.test>")
        c.cmd("RCPT TO:<alice@localhost>")
        for chunk in chunks[:-1]:
            c.send(b"BDAT %d\r\n" % len(chunk) + chunk)
            assert c.reply()[0] == 250
        c.send(b"BDAT %d LAST\r\n" % len(chunks[-1]) + chunks[-1])
        return c.reply()

    assert send([b"Subject: split\r\n\r\nend of line\r", b"\nnext\r\n"])[0] == 250
    (msg,) = srv.wait_messages("alice", 1)
    assert msg.endswith(b"end of line\r\nnext\r\n")
    for chunks in ([b"Subject: x\r\n\r\nbare\r", b"cr\r\n"],   # CR, then no LF
                   [b"Subject: x\r\n\r\nbare\rcr\r\n"],
                   [b"Subject: x\r\n\r\nok\r\n", b"\r\n\n"],   # LF after a CRLF
                   [b"Subject: x\r\n\r\nends in\r"]):          # CR at the very end
        code, lines = send(chunks)
        assert (code, lines[0][:5]) == (550, "5.6.0"), chunks
    assert len(srv.messages("alice")) == 1


# -- AUTH --------------------------------------------------------------------------------------


def _auth_server(make_server: Any, **auth: Any) -> Server:
    users = {"carol": hash_password("s3cret-pass", rounds=4), "dave": "plain-pass"}
    return make_server({"smtp": {"auth": {"users": users, **auth}}})


def _tls_client(srv: Server, certs: Any) -> Client:
    c = Client(srv.port)
    ehlo(c)
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    assert c.cmd("EHLO client.test")[0] == 250
    return c


def test_auth_plain_and_login_over_tls(make_server: Any, certs: Any) -> None:
    srv = _auth_server(make_server)
    c = _tls_client(srv, certs)
    bad = base64.b64encode(b"\x00carol\x00wrong").decode()
    assert c.cmd(f"AUTH PLAIN {bad}")[:1] == (535,)
    good = base64.b64encode(b"\x00carol\x00s3cret-pass").decode()
    assert c.cmd(f"AUTH PLAIN {good}")[0] == 235
    assert c.cmd(f"AUTH PLAIN {good}")[0] == 503
    c2 = _tls_client(srv, certs)
    assert c2.cmd("AUTH LOGIN")[0] == 334
    assert c2.cmd(base64.b64encode(b"dave").decode())[0] == 334
    assert c2.cmd(base64.b64encode(b"plain-pass").decode())[0] == 235
    c2.cmd("MAIL FROM:<dave@localhost>")
    c2.cmd("RCPT TO:<alice@localhost>")
    c2.cmd("DATA")
    c2.send(b"Subject: authed\r\n\r\nx\r\n.\r\n")
    assert c2.reply()[0] == 250
    (msg,) = srv.wait_messages("alice", 1)
    assert b"with ESMTPSA" in msg


def test_auth_malformed_inputs_get_errors_not_crashes(make_server: Any, certs: Any) -> None:
    srv = _auth_server(make_server)
    c = _tls_client(srv, certs)
    assert c.cmd("AUTH")[0] == 501
    assert c.cmd("AUTH CRAM-MD5")[0] == 504
    assert c.cmd("AUTH PLAIN !!!notbase64")[0] == 501
    assert c.cmd("AUTH PLAIN " + base64.b64encode(b"no-nuls").decode())[0] == 501
    assert c.cmd(b"AUTH PLAIN \xff\xfe")[0] == 500
    assert c.cmd("AUTH PLAIN")[0] == 334
    assert c.cmd("*")[0] == 501
    assert c.cmd("NOOP")[0] == 250


def test_auth_refused_before_tls_and_required_for_mail(make_server: Any, certs: Any) -> None:
    srv = _auth_server(make_server, required=True)
    c = Client(srv.port)
    ehlo(c)
    good = base64.b64encode(b"\x00carol\x00s3cret-pass").decode()
    assert c.cmd(f"AUTH PLAIN {good}")[:1] == (538,)
    code, lines = c.cmd("MAIL FROM:<a@remote.test>")
    assert (code, lines[0][:5]) == (530, "5.7.0")


def test_plaintext_auth_when_listener_allows_it(make_server: Any) -> None:
    users = {"carol": hash_password("s3cret-pass", rounds=4)}
    srv = make_server({"smtp": {"auth": {"users": users}, "listeners": [
        {"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}]}})
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.ehlo("c.test")
        assert s.has_extn("auth")
        s.login("carol", "s3cret-pass")


def test_require_auth_for_mail_per_listener(make_server: Any) -> None:
    srv = make_server({"smtp": {"listeners": [
        {"port": 0, "bindAddress": "127.0.0.1", "requireAuthForMail": True}]}})
    c = Client(srv.port)
    ehlo(c)
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 530


# -- timeouts, errors --------------------------------------------------------------------------


def test_idle_timeout_sends_421_and_closes(make_server: Any) -> None:
    srv = make_server({"smtp": {"listeners": [
        {"port": 0, "bindAddress": "127.0.0.1", "idleTimeoutSeconds": 1}]}})
    c = Client(srv.port)
    ehlo(c)
    code, lines = c.reply()  # arrives by itself after the idle timeout
    assert (code, lines[0][:5]) == (421, "4.4.2")
    assert c.closed()


def test_too_many_errors_close_the_session(make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    ehlo(c)
    c.send(b"BOGUS\r\n" * 25)
    codes = []
    while True:
        try:
            codes.append(c.reply()[0])
        except ConnectionError:
            break
    assert codes[:20] == [500] * 20 and codes[-1] == 421 and len(codes) == 21


def test_bad_client_does_not_disturb_others(make_server: Any) -> None:
    srv = make_server()
    bad = Client(srv.port)
    bad.reply()
    bad.send(b"\xff\xfe\x00garbage\r\n" * 5 + b"MAIL FROM:<" + b"\x00" * 3000 + b">\r\n")
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("a@remote.test", ["alice@localhost"], b"Subject: ok\r\n\r\nfine\r\n")
    srv.wait_messages("alice", 1)
    bad.close()


def test_service_graceful_shutdown_finishes_data_then_421(make_server: Any) -> None:
    srv = make_server()
    idle = Client(srv.port)
    ehlo(idle)
    busy = Client(srv.port)
    ehlo(busy)
    busy.cmd("MAIL FROM:<a@remote.test>")
    busy.cmd("RCPT TO:<alice@localhost>")
    assert busy.cmd("DATA")[0] == 354
    busy.send(b"Subject: in flight\r\n\r\npart one\r\n")
    stopping = []

    def stop() -> None:
        stopping.append(srv.service.stopService())

    on_reactor(stop)
    code, lines = idle.reply()
    assert (code, lines[0][:5]) == (421, "4.3.2")
    busy.send(b"part two\r\n.\r\n")
    assert busy.reply()[0] == 250
    assert busy.reply()[0] == 421
    assert len(srv.spool_entries()) + len(srv.messages("alice")) == 1


# -- sent archive ------------------------------------------------------------------------------


@pytest.mark.parametrize("mode,expect_copy", [("TRUSTED_SUBMISSION", True),
                                              ("AUTHENTICATED_ONLY", True),
                                              ("DISABLED", False)])
def test_sent_archive_for_authenticated_sender(make_server: Any, certs: Any, mode: str,
                                               expect_copy: bool) -> None:
    srv = _auth_server(make_server, **{})
    srv.service.config.smtp.sentArchive.__dict__["mode"] = mode  # frozen: test-only override
    c = _tls_client(srv, certs)
    good = base64.b64encode(b"\x00carol\x00s3cret-pass").decode()
    assert c.cmd(f"AUTH PLAIN {good}")[0] == 235
    c.cmd("MAIL FROM:<carol@localhost>")
    c.cmd("RCPT TO:<alice@localhost>")
    c.cmd("DATA")
    c.send(b"Subject: archived\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    srv.wait_messages("alice", 1)
    wait_until(lambda: srv.spool_entries() == [], message="entry completed")
    sent = srv.root / "mailboxes" / "carol" / "sent" / "new"
    copies = list(sent.iterdir()) if sent.is_dir() else []
    assert len(copies) == (1 if expect_copy else 0)
    if expect_copy:
        assert b"Subject: archived" in copies[0].read_bytes()


def test_unauthenticated_sender_gets_no_archive_copy(make_server: Any) -> None:
    srv = make_server()
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("bob@localhost", ["alice@localhost"], b"Subject: x\r\n\r\ny\r\n")
    srv.wait_messages("alice", 1)
    wait_until(lambda: srv.spool_entries() == [], message="entry completed")
    assert not (srv.root / "mailboxes" / "bob" / "sent").exists()


def test_corrupt_spool_entry_is_moved_aside_and_counted(make_server: Any) -> None:
    import urllib.request

    srv = make_server(QUEUED)
    srv.service.scheduler.paused = True
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("a@remote.test", ["alice@localhost"], b"Subject: x\r\n\r\ny\r\n")
    (path,) = srv.spool_entries()
    # A damaged entry as another process (or a disk fault) left it: this process never
    # committed it, so it has no in-memory copy and must read the file.
    from kotlin_smtp_py.envelope import new_queue_id

    qid = new_queue_id()
    path.with_name(f"{qid}.json").write_text("{ not json")
    os.link(path.with_suffix(".eml"), path.with_name(f"{qid}.eml"))
    on_reactor(srv.service.spool.claim, qid)  # reading it finds the damage
    corrupt = srv.root / "spool" / "corrupt"
    wait_until(lambda: (corrupt / f"{qid}.json").exists() and (corrupt / f"{qid}.eml").exists(),
               message="entry moved to corrupt/")
    assert srv.spool_entries() == [path]
    port = srv.service.management_port.getHost().port
    body = json.loads(urllib.request.urlopen(f"http://127.0.0.1:{port}/actuator/health").read())
    assert body["components"]["spool"]["details"]["corrupt"] == 1


def test_min_tls_version_is_enforced(make_server: Any, certs: Any) -> None:
    srv = make_server({"smtp": {"ssl": {"minTlsVersion": "TLSv1.3"}}})
    old = ssl.create_default_context(cafile=str(certs.ca_cert))
    old.maximum_version = ssl.TLSVersion.TLSv1_2
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s._host = "localhost"
        with pytest.raises(ssl.SSLError):
            s.starttls(context=old)
    new = ssl.create_default_context(cafile=str(certs.ca_cert))
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s._host = "localhost"
        s.starttls(context=new)
        assert s.sock.version() == "TLSv1.3"


def test_replies_stay_in_order_when_the_client_reads_slowly(make_server: Any) -> None:
    """Replies are sent straight to the socket when nothing is queued; when the kernel takes
    only part (a client with a tiny receive window that is not reading), the rest must queue
    behind it in order and arrive complete."""
    import socket

    srv = make_server()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
    sock.settimeout(20)
    sock.connect(("127.0.0.1", srv.port))
    c = Client.__new__(Client)
    c.sock, c.buf = sock, b""
    assert c.reply()[0] == 220
    rounds = 1500
    # (HELP and EHLO, not NOOP: junk commands past 100 end the session)
    c.send(b"EHLO c.test\r\n" + b"HELP\r\nEHLO c.test\r\n" * rounds)  # ~300 KB of replies
    assert c.reply()[0] == 250
    for i in range(rounds):
        assert c.reply()[0] == 214, f"round {i}"
        code, lines = c.reply()
        assert code == 250 and lines[-1] == "HELP", f"round {i}"
    assert c.cmd("QUIT")[0] == 221


def test_listen_backlog_absorbs_connection_bursts(make_server: Any) -> None:
    """A single-process server listens with the same deep backlog as worker sockets, not
    Twisted's 50 (a burst beyond the backlog costs each dropped client a 1 s SYN retry)."""
    import subprocess

    srv = make_server()
    out = subprocess.run(["ss", "-Hltn", f"sport = :{srv.port}"], capture_output=True,
                         text=True, check=True).stdout.split()
    # ss prints: State Recv-Q Send-Q Local:Port Peer:Port; Send-Q is the backlog for LISTEN.
    assert out[0] == "LISTEN" and int(out[2]) == 1024, out
