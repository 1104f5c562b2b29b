"""Rate limiters: per-IP connections, per-IP messages per hour, AUTH failure lockouts.

Three small interfaces, each with an in-process backend (``local``) and a Redis backend
(``redis``, limits shared by every node). :func:`make_limiters` picks them from
``smtp.rateLimit.backend`` and ``smtp.auth.rateLimitBackend``.

Invariants:
- Local state is bounded: entries live only while they matter (open connections, the current
  window, an active lockout) and expired ones are swept at most every :data:`SWEEP_SECONDS` and
  whenever the table grows past :data:`MAX_LOCAL_ENTRIES` (then the oldest entries go first).
- Redis keys: ``<prefix>:conn:<ip>`` (open connections, one count per node) with
  ``<prefix>:node:<id>`` liveness keys (TTL ``connectionCounterTtlSeconds``, heartbeat while the
  node holds connections, so a crashed node's counts expire), ``<prefix>:msg:<ip>:<window>``
  (messages in the current hour), ``<auth prefix>:fail:{ip|user}:<x>`` (failures in the window)
  and ``<auth prefix>:lock:{ip|user}:<x>`` (lockout). Every check is one atomic Lua call.
- AUTH failures are counted per client IP and per username separately; either reaching
  ``rateLimitMaxFailures`` within ``rateLimitWindowSeconds`` locks that IP / that username for
  ``rateLimitLockoutSeconds``; ``reset`` (after a successful AUTH) clears both counters.
- Redis backends fail open: while Redis is unreachable, checks allow and a warning is logged
  (the spool refuses mail then anyway). A connection that was not counted in Redis is not
  decremented on release.
- A limit of 0 or less means unlimited.
"""

from __future__ import annotations

import math
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from zope.interface import Interface, implementer

from kotlin_smtp_py.config import Config
from kotlin_smtp_py.netutil import CidrSet, client_key
from kotlin_smtp_py.redisconn import LuaScript, RedisClient, RedisTimedOut

log = Logger()

SWEEP_SECONDS = 60.0
MAX_LOCAL_ENTRIES = 100_000
HOUR = 3600.0


class IConnectionLimiter(Interface):
    """Concurrent connections per client IP."""

    def acquire(ip: str) -> Any:
        """Deferred[bool]: True when the connection may proceed (then call ``release`` once)."""

    def release(ip: str) -> None:
        """The connection from ``ip`` ended."""


class IMessageRateLimiter(Interface):
    """Messages per client IP per hour."""

    def allow_message(ip: str) -> Any:
        """Deferred[bool]: count one message from ``ip``; False when over the hourly limit."""


class IAuthFailureLimiter(Interface):
    """AUTH brute-force protection per client IP and per username."""

    def is_locked(ip: str, username: str | None) -> Any:
        """Deferred[bool]: AUTH from this IP or for this user is locked out."""

    def record_failure(ip: str, username: str | None) -> Any:
        """Deferred[bool]: count a failed AUTH; True when this failure caused a lockout."""

    def reset(ip: str, username: str | None) -> Any:
        """Deferred[None]: forget the failures (after a successful AUTH)."""


def _default_clock(clock: IReactorTime | None) -> IReactorTime:
    if clock is None:
        from twisted.internet import reactor
        clock = reactor  # type: ignore[assignment]
    assert clock is not None
    return clock


def _user_key(username: str | None) -> str | None:
    return username.strip().lower() if username and username.strip() else None


# ---------------------------------------------------------------------------------------------
# Local backends


class ExpiringTable:
    """key -> (value, expires_at), bounded; expired entries are swept lazily."""

    def __init__(self, clock: IReactorTime, max_entries: int = MAX_LOCAL_ENTRIES) -> None:
        self.clock = clock
        self.max_entries = max_entries
        self._data: OrderedDict[str, tuple[int, float]] = OrderedDict()
        self._last_sweep = clock.seconds()

    def __len__(self) -> int:
        return len(self._data)

    def get(self, key: str) -> int:
        item = self._data.get(key)
        if item is None:
            return 0
        if item[1] <= self.clock.seconds():
            del self._data[key]
            return 0
        return item[0]

    def incr(self, key: str, ttl: float) -> int:
        """Add one; a new entry expires ``ttl`` seconds from now (fixed window)."""
        self._maybe_sweep()
        now = self.clock.seconds()
        item = self._data.get(key)
        if item is None or item[1] <= now:
            self._data.pop(key, None)
            self._data[key] = (1, now + ttl)
            return 1
        self._data[key] = (item[0] + 1, item[1])
        return item[0] + 1

    def set(self, key: str, value: int, ttl: float) -> None:
        self._maybe_sweep()
        self._data.pop(key, None)
        self._data[key] = (value, self.clock.seconds() + ttl)

    def delete(self, key: str) -> None:
        self._data.pop(key, None)

    def _maybe_sweep(self) -> None:
        now = self.clock.seconds()
        if now - self._last_sweep >= SWEEP_SECONDS:
            self._last_sweep = now
            for key in [k for k, (_, exp) in self._data.items() if exp <= now]:
                del self._data[key]
        while len(self._data) >= self.max_entries:
            self._data.popitem(last=False)


