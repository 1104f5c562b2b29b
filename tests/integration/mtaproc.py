"""A real ``twistd -n smtp`` server in a subprocess, for the integration and CLI suites.

Every port comes from ``helpers.free_port``; every directory lives under the test's tmp_path.
The process is always stopped by whoever started it (fixtures call :meth:`MtaProcess.close`).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

TESTS_DIR = Path(__file__).resolve().parent.parent
if str(TESTS_DIR) not in sys.path:
    sys.path.insert(0, str(TESTS_DIR))

from helpers import deep_merge, free_port, wait_until  # noqa: E402

REPO = TESTS_DIR.parent
VENV_BIN = REPO / ".venv" / "bin"
TWISTD = str(VENV_BIN / "twistd")
KOTLIN_SMTP = str(VENV_BIN / "kotlin-smtp")
PYTHON = str(VENV_BIN / "python")


def proc_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    # hermetic: placeholders of the embedded default config must not leak in from the caller
    for key in list(env):
        if key.startswith(("SMTP_", "KOTLIN_SMTP")) or key in ("MANAGEMENT_PORT", "LOG_FORMAT"):
            del env[key]
    if extra:
        env.update(extra)
    return env


def make_config(root: Path, smtp_port: int | None = None, users: tuple[str, ...] = ("alice", "bob"),
                overrides: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A complete config dict with every path under ``root`` and mailboxes for ``users``."""
    for sub in ("spool", "temp", "lists", "mailboxes"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for user in users:
        (root / "mailboxes" / user).mkdir(exist_ok=True)
    conf: dict[str, Any] = {
        "smtp": {
            "hostname": "mx.test",
            "workers": 1,  # one process: RSS and log checks see the whole server
            "listeners": [{"port": smtp_port if smtp_port is not None else free_port(),
                           "bindAddress": "127.0.0.1", "idleTimeoutSeconds": 60}],
            "routing": {"localDomain": "localhost", "localDomains": ["example.test"]},
            "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                        "listsDir": str(root / "lists")},
            "spool": {"type": "file", "dir": str(root / "spool"), "retryDelaySeconds": 1},
            "lifecycle": {"gracefulShutdownTimeoutMs": 3000},
        },
        "management": {"server": {"port": free_port(), "bindAddress": "127.0.0.1"}},
        "logging": {"format": "text", "level": "info"},
    }
    return deep_merge(conf, overrides or {})


def write_config(path: Path, conf: Mapping[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(dict(conf), sort_keys=False), encoding="utf-8")
    return path


def smtp_banner(port: int, timeout: float = 1.0) -> bytes | None:
    """The greeting of a server on 127.0.0.1:port, or None when nothing answers."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            data = b""
            while not data.endswith(b"\r\n"):
                chunk = s.recv(512)
                if not chunk:
                    break
                data += chunk
            try:
                s.sendall(b"QUIT\r\n")
            except OSError:
                pass
            return data
    except OSError:
        return None


def port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


class MtaProcess:
    """``twistd -n --pidfile= smtp [--config FILE]`` with its output in ``<root>/twistd-N.log``."""

    def __init__(self, root: Path, port: int, config_path: Path | None,
                 cwd: Path | None = None, env: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.port = port
        self.config_path = config_path
        self.cwd = cwd or root
        self.env = proc_env(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.runs = 0
        self.log_path = root / "twistd-0.log"

    @classmethod
    def from_config(cls, root: Path, conf: Mapping[str, Any], name: str = "config.yaml",
                    **kwargs: Any) -> MtaProcess:
        path = write_config(root / name, conf)
        return cls(root, int(conf["smtp"]["listeners"][0]["port"]), path, **kwargs)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def argv(self) -> list[str]:
        args = [TWISTD, "-n", "--pidfile=", "smtp"]
        if self.config_path is not None:
            args += ["--config", str(self.config_path)]
        return args

    def start(self, wait: bool = True, timeout: float = 60.0) -> MtaProcess:
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.runs += 1
        self.log_path = self.root / f"twistd-{self.runs}.log"
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.argv(), cwd=self.cwd, env=self.env, stdout=log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        if wait:
            self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"twistd exited with {self.proc.returncode} before "
                                     f"listening:\n{self.log()}")
            banner = smtp_banner(self.port)
            return bool(banner and banner.startswith(b"220"))

        wait_until(ready, timeout=timeout, interval=0.05, message=f"SMTP banner on {self.port}")

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def kill(self) -> int:
        """SIGKILL and reap; returns the exit status (-9)."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        return self.proc.wait(10)

    def terminate(self, timeout: float = 15.0) -> tuple[int, float]:
        """SIGTERM; returns (exit status, seconds it took to exit)."""
        assert self.proc is not None
        started = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        rc = self.proc.wait(timeout)
        return rc, time.monotonic() - started

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)


def maildir_files(mailbox_dir: Path, user: str) -> list[Path]:
    root = mailbox_dir / user / "Maildir"
    out: list[Path] = []
    for sub in ("new", "cur"):
        d = root / sub
        if d.is_dir():
            out.extend(p for p in d.iterdir() if p.is_file())
    return out


def spool_entries(spool_dir: Path) -> list[str]:
    queue = spool_dir / "queue"
    if not queue.is_dir():
        return []
    return sorted(p.name[:-5] for p in queue.iterdir() if p.name.endswith(".json"))


def vm_rss_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class MtaPool:
    """Starts servers for one test and kills whatever is still running at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[MtaProcess] = []
        self._n = 0

    def root(self) -> Path:
        self._n += 1
        root = self.tmp_path / f"mta{self._n}"
        root.mkdir()
        return root

    def from_config(self, conf: Mapping[str, Any], root: Path, start: bool = True,
                    **kwargs: Any) -> MtaProcess:
        proc = MtaProcess.from_config(root, conf, **kwargs)
        self.procs.append(proc)
        return proc.start() if start else proc

    def new(self, overrides: Mapping[str, Any] | None = None, start: bool = True,
            users: tuple[str, ...] = ("alice", "bob")) -> tuple[MtaProcess, dict[str, Any]]:
        root = self.root()
        conf = make_config(root, users=users, overrides=overrides)
        return self.from_config(conf, root, start=start), conf

    def adopt(self, proc: MtaProcess) -> MtaProcess:
        self.procs.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.procs:
            proc.close()

    def __enter__(self) -> MtaPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
