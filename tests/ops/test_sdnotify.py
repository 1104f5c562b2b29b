"""sd_notify against a real AF_UNIX datagram socket; the watchdog driven by a task.Clock."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from twisted.internet import task

from kotlin_smtp_py.sdnotify import SystemdNotifier, WatchdogPinger, watchdog_interval


@pytest.fixture
def notify_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    path = str(tmp_path / "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield sock
    sock.close()


def pending(sock: socket.socket) -> list[bytes]:
    out = []
    sock.setblocking(False)
    try:
        while True:
            out.append(sock.recv(4096))
    except BlockingIOError:
        return out
    finally:
        sock.settimeout(5)


def test_ready_stopping_status(notify_socket: socket.socket) -> None:
    n = SystemdNotifier()
    assert n.enabled
    assert n.ready("listening on 2525")
    assert notify_socket.recv(4096) == b"READY=1\nSTATUS=listening on 2525"
    assert n.status("draining\n3 sessions")
    assert notify_socket.recv(4096) == b"STATUS=draining 3 sessions"
    assert n.stopping()
    assert notify_socket.recv(4096) == b"STOPPING=1"


def test_abstract_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"kotlin-smtp-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        sock.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert SystemdNotifier().watchdog()
        assert sock.recv(4096) == b"WATCHDOG=1"


def test_no_socket_is_a_noop(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    n = SystemdNotifier()
    assert not n.enabled
    assert n.ready() is False and n.stopping() is False


def test_unreachable_socket_does_not_raise(tmp_path: Path) -> None:
    assert SystemdNotifier(str(tmp_path / "gone")).ready() is False


def test_watchdog_interval_from_environment() -> None:
    assert watchdog_interval({"WATCHDOG_USEC": "10000000"}) == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": str(os.getpid())}) \
        == 5.0
    assert watchdog_interval({"WATCHDOG_USEC": "10000000", "WATCHDOG_PID": "1"}, pid=2) is None
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "junk"}) is None


def test_watchdog_pinger_pings_at_half_the_period(notify_socket: socket.socket) -> None:
    clock = task.Clock()
    n = SystemdNotifier()
    pinger = WatchdogPinger.from_environment(n, clock, env={"WATCHDOG_USEC": "4000000"})
    assert pinger is not None and pinger.interval == 2.0
    pinger.start()
    assert pending(notify_socket) == [b"WATCHDOG=1"]
    clock.advance(1.9)
    assert pending(notify_socket) == []
    clock.advance(0.1)
    assert pending(notify_socket) == [b"WATCHDOG=1"]
    clock.advance(2)
    clock.advance(2)
    assert len(pending(notify_socket)) == 2
    pinger.stop()
    clock.advance(10)
    assert pending(notify_socket) == []
    assert not pinger.running


def test_no_watchdog_without_watchdog_usec(notify_socket: socket.socket) -> None:
    assert WatchdogPinger.from_environment(SystemdNotifier(), task.Clock(), env={}) is None
