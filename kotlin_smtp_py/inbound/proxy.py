"""PROXY protocol v1/v2 in front of the SMTP session, from trusted balancers only.

Unlike Twisted's ``haproxy`` wrapper, the SMTP protocol is only connected *after* the header is
parsed, so its greeting, logs, rate limits, relay CIDR checks and Received header all see the
real client. Connections from addresses outside ``smtp.proxy.trustedCidrs``, malformed headers
and silence past the header timeout are closed. ``PROXY UNKNOWN`` (v1) and the v2 ``LOCAL``
command say "not proxied" (a balancer's own health check, haproxy's ``check-send-proxy``): as
the PROXY protocol specification requires, the session then belongs to the balancer's own
address. A header split across several reads is reassembled (bounded: at most 16 + 512 bytes
are buffered).
"""

from __future__ import annotations

import ipaddress
import struct
from collections.abc import Sequence
from typing import Any

from twisted.internet import address
from twisted.internet.interfaces import IHandshakeListener
from twisted.logger import Logger
from twisted.protocols import policies
from zope.interface import directlyProvides, implementer, providedBy

from kotlin_smtp_py.netutil import CidrSet

log = Logger()

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_PREFIX = b"PROXY "
V1_MAX = 107
V2_MAX_PAYLOAD = 512
HEADER_TIMEOUT = 10.0


class ProxyHeaderError(ValueError):
    pass


def _ip(text: str, version: int) -> str:
    if "%" in text:  # an IPv6 zone id: arbitrary bytes that would become the client's address
        raise ProxyHeaderError(f"bad address {text!r}")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"bad address {text!r}") from None
    if ip.version != version:
        raise ProxyHeaderError("address family mismatch")
    return str(ip)


def _port(text: bytes) -> int:
    if not text.isdigit() or (len(text) > 1 and text.startswith(b"0")) or int(text) > 65535:
        raise ProxyHeaderError("bad port")
    return int(text)


Client = tuple[str, int] | None  # None: not proxied (UNKNOWN, LOCAL), the balancer itself


def parse_header(buf: bytes) -> tuple[Client, bytes] | None:
    """((client ip, client port) or None, rest) when complete; None when more bytes are
    needed."""
    if buf[:len(V2_SIGNATURE)] == V2_SIGNATURE[:len(buf)]:
        return _parse_v2(buf)
    if buf[:len(V1_PREFIX)] == V1_PREFIX[:len(buf)]:
        return _parse_v1(buf)
    raise ProxyHeaderError("not a PROXY protocol header")


def _parse_v1(buf: bytes) -> tuple[Client, bytes] | None:
    end = buf.find(b"\r\n")
    if end < 0:
        if len(buf) > V1_MAX:
            raise ProxyHeaderError("v1 header too long")
        return None
    line, rest = buf[:end], buf[end + 2:]
    if len(line) + 2 > V1_MAX:
        raise ProxyHeaderError("v1 header too long")
    parts = line.split(b" ")
    if len(parts) >= 2 and parts[1] == b"UNKNOWN":
        return None, rest  # the rest of the line is to be ignored (the specification, 2.1)
    if len(parts) != 6 or parts[1] not in (b"TCP4", b"TCP6"):
        raise ProxyHeaderError("malformed v1 header")
    version = 4 if parts[1] == b"TCP4" else 6
    src = _ip(parts[2].decode("ascii", "replace"), version)
    _ip(parts[3].decode("ascii", "replace"), version)
    sport = _port(parts[4])
    _port(parts[5])
    return (src, sport), rest


