"""PROXY protocol hunt: v1/v2 edge cases over real loopback sockets against a real server.

What the haproxy PROXY protocol specification (proxy-protocol.txt) and Postfix's
``smtpd_upstream_proxy_protocol`` expect: a malformed header is refused at once (no greeting),
a header split over many reads is reassembled with bounded memory, a header that never
completes is closed by the header timer, TLVs are skipped, bytes behind the header belong to
the session (SMTP or TLS), sources outside ``smtp.proxy.trustedCidrs`` are refused, and the
proxied address is the one the whole session (greeting, Received:, logs) uses.

One case found a divergence (fixed since): ``PROXY UNKNOWN`` and the v2 ``LOCAL`` command were
refused, where proxy-protocol.txt says the receiver MUST (LOCAL) / SHOULD (UNKNOWN) accept
them and use the real endpoints, as current Postfix does (haproxy's ``check-send-proxy``
health checks send exactly these); the tests at the end pin the fix.
"""

from __future__ import annotations

import ipaddress
import socket
import ssl
import struct
import time
from typing import Any

import pytest
from helpers import wait_until
from protocol_support import Client, Server

from kotlin_smtp_py.inbound import proxy

V2_SIG = b"\r\n\r\n\x00\r\nQUIT\n"
HEADER_TIMEOUT = 2.0  # the header timer, shortened for these tests (10 s in production)
GOOD_V1 = b"PROXY TCP4 203.0.113.5 192.0.2.1 40000 25\r\n"


@pytest.fixture(autouse=True)
def _short_header_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    # Read by ProxyProtocolWrapper.connectionMade at each connection (a module global).
    monkeypatch.setattr(proxy, "HEADER_TIMEOUT", HEADER_TIMEOUT)


def _server(make_server: Any, bind: str = "127.0.0.1", **extra: Any) -> Server:
    listener = {"port": 0, "bindAddress": bind, "proxyProtocol": True, **extra}
    return make_server({"smtp": {"listeners": [listener]}})  # type: ignore[no-any-return]


def v2(src: str = "198.51.100.9", sport: int = 41000, *, ver_cmd: int = 0x21,
       fam: int | None = None, tlvs: bytes = b"", length: int | None = None) -> bytes:
    a = ipaddress.ip_address(src)
    b = ipaddress.ip_address("192.0.2.1" if a.version == 4 else "2001:db8::1")
    payload = a.packed + b.packed + struct.pack("!HH", sport, 25) + tlvs
    if fam is None:
        fam = 0x11 if a.version == 4 else 0x21
    n = len(payload) if length is None else length
    return V2_SIG + bytes([ver_cmd, fam]) + struct.pack("!H", n) + payload


def tlv(kind: int, value: bytes) -> bytes:
    return bytes([kind]) + struct.pack("!H", len(value)) + value


def _connect(port: int, source: str | None = None, host: str = "127.0.0.1") -> socket.socket:
    src = (source, 0) if source else None
    s = socket.create_connection((host, port), timeout=10, source_address=src)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def _outcome(port: int, data: bytes, source: str | None = None,
             host: str = "127.0.0.1") -> tuple[bytes, float]:
    """(everything the server said until it closed, seconds from the send to the close)."""
    try:
        s = _connect(port, source, host)
    except ConnectionResetError:
        return b"", 0.0
    start = time.monotonic()
    try:
        if data:
            s.sendall(data)
    except (ConnectionResetError, BrokenPipeError):
        pass
    got = b""
    s.settimeout(HEADER_TIMEOUT + 8)
    try:
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except ConnectionResetError:
        pass
    s.close()
    return got, time.monotonic() - start


def _refused_at_once(port: int, data: bytes, **kw: Any) -> None:
    got, elapsed = _outcome(port, data, **kw)
    assert got == b"", got
    # Refused by the parser, not merely left to the header timer.
    assert elapsed < HEADER_TIMEOUT * 0.75, f"closed only after {elapsed:.2f}s"


