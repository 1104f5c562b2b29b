"""A minimal sd_notify(3) client and a watchdog pinger (Twisted has none).

Job: tell systemd (``Type=notify``) when the service is ready (``READY=1``, after every listener
is up), is stopping (``STOPPING=1``, at the start of the graceful drain), is alive
(``WATCHDOG=1``, every ``WATCHDOG_USEC/2`` when the unit sets ``WatchdogSec``) and what it is
doing (``STATUS=...``).

Invariants:
- Without ``$NOTIFY_SOCKET`` every call is a cheap no-op returning False (tests, containers,
  twistd run by hand). Abstract sockets (``@name``) are supported.
- Sending never blocks the reactor and never raises: the socket is non-blocking and errors are
  logged and reported as False. systemd may be gone during shutdown; that is not our problem.
- The watchdog pings only when ``WATCHDOG_USEC`` is set and ``WATCHDOG_PID`` (if set) is this
  process, and it pings from the reactor: a blocked reactor stops the pings and systemd
  restarts us, which is the point.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import LoopingCall
from twisted.logger import Logger

_log = Logger()


def _address(path: str) -> str:
    return "\0" + path[1:] if path.startswith("@") else path


class SystemdNotifier:
    """Sends notifications to ``$NOTIFY_SOCKET`` (read once, at construction)."""

    def __init__(self, socket_path: str | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        environ = os.environ if env is None else env
        self.socket_path = socket_path if socket_path is not None else environ.get(
            "NOTIFY_SOCKET", "")

    @property
    def enabled(self) -> bool:
        return bool(self.socket_path)

    def send(self, *assignments: str) -> bool:
        """Send ``KEY=value`` lines in one datagram; True when it was sent."""
        if not self.enabled or not assignments:
            return False
        payload = "\n".join(assignments).encode("utf-8")
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.setblocking(False)
                sock.sendto(payload, _address(self.socket_path))
        except OSError as exc:
            _log.warn("sd_notify to {socket_path} failed: {error}", socket_path=self.socket_path,
                      error=str(exc), event="sdnotify.failed")
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self.send("READY=1", *([f"STATUS={status}"] if status else []))

    def stopping(self, status: str | None = None) -> bool:
        return self.send("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def status(self, text: str) -> bool:
        return self.send(f"STATUS={text.replace(chr(10), ' ')}")


def watchdog_interval(env: Mapping[str, str] | None = None, pid: int | None = None
                      ) -> float | None:
    """Seconds between pings (half of ``WATCHDOG_USEC``), or None when no watchdog applies."""
    environ = os.environ if env is None else env
    usec = environ.get("WATCHDOG_USEC", "")
    owner = environ.get("WATCHDOG_PID", "")
    try:
        if owner and int(owner) != (os.getpid() if pid is None else pid):
            return None
        micros = int(usec)
    except ValueError:
        return None
    if micros <= 0:
        return None
    return micros / 2 / 1_000_000


class WatchdogPinger:
    """Sends ``WATCHDOG=1`` every ``interval`` seconds from the reactor while started."""

    def __init__(self, notifier: SystemdNotifier, interval: float,
                 clock: IReactorTime | None = None) -> None:
        self.notifier = notifier
        self.interval = interval
        self._call = LoopingCall(self._ping)
        if clock is not None:
            self._call.clock = clock

    @classmethod
    def from_environment(cls, notifier: SystemdNotifier, clock: IReactorTime | None = None,
                         env: Mapping[str, str] | None = None) -> WatchdogPinger | None:
        """A pinger when systemd asked for one (``WatchdogSec``), else None."""
        interval = watchdog_interval(env)
        if interval is None or not notifier.enabled:
            return None
        return cls(notifier, interval, clock)

    @property
    def running(self) -> bool:
        return bool(self._call.running)

    def _ping(self) -> None:
        try:
            self.notifier.watchdog()
        except Exception:  # a LoopingCall whose function raises stops for good
            _log.failure("watchdog ping failed", event="sdnotify.watchdog_failed")

    def start(self) -> None:
        if not self._call.running:
            self._call.start(self.interval, now=True)

    def stop(self) -> None:
        if self._call.running:
            self._call.stop()
