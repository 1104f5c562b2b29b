"""RCPT-time acceptance: local users must exist; everything else needs relay permission."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from twisted.internet import defer
from zope.interface import implementer

from kotlin_smtp_py.envelope import Address
from kotlin_smtp_py.interfaces import IRecipientPolicy
from kotlin_smtp_py.local.directory import LocalDirectory
from kotlin_smtp_py.status import SmtpReply


@dataclass(frozen=True)
class SessionInfo:
    """What policies may know about the client session (an immutable snapshot)."""

    session_id: str
    peer_ip: str
    peer_port: int
    helo: str | None
    tls: bool
    auth_user: str | None
    listener_port: int

    @property
    def authenticated(self) -> bool:
        return self.auth_user is not None


RelayDecider = Callable[[SessionInfo, "Address | None", Address], bool]

USER_UNKNOWN = SmtpReply(550, "5.1.1", "Recipient address rejected: user unknown")
RELAY_DENIED = SmtpReply(550, "5.7.1", "Relay access denied")


@implementer(IRecipientPolicy)
class RecipientPolicy:
    """Local domains: the user must exist. Other domains: ask the relay decider (deny if none)."""

    def __init__(self, is_local_domain: Callable[[str], bool], directory: LocalDirectory,
                 relay_decider: RelayDecider | None = None) -> None:
        self.is_local_domain = is_local_domain
        self.directory = directory
        self.relay_decider = relay_decider

    def check_recipient(self, session: SessionInfo, sender: Address | None,
                        recipient: Address) -> defer.Deferred[SmtpReply | None]:
        if not recipient.literal and self.is_local_domain(recipient.domain):
            if self.directory.resolve(recipient.local) is None:
                return defer.succeed(USER_UNKNOWN)
            return defer.succeed(None)
        if self.relay_decider is not None and self.relay_decider(session, sender, recipient):
            return defer.succeed(None)
        return defer.succeed(RELAY_DENIED)