def _served_as(srv: Server, c: Client, client_ip: str) -> None:
    """Greeted; EHLO names the proxied client; a message carries it in Received:."""
    before = len(srv.messages("alice"))
    assert c.reply()[0] == 220
    code, lines = c.cmd("EHLO client.test")
    assert code == 250 and f"[{client_ip}]" in lines[0], lines
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: proxied\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    msgs = srv.wait_messages("alice", before + 1)
    assert any(f"([{client_ip}])".encode() in m for m in msgs)


def _no_tracebacks(failures: list[Any]) -> None:
    assert not failures, [f.get("log_format") or f.get("log_text") for f in failures]


# == v1 edge cases ===========================================================================


@pytest.mark.parametrize("data", [
    b"PROXY TCP4 010.0.0.1 192.0.2.1 40000 25\r\n",          # octal-looking octet
    b"PROXY TCP4 0x7f.0.0.1 192.0.2.1 40000 25\r\n",         # hex octet
    b"PROXY TCP4 127.1 192.0.2.1 40000 25\r\n",              # inet_aton short form
    b"PROXY TCP4 2130706433 192.0.2.1 40000 25\r\n",         # integer form
    b"PROXY TCP4 203.0.113.7 2001:db8::1 40000 25\r\n",      # TCP4, IPv6 destination
    b"PROXY TCP6 203.0.113.7 2001:db8::1 40000 25\r\n",      # TCP6, IPv4 source
    b"PROXY TCP4 203.0.113.7 192.0.2.1 65536 25\r\n",        # port out of range
    b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 65536\r\n",     # destination port out of range
    b"PROXY TCP4 203.0.113.7 192.0.2.1 -1 25\r\n",           # negative port
    b"PROXY TCP4 203.0.113.7 192.0.2.1 +25 25\r\n",          # signed port
    b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 025\r\n",       # leading-zero destination port
    b"PROXY TCP4 203.0.113.7 192.0.2.1 99999999999999999999 25\r\n",  # huge port
    b"PROXY  TCP4 203.0.113.7 192.0.2.1 40000 25\r\n",       # double space
    b"PROXY TCP4 203.0.113.7  192.0.2.1 40000 25\r\n",       # double space inside
    b"PROXY TCP4\t203.0.113.7 192.0.2.1 40000 25\r\n",       # tab separator
    b" PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\n",       # leading space
    b"PROXY tcp4 203.0.113.7 192.0.2.1 40000 25\r\n",        # lower-case protocol
    b"PROXY TCP5 203.0.113.7 192.0.2.1 40000 25\r\n",        # unknown protocol
    b"PROXY UDP4 203.0.113.7 192.0.2.1 40000 25\r\n",        # datagram protocol
    b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25 extra\r\n",  # extra field
    b"PROXY TCP4 203.0.113.7 192.0.2.1\r\n",                 # missing ports
    b"PROXY TCP4 203.0.113.7\x00 192.0.2.1 40000 25\r\n",    # NUL in an address
    b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\r\r\n",      # CR before CRLF
    b"PROXY\r\n",                                            # no space, no protocol
    b"PROXY \r\n",                                           # nothing after PROXY
    b"PROXY TCP6 2001:db8::7/64 2001:db8::1 40000 25\r\n",   # a prefix, not an address
    b"PROXY TCP6 [2001:db8::7] 2001:db8::1 40000 25\r\n",    # bracketed
    b"PROXY TCP6 2001:db8:::7 2001:db8::1 40000 25\r\n",     # malformed IPv6
])
def test_malformed_v1_headers_are_refused_at_once(make_server: Any, failures: list[Any],
                                                  data: bytes) -> None:
    srv = _server(make_server)
    _refused_at_once(srv.port, data)
    _no_tracebacks(failures)
    c = Client(srv.port)  # the listener still serves a good balancer
    c.send(GOOD_V1)
    _served_as(srv, c, "203.0.113.5")


def test_v1_header_longer_than_107_bytes_is_refused_before_its_end(make_server: Any) -> None:
    """proxy-protocol.txt: a v1 line is at most 107 bytes; a receiver must not wait for (or
    buffer) more. Refused as soon as byte 108 arrives without a CRLF."""
    srv = _server(make_server)
    _refused_at_once(srv.port, b"PROXY TCP6 " + b"1" * 97)  # 108 bytes, no CRLF
    line = b"PROXY TCP6 " + b"0:" * 44 + b"1 2001:db8::1 1 25\r\n"  # > 107 with its CRLF
    assert len(line) > 107
    _refused_at_once(srv.port, line)


