"""Relay access: may this client relay this message to a non-local recipient?

Asked at RCPT time for recipients whose domain is *not* local (the caller decides locality by
domain only and never re-parses the local part, so ``user%other@local`` is a local mailbox name,
never a route). Decision order:

1. Address tricks never relay, whoever asks: a recipient whose local part contains ``%``, ``!``
   or ``@`` (percent hack, bang path, quoted ``"user@other"``), or whose domain is an address
   literal. Source routes (``@a,@b:user@dom``) are already stripped by ``envelope.parse_path``
   (RFC 5321 §4.1.1.3), so only ``user@dom`` is judged; trailing dots are rejected by the parser
   before we are asked.
2. Extra rules (``smtp.relay.rules``, dotted paths to IRelayAccessPolicy classes or instances),
   in order; the first non-None decision wins. Rules receive a ``RelayRequest`` as ``session``.
3. The default policy: ``relay.enabled`` must be true; authenticated sessions may relay;
   unauthenticated ones only when ``requireAuthForRelay`` is false (open relay) or the client IP
   is in ``allowedClientCidrs`` and/or the sender domain is in ``allowedSenderDomains`` (both
   must match when both are set). Everything else is refused (the caller answers 550 5.7.1).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.logger import Logger
from zope.interface import implementer

from kotlin_smtp_py.config import RelayConfig
from kotlin_smtp_py.envelope import Address, canonical_domain
from kotlin_smtp_py.interfaces import IRelayAccessPolicy
from kotlin_smtp_py.netutil import CidrSet
from kotlin_smtp_py.plugins import load_plugin

log = Logger()

_TRICK_CHARS = ("%", "!", "@")


@dataclass(frozen=True)
class RelayRequest:
    """What relay rules see about the session."""

    peer_ip: str
    authenticated: bool
    auth_user: str | None = None


def is_address_trick(recipient: Address) -> bool:
    """True for recipients that try to route through us by local-part syntax or literals."""
    return recipient.literal or any(c in recipient.local for c in _TRICK_CHARS)


@implementer(IRelayAccessPolicy)
class DefaultRelayRule:
    """The configured policy (step 3); always returns a decision."""

    def __init__(self, relay: RelayConfig) -> None:
        self._relay = relay
        self._networks = CidrSet(relay.allowedClientCidrs)
        # As senders' domains are compared: A-labels (Bücher.test matched no sender before).
        self._domains = frozenset(canonical_domain(d) for d in relay.allowedSenderDomains)

    def decide(self, session: Any, sender: Any, recipient: Any) -> bool:
        if not self._relay.enabled:
            return False
        if getattr(session, "authenticated", False):
            return True
        if not self._relay.requireAuthForRelay and not self._networks and not self._domains:
            return True  # open relay, explicitly configured (failOnOpenRelay guards start-up)
        checks = []
        if self._networks:
            checks.append(self._networks.contains(str(getattr(session, "peer_ip", ""))))
        if self._domains:
            checks.append(isinstance(sender, Address) and not sender.literal
                          and sender.domain.lower() in self._domains)
        return bool(checks) and all(checks)


def load_rule(path: str, relay: RelayConfig) -> Any:
    """A relay rule by dotted path (see plugins.load_plugin); classes get the RelayConfig."""
    return load_plugin(path, IRelayAccessPolicy, relay)


@implementer(IRelayAccessPolicy)
class RelayAccessPolicy:
    """The whole chain: tricks, extra rules, default policy. ``decide`` never returns None."""

    def __init__(self, relay: RelayConfig, rules: Sequence[Any] = ()) -> None:
        self._rules = list(rules)
        self._default = DefaultRelayRule(relay)

    @classmethod
    def from_config(cls, relay: RelayConfig) -> RelayAccessPolicy:
        return cls(relay, [load_rule(p, relay) for p in relay.rules])

    def decide(self, session: Any, sender: Any, recipient: Any) -> bool:
        if isinstance(recipient, Address) and is_address_trick(recipient):
            log.info("relay refused for address trick {recipient}", recipient=str(recipient))
            return False
        for rule in self._rules:
            verdict = rule.decide(session, sender, recipient)
            if verdict is True or verdict is False:
                return verdict
            if verdict is not None:
                # Never bool(): a Deferred or a string "deny" is truthy, and would open the
                # relay. The RCPT handler answers a rule failure with 451.
                raise TypeError(f"relay rule {type(rule).__name__} answered "
                                f"{type(verdict).__name__}, not True/False/None")
        return self._default.decide(session, sender, recipient)

    def relay_allowed(self, peer_ip: str, authenticated: bool, sender: Address | None,
                      recipient: Address | None = None, auth_user: str | None = None) -> bool:
        """Convenience entry point for the RCPT handler."""
        return self.decide(RelayRequest(peer_ip, authenticated, auth_user), sender, recipient)
