"""``smtp.workers = 2`` with a real ``twistd smtp``: connections are spread over both processes,
every message is delivered exactly once, the parent's metrics count what every worker accepted,
SIGTERM stops everything with exit 0, and workers never outlive their parent.

Behaviour only, never timings. Which process holds a connection is read from /proc: the socket
inodes in ``/proc/<pid>/fd`` matched against established connections in ``/proc/net/tcp``.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from helpers import TCP_LISTEN, process_socket_inodes, tcp_socket_inodes, wait_until
from helpers import smtp_reply as _reply
from helpers import smtp_session as _open_session
from mtaproc import MtaPool, maildir_files, spool_entries

CONNECTIONS = 24  # P(all on one of 2 SO_REUSEPORT sockets) = 2 * 2**-24


@pytest.fixture
def mtas(tmp_path: Path) -> Any:
    pool = MtaPool(tmp_path)
    try:
        yield pool
    finally:
        pool.close()
        for pid in _stray_workers:
            _kill_quietly(pid)


_stray_workers: list[int] = []


def _kill_quietly(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            state = fh.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _children(parent: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                fields = fh.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == parent:
            out.append(int(name))
    return out


def _worker_pids(parent: int, expected: int) -> list[int]:
    def found() -> list[int]:
        pids = [p for p in _children(parent) if _alive(p) and b"kotlin_smtp_py.worker" in
                Path(f"/proc/{p}/cmdline").read_bytes()]
        return pids if len(pids) == expected else []

    pids: list[int] = wait_until(found, timeout=60, message="worker processes")
    _stray_workers.extend(pids)
    return pids


def _wait_listening(pids: list[int], port: int) -> None:
    """Until every worker has bound the shared port (a loaded machine may take seconds)."""
    wait_until(lambda: all(process_socket_inodes(p) & tcp_socket_inodes(port, TCP_LISTEN)
                           for p in pids),
               timeout=120, interval=0.2, message="workers listening on the shared port")


def _send(s: socket.socket, f: Any, n: int) -> None:
    for cmd, code in ((b"MAIL FROM:<sender@perf.test>\r\n", b"250"),
                      (b"RCPT TO:<alice@localhost>\r\n", b"250"), (b"DATA\r\n", b"354")):
        s.sendall(cmd)
        assert _reply(f).startswith(code), cmd
    s.sendall(b"Subject: perf %d\r\nMessage-ID: <perf-%d@perf.test>\r\n\r\nbody %d\r\n.\r\n"
              % (n, n, n))
    assert _reply(f).startswith(b"250")


def _metric(port: int, name: str) -> float:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/actuator/prometheus",
                                timeout=10) as resp:
        text = resp.read().decode()
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"{name} not in the exposition:\n{text}")


def test_two_workers_share_the_port_deliver_once_and_aggregate_metrics(mtas: MtaPool) -> None:
    proc, conf = mtas.new({"smtp": {"workers": 2}})
    port = proc.port
    management = int(conf["management"]["server"]["port"])
    (worker,) = _worker_pids(proc.pid, 1)
    _wait_listening([worker], port)

    sessions = []
    try:
        sessions += [_open_session(port) for _ in range(CONNECTIONS)]
        established = tcp_socket_inodes(port)
        served = {pid: len(process_socket_inodes(pid) & established) for pid in (proc.pid, worker)}
        assert served[proc.pid] > 0 and served[worker] > 0, served
        assert sum(served.values()) == len(sessions), served
        for n, (s, f) in enumerate(sessions):
            _send(s, f, n)
        for s, f in sessions:
            s.sendall(b"QUIT\r\n")
            assert _reply(f).startswith(b"221")
            s.close()
    finally:
        for s, _ in sessions:
            s.close()
    total = len(sessions)

    mailbox = Path(conf["smtp"]["storage"]["mailboxDir"])
    spool = Path(conf["smtp"]["spool"]["dir"])
    wait_until(lambda: len(maildir_files(mailbox, "alice")) >= total and not spool_entries(spool),
               timeout=60, message="delivery of every message")
    ids = [re.search(rb"Message-ID: <(perf-\d+)@", p.read_bytes()).group(1)  # type: ignore[union-attr]
           for p in maildir_files(mailbox, "alice")]
    assert sorted(ids) == sorted(b"perf-%d" % n for n in range(total))  # each exactly once

    # The parent serves the only management endpoint and sums every process's counters.
    assert _metric(management, "smtp_messages_accepted_total") == total
    assert _metric(management, "smtp_sessions_started_total") >= total
    wait_until(lambda: _metric(management, "smtp_connections_active") == 0, timeout=30,
               message="connections_active back to 0")

    rc, _ = proc.terminate(timeout=60)
    assert rc == 0, proc.log()
    wait_until(lambda: not _alive(worker), timeout=30, message="worker to exit")


def test_workers_follow_the_parent_when_it_is_killed(mtas: MtaPool) -> None:
    proc, _ = mtas.new({"smtp": {"workers": 3}})
    workers = _worker_pids(proc.pid, 2)
    _wait_listening(workers, proc.port)
    proc.kill()  # SIGKILL: no chance to forward anything; PR_SET_PDEATHSIG does it
    wait_until(lambda: not any(_alive(p) for p in workers), timeout=60,
               message="workers to exit after their parent died")


def test_a_dead_worker_is_respawned_and_the_port_keeps_serving(mtas: MtaPool) -> None:
    proc, _ = mtas.new({"smtp": {"workers": 2}})
    (worker,) = _worker_pids(proc.pid, 1)
    _wait_listening([worker], proc.port)
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: any(p != worker for p in _worker_pids_now(proc.pid)), timeout=60,
               message="a replacement worker")
    _stray_workers.extend(_worker_pids_now(proc.pid))
    for _ in range(10):  # connections keep being answered whichever process gets them
        s, f = _open_session(proc.port)
        s.sendall(b"QUIT\r\n")
        assert _reply(f).startswith(b"221")
        s.close()
    rc, _ = proc.terminate(timeout=60)
    assert rc == 0, proc.log()


def _worker_pids_now(parent: int) -> list[int]:
    return [p for p in _children(parent) if _alive(p)
            and b"kotlin_smtp_py.worker" in Path(f"/proc/{p}/cmdline").read_bytes()]


def _served(pids: list[int], port: int) -> dict[int, int]:
    established = tcp_socket_inodes(port)
    return {pid: len(process_socket_inodes(pid) & established) for pid in pids}


def _wait_serving(proc: Any, workers: int) -> None:
    wait_until(lambda: proc.log().count(" serving") >= workers, timeout=120, interval=0.2,
               message="workers serving")


def test_shared_sockets_a_stopped_process_strands_no_connection(mtas: MtaPool) -> None:
    """``workerSockets: shared``: one accept queue for every process, so connections go to
    whichever can take them; with SO_REUSEPORT a stopped process would keep getting its share
    (and those clients would wait for it)."""
    proc, conf = mtas.new({"smtp": {"workers": 2, "workerSockets": "shared"}})
    port = proc.port
    (worker,) = _worker_pids(proc.pid, 1)
    _wait_serving(proc, 1)
    # the worker holds the parent's one listening socket
    assert tcp_socket_inodes(port, TCP_LISTEN) <= process_socket_inodes(worker)

    sessions: list[tuple[socket.socket, Any]] = []
    try:
        for stopped, serving in ((worker, proc.pid), (proc.pid, worker)):
            os.kill(stopped, signal.SIGSTOP)
            try:
                batch = [_open_session(port) for _ in range(5)]  # greeting and EHLO answered
                held = _served([stopped, serving], port)
            finally:
                os.kill(stopped, signal.SIGCONT)
            sessions += batch
            assert held[serving] >= 5 and held[stopped] == len(sessions) - 5, held
        for n, (s, f) in enumerate(sessions):
            _send(s, f, n)
            s.sendall(b"QUIT\r\n")
            assert _reply(f).startswith(b"221")
    finally:
        for s, _ in sessions:
            s.close()

    mailbox = Path(conf["smtp"]["storage"]["mailboxDir"])
    wait_until(lambda: len(maildir_files(mailbox, "alice")) >= len(sessions), timeout=60,
               message="delivery of every message")
    assert len(maildir_files(mailbox, "alice")) == len(sessions)
    management = int(conf["management"]["server"]["port"])
    assert _metric(management, "smtp_messages_accepted_total") == len(sessions)
    rc, _ = proc.terminate(timeout=60)
    assert rc == 0, proc.log()
    wait_until(lambda: not _alive(worker), timeout=30, message="worker to exit")


def test_shared_sockets_a_respawned_worker_gets_the_socket_again(mtas: MtaPool) -> None:
    proc, _ = mtas.new({"smtp": {"workers": 2, "workerSockets": "shared"}})
    (worker,) = _worker_pids(proc.pid, 1)
    _wait_serving(proc, 1)
    os.kill(worker, signal.SIGKILL)
    wait_until(lambda: any(p != worker for p in _worker_pids_now(proc.pid)), timeout=60,
               message="a replacement worker")
    _stray_workers.extend(_worker_pids_now(proc.pid))
    _wait_serving(proc, 2)  # the replacement's own "serving" line
    os.kill(proc.pid, signal.SIGSTOP)  # only the replacement can answer now
    try:
        s, f = _open_session(proc.port)
        s.sendall(b"QUIT\r\n")
        assert _reply(f).startswith(b"221")
        s.close()
    finally:
        os.kill(proc.pid, signal.SIGCONT)
    rc, _ = proc.terminate(timeout=60)
    assert rc == 0, proc.log()
