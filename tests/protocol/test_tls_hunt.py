"""Bug hunt on inbound TLS: STARTTLS (RFC 3207) injection and state reset, implicit TLS
(RFC 8314) listeners fed garbage or nothing, handshake failures and limits, protocol version and
cipher settings, certificate reload (SIGHUP), TLS in the Received: header.

Real server on loopback (``make_server``), certificates made at test time (``certs``), Python
``ssl`` / raw sockets as clients. Five tests found bugs (now fixed): the implicit-TLS shutdown
421, cipherSuites validation, handshake failure logging, reload of keys it cannot apply.
"""

from __future__ import annotations

import base64
import os
import shutil
import socket
import ssl
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml
from helpers import CertSet, deep_merge, make_certs, on_reactor, wait_until
from protocol_support import Client, Server
from twisted.logger import ILogObserver, formatEvent, globalLogPublisher

from kotlin_smtp_py import config as cfg
from kotlin_smtp_py.inbound.auth import hash_password

IMPLICIT = {"port": 0, "bindAddress": "127.0.0.1", "implicitTls": True}
PLAIN = {"port": 0, "bindAddress": "127.0.0.1"}
USERS = {"carol": hash_password("s3cret", rounds=4)}


# == helpers =======================================================================================


@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every log event of this process (the server runs in-process) during the test."""
    got: list[dict[str, Any]] = []
    observer = cast(ILogObserver, got.append)
    globalLogPublisher.addObserver(observer)
    yield got
    globalLogPublisher.removeObserver(observer)


def failures(events: list[dict[str, Any]]) -> list[str]:
    return [str(e.get("log_failure") or formatEvent(e))[:300] for e in events
            if "log_failure" in e or e.get("isError")]


def client_ctx(certs: CertSet, **versions: Any) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    if "maximum" in versions:
        ctx.maximum_version = versions["maximum"]
    if "minimum" in versions:
        ctx.minimum_version = versions["minimum"]
    return ctx


def greet(c: Client, name: str = "client.test") -> list[str]:
    assert c.reply()[0] == 220
    code, lines = c.cmd(f"EHLO {name}")
    assert code == 250, lines
    return lines


def keywords(lines: list[str]) -> set[str]:
    return {ln.split(" ")[0].upper() for ln in lines[1:]}


def tls_client(port: int, certs: CertSet, ctx: ssl.SSLContext | None = None,
               server_hostname: str = "localhost") -> Client:
    """An implicit-TLS client: handshake first, then the greeting."""
    c = Client(port)
    c.sock = (ctx or client_ctx(certs)).wrap_socket(c.sock, server_hostname=server_hostname)
    return c


def starttls_client(srv: Server, certs: CertSet, port: int | None = None) -> Client:
    c = Client(srv.port if port is None else port)
    greet(c)
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    return c


def plain_auth(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\x00{user}\x00{password}".encode()).decode()


def sessions(srv: Server) -> int:
    return int(on_reactor(lambda: sum(len(f.sessions) for f in srv.service.factories)))


def no_sessions_left(srv: Server) -> None:
    wait_until(lambda: sessions(srv) == 0, timeout=15, message="all sessions to end")


def read_until_closed(sock: socket.socket, timeout: float = 10, limit: int = 1 << 20) -> bytes:
    """Everything the server sends until it closes (bounded by ``limit`` and ``timeout``)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while len(data) < limit:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    except (ConnectionResetError, TimeoutError, ssl.SSLError):
        pass
    return data


def tls10_client_hello() -> bytes:
    """A minimal TLS 1.0 ClientHello (no extensions; ECDHE-ECDSA-AES256-SHA, AES128-SHA)."""
    body = (b"\x03\x01" + os.urandom(32) + b"\x00" + b"\x00\x04\xc0\x0a\x00\x2f" + b"\x01\x00")
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


def assert_protocol_version_alert(data: bytes) -> None:
    """A TLS alert record: fatal (2), protocol_version (70); not a ServerHello (0x16)."""
    assert data[:1] == b"\x15", data[:16]
    assert data[5:7] == b"\x02\x46", data[:16]


def leaf_der(chain: Path) -> bytes:
    pem = chain.read_text()
    first = pem[:pem.index("-----END CERTIFICATE-----") + len("-----END CERTIFICATE-----")]
    return ssl.PEM_cert_to_DER_cert(first)


