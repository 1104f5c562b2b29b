"""Hunt: message content on its way through the server — trace headers (Received:,
Return-Path:, Message-ID:/Date:), 8BITMIME / SMTPUTF8 / BODY= and what reaches a next hop that
lacks an extension — and the sent archive (smtp.sentArchive).

Every test runs a real SmtpService on loopback (file spool, real Maildirs) whose relay goes to
the scripted SMTP sink of ``outbound_sink.py`` through ``smtp.relay.defaultRoute``; the client
is a raw socket (exact bytes: BDAT, 8-bit EHLO names, pipelined lines). Eight cases found
bugs (five causes, all fixed since): HELO names that broke the Received: syntax or put UTF-8
into a 7-bit message, a client's Return-Path kept beside ours, a headerless message's body
taken for its header, SMTPUTF8 header mail relayed without the parameter or to a peer
without it."""

from __future__ import annotations

import base64
import email.utils
import json
import re
import socket
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CertSet, deep_merge, on_reactor, wait_until
from outbound_sink import Behaviour, SinkFactory

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.service import SmtpService

SEVEN_BIT_PEER = ["PIPELINING", "SIZE 10000000", "DSN", "ENHANCEDSTATUSCODES"]
NO_UTF8_PEER = ["PIPELINING", "SIZE 10000000", "8BITMIME", "DSN", "ENHANCEDSTATUSCODES"]
USERS = {"carol": "carol-pass", "alice": "alice-pass"}


# == fixtures =====================================================================================


@dataclass
class Srv:
    svc: SmtpService
    root: Path
    sink: SinkFactory

    @property
    def port(self) -> int:
        return self.svc.smtp_port(0)

    def mails(self, user: str, folder: str = "Maildir") -> list[bytes]:
        new = self.root / "mailboxes" / user / folder / "new"
        return [p.read_bytes() for p in sorted(new.iterdir())] if new.is_dir() else []

    def wait_mails(self, user: str, count: int, folder: str = "Maildir") -> list[bytes]:
        return wait_until(lambda: (m := self.mails(user, folder)) and len(m) >= count and m,
                          timeout=15, message=f"{count} message(s) in {user}/{folder}")

    def queue(self) -> list[Path]:
        return sorted((self.root / "spool" / "queue").glob("*.json"))

    def wait_queue_empty(self) -> None:
        wait_until(lambda: not self.queue(), timeout=15, message="the spool to empty")

    def metrics(self) -> dict[str, float]:
        port = self.svc.management_port.getHost().port
        text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                      timeout=10).read().decode()
        out: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, _, value = line.rpartition(" ")
                out[name] = float(value)
        return out


@pytest.fixture
def make_server(tmp_path: Path, certs: CertSet, reactor_thread: None
                ) -> Iterator[Callable[..., Srv]]:
    """A server relaying every remote recipient to its own sink (``ext``: what it offers)."""
    started: list[tuple[SmtpService, Any]] = []

    def make(overrides: dict[str, Any] | None = None, ext: list[str] | None = None,
             users: tuple[str, ...] = ("alice", "bob")) -> Srv:
        from twisted.internet import reactor

        behaviour = Behaviour() if ext is None else Behaviour(extensions=list(ext))
        sink = SinkFactory(behaviour)
        sink.noisy = False
        listening = on_reactor(reactor.listenTCP, 0, sink, interface="127.0.0.1")
        root = tmp_path / f"srv{len(started)}"
        for sub in ("spool", "temp", "lists"):
            (root / sub).mkdir(parents=True)
        for user in users:
            (root / "mailboxes" / user).mkdir(parents=True)
        base: dict[str, Any] = {
            "smtp": {
                "hostname": "mx.test",
                "listeners": [{"port": 0, "bindAddress": "127.0.0.1"}],
                "routing": {"localDomain": "localhost"},
                "storage": {"mailboxDir": str(root / "mailboxes"),
                            "tempDir": str(root / "temp"), "listsDir": str(root / "lists")},
                "spool": {"type": "file", "dir": str(root / "spool"), "retryDelaySeconds": 1},
                "limits": {"maxMessageSizeBytes": 2_000_000},
                "lifecycle": {"gracefulShutdownTimeoutMs": 2000},
                "ssl": {"enabled": True, "certChainFile": str(certs.cert),
                        "privateKeyFile": str(certs.key)},
                "auth": {"users": dict(USERS), "failureDelayMs": 0},
                "dns": {"servers": ["127.0.0.1:9"], "timeoutMs": 500},
                "relay": {"enabled": True, "requireAuthForRelay": False,
                          "allowedClientCidrs": ["127.0.0.0/8"],
                          "defaultRoute": {"host": "127.0.0.1",
                                           "port": listening.getHost().port,
                                           "startTlsEnabled": False},
                          "connectionCache": {"enabled": False},
                          "outboundTls": {"connectTimeoutMs": 2000, "readTimeoutMs": 2000}},
            },
            "management": {"server": {"port": 0}},
        }
        config = cfg.load_text(yaml.safe_dump(deep_merge(base, overrides or {})))
        svc = on_reactor(SmtpService, config)
        on_reactor(svc.startService)
        started.append((svc, listening))
        return Srv(svc, root, sink)

    yield make
    for svc, listening in started:
        on_reactor(svc.stopService, timeout=30)
        on_reactor(listening.stopListening)


