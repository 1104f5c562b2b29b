"""Our outbound SMTP client: one session to one address, producing one result per recipient.

Not ``twisted.mail.smtp.ESMTPSender`` (TWISTED-NOTES "Outbound": per-chunk dot-stuffing smuggles,
cleartext AUTH, STARTTLS response injection, no timeouts, no extensions). Invariants:

* The body is streamed from the spool file by ``MessageProducer``; ``DotStuffer`` normalises every
  bare CR/LF to CRLF and dot-stuffs with state carried across chunk boundaries, so the peer sees
  exactly one end-of-data marker, ours.
* Bytes buffered after the 220 reply to STARTTLS abort the session (response injection); the
  session restarts with EHLO after the handshake and forgets everything learnt before it.
* AUTH is only ever sent inside TLS. TLS required but unavailable, verification failures and
  handshake errors are transient failures with reason ``tls`` and never fall back to plaintext.
* Every reply wait is bounded by ``read_timeout``, the connect by ``connect_timeout``, and a
  stalled body transfer by ``read_timeout`` without progress.
* ``deliver_session`` never raises: connection-level failures come back as a ``SessionOutcome``
  with ``host_failure`` set (and ``try_next`` when another MX/address should be tried); once a
  transaction has begun, results are per recipient (2xx delivered, 4xx transient, 5xx permanent).
"""

from __future__ import annotations

import base64
import os
import re
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import IO, Any

from twisted.internet import defer, endpoints
from twisted.internet.interfaces import IDelayedCall, IPullProducer, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kotlin_smtp_py.envelope import Recipient
from kotlin_smtp_py.outbound.tlscheck import (
    InspectingCreator,
    TlsRequirements,
    check_peer,
    hop_verdict,
)
from kotlin_smtp_py.outbound.tlspolicy import TlsPolicy
from kotlin_smtp_py.status import DeliveryStatus, FailureKind, Reason

log = Logger()

MAX_REPLY_BYTES = 65536
_REPLY_CODE = re.compile(rb"[2-5][0-9][0-9]")
CHUNK_SIZE = 16384
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?:\s+|\Z)")
_EOL = re.compile(rb"\r\n|\r|\n")


# ------------------------------------------------------------------------------------------
# Replies and framing


@dataclass(frozen=True)
class Reply:
    """One (possibly multi-line) SMTP reply."""

    code: int
    lines: tuple[str, ...]

    @property
    def enhanced(self) -> str | None:
        m = _ENHANCED.match(self.lines[0]) if self.lines else None
        if m and m.group(1) == str(self.code)[0]:
            return f"{m.group(1)}.{m.group(2)}.{m.group(3)}"
        return None

    @property
    def text(self) -> str:
        """The reply text without enhanced codes, lines joined with a space."""
        out = []
        for line in self.lines:
            m = _ENHANCED.match(line)
            out.append(line[m.end():] if m else line)
        return " ".join(s for s in out if s).strip()

    def status(self, reason: Reason, remote_mta: str | None) -> DeliveryStatus:
        """2xx delivered, 4xx transient, anything else permanent; diagnostic for the DSN."""
        enhanced = self.enhanced
        diag = " ".join(["smtp;", str(self.code), *([enhanced] if enhanced else []), self.text])
        base = DeliveryStatus.from_reply(self.code, self.text, reason, remote_mta, enhanced)
        return replace(base, diagnostic=diag.strip()[:900])


