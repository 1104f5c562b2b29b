"""End-to-end machinery: a real SmtpService on loopback with relay enabled, talking to the
loopback DNS server (tests/outbound/outbound_support.py) and to scripted SMTP sinks
(tests/outbound/outbound_sink.py) or a private Postfix (postfix_support.py).

Time: a server built with ``clock=task.Clock()`` runs its scheduler and spool timestamps on that
clock, so nothing is delivered until the test advances it. ``pump`` advances the clock by zero
(firing ``callLater(0)`` triggers) while polling a condition against a real-time deadline.
"""

from __future__ import annotations

import json
import smtplib
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from helpers import CertSet, deep_merge, on_reactor, wait_until
from twisted.internet import task

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.service import SmtpService

PASSWORD = "correct horse battery staple"
HOSTNAME = "relay.e2e.test"  # never an MX in the test zone (that would be a mail loop)

# bcrypt with the lowest cost keeps AUTH fast; the hash format is what production uses.
_HASH = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode("ascii")


merge = deep_merge


class E2EServer:
    """A running SmtpService plus its directories, config file and (optional) task.Clock."""

    def __init__(self, service: SmtpService, root: Path, config_path: Path,
                 clock: task.Clock | None) -> None:
        self.service = service
        self.root = root
        self.config_path = config_path
        self.clock = clock

    @property
    def port(self) -> int:
        return self.service.smtp_port(0)

    # -- mailboxes -----------------------------------------------------------------------------

    def messages(self, user: str) -> list[bytes]:
        new = self.root / "mailboxes" / user / "Maildir" / "new"
        if not new.is_dir():
            return []
        return [p.read_bytes() for p in sorted(new.iterdir(), key=lambda p: p.stat().st_mtime_ns)]

    # -- spool ---------------------------------------------------------------------------------

    def entries(self) -> list[dict[str, Any]]:
        """Metadata of every queue entry (the JSON files the file spool writes)."""
        out = []
        for p in sorted((self.root / "spool" / "queue").glob("*.json")):
            try:
                out.append(json.loads(p.read_text()))
            except (OSError, ValueError):
                continue  # being replaced right now; the caller polls again
        return out

    # -- clock ---------------------------------------------------------------------------------

    def now(self) -> float:
        return float(on_reactor(self.service.clock.seconds))

    def advance(self, seconds: float) -> None:
        assert self.clock is not None, "server runs on the real clock"
        on_reactor(self.clock.advance, seconds)

    def idle(self) -> bool:
        """No pass running and no delivery in flight (read on the reactor thread)."""
        sched = self.service.scheduler
        return bool(on_reactor(lambda: not sched._running and sched.in_flight == 0))

    def pump(self, predicate: Callable[[], Any], timeout: float = 15.0,
             message: str = "condition") -> Any:
        """Fire due zero-delay calls on the task.Clock until ``predicate`` holds."""
        def step() -> Any:
            if self.clock is not None:
                self.advance(0)
            return predicate()
        return wait_until(step, timeout=timeout, message=message)

    def settle(self, timeout: float = 15.0) -> None:
        """Wait until the scheduler is idle with no trigger pending (task.Clock servers)."""
        sched = self.service.scheduler

        def quiet() -> bool:
            def check() -> bool:
                pending = sched._pending_call is not None and sched._pending_call.active()
                return not pending and not sched._running and sched.in_flight == 0
            if self.clock is not None:
                self.advance(0)
            return bool(on_reactor(check))

        wait_until(quiet, timeout=timeout, message="scheduler to go idle")


def ssl_client_context(certs: CertSet) -> ssl.SSLContext:
    return ssl.create_default_context(cafile=str(certs.ca_cert))


def submit(server: E2EServer, certs: CertSet, sender: str, recipients: list[str],
           message: bytes, user: str | None = "carol", mail_options: tuple[str, ...] = (),
           rcpt_options: tuple[str, ...] = ()) -> dict[str, tuple[int, bytes]]:
    """Authenticated submission over STARTTLS with smtplib; returns refused recipients."""
    with smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.e2e.test",
                      timeout=15) as s:
        s.ehlo()
        s.starttls(context=ssl_client_context(certs))
        s.ehlo()
        if user is not None:
            s.login(user, PASSWORD)
        return s.sendmail(sender, recipients, message, mail_options=list(mail_options),
                          rcpt_options=list(rcpt_options))


