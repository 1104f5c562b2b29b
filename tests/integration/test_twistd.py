"""The twistd plugin end to end: a real ``twistd -n smtp`` process, real loopback sockets.

What a user does on a fresh clone (``make run`` + swaks/smtplib) must deliver into
``<mailboxDir>/alice/Maildir/new/``; SIGTERM must drain and exit 0.
"""

from __future__ import annotations

import shutil
import signal
import smtplib
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import free_port, wait_until
from mtaproc import (
    TWISTD,
    MtaPool,
    MtaProcess,
    maildir_files,
    port_open,
    proc_env,
    spool_entries,
)

SWAKS = shutil.which("swaks") or "/usr/bin/swaks"


def _message(token: str, to: str = "alice@localhost") -> bytes:
    return (f"From: Tester <tester@client.test>\r\nTo: <{to}>\r\nSubject: {token}\r\n\r\n"
            f"body line for {token}\r\n.leading dot line\r\nEND {token}\r\n").encode()


def _wait_delivered(mailbox_dir: Path, user: str, token: str, timeout: float = 15.0) -> Path:
    def find() -> Path | None:
        for path in maildir_files(mailbox_dir, user):
            if token.encode() in path.read_bytes():
                return path
        return None

    return wait_until(find, timeout=timeout, interval=0.05,
                      message=f"{token} in {mailbox_dir}/{user}/Maildir")


def test_twistd_help_lists_smtp_plugin() -> None:
    out = subprocess.run([TWISTD, "--help"], env=proc_env(), capture_output=True, timeout=60,
                         check=True, text=True).stdout
    lines = [line.split() for line in out.splitlines()]
    assert any(parts and parts[0] == "smtp" for parts in lines), out
    sub = subprocess.run([TWISTD, "smtp", "--help"], env=proc_env(), capture_output=True,
                         timeout=60, text=True)
    assert sub.returncode == 0, sub.stderr
    assert "--config" in sub.stdout


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MtaProcess, dict[str, Any]]]:
    """One server for the delivery tests of this module (start-up costs seconds on CI)."""
    with MtaPool(tmp_path_factory.mktemp("shared")) as pool:
        yield pool.new()


def test_smtplib_delivery_into_maildir_new(shared: tuple[MtaProcess, dict[str, Any]]) -> None:
    mta, conf = shared
    mailboxes = Path(conf["smtp"]["storage"]["mailboxDir"])
    token = uuid.uuid4().hex
    with smtplib.SMTP("127.0.0.1", mta.port, timeout=10) as client:
        code, _ = client.ehlo("client.test")
        assert code == 250
        for ext in ("pipelining", "size", "8bitmime", "enhancedstatuscodes", "smtputf8",
                    "chunking"):
            assert client.has_extn(ext), (ext, client.esmtp_features)
        assert client.mail("tester@client.test")[0] == 250
        code, reply = client.rcpt("nobody-here@localhost")
        assert (code, reply[:5]) == (550, b"5.1.1"), reply
        assert client.rcpt("alice@localhost")[0] == 250
        code, reply = client.data(_message(token))
    assert code == 250, reply
    assert reply.startswith(b"2.0.0"), reply
    queue_id = reply.split()[-1].decode()
    path = _wait_delivered(mailboxes, "alice", token)
    assert path.parent.name == "new"
    assert f"Q{queue_id}" in path.name, (queue_id, path.name)
    data = path.read_bytes()
    head, _, body = data.partition(b"\r\n\r\n")
    assert b"Received: from" in head and b"mx.test" in head
    assert b"Message-ID:" in head and b"Date:" in head  # added because the client sent none
    assert b"Return-Path: <tester@client.test>" in head
    assert b"Delivered-To: alice@localhost" in head
    assert b"\r\n.leading dot line\r\n" in body  # dot-stuffing undone exactly once
    assert body.endswith(f"END {token}\r\n".encode())
    wait_until(lambda: not spool_entries(Path(conf["smtp"]["spool"]["dir"])), timeout=10,
               message="spool to drain after delivery")
    assert not any(token.encode() in p.read_bytes() for p in maildir_files(mailboxes, "bob"))