@implementer(IConnectionLimiter)
class LocalConnectionLimiter:
    """Open connections per IP in this process (entries exist only while connections do)."""

    def __init__(self, max_per_ip: int) -> None:
        self.max_per_ip = max_per_ip
        self._open: dict[str, int] = {}

    def acquire(self, ip: str) -> defer.Deferred[bool]:
        n = self._open.get(ip, 0)
        if 0 < self.max_per_ip <= n:
            return defer.succeed(False)
        self._open[ip] = n + 1
        return defer.succeed(True)

    def release(self, ip: str) -> None:
        n = self._open.get(ip, 0) - 1
        if n > 0:
            self._open[ip] = n
        else:
            self._open.pop(ip, None)

    def open_count(self, ip: str) -> int:
        return self._open.get(ip, 0)


@implementer(IMessageRateLimiter)
class LocalMessageRateLimiter:
    """Messages per IP in fixed windows of ``window_seconds`` (an hour)."""

    def __init__(self, max_per_window: int, clock: IReactorTime | None = None,
                 window_seconds: float = HOUR, max_entries: int = MAX_LOCAL_ENTRIES) -> None:
        self.max_per_window = max_per_window
        self.window = window_seconds
        self.clock = _default_clock(clock)
        self.table = ExpiringTable(self.clock, max_entries)

    def allow_message(self, ip: str) -> defer.Deferred[bool]:
        if self.max_per_window <= 0:
            return defer.succeed(True)
        now = self.clock.seconds()
        window = math.floor(now / self.window)
        expires_in = (window + 1) * self.window - now
        n = self.table.incr(f"{ip}:{window}", expires_in)
        return defer.succeed(n <= self.max_per_window)


@implementer(IAuthFailureLimiter)
class LocalAuthFailureLimiter:
    """AUTH failures per IP and per username, with lockouts, in this process."""

    def __init__(self, max_failures: int, window_seconds: float, lockout_seconds: float,
                 clock: IReactorTime | None = None, max_entries: int = MAX_LOCAL_ENTRIES) -> None:
        self.max_failures = max_failures
        self.window = window_seconds
        self.lockout = lockout_seconds
        self.clock = _default_clock(clock)
        self.failures = ExpiringTable(self.clock, max_entries)
        self.locks = ExpiringTable(self.clock, max_entries)

    @staticmethod
    def _subjects(ip: str, username: str | None) -> list[str]:
        user = _user_key(username)
        return [f"ip:{ip}"] + ([f"user:{user}"] if user else [])

    def is_locked(self, ip: str, username: str | None) -> defer.Deferred[bool]:
        return defer.succeed(any(self.locks.get(s) for s in self._subjects(ip, username)))

    def record_failure(self, ip: str, username: str | None) -> defer.Deferred[bool]:
        if self.max_failures <= 0:
            return defer.succeed(False)
        locked = False
        for subject in self._subjects(ip, username):
            if self.failures.incr(subject, self.window) >= self.max_failures:
                self.failures.delete(subject)
                self.locks.set(subject, 1, self.lockout)
                locked = True
        return defer.succeed(locked)

    def reset(self, ip: str, username: str | None) -> defer.Deferred[None]:
        for subject in self._subjects(ip, username):
            self.failures.delete(subject)
        return defer.succeed(None)


@implementer(IAuthFailureLimiter)
class DisabledAuthFailureLimiter:
    """``smtp.auth.rateLimitEnabled: false``: never locks."""

    def is_locked(self, ip: str, username: str | None) -> defer.Deferred[bool]:
        return defer.succeed(False)

    def record_failure(self, ip: str, username: str | None) -> defer.Deferred[bool]:
        return defer.succeed(False)

    def reset(self, ip: str, username: str | None) -> defer.Deferred[None]:
        return defer.succeed(None)


# ---------------------------------------------------------------------------------------------
# Redis backends

