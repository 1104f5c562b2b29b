"""Bug hunt: resource limits and denial-of-service resistance of the inbound SMTP server.

Real servers on loopback (``make_server``), raw sockets, bounded counts and deadlines. Every
test checks the reply codes a well-behaved client relies on *and* the server's own state
afterwards: the per-IP connection counter, the session set, the ``smtp_connections_active``
gauge, and the temporary files of half-received messages. Tests marked
``xfail(strict=True)`` demonstrate confirmed bugs or gaps (the reason names the cause; line
numbers are those of commit 0cfd4e6).
"""

from __future__ import annotations

import contextlib
import socket
import ssl
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from helpers import on_reactor, redis_command, wait_until
from protocol_support import Client, Server, scrape_metrics

from kotlin_smtp_py.inbound.protocol import MAX_ERRORS, PAUSE_BUFFER, READ_SIZE

NO_EXEMPT: dict[str, Any] = {"exemptCidrs": []}
LISTENER: dict[str, Any] = {"port": 0, "bindAddress": "127.0.0.1"}


# -- fixtures and helpers ----------------------------------------------------------------------


def no_tracebacks(failures: list[dict[str, Any]]) -> None:
    assert not failures, [str(f.get("log_failure"))[:300] for f in failures[:3]]


def greet(c: Client, name: str = "client.test") -> None:
    assert c.reply()[0] == 220
    assert c.cmd(f"EHLO {name}")[0] == 250


def rst_close(sock: Any) -> None:
    """Close with a TCP RST (SO_LINGER 0): the abrupt disconnect of a crashed client."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    sock.close()


def open_count(srv: Server, ip: str = "127.0.0.1") -> int:
    """The local per-IP connection counter (the limiter behind the loopback exemption)."""
    inner: Any = srv.service.connection_limiter.inner
    return int(on_reactor(lambda: inner.open_count(ip)))


def session_count(srv: Server) -> int:
    return int(on_reactor(lambda: sum(len(f.sessions) for f in srv.service.factories)))


def scrape(srv: Server) -> dict[str, float]:
    return scrape_metrics(srv.service.management_port.getHost().port)


def all_released(srv: Server) -> bool:
    return (session_count(srv) == 0 and open_count(srv) == 0
            and scrape(srv).get("smtp_connections_active", -1.0) == 0.0)


def temp_files(srv: Server) -> list[Path]:
    """Files of messages being received: spool tmp/, storage tempDir, Maildir tmp/."""
    roots = [srv.root / "spool" / "tmp", srv.root / "temp",
             *sorted((srv.root / "mailboxes").glob("*/Maildir/tmp"))]
    return [p for r in roots if r.is_dir() for p in r.rglob("*") if p.is_file()]


def greeted(srv: Server, port: int | None = None) -> bool:
    c = Client(port or srv.port)
    try:
        return c.reply()[0] == 220
    finally:
        c.close()


def limited_server(make_server: Any, per_ip: int = 2, **smtp: Any) -> Server:
    srv: Server = make_server({"smtp": {
        "rateLimit": {"maxConnectionsPerIp": per_ip, **NO_EXEMPT}, **smtp}})
    return srv


def transaction(c: Client, rcpt: str = "alice@localhost") -> None:
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250


def all_replies(c: Client, limit: int, stop: int | None = None) -> list[int]:
    """Reply codes until the server closes the connection, ``limit`` replies were read or
    the code ``stop`` arrived."""
    codes: list[int] = []
    for _ in range(limit):
        try:
            codes.append(c.reply()[0])
        except (ConnectionError, OSError):
            break
        if codes[-1] == stop:
            break
    return codes


# -- recipients --------------------------------------------------------------------------------


def test_100_recipients_are_accepted_and_the_next_get_452_not_5xx(make_server: Any) -> None:
    """RFC 5321 §4.5.3.1.8: at least 100 recipients; beyond the limit 452 4.5.3 (§4.5.3.1.10),
    which is no error: the session and the transaction go on, and the message is accepted."""
    srv = make_server()  # maxRecipients default 100
    c = Client(srv.port)
    greet(c)
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    c.send(b"".join(b"RCPT TO:<alice+%d@localhost>\r\n" % i for i in range(130)))
    replies = [c.reply() for _ in range(130)]
    assert [r[0] for r in replies] == [250] * 100 + [452] * 30
    assert all(r[1][0].startswith("4.5.3") for r in replies[100:])
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: many\r\n\r\nhello\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("NOOP")[0] == 250


def test_10000_pipelined_rcpts_answer_in_order_while_another_client_is_served(
        make_server: Any, failures: list[Any]) -> None:
    """A huge pipelined batch: every reply, in order; memory bounded by the framing; a second
    client's NOOP round trip completes meanwhile."""
    srv = make_server()
    n = 10_000
    c = Client(srv.port, timeout=30)
    greet(c)
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    batch = b"".join(b"RCPT TO:<bob+%05d@localhost>\r\n" % i for i in range(n))
    sender = threading.Thread(target=c.send, args=(batch,), daemon=True)
    sender.start()
    other = Client(srv.port, timeout=15)
    greet(other, "other.test")
    rtts = []
    buffered = []
    codes: list[int] = []
    deadline = time.monotonic() + 60
    while len(codes) < n and time.monotonic() < deadline:
        t0 = time.monotonic()
        assert other.cmd("NOOP")[0] == 250
        rtts.append(time.monotonic() - t0)
        buffered.append(on_reactor(
            lambda: max(len(s._buf) for s in srv.service.factories[0].sessions)))
        codes.extend(c.reply()[0] for _ in range(min(1000, n - len(codes))))
    sender.join(10)
    assert codes == [250] * 100 + [452] * (n - 100)
    assert max(rtts) < 5.0, rtts
    assert max(buffered) <= PAUSE_BUFFER + READ_SIZE, buffered
    assert c.cmd("RSET")[0] == 250
    no_tracebacks(failures)


