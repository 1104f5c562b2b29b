"""Servers under test (ours via twistd, a private Postfix), load generators and /proc sampling.

Everything binds 127.0.0.1 only and lives in one temporary directory per run; every process we
start is stopped by pid when the run ends. Every wait is bounded.
"""

from __future__ import annotations

import collections
import grp
import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = REPO / ".venv" / "bin"
SMTPLOAD = Path("/work/shared/tools/smtpload.py")
SMTP_SOURCE = shutil.which("smtp-source") or "/usr/sbin/smtp-source"
SMTP_SINK = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
CLK_TCK = os.sysconf("SC_CLK_TCK")


BENCH_BASE = Path(os.environ.get("BENCH_DIR") or tempfile.gettempdir()) / "kotlin-smtp-bench"
_LAST_REMOVAL = BENCH_BASE / ".last-removal"
# ext4 without a journal (this VM's root file system) will not reuse an inode freed in the
# last 60 s (300 s while its inode-table block is dirty, which new files in the same group keep
# it) and checks every such inode of the group on each file creation. Right after a run
# removed its ~10,000 files, creating a file cost us (and Postfix) several times its normal
# CPU (perf: recently_deleted, find_inode_bit in openat): W1 halved, and back-to-back runs
# disagreed by 2x. BENCH_DIR=/some/dir runs the benchmarks on another file system.
SETTLE_SECONDS = 300.0


def bench_root(prefix: str, settle: float = SETTLE_SECONDS) -> Path:
    """A fresh directory for one benchmark run, after waiting until the last run's removal
    is ``settle`` seconds old (see SETTLE_SECONDS). Other deletions on the same file system
    (the test suite, say) are not tracked: measure on a quiet machine."""
    BENCH_BASE.mkdir(mode=0o755, exist_ok=True)
    try:
        wait = settle - (time.time() - _LAST_REMOVAL.stat().st_mtime)
    except FileNotFoundError:
        wait = 0.0
    if wait > 0:
        print(f"waiting {wait:.0f}s for the file system to forget the last run's deleted "
              f"files (--settle)", flush=True)
        time.sleep(wait)
    root = Path(tempfile.mkdtemp(prefix=prefix, dir=BENCH_BASE))
    os.chmod(root, 0o755)
    return root


def remove_bench_root(root: Path) -> None:
    shutil.rmtree(root, ignore_errors=True)
    _LAST_REMOVAL.touch()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(pred: Callable[[], bool], timeout: float, interval: float = 0.05,
               what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}")


