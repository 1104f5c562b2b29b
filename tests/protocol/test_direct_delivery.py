"""Direct local delivery (``smtp.spool.directLocalDelivery``): the Maildir copy is written and
fsync'd before the 250, nothing is queued for it, and every recipient that cannot go direct, or
whose write fails, is queued in the same commit."""

from __future__ import annotations

import json
import shutil
import smtplib
import stat
from typing import Any

from helpers import wait_until
from protocol_support import Client, Server
from test_metrics_traffic import delta, scrape


def spool_files(srv: Server) -> list[str]:
    spool = srv.root / "spool"
    return sorted(p.name for sub in ("queue", "tmp") for p in (spool / sub).iterdir())


def break_maildir(srv: Server, user: str) -> None:
    """Maildir/new as a regular file: every write into this mailbox fails, whether the copy
    is made in tmp/ or as an unnamed file in new/ (we run as root, so permissions would not
    stop us). Copies already delivered are lost from view; check them before."""
    maildir = srv.maildir(user)
    maildir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(maildir / "new", ignore_errors=True)
    (maildir / "new").write_text("not a directory")


def pending_of(path: Any) -> list[str]:
    return [r["address"] for r in json.loads(path.read_text())["pending"]]


def test_local_mail_is_in_the_mailbox_when_the_250_arrives(make_server: Any) -> None:
    srv: Server = make_server()
    srv.service.scheduler.paused = True  # the scheduler cannot be the one delivering it
    mport = srv.service.management_port.getHost().port
    before = scrape(mport)
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("a@remote.test", ["alice@localhost"], b"Subject: direct\r\n\r\nhello\r\n")
        # No waiting: the copy is there, and the spool holds nothing for it.
        (msg,) = srv.messages("alice")
        assert spool_files(srv) == []
    assert msg.startswith(b"Return-Path: <a@remote.test>\r\nDelivered-To: alice@localhost\r\n"
                          b"Received: ")
    assert msg.endswith(b"\r\n\r\nhello\r\n")
    assert not list((srv.maildir("alice") / "tmp").iterdir())
    # The same metrics as a delivery by the scheduler.
    after = wait_until(lambda: (m := scrape(mport)) and
                       delta(m, before, "smtp_spool_completed_total") == 1 and m,
                       message="completed counter")
    assert delta(after, before, 'smtp_spool_delivery_recipients_total{result="delivered"}') == 1
    assert delta(after, before,
                 'smtp_spool_queue_age_seconds_count{outcome="completed"}') == 1
    assert after["smtp_spool_pending"] == 0


def test_a_failed_mailbox_write_is_queued_and_delivered_later_once(make_server: Any) -> None:
    srv: Server = make_server()
    srv.service.scheduler.paused = True
    break_maildir(srv, "bob")
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("a@remote.test", ["alice@localhost", "bob@localhost"],
                   b"Subject: half\r\n\r\nx\r\n")
    assert len(srv.messages("alice")) == 1
    (entry,) = srv.spool_entries()
    assert pending_of(entry) == ["bob@localhost"]  # alice is not queued a second time
    # A write was tried, so the entry is committed as already leased: its first delivery
    # will look for copies the failed attempt may have left (a list's other mailboxes).
    assert entry.with_suffix(".eml").stat().st_mode & stat.S_ISVTX
    (srv.maildir("bob") / "new").unlink()
    srv.service.scheduler.paused = False
    srv.wait_messages("bob", 1)
    wait_until(lambda: srv.spool_entries() == [], message="entry completed")
    assert len(srv.messages("alice")) == 1 and len(srv.messages("bob")) == 1


def test_recipients_that_cannot_go_direct_are_queued(make_server: Any) -> None:
    """A list with a remote member (relayed from the queue) and NOTIFY=SUCCESS (the
    scheduler sends the notice) take the queue; alice in the same message does not."""
    srv: Server = make_server()
    srv.service.scheduler.paused = True
    (srv.root / "lists" / "team").write_text("bob@localhost\nfar@remote.test\n")
    c = Client(srv.port)
    c.reply()
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd("RCPT TO:<alice@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<team@localhost>")[0] == 250
    assert c.cmd("RCPT TO:<bob@localhost> NOTIFY=SUCCESS")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: mixed\r\n\r\nx\r\n.\r\n")
    assert c.reply()[0] == 250
    assert len(srv.messages("alice")) == 1
    assert srv.messages("bob") == []
    (entry,) = srv.spool_entries()
    assert pending_of(entry) == ["team@localhost", "bob@localhost"]
    assert not entry.with_suffix(".eml").stat().st_mode & stat.S_ISVTX  # nothing was tried


def test_big_message_goes_direct_from_its_spill_file(make_server: Any) -> None:
    """Past the in-memory buffer the message is spilled to spool/tmp while it arrives; the
    direct delivery copies it from there and removes it."""
    srv: Server = make_server()
    srv.service.scheduler.paused = True
    body = b"".join(b"line %06d " % i + b"y" * 60 + b"\r\n" for i in range(8000))  # ~560 KB
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("a@remote.test", ["alice@localhost", "bob@localhost"],
                   b"Subject: big\r\n\r\n" + body)
    for user in ("alice", "bob"):
        (msg,) = srv.messages(user)
        assert msg.endswith(b"\r\n\r\n" + body)
    assert spool_files(srv) == []


def test_spool_not_needed_for_direct_mail_but_451_when_both_fail(make_server: Any) -> None:
    srv: Server = make_server()
    shutil.rmtree(srv.root / "spool")
    c = Client(srv.port)
    c.reply()
    c.cmd("EHLO client.test")
    for expected in (250, 451):
        if expected == 451:
            assert len(srv.messages("alice")) == 1
            break_maildir(srv, "alice")  # now the fallback, the spool, is needed and broken
        c.cmd("MAIL FROM:<a@remote.test>")
        c.cmd("RCPT TO:<alice@localhost>")
        assert c.cmd("DATA")[0] == 354
        c.send(b"Subject: s\r\n\r\nx\r\n.\r\n")
        code, lines = c.reply()
        assert code == expected, lines
    assert lines[0].startswith("4.3.0")
    assert c.cmd("NOOP")[0] == 250