def test_longest_legal_v1_header_is_accepted(make_server: Any) -> None:
    src = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:fffe"
    dst = "ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff"
    header = f"PROXY TCP6 {src} {dst} 65535 65535\r\n".encode()
    assert len(header) == 104  # the longest a TCP6 line can be (spec: 104 + margin = 107)
    srv = _server(make_server)
    c = Client(srv.port)
    c.send(header)
    _served_as(srv, c, src)


def test_v1_ipv4_mapped_source_is_the_ipv4_client(make_server: Any) -> None:
    """Postfix converts ::ffff:a.b.c.d to a.b.c.d; so do the greeting and Received:."""
    srv = _server(make_server)
    c = Client(srv.port)
    c.send(b"PROXY TCP6 ::ffff:203.0.113.44 2001:db8::1 40000 25\r\n")
    _served_as(srv, c, "203.0.113.44")


def test_v1_header_with_cr_lf_split_across_reads_and_pipelined_smtp(make_server: Any) -> None:
    """The CR and the LF of the header arrive in different reads; the rest of the session is
    pipelined right behind the LF."""
    srv = _server(make_server)
    s = _connect(srv.port)
    s.sendall(b"PROXY TCP4 203.0.113.6 192.0.2.1 40000 25\r")
    time.sleep(0.05)  # separate segments (not synchronisation)
    s.sendall(b"\nEHLO pipelined.test\r\nMAIL FROM:<a@remote.test>\r\n"
              b"RCPT TO:<alice@localhost>\r\nDATA\r\n")
    c = Client.__new__(Client)
    c.sock, c.buf = s, b""
    assert c.reply()[0] == 220
    code, lines = c.reply()
    assert code == 250 and "[203.0.113.6]" in lines[0]
    assert [c.reply()[0] for _ in range(3)] == [250, 250, 354]
    c.send(b"Subject: x\r\n\r\ny\r\n.\r\nQUIT\r\n")
    assert c.replies(2) == [250, 221]
    (msg,) = srv.wait_messages("alice", 1)
    assert b"([203.0.113.6])" in msg


def test_trickled_v1_header_does_not_extend_the_header_timer(make_server: Any) -> None:
    """Bytes that trickle in (never a CRLF) do not reset the header timer: the connection is
    closed, without a greeting, about HEADER_TIMEOUT after it was opened."""
    srv = _server(make_server)
    s = _connect(srv.port)
    start = time.monotonic()
    partial = b"PROXY TCP4 203.0.113.7 192.0.2.1 4000"
    closed_after = None
    s.settimeout(0.25)
    for byte in partial:  # bounded: 37 bytes, 0.25 s each at most
        try:
            s.sendall(bytes([byte]))
            if s.recv(4096) == b"":
                closed_after = time.monotonic() - start
                break
        except TimeoutError:
            continue
        except (ConnectionResetError, BrokenPipeError):
            closed_after = time.monotonic() - start
            break
    else:
        s.settimeout(HEADER_TIMEOUT + 8)
        try:
            assert s.recv(4096) == b""
        except ConnectionResetError:
            pass
        closed_after = time.monotonic() - start
    s.close()
    assert closed_after is not None
    assert HEADER_TIMEOUT * 0.8 <= closed_after < HEADER_TIMEOUT + 5, closed_after


# == v2 ======================================================================================


def test_v2_signature_and_header_split_byte_by_byte(make_server: Any) -> None:
    srv = _server(make_server)
    s = _connect(srv.port)
    for byte in v2("198.51.100.20", 4444):  # bounded: 28 bytes
        s.sendall(bytes([byte]))
        time.sleep(0.002)  # force separate segments (not synchronisation)
    c = Client.__new__(Client)
    c.sock, c.buf = s, b""
    _served_as(srv, c, "198.51.100.20")


