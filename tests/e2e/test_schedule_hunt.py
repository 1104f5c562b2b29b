"""Hunt: the delivery scheduler and the retry lifecycle of queued mail.

Real components throughout: a real FileSpool on disk, the real Scheduler and the real
SpoolBouncer (RFC 3464 notices queued through the same spool), driven by a task.Clock (no
sleeping: every wait polls a condition against a real-time deadline). Deliveries are scripted
IDelivery objects except where the SMTP client matters (the e2e tests at the end, against the
loopback sink of tests/outbound).

Where the spec is silent, "correct" is what a Postfix/Exim operator expects (qmgr's
minimal/maximal_backoff_time and queue lifetimes, Exim retry rules). Five cases found bugs
(all fixed since): the retry delay overflowed at the 1025th attempt and stranded the lease,
one unreadable envelope stalled the whole queue, an out-of-range number in an envelope was
never quarantined, a backward clock step held retries for the whole step, a permanent failure
whose notice could not be queued was delivered to again.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import on_reactor, wait_until
from prometheus_client.parser import text_string_to_metric_families
from twisted.internet import defer, task
from twisted.logger import globalLogPublisher
from zope.interface import implementer

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.interfaces import BackendUnavailable, IDelivery
from kotlin_smtp_py.metrics import Metrics, MetricsSpoolEvents
from kotlin_smtp_py.routing import DeliveryRouter
from kotlin_smtp_py.service import SpoolBouncer
from kotlin_smtp_py.spool.file import FileSpool
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.spool.scheduler import (
    JITTER,
    MAX_RETRY_DELAY,
    Scheduler,
    SpoolEvents,
    retry_delay,
)
from kotlin_smtp_py.status import DeliveryStatus, Reason

START = 1_700_000_000.0  # a plausible wall-clock epoch for the fake clock
MESSAGE = (b"From: <s@remote.test>\r\nTo: <a@dead.test>\r\nSubject: schedule hunt\r\n"
           b"Message-ID: <hunt@remote.test>\r\n\r\nbody\r\n")
LONGEST = MAX_RETRY_DELAY * (1 + JITTER)  # the longest wait the spec allows between attempts

STATUS = {
    "ok": DeliveryStatus.delivered(),
    # a connection that failed: no remote text, the reason is in the status text
    "refused": DeliveryStatus.transient(Reason.CONNECT,
                                        "connect to mx.dead.test[192.0.2.7]:25: "
                                        "Connection refused", "4.4.1"),
    # a remote 4xx reply
    "busy": DeliveryStatus.from_reply(451, "4.2.1 mailbox busy, come back later",
                                      Reason.RECIPIENT, "mx.dead.test", "4.2.1"),
    "perm": DeliveryStatus.from_reply(550, "5.1.1 no such user here", Reason.RECIPIENT,
                                      "mx.dead.test", "5.1.1"),
}


# -- machinery -----------------------------------------------------------------------------------

@implementer(IDelivery)
class ScriptedPeer:
    """Answers each recipient from its own script (one outcome per attempt; the last one
    repeats); records every call; can hold deliveries open to count concurrency."""

    def __init__(self, script: dict[str, list[str]] | None = None,
                 default: str = "ok") -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.default = default
        self.calls: list[tuple[str, list[str]]] = []
        self.holding = False
        self.held: list[defer.Deferred[None]] = []
        self.open = 0
        self.max_open = 0
        self.dsns: list[tuple[QueueEntry, bytes]] = []  # notices from <> handed to this peer
        self.clock: Any = None
        self.times: list[float] = []  # clock time of each call (not notices)

    def outcome(self, address: str) -> str:
        seq = self.script.get(address)
        if not seq:
            return self.default
        return seq.pop(0) if len(seq) > 1 else seq[0]

    def deliver(self, entry: Any, message_path: str, recipients: Any) -> Any:
        if entry.envelope.is_dsn:
            with open(message_path, "rb") as fh:
                self.dsns.append((entry, fh.read()))
            return defer.succeed([(r, STATUS["ok"]) for r in recipients])
        self.calls.append((entry.queue_id, [r.address for r in recipients]))
        if self.clock is not None:
            self.times.append(float(self.clock.seconds()))
        result = [(r, STATUS[self.outcome(r.address)]) for r in recipients]
        if not self.holding:
            return defer.succeed(result)
        self.open += 1
        self.max_open = max(self.max_open, self.open)
        d: defer.Deferred[None] = defer.Deferred()
        self.held.append(d)

        def done(_: object) -> Any:
            self.open -= 1
            return result

        return d.addCallback(done)

    def attempts_for(self, address: str) -> int:
        return sum(address in rcpts for _, rcpts in self.calls)


class Events(SpoolEvents):
    def __init__(self) -> None:
        self.results: list[tuple[str, str, DeliveryStatus]] = []
        self.retries: list[tuple[str, float]] = []
        self.finished: list[tuple[str, str]] = []

    def delivery_result(self, entry: Any, recipient: Any, status: DeliveryStatus) -> None:
        self.results.append((entry.queue_id, recipient.address, status))

    def retry_scheduled(self, entry: Any, delay: float) -> None:
        self.retries.append((entry.queue_id, delay))

    def entry_finished(self, entry: Any, outcome: str, age: float) -> None:
        self.finished.append((entry.queue_id, outcome))


class Fanout(SpoolEvents):
    """Both the recording observer and the production metrics adapter."""

    def __init__(self, *targets: Any) -> None:
        self.targets = targets

    def delivery_result(self, *a: Any) -> None:
        for t in self.targets:
            t.delivery_result(*a)

    def retry_scheduled(self, *a: Any) -> None:
        for t in self.targets:
            t.retry_scheduled(*a)

    def entry_finished(self, *a: Any) -> None:
        for t in self.targets:
            t.entry_finished(*a)

    def recipients_dropped(self, *a: Any) -> None:
        for t in self.targets:
            t.recipients_dropped(*a)


class World:
    """A FileSpool, a SpoolBouncer and a Scheduler on one task.Clock."""

    def __init__(self, root: Path, peer: ScriptedPeer, *, clock: task.Clock | None = None,
                 metrics: Metrics | None = None, **kw: Any) -> None:
        self.root = root
        self.clock = clock or task.Clock()
        if clock is None:
            self.clock.advance(START)
        self.peer = peer
        peer.clock = self.clock
        self.spool: FileSpool = on_reactor(FileSpool, str(root / "spool"), clock=self.clock)
        self.events = Events()
        self.metrics = metrics
        observers: list[Any] = [self.events]
        if metrics is not None:
            observers.append(MetricsSpoolEvents(metrics))
        self.bouncer = SpoolBouncer(self.spool, "mx.hunt.test", self.clock)
        # Local delivery is never reached: every test domain routes to the scripted peer
        # (as relay), DSNs to the sender's domain included.
        self.router = DeliveryRouter(frozenset({"localhost"}), peer, peer,
                                     lambda domain: domain)
        args: dict[str, Any] = {"max_retries": 3, "retry_delay_seconds": 60, "concurrency": 1,
                                "delay_warning_seconds": 14400, **kw}
        self.sched = Scheduler(self.spool, self.router, self.bouncer, clock=self.clock,
                               rng=random.Random(11), events=Fanout(*observers), **args)
        self.started = False

    # -- actions ---------------------------------------------------------------------------------

    def enqueue(self, rcpts: list[str], sender: str = "s@remote.test",
                notify: tuple[str, ...] = ()) -> str:
        env = Envelope(sender, tuple(Recipient(r, notify=notify) for r in rcpts),
                       received_at=self.now())
        entry = on_reactor(self.spool.enqueue, env, MESSAGE)
        return str(entry.queue_id)

    def start(self) -> None:
        on_reactor(self.sched.start)
        self.started = True
        self.settle()

    def stop(self) -> None:
        def release() -> None:
            self.peer.holding = False
            while self.peer.held:
                self.peer.held.pop(0).callback(None)
        on_reactor(release)
        if self.started:
            on_reactor(self.sched.stop)
            self.started = False

    def now(self) -> float:
        return float(self.clock.seconds())

    def advance(self, seconds: float) -> None:
        on_reactor(self.clock.advance, seconds)
        self.settle()

    def settle(self, timeout: float = 10.0, in_flight: int = 0) -> None:
        """Fire zero-delay calls until no pass runs or is pending and ``in_flight`` deliveries
        are open (0: everything finished)."""
        sched = self.sched

        def quiet() -> bool:
            def check() -> bool:
                self.clock.advance(0)
                pending = sched._pending_call is not None and sched._pending_call.active()
                return not pending and not sched._running and sched.in_flight == in_flight
            return bool(on_reactor(check))

        wait_until(quiet, timeout=timeout, message="scheduler to go idle")

    def entry(self, qid: str) -> QueueEntry | None:
        return on_reactor(self.spool.get, qid)

    def run_until_gone(self, qid: str, limit: int = 40) -> None:
        """Advance the clock to each next attempt until the entry has left the queue."""
        for _ in range(limit):
            e = self.entry(qid)
            if e is None:
                return
            self.advance(max(0.0, e.next_attempt - self.now()) + 0.01)
        raise AssertionError(f"{qid} still queued after {limit} retries")

    # -- the notices the bouncer queued (delivered to the peer like any mail from <>) -------

    def notices(self) -> list[tuple[QueueEntry, email.message.Message, bytes]]:
        return [(e, email.message_from_bytes(raw, policy=email.policy.compat32), raw)
                for e, raw in self.peer.dsns]

    def notice_actions(self) -> list[str]:
        return [_status_fields(msg)[1].get("action", "") for _, msg, _ in self.notices()]


def _blocks(msg: email.message.Message) -> list[dict[str, str]]:
    """The field blocks of the message/delivery-status part (per-message first), keys
    lower-case."""
    for part in msg.walk():
        if part.get_content_type() == "message/delivery-status":
            payload = part.get_payload()
            assert isinstance(payload, list) and len(payload) >= 2, payload
            return [{k.lower(): v for k, v in b.items()} for b in payload]
    raise AssertionError("no message/delivery-status part")


def _status_fields(msg: email.message.Message) -> tuple[dict[str, str], dict[str, str]]:
    """(per-message fields, first per-recipient fields) of the delivery-status part."""
    blocks = _blocks(msg)
    return blocks[0], blocks[1]


def _human_text(msg: email.message.Message) -> str:
    for part in msg.walk():
        if part.get_content_type() == "text/plain":
            return part.get_payload(decode=True).decode("utf-8", "replace")
    raise AssertionError("no text/plain part")


@pytest.fixture
def world(tmp_path: Path, reactor_thread: None) -> Iterator[Any]:
    made: list[World] = []

    def make(peer: ScriptedPeer | None = None, root: Path | None = None, **kw: Any) -> World:
        w = World(root or tmp_path / f"w{len(made)}", peer or ScriptedPeer(), **kw)
        made.append(w)
        return w

    yield make
    for w in made:
        w.stop()


class LogCapture:
    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []

    def __call__(self, event: dict[str, Any]) -> None:
        self.events.append(event)

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    def errors(self) -> list[dict[str, Any]]:
        return [e for e in self.events
                if getattr(e.get("log_level"), "name", "") in ("error", "critical")]


@pytest.fixture
def logs() -> Iterator[LogCapture]:
    cap = LogCapture()
    globalLogPublisher.addObserver(cap)
    yield cap
    globalLogPublisher.removeObserver(cap)


def _scrape(metrics: Metrics) -> dict[str, float]:
    out: dict[str, float] = {}
    for fam in text_string_to_metric_families(metrics.render().decode()):
        for s in fam.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
            out[s.name + ("{" + labels + "}" if labels else "")] = s.value
    return out


def _jump(clock: task.Clock, delta: float) -> None:
    """The wall clock jumps by ``delta`` (NTP step, VM restore). Timers are relative (the
    LoopingCall tick still fires a second later), so pending calls move with the clock;
    what stays behind are the wall-clock times the spool stored."""
    clock.rightNow += delta
    for call in clock.calls:
        call.time += delta


def _set_attempts(w: World, qid: str, attempts: int) -> None:
    claim = on_reactor(w.spool.claim, qid)
    assert claim is not None
    on_reactor(w.spool.reschedule, claim,
               claim.entry.evolve(attempts=attempts, next_attempt=w.now()))






# == 1. retry delays ==============================================================================

@pytest.mark.parametrize("base", [1, 60, 250, 600, 3600])
def test_retry_delay_follows_the_spec_for_every_attempt(base: int) -> None:
    """delay = base × 2^(attempt-1), capped at 600 s, ±20 % jitter: never 0, never negative,
    never above 720 s, and the jitter really spans ±20 %."""
    rng = random.Random(base)
    for attempt in range(1, 41):
        nominal = min(base * 2 ** (attempt - 1), MAX_RETRY_DELAY)
        values = [retry_delay(base, attempt, rng) for _ in range(300)]
        assert all(0.8 * nominal - 1e-9 <= v <= 1.2 * nominal + 1e-9 for v in values), \
            (attempt, min(values), max(values))
        assert min(values) > 0
        assert max(values) <= LONGEST + 1e-9
        assert min(values) < 0.85 * nominal and max(values) > 1.15 * nominal, attempt


def test_an_entry_past_its_1024th_attempt_is_rescheduled_not_stranded(world: Any) -> None:
    w = world(ScriptedPeer({"a@dead.test": ["refused"]}), max_retries=5000)
    qid = w.enqueue(["a@dead.test"])
    _set_attempts(w, qid, 1024)
    w.start()
    assert w.peer.attempts_for("a@dead.test") == 1
    assert not w.spool._held, "the lease of the entry was never given back"
    entry = w.entry(qid)
    assert entry is not None and entry.attempts == 1025
    assert 0.8 * MAX_RETRY_DELAY <= entry.next_attempt - w.now() <= LONGEST
    assert [d for _, d in w.events.retries] == [pytest.approx(entry.next_attempt - w.now())]


# == 2. maxRetries, the give-up, and the retry metrics ============================================

@pytest.mark.parametrize("max_retries", [0, 1, 4])
def test_max_retries_n_means_n_plus_one_attempts_and_metrics_record_each_retry(
        world: Any, max_retries: int) -> None:
    """maxRetries N: attempt 1 plus N retries, spaced by the spec's delays (measured on the
    clock), then a 5.4.7 bounce. Every deferral is one smtp_spool_retry_scheduled_total and one
    smtp_spool_retry_delay_seconds observation of the delay actually scheduled; the give-up is
    neither. maxRetries 0: the first transient failure bounces."""
    metrics = Metrics()
    w = world(ScriptedPeer({"a@dead.test": ["refused"]}), max_retries=max_retries,
              metrics=metrics)
    qid = w.enqueue(["a@dead.test"])
    w.start()
    scheduled: list[float] = []
    for _ in range(max_retries + 2):
        entry = w.entry(qid)
        if entry is None:
            break
        scheduled.append(entry.next_attempt - w.now())
        w.advance(entry.next_attempt - w.now() + 0.01)
    assert w.entry(qid) is None
    assert w.peer.attempts_for("a@dead.test") == max_retries + 1
    gaps = [b - a for a, b in zip(w.peer.times, w.peer.times[1:], strict=False)]
    for n, gap in enumerate(gaps, start=1):
        nominal = min(60 * 2 ** (n - 1), MAX_RETRY_DELAY)
        assert 0.8 * nominal <= gap <= 1.2 * nominal + 0.02, (n, gap)
    assert [d for _, d in w.events.retries] == pytest.approx(scheduled)
    assert all(d > 0 for d in scheduled)
    ours = [s for q, _, s in w.events.results if q == qid]
    assert [s.kind.value for s in ours if s.kind] == ["transient"] * max_retries + ["permanent"]
    assert ours[-1].enhanced == "5.4.7"
    assert [f for f in w.events.finished if f[0] == qid] == [(qid, "dropped")]

    m = _scrape(metrics)
    assert m["smtp_spool_retry_scheduled_total"] == max_retries
    assert m["smtp_spool_retry_delay_seconds_count"] == max_retries
    assert m["smtp_spool_retry_delay_seconds_sum"] == pytest.approx(sum(scheduled))
    assert m["smtp_spool_dropped_total"] == 1
    assert m["smtp_spool_completed_total"] == 1  # the failure notice, delivered
    assert m["smtp_spool_queue_age_seconds_count{outcome=dropped}"] == 1
    assert m.get("smtp_spool_delivery_failure_total{domain=other,kind=transient,reason=connect}",
                 0) == max_retries
    assert m["smtp_spool_delivery_failure_total{domain=other,kind=permanent,reason=connect}"] == 1
    assert m["smtp_spool_delivery_recipients_total{result=permanent_failure}"] == 1

    [(notice, msg, _)] = w.notices()
    assert notice.envelope.sender == "" and notice.pending[0].address == "s@remote.test"
    assert _status_fields(msg)[1]["status"] == "5.4.7"


def test_default_settings_bounce_after_about_25_minutes_as_documented(world: Any) -> None:
    """docs/CONFIGURATION.md: "With the defaults maxRetries 5 and retryDelaySeconds 60 a
    message bounces after about 25 minutes" (60+120+240+480+600 s, ±20 %): six attempts."""
    w = world(ScriptedPeer({"a@dead.test": ["busy"]}), max_retries=5, retry_delay_seconds=60)
    qid = w.enqueue(["a@dead.test"])
    t0 = w.now()
    w.start()
    w.run_until_gone(qid)
    assert w.peer.attempts_for("a@dead.test") == 6
    lifetime = w.peer.times[-1] - t0
    assert 0.8 * 1500 <= lifetime <= 1.2 * 1500 + 0.1, lifetime


