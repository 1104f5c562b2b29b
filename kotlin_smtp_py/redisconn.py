"""Redis connections: one txredisapi connection built from ``smtp.redis``, every command bounded.

What this module guarantees to its users (spool, rate limiters, health):

- Replies are raw: ``charset=None, convertNumbers=False``. Bulk strings come back as ``bytes``,
  integers as ``int``, status replies (``OK``) as ``str``. Callers decode what they need.
- Every command has a deadline (``commandTimeoutMs``). txredisapi queues commands while the
  connection is down and they would hang until Redis returns; here a command issued while no
  connection is up waits for the reconnect within its deadline (a restart, a Sentinel failover,
  the first connection at start-up: the SMTP client gets its 250 instead of a 451 and a retry
  minutes later), in the order the commands were issued. Once Redis has been unreachable for
  longer than one deadline (an outage, not a blip), commands fail at once with
  :class:`RedisUnavailable` rather than each holding its caller for the deadline; the health
  check (``ping``) never waits. A server that does not answer fails the command at the
  deadline. The caller turns that into ``451 4.3.0`` / readiness DOWN. Late replies to
  timed-out commands are consumed in order and dropped, so the connection stays in sync.
- txredisapi reconnects by itself (backoff capped at :data:`RECONNECT_MAX_DELAY` seconds); work
  resumes when Redis returns without anyone reconnecting by hand.
- Lua scripts run with EVALSHA and fall back to EVAL when the server answers NOSCRIPT (after a
  restart or SCRIPT FLUSH), so scripts survive reconnects. Every new connection first loads
  every script (SCRIPT LOAD), because a fallback EVAL goes out behind commands issued after
  the EVALSHA and would reorder them (a writer's staged chunks, for one).
- :meth:`RedisClient.connection` pins one connection for commands that must share it (a write
  followed by ``WAIT`` for replicas).

Only ``redis://``/``rediss://`` URLs and Sentinel are supported; Redis Cluster is not.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import txredisapi
from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from kotlin_smtp_py.config import RedisConfig
from kotlin_smtp_py.interfaces import BackendUnavailable, IHealthIndicator

log = Logger()

RECONNECT_INITIAL_DELAY = 0.2
RECONNECT_MAX_DELAY = 2.0
RECONNECT_POLL = 0.05  # how often commands waiting for a connection look for one


class RedisUnavailable(BackendUnavailable):
    """Redis cannot be reached right now (not connected, connection lost, or deadline passed)."""


class RedisTimedOut(RedisUnavailable):
    """A command's deadline passed: it may still run on the server (a reply lost or late)."""


class RedisAuthRefused(RedisUnavailable):
    """Redis refused our credentials (WRONGPASS/NOAUTH): a configuration error, not an
    outage (a server keeps retrying either way; a one-shot command should not)."""


def _auth_refused(text: str) -> bool:
    return "WRONGPASS" in text or "NOAUTH" in text


@dataclass(frozen=True)
class RedisTarget:
    """Where and how to connect, parsed from :class:`RedisConfig`."""

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    tls: bool = False
    tls_ca_file: str | None = None
    tls_verify: bool = True
    sentinels: tuple[tuple[str, int], ...] = ()
    master_name: str = ""

    def describe(self) -> str:
        """Human-readable target without secrets (for logs and errors)."""
        if self.sentinels:
            hosts = ",".join(f"{h}:{p}" for h, p in self.sentinels)
            return f"sentinel master {self.master_name!r} via {hosts} db {self.db}"
        scheme = "rediss" if self.tls else "redis"
        return f"{scheme}://{self.host}:{self.port}/{self.db}"


def _split_host_port(text: str, default_port: int) -> tuple[str, int]:
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    else:
        host, port = text, ""
    return host, int(port) if port else default_port


