"""Hunting for inputs that crash, hang or confuse an SMTP session (real server on loopback).

Every test checks three things: the reply to the bad input is a clear, correct code; no failure
(traceback) was logged by the server; and the server still serves a well-behaved client.
Tests marked ``xfail(strict=True)`` demonstrate confirmed bugs (the reason names the cause).
"""

from __future__ import annotations

import base64
import socket
from typing import Any

import pytest
from helpers import wait_until
from protocol_support import Client, Server

from kotlin_smtp_py.inbound.auth import hash_password

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
V2_TRUNCATED = V2_SIG + b"\x21\x11\x00"
PROXY_OK = b"PROXY TCP4 203.0.113.5 192.0.2.1 40000 25\r\n"


def no_tracebacks(failures: list[dict[str, Any]]) -> None:
    assert not failures, [str(f.get("log_failure"))[:300] for f in failures[:3]]


def greet(c: Client, name: str = "client.test") -> None:
    assert c.reply()[0] == 220
    assert c.cmd(f"EHLO {name}")[0] == 250


def still_served(srv: Server, port: int | None = None, prefix: bytes = b"") -> None:
    """A second, well-behaved client gets a message through."""
    c = Client(port or srv.port)
    if prefix:
        c.send(prefix)
    greet(c, "second.test")
    assert c.cmd("MAIL FROM:<ok@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: second client\r\n\r\nfine\r\n.\r\n")
    assert c.reply()[0] == 250
    assert c.cmd("QUIT")[0] == 221
    c.close()


def in_transaction(c: Client) -> None:
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250


def _auth_server(make_server: Any, **smtp: Any) -> Server:
    users = {"carol": hash_password("s3cret", rounds=4), "dave": "p" * 80, "erin": "short"}
    return make_server({"smtp": {
        "auth": {"users": users, "failureDelayMs": 0},
        "features": {"vrfyEnabled": True, "expnEnabled": True, "etrnEnabled": True},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}],
        **smtp}})


def _plain(user: str, password: str) -> str:
    return "AUTH PLAIN " + base64.b64encode(f"\x00{user}\x00{password}".encode()).decode()


def _closed_without_greeting(port: int, data: bytes, half_close: bool = False) -> bool:
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    try:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        return s.recv(4096) == b""  # EOF, not a greeting (the first byte would be one)
    except (ConnectionResetError, BrokenPipeError):
        return True
    finally:
        s.close()


def _proxy_server(make_server: Any) -> Server:
    return make_server({"smtp": {"listeners": [
        {"port": 0, "bindAddress": "127.0.0.1", "proxyProtocol": True}]}})


# == confirmed bugs ================================================================================


@pytest.mark.parametrize("value", ["\u00b2", "\uff13", "9" * 5000],
                         ids=["superscript-two", "fullwidth-three", "5000-digits"])
def test_mail_size_with_non_ascii_or_overlong_digits(make_server: Any, failures: list[Any],
                                                     value: str) -> None:
    srv = make_server({"smtp": {"limits": {"maxCommandLineLength": 10000}}})
    c = Client(srv.port)
    greet(c)
    code, lines = c.cmd(f"MAIL FROM:<a@remote.test> SIZE={value}".encode())
    assert code in ((501, 552) if value.isascii() else (501,)), (code, lines)
    no_tracebacks(failures)
    assert c.cmd("RSET")[0] == 250
    still_served(srv)


@pytest.mark.parametrize("size", ["\u00b2", "\uff13 LAST", "1" * 5000],
                         ids=["superscript-two", "fullwidth-three", "5000-digits"])
def test_bdat_size_with_non_ascii_or_overlong_digits(make_server: Any, failures: list[Any],
                                                     size: str) -> None:
    srv = make_server({"smtp": {"limits": {"maxCommandLineLength": 10000}}})
    c = Client(srv.port)
    greet(c)
    in_transaction(c)
    # "X\r\n" is 3 octets: swallowed as the chunk if the size were taken as 3, else a command.
    c.send(f"BDAT {size}\r\nX\r\nNOOP\r\n".encode())
    code, lines = c.reply()
    assert code == 501, lines
    assert c.replies(2) == [500, 250]
    no_tracebacks(failures)
    assert c.cmd("RSET")[0] == 250
    still_served(srv)


