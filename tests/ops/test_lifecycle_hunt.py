"""Process lifecycle hunt with real ``twistd smtp`` processes (``smtp.workers`` > 1): signals
(SIGKILL, SIGTERM twice, SIGHUP with good and bad certificates, users), metrics across a worker
restart, readiness while a worker is down, more workers than cores.

Tests marked ``xfail(strict=True)`` document a confirmed bug; the others cover behaviour not
already covered by ``tests/perf/test_perf_workers.py`` or ``tests/integration/test_reload.py``.
Which process answers is made deterministic with ``workerSockets: shared`` (one accept queue)
and SIGSTOP on the other processes. Every wait polls with a deadline; every process started is
killed at teardown.
"""

from __future__ import annotations

import base64
import os
import signal
import smtplib
import socket
import ssl
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))

from helpers import (
    TCP_LISTEN,
    CertSet,
    make_certs,
    process_socket_inodes,
    smtp_session,
    tcp_socket_inodes,
    wait_until,
)
from helpers import smtp_reply as _reply
from mtaproc import MtaPool, MtaProcess, write_config

WORKER_MARK = b"kotlin_smtp_py.worker"


# -- process helpers ---------------------------------------------------------------------------


def _stat(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rpartition(")")[2].split()
    except OSError:
        return None


def _alive(pid: int) -> bool:
    fields = _stat(pid)
    return fields is not None and fields[0] not in ("Z", "X")


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _workers_of(parent: int) -> list[int]:
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        fields = _stat(int(name))
        if fields and int(fields[1]) == parent and fields[0] not in ("Z", "X") \
                and WORKER_MARK in _cmdline(int(name)):
            out.append(int(name))
    return out


def _all_workers_with_port(port: int) -> list[int]:
    """Every live worker process (whoever its parent) started for ``port``."""
    needle = b"--ports\0%d\0" % port
    out = []
    for name in os.listdir("/proc"):
        if name.isdigit() and _alive(int(name)):
            cmd = _cmdline(int(name))
            if WORKER_MARK in cmd and needle in cmd:
                out.append(int(name))
    return out


def _kill(pid: int, sig: int = signal.SIGKILL) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _metrics_dir(worker: int) -> str:
    args = _cmdline(worker).split(b"\0")
    return args[args.index(b"--metrics-dir") + 1].decode()


@pytest.fixture
def mtas(tmp_path: Path) -> Iterator[MtaPool]:
    pool = MtaPool(tmp_path)
    ports: list[int] = []
    orig_from_config = pool.from_config

    def from_config(conf: Any, root: Path, start: bool = True, **kw: Any) -> MtaProcess:
        ports.append(int(conf["smtp"]["listeners"][0]["port"]))
        return orig_from_config(conf, root, start=start, **kw)

    pool.from_config = from_config  # type: ignore[method-assign]
    try:
        yield pool
    finally:
        for proc in pool.procs:  # resume anything a test left stopped, then kill it
            if proc.running():
                _kill(proc.pid, signal.SIGCONT)
        pool.close()
        for port in ports:
            for pid in _all_workers_with_port(port):
                _kill(pid, signal.SIGCONT)
                _kill(pid)


def _start(mtas: MtaPool, workers: int, overrides: dict[str, Any] | None = None,
           shared: bool = True) -> tuple[MtaProcess, dict[str, Any], list[int]]:
    smtp: dict[str, Any] = {"workers": workers}
    if shared:
        smtp["workerSockets"] = "shared"
    conf_over: dict[str, Any] = {"smtp": smtp}
    for key, value in (overrides or {}).items():
        conf_over.setdefault(key, {}).update(value)
    proc, conf = mtas.new(conf_over)
    pids = wait_until(lambda: (lambda p: p if len(p) == workers - 1 else [])(
        _workers_of(proc.pid)), timeout=30, interval=0.05, message="worker processes")
    _wait_serving(proc, workers - 1)
    return proc, conf, sorted(pids)


def _wait_serving(proc: MtaProcess, count: int) -> None:
    wait_until(lambda: proc.log().count("serving") >= count, timeout=30, interval=0.05,
               message=f"{count} workers serving")


# -- protocol helpers --------------------------------------------------------------------------


def _session(port: int) -> tuple[socket.socket, Any]:
    return smtp_session(port, timeout=10)


def _quit(s: socket.socket, f: Any) -> None:
    s.sendall(b"QUIT\r\n")
    assert _reply(f).startswith(b"221")
    s.close()


def _peer_pid(s: socket.socket, candidates: list[int], port: int) -> int:
    """Which of ``candidates`` holds the server side of client socket ``s``."""
    client_port = s.getsockname()[1]
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        local = int(f[1].rsplit(":", 1)[1], 16)
        remote = int(f[2].rsplit(":", 1)[1], 16)
        if local == port and remote == client_port:
            inodes.add(f[9])
    owners = [p for p in candidates if process_socket_inodes(p) & inodes]
    assert len(owners) == 1, (owners, candidates)
    return owners[0]


def _scrape(management: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{management}/actuator/prometheus",
                                timeout=10) as resp:
        text = resp.read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out


def _readiness(management: int) -> int:
    try:
        with urllib.request.urlopen(
                f"http://127.0.0.1:{management}/actuator/health/readiness", timeout=10) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)