@pytest.mark.parametrize("last", ["refused", "busy"])
def test_the_give_up_bounce_says_why(world: Any, last: str) -> None:
    """The failure notice after the last retry: Action failed, Status 5.4.7, and the reason:
    the remote's own reply (Diagnostic-Code, Remote-MTA) when a server answered, the local
    error (connection refused) otherwise, in the human part too."""
    w = world(ScriptedPeer({"a@dead.test": [last]}), max_retries=2)
    qid = w.enqueue(["a@dead.test"])
    w.start()
    w.run_until_gone(qid)
    [(notice, msg, raw)] = w.notices()
    assert notice.envelope.sender == "" and notice.envelope.is_dsn
    assert [r.address for r in notice.pending] == ["s@remote.test"]
    per_msg, per_rcpt = _status_fields(msg)
    assert per_msg["reporting-mta"] == "dns; mx.hunt.test"
    assert per_rcpt["action"] == "failed"
    assert per_rcpt["status"] == "5.4.7"
    assert per_rcpt["final-recipient"] == "rfc822; a@dead.test"
    human = _human_text(msg)
    if last == "busy":
        assert "mailbox busy" in per_rcpt["diagnostic-code"]
        assert per_rcpt["remote-mta"] == "dns; mx.dead.test"
        assert "mailbox busy" in human
    else:
        assert "Connection refused" in human
    assert b"Subject: schedule hunt" in raw  # the original comes back