@pytest.mark.parametrize("user,password,expected", [
    ("carol", "x" * 80, 535),   # bcrypt user, wrong long password
    ("nobody", "x" * 80, 535),  # unknown user
    ("dave", "p" * 80, 235),    # plaintext user, correct 80-byte password
], ids=["bcrypt-user", "unknown-user", "plaintext-user"])
def test_auth_password_longer_than_72_bytes(make_server: Any, failures: list[Any], user: str,
                                            password: str, expected: int) -> None:
    srv = _auth_server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd(_plain(user, password))[0] == expected
    no_tracebacks(failures)
    assert c.cmd("NOOP")[0] == 250
    still_served(srv)


@pytest.mark.parametrize("with_crlf", [True, False], ids=["one-line", "no-crlf-first"])
def test_overlong_auth_response_line_ends_the_auth_exchange(make_server: Any,
                                                            failures: list[Any],
                                                            with_crlf: bool) -> None:
    srv = _auth_server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd("AUTH PLAIN")[0] == 334
    if with_crlf:
        c.send(b"A" * 13000 + b"\r\nNOOP\r\n")
    else:  # the discard path: the buffer overflows before any line end arrives
        c.send(b"A" * 13000)
        c.send(b"\r\nNOOP\r\n")
    assert c.replies(2) == [500, 250]
    no_tracebacks(failures)


@pytest.mark.parametrize("name", [b"evil\rX-Injected:yes", b"a\x00b", b"a\x1b[31mb"],
                         ids=["bare-cr", "nul", "escape"])
@pytest.mark.parametrize("verb", [b"EHLO", b"HELO"])
def test_helo_name_with_control_characters_is_refused(make_server: Any, failures: list[Any],
                                                      verb: bytes, name: bytes) -> None:
    srv = make_server()
    c = Client(srv.port)
    assert c.reply()[0] == 220
    code, lines = c.cmd(verb + b" " + name)
    assert code == 501, lines
    no_tracebacks(failures)
    still_served(srv)


@pytest.mark.parametrize("src", [b"fe80::1%eth0", b"fe80::1%\x00\r"], ids=["eth0", "nul-cr"])
def test_proxy_v1_source_with_zone_id_is_refused(make_server: Any, src: bytes) -> None:
    srv = _proxy_server(make_server)
    header = b"PROXY TCP6 " + src + b" 2001:db8::1 40000 25\r\n"
    assert _closed_without_greeting(srv.port, header)


def test_ipv6_address_literal_with_zone_id_is_refused(make_server: Any,
                                                      failures: list[Any]) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    code, lines = c.cmd("MAIL FROM:<a@[IPv6:fe80::1%eth0]>")
    assert (code, lines[0][:5]) == (553, "5.1.7"), lines
    no_tracebacks(failures)


@pytest.mark.parametrize("envid", ["a+0D+0Ab", "a+00b"], ids=["crlf", "nul"])
def test_envid_decoding_to_control_characters_is_refused(make_server: Any, failures: list[Any],
                                                         envid: str) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    assert c.cmd(f"MAIL FROM:<a@remote.test> ENVID={envid}")[0] == 501
    no_tracebacks(failures)


@pytest.mark.parametrize("orcpt", ["rfc822;a+0D+0Ab@x.test", "rfc822;a+00b@x.test"],
                         ids=["crlf", "nul"])
def test_orcpt_decoding_to_control_characters_is_refused(make_server: Any, failures: list[Any],
                                                         orcpt: str) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<alice@localhost> ORCPT={orcpt}")[0] == 501
    assert c.cmd("RCPT TO:<alice@localhost> ORCPT=rfc822;alice+2Btag@localhost")[0] == 250
    no_tracebacks(failures)


def test_expn_without_argument_is_a_syntax_error(make_server: Any) -> None:
    srv = _auth_server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd(_plain("erin", "short"))[0] == 235
    assert c.cmd("EXPN")[0] == 501


# == inputs that behave correctly (coverage not elsewhere) ========================================


@pytest.mark.parametrize("params,code", [
    ("SIZE=-1", 501), ("SIZE=", 501), ("SIZE", 501), ("SIZE=+5", 501),
    ("SIZE=99999999999999999999", 552), ("SIZE=1 SIZE=1", 501),
    ("BODY=weird", 501), ("BODY", 501), ("RET=FULL RET=HDRS", 501), ("RET", 501),
    ("ENVID=a+zz", 501), ("ENVID=a=b", 501), ("ENVID=a+2b", 501), ("ENVID", 501),
    ("ENVID=" + "x" * 101, 501), ("SMTPUTF8=yes", 501), ("REQUIRETLS", 530),
    ("REQUIRETLS=1", 501), ("AUTH", 501), ("=x", 501), ("-X=1", 501), ("X-FOO=1", 555),
])
def test_malformed_mail_parameters(make_server: Any, failures: list[Any], params: str,
                                   code: int) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    got, lines = c.cmd(f"MAIL FROM:<a@remote.test> {params}")
    assert got == code, lines
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250  # no transaction was opened
    no_tracebacks(failures)
    still_served(srv)


