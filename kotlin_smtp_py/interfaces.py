"""The seams between modules: small zope.interface contracts, swappable from config.

Every method that may touch disk, network or Redis returns a Deferred. Implementations are
checked with ``verifyObject`` in tests.
"""

from __future__ import annotations

from typing import Any

from zope.interface import Attribute, Interface


class BackendUnavailable(Exception):
    """A storage backend (Redis) cannot be reached right now; callers answer 4xx and retry."""


class ISpoolWriter(Interface):
    """Receives one message's bytes during DATA/BDAT; nothing is durable before ``commit``."""

    queue_id = Attribute("the queue id this message will get")

    def write(data: bytes) -> None:
        """Append raw message bytes (already dot-unstuffed, CRLF line endings)."""

    def commit(envelope: Any) -> Any:
        """Make message + envelope durable; Deferred[QueueEntry]. Fires only after fsync."""

    def abort() -> None:
        """Discard everything written; safe to call more than once and after commit."""


class IWriterHint(Interface):
    """Optional for an :class:`ISpoolWriter`: told the envelope's sender and recipients before
    the first byte (the file spool writes a large message for one local mailbox straight
    into it). The envelope given to ``commit`` is what counts."""

    def expect(sender: str, recipients: Any) -> None:
        """Called once, right after ``open_writer``; ``recipients``: Recipient values."""


class ISpool(Interface):
    """A durable queue of messages (file or Redis backend)."""

    def open_writer() -> ISpoolWriter:
        """Start receiving a new message."""

    def enqueue(envelope: Any, message: bytes) -> Any:
        """Store a complete small message (bounces/DSNs); Deferred[QueueEntry]."""

    def due(now: float, limit: int) -> Any:
        """Deferred[list[str]]: ids of entries due at ``now`` (oldest first), at most ``limit``."""

    def claim(queue_id: str) -> Any:
        """Deferred[Claim | None]: take the lease on an entry, or None when someone else holds it
        or the entry is gone."""

    def complete(claim: Any) -> Any:
        """Delete the entry (all recipients done); Deferred[None]."""

    def reschedule(claim: Any, entry: Any) -> Any:
        """Store the updated entry and release the lease; Deferred[None]."""

    def release(claim: Any) -> Any:
        """Give the lease back without changes (shutdown); Deferred[None]."""

    def pending_count() -> int:
        """Entries in the queue (cheap; may lag a scan interval for other processes' writes)."""

    def list_entries() -> Any:
        """Deferred[list[QueueSummary]]."""

    def get(queue_id: str) -> Any:
        """Deferred[QueueEntry | None]."""

    def read_message(queue_id: str) -> Any:
        """Deferred[bytes | None]: the raw message (for ``queue show``)."""

    def delete(queue_id: str) -> Any:
        """Deferred[bool]: remove an entry (operator action)."""

    def retry_now(queue_id: str | None) -> Any:
        """Deferred[int]: make one entry (or all, when None) due now; returns how many."""

    def healthy() -> Any:
        """Deferred[tuple[bool, str]]: can the spool accept mail right now, and why not."""


class IDelivery(Interface):
    """Delivers one queued message to a group of recipients that share a destination."""

    def deliver(entry: Any, message_path: str, recipients: Any) -> Any:
        """Deferred[list[tuple[Recipient, DeliveryStatus]]], one result per recipient given.
        Must not raise: every failure is a DeliveryStatus (unknown errors are transient)."""


class IRouter(Interface):
    """Chooses the delivery for each recipient (local Maildir, relay, ...)."""

    def is_local_domain(domain: str) -> bool:
        """Mail for this domain is delivered here."""

    def route(recipient: Any) -> Any:
        """tuple[str, IDelivery]: a grouping key (recipients with equal keys go together) and
        the delivery to use."""


class IRecipientPolicy(Interface):
    """Decides at RCPT time whether a recipient is accepted."""

    def check_recipient(session: Any, sender: Any, recipient: Any) -> Any:
        """Deferred[SmtpReply | None]: None accepts, a reply refuses."""


class IRelayAccessPolicy(Interface):
    """One rule in the relay-access chain; the first non-None decision wins."""

    def decide(session: Any, sender: Any, recipient: Any) -> Any:
        """True (relay allowed), False (refused) or None (no opinion)."""


class IAuthChecker(Interface):
    """Verifies SMTP AUTH credentials."""

    def check(username: str, password: bytes) -> Any:
        """Deferred[bool]; timing must not reveal whether the user exists."""

    def has_user(username: str) -> bool:
        """The user is known (used for local recipient existence)."""


class IHealthIndicator(Interface):
    """A component of /actuator/health."""

    name = Attribute("component name in the health JSON")

    def health() -> Any:
        """Deferred[tuple[bool, dict]]: UP?, details."""