@pytest.mark.parametrize("tlvs", [
    tlv(0x01, b"smtp") + tlv(0x02, b"mx.example.test") + tlv(0x04, b"") +
    tlv(0x05, b"\x01" * 32),                                  # ALPN, AUTHORITY, NOOP, UNIQUE_ID
    tlv(0x20, b"\x07" + b"\x00\x00\x00\x00" + tlv(0x21, b"TLSv1.3")),  # PP2_TYPE_SSL
    tlv(0x03, b"\x00\x00\x00\x00"),                           # CRC32C (not verified)
    tlv(0xEE, b"vendor"),                                     # custom / AWS-style type
    b"\x01\xff\xff",                                          # malformed: claims 65535 bytes
    b"\x02",                                                  # malformed: a lone type byte
    b"\x00" * 400,                                            # padding up to the limit
], ids=["standard", "ssl", "crc32c", "custom", "overlong-tlv", "lone-byte", "padding"])
def test_v2_tlvs_are_skipped(make_server: Any, failures: list[Any], tlvs: bytes) -> None:
    srv = _server(make_server)
    c = Client(srv.port)
    c.send(v2("198.51.100.21", 5555, tlvs=tlvs))
    _served_as(srv, c, "198.51.100.21")
    _no_tracebacks(failures)