class Raw:
    """A raw SMTP client: exact bytes out (8-bit EHLO names, BDAT), whole replies in."""

    def __init__(self, port: int) -> None:
        self.sock: Any = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.buf = b""
        assert self.reply()[0] == 220

    def reply(self) -> tuple[int, list[str]]:
        lines: list[str] = []
        for _ in range(1000):
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed after {lines}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines
        raise AssertionError("endless reply")

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        self.sock.sendall((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self, certs: CertSet) -> None:
        assert self.cmd("STARTTLS")[0] == 220
        ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
        self.sock = ctx.wrap_socket(self.sock, server_hostname="localhost")

    def auth(self, user: str, password: str) -> None:
        token = base64.b64encode(f"\0{user}\0{password}".encode()).decode()
        code, lines = self.cmd(f"AUTH PLAIN {token}")
        assert code == 235, lines

    def data(self, message: bytes) -> tuple[int, list[str]]:
        """DATA with ``message`` (CRLF-terminated lines, not dot-stuffed here)."""
        assert self.cmd("DATA")[0] == 354
        stuffed = b"\r\n".join(b"." + ln if ln.startswith(b".") else ln
                               for ln in message.split(b"\r\n"))
        self.sock.sendall(stuffed + b".\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.cmd("QUIT")
        except OSError:
            pass
        self.sock.close()


def send(srv: Srv, sender: str, rcpts: list[str], message: bytes, ehlo: bytes = b"client.test",
         options: tuple[str, ...] = ()) -> str:
    """One transaction over a raw session; the queue id of the 250."""
    c = Raw(srv.port)
    try:
        assert c.cmd(b"EHLO " + ehlo)[0] == 250
        code, lines = c.cmd(" ".join([f"MAIL FROM:<{sender}>", *options]).encode())
        assert code == 250, lines
        for r in rcpts:
            code, lines = c.cmd(f"RCPT TO:<{r}>".encode())
            assert code == 250, lines
        code, lines = c.data(message)
        assert code == 250, lines
        return lines[0].rsplit(" ", 1)[-1]
    finally:
        c.close()


def header_block(msg: bytes) -> bytes:
    return msg.split(b"\r\n\r\n", 1)[0] + b"\r\n"


def fields(msg: bytes) -> list[tuple[str, str]]:
    """The header fields of ``msg`` as (lower-case name, unfolded value)."""
    out: list[tuple[str, str]] = []
    for line in header_block(msg).decode("utf-8", "replace").split("\r\n"):
        if line[:1] in (" ", "\t") and out:
            out[-1] = (out[-1][0], out[-1][1] + " " + line.strip())
        elif ":" in line:
            name, _, value = line.partition(":")
            out.append((name.strip().lower(), value.strip()))
    return out


def first(msg: bytes, name: str) -> str:
    return next(v for n, v in fields(msg) if n == name)


def strip_comments(value: str) -> str:
    """RFC 5322 §3.2.2: drop (nested) comments and quoted-pairs inside them; an unbalanced
    comment swallows the rest of the field, as real parsers do."""
    out, depth, i = [], 0, 0
    while i < len(value):
        ch = value[i]
        if depth and ch == "\\":
            i += 2
            continue
        if ch == "(":
            depth += 1
        elif ch == ")" and depth:
            depth -= 1
        elif not depth:
            out.append(ch)
        i += 1
    return re.sub(r"\s+", " ", "".join(out)).strip()


RECEIVED = re.compile(r"from (?P<helo>[^\s;]+) by (?P<by>\S+) with (?P<with>[A-Z0-9]+) "
                      r"id (?P<id>\S+)(?: for <(?P<for>[^>]+)>)?; (?P<date>.+)$")


def parse_received(value: str) -> re.Match[str]:
    m = RECEIVED.match(strip_comments(value))
    assert m is not None, f"Received: field does not parse: {value!r}"
    when = email.utils.parsedate_to_datetime(m["date"])
    assert abs(when.timestamp() - time.time()) < 300, m["date"]
    return m


# == Received: ====================================================================================


def test_received_is_first_after_return_path_and_well_formed(make_server: Any) -> None:
    srv = make_server()
    qid = send(srv, "x@remote.test", ["alice@localhost"], b"Subject: t\r\n\r\nhi\r\n")
    (msg,) = srv.wait_mails("alice", 1)
    names = [n for n, _ in fields(msg)]
    assert names[:3] == ["return-path", "delivered-to", "received"], names
    m = parse_received(fields(msg)[2][1])
    assert (m["helo"], m["by"], m["with"], m["id"], m["for"]) == \
        ("client.test", "mx.test", "ESMTP", qid, "alice@localhost")
    assert "[127.0.0.1]" in fields(msg)[2][1]


def test_received_after_helo_says_smtp_and_omits_for_with_two_recipients(
        make_server: Any) -> None:
    srv = make_server()
    c = Raw(srv.port)
    assert c.cmd("HELO old.client.test")[0] == 250
    assert c.cmd("MAIL FROM:<x@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<bob@localhost>")[0] == 250
    assert c.data(b"Subject: t\r\n\r\nhi\r\n")[0] == 250
    c.close()
    (msg,) = srv.wait_mails("alice", 1)
    m = parse_received(first(msg, "received"))
    assert (m["helo"], m["with"], m["for"]) == ("old.client.test", "SMTP", None)


def test_received_protocol_for_smtputf8_after_starttls_and_auth(make_server: Any,
                                                                certs: CertSet) -> None:
    """RFC 6531 §3.7.3: UTF8SMTP, UTF8SMTPS, UTF8SMTPSA."""
    srv = make_server()
    c = Raw(srv.port)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<x@remote.test> SMTPUTF8")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.data(b"Subject: plain\r\n\r\nhi\r\n")[0] == 250
    c.starttls(certs)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<x@remote.test> SMTPUTF8")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.data(b"Subject: tls\r\n\r\nhi\r\n")[0] == 250
    c.auth("carol", "carol-pass")
    assert c.cmd("MAIL FROM:<carol@localhost> SMTPUTF8")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.data(b"Subject: auth\r\n\r\nhi\r\n")[0] == 250
    c.close()
    msgs = srv.wait_mails("alice", 3)
    by_subject = {first(m, "subject"): first(m, "received") for m in msgs}
    assert {s: parse_received(v)["with"] for s, v in by_subject.items()} == \
        {"plain": "UTF8SMTP", "tls": "UTF8SMTPS", "auth": "UTF8SMTPSA"}


@pytest.mark.parametrize("name", [b"evil\nX-Injected: yes", b"evil\r\nX-Injected: yes",
                                  b"e" * 256, b"evil\x85X-Injected: yes"],
                         ids=["bare-lf", "crlf", "too-long", "c1-nel"])
def test_ehlo_argument_cannot_inject_header_lines(make_server: Any, name: bytes) -> None:
    srv = make_server()
    c = Raw(srv.port)
    # A line break inside the argument ends the command (the rest is another command):
    # read replies up to our NOOP's, whatever came in between.
    c.sock.sendall(b"EHLO " + name + b"\r\nNOOP\r\n")
    codes = []
    for _ in range(5):
        code, lines = c.reply()
        if lines == ["2.0.0 Ok"]:
            break
        codes.append(code)
    else:
        raise AssertionError(f"no NOOP reply after {codes}")
    if codes[0] != 250:
        assert 500 <= codes[0] < 600, codes
        assert c.cmd("EHLO client.test")[0] == 250  # still served
    assert c.cmd("MAIL FROM:<x@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.data(b"Subject: t\r\n\r\nhi\r\n")[0] == 250
    c.close()
    (msg,) = srv.wait_mails("alice", 1)
    head = header_block(msg)
    assert not re.search(rb"(?m)^X-Injected", head), head
    assert all(len(line) <= 998 for line in head.split(b"\r\n"))
    parse_received(first(msg, "received"))


def test_auth_identity_is_not_written_into_received(make_server: Any, certs: CertSet) -> None:
    """An AUTH identity with CR/LF (it is a valid login here) must never become header lines."""
    evil = "carl\r\nX-Injected: yes"
    srv = make_server({"smtp": {"auth": {"users": {evil: "pw-one"}}}})
    c = Raw(srv.port)
    assert c.cmd("EHLO client.test")[0] == 250
    c.starttls(certs)
    assert c.cmd("EHLO client.test")[0] == 250
    c.auth(evil, "pw-one")
    assert c.cmd("MAIL FROM:<x@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.data(b"Subject: t\r\n\r\nhi\r\n")[0] == 250
    c.close()
    (msg,) = srv.wait_mails("alice", 1)
    head = header_block(msg)
    assert b"X-Injected" not in head and b"carl" not in head
    assert parse_received(first(msg, "received"))["with"] == "ESMTPSA"


@pytest.mark.parametrize("name", [b"x(", b"a;b", b"q)(by.forged.test"])
def test_ehlo_argument_cannot_break_the_received_syntax(make_server: Any, name: bytes) -> None:
    srv = make_server()
    send(srv, "x@remote.test", ["alice@localhost"], b"Subject: t\r\n\r\nhi\r\n", ehlo=name)
    (msg,) = srv.wait_mails("alice", 1)
    m = parse_received(first(msg, "received"))
    assert (m["by"], m["with"]) == ("mx.test", "ESMTP")


def test_utf8_ehlo_name_does_not_put_8bit_into_a_7bit_relay(make_server: Any) -> None:
    srv = make_server(ext=SEVEN_BIT_PEER)
    send(srv, "alice@localhost", ["x@remote.test"], b"Subject: t\r\n\r\nplain ascii\r\n",
         ehlo="bücher.example".encode())
    srv.wait_queue_empty()
    assert srv.sink.transactions, "nothing was relayed"
    for txn in srv.sink.transactions:
        assert txn.raw.isascii(), header_block(txn.raw)


def test_relayed_message_keeps_one_received_and_gets_no_return_path(make_server: Any) -> None:
    srv = make_server()
    original = (b"Received: from earlier.test by hop.test; Mon, 1 Jan 2024 00:00:00 +0000\r\n"
                b"Subject: folded\r\n  continuation\r\nMessage-ID: <m1@origin.test>\r\n"
                b"Date: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\nbody\r\n")
    qid = send(srv, "x@remote.test", ["y@remote.test"], original)
    srv.wait_queue_empty()
    (txn,) = srv.sink.transactions
    assert txn.body.startswith(b"Received: from client.test")
    assert txn.body.endswith(original)  # folding and the earlier trace untouched
    assert txn.body.count(b"Received:") == 2 and b"Return-Path" not in txn.body
    assert parse_received(first(txn.body, "received"))["id"] == qid


# == Return-Path / Message-ID / Date ===============================================================


def test_return_path_for_the_null_sender_is_empty_brackets(make_server: Any) -> None:
    srv = make_server()
    send(srv, "", ["alice@localhost"], b"Subject: bounce\r\n\r\nhi\r\n")
    (msg,) = srv.wait_mails("alice", 1)
    assert msg.startswith(b"Return-Path: <>\r\n")


def test_existing_return_path_is_replaced_on_local_delivery(make_server: Any) -> None:
    srv = make_server()
    send(srv, "real@remote.test", ["alice@localhost"],
         b"Return-Path: <forged@evil.test>\r\nSubject: t\r\n\r\nhi\r\n")
    (msg,) = srv.wait_mails("alice", 1)
    paths = [v for n, v in fields(msg) if n == "return-path"]
    assert paths == ["<real@remote.test>"]


def test_headers_only_message_without_separator_gets_one_of_each(make_server: Any) -> None:
    srv = make_server()
    send(srv, "x@remote.test", ["alice@localhost"],
         b"Subject: only headers\r\nMessage-ID: <only@x.test>\r\n")
    (msg,) = srv.wait_mails("alice", 1)
    names = [n for n, _ in fields(msg)]
    assert names.count("message-id") == 1 and names.count("date") == 1
    assert msg.endswith(b"Subject: only headers\r\nMessage-ID: <only@x.test>\r\n")


def test_message_with_empty_header_section_gets_message_id_and_date(make_server: Any) -> None:
    srv = make_server()
    send(srv, "x@remote.test", ["alice@localhost"], b"\r\njust a body\r\n")
    (msg,) = srv.wait_mails("alice", 1)
    names = [n for n, _ in fields(msg)]
    assert names.count("message-id") == 1 and names.count("date") == 1
    assert msg.endswith(b"\r\n\r\njust a body\r\n")


def test_date_in_the_body_of_a_headerless_message_does_not_count(make_server: Any) -> None:
    srv = make_server()
    send(srv, "x@remote.test", ["alice@localhost"],
         b"\r\nDate: tomorrow, says the body\r\nMessage-ID: quoted text\r\n\r\nmore\r\n")
    (msg,) = srv.wait_mails("alice", 1)
    names = [n for n, _ in fields(msg)]
    assert names.count("message-id") == 1 and names.count("date") == 1


def test_bdat_body_without_final_crlf_is_relayed_with_one_added(make_server: Any) -> None:
    srv = make_server()
    message = b"Subject: bdat\r\n\r\nline one\r\n.dot line\r\nno final newline"
    c = Raw(srv.port)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<x@remote.test> BODY=8BITMIME")[0] == 250
    assert c.cmd("RCPT TO:<y@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    c.sock.sendall(b"BDAT %d LAST\r\n" % len(message) + message)
    code, lines = c.reply()
    assert code == 250, lines
    c.close()
    (local,) = srv.wait_mails("alice", 1)
    assert local.endswith(message)  # stored as received
    srv.wait_queue_empty()
    (txn,) = srv.sink.transactions
    assert txn.body.endswith(message + b"\r\n")
    assert txn.raw.endswith(b"\r\n..dot line\r\nno final newline\r\n")
    assert "BODY=8BITMIME" not in txn.mail  # declared, but the content is 7-bit


# == 8BITMIME / SMTPUTF8 towards the next hop ======================================================


def test_8bit_content_is_relayed_with_body_8bitmime(make_server: Any) -> None:
    srv = make_server()
    body = "Subject: caf\u00e9\r\n\r\nd\u00e9j\u00e0 vu\r\n".encode()
    send(srv, "x@remote.test", ["y@remote.test"], body)  # 8-bit without BODY=: still 8-bit
    send(srv, "x@remote.test", ["z@remote.test"], body, options=("BODY=8BITMIME",))
    srv.wait_queue_empty()
    txns = srv.sink.transactions
    assert len(txns) == 2
    for txn in txns:
        assert " BODY=8BITMIME" in txn.mail and "SMTPUTF8" not in txn.mail
        assert txn.body.endswith(body)


def test_8bit_content_to_a_peer_without_8bitmime_bounces_5_6_3(make_server: Any) -> None:
    srv = make_server(ext=SEVEN_BIT_PEER)
    send(srv, "alice@localhost", ["y@remote.test"],
         "Subject: t\r\n\r\nna\u00efve\r\n".encode(), options=("BODY=8BITMIME",))
    (dsn,) = srv.wait_mails("alice", 1)
    srv.wait_queue_empty()
    assert srv.sink.transactions == []
    assert b"Status: 5.6.3" in dsn and b"y@remote.test" in dsn


def test_utf8_recipient_to_a_peer_without_smtputf8_bounces_5_6_7(make_server: Any) -> None:
    srv = make_server(ext=NO_UTF8_PEER)
    send(srv, "alice@localhost", ["j\u00f6rg@remote.test"], b"Subject: t\r\n\r\nhi\r\n",
         options=("SMTPUTF8",))
    (dsn,) = srv.wait_mails("alice", 1)
    srv.wait_queue_empty()
    assert srv.sink.transactions == []
    assert b"5.6.7" in dsn


def test_ascii_smtputf8_message_goes_to_a_peer_without_smtputf8(make_server: Any) -> None:
    """Nothing in it needs SMTPUTF8: delivered without the parameter (RFC 6531 §3.4)."""
    srv = make_server(ext=NO_UTF8_PEER)
    send(srv, "x@remote.test", ["y@remote.test"], b"Subject: t\r\n\r\nhi\r\n",
         options=("SMTPUTF8",))
    srv.wait_queue_empty()
    (txn,) = srv.sink.transactions
    assert "SMTPUTF8" not in txn.mail


UTF8_HEADERS = "From: J\u00f6rg <alice@localhost>\r\nSubject: Gr\u00fc\u00dfe\r\n\r\nhi\r\n"


def test_smtputf8_message_with_utf8_headers_is_relayed_with_smtputf8(make_server: Any) -> None:
    srv = make_server()
    send(srv, "alice@localhost", ["y@remote.test"], UTF8_HEADERS.encode(),
         options=("SMTPUTF8",))
    srv.wait_queue_empty()
    (txn,) = srv.sink.transactions
    assert "SMTPUTF8" in txn.mail.split()


def test_utf8_headers_are_not_sent_to_a_peer_without_smtputf8(make_server: Any) -> None:
    srv = make_server(ext=NO_UTF8_PEER)
    send(srv, "alice@localhost", ["y@remote.test"], UTF8_HEADERS.encode(),
         options=("SMTPUTF8",))
    srv.wait_queue_empty()
    assert [t.mail for t in srv.sink.transactions] == []
    (dsn,) = srv.wait_mails("alice", 1)
    assert b"5.6.7" in dsn


def test_line_up_to_16k_is_relayed_unchanged_and_longer_is_refused(make_server: Any) -> None:
    """Documented choice (inbound/framing.py MAX_BODY_LINE): lines over 998 octets are
    accepted up to 16384 and passed on as they are; longer ones get 554 5.6.0."""
    srv = make_server()
    body = b"Subject: long\r\n\r\n" + b"w" * 5000 + b"\r\n"
    send(srv, "x@remote.test", ["y@remote.test"], body)
    srv.wait_queue_empty()
    (txn,) = srv.sink.transactions
    assert txn.body.endswith(body)
    c = Raw(srv.port)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<x@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<y@remote.test>")[0] == 250
    code, lines = c.data(b"Subject: longer\r\n\r\n" + b"w" * 20000 + b"\r\n")
    assert (code, lines[0][:5]) == (554, "5.6.0")
    c.close()
    assert srv.queue() == []


# == sent archive =================================================================================


def sent_copies(srv: Srv, owner: str) -> list[bytes]:
    return srv.mails(owner, "sent")


def test_trusted_client_sending_as_a_local_user_gets_a_copy(make_server: Any) -> None:
    srv = make_server()
    send(srv, "Alice+news@localhost", ["y@remote.test"], b"Subject: from trusted\r\n\r\nhi\r\n")
    srv.wait_queue_empty()
    assert len(srv.sink.transactions) == 1
    (copy,) = sent_copies(srv, "alice")
    assert copy.endswith(b"Subject: from trusted\r\n\r\nhi\r\n")
    assert copy.startswith(b"Received: ")  # the message as sent, no Return-Path added
    assert not (srv.root / "mailboxes" / "Alice+news").exists()


def test_authenticated_only_mode_ignores_trusted_unauthenticated_clients(
        make_server: Any, certs: CertSet) -> None:
    srv = make_server({"smtp": {"sentArchive": {"mode": "AUTHENTICATED_ONLY"}}})
    send(srv, "alice@localhost", ["y@remote.test"], b"Subject: unauth\r\n\r\nhi\r\n")
    c = Raw(srv.port)
    assert c.cmd("EHLO client.test")[0] == 250
    c.starttls(certs)
    assert c.cmd("EHLO client.test")[0] == 250
    c.auth("carol", "carol-pass")
    assert c.cmd("MAIL FROM:<alice@localhost>")[0] == 250  # carol sends as alice
    assert c.cmd("RCPT TO:<y@remote.test>")[0] == 250
    assert c.data(b"Subject: authed\r\n\r\nhi\r\n")[0] == 250
    c.close()
    wait_until(lambda: len(srv.sink.transactions) == 2, timeout=15, message="two relayed")
    srv.wait_queue_empty()
    assert sent_copies(srv, "alice") == []
    (copy,) = sent_copies(srv, "carol")  # the owner is who logged in, not the From
    assert b"Subject: authed" in copy


def test_unknown_local_sender_gets_no_copy_and_the_mail_still_goes(make_server: Any) -> None:
    srv = make_server()
    send(srv, "ghost@localhost", ["y@remote.test", "alice@localhost"],
         b"Subject: g\r\n\r\nhi\r\n")
    srv.wait_mails("alice", 1)
    srv.wait_queue_empty()
    assert len(srv.sink.transactions) == 1
    assert not (srv.root / "mailboxes" / "ghost").exists()
    assert [p.name for p in (srv.root / "mailboxes").iterdir() if (p / "sent").exists()] == []


def test_archive_copy_is_made_once_across_retries_and_not_counted_as_delivery(
        make_server: Any) -> None:
    srv = make_server()
    srv.sink.behaviour.rcpt["y@remote.test"] = b"451 4.3.0 try later"
    before = srv.metrics()
    send(srv, "alice@localhost", ["y@remote.test", "bob@localhost"],
         b"Subject: retried\r\n\r\nhi\r\n")
    wait_until(lambda: srv.sink.sessions, timeout=15, message="a first attempt")
    srv.wait_mails("bob", 1)
    del srv.sink.behaviour.rcpt["y@remote.test"]
    wait_until(lambda: srv.sink.transactions, timeout=15, message="the retry")
    srv.wait_queue_empty()
    assert len(sent_copies(srv, "alice")) == 1
    assert len(srv.mails("bob")) == 1 and len(srv.sink.transactions) == 1
    after = srv.metrics()
    key = 'smtp_spool_delivery_recipients_total{result="delivered"}'
    assert after.get(key, 0) - before.get(key, 0) == 2  # bob and y, not the archive copy
    accepted = "smtp_messages_accepted_total"
    assert after.get(accepted, 0) - before.get(accepted, 0) == 1


def test_failed_archive_copy_neither_loses_nor_duplicates_the_delivery(
        make_server: Any) -> None:
    """The recipients get the message once; the sender's copy, which failed, is kept owed in
    the queue entry (it was given up at once before) and made once its folder works."""
    srv = make_server()
    sent = srv.root / "mailboxes" / "alice" / "sent"
    sent.write_text("not a directory")
    send(srv, "alice@localhost", ["y@remote.test", "bob@localhost"],
         b"Subject: archive fails\r\n\r\nhi\r\n")
    srv.wait_mails("bob", 1)
    wait_until(lambda: len(srv.sink.transactions) == 1, timeout=15, message="the relay")

    def owed() -> list[dict[str, Any]]:
        return [e for p in (srv.root / "spool" / "queue").glob("*.json")
                if (e := json.loads(p.read_text())).get("archive_owed")]

    [entry] = wait_until(owed, timeout=15, message="the entry kept for the archive copy")
    assert entry["pending"] == []
    assert sent.read_text() == "not a directory"
    sent.unlink()  # the operator repairs the folder
    wait_until(lambda: sent_copies(srv, "alice"), timeout=20, message="the archive retry")
    srv.wait_queue_empty()
    assert len(sent_copies(srv, "alice")) == 1
    assert len(srv.sink.transactions) == 1 and len(srv.mails("bob")) == 1


def test_large_authenticated_message_to_a_local_user_is_filed_once_and_archived(
        make_server: Any, certs: CertSet) -> None:
    """> 256 KiB for one local mailbox is written into it as it arrives (direct delivery);
    the archive owner makes it go through the queue instead: one copy each, no more."""
    srv = make_server()
    big = b"Subject: big\r\n\r\n" + (b"z" * 900 + b"\r\n") * 400
    c = Raw(srv.port)
    assert c.cmd("EHLO client.test")[0] == 250
    c.starttls(certs)
    assert c.cmd("EHLO client.test")[0] == 250
    c.auth("carol", "carol-pass")
    assert c.cmd("MAIL FROM:<carol@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.data(big)[0] == 250
    c.close()
    (filed,) = srv.wait_mails("alice", 1)
    srv.wait_queue_empty()
    (copy,) = srv.wait_mails("carol", 1, folder="sent")
    assert filed.endswith(big) and copy.endswith(big)
    assert len(srv.mails("alice")) == 1
    assert not list((srv.root / "mailboxes" / "alice" / "Maildir" / "tmp").iterdir())