# KEYS conn-hash; ARGV max node node_key_prefix ttl_ms -> 1 acquired | 0 refused.
# The hash holds one count per node; fields of nodes whose liveness key expired are dropped.
_CONN_ACQUIRE = LuaScript("conn-acquire", """
local max, me, nodes, ttl = tonumber(ARGV[1]), ARGV[2], ARGV[3], ARGV[4]
redis.call('SET', nodes .. me, '1', 'PX', ttl)
local fields = redis.call('HGETALL', KEYS[1])
local total = 0
for i = 1, #fields, 2 do
  local node = fields[i]
  if node ~= me and redis.call('EXISTS', nodes .. node) == 0 then
    redis.call('HDEL', KEYS[1], node)
  else
    total = total + tonumber(fields[i + 1])
  end
end
if max > 0 and total >= max then return 0 end
redis.call('HINCRBY', KEYS[1], me, 1)
redis.call('PEXPIRE', KEYS[1], ttl)
return 1
""")

# KEYS conn-hash; ARGV node
_CONN_RELEASE = LuaScript("conn-release", """
local n = redis.call('HINCRBY', KEYS[1], ARGV[1], -1)
if n <= 0 then redis.call('HDEL', KEYS[1], ARGV[1]) end
return n
""")

# KEYS node-key conn-hash...; ARGV ttl_ms: this node is alive and still holds these counts
_CONN_HEARTBEAT = LuaScript("conn-heartbeat", """
redis.call('SET', KEYS[1], '1', 'PX', ARGV[1])
for i = 2, #KEYS do redis.call('PEXPIRE', KEYS[i], ARGV[1]) end
return #KEYS
""")

# KEYS counter; ARGV ttl_ms -> count
_INCR_WINDOW = LuaScript("incr-window", """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[1]) end
return n
""")

# KEYS fail lock; ARGV max window_ms lockout_ms -> 1 locked now | 0
_AUTH_FAIL = LuaScript("auth-fail", """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('PEXPIRE', KEYS[1], ARGV[2]) end
if n >= tonumber(ARGV[1]) then
  redis.call('DEL', KEYS[1])
  redis.call('SET', KEYS[2], '1', 'PX', ARGV[3])
  return 1
end
return 0
""")


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _fail_open(what: str, result: Any) -> Callable[[Any], Any]:
    def handler(failure: Any) -> Any:
        log.warn("rate limiter {what}: Redis unavailable ({error}); allowing", what=what,
                 error=failure.getErrorMessage())
        return result
    return handler


@implementer(IConnectionLimiter)
class RedisConnectionLimiter:
    """Open connections per IP across nodes.

    ``<prefix>:conn:<ip>`` is a hash of per-node counts; ``<prefix>:node:<node id>`` says the
    node is alive (TTL ``counter_ttl_seconds``, refreshed every third of it while the node holds
    connections). When a node crashes its liveness key expires and the next acquire for that IP
    drops its counts; idle hashes expire with the same TTL."""

    def __init__(self, client: RedisClient, key_prefix: str, max_per_ip: int,
                 counter_ttl_seconds: float = 900.0, node_id: str | None = None) -> None:
        self.client = client
        self.prefix = key_prefix
        self.max_per_ip = max_per_ip
        self.ttl = counter_ttl_seconds
        self.node_id = node_id or uuid.uuid4().hex[:16]
        self._counted: dict[str, int] = {}
        self._heartbeat: LoopingCall | None = None

    def _key(self, ip: str) -> str:
        return f"{self.prefix}:conn:{ip}"

    def acquire(self, ip: str) -> defer.Deferred[bool]:
        if self.max_per_ip <= 0:
            return defer.succeed(True)
        d = self.client.eval(_CONN_ACQUIRE, [self._key(ip)],
                             [self.max_per_ip, self.node_id, f"{self.prefix}:node:",
                              _ms(self.ttl)])

        def done(result: Any) -> bool:
            if result == 1:
                self._counted[ip] = self._counted.get(ip, 0) + 1
                self._ensure_heartbeat()
                return True
            return False

        def timed_out(failure: Any) -> Any:
            # The script may still run once Redis answers (a slow server): count the
            # connection as ours, so that its release undoes that increment; a count never
            # released kept the IP at its limit for counter_ttl_seconds (and longer while it
            # kept connecting). Should the script never have run, the release under-counts
            # by one until this node's counts for the IP reach zero (fail open, as here).
            failure.trap(RedisTimedOut)
            self._counted[ip] = self._counted.get(ip, 0) + 1
            self._ensure_heartbeat()
            return failure

        return d.addCallbacks(done, timed_out).addErrback(_fail_open("acquire", True))

    def release(self, ip: str) -> None:
        n = self._counted.get(ip, 0)
        if n <= 0:
            return
        if n == 1:
            del self._counted[ip]
        else:
            self._counted[ip] = n - 1
        if not self._counted and self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()
        self.client.eval(_CONN_RELEASE, [self._key(ip)], [self.node_id]).addErrback(
            lambda f: log.warn("rate limiter release for {ip} failed: {error}; the counter "
                               "expires by itself", ip=ip, error=f.getErrorMessage()))

    def _ensure_heartbeat(self) -> None:
        if self._heartbeat is not None and self._heartbeat.running:
            return
        self._heartbeat = LoopingCall(lambda: defer.Deferred.fromCoroutine(self._beat()))
        self._heartbeat.clock = self.client.clock
        self._heartbeat.start(self.ttl / 3.0, now=False).addErrback(
            lambda f: log.failure("connection-limit heartbeat stopped", f))

    async def _beat(self) -> None:
        """Refresh this node's liveness and its counters; never raises."""
        ips = list(self._counted)
        for start in range(0, max(len(ips), 1), 500):
            keys = [f"{self.prefix}:node:{self.node_id}"] + [
                self._key(ip) for ip in ips[start:start + 500]]
            try:
                await self.client.eval(_CONN_HEARTBEAT, keys, [_ms(self.ttl)])
            except Exception as exc:
                log.warn("connection-limit heartbeat failed: {error}", error=exc)
                return

    def close(self) -> None:
        """Stop the heartbeat (this node's counts then expire after the TTL)."""
        if self._heartbeat is not None and self._heartbeat.running:
            self._heartbeat.stop()