def test_v2_ipv6_header_with_tlvs_and_pipelined_session(make_server: Any) -> None:
    srv = _server(make_server)
    c = Client(srv.port)
    c.send(v2("2001:db8::21", 6000, tlvs=tlv(0x02, b"mx.test")) +
           b"EHLO pipelined.test\r\nMAIL FROM:<a@remote.test>\r\nRCPT TO:<alice@localhost>\r\n"
           b"DATA\r\n")
    assert c.reply()[0] == 220
    code, lines = c.reply()
    assert code == 250 and "[2001:db8::21]" in lines[0]
    assert c.replies(3) == [250, 250, 354]
    c.send(b"Subject: v6\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    (msg,) = srv.wait_messages("alice", 1)
    assert b"[2001:db8::21]" in msg


def test_v2_ipv4_mapped_inet6_source_is_the_ipv4_client(make_server: Any) -> None:
    srv = _server(make_server)
    c = Client(srv.port)
    c.send(v2("::ffff:198.51.100.22", 7000))
    _served_as(srv, c, "198.51.100.22")


def test_v2_payload_at_the_512_byte_limit_is_accepted(make_server: Any) -> None:
    srv = _server(make_server)
    c = Client(srv.port)
    header = v2("198.51.100.23", 7001, tlvs=tlv(0x04, b"\x00" * (512 - 12 - 3)))
    assert len(header) == 16 + 512
    c.send(header)
    _served_as(srv, c, "198.51.100.23")


@pytest.mark.parametrize("data", [
    V2_SIG + b"\x21\x11\x02\x01",                      # 513: over the limit, nothing more sent
    V2_SIG + b"\x21\x11\xff\xff" + b"\x00" * 1000,     # 65535, a little of it sent
    V2_SIG + b"\x31\x11\x00\x0c" + b"\x00" * 12,       # version 3
    V2_SIG + b"\x01\x11\x00\x0c" + b"\x00" * 12,       # version 0
    V2_SIG + b"\x22\x11\x00\x0c" + b"\x00" * 12,       # command 2 (unassigned)
    V2_SIG + b"\x2f\x11\x00\x0c" + b"\x00" * 12,       # command 15 (unassigned)
    v2("2001:db8::9", fam=0x22),                        # UDP over IPv6
    V2_SIG + b"\x21\x32\x00\xd8" + b"\x00" * 216,      # AF_UNIX datagram
    V2_SIG + b"\x21\x01\x00\x00",                      # UNSPEC family, stream
    V2_SIG + b"\x21\x41\x00\x0c" + b"\x00" * 12,       # family 4 (unassigned)
    V2_SIG + b"\x21\x21\x00\x0c" + b"\x00" * 12,       # AF_INET6 with an IPv4-sized block
    v2("198.51.100.9", fam=0x21),                       # AF_INET6 claimed, 12-byte block
    b"\r\n\r\n\x00\r\nQUIX\n" + b"\x21\x11\x00\x0c" + b"\x00" * 12,  # bad signature
], ids=["len-513", "len-65535", "ver3", "ver0", "cmd2", "cmd15", "udp6", "unix-dgram",
        "unspec-stream", "fam4", "inet6-short", "inet6-12", "bad-signature"])
def test_malformed_v2_headers_are_refused_at_once(make_server: Any, failures: list[Any],
                                                  data: bytes) -> None:
    srv = _server(make_server)
    _refused_at_once(srv.port, data)
    _no_tracebacks(failures)
    c = Client(srv.port)
    c.send(v2("198.51.100.24", 7002))
    _served_as(srv, c, "198.51.100.24")


@pytest.mark.parametrize("data", [
    V2_SIG[:5],                                                 # half a signature
    V2_SIG + b"\x21\x11",                                       # no length yet
    V2_SIG + b"\x21\x11\x00\x40" + b"\x00" * 20,                # 64 announced, 20 sent
    v2("198.51.100.25", tlvs=b"\x00" * 100)[:-1],               # one byte short
    b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25",               # v1 without its CRLF
    b"PROXY TCP4 203.0.113.7 192.0.2.1 40000 25\n",             # v1 with a bare LF
], ids=["half-sig", "no-length", "short-payload", "one-short", "v1-no-crlf", "v1-bare-lf"])
def test_incomplete_header_waits_then_the_header_timer_closes_it(make_server: Any,
                                                                 data: bytes) -> None:
    """A length larger than what was sent (or a line without its end) is waited for, bounded
    by the header timer: no greeting, closed about HEADER_TIMEOUT later."""
    srv = _server(make_server)
    got, elapsed = _outcome(srv.port, data)
    assert got == b""
    assert HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 5, elapsed


def test_idle_balancer_connection_is_closed_by_the_header_timer(make_server: Any) -> None:
    srv = _server(make_server)
    got, elapsed = _outcome(srv.port, b"")
    assert got == b"" and HEADER_TIMEOUT * 0.8 <= elapsed < HEADER_TIMEOUT + 5, elapsed
    wrappers = srv.service.ports[0].factory.protocols
    wait_until(lambda: not wrappers, timeout=10, message="the proxy wrapper to be released")


def test_header_timer_stops_once_the_header_is_complete(make_server: Any) -> None:
    srv = _server(make_server)
    c = Client(srv.port)
    c.send(v2("198.51.100.26", 7003))
    assert c.reply()[0] == 220
    # Past the header timeout, the session (idle timeout 300 s) is still open.
    assert not c.closed(timeout=HEADER_TIMEOUT + 1)
    assert c.cmd("NOOP")[0] == 250
    assert "[198.51.100.26]" in c.cmd("EHLO x.test")[1][0]


# == who may send a header ===================================================================


def test_trusted_balancer_without_a_header_gets_no_greeting(make_server: Any) -> None:
    """Plain SMTP from a trusted source on a PROXY listener: refused without a reply (like
    Postfix, no SMTP conversation happens before the header)."""
    srv = _server(make_server)
    _refused_at_once(srv.port, b"EHLO plain.test\r\n")
    _refused_at_once(srv.port, b"QUIT\r\n")


@pytest.mark.parametrize("data", [GOOD_V1, v2("198.51.100.27"), b"EHLO plain.test\r\n", b""],
                         ids=["v1", "v2", "plain", "silent"])
def test_source_outside_the_default_trusted_cidrs_is_refused(make_server: Any,
                                                             data: bytes) -> None:
    """Default trustedCidrs are 127.0.0.1/32 and ::1/128: 127.0.0.2 (loopback, but not
    listed) is refused whatever it sends, and its header is not believed."""
    srv = _server(make_server)
    _refused_at_once(srv.port, data, source="127.0.0.2")
    assert srv.service.factories[0].sessions == set()


def _dual_stack_ok() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _dual_stack_ok(), reason="no IPv6 loopback")
def test_dual_stack_listener_trusts_ipv4_balancer_seen_as_mapped_address(
        make_server: Any) -> None:
    """On a listener bound to ``::`` an IPv4 balancer is seen as ::ffff:127.0.0.1; it is the
    trusted 127.0.0.1, ::1 is trusted too, ::ffff:127.0.0.2 is not."""
    srv = _server(make_server, bind="::")
    for host, client_ip in (("127.0.0.1", "203.0.113.31"), ("::1", "203.0.113.32")):
        c = Client(srv.port, host=host)
        c.send(f"PROXY TCP4 {client_ip} 192.0.2.1 40000 25\r\n".encode())
        assert c.reply()[0] == 220
        assert f"[{client_ip}]" in c.cmd("EHLO x.test")[1][0]
        c.close()
    _refused_at_once(srv.port, GOOD_V1, source="127.0.0.2")


