"""The delivery scheduler: a reactor-driven loop that takes due spool entries and delivers them.

- A ``LoopingCall`` (injectable clock) ticks every ``tick_seconds``; ``trigger()`` asks for an
  immediate run; triggers that arrive while a run is pending or running coalesce into one.
- ``workerConcurrency`` bounds entries delivered at once. Each entry is claimed (leased) first;
  its pending recipients are grouped by route and each group goes through one delivery.
- Outcomes: delivered and permanently failed recipients leave the entry; transient ones stay and
  the entry is rescheduled with ``retryDelaySeconds × 2^(attempt−1)`` capped at 600 s, ±20 %
  jitter; after ``maxRetries`` transient runs they are given up. Every failed or given-up
  recipient is reported in one DSN per message per run, and the DSN is durably queued *before*
  the recipients are removed from the entry, so no failure path ends in silence.
- A tick that raises is logged and the loop keeps running.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from typing import Any

from twisted.internet import defer, task
from twisted.logger import Logger
from twisted.python.failure import Failure

from kotlin_smtp_py.envelope import Recipient
from kotlin_smtp_py.interfaces import BackendUnavailable, IRouter, ISpool
from kotlin_smtp_py.spool.record import Claim, OwedNotice, QueueEntry
from kotlin_smtp_py.status import DeliveryStatus, FailureKind, Reason, one_line

log = Logger()

MAX_RETRY_DELAY = 600.0
NOT_DUE_SLACK = 1.0  # seconds: clocks of processes sharing a spool may differ a little
JITTER = 0.2
# A next attempt further ahead than any retry delay can reach: the wall clock was stepped back
# since it was stored, and the entry is due now rather than after the whole step.
CLOCK_STEP_HORIZON = MAX_RETRY_DELAY * (1 + JITTER) + 60.0
Result = tuple[Recipient, DeliveryStatus]


def retry_delay(base_seconds: float, attempt: int, rng: random.Random | None = None) -> float:
    """Delay before retry number ``attempt`` (1-based): exponential, capped, ±20 % jitter."""
    # (the exponent capped first: 1 << 1024 overflowed a float at the 1025th attempt)
    raw = min(base_seconds * float(1 << min(max(attempt - 1, 0), 40)), MAX_RETRY_DELAY)
    r = rng.uniform(1 - JITTER, 1 + JITTER) if rng else random.uniform(1 - JITTER, 1 + JITTER)
    return raw * r


def gave_up(status: DeliveryStatus, attempts: int) -> DeliveryStatus:
    """A transient failure turned permanent after the last retry (RFC 3463 5.4.7)."""
    return DeliveryStatus(550, "5.4.7", f"delivery time expired after {attempts} attempts: "
                          f"{status.text}", FailureKind.PERMANENT, status.reason,
                          status.remote_mta, status.diagnostic)


def _checked(got: Any) -> list[Result]:
    """A delivery's answer as (recipient, status) pairs; TypeError/ValueError if it is not."""
    out: list[Result] = []
    for rcpt, status in got:
        if not isinstance(rcpt, Recipient) or not isinstance(status, DeliveryStatus):
            raise TypeError(f"a delivery answered {rcpt!r}, {status!r}")
        out.append((rcpt, status))
    return out


def _owed(rcpt: Recipient, status: DeliveryStatus) -> OwedNotice:
    return OwedNotice(rcpt.address, status.code, status.enhanced, status.text,
                      status.reason.value, status.remote_mta,
                      status.diagnostic)


def _owed_status(owed: OwedNotice) -> DeliveryStatus:
    try:
        reason = Reason(owed.reason)
    except ValueError:
        reason = Reason.OTHER
    return DeliveryStatus.permanent_failure(reason, owed.text, owed.enhanced, owed.code,
                                            owed.remote_mta, owed.diagnostic)


