"""Hunting for paths that break "no mail is ever lost" (250 -> delivery, retry or bounce).

Each xfail(strict=True) test demonstrates a real bug with real files, a real FileSpool or
RedisSpool and the real scheduler; the reason names the bug. Passing tests cover recovery
paths no other test exercised.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import on_reactor, wait_until
from twisted.internet import defer, task
from zope.interface import implementer

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.interfaces import IDelivery
from kotlin_smtp_py.local.delivery import MAX_LIST_DEPTH, LocalDelivery
from kotlin_smtp_py.local.directory import LocalDirectory
from kotlin_smtp_py.routing import DeliveryRouter
from kotlin_smtp_py.service import SpoolBouncer
from kotlin_smtp_py.spool.file import FileSpool
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.spool.scheduler import Bouncer, Scheduler
from kotlin_smtp_py.status import DeliveryStatus, Reason

MESSAGE = b"Subject: t\r\n\r\nbody\r\n"


@implementer(IDelivery)
class ByAddress:
    """Answers per recipient address ("ok" unless listed); counts every delivery."""

    def __init__(self, outcomes: dict[str, str] | None = None) -> None:
        self.outcomes = outcomes or {}
        self.delivered: list[str] = []

    def deliver(self, entry: Any, message_path: str, recipients: Any) -> Any:
        out = []
        for r in recipients:
            if self.outcomes.get(r.address) == "perm":
                out.append((r, DeliveryStatus.permanent_failure(Reason.RECIPIENT, "no such "
                                                                 "user", "5.1.1")))
            else:
                self.delivered.append(r.address)
                out.append((r, DeliveryStatus.delivered()))
        return defer.succeed(out)


class RecordingBouncer(Bouncer):
    def __init__(self) -> None:
        self.notices: list[tuple[str, str, list[str]]] = []

    def notify(self, entry: Any, message_path: str, results: Any,
               action: str) -> defer.Deferred[None]:
        self.notices.append((entry.queue_id, action, [r.address for r, _ in results]))
        return defer.succeed(None)


def _settle(clock: task.Clock, seconds: float, sched: Scheduler) -> None:
    """Advance the fake clock on the reactor thread, then wait for the pass to finish."""
    on_reactor(clock.advance, seconds)
    wait_until(lambda: not sched._running and sched.in_flight == 0, timeout=10,
               message="scheduler pass")


def _clock() -> task.Clock:
    clock = task.Clock()
    clock.advance(1_000_000)
    return clock


# -- 1. envelope written with one unchecked os.write --------------------------------------------

_SHORT_WRITE_CHILD = textwrap.dedent("""
    import json, resource, sys
    from twisted.internet import task
    from kotlin_smtp_py.diskio import DiskIO
    from kotlin_smtp_py.envelope import Envelope, Recipient
    from kotlin_smtp_py.spool.file import FileSpool

    directory, limit = sys.argv[1], int(sys.argv[2])
    clock = task.Clock()
    clock.advance(1_000_000)
    spool = FileSpool(directory, clock=clock, disk_io=DiskIO(clock, threads=0))
    env = Envelope("s@remote.test", tuple(Recipient(f"user{i:04d}@example.test")
                                          for i in range(40)))
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    # The file system takes only `limit` bytes of any file, like a disk that fills up in the
    # middle of a write: write(2) then returns a short count (and EFBIG after that).
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    outcome = {}
    d = spool.enqueue(env, b"Subject: t\\r\\n\\r\\nbody\\r\\n")
    d.addCallbacks(lambda e: outcome.update(ok=True, qid=e.queue_id,
                                            json_len=len(e.to_json_bytes())),
                   lambda f: outcome.update(ok=False, error=str(f.value)))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    print(json.dumps(outcome))
