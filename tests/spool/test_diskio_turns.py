"""With the lighter epoll dispatch, DiskIO wakes its I/O thread once per reactor turn: the
jobs one turn submits run as one batch, even when the submitting code hands the GIL over
between them; a job submitted from another thread still runs while the reactor sleeps.
Fresh interpreters: the dispatch patch is process-wide."""

from __future__ import annotations

import json
import subprocess
import sys

PRELUDE = r"""
import json, threading, time
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor
from kotlin_smtp_py.eventloop import lighten_dispatch
from kotlin_smtp_py.diskio import DiskIO
assert lighten_dispatch(reactor)
io = DiskIO(reactor, threads=1)
"""

ONE_TURN = PRELUDE + r"""
sizes = []

def one_turn(rounds_left):
    if rounds_left == 0:
        reactor.stop()
        return
    # The property is about waking an *idle* I/O thread: let it get back to waiting after the
    # previous round (under load it may still be on its way, and would then simply take what
    # it finds queued, one job or five).
    deadline = time.monotonic() + 10
    while not io._waiting and time.monotonic() < deadline:
        time.sleep(0.001)
    before = io.jobs_run, io.batches
    ds = []
    for _ in range(5):
        ds.append(io.submit(time.sleep, 0))
        time.sleep(0.001)  # gives the GIL away, as a system call in real code would
    from twisted.internet import defer
    def done(_):
        sizes.append((io.jobs_run - before[0], io.batches - before[1]))
        reactor.callLater(0, one_turn, rounds_left - 1)
    defer.gatherResults(ds).addCallback(done)

io.submit(time.sleep, 0).addCallback(lambda _: reactor.callLater(0.05, one_turn, 10))
reactor.callLater(60, reactor.stop)  # a bound
reactor.run()
print(json.dumps(sizes))
"""

OTHER_THREAD = PRELUDE + r"""
result = {}

def from_thread():
    time.sleep(0.2)  # the reactor is asleep in epoll_wait by now, nothing else to do
    def job():
        result["ran"] = True
    # DiskIO.submit from a non-reactor thread (like a deferToThread job would)
    io.submit(job).addCallback(lambda _: reactor.stop())

def bound():
    result["bound"] = True  # the job had not run: nothing woke the I/O thread
    reactor.stop()

io.submit(time.sleep, 0).addCallback(
    lambda _: threading.Thread(target=from_thread, daemon=True).start())
reactor.callLater(10, bound)
reactor.run()
print(json.dumps(result))
"""


def _run(script: str) -> object:
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.splitlines()[-1])


def test_jobs_of_one_reactor_turn_run_as_one_batch() -> None:
    sizes = _run(ONE_TURN)
    assert len(sizes) == 10
    assert all(batch == [5, 1] for batch in sizes), sizes  # five jobs, one batch, each time


def test_a_job_from_another_thread_runs_while_the_reactor_sleeps() -> None:
    assert _run(OTHER_THREAD) == {"ran": True}


STOPPED = PRELUDE + r"""
hooks = getattr(reactor, "_ksmtp_before_poll")
registered = io._kick in hooks
io.stop()
ran = []
io.submit(ran.append, 1)  # after stop: inline
print(json.dumps({"registered": registered, "after_stop": io._kick in hooks, "ran": ran}))
"""


def test_a_stopped_diskio_leaves_no_hook_behind() -> None:
    assert _run(STOPPED) == {"registered": True, "after_stop": False, "ran": [1]}