# == 3. per-recipient outcomes across runs ========================================================

def test_per_recipient_outcomes_across_runs(world: Any) -> None:
    """Delivered recipients are never sent again, permanent failures are never retried and
    bounce in one notice per run (listing every failed recipient), transient siblings are
    retried until delivered or given up; the entry's outcome covers every run."""
    peer = ScriptedPeer({
        "ok@a.test": ["ok"], "perm@a.test": ["perm"], "perm2@b.test": ["perm"],
        "slow@a.test": ["busy", "busy", "ok"], "dead@b.test": ["refused"]})
    w = world(peer, max_retries=3)
    rcpts = ["ok@a.test", "perm@a.test", "perm2@b.test", "slow@a.test", "dead@b.test"]
    qid = w.enqueue(rcpts)
    w.start()
    first = w.entry(qid)
    assert first is not None and first.attempts == 1
    assert sorted(r.address for r in first.pending) == ["dead@b.test", "slow@a.test"]
    assert first.delivered_before and first.bounced_before
    # one notice for the first run, naming both permanent failures
    [(_, msg, _)] = w.notices()
    failed = _blocks(msg)[1:]
    assert sorted(b["final-recipient"] for b in failed) == \
        ["rfc822; perm2@b.test", "rfc822; perm@a.test"]
    assert {b["action"] for b in failed} == {"failed"}
    assert {b["status"] for b in failed} == {"5.1.1"}
    w.run_until_gone(qid)
    assert {a: peer.attempts_for(a) for a in rcpts} == {
        "ok@a.test": 1, "perm@a.test": 1, "perm2@b.test": 1, "slow@a.test": 3,
        "dead@b.test": 4}
    notices = w.notices()
    assert len(notices) == 2
    [last] = _blocks(notices[1][1])[1:]
    assert (last["final-recipient"], last["status"]) == ("rfc822; dead@b.test", "5.4.7")
    assert [f for f in w.events.finished if f[0] == qid] == [(qid, "other")]


