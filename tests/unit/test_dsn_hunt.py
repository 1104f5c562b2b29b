"""RFC 3461/3464/6522/6533/5321 §6 hunt on our delivery status notifications.

Every notice is built with the production code (``build_dsn``/``dsn_envelope``, local list
expansion) and parsed back with ``email.policy.default``. Tests marked xfail(strict) show a
real violation; the rest cover what tests/outbound/test_outbound_dsn.py does not.
"""

from __future__ import annotations

import email
import email.policy
import re
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.local.delivery import LocalDelivery
from kotlin_smtp_py.local.directory import LocalDirectory
from kotlin_smtp_py.outbound.dsn import build_dsn, dsn_envelope, should_send_dsn
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.spool.scheduler import gave_up
from kotlin_smtp_py.status import DeliveryStatus, Reason

ORIGINAL = (b"From: alice@corp.test\r\nTo: bob@remote.test\r\nSubject: hello\r\n"
            b"Message-ID: <m1@corp.test>\r\n\r\nBody line 1\r\n")
UTF8_ORIGINAL = ("From: J\u00f6rg <j\u00f6rg@corp.test>\r\nTo: bob@remote.test\r\n"
                 "Subject: Gr\u00fc\u00dfe\r\nMessage-ID: <m2@corp.test>\r\n\r\n"
                 "Hall\u00f6\r\n").encode()
NOW = 1_700_000_100.0


def _entry(rcpts: tuple[Recipient, ...], *, sender: str = "alice@corp.test",
           smtputf8: bool = False, body: str = "7BIT", ret: str | None = None,
           envid: str | None = None) -> QueueEntry:
    env = Envelope(sender=sender, recipients=rcpts, smtputf8=smtputf8, body=body, ret=ret,
                   envid=envid, received_at=1_700_000_000.0)
    return QueueEntry("Q1ABCDEFGH", env, rcpts)


def _parse(raw: bytes) -> Any:
    return email.message_from_bytes(raw, policy=email.policy.default)


def _cte(raw: bytes) -> str:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("ascii")
    m = re.search(r"(?im)^Content-Transfer-Encoding:\s*(\S+)", head)
    return m.group(1).lower() if m else "7bit"


def _report_part(raw: bytes) -> bytes:
    """The raw bytes of the second (report) body part."""
    boundary = _parse(raw).get_boundary().encode()
    return raw.split(b"--" + boundary)[2]


# -- bugs ----------------------------------------------------------------------------------------

def test_non_ascii_diagnostic_is_not_sent_as_8bit_in_a_7bit_notice() -> None:
    rcpt = Recipient("bob@remote.test")
    entry = _entry((rcpt,))
    status = DeliveryStatus.from_reply(550, "5.1.1 Empf\u00e4nger unbekannt",
                                       Reason.RECIPIENT, "mx.remote.test", "5.1.1")
    raw = build_dsn(entry, [(rcpt, status)], "failed", "mta.corp.test", ORIGINAL, NOW)
    assert raw.isascii() or (_cte(raw) == "8bit"
                             and dsn_envelope(entry).body == "8BITMIME"), \
        "8-bit notice declared Content-Transfer-Encoding: 7bit / BODY=7BIT"
    assert _report_part(raw).isascii() or b"message/global-delivery-status" in raw


def test_utf8_recipient_needs_global_delivery_status() -> None:
    rcpt = Recipient("j\u00f6rg@remote.test", (), "utf-8;j\u00f6rg@remote.test")
    entry = _entry((rcpt,), smtputf8=True)
    status = DeliveryStatus.permanent_failure(Reason.RECIPIENT, "no such user", "5.1.1")
    raw = build_dsn(entry, [(rcpt, status)], "failed", "mta.corp.test", ORIGINAL, NOW)
    report = _parse(raw).get_payload()[1]
    assert report.get_content_type() == "message/global-delivery-status" \
        or _report_part(raw).isascii()


@pytest.mark.parametrize(("ret", "expected"), [("FULL", "message/global"),
                                               ("HDRS", "message/global-headers")])
def test_utf8_original_is_returned_as_message_global(ret: str, expected: str) -> None:
    rcpt = Recipient("bob@remote.test")
    entry = _entry((rcpt,), smtputf8=True, body="8BITMIME", ret=ret)
    status = DeliveryStatus.permanent_failure(Reason.RECIPIENT, "no such user", "5.1.1")
    raw = build_dsn(entry, [(rcpt, status)], "failed", "mta.corp.test", UTF8_ORIGINAL, NOW)
    assert _parse(raw).get_payload()[2].get_content_type() == expected


def _list_delivery(tmp_path: Path) -> tuple[LocalDelivery, list[Envelope]]:
    (tmp_path / "mailboxes" / "alice").mkdir(parents=True)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "team").write_text("alice@example.test\next@remote.test\n", encoding="utf-8")
    resubmitted: list[Envelope] = []

    def resubmit(env: Envelope, path: str) -> defer.Deferred[Any]:
        resubmitted.append(env)
        return defer.succeed(None)

    def inline(f: Any, *args: Any) -> defer.Deferred[Any]:
        return defer.maybeDeferred(f, *args)

    directory = LocalDirectory(str(tmp_path / "mailboxes"), str(lists))
    delivery = LocalDelivery(directory, lambda d: d == "example.test", resubmit, inline)
    return delivery, resubmitted


