"""Blocking disk work (write, fsync, rename, unlink) off the reactor thread, in batches.

Why not the reactor's thread pool: with ten pool threads every spool commit, claim, Maildir
write and completion is a separate hand-off (queue lock, condition wake-up, GIL hand-over,
``callFromThread``), and on a 2-core VM we measured ~250 futex calls and half the server's CPU
in the kernel per message (``strace -c``, ``perf``). Here a few long-lived threads take *every*
queued job at once, run them back to back, fsync each directory the batch touched once (group
commit), and hand all results to the reactor with a single ``callFromThread``. Under load a
submit is a list append; idle threads are woken only when there is no busy thread to pick the
job up.

Blocking code registers directory fsyncs with :func:`sync_dir`. Inside a batch the fsync is
deferred to the end of the batch (and shared by every job that named the same directory), and
the job's Deferred fires only after it; called anywhere else, it fsyncs at once.
"""

from __future__ import annotations

import os
import threading
from collections import deque
from collections.abc import Callable
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger
from twisted.python import threadable
from twisted.python.failure import Failure

from kotlin_smtp_py.eventloop import before_poll, drop_before_poll

log = Logger()

MAX_BATCH = 64  # bounds the wait of a batch's first job behind its last one's fsync
# Background batches stay short so that a commit a client is waiting on (its 250) never sits
# behind more than a few Maildir writes, each with its own fsync.
MAX_BACKGROUND_BATCH = 8
_local = threading.local()


def fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_all(fd: int, data: bytes | bytearray | memoryview) -> None:
    """``os.write`` until every byte is written (a write may take only part)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def sync_dir(path: str) -> None:
    """Make renames/links into ``path`` durable before the current job reports success."""
    pending: set[str] | None = getattr(_local, "dirs", None)
    if pending is None:
        fsync_path(path)
    else:
        pending.add(path)


_Job = tuple[Callable[..., Any], tuple[Any, ...], "defer.Deferred[Any]"]
_Outcome = tuple[bool, Any]


class DiskIO:
    """A small batching executor for blocking file-system work.

    ``threads`` = 0 runs every job synchronously in the caller (tools and tests without a
    running reactor). Threads start on first use and are daemons, so an idle executor never
    holds a process open; :meth:`stop` lets them finish what is queued and exit.
    """

    def __init__(self, reactor: Any = None, threads: int = 1) -> None:
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self._reactor = reactor
        self.threads = max(0, threads)
        self._jobs: deque[_Job] = deque()
        self._urgent: deque[_Job] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._workers: list[threading.Thread] = []
        self._waiting = 0
        self._stopping = False
        self.batches = 0  # observability for benchmarks/tests: batches run so far
        self.jobs_run = 0
        # An idle I/O thread is woken once per reactor turn, just before the reactor polls
        # again, so the jobs one turn submits go out as one batch (fewer wake-ups, directory
        # fsyncs and GIL hand-offs: W1 +2.7 % msg/s, -3.3 % CPU per message). Reactors
        # without the hook (eventloop.lighten_dispatch), and other threads, wake it at once.
        self._deferred_kick = self.threads > 0 and before_poll(reactor, self._kick)
        self._kick_needed = False

    def submit(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Run ``fn(*args)`` on an I/O thread; the Deferred fires on the reactor thread."""
        return self._submit(self._jobs, fn, args)

    def submit_urgent(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        """Like :meth:`submit`, for work a client is waiting on (a spool commit before the
        250): it runs before any queued background job."""
        return self._submit(self._urgent, fn, args)

    def _submit(self, queue: deque[_Job], fn: Callable[..., Any],
                args: tuple[Any, ...]) -> defer.Deferred[Any]:
        if self.threads == 0 or self._stopping:
            return self._run_inline(fn, args)
        d: defer.Deferred[Any] = defer.Deferred()
        with self._cond:
            queue.append((fn, args, d))
            if self._waiting:
                if self._deferred_kick and threadable.isInIOThread():  # type: ignore[no-untyped-call]
                    self._kick_needed = True
                else:
                    self._cond.notify()
            elif len(self._workers) < self.threads:
                self._start_worker()
        return d

    def _kick(self) -> None:
        """Before-poll hook: wake an idle I/O thread for what this turn submitted."""
        if self._kick_needed:
            self._kick_needed = False
            with self._cond:
                if self._waiting:
                    self._cond.notify()

    __call__ = submit  # usable wherever a ``run_in_thread(fn, *args)`` callable is expected

    @staticmethod
    def _run_inline(fn: Callable[..., Any], args: tuple[Any, ...]) -> defer.Deferred[Any]:
        try:
            return defer.succeed(fn(*args))
        except BaseException:
            return defer.fail(Failure())  # type: ignore[no-untyped-call]

    def _start_worker(self) -> None:
        t = threading.Thread(target=self._work, name=f"disk-io-{len(self._workers)}",
                             daemon=True)
        self._workers.append(t)
        t.start()

    def _take(self) -> list[_Job] | None:
        with self._cond:
            while not self._jobs and not self._urgent:
                if self._stopping:
                    return None
                self._waiting += 1
                try:
                    self._cond.wait()
                finally:
                    self._waiting -= 1
            queue, limit = (self._urgent, MAX_BATCH) if self._urgent else \
                (self._jobs, MAX_BACKGROUND_BATCH)
            return [queue.popleft() for _ in range(min(len(queue), limit))]

    def _work(self) -> None:
        while True:
            batch = self._take()
            if batch is None:
                return
            try:
                outcomes = self._run_batch(batch)
            except BaseException:  # a bug here must not kill the thread and strand the queue
                f = Failure()  # type: ignore[no-untyped-call]
                outcomes = [(False, f)] * len(batch)
            self._reactor.callFromThread(self._deliver, batch, outcomes)

    @staticmethod
    def _run_batch(batch: list[_Job]) -> list[_Outcome]:
        outcomes: list[_Outcome] = []
        dirs: dict[str, list[int]] = {}
        for i, (fn, args, _) in enumerate(batch):
            _local.dirs = set()
            try:
                outcomes.append((True, fn(*args)))
            except BaseException:
                outcomes.append((False, Failure()))  # type: ignore[no-untyped-call]
            finally:
                touched, _local.dirs = _local.dirs, None
            for path in touched:
                dirs.setdefault(path, []).append(i)
        for path, users in dirs.items():
            try:
                fsync_path(path)
            except BaseException:
                f = Failure()  # type: ignore[no-untyped-call]
                for i in users:
                    if outcomes[i][0]:
                        outcomes[i] = (False, f)
        return outcomes

    def _deliver(self, batch: list[_Job], outcomes: list[_Outcome]) -> None:
        self.batches += 1
        self.jobs_run += len(batch)
        for (_, _, d), (ok, value) in zip(batch, outcomes, strict=True):
            if ok:
                d.callback(value)
            else:
                d.errback(value)

    def stop(self, timeout: float = 10.0) -> None:
        """Finish queued jobs, then end the threads (waits up to ``timeout`` in total)."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._deferred_kick:  # jobs submitted from now on run inline: nothing to wake
            drop_before_poll(self._reactor, self._kick)
        for t in self._workers:
            t.join(timeout)