def test_a_permanent_failure_is_not_delivered_again_when_its_notice_could_not_be_queued(
        world: Any) -> None:
    peer = ScriptedPeer({"perm@a.test": ["perm", "ok"], "slow@a.test": ["busy", "ok"]})
    w = world(peer)
    real_notify = w.bouncer.notify
    failures = {"left": 1}

    def flaky_notify(entry: Any, path: str, results: Any, action: str) -> Any:
        if action == "failed" and failures["left"]:
            failures["left"] -= 1
            return defer.fail(OSError(28, "No space left on device"))
        return real_notify(entry, path, results, action)

    w.sched.bouncer.notify = flaky_notify  # type: ignore[method-assign]
    qid = w.enqueue(["perm@a.test", "slow@a.test"])
    w.start()
    w.run_until_gone(qid)
    assert peer.attempts_for("slow@a.test") == 2
    assert peer.attempts_for("perm@a.test") == 1, "a 550 recipient was delivered again"
    failed = [b["final-recipient"] for _, m, _ in w.notices() for b in _blocks(m)[1:]
              if b["action"] == "failed"]
    assert failed == ["rfc822; perm@a.test"]


# == 4. concurrency, batches, triggers ============================================================

def _release_one(w: World) -> None:
    """Let the oldest open delivery answer (in the reactor thread)."""
    def release() -> bool:
        if not w.peer.held:
            return False
        w.peer.held.pop(0).callback(None)
        return True
    assert on_reactor(release), "no delivery is open"


