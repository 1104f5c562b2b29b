"""A real server (SmtpService on loopback, port 0) per test, configured from a dict."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import CertSet, deep_merge, on_reactor, wait_until
from protocol_support import Server

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.service import SmtpService


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
            "management": {"server": {"port": 0}},
        }
        if tls:
            base["smtp"]["ssl"] = {"enabled": True, "certChainFile": str(certs.cert),
                                   "privateKeyFile": str(certs.key)}
        config = cfg.load_text(yaml.safe_dump(deep_merge(base, overrides or {})))
        svc = on_reactor(SmtpService, config)
        on_reactor(svc.startService)
        started.append(svc)
        if svc.redis is not None:
            # Ready means connected: the listener is up at once, the Redis connection a moment
            # later (under load, after the first message: 451 at DATA, a test flake).
            redis = svc.redis
            wait_until(lambda: redis.connected, timeout=30, message="the server's Redis")
        return Server(svc, root)

    yield make
    for svc in started:
        on_reactor(svc.stopService, timeout=30)


@pytest.fixture
def failures() -> Iterator[list[dict[str, Any]]]:
    """Failure events (tracebacks) logged in this process — the server runs in-process —
    during the test."""
    from twisted.logger import globalLogPublisher

    got: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if "log_failure" in event or event.get("isError"):
            got.append(event)

    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    yield got
    globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]
