"""Bug hunt: the server's logs as an operator consumes them (kotlin_smtp_py/log.py and the log
calls on a message's path).

Questions: can a client forge log lines (CR/LF, ANSI escapes, NUL) through what it sends (AUTH
identities, headers, a relay peer's reply text, PROXY headers)?  Do secrets stay out at every
level?  Is ``logging.format: json`` one valid object per line for every process and event?  Does
``logging.level`` filter?  How does ``logging.file`` behave (permissions, rotation, disk full,
unwritable)?  Does one message's audit trail carry what docs/OPERATIONS.md §6 promises?

In-process tests run a real :class:`SmtpService` on loopback and attach the product's own
observer (:class:`LineObserver` with ``format_text`` / ``format_json``) to Twisted's global log
publisher, exactly as twistd does with ``configure_logging``. Process-level questions run
``twistd -n smtp`` through ``tests/integration/mtaproc.py``. Ten cases found bugs (all
fixed since): text lines forged through AUTH names, Message-IDs, remote replies and Unicode
line breaks (now escaped), no ``helo`` on the accepted line, a line lost for a non-UTF-8 file
name, configuration warnings outside the JSON log, the log file never reopened after
rotation, an unwritable log file passing check-config and failing start-up with a traceback.
"""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import smtplib
import socket
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from helpers import deep_merge, on_reactor, wait_until
from twisted.logger import LogLevel, globalLogPublisher

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.inbound.auth import hash_password
from kotlin_smtp_py.log import LineObserver, Redactor, format_json, format_text, open_output
from kotlin_smtp_py.service import SmtpService

TESTS = Path(__file__).resolve().parents[1]
for _sub in ("outbound", "integration"):
    if str(TESTS / _sub) not in sys.path:
        sys.path.insert(0, str(TESTS / _sub))
from mtaproc import KOTLIN_SMTP, MtaProcess, make_config, proc_env, write_config  # noqa: E402
from outbound_sink import Behaviour, SinkFactory  # noqa: E402

