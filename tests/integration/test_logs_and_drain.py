"""A real twistd with JSON logs: audit lines per message, no secrets; drain of a stalled client."""

from __future__ import annotations

import base64
import json
import signal
import smtplib
import socket
import time
from pathlib import Path

from helpers import wait_until
from mtaproc import MtaProcess, make_config, write_config

PASSWORD = "Sup3r-S3cret-Pw!"
BODY_MARKER = "BODY-MARKER-7f3a9"


def test_json_logs_audit_trail_without_secrets(tmp_path: Path) -> None:
    conf = make_config(tmp_path / "data", overrides={
        "smtp": {"auth": {"users": {"carol": PASSWORD}, "failureDelayMs": 0},
                 "listeners": [{"port": 0, "bindAddress": "127.0.0.1",
                                "allowPlaintextAuth": True}]},
        "logging": {"format": "json"}})
    from helpers import free_port

    port = free_port()
    conf["smtp"]["listeners"][0]["port"] = port
    proc = MtaProcess(tmp_path / "data", port, write_config(tmp_path / "c.yaml", conf)).start()
    try:
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.ehlo("c.test")
            try:
                s.login("carol", "wrong-" + PASSWORD)
            except smtplib.SMTPAuthenticationError:
                pass
            s.login("carol", PASSWORD)
            s.sendmail("carol@localhost", ["alice@localhost"],
                       f"Subject: s\r\n\r\n{BODY_MARKER}\r\n".encode())
        mail = tmp_path / "data" / "mailboxes" / "alice" / "Maildir" / "new"
        wait_until(lambda: mail.is_dir() and any(mail.iterdir()), message="delivered")
        wait_until(lambda: "delivery_attempt" in proc.log(), message="delivery logged")
    finally:
        proc.terminate()
        proc.close()
    text = proc.log()
    records = []
    for line in text.splitlines():
        if line.startswith("{"):
            records.append(json.loads(line))
    assert records, text[:500]
    assert all({"timestamp", "level", "logger", "message"} <= set(r) for r in records)
    accepted = [r for r in records if r.get("event") == "message_accepted"]
    assert len(accepted) == 1 and accepted[0]["queue_id"] and accepted[0]["peer"] == "127.0.0.1"
    qid = accepted[0]["queue_id"]
    attempts = [r for r in records if r.get("event") == "delivery_attempt"]
    assert attempts and all(r["queue_id"] == qid for r in attempts)
    for secret in (PASSWORD, base64.b64encode(f"\0carol\0{PASSWORD}".encode()).decode(),
                   BODY_MARKER):
        assert secret not in text


def test_sigterm_with_stalled_transaction_aborts_after_grace_and_exits_zero(
        tmp_path: Path) -> None:
    conf = make_config(tmp_path / "data", overrides={
        "smtp": {"lifecycle": {"gracefulShutdownTimeoutMs": 1500}}})
    port = conf["smtp"]["listeners"][0]["port"]
    proc = MtaProcess(tmp_path / "data", port, write_config(tmp_path / "c.yaml", conf)).start()
    try:
        stalled = socket.create_connection(("127.0.0.1", port), timeout=30)
        f = stalled.makefile("rb")
        assert f.readline().startswith(b"220")
        for cmd in (b"EHLO c.test", b"MAIL FROM:<a@remote.test>", b"RCPT TO:<alice@localhost>",
                    b"DATA"):
            stalled.sendall(cmd + b"\r\n")
            line = f.readline()
            while line[3:4] == b"-":
                line = f.readline()
        assert line.startswith(b"354")
        stalled.sendall(b"Subject: never finished\r\n\r\nhalf a mess")  # and then nothing
        started = time.monotonic()
        proc.signal(signal.SIGTERM)
        # After the grace period: 421, then the connection is closed (SPEC §6)
        assert f.readline().startswith(b"421 4.3.2 ")
        try:
            rest = f.read()
        except ConnectionResetError:
            rest = b""  # aborted (RST) rather than closed: also correct
        assert rest == b""  # no 250 and no stray reply
        assert proc.proc is not None
        assert proc.proc.wait(120) == 0
        assert time.monotonic() - started < 30
        spool = tmp_path / "data" / "spool" / "queue"
        assert not list(spool.glob("*.json"))  # the unfinished message was never accepted
    finally:
        proc.close()
