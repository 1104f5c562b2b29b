"""The spool contract: one suite, run against every backend (file and Redis).

Each test talks to real storage (a tmp directory, a private redis-server) through ISpool only.
"""

from __future__ import annotations

import os
import time
from typing import Any

import pytest
from helpers import on_reactor, wait_until
from zope.interface.verify import verifyObject

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.interfaces import ISpool, ISpoolWriter
from kotlin_smtp_py.spool.record import Claim, QueueEntry

from .conftest import Backend

BODY = b"From: a@example.org\r\nTo: b@example.net\r\nSubject: hi\r\n\r\nHello\r\n"


def envelope(sender: str = "a@example.org", *rcpts: str, size: int = 0) -> Envelope:
    recipients = tuple(Recipient(r) for r in (rcpts or ("b@example.net",)))
    return Envelope(sender=sender, recipients=recipients, helo="client.test", peer="127.0.0.1",
                    size=size)


def store(spool: Any, body: bytes = BODY, chunk: int = 0,
          env: Envelope | None = None) -> QueueEntry:
    writer = on_reactor(spool.open_writer)
    step = chunk or max(len(body), 1)
    for i in range(0, len(body), step):
        on_reactor(writer.write, body[i:i + step])
    entry: QueueEntry = on_reactor(writer.commit, env or envelope(size=len(body)))
    return entry


def claim(spool: Any, queue_id: str) -> Claim | None:
    result: Claim | None = on_reactor(spool.claim, queue_id)
    return result