""")


def test_a_short_envelope_write_is_never_acknowledged(tmp_path: Path,
                                                      reactor_thread: None) -> None:
    directory = tmp_path / "spool"
    proc = subprocess.run([sys.executable, "-c", _SHORT_WRITE_CHILD, str(directory), "2048"],
                          capture_output=True, timeout=60, cwd=str(tmp_path),
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert proc.returncode == 0, proc.stderr.decode()
    outcome = json.loads(proc.stdout.decode().strip().splitlines()[-1])
    if not outcome["ok"]:
        return  # refusing the message (451) is a correct answer to a full disk
    # The message was acknowledged: its envelope must be whole and the entry deliverable.
    qid = outcome["qid"]
    assert outcome["json_len"] > 2048  # the limit really cut into the envelope
    restarted = on_reactor(FileSpool, str(directory))
    claim = on_reactor(restarted.claim, qid)
    try:
        assert claim is not None, (
            f"acknowledged entry unreadable; corrupt/: {os.listdir(directory / 'corrupt')}")
        assert len(claim.entry.pending) == 40
    finally:
        if claim is not None:
            on_reactor(restarted.release, claim)


# -- 2. an exception outside the per-route try: release, no attempt counted, forever ---------------

class RaisingRoutingPolicy:
    """An IInboundRoutingPolicy plugin whose backend fails for one domain (e.g. a DB lookup)."""

    def is_local_domain(self, domain: str) -> bool:
        if domain == "broken.test":
            raise RuntimeError("routing backend unavailable")
        return domain == "localhost"


@implementer(IDelivery)
class NoneDelivery:
    """A delivery plugin that answers None instead of a result list."""

    def __init__(self) -> None:
        self.calls = 0

    def deliver(self, entry: Any, message_path: str, recipients: Any) -> Any:
        self.calls += 1
        return defer.succeed(None)


@pytest.mark.parametrize("fault", ["router-raises", "delivery-returns-none"])
def test_a_routing_or_plugin_fault_ends_in_a_bounce(tmp_path: Path, reactor_thread: None,
                                                    fault: str) -> None:
    clock = _clock()
    spool = on_reactor(FileSpool, str(tmp_path / "spool"), clock=clock)
    if fault == "router-raises":
        router = DeliveryRouter(frozenset(), ByAddress(), routing_policy=RaisingRoutingPolicy())
        rcpt = "a@broken.test"
    else:
        router = DeliveryRouter(frozenset({"localhost"}), NoneDelivery())
        rcpt = "a@localhost"
    bouncer = RecordingBouncer()
    sched = Scheduler(spool, router, bouncer, clock=clock, rng=random.Random(7), max_retries=3,
                      retry_delay_seconds=60, concurrency=1)
    claims = {"n": 0}
    real_claim = spool.claim

    def counting_claim(qid: str) -> Any:
        claims["n"] += 1
        return real_claim(qid)

    spool.claim = counting_claim  # type: ignore[method-assign]
    qid = on_reactor(spool.enqueue, Envelope("s@remote.test", (Recipient(rcpt),)),
                     MESSAGE).queue_id
    on_reactor(sched.start)
    try:
        for _ in range(5):  # five passes without the clock moving
            _settle(clock, 0, sched)
        busy = claims["n"]
        for _ in range(20):  # 20 x 300 s: far beyond 3 retries of 60/120/240 s
            _settle(clock, 300, sched)
        assert "failed" in [n[1] for n in bouncer.notices], bouncer.notices
        assert on_reactor(spool.get, qid) is None
        assert busy <= 2, f"claimed {busy} times while the clock stood still"
    finally:
        on_reactor(sched.stop)


# -- 3. a failure DSN that can never be queued (Redis maxRawBytes) -------------------------------

def test_a_dsn_that_does_not_fit_the_redis_spool_still_ends(redis_spool_factory: Any) -> None:
    clock = _clock()
    spool = redis_spool_factory(max_raw_bytes=4000, clock=clock)
    delivery = ByAddress({"bad@localhost": "perm"})
    router = DeliveryRouter(frozenset({"localhost"}), delivery, relay=delivery)
    sched = Scheduler(spool, router, SpoolBouncer(spool, "mx.test", clock), clock=clock,
                      rng=random.Random(7), max_retries=3, retry_delay_seconds=60,
                      concurrency=1)
    message = b"Subject: big\r\n\r\n" + b"x" * 3900 + b"\r\n"
    assert len(message) <= 4000
    env = Envelope("s@remote.test", (Recipient("good@localhost"), Recipient("bad@localhost")))
    qid = on_reactor(spool.enqueue, env, message).queue_id
    on_reactor(sched.start)
    try:
        _settle(clock, 0, sched)
        for _ in range(6):
            _settle(clock, 800, sched)  # beyond the longest retry delay (600 s + 20 %)
        assert delivery.delivered.count("good@localhost") == 1, delivery.delivered
        assert on_reactor(spool.get, qid) is None
        # and the sender is told: a notice carrying only the header fits the spool
        assert delivery.delivered.count("s@remote.test") == 1, delivery.delivered
    finally:
        on_reactor(sched.stop)


# -- 4. an I/O error while reading the envelope leaks the lease --------------------------------

def _close_fds_on(path: Path) -> None:
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(path):
                os.close(int(fd))
        except OSError:
            pass


@pytest.fixture
def spool_dir(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "spool"
    yield directory
    queue = directory / "queue"
    if queue.is_dir():
        for eml in queue.glob("*.eml"):
            _close_fds_on(eml)


def test_an_envelope_read_error_does_not_strand_the_entry(spool_dir: Path,
                                                          reactor_thread: None) -> None:
    writer = on_reactor(FileSpool, str(spool_dir))
    entry = on_reactor(writer.enqueue, Envelope("s@remote.test", (Recipient("a@localhost"),)),
                       MESSAGE)
    js = spool_dir / "queue" / f"{entry.queue_id}.json"
    good = js.read_bytes()
    spool = on_reactor(FileSpool, str(spool_dir))  # another process / a restart: reads the file
    js.unlink()
    js.mkdir()  # one unreadable envelope (read(2) fails with EISDIR, like EIO would)
    with pytest.raises(OSError):
        on_reactor(spool.claim, entry.queue_id)
    js.rmdir()
    js.write_bytes(good)  # the fault is gone
    claim = on_reactor(spool.claim, entry.queue_id)
    try:
        assert claim is not None, "the entry can no longer be claimed by anyone"
    finally:
        if claim is not None:
            on_reactor(spool.release, claim)


# -- 5. list expansion that ends in silence ------------------------------------------------------

def _local(tmp_path: Path) -> tuple[LocalDelivery, Path]:
    mailboxes, lists = tmp_path / "mailboxes", tmp_path / "lists"
    (mailboxes / "alice").mkdir(parents=True)
    lists.mkdir()
    local = LocalDelivery(LocalDirectory(str(mailboxes), str(lists)),
                          lambda d: d == "localhost",
                          run_in_thread=lambda fn, *a: defer.maybeDeferred(fn, *a))
    return local, lists


def _deliver_to(local: LocalDelivery, tmp_path: Path, address: str) -> DeliveryStatus:
    message = tmp_path / "message.eml"
    message.write_bytes(MESSAGE)
    env = Envelope("s@remote.test", (Recipient(address),))
    entry = QueueEntry("0123456789ABCDEFGHJK", env, env.recipients, first_delivery=True)
    results: list[Any] = []
    local.deliver(entry, str(message), env.recipients).addCallback(results.extend)
    [(_, status)] = results
    return status


def test_a_too_deeply_nested_list_is_not_reported_delivered(tmp_path: Path) -> None:
    local, lists = _local(tmp_path)
    depth = MAX_LIST_DEPTH + 1
    for i in range(depth):
        member = f"l{i + 1}@localhost" if i + 1 < depth else "alice@localhost"
        (lists / f"l{i}").write_text(member + "\n")
    status = _deliver_to(local, tmp_path, "l0@localhost")
    copies = list((tmp_path / "mailboxes" / "alice" / "Maildir" / "new").glob("*")) \
        if (tmp_path / "mailboxes" / "alice" / "Maildir").is_dir() else []
    assert copies or not status.ok, f"reported {status.text!r} but alice got nothing"


def test_a_list_of_unknown_local_members_is_not_reported_delivered(tmp_path: Path) -> None:
    local, lists = _local(tmp_path)
    (lists / "team").write_text("ghost@localhost\n")  # e.g. a mailbox removed after a rename
    status = _deliver_to(local, tmp_path, "team@localhost")
    assert not status.ok, f"reported {status.text!r} for a list that reaches nobody"


# -- 6. an envelope whose message file is gone --------------------------------------------------

def test_an_entry_without_its_message_file_is_set_aside(tmp_path: Path,
                                                        reactor_thread: None) -> None:
    directory = tmp_path / "spool"
    first = on_reactor(FileSpool, str(directory))
    entry = on_reactor(first.enqueue, Envelope("s@remote.test", (Recipient("a@localhost"),)),
                       MESSAGE)
    (directory / "queue" / f"{entry.queue_id}.eml").unlink()
    spool = on_reactor(FileSpool, str(directory))
    for _ in range(3):
        assert on_reactor(spool.claim, entry.queue_id) is None
    assert spool.corrupt_count == 1 or (directory / "corrupt" / f"{entry.queue_id}.json").exists()


# -- paths that turned out correct (not covered elsewhere) ---------------------------------------

def test_release_all_at_shutdown_keeps_an_in_flight_entry(tmp_path: Path,
                                                          reactor_thread: None) -> None:
    """Shutdown drops the lease of a delivery still running; when that delivery ends later
    its complete() fails (lease gone) and the entry stays for the next run: a duplicate at
    worst, never a loss."""
    clock = _clock()
    spool = on_reactor(FileSpool, str(tmp_path / "spool"), clock=clock)
    qid = on_reactor(spool.enqueue, Envelope("s@remote.test", (Recipient("a@localhost"),)),
                     MESSAGE).queue_id
    claim = on_reactor(spool.claim, qid)
    assert claim is not None
    on_reactor(spool.release_all)
    with pytest.raises(LookupError):
        on_reactor(spool.complete, claim)
    restarted = on_reactor(FileSpool, str(tmp_path / "spool"), clock=clock)
    again = on_reactor(restarted.claim, qid)
    assert again is not None and [r.address for r in again.entry.pending] == ["a@localhost"]
    on_reactor(restarted.release, again)


def test_release_all_does_not_close_a_lease_being_completed(tmp_path: Path,
                                                            reactor_thread: None) -> None:
    """Shutdown's release_all runs on the reactor while a complete() job waits on the disk
    thread: it must leave that lease's fd to the job. Closing it too meant a second close of
    the same fd number, which by then could belong to any file or socket opened meanwhile."""
    import threading

    from twisted.internet import reactor

    from kotlin_smtp_py.diskio import DiskIO

    disk = on_reactor(DiskIO, reactor, 1)
    spool = on_reactor(FileSpool, str(tmp_path / "spool"), disk_io=disk)
    entry = on_reactor(spool.enqueue, Envelope("s@remote.test", (Recipient("a@localhost"),)),
                       MESSAGE)
    claim = on_reactor(spool.claim, entry.queue_id)
    assert claim is not None
    from twisted.internet.threads import blockingCallFromThread

    def start(fn: Any, *args: Any) -> Any:  # a Deferred, not awaited (on_reactor would)
        return blockingCallFromThread(reactor, lambda: [fn(*args)])[0]

    gate = threading.Event()
    blocker = start(disk.submit, gate.wait, 10)  # holds the disk thread
    done = start(spool.complete, claim)  # queued behind it
    other = -1
    try:
        on_reactor(spool.release_all)
        other = os.open(os.devnull, os.O_RDONLY)  # takes the lowest free fd number
        gate.set()
        wait_until(lambda: blocker.called and done.called, message="the queued complete")
        os.fstat(other)  # still ours (EBADF if complete closed it as the lease's fd)
        assert on_reactor(spool.get, entry.queue_id) is None  # and complete did its work
    finally:
        gate.set()
        if other >= 0:
            try:
                os.close(other)
            except OSError:
                pass
        on_reactor(disk.stop)
