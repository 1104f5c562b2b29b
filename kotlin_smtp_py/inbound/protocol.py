"""The inbound ESMTP session: a ``twisted.mail.smtp.ESMTP`` subclass with its own framing.

What we replace from twisted.mail and why (each point is in TWISTED-NOTES and has a test):

- Framing: our own bounded buffer instead of ``LineOnlyReceiver``. Command lines over
  ``maxCommandLineLength`` get ``500 5.5.2`` and are skipped; DATA uses the bulk
  :class:`DataDecoder` (only ``CRLF.CRLF`` ends a message; bare CR/LF are refused); BDAT reads
  exact byte counts. Nothing inside a message is ever executed as a command.
- Pipelining: exactly one command is in flight. While an asynchronous check (RCPT policy, AUTH,
  end-of-data commit) runs, further input is only buffered (the transport is paused when the
  buffer grows), so replies go out strictly in command order.
- STARTTLS discards buffered plaintext and resets the session (RFC 3207 §4.2).
- Dispatch is an explicit verb table: no ``getattr`` on network input.
- A 250 after DATA/BDAT is sent only after the spool commit fired (fsync'd); storage failures
  answer ``451 4.3.0``.
"""

from __future__ import annotations

import base64
import binascii
import errno
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from email.utils import formatdate, make_msgid
from typing import TYPE_CHECKING, Any

from twisted.internet import defer, task, tcp
from twisted.internet.interfaces import IHandshakeListener, ITLSTransport
from twisted.logger import Logger
from twisted.mail import smtp
from twisted.python.failure import Failure
from zope.interface import implementer

from kotlin_smtp_py.envelope import (
    Address,
    AddressError,
    Envelope,
    Recipient,
    parse_path,
    unique_hex,
)
from kotlin_smtp_py.inbound.framing import (
    BARE_EOL,
    LINE_TOO_LONG,
    TOO_BIG,
    DataDecoder,
    stray_cr_lf,
)
from kotlin_smtp_py.inbound.policy import SessionInfo
from kotlin_smtp_py.interfaces import ISpoolWriter, IWriterHint
from kotlin_smtp_py.log import debug_enabled
from kotlin_smtp_py.netutil import parse_ip
from kotlin_smtp_py.plugins import DROP, CommandContext, Stage
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.status import SmtpReply

if TYPE_CHECKING:
    from kotlin_smtp_py.inbound.factory import SMTPFactory

log = Logger()

PAUSE_BUFFER = 64 * 1024  # pause reading when this much input waits behind a pending command
AUTH_CHECK_TIMEOUT = 30.0  # seconds for an auth checker (bcrypt cost 14 takes ~1-2 s)
# A message's spool commit running this long ends the session at the idle timeout after all.
COMMIT_LIMIT_SECONDS = 600.0
AUTH_LINE_MAX = 12288  # RFC 4954 §4
MAX_ERRORS = 20  # like Postfix's smtpd_hard_error_limit
# Like Postfix's smtpd_junk_command_limit: past this many NOOP/RSET/VRFY/EXPN/ETRN since
# the last accepted message, each one counts as an error (a session cannot idle on them).
JUNK_LIMIT = 100
HEADER_SCAN_LIMIT = 64 * 1024
# RFC 5321 §6.3: count Received: fields to stop mail loops; "at least 100" hops allowed.
MAX_HOPS = 100
ABORT_GRACE_SECONDS = 5.0
READ_SIZE = 256 * 1024

R = SmtpReply
OK_RESET = R(250, "2.0.0", "Ok")
BAD_SEQUENCE = R(503, "5.5.1", "Bad sequence of commands")
NEED_HELO = R(503, "5.5.1", "Send EHLO/HELO first")
NEED_MAIL = R(503, "5.5.1", "Need MAIL command first")
NEED_RCPT = R(503, "5.5.1", "Need RCPT command first")
SYNTAX = R(501, "5.5.4", "Syntax error in parameters or arguments")
UNRECOGNIZED = R(500, "5.5.2", "Command unrecognized")
LINE_TOO_LONG_REPLY = R(500, "5.5.2", "Line too long")
STORAGE_FAILED = R(451, "4.3.0", "Requested action aborted: local storage error, try again later")
NO_STORAGE = R(452, "4.3.1", "Insufficient system storage, try again later")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)
TOO_MANY_ERRORS = R(421, "4.7.0", "Too many errors, closing connection")
DROP_REPLY = R(421, "4.7.0", "Closing connection")  # identity-compared: close without a reply
AUTH_LOCKED = R(454, "4.7.0", "Too many authentication failures, try again later")
MESSAGE_RATE = R(451, "4.7.0", "Too many messages from your address, try again later")
_PARAM = re.compile(r"([A-Za-z0-9][A-Za-z0-9-]*)(?:=([^= \x00-\x1f]*))?\Z")
_XTEXT = re.compile(r"(?:[\x21-\x2a\x2c-\x3c\x3e-\x7e]|\+[0-9A-F]{2})*\Z")


_DIRECT_SEND_ATTRS = ("TLS", "connected", "disconnecting", "_writeDisconnected",
                      "_tempDataLen", "offset", "dataBuffer", "socket")
_direct_send: list[bool] = []  # decided on the first tcp.Server of the process


def _direct_send_possible(transport: Any) -> bool:
    """Whether Twisted's tcp.Server still has the attributes ``_write_now`` reads (checked
    once, so that a Twisted release renaming one switches the shortcut off)."""
    if not _direct_send:
        _direct_send.append(all(hasattr(transport, a) for a in _DIRECT_SEND_ATTRS))
    return _direct_send[0]


def _split_path(arg: str, keyword: str) -> tuple[str, str] | None:
    """Split ``FROM:<path> params`` into (path, params); quote-aware ``>`` search."""
    if not arg[:len(keyword)].upper() == keyword:
        return None
    rest = arg[len(keyword):].lstrip(" ")
    if not rest.startswith("<"):
        return None
    if '"' not in rest:  # no quoted local part (nearly always): the first ">" closes the path
        i = rest.find(">")
        return None if i < 0 else (rest[:i + 1], rest[i + 1:].strip())
    quoted = False
    i = 1
    while i < len(rest):
        c = rest[i]
        if c == "\\" and quoted:
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == ">" and not quoted:
            return rest[:i + 1], rest[i + 1:].strip()
        i += 1
    return None


def _parse_params(text: str) -> dict[str, str | None] | None:
    params: dict[str, str | None] = {}
    for token in text.split():
        m = _PARAM.match(token)
        if not m:
            return None
        key = m.group(1).upper()
        if key in params:
            return None
        params[key] = m.group(2)
    return params


def _path_and_params(arg: str, verb: str,
                     keyword: str) -> tuple[str, dict[str, str | None]] | SmtpReply:
    """``FROM:<path> params`` / ``TO:<path> params`` → (path, params) or the 501 to send."""
    split = _split_path(arg, keyword)
    if split is None:
        return R(501, "5.5.4", f"Syntax: {verb} {keyword}<address>")
    path, ptext = split
    params = _parse_params(ptext)
    if params is None:
        return R(501, "5.5.4", f"Syntax error in {verb} parameters")
    return path, params


_SIZE_DIGITS = re.compile(r"[0-9]{1,20}")  # ASCII only: str.isdigit() takes "²" and "３"