def file_bytes(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def wait_pending(spool: Any, expected: int) -> None:
    wait_until(lambda: on_reactor(spool.pending_count) == expected, timeout=5,
               message=f"pending_count == {expected}")


def test_provides_interfaces(backend: Backend) -> None:
    spool = backend.new()
    assert verifyObject(ISpool, spool)
    writer = on_reactor(spool.open_writer)
    assert verifyObject(ISpoolWriter, writer)
    assert writer.queue_id
    on_reactor(writer.abort)


def test_store_via_writer_then_get_list_and_read(backend: Backend) -> None:
    spool = backend.new()
    env = envelope("a@example.org", "b@example.net", "c@example.net", size=len(BODY))
    entry = store(spool, BODY, chunk=7, env=env)
    assert entry.envelope == env
    assert entry.pending == env.recipients
    assert entry.attempts == 0
    got = on_reactor(spool.get, entry.queue_id)
    assert got == entry
    assert on_reactor(spool.read_message, entry.queue_id) == BODY
    (summary,) = on_reactor(spool.list_entries)
    assert summary.queue_id == entry.queue_id
    assert summary.sender == "a@example.org"
    assert summary.recipients == ("b@example.net", "c@example.net")
    assert summary.size == len(BODY)
    assert summary.attempts == 0
    wait_pending(spool, 1)


def test_enqueue_small_message(backend: Backend) -> None:
    spool = backend.new()
    entry = on_reactor(spool.enqueue, envelope("", "a@example.org"), b"DSN body\r\n")
    assert on_reactor(spool.read_message, entry.queue_id) == b"DSN body\r\n"
    assert on_reactor(spool.get, entry.queue_id).envelope.sender == ""


def test_unknown_ids(backend: Backend) -> None:
    spool = backend.new()
    for qid in ("0000000000000000000", "../../etc/passwd"):
        assert on_reactor(spool.get, qid) is None
        assert on_reactor(spool.read_message, qid) is None
        assert claim(spool, qid) is None
        assert on_reactor(spool.delete, qid) is False
        assert on_reactor(spool.retry_now, qid) == 0


def test_new_entry_is_due_now(backend: Backend) -> None:
    spool = backend.new()
    entry = store(spool)
    assert entry.queue_id in on_reactor(spool.due, time.time() + 1, 10)
    assert entry.queue_id not in on_reactor(spool.due, entry.next_attempt - 60, 10)


def test_due_is_ordered_by_due_time_and_limited(backend: Backend) -> None:
    spool = backend.new()
    now = time.time()
    offsets = {"a": -30.0, "b": -10.0, "c": -20.0, "d": +500.0}
    ids = {}
    for name, offset in offsets.items():
        entry = store(spool)
        c = claim(spool, entry.queue_id)
        assert c is not None
        on_reactor(spool.reschedule, c, entry.evolve(next_attempt=now + offset))
        ids[name] = entry.queue_id
    assert on_reactor(spool.due, now, 10) == [ids["a"], ids["c"], ids["b"]]
    assert on_reactor(spool.due, now, 2) == [ids["a"], ids["c"]]
    assert on_reactor(spool.due, now - 25, 10) == [ids["a"]]
    assert on_reactor(spool.due, now + 1000, 10)[-1] == ids["d"]


def test_claim_is_exclusive_across_instances(backend: Backend) -> None:
    spool, other = backend.new(), backend.new()
    entry = store(spool)
    c = claim(spool, entry.queue_id)
    assert c is not None
    assert c.entry == entry
    assert file_bytes(c.message_path) == BODY
    assert claim(spool, entry.queue_id) is None
    assert claim(other, entry.queue_id) is None
    on_reactor(spool.release, c)
    c2 = claim(other, entry.queue_id)
    assert c2 is not None
    assert c2.token != c.token
    on_reactor(other.release, c2)


def test_reschedule_stores_entry_moves_due_time_and_releases(backend: Backend) -> None:
    spool, other = backend.new(), backend.new()
    entry = store(spool)
    c = claim(spool, entry.queue_id)
    assert c is not None
    later = time.time() + 300
    updated = entry.evolve(attempts=1, next_attempt=later, last_error="451 try later",
                           pending=entry.pending[:1])
    on_reactor(spool.reschedule, c, updated)
    assert on_reactor(spool.get, entry.queue_id) == updated
    assert entry.queue_id not in on_reactor(spool.due, time.time(), 10)
    assert entry.queue_id in on_reactor(spool.due, later + 1, 10)
    c2 = claim(other, entry.queue_id)  # the lease was released
    assert c2 is not None
    assert c2.entry == updated
    assert file_bytes(c2.message_path) == BODY
    on_reactor(other.release, c2)
    (summary,) = on_reactor(spool.list_entries)
    assert summary.attempts == 1 and summary.last_error == "451 try later"


def test_complete_removes_everything(backend: Backend) -> None:
    spool = backend.new()
    keep = store(spool)
    entry = store(spool)
    wait_pending(spool, 2)
    c = claim(spool, entry.queue_id)
    assert c is not None
    on_reactor(spool.complete, c)
    assert on_reactor(spool.get, entry.queue_id) is None
    assert on_reactor(spool.read_message, entry.queue_id) is None
    assert claim(spool, entry.queue_id) is None
    assert on_reactor(spool.due, time.time() + 1, 10) == [keep.queue_id]
    assert [s.queue_id for s in on_reactor(spool.list_entries)] == [keep.queue_id]
    wait_pending(spool, 1)


def test_release_keeps_entry_due(backend: Backend) -> None:
    spool = backend.new()
    entry = store(spool)
    c = claim(spool, entry.queue_id)
    assert c is not None
    on_reactor(spool.release, c)
    assert on_reactor(spool.get, entry.queue_id) == entry
    assert entry.queue_id in on_reactor(spool.due, time.time() + 1, 10)


def test_delete(backend: Backend) -> None:
    spool = backend.new()
    entry = store(spool)
    other = store(spool)
    assert on_reactor(spool.delete, entry.queue_id) is True
    assert on_reactor(spool.get, entry.queue_id) is None
    assert on_reactor(spool.read_message, entry.queue_id) is None
    assert entry.queue_id not in on_reactor(spool.due, time.time() + 1, 10)
    assert on_reactor(spool.delete, entry.queue_id) is False
    assert [s.queue_id for s in on_reactor(spool.list_entries)] == [other.queue_id]
    wait_pending(spool, 1)


def test_retry_now_one_and_all(backend: Backend) -> None:
    spool = backend.new()
    later = time.time() + 3600
    ids = []
    for _ in range(3):
        entry = store(spool)
        c = claim(spool, entry.queue_id)
        assert c is not None
        on_reactor(spool.reschedule, c, entry.evolve(next_attempt=later, attempts=2))
        ids.append(entry.queue_id)
    assert on_reactor(spool.due, time.time(), 10) == []
    assert on_reactor(spool.retry_now, ids[1]) == 1
    assert on_reactor(spool.due, time.time() + 1, 10) == [ids[1]]
    got = on_reactor(spool.get, ids[1])
    assert got.next_attempt <= time.time() + 1 and got.attempts == 2
    assert on_reactor(spool.retry_now, None) == 3
    assert sorted(on_reactor(spool.due, time.time() + 1, 10)) == sorted(ids)


BINARY_BODIES = {
    "8bit": b"Subject: \xe4\xf6\xfc\r\n\r\n" + bytes(range(256)) * 4 + b"\r\n",
    "invalid-utf8": b"Subject: x\r\n\r\n\xc3\x28\xa0\xa1\xe2\x28\xa1\xf0\x28\x8c\xbc\xff\xfe\r\n",
    "nul-and-bare-cr": b"a\x00b\rc\nd\r\n.\r\n..\r\n\x00",
    "empty": b"",
    "1mib-random": os.urandom(1024 * 1024 + 13),
}


@pytest.mark.parametrize("name", sorted(BINARY_BODIES))
def test_binary_bodies_round_trip_byte_for_byte(backend: Backend, name: str) -> None:
    spool = backend.new()
    body = BINARY_BODIES[name]
    entry = store(spool, body, chunk=7777, env=envelope(size=len(body)))
    assert on_reactor(spool.read_message, entry.queue_id) == body
    c = claim(spool, entry.queue_id)
    assert c is not None
    assert file_bytes(c.message_path) == body
    on_reactor(spool.complete, c)


def test_abort_leaves_nothing(backend: Backend) -> None:
    spool = backend.new()
    writer = on_reactor(spool.open_writer)
    on_reactor(writer.write, BODY * 1000)
    on_reactor(writer.abort)
    on_reactor(writer.abort)  # idempotent
    assert on_reactor(spool.get, writer.queue_id) is None
    assert on_reactor(spool.list_entries) == []
    assert on_reactor(spool.due, time.time() + 1, 10) == []
    wait_pending(spool, 0)


def test_pending_count_tracks_store_and_complete(backend: Backend) -> None:
    spool = backend.new()
    wait_pending(spool, 0)
    entries = [store(spool) for _ in range(3)]
    wait_pending(spool, 3)
    c = claim(spool, entries[0].queue_id)
    assert c is not None
    on_reactor(spool.complete, c)
    wait_pending(spool, 2)


def test_healthy(backend: Backend) -> None:
    ok, why = on_reactor(backend.new().healthy)
    assert ok is True, why
