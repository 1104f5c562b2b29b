"""redisconn: parsing smtp.redis, start-up failures, deadlines, scripts, the health indicator."""

from __future__ import annotations

import time
from typing import Any

import pytest
from helpers import RedisServer, free_port, on_reactor, start_redis, wait_until
from zope.interface.verify import verifyObject

from kotlin_smtp_py.config import RedisConfig
from kotlin_smtp_py.interfaces import IHealthIndicator
from kotlin_smtp_py.redisconn import (
    LuaScript,
    RedisClient,
    RedisHealthIndicator,
    RedisUnavailable,
    connect,
    parse_target,
)


def test_parse_url_forms() -> None:
    t = parse_target(RedisConfig(url="redis://:s3cret@redis.internal:6380/2"))
    assert (t.host, t.port, t.db, t.password, t.username, t.tls) == (
        "redis.internal", 6380, 2, "s3cret", None, False)
    assert "s3cret" not in t.describe()
    t = parse_target(RedisConfig(url="rediss://app:p%40ss@10.0.0.1/0?ssl_ca_certs=/ca.pem"))
    assert (t.host, t.port, t.username, t.password, t.tls, t.tls_ca_file, t.tls_verify) == (
        "10.0.0.1", 6379, "app", "p@ss", True, "/ca.pem", True)
    t = parse_target(RedisConfig(url="redis://[::1]:7000", password="fromconfig"))
    assert (t.host, t.port, t.db, t.password) == ("::1", 7000, 0, "fromconfig")
    assert parse_target(RedisConfig(url="rediss://h/0?ssl_cert_reqs=none")).tls_verify is False


def test_parse_sentinels() -> None:
    t = parse_target(RedisConfig(url="redis://ignored/3", sentinels=["s1:26380", "s2", "[::1]:1"],
                                 masterName="mymaster"))
    assert t.sentinels == (("s1", 26380), ("s2", 26379), ("::1", 1))
    assert (t.master_name, t.db) == ("mymaster", 3)
    assert "mymaster" in t.describe()


@pytest.mark.parametrize("url, key", [("http://h:1/0", "scheme"), ("redis://h:1/x", "database"),
                                      ("redis://h:99999/0", "port")])
def test_parse_errors_name_the_key(url: str, key: str) -> None:
    with pytest.raises(ValueError, match=f"smtp.redis.url.*{key}"):
        parse_target(RedisConfig(url=url))
    with pytest.raises(ValueError, match="masterName"):
        parse_target(RedisConfig(sentinels=["s:1"]))


def test_startup_fails_clearly_when_unreachable(reactor_thread: None) -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(RedisUnavailable, match=f"127.0.0.1:{port}.*unreachable after 0.5s"):
        on_reactor(connect, RedisConfig(url=f"redis://:pw@127.0.0.1:{port}/0",
                                        connectTimeoutMs=500, password="topsecret"))
    assert time.monotonic() - started < 5


def test_startup_fails_clearly_when_auth_is_refused(redis_server: RedisServer,
                                                    reactor_thread: None) -> None:
    with pytest.raises(RedisUnavailable, match="refused") as info:
        on_reactor(connect, RedisConfig(url=redis_server.url, password="wrong-password",
                                        connectTimeoutMs=3000))
    assert "wrong-password" not in str(info.value)


def test_commands_scripts_and_health(redis_server: RedisServer, reactor_thread: None) -> None:
    client: RedisClient = on_reactor(connect, RedisConfig(url=redis_server.url))
    try:
        assert on_reactor(client.execute, "SET", "rc:k", b"\xff\x00\xc3\x28") == "OK"
        assert on_reactor(client.execute, "GET", "rc:k") == b"\xff\x00\xc3\x28"
        assert on_reactor(client.execute, "INCR", "rc:n") == 1
        script = LuaScript("t", "return {KEYS[1], ARGV[1]}")
        on_reactor(client.execute, "SCRIPT", "FLUSH")  # EVALSHA -> NOSCRIPT -> EVAL
        assert on_reactor(client.eval, script, ["rc:k"], [b"\xfe"]) == [b"rc:k", b"\xfe"]
        assert on_reactor(client.execute, "SCRIPT", "EXISTS", script.sha) == [1]
        assert on_reactor(client.eval, script, ["a"], ["b"]) == [b"a", b"b"]
        indicator = RedisHealthIndicator(client)
        assert verifyObject(IHealthIndicator, indicator)
        up, details = on_reactor(indicator.health)
        assert up is True and details["target"] == redis_server.url
    finally:
        on_reactor(client.close)
    with pytest.raises(RedisUnavailable):
        on_reactor(client.execute, "PING")
    assert on_reactor(client.ping)[0] is False


