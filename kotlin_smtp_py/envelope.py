"""Addresses, envelopes and queue ids: the small immutable values that cross module boundaries.

Address grammar follows RFC 5321 §4.1.2 (Dot-string / Quoted-string local parts, domains and
address literals), extended by RFC 6531 (UTF-8 in local parts and U-label domains) when the
transaction carries SMTPUTF8. Source routes (``@a,@b:user@dom``) are accepted and discarded, as
RFC 5321 §4.1.1.3 asks; the remaining mailbox is what routing and relay policy see.
"""

from __future__ import annotations

import functools
import os
import random
import re
import time
from dataclasses import dataclass, field, replace
from typing import Any

import idna


class AddressError(ValueError):
    """An address that is not valid RFC 5321 (or RFC 6531) syntax."""

    def __init__(self, message: str, needs_utf8: bool = False) -> None:
        super().__init__(message)
        self.needs_utf8 = needs_utf8


_ATEXT = r"A-Za-z0-9!#$%&'*+\-/=?^_`{|}~"
_ATOM_ASCII = re.compile(rf"[{_ATEXT}]+\Z")
_ATOM_UTF8 = re.compile(rf"[{_ATEXT}\u0080-\U0010FFFF]+\Z")
_QUOTED = re.compile(r'"((?:[\x20\x21\x23-\x5b\x5d-\x7e\u0080-\U0010FFFF]|\\[\x20-\x7e])*)"\Z')
_LDH_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\Z")
_SOURCE_ROUTE = re.compile(r"@[^:,]+(?:,@[^:,]+)*:")
MAX_LOCAL_PART = 64
MAX_DOMAIN = 255
MAX_PATH = 256


@dataclass(frozen=True)
class Address:
    """A mailbox: ``local`` part (unquoted form) and ``domain`` (ASCII/A-label, lower case).

    ``literal`` is True for address literals like ``[192.0.2.1]``.
    """

    local: str
    domain: str
    literal: bool = False

    def __str__(self) -> str:
        return self._text

    @functools.cached_property
    def _text(self) -> str:
        # Cached (an address is rendered for the reply, the log line, the envelope, the
        # Maildir prefix ...: seven times per message); not a field, so eq/hash ignore it.
        local = self.local
        if not _ATOM_UTF8.match(local.replace(".", "a")) or local.startswith(".") \
                or local.endswith(".") or ".." in local:
            local = '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'
        return f"{local}@{self.domain}"

    @property
    def is_ascii(self) -> bool:
        return str(self).isascii()


def canonical_domain(domain: str) -> str:
    """A configured or routed domain as recipients' domains are compared: lower case, no
    trailing dot, A-labels ("bücher.test" → "xn--bcher-kva.test"); a name IDNA refuses is
    returned as it is (config validation names it)."""
    domain = domain.strip().lower().rstrip(".")
    if domain.isascii():
        return domain
    try:
        return str(idna.encode(domain, uts46=True).decode("ascii")).lower()
    except idna.IDNAError:
        return domain


def _check_domain(domain: str, utf8: bool) -> str:
    if not domain:
        raise AddressError("empty domain")
    if domain.endswith("."):
        raise AddressError("domain must not end with a dot")
    if domain.isascii():
        labels = domain.split(".")
        if not all(_LDH_LABEL.match(label) for label in labels):
            raise AddressError("invalid domain")
        ascii_domain = domain.lower()
    else:
        if not utf8:
            raise AddressError("non-ASCII domain requires SMTPUTF8", needs_utf8=True)
        try:
            ascii_domain = idna.encode(domain, uts46=True).decode("ascii").lower()
        except idna.IDNAError as exc:
            raise AddressError(f"invalid internationalised domain: {exc}") from None
        # UTS 46 maps "。" and "．" to "." after the raw check above: "localhost。" would
        # become "localhost." here, and no later stage agrees on what that is.
        if ascii_domain.endswith(".") or ".." in ascii_domain or ascii_domain.startswith("."):
            raise AddressError("invalid internationalised domain")
    if len(ascii_domain) > MAX_DOMAIN:
        raise AddressError("domain too long")
    return ascii_domain


def _parse_literal(text: str) -> str:
    import ipaddress

    inner = text[1:-1]
    if "%" in inner:  # RFC 5321 §4.1.3 has no zone ids (ipaddress accepts "fe80::1%eth0")
        raise AddressError("invalid address literal")
    try:
        if inner.lower().startswith("ipv6:"):
            ipaddress.IPv6Address(inner[5:])
        else:
            ipaddress.IPv4Address(inner)
    except ValueError:
        raise AddressError("invalid address literal") from None
    return text.lower()


def _parse_local(local: str, utf8: bool) -> str:
    if not local:
        raise AddressError("empty local part")
    if local.startswith('"'):
        m = _QUOTED.match(local)
        if not m:
            raise AddressError("invalid quoted local part")
        value = re.sub(r"\\(.)", r"\1", m.group(1))
    else:
        atom = _ATOM_UTF8 if utf8 else _ATOM_ASCII
        parts = local.split(".")
        if not all(atom.match(p) for p in parts):
            if not utf8 and not local.isascii() and all(_ATOM_UTF8.match(p) for p in parts):
                raise AddressError("non-ASCII local part requires SMTPUTF8", needs_utf8=True)
            raise AddressError("invalid local part")
        value = local
    if not value.isascii() and not utf8:
        raise AddressError("non-ASCII local part requires SMTPUTF8", needs_utf8=True)
    if len(value.encode("utf-8")) > MAX_LOCAL_PART:
        raise AddressError("local part too long")
    return value


