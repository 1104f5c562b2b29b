"""Which delivery handles a recipient: local domains go to Maildir, others to the relay.

The protocol and scheduler never branch on recipient type themselves; they ask this router.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from kotlin_smtp_py.envelope import Recipient
from kotlin_smtp_py.interfaces import IDelivery, IRouter
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.status import DeliveryStatus, Reason


def domain_of(address: str) -> str:
    return address.rpartition("@")[2].lower()


@implementer(IDelivery)
class RefuseDelivery:
    """Used when relaying is disabled: non-local recipients fail permanently (never silently)."""

    def deliver(self, entry: QueueEntry, message_path: str,
                recipients: Sequence[Recipient]) -> defer.Deferred[list[tuple[Recipient,
                                                                           DeliveryStatus]]]:
        status = DeliveryStatus.permanent_failure(Reason.POLICY, "relaying is disabled", "5.7.1")
        return defer.succeed([(r, status) for r in recipients])


@implementer(IRouter)
class DeliveryRouter:
    def __init__(self, local_domains: frozenset[str], local: IDelivery,
                 relay: IDelivery | None = None,
                 relay_key: Callable[[str], str] | None = None,
                 routing_policy: Any = None) -> None:
        """``routing_policy`` (an IInboundRoutingPolicy plugin) replaces the domain list."""
        self.local_domains = local_domains
        self.routing_policy = routing_policy
        self.local = local
        self.relay: Any = relay if relay is not None else RefuseDelivery()
        self.relay_key = relay_key or (lambda domain: domain)

    def is_local_domain(self, domain: str) -> bool:
        domain = domain.lower().rstrip(".")
        if self.routing_policy is not None:
            return bool(self.routing_policy.is_local_domain(domain))
        return domain in self.local_domains

    def route(self, recipient: Recipient) -> tuple[str, IDelivery]:
        domain = domain_of(recipient.address)
        if self.is_local_domain(domain):
            return "local", self.local
        return "relay:" + self.relay_key(domain), self.relay
