"""End-to-end SMTP benchmark: our twistd server (fresh spool, local Maildir recipient) and,
with ``--compare-postfix``, a private Postfix (fsync'd queue, ``discard:``) under the same load.

    python -m benchmarks.e2e --clients 8 --messages 4000 --body-bytes 4096 [--persistent]
                             [--compare-postfix] [--workers N] [--loader auto|smtp-source|smtpload]

Load: Postfix's ``smtp-source`` when installed (C, light), else /work/shared/tools/smtpload.py.
smtp-source reports no latency, so a probe client (one extra connection, same message size and
mode) measures p50/p95/p99 during the run; smtpload reports its own percentiles. Every message
must land (Maildir files for us, ``status=sent`` in the maillog for Postfix), or the run fails.
Server CPU is utime+stime of the whole process tree (/proc), RSS the peak of the tree's summed
VmRSS plus the largest per-process VmHWM. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from typing import Any

from benchmarks.harness import (
    SETTLE_SECONDS,
    SMTP_SOURCE,
    LatencyProbe,
    LoadResult,
    OurServer,
    PostfixServer,
    TreeStats,
    bench_root,
    loadavg,
    postfix_missing,
    remove_bench_root,
    run_smtp_source,
    run_smtpload,
    wait_until,
)


def measure(server: Any, args: argparse.Namespace) -> dict[str, Any]:
    """One round of load against a running server, until every message has landed."""
    before = server.delivered()
    stats = TreeStats(server.pid)
    stats.begin()
    load_before = loadavg()
    probe: LatencyProbe | None = None
    if args.loader == "smtp-source":
        probe = LatencyProbe(server.port, server.recipient, args.body_bytes, args.persistent)
        probe.start()
        load = run_smtp_source(server.port, server.recipient, args.clients, args.messages,
                               args.body_bytes, args.persistent, args.max_seconds)
        probe.stop()
    else:
        load = run_smtpload(server.port, server.recipient, args.clients, args.messages,
                            args.body_bytes, args.persistent, args.max_seconds)
    accepted_at = time.monotonic()
    expected = load.messages - load.errors + (probe.sent if probe else 0)
    drained = True
    try:
        wait_until(lambda: server.delivered() - before >= expected and server.queued() == 0,
                   args.drain_seconds, interval=0.1, what="delivery of every message")
    except TimeoutError:
        drained = False
    drain_s = time.monotonic() - accepted_at
    usage = stats.end()
    load_after = loadavg()
    landed = server.delivered() - before
    if probe is not None:
        load.latencies_ms = probe.latencies_ms
    return {"server": server.name, "load": load, "probe": probe, "expected": expected,
            "landed": landed, "drained": drained, "drain_s": drain_s, "usage": usage,
            "loadavg": f"{load_before} -> {load_after}"}


def _lat(load: LoadResult, q: int) -> float | None:
    if "percentiles_ms" in load.extra:
        v = load.extra["percentiles_ms"].get(q)
        return float(v) if v is not None else None
    return load.pct(q)


def report(r: dict[str, Any]) -> None:
    load: LoadResult = r["load"]
    u = r["usage"]
    lat = " ".join(f"p{q}={_fmt(_lat(load, q))}ms" for q in (50, 95, 99))
    probe = r["probe"]
    src = f" (probe client, n={len(probe.latencies_ms)})" if probe is not None else ""
    print(f"[{r['server']}] {load.messages - load.errors} msgs ({load.tool}, errors "
          f"{load.errors}) in {load.seconds:.2f}s: {load.msgs_per_s:,.0f} msg/s, "
          f"{load.mb_per_s:.1f} MB/s")
    print(f"    latency {lat}{src}")
    print(f"    server CPU {u['cpu_s']:.2f}s ({u['cpu_s'] / max(load.seconds, 1e-9) * 100:.0f}% "
          f"of one core over the load, incl. delivery), {u['processes']} processes, "
          f"peak RSS {u['peak_rss_sum_mib']:.1f} MiB (sum), max VmHWM "
          f"{u['max_vmhwm_mib']:.1f} MiB")
    print(f"    landed {r['landed']}/{r['expected']} "
          f"({'all delivered' if r['drained'] else 'NOT ALL DELIVERED'}; delivered "
          f"{r['drain_s']:.2f}s after the last 250), loadavg {r['loadavg']}")


def _fmt(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.1f}"


def run_rounds(servers: list[Any], args: argparse.Namespace, label: str) -> bool:
    """Start ``servers`` once, run ``args.rounds`` rounds of the load against each in turn,
    print every result and, for two servers, the ratio of the first to the second (``label``
    names the first) and its median; stop them. True when every message landed."""
    ok = True
    ratios: list[float] = []
    started: list[Any] = []
    try:
        for server in servers:
            server.start()
            started.append(server)
        for n in range(max(1, args.rounds)):
            if args.rounds > 1:
                print(f"-- round {n + 1} of {args.rounds}", flush=True)
            results = []
            for server in servers:
                r = measure(server, args)
                report(r)
                results.append(r)
                ok = ok and r["drained"] and r["landed"] >= r["expected"]
            if len(results) == 2:
                first, pf = results
                a, b = first["load"], pf["load"]
                ratio = a.msgs_per_s / max(b.msgs_per_s, 1e-9)
                ratios.append(ratio)
                print(f"ratio {label}/postfix: msg/s {ratio:.2f}x, MB/s "
                      f"{a.mb_per_s / max(b.mb_per_s, 1e-9):.2f}x, p99 "
                      f"{_fmt(_lat(a, 99))} vs {_fmt(_lat(b, 99))} ms, CPU/msg "
                      f"{first['usage']['cpu_s'] / max(a.messages, 1) * 1e3:.2f} vs "
                      f"{pf['usage']['cpu_s'] / max(b.messages, 1) * 1e3:.2f} ms",
                      flush=True)
    finally:
        for server in started:
            print(f"[{server.name}] exit {server.stop()}")
    if len(ratios) > 1:
        print(f"median ratio {label}/postfix over {len(ratios)} rounds: "
              f"{statistics.median(ratios):.2f}x (range {min(ratios):.2f}-"
              f"{max(ratios):.2f}x)")
    return ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.e2e", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--body-bytes", type=int, default=4096)
    ap.add_argument("--persistent", action="store_true")
    ap.add_argument("--compare-postfix", action="store_true")
    ap.add_argument("--postfix-maildir", action="store_true",
                    help="Postfix delivers into a Maildir (virtual(8)) like we do, instead of "
                         "discard: (the issue's reference)")
    ap.add_argument("--workers", type=int, default=None,
                    help="smtp.workers for our server (default: the config default = cores)")
    ap.add_argument("--loader", choices=("auto", "smtp-source", "smtpload"), default="auto")
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--drain-seconds", type=float, default=300.0)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for our server, e.g. smtp.spool.ioThreads=4 "
                         "(repeatable)")
    ap.add_argument("--rounds", type=int, default=1,
                    help="load rounds against the same running servers, ours and Postfix "
                         "alternating; prints every round and the median ratio (this VM's "
                         "speed drifts by tens of percent within minutes)")
    ap.add_argument("--keep", action="store_true", help="keep the temp directory")
    ap.add_argument("--settle", type=float, default=SETTLE_SECONDS,
                    help="seconds since the last run's files were removed to wait for before "
                         "starting (ext4 without a journal; see benchmarks/harness.py)")
    args = ap.parse_args(argv)
    if args.loader == "auto":
        args.loader = "smtp-source" if os.path.exists(SMTP_SOURCE) else "smtpload"
    root = bench_root("kotlin-smtp-bench-", args.settle)
    print(f"workload: {args.clients} clients, {args.messages} messages of {args.body_bytes} "
          f"bytes, {'persistent connections' if args.persistent else 'connection per message'}"
          f", loader {args.loader}, cores {os.cpu_count()}, loadavg {loadavg()}")
    servers: list[Any] = [OurServer(root / "ours", workers=args.workers, settings=args.set)]
    if args.compare_postfix:
        why = postfix_missing()
        if why is not None:
            print(f"[postfix] skipped: {why}")
        else:
            servers.append(PostfixServer(root / "postfix", maildir=args.postfix_maildir))
    try:
        ok = run_rounds(servers, args, "ours")
    finally:
        if args.keep:
            print(f"kept {root}")
        else:
            remove_bench_root(root)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
