"""PROXY protocol v1/v2 in front of SMTP: real client seen everywhere, bad headers closed."""

from __future__ import annotations

import ipaddress
import socket
import struct
from typing import Any

import pytest
from protocol_support import Client

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"


def _proxy_server(make_server: Any, trusted: list[str] | None = None) -> Any:
    smtp: dict[str, Any] = {"listeners": [{"port": 0, "bindAddress": "127.0.0.1",
                                           "proxyProtocol": True}]}
    if trusted is not None:
        smtp["proxy"] = {"trustedCidrs": trusted}
    return make_server({"smtp": smtp})


def v2_header(src: str, sport: int, dport: int = 25, command: int = 1) -> bytes:
    a = ipaddress.ip_address(src)
    b = ipaddress.ip_address("192.0.2.1" if a.version == 4 else "2001:db8::1")
    if a.version == 4:
        fam, payload = 0x11, a.packed + b.packed + struct.pack("!HH", sport, dport)
    else:
        fam, payload = 0x21, a.packed + b.packed + struct.pack("!HH", sport, dport)
    return V2_SIG + bytes([0x20 | command, fam]) + struct.pack("!H", len(payload)) + payload


def _closed_without_greeting(port: int, data: bytes) -> bool:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
    except ConnectionResetError:
        return True  # reset during the handshake: refused before any greeting
    try:
        s.sendall(data)
    except (ConnectionResetError, BrokenPipeError):
        pass  # aborted before we finished sending: also a refusal without a greeting
    got = b""
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    s.close()
    return got == b""


@pytest.mark.parametrize("header,client_ip", [
    (b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n", "203.0.113.7"),
    (b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n", "2001:db8::7"),
    (v2_header("198.51.100.9", 41000), "198.51.100.9"),
    (v2_header("2001:db8::9", 41000), "2001:db8::9"),
])
def test_trusted_proxy_header_gives_the_real_client(make_server: Any, header: bytes,
                                                    client_ip: str) -> None:
    srv = _proxy_server(make_server)
    c = Client(srv.port)
    c.send(header + b"EHLO client.test\r\n")  # pipelined right behind the header
    assert c.reply()[0] == 220
    code, lines = c.reply()
    assert code == 250 and f"[{client_ip}]" in lines[0]
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    c.cmd("DATA")
    c.send(b"Subject: proxied\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    (msg,) = srv.wait_messages("alice", 1)
    assert f"([{client_ip}])".encode() in msg


def test_header_split_across_reads(make_server: Any) -> None:
    import time

    srv = _proxy_server(make_server)
    c = Client(srv.port)
    for byte in b"PROXY TCP4 203.0.113.8 192.0.2.1 40001 25\r\n":
        c.send(bytes([byte]))
        time.sleep(0.001)  # force separate segments (not synchronisation)
    assert c.reply()[0] == 220
    assert "[203.0.113.8]" in c.cmd("EHLO x.test")[1][0]


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 203.0.113.7 192.0.2.1 40000\r\n",
    b"PROXY TCP4 2001:db8::1 192.0.2.1 1 2\r\n",
    b"PROXY TCP4 203.0.113.7 192.0.2.1 99999 25\r\n",
    b"EHLO not-a-proxy.test\r\n",
    b"PROXY " + b"A" * 200,
    v2_header("198.51.100.9", 1, command=2),  # no such command
    V2_SIG + b"\x21\x11\xff\xff",  # absurd length
])
def test_bad_headers_close_the_connection(make_server: Any, data: bytes) -> None:
    srv = _proxy_server(make_server)
    assert _closed_without_greeting(srv.port, data)


def test_untrusted_balancer_is_refused(make_server: Any) -> None:
    srv = _proxy_server(make_server, trusted=["10.0.0.0/8"])
    assert _closed_without_greeting(srv.port, b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n")


def test_rate_limits_see_the_real_client(make_server: Any) -> None:
    srv = make_server({"smtp": {
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "proxyProtocol": True}],
        "rateLimit": {"maxConnectionsPerIp": 1, "exemptCidrs": []}}})
    a = Client(srv.port)
    a.send(b"PROXY TCP4 203.0.113.1 192.0.2.1 1000 25\r\n")
    assert a.reply()[0] == 220
    b = Client(srv.port)
    b.send(b"PROXY TCP4 203.0.113.2 192.0.2.1 1000 25\r\n")
    assert b.reply()[0] == 220  # a different real client
    c = Client(srv.port)
    c.send(b"PROXY TCP4 203.0.113.1 192.0.2.1 1001 25\r\n")
    assert c.reply()[0] == 421  # same real client as a


def test_implicit_tls_behind_proxy(make_server: Any, certs: Any) -> None:
    import ssl

    srv = make_server({"smtp": {"listeners": [
        {"port": 0, "bindAddress": "127.0.0.1", "proxyProtocol": True, "implicitTls": True}]}})
    raw = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
    raw.sendall(b"PROXY TCP4 203.0.113.5 192.0.2.1 1000 465\r\n")
    ctx = ssl.create_default_context(cafile=str(certs.ca_cert))
    tls = ctx.wrap_socket(raw, server_hostname="localhost")
    c = Client.__new__(Client)
    c.sock, c.buf = tls, b""
    assert c.reply()[0] == 220
    code, lines = c.cmd("EHLO x.test")
    assert "[203.0.113.5]" in lines[0] and not any("STARTTLS" in ln for ln in lines)
