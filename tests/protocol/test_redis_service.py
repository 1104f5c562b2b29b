"""The full server on the Redis spool: delivery, outage answers 451, several nodes share work."""

from __future__ import annotations

import smtplib
import uuid
from typing import Any

from helpers import RedisServer, wait_until
from protocol_support import Client


def _redis_overrides(redis: RedisServer, prefix: str) -> dict[str, Any]:
    return {"smtp": {"redis": {"url": redis.url, "commandTimeoutMs": 5000,
                               "connectTimeoutMs": 5000},
                     "spool": {"type": "redis", "redis": {"keyPrefix": prefix}}}}


def test_redis_spool_delivers_to_maildir(make_server: Any, redis_server: RedisServer) -> None:
    srv = make_server(_redis_overrides(redis_server, f"t:{uuid.uuid4().hex}"))
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("a@remote.test", ["alice@localhost"],
                   b"Subject: via redis\r\n\r\n\xff\xfe binary-ish body\r\n")
    (msg,) = srv.wait_messages("alice", 1)
    assert msg.endswith(b"\xff\xfe binary-ish body\r\n")
    wait_until(lambda: srv.service.spool.pending_count() == 0, message="redis queue drained")


def test_two_nodes_share_one_redis_queue_exactly_once(make_server: Any,
                                                     redis_server: RedisServer) -> None:
    prefix = f"t:{uuid.uuid4().hex}"
    a = make_server(_redis_overrides(redis_server, prefix))
    b = make_server(_redis_overrides(redis_server, prefix))
    # Both nodes deliver into node A's mailbox tree so duplicates would be visible in one place.
    b.service.directory.mailbox_dir = str(a.root / "mailboxes")
    tokens = []
    for i in range(40):
        token = f"token-{i}-{uuid.uuid4().hex}"
        tokens.append(token)
        with smtplib.SMTP("127.0.0.1", (a if i % 2 else b).port) as s:
            s.sendmail("x@remote.test", ["alice@localhost"], f"Subject: {token}\r\n\r\n{token}\r\n")
    msgs = a.wait_messages("alice", 40, timeout=30)
    bodies = b"".join(msgs).decode()
    assert all(bodies.count(t) == 2 for t in tokens)  # subject + body: exactly one copy each
    assert len(msgs) == 40


def test_redis_outage_answers_451_and_recovers(make_server: Any) -> None:
    redis = RedisServer(appendonly=True)
    redis.start()
    try:
        srv = make_server(_redis_overrides(redis, f"t:{uuid.uuid4().hex}"))
        redis.stop()
        c = Client(srv.port)
        c.reply()
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@remote.test>")
        c.cmd("RCPT TO:<alice@localhost>")
        code, lines = c.cmd("DATA")
        if code == 354:
            c.send(b"Subject: lost?\r\n\r\nx\r\n.\r\n")
            code, lines = c.reply()
        assert (code, lines[0][:5]) == (451, "4.3.0")
        redis.start()

        def delivered() -> bool:
            try:
                with smtplib.SMTP("127.0.0.1", srv.port) as s:
                    s.sendmail("a@remote.test", ["alice@localhost"], b"Subject: back\r\n\r\ny\r\n")
                return True
            except smtplib.SMTPException:
                return False

        wait_until(delivered, timeout=30, interval=0.2, message="accepting again after restart")
        (msg,) = srv.wait_messages("alice", 1)
        assert b"Subject: back" in msg
    finally:
        redis.cleanup()


def test_redis_restart_during_a_commit_costs_a_wait_not_a_451(make_server: Any) -> None:
    """A commit issued while Redis restarts waits for the reconnect (within commandTimeoutMs)
    and the client gets its 250: no 451 and retry minutes later for a blip."""
    redis = RedisServer(appendonly=True)
    redis.start()
    try:
        srv = make_server(_redis_overrides(redis, f"t:{uuid.uuid4().hex}"))
        client = srv.service.redis
        redis.stop()
        wait_until(lambda: not client.connected, message="the server to see Redis go")
        c = Client(srv.port)
        c.reply()
        c.cmd("EHLO c.test")
        c.cmd("MAIL FROM:<a@remote.test>")
        c.cmd("RCPT TO:<alice@localhost>")
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: during a restart\r\n\r\nkept\r\n.\r\n")
        wait_until(lambda: len(client._waiters) > 0, message="the commit waiting for Redis")
        redis.start()  # same port, same data
        code, lines = c.reply()
        assert (code, lines[0][:5]) == (250, "2.0.0"), lines
        (msg,) = srv.wait_messages("alice", 1)
        assert b"Subject: during a restart" in msg
    finally:
        redis.cleanup()


def _etrn_node(make_server: Any, redis: RedisServer, prefix: str) -> Any:
    from kotlin_smtp_py.inbound.auth import hash_password

    over = _redis_overrides(redis, prefix)
    over["smtp"]["features"] = {"etrnEnabled": True}
    over["smtp"]["spool"]["triggerCooldownMillis"] = 600_000
    over["smtp"]["auth"] = {"users": {"carol": hash_password("pw", rounds=4)}}
    over["smtp"]["listeners"] = [{"port": 0, "bindAddress": "127.0.0.1",
                                  "allowPlaintextAuth": True}]
    return make_server(over)


def _etrn(srv: Any) -> int:
    import base64

    c = Client(srv.port)
    c.reply()
    c.cmd("EHLO c.test")
    assert c.cmd("AUTH PLAIN " + base64.b64encode(b"\0carol\0pw").decode())[0] == 235
    code, _ = c.cmd("ETRN example.org")
    c.close()
    return int(code)


def test_etrn_cooldown_is_shared_by_every_node(make_server: Any,
                                               redis_server: RedisServer) -> None:
    """SPEC §3: one cooldown for ETRN and ``queue flush``; on the Redis spool a node's ETRN
    holds it for the whole cluster (each node kept its own before: N nodes, N runs)."""
    prefix = f"t:{uuid.uuid4().hex}"
    a = _etrn_node(make_server, redis_server, prefix)
    b = _etrn_node(make_server, redis_server, prefix)
    assert _etrn(a) == 250
    assert _etrn(b) == 458
    assert _etrn(a) == 458


def test_etrn_with_redis_down_is_refused_not_an_error(make_server: Any) -> None:
    redis = RedisServer()
    redis.start()
    try:
        srv = _etrn_node(make_server, redis, f"t:{uuid.uuid4().hex}")
        redis.stop()
        assert _etrn(srv) == 458
    finally:
        redis.cleanup()