def _printable(text: str, allow_utf8: bool = False) -> bool:
    """No control characters (C0, DEL, C1); nothing beyond US-ASCII unless ``allow_utf8``."""
    for c in text:
        o = ord(c)
        if o < 0x20 or 0x7F <= o <= 0x9F or (o > 0x7F and not allow_utf8):
            return False
    return True


def _xtext_ok(value: str | None) -> bool:
    return value is not None and bool(_XTEXT.match(value))


def xtext_decode(value: str) -> str:
    """RFC 3461 §4: ``+XX`` hex escapes; we store decoded values (the client re-encodes)."""
    return re.sub(r"\+([0-9A-F]{2})", lambda m: chr(int(m.group(1), 16)), value)


@dataclass
class Transaction:
    """State between MAIL and the end of data."""

    sender: Address | None
    params: dict[str, str | None]
    smtputf8: bool
    recipients: list[Recipient] = field(default_factory=list)
    writer: Any = None
    decoder: DataDecoder | None = None
    header: Any = None
    bdat_used: bool = False
    bdat_failed: SmtpReply | None = None
    rejection_reported: bool = False  # counted, logged, writer released (BDAT size refusal)
    bdat_size: int = 0
    bdat_bad_eol: bool = False
    bdat_last_cr: bool = False


def _handshake_error(reason: Failure | None) -> str:
    """The OpenSSL reason of a failed handshake, short ("unsupported protocol"), or how the
    connection ended when there is none (the peer hung up or timed out)."""
    if reason is None:
        return "connection closed"
    value = reason.value
    args = getattr(value, "args", ())
    if args and isinstance(args[0], list) and args[0]:
        first = args[0][0]  # OpenSSL.SSL.Error: [(library, function, reason), ...]
        if isinstance(first, tuple) and first:
            return str(first[-1])
    return reason.getErrorMessage()[:200] or type(value).__name__


class HeaderFixer:
    """Holds the header block back until it is complete, then writes our Received header, a
    Message-ID/Date when missing, and the original headers; the body streams straight through."""

    def __init__(self, writer: ISpoolWriter, received: bytes, hostname: str) -> None:
        self._writer = writer
        self._received = received
        self._hostname = hostname
        self._held: bytearray | None = bytearray()
        self.message_id: str | None = None
        self.eight_bit = False  # the content really has bytes >= 0x80 (whatever BODY= said)
        self.hops = 0  # Received: fields already in the header

    def write(self, data: bytes) -> None:
        if not self.eight_bit and not data.isascii():
            self.eight_bit = True
        if self._held is None:
            self._writer.write(data)
            return
        self._held += data
        if self._held.startswith(b"\r\n") or b"\r\n\r\n" in self._held:
            self.flush()
        elif len(self._held) > HEADER_SCAN_LIMIT:
            self.flush(partial=True)

    def flush(self, partial: bool = False) -> None:
        """``partial``: the header goes on past what was held (over HEADER_SCAN_LIMIT), so a
        Message-ID or Date may still come; none is added then (RFC 5322 §3.6: at most one)."""
        if self._held is None:
            return
        held, self._held = bytes(self._held), None
        if held.startswith(b"\r\n"):  # no header section: the body's first lines are no fields
            head, rest = b"", held
        else:
            end = held.find(b"\r\n\r\n")
            head, rest = (held, b"") if end < 0 else (held[:end + 2], held[end + 2:])
        if b"return-path:" in head.lower():
            # Return-Path is the final delivery's to write (RFC 5321 §4.4); one a client put
            # in is forged or stale: dropped, as Postfix (message_drop_headers) and Exim do.
            head = _drop_fields(head, b"return-path:")
            held = head + rest
        lines = [ln.lower() for ln in head.split(b"\r\n")]
        self.hops = sum(1 for ln in lines if ln.startswith(b"received:"))
        extra = b""
        mid = next((ln for ln in head.split(b"\r\n") if ln.lower().startswith(b"message-id:")),
                   None)
        if mid is None and not partial:
            self.message_id = make_msgid(domain=self._hostname)
            extra += b"Message-ID: " + self.message_id.encode("ascii") + b"\r\n"
        elif mid is not None:
            self.message_id = mid.split(b":", 1)[1].strip().decode("utf-8", "replace")[:998]
        if not partial and not any(ln.startswith(b"date:") for ln in lines):
            extra += b"Date: " + formatdate(localtime=False, usegmt=True).encode("ascii") + b"\r\n"
        self._writer.write(self._received + extra + held)


def _drop_fields(head: bytes, name: bytes) -> bytes:
    """``head`` without the fields called ``name`` (lower case, with the colon) and their
    continuation lines."""
    kept: list[bytes] = []
    dropping = False
    for line in head.split(b"\r\n"):
        if dropping and line[:1] in (b" ", b"\t"):
            continue
        dropping = line[:len(name)].lower() == name
        if not dropping:
            kept.append(line)
    return b"\r\n".join(kept)


# Characters that would change a Received: field's syntax (comments, the ";" before the date,
# quoting, spaces) if a client's HELO name carried them: replaced by "?", as Postfix does.
_TRACE_UNSAFE = re.compile(r'[\s<>()";@\\]')


def trace_name(helo: str, utf8: bool) -> str:
    """The client's HELO name as written into our Received: field. A UTF-8 name goes in as
    A-labels unless the transaction is SMTPUTF8 (a raw UTF-8 header would make a 7-bit
    message 8-bit behind the sender's back)."""
    if not utf8 and not helo.isascii():
        try:
            helo = helo.encode("idna").decode("ascii")
        except UnicodeError:
            helo = helo.encode("ascii", "replace").decode("ascii")
    return _TRACE_UNSAFE.sub("?", helo)


