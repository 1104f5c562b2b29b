"""Abuse protection and extension points over real sockets (issue: inbound policy)."""

from __future__ import annotations

import base64
import json
import smtplib
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from protocol_support import Client, Server

from kotlin_smtp_py.inbound.auth import hash_password

NO_EXEMPT = {"exemptCidrs": []}


def ehlo(c: Client) -> None:
    assert c.reply()[0] == 220
    assert c.cmd("EHLO client.test")[0] == 250


def test_fifty_parallel_connections_from_one_ip(make_server: Any) -> None:
    srv: Server = make_server({"smtp": {"rateLimit": {"maxConnectionsPerIp": 10, **NO_EXEMPT}}})
    results: list[int] = []
    clients: list[Client] = []
    refused: list[Client] = []
    lock = threading.Lock()

    def connect() -> None:
        c = Client(srv.port)
        code = c.reply()[0]
        with lock:
            results.append(code)
            clients.append(c)
            if code == 421:
                refused.append(c)

    threads = [threading.Thread(target=connect) for _ in range(50)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(results) == [220] * 10 + [421] * 40
    assert all(c.closed(timeout=10) for c in refused)  # the server closes every refused one
    for c in clients:
        c.close()
    # Released on disconnect: new connections are accepted again.
    from helpers import wait_until

    def greeted() -> bool:
        c = Client(srv.port)
        try:
            return c.reply()[0] == 220
        finally:
            c.close()

    wait_until(greeted, message="connection slots released")


def test_loopback_is_exempt_by_default(make_server: Any) -> None:
    srv = make_server({"smtp": {"rateLimit": {"maxConnectionsPerIp": 1,
                                              "maxMessagesPerIpPerHour": 1}}})
    a, b = Client(srv.port), Client(srv.port)
    assert a.reply()[0] == 220 and b.reply()[0] == 220


def test_messages_per_ip_per_hour(make_server: Any) -> None:
    srv = make_server({"smtp": {"rateLimit": {"maxMessagesPerIpPerHour": 2, **NO_EXEMPT}}})
    c = Client(srv.port)
    ehlo(c)
    for _ in range(2):
        assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
        assert c.cmd("RSET")[0] == 250
    code, lines = c.cmd("MAIL FROM:<a@remote.test>")
    assert (code, lines[0][:5]) == (451, "4.7.0")


def _auth_srv(make_server: Any, **auth: Any) -> Server:
    users = {"carol": hash_password("right-pass", rounds=4)}
    return make_server({"smtp": {
        "auth": {"users": users, "rateLimitMaxFailures": 3, "failureDelayMs": 0, **auth},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}]}})


def _plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\0{user}\0{password}".encode()).decode()


def test_auth_brute_force_lockout(make_server: Any) -> None:
    srv = _auth_srv(make_server)
    c = Client(srv.port)
    ehlo(c)
    assert [c.cmd(_plain("carol", "wrong"))[0] for _ in range(2)] == [535, 535]
    code, lines = c.cmd(_plain("carol", "wrong"))
    assert (code, lines[0][:5]) == (454, "4.7.0")  # third failure locks
    assert c.cmd(_plain("carol", "right-pass"))[0] == 454  # even the right password
    assert c.cmd(_plain("carol", "right-pass"))[0] == 454
    assert c.cmd(_plain("carol", "right-pass"))[0] == 421  # keeps trying: cut off
    assert c.closed()
    other = Client(srv.port)  # the lock is per IP and per user: a new session is locked too
    ehlo(other)
    assert other.cmd(_plain("carol", "right-pass"))[0] == 454


def test_auth_success_resets_failures(make_server: Any) -> None:
    srv = _auth_srv(make_server)
    for _ in range(3):
        c = Client(srv.port)
        ehlo(c)
        assert c.cmd(_plain("carol", "wrong"))[0] == 535
        assert c.cmd(_plain("carol", "wrong"))[0] == 535
        assert c.cmd(_plain("carol", "right-pass"))[0] == 235
        c.close()


def test_auth_failure_is_answered_after_a_delay(make_server: Any) -> None:
    import time

    users = {"carol": hash_password("right-pass", rounds=4)}
    srv = make_server({"smtp": {
        "auth": {"users": users, "failureDelayMs": 400},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}]}})
    c = Client(srv.port)
    ehlo(c)
    start = time.monotonic()
    assert c.cmd(_plain("nosuchuser", "x"))[0] == 535
    assert time.monotonic() - start >= 0.4


def test_pregreet_talker_is_refused(make_server: Any) -> None:
    srv = make_server({"smtp": {"listeners": [
        {"port": 0, "bindAddress": "127.0.0.1", "pregreetCheck": True, "pregreetDelayMs": 300}]}})
    early = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    early.sendall(b"EHLO spammer.test\r\n")
    data = b""
    while True:
        chunk = early.recv(4096)
        if not chunk:
            break
        data += chunk
    assert data.startswith(b"554 5.5.1")
    patient = Client(srv.port)
    assert patient.reply()[0] == 220
    assert patient.cmd("EHLO good.test")[0] == 250