def _parse_v2(buf: bytes) -> tuple[Client, bytes] | None:
    if len(buf) < 16:
        return None
    ver_cmd, fam = buf[12], buf[13]
    (length,) = struct.unpack("!H", buf[14:16])
    if ver_cmd >> 4 != 2:
        raise ProxyHeaderError("unsupported v2 version")
    if length > V2_MAX_PAYLOAD:
        raise ProxyHeaderError("v2 header too long")
    if len(buf) < 16 + length:
        return None
    payload, rest = buf[16:16 + length], buf[16 + length:]
    if ver_cmd & 0x0F == 0:  # LOCAL: the address block, if any, is discarded
        return None, rest
    if ver_cmd & 0x0F != 1:
        raise ProxyHeaderError("unknown v2 command")
    if fam == 0x11 and length >= 12:
        src = str(ipaddress.IPv4Address(payload[0:4]))
        (sport,) = struct.unpack("!H", payload[8:10])
    elif fam == 0x21 and length >= 36:
        src = str(ipaddress.IPv6Address(payload[0:16]))
        (sport,) = struct.unpack("!H", payload[32:34])
    else:
        raise ProxyHeaderError("unsupported v2 address family")
    return (src, sport), rest


@implementer(IHandshakeListener)
class ProxyProtocolWrapper(policies.ProtocolWrapper):
    """Reads the PROXY header, then connects the wrapped SMTP protocol with the real peer."""

    factory: ProxyWrappingFactory
    transport: Any
    wrappedProtocol: Any

    def __init__(self, factory: Any, wrappedProtocol: Any) -> None:
        super().__init__(factory, wrappedProtocol)
        self._buf = b""
        self._peer: Any = None
        self._timer: Any = None

    def makeConnection(self, transport: Any) -> None:
        directlyProvides(self, providedBy(transport))
        self.connected = 1
        self.transport = transport
        self.connectionMade()

    def connectionMade(self) -> None:
        self.factory.registerProtocol(self)  # type: ignore[no-untyped-call]
        balancer = self.transport.getPeer()
        if not self.factory.trusted(getattr(balancer, "host", "")):
            log.warn("PROXY header refused: {balancer} is not in smtp.proxy.trustedCidrs",
                     balancer=getattr(balancer, "host", "?"), event="proxy_untrusted")
            self.transport.abortConnection()
            return
        self._timer = self.factory.clock.callLater(HEADER_TIMEOUT, self._timeout)

    def _timeout(self) -> None:
        log.info("PROXY header timeout", event="proxy_timeout")
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._peer is not None:
            self.wrappedProtocol.dataReceived(data)
            return
        self._buf += data
        try:
            parsed = parse_header(self._buf)
        except (ProxyHeaderError, ValueError) as exc:
            log.warn("bad PROXY header from {balancer}: {error}",
                     balancer=getattr(self.transport.getPeer(), "host", "?"), error=str(exc),
                     event="proxy_bad_header")
            self._cancel_timer()
            self.transport.abortConnection()
            return
        if parsed is None:
            return
        client, rest = parsed
        self._cancel_timer()
        self._buf = b""
        if client is None:  # not proxied: the balancer talks for itself
            self._peer = self.transport.getPeer()
            log.debug("PROXY header says not proxied; serving the balancer {balancer}",
                      balancer=getattr(self._peer, "host", "?"))
        else:
            ip, port = client
            self._peer = address.IPv6Address("TCP", ip, port) if ":" in ip else \
                address.IPv4Address("TCP", ip, port)
        self.wrappedProtocol.makeConnection(self)
        if rest and self.connected:
            self.wrappedProtocol.dataReceived(rest)

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()

    def getPeer(self) -> Any:
        return self._peer if self._peer is not None else self.transport.getPeer()

    def handshakeCompleted(self) -> None:
        if IHandshakeListener.providedBy(self.wrappedProtocol):
            self.wrappedProtocol.handshakeCompleted()

    def connectionLost(self, reason: Any = None) -> None:
        self._cancel_timer()
        self.factory.unregisterProtocol(self)  # type: ignore[no-untyped-call]
        if self._peer is not None:
            self.wrappedProtocol.connectionLost(reason)


class ProxyWrappingFactory(policies.WrappingFactory):
    protocol = ProxyProtocolWrapper
    noisy = False

    def __init__(self, wrappedFactory: Any, trusted_cidrs: Sequence[str],
                 clock: Any = None) -> None:
        from twisted.internet import reactor

        super().__init__(wrappedFactory)  # type: ignore[no-untyped-call]
        self._trusted = CidrSet(trusted_cidrs)
        self.clock: Any = clock if clock is not None else reactor

    def trusted(self, host: str) -> bool:
        return self._trusted.contains(host)