def presented_cert(port: int, implicit: bool = True) -> bytes:
    """The DER certificate the server presents now (no verification: we compare bytes)."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = Client(port)
    if not implicit:
        greet(c)
        assert c.cmd("STARTTLS")[0] == 220
    c.sock = ctx.wrap_socket(c.sock, server_hostname="localhost")
    der = c.sock.getpeercert(binary_form=True)
    c.close()
    assert der is not None
    return bytes(der)


def full_message(c: Client, rcpt: str = "alice@localhost", subject: str = "tls") -> int:
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(f"Subject: {subject}\r\n\r\nhello\r\n.\r\n".encode())
    return c.reply()[0]


# == STARTTLS: injection (RFC 3207 §4.2, CVE-2011-0411) ============================================


INJECTIONS = [
    b"EHLO injected.test\r\nMAIL FROM:<evil@remote.test>\r\n",
    b"RSET\r\nQUIT\r\n",
    b"NOOP\r\nNOOP\r\nNOOP\r\n",
    b"HELO injected.test\r\nMAIL FROM:<evil@remote.test>\r\nRCPT TO:<alice@localhost>\r\n"
    b"DATA\r\nSubject: injected\r\n\r\nx\r\n.\r\n",
    b"NOOP",  # a partial line: must not be completed by the first line inside TLS
    b"\x16\x03\x01\x00\x05",  # the start of a (pipelined) TLS record, then the real handshake
]


@pytest.mark.parametrize("injected", INJECTIONS, ids=[
    "ehlo-mail", "rset-quit", "noops", "helo-transaction", "partial-line", "tls-record-prefix"])
def test_plaintext_pipelined_after_starttls_is_never_executed(
        make_server: Any, certs: CertSet, injected: bytes) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    c.send(b"NOOP\r\nSTARTTLS\r\n" + injected)
    assert c.reply()[0] == 250
    assert c.reply()[0] == 220
    assert c.buf == b"", "nothing may follow the 220 in plaintext"
    # (tls-record-prefix: a handshake that succeeds proves those bytes were not kept as the
    # start of the TLS stream either.)
    c.starttls(certs.ca_cert)
    # The first reply inside TLS answers our first command: no queued reply to injected input.
    code, lines = c.cmd("NOOP X-FIRST")
    assert code == 250, lines
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 503  # EHLO/HELO forgotten, nothing injected
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 503  # no injected transaction survives
    assert full_message(c, subject="real") == 250
    (msg,) = srv.wait_messages("alice", 1)
    assert b"Subject: real" in msg and b"injected" not in msg
    assert c.cmd("QUIT")[0] == 221


def test_starttls_behind_an_asynchronous_rcpt_check_discards_what_follows(
        make_server: Any, certs: CertSet) -> None:
    """STARTTLS queued behind a RCPT whose policy check is asynchronous: it runs after the RCPT
    reply, and the commands pipelined behind it are still dropped (not run once the check
    completes)."""
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    c.send(b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>\r\nSTARTTLS\r\n"
           b"DATA\r\nSubject: injected\r\n\r\nx\r\n.\r\n")
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 220]
    assert c.buf == b""
    c.starttls(certs.ca_cert)
    assert c.cmd("DATA")[0] == 503  # the transaction was reset by STARTTLS
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("DATA")[0] == 503
    assert srv.messages("alice") == [] and srv.spool_entries() == []


def test_starttls_after_mail_and_rcpt_forgets_the_transaction(make_server: Any,
                                                              certs: CertSet) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("RCPT TO:<bob@localhost>")[0] == 503
    assert c.cmd("DATA")[0] == 503
    c.send(b"BDAT 3 LAST\r\nabc")  # the chunk is read even when BDAT is refused (RFC 3030)
    assert c.reply()[0] == 503
    assert c.cmd("NOOP")[0] == 250
    assert full_message(c) == 250
    assert len(srv.wait_messages("alice", 1)) == 1
    assert srv.messages("bob") == []


# == STARTTLS: refusals and what EHLO offers =======================================================


def test_starttls_twice_and_with_argument(make_server: Any, certs: CertSet) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    code, lines = c.cmd("STARTTLS now")
    assert (code, lines[0][:5]) == (501, "5.5.4")  # RFC 3207 §4: no parameters
    assert c.cmd("NOOP")[0] == 250  # still plaintext, still usable
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    lines = c.cmd("EHLO client.test")[1]
    assert "STARTTLS" not in keywords(lines)  # RFC 3207 §4.2
    code, lines = c.cmd("STARTTLS")
    assert (code, lines[0][:5]) == (503, "5.5.1")
    assert c.cmd("NOOP")[0] == 250  # the refusal did not break the TLS session


def test_starttls_not_available_without_ssl(make_server: Any) -> None:
    srv = make_server(tls=False)
    c = Client(srv.port)
    lines = greet(c)
    assert "STARTTLS" not in keywords(lines)
    code, lines = c.cmd("STARTTLS")
    assert code == 502, lines
    assert c.cmd("NOOP")[0] == 250
    assert full_message(c) == 250


def test_starttls_switched_off_per_listener(make_server: Any, certs: CertSet) -> None:
    srv = make_server({"smtp": {"listeners": [
        {**PLAIN, "enableStartTls": False}, PLAIN]}})
    off = Client(srv.port_of(0))
    assert "STARTTLS" not in keywords(greet(off))
    assert off.cmd("STARTTLS")[0] == 502
    assert off.cmd("NOOP")[0] == 250
    on = Client(srv.port_of(1))
    assert "STARTTLS" in keywords(greet(on))
    assert on.cmd("STARTTLS")[0] == 220
    on.starttls(certs.ca_cert)
    assert on.cmd("EHLO client.test")[0] == 250


def test_starttls_on_implicit_tls_is_refused(make_server: Any, certs: CertSet) -> None:
    srv = make_server({"smtp": {"listeners": [IMPLICIT]}})
    c = tls_client(srv.port, certs)
    assert "STARTTLS" not in keywords(greet(c))
    code, lines = c.cmd("STARTTLS")
    assert code == 503, lines
    assert full_message(c) == 250


def test_submission_before_tls_refuses_mail_and_auth_then_works_after(
        make_server: Any, certs: CertSet) -> None:
    """requireAuthForMail without plaintext AUTH: before TLS, MAIL gets 530 5.7.0 and AUTH 538
    (RFC 4954 §4: encryption required); AUTH is offered only after STARTTLS."""
    srv = make_server({"smtp": {"auth": {"users": USERS, "failureDelayMs": 0}, "listeners": [
        {**PLAIN, "requireAuthForMail": True}]}})
    c = Client(srv.port)
    lines = greet(c)
    assert "AUTH" not in keywords(lines) and "STARTTLS" in keywords(lines)
    code, lines = c.cmd("MAIL FROM:<carol@localhost>")
    assert (code, lines[0][:5]) == (530, "5.7.0")
    code, lines = c.cmd(plain_auth("carol", "s3cret"))
    assert (code, lines[0][:6]) == (538, "5.7.11")
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    lines = c.cmd("EHLO client.test")[1]
    assert "AUTH" in keywords(lines)
    assert c.cmd("MAIL FROM:<carol@localhost>")[0] == 530
    assert c.cmd(plain_auth("carol", "s3cret"))[0] == 235
    assert full_message(c) == 250


# == handshake timing and stalled clients ==========================================================


def test_starttls_client_that_never_sends_a_client_hello_is_cut_off(
        make_server: Any, certs: CertSet, events: list[dict[str, Any]]) -> None:
    srv = make_server({"smtp": {"ssl": {"handshakeTimeoutMs": 300}}})
    stalled = Client(srv.port)
    greet(stalled)
    assert stalled.cmd("STARTTLS")[0] == 220
    other = starttls_client(srv, certs)  # served meanwhile, and not cut off by the timer
    assert other.cmd("EHLO client.test")[0] == 250
    assert stalled.closed(timeout=10)
    assert stalled.buf == b""
    assert full_message(other) == 250
    stalled.close()
    assert not failures(events)


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "starttls"])
def test_handshake_timer_is_cancelled_by_the_handshake(make_server: Any, certs: CertSet,
                                                       implicit: bool) -> None:
    srv = make_server({"smtp": {"ssl": {"handshakeTimeoutMs": 400},
                                "listeners": [IMPLICIT if implicit else PLAIN]}})
    if implicit:
        c = tls_client(srv.port, certs)
        greet(c)
    else:
        c = starttls_client(srv, certs)
        assert c.cmd("EHLO client.test")[0] == 250

    def timer_active() -> list[bool]:
        return [s._handshake_call is not None and s._handshake_call.active()
                for f in srv.service.factories for s in f.sessions]

    assert on_reactor(timer_active) == [False]
    assert c.cmd("NOOP")[0] == 250


def test_implicit_tls_silent_clients_do_not_block_others(make_server: Any,
                                                         certs: CertSet) -> None:
    srv = make_server({"smtp": {"ssl": {"handshakeTimeoutMs": 500}, "listeners": [IMPLICIT]}})
    silent = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(5)]
    partial = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    partial.sendall(tls10_client_hello()[:20])  # half a ClientHello, then nothing
    c = tls_client(srv.port, certs)
    greet(c)
    assert full_message(c) == 250
    for s in [*silent, partial]:
        assert read_until_closed(s) == b"", "no plaintext greeting to a TLS listener"
        s.close()
    assert c.cmd("NOOP")[0] == 250  # the handshake timer of others never hits this session


@pytest.mark.parametrize("payload", [
    b"EHLO client.test\r\n",
    b"\x00" * 64,
    b"\xff" * 4096,
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    b"\x80\x2e\x01\x00\x02\x00\x15\x00\x00\x00\x10" + b"\x00" * 37,  # SSLv2-style hello
], ids=["plain-smtp", "nul", "ff", "http", "sslv2-hello"])
def test_implicit_tls_listener_survives_garbage(make_server: Any, certs: CertSet,
                                                events: list[dict[str, Any]],
                                                payload: bytes) -> None:
    srv = make_server({"smtp": {"listeners": [IMPLICIT]}})
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(payload)
    data = read_until_closed(s)
    s.close()
    assert b"220" not in data and b"250" not in data, data[:100]
    c = tls_client(srv.port, certs)
    greet(c)
    assert full_message(c) == 250
    c.close()
    no_sessions_left(srv)
    assert not failures(events)


def test_stalled_handshakes_give_their_connection_slots_back(make_server: Any,
                                                            certs: CertSet) -> None:
    """Clients stuck before the handshake count against maxConnectionsPerIp only until the
    handshake timeout aborts them."""
    srv = make_server({"smtp": {"ssl": {"handshakeTimeoutMs": 300},
                                "rateLimit": {"maxConnectionsPerIp": 2, "exemptCidrs": []},
                                "listeners": [IMPLICIT]}})
    stalled = [socket.create_connection(("127.0.0.1", srv.port), timeout=10) for _ in range(2)]
    for s in stalled:
        assert read_until_closed(s) == b""
        s.close()
    no_sessions_left(srv)
    clients = [tls_client(srv.port, certs) for _ in range(2)]
    for c in clients:
        greet(c)
    assert full_message(clients[1]) == 250


def test_clients_closing_mid_handshake_leave_no_session_behind(
        make_server: Any, certs: CertSet, events: list[dict[str, Any]]) -> None:
    srv = make_server({"smtp": {"listeners": [IMPLICIT, PLAIN]}})
    for _ in range(5):
        s = socket.create_connection(("127.0.0.1", srv.port_of(0)), timeout=10)
        s.sendall(tls10_client_hello()[:30])
        s.close()
        r = socket.create_connection(("127.0.0.1", srv.port_of(0)), timeout=10)
        r.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        r.close()  # RST
        p = Client(srv.port_of(1))
        greet(p)
        assert p.cmd("STARTTLS")[0] == 220
        p.send(tls10_client_hello()[:40])
        p.close()
    no_sessions_left(srv)
    c = tls_client(srv.port_of(0), certs)
    greet(c)
    assert full_message(c) == 250
    assert not failures(events)


# == protocol versions, ciphers, SNI ===============================================================


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "starttls"])
def test_tls10_client_hello_gets_a_protocol_version_alert(make_server: Any, certs: CertSet,
                                                          implicit: bool) -> None:
    srv = make_server({"smtp": {"listeners": [IMPLICIT if implicit else PLAIN]}})
    c = Client(srv.port)
    if not implicit:
        greet(c)
        assert c.cmd("STARTTLS")[0] == 220
    c.send(tls10_client_hello())
    assert_protocol_version_alert(read_until_closed(c.sock))
    c.close()
    ok = tls_client(srv.port, certs) if implicit else starttls_client(srv, certs)
    if implicit:
        greet(ok)
    else:
        assert ok.cmd("EHLO client.test")[0] == 250
    assert full_message(ok) == 250


def test_min_tls_version_13_refuses_tls12_clients(make_server: Any, certs: CertSet) -> None:
    srv = make_server({"smtp": {"ssl": {"minTlsVersion": "TLSv1.3"},
                                "listeners": [IMPLICIT]}})
    with pytest.raises(ssl.SSLError) as err:
        tls_client(srv.port, certs, client_ctx(certs, maximum=ssl.TLSVersion.TLSv1_2))
    assert "PROTOCOL_VERSION" in str(err.value).upper().replace(" ", "_"), err.value
    c = tls_client(srv.port, certs, client_ctx(certs, minimum=ssl.TLSVersion.TLSv1_3))
    assert c.sock.version() == "TLSv1.3"
    greet(c)
    assert full_message(c) == 250


def test_default_min_version_accepts_tls12(make_server: Any, certs: CertSet) -> None:
    srv = make_server({"smtp": {"listeners": [IMPLICIT]}})
    c = tls_client(srv.port, certs, client_ctx(certs, maximum=ssl.TLSVersion.TLSv1_2))
    assert c.sock.version() == "TLSv1.2"
    greet(c)
    assert full_message(c) == 250


def test_cipher_suites_are_honoured_for_tls12(make_server: Any, certs: CertSet) -> None:
    srv = make_server({"smtp": {"ssl": {"cipherSuites": ["ECDHE-ECDSA-AES256-GCM-SHA384"]},
                                "listeners": [IMPLICIT]}})
    other = client_ctx(certs, maximum=ssl.TLSVersion.TLSv1_2)
    other.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256")
    with pytest.raises(ssl.SSLError):
        tls_client(srv.port, certs, other)
    listed = client_ctx(certs, maximum=ssl.TLSVersion.TLSv1_2)
    listed.set_ciphers("ECDHE-ECDSA-AES128-GCM-SHA256:ECDHE-ECDSA-AES256-GCM-SHA384")
    c = tls_client(srv.port, certs, listed)
    cipher = c.sock.cipher()
    assert cipher is not None and cipher[0] == "ECDHE-ECDSA-AES256-GCM-SHA384"
    greet(c)
    assert full_message(c) == 250


def _cipher_config(certs: CertSet, tmp_path: Path, suites: list[str]) -> str:
    return yaml.safe_dump({"smtp": {
        "storage": {"mailboxDir": str(tmp_path / "m"), "tempDir": str(tmp_path / "t"),
                    "listsDir": str(tmp_path / "l")},
        "spool": {"type": "file", "dir": str(tmp_path / "s")},
        "ssl": {"enabled": True, "certChainFile": str(certs.cert),
                "privateKeyFile": str(certs.key), "cipherSuites": suites}},
        "management": {"server": {"port": 0}}})


def test_cipher_suites_control_the_context_the_service_builds(certs: CertSet,
                                                              tmp_path: Path) -> None:
    """Control for the test below: a usable list loads and builds a service."""
    from kotlin_smtp_py.service import build_tls_context

    config = cfg.load_text(_cipher_config(certs, tmp_path, ["ECDHE-ECDSA-AES256-GCM-SHA384"]))
    assert build_tls_context(config).getContext() is not None


@pytest.mark.parametrize("suites", [["NO-SUCH-CIPHER"], ["TLS_AES_256_GCM_SHA384"]],
                         ids=["typo", "tls13-names"])
def test_unusable_cipher_suites_are_a_config_error(certs: CertSet, tmp_path: Path,
                                                   suites: list[str]) -> None:
    """SPEC §2: validation runs at start-up and says exactly what is wrong."""
    with pytest.raises(cfg.ConfigError) as err:
        cfg.load_text(_cipher_config(certs, tmp_path, suites))
    assert "cipherSuites" in str(err.value)


@pytest.mark.parametrize("sni", ["mx.test", "unknown.example", "X" * 63 + ".test",
                                 "xn--bcher-kva.test", "localhost."])
def test_any_sni_name_gets_the_configured_certificate(make_server: Any, certs: CertSet,
                                                      sni: str) -> None:
    srv = make_server({"smtp": {"listeners": [IMPLICIT]}})
    ctx = client_ctx(certs)
    ctx.check_hostname = False  # the name is odd on purpose; the chain is still verified
    c = tls_client(srv.port, certs, ctx, server_hostname=sni)
    assert c.sock.getpeercert(binary_form=True) == leaf_der(certs.cert)
    greet(c)
    assert c.cmd("QUIT")[0] == 221


def client_hello_12(sni: bytes | None) -> bytes:
    """A TLS 1.2 ClientHello (ECDHE-ECDSA-AES128-GCM-SHA256, P-256) with a raw SNI value."""
    def ext(kind: int, data: bytes) -> bytes:
        return kind.to_bytes(2, "big") + len(data).to_bytes(2, "big") + data

    exts = ext(0x000a, b"\x00\x02\x00\x17") + ext(0x000b, b"\x01\x00") \
        + ext(0x000d, b"\x00\x02\x04\x03")
    if sni is not None:
        entry = b"\x00" + len(sni).to_bytes(2, "big") + sni
        exts = ext(0x0000, len(entry).to_bytes(2, "big") + entry) + exts
    body = (b"\x03\x03" + os.urandom(32) + b"\x00" + b"\x00\x02\xc0\x2b" + b"\x01\x00"
            + len(exts).to_bytes(2, "big") + exts)
    hs = b"\x01" + len(body).to_bytes(3, "big") + body
    return b"\x16\x03\x01" + len(hs).to_bytes(2, "big") + hs


@pytest.mark.parametrize("sni", [b"\x00evil", b"a" * 300, b"\xff\xfe.test", b"",
                                 b"mx.test\r\nRCPT TO:<bob@localhost>", b"."],
                         ids=["nul", "long", "non-ascii", "empty", "crlf", "dot"])
def test_malformed_sni_in_a_raw_client_hello(make_server: Any, certs: CertSet,
                                             events: list[dict[str, Any]], sni: bytes) -> None:
    srv = make_server({"smtp": {"listeners": [IMPLICIT]}})
    control = Client(srv.port)
    control.send(client_hello_12(b"mx.test"))
    control.sock.settimeout(10)
    assert control.sock.recv(5)[:1] == b"\x16"  # a ServerHello: the raw hello is sound
    control.close()
    odd = Client(srv.port)
    odd.send(client_hello_12(sni))
    first = odd.sock.recv(5)
    assert first[:1] in (b"\x15", b"\x16", b""), first  # an alert, a ServerHello or EOF
    odd.close()
    no_sessions_left(srv)
    c = tls_client(srv.port, certs)
    greet(c)
    assert full_message(c) == 250
    assert not failures(events)


# == huge input right after the handshake ==========================================================


@pytest.mark.parametrize("implicit", [True, False], ids=["implicit", "starttls"])
def test_large_pipelined_transactions_right_after_the_handshake(
        make_server: Any, certs: CertSet, implicit: bool) -> None:
    srv = make_server({"smtp": {"limits": {"maxMessageSizeBytes": 8_000_000},
                                "listeners": [IMPLICIT if implicit else PLAIN]}})
    if implicit:
        c = tls_client(srv.port, certs)  # talks at once: the greeting is read afterwards
    else:
        c = Client(srv.port)
        greet(c)
        assert c.cmd("STARTTLS")[0] == 220
        c.starttls(certs.ca_cert)
    body = b"Subject: big\r\n\r\n" + (b"x" * 998 + b"\r\n") * 3000
    one = (b"MAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\n"
           + body + b".\r\n")
    # 90 NOOPs: past 100 junk commands each one counts as an error.
    payload = b"EHLO client.test\r\n" + one * 3 + b"NOOP\r\n" * 90 + b"QUIT\r\n"
    # One thread only (an SSL object must not be read and written concurrently). The replies
    # (~50 KB) fit the socket buffers, and the server never stops reading because of them.
    c.send(payload)
    codes = [c.reply()[0] for _ in range((1 if implicit else 0) + 1 + 4 * 3 + 90 + 1)]
    assert codes == ([220] if implicit else []) + [250] + [250, 250, 354, 250] * 3 \
        + [250] * 90 + [221]
    msgs = srv.wait_messages("alice", 3)
    assert all(len(m) > len(body) for m in msgs)


# == Received: header (RFC 3848 / RFC 8314 §4.3) ===================================================


def test_received_header_records_starttls_and_auth(make_server: Any, certs: CertSet) -> None:
    srv = make_server({"smtp": {"auth": {"users": USERS, "failureDelayMs": 0}}})
    plain = Client(srv.port)
    greet(plain)
    assert full_message(plain, subject="plain") == 250
    c = starttls_client(srv, certs)
    assert c.cmd("EHLO client.test")[0] == 250
    assert full_message(c, subject="starttls") == 250
    assert c.cmd(plain_auth("carol", "s3cret"))[0] == 235
    assert full_message(c, subject="authed") == 250
    msgs = {m.split(b"Subject: ")[1].split(b"\r\n")[0]: m
            for m in srv.wait_messages("alice", 3)}
    head = {k: v.split(b"\r\n\r\n")[0] for k, v in msgs.items()}
    assert b" with ESMTP id " in head[b"plain"] and b"using TLS" not in head[b"plain"]
    assert b" with ESMTPS id " in head[b"starttls"]
    assert b"(using TLSv1.3 with cipher " in head[b"starttls"]
    assert b" with ESMTPSA id " in head[b"authed"]


# == limits and closing over TLS ===================================================================


def test_connection_limit_refusal_reaches_an_implicit_tls_client(make_server: Any,
                                                                  certs: CertSet) -> None:
    srv = make_server({"smtp": {"rateLimit": {"maxConnectionsPerIp": 1, "exemptCidrs": []},
                                "listeners": [IMPLICIT]}})
    first = tls_client(srv.port, certs)
    greet(first)
    second = tls_client(srv.port, certs)
    code, lines = second.reply()
    assert (code, lines[0][:5]) == (421, "4.7.0")
    assert second.closed()
    assert first.cmd("NOOP")[0] == 250
    first.cmd("QUIT")
    first.close()
    no_sessions_left(srv)
    third = tls_client(srv.port, certs)  # the slot was released
    greet(third)


def test_idle_timeout_421_is_sent_inside_tls(make_server: Any, certs: CertSet) -> None:
    srv = make_server({"smtp": {"listeners": [{**PLAIN, "idleTimeoutSeconds": 1}]}})
    c = starttls_client(srv, certs)
    assert c.cmd("EHLO client.test")[0] == 250
    code, lines = c.reply()  # nothing sent: the idle timer fires
    assert (code, lines[0][:5]) == (421, "4.4.2")
    assert c.closed()


def _shutdown_421(srv: Server, c: Client) -> tuple[int, list[str]]:
    """Stop the service while ``c`` sits in an open transaction; its reply after the grace."""
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: unfinished\r\n\r\nhalf")
    on_reactor(lambda: srv.service.stopService() and None)
    try:
        return c.reply()
    except (ConnectionError, ssl.SSLError) as exc:
        return 0, [repr(exc)]


def test_graceful_shutdown_421_reaches_a_starttls_client(make_server: Any,
                                                         certs: CertSet) -> None:
    srv = make_server({"smtp": {"lifecycle": {"gracefulShutdownTimeoutMs": 300}}})
    c = starttls_client(srv, certs)
    assert c.cmd("EHLO client.test")[0] == 250
    code, lines = _shutdown_421(srv, c)
    assert (code, lines[0][:5]) == (421, "4.3.2"), lines


def test_graceful_shutdown_421_reaches_an_implicit_tls_client(make_server: Any,
                                                              certs: CertSet) -> None:
    """SPEC §6: after gracefulShutdownTimeoutMs the remaining sessions get 421 and are closed."""
    srv = make_server({"smtp": {"lifecycle": {"gracefulShutdownTimeoutMs": 300},
                                "listeners": [IMPLICIT]}})
    c = tls_client(srv.port, certs)
    greet(c)
    code, lines = _shutdown_421(srv, c)
    assert (code, lines[0][:5]) == (421, "4.3.2"), lines


# == certificate reload (SIGHUP) ===================================================================


def _reload_setup(make_server: Any, certs: CertSet, tmp_path: Path,
                  implicit: bool = True) -> tuple[Server, Path, Path, dict[str, Any]]:
    live = tmp_path / "live"
    live.mkdir()
    cert, key = live / "fullchain.pem", live / "privkey.pem"
    shutil.copy(certs.cert, cert)
    shutil.copy(certs.key, key)
    overrides: dict[str, Any] = {"smtp": {
        "ssl": {"enabled": True, "certChainFile": str(cert), "privateKeyFile": str(key)},
        "listeners": [IMPLICIT if implicit else PLAIN]}}
    srv = make_server(overrides)
    root = srv.root
    base: dict[str, Any] = {
        "smtp": {
            "hostname": "mx.test",
            "routing": {"localDomain": "localhost", "localDomains": ["example.test"]},
            "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                        "listsDir": str(root / "lists")},
            "spool": {"type": "file", "dir": str(root / "spool"), "retryDelaySeconds": 1},
        },
        "management": {"server": {"port": 0}},
    }
    full = deep_merge(base, overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(full))
    srv.service.config_path = str(path)
    return srv, cert, key, full


def test_reload_swaps_the_certificate_for_new_handshakes_only(
        make_server: Any, certs: CertSet, tmp_path: Path) -> None:
    srv, cert, key, _ = _reload_setup(make_server, certs, tmp_path)
    before = presented_cert(srv.port)
    assert before == leaf_der(certs.cert)
    established = tls_client(srv.port, certs)
    greet(established)
    renewed = make_certs(tmp_path / "renewed")  # same names, new key and certificate
    shutil.copy(renewed.cert, cert)
    shutil.copy(renewed.key, key)
    assert on_reactor(srv.service.reload) is True
    assert presented_cert(srv.port) == leaf_der(renewed.cert)
    assert established.cmd("NOOP")[0] == 250  # the open session is untouched
    assert full_message(established) == 250
    fresh = tls_client(srv.port, renewed)
    greet(fresh)
    assert full_message(fresh) == 250


@pytest.mark.parametrize("damage", ["missing-cert", "missing-key", "garbage-cert",
                                    "garbage-key", "mismatched-key", "empty-cert",
                                    "bad-second-cert"])
def test_reload_with_a_broken_certificate_keeps_the_old_one(
        make_server: Any, certs: CertSet, tmp_path: Path, events: list[dict[str, Any]],
        damage: str) -> None:
    srv, cert, key, _ = _reload_setup(make_server, certs, tmp_path)
    if damage == "missing-cert":
        cert.unlink()
    elif damage == "missing-key":
        key.unlink()
    elif damage == "garbage-cert":
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n"
                        "-----END CERTIFICATE-----\n")
    elif damage == "garbage-key":
        key.write_text("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n")
    elif damage == "mismatched-key":
        shutil.copy(certs.wrong_key, key)
    elif damage == "empty-cert":
        cert.write_bytes(b"")
    elif damage == "bad-second-cert":
        leaf = cert.read_text().split("-----END CERTIFICATE-----")[0]
        cert.write_text(leaf + "-----END CERTIFICATE-----\n-----BEGIN CERTIFICATE-----\n"
                        "MIIBroken\n-----END CERTIFICATE-----\n")
    assert on_reactor(srv.service.reload) is False
    assert any(e.get("event") == "reload_failed" for e in events)
    assert presented_cert(srv.port) == leaf_der(certs.cert)
    c = tls_client(srv.port, certs)
    greet(c)
    assert full_message(c) == 250


def test_reload_applies_a_raised_minimum_version(make_server: Any, certs: CertSet,
                                                 tmp_path: Path) -> None:
    srv, _, _, full = _reload_setup(make_server, certs, tmp_path)
    tls12 = client_ctx(certs, maximum=ssl.TLSVersion.TLSv1_2)
    c = tls_client(srv.port, certs, tls12)
    c.close()
    full["smtp"]["ssl"]["minTlsVersion"] = "TLSv1.3"
    Path(srv.service.config_path or "").write_text(yaml.safe_dump(full))
    assert on_reactor(srv.service.reload) is True
    with pytest.raises(ssl.SSLError):
        tls_client(srv.port, certs, tls12)
    greet(tls_client(srv.port, certs))


def test_reload_reaches_starttls_sessions(make_server: Any, certs: CertSet,
                                          tmp_path: Path) -> None:
    srv, cert, key, _ = _reload_setup(make_server, certs, tmp_path, implicit=False)
    renewed = make_certs(tmp_path / "renewed")
    shutil.copy(renewed.cert, cert)
    shutil.copy(renewed.key, key)
    assert on_reactor(srv.service.reload) is True
    assert presented_cert(srv.port, implicit=False) == leaf_der(renewed.cert)


# == logging =======================================================================================


def test_failed_handshake_is_logged_with_the_peer(make_server: Any, certs: CertSet,
                                                  events: list[dict[str, Any]]) -> None:
    srv = make_server({"smtp": {"listeners": [IMPLICIT]}})
    c = Client(srv.port)
    c.send(tls10_client_hello())
    assert_protocol_version_alert(read_until_closed(c.sock))
    c.close()
    no_sessions_left(srv)
    failed = [e for e in events if e.get("event") == "tls_handshake_failed"]
    assert len(failed) == 1, [formatEvent(e) for e in events][-5:]
    assert failed[0]["peer"] == "127.0.0.1"
    assert "protocol" in failed[0]["error"] or "version" in failed[0]["error"], failed[0]




# == renegotiation and TLS shutdown ================================================================


def test_client_initiated_renegotiation_is_refused(make_server: Any, certs: CertSet) -> None:
    """CVE-2011-1473 class: a TLS 1.2 client may not make the server redo handshakes."""
    from OpenSSL import SSL

    srv = make_server({"smtp": {"listeners": [IMPLICIT]}})
    ctx = SSL.Context(SSL.TLS_METHOD)
    ctx.set_max_proto_version(SSL.TLS1_2_VERSION)
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.settimeout(None)  # pyOpenSSL wants a blocking socket; SO_RCVTIMEO bounds every read
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                 (10).to_bytes(8, "little") + (0).to_bytes(8, "little"))
    conn = SSL.Connection(ctx, s)
    conn.set_connect_state()
    conn.do_handshake()
    assert conn.recv(1000).startswith(b"220 ")
    assert conn.renegotiate()
    with pytest.raises(SSL.Error, match="renegotiation"):
        conn.do_handshake()
        conn.send(b"NOOP\r\n")
        conn.recv(1000)
    assert conn.total_renegotiations() <= 1
    s.close()
    c = tls_client(srv.port, certs)
    greet(c)
    assert full_message(c) == 250


def test_plaintext_after_tls_shutdown_is_never_executed(make_server: Any, certs: CertSet,
                                                        events: list[dict[str, Any]]) -> None:
    """A client that ends TLS (close_notify) mid-transaction and goes on in plaintext on the
    same TCP connection must not get those commands executed (no TLS downgrade)."""
    srv = make_server()
    c = starttls_client(srv, certs)
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    try:
        plain = c.sock.unwrap()
    except (OSError, ssl.SSLError):
        plain = None
    if plain is not None:
        try:
            plain.sendall(b"RCPT TO:<bob@localhost>\r\nDATA\r\nSubject: downgraded\r\n\r\n"
                          b"x\r\n.\r\nQUIT\r\n")
        except OSError:
            pass
        data = read_until_closed(plain)
        plain.close()
        assert b"250" not in data and b"354" not in data, data[:200]
    no_sessions_left(srv)
    assert srv.messages("bob") == [] and srv.messages("alice") == []
    assert srv.spool_entries() == []
    assert not failures(events)


def test_quit_inside_tls_is_answered_and_closed(make_server: Any, certs: CertSet) -> None:
    srv = make_server({"smtp": {"listeners": [IMPLICIT, PLAIN]}})
    for c in (tls_client(srv.port_of(0), certs), None):
        if c is None:
            c = starttls_client(srv, certs, port=srv.port_of(1))
            assert c.cmd("EHLO client.test")[0] == 250
        else:
            greet(c)
        code, lines = c.cmd("QUIT")
        assert (code, lines[0][:5]) == (221, "2.0.0")
        assert c.closed()
    no_sessions_left(srv)


def test_reload_that_cannot_apply_ssl_enabled_says_so(make_server: Any, certs: CertSet,
                                                      tmp_path: Path,
                                                      events: list[dict[str, Any]]) -> None:
    srv = make_server(tls=False)
    root = srv.root
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({
        "smtp": {
            "hostname": "mx.test",
            "routing": {"localDomain": "localhost", "localDomains": ["example.test"]},
            "storage": {"mailboxDir": str(root / "mailboxes"), "tempDir": str(root / "temp"),
                        "listsDir": str(root / "lists")},
            "spool": {"type": "file", "dir": str(root / "spool")},
            "listeners": [PLAIN],
            "ssl": {"enabled": True, "certChainFile": str(certs.cert),
                    "privateKeyFile": str(certs.key)}},
        "management": {"server": {"port": 0}}}))
    srv.service.config_path = str(path)
    applied = on_reactor(srv.service.reload)
    c = Client(srv.port)
    tls_now = "STARTTLS" in keywords(greet(c))
    texts = [formatEvent(e).lower() for e in events]
    warned = any("restart" in t and "ssl" in t for t in texts)
    # Either TLS is really on now, or the operator is told that it is not (and why).
    assert tls_now or (warned and not any("reloaded tls" in t for t in texts)), (applied, texts)