def test_worker_concurrency_bounds_deliveries_and_due_batches(world: Any) -> None:
    """workerConcurrency 3: never more than 3 deliveries open; each pass asks the spool for a
    bounded batch (at most twice the free slots); 14 entries each delivered exactly once."""
    peer = ScriptedPeer()
    peer.holding = True
    w = world(peer, concurrency=3)
    ids = [w.enqueue([f"u{i}@ok.test"]) for i in range(14)]
    limits: list[int] = []
    real_due = w.spool.due

    def due(now: float, limit: int) -> Any:
        limits.append(limit)
        return real_due(now, limit)

    w.spool.due = due  # type: ignore[method-assign]
    on_reactor(w.sched.start)
    w.started = True

    def busy_or_done() -> None:
        """Wait until the scheduler has filled every slot it can (3, or all that is left)."""
        def check() -> bool:
            w.clock.advance(0)
            sched = w.sched
            pending = sched._pending_call is not None and sched._pending_call.active()
            left = 14 - (len(peer.calls) - peer.open)
            return not pending and not sched._running and peer.open == min(3, left)
        wait_until(lambda: on_reactor(check), timeout=10, message="slots filled")

    busy_or_done()
    for _ in range(20):  # triggers and ticks while full: nothing more starts
        on_reactor(w.sched.trigger)
    on_reactor(w.clock.advance, 5)
    busy_or_done()
    assert peer.open == 3 and len(peer.calls) == 3
    for _ in range(40):
        if not peer.held:
            break
        _release_one(w)
        busy_or_done()
        assert peer.open <= 3
    w.settle()
    assert peer.max_open == 3
    assert sorted(q for q, _ in peer.calls) == sorted(ids)  # each once
    assert all(w.entry(q) is None for q in ids)
    assert limits and max(limits) <= 6 and min(limits) >= 1


def _count_passes(w: World) -> list[float]:
    """Record the time of every spool.due() call (= every scheduler pass)."""
    passes: list[float] = []
    real_due = w.spool.due

    def due(now: float, limit: int) -> Any:
        passes.append(now)
        return real_due(now, limit)

    w.spool.due = due  # type: ignore[method-assign]
    return passes


def test_many_triggers_coalesce_into_one_pass(world: Any) -> None:
    """50 trigger() calls while idle are one pass; 50 while a pass runs are one more pass
    after it, not 50."""
    w = world()
    passes = _count_passes(w)
    w.start()
    before = len(passes)
    assert before == 1  # the LoopingCall's first tick

    def burst() -> None:
        for _ in range(50):
            w.sched.trigger()
    on_reactor(burst)
    w.settle()
    assert len(passes) == before + 1

    # A pass that is slow (its spool query has not answered yet): triggers pile up.
    gate: defer.Deferred[None] = defer.Deferred()
    real_due = w.spool.due

    def slow_due(now: float, limit: int) -> Any:
        passes.append(now)
        return gate.addCallback(lambda _: real_due(now, limit))

    w.spool.due = slow_due  # type: ignore[method-assign]
    on_reactor(w.sched.trigger)
    on_reactor(w.clock.advance, 0)
    assert on_reactor(lambda: w.sched._running)
    on_reactor(burst)
    on_reactor(w.clock.advance, 0.5)  # no tick yet either
    n = len(passes)
    w.spool.due = real_due  # type: ignore[method-assign]
    passes_after = _count_passes(w)
    on_reactor(gate.callback, None)
    w.settle()
    assert n == before + 2
    assert len(passes_after) == 1, "triggers during a pass must coalesce into one more pass"


def test_a_failing_pass_pauses_with_one_report_and_recovers(world: Any, logs: Any) -> None:
    """The spool backend fails for a while: each tick's pass fails, the outage is reported once
    (not once per tick), passes do not spin faster than the tick, and the first pass that
    works again says so and delivers what waited."""
    w = world()
    qid = w.enqueue(["a@ok.test"])
    state = {"failing": True, "calls": 0}
    real_due = w.spool.due

    def due(now: float, limit: int) -> Any:
        state["calls"] += 1
        if state["failing"]:
            return defer.fail(BackendUnavailable("redis down"))
        return real_due(now, limit)

    w.spool.due = due  # type: ignore[method-assign]
    w.start()
    for _ in range(10):
        w.advance(1)
    assert w.entry(qid) is not None
    assert 10 <= state["calls"] <= 12, state  # one pass per tick, no busy retry
    assert len(logs.named("spool_unavailable")) == 1
    state["failing"] = False
    w.advance(1)
    assert w.entry(qid) is None
    assert len(logs.named("spool_recovered")) == 1
    assert w.peer.calls == [(qid, ["a@ok.test"])]


# == 5. damaged entries ===========================================================================