# == implicit TLS behind PROXY ===============================================================


class _BioSock:
    """A TLS client over a raw socket through memory BIOs, so that the ClientHello can be sent
    in the same segment as the PROXY header."""

    def __init__(self, raw: socket.socket, ca: Any, prefix: bytes) -> None:
        self.raw = raw
        self.inc, self.out = ssl.MemoryBIO(), ssl.MemoryBIO()
        ctx = ssl.create_default_context(cafile=str(ca))
        self.obj = ctx.wrap_bio(self.inc, self.out, server_hostname="localhost")
        try:
            self.obj.do_handshake()
        except ssl.SSLWantReadError:
            pass
        raw.sendall(prefix + self.out.read())  # header + ClientHello: one write
        for _ in range(50):  # bounded handshake pump
            try:
                self.obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                self._flush()
                chunk = raw.recv(65536)
                if not chunk:
                    raise ConnectionError("closed during the TLS handshake") from None
                self.inc.write(chunk)
        else:
            raise AssertionError("TLS handshake did not finish")
        self._flush()

    def _flush(self) -> None:
        pending = self.out.read()
        if pending:
            self.raw.sendall(pending)

    def sendall(self, data: bytes) -> None:
        self.obj.write(data)
        self._flush()

    def recv(self, n: int) -> bytes:
        for _ in range(1000):
            try:
                return self.obj.read(n)
            except ssl.SSLWantReadError:
                self._flush()
                chunk = self.raw.recv(65536)
                if not chunk:
                    return b""
                self.inc.write(chunk)
            except ssl.SSLZeroReturnError:
                return b""
        raise AssertionError("no TLS record")

    def settimeout(self, t: float) -> None:
        self.raw.settimeout(t)

    def close(self) -> None:
        self.raw.close()


@pytest.mark.parametrize("header", [b"PROXY TCP4 203.0.113.41 192.0.2.1 1000 465\r\n",
                                    v2("198.51.100.41", 1000)], ids=["v1", "v2"])
def test_implicit_tls_header_and_client_hello_in_one_segment(make_server: Any, certs: Any,
                                                             header: bytes) -> None:
    srv = _server(make_server, implicitTls=True)
    client_ip = "203.0.113.41" if header.startswith(b"PROXY") else "198.51.100.41"
    c = Client.__new__(Client)
    c.sock, c.buf = _BioSock(_connect(srv.port), certs.ca_cert, header), b""
    _served_as(srv, c, client_ip)
    (msg,) = srv.wait_messages("alice", 1)
    assert b"with ESMTPS" in msg and b"(using TLSv1." in msg  # the real TLS details


def test_implicit_tls_listener_refuses_tls_without_the_header(make_server: Any,
                                                              certs: Any) -> None:
    srv = _server(make_server, implicitTls=True)
    with pytest.raises((ConnectionError, ssl.SSLError, OSError)):
        _BioSock(_connect(srv.port), certs.ca_cert, b"")
    assert srv.service.factories[0].sessions == set()


def test_starttls_behind_proxy_records_the_tls_details(make_server: Any, certs: Any) -> None:
    srv = _server(make_server)
    c = Client(srv.port)
    c.send(b"PROXY TCP4 203.0.113.42 192.0.2.1 1000 25\r\n")
    assert c.reply()[0] == 220
    assert c.cmd("EHLO x.test")[0] == 250
    assert c.cmd("STARTTLS")[0] == 220
    c.starttls(certs.ca_cert)
    code, lines = c.cmd("EHLO x.test")
    assert code == 250 and "[203.0.113.42]" in lines[0]
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: s\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    (msg,) = srv.wait_messages("alice", 1)
    assert b"([203.0.113.42])" in msg and b"(using TLSv1." in msg


