"""Bug hunt on the Redis spool against real private redis-servers: chunk boundaries, the
maxRawBytes limit (spool and SMTP level), staging cleanup, concurrent claims across nodes, lease
loss, id collisions, key prefix isolation, a Redis restart without persistence, corrupt data."""

from __future__ import annotations

import json
import os
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CertSet, RedisServer, deep_merge, on_reactor, wait_until
from twisted.internet import defer

from kotlin_smtp_py.spool.redis import (
    CHUNK_BYTES,
    STAGING_TTL_MS,
    LeaseLost,
    MessageTooLarge,
    RedisSpool,
    RedisSpoolWriter,
    StagingError,
)

from .conftest import redis_client
from .test_contract import BODY, claim, envelope, file_bytes, store, wait_pending
from .test_redis_spool import frozen_clock, keys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(__file__)), "protocol"))
from protocol_support import Client, Server

Factory = Callable[..., Any]
QID = "0123456789abcdefghij"


def _pattern(size: int) -> bytes:
    """``size`` bytes with NUL, bare CR, bare LF, 8-bit bytes and CRLF."""
    unit = b"\x00\r\xff\n\x80a\r\n\xc3("
    return (unit * (size // len(unit) + 1))[:size]


# -- binary safety at the chunk boundaries -----------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1,
                                  2 * CHUNK_BYTES, 2 * CHUNK_BYTES + 1])
@pytest.mark.parametrize("piece", [0, 4099])
def test_chunk_boundary_sizes_round_trip(redis_spool_factory: Factory, size: int,
                                         piece: int) -> None:
    spool = redis_spool_factory()
    body = _pattern(size)
    entry = store(spool, body, chunk=piece, env=envelope(size=size))
    assert on_reactor(spool.client.execute, "STRLEN", spool.key("msg", entry.queue_id)) == size
    assert on_reactor(spool.read_message, entry.queue_id) == body
    c = claim(spool, entry.queue_id)
    assert c is not None and file_bytes(c.message_path) == body
    on_reactor(spool.complete, c)
    assert keys(spool) == []


# -- maxRawBytes --------------------------------------------------------------------------------