def test_one_unreadable_envelope_does_not_stall_the_whole_queue(world: Any, logs: Any) -> None:
    peer = ScriptedPeer()
    first = world(peer)
    bad = first.enqueue(["bad@ok.test"])
    goods = [first.enqueue([f"good{i}@ok.test"]) for i in range(3)]
    js = first.root / "spool" / "queue" / f"{bad}.json"
    good_json = js.read_bytes()
    js.unlink()
    js.mkdir()  # read(2) fails (EISDIR), as EIO from a bad sector would
    os.utime(js, (START, START))  # its due time (the mtime) as the envelope had it
    try:
        w = world(peer, root=first.root, clock=first.clock)  # a restart reads the envelopes
        w.start()
        for _ in range(5):
            w.advance(1)
        delivered = [q for q, _ in peer.calls]
        assert all(w.entry(q) is None for q in goods), \
            f"delivered {delivered} of {goods}: the queue stalls behind {bad}"
    finally:
        w.stop()
        js.rmdir()
        js.write_bytes(good_json)


def _good_json(qid: str) -> dict[str, Any]:
    return {"version": 1, "queue_id": qid,
            "envelope": {"sender": "s@remote.test",
                         "recipients": [{"address": "bad@dead.test"}]},
            "pending": [{"address": "bad@dead.test"}], "attempts": 0,
            "next_attempt": START, "created": START}



CORRUPT = {
    "empty": lambda qid: b"",
    "nul-blocks": lambda qid: b"\x00" * 512,
    "truncated": lambda qid: json.dumps(_good_json(qid)).encode()[:60],
    "null": lambda qid: b"null",
    "not-utf8": lambda qid: b"\xff\xfe{\x00}",
    "pending-not-a-list": lambda qid: json.dumps({**_good_json(qid), "pending": 7}).encode(),
    "time-not-a-number": lambda qid: json.dumps(
        {**_good_json(qid), "next_attempt": "soon"}).encode(),
    "attempts-out-of-range": lambda qid: json.dumps(
        {**_good_json(qid), "attempts": 1e999}).encode(),
}


def _restart_with(world: Any, files: dict[str, Any], **kw: Any) -> tuple[Any, str, str]:
    """Queue a bad and a good entry, damage the bad one (``files``: suffix -> new content as a
    function of the queue id, None = removed), then start a fresh spool and scheduler on the
    directory (as after a restart, so the envelope is read from disk). Returns (world, bad
    id, good id)."""
    peer = ScriptedPeer()
    first = world(peer)
    bad = first.enqueue(["bad@dead.test"])
    good = first.enqueue(["good@ok.test"])
    queue = first.root / "spool" / "queue"
    for suffix, content in files.items():
        path = queue / f"{bad}{suffix}"
        if content is None:
            path.unlink()
        else:
            path.write_bytes(content(bad))
    if (queue / f"{bad}.json").exists():
        os.utime(queue / f"{bad}.json", (START, START))  # due now, as it was
    return world(peer, root=first.root, clock=first.clock, **kw), bad, good


def _damaged_entry_is_set_aside_loudly(w: World, bad: str, good: str, logs: Any) -> None:
    claims: list[str] = []
    real_claim = w.spool.claim

    def counting_claim(qid: str) -> Any:
        claims.append(qid)
        return real_claim(qid)

    w.spool.claim = counting_claim  # type: ignore[method-assign]
    w.start()
    for _ in range(20):
        w.advance(1)
    assert w.entry(good) is None, "a damaged entry held up the rest of the queue"
    assert claims.count(bad) <= 2, f"{bad} claimed {claims.count(bad)} times: a claim loop"
    corrupt = w.root / "spool" / "corrupt"
    assert (corrupt / f"{bad}.json").exists(), os.listdir(corrupt)
    assert not (w.root / "spool" / "queue" / f"{bad}.json").exists()
    assert any(bad in str(e.get("queue_id", "")) for e in logs.errors()), \
        "no error-level log names the damaged entry"
    assert not w.spool._held


@pytest.mark.parametrize("kind", [
    "empty", "nul-blocks", "truncated", "null", "not-utf8", "pending-not-a-list",
    "time-not-a-number",
    "attempts-out-of-range"])
def test_a_corrupt_envelope_is_quarantined_without_a_claim_loop(world: Any, logs: Any,
                                                               kind: str) -> None:
    # concurrency 2: the good entry is claimed in the same batch as the bad one, so this
    # test is about the bad entry alone (the stall is test_one_unreadable_envelope_...).
    w, bad, good = _restart_with(world, {".json": CORRUPT[kind]}, concurrency=2)
    _damaged_entry_is_set_aside_loudly(w, bad, good, logs)


def test_an_envelope_whose_message_file_is_missing_is_set_aside(world: Any, logs: Any) -> None:
    w, bad, good = _restart_with(world, {".eml": None})
    _damaged_entry_is_set_aside_loudly(w, bad, good, logs)
    assert w.peer.attempts_for("bad@dead.test") == 0


def test_an_entry_with_no_recipients_left_just_leaves_the_queue(world: Any) -> None:
    """An envelope whose pending list is empty (nothing left to do) is completed once: no
    delivery, no notice, no claim loop."""
    w, bad, good = _restart_with(world, {".json": lambda qid: json.dumps(
        {**_good_json(qid), "pending": []}).encode()})
    w.start()
    for _ in range(3):
        w.advance(1)
    assert w.entry(bad) is None and w.entry(good) is None
    assert [q for q, _ in w.peer.calls] == [good]
    assert w.notices() == []
    assert not (w.root / "spool" / "queue" / f"{bad}.eml").exists()


# == 6. the wall clock jumps ======================================================================

