"""Client-address matching against CIDR lists (trusted balancers, rate-limit exemptions,
relay allow-lists): one implementation, IPv4-mapped IPv6 addresses treated as IPv4."""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address


def parse_ip(text: str) -> IPAddress | None:
    """``192.0.2.1``, ``[::1]``, ``fe80::1%eth0`` or ``::ffff:192.0.2.1`` (→ IPv4); None if
    not an address."""
    try:
        ip = ipaddress.ip_address(text.strip("[]").split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def client_key(ip_text: str, ipv6_prefix: int = 128) -> str:
    """The name a client is counted under by the per-IP limits: an IPv4 address as it is, an
    IPv6 address as its /``ipv6_prefix`` network (``2001:db8::/84``), since one IPv6 customer
    holds a whole /64 or more and would otherwise get a fresh budget per address (Postfix's
    ``smtpd_client_ipv6_prefix_length``)."""
    if ":" not in ip_text or ipv6_prefix >= 128:
        return ip_text
    ip = parse_ip(ip_text)
    if not isinstance(ip, ipaddress.IPv6Address):
        return ip_text
    net = ipaddress.IPv6Network((int(ip) >> (128 - ipv6_prefix) << (128 - ipv6_prefix),
                                 ipv6_prefix))
    return str(net)


class CidrSet:
    """A set of networks; ``contains(ip_text)`` is False for anything that is not an address."""

    CACHE_SIZE = 4096  # recent client addresses: the same peers ask again and again

    def __init__(self, cidrs: Iterable[str]) -> None:
        self.networks = [ipaddress.ip_network(c, strict=False) for c in cidrs]
        self._answers: dict[str, bool] = {}

    def __bool__(self) -> bool:
        return bool(self.networks)

    def contains(self, ip_text: str) -> bool:
        # Parsing an address costs ~15 us; a connection asks several sets several times.
        answer = self._answers.get(ip_text)
        if answer is None:
            ip = parse_ip(ip_text)
            answer = ip is not None and any(ip in n for n in self.networks)
            if len(self._answers) >= self.CACHE_SIZE:
                self._answers.clear()
            self._answers[ip_text] = answer
        return answer
