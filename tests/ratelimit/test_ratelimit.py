"""Rate limiters: the local backend with task.Clock, the Redis backend against a real redis-server
(several limiter instances on one prefix stand for several nodes)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from helpers import RedisServer, on_reactor, wait_until
from twisted.internet import task
from zope.interface.verify import verifyObject

from kotlin_smtp_py.config import AuthConfig, Config, RateLimitConfig, SmtpConfig
from kotlin_smtp_py.ratelimit import (
    DisabledAuthFailureLimiter,
    ExpiringTable,
    IAuthFailureLimiter,
    IConnectionLimiter,
    IMessageRateLimiter,
    LocalAuthFailureLimiter,
    LocalConnectionLimiter,
    LocalMessageRateLimiter,
    RedisAuthFailureLimiter,
    RedisConnectionLimiter,
    RedisMessageRateLimiter,
    make_limiters,
)
from kotlin_smtp_py.redisconn import RedisClient, connect


def result(d: Any) -> Any:
    """The result of an already-fired Deferred (local limiters answer synchronously)."""
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "Deferred has not fired"
    return out[0]


# -- local ------------------------------------------------------------------------------------


def test_local_connection_limit_per_ip() -> None:
    lim = LocalConnectionLimiter(max_per_ip=2)
    assert verifyObject(IConnectionLimiter, lim)
    assert result(lim.acquire("192.0.2.1")) is True
    assert result(lim.acquire("192.0.2.1")) is True
    assert result(lim.acquire("192.0.2.1")) is False
    assert result(lim.acquire("192.0.2.2")) is True  # other IPs are independent
    lim.release("192.0.2.1")
    assert result(lim.acquire("192.0.2.1")) is True
    for _ in range(5):  # extra releases never go negative or leave entries behind
        lim.release("192.0.2.1")
        lim.release("192.0.2.2")
    assert lim.open_count("192.0.2.1") == 0 and lim._open == {}
    assert all(result(LocalConnectionLimiter(0).acquire("x")) for _ in range(100))


def test_local_messages_per_hour_window() -> None:
    clock = task.Clock()
    clock.advance(3600 * 100)  # start of an hour window
    lim = LocalMessageRateLimiter(3, clock)
    assert verifyObject(IMessageRateLimiter, lim)
    assert [result(lim.allow_message("192.0.2.1")) for _ in range(4)] == [True, True, True, False]
    assert result(lim.allow_message("192.0.2.9")) is True
    clock.advance(3599)
    assert result(lim.allow_message("192.0.2.1")) is False
    clock.advance(1)  # next hour
    assert result(lim.allow_message("192.0.2.1")) is True


def test_local_auth_lockout_after_max_failures() -> None:
    clock = task.Clock()
    lim = LocalAuthFailureLimiter(max_failures=3, window_seconds=300, lockout_seconds=600,
                                  clock=clock)
    assert verifyObject(IAuthFailureLimiter, lim)
    ip = "198.51.100.7"
    assert result(lim.record_failure(ip, "alice")) is False
    assert result(lim.record_failure(ip, "alice")) is False
    assert result(lim.is_locked(ip, "alice")) is False
    assert result(lim.record_failure(ip, "alice")) is True  # third failure locks
    assert result(lim.is_locked(ip, "alice")) is True
    assert result(lim.is_locked(ip, "bob")) is True  # the IP is locked
    assert result(lim.is_locked("198.51.100.8", "ALICE")) is True  # and the user, any case
    assert result(lim.is_locked("198.51.100.8", "bob")) is False
    clock.advance(599)
    assert result(lim.is_locked(ip, None)) is True
    clock.advance(1)
    assert result(lim.is_locked(ip, "alice")) is False


def test_local_auth_failures_outside_window_do_not_add_up() -> None:
    clock = task.Clock()
    lim = LocalAuthFailureLimiter(3, 300, 600, clock)
    for _ in range(2):
        assert result(lim.record_failure("192.0.2.1", "u")) is False
    clock.advance(300)
    for _ in range(2):
        assert result(lim.record_failure("192.0.2.1", "u")) is False
    assert result(lim.is_locked("192.0.2.1", "u")) is False


def test_local_auth_reset_clears_failures() -> None:
    lim = LocalAuthFailureLimiter(3, 300, 600, task.Clock())
    for _ in range(2):
        lim.record_failure("192.0.2.1", "u")
    result(lim.reset("192.0.2.1", "u"))
    for _ in range(2):
        assert result(lim.record_failure("192.0.2.1", "u")) is False
    assert result(lim.is_locked("192.0.2.1", "u")) is False


def test_local_state_is_bounded() -> None:
    clock = task.Clock()
    lim = LocalMessageRateLimiter(10, clock, max_entries=1000)
    for i in range(5000):
        lim.allow_message(f"10.0.{i // 256}.{i % 256}")
    assert len(lim.table) <= 1000  # hard cap: oldest entries go first
    clock.advance(3600 * 2)
    lim.allow_message("10.9.9.9")  # a sweep drops every expired window
    assert len(lim.table) == 1

    auth = LocalAuthFailureLimiter(5, 300, 600, clock)
    for i in range(3000):
        auth.record_failure(f"10.1.{i // 256}.{i % 256}", f"user{i}")
    clock.advance(601)
    auth.record_failure("10.2.0.1", None)
    assert len(auth.failures) == 1 and len(auth.locks) == 0


def test_expiring_table_incr_and_expiry() -> None:
    clock = task.Clock()
    table = ExpiringTable(clock, max_entries=10)
    assert table.incr("a", 5) == 1
    assert table.incr("a", 5) == 2
    clock.advance(5)
    assert table.get("a") == 0
    assert table.incr("a", 5) == 1


# -- make_limiters ----------------------------------------------------------------------------


def test_make_limiters_local_defaults() -> None:
    lims = make_limiters(Config(), clock=task.Clock())
    assert isinstance(lims.connections, LocalConnectionLimiter)
    assert lims.connections.max_per_ip == 10
    assert isinstance(lims.messages, LocalMessageRateLimiter)
    assert lims.messages.max_per_window == 100
    assert isinstance(lims.auth, LocalAuthFailureLimiter)
    assert (lims.auth.max_failures, lims.auth.window, lims.auth.lockout) == (5, 300, 600)


def test_make_limiters_disabled_auth_and_redis_required() -> None:
    cfg = Config(smtp=SmtpConfig(auth=AuthConfig(rateLimitEnabled=False,
                                                 rateLimitBackend="redis")))
    assert isinstance(make_limiters(cfg).auth, DisabledAuthFailureLimiter)
    cfg = Config(smtp=SmtpConfig(rateLimit=RateLimitConfig(backend="redis")))
    with pytest.raises(ValueError, match="smtp.redis"):
        make_limiters(cfg)


# -- redis ------------------------------------------------------------------------------------


@pytest.fixture
def client(redis_server: RedisServer, reactor_thread: None) -> Iterator[RedisClient]:
    from kotlin_smtp_py.config import RedisConfig

    c: RedisClient = on_reactor(connect, RedisConfig(url=redis_server.url))
    yield c
    on_reactor(c.close)


@pytest.fixture
def prefix() -> str:
    return f"test-{uuid.uuid4().hex[:12]}:rl"


def test_make_limiters_redis(client: RedisClient) -> None:
    cfg = Config(smtp=SmtpConfig(rateLimit=RateLimitConfig(backend="redis"),
                                 auth=AuthConfig(rateLimitBackend="redis")))
    lims = make_limiters(cfg, client)
    assert isinstance(lims.connections, RedisConnectionLimiter)
    assert lims.connections.prefix == "kotlin-smtp:conn-ratelimit"
    assert lims.connections.ttl == 900
    assert isinstance(lims.messages, RedisMessageRateLimiter)
    assert isinstance(lims.auth, RedisAuthFailureLimiter)
    assert lims.auth.prefix == "kotlin-smtp:auth-ratelimit"
    for iface, obj in ((IConnectionLimiter, lims.connections),
                       (IMessageRateLimiter, lims.messages), (IAuthFailureLimiter, lims.auth)):
        assert verifyObject(iface, obj)


def open_counts(client: RedisClient, prefix: str, ip: str) -> int:
    flat = on_reactor(client.execute, "HGETALL", f"{prefix}:conn:{ip}") or []
    return sum(int(v) for v in flat[1::2])


def test_redis_connection_limit_is_shared_by_nodes(client: RedisClient, prefix: str) -> None:
    a = RedisConnectionLimiter(client, prefix, max_per_ip=3)
    b = RedisConnectionLimiter(client, prefix, max_per_ip=3)
    ip = "203.0.113.5"
    try:
        assert on_reactor(a.acquire, ip) is True
        assert on_reactor(a.acquire, ip) is True
        assert on_reactor(b.acquire, ip) is True
        assert on_reactor(b.acquire, ip) is False
        assert on_reactor(a.acquire, "203.0.113.6") is True
        on_reactor(a.release, ip)
        wait_until(lambda: open_counts(client, prefix, ip) == 2, timeout=5,
                   message="counter decremented")
        assert on_reactor(b.acquire, ip) is True
        for _ in range(10):  # releasing more than acquired never goes below zero
            on_reactor(a.release, ip)
            on_reactor(b.release, ip)
        wait_until(lambda: on_reactor(client.execute, "EXISTS", f"{prefix}:conn:{ip}") == 0,
                   timeout=5, message="counter removed at zero")
    finally:
        on_reactor(a.close)
        on_reactor(b.close)


def test_redis_connection_counts_of_a_crashed_node_expire(client: RedisClient,
                                                          prefix: str) -> None:
    # A TTL a loaded CI box cannot outrun between two acquires (the heartbeat keeps the live
    # counts; expiry is waited for below with a deadline).
    crashed = RedisConnectionLimiter(client, prefix, max_per_ip=2, counter_ttl_seconds=4.0)
    alive = RedisConnectionLimiter(client, prefix, max_per_ip=2, counter_ttl_seconds=4.0)
    ip = "203.0.113.9"
    try:
        assert on_reactor(crashed.acquire, ip) and on_reactor(crashed.acquire, ip)
        assert on_reactor(alive.acquire, ip) is False
        on_reactor(crashed.close)  # the node dies: no release, no more heartbeats
        # retries by the other node do not keep the dead node's counts alive
        wait_until(lambda: on_reactor(alive.acquire, ip), timeout=30,
                   message="dead node's counts expired")
        assert open_counts(client, prefix, ip) == 1
    finally:
        on_reactor(alive.close)


def test_redis_connection_counts_of_a_live_node_outlive_the_ttl(client: RedisClient,
                                                               prefix: str) -> None:
    # TTL 5 s with a heartbeat every 1.7 s: generous enough that a loaded CI box does not
    # starve the heartbeat, while the check still runs well past one TTL.
    holder = RedisConnectionLimiter(client, prefix, max_per_ip=1, counter_ttl_seconds=5.0)
    other = RedisConnectionLimiter(client, prefix, max_per_ip=1, counter_ttl_seconds=5.0)
    ip = "203.0.113.10"
    try:
        assert on_reactor(holder.acquire, ip) is True
        deadline = time.monotonic() + 7.5  # longer than the TTL: the heartbeat keeps it
        while time.monotonic() < deadline:
            assert on_reactor(other.acquire, ip) is False
            time.sleep(0.05)
        on_reactor(holder.release, ip)
        wait_until(lambda: on_reactor(other.acquire, ip), timeout=5, message="released")
    finally:
        on_reactor(holder.close)
        on_reactor(other.close)


def test_redis_messages_per_window(client: RedisClient, prefix: str) -> None:
    a = RedisMessageRateLimiter(client, prefix, 3)
    b = RedisMessageRateLimiter(client, prefix, 3)
    ip = "203.0.113.20"
    answers = [on_reactor(lim.allow_message, ip) for lim in (a, b, a, b)]
    assert answers == [True, True, True, False]
    assert on_reactor(a.allow_message, "203.0.113.21") is True
    (key,) = on_reactor(client.execute, "KEYS", f"{prefix}:msg:{ip}:*")
    assert 0 < on_reactor(client.execute, "PTTL", key) <= (3600 + 60) * 1000


def test_redis_messages_window_rolls_over(client: RedisClient, prefix: str) -> None:
    lim = RedisMessageRateLimiter(client, prefix, 1, window_seconds=1.0)
    assert on_reactor(lim.allow_message, "203.0.113.30") in (True, False)
    wait_until(lambda: on_reactor(lim.allow_message, "203.0.113.30") is False, timeout=5,
               message="limit reached")
    wait_until(lambda: on_reactor(lim.allow_message, "203.0.113.30") is True, timeout=5,
               message="new window")


def test_redis_auth_lockout_shared_and_expiring(client: RedisClient, prefix: str) -> None:
    a = RedisAuthFailureLimiter(client, prefix, 3, window_seconds=60, lockout_seconds=1.0)
    b = RedisAuthFailureLimiter(client, prefix, 3, window_seconds=60, lockout_seconds=1.0)
    ip = "198.51.100.40"
    assert on_reactor(a.record_failure, ip, "carol") is False
    assert on_reactor(b.record_failure, ip, "carol") is False
    assert on_reactor(b.is_locked, ip, "carol") is False
    assert on_reactor(a.record_failure, ip, "carol") is True
    assert on_reactor(b.is_locked, ip, "someone") is True  # IP locked on every node
    assert on_reactor(b.is_locked, "198.51.100.41", "Carol") is True  # user locked
    assert on_reactor(b.is_locked, "198.51.100.41", "dave") is False
    wait_until(lambda: on_reactor(a.is_locked, ip, "carol") is False, timeout=10,
               message="lockout expired")


def test_redis_auth_reset_and_window(client: RedisClient, prefix: str) -> None:
    lim = RedisAuthFailureLimiter(client, prefix, 3, window_seconds=60, lockout_seconds=60)
    for _ in range(2):
        on_reactor(lim.record_failure, "198.51.100.50", "erin")
    on_reactor(lim.reset, "198.51.100.50", "erin")
    for _ in range(2):
        assert on_reactor(lim.record_failure, "198.51.100.50", "erin") is False
    assert on_reactor(lim.is_locked, "198.51.100.50", "erin") is False
    short = RedisAuthFailureLimiter(client, prefix + "2", 2, window_seconds=0.5,
                                    lockout_seconds=60)
    assert on_reactor(short.record_failure, "198.51.100.51", None) is False
    wait_until(lambda: on_reactor(client.execute, "EXISTS",
                                  f"{prefix}2:fail:ip:198.51.100.51") == 0,
               timeout=5, message="failure window expired")
    assert on_reactor(short.record_failure, "198.51.100.51", None) is False


def test_redis_limiters_fail_open_while_redis_is_down(reactor_thread: None) -> None:
    from kotlin_smtp_py.config import RedisConfig

    server = RedisServer()
    server.start()
    c: RedisClient = on_reactor(connect, RedisConfig(url=server.url, commandTimeoutMs=500))
    try:
        conn = RedisConnectionLimiter(c, "down:rl", 1)
        msgs = RedisMessageRateLimiter(c, "down:rl", 1)
        auth = RedisAuthFailureLimiter(c, "down:rl", 1, 60, 60)
        server.stop()
        assert on_reactor(conn.acquire, "192.0.2.1") is True
        assert on_reactor(conn.acquire, "192.0.2.1") is True
        on_reactor(conn.release, "192.0.2.1")  # uncounted: no decrement attempted
        assert conn._counted == {}
        assert on_reactor(msgs.allow_message, "192.0.2.1") is True
        assert on_reactor(auth.record_failure, "192.0.2.1", "u") is False
        assert on_reactor(auth.is_locked, "192.0.2.1", "u") is False
        assert on_reactor(auth.reset, "192.0.2.1", "u") is None
    finally:
        on_reactor(c.close)
        server.cleanup()