@implementer(IMessageRateLimiter)
class RedisMessageRateLimiter:
    """Messages per IP per window (an hour) across nodes."""

    def __init__(self, client: RedisClient, key_prefix: str, max_per_window: int,
                 window_seconds: float = HOUR) -> None:
        self.client = client
        self.prefix = key_prefix
        self.max_per_window = max_per_window
        self.window = window_seconds

    def allow_message(self, ip: str) -> defer.Deferred[bool]:
        if self.max_per_window <= 0:
            return defer.succeed(True)
        now = self.client.clock.seconds()
        window = math.floor(now / self.window)
        ttl = (window + 1) * self.window - now + 60.0
        d = self.client.eval(_INCR_WINDOW, [f"{self.prefix}:msg:{ip}:{window}"], [_ms(ttl)])
        return d.addCallbacks(lambda n: int(n) <= self.max_per_window,
                              _fail_open("allow_message", True))


@implementer(IAuthFailureLimiter)
class RedisAuthFailureLimiter:
    """AUTH failures and lockouts shared by every node."""

    def __init__(self, client: RedisClient, key_prefix: str, max_failures: int,
                 window_seconds: float, lockout_seconds: float) -> None:
        self.client = client
        self.prefix = key_prefix
        self.max_failures = max_failures
        self.window = window_seconds
        self.lockout = lockout_seconds

    def _subjects(self, ip: str, username: str | None) -> list[str]:
        user = _user_key(username)
        return [f"ip:{ip}"] + ([f"user:{user}"] if user else [])

    def is_locked(self, ip: str, username: str | None) -> defer.Deferred[bool]:
        keys = [f"{self.prefix}:lock:{s}" for s in self._subjects(ip, username)]
        d = self.client.execute("EXISTS", *keys)
        return d.addCallbacks(lambda n: int(n) > 0, _fail_open("is_locked", False))

    def record_failure(self, ip: str, username: str | None) -> defer.Deferred[bool]:
        if self.max_failures <= 0:
            return defer.succeed(False)
        ds = [self.client.eval(_AUTH_FAIL, [f"{self.prefix}:fail:{s}", f"{self.prefix}:lock:{s}"],
                               [self.max_failures, _ms(self.window), _ms(self.lockout)])
              for s in self._subjects(ip, username)]
        d = defer.gatherResults(ds, consumeErrors=True)
        return d.addCallbacks(lambda results: any(r == 1 for r in results),
                              _fail_open("record_failure", False))

    def reset(self, ip: str, username: str | None) -> defer.Deferred[None]:
        keys = [f"{self.prefix}:fail:{s}" for s in self._subjects(ip, username)]
        d = self.client.execute("DEL", *keys)
        return d.addCallbacks(lambda _: None, _fail_open("reset", None))


# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Limiters:
    connections: IConnectionLimiter
    messages: IMessageRateLimiter
    auth: IAuthFailureLimiter


