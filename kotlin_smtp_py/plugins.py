"""Extension points (the seed's SPI, the Twisted way) and how they are loaded from config.

Contracts (see docs/EXTENDING.md):

- :class:`ICommandInterceptor` — runs at the stages it names (PRE_COMMAND, AUTH, MAIL_FROM,
  RCPT_TO, DATA_PRE), in ascending ``order``; returns a :class:`Decision` (or a Deferred of one):
  proceed, deny with an SMTP reply, or drop the connection. The first non-proceed decision wins.
  An interceptor that raises denies with a generic ``451 4.3.0`` (details go to the log).
- :class:`IEventHook` — told about session started/ended and message accepted/rejected. Hook
  failures (exceptions or failed Deferreds) are logged and never affect the SMTP session.
- ``IAuthChecker`` (replace the users table), :class:`IInboundRoutingPolicy` (is a domain
  local), ``IRelayAccessPolicy`` (relay rule chain, ``smtp.relay.rules``) and ``IDelivery``
  (local delivery target) live in :mod:`kotlin_smtp_py.interfaces`.

Plugins are named in ``smtp.plugins.*`` by dotted path (``package.module.Name`` or
``package.module:Name``) or as ``plugin:<name>`` for a Twisted plugin (an object in a
``twisted/plugins/*.py`` module providing ``IPlugin`` and the interface, with a ``name``
attribute). Classes are instantiated with the :class:`Config` when their constructor takes an
argument, else with none.
"""

from __future__ import annotations

import enum
import importlib
import inspect
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer
from zope.interface.interface import Method

from kotlin_smtp_py.interfaces import IDelivery
from kotlin_smtp_py.status import DeliveryStatus, Reason, SmtpReply, one_line

log = Logger()


class Stage(str, enum.Enum):
    PRE_COMMAND = "PRE_COMMAND"
    AUTH = "AUTH"
    MAIL_FROM = "MAIL_FROM"
    RCPT_TO = "RCPT_TO"
    DATA_PRE = "DATA_PRE"


@dataclass(frozen=True)
class CommandContext:
    """What an interceptor sees. ``argument`` is the command's argument text (never AUTH data)."""

    stage: Stage
    session: Any  # inbound.policy.SessionInfo
    command: str
    argument: str = ""
    sender: str | None = None
    recipient: str | None = None
    username: str | None = None


@dataclass(frozen=True)
class Decision:
    action: str  # "proceed" | "deny" | "drop"
    reply: SmtpReply | None = None

    @classmethod
    def deny(cls, code: int, enhanced: str, text: str) -> Decision:
        return cls("deny", SmtpReply(code, enhanced, text))


PROCEED = Decision("proceed")
DROP = Decision("drop")
INTERCEPTOR_FAILED = SmtpReply(451, "4.3.0", "Requested action aborted: try again later")
_ENHANCED = re.compile(r"[245]\.\d{1,3}\.\d{1,3}")


class ICommandInterceptor(Interface):
    stages = Attribute("collection of Stage values this interceptor runs at")
    order = Attribute("int: lower runs first")

    def intercept(context: CommandContext) -> Any:
        """Decision or Deferred[Decision]."""


@dataclass(frozen=True)
class Event:
    """``kind``: session_started | session_ended | message_accepted | message_rejected."""

    kind: str
    session: Any  # SessionInfo
    queue_id: str | None = None
    envelope: Any = None  # Envelope for message_accepted
    size: int | None = None
    reason: str | None = None


class IEventHook(Interface):
    def on_event(event: Event) -> Any:
        """Anything or a Deferred; errors are logged and ignored."""


class IInboundRoutingPolicy(Interface):
    def is_local_domain(domain: str) -> bool:
        """Mail for ``domain`` is delivered here."""


def load_plugin(spec: str, interface: Any, config: Any = None) -> Any:
    """Instantiate the plugin named by ``spec`` and check that it provides ``interface``."""
    if spec.startswith("plugin:"):
        from twisted.plugin import getPlugins

        import twisted.plugins

        name = spec[len("plugin:"):]
        for candidate in getPlugins(interface, twisted.plugins):
            if getattr(candidate, "name", None) == name:
                return candidate
        raise LookupError(f"no Twisted plugin named {name!r} provides {interface.__name__}")
    module_name, _, attr = spec.replace(":", ".").rpartition(".")
    if not module_name:
        raise ValueError(f"{spec!r} is not a dotted path")
    obj = getattr(importlib.import_module(module_name), attr)
    if isinstance(obj, type):
        # Given the config if the constructor takes an argument; a TypeError raised inside
        # the constructor is the plugin's own error, not a sign to call it differently.
        obj = obj(config) if _takes_argument(obj) else obj()
    if not interface.providedBy(obj):
        raise TypeError(f"{spec} does not provide {interface.__name__}")
    for name in interface.names(all=True):
        # Declared is not implemented: a missing method would fail on every call instead.
        if isinstance(interface[name], Method) and not callable(getattr(obj, name, None)):
            raise TypeError(f"{spec} declares {interface.__name__} but has no {name}()")
    return obj


def _takes_argument(cls: type) -> bool:
    try:
        params = list(inspect.signature(cls).parameters.values())
    except (TypeError, ValueError):
        return True
    return any(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.VAR_POSITIONAL)
               for p in params)


