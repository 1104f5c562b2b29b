"""The floor: how fast can *any* Python + Twisted SMTP server be on this machine?

A bare SMTP responder with none of the product in it — fixed replies, no address parsing,
no policy, no logging, no metrics, no spool — in ``--processes`` processes sharing the port
(SO_REUSEPORT, as ``smtp.workers``), driven by the same load as ``benchmarks.e2e``:

    python -m benchmarks.floor --clients 8 --messages 4000 --body-bytes 4096 [--persistent]
                               [--store none|fsync] [--compare-postfix] [--rounds N]

``--store none`` answers 250 without keeping anything: the cost of Twisted's reactor, the TCP
connection and the smallest possible per-command Python. ``--store fsync`` writes each message
to its own file and fsyncs it before the 250 (inline on the reactor thread; no directory
fsync), the least that issue #7's "every 250 fsync'd" allows. ``--store syncfs`` writes the
files unsynced and answers a reactor turn's messages after one ``syncfs(2)`` (group commit
through the file system; measured slower here: it flushes every dirty inode of the file system).
``--store journal`` appends a turn's messages to one file per process and answers them after one
``fdatasync(2)``: a spool that is a log instead of a file per message. Whatever the product
does costs on top of these figures, so a target above them is out of reach for that design on
this hardware. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from benchmarks.e2e import run_rounds
from benchmarks.harness import (
    REPO,
    SETTLE_SECONDS,
    SMTP_SOURCE,
    PostfixServer,
    banner_ok,
    bench_root,
    free_port,
    loadavg,
    postfix_missing,
    remove_bench_root,
    wait_until,
)

EHLO_REPLY = b"250-floor.test\r\n250-PIPELINING\r\n250-8BITMIME\r\n250 SIZE 67108864\r\n"
REPLIES = {b"HELO": b"250 floor.test\r\n", b"MAIL": b"250 2.1.0 Ok\r\n",
           b"RCPT": b"250 2.1.5 Ok\r\n", b"DATA": b"354 End data with <CR><LF>.<CR><LF>\r\n",
           b"RSET": b"250 2.0.0 Ok\r\n", b"NOOP": b"250 2.0.0 Ok\r\n",
           b"QUIT": b"221 2.0.0 Bye\r\n", b"EHLO": EHLO_REPLY}


def serve(port: int, store: str, directory: Path) -> None:
    """One process: a minimal SMTP protocol on a SO_REUSEPORT socket."""
    from twisted.internet import epollreactor

    epollreactor.install()  # type: ignore[no-untyped-call]
    from twisted.internet import protocol, reactor, task

    count = [0]
    counter = directory / f"count-{os.getpid()}"

    pending: list[Any] = []  # (transport, reply) waiting for the turn's syncfs (store=syncfs)
    libc: Any = None
    if store == "syncfs":
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
    dir_fd = os.open(directory, os.O_RDONLY)

    journal = os.open(directory / f"journal-{os.getpid()}", os.O_WRONLY | os.O_CREAT
                      | os.O_APPEND, 0o600) if store == "journal" else -1

    def sync_turn() -> None:
        batch = pending[:]
        del pending[:]
        if store == "journal":
            os.fdatasync(journal)
        elif libc.syncfs(dir_fd) != 0:
            raise OSError(ctypes.get_errno(), "syncfs")
        for transport, reply in batch:
            transport.write(reply)

    def keep(message: bytes) -> None:
        if store == "journal":
            os.write(journal, message)
        elif store == "syncfs":
            fd = os.open(directory / f"{os.getpid()}-{count[0]}.eml",
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, message)
            finally:
                os.close(fd)
        elif store == "fsync":
            fd = os.open(directory / f"{os.getpid()}-{count[0]}.eml",
                         os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                os.write(fd, message)
                os.fsync(fd)
            finally:
                os.close(fd)
        count[0] += 1

    class Floor(protocol.Protocol):
        def connectionMade(self) -> None:
            self.buf = b""
            self.body: bytearray | None = None
            self.out: Any = self.transport
            self.out.write(b"220 floor.test ESMTP\r\n")

        def dataReceived(self, data: bytes) -> None:
            buf = self.buf + data
            out = []
            while buf:
                if self.body is not None:
                    # The terminator may straddle reads: search from the old tail on.
                    start = max(0, len(self.body) - 4)
                    self.body += buf
                    i = self.body.find(b"\r\n.\r\n", start)
                    if i < 0:
                        buf = b""
                        break
                    keep(bytes(self.body[2:i + 2]))
                    buf = bytes(self.body[i + 5:])
                    self.body = None
                    if store in ("syncfs", "journal"):
                        # The 250 waits for the turn's one sync (group commit).
                        if out:
                            self.out.write(b"".join(out))
                            out = []
                        if not pending:
                            reactor.callLater(0, sync_turn)  # type: ignore[attr-defined]
                        pending.append((self.out, b"250 2.0.0 Ok: queued\r\n"))
                        continue
                    out.append(b"250 2.0.0 Ok: queued\r\n")
                    continue
                i = buf.find(b"\r\n")
                if i < 0:
                    break
                line, buf = buf[:i], buf[i + 2:]
                verb = line[:4].upper()
                out.append(REPLIES.get(verb, b"502 5.5.2 Error\r\n"))
                if verb == b"DATA":
                    self.body = bytearray(b"\r\n")  # so an empty body's "." is found too
                elif verb == b"QUIT":
                    self.out.write(b"".join(out))
                    self.out.loseConnection()
                    return
            self.buf = buf
            if out:
                self.out.write(b"".join(out))

    def publish() -> None:
        tmp = counter.with_suffix(".tmp")
        tmp.write_text(str(count[0]))
        os.replace(tmp, counter)

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(1024)
    sock.setblocking(False)
    factory = protocol.Factory.forProtocol(Floor)
    reactor.adoptStreamPort(sock.fileno(), socket.AF_INET, factory)  # type: ignore[attr-defined]
    sock.close()  # the reactor holds its own duplicate
    task.LoopingCall(publish).start(0.1)
    reactor.run()  # type: ignore[attr-defined]


class FloorServer:
    """``--processes`` floor processes under one parent (so TreeStats counts them all)."""

    def __init__(self, root: Path, processes: int, store: str) -> None:
        self.name = f"floor({store}, {processes} processes)"
        self.root = root
        self.port = free_port()
        self.recipient = "bench@localhost"
        self.processes = processes
        self.store = store
        root.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.floor", "--spawn", str(self.processes),
             "--port", str(self.port), "--store", self.store, "--dir", str(self.root)],
            env=env, stdin=subprocess.DEVNULL)
        wait_until(lambda: banner_ok(self.port), timeout, what="the floor server's banner")
        wait_until(lambda: len(list(self.root.glob("count-*"))) >= self.processes, timeout,
                   what="every floor process serving")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def delivered(self) -> int:
        n = 0
        for f in self.root.glob("count-*"):
            try:
                n += int(f.read_text() or 0)
            except (OSError, ValueError):
                pass  # being replaced right now; the next poll reads it
        return n

    def queued(self) -> int:
        return 0

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        self.proc.terminate()
        try:
            return self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


def spawn(processes: int, port: int, store: str, directory: str) -> int:
    """The parent: start the floor processes, stop them when terminated."""
    import signal

    children = [subprocess.Popen([sys.executable, "-m", "benchmarks.floor", "--serve",
                                  "--port", str(port), "--store", store, "--dir", directory])
                for _ in range(processes)]
    stopping = []
    signal.signal(signal.SIGTERM, lambda *_: stopping.append(True))
    while not stopping and all(c.poll() is None for c in children):
        time.sleep(0.2)  # (a supervisor's poll, not synchronisation)
    for c in children:
        c.terminate()
    return max((c.wait(10) or 0) for c in children)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.floor", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--messages", type=int, default=4000)
    ap.add_argument("--body-bytes", type=int, default=4096)
    ap.add_argument("--persistent", action="store_true")
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--store", choices=("none", "fsync", "syncfs", "journal"),
                    default="none")
    ap.add_argument("--compare-postfix", action="store_true")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--max-seconds", type=float, default=600.0)
    ap.add_argument("--drain-seconds", type=float, default=60.0)
    ap.add_argument("--settle", type=float, default=SETTLE_SECONDS)
    ap.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--spawn", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.serve:
        serve(args.port, args.store, Path(args.dir))
        return 0
    if args.spawn:
        return spawn(args.spawn, args.port, args.store, args.dir)
    args.loader = "smtp-source" if os.path.exists(SMTP_SOURCE) else "smtpload"
    root = bench_root("kotlin-smtp-floor-", args.settle)
    print(f"workload: {args.clients} clients, {args.messages} messages of {args.body_bytes} "
          f"bytes, {'persistent connections' if args.persistent else 'connection per message'}"
          f", loader {args.loader}, cores {os.cpu_count()}, loadavg {loadavg()}")
    servers: list[Any] = [FloorServer(root / "floor", args.processes, args.store)]
    if args.compare_postfix:
        why = postfix_missing()
        if why is not None:
            print(f"[postfix] skipped: {why}")
        else:
            servers.append(PostfixServer(root / "postfix"))
    try:
        ok = run_rounds(servers, args, "floor")
    finally:
        remove_bench_root(root)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
