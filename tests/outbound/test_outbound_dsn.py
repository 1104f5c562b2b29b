"""RFC 3464 DSN construction (parsed back with the email package) and RFC 3461 NOTIFY rules."""

from __future__ import annotations

import email
import email.policy
from email.message import Message

import pytest

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.outbound.dsn import build_dsn, dsn_envelope, should_send_dsn
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.status import DeliveryStatus, Reason

ORIGINAL = (b"From: alice@corp.test\r\nTo: bob@remote.test\r\nSubject: hello\r\n"
            b"Message-ID: <m1@corp.test>\r\n\r\nBody line 1\r\nBody line 2\r\n")


def entry(ret: str | None = None, envid: str | None = "ENV-1", sender: str = "alice@corp.test",
          is_dsn: bool = False) -> QueueEntry:
    rcpts = (Recipient("bob@remote.test", ("FAILURE",), "rfc822;bob@remote.test"),
             Recipient("carol@remote.test"))
    env = Envelope(sender=sender, recipients=rcpts, ret=ret, envid=envid,
                   received_at=1_700_000_000.0, is_dsn=is_dsn)
    return QueueEntry("Q1ABCDEFGH", env, rcpts)


def failures() -> list[tuple[Recipient, DeliveryStatus]]:
    e = entry()
    return [
        (e.pending[0], DeliveryStatus.permanent_failure(
            Reason.RECIPIENT, "no such user", "5.1.1", 550, "mx.remote.test",
            "smtp; 550 5.1.1 no such user")),
        (e.pending[1], DeliveryStatus.permanent_failure(
            Reason.DNS, "null MX", "5.1.10", 556, None, "x-dns; null MX for remote.test")),
    ]


def parse(raw: bytes) -> Message:
    return email.message_from_bytes(raw, policy=email.policy.compat32)


def test_failed_dsn_structure_and_fields() -> None:
    raw = build_dsn(entry(), failures(), "failed", "mta.corp.test", ORIGINAL, now=1_700_000_100)
    assert b"\n" not in raw.replace(b"\r\n", b"")
    msg = parse(raw)
    assert msg.get_content_type() == "multipart/report"
    assert msg.get_param("report-type") == "delivery-status"
    assert msg["To"] == "<alice@corp.test>"
    assert msg["Auto-Submitted"] == "auto-replied"
    human, status, returned = msg.get_payload()
    assert human.get_content_type() == "text/plain"
    assert "bob@remote.test" in human.get_payload()
    assert status.get_content_type() == "message/delivery-status"
    per_message, *per_rcpt = status.get_payload()
    assert per_message["Reporting-MTA"] == "dns; mta.corp.test"
    assert per_message["Original-Envelope-Id"] == "ENV-1"
    assert per_message["Arrival-Date"]
    assert len(per_rcpt) == 2
    bob, carol = per_rcpt
    assert bob["Original-Recipient"] == "rfc822;bob@remote.test"
    assert bob["Final-Recipient"] == "rfc822; bob@remote.test"
    assert bob["Action"] == "failed"
    assert bob["Status"] == "5.1.1"
    assert bob["Remote-MTA"] == "dns; mx.remote.test"
    assert bob["Diagnostic-Code"] == "smtp; 550 5.1.1 no such user"
    assert bob["Last-Attempt-Date"]
    assert carol["Original-Recipient"] is None
    assert carol["Status"] == "5.1.10"
    assert carol["Remote-MTA"] is None
    assert returned.get_content_type() == "message/rfc822"
    inner = returned.get_payload()[0]
    assert inner["Subject"] == "hello"
    assert "Body line 2" in inner.get_payload()


def test_ret_hdrs_returns_headers_only() -> None:
    raw = build_dsn(entry(ret="HDRS", envid=None), failures(), "failed", "mta.corp.test",
                    ORIGINAL, now=1_700_000_100)
    msg = parse(raw)
    returned = msg.get_payload()[2]
    assert returned.get_content_type() == "text/rfc822-headers"
    assert b"Body line" not in raw
    assert b"Subject: hello" in raw
    assert msg.get_payload()[1].get_payload()[0]["Original-Envelope-Id"] is None


def test_delayed_and_delivered_actions() -> None:
    for action in ("delayed", "delivered"):
        raw = build_dsn(entry(), failures()[:1], action, "mta.corp.test", ORIGINAL, 1.0)
        assert parse(raw).get_payload()[1].get_payload()[1]["Action"] == action
    with pytest.raises(ValueError):
        build_dsn(entry(), failures(), "bogus", "m", ORIGINAL, 1.0)


def test_boundary_never_collides_with_the_original() -> None:
    raw = build_dsn(entry(), failures(), "failed", "mta.corp.test", ORIGINAL, 1.0)
    boundary = parse(raw).get_boundary()
    assert boundary is not None and boundary.encode() not in ORIGINAL


@pytest.mark.parametrize(("notify", "action", "expected"), [
    ((), "failed", True),
    ((), "delayed", True),
    ((), "delivered", False),
    (("NEVER",), "failed", False),
    (("SUCCESS",), "delivered", True),
    (("SUCCESS",), "failed", False),
    (("FAILURE",), "delayed", False),
    (("DELAY",), "delayed", True),
    (("success", "failure"), "failed", True),
])
def test_should_send_dsn_notify_rules(notify: tuple[str, ...], action: str,
                                      expected: bool) -> None:
    rcpt = Recipient("bob@remote.test", notify)
    assert should_send_dsn(entry().envelope, rcpt, action) is expected


def test_never_a_dsn_for_null_sender_or_for_a_dsn() -> None:
    rcpt = Recipient("bob@remote.test", ("FAILURE",))
    assert not should_send_dsn(entry(sender="").envelope, rcpt, "failed")
    assert not should_send_dsn(entry(is_dsn=True).envelope, rcpt, "failed")


def test_dsn_envelope_cannot_loop() -> None:
    env = dsn_envelope(entry())
    assert env.sender == "" and env.is_dsn
    assert [r.address for r in env.recipients] == ["alice@corp.test"]
    # The DSN itself failing produces nothing further.
    bounced = QueueEntry("Q2ABCDEFGH", env, env.recipients)
    assert not any(should_send_dsn(bounced.envelope, r, a)
                   for r in env.recipients for a in ("failed", "delayed", "delivered"))