def make_server_factory(tmp_path: Path, certs: CertSet, dns_port: int, sink_port: int
                        ) -> Iterator[Callable[..., E2EServer]]:
    started: list[SmtpService] = []

    def make(overrides: dict[str, Any] | None = None, *, use_clock: bool = True,
             users: tuple[str, ...] = ("carol", "dave")) -> E2EServer:
        root = tmp_path / f"e2e{len(started)}"
        for sub in ("spool", "temp", "lists"):
            (root / sub).mkdir(parents=True)
        for user in users:
            (root / "mailboxes" / user).mkdir(parents=True)
        base: dict[str, Any] = {
            "smtp": {
                "hostname": HOSTNAME,
                "listeners": [{"port": 0, "bindAddress": "127.0.0.1"}],
                "routing": {"localDomain": "localhost"},
                "storage": {"mailboxDir": str(root / "mailboxes"),
                            "tempDir": str(root / "temp"), "listsDir": str(root / "lists")},
                "spool": {"type": "file", "dir": str(root / "spool"), "retryDelaySeconds": 60,
                          "maxRetries": 3, "triggerCooldownMillis": 60000},
                "ssl": {"enabled": True, "certChainFile": str(certs.cert),
                        "privateKeyFile": str(certs.key)},
                "auth": {"enabled": True, "allowPlaintextPasswords": False,
                         "users": {u: _HASH for u in users}},
                "dns": {"servers": [f"127.0.0.1:{dns_port}"], "timeoutMs": 2000},
                "relay": {
                    "enabled": True, "requireAuthForRelay": True,
                    "outboundTls": {"ports": [sink_port], "startTlsEnabled": True,
                                    "caFile": str(certs.ca_cert), "connectTimeoutMs": 3000,
                                    "readTimeoutMs": 3000},
                    # These tests count TCP sessions per attempt; the connection cache has its
                    # own tests (tests/outbound/test_outbound_session_cache.py).
                    "connectionCache": {"enabled": False},
                },
                "lifecycle": {"gracefulShutdownTimeoutMs": 1000},
            },
            "management": {"enabled": False},
        }
        text = yaml.safe_dump(merge(base, overrides or {}))
        config_path = root / "config.yaml"
        config_path.write_text(text)
        config = cfg.load_text(text)
        clock = task.Clock() if use_clock else None
        if clock is not None:
            clock.advance(1_000_000.0)  # far from 0 so "created"/"next_attempt" are plausible
        svc = on_reactor(SmtpService, config, clock=clock)
        on_reactor(svc.startService)
        started.append(svc)
        return E2EServer(svc, root, config_path, clock)

    yield make
    for svc in started:
        on_reactor(svc.stopService, timeout=30)


def rcpt_lines(sink: Any) -> list[list[str]]:
    """RCPT commands per session the sink saw (one list per connection)."""
    return [[c for c in s.commands if c.upper().startswith("RCPT")] for s in sink.sessions]


def message(subject: str, sender: str = "carol@localhost", to: str = "x@normal.test",
            body: bytes = b"Hello from the e2e suite.\r\n") -> bytes:
    """A message with Message-ID and Date so our server adds nothing but Received."""
    return (f"From: <{sender}>\r\nTo: <{to}>\r\nSubject: {subject}\r\n"
            f"Date: Tue, 02 Jan 2024 10:00:00 +0000\r\n"
            f"Message-ID: <{subject.replace(' ', '-')}@client.e2e.test>\r\n"
            f"MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
            ).encode() + body


def split_received(data: bytes) -> tuple[bytes, bytes]:
    """(our leading Received header, the rest) of a relayed message."""
    assert data.startswith(b"Received: "), data[:200]
    end = 0
    while True:
        nl = data.index(b"\r\n", end)
        end = nl + 2
        if data[end:end + 1] not in (b" ", b"\t"):
            return data[:end], data[end:]


def fail_or_skip(reason: str) -> None:
    import os

    if os.environ.get("CI") == "true":
        pytest.fail(f"required under CI: {reason}")
    pytest.skip(reason)


class Dsn:
    """A delivery status notification as found in a Maildir: parsed enough to assert on."""

    def __init__(self, raw: bytes) -> None:
        import email
        import email.policy

        self.raw = raw
        self.msg = email.message_from_bytes(raw, policy=email.policy.compat32)
        self.content_type = self.msg.get_content_type()
        self.report_type = self.msg.get_param("report-type")
        status = [p for p in self.msg.walk() if p.get_content_type() == "message/delivery-status"]
        assert len(status) == 1, "no message/delivery-status part"
        text = raw.decode("utf-8", "replace")
        start = text.index("Content-Type: message/delivery-status")
        boundary = str(self.msg.get_param("boundary"))
        block = text[start:text.index(f"--{boundary}", start)]
        self.fields: list[tuple[str, str]] = []
        for line in block.split("\r\n")[1:]:
            if ":" in line and not line.startswith((" ", "\t")):
                k, _, v = line.partition(":")
                self.fields.append((k.strip().lower(), v.strip()))

    def all(self, key: str) -> list[str]:
        return [v for k, v in self.fields if k == key.lower()]

    def one(self, key: str) -> str:
        values = self.all(key)
        assert len(values) == 1, (key, values)
        return values[0]

    @property
    def sender(self) -> str:
        return str(self.msg.get("Return-Path", ""))
