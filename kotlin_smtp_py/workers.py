"""Several processes serving the same SMTP ports (``smtp.workers``), one core each.

Model: the process twistd starts is the *parent* (worker 0). It binds every SMTP listener, then
spawns ``smtp.workers - 1`` children, ``python -m kotlin_smtp_py.worker --config FILE --index i
--ports P,..``, which run the same service without the management HTTP, operator-request
polling or TLS-RPT reporter (parent only). How the processes share a port
(``smtp.workerSockets``):

- ``reuseport`` (default): each process binds its own socket with ``SO_REUSEPORT`` and the
  kernel hashes new connections over them, whether their process is busy or not: a stopped or
  stuck process keeps receiving its share, and connections still queued on a process that dies
  are reset.
- ``shared``: the children inherit the parent's listening sockets (fds 3, 4, ...;
  ``--listen-fds N``) and every process waits on the same accept queue, so the next connection
  goes to a process that is free to take it, as Postfix's smtpd processes (or nginx without
  ``reuseport``) take theirs. Measured (2 processes, interleaved A/B rounds): 4-8 % more
  messages per second with a connection per message (W1), the same with 64 clients (W4), but
  11 % fewer with 8 persistent connections (W2): whichever process wakes first takes more of a
  burst of new connections, and a persistent connection stays where it landed.

Invariants:
- Shared state lives outside the processes: the file spool is multi-process safe (flock leases,
  periodic rescan), metrics go to ``prometheus_client`` multiprocess files in a private
  directory that only the parent renders, and local rate limits are split evenly (each process
  enforces ``limit // workers``, at least 1, so together they never allow more than the
  limit; use the redis backend for exact limits).
- Workers never outlive the parent: ``PR_SET_PDEATHSIG`` delivers SIGTERM when it dies, and a
  1 s ``getppid`` check covers the rest. SIGTERM to the parent is forwarded to the workers; the
  parent exits after they have drained (SIGKILL after the grace period plus 5 s).
- A worker that dies while the parent runs is respawned with exponential back-off (1 s → 30 s).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from typing import Any

from twisted.internet import defer, protocol, tcp
from twisted.logger import Logger

log = Logger()

PR_SET_PDEATHSIG = 1
RESPAWN_MIN_DELAY = 1.0
RESPAWN_MAX_DELAY = 30.0
LISTEN_BACKLOG = 1024
FIRST_LISTEN_FD = 3  # where a worker finds the inherited listening sockets (like systemd's)


@dataclass
class ClusterRole:
    """This process's place in a multi-process server."""

    index: int  # 0 = the parent
    count: int
    metrics_dir: str
    ports: list[int] = field(default_factory=list)  # workers: the parent's bound ports
    # workers with shared sockets: the inherited listening descriptors, one per listener
    listen_fds: list[int] = field(default_factory=list)

    @property
    def is_parent(self) -> bool:
        return self.index == 0


def effective_workers(config: Any) -> int:
    """``smtp.workers``, with 0 meaning one process per CPU core."""
    configured = int(config.smtp.workers)
    return configured if configured > 0 else (os.cpu_count() or 1)


def prepare_parent(config: Any) -> ClusterRole | None:
    """Called by twistd before the service is built: None when one process is configured."""
    count = effective_workers(config)
    if count <= 1:
        return None
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and os.environ.get("LISTEN_FDS"):
        # systemd socket activation: the sockets are systemd's (no SO_REUSEPORT), so one
        # process serves them; run several units (or ReusePort=yes sockets) to scale out.
        log.warn("socket activation: smtp.workers={count} ignored, serving in one process",
                 count=count)
        return None
    remove_stale_metrics_dirs()
    metrics_dir = tempfile.mkdtemp(prefix=f"{METRICS_DIR_PREFIX}{os.getpid()}-")
    return ClusterRole(index=0, count=count, metrics_dir=metrics_dir)


METRICS_DIR_PREFIX = "kotlin-smtp-metrics-"