def parse_target(config: RedisConfig) -> RedisTarget:
    """Parse ``url`` (``redis://[user][:password@]host:port/db``, ``rediss://`` for TLS; query
    ``ssl_ca_certs=/path`` and ``ssl_cert_reqs=none`` as in redis-py) or ``sentinels`` +
    ``masterName``. ``smtp.redis.password`` overrides a password in the URL.
    Raises ValueError naming the bad key."""
    parts = urlsplit(config.url or "redis://127.0.0.1:6379/0")
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"smtp.redis.url: scheme must be redis:// or rediss://, got "
                         f"{parts.scheme!r}")
    try:
        port = parts.port or 6379
    except ValueError:
        raise ValueError("smtp.redis.url: invalid port") from None
    path = parts.path.strip("/")
    if path and not path.isdigit():
        raise ValueError(f"smtp.redis.url: database must be a number, got {path!r}")
    query = parse_qs(parts.query)
    password = config.password or (unquote(parts.password) if parts.password else None)
    sentinels = tuple(_split_host_port(s, 26379) for s in config.sentinels if s.strip())
    if sentinels and not config.masterName:
        raise ValueError("smtp.redis.masterName: required when smtp.redis.sentinels is set")
    return RedisTarget(
        host=parts.hostname or "127.0.0.1", port=port, db=int(path or 0),
        username=unquote(parts.username) if parts.username else None,
        password=password or None, tls=parts.scheme == "rediss",
        tls_ca_file=query["ssl_ca_certs"][0] if query.get("ssl_ca_certs") else None,
        tls_verify=(query.get("ssl_cert_reqs") or ["required"])[0].lower() != "none",
        sentinels=sentinels, master_name=config.masterName)


def _tls_options(target: RedisTarget) -> Any:
    from twisted.internet import ssl

    if not target.tls_verify:
        return ssl.CertificateOptions()
    trust: Any = None
    if target.tls_ca_file:
        with open(target.tls_ca_file, "rb") as fh:
            trust = ssl.trustRootFromCertificates(  # type: ignore[no-untyped-call]
                [ssl.Certificate.loadPEM(fh.read())])
    return ssl.optionsForClientTLS(target.host, trustRoot=trust)


def _set_nodelay(conn: Any) -> None:
    """Disable Nagle: commands are small writes, and a delayed ACK would add ~40 ms to each."""
    transport = conn.transport
    for _ in range(3):  # TLS wraps the TCP transport
        if hasattr(transport, "setTcpNoDelay"):
            try:
                transport.setTcpNoDelay(True)
            except Exception:
                pass
            return
        transport = getattr(transport, "transport", None)


class _SentinelProtocol(txredisapi.SentinelRedisProtocol):  # type: ignore[misc]
    """txredisapi's check that a connection reached the master compares ROLE's first item
    with the str ``"master"``; with our raw replies (``charset=None``) it is ``b"master"``, so
    every master connection was dropped as soon as it was made and Sentinel never worked."""

    def connectionMade(self) -> Any:
        def check_role(role: Any) -> Any:
            first = role[0].decode("ascii", "replace") if isinstance(role[0], bytes) else role[0]
            if self.factory.is_master and first != "master":
                self.transport.loseConnection()
                return defer.succeed(None)
            return txredisapi.RedisProtocol.connectionMade(self)

        if self.password is not None:
            self.auth(self.password, self.username)
        return self.role().addCallback(check_role)


class _SentinelFactory(txredisapi.SentinelConnectionFactory):  # type: ignore[misc]
    protocol = _SentinelProtocol


class LuaScript:
    """A Lua script run by SHA1 (EVALSHA) with an EVAL fallback on NOSCRIPT."""

    known: dict[str, LuaScript] = {}  # by SHA1: loaded into every new connection

    def __init__(self, name: str, source: str) -> None:
        self.name = name
        self.source = source.encode("utf-8")
        self.sha = hashlib.sha1(self.source).hexdigest()
        LuaScript.known[self.sha] = self