# -- transaction order -------------------------------------------------------------------------


def test_nested_mail_and_rcpt_before_mail_are_503_and_the_session_goes_on(
        make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    code, lines = c.cmd("RCPT TO:<alice@localhost>")
    assert (code, lines[0][:5]) == (503, "5.5.1")
    assert c.cmd("DATA")[0] == 503
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    code, lines = c.cmd("MAIL FROM:<b@remote.test>")
    assert (code, lines[0][:5]) == (503, "5.5.1")
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250  # the first transaction stands
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: order\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    (msg,) = srv.wait_messages("alice", 1)
    assert msg.startswith(b"Return-Path: <a@remote.test>\r\n")  # the nested MAIL changed nothing


# -- error limit -------------------------------------------------------------------------------


def test_fifty_unknown_commands_get_the_error_limit_then_421_and_the_slot_is_freed(
        make_server: Any) -> None:
    """Like Postfix's smtpd_hard_error_limit: MAX_ERRORS 5xx replies, then 421 and close;
    the pipelined rest is never executed; the connection slot and counters are released."""
    srv = limited_server(make_server, per_ip=1)
    c = Client(srv.port)
    greet(c)
    c.send(b"XYZZY\r\n" * 50)
    codes = all_replies(c, 60)
    assert codes == [500] * MAX_ERRORS + [421]
    assert c.closed()
    c.close()
    wait_until(lambda: all_released(srv), timeout=10, message="counters released")
    assert greeted(srv)


def test_a_flood_of_junk_commands_is_cut_off(make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port, timeout=20)
    greet(c)
    c.send(b"NOOP\r\nRSET\r\n" * 500)  # 1000 junk commands, all 2xx
    codes = all_replies(c, 1000, stop=421)
    assert 421 in codes, f"{len(codes)} replies, none of them 421"
    # 100 junk commands are free, then each counts as an error; the 20th error ends it.
    assert len([x for x in codes if x != 421]) == 120 and codes[-1] == 421, codes[-5:]
    assert c.closed()


def test_junk_commands_between_messages_are_never_cut_off(make_server: Any) -> None:
    """The junk count starts again after each accepted message (as Postfix's does): a
    long-lived submission client sending RSET/NOOP around its messages keeps its session."""
    srv = make_server()
    c = Client(srv.port, timeout=20)
    greet(c)
    for n in range(3):
        for _ in range(90):
            assert c.cmd("NOOP")[0] == 250
        transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: between junk\r\n\r\nok\r\n.\r\n")
        assert c.reply()[0] == 250, n
        assert c.cmd("RSET")[0] == 250
    assert len(srv.wait_messages("alice", 3)) == 3


# -- connection limits -------------------------------------------------------------------------


def test_connection_limit_per_ip_is_421_4_7_0_and_a_closed_slot_is_reused(
        make_server: Any) -> None:
    srv = limited_server(make_server, per_ip=2)
    a, b = Client(srv.port), Client(srv.port)
    greet(a)
    greet(b)
    extra = Client(srv.port)
    code, lines = extra.reply()
    assert (code, lines[0][:5]) == (421, "4.7.0")
    assert extra.closed()
    extra.close()
    assert open_count(srv) == 2
    assert a.cmd("QUIT")[0] == 221
    a.close()
    wait_until(lambda: open_count(srv) == 1, timeout=10, message="one slot freed")
    third = Client(srv.port)
    greet(third)
    b.close()
    third.close()
    wait_until(lambda: all_released(srv), timeout=10, message="counters released")


def _abandon_after_greeting(srv: Server, certs: Any) -> None:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    assert s.recv(100).startswith(b"220")
    rst_close(s)


def _abandon_mid_data(srv: Server, certs: Any) -> None:
    c = Client(srv.port)
    greet(c)
    transaction(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: half\r\n\r\n" + (b"y" * 80 + b"\r\n") * 4000)  # 328 kB: spilled
    rst_close(c.sock)


def _abandon_mid_bdat(srv: Server, certs: Any) -> None:
    c = Client(srv.port)
    greet(c)
    transaction(c)
    c.send(b"BDAT 1000000 LAST\r\n" + (b"z" * 98 + b"\r\n") * 3000)
    rst_close(c.sock)


def _abandon_mid_starttls_handshake(srv: Server, certs: Any) -> None:
    c = Client(srv.port)
    greet(c)
    assert c.cmd("STARTTLS")[0] == 220
    c.send(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03")  # the start of a ClientHello
    rst_close(c.sock)


def _abandon_after_starttls(srv: Server, certs: Any) -> None:
    c = Client(srv.port)
    greet(c)
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    assert c.cmd("EHLO tls.test")[0] == 250
    rst_close(c.sock)


def _abandon_before_greeting(srv: Server, certs: Any) -> None:
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    rst_close(s)


@pytest.mark.parametrize("abandon", [
    _abandon_before_greeting, _abandon_after_greeting, _abandon_mid_data, _abandon_mid_bdat,
    _abandon_mid_starttls_handshake, _abandon_after_starttls,
], ids=["before-greeting", "after-greeting", "mid-data", "mid-bdat", "mid-tls-handshake",
        "inside-tls"])
def test_abrupt_disconnects_release_every_counter_and_temp_file(
        make_server: Any, certs: Any, failures: list[Any], abandon: Any) -> None:
    srv = limited_server(make_server, per_ip=1)
    for _ in range(3):  # a leak of one count would refuse the second round with 421
        wait_until(lambda: greeted(srv), timeout=10, message="a free connection slot")
        wait_until(lambda: all_released(srv), timeout=10, message="counters released")
        abandon(srv, certs)
        wait_until(lambda: all_released(srv), timeout=10, message="counters released")
        wait_until(lambda: temp_files(srv) == [], timeout=10, message="temp files removed")
    assert srv.spool_entries() == [] and srv.messages("alice") == []
    no_tracebacks(failures)


def test_pregreet_talker_refusal_releases_the_connection_slot(make_server: Any) -> None:
    srv = make_server({"smtp": {
        "rateLimit": {"maxConnectionsPerIp": 1, **NO_EXEMPT},
        "listeners": [{**LISTENER, "pregreetCheck": True, "pregreetDelayMs": 300}]}})
    for _ in range(3):
        early = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        early.sendall(b"EHLO spammer.test\r\n")
        data = b""
        while chunk := early.recv(4096):
            data += chunk
        early.close()
        assert data.startswith(b"554 5.5.1"), data
        wait_until(lambda: all_released(srv), timeout=10, message="counters released")
    patient = Client(srv.port)
    assert patient.reply()[0] == 220


def test_pregreet_flood_is_buffered_boundedly_then_refused(make_server: Any) -> None:
    """A client blasting data before the greeting: input is buffered only up to the pause
    threshold (the transport is paused), then 554 and close."""
    srv = make_server({"smtp": {"listeners": [
        {**LISTENER, "pregreetCheck": True, "pregreetDelayMs": 1500}]}})
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.setblocking(False)
    junk = b"EHLO x\r\n" * 8192
    sent = 0
    stalled_since: float | None = None
    deadline = time.monotonic() + 1.0
    while sent < 32 * 1024 * 1024 and time.monotonic() < deadline:
        try:
            sent += s.send(junk)
            stalled_since = None
        except BlockingIOError:
            stalled_since = stalled_since or time.monotonic()
            if time.monotonic() - stalled_since > 0.3:
                break
            time.sleep(0.01)  # (stimulus pacing, not synchronisation)
    held = on_reactor(lambda: max((len(x._buf) for x in srv.service.factories[0].sessions),
                                  default=0))
    assert held <= PAUSE_BUFFER + READ_SIZE, held
    s.setblocking(True)
    s.settimeout(10)
    data = b""
    with contextlib.suppress(ConnectionResetError):
        while chunk := s.recv(65536):
            data += chunk
    s.close()
    assert data.startswith(b"554 5.5.1"), data[:80]
    wait_until(lambda: session_count(srv) == 0, timeout=10, message="the session to end")


def test_tls_handshake_timeout_releases_the_connection_slot(make_server: Any) -> None:
    srv = limited_server(make_server, per_ip=1, ssl={"handshakeTimeoutMs": 300})
    c = Client(srv.port)
    greet(c)
    assert c.cmd("STARTTLS")[0] == 220
    assert c.closed(timeout=10)  # silent client: aborted by the handshake timer
    c.close()
    wait_until(lambda: all_released(srv), timeout=10, message="counters released")
    assert greeted(srv)


def test_implicit_tls_garbage_and_silence_release_the_connection_slot(
        make_server: Any, certs: Any, failures: list[Any]) -> None:
    srv = limited_server(make_server, per_ip=1, ssl={"handshakeTimeoutMs": 300},
                         listeners=[{**LISTENER, "implicitTls": True}])
    garbage = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    garbage.sendall(b"EHLO plaintext.test\r\n" * 10)
    with contextlib.suppress(OSError):
        while garbage.recv(4096):
            pass
    garbage.close()
    wait_until(lambda: all_released(srv), timeout=10, message="released after garbage")
    silent = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    with contextlib.suppress(OSError):
        while silent.recv(4096):
            pass
    silent.close()
    wait_until(lambda: all_released(srv), timeout=10, message="released after the timeout")
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.recv(100).startswith(b"220")
    no_tracebacks(failures)


def test_redis_connection_count_is_released_when_the_client_left_during_acquire(
        make_server: Any, redis_server: Any) -> None:
    import uuid

    prefix = f"t:{uuid.uuid4().hex}"
    srv = make_server({"smtp": {
        "redis": {"url": redis_server.url, "commandTimeoutMs": 5000, "connectTimeoutMs": 5000},
        "spool": {"type": "file"},
        "rateLimit": {"backend": "redis", "maxConnectionsPerIp": 1, **NO_EXEMPT,
                      "redis": {"keyPrefix": prefix}}}})
    assert greeted(srv)
    wait_until(lambda: session_count(srv) == 0, timeout=10, message="the probe to end")
    # Redis holds every command for a moment: the acquire of the next connection waits.
    assert redis_command(redis_server.port, "CLIENT", "PAUSE", "800", "ALL") == "OK"
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    wait_until(lambda: session_count(srv) == 1, timeout=5, message="the session to start")
    rst_close(s)
    wait_until(lambda: session_count(srv) == 0, timeout=5, message="the session to end")
    # After the pause the acquire completes for a session that no longer exists.
    assert redis_command(redis_server.port, "PING", timeout=10) == "PONG"
    wait_until(lambda: greeted(srv), timeout=5, message="the slot to be free again")


# -- messages per IP ---------------------------------------------------------------------------


def test_message_rate_limit_is_451_across_sessions_and_not_a_session_error(
        make_server: Any) -> None:
    srv = make_server({"smtp": {"rateLimit": {"maxMessagesPerIpPerHour": 2, **NO_EXEMPT}}})
    for i in range(2):
        c = Client(srv.port)
        greet(c)
        transaction(c)
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: %d\r\n\r\nx\r\n.\r\n" % i)
        assert c.reply()[0] == 250
        assert c.cmd("QUIT")[0] == 221
        c.close()
    c = Client(srv.port)
    greet(c)
    for _ in range(MAX_ERRORS + 5):  # 4xx: never counted as errors, never disconnected
        code, lines = c.cmd("MAIL FROM:<a@remote.test>")
        assert (code, lines[0][:5]) == (451, "4.7.0")
    assert c.cmd("NOOP")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 503  # no transaction was opened
    srv.wait_messages("alice", 2)


# -- size limits, DATA and BDAT ----------------------------------------------------------------


@pytest.mark.parametrize("rcpts", [("alice@localhost",), ("alice@localhost", "bob@localhost")],
                         ids=["maildir-spill", "spool-spill"])
def test_data_over_the_size_limit_is_552_after_the_dot_and_leaves_no_temp_file(
        make_server: Any, rcpts: tuple[str, ...], failures: list[Any]) -> None:
    srv = make_server({"smtp": {"limits": {"maxMessageSizeBytes": 1_000_000}}})
    c = Client(srv.port, timeout=30)
    greet(c)
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    for r in rcpts:
        assert c.cmd(f"RCPT TO:<{r}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    line = b"b" * 998 + b"\r\n"
    c.send(b"Subject: big\r\n\r\n")
    for _ in range(6):  # 6 MB, the limit is 1 MB
        c.send(line * 1000)
    c.send(b".\r\n")
    code, lines = c.reply()
    assert (code, lines[0][:5]) == (552, "5.3.4")
    wait_until(lambda: temp_files(srv) == [], timeout=10, message="temp files removed")
    transaction(c)  # the session is usable
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: small\r\n\r\nok\r\n.\r\n")
    assert c.reply()[0] == 250
    assert len(srv.wait_messages("alice", 1)) == 1
    no_tracebacks(failures)


def test_bdat_chunk_beyond_the_size_limit_is_552_and_the_session_stays_usable(
        make_server: Any, failures: list[Any]) -> None:
    srv = make_server({"smtp": {"limits": {"maxMessageSizeBytes": 100_000}}})
    c = Client(srv.port, timeout=30)
    greet(c)
    transaction(c)
    body = (b"q" * 98 + b"\r\n") * 3000  # 300 kB in one chunk
    c.send(b"BDAT %d\r\n" % len(body) + body)
    code, lines = c.reply()
    assert (code, lines[0][:5]) == (552, "5.3.4")
    c.send(b"BDAT 3 LAST\r\nx\r\n")
    assert c.reply()[0] == 552
    wait_until(lambda: temp_files(srv) == [], timeout=10, message="temp files removed")
    transaction(c)
    msg = b"Subject: after\r\n\r\nsmall\r\n"
    c.send(b"BDAT %d LAST\r\n" % len(msg) + msg)
    assert c.reply()[0] == 250
    assert srv.wait_messages("alice", 1)[0].endswith(b"small\r\n")
    assert c.cmd("NOOP")[0] == 250
    no_tracebacks(failures)


def test_a_hundred_thousand_one_byte_bdat_chunks_are_correct_and_bounded(
        make_server: Any, failures: list[Any]) -> None:
    srv = make_server()
    c = Client(srv.port, timeout=30)
    greet(c)
    transaction(c)
    head = b"Subject: crumbs\r\n\r\n"
    c.send(b"BDAT %d\r\n" % len(head) + head)
    assert c.reply()[0] == 250
    n = 100_000
    body = b"0123456789abcde\r\n" * (n // 17) + b"x" * (n % 17)
    assert len(body) == n
    start = time.monotonic()
    stream = b"".join(b"BDAT 1\r\n" + body[i:i + 1] for i in range(n))
    sender = threading.Thread(target=c.send, args=(stream,), daemon=True)
    sender.start()
    last = 0
    for i in range(n):
        code, lines = c.reply()
        assert code == 250, (i, code, lines)
        last = int(lines[0].split()[1])
    sender.join(10)
    assert last == len(head) + n
    c.send(b"BDAT 2 LAST\r\n\r\n")
    assert c.reply()[0] == 250
    elapsed = time.monotonic() - start
    (msg,) = srv.wait_messages("alice", 1)
    assert msg.endswith(head[-2:] + body + b"\r\n")
    assert elapsed < 15, elapsed
    no_tracebacks(failures)


def test_sessions_abandoned_in_data_leave_no_temp_files_or_counts(
        make_server: Any, failures: list[Any]) -> None:
    """Ten sessions stop in the middle of DATA with a spilled (on-disk) message each, half
    for one mailbox (spilled into its Maildir), half for two (spilled into the spool), and
    disconnect: every temp file is removed and every counter goes back to zero."""
    srv = limited_server(make_server, per_ip=20)
    clients = []
    for i in range(10):
        c = Client(srv.port, timeout=20)
        greet(c)
        transaction(c)
        if i % 2:
            assert c.cmd("RCPT TO:<bob@localhost>")[0] == 250
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: abandoned\r\n\r\n" + (b"w" * 510 + b"\r\n") * 700)  # 360 kB
        clients.append(c)
    factory = srv.service.factories[0]

    def spilled() -> list[int]:
        return [s._tx.writer.size for s in factory.sessions
                if s._tx is not None and s._tx.writer is not None]

    wait_until(lambda: (sizes := on_reactor(spilled)) and len(sizes) == 10
               and min(sizes) > 300_000, timeout=10, message="10 spilled messages")
    assert len(temp_files(srv)) >= 5  # at least the spool spills have names
    assert scrape(srv)["smtp_connections_active"] == 10.0
    assert open_count(srv) == 10
    for c in clients:
        c.close()
    wait_until(lambda: all_released(srv), timeout=10, message="counters released")
    wait_until(lambda: temp_files(srv) == [], timeout=10, message="temp files removed")
    assert srv.spool_entries() == [] and srv.messages("alice") == []
    no_tracebacks(failures)


def test_message_id_and_date_after_a_large_header_are_not_duplicated(make_server: Any) -> None:
    srv = make_server()
    c = Client(srv.port, timeout=30)
    greet(c)
    transaction(c)
    assert c.cmd("DATA")[0] == 354
    filler = b"".join(b"X-Filler-%05d: %s\r\n" % (i, b"f" * 80) for i in range(3000))  # 300 kB
    c.send(b"Subject: big header\r\n" + filler
           + b"Message-ID: <only-one@client.test>\r\nDate: Mon, 1 Jan 2024 00:00:00 +0000\r\n"
           + b"\r\nbody\r\n.\r\n")
    assert c.reply()[0] == 250
    (msg,) = srv.wait_messages("alice", 1)
    header = msg.split(b"\r\n\r\n", 1)[0].lower().split(b"\r\n")
    assert sum(1 for h in header if h.startswith(b"message-id:")) == 1
    assert sum(1 for h in header if h.startswith(b"date:")) == 1


# -- timeouts ----------------------------------------------------------------------------------


def _idle_before_ehlo(c: Client) -> None:
    assert c.reply()[0] == 220


def _idle_mid_command_line(c: Client) -> None:
    greet(c)
    c.send(b"MAIL FROM:<a@remo")


def _idle_mid_data_line(c: Client) -> None:
    greet(c)
    transaction(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: stuck\r\n\r\n" + (b"d" * 200 + b"\r\n") * 1500 + b"half a li")


def _idle_mid_bdat_chunk(c: Client) -> None:
    greet(c)
    transaction(c)
    c.send(b"BDAT 900000 LAST\r\n" + (b"e" * 200 + b"\r\n") * 1500)


def _idle_in_auth_exchange(c: Client) -> None:
    greet(c)
    assert c.cmd("AUTH LOGIN")[0] == 334


@pytest.mark.parametrize("state", [
    _idle_before_ehlo, _idle_mid_command_line, _idle_mid_data_line, _idle_mid_bdat_chunk,
    _idle_in_auth_exchange,
], ids=["before-ehlo", "mid-command-line", "mid-data-line", "mid-bdat-chunk", "auth-exchange"])
def test_idle_timeout_in_every_state_is_421_and_cleans_up(
        make_server: Any, failures: list[Any], state: Any) -> None:
    srv = make_server({"smtp": {
        "auth": {"users": {"carol": "pw"}, "failureDelayMs": 0},
        "rateLimit": {"maxConnectionsPerIp": 5, **NO_EXEMPT},
        "listeners": [{**LISTENER, "idleTimeoutSeconds": 1, "allowPlaintextAuth": True}]}})
    c = Client(srv.port, timeout=15)
    state(c)
    t0 = time.monotonic()
    code, lines = c.reply()
    assert (code, lines[0][:5]) == (421, "4.4.2")
    assert time.monotonic() - t0 < 10
    assert c.closed()
    c.close()
    wait_until(lambda: all_released(srv), timeout=10, message="counters released")
    wait_until(lambda: temp_files(srv) == [], timeout=10, message="temp files removed")
    assert srv.spool_entries() == [] and srv.messages("alice") == []
    no_tracebacks(failures)


class _SlowCommitSpool:
    """The real spool, but every commit waits ``delay`` seconds first (a slow disk/Redis)."""

    def __init__(self, inner: Any, delay: float) -> None:
        self._inner = inner
        self._delay = delay

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def open_writer(self) -> Any:
        from twisted.internet import reactor, task

        writer = self._inner.open_writer()
        commit = writer.commit
        writer.commit = lambda envelope: task.deferLater(
            reactor, self._delay, lambda: None).addCallback(lambda _: commit(envelope))
        return writer


def test_the_idle_timer_does_not_fire_while_the_server_commits(make_server: Any) -> None:
    srv = make_server({"smtp": {"listeners": [{**LISTENER, "idleTimeoutSeconds": 1}]}})
    factory = srv.service.factories[0]

    def slow() -> None:
        factory.spool = _SlowCommitSpool(factory.spool, 2.5)

    on_reactor(slow)
    c = Client(srv.port, timeout=15)
    greet(c)
    transaction(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: slow disk\r\n\r\nonce\r\n.\r\n")
    code, lines = c.reply()
    srv.wait_messages("alice", 1)  # stored either way
    assert code == 250, f"{code} {lines}: the message was stored, a retry would duplicate it"


def test_a_client_dribbling_one_byte_at_a_time_is_cut_off(make_server: Any) -> None:
    srv = make_server({"smtp": {"listeners": [{**LISTENER, "idleTimeoutSeconds": 1}]}})
    c = Client(srv.port, timeout=15)
    greet(c)
    c.sock.settimeout(0.5)
    cut_off = False
    for byte in b"MAIL FROM:<slow@remote.test>"[:8]:  # bounded: 8 bytes, ~4 s
        try:
            c.sock.sendall(bytes([byte]))
            if c.sock.recv(4096).startswith(b"421"):  # also paces the stimulus (0.5 s)
                cut_off = True
                break
        except TimeoutError:
            continue
        except OSError:
            cut_off = True
            break
    assert cut_off, "still open after 4 s of one byte per 0.5 s with a 1 s idle timeout"


# -- output back-pressure ----------------------------------------------------------------------


def _server_rx_queue(port: int, peer_port: int) -> int | None:
    """Bytes received by the server side of a loopback connection that it has not read yet
    (None when the socket is gone)."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                f = line.split()
                if int(f[1].rsplit(":", 1)[1], 16) == port and \
                        int(f[2].rsplit(":", 1)[1], 16) == peer_port:
                    return int(f[4].split(":")[1], 16)
    return None


def test_a_client_that_never_reads_cannot_make_the_server_buffer_unboundedly(
        make_server: Any) -> None:
    limit = 8 * 1024 * 1024
    srv = make_server()
    factory = srv.service.factories[0]
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", srv.port))
    peer_port = s.getsockname()[1]
    s.setblocking(False)
    burst = b"EHLO amplifier.test\r\n" * 4096  # 86 kB in, ~1 MB of replies out
    sent = 0
    stalled_since: float | None = None
    deadline = time.monotonic() + 8
    try:
        while sent < 2_000_000 and time.monotonic() < deadline:  # bounded: 2 MB of input
            try:
                sent += s.send(burst)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break  # the server stopped reading: back-pressure works
                time.sleep(0.01)  # (stimulus pacing, not synchronisation)

        def state() -> tuple[int, bool]:
            """(replies queued in user space, whether the session still reads its socket)."""
            from twisted.internet import reactor

            queued, reading = 0, False
            for sess in factory.sessions:
                t = sess.transport
                queued += len(t.dataBuffer) - t.offset + t._tempDataLen
                reading = reading or t in reactor.getReaders()
            return queued, reading

        def settled() -> tuple[int, bool] | None:
            queued, reading = on_reactor(state)
            if queued > limit or not reading or _server_rx_queue(srv.port, peer_port) == 0:
                return queued, reading  # over the bound, paused, or all input consumed
            return None

        queued, reading = wait_until(settled, timeout=30, message="the server to settle")
        assert queued <= limit, f"{queued} bytes of replies queued for {sent} bytes sent"
    finally:
        rst_close(s)
    wait_until(lambda: session_count(srv) == 0, timeout=15, message="the session to end")