@implementer(IHandshakeListener)
class SMTPServerProtocol(smtp.ESMTP):
    """One SMTP session. Configuration and collaborators come from the factory."""

    factory: SMTPFactory
    transport: Any  # a TCP/TLS transport (ITCPTransport + ITLSTransport + IProducer)
    noisy = False

    def __init__(self) -> None:
        super().__init__(chal={}, contextFactory=None)  # type: ignore[no-untyped-call]
        self.session_id = unique_hex(6)
        self._buf = bytearray()
        self._mode = "command"
        self._busy = False
        self._processing = False
        self._discarding_line = False
        self._closing = False
        self._paused = False  # reading from the transport is paused
        self._commit_started: float | None = None  # a message's spool commit is running
        self._auth_slots: list[str] = []  # AUTH checks in flight counted for this session
        self._out_blocked = False  # the transport's output is backed up (it paused us)
        self._producing = False  # registered as the transport's producer
        self._out: list[bytes] = []
        self._helo_name: str | None = None
        self._esmtp = False
        self._tx: Transaction | None = None
        self._auth_user: str | None = None
        self._auth_state: tuple[str, list[str]] | None = None
        self._tls = False
        self._handshake_done = False
        self._errors = 0
        self._junk = 0
        self._auth_refusals = 0
        self._bdat_remaining = 0
        self._bdat_last = False
        self._bdat_refusal: SmtpReply | None = None
        self._idle_call: Any = None
        self._handshake_call: Any = None
        self._abort_call: Any = None
        self._started = 0.0
        self.peer_ip = ""
        self.peer_port = 0

    # -- connection lifecycle ------------------------------------------------------------------

    @property
    def clock(self) -> Any:
        return self.factory.clock

    @property
    def listener(self) -> Any:
        return self.factory.listener

    @property
    def closed(self) -> bool:
        """Closed or being closed: nothing more will be said in this session."""
        return self._closing

    def connectionMade(self) -> None:
        if type(self.transport) is tcp.Server:
            # 256 KiB per recv(2) instead of Twisted's 64 KiB: a quarter of the reactor turns
            # (and Python calls) for large bodies; the buffer is transient per read.
            self.transport.bufferSize = READ_SIZE
        peer = self.transport.getPeer()
        host = getattr(peer, "host", None)  # (a getattr default would render str(peer) always)
        self.peer_ip = host if host is not None else str(peer)
        if self.peer_ip[:7].lower() == "::ffff:":
            # ::ffff:192.0.2.1 (a dual-stack listener, a PROXY TCP6 header) is 192.0.2.1:
            # one client, one entry in the limits, logs and Received:, as Postfix writes it.
            mapped = parse_ip(self.peer_ip)
            if mapped is not None and mapped.version == 4:
                self.peer_ip = str(mapped)
        self.peer_port = int(getattr(peer, "port", 0))
        self._started = time.monotonic()
        self.canStartTLS = ITLSTransport.providedBy(self.transport) and \
            self.factory.tls_context is not None
        self._tls = bool(self.listener.implicitTls)
        self.startedTLS = self._tls
        self.factory.session_started(self)
        if debug_enabled():
            log.debug("session {session} connect from {peer}", session=self.session_id,
                      peer=self.peer_ip, event="session_started")
        if self._tls:
            self._arm_handshake_timer()
        self._arm_idle_timer()
        # Output back-pressure: the transport pauses us when replies back up (a client that
        # pipelines and never reads), and we stop reading and processing until they drain.
        self.transport.registerProducer(self, True)
        self._producing = True
        # Until the greeting is out, input is only buffered: that is how a client that talks
        # first (pre-greeting, like Postfix's postscreen test) is recognised.
        self._busy = True
        d = self.factory.admission(self)
        d.addErrback(self._internal_error)
        d.addCallback(self._greet)

    def _greet(self, refusal: SmtpReply | None) -> None:
        if self._closing:
            return
        if refusal is not None:
            self._send(refusal)
            self._close()
            return
        if self._buf and self.factory.pregreet_check(self.listener):
            log.info("session {session} from {peer} talked before the greeting",
                     session=self.session_id, peer=self.peer_ip, event="pregreet")
            self._send(R(554, "5.5.1", "Protocol error: talking too soon"))
            self._close()
            return
        self._send(R(220, "", f"{self.factory.hostname} {self.listener.serviceName} "
                              "kotlin-smtp-py ready"))
        self._busy = False
        self._restart_idle_timer()
        self._process()

    def connectionLost(self, reason: Failure | None = None) -> None:
        self._closing = True
        self._mode = "closed"
        for call in (self._idle_call, self._handshake_call, self._abort_call):
            if call is not None and call.active():
                call.cancel()
        self._abort_tx()
        self._release_auth_slots()
        if self._tls and not self._handshake_done:
            # A minTlsVersion/cipherSuites mismatch, or plain text on an implicit-TLS port,
            # looks like a hang-up otherwise (Postfix logs its SSL_accept error likewise).
            log.info("session {session} TLS handshake failed with {peer}: {error}",
                     session=self.session_id, peer=self.peer_ip,
                     error=_handshake_error(reason), event="tls_handshake_failed")
        self.factory.session_ended(self)
        self.factory.release_connection(self)  # no-op unless the connection was counted
        log.info("session {session} disconnect from {peer}", session=self.session_id,
                 peer=self.peer_ip, duration_ms=int((time.monotonic() - self._started) * 1000),
                 event="session_ended")

    def _restart_idle_timer(self) -> None:
        if self._idle_call is not None and self._idle_call.active():
            self._idle_call.reset(self.listener.idleTimeoutSeconds)
        else:
            self._arm_idle_timer()

    def _arm_idle_timer(self) -> None:
        seconds = self.listener.idleTimeoutSeconds
        if seconds > 0:
            self._idle_call = self.clock.callLater(seconds, self._idle_timeout)

    def _idle_timeout(self) -> None:
        seconds = self.listener.idleTimeoutSeconds
        started = self._commit_started
        if started is not None and not self._closing and \
                self.clock.seconds() - started < max(COMMIT_LIMIT_SECONDS, seconds):
            # The client is waiting for the spool commit of its message: a 421 now, with the
            # message stored anyway, would make it send the message again (RFC 5321
            # §4.5.3.2.7 times the client, not the server). Checked again later; _async_done
            # starts a fresh period after our reply. Only a commit stuck for 10 minutes (the
            # client's own DATA timeout) ends the session here. (Other waits — a plugin, a
            # password check — end with the usual 421: nothing was stored.)
            self._idle_call = self.clock.callLater(seconds, self._idle_timeout)
            return
        log.info("session {session} idle timeout", session=self.session_id, peer=self.peer_ip)
        self._send(R(421, "4.4.2", f"{self.factory.hostname} Error: timeout exceeded"))
        self._close()

    def _arm_handshake_timer(self) -> None:
        ms = self.factory.handshake_timeout_ms
        if ms > 0:
            self._handshake_call = self.clock.callLater(ms / 1000.0, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        log.info("session {session} TLS handshake timeout", session=self.session_id,
                 peer=self.peer_ip)
        self.transport.abortConnection()

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        if self._handshake_call is not None and self._handshake_call.active():
            self._handshake_call.cancel()

    def _close(self) -> None:
        """Flush replies, close, and abort if the peer does not read them."""
        self._flush()
        self._closing = True
        self._mode = "closed"
        self._unregister_producer()  # a paused producer would hold the close back
        self.transport.loseConnection()
        if self._abort_call is None:
            self._abort_call = self.clock.callLater(ABORT_GRACE_SECONDS, self._abort_if_open)

    def _abort_if_open(self) -> None:
        if self.transport is not None and self.connected:
            self.transport.abortConnection()

    def end_for_shutdown(self) -> None:
        """The grace period is over: 421 now, and closed without waiting for the peer to read
        it or finish its transaction (an unfinished message was never accepted). On plain TCP
        the reply leaves in one send(2) before the abort; through TLS it is queued and the
        connection closed in order (the process exits moments later either way)."""
        t = self.transport
        if t is None:
            return
        if not self._closing:
            self._out = []
            self._send(R(421, "4.3.2", f"{self.factory.hostname} Service shutting down"))
            self._flush()
            self._closing = True
            self._mode = "closed"
        # self._tls: an implicit-TLS transport does not answer to ``TLS`` (its wrapper passes
        # the lookup on to the TCP transport), and aborting it would drop the queued 421.
        self._unregister_producer()
        if self._tls or getattr(t, "TLS", False):
            t.loseConnection()
        else:
            t.abortConnection()

    def shutdown(self) -> None:
        """Graceful shutdown: idle sessions get 421 now; sessions in a transaction finish first."""
        if self._closing:
            return
        if self._tx is None and not self._busy and self._mode == "command":
            self._send(R(421, "4.3.2", f"{self.factory.hostname} Service shutting down"))
            self._close()
        else:
            self.factory.closing_after_transaction.add(self)

    # -- input ---------------------------------------------------------------------------------

    # IPushProducer, for the transport: its output buffer is over its bound / drained.
    def pauseProducing(self) -> None:
        self._out_blocked = True

    def resumeProducing(self) -> None:
        self._out_blocked = False
        if not self._closing:
            self._process()

    def stopProducing(self) -> None:
        self._out_blocked = False

    def _unregister_producer(self) -> None:
        if self._producing:
            self._producing = False
            self._out_blocked = False
            # Plain TCP holds us itself; after STARTTLS or on an implicit-TLS listener the TLS
            # layer holds us behind its own wrapper (the TCP transport's ``producer`` is that
            # wrapper), and either transport's unregisterProducer reaches the right one.
            if self.transport is not None:
                self.transport.unregisterProducer()

    def _update_reading(self) -> None:
        """Stop reading while much input waits unprocessed: behind a command in progress, or
        behind replies the client does not read. (Not at once when replies back up: a TLS
        layer pauses us while its handshake runs, and the handshake needs reading.)"""
        want_paused = not self._closing and (self._busy or self._out_blocked) and \
            len(self._buf) > PAUSE_BUFFER
        if want_paused != self._paused and self.transport is not None:
            self._paused = want_paused
            if want_paused:
                self.transport.pauseProducing()
            else:
                self.transport.resumeProducing()

    def dataReceived(self, data: bytes) -> None:
        if self._closing:
            return
        # Message data resets the idle timer as it flows; a command only once a whole line is
        # in, so a client dribbling bytes cannot hold a session for ever without completing
        # one (a bounded time per command line, like Postfix's smtpd_per_request_deadline).
        if self._idle_call is not None and self._idle_call.active() and (
                self._mode in ("data", "bdat") or b"\n" in data):
            self._idle_call.reset(self.listener.idleTimeoutSeconds)
        self._buf += data
        self._process()
        if not self._paused and len(self._buf) > PAUSE_BUFFER:
            self._update_reading()

    def _process(self) -> None:
        if self._processing:
            return
        self._processing = True
        try:
            while not self._busy and not self._closing and not self._out_blocked:
                if self._mode == "bdat":
                    if not self._buf and self._bdat_remaining > 0:
                        break
                    self._feed_bdat()
                elif not self._buf:
                    break
                elif self._mode == "data":
                    self._feed_data()
                elif not self._next_line():
                    break
        finally:
            self._processing = False
        self._flush()
        if self._paused:
            self._update_reading()

    def _next_line(self) -> bool:
        limit = AUTH_LINE_MAX if self._mode == "auth" else self.factory.max_line
        idx = self._buf.find(b"\n")
        if idx < 0:
            if len(self._buf) > limit:
                self._discarding_line = True
                del self._buf[:]
            return False
        line = bytes(self._buf[:idx])
        del self._buf[:idx + 1]
        if self._discarding_line:
            self._discarding_line = False
            self._line_too_long()
            return True
        if line.endswith(b"\r"):
            line = line[:-1]
        if len(line) > limit:
            self._line_too_long()
            return True
        if self._mode == "auth":
            self._run(self._auth_continue, line)
        else:
            self._command(line)
        return True

    def _command(self, raw: bytes) -> None:
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            self._error(R(500, "5.5.2", "Syntax error: invalid characters"))
            return
        verb, _, arg = line.strip().partition(" ")
        verb = verb.upper()
        handler = self._verbs.get(verb)
        if handler is None:
            self._error(UNRECOGNIZED if verb else R(500, "5.5.2", "Syntax error"))
            return
        arg = arg.strip()
        chain = self.factory.interceptors
        if chain is None or not chain.wants(Stage.PRE_COMMAND):
            self._run(handler, self, arg)  # what _gate would do, without its closure
            return
        self._run(self._gate, Stage.PRE_COMMAND, lambda: handler(self, arg),
                  command=verb, argument="" if verb == "AUTH" else arg)

    def _gate(self, stage: Stage, proceed: Callable[[], Any], **context: Any) -> Any:
        """Run the command interceptors for ``stage``, then ``proceed`` unless one refuses."""
        chain = self.factory.interceptors
        if chain is None or not chain.wants(stage):
            return proceed()
        ctx = CommandContext(stage=stage, session=self.session_info(),
                             command=context.pop("command", stage.value), **context)
        d: defer.Deferred[Any] = chain.run(ctx)

        def decided(result: Any) -> Any:
            if result is DROP:
                return DROP_REPLY
            if result is not None:
                return result
            return proceed()

        return d.addCallback(decided)

    def _run(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            result = fn(*args, **kwargs)
        except Exception:
            log.failure("session {session}: command failed", session=self.session_id)
            result = R(451, "4.3.0", "Internal error, try again later")
        if isinstance(result, defer.Deferred):
            self._busy = True
            result.addErrback(self._internal_error)
            result.addCallback(self._async_done)
        elif result is not None:
            self._reply(result)

    def _internal_error(self, failure: Failure) -> SmtpReply:
        log.failure("session {session}: asynchronous command failed", failure,
                    session=self.session_id)
        return R(451, "4.3.0", "Internal error, try again later")

    def _async_done(self, reply: SmtpReply | None) -> None:
        self._busy = False
        if self._closing:
            return
        self._restart_idle_timer()
        if reply is not None:
            self._reply(reply)
        self._process()

    # -- output --------------------------------------------------------------------------------

    def _send(self, reply: SmtpReply) -> None:
        self._out.append(reply.encode())
        if not self._processing:
            self._flush()

    def _flush(self) -> None:
        if self._out and self.transport is not None:
            data = b"".join(self._out)
            self._out = []
            self._write_now(data)

    def _write_now(self, data: bytes) -> None:
        """On plain TCP (no TLS yet) with nothing queued, send(2) at once; the rest goes
        through write().

        Twisted's write() always queues and arms EPOLLOUT for the next reactor turn: two
        epoll_ctl calls and a loop iteration per reply (measured: 16 epoll_ctl per message on a
        connection-per-message load). Bytes the kernel does not take are handed to write() as
        usual, so ordering, back-pressure and error handling stay Twisted's."""
        t = self.transport
        if (type(t) is tcp.Server and _direct_send_possible(t) and not t.TLS and t.connected
                and not t.disconnecting and not t._writeDisconnected and not t._tempDataLen
                and t.offset == len(t.dataBuffer)):
            try:
                sent = t.socket.send(data)
            except OSError:
                sent = 0  # EAGAIN, or a dead socket that write() will report properly
            data = data[sent:]
        if data:
            t.write(data)

    def _reply(self, reply: SmtpReply) -> None:
        if reply is DROP_REPLY:
            log.info("session {session} dropped by policy", session=self.session_id,
                     peer=self.peer_ip, event="session_dropped")
            self._close()
            return
        if reply.code >= 500 and reply.code != 552:
            self._errors += 1
        self._send(reply)
        if reply.code == 421 or self._errors >= MAX_ERRORS:
            if reply.code != 421:
                self._send(TOO_MANY_ERRORS)
            self._close()

    def _error(self, reply: SmtpReply) -> None:
        self._reply(reply)

    def _line_too_long(self) -> None:
        if self._mode == "auth":  # RFC 4954 §4: the exchange ends, back to commands
            self._mode = "command"
            self._auth_state = None
            self._error(R(500, "5.5.6", "Authentication Exchange line is too long"))
        else:
            self._error(LINE_TOO_LONG_REPLY)

    # -- session info --------------------------------------------------------------------------

    def session_info(self) -> SessionInfo:
        return SessionInfo(self.session_id, self.peer_ip, self.peer_port, self._helo_name,
                           self._tls, self._auth_user, int(self.listener.port))

    def _auth_offered(self) -> bool:
        return bool(self.factory.auth_checker is not None and self.listener.enableAuth
                    and (self._tls or self.listener.allowPlaintextAuth))

    def _starttls_offered(self) -> bool:
        return bool(self.canStartTLS and self.listener.enableStartTls and not self._tls)

    # -- verbs ---------------------------------------------------------------------------------

    def do_EHLO(self, arg: str) -> SmtpReply:
        return self._hello(arg, esmtp=True)

    def do_HELO(self, arg: str) -> SmtpReply:
        return self._hello(arg, esmtp=False)

    def _hello(self, arg: str, esmtp: bool) -> SmtpReply:
        name = arg.split(" ")[0] if arg else ""
        if not name or len(name) > 255 or not _printable(name, allow_utf8=True):
            # The name is echoed in the reply and written into Received: no CR, NUL, ESC...
            return R(501, "5.5.4", "Syntax: EHLO hostname")
        self._abort_tx()
        self._helo_name = name
        self._esmtp = esmtp
        greeting = f"{self.factory.hostname} Hello {name} [{self.peer_ip}]"
        if not esmtp:
            return R(250, "", greeting)
        ext = ["PIPELINING", f"SIZE {self.factory.max_size}", "8BITMIME",
               "ENHANCEDSTATUSCODES", "SMTPUTF8", "CHUNKING", "DSN"]
        if self._starttls_offered():
            ext.append("STARTTLS")
        if self._auth_offered():
            ext.append("AUTH PLAIN LOGIN")
        if self._tls:
            ext.append("REQUIRETLS")
        if self.factory.etrn is not None:
            ext.append("ETRN")
        ext.append("HELP")
        return R(250, "", "\n".join([greeting, *ext]))

    def _count_junk(self) -> None:
        self._junk += 1
        if self._junk > JUNK_LIMIT:
            self._errors += 1  # _reply closes the session at MAX_ERRORS

    def do_NOOP(self, arg: str) -> SmtpReply:
        self._count_junk()
        return R(250, "2.0.0", "Ok")

    def do_HELP(self, arg: str) -> SmtpReply:
        return R(214, "2.0.0", "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP QUIT HELP "
                               "STARTTLS AUTH VRFY EXPN ETRN")

    def do_RSET(self, arg: str) -> SmtpReply:
        self._count_junk()
        self._abort_tx()
        return OK_RESET

    def do_QUIT(self, arg: str) -> None:
        self._send(R(221, "2.0.0", "Bye"))
        self._close()

    def do_VRFY(self, arg: str) -> SmtpReply:
        self._count_junk()
        hook = self.factory.vrfy
        return hook(self, arg) if hook is not None else R(502, "5.5.1", "VRFY not supported")

    def do_EXPN(self, arg: str) -> SmtpReply:
        self._count_junk()
        hook = self.factory.expn
        return hook(self, arg) if hook is not None else R(502, "5.5.1", "EXPN not supported")

    def do_ETRN(self, arg: str) -> Any:
        self._count_junk()
        hook = self.factory.etrn
        if hook is None:
            return R(502, "5.5.1", "ETRN not supported")
        return hook(self, arg)

    def do_STARTTLS(self, arg: str) -> SmtpReply | None:
        if arg:
            return SYNTAX
        if self._tls:
            return R(503, "5.5.1", "TLS already active")
        if not self._starttls_offered():
            return R(502, "5.5.1", "STARTTLS not available")
        self._send(R(220, "2.0.0", "Ready to start TLS"))
        self._flush()
        # RFC 3207 §4.2 / CVE-2011-0411: nothing sent before the handshake may be acted upon.
        del self._buf[:]
        self._abort_tx()
        self._helo_name = None
        self._auth_user = None
        self._tls = True
        self.startedTLS = True
        self._arm_handshake_timer()
        self.transport.startTLS(self.factory.tls_context)
        return None

    # -- MAIL / RCPT ---------------------------------------------------------------------------

    def do_MAIL(self, arg: str) -> Any:
        if self._helo_name is None:
            return NEED_HELO
        if self._tx is not None:
            return R(503, "5.5.1", "Nested MAIL command")
        if (self.factory.auth_required or self.listener.requireAuthForMail) \
                and self._auth_user is None:
            return R(530, "5.7.0", "Authentication required")
        parsed = _path_and_params(arg, "MAIL", "FROM:")
        if isinstance(parsed, SmtpReply):
            return parsed
        path, params = parsed
        problem = self._check_mail_params(params)
        if problem is not None:
            return problem
        utf8 = "SMTPUTF8" in params
        try:
            sender = parse_path(path, utf8=utf8, allow_null=True)
        except AddressError as exc:
            if exc.needs_utf8:
                return R(553, "5.6.7", "Address requires SMTPUTF8")
            return R(553, "5.1.7", f"Bad sender address syntax: {exc}")
        tx = Transaction(sender, params, utf8)
        return self._gate(Stage.MAIL_FROM, lambda: self._mail_checks(tx), command="MAIL",
                          argument=arg, sender="" if sender is None else str(sender))

    def _mail_checks(self, tx: Transaction) -> Any:
        """Per-IP message rate, then the sender checks; 250 opens the transaction."""
        def accept(refusal: SmtpReply | None) -> SmtpReply:
            if refusal is not None:
                return refusal
            self._tx = tx
            return R(250, "2.1.0", "Sender ok")

        def sender_checks(allowed: bool) -> Any:
            if not allowed:
                log.info("session {session}: message rate limit for {peer}",
                         session=self.session_id, peer=self.peer_ip, event="rate_limited")
                return MESSAGE_RATE
            check = self.factory.check_sender(self, tx.sender)
            return accept(None) if check is None else check.addCallback(accept)

        limiter = self.factory.message_limiter
        if limiter is None:
            return sender_checks(True)
        d: defer.Deferred[bool] = limiter.allow_message(self.peer_ip)
        return d.addCallback(sender_checks)

    def _check_mail_params(self, params: dict[str, str | None]) -> SmtpReply | None:
        for key, value in params.items():
            if key == "SIZE":
                if value is None or not _SIZE_DIGITS.fullmatch(value):  # RFC 1870: 1*20DIGIT
                    return SYNTAX
                if int(value) > self.factory.max_size:
                    return R(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif key == "BODY":
                if value is None or value.upper() not in ("7BIT", "8BITMIME"):
                    return R(501, "5.5.4", "Unsupported BODY type")
            elif key == "SMTPUTF8":
                if value is not None:
                    return SYNTAX
            elif key == "RET":
                if value is None or value.upper() not in ("FULL", "HDRS"):
                    return R(501, "5.5.4", "Bad RET parameter")
            elif key == "ENVID":
                if not _xtext_ok(value) or len(value or "") > 100 or \
                        not _printable(xtext_decode(value or "")):  # RFC 3461 §4.4
                    return R(501, "5.5.4", "Bad ENVID parameter")
            elif key == "AUTH":
                if not value or not _xtext_ok(value):  # RFC 4954 §5: an xtext mailbox or <>
                    return R(501, "5.5.4", "Bad AUTH parameter")
            elif key == "REQUIRETLS":
                if value is not None:
                    return SYNTAX
                if not self._tls:
                    return R(530, "5.7.10", "REQUIRETLS needs a TLS session")
            else:
                return R(555, "5.5.4", f"Unsupported MAIL parameter {key}")
        return None

    def do_RCPT(self, arg: str) -> Any:
        tx = self._tx
        if tx is None:
            return NEED_MAIL
        if tx.bdat_used:
            return BAD_SEQUENCE
        if len(tx.recipients) >= self.factory.max_recipients:
            return R(452, "4.5.3", "Too many recipients")
        parsed = _path_and_params(arg, "RCPT", "TO:")
        if isinstance(parsed, SmtpReply):
            return parsed
        path, params = parsed
        notify: tuple[str, ...] = ()
        orcpt: str | None = None
        for key, value in params.items():
            if key == "NOTIFY":
                items = tuple((value or "").upper().split(","))
                valid = {"SUCCESS", "FAILURE", "DELAY"}
                if not (items == ("NEVER",) or (items and set(items) <= valid)):
                    return R(501, "5.5.4", "Bad NOTIFY parameter")
                notify = items
            elif key == "ORCPT":
                kind, sep, original = (value or "").partition(";")
                decoded = xtext_decode(original) if sep else ""
                if not sep or not kind or not original or \
                        not (tx.smtputf8 or _xtext_ok(original)) or \
                        not _printable(decoded, allow_utf8=tx.smtputf8):
                    # (decoded control characters would reach the DSN's Original-Recipient)
                    return R(501, "5.5.4", "Bad ORCPT parameter")
                orcpt = f"{kind};{decoded}"
            else:
                return R(555, "5.5.4", f"Unsupported RCPT parameter {key}")
        if path.lower() == "<postmaster>":
            path = f"<postmaster@{self.factory.primary_domain}>"
        try:
            addr = parse_path(path, utf8=tx.smtputf8)
        except AddressError as exc:
            if exc.needs_utf8:
                return R(553, "5.6.7", "Address requires SMTPUTF8")
            return R(501, "5.1.3", f"Bad recipient address syntax: {exc}")
        assert addr is not None
        rcpt = Recipient(str(addr), notify, orcpt)

        def decided(refusal: SmtpReply | None) -> SmtpReply:
            if refusal is not None:
                log.info("session {session} rejected recipient {recipient}: {status}",
                         session=self.session_id, recipient=str(addr), peer=self.peer_ip,
                         status=f"{refusal.code} {refusal.enhanced}", event="rcpt_rejected")
                return refusal
            if self._tx is tx:
                tx.recipients.append(rcpt)
            return R(250, "2.1.5", "Recipient ok")

        def policy() -> Any:
            d: defer.Deferred[SmtpReply | None] = \
                self.factory.recipient_policy.check_recipient(self.session_info(), tx.sender,
                                                              addr)
            return d.addCallback(decided)

        return self._gate(Stage.RCPT_TO, policy, command="RCPT", argument=arg,
                          sender="" if tx.sender is None else str(tx.sender),
                          recipient=str(addr))

    # -- DATA / BDAT ---------------------------------------------------------------------------

    def _open_writer(self, tx: Transaction) -> SmtpReply | None:
        try:
            tx.writer = self.factory.spool.open_writer()
            if IWriterHint.providedBy(tx.writer):
                tx.writer.expect("" if tx.sender is None else str(tx.sender),
                                 tuple(tx.recipients))
        except Exception:
            log.failure("session {session}: cannot open spool writer", session=self.session_id)
            return STORAGE_FAILED
        tx.header = HeaderFixer(tx.writer, self._received_header(tx), self.factory.hostname)
        return None

    def do_DATA(self, arg: str) -> Any:
        tx = self._tx
        if arg:
            return SYNTAX
        if tx is None:
            return NEED_MAIL
        if tx.bdat_used:
            return R(503, "5.5.1", "DATA not allowed after BDAT")
        if not tx.recipients:
            return R(554, "5.5.1", "No valid recipients")
        result = self._gate(Stage.DATA_PRE, lambda: self._start_data(tx), command="DATA",
                            sender="" if tx.sender is None else str(tx.sender))
        if isinstance(result, defer.Deferred):
            return result.addCallback(self._note_refused_data)
        return self._note_refused_data(result)

    def _note_refused_data(self, reply: SmtpReply | None) -> SmtpReply | None:
        """A message refused at DATA (policy, storage) counts as rejected, like one refused
        after its content."""
        if reply is not None and reply is not DROP_REPLY and reply.code >= 400:
            self.factory.message_rejected(self, reply)
        return reply

    def _start_data(self, tx: Transaction) -> SmtpReply:
        failed = self._open_writer(tx)
        if failed is not None:
            return failed
        tx.decoder = DataDecoder(tx.header.write, self.factory.max_size)
        self._mode = "data"
        return R(354, "", "End data with <CR><LF>.<CR><LF>")

    def _feed_data(self) -> None:
        tx = self._tx
        assert tx is not None and tx.decoder is not None
        data = bytes(self._buf)
        del self._buf[:]
        rest = tx.decoder.feed(data)
        if rest is None:
            return
        self._buf[:0] = rest
        self._mode = "command"
        error = {BARE_EOL: R(550, "5.6.0", "Message contains bare CR or LF; "
                                           "lines must end with CRLF"),
                 LINE_TOO_LONG: R(554, "5.6.0", "Message contains a line that is too long"),
                 TOO_BIG: R(552, "5.3.4", "Message size exceeds fixed maximum message size"),
                 }.get(tx.decoder.error)
        self._run(self._end_message, tx, error)

    def do_BDAT(self, arg: str) -> Any:
        parts = arg.split()
        if not parts or len(parts) > 2 or not _SIZE_DIGITS.fullmatch(parts[0]) or \
                (len(parts) == 2 and parts[1].upper() != "LAST"):
            return R(501, "5.5.4", "Syntax: BDAT size [LAST]")
        size = int(parts[0])
        last = len(parts) == 2
        tx = self._tx
        if tx is None:
            return self._begin_bdat(size, last, NEED_MAIL)
        if not tx.recipients:
            return self._begin_bdat(size, last, R(554, "5.5.1", "No valid recipients"))
        if tx.writer is not None:
            return self._begin_bdat(size, last, None)
        gated = self._gate(Stage.DATA_PRE, lambda: self._begin_bdat(size, last,
                                                                    self._open_writer(tx)),
                           command="BDAT", sender="" if tx.sender is None else str(tx.sender))
        if isinstance(gated, defer.Deferred):
            return gated.addCallback(
                lambda refusal: None if refusal is None else self._begin_bdat(size, last, refusal))
        return None if gated is None else self._begin_bdat(size, last, gated)

    def _begin_bdat(self, size: int, last: bool, refusal: SmtpReply | None) -> None:
        """Read the chunk (RFC 3030: even when the command is refused); the reply comes after."""
        tx = self._tx
        if refusal is None and tx is not None:
            tx.bdat_used = True
        self._bdat_remaining = size
        self._bdat_last = last
        self._mode = "bdat"
        self._bdat_refusal = refusal
        return None

    def _feed_bdat(self) -> None:
        n = min(self._bdat_remaining, len(self._buf))
        with memoryview(self._buf) as view:
            chunk = bytes(view[:n])  # one copy (a bytearray slice, then bytes, made two)
        del self._buf[:n]
        self._bdat_remaining -= n
        tx = self._tx
        if tx is not None and self._bdat_refusal is None and tx.bdat_failed is None:
            self._bdat_content(tx, chunk)
        if self._bdat_remaining == 0:
            self._finish_bdat_chunk()

    def _bdat_content(self, tx: Transaction, chunk: bytes) -> None:
        if not chunk:
            return
        joined = tx.bdat_last_cr and chunk.startswith(b"\n")
        # A CRLF split across chunk boundaries is not stray: the LF this chunk starts with
        # (after a CR ending the last one) and the CR it ends with (checked by the next one).
        bare = (stray_cr_lf(chunk) - (1 if joined else 0)
                - (1 if chunk.endswith(b"\r") else 0))
        if bare or (tx.bdat_last_cr and not joined):
            tx.bdat_bad_eol = True
        tx.bdat_last_cr = chunk.endswith(b"\r")
        tx.bdat_size += len(chunk)
        if tx.bdat_size > self.factory.max_size:
            tx.bdat_failed = R(552, "5.3.4", "Message size exceeds fixed maximum message size")
            return
        if not tx.bdat_bad_eol:
            tx.header.write(chunk)

    def _finish_bdat_chunk(self) -> None:
        self._mode = "command"
        tx = self._tx
        refusal = self._bdat_refusal
        if refusal is not None:
            self._reply(refusal)
            return
        assert tx is not None
        if not self._bdat_last:
            if tx.bdat_failed is not None:
                # RFC 3030 §2: after a 5xx the client sends no more BDAT but RSET, so the
                # refusal is counted and the writer released now, not at a LAST that may never
                # come; chunks already pipelined get the same answer until the LAST.
                if not tx.rejection_reported:
                    self._reject_message(tx, tx.bdat_failed)
                self._reply(tx.bdat_failed)
                return
            self._reply(R(250, "2.0.0", f"{tx.bdat_size} octets received"))
            return
        error = tx.bdat_failed
        if error is None and (tx.bdat_bad_eol or tx.bdat_last_cr):
            error = R(550, "5.6.0", "Message contains bare CR or LF; lines must end with CRLF")
        self._run(self._end_message, tx, error)

    def _end_message(self, tx: Transaction, error: SmtpReply | None) -> Any:
        self._tx = None
        if error is not None:
            if not tx.rejection_reported:
                self._reject_message(tx, error)
            return error
        tx.header.flush()
        if tx.header.hops >= MAX_HOPS:  # our own Received: would make it one more
            return self._end_message(tx, R(554, "5.4.6", f"Too many hops ({tx.header.hops} "
                                                         "Received: fields): mail loop?"))
        sender = "" if tx.sender is None else str(tx.sender)
        params = tx.params
        envelope = Envelope(
            sender=sender, recipients=tuple(tx.recipients), helo=self._helo_name or "",
            peer=self.peer_ip, auth_user=self._auth_user, tls=self._tls, smtputf8=tx.smtputf8,
            # What the next hop needs to know is the content, not the declaration: 8-bit
            # bytes without BODY=8BITMIME are recorded as 8BITMIME, pure ASCII as 7BIT.
            body="8BITMIME" if tx.header.eight_bit else "7BIT",
            ret=(params.get("RET") or "").upper() or None,
            envid=xtext_decode(params["ENVID"] or "") if params.get("ENVID") else None,
            size=tx.writer.size, received_at=self.clock.seconds(),
            message_id=tx.header.message_id,
            archive_owner=self.factory.archive_owner(self.session_info(), tx.sender),
            requiretls="REQUIRETLS" in params)
        self._commit_started = self.clock.seconds()
        d: defer.Deferred[QueueEntry] = tx.writer.commit(envelope)

        def stored(entry: QueueEntry) -> SmtpReply:
            self._commit_started = None
            log.info("accepted {queue_id} from <{sender}> for {recipient} size={size} "
                     "message-id={message_id}", queue_id=entry.queue_id, sender=sender,
                     recipient=",".join(r.address for r in tx.recipients), size=envelope.size,
                     message_id=envelope.message_id, session=self.session_id, peer=self.peer_ip,
                     helo=self._helo_name, event="message_accepted")
            self.factory.message_accepted(self, entry)
            self._junk = 0  # as Postfix: the junk count starts again after a delivery
            self._after_transaction()
            return R(250, "2.0.0", f"Ok: queued as {entry.queue_id}")

        def failed(f: Failure) -> SmtpReply:
            self._commit_started = None
            reply = STORAGE_FAILED
            if getattr(tx.writer, "too_big", False):  # the spool's own limit (Redis maxRawBytes)
                reply = R(552, "5.3.4", "Message size exceeds fixed maximum message size")
            elif isinstance(f.value, OSError) and f.value.errno in _NO_SPACE:
                # RFC 5321 §4.2.2/§4.3.2: 452 after DATA, "insufficient system storage".
                reply = NO_STORAGE
                log.warn("session {session}: spool full: {error}", session=self.session_id,
                         error=str(f.value), event="spool_error")
            else:
                log.failure("session {session}: spool commit failed", f,
                            session=self.session_id, event="spool_error")
            self.factory.message_rejected(self, reply)
            self._after_transaction()
            return reply

        return d.addCallbacks(stored, failed)

    def _reject_message(self, tx: Transaction, error: SmtpReply) -> None:
        tx.rejection_reported = True
        tx.writer.abort()
        self.factory.message_rejected(self, error)
        log.info("session {session} message rejected: {status}", session=self.session_id,
                 peer=self.peer_ip, status=f"{error.code} {error.enhanced} {error.text}",
                 event="message_rejected")

    def _after_transaction(self) -> None:
        if self in self.factory.closing_after_transaction:
            self.factory.closing_after_transaction.discard(self)
            self.clock.callLater(0, self._shutdown_after_reply)

    def _shutdown_after_reply(self) -> None:
        if not self._closing:
            self._send(R(421, "4.3.2", f"{self.factory.hostname} Service shutting down"))
            self._close()

    def _abort_tx(self) -> None:
        tx, self._tx = self._tx, None
        if tx is not None and tx.writer is not None:
            tx.writer.abort()

    def _received_header(self, tx: Transaction) -> bytes:
        proto = "UTF8SMTP" if tx.smtputf8 else ("ESMTP" if self._esmtp else "SMTP")
        if proto == "SMTP":
            proto += "S" if self._tls else ""
        else:
            proto += ("S" if self._tls else "") + ("A" if self._auth_user else "")
        tls_info = ""
        if self._tls:
            tls_info = "\r\n\t(using TLS)"
            conn = getattr(self.transport, "_tlsConnection", None)
            try:
                conn = conn or self.transport.getHandle()
                tls_info = (f"\r\n\t(using {conn.get_protocol_version_name()} with cipher "
                            f"{conn.get_cipher_name()})")
            except Exception:
                pass
        who = f"{trace_name(self._helo_name or '', tx.smtputf8)} ([{self.peer_ip}])"
        if self._auth_user:
            who += " (authenticated)"
        rcpt = f"\r\n\tfor <{tx.recipients[0].address}>" if len(tx.recipients) == 1 else ""
        qid = tx.writer.queue_id
        date = formatdate(localtime=False, usegmt=True)
        text = (f"Received: from {who}\r\n\tby {self.factory.hostname} (kotlin-smtp-py) "
                f"with {proto} id {qid}{tls_info}{rcpt};\r\n\t{date}\r\n")
        return text.encode("utf-8", "replace")

    # -- AUTH ----------------------------------------------------------------------------------

    def do_AUTH(self, arg: str) -> Any:
        if self.factory.auth_checker is None or not self.listener.enableAuth:
            return R(502, "5.5.1", "AUTH not available")
        if not self._auth_offered():
            return R(538, "5.7.11", "Encryption required for requested authentication mechanism")
        if self._helo_name is None:
            return NEED_HELO
        if self._auth_user is not None:
            return R(503, "5.5.1", "Already authenticated")
        if self._tx is not None:
            return R(503, "5.5.1", "AUTH not allowed during a mail transaction")
        parts = arg.split()
        if not parts or len(parts) > 2:
            return R(501, "5.5.4", "Syntax: AUTH mechanism [initial-response]")
        mech = parts[0].upper()
        if mech not in ("PLAIN", "LOGIN"):
            return R(504, "5.5.4", "Unrecognized authentication type")
        self._auth_state = (mech, [])
        if len(parts) == 2:
            return self._auth_step(parts[1].encode("ascii", "replace"))
        self._mode = "auth"
        return R(334, "", "" if mech == "PLAIN" else "VXNlcm5hbWU6")

    def _auth_continue(self, line: bytes) -> Any:
        self._mode = "command"
        if line.strip() == b"*":
            self._auth_state = None
            return R(501, "5.0.0", "Authentication cancelled")
        return self._auth_step(line.strip())

    def _auth_step(self, response: bytes) -> Any:
        assert self._auth_state is not None
        mech, got = self._auth_state
        if response == b"=":
            decoded = b""
        else:
            try:
                decoded = base64.b64decode(response, validate=True)
            except (binascii.Error, ValueError):
                self._auth_state = None
                return R(501, "5.5.2", "Invalid base64 data")
        if mech == "PLAIN":
            fields = decoded.split(b"\x00")
            if len(fields) != 3:
                self._auth_state = None
                return R(501, "5.5.2", "Malformed PLAIN response")
            authz, user, password = fields
            if authz and authz != user:
                self._auth_state = None
                return R(535, "5.7.8", "Authentication credentials invalid")
            return self._auth_verify(user, password)
        got.append(decoded.decode("utf-8", "replace"))
        if len(got) == 1:
            self._mode = "auth"
            return R(334, "", "UGFzc3dvcmQ6")
        return self._auth_verify(got[0].encode("utf-8"), decoded)

    def _auth_verify(self, user_b: bytes, password: bytes) -> Any:
        self._auth_state = None
        try:
            user = user_b.decode("utf-8")
        except UnicodeDecodeError:
            return R(535, "5.7.8", "Authentication credentials invalid")
        return self._gate(Stage.AUTH, lambda: self._auth_check(user, password),
                          command="AUTH", username=user)

    def _auth_check(self, user: str, password: bytes) -> Any:
        checker = self.factory.auth_checker
        limiter = self.factory.auth_limiter
        assert checker is not None

        def done(ok: Any) -> Any:
            if ok is not True and ok is not False and ok is not None:
                # A plugin that answers something else (a string, a count) is broken, and
                # "truthy" is no login: temporary failure, logged for the operator.
                log.error("session {session}: auth checker answered {answer!r}, not a bool",
                          session=self.session_id, answer=type(ok).__name__,
                          event="plugin_error")
                return R(454, "4.7.0", "Temporary authentication failure")
            if ok:
                self._auth_user = user
                if limiter is not None:
                    limiter.reset(self.peer_ip, user)
                log.info("session {session} authenticated as {user}", session=self.session_id,
                         user=user, peer=self.peer_ip, event="auth_success")
                return R(235, "2.7.0", "Authentication successful")
            log.info("session {session} authentication failed for {user}",
                     session=self.session_id, user=user, peer=self.peer_ip, event="auth_failure")
            return self._auth_failure(user)

        def check(locked: bool) -> Any:
            if locked:
                return self._auth_locked()
            d: defer.Deferred[bool] = defer.maybeDeferred(checker.check, user, password)
            # A check that never answers would hold this session and its in-flight counts
            # (which lock out later logins from the same IP) for ever.
            d.addTimeout(AUTH_CHECK_TIMEOUT, self.clock)

            def timed_out(f: Failure) -> SmtpReply:
                f.trap(defer.TimeoutError)  # type: ignore[no-untyped-call]
                log.warn("session {session}: auth checker gave no answer in {seconds:.0f}s",
                         session=self.session_id, seconds=AUTH_CHECK_TIMEOUT,
                         event="plugin_error")
                return R(454, "4.7.0", "Temporary authentication failure")

            return d.addCallbacks(done, timed_out)

        if limiter is None:
            return check(False)
        # At most max_failures checks at a time per IP and per user (this process): with
        # those in flight the lockout may be a moment away, so later ones are told to wait.
        cap = int(getattr(limiter, "max_failures", 0) or 0)
        subjects = [f"ip:{self.peer_ip}", f"user:{user.strip().lower()}"]
        in_flight = self.factory.auth_in_flight
        if cap > 0 and any(in_flight.get(s, 0) >= cap for s in subjects):
            return self._auth_locked()
        for s in subjects:
            in_flight[s] = in_flight.get(s, 0) + 1
        self._auth_slots = subjects

        def finished(result: Any) -> Any:
            self._release_auth_slots()
            return result

        locked: defer.Deferred[bool] = limiter.is_locked(self.peer_ip, user)
        return locked.addCallback(check).addBoth(finished)

    def _release_auth_slots(self) -> None:
        """Once per check: when it answers, or when the session ends first (a check that
        never answers must not lock later logins from the same IP out)."""
        subjects, self._auth_slots = self._auth_slots, []
        in_flight = self.factory.auth_in_flight
        for s in subjects:
            left = in_flight.get(s, 1) - 1
            if left > 0:
                in_flight[s] = left
            else:
                in_flight.pop(s, None)

    def _auth_locked(self) -> SmtpReply:
        self._auth_refusals += 1
        log.info("session {session}: AUTH locked out for {peer}", session=self.session_id,
                 peer=self.peer_ip, event="auth_locked")
        if self._auth_refusals >= 3:  # a client that keeps trying while locked is cut off
            return R(421, "4.7.0", "Too many authentication failures, closing connection")
        return AUTH_LOCKED

    def _auth_failure(self, user: str) -> Any:
        """Answer a failed AUTH after a delay (slows guessing); lock out per the limiter."""
        limiter = self.factory.auth_limiter
        recorded: defer.Deferred[bool] = (limiter.record_failure(self.peer_ip, user)
                                          if limiter is not None else defer.succeed(False))

        def answer(locked_now: bool) -> Any:
            reply = AUTH_LOCKED if locked_now else R(535, "5.7.8",
                                                     "Authentication credentials invalid")
            delay = self.factory.auth_failure_delay
            if delay <= 0:
                return reply
            return task.deferLater(self.clock, delay, lambda: reply)

        return recorded.addCallback(answer)

    _verbs: dict[str, Callable[..., Any]] = {
        "EHLO": do_EHLO, "HELO": do_HELO, "MAIL": do_MAIL, "RCPT": do_RCPT, "DATA": do_DATA,
        "BDAT": do_BDAT, "RSET": do_RSET, "NOOP": do_NOOP, "QUIT": do_QUIT, "HELP": do_HELP,
        "STARTTLS": do_STARTTLS, "AUTH": do_AUTH, "VRFY": do_VRFY, "EXPN": do_EXPN,
        "ETRN": do_ETRN,
    }