REPO = TESTS.parent
DOCS = REPO / "docs"
PASSWORD = "Hunt-Pw-7319-secret"
ROUTE_PASSWORD = "Route-Pw-5521-secret"
REDIS_PASSWORD = "Redis-Pw-8842-secret"
TS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")
TEXT_LINE = re.compile(
    r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z (DEBUG|INFO |WARN |ERROR|CRITICAL) \[")
LEVELS = {"DEBUG", "INFO", "WARN", "ERROR", "CRITICAL"}
# Control characters a terminal, `less -R` or a log viewer would act on (TAB aside).
RAW_CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")
FORGED = "2030-01-01T00:00:00.000Z INFO  [kotlin_smtp_py.inbound.protocol] FORGED"


# -- capture: the product's observer on the global publisher -----------------------------------


@dataclass
class Capture:
    text: io.StringIO
    json: io.StringIO

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.json.getvalue().split("\n") if line]

    def events(self, name: str) -> list[dict[str, Any]]:
        return [r for r in self.records() if r.get("event") == name]

    def wait_event(self, name: str, pred: Callable[[dict[str, Any]], bool] = lambda r: True,
                   timeout: float = 20) -> dict[str, Any]:
        def find() -> dict[str, Any] | None:
            return next((r for r in self.events(name) if pred(r)), None)
        return wait_until(find, timeout=timeout, message=f"log event {name}")  # type: ignore[no-any-return]


@pytest.fixture
def capture() -> Iterator[Capture]:
    cap = Capture(io.StringIO(), io.StringIO())
    observers = [LineObserver(cap.text, format_text, Redactor(), LogLevel.debug),
                 LineObserver(cap.json, format_json, Redactor(), LogLevel.debug)]
    for o in observers:
        globalLogPublisher.addObserver(o)
    yield cap
    for o in observers:
        globalLogPublisher.removeObserver(o)


@dataclass
class Srv:
    service: SmtpService
    root: Path

    @property
    def port(self) -> int:
        return self.service.smtp_port(0)


@pytest.fixture
def make_service(tmp_path: Path, reactor_thread: None) -> Iterator[Callable[..., Srv]]:
    started: list[SmtpService] = []

    def make(overrides: dict[str, Any] | None = None, config_path: Path | None = None) -> Srv:
        root = tmp_path / f"srv{len(started)}"
        for sub in ("spool", "temp", "lists", "mailboxes/alice", "mailboxes/bob"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        base: dict[str, Any] = {"smtp": {
            "hostname": "mx.test",
            "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}],
            "routing": {"localDomain": "localhost"},
            "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                        "listsDir": str(root / "lists")},
            "spool": {"type": "file", "dir": str(root / "spool"), "retryDelaySeconds": 60},
            "auth": {"users": {"carol": PASSWORD}, "failureDelayMs": 0},
            "lifecycle": {"gracefulShutdownTimeoutMs": 1000}},
            "management": {"server": {"port": 0, "bindAddress": "127.0.0.1"}}}
        text = yaml.safe_dump(deep_merge(base, overrides or {}))
        if config_path is not None:
            config_path.write_text(text)
        config = cfg.load_text(text)
        svc = on_reactor(SmtpService, config,
                         config_path=str(config_path) if config_path else None)
        on_reactor(svc.startService)
        started.append(svc)
        return Srv(svc, root)

    yield make
    for svc in started:
        on_reactor(svc.stopService, timeout=30)


@pytest.fixture
def sink(reactor_thread: None) -> Iterator[tuple[SinkFactory, int]]:
    factory = SinkFactory(Behaviour())

    def listen() -> Any:
        from twisted.internet import reactor
        return reactor.listenTCP(0, factory, interface="127.0.0.1")  # type: ignore[attr-defined]

    port = on_reactor(listen)
    yield factory, int(port.getHost().port)
    on_reactor(port.stopListening)


def relay_to(port: int, **route: Any) -> dict[str, Any]:
    return {"smtp": {
        "dns": {"servers": ["127.0.0.1:9"], "timeoutMs": 500},
        "relay": {"enabled": True, "requireAuthForRelay": False,
                  "allowedClientCidrs": ["127.0.0.0/8"],
                  "defaultRoute": {"host": "127.0.0.1", "port": port,
                                   "startTlsEnabled": False, **route},
                  "connectionCache": {"enabled": False},
                  "outboundTls": {"connectTimeoutMs": 2000, "readTimeoutMs": 2000}}}}


class Raw:
    """A raw SMTP client (bytes in, replies out) for values smtplib would refuse to send."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=15)
        self.f = self.sock.makefile("rb")
        assert self.reply().startswith(b"220")

    def reply(self) -> bytes:
        for _ in range(100):
            line = self.f.readline()
            assert line, "connection closed"
            if line[3:4] != b"-":
                return line
        raise AssertionError("endless reply")

    def cmd(self, line: bytes) -> bytes:
        self.sock.sendall(line + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.cmd(b"QUIT")
        except (OSError, AssertionError):
            pass
        self.f.close()
        self.sock.close()


def b64(data: bytes) -> bytes:
    return base64.b64encode(data)


def assert_text_lines_clean(text: str, *needles: str) -> None:
    """Every text line is one of ours (no forged line) and carries no raw control chars."""
    lines = text.split("\n")[:-1]
    forged = [ln for ln in lines if not TEXT_LINE.match(ln)]
    assert not forged, f"lines not written by the formatter: {forged!r}"
    dirty = [ln for ln in lines if RAW_CONTROL.search(ln) and any(n in ln for n in needles)]
    assert not dirty, f"raw control characters in log lines: {dirty!r}"


# == log injection ================================================================================


def _auth_injection(srv: Srv) -> None:
    c = Raw(srv.port)
    assert c.cmd(b"EHLO client.test").startswith(b"250")
    # AUTH PLAIN: the authcid carries a line break and a complete forged line.
    assert c.cmd(b"AUTH PLAIN " + b64(b"\0mallory\n" + FORGED.encode() + b"\0x")
                 ).startswith(b"535")
    # AUTH LOGIN: the user name may carry anything, NUL included.
    assert c.cmd(b"AUTH LOGIN " + b64(b"eve\x1b[2J\x00\rOVERWRITE")).startswith(b"334")
    assert c.cmd(b64(b"wrong")).startswith(b"535")
    c.close()


def test_json_auth_identities_with_control_chars_stay_one_object_per_line(
        make_service: Callable[..., Srv], capture: Capture) -> None:
    """JSON: json.dumps escapes every control character; the user field keeps the exact value
    (a SIEM can match it) and nothing else becomes a record."""
    srv = make_service()
    _auth_injection(srv)
    capture.wait_event("auth_failure", lambda r: r["user"].startswith("eve"))
    failures = capture.events("auth_failure")
    users = {r["user"] for r in failures}
    assert "mallory\n" + FORGED in users
    assert "eve\x1b[2J\x00\rOVERWRITE" in users
    for line in capture.json.getvalue().split("\n")[:-1]:
        assert line.startswith("{") and line.endswith("}")
        assert not RAW_CONTROL.search(line), repr(line)
    assert all(r["peer"] == "127.0.0.1" and r["session"] for r in failures)
    assert not any("FORGED" in r.get("message", "") and r.get("event") != "auth_failure"
                   for r in capture.records())


def test_text_auth_identities_cannot_forge_lines(make_service: Callable[..., Srv],
                                                 capture: Capture) -> None:
    srv = make_service()
    _auth_injection(srv)
    capture.wait_event("auth_failure", lambda r: r["user"].startswith("eve"))
    text = capture.text.getvalue()
    assert "FORGED" in text and "OVERWRITE" in text  # the lines were written
    forged = [ln for ln in text.split("\n") if ln.startswith("2030-")]
    assert not forged, f"forged log line: {forged!r}"
    assert_text_lines_clean(text, "FORGED", "OVERWRITE")


def test_text_message_id_control_chars_are_escaped(make_service: Callable[..., Srv],
                                                   capture: Capture) -> None:
    srv = make_service()
    c = Raw(srv.port)
    for line in (b"EHLO client.test", b"MAIL FROM:<a@x.test>", b"RCPT TO:<alice@localhost>"):
        assert c.cmd(line).startswith(b"250")
    assert c.cmd(b"DATA").startswith(b"354")
    c.sock.sendall(b"Message-ID: <mid\x1b]0;PWNED\x07\x1b[2J\x00NUL\x7f@x.test>\r\n"
                   b"Subject: t\r\n\r\nbody\r\n.\r\n")
    assert c.reply().startswith(b"250")
    c.close()
    accepted = capture.wait_event("message_accepted")
    assert accepted["message_id"].startswith("<mid\x1b]0;PWNED")  # JSON: exact and escaped
    assert_text_lines_clean(capture.text.getvalue(), "PWNED")


def test_text_remote_reply_control_chars_are_escaped(
        make_service: Callable[..., Srv], capture: Capture,
        sink: tuple[SinkFactory, int]) -> None:
    factory, port = sink
    factory.behaviour.rcpt["esc@remote.test"] = b"550 5.1.1 no\x1b[31mRED\rFAKE\x00such user"
    srv = make_service(relay_to(port))
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as s:
        s.sendmail("a@x.test", ["esc@remote.test"], b"Subject: t\r\n\r\nhi\r\n")
    attempt = capture.wait_event("delivery_attempt",
                                 lambda r: r["recipient"] == "esc@remote.test")
    assert "\x1b[31mRED\rFAKE" in attempt["status"]  # JSON keeps the exact text, escaped
    assert attempt["remote_mta"] == "127.0.0.1"
    assert_text_lines_clean(capture.text.getvalue(), "FAKE")


def test_validated_client_input_never_reaches_logs_with_control_chars(
        make_service: Callable[..., Srv], capture: Capture) -> None:
    """EHLO names, addresses (quoted local parts, SMTPUTF8) and unknown verbs are validated or
    not logged: none of these forms puts a control character into either format."""
    srv = make_service()
    c = Raw(srv.port)
    assert c.cmd(b"EHLO evil\x1b[31m.test").startswith(b"501")
    assert c.cmd(b"EHLO client.test").startswith(b"250")
    assert c.cmd(b"XYZZY\x1b[2J MARK1").startswith(b"500")
    assert c.cmd(b"MAIL FROM:<\"a\x1b[2JMARK2\"@x.test>")[:1] == b"5"
    assert c.cmd("MAIL FROM:<s\u00e9nder@x.test> SMTPUTF8".encode()).startswith(b"250")
    assert c.cmd(b"RCPT TO:<MARK3\x1b@localhost>")[:1] == b"5"
    assert c.cmd(b"RCPT TO:<\"no body MARK5\"@localhost>").startswith(b"550")
    c.close()
    capture.wait_event("rcpt_rejected", lambda r: "MARK5" in r["recipient"])
    capture.wait_event("session_ended")
    text, js = capture.text.getvalue(), capture.json.getvalue()
    for mark in ("MARK1", "MARK2", "MARK3"):
        assert mark not in text and mark not in js
    assert not RAW_CONTROL.search(js.replace("\n", ""))
    assert_text_lines_clean(text, "MARK")


def test_text_smtputf8_unicode_line_breaks_are_escaped(make_service: Callable[..., Srv],
                                                       capture: Capture) -> None:
    srv = make_service()
    c = Raw(srv.port)
    assert c.cmd(b"EHLO client.test").startswith(b"250")
    assert c.cmd(b"MAIL FROM:<a@x.test> SMTPUTF8").startswith(b"250")
    code = c.cmd("RCPT TO:<\"MARK4\u0085FAKE\u2028x\"@localhost>".encode())
    c.close()
    if code[:1] == b"5" and not code.startswith(b"550"):
        return  # refused by the parser: nothing reaches the log
    capture.wait_event("session_ended")
    lines = [ln for ln in capture.text.getvalue().split("\n") if "MARK4" in ln]
    assert lines
    for line in lines:
        assert len(line.splitlines()) == 1, repr(line)


def test_proxy_header_values_are_logged_escaped(make_service: Callable[..., Srv],
                                                capture: Capture) -> None:
    srv = make_service({"smtp": {"listeners": [
        {"port": 0, "bindAddress": "127.0.0.1", "proxyProtocol": True}]}})
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(b"PROXY TCP4 1.2.3.4\x1b[2JPX 5.6.7.8 1000 25\r\n")
    s.settimeout(10)
    try:
        while s.recv(4096):
            pass
    except OSError:
        pass
    s.close()
    bad = capture.wait_event("proxy_bad_header")
    assert "PX" in bad["message"]
    assert_text_lines_clean(capture.text.getvalue(), "PX")


# == secrets =====================================================================================


def test_auth_exchanges_never_log_passwords_even_at_debug(
        make_service: Callable[..., Srv], capture: Capture) -> None:
    bcrypt_hash = hash_password(PASSWORD, rounds=4)
    srv = make_service({"smtp": {"auth": {"users": {"carol": bcrypt_hash,
                                                    "dave": PASSWORD}}}})
    plain_ok = b64(b"\0carol\0" + PASSWORD.encode())
    plain_bad = b64(b"\0carol\0" + PASSWORD.encode() + b"x")
    c = Raw(srv.port)
    assert c.cmd(b"EHLO client.test").startswith(b"250")
    assert c.cmd(b"AUTH PLAIN " + plain_bad).startswith(b"535")
    assert c.cmd(b"AUTH PLAIN").startswith(b"334")
    assert c.cmd(plain_bad).startswith(b"535")
    assert c.cmd(b"AUTH LOGIN").startswith(b"334")
    assert c.cmd(b64(b"carol")).startswith(b"334")
    assert c.cmd(b64(PASSWORD.encode() + b"y")).startswith(b"535")
    assert c.cmd(b"AUTH LOGIN " + b64(b"dave")).startswith(b"334")
    assert c.cmd(b64(PASSWORD.encode())).startswith(b"235")
    c.close()
    c = Raw(srv.port)
    assert c.cmd(b"EHLO client.test").startswith(b"250")
    assert c.cmd(b"AUTH PLAIN " + plain_ok).startswith(b"235")
    c.close()
    capture.wait_event("auth_success", lambda r: r["user"] == "carol")
    capture.wait_event("auth_success", lambda r: r["user"] == "dave")
    everything = capture.text.getvalue() + capture.json.getvalue()
    for secret in (PASSWORD, plain_ok.decode(), plain_bad.decode(), bcrypt_hash,
                   b64(PASSWORD.encode()).decode(), bcrypt_hash[7:29]):
        assert secret not in everything, secret
    assert len(capture.events("auth_failure")) == 3


def test_reload_never_logs_changed_secrets(make_service: Callable[..., Srv], capture: Capture,
                                           tmp_path: Path) -> None:
    """SIGHUP with changed secrets (users' hashes, redis password and URL password, a relay
    route password) and with a config that fails validation: names of keys, never values."""
    path = tmp_path / "server.yaml"
    srv = make_service(config_path=path)
    conf = yaml.safe_load(path.read_text())
    new_hash = hash_password("other-" + PASSWORD, rounds=4)
    conf["smtp"]["auth"]["users"] = {"carol": new_hash}
    conf["smtp"]["redis"] = {"url": f"redis://:{REDIS_PASSWORD}u@127.0.0.1:1/0",
                             "password": REDIS_PASSWORD}
    conf["smtp"]["relay"] = {"defaultRoute": {"host": "127.0.0.1", "port": 1,
                                              "username": "u", "password": ROUTE_PASSWORD}}
    path.write_text(yaml.safe_dump(conf))
    assert on_reactor(srv.service.reload) is True
    capture.wait_event("reloaded")
    # a config the server refuses: a bad URL that carries the password
    conf["smtp"]["redis"] = {"url": f"redis://:{REDIS_PASSWORD}@127.0.0.1:notaport/x"}
    path.write_text(yaml.safe_dump(conf))
    assert on_reactor(srv.service.reload) is False
    capture.wait_event("reload_failed")
    everything = capture.text.getvalue() + capture.json.getvalue()
    for secret in (REDIS_PASSWORD, ROUTE_PASSWORD, new_hash, PASSWORD):
        assert secret not in everything, secret
    changed = capture.events("reload_needs_restart")
    assert changed and "smtp.relay.defaultRoute.password" in changed[-1]["keys"]


def test_route_password_not_logged_when_relaying_with_auth(
        make_service: Callable[..., Srv], capture: Capture,
        sink: tuple[SinkFactory, int]) -> None:
    """The smart host refuses AUTH; even at debug the route password stays out of the logs."""
    factory, port = sink
    factory.behaviour.offer_auth = True
    srv = make_service(deep_merge(relay_to(port, username="relayuser",
                                           password=ROUTE_PASSWORD),
                                  {"smtp": {"relay": {"outboundTls": {
                                      "startTlsRequired": False}}}}))
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as s:
        s.sendmail("a@x.test", ["r@remote.test"], b"Subject: t\r\n\r\nhi\r\n")
    capture.wait_event("delivery_attempt", lambda r: r["recipient"] == "r@remote.test")
    everything = capture.text.getvalue() + capture.json.getvalue()
    assert ROUTE_PASSWORD not in everything
    token = b64(b"\0relayuser\0" + ROUTE_PASSWORD.encode()).decode()
    assert token not in everything and b64(ROUTE_PASSWORD.encode()).decode() not in everything


# == the audit trail ==============================================================================


def test_audit_trail_of_a_relayed_message(make_service: Callable[..., Srv], capture: Capture,
                                          sink: tuple[SinkFactory, int]) -> None:
    """OPERATIONS.md §6: accepted line, one delivery_attempt per recipient and attempt with
    status and remote_mta, a bounce line; `select(.queue_id==Q)` tells the story."""
    factory, port = sink
    factory.behaviour.rcpt["gone@remote.test"] = b"550 5.1.1 no such user"
    srv = make_service(relay_to(port))
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as s:
        s.ehlo("client.test")
        s.sendmail("alice@localhost", ["ok@remote.test", "gone@remote.test"],
                   b"Message-ID: <audit-1@x.test>\r\nSubject: t\r\n\r\nhi\r\n")
    acc = capture.wait_event("message_accepted", lambda r: r["message_id"] == "<audit-1@x.test>")
    qid = acc["queue_id"]
    assert acc["session"] and acc["peer"] == "127.0.0.1" and acc["sender"] == "alice@localhost"
    assert "ok@remote.test" in acc["recipient"] and "gone@remote.test" in acc["recipient"]
    capture.wait_event("entry_finished", lambda r: r["queue_id"] == qid)
    bounce = capture.wait_event("bounce", lambda r: r["queue_id"] == qid)
    assert bounce["sender"] == "alice@localhost"
    story = [r for r in capture.records() if r.get("queue_id") == qid]
    attempts = {r["recipient"]: r for r in story if r["event"] == "delivery_attempt"}
    assert set(attempts) == {"ok@remote.test", "gone@remote.test"}
    assert attempts["ok@remote.test"]["status"].startswith("250 ")
    assert attempts["gone@remote.test"]["status"].startswith("550 5.1.1")
    assert attempts["gone@remote.test"]["reason"] == "recipient"
    assert all(a["remote_mta"] == "127.0.0.1" and a["attempt"] == 1 for a in attempts.values())
    # the session of the accepted line has its start/end lines too
    ended = capture.wait_event("session_ended", lambda r: r["session"] == acc["session"])
    assert ended["peer"] == "127.0.0.1" and isinstance(ended["duration_ms"], int)
    for r in capture.records():
        assert TS.match(r["timestamp"]) and r["level"] in LEVELS, r
    # the event names operators are told to grep for exist
    ops = (DOCS / "OPERATIONS.md").read_text()
    assert "delivery_attempt" in ops
    assert "auth_failure" in (DOCS / "SECURITY.md").read_text()


def test_accepted_line_carries_the_helo_name(make_service: Callable[..., Srv],
                                            capture: Capture) -> None:
    srv = make_service()
    with smtplib.SMTP("127.0.0.1", srv.port, timeout=20) as s:
        s.ehlo("client-helo.test")
        s.sendmail("a@x.test", ["alice@localhost"], b"Subject: t\r\n\r\nhi\r\n")
    acc = capture.wait_event("message_accepted")
    assert acc.get("helo") == "client-helo.test"


# == non-UTF-8 ===================================================================================


def test_stale_spool_file_with_non_utf8_name_is_logged(
        make_service: Callable[..., Srv], tmp_path: Path) -> None:
    log_file = tmp_path / "server.log"
    observer = LineObserver(open_output(str(log_file)), format_json, Redactor(), LogLevel.info)
    root = tmp_path / "srv0"
    (root / "spool" / "tmp").mkdir(parents=True)
    stale = os.path.join(os.fsencode(root / "spool" / "tmp"), b"stale-\xff\xfe.tmp")
    with open(stale, "wb") as fh:
        fh.write(b"x")
    old = time.time() - 7200
    os.utime(stale, (old, old))
    globalLogPublisher.addObserver(observer)
    try:
        make_service()
        wait_until(lambda: not os.path.exists(stale), message="stale file swept")
        wait_until(lambda: "listening for SMTP" in log_file.read_text(errors="replace"),
                   message="log written")
    finally:
        globalLogPublisher.removeObserver(observer)
    text = log_file.read_text(encoding="utf-8")
    records = [json.loads(line) for line in text.splitlines()]
    assert any("stale spool file" in r["message"] and "stale-" in r["message"]
               for r in records), text[-1000:]


# == twistd processes: JSON, levels, workers, logging.file ========================================


def _send(port: int, n: int = 1) -> None:
    for _ in range(n):
        with smtplib.SMTP("127.0.0.1", port, timeout=20) as s:
            s.sendmail("a@x.test", ["alice@localhost"], b"Subject: t\r\n\r\nhi\r\n")


def _records(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
        assert isinstance(rec, dict), line
        out.append(rec)
    return out


def test_twistd_json_two_workers_debug_every_line_is_an_object(tmp_path: Path) -> None:
    conf = make_config(tmp_path / "d", overrides={
        "smtp": {"workers": 2}, "logging": {"format": "json", "level": "debug"}})
    port = conf["smtp"]["listeners"][0]["port"]
    proc = MtaProcess(tmp_path / "d", port, write_config(tmp_path / "c.yaml", conf)).start()
    try:
        wait_until(lambda: "worker_ready" in proc.log(), message="worker 1 serving")
        _send(port, 4)
        wait_until(lambda: proc.log().count('"entry_finished"') >= 4, message="deliveries")
        rc, _ = proc.terminate(30)
        assert rc == 0
    finally:
        proc.close()
    records = _records(proc.log())
    for r in records:
        assert {"timestamp", "level", "logger", "event", "message"} <= set(r), r
        assert TS.match(r["timestamp"]) and r["level"] in LEVELS, r
        assert not any(k.startswith("log_") for k in r), r
    events = [r["event"] for r in records]
    for name in ("worker_started", "worker_ready", "message_accepted", "delivery_attempt",
                 "shutdown", "shutdown_complete"):
        assert name in events, name
    assert events.count("shutdown_complete") == 2  # parent and worker both said goodbye
    # ... and each line says which process it came from (pid)
    goodbyes = {r["pid"] for r in records if r["event"] == "shutdown_complete"}
    assert len(goodbyes) == 2 and all(isinstance(p, int) for p in goodbyes), goodbyes
    assert any(r["logger"].startswith("twisted.") for r in records)  # twistd's own lines
    assert any(r["level"] == "DEBUG" for r in records)


def test_twistd_json_config_warnings_are_json(tmp_path: Path) -> None:
    conf = make_config(tmp_path / "d", overrides={
        "smtp": {"relay": {"outboundTls": {"trustAll": True, "failOnTrustAll": False}}},
        "logging": {"format": "json"}})
    port = conf["smtp"]["listeners"][0]["port"]
    proc = MtaProcess(tmp_path / "d", port, write_config(tmp_path / "c.yaml", conf)).start()
    try:
        rc, _ = proc.terminate(30)
        assert rc == 0
    finally:
        proc.close()
    records = _records(proc.log())
    assert any(r["level"] == "WARN" and "trustAll" in r["message"] for r in records)


def test_twistd_level_warn_to_file(tmp_path: Path) -> None:
    """logging.level warn with logging.file: the file is created without group/world write,
    holds only WARN and above (no twistd start-up chatter, no per-message info), and a reload
    that needs a restart shows up; stdout stays empty."""
    log_file = tmp_path / "logs" / "smtp.log"
    log_file.parent.mkdir()
    conf = make_config(tmp_path / "d", overrides={
        "logging": {"format": "json", "level": "warn", "file": str(log_file)}})
    port = conf["smtp"]["listeners"][0]["port"]
    path = write_config(tmp_path / "c.yaml", conf)
    proc = MtaProcess(tmp_path / "d", port, path).start()
    try:
        _send(port)
        conf["smtp"]["limits"] = {"maxRecipients": 7}
        write_config(path, conf)
        proc.signal(signal.SIGHUP)
        wait_until(lambda: "reload_needs_restart" in log_file.read_text(), message="reload")
        rc, _ = proc.terminate(30)
        assert rc == 0
    finally:
        proc.close()
    mode = stat.S_IMODE(log_file.stat().st_mode)
    assert not mode & (stat.S_IWGRP | stat.S_IWOTH), oct(mode)
    records = _records(log_file.read_text())
    assert records and all(r["level"] in ("WARN", "ERROR", "CRITICAL") for r in records), records
    assert proc.log().strip() == ""


def test_log_file_on_a_full_disk_server_keeps_serving(tmp_path: Path) -> None:
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    conf = make_config(tmp_path / "d", overrides={
        "logging": {"format": "text", "level": "debug", "file": "/dev/full"}})
    port = conf["smtp"]["listeners"][0]["port"]
    proc = MtaProcess(tmp_path / "d", port, write_config(tmp_path / "c.yaml", conf)).start()
    try:
        _send(port, 3)
        new = tmp_path / "d" / "mailboxes" / "alice" / "Maildir" / "new"
        wait_until(lambda: new.is_dir() and len(list(new.iterdir())) == 3, message="delivered")
        assert proc.running()
        rc, _ = proc.terminate(30)
        assert rc == 0
    finally:
        proc.close()


def test_log_file_is_reopened_after_rotation_and_sighup(tmp_path: Path) -> None:
    log_file = tmp_path / "smtp.log"
    conf = make_config(tmp_path / "d", overrides={
        "logging": {"format": "json", "file": str(log_file)}})
    port = conf["smtp"]["listeners"][0]["port"]
    proc = MtaProcess(tmp_path / "d", port, write_config(tmp_path / "c.yaml", conf)).start()
    try:
        wait_until(lambda: "listening for SMTP" in log_file.read_text(), message="first lines")
        log_file.rename(tmp_path / "smtp.log.1")
        proc.signal(signal.SIGHUP)
        rotated = tmp_path / "smtp.log.1"
        wait_until(lambda: '"reloaded"' in rotated.read_text() or (
            log_file.exists() and '"reloaded"' in log_file.read_text()), message="reload done")
        _send(port)
        wait_until(lambda: '"entry_finished"' in rotated.read_text() or (
            log_file.exists() and '"entry_finished"' in log_file.read_text()),
            message="message logged")
        rc, _ = proc.terminate(30)
        assert rc == 0
    finally:
        proc.close()
    assert log_file.exists(), "no new log file after rotation + SIGHUP"
    assert '"message_accepted"' in log_file.read_text()
    assert '"message_accepted"' not in (tmp_path / "smtp.log.1").read_text()


def _unwritable_log_config(tmp_path: Path) -> tuple[dict[str, Any], Path]:
    conf = make_config(tmp_path / "d", overrides={
        "logging": {"format": "json", "file": str(tmp_path / "no-such-dir" / "smtp.log")}})
    return conf, write_config(tmp_path / "c.yaml", conf)


def test_check_config_refuses_unwritable_log_file(tmp_path: Path) -> None:
    _, path = _unwritable_log_config(tmp_path)
    out = subprocess.run([KOTLIN_SMTP, "check-config", str(path)], capture_output=True,
                         text=True, timeout=60, env=proc_env())
    assert out.returncode != 0, out.stdout[-300:]
    assert "logging.file" in out.stdout + out.stderr


def test_twistd_unopenable_log_file_is_a_clean_error(tmp_path: Path) -> None:
    conf, path = _unwritable_log_config(tmp_path)
    port = conf["smtp"]["listeners"][0]["port"]
    proc = MtaProcess(tmp_path / "d", port, path).start(wait=False)
    try:
        assert proc.proc is not None
        rc = proc.proc.wait(60)
    finally:
        proc.close()
    output = proc.log()
    assert rc != 0
    assert "Traceback" not in output, output[-600:]
    assert "logging.file" in output and "kotlin-smtp" in output, output[-600:]