def remove_stale_metrics_dirs(base: str | None = None) -> int:
    """Remove the metrics directories of parents that are gone (a graceful stop removes its
    own; a SIGKILLed parent leaves it behind). Only ours (same uid), named with a pid that no
    process has any more; returns how many were removed."""
    base = base or tempfile.gettempdir()
    removed = 0
    try:
        names = os.listdir(base)
    except OSError:
        return 0
    for name in names:
        if not name.startswith(METRICS_DIR_PREFIX):
            continue
        pid_text = name[len(METRICS_DIR_PREFIX):].partition("-")[0]
        if not pid_text.isdigit():
            continue  # an older unnamed one: its owner is unknown, leave it
        path = os.path.join(base, name)
        try:
            if os.stat(path).st_uid != os.getuid():
                continue
            os.kill(int(pid_text), 0)
            continue  # that process exists (ours or not): keep
        except ProcessLookupError:
            pass
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed += 1
    return removed


def _share(limit: int, count: int) -> int:
    """One process's share of a limit: rounded down, so the processes together never allow
    more than the limit (SO_REUSEPORT spreads one client over all of them); at least 1, so a
    limit below the process count allows up to ``count``. 0 or less (no limit) stays."""
    return limit if limit <= 0 else max(1, limit // count)


def split_local_limits(config: Any, count: int) -> Any:
    """The config with local rate limits divided between ``count`` processes."""
    if count <= 1:
        return config
    s = config.smtp
    rl, auth = s.rateLimit, s.auth
    if rl.backend == "local":
        rl = replace(rl, maxConnectionsPerIp=_share(rl.maxConnectionsPerIp, count),
                     maxMessagesPerIpPerHour=_share(rl.maxMessagesPerIpPerHour, count))
    if auth.rateLimitBackend == "local":
        auth = replace(auth, rateLimitMaxFailures=_share(auth.rateLimitMaxFailures, count))
    return replace(config, smtp=replace(s, rateLimit=rl, auth=auth))


def listen_reuseport(reactor: Any, host: str, port: int, factory: Any) -> Any:
    """A listening port shared with other processes through SO_REUSEPORT."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host or "0.0.0.0", port))
        sock.listen(LISTEN_BACKLOG)
        sock.setblocking(False)
        return reactor.adoptStreamPort(sock.fileno(), family, factory)
    finally:
        sock.close()  # adoptStreamPort keeps its own duplicate of the descriptor


class SharedPort(tcp.Port):
    """A listening port whose socket other processes accept from as well: one connection per
    readiness event. Twisted's accept loop grows to 20 and more per event, so the first process
    woken took a whole burst (all eight persistent connections of a load test, say) while the
    others, woken too, found the queue empty."""

    # Twisted shuts a port's own socket down before closing it; on a socket the workers share,
    # that ends the listening state in every process (their accept then fails with EINVAL).
    # Closing only drops this process's descriptor.
    _shouldShutdown = False

    @property  # type: ignore[override]
    def numberAccepts(self) -> int:
        return 1

    @numberAccepts.setter
    def numberAccepts(self, value: int) -> None:
        pass  # Twisted's doRead adapts it after each event; fixed at one here


def listen_shared(reactor: Any, host: str, port: int, factory: Any) -> Any:
    """The parent's listening port for ``smtp.workerSockets: shared``."""
    p = SharedPort(port, factory, LISTEN_BACKLOG, host, reactor)
    p.startListening()
    return p


def adopt_listening(reactor: Any, fd: int, factory: Any) -> Any:
    """A worker's listening port on a socket inherited from the parent (shared sockets)."""
    probe = socket.socket(fileno=fd)  # only to learn the address family
    family = probe.family
    probe.detach()
    try:
        p = SharedPort._fromListeningDescriptor(  # type: ignore[no-untyped-call]
            reactor, fd, family, factory)
        p.startListening()
        return p
    finally:
        # The port holds its own duplicate; the inherited one would keep the socket listening
        # in this process after the port is stopped at shutdown.
        os.close(fd)


class _WorkerProtocol(protocol.ProcessProtocol):
    def __init__(self, supervisor: WorkerSupervisor, index: int) -> None:
        self.supervisor = supervisor
        self.index = index
        self.ended: defer.Deferred[None] = defer.Deferred()
        self.pid: int | None = None

    def connectionMade(self) -> None:
        self.pid = self.transport.pid  # type: ignore[union-attr]

    def processEnded(self, reason: Any) -> None:
        self.supervisor.ended(self, reason)
        self.ended.callback(None)


class WorkerSupervisor:
    """Parent side: spawns, respawns and stops the worker processes."""

    def __init__(self, reactor: Any, role: ClusterRole, config_path: str,
                 ports: list[int], listen_fds: list[int] | None = None) -> None:
        """``listen_fds``: the parent's listening sockets, handed to every worker (shared
        sockets); None: the workers bind the ``ports`` themselves (SO_REUSEPORT)."""
        self.reactor = reactor
        self.role = role
        self.config_path = config_path
        self.ports = ports
        self.listen_fds = listen_fds
        self.children: dict[int, _WorkerProtocol] = {}
        self.delays: dict[int, float] = {}
        self.started_at: dict[int, float] = {}
        self.stopping = False
        self._respawns: dict[int, Any] = {}

    def start(self) -> None:
        for index in range(1, self.role.count):
            self.spawn(index)

    def argv(self, index: int) -> list[str]:
        return [sys.executable, "-m", "kotlin_smtp_py.worker", "--config", self.config_path,
                "--index", str(index), "--count", str(self.role.count),
                "--ports", ",".join(str(p) for p in self.ports),
                "--metrics-dir", self.role.metrics_dir, "--parent-pid", str(os.getpid()),
                "--listen-fds", str(len(self.listen_fds or ()))]

    def spawn(self, index: int) -> None:
        self._respawns.pop(index, None)
        if self.stopping:
            return
        env = {k: v for k, v in os.environ.items()
               if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "LISTEN_FDS",
                            "LISTEN_PID", "LISTEN_FDNAMES")}
        env["PROMETHEUS_MULTIPROC_DIR"] = self.role.metrics_dir
        proto = _WorkerProtocol(self, index)
        fds: dict[int, int | str] = {0: "w", 1: 1, 2: 2}
        for i, fd in enumerate(self.listen_fds or ()):
            fds[FIRST_LISTEN_FD + i] = fd
        self.reactor.spawnProcess(proto, sys.executable, self.argv(index), env=env,
                                  childFDs=fds)
        self.children[index] = proto
        self.started_at[index] = time.monotonic()
        log.info("started SMTP worker {index} (pid {pid})", index=index, pid=proto.pid,
                 event="worker_started")

    def pids(self) -> list[int]:
        return [p.pid for p in self.children.values() if p.pid is not None]

    def ended(self, proto: _WorkerProtocol, reason: Any) -> None:
        if self.children.get(proto.index) is proto:
            del self.children[proto.index]
        if proto.pid is not None:
            _mark_process_dead(proto.pid, self.role.metrics_dir)
            try:  # (a later worker could get the same pid)
                os.unlink(_ready_path(self.role.metrics_dir, proto.pid))
            except OSError:
                pass
        status = getattr(reason.value, "exitCode", None)
        if self.stopping:
            log.info("SMTP worker {index} exited ({status})", index=proto.index, status=status)
            return
        lived = time.monotonic() - self.started_at.get(proto.index, 0.0)
        delay = RESPAWN_MIN_DELAY if lived > RESPAWN_MAX_DELAY else min(
            RESPAWN_MAX_DELAY, self.delays.get(proto.index, RESPAWN_MIN_DELAY / 2) * 2)
        self.delays[proto.index] = delay
        log.error("SMTP worker {index} died ({reason}); respawning in {delay}s",
                  index=proto.index, reason=str(reason.value), delay=delay, event="worker_died")
        self._respawns[proto.index] = self.reactor.callLater(delay, self.spawn, proto.index)

    def signal_all(self, signum: int, only_reload_ready: bool = False) -> None:
        for proto in list(self.children.values()):
            if only_reload_ready and not os.path.exists(
                    _ready_path(self.role.metrics_dir, proto.pid)):
                continue
            try:
                proto.transport.signalProcess(signum)  # type: ignore[union-attr]
            except Exception:  # already gone (ProcessExitedAlready)
                pass

    def stop(self) -> None:
        """SIGTERM every worker (they drain in parallel with the parent)."""
        self.stopping = True
        for call in self._respawns.values():
            if call.active():
                call.cancel()
        self._respawns.clear()
        self.signal_all(signal.SIGTERM)

    @defer.inlineCallbacks
    def wait(self, timeout: float) -> Any:
        """Until every worker has exited; SIGKILL after ``timeout`` seconds."""
        pending = [p.ended for p in self.children.values()]
        if not pending:
            return None
        done = defer.DeferredList(pending)
        timer = self.reactor.callLater(timeout, self.signal_all, signal.SIGKILL)
        yield done
        if timer.active():
            timer.cancel()
        return None

    def cleanup(self) -> None:
        shutil.rmtree(self.role.metrics_dir, ignore_errors=True)


