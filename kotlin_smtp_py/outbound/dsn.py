"""Delivery status notifications (RFC 3464 / RFC 3461): whether to send one, and its bytes.

Invariants (loops are impossible by construction):

* Never a DSN for a message whose envelope sender is ``<>`` or that is itself a DSN.
* A DSN's own envelope is from ``<>`` with ``is_dsn=True`` and its recipient has NOTIFY=NEVER, so
  a DSN that fails can never produce another DSN.
* NOTIFY=NEVER suppresses everything; ``delivered`` needs NOTIFY=SUCCESS; ``failed`` needs
  FAILURE; ``delayed`` needs DELAY. Without NOTIFY we use FAILURE,DELAY — one of the two defaults
  RFC 3461 §4.1 permits (the scheduler decides *when* a delay notice is due — at a deferral once
  the message is ``smtp.spool.delayWarningSeconds`` old — and sends at most one per recipient,
  ``QueueEntry.delayed_notified``).
* The output is CRLF-terminated ASCII apart from the returned original (and non-ASCII addresses,
  which only occur in SMTPUTF8 mail): ``message/rfc822`` for RET=FULL or no RET,
  ``text/rfc822-headers`` for RET=HDRS.
"""

from __future__ import annotations

import email.utils
import os
import re
import time

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.status import DeliveryStatus

DEFAULT_NOTIFY = ("FAILURE", "DELAY")
ACTIONS = ("failed", "delayed", "delivered", "relayed", "expanded")
_NOTIFY_FOR = {"failed": "FAILURE", "delayed": "DELAY", "delivered": "SUCCESS",
               "relayed": "SUCCESS", "expanded": "SUCCESS"}
_UNSAFE = re.compile(r"[\r\n\t]+")


def should_send_dsn(envelope: Envelope, recipient: Recipient, action: str) -> bool:
    """True when ``recipient``'s outcome ``action`` must be reported to the sender."""
    if envelope.sender == "" or envelope.is_dsn:
        return False
    notify = tuple(n.upper() for n in recipient.notify) or DEFAULT_NOTIFY
    if "NEVER" in notify:
        return False
    return _NOTIFY_FOR.get(action, "") in notify


def dsn_envelope(entry: QueueEntry, reporting_mta: str = "") -> Envelope:
    """The envelope of a DSN about ``entry``: from ``<>`` to the original sender, NOTIFY=NEVER."""
    env = entry.envelope
    sender_utf8 = not env.sender.isascii()
    # A notice about an SMTPUTF8 message may return it as message/global (8-bit).
    seven = env.body.upper() == "7BIT" and not env.smtputf8
    return Envelope(
        sender="", recipients=(Recipient(env.sender, notify=("NEVER",)),),
        helo=reporting_mta, peer="", smtputf8=sender_utf8,
        body="7BIT" if seven else "8BITMIME", is_dsn=True)


def _clean(value: str, limit: int = 900) -> str:
    return _UNSAFE.sub(" ", value).strip()[:limit]


def _ascii(value: str) -> str:
    """Text from elsewhere (a remote server's reply) in a part that must be US-ASCII."""
    return value.encode("ascii", "replace").decode("ascii")


def _addr_xtext(address: str) -> str:
    """RFC 6533 §3 utf-8-addr-xtext: an address in message/delivery-status, US-ASCII only."""
    out = []
    for c in address:
        o = ord(c)
        out.append(c if 0x21 <= o <= 0x7E and c not in "+=\\" else f"\\x{{{o:X}}}")
    return "".join(out)


def _date(ts: float) -> str:
    return email.utils.formatdate(ts, localtime=False)


def _subject(action: str) -> str:
    return {"failed": "Undelivered Mail Returned to Sender",
            "delayed": "Delayed Mail (still being retried)",
            "delivered": "Successful Mail Delivery Report",
            "relayed": "Mail Relayed Report",
            "expanded": "Mail Delivered to a List"}.get(action, "Delivery Status Notification")


def _human(entry: QueueEntry, results: list[tuple[Recipient, DeliveryStatus]], action: str,
           reporting_mta: str) -> str:
    intro = {
        "failed": "Your message could not be delivered to one or more recipients.\n"
                  "It has been returned below. Delivery will not be retried.",
        "delayed": "Your message has not been delivered yet to one or more recipients.\n"
                   "Delivery is still being retried; you do not need to resend it.",
        "delivered": "Your message was delivered to the recipients listed below.",
        "relayed": "Your message was relayed to a system that does not send delivery reports.",
        "expanded": "Your message was delivered to the mailing lists listed below; their\n"
                    "members' deliveries are not reported to you.",
    }.get(action, "Delivery status of your message.")
    lines = [f"This is the mail system at {reporting_mta}.", "", *intro.split("\n"), ""]
    for rcpt, status in results:
        detail = status.diagnostic or f"{status.code} {status.enhanced} {status.text}"
        lines.append(f"<{rcpt.address}>: {_ascii(_clean(detail, 500))}")
    lines += ["", f"Queue id: {entry.queue_id}"]
    return "\r\n".join(lines) + "\r\n"