def make_limiters(config: Config, redis: RedisClient | None = None,
                  clock: IReactorTime | None = None) -> Limiters:
    """Build the limiters selected by ``smtp.rateLimit.backend`` / ``smtp.auth.rateLimitBackend``.
    A ``redis`` backend needs ``redis`` (ValueError otherwise)."""
    rl, auth = config.smtp.rateLimit, config.smtp.auth
    needs_redis = rl.backend == "redis" or (auth.rateLimitEnabled
                                            and auth.rateLimitBackend == "redis")
    if needs_redis and redis is None:
        raise ValueError("a redis rate-limit backend is configured but smtp.redis is not set")
    connections: IConnectionLimiter
    messages: IMessageRateLimiter
    if rl.backend == "redis":
        assert redis is not None
        connections = RedisConnectionLimiter(redis, rl.redis.keyPrefix, rl.maxConnectionsPerIp,
                                             rl.redis.connectionCounterTtlSeconds)
        messages = RedisMessageRateLimiter(redis, rl.redis.keyPrefix, rl.maxMessagesPerIpPerHour)
    else:
        connections = LocalConnectionLimiter(rl.maxConnectionsPerIp)
        messages = LocalMessageRateLimiter(rl.maxMessagesPerIpPerHour, clock)
    auth_limiter: IAuthFailureLimiter
    if not auth.rateLimitEnabled:
        auth_limiter = DisabledAuthFailureLimiter()
    elif auth.rateLimitBackend == "redis":
        assert redis is not None
        auth_limiter = RedisAuthFailureLimiter(
            redis, auth.rateLimitRedis.keyPrefix, auth.rateLimitMaxFailures,
            auth.rateLimitWindowSeconds, auth.rateLimitLockoutSeconds)
    else:
        auth_limiter = LocalAuthFailureLimiter(
            auth.rateLimitMaxFailures, auth.rateLimitWindowSeconds,
            auth.rateLimitLockoutSeconds, clock)
    return Limiters(connections, messages, auth_limiter)


class _Exempt:
    """Clients in ``smtp.rateLimit.exemptCidrs`` (default: loopback) are never limited; the
    others are counted by :func:`netutil.client_key` (IPv6 by ``ipv6PrefixLength`` network)."""

    def __init__(self, networks: list[str], ipv6_prefix: int = 128) -> None:
        self._exempt = CidrSet(networks)
        self.ipv6_prefix = ipv6_prefix

    def exempt(self, ip: str) -> bool:
        return self._exempt.contains(ip)

    def key(self, ip: str) -> str:
        return client_key(ip, self.ipv6_prefix)


@implementer(IConnectionLimiter)
class ExemptingConnectionLimiter(_Exempt):
    def __init__(self, inner: IConnectionLimiter, networks: list[str],
                 ipv6_prefix: int = 128) -> None:
        super().__init__(networks, ipv6_prefix)
        self.inner = inner

    def acquire(self, ip: str) -> Any:
        return defer.succeed(True) if self.exempt(ip) else self.inner.acquire(self.key(ip))

    def release(self, ip: str) -> None:
        if not self.exempt(ip):
            self.inner.release(self.key(ip))


@implementer(IMessageRateLimiter)
class ExemptingMessageRateLimiter(_Exempt):
    def __init__(self, inner: IMessageRateLimiter, networks: list[str],
                 ipv6_prefix: int = 128) -> None:
        super().__init__(networks, ipv6_prefix)
        self.inner = inner

    def allow_message(self, ip: str) -> Any:
        return defer.succeed(True) if self.exempt(ip) else \
            self.inner.allow_message(self.key(ip))


@implementer(IAuthFailureLimiter)
class PrefixAuthFailureLimiter:
    """The AUTH lockout with IPv6 clients counted by network, like the other limits (a
    guesser rotating through its /64 met a fresh failure count at every address)."""

    def __init__(self, inner: IAuthFailureLimiter, ipv6_prefix: int) -> None:
        self.inner = inner
        self.ipv6_prefix = ipv6_prefix
        self.max_failures = getattr(inner, "max_failures", 0)  # (the session's in-flight cap)

    def is_locked(self, ip: str, username: str | None) -> Any:
        return self.inner.is_locked(client_key(ip, self.ipv6_prefix), username)

    def record_failure(self, ip: str, username: str | None) -> Any:
        return self.inner.record_failure(client_key(ip, self.ipv6_prefix), username)

    def reset(self, ip: str, username: str | None) -> Any:
        return self.inner.reset(client_key(ip, self.ipv6_prefix), username)