# == the proxied address elsewhere ===========================================================


def test_logs_name_the_proxied_client_and_refusals_name_the_balancer(make_server: Any) -> None:
    from twisted.logger import globalLogPublisher

    events: list[dict[str, Any]] = []
    globalLogPublisher.addObserver(events.append)  # type: ignore[arg-type]
    try:
        srv = _server(make_server)
        c = Client(srv.port)
        c.send(b"PROXY TCP4 203.0.113.51 192.0.2.1 1000 25\r\n")
        _served_as(srv, c, "203.0.113.51")
        assert c.cmd("QUIT")[0] == 221
        c.close()
        _refused_at_once(srv.port, b"PROXY TCP4 203.0.113.52 192.0.2.1 x 25\r\n")
        wait_until(lambda: any(e.get("event") == "proxy_bad_header" for e in list(events)),
                   timeout=10, message="the bad-header log line")
        wait_until(lambda: any("disconnect from" in str(e.get("log_format"))
                               for e in list(events)), timeout=10, message="the disconnect log")
    finally:
        globalLogPublisher.removeObserver(events.append)  # type: ignore[arg-type]
    peers = {e["peer"] for e in events if "peer" in e and "session" in e}
    assert peers == {"203.0.113.51"}, peers  # every session line: the real client
    bad = [e for e in events if e.get("event") == "proxy_bad_header"]
    assert bad and all(e["balancer"] == "127.0.0.1" for e in bad)
    assert not any("203.0.113.52" in str(e.get("peer", "")) for e in events)


def test_pregreet_check_does_not_count_the_header_as_talking_first(make_server: Any) -> None:
    """With the pre-greeting test on, the PROXY header (the balancer's, not the client's) is
    not 'talking before the greeting'; SMTP pipelined behind it is."""
    srv = _server(make_server, pregreetCheck=True, pregreetDelayMs=300)
    c = Client(srv.port)
    c.send(b"PROXY TCP4 203.0.113.61 192.0.2.1 1000 25\r\n")
    assert c.reply()[0] == 220
    assert "[203.0.113.61]" in c.cmd("EHLO x.test")[1][0]
    c.close()
    early = Client(srv.port)
    early.send(b"PROXY TCP4 203.0.113.62 192.0.2.1 1000 25\r\nEHLO early.test\r\n")
    code, lines = early.reply()
    assert (code, lines[0][:5]) == (554, "5.5.1"), lines


def test_header_completed_during_shutdown_is_not_greeted(make_server: Any) -> None:
    """A connection still in its header when the server drains gets 421 (or is closed) once
    the header arrives, never a 220 session on a stopping server."""
    from helpers import on_reactor

    srv = _server(make_server)
    s = _connect(srv.port)
    s.sendall(b"PROXY TCP4 203.0.113.71 192.0.2.1 1000 25")
    factory = srv.service.ports[0].factory
    wait_until(lambda: factory.protocols, timeout=10, message="the pending connection")
    on_reactor(srv.service.stopService, timeout=30)
    got = b""
    try:
        s.sendall(b"\r\n")
        s.settimeout(HEADER_TIMEOUT + 8)
        while True:
            chunk = s.recv(4096)
            if not chunk:
                break
            got += chunk
    except (ConnectionResetError, BrokenPipeError):
        pass
    s.close()
    assert not got.startswith(b"220"), got
    assert got == b"" or got.startswith(b"421"), got


# == not-proxied headers: LOCAL (v2) and UNKNOWN (v1) ==========================================

@pytest.mark.parametrize("header", [
    V2_SIG + b"\x20\x00\x00\x00",                 # LOCAL, UNSPEC, no address block
    v2("198.51.100.99", ver_cmd=0x20),               # LOCAL with an address block to ignore
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN 203.0.113.99 192.0.2.1 1000 25\r\n",
], ids=["v2-local", "v2-local-with-addresses", "v1-unknown", "v1-unknown-with-addresses"])
def test_not_proxied_header_is_served_as_the_balancer(make_server: Any, header: bytes) -> None:
    srv = _server(make_server)
    c = Client(srv.port)
    c.send(header)
    _served_as(srv, c, "127.0.0.1")  # the real peer, never the addresses in the header
