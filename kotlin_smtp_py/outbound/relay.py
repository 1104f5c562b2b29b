"""RelayDelivery: the IDelivery for non-local recipients (smart hosts and direct MX).

``deliver(entry, message_path, recipients)`` groups the recipients by next hop, resolves each hop
to an ordered list of (host, address, port) targets and runs one SMTP session per target until
one holds a transaction; it tries the next target on connection failures, greeting refusals
and TLS/EHLO trouble before MAIL, never after. Invariants:

* It never raises and returns exactly one result per recipient given, in order; unknown errors
  become transient (4.3.0, reason ``other``) so the spool retries instead of bouncing.
* At most ``maxConnectionsPerDestination`` sessions run at once per next hop (``route_key``).
* Retries over time are the scheduler's job: this module makes one attempt per call.
* Recipient-domain TLS policies (MTA-STS, DANE, REQUIRETLS, ``TLS-Required: No``) are planned per
  target by ``tlsplan.OutboundTlsPolicies``; every session is reported to TLS-RPT when enabled.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from zope.interface import implementer

from kotlin_smtp_py.config import Config, SmtpConfig
from kotlin_smtp_py.envelope import Recipient
from kotlin_smtp_py.interfaces import IDelivery
from kotlin_smtp_py.log import debug_enabled
from kotlin_smtp_py.netutil import parse_ip
from kotlin_smtp_py.outbound.client import (
    OutboundMessage,
    SessionCache,
    Target,
    deliver_session,
)
from kotlin_smtp_py.outbound.mx import MxResolver, MxResult, make_resolver
from kotlin_smtp_py.outbound.requiretls import tls_required_no
from kotlin_smtp_py.outbound.router import NextHop, OutboundRouter, recipient_domain
from kotlin_smtp_py.outbound.tlsplan import OutboundTlsPolicies, PlannedTarget
from kotlin_smtp_py.outbound.tlsrpt import Submit, TlsRptReporter
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.status import DeliveryStatus, Reason

log = Logger()

MAX_TARGETS = 10  # sessions tried per next hop and attempt (MX hosts × addresses × ports)

Results = list[tuple[Recipient, DeliveryStatus]]


def _header_block(path: str, limit: int = 65536) -> bytes:
    """The message's header section (at most ``limit`` bytes; only read for SMTPUTF8 mail)."""
    with open(path, "rb") as fh:
        head = fh.read(limit)
    if head.startswith(b"\r\n"):
        return b""
    end = head.find(b"\r\n\r\n")
    return head if end < 0 else head[:end]