def _status_fields(entry: QueueEntry, results: list[tuple[Recipient, DeliveryStatus]],
                   action: str, reporting_mta: str, now: float) -> str:
    env = entry.envelope
    blocks = [[f"Reporting-MTA: dns; {reporting_mta}"]]
    if env.envid:
        blocks[0].append(f"Original-Envelope-Id: {_clean(env.envid, 100)}")
    blocks[0].append(f"Arrival-Date: {_date(env.received_at or entry.created)}")
    for rcpt, status in results:
        block = []
        if rcpt.orcpt:
            kind, _, addr = rcpt.orcpt.partition(";")
            addr = _clean(addr, 500)
            kind = _ascii(_clean(kind, 40)) or "rfc822"
            if not addr.isascii():
                kind, addr = "utf-8", _addr_xtext(addr)
            block.append(f"Original-Recipient: {kind};{addr}")
        if rcpt.address.isascii():
            block.append(f"Final-Recipient: rfc822; {rcpt.address}")
        else:
            block.append(f"Final-Recipient: utf-8; {_addr_xtext(rcpt.address)}")
        block.append(f"Action: {action}")
        block.append(f"Status: {status.enhanced}")
        if status.remote_mta:
            block.append(f"Remote-MTA: dns; {_clean(status.remote_mta, 255)}")
        if status.diagnostic:
            diag = status.diagnostic if ";" in status.diagnostic else f"smtp; {status.diagnostic}"
            block.append(f"Diagnostic-Code: {_ascii(_clean(diag))}")
        block.append(f"Last-Attempt-Date: {_date(now)}")
        blocks.append(block)
    return "\r\n\r\n".join("\r\n".join(b) for b in blocks) + "\r\n"


def _headers_only(original: bytes) -> bytes:
    for sep in (b"\r\n\r\n", b"\n\n"):
        end = original.find(sep)
        if end >= 0:
            return original[:end + len(sep)]
    return original


def build_dsn(entry: QueueEntry, results: list[tuple[Recipient, DeliveryStatus]], action: str,
              reporting_mta: str, original: bytes, now: float | None = None,
              headers_only: bool = False) -> bytes:
    """An RFC 3464 ``multipart/report; report-type=delivery-status`` message.
    ``headers_only``: return only the original's header (as RET=HDRS does), e.g. when the
    whole message would not fit the spool."""
    if action not in ACTIONS:
        raise ValueError(f"unknown DSN action {action!r}")
    now = time.time() if now is None else now
    env = entry.envelope
    boundary = f"=_dsn_{os.urandom(12).hex()}"
    while boundary.encode() in original:
        boundary = f"=_dsn_{os.urandom(12).hex()}"
    hdrs_only = headers_only or (env.ret or "").upper() == "HDRS"
    returned = _headers_only(original) if hdrs_only else original
    if not returned.endswith(b"\r\n"):
        returned += b"\r\n"
    eight_bit = not returned.isascii()
    if env.smtputf8 and eight_bit:  # RFC 6533 §6, RFC 6532 §3.7: UTF-8 header fields
        ctype = "message/global-headers" if hdrs_only else "message/global"
    else:
        ctype = "text/rfc822-headers" if hdrs_only else "message/rfc822"
    human = _human(entry, results, action, _clean(reporting_mta, 255))
    eight_bit = eight_bit or not human.isascii()  # a UTF-8 recipient address
    domain = _clean(reporting_mta, 255)
    head = [
        f"From: Mail Delivery System <MAILER-DAEMON@{domain}>",
        f"To: <{env.sender}>",
        f"Subject: {_subject(action)}",
        f"Date: {_date(now)}",
        f"Message-ID: <{entry.queue_id}.{int(now)}.{os.urandom(4).hex()}@{domain}>",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status;\r\n\tboundary="{boundary}"',
        "Content-Transfer-Encoding: " + ("8bit" if eight_bit else "7bit"),
        "",
        "This is a MIME-encapsulated message.",
        "",
        f"--{boundary}",
        "Content-Description: Notification",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        human,
        f"--{boundary}",
        "Content-Description: Delivery report",
        "Content-Type: message/delivery-status",
        "",
        _status_fields(entry, results, action, domain, now),
        f"--{boundary}",
        "Content-Description: " + ("Undelivered message headers" if hdrs_only
                                   else "Undelivered message"),
        f"Content-Type: {ctype}",
        "Content-Transfer-Encoding: " + ("8bit" if eight_bit else "7bit"),
        "",
        "",
    ]
    text = "\r\n".join(head)
    return text.encode("utf-8") + returned + f"\r\n--{boundary}--\r\n".encode()