class SessionError(Exception):
    """The peer went away, stalled or spoke nonsense."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind  # "lost" | "timeout" | "protocol"
        self.detail = detail


class ReplyReader(Protocol):
    """Frames SMTP replies from the byte stream; at most one reader waits at a time."""

    def __init__(self, clock: IReactorTime, read_timeout: float) -> None:
        self._clock = clock
        self.read_timeout = read_timeout
        self._buf = b""
        self._partial: list[str] = []
        self._partial_bytes = 0  # raw bytes of the reply being read (lines count, not texts)
        self._partial_code = b""
        self._replies: deque[Reply] = deque()
        self._waiter: defer.Deferred[Reply] | None = None
        self._timer: IDelayedCall | None = None
        self._error: SessionError | None = None
        self.saw_421 = False  # the peer announced it is closing: never reuse this connection
        self.closed = defer.Deferred[None]()

    # -- transport side
    def connectionMade(self) -> None:
        # Commands and the final "." are small writes: without TCP_NODELAY, Nagle plus the
        # peer's delayed ACK add ~40 ms per message.
        set_nodelay = getattr(self.transport, "setTcpNoDelay", None)
        if set_nodelay is not None:
            set_nodelay(True)

    def dataReceived(self, data: bytes) -> None:
        if self._error is not None:
            return
        self._buf += data
        while b"\n" in self._buf:
            raw, _, self._buf = self._buf.partition(b"\n")
            if not self._line(raw.rstrip(b"\r")):
                return
        if len(self._buf) > MAX_REPLY_BYTES:
            self._fail(SessionError("protocol", "reply line too long"))
        self._deliver()

    def _line(self, raw: bytes) -> bool:
        # RFC 5321 §4.2: three ASCII digits (str.isdigit() would take "²" or "٢"), then " "
        # (last line) or "-"; every line of a reply carries the same code (§4.2.1).
        code = raw[:3]
        if not _REPLY_CODE.fullmatch(code) or (len(raw) > 3 and raw[3:4] not in (b" ", b"-")):
            text = raw.decode("utf-8", "replace")
            self._fail(SessionError("protocol", f"malformed reply line {text[:80]!r}"))
            return False
        if self._partial and code != self._partial_code:
            self._fail(SessionError("protocol", "reply lines with different codes "
                                                f"({self._partial_code.decode()}, "
                                                f"{code.decode()})"))
            return False
        self._partial_code = code
        self._partial.append(raw[4:].decode("utf-8", "replace"))
        self._partial_bytes += len(raw) + 2
        if self._partial_bytes > MAX_REPLY_BYTES:  # a running total: linear in the reply
            self._fail(SessionError("protocol", "reply too long"))
            return False
        if len(raw) == 3 or raw[3:4] == b" ":
            if code == b"421":
                self.saw_421 = True
            self._replies.append(Reply(int(code), tuple(self._partial)))
            self._partial = []
            self._partial_bytes = 0
        return True

    def connectionLost(self, reason: Failure | None = None) -> None:  # type: ignore[override]
        if self._error is None:
            self._error = SessionError("lost", _describe(reason) if reason else "closed")
        self._cancel_timer()
        self._deliver()
        if not self.closed.called:
            self.closed.callback(None)

    def _fail(self, err: SessionError) -> None:
        self._error = err
        self._buf = b""
        if self.transport is not None:
            self.transport.abortConnection()  # type: ignore[attr-defined]
        self._deliver()

    def _deliver(self) -> None:
        waiter = self._waiter
        if waiter is None:
            return
        if self._replies:
            self._waiter = None
            self._cancel_timer()
            waiter.callback(self._replies.popleft())
        elif self._error is not None:
            self._waiter = None
            self._cancel_timer()
            waiter.errback(self._error)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def _timed_out(self) -> None:
        self._timer = None
        self._fail(SessionError("timeout", f"no reply within {self.read_timeout:g}s"))

    # -- session side
    async def reply(self, timeout: float | None = None) -> Reply:
        """The next reply, or SessionError."""
        assert self._waiter is None, "one reader at a time"
        d = defer.Deferred[Reply]()
        self._waiter = d
        self._timer = self._clock.callLater(timeout or self.read_timeout, self._timed_out)
        self._deliver()
        return await d

    def send(self, *lines: str) -> None:
        if self._error is not None:
            raise self._error
        assert self.transport is not None
        self.transport.write(b"".join(line.encode("utf-8") + b"\r\n" for line in lines))

    def has_buffered_input(self) -> bool:
        return bool(self._buf or self._partial or self._replies)

    def failed(self) -> SessionError | None:
        return self._error


def _describe(reason: Failure) -> str:
    value = reason.value
    text = str(value) or type(value).__name__
    return text[:300]


# ------------------------------------------------------------------------------------------
# The body


class DotStuffer:
    """CRLF normalisation and dot-stuffing over a stream of chunks (RFC 5321 §4.5.2).

    State carried between chunks: whether output is at the start of a line, and a trailing CR
    whose meaning (CRLF or bare CR) depends on the next chunk.
    """

    def __init__(self) -> None:
        self.at_line_start = True
        self._pending_cr = False

    def feed(self, chunk: bytes) -> bytes:
        data = (b"\r" if self._pending_cr else b"") + chunk
        self._pending_cr = data.endswith(b"\r")
        if self._pending_cr:
            data = data[:-1]
        if not data:
            return b""
        data = _EOL.sub(b"\r\n", data)
        if self.at_line_start and data.startswith(b"."):
            data = b"." + data
        data = data.replace(b"\r\n.", b"\r\n..")
        self.at_line_start = data.endswith(b"\r\n")
        return data

    def finish(self) -> bytes:
        """Whatever is left plus the end-of-data marker."""
        out = b""
        if self._pending_cr:
            out, self._pending_cr, self.at_line_start = b"\r\n", False, True
        if not self.at_line_start:
            out += b"\r\n"
        return out + b".\r\n"


@implementer(IPullProducer)
class MessageProducer:
    """Streams a spool file into the transport as dot-stuffed DATA, ending with ``.``.

    ``done`` fires when the terminator is written, or fails with SessionError when the transfer
    stalls for ``stall_timeout`` seconds or the connection goes away.
    """

    def __init__(self, fh: IO[bytes], transport: Any, clock: IReactorTime,
                 stall_timeout: float, chunk_size: int = CHUNK_SIZE) -> None:
        self._fh = fh
        self._transport = transport
        self._clock = clock
        self._stall_timeout = stall_timeout
        self._chunk_size = chunk_size
        self._stuffer = DotStuffer()
        self._timer: IDelayedCall | None = None
        self.done = defer.Deferred[None]()

    def start(self) -> None:
        self._arm()
        self._transport.registerProducer(self, False)

    def _arm(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.reset(self._stall_timeout)
        else:
            self._timer = self._clock.callLater(self._stall_timeout, self._stalled)

    def _stalled(self) -> None:
        self._timer = None
        self._finish(SessionError("timeout", f"body transfer stalled for {self._stall_timeout:g}s"))
        self._transport.abortConnection()

    def resumeProducing(self) -> None:
        if self.done.called:
            return
        self._arm()
        while True:
            chunk = self._fh.read(self._chunk_size)  # small local read, by design
            if not chunk:
                self._transport.write(self._stuffer.finish())
                self._transport.unregisterProducer()
                self._finish(None)
                return
            out = self._stuffer.feed(chunk)
            if out:
                self._transport.write(out)
                return

    def stopProducing(self) -> None:
        self._finish(SessionError("lost", "connection closed during DATA"))

    def _finish(self, err: SessionError | None) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self.done.called:
            return
        if err is None:
            self.done.callback(None)
        else:
            self.done.errback(err)


# ------------------------------------------------------------------------------------------
# The session


@dataclass(frozen=True)
class OutboundMessage:
    """What one SMTP transaction needs to know about the queued message."""

    sender: str
    recipients: tuple[Recipient, ...]
    path: str
    size: int
    eight_bit: bool = False
    ret: str | None = None
    envid: str | None = None
    smtputf8: bool = False  # received with SMTPUTF8: passed on where the next hop offers it
    utf8_headers: bool = False  # ... and its header fields are UTF-8 (RFC 6532)


@dataclass(frozen=True)
class Target:
    """Where to connect: ``name`` (TLS identity, logs, Remote-MTA), ``address``, ``port``."""

    name: str
    address: str
    port: int


@dataclass(frozen=True)
class Credentials:
    username: str
    password: str = field(repr=False)


@dataclass(frozen=True)
class SessionOutcome:
    """Per-recipient results, or (``host_failure``) a failure that hit the session as a whole."""

    results: tuple[tuple[Recipient, DeliveryStatus], ...] = ()
    host_failure: DeliveryStatus | None = None
    try_next: bool = False
    # TLS observations for TLS-RPT: whether TLS was up, and an RFC 8460 result type on failure.
    tls_active: bool = False
    tls_result: str | None = None
    tls_detail: str = ""
    connected: bool = False
    local_address: str = ""
    reused: bool = False  # ran on a cached session (TLS was negotiated by an earlier one)

    def per_recipient(self, recipients: Sequence[Recipient]) -> list[tuple[Recipient,
                                                                         DeliveryStatus]]:
        if self.host_failure is not None:
            return [(r, self.host_failure) for r in recipients]
        return list(self.results)


class _StaleSession(Exception):
    """A cached session did not survive its reset; nothing of the message was delivered."""


class _HostFailure(Exception):
    def __init__(self, status: DeliveryStatus, try_next: bool = True) -> None:
        super().__init__(status.text)
        self.status = status
        self.try_next = try_next


def xtext(value: str) -> str:
    """RFC 3461 xtext encoding (for ENVID and ORCPT)."""
    out = []
    for byte in value.encode("utf-8"):
        ch = chr(byte)
        out.append(ch if 33 <= byte <= 126 and ch not in "+=" else f"+{byte:02X}")
    return "".join(out)


def _needs_utf8(address: str) -> bool:
    return not address.isascii()


class ClientSession:
    """Drives one SMTP session on a connected ``ReplyReader``."""

    def __init__(self, reader: ReplyReader, target: Target, helo_name: str, tls: TlsPolicy,
                 message: OutboundMessage, credentials: Credentials | None,
                 clock: IReactorTime, requirements: TlsRequirements | None = None) -> None:
        self.requirements = requirements
        self.tls_result: str | None = None
        self.tls_detail = ""
        self.local_address = ""
        try:
            if reader.transport is not None:
                self.local_address = str(getattr(reader.transport.getHost(), "host", ""))
        except Exception:  # a transport that is already gone: nothing to report
            pass
        self.reader = reader
        self.target = target
        self.helo_name = helo_name
        self.tls = tls
        self.message = message
        self.credentials = credentials
        self.clock = clock
        self.extensions: dict[str, str] = {}
        self.tls_active = False
        self.phase = "greeting"
        self.decided: dict[Recipient, DeliveryStatus] = {}
        self.transactions = 0  # completed on this connection (cached sessions carry several)

    # -- helpers
    def _fail(self, reason: Reason, text: str, enhanced: str, try_next: bool = True,
              permanent: bool = False, diagnostic: str | None = None) -> _HostFailure:
        if permanent:
            status = DeliveryStatus.permanent_failure(
                reason, text, enhanced, 550, self.target.name, diagnostic)
        else:
            status = DeliveryStatus.transient(reason, text, enhanced, 451, self.target.name,
                                              diagnostic)
        return _HostFailure(status, try_next)

    def _policy_fail(self, result_type: str, text: str, enhanced: str = "4.7.5") -> _HostFailure:
        """A recipient-domain TLS policy was not met (RFC 8689 failures bounce with 5.7.30)."""
        self.tls_result, self.tls_detail = result_type, text
        req = self.requirements
        if req is not None and req.requiretls:
            return self._fail(Reason.TLS, f"REQUIRETLS: {text}", "5.7.30", permanent=True,
                              diagnostic=f"x-tls; REQUIRETLS: {text}"[:300])
        return self._fail(Reason.TLS, text, enhanced, diagnostic=f"x-tls; {text}"[:300])

    def _outcome(self, **kwargs: Any) -> SessionOutcome:
        return SessionOutcome(tls_active=self.tls_active, tls_result=self.tls_result,
                              tls_detail=self.tls_detail, connected=True,
                              local_address=self.local_address, **kwargs)

    def _reply_failure(self, reply: Reply, reason: Reason, try_next: bool) -> _HostFailure:
        return _HostFailure(reply.status(reason, self.target.name), try_next)

    async def command(self, line: str, timeout: float | None = None) -> Reply:
        """One command in lock step. A reply already waiting before it is sent was never
        asked for: reading on would pair every later reply with the wrong command (a RCPT's
        250 taken as DATA's answer), so the session ends as a protocol error."""
        if self.reader.has_buffered_input():
            raise SessionError("protocol", f"unsolicited reply before {line.split(' ')[0]}")
        self.reader.send(line)
        return await self.reader.reply(timeout)

    # -- phases
    async def run(self, keep: Callable[[ClientSession], bool] | None = None) -> SessionOutcome:
        """Greeting to end of transaction; then QUIT, or hand the open session to ``keep``
        (a connection cache) when the transaction ended cleanly and ``keep`` takes it."""
        return await self._guarded(self._open_and_transact, keep)

    async def reuse(self, message: OutboundMessage,
                    keep: Callable[[ClientSession], bool] | None = None
                    ) -> SessionOutcome | None:
        """Run another transaction on this (cached, idle) session. None when the connection
        turned out to be unusable (closed by the peer, RSET refused) before anything of
        ``message`` could be delivered: the caller then simply opens a new one.

        With PIPELINING the RSET travels in the same write as MAIL, RCPT and DATA; if it is
        not answered 250 the connection is dropped before any message byte is sent, so the
        peer never completes that transaction."""
        self.message = message
        self.decided = {}
        self.phase = "rset"
        if self.reader.failed() is not None or self.reader.has_buffered_input():
            self._abort()
            return None
        try:
            return await self._guarded(lambda: self._transaction(prefix=("RSET",)), keep)
        except _StaleSession:
            self._abort()
            return None

    async def _open_and_transact(self) -> list[tuple[Recipient, DeliveryStatus]]:
        greeting = await self.reader.reply()
        if greeting.code != 220:
            raise self._reply_failure(greeting, Reason.CONNECT, try_next=True)
        await self._hello()
        await self._starttls()
        await self._auth()
        return await self._transaction()

    async def _guarded(self, body: Callable[[], Any],
                       keep: Callable[[ClientSession], bool] | None) -> SessionOutcome:
        try:
            results = await body()
        except _HostFailure as exc:
            await self._quit()
            return self._outcome(host_failure=exc.status, try_next=exc.try_next)
        except SessionError as exc:
            self._abort()
            status = self._session_error_status(exc)
            if self.phase == "tls" and self.tls_result is None:
                self.tls_result, self.tls_detail = "validation-failure", exc.detail
            if self.phase in ("mail", "data", "dot"):
                # The transaction had begun: keep refusals already known, defer the rest.
                return self._outcome(results=tuple(
                    (r, self.decided[r] if r in self.decided and not self.decided[r].ok
                     else status) for r in self.message.recipients))
            return self._outcome(host_failure=status, try_next=True)
        self.transactions += 1
        outcome = self._outcome(results=tuple(results))
        if not (keep is not None and self.reusable() and keep(self)):
            await self._quit()
        return outcome

    def reusable(self) -> bool:
        """Idle, healthy, and the peer never said it is closing (421) on this session."""
        transport = self.reader.transport
        return (self.reader.failed() is None and not self.reader.has_buffered_input()
                and transport is not None and getattr(transport, "connected", True)
                and not self.reader.saw_421)

    def _session_error_status(self, exc: SessionError) -> DeliveryStatus:
        if self.phase == "tls":
            return DeliveryStatus.transient(
                Reason.TLS, f"TLS negotiation with {self.target.name} failed: {exc.detail}",
                "4.7.5", 451, self.target.name, f"x-tls; {exc.detail}")
        if exc.kind == "timeout":
            reason, enhanced = Reason.TIMEOUT, "4.4.2"
        elif exc.kind == "protocol":
            reason, enhanced = Reason.PROTOCOL, "4.5.0"
        else:
            reason, enhanced = Reason.CONNECT, "4.4.2"
        return DeliveryStatus.transient(
            reason, f"{self.target.name} ({self.phase}): {exc.detail}", enhanced, 451,
            self.target.name, f"x-session; {exc.detail}")

    async def _hello(self) -> None:
        self.phase = "ehlo"
        reply = await self.command(f"EHLO {self.helo_name}")
        if reply.code == 250:
            self.extensions = _parse_ehlo(reply)
            return
        if 400 <= reply.code < 500 or reply.code == 421:
            raise self._reply_failure(reply, Reason.PROTOCOL, try_next=True)
        reply = await self.command(f"HELO {self.helo_name}")
        if reply.code != 250:
            raise self._reply_failure(reply, Reason.PROTOCOL, try_next=True)
        self.extensions = {}

    async def _starttls(self) -> None:
        offered = "STARTTLS" in self.extensions
        req = self.requirements
        if req is not None and (req.require_tls or req.requiretls) \
                and not (self.tls.start_tls_enabled and offered):
            raise self._policy_fail("starttls-not-supported",
                                    f"TLS is required by policy but {self.target.name} does not "
                                    "offer STARTTLS" if not offered else
                                    "TLS is required by policy but STARTTLS is disabled",
                                    "4.7.4")
        if not (self.tls.start_tls_enabled and offered):
            if not offered:
                self.tls_result = "starttls-not-supported"
                self.tls_detail = f"{self.target.name} does not offer STARTTLS"
            if self.tls.start_tls_required:
                why = "STARTTLS is disabled" if offered else "STARTTLS was not offered"
                raise self._fail(Reason.TLS, f"TLS is required but {why} by {self.target.name}",
                                 "4.7.4")
            return
        self.phase = "starttls"
        reply = await self.command("STARTTLS")
        if reply.code != 220:
            if req is not None and (req.require_tls or req.requiretls):
                raise self._policy_fail("starttls-not-supported", f"TLS is required by policy "
                                        f"but {self.target.name} answered STARTTLS with "
                                        f"{reply.code} {reply.text}"[:300])
            self.tls_result = "starttls-not-supported"
            self.tls_detail = f"STARTTLS answered {reply.code}"
            if self.tls.start_tls_required:
                raise self._fail(Reason.TLS, f"TLS is required but {self.target.name} answered "
                                 f"STARTTLS with {reply.code} {reply.text}"[:300], "4.7.5")
            log.info("STARTTLS refused by {remote}: {code}; continuing in plaintext",
                     remote=self.target.name, code=reply.code)
            self.phase = "ehlo"
            return
        if self.reader.has_buffered_input():
            self._abort()
            raise self._fail(Reason.TLS, f"{self.target.name} sent data after its 220 reply to "
                             "STARTTLS (response injection)", "4.7.5")
        self.phase = "tls"
        assert self.reader.transport is not None
        inspecting = None
        if req is not None and req.inspect:
            inspecting = InspectingCreator(self.target.name, req.ca_file)
            creator: Any = inspecting
        else:
            creator = self.tls.client_creator(self.target.name)
        self.reader.transport.startTLS(creator)  # type: ignore[attr-defined]
        self.tls_active = True
        reply = await self.command(f"EHLO {self.helo_name}")
        if reply.code != 250:
            raise self._reply_failure(reply, Reason.PROTOCOL, try_next=True)
        self.extensions = _parse_ehlo(reply)
        self.phase = "ehlo"
        if req is not None and inspecting is not None:
            # The handshake is complete (a reply arrived over TLS); nothing sent yet but EHLO.
            verdict = check_peer(req, inspecting, self.target.name)
            if verdict.result_type is not None:
                if req.enforce or req.requiretls:
                    raise self._policy_fail(verdict.result_type,
                                            f"{self.target.name}: {verdict.detail}")
                self.tls_result, self.tls_detail = verdict.result_type, verdict.detail
                log.info("TLS policy failure with {remote} (not enforced): {kind} {detail}",
                         remote=self.target.name, kind=verdict.result_type,
                         detail=verdict.detail)
            if not (req.enforce or req.requiretls or req.dane):
                # Observing (MTA-STS testing, TLS-RPT) accepted any certificate in the
                # handshake; the hop's own settings still decide, as without a policy.
                own = hop_verdict(self.tls, inspecting, self.target.name)
                if own.result_type is not None:
                    self.tls_result = self.tls_result or own.result_type
                    self.tls_detail = self.tls_detail or own.detail
                    raise self._fail(Reason.TLS, f"TLS with {self.target.name} failed: "
                                     f"{own.detail}"[:300], "4.7.5",
                                     diagnostic=f"x-tls; {own.detail}"[:300])
        if req is not None and req.requiretls and "REQUIRETLS" not in self.extensions:
            raise self._policy_fail("validation-failure",
                                    f"{self.target.name} does not advertise REQUIRETLS")

    async def _auth(self) -> None:
        if self.credentials is None:
            return
        if not self.tls_active:
            raise self._fail(Reason.AUTH, f"refusing to send credentials to {self.target.name} "
                             "without TLS", "4.7.4")
        mechanisms = self.extensions.get("AUTH", "").upper().split()
        if not mechanisms:
            log.warn("{remote} does not offer AUTH; sending without authentication",
                     remote=self.target.name)
            return
        self.phase = "auth"
        user = self.credentials.username.encode("utf-8")
        password = self.credentials.password.encode("utf-8")
        if "PLAIN" in mechanisms:
            token = base64.b64encode(b"\0" + user + b"\0" + password).decode("ascii")
            reply = await self.command(f"AUTH PLAIN {token}")
        elif "LOGIN" in mechanisms:
            reply = await self.command("AUTH LOGIN")
            if reply.code == 334:
                reply = await self.command(base64.b64encode(user).decode("ascii"))
            if reply.code == 334:
                reply = await self.command(base64.b64encode(password).decode("ascii"))
        else:
            raise self._fail(Reason.AUTH, f"{self.target.name} offers no usable AUTH mechanism "
                             f"({' '.join(mechanisms)})", "4.7.0")
        if reply.code != 235:
            status = reply.status(Reason.AUTH, self.target.name)
            # Authentication problems are deferred, never bounced (a config fix retries them).
            raise _HostFailure(replace(status, kind=FailureKind.TRANSIENT,
                                       enhanced=("4" + status.enhanced[1:])), try_next=True)
        log.info("authenticated to {remote} as {user}", remote=self.target.name,
                 user=self.credentials.username)
        self.phase = "ehlo"

    def _mail_params(self, utf8: bool) -> list[str]:
        ext, msg, params = self.extensions, self.message, []
        if "SIZE" in ext:
            params.append(f"SIZE={msg.size}")
        if msg.eight_bit and "8BITMIME" in ext:
            params.append("BODY=8BITMIME")
        if utf8:
            params.append("SMTPUTF8")
        if self.requirements is not None and self.requirements.requiretls:
            params.append("REQUIRETLS")
        if "DSN" in ext:
            if msg.ret:
                params.append(f"RET={msg.ret.upper()}")
            if msg.envid:
                params.append(f"ENVID={xtext(msg.envid)}")
        return params

    def _rcpt_params(self, rcpt: Recipient) -> list[str]:
        if "DSN" not in self.extensions:
            return []
        params = []
        if rcpt.notify:
            params.append("NOTIFY=" + ",".join(n.upper() for n in rcpt.notify))
        if rcpt.orcpt:
            kind, _, addr = rcpt.orcpt.partition(";")
            if addr:
                params.append(f"ORCPT={kind.strip()};{xtext(addr.strip())}")
        return params

    def _precheck(self) -> tuple[dict[Recipient, DeliveryStatus], bool]:
        """Failures decided before MAIL (SIZE, SMTPUTF8) and whether SMTPUTF8 is used."""
        msg, ext = self.message, self.extensions
        limit = ext.get("SIZE", "").strip()
        if limit.isdigit() and int(limit) > 0 and msg.size > int(limit):
            raise self._fail(Reason.MESSAGE, f"message size {msg.size} exceeds the limit of "
                             f"{self.target.name} ({limit})", "5.3.4", try_next=False,
                             permanent=True)
        if msg.eight_bit and "8BITMIME" not in ext:
            # RFC 6152 §3: 8-bit content must not go to a server without 8BITMIME; we do
            # not downgrade (it would break signatures), so it is returned to the sender.
            raise self._fail(Reason.MESSAGE, f"message has 8-bit content but "
                             f"{self.target.name} does not support 8BITMIME", "5.6.3",
                             try_next=False, permanent=True)
        # RFC 6531 §3.4: UTF-8 in the envelope or in header fields needs a server with
        # SMTPUTF8 (no downgrade here, as Postfix); a message received with SMTPUTF8 keeps
        # the parameter wherever it is offered.
        need = _needs_utf8(msg.sender) or msg.utf8_headers or \
            any(_needs_utf8(r.address) for r in msg.recipients)
        if "SMTPUTF8" in ext:
            return {}, need or msg.smtputf8
        if not need:
            return {}, False
        text = f"{self.target.name} does not support SMTPUTF8"
        status = DeliveryStatus.permanent_failure(Reason.MESSAGE, text, "5.6.7", 553,
                                                  self.target.name, f"x-smtp; {text}")
        if _needs_utf8(msg.sender) or msg.utf8_headers:
            raise _HostFailure(status, try_next=False)
        return {r: status for r in msg.recipients if _needs_utf8(r.address)}, False

    async def _prefix_replies(self, prefix: tuple[str, ...]) -> None:
        """Replies to commands that only reset a reused session: anything but 250 (or a
        dead connection) means the session is stale, not that the message failed."""
        for _ in prefix:
            try:
                reply = await self.reader.reply(min(self.reader.read_timeout, 10.0))
            except SessionError as exc:
                raise _StaleSession() from exc
            if reply.code != 250:
                raise _StaleSession()

    async def _transaction(self, prefix: tuple[str, ...] = ()
                           ) -> list[tuple[Recipient, DeliveryStatus]]:
        decided, utf8 = self._precheck()
        self.decided = decided
        rcpts = [r for r in self.message.recipients if r not in decided]
        self.phase = "mail"
        mail = " ".join([f"MAIL FROM:<{self.message.sender}>", *self._mail_params(utf8)])
        rcpt_lines = [" ".join([f"RCPT TO:<{r.address}>", *self._rcpt_params(r)]) for r in rcpts]
        data_reply: Reply | None = None
        if "PIPELINING" in self.extensions:
            # RFC 2920: MAIL, every RCPT and DATA in one write, one round trip for them all.
            pipe_data = bool(rcpt_lines)
            try:
                self.reader.send(*prefix, mail, *rcpt_lines, *(["DATA"] if pipe_data else []))
            except SessionError as exc:
                if prefix:
                    raise _StaleSession() from exc
                raise
            await self._prefix_replies(prefix)
            mail_reply = await self.reader.reply()
            rcpt_replies = [await self.reader.reply() for _ in rcpt_lines]
            if pipe_data:
                self.phase = "data"
                data_reply = await self.reader.reply()
        else:
            for line in prefix:
                try:
                    self.reader.send(line)
                except SessionError as exc:
                    raise _StaleSession() from exc
                await self._prefix_replies((line,))
            mail_reply = await self.command(mail)
            rcpt_replies = []
            if mail_reply.code == 250:
                rcpt_replies = [await self.command(line) for line in rcpt_lines]
        if mail_reply.code != 250:
            await self._refuse_data(data_reply)
            status = mail_reply.status(Reason.POLICY, self.target.name)
            return self._ordered(decided, {r: status for r in rcpts})
        for r, reply in zip(rcpts, rcpt_replies, strict=True):
            decided[r] = _rcpt_status(reply, self.target.name)
        accepted = [r for r in rcpts if decided[r].ok]
        if accepted:
            final = await self._data(data_reply)
            for r in accepted:
                decided[r] = final
        else:
            await self._refuse_data(data_reply)
        return self._ordered(decided, {})

    async def _refuse_data(self, data_reply: Reply | None) -> None:
        """A pipelined DATA that a peer accepted although no recipient was: end it empty
        (RFC 2920 §3.1); its reply is read and ignored."""
        if data_reply is not None and data_reply.code == 354:
            self.phase = "dot"
            self.reader.send(".")
            await self.reader.reply()

    def _ordered(self, decided: dict[Recipient, DeliveryStatus],
                 extra: dict[Recipient, DeliveryStatus]) -> list[tuple[Recipient,
                                                                     DeliveryStatus]]:
        merged = {**decided, **extra}
        return [(r, merged[r]) for r in self.message.recipients]

    async def _data(self, reply: Reply | None = None) -> DeliveryStatus:
        """DATA (unless it went out pipelined and ``reply`` is its answer), body, final dot."""
        self.phase = "data"
        if reply is None:
            reply = await self.command("DATA")
        if reply.code != 354:
            if reply.code >= 400:  # a refusal of the message
                return reply.status(Reason.MESSAGE, self.target.name)
            # 250 (or any other positive reply) to DATA: not a go-ahead, and not a delivery
            # either (no byte of the message was sent); the peer is confused, drop it.
            raise SessionError("protocol", f"reply {reply.code} to DATA instead of 354")
        with open(self.message.path, "rb") as fh:
            producer = MessageProducer(fh, self.reader.transport, self.clock,
                                       self.reader.read_timeout)
            producer.start()
            await producer.done
        self.phase = "dot"
        final = await self.reader.reply()
        status = final.status(Reason.MESSAGE, self.target.name)
        if status.ok:
            # RFC 3461 §5.2.2: a DSN-capable next hop got NOTIFY/ORCPT and reports success
            # itself; past one without DSN, a success notice can only say "relayed".
            status = replace(status, text=f"delivered to {self.target.name}: {final.text}"[:500],
                             success_action="" if "DSN" in self.extensions else "relayed")
        return status

    async def _quit(self) -> None:
        if self.reader.failed() is not None:
            self._abort()
            return
        self.phase = "quit"
        try:
            await self.command("QUIT", timeout=min(self.reader.read_timeout, 10.0))
        except SessionError:
            pass
        self._abort()

    def _abort(self) -> None:
        transport = self.reader.transport
        if transport is not None:
            transport.abortConnection()  # type: ignore[attr-defined]


def _rcpt_status(reply: Reply, remote_mta: str | None) -> DeliveryStatus:
    status = reply.status(Reason.RECIPIENT, remote_mta)
    if reply.code == 552:
        # RFC 5321 §4.5.3.1.10: 552 to RCPT (too many recipients, storage) is to be taken as
        # the temporary failure it was meant to be (452), as in RFC 821 days.
        status = replace(status, kind=FailureKind.TRANSIENT, enhanced="4" + status.enhanced[1:])
    return status


def _parse_ehlo(reply: Reply) -> dict[str, str]:
    ext: dict[str, str] = {}
    for line in reply.lines[1:]:
        keyword, _, params = line.strip().partition(" ")
        if keyword:
            ext[keyword.upper()] = params.strip()
    return ext


async def connect(reactor: Any, target: Target, timeout: float,
                  read_timeout: float) -> ReplyReader:
    """A connected ``ReplyReader`` (raises on connection failure)."""
    reader = ReplyReader(reactor, read_timeout)
    if ":" in target.address:
        endpoint: Any = endpoints.TCP6ClientEndpoint(  # type: ignore[no-untyped-call]
            reactor, target.address, target.port, timeout=timeout)
    else:
        endpoint = endpoints.TCP4ClientEndpoint(reactor, target.address, target.port,
                                                timeout=timeout)
    d: defer.Deferred[Any] = endpoints.connectProtocol(  # type: ignore[no-untyped-call]
        endpoint, reader)
    # The endpoint timeout covers the TCP handshake; guard it once more on our clock.
    d.addTimeout(timeout + 1.0, reactor)
    await d
    return reader


class SessionCache:
    """Idle outbound sessions kept open after a clean transaction, for the next message to the
    same target under the same TLS policy, requirements and credentials (like Postfix's
    connection cache): the next delivery costs RSET + MAIL/RCPT/DATA instead of a TCP (and TLS)
    handshake, greeting, EHLO and QUIT. A session idles at most ``idle_seconds`` and carries at
    most ``max_uses`` transactions; a dead one is noticed at RSET and replaced transparently.
    """

    def __init__(self, clock: IReactorTime, idle_seconds: float = 2.0, max_uses: int = 100,
                 max_idle: int = 1000) -> None:
        self.clock = clock
        self.idle_seconds = idle_seconds
        self.max_uses = max_uses
        self.max_idle = max_idle
        self._idle: dict[tuple[Any, ...], list[tuple[ClientSession, IDelayedCall]]] = {}
        self._count = 0
        self.reused = 0  # transactions that ran on a cached session

    @staticmethod
    def key(target: Target, helo_name: str, tls: TlsPolicy, credentials: Credentials | None,
            requirements: TlsRequirements | None) -> tuple[Any, ...]:
        creds = (credentials.username, credentials.password) if credentials else None
        return (target.name, target.address, target.port, helo_name, repr(tls), creds,
                repr(requirements))

    def take(self, key: tuple[Any, ...]) -> ClientSession | None:
        idle = self._idle.get(key)
        if not idle:
            return None
        session, timer = idle.pop()
        if not idle:
            del self._idle[key]
        self._count -= 1
        if timer.active():
            timer.cancel()
        return session

    def keeper(self, key: tuple[Any, ...]) -> Callable[[ClientSession], bool]:
        def keep(session: ClientSession) -> bool:
            if self.idle_seconds <= 0 or session.transactions >= self.max_uses \
                    or self._count >= self.max_idle:
                return False
            timer = self.clock.callLater(self.idle_seconds, self._expire, key, session)
            self._idle.setdefault(key, []).append((session, timer))
            self._count += 1
            return True

        return keep

    def _expire(self, key: tuple[Any, ...], session: ClientSession) -> None:
        idle = self._idle.get(key, [])
        for i, (s, _) in enumerate(idle):
            if s is session:
                del idle[i]
                self._count -= 1
                break
        if not idle:
            self._idle.pop(key, None)
        self._close(session)

    @staticmethod
    def _close(session: ClientSession) -> None:
        try:
            session.reader.send("QUIT")
            transport = session.reader.transport
            if transport is not None:
                transport.loseConnection()
        except SessionError:
            session._abort()

    def close_all(self) -> None:
        """Shutdown: QUIT every idle session."""
        idle, self._idle, self._count = self._idle, {}, 0
        for sessions in idle.values():
            for session, timer in sessions:
                if timer.active():
                    timer.cancel()
                self._close(session)


def _crashed(session: ClientSession, exc: Exception) -> SessionOutcome:
    """A bug inside a session must not lose the message: log it, drop the connection, defer."""
    log.failure("outbound session to {remote} crashed", remote=session.target.name)
    session._abort()
    return SessionOutcome(host_failure=DeliveryStatus.transient(
        Reason.OTHER, f"internal error: {exc!r}"[:300], "4.3.0", 451, session.target.name))


async def deliver_session(reactor: Any, target: Target, helo_name: str, tls: TlsPolicy,
                          message: OutboundMessage,
                          credentials: Credentials | None = None,
                          requirements: TlsRequirements | None = None,
                          cache: SessionCache | None = None) -> SessionOutcome:
    """Run one transaction with ``target`` (on a cached session when ``cache`` has one).
    Never raises."""
    keep: Callable[[ClientSession], bool] | None = None
    if cache is not None:
        key = SessionCache.key(target, helo_name, tls, credentials, requirements)
        keep = cache.keeper(key)
        while (cached := cache.take(key)) is not None:
            try:
                reused = await cached.reuse(message, keep)
            except Exception as exc:
                return _crashed(cached, exc)
            if reused is not None:
                cache.reused += 1
                return replace(reused, reused=True)
    try:
        reader = await connect(reactor, target, tls.connect_timeout, tls.read_timeout)
    except Exception as exc:
        from twisted.internet import error as ierror

        timeout = isinstance(exc, (ierror.TimeoutError, defer.TimeoutError))
        detail = str(exc) or type(exc).__name__
        status = DeliveryStatus.transient(
            Reason.TIMEOUT if timeout else Reason.CONNECT,
            f"cannot connect to {target.name} [{target.address}]:{target.port}: {detail}",
            "4.4.1", 451, target.name, f"x-connect; {detail}"[:300])
        log.info("connect to {remote} [{address}]:{port} failed: {error}", remote=target.name,
                 address=target.address, port=target.port, error=detail)
        return SessionOutcome(host_failure=status, try_next=True)
    session = ClientSession(reader, target, helo_name, tls, message, credentials, reactor,
                            requirements)
    try:
        outcome = await session.run(keep)
    except Exception as exc:
        outcome = _crashed(session, exc)
    if outcome.host_failure is not None:
        log.info("session with {remote} [{address}]:{port} failed: {status}",
                 remote=target.name, address=target.address, port=target.port,
                 status=outcome.host_failure.text, reason=outcome.host_failure.reason.value)
    return outcome


def message_size(path: str) -> int:
    return os.stat(path).st_size