def banner_ok(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            ok = s.recv(128).startswith(b"220")
            s.sendall(b"QUIT\r\n")
            return ok
    except OSError:
        return False


def loadavg() -> str:
    with open("/proc/loadavg") as fh:
        return " ".join(fh.read().split()[:3])


# -- /proc -----------------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            raw = fh.read()
    except OSError:
        return None
    return raw[raw.rindex(")") + 2:].split()


def cpu_times(pid: int) -> tuple[float, float] | None:
    """(own utime+stime, reaped children's cutime+cstime) of ``pid``, None once it is gone."""
    f = _stat_fields(pid)
    if f is None:
        return None
    return ((int(f[11]) + int(f[12])) / CLK_TCK,  # fields 14, 15 (utime, stime)
            (int(f[13]) + int(f[14])) / CLK_TCK)  # fields 16, 17 (cutime, cstime)


def ppid(pid: int) -> int | None:
    f = _stat_fields(pid)
    return int(f[1]) if f else None


def descendants(root: int) -> list[int]:
    by_parent: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            p = ppid(int(name))
            if p is not None:
                by_parent.setdefault(p, []).append(int(name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(by_parent.get(pid, []))
    return out


def status_kib(pid: int, key: str) -> int:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


class TreeStats:
    """CPU and memory of a process tree; samples RSS in a thread to catch the peak.

    CPU: the tree's processes' own time at the end, plus what their reaped children added to
    their ``cutime`` (a child that exits during the run is counted there, once: Postfix's
    short-lived smtpd and cleanup processes), minus the time before the start of children
    that were already running then. (Until 2026-11 a child's last sample was counted as well
    as its share of its parent's ``cutime``, which overstated Postfix's CPU.)"""

    def __init__(self, root: int) -> None:
        self.root = root
        self.start_cpu: dict[int, tuple[float, float]] = {}
        self.processes: set[int] = set()
        self.peak_rss_kib = 0  # of the sum over the tree
        self.hwm_kib: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def begin(self) -> None:
        for pid in descendants(self.root):
            times = cpu_times(pid)
            if times is not None:
                self.start_cpu[pid] = times
        self._thread.start()

    def _sample(self) -> None:
        total = 0
        for pid in descendants(self.root):
            self.processes.add(pid)
            total += status_kib(pid, "VmRSS")
            self.hwm_kib[pid] = max(self.hwm_kib.get(pid, 0), status_kib(pid, "VmHWM"))
        self.peak_rss_kib = max(self.peak_rss_kib, total)

    def _run(self) -> None:
        while not self._stop.wait(0.2):
            self._sample()

    def end(self) -> dict[str, Any]:
        self._sample()
        self._stop.set()
        self._thread.join(5)
        cpu = 0.0
        alive = descendants(self.root)
        for pid in alive:
            times = cpu_times(pid)
            if times is None:
                continue
            own0, reaped0 = self.start_cpu.get(pid, (0.0, 0.0))
            cpu += times[0] - own0 + times[1] - reaped0
        for pid, (own0, reaped0) in self.start_cpu.items():
            if pid not in alive:  # reaped during the run with its whole life's time
                cpu -= own0 + reaped0
        return {"cpu_s": cpu, "peak_rss_sum_mib": self.peak_rss_kib / 1024,
                "max_vmhwm_mib": max(self.hwm_kib.values(), default=0) / 1024,
                "processes": len(self.processes)}


# -- our server --------------------------------------------------------------------------------


class OurServer:
    """``twistd -n --pidfile= smtp --config <generated>`` with a fresh spool and Maildirs."""

    name = "kotlin-smtp-py"

    def __init__(self, root: Path, workers: int | None = None, user: str = "bench",
                 relay_to: int | None = None, max_size: int = 64 * 1024 * 1024,
                 level: str = "info", concurrency: int = 8,
                 per_destination: int | None = None,
                 settings: Sequence[str] = ()) -> None:
        """``settings``: ``dotted.key=value`` overrides (YAML values), as ``--set`` gives them."""
        self.root = root
        self.port = free_port()
        self.user = user
        self.recipient = f"{user}@localhost"
        for sub in ("spool", "temp", "lists", f"mailboxes/{user}"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        smtp: dict[str, Any] = {
            "hostname": "bench.test",
            "listeners": [{"port": self.port, "bindAddress": "127.0.0.1",
                           "idleTimeoutSeconds": 120}],
            "routing": {"localDomain": "localhost"},
            "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                        "listsDir": str(root / "lists")},
            "spool": {"type": "file", "dir": str(root / "spool"), "retryDelaySeconds": 5,
                      "workerConcurrency": concurrency},
            "limits": {"maxMessageSizeBytes": max_size},
            "lifecycle": {"gracefulShutdownTimeoutMs": 3000},
        }
        self.workers = workers if workers is not None else os.cpu_count()
        if workers is not None:
            smtp["workers"] = workers
        if relay_to is not None:
            smtp["relay"] = {"enabled": True, "requireAuthForRelay": False,
                             "allowedClientCidrs": ["127.0.0.0/8"],
                             "defaultRoute": {"host": "127.0.0.1", "port": relay_to,
                                              "startTlsEnabled": False}}
            if per_destination is not None:
                smtp["relay"]["maxConnectionsPerDestination"] = per_destination
        conf = {"smtp": smtp,
                "management": {"server": {"port": free_port(), "bindAddress": "127.0.0.1"}},
                # stdout into a pipe we drain (like journald): a log *file* on a disk that
                # other processes fsync heavily blocks the reactor in write(2) (measured).
                "logging": {"format": "text", "level": level, "file": "stdout"}}
        for setting in settings:
            key, sep, value = setting.partition("=")
            if not sep:
                raise ValueError(f"--set wants KEY=VALUE, got {setting!r}")
            # A dotted key as written: the server's config loader nests it and merges it
            # over the sections above (they come first in the file, so the setting wins).
            conf[key] = yaml.safe_load(value)
        self.config_path = root / "config.yaml"
        self.config_path.write_text(yaml.safe_dump(conf, sort_keys=False))
        self.management_port = conf["management"]["server"]["port"]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            [str(VENV_BIN / "twistd"), "-n", "--pidfile=", "smtp", "--config",
             str(self.config_path)], cwd=self.root, env=env, stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.tail: collections.deque[bytes] = collections.deque(maxlen=200)
        self.workers_serving = 0
        threading.Thread(target=self._drain_output, daemon=True).start()

        def up() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError("twistd exited:\n" + b"".join(self.tail).decode())
            return banner_ok(self.port)

        wait_until(up, timeout, what="our SMTP banner")
        if self.workers is not None and self.workers > 1:  # spawned workers start later
            # Their "serving" line, not a count of LISTEN sockets: with
            # smtp.workerSockets=shared every process waits on the parent's one.
            wait_until(lambda: self.workers_serving >= self.workers - 1, 120,  # type: ignore
                       interval=0.2, what="every worker serving")

    def _drain_output(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in iter(self.proc.stdout.readline, b""):
            self.tail.append(line)
            if b"SMTP worker" in line and b" serving" in line:
                self.workers_serving += 1

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def delivered(self) -> int:
        n = 0
        for sub in ("new", "cur"):
            d = self.root / "mailboxes" / self.user / "Maildir" / sub
            if d.is_dir():
                n += sum(1 for _ in os.scandir(d))
        return n

    def queued(self) -> int:
        q = self.root / "spool" / "queue"
        return sum(1 for e in os.scandir(q) if e.name.endswith(".json")) if q.is_dir() else 0

    def stop(self) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)


# -- Postfix -----------------------------------------------------------------------------------

POSTFIX_MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
pickup    unix  n - n 60 1 pickup
cleanup   unix  n - n - 0 cleanup
qmgr      unix  n - n 300 1 qmgr
rewrite   unix  - - n - - trivial-rewrite
bounce    unix  - - n - 0 bounce
defer     unix  - - n - 0 bounce
trace     unix  - - n - 0 bounce
verify    unix  - - n - 1 verify
flush     unix  n - n 1000? 0 flush
proxymap  unix  - - n - - proxymap
smtp      unix  - - n - - smtp
relay     unix  - - n - - smtp
showq     unix  n - n - - showq
error     unix  - - n - - error
retry     unix  - - n - - error
discard   unix  - - n - - discard
virtual   unix  - n n - - virtual
anvil     unix  - - n - 1 anvil
scache    unix  - - n - 1 scache
postlog   unix-dgram n - n - 1 postlogd
"""


def postfix_missing() -> str | None:
    if not os.path.exists("/usr/sbin/postfix"):
        return "postfix is not installed (apt-get install postfix)"
    if os.geteuid() != 0:
        return "a private Postfix instance needs root"
    try:
        pwd.getpwnam("postfix")
        grp.getgrnam("postdrop")
    except KeyError:
        return "the postfix user or postdrop group is missing"
    return None


class PostfixServer:
    """A private Postfix: own config/queue/data dirs, 127.0.0.1:<free port>, normal fsync'd
    queue, delivering to ``discard:`` (or relaying to ``relay_to``)."""

    name = "postfix"

    def __init__(self, root: Path, relay_to: int | None = None, maildir: bool = False) -> None:
        """``maildir``: deliver into ``mail/bench/Maildir`` with virtual(8) instead of
        ``discard:``, i.e. the same work our server does (the issue's reference uses discard)."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        os.chmod(root, 0o755)
        self.port = free_port()
        self.recipient = "bench@bench.invalid"
        self.maildir = maildir
        self.etc = root / "etc"
        for sub in ("etc", "queue", "data", "mail"):
            (root / sub).mkdir(exist_ok=True)
        pw = pwd.getpwnam("postfix")
        os.chown(root / "data", pw.pw_uid, pw.pw_gid)
        os.chown(root / "mail", pw.pw_uid, pw.pw_gid)
        if relay_to is not None:
            transport = (f"default_transport = smtp\nrelayhost = [127.0.0.1]:{relay_to}\n"
                         "smtp_tls_security_level = none\n")
        elif maildir:
            transport = (f"virtual_mailbox_domains = bench.invalid\n"
                         f"virtual_mailbox_base = {root}/mail\n"
                         "virtual_mailbox_maps = static:bench/Maildir/\n"
                         f"virtual_uid_maps = static:{pw.pw_uid}\n"
                         f"virtual_gid_maps = static:{pw.pw_gid}\n"
                         "virtual_minimum_uid = 1\n"
                         "default_transport = discard:\nlocal_transport = discard:\n")
        else:
            transport = "default_transport = discard:\nlocal_transport = discard:\n"
        (self.etc / "main.cf").write_text(f"""\
compatibility_level = 3.6
config_directory = {self.etc}
queue_directory = {root}/queue
data_directory = {root}/data
meta_directory = /etc/postfix
mail_owner = postfix
setgid_group = postdrop
myhostname = postfix.bench.test
mydomain = bench.test
mydestination =
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
mynetworks = 127.0.0.0/8
smtpd_peername_lookup = no
smtpd_client_connection_count_limit = 0
smtpd_client_connection_rate_limit = 0
default_process_limit = 100
append_dot_mydomain = no
biff = no
maillog_file = {root}/maillog
maillog_file_prefixes = {root}
alias_maps =
alias_database =
{transport}""")
        (self.etc / "master.cf").write_text(POSTFIX_MASTER_CF.format(port=self.port))

    def _postfix(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["/usr/sbin/postfix", "-c", str(self.etc), *args],
                              capture_output=True, text=True, timeout=60)

    def start(self, timeout: float = 30) -> None:
        run = self._postfix("start")
        if run.returncode != 0:
            raise RuntimeError(f"postfix start failed: {run.stderr}")
        wait_until(lambda: banner_ok(self.port), timeout, what="postfix banner")

    @property
    def pid(self) -> int:
        return int((self.root / "queue" / "pid" / "master.pid").read_text().strip())

    def queued(self) -> int:
        n = 0
        for sub in ("incoming", "active", "deferred", "maildrop", "hold"):
            d = self.root / "queue" / sub
            if d.is_dir():
                n += sum(len(files) for _, _, files in os.walk(d))
        return n

    def delivered(self) -> int:
        """Messages the discard agent (or relay) finished, from the maillog."""
        try:
            text = (self.root / "maillog").read_text(errors="replace")
        except OSError:
            return 0
        return text.count("status=sent")

    def stop(self) -> int | None:
        try:
            pid = self.pid
        except (OSError, ValueError):
            self._postfix("stop")
            return None
        os.kill(pid, signal.SIGTERM)
        try:
            wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 15, what="postfix exit")
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
        return 0


# -- load --------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    tool: str
    messages: int
    errors: int
    seconds: float
    message_bytes: int
    latencies_ms: list[float] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def msgs_per_s(self) -> float:
        return self.messages / self.seconds if self.seconds else 0.0

    @property
    def mb_per_s(self) -> float:
        return self.messages * self.message_bytes / 1e6 / self.seconds if self.seconds else 0.0

    def pct(self, q: float) -> float | None:
        if not self.latencies_ms:
            return None
        if len(self.latencies_ms) == 1:
            return self.latencies_ms[0]
        return statistics.quantiles(self.latencies_ms, n=100, method="inclusive")[int(q) - 1]


def run_smtp_source(port: int, recipient: str, clients: int, messages: int, body_bytes: int,
                    persistent: bool, timeout: float) -> LoadResult:
    argv = [SMTP_SOURCE, "-s", str(clients), "-m", str(messages), "-l", str(body_bytes),
            "-f", "loader@bench.test", "-t", recipient, "-M", "loader.bench.test"]
    if persistent:
        argv.append("-d")
    argv.append(f"127.0.0.1:{port}")
    started = time.monotonic()
    run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    seconds = time.monotonic() - started
    errors = 0 if run.returncode == 0 else messages
    return LoadResult("smtp-source", messages, errors, seconds, body_bytes,
                      extra={"stderr": run.stderr[-2000:]})


def run_smtpload(port: int, recipient: str, clients: int, messages: int, body_bytes: int,
                 persistent: bool, timeout: float) -> LoadResult:
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        argv = [sys.executable, str(SMTPLOAD), "--host", "127.0.0.1", "--port", str(port),
                "--clients", str(clients), "--messages", str(messages), "--body-bytes",
                str(body_bytes), "--rcpt-to", recipient, "--max-seconds", str(int(timeout)),
                "--json-out", out.name]
        if persistent:
            argv.append("--persistent")
        subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 30)
        report = json.loads(Path(out.name).read_text() or "{}")
    res = LoadResult("smtpload", int(report.get("ok", 0)), int(report.get("errors", 0)),
                     float(report.get("elapsed_s") or 0.0),
                     int(report.get("message_bytes", body_bytes)), extra={"report": report})
    res.extra["percentiles_ms"] = {q: report.get(f"lat_ms_p{q}") for q in (50, 95, 99)}
    return res


class LatencyProbe(threading.Thread):
    """One extra client that sends messages back to back during the load and records the
    latency of each (connect .. 250 after the dot; persistent: MAIL .. 250)."""

    def __init__(self, port: int, recipient: str, body_bytes: int, persistent: bool,
                 max_messages: int = 100000) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.recipient = recipient
        self.persistent = persistent
        self.max_messages = max_messages
        line = b"x" * 510 + b"\r\n"
        body = (line * (body_bytes // len(line) + 1))[:body_bytes]
        body = body[: body.rfind(b"\r\n") + 2] if b"\r\n" in body else body + b"\r\n"
        self.message = (b"From: probe@bench.test\r\nTo: " + recipient.encode() +
                        b"\r\nSubject: probe\r\n\r\n" + body + b".\r\n")
        self.latencies_ms: list[float] = []
        self.sent = 0
        self.errors = 0
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(60)

    @staticmethod
    def _reply(f: Any) -> bytes:
        while True:
            line = f.readline()
            if not line:
                raise OSError("connection closed")
            if line[3:4] != b"-":
                return bytes(line)

    def _transaction(self, s: socket.socket, f: Any) -> None:
        for cmd, code in ((b"MAIL FROM:<probe@bench.test>\r\n", b"250"),
                          (b"RCPT TO:<" + self.recipient.encode() + b">\r\n", b"250"),
                          (b"DATA\r\n", b"354")):
            s.sendall(cmd)
            if not self._reply(f).startswith(code):
                raise OSError(f"unexpected reply to {cmd!r}")
        s.sendall(self.message)
        if not self._reply(f).startswith(b"250"):
            raise OSError("message refused")

    def _connect(self) -> tuple[socket.socket, Any]:
        s = socket.create_connection(("127.0.0.1", self.port), timeout=60)
        f = s.makefile("rb")
        self._reply(f)
        s.sendall(b"EHLO probe.bench.test\r\n")
        self._reply(f)
        return s, f

    def run(self) -> None:
        conn: tuple[socket.socket, Any] | None = None
        while not self._halt.is_set() and self.sent < self.max_messages:
            t0 = time.monotonic()
            try:
                if conn is None:
                    conn = self._connect()
                    if self.persistent:
                        t0 = time.monotonic()
                self._transaction(*conn)
                self.latencies_ms.append((time.monotonic() - t0) * 1000)
                self.sent += 1
                if not self.persistent:
                    conn[0].sendall(b"QUIT\r\n")
                    conn[0].close()
                    conn = None
            except OSError:
                self.errors += 1
                if conn is not None:
                    conn[0].close()
                conn = None
                time.sleep(0.05)
        if conn is not None:
            conn[0].close()
