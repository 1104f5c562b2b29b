"""Bug hunt: the ``kotlin-smtp queue`` operator commands against RUNNING servers.

Real ``twistd smtp`` processes (tests/integration/mtaproc.py) relay to a token-counting sink
(tests/multinode/mn_support.py) that answers ``451`` while a test wants mail to stay queued, holds
its answer to the final dot while a test wants an entry "being delivered right now", and counts
each token it accepted, so a double delivery or a deleted entry coming back shows. The CLI runs as
a subprocess with the server's own config, on the file spool and on a Redis spool shared by two
nodes. Everything is on loopback; every wait is a bounded poll (``helpers.wait_until``).

Seven tests found bugs (fixed since): control characters from remote replies in `queue list`,
files rewritten by root leaving the service user's spool, a missing spool directory reported as
an empty queue, tracebacks for a damaged spool or a closed pipe, Redis credential refusals as
exit 75. The others are regression tests for behaviour tests/cli/test_cli.py,
tests/ops/test_ops_hunt.py and tests/multinode/test_multinode_queue_cli.py do not pin down.
"""

from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import smtplib
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "multinode"))

from helpers import RedisServer, free_port, on_reactor, redis_command, start_redis, wait_until
from mn_support import TOKEN_RE, Attempt, Node, TokenSink, start_nodes
from mtaproc import (
    KOTLIN_SMTP,
    MtaPool,
    MtaProcess,
    deep_merge,
    make_config,
    proc_env,
    write_config,
)

EX_TEMPFAIL = 75
SENDER = "sender@client.test"
RCPT = "rcpt@relay.test"
CLI_BOUND = 20.0  # seconds: no queue command may take longer than this (no deadlock)
ENTRY_LINE = re.compile(r"^(\S+)\s+(\d+)\s+(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)\s+<(.*)>\s+"
                        r"attempts=(\d+) next=(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)$")
INDENT = " " * 24


# -- helpers ----------------------------------------------------------------------------------