def test_max_raw_bytes_across_a_chunk_boundary(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory(max_raw_bytes=CHUNK_BYTES + 10)
    exact = _pattern(CHUNK_BYTES + 10)
    entry = store(spool, exact, chunk=65536)
    assert on_reactor(spool.read_message, entry.queue_id) == exact
    # One over, after a whole chunk already sits in the staging key: refused and cleaned up.
    writer = on_reactor(spool.open_writer)
    for i in range(0, len(exact) + 1, 65536):
        on_reactor(writer.write, (exact + b"!")[i:i + 65536])
    assert writer.too_big
    with pytest.raises(MessageTooLarge) as info:
        on_reactor(writer.commit, envelope())
    assert info.value.size == CHUNK_BYTES + 11
    wait_until(lambda: keys(spool, "stage:*") == [], timeout=5, message="stage removed")
    assert [s.queue_id for s in on_reactor(spool.list_entries)] == [entry.queue_id]


@pytest.fixture
def redis_smtp(tmp_path: Path, certs: CertSet, redis_server: RedisServer,
               reactor_thread: None) -> Iterator[Callable[[int], Server]]:
    """A real SmtpService on the Redis spool with ``maxRawBytes`` = the argument."""
    from kotlin_smtp_py import config as cfg
    from kotlin_smtp_py.service import SmtpService

    started: list[Any] = []

    def make(max_raw: int) -> Server:
        root = tmp_path / f"srv{len(started)}"
        for sub in ("spool", "temp", "lists", "mailboxes/alice"):
            (root / sub).mkdir(parents=True)
        base: dict[str, Any] = {"smtp": {
            "hostname": "mx.test",
            "listeners": [{"port": 0, "bindAddress": "127.0.0.1"}],
            "routing": {"localDomain": "localhost"},
            "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                        "listsDir": str(root / "lists")},
            "limits": {"maxMessageSizeBytes": 1_000_000},
            "lifecycle": {"gracefulShutdownTimeoutMs": 2000},
            "redis": {"url": redis_server.url, "commandTimeoutMs": 5000,
                      "connectTimeoutMs": 5000},
            "spool": {"type": "redis", "retryDelaySeconds": 1,
                      "redis": {"keyPrefix": f"hunt-{uuid.uuid4().hex[:10]}:spool",
                                "maxRawBytes": max_raw}},
        }, "management": {"server": {"port": 0}}}
        config = cfg.load_text(yaml.safe_dump(deep_merge(base, {})))
        svc = on_reactor(SmtpService, config)
        on_reactor(svc.startService)
        started.append(svc)
        redis = svc.redis
        assert redis is not None
        wait_until(lambda: redis.connected, timeout=30, message="the server's Redis")
        return Server(svc, root)

    yield make
    for svc in started:
        on_reactor(svc.stopService, timeout=30)


def _message_of(size: int) -> bytes:
    head = (b"From: a@remote.test\r\nTo: alice@localhost\r\nSubject: limit\r\n"
            b"Message-ID: <limit@remote.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n\r\n")
    body = b"x" * (size - len(head) - 2) + b"\r\n"
    msg = head + body
    assert len(msg) == size
    return msg


def _send(port: int, msg: bytes, size_param: int | None = None) -> tuple[int, list[str]]:
    c = Client(port)
    try:
        c.reply()
        code, lines = c.cmd("EHLO c.test")
        assert code == 250
        mail = "MAIL FROM:<a@remote.test>" + (f" SIZE={size_param}" if size_param else "")
        code, lines = c.cmd(mail)
        if code != 250:
            return code, lines
        assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(msg + b".\r\n")
        return c.reply()
    finally:
        c.close()


def _advertised_size(port: int) -> int:
    c = Client(port)
    try:
        c.reply()
        _, lines = c.cmd("EHLO c.test")
    finally:
        c.close()
    return int(next(ln for ln in lines if ln.startswith("SIZE ")).split()[1])


def test_smtp_one_byte_over_max_raw_bytes_is_a_clean_552(redis_smtp: Any) -> None:
    limit = 4000
    srv = redis_smtp(limit)
    advertised = _advertised_size(srv.port)
    assert advertised < limit  # room for the header fields we add
    code, lines = _send(srv.port, _message_of(advertised + 1))
    assert (code, lines[0][:5]) == (552, "5.3.4")
    code, lines = _send(srv.port, _message_of(300), size_param=advertised + 1)
    assert (code, lines[0][:5]) == (552, "5.3.4")
    spool = srv.service.spool
    assert on_reactor(spool.list_entries) == []
    wait_until(lambda: keys(spool) == [], timeout=5, message="nothing staged or queued")


def test_smtp_message_of_exactly_the_advertised_size_is_accepted(redis_smtp: Any) -> None:
    limit = 4000
    srv = redis_smtp(limit)
    advertised = _advertised_size(srv.port)
    # no SIZE=: MAIL cannot refuse it; the spool stores it with our Received: etc. in front
    code, lines = _send(srv.port, _message_of(advertised))
    assert code == 250, (code, lines)


# -- staging cleanup ----------------------------------------------------------------------------

def test_abort_with_appends_still_in_flight_leaves_no_stage(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory()
    body = _pattern(3 * CHUNK_BYTES + 7)

    def write_and_abort() -> str:
        writer = spool.open_writer()
        for i in range(0, len(body), 65536):
            writer.write(body[i:i + 65536])
        assert writer._inflight  # the APPENDs have not been answered yet
        writer.abort()
        return str(writer.queue_id)

    qid = on_reactor(write_and_abort)
    wait_until(lambda: keys(spool) == [], timeout=5, message="staging key removed")
    assert on_reactor(spool.get, qid) is None


def test_abandoned_writer_stage_expires(redis_spool_factory: Factory) -> None:
    """A writer neither committed nor aborted (its process died) leaves a key with a TTL."""
    spool = redis_spool_factory()
    writer = on_reactor(spool.open_writer)
    on_reactor(writer.write, _pattern(CHUNK_BYTES + 1))
    stage = spool.key("stage", writer.queue_id)
    wait_until(lambda: on_reactor(spool.client.execute, "EXISTS", stage) == 1, timeout=5,
               message="chunk staged")
    ttl = on_reactor(spool.client.execute, "PTTL", stage)
    assert 0 < ttl <= STAGING_TTL_MS
    assert on_reactor(spool.list_entries) == []
    assert on_reactor(spool.due, time.time() + 1, 10) == []
    on_reactor(writer.abort)


# -- several nodes ------------------------------------------------------------------------------

def test_concurrent_claims_from_many_nodes_exactly_one_wins(redis_spool_factory: Factory) -> None:
    nodes = [redis_spool_factory() for _ in range(6)]
    entries = [store(nodes[0]) for _ in range(5)]

    def race() -> defer.Deferred[list[Any]]:
        return defer.gatherResults([n.claim(e.queue_id) for e in entries for n in nodes])

    results = on_reactor(race)
    for i, entry in enumerate(entries):
        got = [(j, c) for j, c in enumerate(results[i * len(nodes):(i + 1) * len(nodes)])
               if c is not None]
        assert len(got) == 1, entry.queue_id
        j, c = got[0]
        assert file_bytes(c.message_path) == BODY
        on_reactor(nodes[j].complete, c)
    wait_pending(nodes[1], 0)
    assert keys(nodes[0]) == []


def test_stale_holder_after_takeover_and_reschedule_changes_nothing(
        redis_spool_factory: Factory) -> None:
    """Node A's lease lapses during a slow delivery; B claims, reschedules (so no lock is held
    at all) and A then finishes: A can neither complete, reschedule, release nor retry it."""
    a = redis_spool_factory(lock_ttl_seconds=1.0, clock=frozen_clock())
    b = redis_spool_factory(lock_ttl_seconds=1.0)
    entry = store(a)
    stale = claim(a, entry.queue_id)
    assert stale is not None
    fresh = wait_until(lambda: claim(b, entry.queue_id), timeout=10, message="B takes over")
    later = time.time() + 3600
    updated = entry.evolve(attempts=1, next_attempt=later, last_error="451 from B")
    on_reactor(b.reschedule, fresh, updated)
    with pytest.raises(LeaseLost):
        on_reactor(a.complete, stale)
    with pytest.raises(LeaseLost):
        on_reactor(a.reschedule, stale, entry.evolve(next_attempt=time.time()))
    on_reactor(a.release, stale)
    assert on_reactor(b.get, entry.queue_id) == updated
    assert on_reactor(b.read_message, entry.queue_id) == BODY
    assert on_reactor(b.due, time.time() + 1, 10) == []  # still B's due time, not A's
    assert not os.path.exists(stale.message_path) and a._held == {}
    # B's next claim works, and A's completion did not remove B's new lease either.
    again = claim(b, entry.queue_id)
    assert again is not None
    with pytest.raises(LeaseLost):
        on_reactor(a.complete, stale)
    assert on_reactor(a.delete, entry.queue_id) is False  # leased by B
    assert on_reactor(a.retry_now, None) == 0
    on_reactor(b.complete, again)
    wait_pending(b, 0)  # (not a: its frozen clock never lets the cached count go stale)


def test_commit_of_an_existing_queue_id_is_refused_not_overwritten(
        redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory()
    first = store(spool)
    wait_pending(spool, 1)
    writer = on_reactor(lambda: RedisSpoolWriter(spool, first.queue_id))
    on_reactor(writer.write, b"impostor " + _pattern(CHUNK_BYTES))
    with pytest.raises(StagingError, match="already exists"):
        on_reactor(writer.commit, envelope("evil@example.org"))
    assert on_reactor(spool.get, first.queue_id) == first
    assert on_reactor(spool.read_message, first.queue_id) == BODY
    wait_until(lambda: keys(spool, "stage:*") == [], timeout=5, message="stage removed")
    wait_pending(spool, 1)


def test_key_prefixes_are_isolated(redis_spool_factory: Factory) -> None:
    a1 = redis_spool_factory(key_prefix="hunt-iso-" + uuid.uuid4().hex[:8])
    a2 = redis_spool_factory(key_prefix=a1.prefix)
    b = redis_spool_factory(key_prefix=a1.prefix + ":b")  # a prefix extending the other
    ea, ea2 = store(a1), store(a1)
    eb = store(b)
    held = claim(a2, ea2.queue_id)
    assert held is not None
    assert claim(b, ea.queue_id) is None and claim(a1, eb.queue_id) is None
    assert [s.queue_id for s in on_reactor(b.list_entries)] == [eb.queue_id]
    assert sorted(s.queue_id for s in on_reactor(a1.list_entries)) == sorted(
        [ea.queue_id, ea2.queue_id])
    assert on_reactor(b.due, time.time() + 1, 10) == [eb.queue_id]
    assert on_reactor(a1.retry_now, None) == 1  # the leased one is skipped
    assert on_reactor(b.retry_now, None) == 1
    assert on_reactor(b.delete, ea.queue_id) is False
    assert on_reactor(a1.read_message, ea.queue_id) == BODY
    wait_pending(a1, 2)
    wait_pending(b, 1)
    on_reactor(a2.complete, held)
    assert on_reactor(b.delete, eb.queue_id) is True
    wait_pending(a1, 1)
    wait_pending(b, 0)


# -- Redis restarts without persistence -------------------------------------------------------

def test_redis_restart_without_persistence_loses_entries_but_nothing_sticks(
        tmp_path: Path, reactor_thread: None) -> None:
    server = RedisServer(appendonly=False)
    server.start()
    client = redis_client(server, command_timeout_ms=2000)
    spool = on_reactor(lambda: RedisSpool(client, "hunt-restart:spool", str(tmp_path / "t")))
    try:
        kept = store(spool)
        leased = store(spool)
        c = claim(spool, leased.queue_id)
        assert c is not None
        writer = on_reactor(spool.open_writer)
        on_reactor(writer.write, _pattern(CHUNK_BYTES + 5))  # one chunk staged, 5 bytes held
        wait_until(lambda: on_reactor(client.execute, "EXISTS",
                                      spool.key("stage", writer.queue_id)) == 1,
                   timeout=5, message="first chunk staged")
        wait_pending(spool, 2)
        server.stop()
        server.start()  # same port, empty data set, no scripts loaded
        wait_until(lambda: on_reactor(spool.healthy)[0], timeout=15, message="healthy again")
        assert claim(spool, kept.queue_id) is None
        assert on_reactor(spool.due, time.time() + 3600, 10) == []
        assert on_reactor(spool.list_entries) == []
        assert on_reactor(spool.retry_now, None) == 0
        # The half-staged message must not be committed truncated.
        with pytest.raises(StagingError):
            on_reactor(writer.commit, envelope())
        assert on_reactor(spool.get, writer.queue_id) is None
        # The delivery that was running finishes: its lease is gone, nothing is left held.
        with pytest.raises(LeaseLost):
            on_reactor(spool.complete, c)
        assert spool._held == {} and not os.path.exists(c.message_path)
        wait_pending(spool, 0)
        # Work resumes: scripts are loaded again on the new server.
        fresh = store(spool, _pattern(CHUNK_BYTES + 3))
        c2 = claim(spool, fresh.queue_id)
        assert c2 is not None and file_bytes(c2.message_path) == _pattern(CHUNK_BYTES + 3)
        on_reactor(spool.complete, c2)
        wait_pending(spool, 0)
        assert os.listdir(spool.temp_dir) == []
    finally:
        on_reactor(spool.close)
        on_reactor(client.close)
        server.cleanup()


# -- corrupt metadata -----------------------------------------------------------------------------

def _valid_meta(qid: str) -> dict[str, Any]:
    from kotlin_smtp_py.spool.record import QueueEntry

    entry = QueueEntry(qid, envelope(), envelope().recipients)
    return dict(json.loads(entry.to_json_bytes()))


def _put_raw(spool: RedisSpool, qid: str, meta: bytes) -> None:
    on_reactor(spool.client.execute, "SET", spool.key("meta", qid), meta)
    on_reactor(spool.client.execute, "SET", spool.key("msg", qid), b"body")
    on_reactor(spool.client.execute, "ZADD", spool.key("due"), 1, qid)


CAUGHT_CORRUPTIONS: dict[str, Callable[[str], bytes]] = {
    "truncated": lambda q: json.dumps(_valid_meta(q)).encode()[:40],
    "not-utf8": lambda q: b"\xff\xfe{" + json.dumps(_valid_meta(q)).encode(),
    "empty": lambda q: b"",
    "array": lambda q: b"[]",
    "null": lambda q: b"null",
    "pending-wrong-type": lambda q: json.dumps({**_valid_meta(q), "pending": [5]}).encode(),
    "attempts-text": lambda q: json.dumps({**_valid_meta(q), "attempts": "x"}).encode(),
    "next-attempt-null": lambda q: json.dumps({**_valid_meta(q), "next_attempt": None}).encode(),
    "nan": lambda q: json.dumps({**_valid_meta(q), "attempts": float("nan")}).encode(),
}


def test_listing_skips_corrupt_meta_and_claims_quarantine_it(
        redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory()
    good = store(spool)
    bad = []
    for n, (name, make) in enumerate(sorted(CAUGHT_CORRUPTIONS.items())):
        qid = f"corrupt{n:02d}abcdefgh"
        _put_raw(spool, qid, make(qid))
        bad.append((name, qid))
    assert [s.queue_id for s in on_reactor(spool.list_entries)] == [good.queue_id]
    assert on_reactor(spool.retry_now, None) == 1
    for name, qid in bad:
        assert on_reactor(spool.get, qid) is None, name
        assert claim(spool, qid) is None, name
        assert on_reactor(spool.client.execute, "EXISTS",
                          spool.key("corrupt", qid + ":meta")) == 1, name
    assert on_reactor(spool.due, time.time() + 1, 100) == [good.queue_id]
    wait_pending(spool, 1)


UNCAUGHT_CORRUPTIONS: dict[str, Callable[[str], bytes]] = {
    "size-1e999": lambda q: json.dumps(_valid_meta(q)).replace(
        '"size":0', '"size":1e999').replace('"size": 0', '"size": 1e999').encode(),
    "deep-nesting": lambda q: b"[" * 100_000,
}


@pytest.mark.parametrize("name", sorted(UNCAUGHT_CORRUPTIONS))
def test_overflowing_or_deeply_nested_meta_is_skipped_and_quarantined(
        redis_spool_factory: Factory, name: str) -> None:
    spool = redis_spool_factory()
    good = store(spool)
    meta = UNCAUGHT_CORRUPTIONS[name](QID)
    assert meta != json.dumps(_valid_meta(QID)).encode()
    _put_raw(spool, QID, meta)
    assert [s.queue_id for s in on_reactor(spool.list_entries)] == [good.queue_id]
    assert on_reactor(spool.get, QID) is None
    assert claim(spool, QID) is None
    assert on_reactor(spool.due, time.time() + 1, 10) == [good.queue_id]


def test_non_ascii_due_member_does_not_stop_the_queue(redis_spool_factory: Factory) -> None:
    spool = redis_spool_factory()
    good = store(spool)
    on_reactor(spool.client.execute, "ZADD", spool.key("due"), 1, b"\xffjunk\xfe")
    assert good.queue_id in on_reactor(spool.due, time.time() + 1, 10)
    assert [s.queue_id for s in on_reactor(spool.list_entries)] == [good.queue_id]
