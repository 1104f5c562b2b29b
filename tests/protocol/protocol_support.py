"""Test support for the protocol suite: a handle on a running server and a raw SMTP client."""

from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import Any

from helpers import wait_until

from kotlin_smtp_py.service import SmtpService


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


def scrape_metrics(management_port: int) -> dict[str, float]:
    """The server's /metrics as {series (name and labels): value}."""
    import urllib.request

    text = urllib.request.urlopen(f"http://127.0.0.1:{management_port}/metrics",
                                  timeout=10).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            out[name] = float(value)
    return out