def cli(config: str | Path | None, *args: str, cwd: Path | None = None,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    argv = [KOTLIN_SMTP, "queue", *args] + (["--config", str(config)] if config else [])
    started = time.monotonic()
    raw = subprocess.run(argv, capture_output=True, timeout=60, env=proc_env(env), cwd=cwd,
                         stdin=subprocess.DEVNULL)
    took = time.monotonic() - started
    # decoded by hand: text mode would turn a bare CR in the output into a line break
    res = subprocess.CompletedProcess(argv, raw.returncode, raw.stdout.decode("utf-8"),
                                      raw.stderr.decode("utf-8"))
    assert took < CLI_BOUND, f"queue {' '.join(args)} took {took:.1f}s"
    assert "Traceback" not in res.stderr, res.stderr
    return res


@dataclass
class Listed:
    qid: str
    size: int
    created: str
    sender: str
    attempts: int
    next: str
    recipients: list[str] = field(default_factory=list)
    error: str | None = None


def parse_list(stdout: str) -> tuple[dict[str, Listed], int]:
    """``queue list`` output -> (entries by id, the count in the footer line)."""
    entries: dict[str, Listed] = {}
    current: Listed | None = None
    footer = -1
    for line in stdout.rstrip("\n").split("\n"):  # only LF ends a line
        m = ENTRY_LINE.match(line)
        if m:
            current = Listed(m.group(1), int(m.group(2)), m.group(3), m.group(4),
                             int(m.group(5)), m.group(6))
            entries[current.qid] = current
        elif line.startswith(INDENT) and current is not None:
            rest = line[len(INDENT):]
            if rest.startswith("(") and rest.endswith(")"):
                current.error = rest[1:-1]
            else:
                current.recipients.append(rest)
        elif fm := re.fullmatch(r"-- (\d+) entr(?:y|ies) in queue", line):
            footer = int(fm.group(1))
        else:
            raise AssertionError(f"unexpected line in queue list: {line!r}")
    return entries, footer


def listed(config: str | Path, **kwargs: Any) -> dict[str, Listed]:
    res = cli(config, "list", **kwargs)
    assert res.returncode == 0, res.stderr
    entries, footer = parse_list(res.stdout)
    assert footer == len(entries), res.stdout
    return entries


def show(config: str | Path, qid: str) -> tuple[dict[str, Any], str]:
    res = cli(config, "show", qid)
    assert res.returncode == 0, (qid, res.stderr)
    meta, sep, raw = res.stdout.partition("\n\n")
    assert sep, res.stdout
    return json.loads(meta), raw


def message(token: str, rcpt: str = RCPT) -> bytes:
    return (f"From: <{SENDER}>\r\nTo: <{rcpt}>\r\nSubject: {token}\r\nX-Token: {token}\r\n"
            f"Message-ID: <{token}@client.test>\r\n\r\nbody of {token}\r\n").encode("ascii")


def send(port: int, tokens: list[str]) -> None:
    """One message per token, NOTIFY=NEVER (no delay notices cluttering the queue)."""
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as conn:
        conn.ehlo("client.test")
        for token in tokens:
            refused = conn.sendmail(SENDER, [RCPT], message(token),
                                    rcpt_options=["NOTIFY=NEVER"])
            assert refused == {}


def ids_by_token(config: str | Path, entries: dict[str, Listed]) -> dict[str, str]:
    out = {}
    for qid in entries:
        _, raw = show(config, qid)
        m = TOKEN_RE.search(raw.encode())
        assert m, raw
        out[m.group(1).decode()] = qid
    return out


def wait_deferred(config: str | Path, n: int, min_attempts: int = 1,
                  timeout: float = 20) -> dict[str, Listed]:
    def ready() -> dict[str, Listed] | None:
        e = listed(config)
        ok = len(e) == n and all(x.attempts >= min_attempts for x in e.values())
        return e if ok else None

    return wait_until(ready, timeout=timeout, interval=0.2,  # type: ignore[no-any-return]
                      message=f"{n} deferred entries listed")


class ReplySink(TokenSink):
    """The token sink with a scriptable refusal text (a remote MTA controls that text)."""

    refusal: bytes | None = None

    def _finish(self, conn: socket.socket, node: str, sender: str, rcpts: list[str],
                body: bytes) -> bool:
        if self.refuse_all and self.refusal is not None:
            m = TOKEN_RE.search(body)
            token = m.group(1).decode("ascii") if m else "?"
            with self.lock:
                self.attempts.append(Attempt(token, node, sender, list(rcpts),
                                             time.monotonic(), "451"))
            conn.sendall(self.refusal + b"\r\n")
            return True
        return super()._finish(conn, node, sender, rcpts, body)


def attempts(sink: TokenSink, token: str) -> int:
    return len(sink.attempts_for(token))


def relay_overrides(sink_port: int, retry_delay: int, name: str = "file") -> dict[str, Any]:
    return {"smtp": {
        "hostname": f"node-{name}.test",
        # (a long trigger cooldown: a second `queue flush` must fall inside it however slowly
        # the CLI starts on a loaded machine; the default 1 s did not under CI load)
        "spool": {"retryDelaySeconds": retry_delay, "maxRetries": 50, "workerConcurrency": 4,
                  "triggerCooldownMillis": 60000},
        "relay": {"enabled": True, "requireAuthForRelay": False,
                  "allowedClientCidrs": ["127.0.0.0/8"],
                  "defaultRoute": {"host": "127.0.0.1", "port": sink_port,
                                   "startTlsEnabled": False},
                  "outboundTls": {"readTimeoutMs": 120000, "connectTimeoutMs": 5000}}}}


@dataclass
class FileSetup:
    mta: MtaProcess
    conf: dict[str, Any]
    config: Path
    sink: ReplySink
    ids: dict[str, str]  # token -> queue id
    tokens: list[str]

    @property
    def spool_dir(self) -> Path:
        return Path(self.conf["smtp"]["spool"]["dir"])


@pytest.fixture
def sink() -> Iterator[ReplySink]:
    s = ReplySink()
    s.refuse_all = True
    yield s
    s.close()


def start_file_server(mtas: MtaPool, sink: TokenSink, n: int, retry_delay: int = 3600,
                      **kwargs: Any) -> FileSetup:
    root = mtas.root()
    conf = make_config(root, overrides=relay_overrides(sink.port, retry_delay))
    mta = mtas.from_config(conf, root, **kwargs)
    assert mta.config_path is not None
    tokens = [f"t{i}-{uuid.uuid4().hex}" for i in range(n)]
    send(mta.port, tokens)
    entries = wait_deferred(mta.config_path, n)
    ids = ids_by_token(mta.config_path, entries)
    assert sorted(ids) == sorted(tokens)
    return FileSetup(mta, conf, mta.config_path, sink, ids, tokens)


@pytest.fixture
def deferred_file(mtas: MtaPool, sink: ReplySink) -> FileSetup:
    """A running file-spool server with three entries deferred ≥ 480 s by the sink's 451."""
    return start_file_server(mtas, sink, 3)


def populate(spool_dir: Path, recipients: list[str], defer_seconds: float = 3600.0,
             sender: str = SENDER, last_error: str = "451 4.2.0 try later (test)"
             ) -> list[str]:
    """Entries written straight into a file spool (no server), deferred; returns queue ids."""
    from kotlin_smtp_py.envelope import Envelope, Recipient
    from kotlin_smtp_py.spool.file import FileSpool

    async def go() -> list[str]:
        spool = FileSpool(str(spool_dir), scan_interval=float("inf"))
        out = []
        for rcpt in recipients:
            token = uuid.uuid4().hex
            raw = (f"From: <{sender}>\r\nSubject: {token}\r\nX-Token: {token}\r\n\r\n"
                   f"body\r\n").encode()
            env = Envelope(sender=sender, recipients=(Recipient(rcpt),), helo="client.test",
                           peer="127.0.0.1", size=len(raw))
            entry = await spool.enqueue(env, raw)
            claim = await spool.claim(entry.queue_id)
            assert claim is not None
            await spool.reschedule(claim, entry.evolve(
                attempts=1, next_attempt=time.time() + defer_seconds, last_error=last_error))
            out.append(entry.queue_id)
        spool.release_all()
        return out

    return on_reactor(go)  # type: ignore[no-any-return]


def utc(text: str) -> float:
    return datetime.datetime.strptime(text, "%Y-%m-%d %H:%M:%S").replace(
        tzinfo=datetime.timezone.utc).timestamp()


# -- file spool, running server: list / show --------------------------------------------------


def test_file_list_matches_the_spool_of_the_running_server(deferred_file: FileSetup) -> None:
    s = deferred_file
    res = cli(s.config, "list")
    assert res.returncode == 0 and res.stderr == "", res
    entries, footer = parse_list(res.stdout)
    assert footer == 3 and set(entries) == set(s.ids.values())
    for qid, e in entries.items():
        on_disk = json.loads((s.spool_dir / "queue" / f"{qid}.json").read_text())
        assert e.sender == SENDER and e.recipients == [RCPT]
        assert e.attempts == on_disk["attempts"] == 1
        assert abs(utc(e.next) - on_disk["next_attempt"]) < 1.5, (e.next, on_disk)
        assert utc(e.next) > time.time() + 300  # retryDelaySeconds 3600 → ≥ 480 s ahead
        assert abs(utc(e.created) - on_disk["created"]) < 1.5
        assert e.size == (s.spool_dir / "queue" / f"{qid}.eml").stat().st_size
        assert e.error is not None and "try again (sink)" in e.error


def test_file_show_prints_envelope_and_the_exact_queued_bytes(deferred_file: FileSetup) -> None:
    s = deferred_file
    token = s.tokens[1]
    qid = s.ids[token]
    res = subprocess.run([KOTLIN_SMTP, "queue", "show", qid, "-c", str(s.config)],
                         capture_output=True, timeout=60, env=proc_env(),
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and res.stderr == b"", res
    meta_bytes, _, raw = res.stdout.partition(b"\n\n")
    meta = json.loads(meta_bytes)
    assert meta["queue_id"] == qid and meta["attempts"] == 1
    assert meta["envelope"]["sender"] == SENDER
    assert [r["address"] for r in meta["pending"]] == [RCPT]
    assert raw == (s.spool_dir / "queue" / f"{qid}.eml").read_bytes()
    assert b"Received: " in raw and f"X-Token: {token}".encode() in raw
    for other in s.tokens:
        if other != token:
            assert other.encode() not in res.stdout
    # a well-formed id that is not queued: exit 1, message on stderr, nothing on stdout
    gone = cli(s.config, "show", "txNoSuchEntry0000000")
    assert (gone.returncode, gone.stdout) == (1, ""), gone
    assert "no such queue entry" in gone.stderr


def test_file_config_from_environment_and_relative_paths(mtas: MtaPool, sink: ReplySink) -> None:
    """The server runs in its directory with relative paths in its config; the CLI run from
    the same directory (config from $KOTLIN_SMTP_CONFIG, no --config) sees the same queue,
    and a config with absolute paths works from any working directory."""
    root = mtas.root()
    conf = make_config(root, overrides=relay_overrides(sink.port, 3600))
    rel = deep_merge(conf, {"smtp": {
        "spool": {"dir": "./data/spool"},
        "storage": {"mailboxDir": "./mailboxes", "tempDir": "./data/temp",
                    "listsDir": "./lists"}}})
    mta = mtas.from_config(rel, root, name="relative.yaml")
    send(mta.port, ["rel-" + uuid.uuid4().hex])
    assert (root / "data" / "spool" / "queue").is_dir()
    env = {"KOTLIN_SMTP_CONFIG": "relative.yaml"}

    def one_deferred() -> dict[str, Listed] | None:
        res = cli(None, "list", cwd=root, env=env)
        assert res.returncode == 0, res.stderr
        e, footer = parse_list(res.stdout)
        return e if footer == 1 and all(x.attempts == 1 for x in e.values()) else None

    from_env = wait_until(one_deferred, timeout=20, interval=0.2, message="entry listed")
    (qid,) = from_env
    assert (root / "data" / "spool" / "queue" / f"{qid}.json").exists()
    # absolute paths: any working directory will do
    absolute = write_config(root / "absolute.yaml", deep_merge(rel, {"smtp": {
        "spool": {"dir": str(root / "data" / "spool")},
        "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "data/temp"),
                    "listsDir": str(root / "lists")}}}))
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    assert set(listed(absolute, cwd=elsewhere)) == {qid}
    assert set(listed(absolute, cwd=Path("/"))) == {qid}


def test_file_list_non_ascii_and_very_long_addresses(mtas: MtaPool, sink: ReplySink) -> None:
    root = mtas.root()
    conf = make_config(root, overrides=relay_overrides(sink.port, 3600))
    long_rcpt = "l" * 64 + "@" + ".".join(["sub" + "d" * 57] * 3) + ".test"  # 254 characters
    utf8_rcpt = "δοκιμή@παράδειγμα.test"
    utf8_sender = "jörg@bücher.test"
    spool = Path(conf["smtp"]["spool"]["dir"])
    ids = populate(spool, [long_rcpt, utf8_rcpt], sender=utf8_sender,
                   last_error="451 4.2.0 Postfach voll – später")
    mta = mtas.from_config(conf, root)
    assert mta.running()
    for env in ({}, {"LC_ALL": "C", "LANG": "C"}):
        res = cli(mta.config_path, "list", env=env)
        assert res.returncode == 0 and res.stderr == "", (env, res.stderr)
        entries, footer = parse_list(res.stdout)
        assert footer == 2 and set(entries) == set(ids)
        assert entries[ids[0]].recipients == [long_rcpt]  # never truncated
        assert entries[ids[1]].recipients == [utf8_rcpt]
        assert {e.sender for e in entries.values()} == {utf8_sender}
        assert entries[ids[1]].error == "451 4.2.0 Postfach voll – später"
        meta, _ = show(mta.config_path, ids[1])
        assert meta["envelope"]["sender"] == utf8_sender
        assert [r["address"] for r in meta["pending"]] == [utf8_rcpt]


def test_file_list_escapes_control_characters_from_remote_replies(mtas: MtaPool,
                                                                   sink: ReplySink) -> None:
    sink.refusal = (b"451 4.2.0 busy \x1b]0;owned\x07\x1b[2J\x1b[1;1H"
                    b"\rtxForgedEntry0000000        1  2020-01-01 00:00:00  <ceo@example.com>")
    s = start_file_server(mtas, sink, 1)
    # bytes: text mode would turn the bare CR into a line break before we see it
    res = subprocess.run([KOTLIN_SMTP, "queue", "list", "-c", str(s.config)],
                         capture_output=True, timeout=60, env=proc_env(),
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0 and res.stderr == b"", res
    assert b"busy" in res.stdout  # the reason is still shown
    for ch in (b"\x1b", b"\x07", b"\r"):
        assert ch not in res.stdout, (ch, res.stdout)
    entries, footer = parse_list(res.stdout.decode())
    assert footer == 1 and set(entries) == set(s.ids.values())


# -- file spool, running server: retry / delete / flush ---------------------------------------


def test_file_retry_one_is_delivered_promptly_and_others_stay(deferred_file: FileSetup) -> None:
    s = deferred_file
    s.sink.refuse_all = False
    target, *others = s.tokens
    started = time.monotonic()
    res = cli(s.config, "retry", s.ids[target])
    assert res.returncode == 0 and res.stderr == "", res
    assert res.stdout.strip() == "1 entry scheduled for immediate delivery"
    wait_until(lambda: s.sink.delivered_tokens()[target] == 1, timeout=10, interval=0.05,
               message="retried entry delivered")
    assert time.monotonic() - started < 10
    wait_until(lambda: set(listed(s.config)) == {s.ids[t] for t in others}, timeout=10,
               interval=0.2, message="retried entry gone from the queue")
    assert all(s.sink.delivered_tokens()[t] == 0 for t in others)
    assert cli(s.config, "retry", s.ids[target]).returncode == 1  # gone now
    assert s.mta.running()


def test_file_entry_being_delivered_show_list_retry_delete(deferred_file: FileSetup) -> None:
    s = deferred_file
    target, bystander, _ = s.tokens
    qid = s.ids[target]
    s.sink.refuse_all = False
    s.sink.release.clear()  # the sink holds its answer to the final dot
    assert cli(s.config, "retry", qid).returncode == 0
    wait_until(lambda: [a.token for a in s.sink.held()] == [target], timeout=10,
               interval=0.05, message="delivery of the retried entry in progress")
    # the server holds the lease now: every command answers, none blocks
    meta, raw = show(s.config, qid)
    assert meta["queue_id"] == qid and f"X-Token: {target}" in raw
    assert qid in listed(s.config)
    deleted = cli(s.config, "delete", qid)
    assert deleted.returncode == 1 and deleted.stdout == "", deleted
    assert qid in deleted.stderr and "being delivered" in deleted.stderr
    assert (s.spool_dir / "queue" / f"{qid}.json").exists()
    again = cli(s.config, "retry", qid)
    assert again.returncode == 1 and again.stdout == "", again
    s.sink.release.set()
    wait_until(lambda: s.sink.delivered_tokens()[target] == 1, timeout=10,
               message="held delivery completed")
    wait_until(lambda: qid not in listed(s.config), timeout=10, interval=0.2,
               message="delivered entry gone")
    # one more pass that picks up work: the delivered entry is not delivered a second time
    assert cli(s.config, "retry", s.ids[bystander]).returncode == 0
    wait_until(lambda: s.sink.delivered_tokens()[bystander] == 1, timeout=10,
               message="bystander delivered")
    assert s.sink.delivered_tokens()[target] == 1
    assert attempts(s.sink, target) == 2  # the 451 at first, then the one 250
    assert s.mta.running()


def test_file_deleted_entry_never_comes_back(mtas: MtaPool, sink: ReplySink) -> None:
    """retryDelaySeconds 1: the sink sees a retry every few seconds. After `queue delete`
    the entry gets no further attempt (past its next retry time), not after a restart
    either, while the entry next to it keeps being retried and is delivered at the end."""
    s = start_file_server(mtas, sink, 2, retry_delay=1)
    victim, survivor = s.tokens
    qid = s.ids[victim]

    def delete() -> bool:  # the server may hold the lease for a moment (a retry running)
        res = cli(s.config, "delete", qid)
        if res.returncode == 0:
            assert res.stdout.strip() == f"{qid}: deleted" and res.stderr == "", res
            return True
        assert res.returncode == 1 and "being delivered" in res.stderr, res
        return False

    wait_until(delete, timeout=15, interval=0.1, message="delete to succeed")
    tried = attempts(sink, victim)
    base = attempts(sink, survivor)
    wait_until(lambda: attempts(sink, survivor) >= base + 2, timeout=20, interval=0.1,
               message="two more retries of the other entry")
    assert attempts(sink, victim) == tried
    assert not list((s.spool_dir / "queue").glob(f"{qid}.*"))
    rc, _ = s.mta.terminate()
    assert rc == 0
    s.mta.start()
    sink.refuse_all = False
    assert cli(s.config, "retry", s.ids[survivor]).returncode in (0, 1)  # 1: being delivered
    wait_until(lambda: sink.delivered_tokens()[survivor] == 1, timeout=15,
               message="the other entry delivered after the restart")
    assert listed(s.config) == {}
    assert attempts(sink, victim) == tried and sink.delivered_tokens()[victim] == 0
    gone = cli(s.config, "show", qid)
    assert gone.returncode == 1 and "no such queue entry" in gone.stderr


def test_file_flush_while_the_server_holds_a_lease(deferred_file: FileSetup) -> None:
    s = deferred_file
    held, *rest = s.tokens
    s.sink.refuse_all = False
    s.sink.release.clear()
    assert cli(s.config, "retry", s.ids[held]).returncode == 0
    wait_until(lambda: [a.token for a in s.sink.held()] == [held], timeout=10,
               message="one delivery held at the sink")
    res = cli(s.config, "flush")
    assert res.returncode == 0 and res.stderr == "", res
    # the leased entry is in flight: only the two others are made due
    assert res.stdout.strip() == "2 entries scheduled for immediate delivery"
    second = cli(s.config, "flush")
    assert second.returncode == EX_TEMPFAIL and second.stdout == "", second
    assert "cooldown" in second.stderr
    s.sink.release.set()
    wait_until(lambda: all(s.sink.delivered_tokens()[t] == 1 for t in s.tokens), timeout=15,
               message="every entry delivered")
    wait_until(lambda: listed(s.config) == {}, timeout=10, interval=0.2, message="empty queue")
    assert all(s.sink.delivered_tokens()[t] == 1 for t in s.tokens)
    assert all(attempts(s.sink, t) == 2 for t in rest)
    assert s.mta.running()


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to give the spool to another user")
def test_file_cli_as_root_keeps_spool_files_owned_by_the_service_user(
        mtas: MtaPool, sink: ReplySink) -> None:
    s = start_file_server(mtas, sink, 2)
    rc, _ = s.mta.terminate()  # (a server running as root would rewrite the files itself)
    assert rc == 0
    service = (65534, 65534)  # nobody:nogroup stands for kotlin-smtp:kotlin-smtp
    for dirpath, dirnames, filenames in os.walk(s.spool_dir):
        for name in [*dirnames, *filenames]:
            os.chown(os.path.join(dirpath, name), *service, follow_symlinks=False)
    os.chown(s.spool_dir, *service)
    res = cli(s.config, "retry", s.ids[s.tokens[0]])
    assert res.returncode == 0, res.stderr
    res = cli(s.config, "flush")
    assert res.returncode == 0, res.stderr
    wrong = []
    for p in sorted((s.spool_dir / "queue").iterdir()) + sorted(
            (s.spool_dir / "requests").iterdir()):
        st = p.stat()
        if (st.st_uid, st.st_gid) != service:
            wrong.append(f"{p.relative_to(s.spool_dir)} {st.st_uid}:{st.st_gid} "
                         f"{oct(st.st_mode & 0o7777)}")
    assert wrong == []


# -- file spool: broken spool / config / output -----------------------------------------------


def test_file_queue_against_a_missing_spool_dir(tmp_path: Path) -> None:
    conf = make_config(tmp_path / "data")
    missing = tmp_path / "mnt" / "spool"
    path = tmp_path / "c.yaml"
    write_config(path, deep_merge(conf, {"smtp": {"spool": {"dir": str(missing)}}}))
    res = cli(path, "list")
    assert res.returncode in (1, 2), res
    assert str(missing) in res.stderr
    assert not missing.exists()


def test_file_damaged_spool_layout_is_a_clear_error(tmp_path: Path) -> None:
    conf = make_config(tmp_path / "data")
    path = write_config(tmp_path / "c.yaml", conf)
    spool = Path(conf["smtp"]["spool"]["dir"])
    shutil.rmtree(spool / "queue", ignore_errors=True)
    (spool / "queue").write_text("not a directory\n")
    for action in (["list"], ["show", "txAbcdefgh12345678"], ["flush"]):
        res = subprocess.run([KOTLIN_SMTP, "queue", *action, "-c", str(path)],
                             capture_output=True, text=True, timeout=60, env=proc_env(),
                             stdin=subprocess.DEVNULL)
        assert "Traceback" not in res.stderr, res.stderr
        assert res.returncode in (1, EX_TEMPFAIL)
        assert "queue" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_file_spool_dir_that_is_a_file_is_a_config_error(tmp_path: Path) -> None:
    conf = make_config(tmp_path / "data")
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    path = write_config(tmp_path / "c.yaml",
                        deep_merge(conf, {"smtp": {"spool": {"dir": str(blocker)}}}))
    for action in ("list", "flush"):
        res = cli(path, action)
        assert res.returncode == 2 and res.stdout == "", res
        assert "smtp.spool.dir" in res.stderr and str(blocker) in res.stderr


def test_file_list_into_a_closed_pipe_has_no_traceback(tmp_path: Path) -> None:
    conf = make_config(tmp_path / "data")
    path = write_config(tmp_path / "c.yaml", conf)
    populate(Path(conf["smtp"]["spool"]["dir"]),
             [f"user{i}@relay.test" for i in range(5)])
    proc = subprocess.Popen([KOTLIN_SMTP, "queue", "list", "-c", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=proc_env(),
                            stdin=subprocess.DEVNULL)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # the reader is gone before the tool writes anything
    err = proc.stderr.read().decode()
    proc.wait(30)
    assert "Traceback" not in err and "BrokenPipeError" not in err, err


# -- Redis spool, two nodes sharing one queue -------------------------------------------------


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = start_redis()
    yield server
    server.cleanup()


@dataclass
class RedisSetup:
    nodes: list[Node]
    redis: RedisServer
    prefix: str
    sink: ReplySink
    ids: dict[str, str]
    tokens: list[str]

    def config(self, i: int) -> str:
        return str(self.nodes[i].proc.config_path)

    def node_config(self, ehlo: str) -> str:
        (node,) = [n for n in self.nodes if n.ehlo == ehlo]
        return str(node.proc.config_path)

    def keys_of(self, qid: str) -> dict[str, Any]:
        p = self.prefix
        return {kind: redis_command(self.redis.port, "EXISTS", f"{p}:{kind}:{qid}")
                for kind in ("meta", "msg", "lock")} | {
            "due": redis_command(self.redis.port, "ZSCORE", f"{p}:due", qid)}


def start_redis_nodes(mtas: MtaPool, redis: RedisServer, sink: TokenSink, n: int,
                      retry_delay: int = 3600) -> RedisSetup:
    prefix = f"hunt:{uuid.uuid4().hex[:12]}"
    nodes = start_nodes(mtas, ["a", "b"], redis, prefix, sink.port, retry_delay=retry_delay)
    tokens = [f"r{i}-{uuid.uuid4().hex}" for i in range(n)]
    send(nodes[0].port, tokens)
    config = str(nodes[0].proc.config_path)
    entries = wait_deferred(config, n)
    ids = ids_by_token(config, entries)
    assert sorted(ids) == sorted(tokens)
    return RedisSetup(nodes, redis, prefix, sink, ids, tokens)


def test_redis_list_show_delete_from_either_node(mtas: MtaPool, redis_server: RedisServer,
                                                 sink: ReplySink) -> None:
    s = start_redis_nodes(mtas, redis_server, sink, 3)
    a, b = listed(s.config(0)), listed(s.config(1))
    assert a == b and set(a) == set(s.ids.values())
    for e in a.values():
        assert e.sender == SENDER and e.recipients == [RCPT] and e.attempts == 1
        assert utc(e.next) > time.time() + 300
        assert e.error is not None and "try again (sink)" in e.error
    meta, raw = show(s.config(1), s.ids[s.tokens[0]])
    assert meta["queue_id"] == s.ids[s.tokens[0]] and f"X-Token: {s.tokens[0]}" in raw
    for i, token in enumerate(s.tokens):
        res = cli(s.config(i % 2), "delete", s.ids[token])
        assert (res.returncode, res.stdout.strip(), res.stderr) == (
            0, f"{s.ids[token]}: deleted", ""), res
    res = cli(s.config(0), "list")
    assert (res.returncode, res.stdout, res.stderr) == (0, "-- 0 entries in queue\n", "")
    assert redis_command(redis_server.port, "ZCARD", f"{s.prefix}:due") == 0
    assert all(n.proc.running() for n in s.nodes)


def test_redis_delete_refused_while_the_other_node_delivers(
        mtas: MtaPool, redis_server: RedisServer, sink: ReplySink) -> None:
    s = start_redis_nodes(mtas, redis_server, sink, 2)
    target, bystander = s.tokens
    qid = s.ids[target]
    sink.refuse_all = False
    sink.release.clear()
    assert cli(s.config(0), "retry", qid).returncode == 0
    held = wait_until(lambda: sink.held(), timeout=10, interval=0.05,
                      message="delivery held at the sink")
    assert [h.token for h in held] == [target]
    delivering = held[0].node
    other = next(str(n.proc.config_path) for n in s.nodes if n.ehlo != delivering)
    for config in (other, s.node_config(delivering)):
        res = cli(config, "delete", qid)
        assert res.returncode == 1 and res.stdout == "", res
        assert qid in res.stderr and "being delivered" in res.stderr
        assert cli(config, "retry", qid).returncode == 1
    assert s.keys_of(qid)["meta"] == 1 and s.keys_of(qid)["lock"] == 1
    meta, _ = show(other, qid)
    assert meta["queue_id"] == qid
    sink.release.set()
    wait_until(lambda: sink.delivered_tokens()[target] == 1, timeout=15,
               message="held delivery completed")
    wait_until(lambda: set(listed(other)) == {s.ids[bystander]}, timeout=10, interval=0.2,
               message="delivered entry gone")
    assert s.keys_of(qid) == {"meta": 0, "msg": 0, "lock": 0, "due": None}
    assert cli(other, "retry", s.ids[bystander]).returncode == 0
    wait_until(lambda: sink.delivered_tokens()[bystander] == 1, timeout=15,
               message="bystander delivered")
    assert sink.delivered_tokens()[target] == 1
    assert all(n.proc.running() for n in s.nodes)


def test_redis_deleted_entry_never_comes_back(mtas: MtaPool, redis_server: RedisServer,
                                              sink: ReplySink) -> None:
    s = start_redis_nodes(mtas, redis_server, sink, 2, retry_delay=1)
    victim, survivor = s.tokens
    qid = s.ids[victim]

    def delete() -> bool:
        res = cli(s.config(1), "delete", qid)
        if res.returncode == 0:
            return True
        assert res.returncode == 1 and "being delivered" in res.stderr, res
        return False

    wait_until(delete, timeout=15, interval=0.1, message="delete to succeed")
    tried = attempts(sink, victim)
    base = attempts(sink, survivor)
    wait_until(lambda: attempts(sink, survivor) >= base + 2, timeout=20, interval=0.1,
               message="two more retries of the other entry")
    assert attempts(sink, victim) == tried
    assert s.keys_of(qid) == {"meta": 0, "msg": 0, "lock": 0, "due": None}
    for node in s.nodes:
        rc, _ = node.proc.terminate()
        assert rc == 0
    for node in s.nodes:
        node.proc.start()
    sink.refuse_all = False
    cli(s.config(0), "retry", s.ids[survivor])  # 1 when a node is delivering it already
    wait_until(lambda: sink.delivered_tokens()[survivor] == 1, timeout=15,
               message="the other entry delivered after the restart")
    wait_until(lambda: listed(s.config(0)) == {}, timeout=10, interval=0.2,
               message="empty queue")
    assert attempts(sink, victim) == tried and sink.delivered_tokens()[victim] == 0
    assert cli(s.config(1), "show", qid).returncode == 1


# -- Redis spool: unreachable, hung, wrong password -------------------------------------------


def redis_config(tmp_path: Path, url: str, **redis: Any) -> Path:
    conf = make_config(tmp_path / "data", overrides={"smtp": {
        "redis": {"url": url, "connectTimeoutMs": 500, "commandTimeoutMs": 1000, **redis},
        "spool": {"type": "redis", "redis": {"keyPrefix": f"hunt:{uuid.uuid4().hex[:8]}"}}}})
    return write_config(tmp_path / f"redis-{uuid.uuid4().hex[:6]}.yaml", conf)


@pytest.mark.parametrize("action", [["delete", "txAbcdefgh12345678"],
                                    ["retry", "txAbcdefgh12345678"]], ids=["delete", "retry"])
def test_redis_down_delete_and_retry_exit_75(tmp_path: Path, action: list[str]) -> None:
    path = redis_config(tmp_path, f"redis://127.0.0.1:{free_port()}/0")
    res = cli(path, *action)
    assert res.returncode == EX_TEMPFAIL and res.stdout == "", res
    assert res.stderr.startswith("spool unavailable:")
    assert len(res.stderr.strip().splitlines()) == 1


def test_redis_that_accepts_but_never_answers_gives_75_in_bounded_time(tmp_path: Path) -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        path = redis_config(tmp_path, f"redis://127.0.0.1:{listener.getsockname()[1]}/0")
        for action in (["list"], ["show", "txAbcdefgh12345678"], ["flush"],
                       ["delete", "txAbcdefgh12345678"]):
            started = time.monotonic()
            res = cli(path, *action)
            assert time.monotonic() - started < 10, action
            assert res.returncode == EX_TEMPFAIL and res.stdout == "", (action, res)
            assert "spool unavailable" in res.stderr
        assert accepted  # it did reach the silent server
    finally:
        stop.set()
        listener.close()
        t.join(5)
        for c in accepted:
            c.close()


@pytest.fixture
def redis_with_password() -> Iterator[tuple[int, str]]:
    password = "Hunt-Redis-" + uuid.uuid4().hex[:10]
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server unavailable")
    port = free_port()
    workdir = Path(f"/tmp/kotlin-smtp-hunt-redis-{uuid.uuid4().hex[:8]}")
    workdir.mkdir()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(workdir), "--requirepass",
                             password, "--logfile", str(workdir / "log")])
    try:
        def up() -> bool:
            try:
                return "NOAUTH" in str(redis_command(port, "PING"))
            except RuntimeError as exc:
                return "NOAUTH" in str(exc)
            except OSError:
                return False

        wait_until(up, timeout=10, message="redis-server with a password")
        yield port, password
    finally:
        proc.terminate()
        proc.wait(10)
        shutil.rmtree(workdir, ignore_errors=True)


def test_redis_with_the_right_password_works(tmp_path: Path,
                                             redis_with_password: tuple[int, str]) -> None:
    port, password = redis_with_password
    path = redis_config(tmp_path, f"redis://127.0.0.1:{port}/0", password=password)
    res = cli(path, "list")
    assert (res.returncode, res.stdout, res.stderr) == (0, "-- 0 entries in queue\n", "")


@pytest.mark.parametrize("password", ["wrong-password", None], ids=["wrong", "missing"])
def test_redis_wrong_password_is_a_config_error(tmp_path: Path,
                                                redis_with_password: tuple[int, str],
                                                password: str | None) -> None:
    port, real = redis_with_password
    extra = {"password": password} if password else {}
    path = redis_config(tmp_path, f"redis://127.0.0.1:{port}/0", **extra)
    res = cli(path, "list")
    assert res.stdout == "" and real not in res.stderr
    if password:
        assert password not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert re.search(r"(?i)auth|password", res.stderr), res.stderr
    assert res.returncode == 2, res
