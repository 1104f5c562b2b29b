"""Bug hunt: per-IP connection and message limits and the AUTH failure lockout, end to end.

Real servers on loopback (the protocol suite's ``make_server``: an in-process ``SmtpService``
on port 0), raw sockets, a real ``redis-server`` (the session fixture, or a private one where
a test stops it), and real ``twistd`` processes where ``smtp.workers`` matters. Ten cases
found bugs (six causes, all fixed since): a redis backend without smtp.redis passing
check-config, IPv4-mapped spellings counted as another client, a timed-out Redis acquire
leaking its count, worker processes together allowing more than a limit, a non-positive
counter TTL accepted.

Checked against the contract (SPEC.md, docs/CONFIGURATION.md, docs/SECURITY.md) and, where
that is silent, against what Postfix operators expect (anvil: ``smtpd_client_connection_count_
limit`` 421 4.7.0, ``smtpd_client_message_rate_limit`` counting MAIL requests whether or not the
message is accepted, limits keyed by the *client* address with IPv4-mapped IPv6 addresses
written in IPv4 form).
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

TESTS = Path(__file__).resolve().parent.parent
for _extra in (TESTS / "protocol", TESTS / "integration"):
    if str(_extra) not in sys.path:
        sys.path.insert(0, str(_extra))

from helpers import (  # noqa: E402
    TCP_LISTEN,
    RedisServer,
    free_port,
    on_reactor,
    redis_command,
    tcp_socket_inodes,
    wait_until,
)
from mtaproc import MtaPool, make_config  # noqa: E402
from protocol_support import Client, Server  # noqa: E402

from kotlin_smtp_py import config as cfg  # noqa: E402


def _protocol_fixtures() -> Any:
    """The protocol suite's fixtures (``make_server``, ``failures``), reused here."""
    spec = importlib.util.spec_from_file_location("_ratelimit_hunt_protocol_conftest",
                                                  TESTS / "protocol" / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_pc = _protocol_fixtures()
make_server = _pc.make_server
failures = _pc.failures

NO_EXEMPT: dict[str, Any] = {"exemptCidrs": []}
LISTENER: dict[str, Any] = {"port": 0, "bindAddress": "127.0.0.1"}


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every log event of this process (the server runs in-process) during the test."""
    from twisted.logger import globalLogPublisher

    got: list[dict[str, Any]] = []
    lock = threading.Lock()

    def observer(event: dict[str, Any]) -> None:
        with lock:
            got.append(event)

    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    yield got
    globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]


def named(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e for e in list(events) if e.get("event") == name]


def greet(c: Client, name: str = "client.test") -> None:
    assert c.reply()[0] == 220
    assert c.cmd(f"EHLO {name}")[0] == 250


def plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def proxied(port: int, client_ip: str, family: str = "TCP4", sport: int = 40000) -> Client:
    """A connection through a (trusted, loopback) PROXY v1 balancer for ``client_ip``."""
    c = Client(port)
    dst = "192.0.2.1" if family == "TCP4" else "2001:db8::1"
    c.send(f"PROXY {family} {client_ip} {dst} {sport} 25\r\n".encode())
    return c


def first_code(c: Client) -> int:
    try:
        return c.reply()[0]
    except (ConnectionError, OSError):
        return -1


def code_once(c: Client) -> int:
    """The greeting code of a fresh connection, which is then closed."""
    try:
        return first_code(c)
    finally:
        c.close()


def session_count(srv: Server) -> int:
    return int(on_reactor(lambda: sum(len(f.sessions) for f in srv.service.factories)))


def quit_and_close(c: Client) -> None:
    with contextlib.suppress(OSError, ConnectionError):
        c.cmd("QUIT")
    c.close()


def redis_keys(port: int, pattern: str) -> list[str]:
    return sorted(k.decode() for k in redis_command(port, "KEYS", pattern))


# == configuration ============================================================================


def _base_config(tmp_path: Path, smtp: dict[str, Any]) -> str:
    for sub in ("spool", "mb", "temp", "lists"):
        (tmp_path / sub).mkdir(exist_ok=True)
    conf = {"smtp": {"listeners": [LISTENER],
                     "storage": {"mailboxDir": str(tmp_path / "mb"),
                                 "tempDir": str(tmp_path / "temp"),
                                 "listsDir": str(tmp_path / "lists")},
                     "spool": {"type": "file", "dir": str(tmp_path / "spool")}, **smtp}}
    return yaml.safe_dump(conf)


@pytest.mark.parametrize("smtp", [
    {"rateLimit": {"backend": "redis"}},
    {"auth": {"rateLimitBackend": "redis"}},
], ids=["rateLimit.backend", "auth.rateLimitBackend"])
def test_check_config_refuses_a_redis_rate_limit_backend_without_smtp_redis(
        tmp_path: Path, smtp: dict[str, Any]) -> None:
    # The same mistake for the spool is refused with a clear message (the contract: validation
    # at start-up says exactly what is wrong, and check-config exits non-zero on error).
    with pytest.raises(cfg.ConfigError, match="smtp.redis"):
        cfg.load_text(_base_config(tmp_path, {"spool": {"type": "redis"}}))
    with pytest.raises(cfg.ConfigError, match="smtp.redis"):
        cfg.load_text(_base_config(tmp_path, smtp))


# == PROXY protocol: the limited address is the proxied client ================================


def test_proxied_clients_are_limited_by_their_own_address_even_behind_an_exempt_balancer(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    """The balancer (127.0.0.1) is in the default exemptCidrs; its clients are not, and each
    is counted on its own: connections (421 4.7.0) and messages (451 4.7.0), with the log
    lines naming the real client, never the balancer."""
    srv = make_server({"smtp": {
        "listeners": [{**LISTENER, "proxyProtocol": True}],
        "rateLimit": {"maxConnectionsPerIp": 1, "maxMessagesPerIpPerHour": 2}}})
    a = proxied(srv.port, "203.0.113.11")
    greet(a)
    b = proxied(srv.port, "203.0.113.12")
    greet(b)  # another client behind the same balancer
    refused = proxied(srv.port, "203.0.113.11", sport=40001)
    code, lines = refused.reply()
    assert (code, lines[0][:5]) == (421, "4.7.0")
    assert refused.closed()
    for _ in range(2):
        assert a.cmd("MAIL FROM:<a@remote.test>")[0] == 250
        assert a.cmd("RSET")[0] == 250
    code, lines = a.cmd("MAIL FROM:<a@remote.test>")
    assert (code, lines[0][:5]) == (451, "4.7.0")
    assert b.cmd("MAIL FROM:<b@remote.test>")[0] == 250  # b has its own budget
    limited = named(events, "connection_limited")
    rated = named(events, "rate_limited")
    assert [e.get("peer") for e in limited] == ["203.0.113.11"]
    assert [e.get("peer") for e in rated] == ["203.0.113.11"]
    a.close()
    b.close()
    # a's slot is free again once it left
    wait_until(lambda: code_once(proxied(srv.port, "203.0.113.11", sport=40002)) == 220,
               timeout=10, message="the slot of 203.0.113.11 to be released")


@pytest.mark.parametrize("first,second", [
    (("TCP6", "2001:db8::7"), ("TCP6", "2001:DB8:0:0:0:0:0:7")),
    (("TCP6", "2001:db8:0:0:1::7"), ("TCP6", "2001:db8::1:0:0:7")),
], ids=["case-and-zeros", "zero-run-placement"])
def test_ipv6_spellings_of_one_proxied_client_share_its_connection_slot(
        make_server: Any, first: tuple[str, str], second: tuple[str, str]) -> None:
    srv = make_server({"smtp": {
        "listeners": [{**LISTENER, "proxyProtocol": True}],
        "rateLimit": {"maxConnectionsPerIp": 1, **NO_EXEMPT}}})
    a = proxied(srv.port, first[1], first[0])
    assert first_code(a) == 220
    b = proxied(srv.port, second[1], second[0], sport=40001)
    assert first_code(b) == 421
    a.close()
    b.close()


def test_ipv4_mapped_spelling_of_a_proxied_client_shares_its_connection_slot(
        make_server: Any) -> None:
    srv = make_server({"smtp": {
        "listeners": [{**LISTENER, "proxyProtocol": True}],
        "rateLimit": {"maxConnectionsPerIp": 1, **NO_EXEMPT}}})
    a = proxied(srv.port, "203.0.113.21")
    assert first_code(a) == 220
    b = proxied(srv.port, "::ffff:203.0.113.21", "TCP6", sport=40001)
    code = first_code(b)
    a.close()
    b.close()
    assert code == 421  # the same client already holds its one slot


def test_auth_ip_lockout_also_holds_on_a_dual_stack_listener(make_server: Any) -> None:
    srv = make_server({"smtp": {
        "auth": {"users": {"carol": "right-pass"}, "failureDelayMs": 0,
                 "rateLimitMaxFailures": 3},
        "listeners": [{**LISTENER, "allowPlaintextAuth": True},
                      # an IPv6 socket that takes IPv4 connections to 127.0.0.1 (loopback only)
                      {"port": 0, "bindAddress": "::ffff:127.0.0.1",
                       "allowPlaintextAuth": True}]}})
    v4 = Client(srv.port_of(0))
    greet(v4)
    # three unknown users: only the IP reaches the limit (carol's own count stays at 0)
    assert [v4.cmd(plain(f"guess{i}", "x"))[0] for i in range(3)] == [535, 535, 454]
    v4.close()
    again = Client(srv.port_of(0))
    greet(again)
    assert again.cmd(plain("carol", "right-pass"))[0] == 454  # the IP is locked
    again.close()
    mapped = Client(srv.port_of(1))
    assert mapped.reply()[0] == 220
    code, lines = mapped.cmd("EHLO client.test")
    assert code == 250
    seen_as = lines[0]
    code = mapped.cmd(plain("carol", "right-pass"))[0]
    mapped.close()
    assert code == 454, f"same client, seen as {seen_as!r}, logged in"


@pytest.mark.parametrize(("prefix", "shared"), [(None, True), (128, False)])
def test_ipv6_clients_are_counted_by_network(make_server: Any, prefix: int | None,
                                             shared: bool) -> None:
    """Two addresses of one IPv6 /84 (smtp.rateLimit.ipv6PrefixLength, default 84, Postfix's
    smtpd_client_ipv6_prefix_length) share one connection slot; another /84 has its own.
    With 128 every address counts alone (an IPv6 client used to get a fresh budget at each
    address of its /64)."""
    rate: dict[str, Any] = {"maxConnectionsPerIp": 1, **NO_EXEMPT}
    if prefix is not None:
        rate["ipv6PrefixLength"] = prefix
    srv = make_server({"smtp": {"listeners": [{**LISTENER, "proxyProtocol": True}],
                                "rateLimit": rate}})
    a = proxied(srv.port, "2001:db8:1:2:3:4:5:6", "TCP6")
    try:
        assert first_code(a) == 220
        neighbour = code_once(proxied(srv.port, "2001:db8:1:2:3:fff::7", "TCP6", 40001))
        other = code_once(proxied(srv.port, "2001:db8:1:2:4::1", "TCP6", 40002))
    finally:
        a.close()
    assert neighbour == (421 if shared else 220)
    assert other == 220  # another /84 (and another /128)


def test_auth_lockout_holds_across_an_ipv6_network(make_server: Any) -> None:
    """A guesser rotating through the addresses of its network meets one failure count."""
    srv = make_server({"smtp": {
        "listeners": [{**LISTENER, "proxyProtocol": True, "allowPlaintextAuth": True}],
        "auth": {"users": {"carol": "right-pass", "dave": "dave-pass"}, "failureDelayMs": 0,
                 "rateLimitMaxFailures": 3}}})
    answers = []
    for i in range(5):  # five guesses for dave, each from another address of one /84
        c = proxied(srv.port, f"2001:db8:7::{i + 1:x}", "TCP6", 41000 + i)
        try:
            greet(c)
            answers.append(c.cmd(plain("dave", f"guess-{i}"))[0])
        finally:
            c.close()
    # max 3: two refusals, the third failure locks (answered 454), then locked
    assert answers == [535, 535, 454, 454, 454], answers
    # carol (another user) from yet another address of that network: the IP lock holds ...
    c = proxied(srv.port, "2001:db8:7::99", "TCP6", 41010)
    try:
        greet(c)
        assert c.cmd(plain("carol", "right-pass"))[0] == 454
    finally:
        c.close()
    # ... and a client of another network is not affected
    c = proxied(srv.port, "2001:db8:8::1", "TCP6", 41011)
    try:
        greet(c)
        assert c.cmd(plain("carol", "right-pass"))[0] == 235
    finally:
        c.close()


# == Redis backend ============================================================================


def _redis_overrides(url: str, prefix: str, command_timeout_ms: int = 5000,
                     counter_ttl: int = 900, **rate: Any) -> dict[str, Any]:
    """smtp.* overrides: every limiter on the Redis at ``url`` under ``prefix``."""
    return {"redis": {"url": url, "commandTimeoutMs": command_timeout_ms,
                      "connectTimeoutMs": 2000},
            "spool": {"type": "file"},
            "rateLimit": {"backend": "redis", **NO_EXEMPT, **rate,
                          "redis": {"keyPrefix": f"{prefix}:conn",
                                    "connectionCounterTtlSeconds": counter_ttl}},
            "auth": {"users": {"carol": "right-pass"}, "failureDelayMs": 0,
                     "rateLimitBackend": "redis", "rateLimitMaxFailures": 3,
                     "rateLimitRedis": {"keyPrefix": f"{prefix}:auth"}},
            "listeners": [{**LISTENER, "allowPlaintextAuth": True}]}


def greeted(port: int) -> bool:
    c = Client(port)
    try:
        return first_code(c) == 220
    finally:
        c.close()


def test_a_connection_acquire_that_timed_out_on_a_slow_redis_leaks_no_count(
        make_server: Any, redis_server: RedisServer, events: list[dict[str, Any]]) -> None:
    prefix = f"hunt-{uuid.uuid4().hex[:10]}"
    srv = make_server({"smtp": _redis_overrides(redis_server.url, prefix, command_timeout_ms=300,
                                                maxConnectionsPerIp=1)})
    assert greeted(srv.port)
    wait_until(lambda: session_count(srv) == 0, timeout=10, message="the probe to end")
    wait_until(lambda: redis_keys(redis_server.port, f"{prefix}:conn:conn:*") == [], timeout=10,
               message="the probe's count to be released")
    # Redis is slow for a while: the next acquire outlives its 300 ms deadline (fail open).
    assert redis_command(redis_server.port, "CLIENT", "PAUSE", "1200", "ALL") == "OK"
    c = Client(srv.port)
    assert first_code(c) == 220  # allowed: Redis did not answer in time
    assert any("Redis unavailable" in str(e.get("log_format", "")) for e in list(events))
    c.close()
    wait_until(lambda: session_count(srv) == 0, timeout=10, message="the session to end")
    assert redis_command(redis_server.port, "PING", timeout=10) == "PONG"  # after the pause
    # Nobody is connected from 127.0.0.1 now: a new connection must be admitted.
    wait_until(lambda: greeted(srv.port), timeout=5,
               message="a connection from an IP that holds none to be admitted "
                       f"(redis: {redis_command(redis_server.port, 'KEYS', prefix + '*')})")


def test_two_nodes_share_every_limit_through_redis_under_the_configured_prefixes(
        make_server: Any, redis_server: RedisServer) -> None:
    prefix = f"hunt-{uuid.uuid4().hex[:10]}"
    smtp = _redis_overrides(redis_server.url, prefix, counter_ttl=60, maxConnectionsPerIp=2,
                            maxMessagesPerIpPerHour=3)
    smtp["auth"]["rateLimitLockoutSeconds"] = 60
    smtp["auth"]["rateLimitWindowSeconds"] = 30
    one, two = make_server({"smtp": smtp}), make_server({"smtp": smtp})
    a, b = Client(one.port), Client(two.port)
    greet(a)
    greet(b)
    for port in (one.port, two.port):  # two connections held, one on each node
        c = Client(port)
        code, lines = c.reply()
        assert (code, lines[0][:5]) == (421, "4.7.0")
        c.close()
    conn_key = f"{prefix}:conn:conn:127.0.0.1"
    counts = redis_command(redis_server.port, "HGETALL", conn_key)
    assert sorted(int(v) for v in counts[1::2]) == [1, 1]  # one count per node
    assert 0 < redis_command(redis_server.port, "PTTL", conn_key) <= 60_000
    # messages: 3 per hour over both nodes
    for c in (a, b, a):
        assert c.cmd("MAIL FROM:<x@remote.test>")[0] == 250
        assert c.cmd("RSET")[0] == 250
    assert b.cmd("MAIL FROM:<x@remote.test>")[0] == 451
    (msg_key,) = redis_keys(redis_server.port, f"{prefix}:conn:msg:127.0.0.1:*")
    assert 0 < redis_command(redis_server.port, "PTTL", msg_key) <= 3660_000
    # AUTH: failures on either node add up; the lock holds on both
    assert a.cmd(plain("guess1", "x"))[0] == 535
    assert b.cmd(plain("guess2", "x"))[0] == 535
    fail_key = f"{prefix}:auth:fail:ip:127.0.0.1"
    assert 0 < redis_command(redis_server.port, "PTTL", fail_key) <= 30_000
    assert a.cmd(plain("guess3", "x"))[0] == 454  # the third failure locks the IP
    assert b.cmd(plain("carol", "right-pass"))[0] == 454
    lock_key = f"{prefix}:auth:lock:ip:127.0.0.1"
    assert 50_000 < redis_command(redis_server.port, "PTTL", lock_key) <= 60_000
    assert redis_command(redis_server.port, "EXISTS", fail_key) == 0
    # nothing outside the two configured prefixes
    assert set(redis_keys(redis_server.port, f"{prefix}*")) == set(redis_keys(
        redis_server.port, f"{prefix}:conn:*") + redis_keys(redis_server.port, f"{prefix}:auth:*"))
    quit_and_close(a)
    quit_and_close(b)
    wait_until(lambda: redis_command(redis_server.port, "EXISTS", conn_key) == 0, timeout=10,
               message="both nodes' counts to be released")


def test_limits_fail_open_while_redis_is_down_and_hold_again_after_its_restart(
        make_server: Any, events: list[dict[str, Any]], failures: list[Any]) -> None:
    redis = RedisServer()
    redis.start()
    try:
        srv = make_server({"smtp": _redis_overrides(
            redis.url, "hunt-restart", command_timeout_ms=500, maxConnectionsPerIp=1,
            maxMessagesPerIpPerHour=1)})
        a = Client(srv.port)
        greet(a)
        assert code_once(Client(srv.port)) == 421
        quit_and_close(a)
        wait_until(lambda: session_count(srv) == 0, timeout=10, message="sessions to end")

        redis.stop()
        held = [Client(srv.port) for _ in range(2)]
        for c in held:  # documented: limits fail open (the spool would refuse mail anyway)
            greet(c)
        assert held[0].cmd("MAIL FROM:<x@remote.test>")[0] == 250
        assert held[1].cmd("MAIL FROM:<x@remote.test>")[0] == 250
        assert held[0].cmd("RSET")[0] == 250
        assert [held[0].cmd(plain(f"g{i}", "x"))[0] for i in range(4)] == [535] * 4
        warned = " ".join(str(e.get("log_format", "")) for e in list(events))
        assert "Redis unavailable" in warned
        for c in held:
            quit_and_close(c)
        wait_until(lambda: session_count(srv) == 0, timeout=10, message="sessions to end")

        redis.start()  # same port, empty: scripts and counters are gone
        wait_until(lambda: srv.service.redis.connected, timeout=15, message="reconnect")
        a = Client(srv.port)
        greet(a)
        # the fail-open sessions were never counted and released nothing (no negative counts)
        assert code_once(Client(srv.port)) == 421
        assert a.cmd("MAIL FROM:<x@remote.test>")[0] == 250
        assert a.cmd("RSET")[0] == 250
        assert a.cmd("MAIL FROM:<x@remote.test>")[0] == 451
        assert a.cmd("RSET")[0] == 250
        assert [a.cmd(plain(f"h{i}", "x"))[0] for i in range(2)] == [535, 535]
        assert a.cmd(plain("h2", "x"))[0] == 454
        quit_and_close(a)
        assert not [f for f in failures if "log_failure" in f], failures[:1]
    finally:
        redis.cleanup()


# == several worker processes (smtp.workers) ==================================================


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, Any]]:
    """A twistd with 2 SMTP processes sharing the port (SO_REUSEPORT), local limits of 3."""
    with MtaPool(tmp_path_factory.mktemp("workers")) as pool:
        root, port = pool.root(), free_port()
        conf = make_config(root, overrides={"smtp": {
            "workers": 2,
            "listeners": [{"port": port, "bindAddress": "127.0.0.1",
                           "allowPlaintextAuth": True}],
            "rateLimit": {"maxConnectionsPerIp": 3, "maxMessagesPerIpPerHour": 3, **NO_EXEMPT},
            "auth": {"users": {"carol": "right-pass"}, "failureDelayMs": 0,
                     "rateLimitMaxFailures": 3}}})
        mta = pool.from_config(conf, root)
        wait_until(lambda: len(tcp_socket_inodes(port, TCP_LISTEN)) == 2, timeout=30,
                   message="both worker processes to listen")
        yield port, mta


def _first_reply(port: int) -> tuple[int, socket.socket]:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    f = s.makefile("rb")
    line = f.readline()
    return (int(line[:3]) if line[:3].isdigit() else -1), s


def _session(port: int, lines: list[str]) -> list[int]:
    """One session: greeting, EHLO, ``lines``, QUIT; the codes of ``lines``. A 421 greeting
    (a slot of an earlier, just closed connection not yet released) is retried."""

    def admitted() -> Client | None:
        c = Client(port)
        if first_code(c) == 220:
            return c
        c.close()
        return None

    c: Client = wait_until(admitted, timeout=10, message="a connection slot")
    try:
        assert c.cmd("EHLO client.test")[0] == 250
        codes = [c.cmd(line)[0] for line in lines]
        c.cmd("QUIT")
        c.closed(timeout=5)
        return codes
    finally:
        c.close()


def test_workers_never_admit_more_connections_per_ip_than_the_limit(
        two_workers: tuple[int, Any]) -> None:
    port, _ = two_workers
    held: list[socket.socket] = []
    try:
        codes = []
        for _ in range(16):  # the kernel hashes them over both processes
            code, s = _first_reply(port)
            codes.append(code)
            held.append(s)
        assert codes.count(220) + codes.count(421) == 16, codes
        assert codes.count(220) <= 3, codes
    finally:
        for s in held:
            s.close()


def test_workers_never_accept_more_messages_per_ip_than_the_limit(
        two_workers: tuple[int, Any]) -> None:
    port, _ = two_workers
    accepted = 0
    for _ in range(16):  # one transaction per connection, spread over both processes
        (code,) = _session(port, ["MAIL FROM:<x@remote.test>"])
        assert code in (250, 451)
        accepted += code == 250
    assert accepted <= 3


def test_workers_auth_lockout_holds_on_every_process(two_workers: tuple[int, Any]) -> None:
    """With two processes and the local backend each process locks an IP after its share of
    rateLimitMaxFailures (3 // 2 = 1; was ceil: 2 each, 4 in all), so a client spreading its
    guesses over both gets no more than 3 passwords checked; the rest are refused unchecked
    (454) however many connections it makes."""
    port, mta = two_workers
    answers = []
    for i in range(12):  # wrong passwords, on connections the kernel spreads over both
        (code,) = _session(port, [plain("carol", f"wrong-{i}")])
        answers.append(code)
    assert set(answers) <= {535, 454}, answers

    def checked() -> int:  # one event=auth_failure line per password checked and refused
        return mta.log().count("authentication failed for carol")

    # (the failure that locks is answered 454 too: the log is what counts checks)
    wait_until(lambda: checked() >= answers.count(535) + 1, timeout=10,
               message="the failures logged")
    assert checked() <= 3, f"{checked()} passwords checked, limit 3: {answers}"


def _commands_processed(port: int) -> int:
    info = redis_command(port, "INFO", "stats").decode()
    (line,) = [ln for ln in info.splitlines() if ln.startswith("total_commands_processed:")]
    return int(line.split(":")[1])


@pytest.mark.parametrize("ttl", [0, -30])
def test_non_positive_connection_counter_ttl_is_refused_or_harmless(
        make_server: Any, redis_server: RedisServer, ttl: int) -> None:
    prefix = f"hunt-{uuid.uuid4().hex[:10]}"
    try:
        srv = make_server({"smtp": _redis_overrides(redis_server.url, prefix, counter_ttl=ttl,
                                                    maxConnectionsPerIp=1)})
    except cfg.ConfigError as exc:  # the fix we expect: refused at start-up, key named
        assert "connectionCounterTtlSeconds" in str(exc)
        return
    a = Client(srv.port)
    try:
        greet(a)  # the limit admits the first connection
        before = _commands_processed(redis_server.port)
        extra = [code_once(Client(srv.port)) for _ in range(3)]
        assert extra == [421] * 3
        # Holding one connection costs a heartbeat now and then, not a flood of commands
        # (measured over the time the checks above took plus a short interval).
        time.sleep(0.5)  # a measuring interval, not synchronisation
        assert _commands_processed(redis_server.port) - before < 200
    finally:
        a.close()


def test_a_gracefully_stopped_node_leaves_no_connection_counts_behind(
        make_server: Any, redis_server: RedisServer) -> None:
    """A rolling restart: the clients of the stopping node get 421 and their counts go with
    them, so the replacement node (a new node id) admits them again at once."""
    prefix = f"hunt-{uuid.uuid4().hex[:10]}"
    smtp = _redis_overrides(redis_server.url, prefix, maxConnectionsPerIp=2)
    smtp["lifecycle"] = {"gracefulShutdownTimeoutMs": 300}
    old = make_server({"smtp": smtp})
    held = [Client(old.port) for _ in range(2)]
    for c in held:
        greet(c)
    conn_key = f"{prefix}:conn:conn:127.0.0.1"
    assert redis_command(redis_server.port, "HGETALL", conn_key)[1::2] == [b"2"]
    on_reactor(old.service.stopService, timeout=30)
    for c in held:
        assert c.closed(timeout=10)
        assert c.buf.startswith(b"421")
        c.close()
    new = make_server({"smtp": smtp})
    wait_until(lambda: redis_command(redis_server.port, "EXISTS", conn_key) == 0, timeout=5,
               message="the stopped node's counts to be released")
    again = [Client(new.port) for _ in range(2)]
    assert [first_code(c) for c in again] == [220, 220]
    for c in again:
        c.close()


# == message rate: what counts, BDAT, pipelining ==============================================


@pytest.mark.parametrize("backend", ["local", "redis"])
def test_message_rate_counts_refused_transactions_and_a_refused_bdat_chunk_is_never_executed(
        make_server: Any, redis_server: RedisServer, backend: str) -> None:
    """Like Postfix's smtpd_client_message_rate_limit, every MAIL counts whether or not the
    message is then accepted; once over, MAIL gets 451 4.7.0 and a BDAT chunk pipelined
    behind it is read and discarded (RFC 3030), never parsed as commands."""
    rate: dict[str, Any] = {"maxMessagesPerIpPerHour": 2, **NO_EXEMPT}
    if backend == "redis":
        smtp = _redis_overrides(redis_server.url, f"hunt-{uuid.uuid4().hex[:10]}", **rate)
    else:
        smtp = {"rateLimit": rate}
    srv = make_server({"smtp": smtp})
    c = Client(srv.port)
    greet(c)
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<nobody@localhost>")[0] == 550  # refused: still one MAIL request
    assert c.cmd("RSET")[0] == 250
    body = b"Subject: one\r\n\r\nfirst\r\n"
    c.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>\r\n"
           b"BDAT %d LAST\r\n%s" % (len(body), body))
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 250]
    smuggled = (b"RSET\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<bob@localhost>\r\n"
                b"BDAT 5 LAST\r\nevil!")
    c.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<bob@localhost>\r\n"
           b"BDAT %d LAST\r\n%sNOOP\r\n" % (len(smuggled), smuggled))
    replies = [c.reply() for _ in range(4)]
    assert [(code, lines[0][:5]) for code, lines in replies] == [
        (451, "4.7.0"), (503, "5.5.1"), (503, "5.5.1"), (250, "2.0.0")]
    quit_and_close(c)
    srv.wait_messages("alice", 1)
    assert srv.messages("bob") == []
    assert len(srv.spool_entries()) == 0


# == IPv6 loopback ============================================================================


def _v6_client(port: int) -> Client:
    c = Client.__new__(Client)
    c.sock = socket.create_connection(("::1", port), timeout=10)
    c.buf = b""
    return c


@pytest.mark.parametrize("exempt", [True, False], ids=["default-exempt", "limited"])
def test_ipv6_loopback_client_is_exempt_by_default_and_limited_otherwise(
        make_server: Any, exempt: bool) -> None:
    rate: dict[str, Any] = {"maxConnectionsPerIp": 1, "maxMessagesPerIpPerHour": 1}
    if not exempt:
        rate.update(NO_EXEMPT)
    srv = make_server({"smtp": {"rateLimit": rate,
                                "listeners": [{"port": 0, "bindAddress": "::1"}]}})
    a, b = _v6_client(srv.port), _v6_client(srv.port)
    greet(a)
    code = first_code(b)
    assert code == (220 if exempt else 421)
    for _ in range(2):
        assert a.cmd("MAIL FROM:<a@remote.test>")[0] in (250, 451)
        a.cmd("RSET")
    assert a.cmd("MAIL FROM:<a@remote.test>")[0] == (250 if exempt else 451)
    if not exempt:
        limiter: Any = srv.service.connection_limiter.inner
        # counted under its /84 network (smtp.rateLimit.ipv6PrefixLength)
        assert on_reactor(lambda: limiter.open_count("::/84")) == 1
    a.close()
    b.close()


# == AUTH lockout =============================================================================


def test_auth_lockout_behind_a_proxy_locks_the_real_client_only_and_expires(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    srv = make_server({"smtp": {
        "auth": {"users": {"carol": "right-pass", "dave": "dave-pass"}, "failureDelayMs": 0,
                 "rateLimitMaxFailures": 3, "rateLimitLockoutSeconds": 1},
        "listeners": [{**LISTENER, "proxyProtocol": True, "allowPlaintextAuth": True}]}})
    x = proxied(srv.port, "198.51.100.31")
    greet(x)
    assert [x.cmd(plain(f"guess{i}", "x"))[0] for i in range(3)] == [535, 535, 454]
    code, lines = x.cmd(plain("carol", "right-pass"))
    assert (code, lines[0][:5]) == (454, "4.7.0")  # the IP is locked, right password or not
    y = proxied(srv.port, "198.51.100.32")  # another client behind the same balancer
    greet(y)
    assert y.cmd(plain("carol", "right-pass"))[0] == 235
    failed = named(events, "auth_failure")
    assert {e.get("peer") for e in failed} == {"198.51.100.31"}
    assert [e.get("user") for e in failed] == ["guess0", "guess1", "guess2"]
    assert {e.get("peer") for e in named(events, "auth_locked")} == {"198.51.100.31"}
    # the lockout is over after rateLimitLockoutSeconds, and the window starts afresh
    x.close()

    def logs_in() -> bool:
        c = proxied(srv.port, "198.51.100.31", sport=40009)
        try:
            greet(c)
            return c.cmd(plain("dave", "dave-pass"))[0] == 235
        finally:
            c.close()

    wait_until(logs_in, timeout=10, interval=0.2, message="the lockout to expire")
    z = proxied(srv.port, "198.51.100.31", sport=40010)
    greet(z)
    assert [z.cmd(plain(f"again{i}", "x"))[0] for i in range(2)] == [535, 535]
    z.close()
    y.close()