def _first_use(conn: Any) -> None:
    """Once per connection, before its first command: Nagle off, every script loaded (the
    SCRIPT LOADs are queued ahead of whatever is sent next)."""
    conn._kotlin_ready = True
    _set_nodelay(conn)
    def failed(failure: Failure, name: str) -> None:
        log.debug("loading script {name} failed: {error}", name=name,
                  error=failure.getErrorMessage())

    for script in list(LuaScript.known.values()):
        d = defer.maybeDeferred(conn.execute_command, "SCRIPT", "LOAD", script.source)
        d.addErrback(failed, script.name)


class RedisClient:
    """A txredisapi handler with deadlines. Create with :func:`connect` or :meth:`from_config`."""

    def __init__(self, handler: Any, target: RedisTarget, command_timeout: float,
                 clock: IReactorTime, sentinel: Any = None) -> None:
        self._handler = handler
        self._factory = handler._factory
        self._factory.initialDelay = RECONNECT_INITIAL_DELAY
        self._factory.maxDelay = RECONNECT_MAX_DELAY
        self.target = target
        self.command_timeout = command_timeout
        self.clock = clock
        self._sentinel = sentinel
        self._closed = False
        # Since when no connection has been seen up (None: one is up). Start-up counts as a
        # disconnect, so commands issued before the first connection wait for it.
        self._down_since: float | None = clock.seconds()
        self._waiters: deque[tuple[defer.Deferred[Any], float]] = deque()
        self._poll_call: Any = None
        # txredisapi stops reconnecting for good when AUTH or SELECT is refused (a password
        # rotated on Redis before our config): the node then stayed DOWN, every message
        # 451, until a restart. We keep reconnecting with the usual backoff instead, so it
        # recovers by itself once the password matches again; only close() stops it.
        stop_trying = self._factory.stopTrying

        def stop_only_when_closing() -> Any:
            if self._closed:
                return stop_trying()
            return None

        self._factory.stopTrying = stop_only_when_closing

    @classmethod
    def from_config(cls, config: RedisConfig, clock: IReactorTime | None = None) -> RedisClient:
        """Start connecting in the background (no wait); see :func:`connect` for start-up."""
        if clock is None:
            from twisted.internet import reactor
            clock = reactor  # type: ignore[assignment]
        assert clock is not None
        target = parse_target(config)
        connect_timeout = max(config.connectTimeoutMs, 1) / 1000.0
        kwargs: dict[str, Any] = dict(charset=None, convertNumbers=False,
                                      password=target.password, username=target.username)
        sentinel = None
        if target.sentinels:
            sentinel = txredisapi.Sentinel(list(target.sentinels))
            sentinel.discovery_timeout = connect_timeout
            handler = sentinel.master_for(target.master_name, _SentinelFactory,
                                          dbid=target.db, poolsize=1, **kwargs)
        else:
            handler = txredisapi.lazyConnection(
                target.host, target.port, dbid=target.db, reconnect=True,
                ssl_context_factory=_tls_options(target) if target.tls else False,
                connectTimeout=connect_timeout, **kwargs)
        return cls(handler, target, max(config.commandTimeoutMs, 1) / 1000.0, clock, sentinel)

    # -- connections -------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        return any(getattr(c, "connected", 0) for c in list(self._factory.pool))

    def _live(self) -> Any:
        """The live protocol instance, or None."""
        for conn in list(self._factory.pool):
            if getattr(conn, "connected", 0):
                if not getattr(conn, "_kotlin_ready", False):
                    _first_use(conn)
                self._down_since = None
                return conn
        return None

    def connection(self) -> Any:
        """The live protocol instance, for commands that must share one connection.
        Raises RedisUnavailable when none is up."""
        if self._closed:
            raise RedisUnavailable("redis client is closed")
        conn = self._live()
        if conn is None:
            raise RedisUnavailable(f"not connected to {self.target.describe()}")
        return conn

    def connection_soon(self, timeout: float | None = None) -> defer.Deferred[Any]:
        """The live protocol instance: now, or the first one up within ``timeout`` (default:
        the command deadline), in the order callers asked. Fails with RedisUnavailable at
        once when the client is closed or Redis has been unreachable for longer than the
        command deadline already (see the module docstring), else at ``timeout``."""
        if self._closed:
            return defer.fail(RedisUnavailable("redis client is closed"))
        conn = self._live()
        if conn is not None:
            return defer.succeed(conn)
        now = self.clock.seconds()
        if self._down_since is None:
            self._down_since = now
        if now - self._down_since >= self.command_timeout:
            return defer.fail(RedisUnavailable(f"not connected to {self.target.describe()}"))
        wait = self.command_timeout if timeout is None else timeout

        def forget(d: defer.Deferred[Any]) -> None:
            self._waiters = deque(w for w in self._waiters if w[0] is not d)

        d: defer.Deferred[Any] = defer.Deferred(forget)
        self._waiters.append((d, now + wait))
        if self._poll_call is None:
            self._poll_call = self.clock.callLater(RECONNECT_POLL, self._poll)
        return d

    def _poll(self) -> None:
        self._poll_call = None
        conn = self._live()
        if conn is not None:
            # All at once and in order: a writer's staged chunks must reach Redis in the
            # order they were written.
            waiters, self._waiters = self._waiters, deque()
            for d, _ in waiters:
                d.callback(conn)
            return
        now = self.clock.seconds()
        expired = [d for d, deadline in self._waiters if deadline <= now]
        if expired:
            self._waiters = deque(w for w in self._waiters if w[1] > now)
            for d in expired:
                d.errback(RedisUnavailable(f"not connected to {self.target.describe()}"))
        if self._waiters:
            self._poll_call = self.clock.callLater(RECONNECT_POLL, self._poll)

    def close(self) -> defer.Deferred[Any]:
        """Stop reconnecting and close the connection."""
        self._closed = True
        if self._poll_call is not None:
            self._poll_call.cancel()
            self._poll_call = None
        waiters, self._waiters = self._waiters, deque()
        for d, _ in waiters:
            d.errback(RedisUnavailable("redis client is closed"))
        ds = [defer.maybeDeferred(self._handler.disconnect)]
        if self._sentinel is not None:
            ds.append(defer.maybeDeferred(self._sentinel.disconnect))
        return defer.gatherResults(ds, consumeErrors=True)

    # -- commands ----------------------------------------------------------------------------

    def _deadline(self, d: defer.Deferred[Any], what: str, timeout: float) -> defer.Deferred[Any]:
        d.addTimeout(timeout, self.clock)

        def translate(failure: Any) -> Any:
            if failure.check(defer.TimeoutError, defer.CancelledError):
                raise RedisTimedOut(f"redis {what} timed out after {timeout:g}s")
            if failure.check(txredisapi.ConnectionError):
                raise RedisUnavailable(f"redis {what} failed: {failure.getErrorMessage()}")
            return failure

        return d.addErrback(translate)

    def _on_connection(self, conn: Any, what: str, timeout: float, wait: bool,
                       call: Callable[[Any], Any]) -> defer.Deferred[Any]:
        """``call(connection)`` under one deadline that also covers waiting for the
        connection (``wait``; else RedisUnavailable at once when none is up)."""
        if conn is None and not self._closed:
            conn = self._live()
        if conn is not None:
            return self._deadline(defer.maybeDeferred(call, conn), what, timeout)
        if not wait:
            try:
                self.connection()
            except RedisUnavailable as exc:
                return defer.fail(exc)
        started = self.clock.seconds()

        def run(c: Any) -> defer.Deferred[Any]:
            left = max(timeout - (self.clock.seconds() - started), 0.001)
            return self._deadline(defer.maybeDeferred(call, c), what, left)

        return self.connection_soon(timeout).addCallback(run)

    def execute(self, *args: Any, conn: Any = None, timeout: float | None = None,
                wait: bool = True) -> defer.Deferred[Any]:
        """Run one command; fails with RedisUnavailable past the deadline, or when no
        connection comes up in time (``wait`` False: at once). ``conn`` pins the connection
        (see :meth:`connection`)."""
        what = str(args[0]) if args else "command"
        return self._on_connection(
            conn, what, timeout if timeout is not None else self.command_timeout, wait,
            lambda c: c.execute_command(*args))

    def eval(self, script: LuaScript, keys: list[Any], args: list[Any],
             conn: Any = None) -> defer.Deferred[Any]:
        """Run a Lua script (EVALSHA, EVAL on NOSCRIPT) under one deadline."""
        keys_and_args = [len(keys), *keys, *args]

        def call(c: Any) -> defer.Deferred[Any]:
            def noscript(failure: Any) -> Any:
                if failure.check(txredisapi.ResponseError) and \
                        str(failure.value).startswith("NOSCRIPT"):
                    return c.execute_command("EVAL", script.source, *keys_and_args)
                return failure

            d = defer.maybeDeferred(c.execute_command, "EVALSHA", script.sha, *keys_and_args)
            return d.addErrback(noscript)

        return self._on_connection(conn, f"script {script.name}", self.command_timeout, True,
                                   call)

    async def ping(self) -> tuple[bool, str]:
        """Health check: (True, "ok") or (False, reason). Never raises."""
        started = time.monotonic()
        try:
            reply = await self.execute("PING", wait=False)
        except Exception as exc:  # any failure means DOWN
            return False, str(exc) or type(exc).__name__
        if reply not in ("PONG", b"PONG"):
            return False, f"unexpected PING reply {reply!r}"
        ms = (time.monotonic() - started) * 1000
        return True, f"ok ({ms:.1f} ms)"

    async def wait_ready(self, timeout: float) -> None:
        """Poll PING until it succeeds or ``timeout`` seconds pass (RedisUnavailable)."""
        from twisted.internet import task

        deadline = self.clock.seconds() + timeout
        first = self._factory.deferred
        if first is not None and not self.connected:
            # fires when the first connection is ready; never cancel txredisapi's own Deferred
            ready: defer.Deferred[Any] = defer.Deferred()

            def fired(result: Any) -> None:
                if not ready.called:
                    ready.callback(result.value if isinstance(result, Failure) else None)

            first.addBoth(fired)  # also consumes a connection error (e.g. AUTH refused)
            ready.addTimeout(timeout, self.clock)
            try:
                result = await ready
            except defer.TimeoutError:
                result = None
            if isinstance(result, Exception):
                raise RedisUnavailable(f"Redis at {self.target.describe()} refused the "
                                       f"connection: {result}")
        reason = "no answer"
        while True:
            ok, reason = await self.ping()
            if ok:
                return
            if self.clock.seconds() >= deadline:
                raise RedisUnavailable(
                    f"Redis at {self.target.describe()} is unreachable after {timeout:g}s: "
                    f"{reason}")
            await task.deferLater(self.clock, 0.05, lambda: None)


