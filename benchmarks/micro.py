"""Microbenchmarks: DATA framing (DataDecoder) and file-spool commits.

    python -m benchmarks.micro [--seconds 2]

- DataDecoder: MB/s of wire bytes decoded, 4 KB and 1 MB bodies, fed in 64 KiB reads (what a
  busy TCP socket delivers) and in 4 KiB reads; with every 10th line dot-stuffed, and with none
  (most mail: no unstuffing pass at all).
- FileSpool commit: entries/s of ``open_writer`` + ``write(4 KiB)`` + ``commit`` (two fsyncs per
  entry plus a shared directory fsync), with 1 writer and with 8 concurrent writers on the real
  reactor thread pool (the group commit in ``spool/file.py`` shares directory fsyncs).
- fsync batches: files/s of k unnamed 4 KiB files in a Maildir ``new/`` (write, fsync, link,
  one directory fsync per batch), fsync'd one after another as they are written, and with
  every file's writeback started (``sync_file_range``) before the first fsync. What this disk
  charges per fsync, and what issuing a batch's writes together would save.

Figures only; nothing is asserted. Spool files go to a temporary directory on the same file
system as /tmp.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import sys
import tempfile
import time
from typing import Any

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.inbound.framing import DataDecoder


def make_wire(body_bytes: int, line_len: int = 78, dots: bool = True) -> bytes:
    """A DATA stream of lines of ``line_len`` bytes; with ``dots`` every 10th starts with a
    dot (stuffed), without none does (most mail)."""
    lines = []
    size = 0
    n = 0
    while size < body_bytes:
        text = (b"." if dots and n % 10 == 0 else b"") + b"x" * (line_len - 2)
        if text.startswith(b"."):
            text = b"." + text  # stuffed
        lines.append(text + b"\r\n")
        size += len(lines[-1])
        n += 1
    return b"".join(lines) + b".\r\n"


def bench_decoder(body_bytes: int, read_size: int, seconds: float,
                  dots: bool = True) -> tuple[float, int]:
    wire = make_wire(body_bytes, dots=dots)
    chunks = [wire[i:i + read_size] for i in range(0, len(wire), read_size)]
    out: list[int] = []
    done = 0
    started = time.perf_counter()
    deadline = started + seconds
    rounds = 0
    while time.perf_counter() < deadline and rounds < 10_000_000:
        dec = DataDecoder(lambda b: out.append(len(b)), max_size=64 * 1024 * 1024)
        for c in chunks:
            rest = dec.feed(c)
            if rest is not None:
                break
        assert dec.done and dec.error == "ok", dec.error
        done += len(wire)
        rounds += 1
        out.clear()
    elapsed = time.perf_counter() - started
    return done / elapsed / 1e6, rounds


def bench_spool(writers: int, seconds: float, root: str) -> tuple[float, int]:
    """Commits/s with ``writers`` concurrent writers (each starts the next when one commits)."""
    from twisted.internet import defer, reactor

    from kotlin_smtp_py.spool.file import FileSpool

    spool_dir = tempfile.mkdtemp(prefix="spool-", dir=root)
    spool = FileSpool(spool_dir, clock=reactor)
    body = b"x" * 4094 + b"\r\n"
    env = Envelope(sender="a@bench.test", recipients=(Recipient("b@bench.test"),))
    result: dict[str, Any] = {"n": 0}
    r: Any = reactor

    @defer.inlineCallbacks
    def writer(deadline: float) -> Any:
        while time.perf_counter() < deadline and result["n"] < 1_000_000:
            w = spool.open_writer()
            w.write(body)
            yield w.commit(env)
            result["n"] += 1

    @defer.inlineCallbacks
    def run() -> Any:
        started = time.perf_counter()
        deadline = started + seconds
        yield defer.DeferredList([writer(deadline) for _ in range(writers)])
        result["elapsed"] = time.perf_counter() - started

    d = run()
    done = {"stop": False}

    def finish(_: object) -> None:
        done["stop"] = True

    d.addBoth(finish)
    while not done["stop"]:
        r.iterate(0.01)
    spool.disk_io.stop()
    shutil.rmtree(spool_dir, ignore_errors=True)
    return result["n"] / result["elapsed"], result["n"]


def bench_fsync_batch(k: int, started_together: bool, seconds: float,
                      root: str) -> float:
    new = os.path.join(root, f"fsync-{k}-{int(started_together)}", "new")
    os.makedirs(new)
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    data = os.urandom(4096)
    n = 0
    started = time.perf_counter()
    while time.perf_counter() - started < seconds:
        fds = []
        for _ in range(k):
            fd = os.open(new, os.O_TMPFILE | os.O_RDWR, 0o600)
            os.write(fd, data)
            fds.append(fd)
        if started_together:
            for fd in fds:
                libc.sync_file_range(fd, ctypes.c_longlong(0), ctypes.c_longlong(0), 2)
        for fd in fds:
            os.fsync(fd)
            n += 1
            os.link(f"/proc/self/fd/{fd}", os.path.join(new, str(n)), src_dir_fd=fd,
                    follow_symlinks=True)
            os.close(fd)
        dfd = os.open(new, os.O_RDONLY)
        os.fsync(dfd)
        os.close(dfd)
    return n / (time.perf_counter() - started)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.micro", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=2.0)
    args = ap.parse_args(argv)
    with open("/proc/loadavg") as fh:
        load = " ".join(fh.read().split()[:3])
    print(f"cores {os.cpu_count()}, loadavg {load}")
    for dots in (True, False):
        for body in (4096, 1024 * 1024):
            for read in (65536, 4096):
                mbs, rounds = bench_decoder(body, read, args.seconds, dots)
                print(f"DataDecoder body {body:>8} B, reads of {read:>5} B, "
                      f"{'every 10th line stuffed' if dots else 'no line stuffed':>23}: "
                      f"{mbs:8.1f} MB/s ({rounds} messages)")
    root = tempfile.mkdtemp(prefix="kotlin-smtp-micro-")
    try:
        from twisted.internet import reactor

        r: Any = reactor
        r.startRunning()
        for writers in (1, 8):
            rate, n = bench_spool(writers, args.seconds, root)
            print(f"FileSpool commit, {writers} writer(s): {rate:8.0f} commits/s "
                  f"({n} commits of 4 KiB)")
        for k in (1, 4, 8):
            for together in (False, True):
                rate = bench_fsync_batch(k, together, args.seconds, root)
                print(f"fsync batch of {k}, "
                      f"{'writeback started together' if together else 'one after another':>27}"
                      f": {rate:8.0f} files/s")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