def _stopped_client(timeout_ms: int) -> tuple[RedisServer, RedisClient]:
    """A private Redis, a client connected to it, and the Redis stopped (client sees it)."""
    server = start_redis()
    client: RedisClient = on_reactor(connect, RedisConfig(url=server.url,
                                                         commandTimeoutMs=timeout_ms))
    server.stop()
    wait_until(lambda: not client.connected, timeout=10, message="the client to see Redis go")
    return server, client


def test_commands_wait_for_the_reconnect_in_order(reactor_thread: None) -> None:
    """A restart (or failover) shorter than the deadline costs the caller a wait, not a 451;
    commands issued meanwhile reach Redis in the order they were issued."""
    from twisted.internet import reactor, threads

    server, client = _stopped_client(8000)
    try:
        results: list[Any] = []

        def issue() -> None:
            # (The script last: after a restart its EVALSHA meets NOSCRIPT and is sent again
            # as EVAL, behind anything issued after it.)
            for d in (client.execute("SET", "rc:order", "a"),
                      client.execute("APPEND", "rc:order", "b"),
                      client.eval(LuaScript("app", "return redis.call('APPEND', KEYS[1], "
                                                   "ARGV[1])"), ["rc:order"], ["c"])):
                d.addBoth(results.append)

        threads.blockingCallFromThread(reactor, issue)
        wait_until(lambda: len(client._waiters) == 3, timeout=10, message="three waiting")
        assert results == []  # not failed at once, as before
        server.start()  # the same port
        wait_until(lambda: len(results) == 3, timeout=15, message="the commands to finish")
        assert results == ["OK", 2, 3], results
        assert on_reactor(client.execute, "GET", "rc:order") == b"abc"
    finally:
        on_reactor(client.close)
        server.cleanup()


def test_an_outage_longer_than_the_deadline_fails_fast(reactor_thread: None) -> None:
    server, client = _stopped_client(400)
    try:
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="not connected"):
            on_reactor(client.execute, "GET", "rc:x")
        waited = time.monotonic() - started
        assert 0.3 < waited < 5, waited  # it waited for a reconnect, within the deadline
        assert on_reactor(client.ping)[0] is False  # health never waits
        started = time.monotonic()
        with pytest.raises(RedisUnavailable, match="not connected"):
            on_reactor(client.execute, "GET", "rc:x")
        assert time.monotonic() - started < 0.3  # down past the deadline: at once
        server.start()
        wait_until(lambda: client.connected, timeout=15, message="the reconnect")
        assert on_reactor(client.execute, "SET", "rc:x", "1") == "OK"
        server.stop()  # a new outage gets a new grace period
        wait_until(lambda: not client.connected, timeout=10, message="Redis gone again")
        started = time.monotonic()
        with pytest.raises(RedisUnavailable):
            on_reactor(client.execute, "GET", "rc:x")
        assert time.monotonic() - started > 0.3
    finally:
        on_reactor(client.close)
        server.cleanup()


def test_scripts_keep_their_place_after_a_restart(reactor_thread: None) -> None:
    """After a restart Redis knows no script. Without loading them on the new connection, an
    EVALSHA meets NOSCRIPT and its EVAL goes out behind commands issued after it."""
    from twisted.internet import reactor, threads

    append = LuaScript("append-test", "return redis.call('APPEND', KEYS[1], ARGV[1])")
    server, client = _stopped_client(8000)
    try:
        server.start()
        wait_until(lambda: client.connected, timeout=15, message="the reconnect")
        results: list[Any] = []

        def issue() -> None:
            for d in (client.execute("SET", "rc:s", "a"),
                      client.eval(append, ["rc:s"], ["b"]),
                      client.execute("APPEND", "rc:s", "c")):
                d.addBoth(results.append)

        threads.blockingCallFromThread(reactor, issue)
        wait_until(lambda: len(results) == 3, timeout=15, message="the commands to finish")
        assert on_reactor(client.execute, "GET", "rc:s") == b"abc"
        assert results == ["OK", 2, 3], results
    finally:
        on_reactor(client.close)
        server.cleanup()
