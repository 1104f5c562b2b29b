"""Wires everything together from a :class:`Config`: the only module that builds the object graph.

Start order: spool → scheduler → SMTP listeners → management HTTP; readiness is UP (and systemd
hears READY=1) only after every listener is bound. Stop order (SIGTERM): readiness DOWN and
STOPPING=1, listeners stop accepting, idle sessions get 421, transactions in progress may finish
until ``lifecycle.gracefulShutdownTimeoutMs``, the rest are aborted, deliveries in flight finish
or have their leases released (entries stay queued), then the process exits 0.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, NoReturn

from twisted.application import service
from twisted.internet import defer
from twisted.internet.error import CannotListenError
from twisted.internet.interfaces import IOpenSSLContextFactory
from twisted.logger import Logger
from twisted.protocols.tls import TLSMemoryBIOFactory
from twisted.python.failure import Failure
from zope.interface import implementer

from kotlin_smtp_py.config import Config, ConfigError, spool_backend
from kotlin_smtp_py.diskio import DiskIO
from kotlin_smtp_py.envelope import Address
from kotlin_smtp_py.inbound.auth import UserTableChecker
from kotlin_smtp_py.inbound.factory import SessionEvents, SMTPFactory
from kotlin_smtp_py.inbound.policy import RecipientPolicy, SessionInfo
from kotlin_smtp_py.inbound.protocol import SMTPServerProtocol
from kotlin_smtp_py.inbound.proxy import ProxyWrappingFactory
from kotlin_smtp_py.inbound.relaypolicy import RelayAccessPolicy
from kotlin_smtp_py.interfaces import IAuthChecker, IDelivery, ISpool
from kotlin_smtp_py.local.delivery import LocalDelivery
from kotlin_smtp_py.local.direct import DirectLocalDelivery
from kotlin_smtp_py.local.directory import LocalDirectory, read_list
from kotlin_smtp_py.local.maildir import maildir_name, write_maildir
from kotlin_smtp_py.metrics import Metrics, MetricsSessionEvents, MetricsSpoolEvents
from kotlin_smtp_py.netutil import CidrSet
from kotlin_smtp_py.outbound.relay import RelayDelivery
from kotlin_smtp_py.plugins import (
    DeliveryWithDeadline,
    EventHooks,
    ICommandInterceptor,
    IEventHook,
    IInboundRoutingPolicy,
    InterceptorChain,
    load_plugin,
)
from kotlin_smtp_py.ratelimit import (
    ExemptingConnectionLimiter,
    ExemptingMessageRateLimiter,
    PrefixAuthFailureLimiter,
    make_limiters,
)
from kotlin_smtp_py.redisconn import RedisClient, RedisHealthIndicator
from kotlin_smtp_py.routing import DeliveryRouter
from kotlin_smtp_py.sdnotify import SystemdNotifier, WatchdogPinger
from kotlin_smtp_py.spool.file import FileSpool
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.spool.redis import MessageTooLarge, RedisSpool
from kotlin_smtp_py.spool.scheduler import Bouncer, Scheduler
from kotlin_smtp_py.status import SmtpReply
from kotlin_smtp_py.web.health import (
    DiskSpaceIndicator,
    FunctionIndicator,
    Readiness,
    SpoolIndicator,
)
from kotlin_smtp_py.web.site import make_management_site
from kotlin_smtp_py.workers import (
    LISTEN_BACKLOG,
    ClusterRole,
    WorkerSupervisor,
    adopt_listening,
    listen_reuseport,
    listen_shared,
    mark_reload_ready,
    split_local_limits,
)

log = Logger()

def build_tls_context(config: Config) -> Any:
    """Server TLS options from ``smtp.ssl`` (cert chain + key, minimum version, ciphers)."""
    from OpenSSL import crypto
    from twisted.internet import ssl

    s = config.smtp.ssl
    with open(s.certChainFile, "rb") as fh:
        chain_pem = fh.read()
    with open(s.privateKeyFile, "rb") as fh:
        key_pem = fh.read()
    marker = b"-----END CERTIFICATE-----"
    certs = [part + marker for part in chain_pem.split(marker) if b"BEGIN CERTIFICATE" in part]
    leaf = crypto.load_certificate(crypto.FILETYPE_PEM, certs[0])
    extra = [crypto.load_certificate(crypto.FILETYPE_PEM, c) for c in certs[1:]]
    key = crypto.load_privatekey(crypto.FILETYPE_PEM, key_pem)
    kwargs: dict[str, Any] = {
        "privateKey": key, "certificate": leaf, "extraCertChain": extra,
        "raiseMinimumTo": (ssl.TLSVersion.TLSv1_3 if s.minTlsVersion == "TLSv1.3"
                           else ssl.TLSVersion.TLSv1_2),
    }
    if s.cipherSuites:
        kwargs["acceptableCiphers"] = ssl.AcceptableCiphers.fromOpenSSLCipherString(
            ":".join(s.cipherSuites))  # type: ignore[no-untyped-call]
    return ssl.CertificateOptions(**kwargs)


_RELOADED_KEYS = ("smtp.auth.users", "smtp.auth.allowPlaintextPasswords")
_RELOADED_TLS_KEYS = ("smtp.ssl.certChainFile", "smtp.ssl.privateKeyFile",
                      "smtp.ssl.minTlsVersion", "smtp.ssl.cipherSuites")


def _reloadable(key: str, tls_swapped: bool) -> bool:
    """Whether SIGHUP applies ``key`` (the TLS keys only when a TLS context was swapped)."""
    if key.startswith(_RELOADED_KEYS):
        return True
    return tls_swapped and key in _RELOADED_TLS_KEYS


@implementer(IOpenSSLContextFactory)
class ReloadableTLS:
    """A TLS context factory whose certificate can be swapped (SIGHUP) without touching
    listeners or open sessions: new handshakes use the current context."""

    def __init__(self, options: Any) -> None:
        self.current = options

    def getContext(self) -> Any:
        return self.current.getContext()


def systemd_listen_fds(env: dict[str, str] | None = None) -> list[tuple[int, int]]:
    """Sockets passed by systemd socket activation (``LISTEN_FDS``/``LISTEN_PID``), as
    (fd, address family), in order; ``smtp.listeners[i]`` adopts the i-th one. The variables
    are removed so that child processes do not inherit them (like sd_listen_fds(1))."""
    import socket

    environ: Any = os.environ if env is None else env
    try:
        count = int(environ.get("LISTEN_FDS", "0"))
        pid = int(environ.get("LISTEN_PID", "0"))
    except ValueError:
        count, pid = 0, 0
    fds: list[int] = []
    if count > 0 and pid == os.getpid():
        fds = list(range(3, 3 + count))
        for key in ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES"):
            environ.pop(key, None)
    elif env is None:
        # Importing twisted.internet.endpoints (twistd does, early) already consumed the
        # variables into its systemd endpoint parser; take the descriptors from there.
        try:
            from twisted.internet.endpoints import _SystemdParser

            fds = list(_SystemdParser._sddaemon.inheritedDescriptors())
        except (ImportError, AttributeError):
            fds = []
    out = []
    for fd in fds:
        sock = socket.socket(fileno=fd)
        sock.setblocking(False)  # systemd passes blocking sockets; accept() must not block
        out.append((fd, int(sock.family)))
        sock.detach()
    return out


ADDED_HEADER_ROOM = 2048  # our Received: (with TLS details), Message-ID: and Date: fit easily


class TriggerGate:
    """Spool-run triggers (ETRN, ``queue flush``) with a cooldown: extra triggers do nothing.

    With a spool that records flush requests (the file spool: ``kotlin-smtp queue flush``
    leaves one for the running server), the two share one cooldown: an ETRN right after a
    flush is refused, and a flush right after an ETRN exits 75. Those records carry wall-clock
    times (another process writes them), so that comparison uses ``time.time()``. With a spool
    that keeps a cluster-wide slot (the Redis spool's ``flush_slot``), every node and the CLI
    share that one cooldown instead."""

    def __init__(self, scheduler: Scheduler, cooldown_ms: int, clock: Any,
                 spool: Any = None) -> None:
        self.scheduler = scheduler
        self.cooldown_ms = cooldown_ms
        self.cooldown = cooldown_ms / 1000.0
        self.clock = clock
        self._last = float("-inf")
        self._last_request = getattr(spool, "last_flush_request", None)
        self._note = getattr(spool, "note_trigger", None)
        self._slot = getattr(spool, "flush_slot", None)

    def fire(self) -> defer.Deferred[bool]:
        """True (and the scheduler triggered) unless a trigger ran within the cooldown."""
        now = float(self.clock.seconds())
        if now - self._last < self.cooldown:
            return defer.succeed(False)
        if self._last_request is not None and \
                time.time() - self._last_request() < self.cooldown:
            return defer.succeed(False)
        if self._slot is None:
            return defer.succeed(self._fired(now))
        d: defer.Deferred[bool] = self._slot(self.cooldown_ms)
        return d.addCallback(lambda free: free and self._fired(now))

    def _fired(self, now: float) -> bool:
        self._last = now
        if self._note is not None:
            self._note()
        self.scheduler.trigger()
        return True


def _plugin(key: str, spec: str, interface: Any, config: Config) -> Any:
    """``load_plugin`` with the failure named by its config key (twistd and check-config
    print it instead of a bare "No module named ...")."""
    try:
        return load_plugin(spec, interface, config)
    except Exception as exc:
        raise ConfigError([f"{key}: cannot load {spec!r}: {type(exc).__name__}: {exc}"]) from exc


class SpoolBouncer(Bouncer):
    """Queues RFC 3464 notices through the same spool (see outbound.dsn)."""

    def __init__(self, spool: ISpool, hostname: str, clock: Any,
                 metrics: Metrics | None = None) -> None:
        self.spool = spool
        self.hostname = hostname
        self.clock = clock
        self.metrics = metrics

    @defer.inlineCallbacks
    def _notify(self, entry: Any, message_path: str, results: Any, action: str) -> Any:
        from kotlin_smtp_py.outbound import dsn

        wanted = [(r, s) for r, s in results if dsn.should_send_dsn(entry.envelope, r, action)]
        if not wanted:
            return None
        with open(message_path, "rb") as fh:
            original = fh.read()
        now = float(self.clock.seconds())
        body = dsn.build_dsn(entry, wanted, action, self.hostname, original, now)
        try:
            notice = yield self.spool.enqueue(dsn.dsn_envelope(entry), body)
        except MessageTooLarge:
            # The notice (the message plus the report) can outgrow what the spool takes
            # (smtp.spool.redis.maxRawBytes) although the message itself fit: return only its
            # header, as RET=HDRS would, rather than never telling the sender.
            body = dsn.build_dsn(entry, wanted, action, self.hostname, original, now,
                                 headers_only=True)
            notice = yield self.spool.enqueue(dsn.dsn_envelope(entry), body)
        if self.metrics is not None:
            self.metrics.spool_queued()
        log.info("queued {action} DSN {dsn_id} for {queue_id} to <{sender}>", action=action,
                 dsn_id=notice.queue_id, queue_id=entry.queue_id, sender=entry.envelope.sender,
                 event="bounce")
        return None

    def notify(self, entry: Any, message_path: str, results: Any,
               action: str) -> defer.Deferred[None]:
        return self._notify(entry, message_path, results, action)  # type: ignore[no-any-return]


class SmtpService(service.MultiService):
    """The whole server as a Twisted service (what ``twistd smtp`` runs)."""

    def __init__(self, config: Config, reactor: Any = None, clock: Any = None,
                 config_path: str | None = None, cluster: ClusterRole | None = None) -> None:
        """``clock`` drives the delivery scheduler (retry timing); tests pass a task.Clock."""
        super().__init__()  # type: ignore[no-untyped-call]
        if reactor is None:
            from twisted.internet import reactor as global_reactor
            reactor = global_reactor
        self.config = config
        self.config_path = config_path
        self.reactor = reactor
        self.clock = clock if clock is not None else reactor
        self.started_at = time.time()
        self.ports: list[Any] = []
        self.factories: list[SMTPFactory] = []
        self.management_port: Any = None
        self.shutting_down = False
        # smtp.workers > 1: worker 0 (this process when twistd started it) plus spawned ones
        self.cluster = cluster
        self.supervisor: WorkerSupervisor | None = None
        self.metrics = Metrics(config.management.metrics.trackedDomains,
                               multiprocess_dir=cluster.metrics_dir if cluster else None)
        self.session_events: list[SessionEvents] = [
            MetricsSessionEvents(self.metrics)]  # type: ignore[list-item]
        self.notifier = SystemdNotifier()
        self.watchdog: WatchdogPinger | None = None
        self._request_watch: Any = None
        self._stopped: defer.Deferred[Any] | None = None
        self._build()

    # -- construction --------------------------------------------------------------------------

    def _build(self) -> None:
        c = self.config
        s = c.smtp
        self.redis: RedisClient | None = None
        if s.redis is not None and (spool_backend(c) == "redis" or s.rateLimit.backend == "redis"
                                    or s.auth.rateLimitBackend == "redis"):
            self.redis = RedisClient.from_config(s.redis, clock=self.reactor)
        self.spool: Any
        self.disk_io = DiskIO(self.reactor, threads=s.spool.ioThreads)
        if spool_backend(c) == "redis":
            assert self.redis is not None
            self.spool = RedisSpool.from_config(self.redis, c, clock=self.clock)
        else:
            self.spool = FileSpool(s.spool.dir, clock=self.clock, disk_io=self.disk_io,
                                   share=self.cluster.index if self.cluster else 0,
                                   shares=self.cluster.count if self.cluster else 1)
        self.auth_checker: Any = None
        if s.auth.enabled:
            self.auth_checker = _plugin("smtp.plugins.authService", s.plugins.authService,
                                        IAuthChecker, c) \
                if s.plugins.authService else \
                UserTableChecker(s.auth.users, s.auth.allowPlaintextPasswords)
        self.directory = LocalDirectory(
            s.storage.mailboxDir, s.storage.listsDir,
            auth_user=(self.auth_checker.has_user if self.auth_checker else lambda _: False))
        local_domains = s.routing.all_local_domains()
        routing_policy = _plugin("smtp.plugins.routingPolicy", s.plugins.routingPolicy,
                                 IInboundRoutingPolicy, c) \
            if s.plugins.routingPolicy else None
        self.local_delivery: Any = DeliveryWithDeadline(
            _plugin("smtp.plugins.localDelivery", s.plugins.localDelivery, IDelivery, c),
            s.plugins.localDeliveryTimeoutSeconds, self.clock) \
            if s.plugins.localDelivery else \
            LocalDelivery(self.directory, lambda d: self.router.is_local_domain(d),
                          resubmit=self._resubmit, run_in_thread=self.disk_io.submit)
        self._trusted_networks = CidrSet(s.relay.allowedClientCidrs)
        relay: RelayDelivery | None = None
        self.relay_policy: RelayAccessPolicy | None = None
        self.tls_reporter: Any = None  # TLS-RPT (RFC 8460), outboundPolicy.tlsRpt.enabled
        if s.relay.enabled:
            relay = RelayDelivery.from_config(c, self.reactor, clock=self.clock)
            self.tls_reporter = relay.tls_reporter(self._submit_report)
            try:
                self.relay_policy = RelayAccessPolicy.from_config(s.relay)
            except Exception as exc:
                raise ConfigError([f"smtp.relay.rules: {exc}"]) from exc
        self.relay = relay
        self.router = DeliveryRouter(local_domains, self.local_delivery, relay,
                                     relay.route_key if relay is not None else None,
                                     routing_policy)
        self.recipient_policy = RecipientPolicy(self.router.is_local_domain, self.directory,
                                                self._relay_allowed if relay else None)
        self.bouncer = SpoolBouncer(self.spool, s.hostname, self.clock, self.metrics)
        spool_events = MetricsSpoolEvents(self.metrics)
        self.scheduler = Scheduler(
            self.spool, self.router, self.bouncer, max_retries=s.spool.maxRetries,
            retry_delay_seconds=s.spool.retryDelaySeconds, concurrency=s.spool.workerConcurrency,
            delay_warning_seconds=s.spool.delayWarningSeconds,
            clock=self.clock, events=spool_events,  # type: ignore[arg-type]
            archiver=self._archive_sent)
        self.direct_delivery: DirectLocalDelivery | None = None
        if s.spool.directLocalDelivery and isinstance(self.spool, FileSpool) and \
                isinstance(self.local_delivery, LocalDelivery):
            local = self.local_delivery
            self.direct_delivery = DirectLocalDelivery(
                local, lambda rcpt: self.router.route(rcpt)[1] is local,
                spool_events)  # type: ignore[arg-type]
            self.spool.direct = self.direct_delivery
        self.metrics.pending_fn = self.spool.pending_count
        backend = spool_backend(c)
        self.readiness = Readiness([SpoolIndicator(self.spool, backend=backend)])
        if backend == "file":
            self.readiness.add(DiskSpaceIndicator([s.spool.dir, s.storage.mailboxDir]))
        else:
            self.readiness.add(DiskSpaceIndicator([s.storage.tempDir, s.storage.mailboxDir]))
        if self.redis is not None:
            self.readiness.add(RedisHealthIndicator(self.redis))
        self.health_indicators = [FunctionIndicator("listeners", self._listeners_health)]
        self.trigger_gate = TriggerGate(self.scheduler, s.spool.triggerCooldownMillis,
                                        self.reactor, self.spool)
        self.tls_context = ReloadableTLS(build_tls_context(c)) if s.ssl.enabled else None
        self._build_plugins()

    def _archive_owner(self, session: SessionInfo, sender: Address | None) -> str | None:
        """sentArchive: TRUSTED_SUBMISSION = authenticated, or a trusted client (relay
        allowedClientCidrs) sending as a local user; AUTHENTICATED_ONLY = authenticated only."""
        mode = self.config.smtp.sentArchive.mode
        if mode == "DISABLED":
            return None
        if session.auth_user is not None:
            # alice@localhost is alice; alice@partner.test is nobody here (its copy went into
            # the local alice's sent folder).
            local, at, domain = session.auth_user.rpartition("@")
            if at and not self.router.is_local_domain(domain):
                return None
            owner = self.directory.resolve(local if at else session.auth_user)
        elif mode != "TRUSTED_SUBMISSION" or sender is None:
            return None
        elif not self.router.is_local_domain(sender.domain) or \
                not self._trusted(session.peer_ip):
            return None
        else:
            owner = self.directory.resolve(sender.local)
        if owner is None or self.directory.list_path(owner) is not None:
            return None  # a list has no one to read its sent/ folder
        return owner

    def _trusted(self, peer_ip: str) -> bool:
        return self._trusted_networks.contains(peer_ip)

    def _archive_sent(self, entry: Any, message_path: str) -> defer.Deferred[Any]:
        owner = entry.envelope.archive_owner
        root = os.path.join(self.config.smtp.storage.mailboxDir, owner, "sent")
        name = maildir_name(entry.queue_id, "sent:" + owner, entry.envelope.received_at)
        return self.disk_io.submit(write_maildir, root, name, b"", message_path)

    def _relay_allowed(self, session: SessionInfo, sender: Address | None,
                       recipient: Address) -> bool:
        assert self.relay_policy is not None
        return self.relay_policy.relay_allowed(session.peer_ip, session.authenticated, sender,
                                               recipient, session.auth_user)

    def _submit_report(self, envelope: Any, data: bytes) -> defer.Deferred[Any]:
        """Queue a message we generate (TLS-RPT reports, list expansions); start a run."""
        d: defer.Deferred[Any] = self.spool.enqueue(envelope, data)

        def queued(entry: Any) -> Any:
            self.metrics.spool_queued()
            self.scheduler.trigger()
            return entry

        return d.addCallback(queued)

    def _resubmit(self, envelope: Any, message_path: str) -> defer.Deferred[Any]:
        """List expansion: remote members leave as a new entry with the same message."""
        with open(message_path, "rb") as fh:
            return self._submit_report(envelope, fh.read())

    def _build_plugins(self) -> None:
        """Limiters and extension points from ``smtp.rateLimit``/``smtp.auth``/``smtp.plugins``."""
        c = self.config
        s = c.smtp
        processes = self.cluster.count if self.cluster else 1
        limiters = make_limiters(split_local_limits(c, processes), self.redis, clock=self.reactor)
        v6 = s.rateLimit.ipv6PrefixLength
        self.connection_limiter = ExemptingConnectionLimiter(limiters.connections,
                                                             s.rateLimit.exemptCidrs, v6)
        self.message_limiter = ExemptingMessageRateLimiter(limiters.messages,
                                                           s.rateLimit.exemptCidrs, v6)
        self.auth_limiter = PrefixAuthFailureLimiter(limiters.auth, v6) if v6 < 128 else \
            limiters.auth
        p = s.plugins
        self.interceptors = None
        if p.commandInterceptors:
            loaded = [_plugin(f"smtp.plugins.commandInterceptors[{i}]", spec,
                              ICommandInterceptor, c)
                      for i, spec in enumerate(p.commandInterceptors)]
            try:
                self.interceptors = InterceptorChain(loaded)
            except Exception as exc:  # e.g. a stage name that does not exist
                raise ConfigError([f"smtp.plugins.commandInterceptors: {exc}"]) from exc
        if p.eventHooks:
            self.session_events.append(EventHooks(  # type: ignore[arg-type]
                [_plugin(f"smtp.plugins.eventHooks[{i}]", spec, IEventHook, c)
                 for i, spec in enumerate(p.eventHooks)]))

    def make_factory(self, listener: Any) -> SMTPFactory:
        s = self.config.smtp
        factory = SMTPFactory(
            listener=listener, hostname=s.hostname, primary_domain=s.routing.localDomain,
            spool=self.spool, recipient_policy=self.recipient_policy,
            auth_checker=self.auth_checker, auth_required=s.auth.required,
            max_size=self._max_size(), max_recipients=s.limits.maxRecipients,
            max_line=s.limits.maxCommandLineLength, tls_context=self.tls_context,
            handshake_timeout_ms=s.ssl.handshakeTimeoutMs, clock=self.reactor,
            events=self.session_events, on_accepted=self._accepted)
        if s.features.etrnEnabled:
            factory.etrn = self._etrn
        if s.features.vrfyEnabled:
            factory.vrfy = self._vrfy
        if s.features.expnEnabled:
            factory.expn = self._expn
        factory.connection_limiter = self.connection_limiter
        factory.message_limiter = self.message_limiter
        factory.auth_limiter = self.auth_limiter
        factory.auth_failure_delay = s.auth.failureDelayMs / 1000.0
        factory.pregreet_delay = listener.pregreetDelayMs / 1000.0
        factory.interceptors = self.interceptors
        factory.archive_owner = self._archive_owner  # type: ignore[method-assign]
        return factory

    def _accepted(self, entry: QueueEntry) -> None:
        if entry.delivered_directly and self.direct_delivery is not None:
            self.direct_delivery.report(entry)
        if entry.pending:
            self.scheduler.trigger()

    def _max_size(self) -> int:
        """The SIZE we advertise and enforce. A spool limit counts the stored bytes, which
        include the Received:, Message-ID: and Date: fields we add: leave room for them, so
        that a message of the advertised size is never refused after its last byte."""
        limit = self.config.smtp.limits.maxMessageSizeBytes
        spool_limit = getattr(self.spool, "max_message_bytes", None)
        if not spool_limit:
            return limit
        raw = int(spool_limit)
        return min(limit, max(raw - ADDED_HEADER_ROOM, raw // 2))

    def _local_name(self, arg: str) -> str | None:
        """``alice``, ``<alice@localhost>`` or ``alice@localhost`` → the local name, if any."""
        text = arg.strip().strip("<>")
        local, at, domain = text.rpartition("@")
        if not at:
            local = text
        elif not self.router.is_local_domain(domain):
            return None
        return self.directory.resolve(local) if local else None

    def _vrfy(self, session: SMTPServerProtocol, arg: str) -> SmtpReply:
        if not arg:
            return SmtpReply(501, "5.5.4", "Syntax: VRFY address")
        if self._local_name(arg) is None:
            return SmtpReply(550, "5.1.1", "User unknown")
        return SmtpReply(252, "2.5.0", "User exists; send mail to attempt delivery")

    def _expn(self, session: SMTPServerProtocol, arg: str) -> SmtpReply:
        if not arg:
            return SmtpReply(501, "5.5.4", "Syntax: EXPN list")
        if session.session_info().auth_user is None:
            return SmtpReply(530, "5.7.0", "Authentication required for EXPN")
        name = self._local_name(arg) if arg else None
        path = self.directory.list_path(name) if name else None
        if path is None:
            return SmtpReply(550, "5.1.1", "No such list")
        members = read_list(path)
        return SmtpReply(250, "2.1.5", "\n".join(f"<{m}>" for m in members) or "(empty list)")

    def _etrn(self, session: SMTPServerProtocol, arg: str) -> Any:
        if not arg:
            return SmtpReply(501, "5.5.4", "Syntax: ETRN domain")
        user = session.session_info().auth_user
        if user is None:
            return SmtpReply(530, "5.7.0", "Authentication required for ETRN")
        refused = SmtpReply(458, "4.3.0", "Unable to queue messages now, try again later")

        def unavailable(f: Failure) -> SmtpReply:
            log.warn("ETRN {domain} by {user} refused: {error}", domain=arg, user=user,
                     error=f.getErrorMessage(), peer=session.peer_ip, event="etrn_refused")
            return refused

        d = self.trigger_gate.fire()
        d.addCallback(lambda fired: self._etrn_fired(session, arg, user, fired) if fired
                      else self._etrn_cooldown(session, arg, user, refused))
        return d.addErrback(unavailable)

    def _etrn_cooldown(self, session: SMTPServerProtocol, arg: str, user: str,
                       refused: SmtpReply) -> SmtpReply:
        log.info("ETRN {domain} by {user} refused: cooldown", domain=arg, user=user,
                 peer=session.peer_ip, event="etrn_refused")
        return refused

    def _etrn_fired(self, session: SMTPServerProtocol, arg: str, user: str,
                    fired: bool) -> SmtpReply:
        # A bare trigger only runs entries already due; ETRN means "retry this domain's
        # deferred mail now" (RFC 1985), like `queue flush` restricted to the domain.
        # Logged (event etrn) so that operators can watch how often it is used.
        self._etrn_release(arg).addCallbacks(
            lambda n: log.info("ETRN {domain} by {user}: {n} entries due now", domain=arg,
                               user=user, n=n, peer=session.peer_ip, event="etrn"),
            lambda f: log.failure("ETRN {arg} failed", f, arg=arg))
        return SmtpReply(250, "2.0.0", "Queuing started")

    @defer.inlineCallbacks
    def _etrn_release(self, arg: str) -> Any:
        """Make entries with a pending recipient in ``arg`` due now (``@dom``: subdomains too)."""
        wanted = arg.strip().lower().rstrip(".")
        subdomains = wanted.startswith("@")
        wanted = wanted.lstrip("@")
        released = 0
        for e in (yield self.spool.list_entries()):
            domains = {r.rpartition("@")[2].lower() for r in e.recipients}
            if any(d == wanted or (subdomains and d.endswith("." + wanted)) for d in domains):
                released += yield self.spool.retry_now(e.queue_id)
        if released:
            self.scheduler.trigger()
        return released

    # -- lifecycle -----------------------------------------------------------------------------

    def startService(self) -> None:
        super().startService()  # type: ignore[no-untyped-call]
        s = self.config.smtp
        self._inherited = systemd_listen_fds()
        for i, listener in enumerate(s.effective_listeners()):
            factory = self.make_factory(listener)
            outer: Any = factory
            if listener.implicitTls:
                outer = TLSMemoryBIOFactory(self.tls_context, False, outer)  # type: ignore[arg-type]
            if listener.proxyProtocol:  # the PROXY header comes before any TLS bytes
                outer = ProxyWrappingFactory(outer, s.proxy.trustedCidrs, self.reactor)
            try:
                port = self._listen(len(self.ports), listener, outer)
            except CannotListenError as exc:
                self._cannot_listen(f"smtp.listeners[{i}]" if s.listeners else "smtp.port",
                                    listener.bindAddress, listener.port, exc)
            self.factories.append(factory)
            self.ports.append(port)
            log.info("listening for SMTP on {address}:{port}{tls}",
                     address=listener.bindAddress, port=port.getHost().port,
                     tls=" (implicit TLS)" if listener.implicitTls else "")
        m = self.config.management
        is_worker = self.cluster is not None and not self.cluster.is_parent
        if m.enabled and not is_worker:
            # Bound before any worker is spawned, so that a port in use stops start-up
            # with one line instead of leaving workers behind a traceback.
            site = make_management_site(self.config, self.metrics, self.health_indicators,
                                        self.readiness, clock=self.reactor)
            try:
                self.management_port = self.reactor.listenTCP(m.server.port, site,
                                                              interface=m.server.bindAddress)
            except CannotListenError as exc:
                self._cannot_listen("management.server", m.server.bindAddress, m.server.port,
                                    exc)
            log.info("management HTTP on {address}:{port}", address=m.server.bindAddress,
                     port=self.management_port.getHost().port)
        self.scheduler.start()
        if self.cluster is not None and not self.cluster.is_parent:
            log.info("SMTP worker {index} of {count} serving", index=self.cluster.index,
                     count=self.cluster.count, event="worker_ready")
            self._install_sighup()  # the parent forwards SIGHUP: workers reload their TLS too
            mark_reload_ready(self.cluster.metrics_dir)
            return  # management, operator requests and TLS-RPT belong to the parent
        if self.cluster is not None and self._inherited:
            log.warn("socket activation: systemd owns the listening sockets, so the extra "
                     "SMTP workers are not started (set smtp.workers: 1)")
        elif self.cluster is not None:
            assert self.config_path is not None
            shared = self.config.smtp.workerSockets == "shared"
            self.supervisor = WorkerSupervisor(
                self.reactor, self.cluster, self.config_path,
                [p.getHost().port for p in self.ports],
                listen_fds=[p.fileno() for p in self.ports] if shared else None)
            self.supervisor.start()
        if self.tls_reporter is not None:
            self.tls_reporter.start()
        self._request_watch = self.reactor.callLater(1.0, self._watch_requests)
        self._install_sighup()
        self.notifier.ready()
        self.watchdog = WatchdogPinger.from_environment(self.notifier, self.reactor)
        if self.watchdog is not None:
            self.watchdog.start()

    def reload(self) -> bool:
        """SIGHUP: re-read the config file; swap TLS certificates and the users table.

        Listeners, sessions and the spool are untouched; other changed keys need a restart
        (they are logged). A config that fails validation changes nothing."""
        from kotlin_smtp_py import config as cfg
        from kotlin_smtp_py.log import reopen_outputs

        reopen_outputs()  # logging.file after logrotate renamed it (whatever the config says)
        if self.supervisor is not None:
            import signal

            # Only to workers whose handler is in place: SIGHUP's default action would kill a
            # worker still starting (which reads the current files anyway).
            self.supervisor.signal_all(signal.SIGHUP, only_reload_ready=True)
        if self.config_path is None:
            log.warn("reload requested but the server was started without a config file")
            return False
        try:
            new = cfg.load(self.config_path)
            tls = build_tls_context(new) if new.smtp.ssl.enabled else None
        except Exception as exc:
            log.error("reload failed, keeping the running configuration: {error}",
                      error=str(exc), event="reload_failed")
            return False
        applied = ["users"]
        if tls is not None and self.tls_context is not None:
            self.tls_context.current = tls
            applied.insert(0, "TLS certificates")
        if isinstance(self.auth_checker, UserTableChecker):
            self.auth_checker.replace(new.smtp.auth.users, new.smtp.auth.allowPlaintextPasswords)
        running = cfg.leaf_values(self.config)
        changed = sorted(k for k, v in cfg.leaf_values(new).items()
                         if running.get(k) != v and not _reloadable(k, tls is not None and
                                                                    self.tls_context is not None))
        if changed:
            # Say so rather than let the operator believe the change is live.
            log.warn("reload: changed keys that need a restart to take effect: {keys}",
                     keys=", ".join(changed[:20]) + (" ..." if len(changed) > 20 else ""),
                     event="reload_needs_restart")
        log.info("reloaded {what} from {path}", what=" and ".join(applied),
                 path=self.config_path, event="reloaded")
        return True

    def _install_sighup(self) -> None:
        import signal
        import threading

        if threading.current_thread() is not threading.main_thread():
            return  # tests run the reactor in a thread; they call reload() directly

        def handler(signum: int, frame: Any) -> None:
            self.reactor.callFromThread(self.reload)

        signal.signal(signal.SIGHUP, handler)

    def _cannot_listen(self, key: str, address: str, port: int, exc: Exception) -> NoReturn:
        """A port in use, an address this host lacks: one line naming the key, the ports
        already open closed, exit 1 (it was a 30-line traceback from inside twistd)."""
        reason = getattr(exc, "socketError", None) or exc
        why = getattr(reason, "strerror", None) or str(reason)
        for p in self.ports:
            p.stopListening()
        sys.stderr.write(f"kotlin-smtp: cannot start: {key}: cannot listen on "
                         f"{address or '*'}:{port}: {why}\n")
        sys.stderr.flush()
        raise SystemExit(1)

    def _listen(self, index: int, listener: Any, factory: Any) -> Any:
        if index < len(self._inherited):  # socket activation: systemd owns the socket
            fd, family = self._inherited[index]
            return self.reactor.adoptStreamPort(fd, family, factory)
        if self.cluster is None:
            # Twisted's default backlog (50) drops SYNs in a burst of connections, which costs
            # each dropped client a 1 s retransmit: use the same depth as the worker sockets.
            return self.reactor.listenTCP(listener.port, factory, backlog=LISTEN_BACKLOG,
                                          interface=listener.bindAddress)
        if self.cluster.listen_fds:  # a worker on the parent's sockets (workerSockets shared)
            return adopt_listening(self.reactor, self.cluster.listen_fds[index], factory)
        if self.cluster.is_parent and self.config.smtp.workerSockets == "shared":
            return listen_shared(self.reactor, listener.bindAddress, listener.port, factory)
        # reuseport: the parent binds first (port 0 resolves there) and the workers bind the
        # parent's ports.
        port = listener.port if self.cluster.is_parent else self.cluster.ports[index]
        return listen_reuseport(self.reactor, listener.bindAddress, port, factory)

    def _listeners_health(self) -> tuple[bool, dict[str, Any]]:
        ports = [p.getHost().port for p in self.ports]
        up = bool(ports) and not self.shutting_down
        return up, {"ports": ports, "sessions": sum(len(f.sessions) for f in self.factories)}

    def smtp_port(self, index: int = 0) -> int:
        return int(self.ports[index].getHost().port)

    def _watch_requests(self) -> None:
        """Operator commands (``kotlin-smtp queue flush|retry``) leave requests in the spool."""
        poll = getattr(self.spool, "poll_requests", None)
        if poll is None:
            return
        try:
            d = poll()
            d.addCallback(self._requests_applied)
            d.addErrback(lambda f: log.failure("applying queue requests failed", f))
        finally:
            if not self.shutting_down:
                self._request_watch = self.reactor.callLater(1.0, self._watch_requests)

    def _requests_applied(self, count: int) -> None:
        if count:
            log.info("operator request: {n} entries due now", n=count, event="queue_flush")
            self.scheduler.trigger()

    @defer.inlineCallbacks
    def _graceful_stop(self) -> Any:
        self.shutting_down = True
        self.readiness.shutdown_started()
        self.notifier.stopping()
        if self.watchdog is not None:
            self.watchdog.stop()
        grace = self.config.smtp.lifecycle.gracefulShutdownTimeoutMs / 1000.0
        log.info("shutting down: draining sessions for up to {grace}s", grace=grace,
                 event="shutdown")
        if self._request_watch is not None and self._request_watch.active():
            self._request_watch.cancel()
        if self.supervisor is not None:
            self.supervisor.stop()  # workers drain in parallel with this process
        yield defer.DeferredList([defer.maybeDeferred(p.stopListening) for p in self.ports])
        for f in self.factories:
            f.begin_shutdown()
        deadline = time.monotonic() + grace
        while any(f.sessions for f in self.factories) and time.monotonic() < deadline:
            yield _sleep(self.reactor, 0.05)
        for f in self.factories:
            if f.sessions:
                log.warn("aborting {n} sessions after the grace period", n=len(f.sessions))
            f.abort_all()
        yield self.scheduler.stop(max(0.0, deadline - time.monotonic()) + 1.0)
        if self.relay is not None:
            self.relay.close_idle()
        if self.tls_reporter is not None:
            self.tls_reporter.stop()
        release_all = getattr(self.spool, "release_all", None)
        if release_all is not None:
            yield defer.maybeDeferred(release_all)
        close = getattr(self.spool, "close", None)
        if close is not None:
            close()
        self.disk_io.stop()  # sessions and deliveries are over: this only drains stragglers
        if self.redis is not None:
            yield self.redis.close()
        if self.supervisor is not None:
            yield self.supervisor.wait(grace + 5.0)
            self.supervisor.cleanup()
        if self.management_port is not None:
            yield self.management_port.stopListening()
        log.info("shutdown complete", event="shutdown_complete")
        # A clean drain after SIGTERM/SIGINT is a normal exit (status 0), not death by signal:
        # twistd would otherwise re-raise the signal it caught once the reactor stops. Cleared
        # again at the very end, in case a second SIGTERM arrived during the drain.
        self._clear_exit_signal()
        self.reactor.addSystemEventTrigger("after", "shutdown", self._clear_exit_signal)

    def _clear_exit_signal(self) -> None:
        if getattr(self.reactor, "_exitSignal", None) is not None:
            self.reactor._exitSignal = None

    def stopService(self) -> defer.Deferred[None]:
        if self._stopped is None:
            d: defer.Deferred[Any] = defer.maybeDeferred(super().stopService)
            d.addCallback(lambda _: self._graceful_stop())
            self._stopped = d
            # Later callers (SIGTERM twice, test teardown) wait for the same drain.
            return d
        done: defer.Deferred[None] = defer.Deferred()

        def chain(result: object) -> object:
            done.callback(None)
            return result

        self._stopped.addBoth(chain)
        return done


def _sleep(clock: Any, seconds: float) -> defer.Deferred[None]:
    d: defer.Deferred[None] = defer.Deferred()
    clock.callLater(seconds, d.callback, None)
    return d


def build_service(config: Config, config_path: str | None = None,
                  cluster: ClusterRole | None = None) -> SmtpService:
    return SmtpService(config, config_path=config_path, cluster=cluster)
