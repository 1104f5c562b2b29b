"""Redis-only spool behaviour: leases across nodes, size limit, staging, WAIT, Redis outages."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import RedisServer, on_reactor, wait_until
from twisted.internet import task

from kotlin_smtp_py.config import Config, RedisSpoolConfig, SmtpConfig, SpoolConfig, StorageConfig
from kotlin_smtp_py.redisconn import RedisUnavailable
from kotlin_smtp_py.spool.redis import LeaseLost, MessageTooLarge, RedisSpool, ReplicationError

from .conftest import redis_client
from .test_contract import BODY, claim, envelope, store

Factory = Callable[..., Any]


def frozen_clock() -> task.Clock:
    """A clock that reads like the wall clock but never advances: its LoopingCalls never run,
    so a spool using it behaves like a node that stopped renewing its leases (it died)."""
    clock = task.Clock()
    clock.advance(time.time())
    return clock


def keys(spool: RedisSpool, pattern: str = "*") -> list[bytes]:
    return sorted(on_reactor(spool.client.execute, "KEYS", f"{spool.prefix}:{pattern}"))


def test_lease_expires_and_another_node_takes_over(redis_spool_factory: Factory) -> None:
    dead = redis_spool_factory(lock_ttl_seconds=2.0, clock=frozen_clock())
    alive = redis_spool_factory(lock_ttl_seconds=2.0)
    entry = store(dead)
    stale = claim(dead, entry.queue_id)
    assert stale is not None
    assert claim(alive, entry.queue_id) is None
    # The lease lapses after the TTL; claim() also moved the due time to the lease expiry.
    wait_until(lambda: entry.queue_id in on_reactor(alive.due, time.time(), 10), timeout=10,
               message="entry due again after lease expiry")
    fresh = wait_until(lambda: claim(alive, entry.queue_id), timeout=10,
                       message="second node claims after lease expiry")
    # The stale holder can neither update nor delete the entry now.
    with pytest.raises(LeaseLost):
        on_reactor(dead.reschedule, stale, entry.evolve(next_attempt=time.time() + 999))
    with pytest.raises(LeaseLost):
        on_reactor(dead.complete, stale)
    on_reactor(dead.release, stale)  # harmless: does not free the other node's lease
    assert claim(dead, entry.queue_id) is None
    assert on_reactor(alive.get, entry.queue_id) == entry
    assert on_reactor(alive.read_message, entry.queue_id) == BODY
    assert not os.path.exists(stale.message_path)
    on_reactor(alive.complete, fresh)
    assert on_reactor(alive.get, entry.queue_id) is None


def test_renewal_tick_extends_the_lease(redis_spool_factory: Factory) -> None:
    clock = frozen_clock()
    holder = redis_spool_factory(lock_ttl_seconds=3.0, clock=clock)
    entry = store(holder)
    c = claim(holder, entry.queue_id)
    assert c is not None
    lock_key = holder.key("lock", entry.queue_id)

    def pttl() -> int:
        return int(on_reactor(holder.client.execute, "PTTL", lock_key))

    wait_until(lambda: 0 < pttl() < 2700, timeout=10, message="lease TTL running down")
    on_reactor(clock.advance, 1.0)  # one renewal tick (ttl/3)
    wait_until(lambda: pttl() > 2700, timeout=5, message="lease renewed to the full TTL")
    assert holder.lease_lost(c) is False
    on_reactor(holder.complete, c)
    assert on_reactor(holder.client.execute, "EXISTS", lock_key) == 0


def test_lease_outlives_its_ttl_while_held(redis_spool_factory: Factory) -> None:
    ttl = 3.0
    holder = redis_spool_factory(lock_ttl_seconds=ttl)
    other = redis_spool_factory(lock_ttl_seconds=ttl)
    entry = store(holder)
    c = claim(holder, entry.queue_id)
    assert c is not None
    start = time.monotonic()
    checked_after_ttl = 0
    # Bounded: keep trying another node's claim until well past the TTL (real time: only the
    # renewal loop can keep the lease), however slow each round trip is on a loaded machine.
    for _ in range(1000):
        assert claim(other, entry.queue_id) is None, "lease lapsed although it was renewed"
        if time.monotonic() - start > ttl * 1.5:
            checked_after_ttl += 1
            if checked_after_ttl >= 3:
                break
        time.sleep(0.05)
    assert checked_after_ttl >= 3
    assert holder.lease_lost(c) is False
    on_reactor(holder.complete, c)


def test_renewal_notices_a_lost_lease(redis_spool_factory: Factory) -> None:
    clock = frozen_clock()
    holder = redis_spool_factory(lock_ttl_seconds=30, clock=clock)
    entry = store(holder)
    c = claim(holder, entry.queue_id)
    assert c is not None
    on_reactor(holder.client.execute, "SET", holder.key("lock", entry.queue_id), b"stolen")
    on_reactor(clock.advance, 10.0)  # one renewal tick (ttl/3)
    wait_until(lambda: on_reactor(holder.lease_lost, c), timeout=5, message="lease_lost")
    with pytest.raises(LeaseLost):
        on_reactor(holder.complete, c)
    assert on_reactor(holder.get, entry.queue_id) == entry


def test_claimed_entry_is_not_due_until_lease_expires(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory(lock_ttl_seconds=60)
    entry = store(spool)
    c = claim(spool, entry.queue_id)
    assert c is not None
    assert on_reactor(spool.due, time.time() + 1, 10) == []
    assert on_reactor(spool.due, time.time() + 61, 10) == [entry.queue_id]
    on_reactor(spool.release, c)
    assert on_reactor(spool.due, time.time() + 1, 10) == [entry.queue_id]


def test_claim_file_removed_when_claim_ends(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory()
    entry = store(spool)
    for end in ("release", "reschedule", "complete"):
        c = claim(spool, entry.queue_id)
        assert c is not None and os.path.exists(c.message_path)
        assert os.path.dirname(c.message_path) == spool.temp_dir
        if end == "reschedule":
            on_reactor(spool.reschedule, c, entry)
        else:
            on_reactor(getattr(spool, end), c)
        assert not os.path.exists(c.message_path), end
    assert os.listdir(spool.temp_dir) == []


def test_deleting_a_leased_entry_is_refused(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory()
    entry = store(spool)
    c = claim(spool, entry.queue_id)
    assert c is not None
    assert on_reactor(spool.delete, entry.queue_id) is False
    assert on_reactor(spool.retry_now, entry.queue_id) == 0
    on_reactor(spool.release, c)
    assert on_reactor(spool.delete, entry.queue_id) is True


def test_message_above_max_raw_bytes_is_refused(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory(max_raw_bytes=1000)
    assert spool.max_message_bytes == 1000
    writer = on_reactor(spool.open_writer)
    assert writer.max_message_bytes == 1000
    for _ in range(15):
        on_reactor(writer.write, b"x" * 100)
    assert writer.too_big
    with pytest.raises(MessageTooLarge) as info:
        on_reactor(writer.commit, envelope())
    assert info.value.limit == 1000 and info.value.size == 1500
    wait_until(lambda: keys(spool) == [], timeout=5, message="no keys left")
    exact = store(spool, b"y" * 1000)  # the limit itself is allowed
    assert on_reactor(spool.read_message, exact.queue_id) == b"y" * 1000


def test_large_message_is_streamed_in_chunks(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory()
    body = os.urandom(3 * 1024 * 1024 + 5)
    writer = on_reactor(spool.open_writer)
    stage = spool.key("stage", writer.queue_id)
    for i in range(0, len(body), 65536):
        on_reactor(writer.write, body[i:i + 65536])
    # Before commit, most of the message already sits in the staging key, not in memory.
    wait_until(lambda: on_reactor(spool.client.execute, "STRLEN", stage) >= 3 * 1024 * 1024,
               timeout=5, message="chunks appended to the staging key")
    assert 0 < on_reactor(spool.client.execute, "PTTL", stage)
    entry = on_reactor(writer.commit, envelope())
    assert on_reactor(spool.read_message, entry.queue_id) == body
    assert keys(spool, "stage:*") == []


def test_abort_removes_staged_chunks(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory()
    writer = on_reactor(spool.open_writer)
    on_reactor(writer.write, b"z" * (1024 * 1024))
    on_reactor(writer.abort)
    wait_until(lambda: keys(spool) == [], timeout=5, message="staging key removed")


def test_unreadable_entry_is_quarantined(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory()
    qid = "0123456789abcdefghij"
    on_reactor(spool.client.execute, "SET", spool.key("meta", qid), b"{not json")
    on_reactor(spool.client.execute, "SET", spool.key("msg", qid), b"body")
    on_reactor(spool.client.execute, "ZADD", spool.key("due"), 1, qid)
    assert on_reactor(spool.due, time.time(), 10) == [qid]
    assert claim(spool, qid) is None
    assert on_reactor(spool.due, time.time(), 10) == []
    assert keys(spool) == sorted([spool.key("corrupt", qid + ":meta").encode(),
                                  spool.key("corrupt", qid + ":msg").encode()])


def test_min_replicas_not_reached_fails_commit_and_rolls_back(
        redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory(min_replicas=1, replica_wait_ms=100)
    with pytest.raises(ReplicationError):
        store(spool)
    assert on_reactor(spool.list_entries) == []
    assert keys(spool) == []


def test_from_config_uses_spool_redis_settings(redis_server: RedisServer, tmp_path: Path,
                                               reactor_thread: None) -> None:
    client = redis_client(redis_server)
    config = Config(smtp=SmtpConfig(
        storage=StorageConfig(tempDir=str(tmp_path / "t")),
        spool=SpoolConfig(type="redis", redis=RedisSpoolConfig(
            keyPrefix="cfg-test:spool", maxRawBytes=1234, lockTtlSeconds=42, minReplicas=0))))
    try:
        spool = on_reactor(RedisSpool.from_config, client, config)
        assert (spool.prefix, spool.max_message_bytes, spool.lock_ttl, spool.min_replicas,
                spool.temp_dir) == ("cfg-test:spool", 1234, 42.0, 0, str(tmp_path / "t"))
        assert os.path.isdir(spool.temp_dir)
    finally:
        on_reactor(client.close)


@pytest.fixture
def own_redis(reactor_thread: None) -> Iterator[RedisServer]:
    """A private Redis (with AOF) that a test may stop and restart. Fails if Redis is missing."""
    server = RedisServer(appendonly=True)
    server.start()
    yield server
    server.cleanup()


def test_redis_outage_fails_fast_and_recovers_by_itself(own_redis: RedisServer,
                                                        tmp_path: Path) -> None:
    from kotlin_smtp_py.spool.redis import RedisSpool

    client = redis_client(own_redis, command_timeout_ms=1000)
    spool = on_reactor(lambda: RedisSpool(client, "outage:spool", str(tmp_path / "t")))
    try:
        before = store(spool)
        own_redis.stop()
        started = time.monotonic()
        with pytest.raises(RedisUnavailable):
            store(spool)
        with pytest.raises(RedisUnavailable):
            on_reactor(spool.due, time.time(), 10)
        ok, why = on_reactor(spool.healthy)
        assert time.monotonic() - started < 4.0
        assert ok is False and why
        own_redis.start()  # same port, same AOF directory
        wait_until(lambda: on_reactor(spool.healthy)[0], timeout=15,
                   message="spool healthy after Redis restart")
        after = store(spool)
        assert on_reactor(spool.get, before.queue_id) == before  # persisted with AOF
        assert sorted(on_reactor(spool.due, time.time() + 1, 10)) == sorted(
            [before.queue_id, after.queue_id])
    finally:
        on_reactor(spool.close)
        on_reactor(client.close)


def test_hung_redis_hits_the_command_deadline(own_redis: RedisServer, tmp_path: Path) -> None:
    from kotlin_smtp_py.spool.redis import RedisSpool

    client = redis_client(own_redis, command_timeout_ms=2000)
    spool = on_reactor(lambda: RedisSpool(client, "hung:spool", str(tmp_path / "t")))
    assert own_redis.proc is not None
    try:
        store(spool)
        own_redis.proc.send_signal(signal.SIGSTOP)  # connected, but never answers
        try:
            started = time.monotonic()
            with pytest.raises(RedisUnavailable, match="timed out"):
                store(spool)
            ok, _ = on_reactor(spool.healthy)
            assert ok is False
            assert time.monotonic() - started < 15.0  # the deadline, not a hang
        finally:
            own_redis.proc.send_signal(signal.SIGCONT)
        wait_until(lambda: on_reactor(spool.healthy)[0], timeout=10, message="healthy again")
        entry = store(spool)
        assert on_reactor(spool.read_message, entry.queue_id) == BODY
    finally:
        on_reactor(spool.close)
        on_reactor(client.close)


def test_pending_count_from_another_thread(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory()
    writer_side = redis_spool_factory()  # another node's writes reach us via the refresh
    for _ in range(2):
        store(writer_side)
    # called from the test thread, like a metrics scrape in a WSGI thread
    wait_until(lambda: spool.pending_count() == 2, timeout=5, message="pending_count == 2")


def test_min_replicas_with_a_real_replica(tmp_path: Path, reactor_thread: None) -> None:
    """WAIT with a live replica: the commit succeeds only once the replica has the entry; with
    the replica gone it fails (the protocol answers 451) instead of acknowledging."""
    from helpers import RedisServer

    from kotlin_smtp_py.spool.redis import RedisSpool, ReplicationError

    primary = RedisServer()
    primary.start()
    replica = RedisServer(replica_of=primary.port)
    try:
        replica.start()

        def info(port: int) -> bytes:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
                s.sendall(b"INFO replication\r\n")
                return s.recv(8192)

        def replica_linked() -> bool:
            return b"connected_slaves:1" in info(primary.port)

        wait_until(lambda: b"master_link_status:up" in info(replica.port), timeout=30,
                   message="replica in sync")
        client = redis_client(primary)
        spool = on_reactor(lambda: RedisSpool(client, "wait:spool", str(tmp_path / "t"),
                                              min_replicas=1, replica_wait_ms=2000))
        entry = store(spool)
        rclient = redis_client(replica)
        copied = on_reactor(rclient.execute, "EXISTS", spool.key("msg", entry.queue_id))
        assert copied == 1  # WAIT returned: the replica already holds the message
        replica.stop()
        wait_until(lambda: not replica_linked(), timeout=30, message="replica detached")
        with pytest.raises(ReplicationError):
            store(spool)
        on_reactor(spool.close)
        on_reactor(client.close)
        on_reactor(rclient.close)
    finally:
        replica.cleanup()
        primary.cleanup()