def log_delivery(entry: QueueEntry, rcpt: Recipient, status: DeliveryStatus,
                 attempt: int) -> None:
    """The line every delivery attempt logs (the scheduler's and direct local delivery's),
    with the host that answered (``remote_mta``) when a peer did."""
    extra = {"remote_mta": status.remote_mta} if status.remote_mta else {}
    log.info("delivery {queue_id} to {recipient}: {status} {reason}",
             queue_id=entry.queue_id, recipient=rcpt.address,
             status=f"{status.code} {status.enhanced} {status.text}",
             reason="" if status.ok else status.reason.value, attempt=attempt,
             event="delivery_attempt", **extra)


def log_finished(entry: QueueEntry, outcome: str) -> None:
    log.info("finished {queue_id}: {outcome}", queue_id=entry.queue_id, outcome=outcome,
             event="entry_finished")


class SpoolEvents:
    """Observer for delivery outcomes (metrics adapt this); default methods do nothing."""

    def delivery_result(self, entry: QueueEntry, recipient: Recipient,
                        status: DeliveryStatus) -> None: ...
    def retry_scheduled(self, entry: QueueEntry, delay: float) -> None: ...
    def entry_finished(self, entry: QueueEntry, outcome: str, age: float) -> None: ...
    def recipients_dropped(self, entry: QueueEntry, count: int) -> None: ...


class Bouncer:
    """Builds and queues delivery status notifications (interface used by the scheduler)."""

    def notify(self, entry: QueueEntry, message_path: str, results: Sequence[Result],
               action: str) -> defer.Deferred[None]:
        return defer.succeed(None)


