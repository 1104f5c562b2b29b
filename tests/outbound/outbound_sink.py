"""A scriptable receiving SMTP peer for outbound tests (a raw Twisted protocol, test-only).

It records every command line, every raw read in command mode (to see pipelining), and each
message's bytes exactly as they arrived (still dot-stuffed) plus the unstuffed body. Replies per
recipient, greeting, extensions, STARTTLS (with response injection) and silence are scripted
through ``Behaviour``.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any

from twisted.internet import protocol, ssl


@dataclass
class Behaviour:
    greeting: bytes = b"220 sink.test ESMTP ready"
    extensions: list[str] = field(default_factory=lambda: [
        "PIPELINING", "SIZE 10000000", "8BITMIME", "SMTPUTF8", "DSN", "ENHANCEDSTATUSCODES"])
    ehlo_reply: bytes | None = None  # e.g. b"502 5.5.1 no EHLO" to force HELO
    tls: ssl.CertificateOptions | None = None  # offer STARTTLS with this server context
    inject_after_starttls: bool = False
    starttls_reply: bytes = b"220 2.0.0 ready to start TLS"
    offer_auth: bool = False  # advertise AUTH PLAIN LOGIN (even in plaintext: a trap)
    rcpt: dict[str, bytes] = field(default_factory=dict)  # address → reply line
    mail_reply: bytes = b"250 2.1.0 sender ok"
    data_reply: bytes = b"250 2.0.0 queued as X"
    silent_on: set[str] = field(default_factory=set)  # verbs never answered ("DATA", "EHLO")
    data_without_rcpt: bool = False  # answer 354 to DATA even with no accepted recipient
    rset_reply: bytes = b"250 2.0.0 ok"


@dataclass
class Transaction:
    mail: str
    rcpts: list[str] = field(default_factory=list)
    raw: bytes = b""  # DATA bytes as received, dot-stuffed, without the final ".CRLF"
    body: bytes = b""  # unstuffed


@dataclass
class Session:
    commands: list[str] = field(default_factory=list)
    reads: list[bytes] = field(default_factory=list)
    tls: bool = False
    transactions: list[Transaction] = field(default_factory=list)


def unstuff(raw: bytes) -> bytes:
    lines = raw.split(b"\r\n")
    return b"\r\n".join(line[1:] if line.startswith(b".") else line for line in lines)


class SinkProtocol(protocol.Protocol):
    def __init__(self, factory: SinkFactory) -> None:
        self.factory = factory
        self.behaviour = factory.behaviour
        self.session = Session()
        self.buf = b""
        self.in_data = False
        self.txn: Transaction | None = None
        self.auth_login_step = 0

    def connectionMade(self) -> None:
        self.factory.sessions.append(self.session)
        self.send(self.behaviour.greeting)

    def send(self, *lines: bytes) -> None:
        assert self.transport is not None
        self.transport.write(b"".join(line + b"\r\n" for line in lines))

    def dataReceived(self, data: bytes) -> None:
        if not self.in_data:
            self.session.reads.append(data)
        self.buf += data
        while True:
            if self.in_data:
                if not self._data_step():
                    return
                continue
            if b"\r\n" not in self.buf:
                return
            line, _, self.buf = self.buf.partition(b"\r\n")
            self.command(line.decode("utf-8", "replace"))
            if self.transport is None or getattr(self, "_tls_switched", False):
                self._tls_switched = False
                self.buf = b""  # plaintext pipelined after STARTTLS is discarded
                return

    def _data_step(self) -> bool:
        if self.buf.startswith(b".\r\n"):
            raw, self.buf = b"", self.buf[3:]
        else:
            end = self.buf.find(b"\r\n.\r\n")
            if end < 0:
                return False
            raw, self.buf = self.buf[:end + 2], self.buf[end + 5:]
        assert self.txn is not None
        self.txn.raw, self.txn.body = raw, unstuff(raw)
        self.session.transactions.append(self.txn)
        self.txn, self.in_data = None, False
        self.send(self.behaviour.data_reply)
        return True

    def command(self, line: str) -> None:
        b = self.behaviour
        self.session.commands.append(line)
        if self.auth_login_step:
            self.auth_login_step -= 1
            self.send(b"334 UGFzc3dvcmQ6" if self.auth_login_step else b"235 2.7.0 ok")
            return
        verb = line.split(" ", 1)[0].upper()
        if verb in b.silent_on:
            return
        if verb == "EHLO":
            if b.ehlo_reply:
                self.send(b.ehlo_reply)
                return
            ext = list(b.extensions)
            if b.tls is not None and not self.session.tls:
                ext.append("STARTTLS")
            if b.offer_auth:
                ext.append("AUTH PLAIN LOGIN")
            lines = [b"250-sink.test", *[f"250-{e}".encode() for e in ext]]
            lines[-1] = b"250 " + lines[-1][4:]
            self.send(*lines)
        elif verb == "HELO":
            self.send(b"250 sink.test")
        elif verb == "STARTTLS" and b.tls is not None:
            if b.inject_after_starttls:
                self.send(b.starttls_reply, b"250-sink.test", b"250 AUTH PLAIN")
            else:
                self.send(b.starttls_reply)
            if b.starttls_reply.startswith(b"220"):
                assert self.transport is not None
                self.transport.startTLS(b.tls)  # type: ignore[attr-defined]
                self.session.tls = True
                self._tls_switched = True
        elif verb == "AUTH":
            parts = line.split()
            if len(parts) >= 3 and parts[1].upper() == "PLAIN":
                base64.b64decode(parts[2])
                self.send(b"235 2.7.0 ok")
            elif len(parts) == 2 and parts[1].upper() == "LOGIN":
                self.auth_login_step = 2
                self.send(b"334 VXNlcm5hbWU6")
            else:
                self.send(b"504 5.5.4 no")
        elif verb == "MAIL":
            self.txn = Transaction(line)
            self.send(b.mail_reply)
        elif verb == "RCPT":
            addr = line[line.index("<") + 1:line.index(">")]
            reply = b.rcpt.get(addr, b"250 2.1.5 ok")
            if reply.startswith(b"250") and self.txn is not None:
                self.txn.rcpts.append(line)
            self.send(reply)
        elif verb == "DATA":
            if (self.txn is None or not self.txn.rcpts) and not b.data_without_rcpt:
                self.send(b"554 5.5.1 no valid recipients")
                return
            if self.txn is None:
                self.txn = Transaction("")
            self.in_data = True
            self.send(b"354 go ahead")
        elif verb == "RSET":
            self.txn = None
            self.send(b.rset_reply)
        elif verb == "QUIT":
            self.send(b"221 2.0.0 bye")
            assert self.transport is not None
            self.transport.loseConnection()
        else:
            self.send(b"502 5.5.2 not implemented")


class SinkFactory(protocol.Factory):
    def __init__(self, behaviour: Behaviour | None = None) -> None:
        self.behaviour = behaviour or Behaviour()
        self.sessions: list[Session] = []
        self.protocols: list[SinkProtocol] = []  # tests may drop connections themselves

    def buildProtocol(self, addr: Any) -> SinkProtocol:
        proto = SinkProtocol(self)
        self.protocols.append(proto)
        return proto

    @property
    def transactions(self) -> list[Transaction]:
        return [t for s in self.sessions for t in s.transactions]


def server_tls(cert_path: str, key_path: str) -> ssl.CertificateOptions:
    with open(cert_path, "rb") as fh:
        cert = fh.read()
    with open(key_path, "rb") as fh:
        key = fh.read()
    return ssl.PrivateCertificate.loadPEM(cert + key).options()  # type: ignore[no-any-return]
