"""DiskIO: the batching executor behind every spool and Maildir write (real threads, real files)."""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import pytest
from helpers import on_reactor, start_reactor, wait_until
from twisted.internet import defer

from kotlin_smtp_py.diskio import DiskIO, sync_dir


def _write(path: Path, sync: str) -> str:
    path.write_bytes(b"x")
    sync_dir(sync)
    return threading.current_thread().name


def gather(*ds: defer.Deferred[Any]) -> defer.Deferred[list[tuple[bool, Any]]]:
    return defer.DeferredList(list(ds), consumeErrors=True)  # type: ignore[arg-type]


def test_jobs_queued_behind_a_busy_thread_run_as_one_batch(tmp_path: Path) -> None:
    start_reactor()
    io = DiskIO(threads=1)
    gate = threading.Event()
    entered = threading.Event()

    def blocker() -> str:
        entered.set()
        assert gate.wait(20)
        return "released"

    first_d: dict[str, Any] = {}

    def start() -> None:
        first_d["d"] = io.submit(blocker)

    on_reactor(start)
    assert entered.wait(20)

    def queue_more() -> defer.Deferred[list[tuple[bool, Any]]]:
        ds = [io.submit(_write, tmp_path / f"m{i}", str(tmp_path)) for i in range(8)]
        gate.set()
        return gather(first_d["d"], *ds)

    results = on_reactor(queue_more)
    assert all(ok for ok, _ in results)
    assert results[0][1] == "released"
    # The eight jobs (a full background batch) ran on the I/O thread, not the reactor
    # thread, all in the second batch.
    assert {name for _, name in results[1:]} == {"disk-io-0"}
    assert io.jobs_run == 9 and io.batches == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f"m{i}" for i in range(8))
    io.stop()


def test_a_failing_directory_sync_fails_only_the_jobs_that_asked_for_it(tmp_path: Path) -> None:
    start_reactor()
    io = DiskIO(threads=1)
    missing = str(tmp_path / "no-such-dir")

    def both() -> defer.Deferred[list[tuple[bool, Any]]]:
        return gather(io.submit(_write, tmp_path / "a", missing),
                      io.submit(_write, tmp_path / "b", str(tmp_path)))

    (ok_a, err_a), (ok_b, _) = on_reactor(both)
    # The file was written, but the job reports failure because its directory never became
    # durable; the other job in the same batch is unaffected.
    assert (tmp_path / "a").exists()
    assert not ok_a and err_a.check(FileNotFoundError)
    assert ok_b
    io.stop()


def test_exceptions_keep_their_type_and_results_arrive_on_the_reactor_thread(
        tmp_path: Path) -> None:
    start_reactor()
    io = DiskIO(threads=1)
    seen: dict[str, Any] = {}

    def boom() -> None:
        raise PermissionError("denied")

    def run() -> defer.Deferred[list[tuple[bool, Any]]]:
        d = io.submit(os.getpid)
        d.addCallback(lambda v: seen.update(thread=threading.current_thread().name) or v)
        return gather(d, io.submit(boom))

    (ok, pid), (ok2, err) = on_reactor(run)
    assert ok and pid == os.getpid()
    assert seen["thread"] == "reactor"
    assert not ok2 and err.check(PermissionError)
    io.stop()


def test_inline_mode_syncs_at_once_and_raises_in_the_job(tmp_path: Path) -> None:
    io = DiskIO(reactor=object(), threads=0)
    d = io.submit(_write, tmp_path / "a", str(tmp_path / "missing"))
    failures: list[Any] = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(FileNotFoundError)
    ok = io.submit(_write, tmp_path / "b", str(tmp_path))
    assert ok.result == threading.current_thread().name


def test_stop_finishes_queued_work_then_ends_the_threads(tmp_path: Path) -> None:
    start_reactor()
    io = DiskIO(threads=2)
    on_reactor(lambda: gather(*[io.submit(_write, tmp_path / f"s{i}", str(tmp_path))
                                for i in range(20)]))
    io.stop()
    wait_until(lambda: not any(t.is_alive() for t in threading.enumerate()
                               if t.name.startswith("disk-io") and t in io._workers),
               message="I/O threads ended")
    assert len(list(tmp_path.iterdir())) == 20


@pytest.mark.parametrize("threads", [1, 3])
def test_many_concurrent_jobs_all_complete(tmp_path: Path, threads: int) -> None:
    start_reactor()
    io = DiskIO(threads=threads)
    results = on_reactor(lambda: gather(*[io.submit(_write, tmp_path / f"c{i}", str(tmp_path))
                                          for i in range(300)]))
    assert len(results) == 300 and all(ok for ok, _ in results)
    assert io.jobs_run == 300 and io.batches <= 300
    assert len(list(tmp_path.iterdir())) == 300
    io.stop()


def test_urgent_jobs_overtake_queued_background_work(tmp_path: Path) -> None:
    """A spool commit (a client waiting for its 250) must not queue behind Maildir writes."""
    start_reactor()
    io = DiskIO(threads=1)
    gate, entered = threading.Event(), threading.Event()
    order: list[str] = []

    def blocker() -> None:
        entered.set()
        assert gate.wait(20)

    def note(name: str) -> None:
        order.append(name)

    first: dict[str, Any] = {}
    on_reactor(lambda: first.update(d=io.submit(blocker)))
    assert entered.wait(20)

    def queue_all() -> defer.Deferred[list[tuple[bool, Any]]]:
        ds = [io.submit(note, f"bg{i}") for i in range(20)]
        ds.append(io.submit_urgent(note, "commit"))
        gate.set()
        return gather(first["d"], *ds)

    assert all(ok for ok, _ in on_reactor(queue_all))
    assert order[0] == "commit"
    assert order[1:] == [f"bg{i}" for i in range(20)]  # background keeps its own order
    assert io.batches == 5  # blocker, the commit, then background in batches of 8, 8, 4
    io.stop()