@pytest.mark.parametrize("path,code", [
    ("<>", 250), ("<@a.test,@b.test:x@y.test>", 250), ('<"a b\\"c"@y.test>', 250),
    ("<a@[192.0.2.1]>", 250), ("<a@[IPv6:2001:db8::1]>", 250), ("<a@[IPv6:1.2.3.4]>", 553),
    ("<a@[300.1.1.1]>", 553), ("<a@[tag:x]>", 553), ("<a@[1.2.3.4>", 553),
    ("<" + "a" * 65 + "@y.test>", 553), ("<a@" + "b." * 130 + "c>", 553),
    ("<a@b..test>", 553), ("<a@-b.test>", 553), ("<a\x01@b.test>", 553), ("<a b@c.test>", 553),
    ("a@b.test", 501), ("<a@b.test", 501), ("<@a.test:>", 553), ("<@:x@y.test>", 553),
    ("<jos\u00e9@b.test>", 553), ("<a@b\u00fccher.test>", 553),
])
def test_odd_sender_paths(make_server: Any, failures: list[Any], path: str, code: int) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    got, lines = c.cmd(f"MAIL FROM:{path}".encode())
    assert got == code, lines
    if code == 553 and not path.isascii():
        assert lines[0].startswith("5.6.7"), lines  # needs SMTPUTF8 (RFC 6531)
    no_tracebacks(failures)
    still_served(srv)


def test_malformed_rcpt_parameters_and_paths(make_server: Any, failures: list[Any]) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    for line, code in [
        ("RCPT TO:<alice@localhost> NOTIFY", 501), ("RCPT TO:<alice@localhost> NOTIFY=", 501),
        ("RCPT TO:<alice@localhost> NOTIFY=NEVER,NEVER", 501),
        ("RCPT TO:<alice@localhost> NOTIFY=SOMETIMES", 501),
        ("RCPT TO:<alice@localhost> ORCPT", 501), ("RCPT TO:<alice@localhost> ORCPT=;x", 501),
        ("RCPT TO:<alice@localhost> ORCPT=rfc822;", 501),
        ("RCPT TO:<alice@localhost> ORCPT=rfc822", 501),
        ("RCPT TO:<alice@localhost> ORCPT=rfc822;a+ZZ", 501),
        ("RCPT TO:<alice@localhost> ORCPT=rfc822;a ORCPT=rfc822;b", 501),
        ("RCPT TO:<alice@localhost> SMTPUTF8", 555), ("RCPT TO:<alice@localhost> SIZE=1", 555),
        ("RCPT TO:<>", 501), ("RCPT TO:alice@localhost", 501), ("RCPT TO:<alice@localhost", 501),
        ("RCPT TO:<j\u00f6s\u00e9@localhost>", 553), ("RCPT TO:<a@[IPv6:::1]>", 550),
        ("RCPT TO:<\"alice@other.test\"@localhost>", 550),
        ("RCPT TO:<@x.test:alice@localhost>", 250), ("RCPT TO:<alice@localhost>", 250),
    ]:
        got, lines = c.cmd(line.encode())
        assert got == code, (line, got, lines)
    no_tracebacks(failures)


@pytest.mark.parametrize("line", ["BDAT", "BDAT abc", "BDAT -1", "BDAT +1", "BDAT 1 2",
                                  "BDAT 1 LAST extra", "BDAT 1 FIRST", "BDAT 0x10"])
def test_bdat_with_bad_sizes(make_server: Any, failures: list[Any], line: str) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    in_transaction(c)
    code, lines = c.cmd(line)
    assert (code, lines[0][:5]) == (501, "5.5.4"), lines
    c.send(b"BDAT 2 LAST\r\n\r\n")  # the transaction survives a syntax error
    code, lines = c.cmd("NOOP")
    assert "queued as" in lines[0] and code == 250
    assert c.reply()[0] == 250  # the NOOP
    no_tracebacks(failures)