def test_a_backward_clock_step_does_not_hold_retries_for_hours(world: Any) -> None:
    w = world(ScriptedPeer({"a@dead.test": ["refused", "ok"]}))
    qid = w.enqueue(["a@dead.test"])
    w.start()
    entry = w.entry(qid)
    assert entry is not None and entry.attempts == 1
    assert 48 <= entry.next_attempt - w.now() <= 72
    on_reactor(_jump, w.clock, -3 * 3600)
    for _ in range(int(LONGEST) // 60 + 2):  # the ticks keep running: 12+ minutes of them
        w.advance(60)
    assert w.peer.attempts_for("a@dead.test") == 2, \
        "a 60 s retry still waits for the 3 h the clock stepped back"
    assert w.entry(qid) is None


def test_a_forward_clock_step_makes_entries_due_without_an_early_give_up(world: Any) -> None:
    """The clock steps forward a day: the deferred entry is simply due (attempt 2 of 4, not a
    give-up: retries are counted, not timed), and its next retry is scheduled from the new
    time with the attempt-2 delay."""
    w = world(ScriptedPeer({"a@dead.test": ["refused"]}), max_retries=3)
    qid = w.enqueue(["a@dead.test"])
    w.start()
    on_reactor(_jump, w.clock, 86400)
    w.advance(1)
    assert w.peer.attempts_for("a@dead.test") == 2
    entry = w.entry(qid)
    assert entry is not None and entry.attempts == 2
    assert 96 <= entry.next_attempt - w.now() <= 144
    assert [a for a in w.notice_actions() if a == "failed"] == []


# == 7. many due entries: batches and fairness ====================================================

def test_a_dead_destination_backlog_does_not_starve_other_mail(world: Any) -> None:
    """30 entries for a dead destination, each attempt taking 5 s (a connect timeout), then
    a message for a live one. Due entries are taken earliest first, so the new message waits
    at most for the backlog that was already due, never for the dead destination's retries,
    although those come due again while the first round is still running."""
    peer = ScriptedPeer({f"d{i}@dead.test": ["refused"] for i in range(30)})
    peer.holding = True
    w = world(peer, concurrency=1)
    dead = [w.enqueue([f"d{i}@dead.test"]) for i in range(30)]
    passes = _count_passes(w)
    on_reactor(w.sched.start)
    w.started = True
    on_reactor(w.clock.advance, 0)
    good: str | None = None
    for step in range(80):
        def settled() -> bool:
            w.clock.advance(0)
            sched = w.sched
            pending = sched._pending_call is not None and sched._pending_call.active()
            return bool(peer.held) or (not pending and not sched._running
                                       and sched.in_flight == 0)
        wait_until(lambda: on_reactor(settled), timeout=10, message="the next delivery")
        if not peer.held:
            break
        on_reactor(w.clock.advance, 5)  # the attempt takes 5 s
        _release_one(w)
        if step == 3:  # 20 s in: new mail for a live destination arrives
            good = w.enqueue(["x@live.test"])
        if good is not None and w.peer.attempts_for("x@live.test"):
            break
    assert good is not None
    order = [rcpts[0] for _, rcpts in peer.calls]
    assert "x@live.test" in order, "the live destination's message was never attempted"
    position = order.index("x@live.test")
    assert position <= 30, f"{position} dead attempts went first"
    assert len(set(order[:position])) == position, "a dead entry was retried before it"
    assert w.now() - START > 72  # the dead entries' retries were due meanwhile
    assert all(w.entry(q) is not None for q in dead[:3])  # still queued, retrying
    assert passes and max(len(passes), 1) <= 2 * len(peer.calls) + 5  # no pass storm


# == 8. notices: delay warnings, null sender ======================================================

def test_delay_warning_zero_sends_one_notice_per_recipient_at_its_first_deferral(
        world: Any) -> None:
    """delayWarningSeconds 0: a recipient gets one "delayed" notice at its first deferral and
    never another; a recipient deferred only from the second run on gets its own then; the
    final bounce is a separate "failed" notice."""
    peer = ScriptedPeer({"early@a.test": ["busy", "busy", "ok"],
                         "late@b.test": ["ok"], "late@a.test": ["busy"]})
    w = world(peer, max_retries=2, delay_warning_seconds=0)
    qid = w.enqueue(["early@a.test", "late@a.test"])
    w.start()
    first = [(b["final-recipient"], b["action"]) for _, m, _ in w.notices()
             for b in _blocks(m)[1:]]
    assert sorted(first) == [("rfc822; early@a.test", "delayed"),
                             ("rfc822; late@a.test", "delayed")]
    w.run_until_gone(qid)
    allblocks = [(b["final-recipient"], b["action"]) for _, m, _ in w.notices()
                 for b in _blocks(m)[1:]]
    assert allblocks.count(("rfc822; early@a.test", "delayed")) == 1
    assert allblocks.count(("rfc822; late@a.test", "delayed")) == 1
    assert allblocks.count(("rfc822; late@a.test", "failed")) == 1
    assert ("rfc822; early@a.test", "failed") not in allblocks
    assert len(allblocks) == 3


@pytest.mark.parametrize("sender,notify", [("", ()), ("s@remote.test", ("NEVER",))])
def test_no_notice_ever_for_the_null_sender_or_notify_never(world: Any, sender: str,
                                                            notify: tuple[str, ...]) -> None:
    """Mail from <> (a bounce) and NOTIFY=NEVER: neither delay notices nor the give-up
    bounce are queued; the entry still leaves the queue (dropped) after maxRetries."""
    metrics = Metrics()
    w = world(ScriptedPeer({"a@dead.test": ["busy"], "b@dead.test": ["perm"]}), max_retries=1,
              delay_warning_seconds=0, metrics=metrics)
    qid = w.enqueue(["a@dead.test", "b@dead.test"], sender=sender, notify=notify)
    w.start()
    w.run_until_gone(qid)
    assert w.peer.attempts_for("a@dead.test") == 2
    assert w.peer.attempts_for("b@dead.test") == 1
    assert w.notices() == []
    assert _scrape(metrics)["smtp_spool_dropped_total"] == 1
    assert list((w.root / "spool" / "queue").iterdir()) == []


# == 9. operator retry / flush and the schedule ===================================================

def test_queue_retry_runs_a_deferred_entry_now_and_keeps_its_backoff(world: Any) -> None:
    """`queue retry ID` (retry_now, and the request file a CLI process leaves for the server)
    makes a deferred entry due at once without resetting its attempt count: the next delay
    is the attempt-2 one, and the give-up comes after maxRetries as usual."""
    w = world(ScriptedPeer({"a@dead.test": ["busy"]}), max_retries=2)
    qid = w.enqueue(["a@dead.test"])
    w.start()
    assert w.entry(qid).attempts == 1
    # The CLI: another FileSpool on the same directory rewrites the entry and leaves a request.
    cli = on_reactor(FileSpool, str(w.root / "spool"), clock=w.clock)
    assert on_reactor(cli.retry_now, qid) == 1
    cli.request_retry(qid)
    # The server applies the request (its 1 s poll) and triggers a pass.
    assert on_reactor(w.spool.poll_requests) == 1
    on_reactor(w.sched.trigger)
    w.settle()
    assert w.peer.attempts_for("a@dead.test") == 2
    entry = w.entry(qid)
    assert entry is not None and entry.attempts == 2
    assert 96 <= entry.next_attempt - w.now() <= 144
    # queue flush: everything due now; the third attempt is the last (maxRetries 2)
    assert on_reactor(w.spool.retry_now, None) == 1
    on_reactor(w.sched.trigger)
    w.settle()
    assert w.peer.attempts_for("a@dead.test") == 3
    assert w.entry(qid) is None
    assert w.notice_actions() == ["failed"]


def test_queue_retry_of_an_entry_being_delivered_changes_nothing(world: Any) -> None:
    peer = ScriptedPeer()
    peer.holding = True
    w = world(peer)
    qid = w.enqueue(["a@ok.test"])
    on_reactor(w.sched.start)
    w.started = True
    wait_until(lambda: on_reactor(lambda: bool(peer.held)), timeout=10, message="delivery")
    assert on_reactor(w.spool.retry_now, qid) == 0  # locked by the delivery
    for _ in range(3):
        on_reactor(w.sched.trigger)
        on_reactor(w.clock.advance, 1)
    assert len(peer.calls) == 1
    _release_one(w)
    w.settle()
    assert w.entry(qid) is None
    assert len(peer.calls) == 1



# == 10. end to end: a real server, a dead MX and a live one ======================================

def test_e2e_dead_destination_gives_up_with_a_reason_and_the_metrics_agree(
        e2e_server: Any, sinks: Any, certs: Any) -> None:
    """One message to a live peer (the loopback sink) and a dead one (dead.test: nothing
    listens, connection refused), maxRetries 1: the live recipient is delivered once and
    never again; the dead one gets one delay notice and, after its second attempt, one
    failure notice saying 5.4.7 and why; the metrics count one retry of the scheduled delay
    and the run's outcomes."""
    from e2e_support import Dsn, message, submit

    sink = sinks.start()
    server = e2e_server({"smtp": {"spool": {"maxRetries": 1, "delayWarningSeconds": 0}}})
    submit(server, certs, "carol@localhost", ["ok@normal.test", "x@dead.test"],
           message("dead and alive"))
    first = server.pump(lambda: [e for e in server.entries() if e["attempts"] == 1],
                        message="the first attempt to be deferred")[0]
    server.settle()
    assert [r["address"] for r in first["pending"]] == ["x@dead.test"]
    assert len(sink.transactions) == 1
    [delayed] = server.pump(lambda: server.messages("carol"), message="the delay notice")
    assert Dsn(delayed).one("Action") == "delayed"
    delay = first["next_attempt"] - server.now()
    assert 48 <= delay <= 72
    server.advance(delay + 0.01)
    notices = server.pump(lambda: len(server.messages("carol")) == 2 and not server.entries()
                          and server.messages("carol"), message="the failure notice")
    server.settle()
    dsn = Dsn(notices[1])
    assert dsn.one("Action") == "failed"
    assert dsn.one("Status") == "5.4.7"
    assert dsn.one("Final-Recipient") == "rfc822; x@dead.test"
    human = dsn.raw.decode("utf-8", "replace").split("Content-Type: message/delivery-status")[0]
    # the last error, as Postfix's expiry bounce gives it (the give-up is the 5.4.7 status)
    assert "<x@dead.test>:" in human and "refused" in human.lower(), human
    assert len(sink.transactions) == 1  # ok@ was never sent again

    m = _scrape(server.service.metrics)
    assert m["smtp_spool_retry_scheduled_total"] == 1
    assert m["smtp_spool_retry_delay_seconds_count"] == 1
    assert m["smtp_spool_retry_delay_seconds_sum"] == pytest.approx(delay, abs=0.05)
    assert m["smtp_spool_delivery_failure_total{domain=other,kind=transient,reason=connect}"] \
        == 1
    assert m["smtp_spool_delivery_failure_total{domain=other,kind=permanent,reason=connect}"] \
        == 1
    assert m["smtp_spool_queue_age_seconds_count{outcome=other}"] == 1  # one delivered, one not
    assert m["smtp_spool_dropped_total"] == 0