def _expand(tmp_path: Path, rcpt: Recipient, **env: Any) -> tuple[QueueEntry, Envelope]:
    delivery, resubmitted = _list_delivery(tmp_path)
    message = tmp_path / "msg.eml"
    message.write_bytes(ORIGINAL)
    entry = _entry((rcpt,), sender="carol@corp.test", **env)
    results: list[Any] = []
    delivery.deliver(entry, str(message), [rcpt]).addCallback(results.append)
    assert results and results[0][0][1].ok
    [expanded] = resubmitted
    return entry, expanded


def test_list_expansion_keeps_notify_never(tmp_path: Path) -> None:
    rcpt = Recipient("team@example.test", ("NEVER",))
    entry, expanded = _expand(tmp_path, rcpt)
    [member] = expanded.recipients
    assert expanded.sender != entry.envelope.sender \
        or not should_send_dsn(expanded, member, "failed")


def test_list_expansion_keeps_ret_and_envid(tmp_path: Path) -> None:
    rcpt = Recipient("team@example.test")
    entry, expanded = _expand(tmp_path, rcpt, ret="HDRS", envid="ENV-42")
    assert expanded.sender == entry.envelope.sender
    assert (expanded.ret, expanded.envid) == ("HDRS", "ENV-42")


# -- coverage not present elsewhere (passing) ---------------------------------------------------

@pytest.mark.parametrize("action", ["failed", "delayed", "delivered", "relayed", "expanded"])
def test_every_action_parses_cleanly_and_lines_stay_short(action: str) -> None:
    """Structure per action with policy=default (no defects), CRLF only, every line ≤ 998
    octets even with a 2000-char diagnostic, a maximal ENVID and ORCPT, and header injection
    attempts in the diagnostic."""
    rcpt = Recipient("bob@remote.test", ("SUCCESS", "FAILURE", "DELAY"),
                     "rfc822;" + "o" * 60 + "@" + "d" * 400 + ".test")
    entry = _entry((rcpt,), envid="E" * 100)
    code, cls = {"failed": (550, "5.1.1"), "delayed": (451, "4.4.1")}.get(action,
                                                                          (250, "2.0.0"))
    diag = "smtp; " + f"{code} {cls} " + "x" * 2000 + "\r\nX-Injected: yes\r\n"
    status = DeliveryStatus(code, cls, "text", None, Reason.OTHER, "mx." + "r" * 300, diag)
    raw = build_dsn(entry, [(rcpt, status)], action, "mta.corp.test", ORIGINAL, NOW)
    assert b"\n" not in raw.replace(b"\r\n", b"") and b"\r" not in raw.replace(b"\r\n", b"")
    assert max(len(line) for line in raw.split(b"\r\n")) <= 998
    assert b"\r\nX-Injected" not in raw
    msg = _parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["From"].addresses[0].username == "MAILER-DAEMON"
    human, report, returned = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    assert report.get_content_type() == "message/delivery-status"
    assert returned.get_content_type() == "message/rfc822"
    for part in msg.walk():
        assert not part.defects, (part.get_content_type(), part.defects)
    per_message, per_rcpt = report.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mta.corp.test"
    assert per_message["Original-Envelope-Id"] == "E" * 100
    assert per_rcpt["Action"] == action
    assert per_rcpt["Status"][0] == {"failed": "5", "delayed": "4"}.get(action, "2")
    assert per_rcpt["Will-Retry-Until"] is None  # optional for delayed, forbidden otherwise


def test_gave_up_notice_has_a_class_5_status_and_keeps_the_diagnostic() -> None:
    """A transient failure turned final after maxRetries reports failed + 5.4.7 (RFC 3463),
    not the 4.x.x of the last attempt, and still names the remote's reply."""
    rcpt = Recipient("bob@remote.test")
    last = DeliveryStatus.from_reply(451, "4.7.1 try later", Reason.RECIPIENT,
                                     "mx.remote.test", "4.7.1")
    raw = build_dsn(_entry((rcpt,)), [(rcpt, gave_up(last, 5))], "failed", "mta.corp.test",
                    ORIGINAL, NOW)
    per_rcpt = _parse(raw).get_payload()[1].get_payload()[1]
    assert per_rcpt["Action"] == "failed" and per_rcpt["Status"] == "5.4.7"
    assert per_rcpt["Remote-MTA"] == "dns; mx.remote.test"
    assert per_rcpt["Diagnostic-Code"].startswith("smtp; 451 4.7.1")


def test_headers_only_fallback_returns_rfc822_headers_even_with_ret_full() -> None:
    """SpoolBouncer's too-large fallback (headers_only=True) overrides RET=FULL and keeps the
    header/body separation so the headers part parses on its own."""
    rcpt = Recipient("bob@remote.test")
    status = DeliveryStatus.permanent_failure(Reason.RECIPIENT, "no such user", "5.1.1")
    raw = build_dsn(_entry((rcpt,), ret="FULL"), [(rcpt, status)], "failed", "mta.corp.test",
                    ORIGINAL, NOW, headers_only=True)
    returned = _parse(raw).get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Body line 1" not in raw and b"Subject: hello\r\n" in raw