def test_bdat_edge_cases(make_server: Any, failures: list[Any]) -> None:
    srv = make_server({"smtp": {"limits": {"maxMessageSizeBytes": 10000}}})
    c = Client(srv.port)
    greet(c)
    in_transaction(c)
    code, lines = c.cmd("BDAT 0 LAST")  # an empty message is a message (RFC 3030)
    assert code == 250 and "queued as" in lines[0]
    # DATA then BDAT in the next transaction, pipelined behind the dot.
    in_transaction(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: a\r\n\r\nx\r\n.\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>"
           b"\r\nBDAT 17 LAST\r\nSubject: b\r\n\r\ny\r\n")
    assert c.replies(4) == [250, 250, 250, 250]
    # A chunk larger than the size limit is read in full (not run as commands), then 552.
    in_transaction(c)
    c.send(b"BDAT 20000 LAST\r\n" + b"NOOP\r\n" * 3333 + b"NO")
    code, lines = c.reply()
    assert (code, lines[0][:5]) == (552, "5.3.4")
    assert c.cmd("NOOP")[0] == 250
    # BDAT outside a transaction still consumes its chunk (RFC 3030), then 503.
    c.send(b"BDAT 6\r\nQUIT\r\n")
    assert c.reply()[0] == 503
    assert c.cmd("NOOP")[0] == 250
    srv.wait_messages("alice", 2)
    no_tracebacks(failures)


def test_auth_edge_cases(make_server: Any, failures: list[Any]) -> None:
    srv = _auth_server(make_server)
    c = Client(srv.port)
    assert c.reply()[0] == 220
    assert c.cmd(_plain("erin", "short"))[0] == 503  # before EHLO
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("AUTH PLAIN a b")[0] == 501
    assert c.cmd("AUTH PLAIN =")[0] == 501  # empty initial response: not three fields
    assert c.cmd("AUTH LOGIN =")[0] == 334  # empty user name, password prompt
    assert c.cmd("*")[0] == 501
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd("")[0] == 334
    assert c.cmd("")[0] == 535  # empty user and password
    assert c.cmd("AUTH LOGIN")[0] == 334
    assert c.cmd(base64.b64encode(b"erin").decode())[0] == 334
    assert c.cmd(" * ")[0] == 501  # cancelled at the password prompt
    assert c.cmd("AUTH LOGIN " + base64.b64encode(b"\xff\xfe").decode())[0] == 334
    assert c.cmd(base64.b64encode(b"x").decode())[0] == 535  # non-UTF-8 user name
    assert c.cmd("AUTH PLAIN " + base64.b64encode(b"other\x00erin\x00short").decode()
                 )[0] == 535  # authorisation identity other than the user
    assert c.cmd("AUTH PLAIN AGVyaW4Ac2hvcnQ")[0] == 501  # missing base64 padding
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd(_plain("erin", "short"))[0] == 503  # not during a transaction
    assert c.cmd("RSET")[0] == 250
    assert c.cmd(_plain("erin", "short"))[0] == 235
    assert c.cmd("AUTH LOGIN")[0] == 503  # already authenticated
    no_tracebacks(failures)
    still_served(srv)


def test_vrfy_etrn_without_argument_and_odd_arguments(make_server: Any,
                                                      failures: list[Any]) -> None:
    srv = _auth_server(make_server)
    c = Client(srv.port)
    greet(c)
    assert c.cmd("VRFY")[0] == 501
    assert c.cmd("VRFY    ")[0] == 501
    assert c.cmd("ETRN")[0] == 501
    assert c.cmd("EXPN")[0] == 501  # syntax first, as for ETRN
    for odd in ["VRFY ../../etc/passwd", "VRFY \x00", "VRFY <>", "VRFY \u212alice",
                "VRFY " + "a" * 400]:
        assert c.cmd(odd.encode())[0] == 550, odd
    assert c.cmd(_plain("erin", "short"))[0] == 235
    assert c.cmd("EXPN ../lists/x")[0] == 550
    assert c.cmd("ETRN @")[0] == 250
    no_tracebacks(failures)


def test_whitespace_nul_and_8bit_command_lines(make_server: Any, failures: list[Any]) -> None:
    srv = make_server()
    c = Client(srv.port)
    greet(c)
    c.send(b"   \r\n\t\r\n\x00\r\nNOOP\x00\r\n\x7f\r\n\xc3\x28\r\nN\xc3\xb6OP\r\n\r\n"
           b"NOOP\r\r\nSTARTTLS now\r\nDATA x\r\nNOOP\r\n")
    assert c.replies(12) == [500, 500, 500, 500, 500, 500, 500, 500, 250, 501, 501, 250]
    no_tracebacks(failures)
    still_served(srv)


