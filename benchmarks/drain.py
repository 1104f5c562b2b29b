"""Spool drain: N queued messages relayed to a local ``smtp-sink``, ours vs Postfix.

    python -m benchmarks.drain [--messages 10000] [--body-bytes 4096] [--workers N]

Ours: the file spool is filled offline (the same commit path as a 250: fsync'd message and
envelope), then twistd starts with a relay default route to the sink and we time until the
queue is empty. Postfix: messages are injected over SMTP with ``defer_transports = smtp`` (held
in the deferred queue), then the hold is lifted, ``postqueue -f`` runs and we time until the
queue is empty. Prints msgs/s and the load average; asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.harness import (
    SETTLE_SECONDS,
    SMTP_SINK,
    OurServer,
    PostfixServer,
    TreeStats,
    bench_root,
    free_port,
    loadavg,
    postfix_missing,
    remove_bench_root,
    run_smtp_source,
    wait_until,
)


def start_sink(root: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    out = open(root / "sink.out", "wb")
    proc = subprocess.Popen([SMTP_SINK, "-u", "root", f"127.0.0.1:{port}", "512"], stdout=out,
                            stderr=subprocess.STDOUT)
    time.sleep(0.5)
    return proc, port


def fill_our_spool(spool_dir: Path, n: int, body_bytes: int) -> None:
    from kotlin_smtp_py.envelope import Envelope, Recipient
    from kotlin_smtp_py.spool.file import FileSpool
    from kotlin_smtp_py.spool.record import QueueEntry

    spool = FileSpool(str(spool_dir))
    body = b"Subject: drain\r\n\r\n" + (b"x" * 510 + b"\r\n") * (body_bytes // 512)
    env = Envelope(sender="drain@bench.test", recipients=(Recipient("sink@remote.test"),))
    now = time.time()
    for _ in range(n):
        w = spool.open_writer()
        w.write(body)
        entry = QueueEntry(queue_id=w.queue_id, envelope=env, pending=env.recipients,
                           next_attempt=now, created=now)
        spool.commit_sync(w._fh, w._path, entry, bytes(w._head))  # commit()'s I/O-thread half
        w._done = True


def _drained(server: Any, limit: float) -> bool:
    """Whether ``server``'s queue empties within ``limit`` seconds. Both servers are polled
    the same way: counting a queue of thousands of files costs the machine CPU the server
    under test then lacks (ours was polled every 50 ms, Postfix's every 200 ms: the poller
    took ~8 % of the CPU during our drain), so every 200 ms until 5 % is left, then every
    20 ms for the time of the end."""
    deadline = time.monotonic() + limit
    first = None
    while time.monotonic() < deadline:
        left = server.queued()
        if left == 0:
            return True
        first = first or left
        time.sleep(0.2 if left > first / 20 else 0.02)
    return False


def drain_ours(root: Path, n: int, body_bytes: int, workers: int | None, limit: float,
               concurrency: int = 8, per_destination: int | None = None) -> None:
    sink, port = start_sink(root)
    try:
        server = OurServer(root / "ours", workers=workers, relay_to=port,
                           concurrency=concurrency, per_destination=per_destination)
        fill_our_spool(root / "ours" / "spool", n, body_bytes)
        print(f"[kotlin-smtp-py] {server.queued()} entries queued; loadavg {loadavg()}")
        started = time.monotonic()
        server.start()
        # Postfix is timed from ``postqueue -f`` on a running server; ours also has to start
        # (imports, the initial spool scan in every process). Report both views.
        up, at_up = time.monotonic(), server.queued()
        stats = TreeStats(server.pid)
        stats.begin()
        ok = _drained(server, limit)
        took = time.monotonic() - started
        after_up = time.monotonic() - up
        usage = stats.end()
        left = server.queued()
        server.stop()
        print(f"[kotlin-smtp-py] drained {n - left}/{n} in {took:.1f}s (incl. start-up): "
              f"{(n - left) / took:,.0f} msg/s; after start-up {at_up - left} in "
              f"{after_up:.1f}s: {(at_up - left) / max(after_up, 1e-9):,.0f} msg/s; "
              f"CPU {usage['cpu_s']:.1f}s, {'complete' if ok else 'INCOMPLETE'}; "
              f"loadavg {loadavg()}")
    finally:
        sink.terminate()
        sink.wait(10)


def drain_postfix(root: Path, n: int, body_bytes: int, limit: float) -> None:
    sink, port = start_sink(root)
    pf = PostfixServer(root / "postfix", relay_to=port)
    with open(pf.etc / "main.cf", "a") as fh:
        fh.write("defer_transports = smtp\n")
    try:
        pf.start()
        run_smtp_source(pf.port, "sink@remote.test", 8, n, body_bytes, True, 1200)
        wait_until(lambda: pf.queued() >= n, 300, interval=0.5, what="postfix to queue all")
        print(f"[postfix] {pf.queued()} entries queued; loadavg {loadavg()}")
        main_cf = (pf.etc / "main.cf").read_text().replace("defer_transports = smtp\n", "")
        (pf.etc / "main.cf").write_text(main_cf)
        subprocess.run(["/usr/sbin/postfix", "-c", str(pf.etc), "reload"], capture_output=True,
                       timeout=60)
        started = time.monotonic()
        stats = TreeStats(pf.pid)
        stats.begin()
        subprocess.run(["/usr/sbin/postqueue", "-c", str(pf.etc), "-f"], capture_output=True,
                       timeout=60)
        ok = _drained(pf, limit)
        took = time.monotonic() - started
        usage = stats.end()
        left = pf.queued()
        print(f"[postfix] drained {n - left}/{n} in {took:.1f}s: {(n - left) / took:,.0f} msg/s,"
              f" CPU {usage['cpu_s']:.1f}s, {'complete' if ok else 'INCOMPLETE'}; "
              f"loadavg {loadavg()}")
    finally:
        pf.stop()
        sink.terminate()
        sink.wait(10)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.drain", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--messages", type=int, default=10000)
    ap.add_argument("--body-bytes", type=int, default=4096)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--limit-seconds", type=float, default=900.0)
    ap.add_argument("--skip-postfix", action="store_true")
    # Postfix delivers to one destination over up to default_destination_concurrency_limit =
    # 20 connections; ours, per process, gets 20 / cores so that both sides use 20 in total.
    fair = max(1, 20 // (os.cpu_count() or 1))
    ap.add_argument("--concurrency", type=int, default=2 * fair,
                    help="smtp.spool.workerConcurrency for our server (per process)")
    ap.add_argument("--per-destination", type=int, default=fair,
                    help="smtp.relay.maxConnectionsPerDestination (per process; default: 20 "
                         "in total over all processes, like Postfix)")
    ap.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                    help="seconds since the last run's files were removed to wait for before "
                         "starting (ext4 without a journal; see benchmarks/harness.py)")
    args = ap.parse_args(argv)
    root = bench_root("kotlin-smtp-drain-", args.settle)
    try:
        drain_ours(root, args.messages, args.body_bytes, args.workers, args.limit_seconds,
                   args.concurrency, args.per_destination)
        why = postfix_missing()
        if not args.skip_postfix and why is None:
            drain_postfix(root, args.messages, args.body_bytes, args.limit_seconds)
        elif why:
            print(f"[postfix] skipped: {why}")
    finally:
        remove_bench_root(root)
    return 0


if __name__ == "__main__":
    sys.exit(main())