class Scheduler:
    def __init__(self, spool: ISpool, router: IRouter, bouncer: Bouncer, *, max_retries: int,
                 retry_delay_seconds: float, concurrency: int, clock: Any = None,
                 tick_seconds: float = 1.0, events: SpoolEvents | None = None,
                 rng: random.Random | None = None,
                 archiver: Callable[[QueueEntry, str], defer.Deferred[Any]] | None = None,
                 delay_warning_seconds: float = 0.0) -> None:
        from twisted.internet import reactor

        self.spool = spool
        self.router = router
        self.bouncer = bouncer
        self.max_retries = max_retries
        self.retry_delay_seconds = retry_delay_seconds
        self.concurrency = max(1, concurrency)
        self.clock: Any = clock if clock is not None else reactor
        self.tick_seconds = tick_seconds
        self.events = events or SpoolEvents()
        self.rng = rng or random.Random()
        self.archiver = archiver
        self.delay_warning_seconds = delay_warning_seconds
        self._loop: task.LoopingCall | None = None
        self._running = False
        self._again = False
        self._pending_call: Any = None
        self._in_flight: dict[str, defer.Deferred[None]] = {}
        self._claim_failed: dict[str, float] = {}  # queue id -> not claimed again before
        self._stopping = False
        self._last_error: str | None = None
        self.paused = False

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> None:
        self._loop = task.LoopingCall(self._tick)
        self._loop.clock = self.clock
        self._loop.start(self.tick_seconds, now=True)

    def stop(self, timeout: float = 30.0) -> defer.Deferred[None]:
        """Stop picking work; wait for in-flight deliveries up to ``timeout``, then release."""
        self._stopping = True
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        if self._pending_call is not None and self._pending_call.active():
            self._pending_call.cancel()
        waiting = list(self._in_flight.values())
        if not waiting:
            return defer.succeed(None)
        d: defer.Deferred[Any] = defer.DeferredList(waiting, consumeErrors=True)
        d.addTimeout(timeout, self.clock)
        d.addErrback(lambda _: log.warn("shutdown: {n} deliveries still running; their leases "
                                        "are released and the entries stay queued",
                                        n=len(self._in_flight)))
        return d.addCallback(lambda _: None)

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    # -- triggering ----------------------------------------------------------------------------

    def trigger(self) -> None:
        """Run as soon as possible; coalesces with a pending or running pass."""
        if self._stopping:
            return
        if self._running:
            self._again = True
            return
        if self._pending_call is None or not self._pending_call.active():
            self._pending_call = self.clock.callLater(0, self._tick)

    def _tick(self) -> defer.Deferred[None] | None:
        if self._running or self._stopping or self.paused:
            if self._running:
                self._again = True
            return None
        self._running = True
        d = defer.Deferred.fromCoroutine(self._run_pass())

        def finished(result: object) -> None:
            self._running = False
            if self._again and not self._stopping:
                self._again = False
                self.trigger()

        def succeeded(result: object) -> None:
            if self._last_error is not None:
                log.info("spool passes work again after: {error}", error=self._last_error,
                         event="spool_recovered")
                self._last_error = None

        def failed(f: Any) -> None:
            error = f"{type(f.value).__name__}: {f.value}"
            if error != self._last_error:  # one report per distinct outage, not per tick
                if f.check(BackendUnavailable):
                    log.warn("spool backend unavailable, deliveries pause: {error}",
                             error=str(f.value), event="spool_unavailable")
                else:
                    log.failure("spool pass failed; deliveries pause until it works again", f)
            self._last_error = error

        d.addCallbacks(succeeded, failed).addBoth(finished)
        return None

    async def _run_pass(self) -> None:
        free = self.concurrency - len(self._in_flight)
        if free <= 0:
            return
        now = float(self.clock.seconds())
        ids: list[str] = await self.spool.due(now, free * 2 + len(self._claim_failed))
        for qid, until in list(self._claim_failed.items()):
            if until <= now or until > now + 2 * self.retry_delay_seconds:  # (or clock step)
                del self._claim_failed[qid]
        candidates = [qid for qid in ids
                      if qid not in self._in_flight and qid not in self._claim_failed]
        failure: Failure | None = None
        # Claims go out together (one disk or Redis round trip for the lot, not one each); an
        # id another process holds just yields None and the next candidates fill its place.
        while candidates and not self._stopping:
            free = self.concurrency - len(self._in_flight)
            if free <= 0:
                break
            batch, candidates = candidates[:free], candidates[free:]
            outcomes = await defer.DeferredList([self.spool.claim(qid) for qid in batch],
                                                consumeErrors=True)
            for qid, (ok, claim) in zip(batch, outcomes, strict=True):
                if not ok:
                    # One unreadable entry must not hold up the rest of the queue: it is
                    # skipped for a while and the pass goes on with the other candidates.
                    # (Not when the whole backend is down: every entry is due again as soon
                    # as it is back.)
                    failure = failure or claim
                    if not claim.check(BackendUnavailable):
                        self._claim_failed[qid] = now + self.retry_delay_seconds
                    continue
                self._claim_failed.pop(qid, None)
                if claim is None:
                    continue
                if self._stopping or now + NOT_DUE_SLACK < claim.entry.next_attempt <= \
                        now + CLOCK_STEP_HORIZON:
                    # Stopping, or the spool's index was early (it learns due times cheaply
                    # and corrects them at claim time): not this pass.
                    await self.spool.release(claim)
                    continue
                d = defer.Deferred.fromCoroutine(self._process(claim))
                self._in_flight[qid] = d
                d.addBoth(self._done, qid)
        if failure is not None:  # the leases won above are being delivered; report the rest
            failure.raiseException()

    def _done(self, result: object, qid: str) -> None:
        self._in_flight.pop(qid, None)
        if isinstance(result, Failure):
            log.failure("delivery of {queue_id} failed unexpectedly; its lease is released "
                        "and the entry tried again", result, queue_id=qid)
        if not self._stopping:
            self.trigger()

    # -- one entry -----------------------------------------------------------------------------

    async def _deliver_groups(self, claim: Claim,
                              recipients: Sequence[Recipient]) -> list[Result]:
        """Every pending recipient gets a result. A routing policy or delivery that raises or
        answers nonsense (plugins) yields a transient failure for its recipients, so the entry
        is retried with backoff and bounced after maxRetries like any other failure: before,
        it escaped to a bare release, and the entry was claimed again on every pass, forever."""
        groups: dict[str, tuple[Any, list[Recipient]]] = {}
        results: list[Result] = []
        for rcpt in recipients:
            try:
                key, delivery = self.router.route(rcpt)
            except Exception as exc:
                log.failure("routing {recipient} of {queue_id} raised", recipient=rcpt.address,
                            queue_id=claim.entry.queue_id)
                results.append((rcpt, DeliveryStatus.transient(
                    Reason.OTHER, f"internal error routing the recipient: {exc}", "4.3.0")))
                continue
            groups.setdefault(key, (delivery, []))[1].append(rcpt)
        for key, (delivery, rcpts) in groups.items():
            try:
                # maybeDeferred: a plugin answering synchronously (a plain list) delivered
                # already; awaiting the list raised and it was delivered again on each retry.
                got = _checked(await defer.maybeDeferred(
                    delivery.deliver, claim.entry, claim.message_path, rcpts))
            except Exception as exc:  # a delivery must not raise; treat as transient if it does
                log.failure("delivery to {route} raised", route=key)
                got = [(r, DeliveryStatus.transient(Reason.OTHER, f"internal error: {exc}",
                                                    "4.3.0")) for r in rcpts]
            answered = {r.address for r, _ in got}
            got += [(r, DeliveryStatus.transient(Reason.OTHER, "no result from delivery",
                                                 "4.3.0"))
                    for r in rcpts if r.address not in answered]
            results.extend(got)
        return results

    async def _process(self, claim: Claim) -> None:
        entry = claim.entry
        archive_failed = False
        if self.archiver is not None and entry.envelope.archive_owner and \
                (entry.attempts == 0 or entry.archive_owed):
            try:  # idempotent (deterministic name): a crash before completion re-runs it safely
                await self.archiver(entry, claim.message_path)
            except Exception:
                # Kept in the entry and tried again with the retries (it was lost before);
                # after maxRetries it is given up with an error line.
                log.failure("sent-archive copy of {queue_id} failed; trying again later",
                            queue_id=entry.queue_id)
                archive_failed = True
        owed = {o.address: o for o in entry.owed_notices}
        try:
            results = await self._deliver_groups(
                claim, [r for r in entry.pending if r.address not in owed])
        except Exception:
            log.failure("delivery of {queue_id} failed", queue_id=entry.queue_id)
            await self.spool.release(claim)
            return
        try:
            await self._conclude(claim, results, owed, archive_failed)
        except Exception:
            # Never strand the lease (the entry was not tried again until a restart): the
            # entry is released and retried; recipients delivered in this run may get it again.
            await self.spool.release(claim)
            raise

    async def _conclude(self, claim: Claim, results: list[Result],
                        owed: dict[str, OwedNotice], archive_failed: bool = False) -> None:
        entry = claim.entry
        now = float(self.clock.seconds())
        attempt = entry.attempts + 1
        delivered: list[Result] = []
        failed: list[Result] = []
        retry: list[Result] = []
        for rcpt, status in results:
            if not status.ok and status.kind is not FailureKind.PERMANENT and \
                    attempt > self.max_retries:
                # The last attempt: the recipient bounces, so metrics (kind="permanent",
                # the runbook's failure-surge alert) and the log line say so.
                status = gave_up(status, attempt)
            self.events.delivery_result(entry, rcpt, status)
            log_delivery(entry, rcpt, status, attempt)
            if status.ok:
                delivered.append((rcpt, status))
            elif status.kind is FailureKind.PERMANENT:
                failed.append((rcpt, status))
            else:
                retry.append((rcpt, status))
        # Failed for good in an earlier run, their notice still owed (counted and logged then).
        failed += [(r, _owed_status(owed[r.address])) for r in entry.pending
                   if r.address in owed]
        try:
            if failed:
                await self.bouncer.notify(entry, claim.message_path, failed, "failed")
        except Exception:
            # The notice is not durable yet: keep the failed (and retrying) recipients, but
            # not the delivered ones (they would get the message once more on every run); the
            # failed ones are remembered as owed notices, so the next run queues their notice
            # without delivering to them again (the remote had refused them for good).
            log.failure("could not queue DSN for {queue_id}; retrying later",
                        queue_id=entry.queue_id)
            delay = retry_delay(self.retry_delay_seconds, max(attempt, 1), self.rng)
            done = {r.address for r, _ in delivered}
            await self.spool.reschedule(claim, entry.evolve(
                pending=tuple(r for r in entry.pending if r.address not in done),
                attempts=attempt, next_attempt=now + delay, archive_owed=archive_failed,
                owed_notices=tuple(_owed(r, st) for r, st in failed),
                delivered_before=entry.delivered_before or bool(delivered)))
            return
        age = max(0.0, now - entry.created)
        # Success and delay notices are courtesy: a failure to queue one is logged, not retried.
        # A delay notice waits until the message is delayWarningSeconds old: one at the first
        # deferral told the sender of every greylisting.
        fresh_delay = [r for r in retry if r[0].address not in entry.delayed_notified] \
            if age >= self.delay_warning_seconds else []
        groups = [(action, [r for r in delivered if r[1].success_action == action])
                  for action in ("delivered", "expanded", "relayed")]
        for action, group in (*groups, ("delayed", fresh_delay)):
            if group:
                try:
                    await self.bouncer.notify(entry, claim.message_path, group, action)
                except Exception:
                    log.failure("could not queue {action} notice for {queue_id}",
                                action=action, queue_id=entry.queue_id)
        if failed:
            self.events.recipients_dropped(entry, len(failed))
        if not retry and archive_failed and attempt <= self.max_retries:
            # Every recipient is done, only the sender's own copy failed: the entry stays for
            # it alone (no recipients pending), with the usual backoff.
            delay = retry_delay(self.retry_delay_seconds, attempt, self.rng)
            await self.spool.reschedule(claim, entry.evolve(
                pending=(), attempts=attempt, next_attempt=now + delay, archive_owed=True,
                owed_notices=(),
                delivered_before=entry.delivered_before or bool(delivered),
                bounced_before=entry.bounced_before or bool(failed)))
            self.events.retry_scheduled(entry, delay)
            return
        if not retry:
            if archive_failed:
                log.error("sent-archive copy of {queue_id} given up after {attempt} attempts",
                          queue_id=entry.queue_id, attempt=attempt, event="archive_given_up")
            await self.spool.complete(claim)
            # Over every run: a recipient bounced earlier makes a later full success "other".
            any_failed = bool(failed) or entry.bounced_before
            any_delivered = bool(delivered) or entry.delivered_before
            outcome = "completed" if not any_failed else (
                "dropped" if not any_delivered else "other")
            self.events.entry_finished(entry, outcome, age)
            log_finished(entry, outcome)
            return
        delay = retry_delay(self.retry_delay_seconds, attempt, self.rng)
        remaining = tuple(r for r, _ in retry)
        notified = tuple(sorted({*entry.delayed_notified,
                                 *(r.address for r, _ in fresh_delay)}))
        updated = entry.evolve(pending=remaining, attempts=attempt, next_attempt=now + delay,
                               owed_notices=(), archive_owed=archive_failed,
                               last_error=one_line(retry[0][1].text)[:500],
                               delayed_notified=notified,
                               delivered_before=entry.delivered_before or bool(delivered),
                               bounced_before=entry.bounced_before or bool(failed))
        await self.spool.reschedule(claim, updated)
        self.events.retry_scheduled(entry, delay)
        log.info("deferred {queue_id}: {n} recipient(s) retry in {delay:.0f}s (attempt {attempt})",
                 queue_id=entry.queue_id, n=len(remaining), delay=delay, attempt=attempt,
                 event="retry_scheduled")
