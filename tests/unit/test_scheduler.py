"""The delivery scheduler on a real FileSpool, driven by task.Clock (no sleeping)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
from helpers import on_reactor, wait_until
from twisted.internet import defer, task
from zope.interface import implementer

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.interfaces import IDelivery
from kotlin_smtp_py.routing import DeliveryRouter
from kotlin_smtp_py.spool.file import FileSpool
from kotlin_smtp_py.spool.scheduler import Bouncer, Scheduler, retry_delay
from kotlin_smtp_py.status import DeliveryStatus, Reason


@implementer(IDelivery)
class ScriptedDelivery:
    """Answers per attempt from a script; records calls; can hold deliveries open."""

    def __init__(self, outcomes: list[str]) -> None:
        self.outcomes = outcomes
        self.calls: list[tuple[str, list[str]]] = []
        self.hold: list[defer.Deferred[None]] = []
        self.holding = False

    def deliver(self, entry: Any, message_path: str, recipients: Any) -> Any:
        self.calls.append((entry.queue_id, [r.address for r in recipients]))
        kind = self.outcomes.pop(0) if self.outcomes else "ok"
        status = {"ok": DeliveryStatus.delivered(),
                  "temp": DeliveryStatus.transient(Reason.CONNECT, "try later", "4.4.1"),
                  "perm": DeliveryStatus.permanent_failure(Reason.RECIPIENT, "no", "5.1.1")}[kind]
        result = [(r, status) for r in recipients]
        if self.holding:
            d: defer.Deferred[None] = defer.Deferred()
            self.hold.append(d)
            return d.addCallback(lambda _: result)
        return defer.succeed(result)


class RecordingBouncer(Bouncer):
    def __init__(self) -> None:
        self.notices: list[tuple[str, str, list[str]]] = []

    def notify(self, entry: Any, message_path: str, results: Any,
               action: str) -> defer.Deferred[None]:
        self.notices.append((entry.queue_id, action, [r.address for r, _ in results]))
        return defer.succeed(None)


def _setup(tmp_path: Path, outcomes: list[str], **kw: Any) -> tuple[Any, ...]:
    clock = task.Clock()
    clock.advance(1_000_000)
    spool = on_reactor(FileSpool, str(tmp_path / "spool"), clock=clock)
    delivery = ScriptedDelivery(outcomes)
    bouncer = RecordingBouncer()
    router = DeliveryRouter(frozenset({"localhost"}), delivery)
    sched = Scheduler(spool, router, bouncer, clock=clock, rng=random.Random(7),
                      **{"max_retries": 3, "retry_delay_seconds": 60, "concurrency": 1, **kw})
    return clock, spool, delivery, bouncer, sched


def _enqueue(spool: FileSpool, rcpts: list[str], sender: str = "s@remote.test") -> str:
    env = Envelope(sender, tuple(Recipient(r) for r in rcpts))
    entry = on_reactor(spool.enqueue, env, b"Subject: t\r\n\r\nbody\r\n")
    return str(entry.queue_id)


def _run(clock: task.Clock, seconds: float, sched: Scheduler) -> None:
    """Advance the fake clock in the reactor thread and wait until the pass settles."""
    on_reactor(clock.advance, seconds)
    wait_until(lambda: not sched._running and sched.in_flight == 0, timeout=10,
               message="scheduler pass")


def test_retry_delay_is_exponential_capped_and_jittered() -> None:
    rng = random.Random(1)
    for attempt, base in [(1, 60), (2, 120), (3, 240), (4, 480), (5, 600), (9, 600)]:
        values = [retry_delay(60, attempt, rng) for _ in range(200)]
        assert min(values) >= base * 0.8 and max(values) <= base * 1.2
        assert max(values) - min(values) > base * 0.2  # jitter really varies


def test_transient_retries_then_gives_up_with_one_dsn(tmp_path: Path,
                                                      reactor_thread: None) -> None:
    clock, spool, delivery, bouncer, sched = _setup(tmp_path, ["temp"] * 10)
    qid = _enqueue(spool, ["a@localhost"])
    on_reactor(sched.start)
    wait_until(lambda: len(delivery.calls) == 1, message="first attempt")
    for n in range(1, 4):
        entry = wait_until(lambda n=n: (e := on_reactor(spool.get, qid)) is not None
                           and e.attempts == n and e, message=f"attempt {n} recorded")
        delay = entry.next_attempt - clock.seconds()
        assert 60 * 2 ** (n - 1) * 0.8 <= delay <= 60 * 2 ** (n - 1) * 1.2
        _run(clock, delay - 1, sched)
        assert len(delivery.calls) == n  # not due yet
        _run(clock, 1, sched)
        wait_until(lambda n=n: len(delivery.calls) == n + 1, message=f"attempt {n + 1}")
    wait_until(lambda: on_reactor(spool.get, qid) is None, message="entry removed")
    failed = [b for b in bouncer.notices if b[1] == "failed"]
    assert failed == [(qid, "failed", ["a@localhost"])]
    delayed = [b for b in bouncer.notices if b[1] == "delayed"]
    assert delayed == [(qid, "delayed", ["a@localhost"])]  # once, after the first retry
    on_reactor(sched.stop)


def test_only_failed_recipients_are_retried(tmp_path: Path, reactor_thread: None) -> None:
    clock, spool, delivery, bouncer, sched = _setup(tmp_path, [])

    statuses = {"ok@localhost": "ok", "temp@localhost": "temp", "perm@localhost": "perm"}

    def deliver(entry: Any, path: str, rcpts: Any) -> Any:
        delivery.calls.append((entry.queue_id, [r.address for r in rcpts]))
        out = []
        for r in rcpts:
            kind = statuses[r.address]
            out.append((r, {"ok": DeliveryStatus.delivered(),
                            "temp": DeliveryStatus.transient(Reason.CONNECT, "later"),
                            "perm": DeliveryStatus.permanent_failure(Reason.RECIPIENT, "no",
                                                                     "5.1.1")}[kind]))
        return defer.succeed(out)

    delivery.deliver = deliver  # type: ignore[method-assign]
    qid = _enqueue(spool, list(statuses))
    on_reactor(sched.start)
    wait_until(lambda: on_reactor(spool.get, qid) is not None and
               on_reactor(spool.get, qid).attempts == 1, message="first run recorded")
    entry = on_reactor(spool.get, qid)
    assert [r.address for r in entry.pending] == ["temp@localhost"]
    assert ("failed" in [b[1] for b in bouncer.notices])
    statuses["temp@localhost"] = "ok"
    _run(clock, 200, sched)
    wait_until(lambda: on_reactor(spool.get, qid) is None, message="completed")
    assert delivery.calls[-1] == (qid, ["temp@localhost"])
    on_reactor(sched.stop)


def test_concurrency_bound_and_trigger_coalescing(tmp_path: Path, reactor_thread: None) -> None:
    clock, spool, delivery, bouncer, sched = _setup(tmp_path, [], concurrency=2)
    delivery.holding = True
    for i in range(5):
        _enqueue(spool, [f"u{i}@localhost"])
    on_reactor(sched.start)
    wait_until(lambda: len(delivery.calls) == 2, message="two deliveries in flight")
    for _ in range(20):
        on_reactor(sched.trigger)
    on_reactor(clock.advance, 5)
    assert sched.in_flight == 2 and len(delivery.calls) == 2
    def progressed() -> bool:
        on_reactor(clock.advance, 0.5)  # lets the post-delivery trigger run on the fake clock
        assert sched.in_flight <= 2
        return len(delivery.hold) > 0 or (len(delivery.calls) == 5 and sched.in_flight == 0)

    for _ in range(10):  # five entries, two at a time: a few rounds at most
        if not delivery.hold:
            break
        on_reactor(delivery.hold.pop(0).callback, None)
        wait_until(progressed, message="next deliveries")
    assert sorted(c[1][0] for c in delivery.calls) == [f"u{i}@localhost" for i in range(5)]
    on_reactor(sched.stop)


def test_a_failing_pass_does_not_stop_the_loop(tmp_path: Path, reactor_thread: None,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    clock, spool, delivery, bouncer, sched = _setup(tmp_path, [])
    real_due = spool.due
    calls = {"n": 0}

    def flaky_due(now: float, limit: int) -> Any:
        calls["n"] += 1
        if calls["n"] <= 2:
            return defer.fail(OSError("disk hiccup"))
        return real_due(now, limit)

    monkeypatch.setattr(spool, "due", flaky_due)
    qid = _enqueue(spool, ["a@localhost"])
    on_reactor(sched.start)
    for _ in range(3):
        _run(clock, 1, sched)
    wait_until(lambda: on_reactor(spool.get, qid) is None, message="delivered after failures")
    assert calls["n"] >= 3
    on_reactor(sched.stop)


def test_null_sender_never_gets_a_dsn_via_bouncer_contract(tmp_path: Path,
                                                           reactor_thread: None) -> None:
    """The scheduler reports failures for every message; the DSN policy (outbound.dsn) decides
    not to send for <> — proven end to end in tests/e2e; here: the failure is reported once."""
    clock, spool, delivery, bouncer, sched = _setup(tmp_path, ["perm"])
    qid = _enqueue(spool, ["a@localhost"], sender="")
    on_reactor(sched.start)
    wait_until(lambda: on_reactor(spool.get, qid) is None, message="bounced")
    assert [b[1] for b in bouncer.notices] == ["failed"]
    on_reactor(sched.stop)


def test_a_restart_learns_due_times_from_mtimes_and_never_delivers_early(
        tmp_path: Path, reactor_thread: None) -> None:
    """After a restart the spool indexes entries by their envelope's mtime (no file is read);
    an entry whose index time is early (written by an older version, or touched) is corrected
    at claim time and released, not delivered before its next attempt."""
    import os

    clock, spool, delivery, _, sched = _setup(tmp_path, ["temp"])
    qid = _enqueue(spool, ["a@localhost"])
    on_reactor(sched.start)
    _run(clock, 0, sched)
    assert delivery.calls == [(qid, ["a@localhost"])]  # first attempt failed: retry later
    js = tmp_path / "spool" / "queue" / f"{qid}.json"
    from kotlin_smtp_py.spool.record import QueueEntry

    due = os.stat(js).st_mtime
    stored = QueueEntry.from_json_bytes(js.read_bytes()).next_attempt
    assert stored > clock.seconds() + 30 and abs(due - stored) < 0.01  # mtime = next attempt
    on_reactor(sched.stop)

    # "Restart": a new spool and scheduler on the same directory.
    restarted = on_reactor(FileSpool, str(tmp_path / "spool"), clock=clock)
    assert on_reactor(restarted.due, clock.seconds(), 10) == []
    assert on_reactor(restarted.due, due + 1, 10) == [qid]

    # An early index entry (mtime in the past, as an older version wrote it): claimed,
    # found not due, released; nothing is delivered and the index moves to the real time.
    os.utime(js, (clock.seconds() - 100, clock.seconds() - 100))
    early = on_reactor(FileSpool, str(tmp_path / "spool"), clock=clock)
    delivery2 = ScriptedDelivery(["ok"])
    sched2 = Scheduler(early, DeliveryRouter(frozenset({"localhost"}), delivery2),
                       RecordingBouncer(), clock=clock, rng=random.Random(7), max_retries=3,
                       retry_delay_seconds=60, concurrency=1)
    assert on_reactor(early.due, clock.seconds(), 10) == [qid]
    on_reactor(sched2.start)
    _run(clock, 0, sched2)
    assert delivery2.calls == []
    assert on_reactor(early.due, clock.seconds(), 10) == []
    _run(clock, due - clock.seconds() + 1, sched2)
    assert delivery2.calls == [(qid, ["a@localhost"])]
    on_reactor(sched2.stop)


def test_the_last_transient_failure_is_reported_as_permanent(tmp_path: Path,
                                                             reactor_thread: None) -> None:
    """Retries exhausted: the recipient bounces, so the delivery result observers see (the
    kind="permanent" failure metric, the delivery_attempt log line) is 5.4.7, not 4.x."""
    from kotlin_smtp_py.spool.scheduler import SpoolEvents
    from kotlin_smtp_py.status import FailureKind

    class Recording(SpoolEvents):
        def __init__(self) -> None:
            self.results: list[DeliveryStatus] = []

        def delivery_result(self, entry: Any, recipient: Any, status: DeliveryStatus) -> None:
            self.results.append(status)

    events = Recording()
    clock, spool, delivery, bouncer, sched = _setup(tmp_path, ["temp"] * 5, max_retries=1,
                                                    events=events)
    qid = _enqueue(spool, ["a@localhost"])
    on_reactor(sched.start)
    wait_until(lambda: len(events.results) == 1, message="first attempt")
    assert events.results[0].kind is FailureKind.TRANSIENT  # a retry follows
    entry = wait_until(lambda: (e := on_reactor(spool.get, qid)) is not None
                       and e.attempts == 1 and e, message="attempt 1 recorded")
    _run(clock, entry.next_attempt - clock.seconds(), sched)
    wait_until(lambda: len(events.results) == 2, message="last attempt")
    last = events.results[1]
    assert (last.kind, last.enhanced, last.reason) == (FailureKind.PERMANENT, "5.4.7",
                                                       Reason.CONNECT)
    assert "try later" in last.text
    wait_until(lambda: on_reactor(spool.get, qid) is None, message="entry removed")
    assert [b[1] for b in bouncer.notices if b[1] == "failed"] == ["failed"]
    on_reactor(sched.stop)