def test_vrfy_and_expn_behind_feature_flags(make_server: Any, certs: Any) -> None:
    srv = make_server({"smtp": {"features": {"vrfyEnabled": True, "expnEnabled": True},
                                "auth": {"users": {"carol": hash_password("pw", rounds=4)}},
                                "listeners": [{"port": 0, "bindAddress": "127.0.0.1",
                                               "allowPlaintextAuth": True}]}})
    (srv.root / "lists" / "team").write_text("alice@localhost\nbob@localhost\n")
    c = Client(srv.port)
    ehlo(c)
    assert c.cmd("VRFY alice")[0] == 252
    assert c.cmd("VRFY <alice@localhost>")[0] == 252
    assert c.cmd("VRFY nobody")[:1] == (550,)
    assert c.cmd("EXPN team")[0] == 530
    assert c.cmd(_plain("carol", "pw"))[0] == 235
    code, lines = c.cmd("EXPN team")
    assert code == 250 and lines == ["2.1.5 <alice@localhost>", "2.1.5 <bob@localhost>"]
    assert c.cmd("EXPN alice")[0] == 550


# -- extension points --------------------------------------------------------------------------


PLUGINS = {"commandInterceptors": ["examples.plugins.BlockSenderDomain",
                                   "examples.plugins.DropXCommand"],
           "eventHooks": ["examples.plugins.JsonLinesAudit", "examples.plugins.BrokenHook"]}


def test_interceptors_deny_and_drop_at_each_stage(make_server: Any, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EXAMPLE_AUDIT_FILE", str(tmp_path / "audit.jsonl"))
    srv = make_server({"smtp": {"plugins": PLUGINS,
                                "auth": {"users": {"banned": "x"}},
                                "listeners": [{"port": 0, "bindAddress": "127.0.0.1",
                                               "allowPlaintextAuth": True}]}})
    c = Client(srv.port)
    ehlo(c)
    assert c.cmd(_plain("banned", "x"))[0] == 535  # AUTH stage
    assert c.cmd("MAIL FROM:<spam@blocked.test>")[:1] == (550,)  # MAIL_FROM (async)
    assert c.cmd("MAIL FROM:<nodata@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<trap@localhost>")[0] == 550  # RCPT_TO
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("DATA")[0] == 554  # DATA_PRE
    assert c.cmd("RSET")[0] == 250
    c.send(b"MAIL FROM:<ok@remote.test>\r\nRCPT TO:<alice@localhost>\r\nBDAT 5 LAST\r\n"
           b"hello")
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 250]
    c.send(b"NOOP XDROP\r\n")  # PRE_COMMAND: drop without a reply
    assert c.closed()
    assert c.buf == b""
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("fine@remote.test", ["alice@localhost"], b"Subject: ok\r\n\r\nx\r\n")
    srv.wait_messages("alice", 1)
    from helpers import wait_until

    def audit() -> list[dict[str, Any]]:
        path = tmp_path / "audit.jsonl"
        return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []

    kinds = wait_until(lambda: [e["kind"] for e in audit()].count("session_ended") >= 2 and
                       [e["kind"] for e in audit()], message="audit events")
    assert {"session_started", "session_ended", "message_accepted",
            "message_rejected"} <= set(kinds)
    accepted = [e for e in audit() if e["kind"] == "message_accepted"]
    assert accepted[0]["queue_id"] and accepted[0]["size"] > 0


def test_replaced_auth_service_and_routing_policy(make_server: Any) -> None:
    srv = make_server({"smtp": {"plugins": {
        "authService": "examples.plugins.StaticAuthService",
        "routingPolicy": "examples.plugins.SuffixRoutingPolicy"},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}]}})
    c = Client(srv.port)
    ehlo(c)
    assert c.cmd(_plain("ldapuser", "ldap-pass"))[0] == 235
    assert c.cmd("MAIL FROM:<x@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@sales.internal.test>")[0] == 250  # local by the plugin
    assert c.cmd("RCPT TO:<alice@example.test>")[0] == 550  # no longer local: relay denied


def test_unknown_plugin_fails_start_up_clearly(tmp_path: Path) -> None:
    import yaml

    from kotlin_smtp_py import config as cfg
    from kotlin_smtp_py.service import SmtpService

    dirs = {k: str(tmp_path / k) for k in ("mailboxDir", "tempDir", "listsDir")}
    config = cfg.load_text(yaml.safe_dump({"smtp": {
        "storage": dirs, "spool": {"dir": str(tmp_path / "spool")},
        "plugins": {"commandInterceptors": ["examples.plugins.JsonLinesAudit"]}}}))
    with pytest.raises(cfg.ConfigError,
                       match=r"smtp\.plugins\.commandInterceptors\[0\].*does not provide "
                             "ICommandInterceptor"):
        SmtpService(config)