async def connect(config: RedisConfig, clock: IReactorTime | None = None) -> RedisClient:
    """Start-up helper: connect and wait for PING within ``connectTimeoutMs``.

    Raises :class:`RedisUnavailable` naming the target (never the password) when Redis cannot be
    reached, and ValueError for a malformed ``smtp.redis`` section."""
    client = RedisClient.from_config(config, clock)
    try:
        await client.wait_ready(max(config.connectTimeoutMs, 1) / 1000.0)
    except RedisUnavailable as exc:
        await client.close()
        if _auth_refused(str(exc)):
            raise RedisAuthRefused(str(exc)) from None
        raise
    except BaseException:
        await client.close()
        raise
    log.info("connected to {target}", target=client.target.describe())
    return client


@implementer(IHealthIndicator)
class RedisHealthIndicator:
    """The ``redis`` component of /actuator/health: UP when PING answers within the deadline."""

    name = "redis"

    def __init__(self, client: RedisClient) -> None:
        self.client = client

    def health(self) -> defer.Deferred[tuple[bool, dict[str, Any]]]:
        async def check() -> tuple[bool, dict[str, Any]]:
            ok, reason = await self.client.ping()
            return ok, {"target": self.client.target.describe(), "detail": reason}

        return defer.Deferred.fromCoroutine(check())
