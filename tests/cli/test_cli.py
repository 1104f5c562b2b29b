"""The ``kotlin-smtp`` operator tool as a real subprocess (console script and ``python -m``).

The spool is populated from this process with ``FileSpool`` (on the test reactor thread): each
entry is enqueued, then rescheduled an hour ahead as if a delivery attempt had failed — exactly
what ``mailq`` shows on a live system. ``queue flush`` is then exercised against a running
``twistd smtp`` sharing the spool directory.
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml
from helpers import RedisServer, on_reactor, wait_until
from mtaproc import (
    KOTLIN_SMTP,
    PYTHON,
    MtaPool,
    deep_merge,
    maildir_files,
    make_config,
    proc_env,
    spool_entries,
    write_config,
)

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.spool.file import FileSpool

EX_TEMPFAIL = 75
AUTH_SECRET = "Pl41n-S3cret-7f3a"
ROUTE_SECRET = "R0ute-S3cret-91bc"


def run_cli(*args: str, stdin: str | None = None, module: bool = False,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    argv = [PYTHON, "-m", "kotlin_smtp_py", *args] if module else [KOTLIN_SMTP, *args]
    return subprocess.run(argv, input=stdin, capture_output=True, text=True, timeout=60,
                          env=proc_env(), cwd=cwd)


def _message(token: str, to: str) -> bytes:
    return (f"From: <sender@client.test>\r\nTo: <{to}>\r\nSubject: {token}\r\n"
            f"Message-ID: <{token}@client.test>\r\n\r\nbody {token}\r\n").encode()


def populate(spool_dir: Path, recipients: list[str], defer_seconds: float = 3600.0
             ) -> list[tuple[str, str]]:
    """Enqueue one message per recipient and mark it deferred; returns (queue id, token)."""

    async def go() -> list[tuple[str, str]]:
        spool = FileSpool(str(spool_dir), scan_interval=float("inf"))
        out = []
        for rcpt in recipients:
            token = uuid.uuid4().hex
            raw = _message(token, rcpt)
            env = Envelope(sender="sender@client.test", recipients=(Recipient(rcpt),),
                           helo="client.test", peer="127.0.0.1", size=len(raw),
                           message_id=f"<{token}@client.test>")
            entry = await spool.enqueue(env, raw)
            claim = await spool.claim(entry.queue_id)
            assert claim is not None
            await spool.reschedule(claim, entry.evolve(
                attempts=1, next_attempt=time.time() + defer_seconds,
                last_error="451 4.2.0 mailbox unavailable (test)"))
            out.append((entry.queue_id, token))
        spool.release_all()
        return out

    return on_reactor(go)  # type: ignore[no-any-return]


@pytest.fixture
def spool_setup(tmp_path: Path) -> tuple[Path, dict[str, Any], list[tuple[str, str]]]:
    conf = make_config(tmp_path / "data")
    path = write_config(tmp_path / "config.yaml", conf)
    entries = populate(Path(conf["smtp"]["spool"]["dir"]),
                       ["alice@localhost", "bob@localhost", "alice@example.test"])
    return path, conf, entries


def _entry_json(conf: dict[str, Any], qid: str) -> dict[str, Any]:
    data = json.loads((Path(conf["smtp"]["spool"]["dir"]) / "queue" / f"{qid}.json").read_text())
    assert isinstance(data, dict)
    return data


# -- check-config -----------------------------------------------------------------------------


def _secret_config(tmp_path: Path, **extra: Any) -> Path:
    conf = make_config(tmp_path / "data", overrides=deep_merge({"smtp": {
        "auth": {"users": {"alice": AUTH_SECRET}},
        "relay": {"enabled": True, "defaultRoute": {"host": "smarthost.test", "port": 587,
                                                    "username": "relayuser",
                                                    "password": ROUTE_SECRET}},
    }}, extra))
    return write_config(tmp_path / "config.yaml", conf)


@pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m"])
def test_check_config_masks_secrets_and_warns(tmp_path: Path, module: bool) -> None:
    path = _secret_config(tmp_path)
    res = run_cli("check-config", str(path), module=module)
    assert res.returncode == 0, res.stderr
    for secret in (AUTH_SECRET, ROUTE_SECRET):
        assert secret not in res.stdout and secret not in res.stderr
    effective = yaml.safe_load(res.stdout)
    assert effective["smtp"]["auth"]["users"] == {"alice": "******"}
    assert effective["smtp"]["relay"]["defaultRoute"]["password"] == "******"
    assert effective["smtp"]["relay"]["defaultRoute"]["username"] == "relayuser"
    # the effective config includes defaults the file did not set
    assert effective["smtp"]["limits"]["maxRecipients"] == 100
    assert effective["smtp"]["listeners"][0]["port"] > 0
    assert "warning: smtp.auth.users: plaintext passwords" in res.stderr
    assert "configuration OK" in res.stderr


def test_check_config_empty_secret_not_masked_as_set(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", make_config(tmp_path / "data"))
    res = run_cli("check-config", str(path))
    assert res.returncode == 0, res.stderr
    effective = yaml.safe_load(res.stdout)
    assert effective["smtp"]["redis"] is None or effective["smtp"]["redis"]["password"] == ""
    assert "warning" not in res.stderr


@pytest.mark.parametrize("extra,expect", [
    ({"limits": {"maxRecipiens": 3}},
     ["smtp.limits.maxRecipiens", "did you mean 'maxRecipients'"]),
    ({"auth": {"allowPlaintextPasswords": False}},
     ["smtp.auth.users: plaintext passwords are not allowed", "alice"]),
], ids=["unknown-key", "plaintext-refused"])
def test_check_config_invalid_exits_2_and_never_leaks_secret(
        tmp_path: Path, extra: dict[str, Any], expect: list[str]) -> None:
    path = _secret_config(tmp_path, smtp=extra)
    res = run_cli("check-config", str(path))
    assert res.returncode == 2
    assert res.stdout == ""
    for fragment in expect:
        assert fragment in res.stderr, (fragment, res.stderr)
    assert AUTH_SECRET not in res.stderr and ROUTE_SECRET not in res.stderr


def test_check_config_missing_file(tmp_path: Path) -> None:
    res = run_cli("check-config", str(tmp_path / "absent.yaml"))
    assert res.returncode == 2
    assert "absent.yaml" in res.stderr and "cannot read" in res.stderr


def test_usage_errors_exit_2() -> None:
    assert run_cli().returncode == 2
    assert run_cli("frobnicate").returncode == 2
    assert run_cli("queue", "explode").returncode == 2


# -- hash-password ----------------------------------------------------------------------------


def test_hash_password_stdin_bcrypt(tmp_path: Path) -> None:
    password = "correct horse battery staple ✓"
    res = run_cli("hash-password", "--stdin", stdin=password + "\n")
    assert res.returncode == 0, res.stderr
    hashed = res.stdout.strip()
    assert hashed.startswith("$2b$12$"), hashed  # default cost 12
    assert password not in res.stdout + res.stderr
    assert bcrypt.checkpw(password.encode(), hashed.encode())
    assert not bcrypt.checkpw(b"wrong", hashed.encode())
    again = run_cli("hash-password", "--stdin", "--rounds", "4", stdin=password + "\n")
    assert again.stdout.strip().startswith("$2b$04$")
    assert bcrypt.checkpw(password.encode(), again.stdout.strip().encode())
    # the hash is what smtp.auth.users accepts with allowPlaintextPasswords=false
    conf = make_config(tmp_path / "data", overrides={"smtp": {"auth": {
        "allowPlaintextPasswords": False, "users": {"alice": hashed}}}})
    check = run_cli("check-config", str(write_config(tmp_path / "c.yaml", conf)))
    assert check.returncode == 0, check.stderr
    assert "plaintext" not in check.stderr


def test_hash_password_empty_is_refused() -> None:
    res = run_cli("hash-password", "--stdin", stdin="\n")
    assert res.returncode == 2
    assert res.stdout == ""


# -- queue (no server running) ----------------------------------------------------------------


def test_queue_list(spool_setup: tuple[Path, dict[str, Any], list[tuple[str, str]]]) -> None:
    path, _, entries = spool_setup
    res = run_cli("queue", "list", "--config", str(path))
    assert res.returncode == 0, res.stderr
    for qid, _ in entries:
        assert qid in res.stdout
    for rcpt in ("alice@localhost", "bob@localhost", "alice@example.test"):
        assert rcpt in res.stdout
    assert res.stdout.count("attempts=1") == 3
    assert "<sender@client.test>" in res.stdout
    assert "451 4.2.0 mailbox unavailable (test)" in res.stdout
    assert res.stdout.rstrip().endswith("-- 3 entries in queue")


def test_queue_list_empty(tmp_path: Path) -> None:
    path = write_config(tmp_path / "c.yaml", make_config(tmp_path / "data"))
    res = run_cli("queue", "list", "-c", str(path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "-- 0 entries in queue"


def test_queue_show(spool_setup: tuple[Path, dict[str, Any], list[tuple[str, str]]]) -> None:
    path, _, entries = spool_setup
    qid, token = entries[1]
    res = run_cli("queue", "show", qid, "--config", str(path))
    assert res.returncode == 0, res.stderr
    meta, _, raw = res.stdout.partition("\n\n")
    data = json.loads(meta)
    assert data["queue_id"] == qid
    assert data["envelope"]["sender"] == "sender@client.test"
    assert [r["address"] for r in data["pending"]] == ["bob@localhost"]
    assert f"Subject: {token}" in raw and f"body {token}" in raw
    assert entries[0][1] not in res.stdout
    for bad in ("txNOSUCHENTRYxxxxxxx", "../../../../../../etc/passwd"):
        res = run_cli("queue", "show", bad, "--config", str(path))
        assert res.returncode == 1, res
        assert "no such queue entry" in res.stderr
        assert "root:" not in res.stdout


def test_queue_delete(spool_setup: tuple[Path, dict[str, Any], list[tuple[str, str]]]) -> None:
    path, conf, entries = spool_setup
    qid = entries[0][0]
    res = run_cli("queue", "delete", qid, "--config", str(path))
    assert res.returncode == 0, res.stderr
    assert f"{qid}: deleted" in res.stdout
    spool_dir = Path(conf["smtp"]["spool"]["dir"])
    assert spool_entries(spool_dir) == sorted(q for q, _ in entries[1:])
    assert not (spool_dir / "queue" / f"{qid}.eml").exists()
    again = run_cli("queue", "delete", qid, "--config", str(path))
    assert again.returncode == 1
    assert qid in again.stderr


def test_queue_retry_one(spool_setup: tuple[Path, dict[str, Any], list[tuple[str, str]]]) -> None:
    path, conf, entries = spool_setup
    qid = entries[2][0]
    before = time.time()
    res = run_cli("queue", "retry", qid, "--config", str(path))
    assert res.returncode == 0, res.stderr
    assert "1 entry scheduled" in res.stdout
    assert _entry_json(conf, qid)["next_attempt"] <= time.time()
    assert _entry_json(conf, qid)["next_attempt"] >= before - 1
    for other, _ in entries[:2]:  # the others stay deferred
        assert _entry_json(conf, other)["next_attempt"] > time.time() + 600
    missing = run_cli("queue", "retry", "txNOSUCHENTRYxxxxxxx", "--config", str(path))
    assert missing.returncode == 1
    assert run_cli("queue", "retry", "--config", str(path)).returncode == 2


def test_queue_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("smtp:\n  spool:\n    dri: /tmp\n")
    res = run_cli("queue", "list", "--config", str(bad))
    assert res.returncode == 2
    assert "smtp.spool.dri" in res.stderr


# -- queue flush against a running server -----------------------------------------------------


def test_queue_flush_delivers_via_running_server_and_cooldown(tmp_path: Path,
                                                               mtas: MtaPool) -> None:
    root = mtas.root()
    conf = make_config(root, overrides={"smtp": {"spool": {"triggerCooldownMillis": 60000}}})
    spool_dir = Path(conf["smtp"]["spool"]["dir"])
    mailboxes = Path(conf["smtp"]["storage"]["mailboxDir"])
    entries = populate(spool_dir, ["alice@localhost", "bob@localhost", "alice@localhost"])
    mta = mtas.from_config(conf, root)
    # The server started with three deferred entries: it must not deliver them on its own.
    wait_until(lambda: "listening for SMTP" in mta.log(), timeout=10, message="server log")
    assert maildir_files(mailboxes, "alice") == [] and maildir_files(mailboxes, "bob") == []
    assert len(spool_entries(spool_dir)) == 3

    res = run_cli("queue", "flush", "--config", str(mta.config_path))
    assert res.returncode == 0, res.stderr
    assert "3 entries scheduled" in res.stdout

    def delivered() -> bool:
        boxes = {"alice": maildir_files(mailboxes, "alice"), "bob": maildir_files(mailboxes, "bob")}
        return len(boxes["alice"]) == 2 and len(boxes["bob"]) == 1

    wait_until(delivered, timeout=15, message="flushed entries in the Maildirs")
    files = [p.read_bytes() for u in ("alice", "bob") for p in maildir_files(mailboxes, u)]
    for qid, token in entries:
        assert sum(token.encode() in f for f in files) == 1, qid
    wait_until(lambda: spool_entries(spool_dir) == [], timeout=10, message="spool to drain")

    second = run_cli("queue", "flush", "--config", str(mta.config_path))
    assert second.returncode == EX_TEMPFAIL, (second.stdout, second.stderr)
    assert "cooldown" in second.stderr
    assert mta.running()


def test_queue_flush_cooldown_without_server(
        spool_setup: tuple[Path, dict[str, Any], list[tuple[str, str]]], tmp_path: Path) -> None:
    path, conf, _ = spool_setup
    conf = deep_merge(conf, {"smtp": {"spool": {"triggerCooldownMillis": 60000}}})
    path = write_config(tmp_path / "cooldown.yaml", conf)
    first = run_cli("queue", "flush", "--config", str(path))
    assert first.returncode == 0, first.stderr
    assert "3 entries scheduled" in first.stdout
    for qid in spool_entries(Path(conf["smtp"]["spool"]["dir"])):
        assert _entry_json(conf, qid)["next_attempt"] <= time.time()
    second = run_cli("queue", "flush", "--config", str(path))
    assert second.returncode == EX_TEMPFAIL
    # a short cooldown has expired by the time a new process runs
    short = write_config(tmp_path / "short.yaml",
                         deep_merge(conf, {"smtp": {"spool": {"triggerCooldownMillis": 1}}}))
    assert run_cli("queue", "flush", "--config", str(short)).returncode == 0


def test_queue_flush_cooldown_on_the_redis_spool(tmp_path: Path,
                                                 redis_server: RedisServer) -> None:
    """The cooldown holds for the Redis spool too, and across hosts (kept in Redis)."""
    conf = make_config(tmp_path / "data", overrides={"smtp": {
        "redis": {"url": redis_server.url},
        "spool": {"type": "redis", "triggerCooldownMillis": 60000,
                  "redis": {"keyPrefix": f"cli:{uuid.uuid4().hex}"}}}})
    path = write_config(tmp_path / "redis.yaml", conf)
    first = run_cli("queue", "flush", "--config", str(path))
    assert first.returncode == 0, first.stderr
    second = run_cli("queue", "flush", "--config", str(path))
    assert second.returncode == EX_TEMPFAIL, (second.stdout, second.stderr)
    assert "cooldown" in second.stderr
    short = write_config(tmp_path / "short.yaml", deep_merge(conf, {"smtp": {"spool": {
        "triggerCooldownMillis": 1, "redis": {"keyPrefix": f"cli:{uuid.uuid4().hex}"}}}}))
    assert run_cli("queue", "flush", "--config", str(short)).returncode == 0
    assert run_cli("queue", "flush", "--config", str(short)).returncode == 0  # 1 ms later