@pytest.mark.parametrize("data", [
    b"EHLO x\r\nMAIL FROM:<a@remote",
    b"EHLO x\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>\r\nBDAT 100\r\nab",
    b"EHLO x\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>\r\nDATA\r\nSubj",
    b"EHLO x\r\nAUTH LOGIN\r\n",
    b"EHLO x\r\nQUIT\r\nNOOP\r\n",
], ids=["mid-line", "mid-bdat", "mid-data", "mid-auth", "after-quit"])
def test_client_closing_mid_command(make_server: Any, failures: list[Any], data: bytes) -> None:
    srv = _auth_server(make_server)
    factory = srv.service.factories[0]
    s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    s.sendall(data)
    seen = b""
    while seen.count(b"\r\n") < data.count(b"\r\n") - (1 if b"QUIT" in data else 0):
        chunk = s.recv(65536)
        if not chunk:
            break
        seen += chunk
    s.close()
    wait_until(lambda: not factory.sessions, timeout=10, message="the session to end")
    no_tracebacks(failures)
    assert srv.spool_entries() == [] and srv.messages("alice") == []
    still_served(srv)


@pytest.mark.parametrize("data", [
    V2_SIG + b"\x21\x31\x00\xd8" + b"\x00" * 216,        # AF_UNIX
    V2_SIG + b"\x11\x11\x00\x0c" + b"\x00" * 12,         # version 1 in the v2 header
    V2_SIG + b"\x21\x12\x00\x0c" + b"\x00" * 12,         # UDP over IPv4
    V2_SIG + b"\x21\x11\x00\x04" + b"\x00" * 4,          # inet family, payload too short
    V2_SIG + b"\x21\x00\x00\x00",                        # UNSPEC with PROXY command
    V2_TRUNCATED,                                        # truncated, then EOF
    b"PROXY TCP4 203.0.113.7 192.0.2.1 01 25\r\n",       # leading zero port
    b"PROXY TCP4 203.0.113.7 192.0.2.1 \xd9\xa3 25\r\n",  # non-ASCII digit
    b"PROXY TCP4 203.0.113.7 192.0.2.1 1 25 \r\n",        # trailing space
    b"PROXY TCP4 203.0.113.7 192.0.2.1 1 25\nEHLO x\r\n",  # LF-only header end
    b"proxy TCP4 203.0.113.7 192.0.2.1 1 25\r\n",         # lower case
    b"PROXY TCP4 203.0.113.007 192.0.2.1 1 25\r\n",       # leading zero octet
    b"PROXY TCP4 \xff\xfe 192.0.2.1 1 25\r\n",            # 8-bit garbage address
    b"PROXY TCP6 ::ffff:203.0.113.7 1.2.3.4 1 25\r\n",    # family mismatch (destination)
    b"\x16\x03\x01\x00\xa5\x01\x00\x00",                  # a TLS ClientHello instead
], ids=["v2-unix", "v2-version1", "v2-udp", "v2-short", "v2-unspec", "v2-truncated",
        "v1-port-0", "v1-port-8bit", "v1-trailing-space", "v1-lf", "v1-lowercase",
        "v1-octal-ish", "v1-8bit-addr", "v1-dst-mismatch", "tls-hello"])
def test_more_bad_proxy_headers_from_a_trusted_balancer(make_server: Any, failures: list[Any],
                                                        data: bytes) -> None:
    srv = _proxy_server(make_server)
    assert _closed_without_greeting(srv.port, data, half_close=data == V2_TRUNCATED)
    no_tracebacks(failures)
    still_served(srv, prefix=PROXY_OK)


def test_starttls_behind_proxy_keeps_the_real_client(make_server: Any, certs: Any,
                                                     failures: list[Any]) -> None:
    srv = _proxy_server(make_server)
    c = Client(srv.port)
    c.send(PROXY_OK)
    greet(c)
    assert c.cmd("STARTTLS please")[0] == 501
    c.send(b"STARTTLS\r\nMAIL FROM:<injected@remote.test>\r\n")
    assert c.reply()[0] == 220
    c.starttls(certs.ca_cert)
    code, lines = c.cmd("EHLO client.test")
    assert code == 250 and "[203.0.113.5]" in lines[0] and "STARTTLS" not in lines
    assert c.cmd("STARTTLS")[0] == 503
    in_transaction(c)
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: proxied tls\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    (msg,) = srv.wait_messages("alice", 1)
    assert b"([203.0.113.5])" in msg and b"with ESMTPS" in msg
    assert b"injected" not in msg
    no_tracebacks(failures)