class InterceptorChain:
    """Runs interceptors for a stage; returns None (proceed), a reply (deny) or DROP."""

    def __init__(self, interceptors: Sequence[Any]) -> None:
        ordered = sorted(interceptors, key=lambda i: int(getattr(i, "order", 0)))
        self._by_stage: dict[Stage, list[Any]] = {
            s: [i for i in ordered if s in {Stage(x) for x in i.stages}] for s in Stage}

    def wants(self, stage: Stage) -> bool:
        return bool(self._by_stage[stage])

    @defer.inlineCallbacks
    def run(self, context: CommandContext) -> Any:
        for interceptor in self._by_stage[context.stage]:
            try:
                decision = yield defer.maybeDeferred(interceptor.intercept, context)
            except Exception:
                log.failure("command interceptor {name} failed at {stage}",
                            name=type(interceptor).__name__, stage=context.stage.value)
                return INTERCEPTOR_FAILED
            if decision is None or decision is PROCEED:
                continue
            if not isinstance(decision, Decision) or \
                    decision.action not in ("proceed", "deny", "drop"):
                # Fails closed: a string "deny" or a code is not "go ahead".
                log.error("command interceptor {name} answered {answer!r} at {stage}, not a "
                          "Decision", name=type(interceptor).__name__,
                          answer=_describe(decision), stage=context.stage.value,
                          event="plugin_error")
                return INTERCEPTOR_FAILED
            if decision.action == "proceed":
                continue
            if decision.action == "drop":
                return DROP
            reply = _checked_reply(decision.reply)
            if reply is None:
                log.error("command interceptor {name} denied with an invalid reply {reply!r} "
                          "at {stage}", name=type(interceptor).__name__,
                          reply=_describe(decision.reply), stage=context.stage.value,
                          event="plugin_error")
                return INTERCEPTOR_FAILED
            return reply
        return None


def _describe(value: Any) -> str:
    return repr(value)[:100]


def _checked_reply(reply: Any) -> SmtpReply | None:
    """A plugin's refusal as we may send it: a 4xx/5xx code (a 2xx "refusal" would tell the
    client the command worked, and the recipient would silently get nothing), an enhanced
    code of the same class (or none), and text without control characters (a CR or LF in
    it would inject reply lines)."""
    if not isinstance(reply, SmtpReply) or type(reply.code) is not int or \
            not 400 <= reply.code <= 599 or not isinstance(reply.text, str) or \
            not isinstance(reply.enhanced, str):
        return None
    enhanced = reply.enhanced
    if enhanced and not (_ENHANCED.fullmatch(enhanced) and enhanced[0] == str(reply.code)[0]):
        enhanced = ""
    text = one_line(reply.text)[:500]
    if (enhanced, text) == (reply.enhanced, reply.text):
        return reply
    return SmtpReply(reply.code, enhanced, text)


def _call_on_event(hook: Any, event: Event) -> Any:
    return hook.on_event(event)  # (looked up inside maybeDeferred: a missing one is an error)


class EventHooks:
    """Adapts IEventHook plugins to the factory's session events; never lets them fail it."""

    def __init__(self, hooks: Sequence[Any]) -> None:
        self.hooks = list(hooks)

    def _emit(self, event: Event) -> None:
        for hook in self.hooks:
            d: defer.Deferred[Any] = defer.maybeDeferred(_call_on_event, hook, event)
            d.addErrback(self._failed, type(hook).__name__, event.kind)

    @staticmethod
    def _failed(failure: Any, name: str, kind: str) -> None:
        log.failure("event hook {name} failed on {kind}", failure, name=name, kind=kind)

    def session_started(self, session: Any) -> None:
        self._emit(Event("session_started", session.session_info()))

    def session_ended(self, session: Any) -> None:
        self._emit(Event("session_ended", session.session_info()))

    def message_accepted(self, session: Any, entry: Any) -> None:
        self._emit(Event("message_accepted", session.session_info(), entry.queue_id,
                         entry.envelope, entry.envelope.size))

    def message_rejected(self, session: Any, reply: SmtpReply) -> None:
        self._emit(Event("message_rejected", session.session_info(),
                         reason=f"{reply.code} {reply.enhanced} {reply.text}"))


@implementer(IDelivery)
class DeliveryWithDeadline:
    """A local-delivery plugin with a deadline (``smtp.plugins.localDeliveryTimeoutSeconds``).

    The scheduler awaits each delivery while it holds one of ``workerConcurrency`` slots; a
    plugin that never answered held its slot for ever, and with the default of one slot no
    other mail was delivered. Past the deadline the call is cancelled and its recipients get a
    transient 4.4.1, so the entry is retried with backoff (and bounced after maxRetries). A
    plugin that did deliver but answered too late is delivered again on the retry: the same
    at-least-once as a crash after delivery.
    """

    def __init__(self, inner: Any, timeout: float, clock: Any) -> None:
        self.inner = inner
        self.timeout = timeout
        self.clock = clock

    def deliver(self, entry: Any, message_path: str, recipients: Any) -> defer.Deferred[Any]:
        name = type(self.inner).__name__
        d: defer.Deferred[Any] = defer.maybeDeferred(self.inner.deliver, entry, message_path,
                                                      recipients)
        d.addTimeout(self.timeout, self.clock)

        def timed_out(failure: Any) -> Any:
            failure.trap(defer.TimeoutError)
            log.warn("local delivery {plugin} gave no answer for {queue_id} within {seconds:.0f}s;"
                     " its recipients are retried later", plugin=name,
                     queue_id=entry.queue_id, seconds=self.timeout, event="delivery_timeout")
            status = DeliveryStatus.transient(
                Reason.TIMEOUT, f"local delivery gave no answer within {self.timeout:.0f}s",
                "4.4.1")
            return [(r, status) for r in recipients]

        return d.addErrback(timed_out)