def parse_mailbox(text: str, utf8: bool = False) -> Address:
    """Parse ``local@domain`` (no angle brackets)."""
    return _parse_mailbox(text, utf8)


@functools.lru_cache(maxsize=4096)  # pure; the same recipients come back all day
def _parse_mailbox(text: str, utf8: bool) -> Address:
    at = text.rfind("@")
    if at <= 0:
        raise AddressError("address must be local@domain")
    local, domain = text[:at], text[at + 1:]
    value = _parse_local(local, utf8)
    if domain.startswith("["):
        if not domain.endswith("]"):
            raise AddressError("invalid address literal")
        return Address(value, _parse_literal(domain), literal=True)
    return Address(value, _check_domain(domain, utf8))


def parse_path(text: str, utf8: bool = False, allow_null: bool = False) -> Address | None:
    """Parse a reverse- or forward-path ``<...>``; returns None for ``<>`` when allowed."""
    text = text.strip()
    if not (text.startswith("<") and text.endswith(">")):
        raise AddressError("address must be enclosed in <>")
    inner = text[1:-1]
    if len(inner) > MAX_PATH:
        raise AddressError("path too long")
    if inner == "":
        if allow_null:
            return None
        raise AddressError("null path not allowed here")
    if inner.startswith("@"):
        m = _SOURCE_ROUTE.match(inner)
        if not m:
            raise AddressError("invalid source route")
        inner = inner[m.end():]
    return parse_mailbox(inner, utf8)


@dataclass(frozen=True)
class Recipient:
    """An envelope recipient with its RFC 3461 parameters."""

    address: str
    notify: tuple[str, ...] = ()
    orcpt: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {"address": self.address, "notify": list(self.notify), "orcpt": self.orcpt}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Recipient:
        return cls(str(data["address"]), tuple(data.get("notify") or ()), data.get("orcpt"))


@dataclass(frozen=True)
class Envelope:
    """Everything the spool keeps about a message besides its bytes."""

    sender: str  # "" for the null reverse-path
    recipients: tuple[Recipient, ...]
    helo: str = ""
    peer: str = ""
    auth_user: str | None = None
    tls: bool = False
    smtputf8: bool = False
    body: str = "7BIT"
    ret: str | None = None  # FULL | HDRS
    envid: str | None = None
    size: int = 0
    received_at: float = field(default_factory=time.time)
    message_id: str | None = None
    is_dsn: bool = False
    archive_owner: str | None = None  # local user whose sent/ folder gets a copy
    requiretls: bool = False  # RFC 8689 MAIL FROM ... REQUIRETLS

    def with_recipients(self, recipients: tuple[Recipient, ...]) -> Envelope:
        return replace(self, recipients=recipients)

    def to_json(self) -> dict[str, Any]:
        return {
            "sender": self.sender, "recipients": [r.to_json() for r in self.recipients],
            "helo": self.helo, "peer": self.peer, "auth_user": self.auth_user, "tls": self.tls,
            "smtputf8": self.smtputf8, "body": self.body, "ret": self.ret, "envid": self.envid,
            "size": self.size, "received_at": self.received_at, "message_id": self.message_id,
            "is_dsn": self.is_dsn, "archive_owner": self.archive_owner,
            "requiretls": self.requiretls,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Envelope:
        return cls(
            sender=str(data["sender"]),
            recipients=tuple(Recipient.from_json(r) for r in data["recipients"]),
            helo=str(data.get("helo", "")), peer=str(data.get("peer", "")),
            auth_user=data.get("auth_user"), tls=bool(data.get("tls", False)),
            smtputf8=bool(data.get("smtputf8", False)), body=str(data.get("body", "7BIT")),
            ret=data.get("ret"), envid=data.get("envid"), size=int(data.get("size", 0)),
            received_at=float(data.get("received_at", 0.0)), message_id=data.get("message_id"),
            is_dsn=bool(data.get("is_dsn", False)), archive_owner=data.get("archive_owner"),
            requiretls=bool(data.get("requiretls", False)),
        )


_ID_ALPHABET = "0123456789BCDFGHJKLMNPQRSTVWXZbcdfghjklmnpqrstvwxz"
# Ids and tokens need uniqueness, not secrecy: a generator seeded once per process from the
# OS saves a getrandom(2) call (and a GIL hand-over) per id on the reactor thread.
_rng = random.Random(os.urandom(32))


def unique_hex(nbytes: int) -> str:
    """``nbytes`` random bytes as hex, for session ids, lease tokens and temp names (not for
    anything an attacker must not guess)."""
    return f"{_rng.getrandbits(8 * nbytes):0{2 * nbytes}x}"


def new_queue_id() -> str:
    """A unique, sortable, file-name-safe queue id: time in microseconds + 64 random bits."""
    n = time.time_ns() // 1000
    digits = []
    base = len(_ID_ALPHABET)
    while n:
        n, r = divmod(n, base)
        digits.append(_ID_ALPHABET[r])
    rnd = _rng.getrandbits(64)
    tail = []
    for _ in range(11):
        rnd, r = divmod(rnd, base)
        tail.append(_ID_ALPHABET[r])
    return "".join(reversed(digits)) + "".join(tail)


_QUEUE_ID = re.compile(r"[0-9A-Za-z]{8,40}\Z")


def is_queue_id(text: str) -> bool:
    """True when ``text`` can be a queue id (used to refuse path tricks in CLI arguments)."""
    return bool(_QUEUE_ID.match(text))