def _mark_process_dead(pid: int, metrics_dir: str) -> None:
    """Drop a dead process's live gauges (counters stay: their totals still count)."""
    try:
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, metrics_dir)  # type: ignore[no-untyped-call]
    except Exception:
        log.failure("could not clean up metrics of pid {pid}", pid=pid)


def set_parent_death_signal(signum: int = signal.SIGTERM) -> bool:
    """Linux: have the kernel send ``signum`` when the parent dies."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return bool(libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def _ready_path(metrics_dir: str, pid: int | None) -> str:
    return os.path.join(metrics_dir, f"reload-ready-{pid}")


def mark_reload_ready(metrics_dir: str) -> None:
    """A worker's SIGHUP handler is installed: the parent may forward reloads to it."""
    try:
        with open(_ready_path(metrics_dir, os.getpid()), "w"):
            pass
    except OSError as exc:  # then it misses reloads until restarted: say so
        log.warn("cannot mark this worker ready for reloads: {error}", error=str(exc))


def worker_main(argv: list[str] | None = None) -> int:
    """``python -m kotlin_smtp_py.worker``: one extra SMTP worker (spawned by the parent)."""
    parser = argparse.ArgumentParser(prog="kotlin_smtp_py.worker")
    parser.add_argument("--config", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--count", type=int, required=True)
    parser.add_argument("--ports", required=True)
    parser.add_argument("--metrics-dir", required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    parser.add_argument("--listen-fds", type=int, default=0,
                        help="inherited listening sockets, from fd 3 on (shared sockets)")
    args = parser.parse_args(argv)
    # A reload (SIGHUP) must not kill a worker that is still starting: its handler comes with
    # the service (the parent also waits for the mark made then, mark_reload_ready).
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    set_parent_death_signal()
    if os.getppid() != args.parent_pid:
        return 1  # the parent died before the death signal was armed

    from twisted.internet import reactor
    from twisted.internet.task import LoopingCall
    from twisted.logger import globalLogBeginner

    from kotlin_smtp_py.eventloop import guard_stop_signals, lighten_dispatch
    from kotlin_smtp_py.log import configure_logging
    from kotlin_smtp_py.memory import tune_malloc
    from kotlin_smtp_py.twistd import load_or_exit

    config = load_or_exit(args.config)
    tune_malloc()
    lighten_dispatch(reactor)
    guard_stop_signals(reactor)
    globalLogBeginner.beginLoggingTo([configure_logging(config.logging)],
                                     redirectStandardIO=False)
    role = ClusterRole(index=args.index, count=args.count, metrics_dir=args.metrics_dir,
                       ports=[int(p) for p in args.ports.split(",") if p],
                       listen_fds=[FIRST_LISTEN_FD + i for i in range(args.listen_fds)])
    from kotlin_smtp_py.service import SmtpService

    svc = SmtpService(config, reactor=reactor, config_path=os.path.abspath(args.config),
                      cluster=role)
    status = {"code": 0}

    def start() -> None:
        try:
            svc.startService()
        except Exception:
            log.failure("SMTP worker {index} failed to start", index=args.index)
            status["code"] = 1
            reactor.stop()

    def orphaned() -> None:
        if os.getppid() != args.parent_pid and reactor.running:
            log.warn("parent process gone; SMTP worker {index} stopping", index=args.index)
            reactor.stop()

    reactor.callWhenRunning(start)
    reactor.addSystemEventTrigger("before", "shutdown", svc.stopService)
    watch = LoopingCall(orphaned)
    watch.clock = reactor
    reactor.callWhenRunning(watch.start, 1.0, False)
    reactor.run()
    return status["code"]
