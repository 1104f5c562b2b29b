"""The SMTP server factory: one per listener, holding the collaborators sessions use.

Sessions call back into the factory for everything that is shared (spool, policies, AUTH
checks, admission and rate limits, metrics, the scheduler trigger), so the protocol stays about
the protocol. Extension hooks (``admission``, ``check_sender``, ``auth_locked``, ``auth_failed``,
``vrfy``/``expn``/``etrn``) are plain attributes that the service wiring may replace.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from twisted.internet import defer, protocol, task
from twisted.logger import Logger

from kotlin_smtp_py.config import ListenerConfig
from kotlin_smtp_py.envelope import Address
from kotlin_smtp_py.inbound.protocol import SMTPServerProtocol
from kotlin_smtp_py.interfaces import IAuthChecker, IRecipientPolicy, ISpool
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.status import SmtpReply

log = Logger()



class SessionEvents:
    """Observer of session events (metrics, plugins); every method is optional to override."""

    def session_started(self, session: SMTPServerProtocol) -> None: ...
    def session_ended(self, session: SMTPServerProtocol) -> None: ...
    def message_accepted(self, session: SMTPServerProtocol, entry: QueueEntry) -> None: ...
    def message_rejected(self, session: SMTPServerProtocol, reply: SmtpReply) -> None: ...


class SMTPFactory(protocol.ServerFactory):
    noisy = False

    def __init__(self, *, listener: ListenerConfig, hostname: str, primary_domain: str,
                 spool: ISpool, recipient_policy: IRecipientPolicy,
                 auth_checker: IAuthChecker | None, auth_required: bool, max_size: int,
                 max_recipients: int, max_line: int, tls_context: Any = None,
                 handshake_timeout_ms: int = 30000, clock: Any = None,
                 events: list[SessionEvents] | None = None,
                 on_accepted: Callable[[QueueEntry], None] | None = None) -> None:
        from twisted.internet import reactor

        self.listener = listener
        self.hostname = hostname
        self.primary_domain = primary_domain
        self.spool = spool
        self.recipient_policy = recipient_policy
        self.auth_checker = auth_checker
        self.auth_required = auth_required
        self.max_size = max_size
        self.max_recipients = max_recipients
        self.max_line = max_line
        self.tls_context = tls_context
        self.handshake_timeout_ms = handshake_timeout_ms
        self.clock: Any = clock if clock is not None else reactor
        self.events: list[SessionEvents] = list(events or [])
        self.on_accepted = on_accepted
        self.sessions: set[SMTPServerProtocol] = set()
        # AUTH checks running now, per client IP and per user name: the limiter only learns of
        # a failure after the (slow) check, so without this N parallel sessions get N guesses.
        self.auth_in_flight: dict[str, int] = {}
        self.closing_after_transaction: set[SMTPServerProtocol] = set()
        self.shutting_down = False
        # Hooks (None = feature off).
        self.vrfy: Callable[[SMTPServerProtocol, str], Any] | None = None
        self.expn: Callable[[SMTPServerProtocol, str], Any] | None = None
        self.etrn: Callable[[SMTPServerProtocol, str], Any] | None = None
        self.admission_checks: list[Callable[[SMTPServerProtocol], SmtpReply | None]] = []
        self.sender_checks: list[
            Callable[[SMTPServerProtocol, Address | None],
                     defer.Deferred[SmtpReply | None] | None]] = []
        self.auth_limiter: Any = None  # ratelimit.IAuthFailureLimiter
        self.connection_limiter: Any = None  # ratelimit.IConnectionLimiter
        self.message_limiter: Any = None  # ratelimit.IMessageRateLimiter
        self.auth_failure_delay = 0.0
        self.pregreet_delay = 0.0
        self.interceptors: Any = None  # plugins.InterceptorChain
        self._counted: set[SMTPServerProtocol] = set()

    def buildProtocol(self, addr: Any) -> SMTPServerProtocol:  # type: ignore[override]
        p = SMTPServerProtocol()
        p.factory = self
        return p

    # -- session bookkeeping -------------------------------------------------------------------

    def session_started(self, session: SMTPServerProtocol) -> None:
        self.sessions.add(session)
        for ev in self.events:
            ev.session_started(session)

    def session_ended(self, session: SMTPServerProtocol) -> None:
        self.sessions.discard(session)
        self.closing_after_transaction.discard(session)
        for ev in self.events:
            ev.session_ended(session)

    def message_accepted(self, session: SMTPServerProtocol, entry: QueueEntry) -> None:
        for ev in self.events:
            ev.message_accepted(session, entry)
        if self.on_accepted is not None:
            self.on_accepted(entry)

    def message_rejected(self, session: SMTPServerProtocol, reply: SmtpReply) -> None:
        for ev in self.events:
            ev.message_rejected(session, reply)

    # -- policy hooks --------------------------------------------------------------------------

    def pregreet_check(self, listener: ListenerConfig) -> bool:
        enabled = listener.pregreetCheck
        return bool(listener.port == 25 if enabled is None else enabled)

    def admission(self, session: SMTPServerProtocol) -> defer.Deferred[SmtpReply | None]:
        """Decides whether a new session gets its greeting (Deferred of a refusal or None).
        Plain callbacks rather than a generator: with the local limiter every step has
        already fired, and this runs once per connection."""
        if self.shutting_down:
            return defer.succeed(SmtpReply(421, "4.3.2",
                                           f"{self.hostname} Service shutting down"))
        for check in self.admission_checks:
            refusal = check(session)
            if refusal is not None:
                return defer.succeed(refusal)
        if self.connection_limiter is None:
            return defer.maybeDeferred(self._pregreet_wait, session)
        d: defer.Deferred[Any] = self.connection_limiter.acquire(session.peer_ip)
        return d.addCallback(self._limited, session)

    def _limited(self, allowed: bool, session: SMTPServerProtocol) -> Any:
        if not allowed:
            log.info("too many connections from {peer}", peer=session.peer_ip,
                     event="connection_limited")
            return SmtpReply(421, "4.7.0", "Too many connections from your address")
        if session.closed:
            # The client left while a shared (Redis) limiter was answering: its disconnect
            # found nothing to release, so the slot just taken is given back here.
            self.connection_limiter.release(session.peer_ip)
            return None
        self._counted.add(session)
        return self._pregreet_wait(session)

    def _pregreet_wait(self, session: SMTPServerProtocol) -> Any:
        if self.pregreet_check(session.listener) and self.pregreet_delay > 0:
            return task.deferLater(self.clock, self.pregreet_delay, lambda: None)
        return None

    def release_connection(self, session: SMTPServerProtocol) -> None:
        if session in self._counted:
            self._counted.discard(session)
            self.connection_limiter.release(session.peer_ip)

    def check_sender(self, session: SMTPServerProtocol,
                     sender: Address | None) -> defer.Deferred[SmtpReply | None] | None:
        """None when every check answered synchronously with 'accept'."""
        pending: list[defer.Deferred[SmtpReply | None]] = []
        for check in self.sender_checks:
            result = check(session, sender)
            if result is not None:
                pending.append(result)
        if not pending:
            return None

        @defer.inlineCallbacks
        def run_all() -> Any:
            for d in pending:
                refusal = yield d
                if refusal is not None:
                    return refusal
            return None

        return run_all()  # type: ignore[no-any-return]

    def archive_owner(self, session: Any, sender: Address | None) -> str | None:
        """Whose sent/ folder gets a copy of this message (None: no copy); see sentArchive."""
        return None

    # -- shutdown ------------------------------------------------------------------------------

    def begin_shutdown(self) -> None:
        self.shutting_down = True
        for session in list(self.sessions):
            session.shutdown()

    def abort_all(self) -> None:
        """The grace period is over: every remaining session gets 421 and is closed."""
        for session in list(self.sessions):
            session.end_for_shutdown()
