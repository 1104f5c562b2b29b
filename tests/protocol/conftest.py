"""A real server (SmtpService on loopback, port 0) per test, configured from a dict."""

from __future__ import annotations

import copy
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CertSet, on_reactor, wait_until

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.service import SmtpService


def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in extra.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _merge(out[k], v)
        else:
            out[k] = v
    return out


class Server:
    def __init__(self, service: SmtpService, root: Path) -> None:
        self.service = service
        self.root = root

    @property
    def port(self) -> int:
        return self.service.smtp_port(0)

    def port_of(self, index: int) -> int:
        return self.service.smtp_port(index)

    def maildir(self, user: str) -> Path:
        return self.root / "mailboxes" / user / "Maildir"

    def messages(self, user: str) -> list[bytes]:
        new = self.maildir(user) / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir())]

    def wait_messages(self, user: str, count: int, timeout: float = 15) -> list[bytes]:
        return wait_until(lambda: (m := self.messages(user)) and len(m) >= count and m,
                          timeout=timeout, message=f"{count} message(s) for {user}")

    def spool_entries(self) -> list[Path]:
        return sorted((self.root / "spool" / "queue").glob("*.json"))


@pytest.fixture
def make_server(tmp_path: Path, certs: CertSet, reactor_thread: None
                ) -> Iterator[Callable[..., Server]]:
    started: list[SmtpService] = []

    def make(overrides: dict[str, Any] | None = None, users: tuple[str, ...] = ("alice", "bob"),
             tls: bool = True) -> Server:
        root = tmp_path / f"srv{len(started)}"
        for sub in ("spool", "temp", "lists"):
            (root / sub).mkdir(parents=True)
        for user in users:
            (root / "mailboxes" / user).mkdir(parents=True)
        base: dict[str, Any] = {
            "smtp": {
                "hostname": "mx.test",
                "listeners": [{"port": 0, "bindAddress": "127.0.0.1"}],
                "routing": {"localDomain": "localhost", "localDomains": ["example.test"]},
                "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                            "listsDir": str(root / "lists")},
                "spool": {"type": "file", "dir": str(root / "spool"), "retryDelaySeconds": 1},
                "limits": {"maxMessageSizeBytes": 1_000_000},
                "lifecycle": {"gracefulShutdownTimeoutMs": 2000},
            },
        }
        if tls:
            base["smtp"]["ssl"] = {"enabled": True, "certChainFile": str(certs.cert),
                                   "privateKeyFile": str(certs.key)}
        config = cfg.load_text(yaml.safe_dump(_merge(base, overrides or {})))
        svc = on_reactor(SmtpService, config)
        on_reactor(svc.startService)
        started.append(svc)
        return Server(svc, root)

    yield make
    for svc in started:
        on_reactor(svc.stopService, timeout=30)


class Client:
    """A raw-socket SMTP client that reads replies exactly (for pipelining/smuggling tests)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 10) -> None:
        self.sock: Any = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self) -> tuple[int, list[str]]:
        """Read one (possibly multi-line) reply: (code, lines without the code prefix)."""
        lines: list[str] = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"closed; partial={self.buf!r} lines={lines}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            text = line.decode("utf-8", "replace")
            lines.append(text[4:])
            if text[3:4] != "-":
                return int(text[:3]), lines

    def replies(self, n: int) -> list[int]:
        return [self.reply()[0] for _ in range(n)]

    def cmd(self, line: str | bytes) -> tuple[int, list[str]]:
        self.send((line.encode() if isinstance(line, str) else line) + b"\r\n")
        return self.reply()

    def starttls(self, ca: Path, server_hostname: str = "localhost") -> None:
        ctx = ssl.create_default_context(cafile=str(ca))
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname)

    def closed(self, timeout: float = 10) -> bool:
        """True when the server closed the connection (reads until EOF)."""
        self.sock.settimeout(timeout)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except (ConnectionResetError, ssl.SSLError):
            return True
        except TimeoutError:
            return False

    def close(self) -> None:
        self.sock.close()