def test_make_run_default_config_smoke(tmp_path: Path, mtas: MtaPool) -> None:
    """No --config: the embedded default (paths under ./data, ports from SMTP_PORT/…)."""
    cwd = tmp_path / "clone"
    (cwd / "data" / "mailboxes" / "alice").mkdir(parents=True)
    port = free_port()
    mta = mtas.adopt(MtaProcess(tmp_path, port, None, cwd=cwd,
                                env={"SMTP_PORT": str(port), "MANAGEMENT_PORT": str(free_port())}))
    mta.start()
    token = uuid.uuid4().hex
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        refused = client.sendmail("dev@client.test", ["alice@localhost"], _message(token))
    assert refused == {}
    path = _wait_delivered(cwd / "data" / "mailboxes", "alice", token)
    assert path.parent == cwd / "data" / "mailboxes" / "alice" / "Maildir" / "new"
    assert (cwd / "data" / "spool" / "queue").is_dir()  # spool under ./data as documented
    rc, _ = mta.terminate()
    assert rc == 0, f"SPEC §6: SIGTERM must exit 0, got {rc}"


@pytest.mark.parametrize("extra", [[], ["--pipeline"]], ids=["plain", "pipelined"])
def test_swaks_delivers(shared: tuple[MtaProcess, dict[str, Any]], extra: list[str]) -> None:
    mta, conf = shared
    token = uuid.uuid4().hex
    res = subprocess.run(
        [SWAKS, "--server", f"127.0.0.1:{mta.port}", "--to", "alice@localhost",
         "--from", "swaks@client.test", "--header", f"Subject: {token}",
         "--body", f"swaks body {token}", *extra],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "250 2.0.0" in res.stdout
    _wait_delivered(Path(conf["smtp"]["storage"]["mailboxDir"]), "alice", token)


def test_sigterm_exits_zero_idle_session_gets_421(mtas: MtaPool) -> None:
    mta, _ = mtas.new({"smtp": {"lifecycle": {"gracefulShutdownTimeoutMs": 2000}}})
    idle = socket.create_connection(("127.0.0.1", mta.port), timeout=10)
    try:
        assert idle.recv(512).startswith(b"220")
        idle.sendall(b"EHLO client.test\r\n")
        wait_until(lambda: b"250 " in idle.recv(4096), timeout=5, message="EHLO reply")
        rc, took = mta.terminate(timeout=15)
        assert took < 2.0 + 3.0, f"exit took {took:.1f}s, grace is 2s"
        rest = b""
        while True:
            try:
                chunk = idle.recv(4096)
            except OSError:
                break
            if not chunk:
                break
            rest += chunk
        assert rest.startswith(b"421"), rest
    finally:
        idle.close()
    assert not port_open(mta.port)
    assert "shutdown complete" in mta.log()
    assert rc == 0, f"SPEC §6: SIGTERM must exit 0, got {rc}"


def test_sigterm_lets_transaction_in_progress_finish(mtas: MtaPool) -> None:
    """SPEC §6: listeners stop accepting; a session in a transaction may finish within the
    grace period; its message is then either delivered or still queued (never lost)."""
    mta, conf = mtas.new({"smtp": {"lifecycle": {"gracefulShutdownTimeoutMs": 8000}}})
    token = uuid.uuid4().hex
    client = smtplib.SMTP("127.0.0.1", mta.port, timeout=10)
    try:
        client.ehlo("client.test")
        assert client.mail("tester@client.test")[0] == 250
        assert client.rcpt("alice@localhost")[0] == 250
        mta.signal(signal.SIGTERM)
        wait_until(lambda: "shutting down" in mta.log(), timeout=10,
                   message="graceful shutdown to begin")
        wait_until(lambda: not port_open(mta.port), timeout=10,
                   message="listener to stop accepting")
        code, reply = client.data(_message(token))
        assert code == 250, reply
        try:
            client.quit()
        except smtplib.SMTPServerDisconnected:
            pass
    finally:
        client.close()
    assert mta.proc is not None
    rc = mta.proc.wait(15)
    mailboxes = Path(conf["smtp"]["storage"]["mailboxDir"])
    delivered = [p for p in maildir_files(mailboxes, "alice") if token.encode() in p.read_bytes()]
    queued = spool_entries(Path(conf["smtp"]["spool"]["dir"]))
    assert len(delivered) + len(queued) == 1, (delivered, queued)
    if queued:  # a restart must then deliver it
        mta.start()
        _wait_delivered(mailboxes, "alice", token)
    assert rc == 0, f"SPEC §6: SIGTERM must exit 0, got {rc}"