@implementer(IDelivery)
class RelayDelivery:
    """Delivers to remote hosts; construct with ``RelayDelivery.from_config(config, reactor)``."""

    def __init__(self, smtp: SmtpConfig, reactor: Any, resolver: Any = None,
                 shuffle: Callable[[list[Any]], None] = random.shuffle,
                 clock: Any = None) -> None:
        """``clock`` times policy caches and TLS-RPT periods (default: ``reactor``)."""
        self._smtp = smtp
        self._reactor = reactor
        self.router = OutboundRouter(smtp.relay)
        if resolver is None:
            resolver = make_resolver(smtp.dns.servers, reactor)
        self.mx = MxResolver(resolver, reactor, smtp.dns.timeoutMs / 1000.0, shuffle)
        self._limit = max(1, smtp.relay.maxConnectionsPerDestination)
        self._semaphores: dict[str, defer.DeferredSemaphore] = {}
        cc = smtp.relay.connectionCache
        self.sessions: SessionCache | None = \
            SessionCache(reactor, cc.idleSeconds, cc.maxUses) if cc.enabled else None
        self.policies = OutboundTlsPolicies.from_config(
            smtp, reactor, clock if clock is not None else reactor, self.mx)

    @classmethod
    def from_config(cls, config: Config, reactor: Any, resolver: Any = None,
                    clock: Any = None) -> RelayDelivery:
        """The service passes its reactor (only service.py imports the global one)."""
        return cls(config.smtp, reactor, resolver, clock=clock)

    def tls_reporter(self, submit: Submit, clock: Any = None) -> TlsRptReporter | None:
        """The TLS-RPT reporter (``outboundPolicy.tlsRpt.enabled``); ``submit`` queues mail."""
        recorder = self.policies.recorder
        if recorder is None:
            return None
        rpt = self._smtp.relay.outboundPolicy.tlsRpt
        return TlsRptReporter(recorder, self.policies.secure_dns, submit,
                              clock if clock is not None else recorder.clock,
                              self._smtp.hostname, rpt.reportingOrg, rpt.contactInfo,
                              rpt.fromAddress, reactor=self._reactor,
                              agent=self.policies.https.agent if self.policies.https else None)

    def close_idle(self) -> None:
        """Shutdown: QUIT the cached idle sessions."""
        if self.sessions is not None:
            self.sessions.close_all()

    def route_key(self, domain: str) -> str:
        """Grouping key for the scheduler: equal keys → same next hop → one transaction."""
        return self.router.route_key(domain)

    def deliver(self, entry: QueueEntry, message_path: str,
                recipients: Sequence[Recipient]) -> defer.Deferred[Results]:
        recipients = list(recipients)
        d = defer.Deferred.fromCoroutine(self._deliver(entry, message_path, recipients))

        def unexpected(failure: Any) -> Results:
            log.failure("relay delivery of {queue_id} crashed", failure, queue_id=entry.queue_id)
            status = DeliveryStatus.transient(Reason.OTHER, "internal error during delivery",
                                              "4.3.0")
            return [(r, status) for r in recipients]

        d.addErrback(unexpected)
        return d

    async def _deliver(self, entry: QueueEntry, message_path: str,
                       recipients: list[Recipient]) -> Results:
        groups: dict[str, tuple[NextHop, list[Recipient]]] = {}
        for r in recipients:
            hop = self.router.next_hop(recipient_domain(r.address))
            groups.setdefault(hop.key, (hop, []))[1].append(r)
        runs = [defer.Deferred.fromCoroutine(self._limited(hop, entry, message_path, rcpts))
                for hop, rcpts in groups.values()]
        done: dict[Recipient, DeliveryStatus] = {}
        for results in await defer.gatherResults(runs, consumeErrors=True):
            done.update(results)
        return [(r, done[r]) for r in recipients]

    async def _limited(self, hop: NextHop, entry: QueueEntry, message_path: str,
                       recipients: list[Recipient]) -> Results:
        sem = self._semaphores.get(hop.key)
        if sem is None:
            sem = self._semaphores[hop.key] = defer.DeferredSemaphore(self._limit)
        await sem.acquire()
        try:
            return await self._deliver_hop(hop, entry, message_path, recipients)
        finally:
            sem.release()
            if sem.tokens == self._limit and not sem.waiting:
                self._semaphores.pop(hop.key, None)

    async def _deliver_hop(self, hop: NextHop, entry: QueueEntry, message_path: str,
                           recipients: list[Recipient]) -> Results:
        targets = await self._targets(hop)
        if isinstance(targets, DeliveryStatus):
            self._log_results(entry, hop, [(r, targets) for r in recipients])
            return [(r, targets) for r in recipients]
        env = entry.envelope
        message = OutboundMessage(
            sender=env.sender, recipients=tuple(recipients), path=message_path,
            size=os.stat(message_path).st_size,
            eight_bit=env.body.upper() in ("8BITMIME", "BINARYMIME"),
            ret=env.ret, envid=env.envid, smtputf8=env.smtputf8,
            utf8_headers=env.smtputf8 and not _header_block(message_path).isascii())
        planned = await self._plan(hop, targets, env.requiretls, message_path)
        if isinstance(planned, DeliveryStatus):
            self._log_results(entry, hop, [(r, planned) for r in recipients])
            return [(r, planned) for r in recipients]
        results: Results = []
        deferred: Results | None = None  # a host that failed temporarily, this attempt
        exhausted = True
        for item in planned[:MAX_TARGETS]:
            outcome = await deliver_session(self._reactor, item.target, self._smtp.hostname,
                                            item.tls, message, hop.credentials,
                                            item.requirements, self.sessions)
            if not outcome.reused:  # TLS-RPT counts sessions, not transactions on one
                self.policies.observe(item, outcome)
            results = outcome.per_recipient(recipients)
            if outcome.host_failure is None or not outcome.try_next:
                exhausted = False
                break
            if deferred is None and all(st.temporary for _, st in results):
                deferred = results
        if exhausted and deferred is not None and any(st.permanent for _, st in results):
            # Every host failed, one of them only temporarily (unreachable, 4xx): a later
            # host's 5xx greeting says "no SMTP here", not "no such recipient", so the mail
            # is retried rather than bounced (as Postfix's smtp_skip_5xx_greeting).
            results = deferred
        self._log_results(entry, hop, results)
        return results

    async def _plan(self, hop: NextHop, targets: list[Target], requiretls: bool,
                    message_path: str) -> list[PlannedTarget] | DeliveryStatus:
        relaxed = False
        if not requiretls and hop.direct and self.policies.domain_policies:
            relaxed = tls_required_no(message_path)
        return await self.policies.plan(hop, targets, requiretls=requiretls, relaxed=relaxed)

    async def _targets(self, hop: NextHop) -> list[Target] | DeliveryStatus:
        if hop.host is not None:
            return await self._smart_host_targets(hop, hop.host)
        found = await self.mx.resolve(hop.domain)
        if isinstance(found, DeliveryStatus):
            return found
        return self._mx_targets(hop, found)

    def _mx_targets(self, hop: NextHop, found: MxResult) -> list[Target] | DeliveryStatus:
        """RFC 5321 §5.1: if we are one of the MX hosts — by name, or by an address and port
        we listen on — only the hosts more preferred than we are may be used (a backup MX
        passes mail on to the primary); none left means the mail would loop back to us."""
        me = self._smtp.hostname.lower().rstrip(".")
        names = found.names or tuple((h.preference, h.name) for h in found.hosts)
        ours = [p for p, n in names if n == me and me not in ("localhost", "")]
        ours += [h.preference for h in found.hosts
                 if any(self._is_own_listener(a, port)
                        for a in h.addresses for port in hop.tls.ports)]
        hosts = found.hosts
        if ours and not found.implicit:
            mine = min(ours)
            hosts = tuple(h for h in hosts if h.preference < mine)
        elif ours:  # implicit MX (the domain's own address) that is us
            hosts = ()
        if not hosts:
            return DeliveryStatus.permanent_failure(
                Reason.DNS, f"mail for {hop.domain} loops back to myself", "5.4.6", 554,
                diagnostic=f"x-dns; {me} is the best MX for {hop.domain}")
        targets: dict[tuple[str, int], Target] = {}
        for h in hosts:
            for address in h.addresses:
                for port in hop.tls.ports:
                    # One session per address and port, whatever names point to it.
                    targets.setdefault((address, port), Target(h.name, address, port))
        return list(targets.values())

    def _is_own_listener(self, address: str, port: int) -> bool:
        for lst in self._smtp.effective_listeners():
            if lst.port != port:
                continue
            bind = (lst.bindAddress or "").strip("[]")
            ip = parse_ip(address)
            if bind == address or (bind in ("", "0.0.0.0", "::") and ip is not None
                                   and ip.is_loopback):
                return True
        return False

    async def _smart_host_targets(self, hop: NextHop, host: str) -> list[Target] | DeliveryStatus:
        from ipaddress import ip_address

        try:
            # "[192.0.2.1]" or a bare address: the name TLS checks is the address itself
            # (an IP SAN); with the brackets it was no valid name and every attempt failed.
            address = str(ip_address(host.strip("[]")))
            return [Target(address, address, hop.port)]
        except ValueError:
            pass
        addresses, six, four = await self.mx.addresses(host)
        if not addresses:
            why = "lookup failed" if (six.failure or four.failure) else "has no address"
            return DeliveryStatus.transient(Reason.DNS, f"relay host {host} {why}", "4.4.3",
                                            diagnostic=f"x-dns; relay host {host} {why}")
        return [Target(host, address, hop.port) for address in addresses]

    def _log_results(self, entry: QueueEntry, hop: NextHop, results: Results) -> None:
        # Debug only: the scheduler logs every attempt (event delivery_attempt, with the
        # answering host as remote_mta); at info this was a second line per recipient.
        if not debug_enabled():
            return
        for r, status in results:
            log.debug("delivery {queue_id} to {recipient} via {next_hop}: {code} {enhanced} {text}",
                      queue_id=entry.queue_id, recipient=r.address, next_hop=hop.key,
                      code=status.code, enhanced=status.enhanced, text=status.text,
                      status="delivered" if status.ok else status.kind.value if status.kind
                      else "", reason=None if status.ok else status.reason.value,
                      remote_mta=status.remote_mta)
