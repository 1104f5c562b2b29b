"""Example extension plugins (see docs/EXTENDING.md). Each is loaded by a test from config:

    smtp:
      plugins:
        commandInterceptors: [examples.plugins.BlockSenderDomain, examples.plugins.DropXCommand]
        eventHooks: [examples.plugins.JsonLinesAudit]
        authService: examples.plugins.StaticAuthService
        routingPolicy: examples.plugins.SuffixRoutingPolicy
"""

from __future__ import annotations

import hmac
import json
import os
from typing import Any

from twisted.internet import defer, task
from zope.interface import implementer

from kotlin_smtp_py.interfaces import IAuthChecker
from kotlin_smtp_py.plugins import (
    DROP,
    PROCEED,
    CommandContext,
    Decision,
    Event,
    ICommandInterceptor,
    IEventHook,
    IInboundRoutingPolicy,
    Stage,
)

BLOCKED_DOMAIN = os.environ.get("EXAMPLE_BLOCKED_DOMAIN", "blocked.test")


@implementer(ICommandInterceptor)
class BlockSenderDomain:
    """MAIL_FROM: refuse senders from one domain, asynchronously (like a DNSBL lookup would)."""

    stages = (Stage.MAIL_FROM,)
    order = 10

    def intercept(self, context: CommandContext) -> defer.Deferred[Decision]:
        from twisted.internet import reactor

        blocked = (context.sender or "").lower().endswith("@" + BLOCKED_DOMAIN)
        decision = Decision.deny(550, "5.7.1", "Sender domain blocked by policy") \
            if blocked else PROCEED
        return task.deferLater(reactor, 0.01, lambda: decision)  # type: ignore[arg-type]


@implementer(ICommandInterceptor)
class DropXCommand:
    """PRE_COMMAND: drop the connection on the made-up verb XDROP; deny RCPT to trap@."""

    stages = (Stage.PRE_COMMAND, Stage.RCPT_TO, Stage.DATA_PRE, Stage.AUTH)
    order = 20

    def intercept(self, context: CommandContext) -> Decision:
        if context.stage is Stage.PRE_COMMAND and context.command == "NOOP" \
                and context.argument == "XDROP":
            return DROP
        if context.stage is Stage.RCPT_TO and (context.recipient or "").startswith("trap@"):
            return Decision.deny(550, "5.1.1", "Recipient refused by policy")
        if context.stage is Stage.DATA_PRE and (context.sender or "").startswith("nodata@"):
            return Decision.deny(554, "5.7.1", "Not accepting data from you")
        if context.stage is Stage.AUTH and context.username == "banned":
            return Decision.deny(535, "5.7.8", "Authentication credentials invalid")
        return PROCEED


@implementer(IEventHook)
class JsonLinesAudit:
    """Appends one JSON line per event to $EXAMPLE_AUDIT_FILE (a failure here is harmless)."""

    def __init__(self) -> None:
        self.path = os.environ.get("EXAMPLE_AUDIT_FILE", "audit.jsonl")

    def on_event(self, event: Event) -> None:
        record: dict[str, Any] = {"kind": event.kind, "peer": event.session.peer_ip,
                                  "queue_id": event.queue_id, "size": event.size,
                                  "reason": event.reason}
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record) + "\n")


@implementer(IEventHook)
class BrokenHook:
    """Always fails: proves hook failures never affect the SMTP session."""

    def on_event(self, event: Event) -> None:
        raise RuntimeError("this hook is broken on purpose")


@implementer(IAuthChecker)
class StaticAuthService:
    """A replacement users table (stand-in for LDAP/SQL): one user from the environment."""

    def __init__(self) -> None:
        self.user = os.environ.get("EXAMPLE_AUTH_USER", "ldapuser")
        self.password = os.environ.get("EXAMPLE_AUTH_PASSWORD", "ldap-pass").encode()

    def has_user(self, username: str) -> bool:
        return username == self.user

    def check(self, username: str, password: bytes) -> defer.Deferred[bool]:
        ok = username == self.user and hmac.compare_digest(password, self.password)
        return defer.succeed(ok)


@implementer(IInboundRoutingPolicy)
class SuffixRoutingPolicy:
    """Every domain ending in .internal.test (and localhost) is local."""

    def is_local_domain(self, domain: str) -> bool:
        return domain == "localhost" or domain.endswith(".internal.test")