def _fingerprint(port: int, ca: Path) -> bytes:
    ctx = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
        f = raw.makefile("rb")
        assert _reply(f).startswith(b"220")
        raw.sendall(b"EHLO c.test\r\n")
        assert _reply(f).startswith(b"250")
        raw.sendall(b"STARTTLS\r\n")
        assert _reply(f).startswith(b"220")
        with ctx.wrap_socket(raw, server_hostname="localhost") as tls:
            return tls.getpeercert(binary_form=True) or b""


def _auth(port: int, ca: Path, user: str, password: str) -> int:
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as s:
        s._host = "localhost"  # type: ignore[attr-defined]
        s.starttls(context=ssl.create_default_context(cafile=str(ca)))
        s.ehlo("c.test")
        code, _ = s.docmd("AUTH", "PLAIN " + base64.b64encode(
            f"\0{user}\0{password}".encode()).decode())
        return code


class _Stopped:
    """SIGSTOP some processes for a block, so that only the others accept (shared sockets)."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids

    def __enter__(self) -> _Stopped:
        for pid in self.pids:
            os.kill(pid, signal.SIGSTOP)
        return self

    def __exit__(self, *exc: object) -> None:
        for pid in self.pids:
            _kill(pid, signal.SIGCONT)


@pytest.fixture(scope="module")
def tls_certs(tmp_path_factory: pytest.TempPathFactory) -> tuple[CertSet, CertSet]:
    base = tmp_path_factory.mktemp("lifecycle-certs")
    return make_certs(base / "a"), make_certs(base / "b")


def _tls_overrides(certs: CertSet, users: dict[str, str]) -> dict[str, Any]:
    return {"smtp": {"ssl": {"enabled": True, "certChainFile": str(certs.cert),
                             "privateKeyFile": str(certs.key)},
                     "auth": {"users": users, "failureDelayMs": 0}}}


# -- SIGHUP ------------------------------------------------------------------------------------


def test_sighup_right_after_start_does_not_kill_booting_workers(mtas: MtaPool) -> None:
    proc, _ = mtas.new({"smtp": {"workers": 3}})  # wait_ready: the parent answers
    booting = wait_until(lambda: (lambda p: p if len(p) == 2 else [])(_workers_of(proc.pid)),
                         timeout=30, interval=0.01, message="worker processes")
    proc.signal(signal.SIGHUP)  # e.g. a certificate renewal hook right after a restart
    wait_until(lambda: "users from" in proc.log(), timeout=20,
               message="parent reload")
    # Either the original workers all come up (fine) or one of them is gone (the bug).
    wait_until(lambda: proc.log().count("serving") >= 2 or not all(map(_alive, booting)),
               timeout=30, interval=0.05, message="workers serving or dead")
    assert all(map(_alive, booting)), proc.log()
    assert "died" not in proc.log()


def test_sighup_with_mismatched_key_keeps_the_old_certificate(
        mtas: MtaPool, tls_certs: tuple[CertSet, CertSet]) -> None:
    """Config validation (check_privatekey) refuses the pair, so the running context stays."""
    a, _ = tls_certs
    root = mtas.root()
    cert = root / "cert.pem"
    key = root / "key.pem"
    cert.write_bytes(a.cert.read_bytes())
    key.write_bytes(a.key.read_bytes())
    from mtaproc import make_config

    conf = make_config(root, overrides={"smtp": {"ssl": {
        "enabled": True, "certChainFile": str(cert), "privateKeyFile": str(key)}}})
    proc = mtas.from_config(conf, root)
    before = _fingerprint(proc.port, a.ca_cert)
    # A renewal that wrote the new certificate but (not yet) its key.
    cert.write_bytes(a.wrong_cert.read_bytes())
    proc.signal(signal.SIGHUP)
    wait_until(lambda: "reload failed" in proc.log(), timeout=20, message="failed reload logged")
    assert "users from" not in proc.log()
    assert proc.running()
    assert _fingerprint(proc.port, a.ca_cert) == before  # STARTTLS still works


def test_sighup_broken_certificate_keeps_old_one_in_parent_and_worker(
        mtas: MtaPool, tls_certs: tuple[CertSet, CertSet]) -> None:
    a, _ = tls_certs
    proc, conf, (worker,) = _start(mtas, 2, _tls_overrides(a, {"u": "p"}))
    port = proc.port
    cert_path = Path(conf["smtp"]["ssl"]["certChainFile"])
    cert_copy = Path(conf["smtp"]["storage"]["tempDir"]).parent / "broken.pem"
    cert_copy.write_bytes(b"-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                          b"-----END CERTIFICATE-----\n")
    conf["smtp"]["ssl"]["certChainFile"] = str(cert_copy)
    write_config(proc.config_path, conf)  # type: ignore[arg-type]
    before = _fingerprint(port, a.ca_cert)
    assert cert_path.is_file()
    proc.signal(signal.SIGHUP)
    wait_until(lambda: proc.log().count("reload failed") >= 2, timeout=20,
               message="parent and worker log the failed reload")
    assert "users from" not in proc.log()
    with _Stopped(proc.pid):  # only the worker accepts
        assert _fingerprint(port, a.ca_cert) == before
        assert _auth(port, a.ca_cert, "u", "p") == 235
    with _Stopped(worker):  # only the parent accepts
        assert _fingerprint(port, a.ca_cert) == before
    assert proc.running() and _alive(worker)


def test_sighup_new_certificate_and_users_reach_the_worker(
        mtas: MtaPool, tls_certs: tuple[CertSet, CertSet]) -> None:
    a, b = tls_certs
    proc, conf, (worker,) = _start(mtas, 2, _tls_overrides(a, {"olduser": "old-pass"}))
    port = proc.port
    conf["smtp"]["ssl"].update(certChainFile=str(b.cert), privateKeyFile=str(b.key))
    conf["smtp"]["auth"]["users"] = {"newuser": "new-pass"}
    write_config(proc.config_path, conf)  # type: ignore[arg-type]
    proc.signal(signal.SIGHUP)
    wait_until(lambda: proc.log().count("users from") >= 2, timeout=20,
               message="parent and worker reloaded")
    with _Stopped(proc.pid):  # the worker alone
        assert _fingerprint(port, b.ca_cert)
        assert _auth(port, b.ca_cert, "newuser", "new-pass") == 235
        assert _auth(port, b.ca_cert, "olduser", "old-pass") == 535
    assert _alive(worker)


# -- metrics and readiness across a worker restart -----------------------------------------------


def test_worker_restart_keeps_counters_and_drops_its_active_connections(mtas: MtaPool) -> None:
    proc, conf, (worker,) = _start(mtas, 2)
    port = proc.port
    management = int(conf["management"]["server"]["port"])
    with _Stopped(proc.pid):  # every session lands on the worker
        for _ in range(5):
            _quit(*_session(port))
        held = [_session(port) for _ in range(3)]  # open when the worker dies
    assert {_peer_pid(s, [proc.pid, worker], port) for s, _ in held} == {worker}
    wait_until(lambda: _scrape(management).get("smtp_connections_active") == 3, timeout=20,
               message="3 active connections")
    before = _scrape(management)
    assert before["smtp_sessions_started_total"] >= 8

    _kill(worker)
    for s, _ in held:
        s.close()
    # Readiness and the port while the worker is down (respawn is >= 1 s away).
    assert _readiness(management) == 200
    _quit(*_session(port))
    replacement = wait_until(lambda: [p for p in _workers_of(proc.pid) if p != worker],
                             timeout=30, message="replacement worker")
    _wait_serving(proc, 2)

    after = _scrape(management)
    for name, value in before.items():
        if name.endswith(("_total", "_count", "_sum", "_bucket")) or "_total{" in name:
            assert after.get(name, 0.0) >= value, (name, value, after.get(name))
    assert after["smtp_sessions_started_total"] >= before["smtp_sessions_started_total"] + 1
    wait_until(lambda: _scrape(management).get("smtp_connections_active") == 0, timeout=20,
               message="the dead worker's connections leave smtp_connections_active")
    with _Stopped(proc.pid):  # the replacement counts into the same aggregate
        _quit(*_session(port))
    assert replacement
    wait_until(lambda: _scrape(management)["smtp_sessions_started_total"]
               >= after["smtp_sessions_started_total"] + 1, timeout=20,
               message="replacement's sessions counted")
    assert _readiness(management) == 200


# -- SIGKILL / SIGTERM ---------------------------------------------------------------------------


def test_parent_sigkill_shared_sockets_leaves_no_process_holding_the_port(
        mtas: MtaPool) -> None:
    proc, _, workers = _start(mtas, 3)
    port = proc.port
    idle = _session(port)  # a session in progress when the parent dies
    proc.kill()
    wait_until(lambda: not any(map(_alive, workers)), timeout=20,
               message="workers to exit after their parent died")
    wait_until(lambda: not tcp_socket_inodes(port, TCP_LISTEN), timeout=10,
               message="no listening socket left on the port")
    assert not _all_workers_with_port(port)
    idle[0].close()
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=2).close()


def test_sigterm_every_process_exits_zero_and_cleans_up(mtas: MtaPool) -> None:
    proc, _, workers = _start(mtas, 3, shared=False)
    metrics_dir = _metrics_dir(workers[0])
    assert os.path.isdir(metrics_dir)
    rc, took = proc.terminate(timeout=20)
    assert rc == 0, proc.log()
    assert took < 3.0 + 5.0 + 2.0  # grace (3 s) + worker SIGKILL margin
    assert not any(map(_alive, workers))
    assert proc.log().count("exited (0)") == 2, proc.log()
    assert "died" not in proc.log()
    assert not tcp_socket_inodes(proc.port, TCP_LISTEN)
    assert not os.path.exists(metrics_dir)


_DOUBLE_SIGTERM = (
    "a second SIGTERM while the drain runs logs a CRITICAL 'while calling from thread' "
    "traceback (twisted ReactorNotRunning): Twisted's reactor.sigTerm calls reactor.stop() "
    "again and nothing guards it (twistd parent: kotlin_smtp_py/service.py stopService/"
    "_graceful_stop only clear the exit signal, :692; workers: kotlin_smtp_py/workers.py:355 "
    "reactor.run() with the default handlers). With the shipped unit "
    "(packaging/systemd/kotlin-smtp.service, default KillMode=control-group) every worker gets "
    "SIGTERM from systemd and again from WorkerSupervisor.stop (workers.py:260)")


def _stop_clean(proc: MtaProcess, workers: list[int]) -> None:
    rc = proc.proc.wait(20)  # type: ignore[union-attr]
    assert rc == 0, proc.log()
    wait_until(lambda: not any(map(_alive, workers)), timeout=10, message="workers gone")
    assert proc.log().count("exited (0)") == len(workers), proc.log()
    assert "CRITICAL" not in proc.log() and "Traceback" not in proc.log(), proc.log()


def _stalled(port: int) -> socket.socket:
    """A session in the middle of DATA: keeps its process draining for the grace period."""
    s, f = _session(port)
    for cmd, code in ((b"MAIL FROM:<a@hunt.test>\r\n", b"250"),
                      (b"RCPT TO:<alice@localhost>\r\n", b"250"), (b"DATA\r\n", b"354")):
        s.sendall(cmd)
        assert _reply(f).startswith(code), cmd
    s.sendall(b"Subject: half\r\n\r\nbody")
    return s


def test_two_sigterms_in_a_row_exit_zero_without_errors(mtas: MtaPool) -> None:
    proc, _, workers = _start(mtas, 2)
    with _Stopped(workers[0]):
        held = _stalled(proc.port)  # on the parent: its drain lasts the grace period
    try:
        proc.signal(signal.SIGTERM)
        wait_until(lambda: "shutting down" in proc.log(), timeout=10, message="drain started")
        proc.signal(signal.SIGTERM)
        _stop_clean(proc, workers)
    finally:
        held.close()


def test_systemd_style_sigterm_to_the_whole_group_is_clean(mtas: MtaPool) -> None:
    proc, _, workers = _start(mtas, 2)
    with _Stopped(proc.pid):
        held = _stalled(proc.port)  # on the worker
    try:
        os.kill(workers[0], signal.SIGTERM)  # KillMode=control-group: systemd's SIGTERM ...
        wait_until(lambda: "shutting down" in proc.log(), timeout=10, message="worker drains")
        proc.signal(signal.SIGTERM)  # ... and the parent's, forwarded
        _stop_clean(proc, workers)
    finally:
        held.close()


def test_more_workers_than_cores_all_serve_and_stop(mtas: MtaPool) -> None:
    count = (os.cpu_count() or 1) + 3
    proc, conf, workers = _start(mtas, count, shared=False)
    assert len(workers) == count - 1
    management = int(conf["management"]["server"]["port"])
    for _ in range(10):
        _quit(*_session(proc.port))
    wait_until(lambda: _scrape(management).get("smtp_sessions_started_total", 0) >= 10,
               timeout=20, message="sessions counted")
    rc, _ = proc.terminate(timeout=25)
    assert rc == 0, proc.log()
    assert not any(map(_alive, workers))
    assert proc.log().count("exited (0)") == count - 1, proc.log()
