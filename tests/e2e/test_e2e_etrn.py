"""ETRN and ``kotlin-smtp queue flush`` make deferred mail go now; cooldown and refusals."""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
from pathlib import Path

from e2e_support import PASSWORD, message, ssl_client_context, submit
from helpers import wait_until
from outbound_sink import Behaviour

ETRN_ON = {"smtp": {"features": {"etrnEnabled": True}}}
SOFT = {"later@normal.test": b"451 4.3.0 come back later"}


def _deferred(server, sink, certs, subject: str) -> dict:
    """Queue a message the sink defers once; return its entry (attempts=1, due in ~60 s)."""
    sink.behaviour.rcpt.update(SOFT)
    sessions = len(sink.sessions)
    submit(server, certs, "carol@localhost", ["later@normal.test"], message(subject))
    server.pump(lambda: len(sink.sessions) > sessions, message="the first attempt")
    entry = server.pump(lambda: [e for e in server.entries() if e["attempts"] == 1
                                 and subject.encode() in _raw(server, e)],
                        message="the deferred entry")[0]
    server.settle()
    assert entry["next_attempt"] - server.now() >= 0.8 * 60 - 0.01
    sink.behaviour.rcpt.clear()  # the peer recovers; only a trigger can tell us now
    return entry


def _raw(server, entry: dict) -> bytes:
    for p in (server.root / "spool" / "queue").glob(f"{entry['queue_id']}*"):
        if not p.name.endswith(".json"):
            return p.read_bytes()
    return b""


def _client(server, certs, login: bool = True) -> smtplib.SMTP:
    s = smtplib.SMTP("127.0.0.1", server.port, local_hostname="client.e2e.test", timeout=15)
    s.ehlo()
    s.starttls(context=ssl_client_context(certs))
    s.ehlo()
    if login:
        s.login("carol", PASSWORD)
    return s


def test_etrn_runs_deferred_mail_then_cooldown_refuses(e2e_server, sinks, certs) -> None:
    from twisted.logger import globalLogPublisher

    sink = sinks.start(behaviour=Behaviour())
    server = e2e_server(ETRN_ON)
    first = _deferred(server, sink, certs, "etrn one")
    events: list[dict] = []

    def observe(event: dict) -> None:
        if str(event.get("event", "")).startswith("etrn"):
            events.append(event)

    globalLogPublisher.addObserver(observe)
    try:
        _etrn_twice(server, sink, certs, first)
    finally:
        globalLogPublisher.removeObserver(observe)
    # Operators watch ETRN use in the logs (runbook playbook C): both outcomes are logged.
    accepted, refused = events
    assert (accepted["event"], accepted["domain"], accepted["n"], accepted["user"]) == (
        "etrn", "normal.test", 1, "carol")
    assert (refused["event"], refused["domain"]) == ("etrn_refused", "normal.test")


def _etrn_twice(server, sink, certs, first) -> None:
    with _client(server, certs) as s:
        assert "etrn" in s.esmtp_features
        code, text = s.docmd("ETRN normal.test")
        assert code == 250, text
        # The task.Clock stands still: only the ETRN can have made the entry due.
        server.pump(lambda: sink.transactions, message="delivery triggered by ETRN")
        assert sink.transactions[0].rcpts == ["RCPT TO:<later@normal.test>"]
        server.pump(lambda: not [e for e in server.entries()
                                 if e["queue_id"] == first["queue_id"]],
                    message="the entry to complete")
        second = _deferred(server, sink, certs, "etrn two")
        code, text = s.docmd("ETRN normal.test")  # inside triggerCooldownMillis (60 s)
        assert code == 458, text
    server.settle()
    assert len(sink.transactions) == 1, "a refused ETRN still delivered"
    [left] = server.entries()
    assert (left["queue_id"], left["attempts"]) == (second["queue_id"], 1)


def test_etrn_before_auth_is_refused(e2e_server, sinks, certs) -> None:
    sinks.start(behaviour=Behaviour())
    server = e2e_server(ETRN_ON)
    with _client(server, certs, login=False) as s:
        code, text = s.docmd("ETRN normal.test")
        assert (code, text[:5]) == (530, b"5.7.0")


def test_etrn_disabled_is_502(e2e_server, sinks, certs) -> None:
    sinks.start(behaviour=Behaviour())
    server = e2e_server()
    with _client(server, certs) as s:
        assert "etrn" not in s.esmtp_features
        assert s.docmd("ETRN normal.test")[0] == 502


def test_queue_flush_command_delivers_deferred_mail(e2e_server, sinks, certs) -> None:
    """The operator command, as a separate process, against a server on the real clock."""
    sink = sinks.start(behaviour=Behaviour(rcpt=dict(SOFT)))
    server = e2e_server({"smtp": {"spool": {"retryDelaySeconds": 600}}}, use_clock=False)
    submit(server, certs, "carol@localhost", ["later@normal.test"], message("flush"))
    wait_until(lambda: [e for e in server.entries() if e["attempts"] == 1],
               message="the deferred entry")
    sink.behaviour.rcpt.clear()
    exe = Path(sys.executable).with_name("kotlin-smtp")
    proc = subprocess.run([str(exe), "queue", "flush", "-c", str(server.config_path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert proc.returncode == 0, proc.stderr
    assert "1 entry scheduled" in proc.stdout
    # Next due in ≥ 480 s; the running server must act on the request within seconds.
    wait_until(lambda: sink.transactions, timeout=10, message="delivery after queue flush")
    wait_until(lambda: not server.entries(), timeout=10, message="an empty queue")
    assert len(sink.sessions) == 2


def test_etrn_releases_only_the_named_domain(e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour())
    server = e2e_server(ETRN_ON)
    entry = _deferred(server, sink, certs, "other domain")
    with _client(server, certs) as s:
        assert s.docmd("ETRN elsewhere.test")[0] == 250
    server.settle()
    assert sink.transactions == []
    [left] = server.entries()
    assert (left["queue_id"], left["attempts"]) == (entry["queue_id"], 1)
    assert left["next_attempt"] > server.now()


def _flush(server) -> subprocess.CompletedProcess[str]:
    exe = Path(sys.executable).with_name("kotlin-smtp")
    return subprocess.run([str(exe), "queue", "flush", "-c", str(server.config_path)],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": os.getcwd()})


def test_etrn_and_queue_flush_share_one_cooldown(e2e_server, sinks, certs) -> None:
    """Both are spool-run triggers: one inside the other's cooldown does nothing (4xx / 75)."""
    sinks.start(behaviour=Behaviour())
    server = e2e_server(ETRN_ON)  # triggerCooldownMillis 60 s
    with _client(server, certs) as s:
        assert s.docmd("ETRN normal.test")[0] == 250
    after_etrn = _flush(server)
    assert after_etrn.returncode == 75, (after_etrn.stdout, after_etrn.stderr)
    assert "cooldown" in after_etrn.stderr

    other = e2e_server(ETRN_ON)
    assert _flush(other).returncode == 0
    with _client(other, certs) as s:
        code, text = s.docmd("ETRN normal.test")
        assert code == 458, text
