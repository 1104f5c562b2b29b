"""SMTP replies and delivery outcomes as small immutable values.

An outcome is an RFC 3463 enhanced status plus a failure *kind* and *reason*, never a bare boolean:
the spooler retries ``transient`` outcomes, bounces ``permanent`` ones, and metrics/logs label
both with the reason class.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


def one_line(text: str) -> str:
    """``text`` (a peer's or a plugin's) with control characters — CR, LF, ESC — as spaces:
    safe inside one reply line, one log field or one `queue list` line."""
    return "".join(c if c.isprintable() else " " for c in text)


@dataclass(frozen=True)
class SmtpReply:
    """One reply to an SMTP client: ``code`` ``enhanced`` ``text`` (text may hold several lines)."""

    code: int
    enhanced: str
    text: str

    def _prefix(self, last: bool) -> str:
        sep = " " if last else "-"
        return f"{self.code}{sep}{self.enhanced} " if self.enhanced else f"{self.code}{sep}"

    def lines(self) -> list[bytes]:
        parts = self.text.split("\n") if self.text else [""]
        return [(self._prefix(i == len(parts) - 1) + part).encode("utf-8", "replace")
                for i, part in enumerate(parts)]

    def encode(self) -> bytes:
        if "\n" in self.text:
            return b"".join(line + b"\r\n" for line in self.lines())
        # One line, the common case: one format and one encode (seven replies per message).
        return (self._prefix(True) + self.text + "\r\n").encode("utf-8", "replace")

    @property
    def transient(self) -> bool:
        return 400 <= self.code < 500


class FailureKind(str, enum.Enum):
    TRANSIENT = "transient"
    PERMANENT = "permanent"


class Reason(str, enum.Enum):
    """Failure reason classes (SPEC §4); used as metric labels, so the set is closed."""

    DNS = "dns"
    CONNECT = "connect"
    TLS = "tls"
    AUTH = "auth"
    POLICY = "policy"
    RECIPIENT = "recipient"
    MESSAGE = "message"
    PROTOCOL = "protocol"
    TIMEOUT = "timeout"
    OTHER = "other"


@dataclass(frozen=True)
class DeliveryStatus:
    """Outcome of delivering to one recipient.

    ``kind`` is None for success. ``remote_mta`` and ``diagnostic`` feed the DSN fields
    Remote-MTA and Diagnostic-Code. ``success_action`` is what a success notice
    (NOTIFY=SUCCESS) reports (RFC 3461 §6.3): ``delivered`` (a mailbox here), ``expanded``
    (a mailing list here), ``relayed`` (handed to a server without DSN), or empty when the next
    hop took the DSN parameters and reports itself (§5.2.2: no notice from us).
    """

    code: int
    enhanced: str
    text: str
    kind: FailureKind | None = None
    reason: Reason = Reason.OTHER
    remote_mta: str | None = None
    diagnostic: str | None = None
    success_action: str = "delivered"

    @property
    def ok(self) -> bool:
        return self.kind is None

    @property
    def temporary(self) -> bool:
        return self.kind is FailureKind.TRANSIENT

    @property
    def permanent(self) -> bool:
        return self.kind is FailureKind.PERMANENT

    @classmethod
    def delivered(cls, text: str = "delivered", remote_mta: str | None = None) -> DeliveryStatus:
        return cls(250, "2.0.0", text, None, Reason.OTHER, remote_mta)

    @classmethod
    def transient(cls, reason: Reason, text: str, enhanced: str = "4.0.0", code: int = 451,
                  remote_mta: str | None = None, diagnostic: str | None = None) -> DeliveryStatus:
        return cls(code, enhanced, text, FailureKind.TRANSIENT, reason, remote_mta, diagnostic)

    @classmethod
    def permanent_failure(cls, reason: Reason, text: str, enhanced: str = "5.0.0", code: int = 550,
                          remote_mta: str | None = None,
                          diagnostic: str | None = None) -> DeliveryStatus:
        return cls(code, enhanced, text, FailureKind.PERMANENT, reason, remote_mta, diagnostic)

    @classmethod
    def from_reply(cls, code: int, text: str, reason: Reason, remote_mta: str | None = None,
                   enhanced: str | None = None) -> DeliveryStatus:
        """Classify a remote SMTP reply: 2xx ok, 4xx transient, anything else permanent."""
        diag = f"smtp; {code} {text}".strip()
        if 200 <= code < 300:
            return cls(code, enhanced or "2.0.0", text, None, Reason.OTHER, remote_mta, diag)
        if 400 <= code < 500:
            return cls(code, enhanced or "4.0.0", text, FailureKind.TRANSIENT, reason,
                       remote_mta, diag)
        return cls(code, enhanced or "5.0.0", text, FailureKind.PERMANENT, reason, remote_mta,
                   diag)
