"""Direct local delivery (``smtp.spool.directLocalDelivery``): the Maildir copy is written and
fsync'd before the 250, nothing is queued for it, and every recipient that cannot go direct, or
whose write fails, is queued in the same commit."""

from __future__ import annotations

import json
import os
import shutil
import smtplib
import stat
from pathlib import Path
from typing import Any

from helpers import on_reactor, wait_until
from protocol_support import Client, Server
from test_metrics_traffic import delta, scrape

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.spool.file import WRITE_BUFFER


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
    # Marked as attempted: alice's copy exists, so the queued deliveries look for earlier
    # copies (a list with alice must not write her a second one once she moved hers to cur/).
    assert entry.with_suffix(".eml").stat().st_mode & stat.S_ISVTX


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


BIG_BODY = b"".join(b"line %06d " % i + b"z" * 60 + b"\r\n"
                    for i in range(2 * WRITE_BUFFER // 70))  # twice what stays in memory


def open_files_under(directory: Path) -> list[str]:
    """Files this process (the test server runs in it) holds open under ``directory``,
    unnamed ones (O_TMPFILE: ``.../new/#123 (deleted)``) included."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(directory) + "/"):
            found.append(target)
    return found


def start_big_message(srv: Server, rcpt: str = "alice@localhost") -> Client:
    """A message for one mailbox, sent past the in-memory buffer; returns once the server
    is writing it into the mailbox as it arrives (never into a spool file)."""
    c = Client(srv.port)
    c.reply()
    assert c.cmd("EHLO client.test")[0] == 250
    assert c.cmd("MAIL FROM:<a@remote.test>")[0] == 250
    assert c.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    assert c.cmd("DATA")[0] == 354
    c.send(b"Subject: big\r\n\r\n" + BIG_BODY[:len(BIG_BODY) * 3 // 4])
    wait_until(lambda: open_files_under(srv.maildir("alice")), message="copy being written")
    assert spool_files(srv) == []
    return c


def test_big_message_for_one_mailbox_is_written_into_it_as_it_arrives(make_server: Any) -> None:
    """No spool file and no copy out of one: the message goes into its Maildir copy while it
    arrives, and the commit fsyncs and links it."""
    srv: Server = make_server()
    srv.service.scheduler.paused = True
    c = start_big_message(srv)
    assert srv.messages("alice") == []  # invisible until the commit links it
    c.send(BIG_BODY[len(BIG_BODY) * 3 // 4:] + b".\r\n")
    code, lines = c.reply()
    assert code == 250, lines
    (msg,) = srv.messages("alice")
    assert msg.startswith(b"Return-Path: <a@remote.test>\r\nDelivered-To: alice@localhost\r\n")
    assert msg.endswith(b"Subject: big\r\n\r\n" + BIG_BODY)
    assert spool_files(srv) == []
    assert not list((srv.maildir("alice") / "tmp").iterdir())
    assert open_files_under(srv.maildir("alice")) == []
    # A rejected one (bare LF) leaves nothing behind.
    c = start_big_message(srv)
    c.send(b"bare\nlf\r\n.\r\n")
    assert c.reply()[0] == 550
    assert len(srv.messages("alice")) == 1 and spool_files(srv) == []
    wait_until(lambda: open_files_under(srv.maildir("alice")) == [], message="copy discarded")


def test_big_message_whose_mailbox_breaks_meanwhile_is_queued_intact(make_server: Any) -> None:
    srv: Server = make_server()
    srv.service.scheduler.paused = True
    c = start_big_message(srv)
    break_maildir(srv, "alice")  # the link into new/ will fail
    c.send(BIG_BODY[len(BIG_BODY) * 3 // 4:] + b".\r\n")
    assert c.reply()[0] == 250
    (entry,) = srv.spool_entries()
    assert pending_of(entry) == ["alice@localhost"]
    eml = entry.with_suffix(".eml")
    content = eml.read_bytes()
    assert content.startswith(b"Received: ") and content.endswith(b"\r\n\r\n" + BIG_BODY)
    assert eml.stat().st_mode & stat.S_ISVTX  # a delivery was tried
    (srv.maildir("alice") / "new").unlink()
    srv.service.scheduler.paused = False
    (msg,) = srv.wait_messages("alice", 1)
    assert msg.endswith(b"\r\n\r\n" + BIG_BODY)
    wait_until(lambda: srv.spool_entries() == [], message="entry completed")


def test_big_message_is_spooled_when_the_final_envelope_does_not_go_direct(
        make_server: Any) -> None:
    """The hint before the first byte named alice; the envelope committed asks for a success
    notice, which the scheduler sends: the copy is dropped and the message spooled as is."""
    srv: Server = make_server()
    srv.service.scheduler.paused = True
    spool = srv.service.spool
    message = b"Subject: hint\r\n\r\n" + BIG_BODY

    def send() -> Any:
        writer = spool.open_writer()
        writer.expect("a@remote.test", (Recipient("alice@localhost"),))
        for i in range(0, len(message), 65536):
            writer.write(message[i:i + 65536])
        assert open_files_under(srv.maildir("alice"))  # it went into the mailbox
        return writer.commit(Envelope(sender="a@remote.test", recipients=(
            Recipient("alice@localhost", notify=("SUCCESS",)),), size=len(message)))

    entry = on_reactor(send)
    assert entry.pending == (Recipient("alice@localhost", notify=("SUCCESS",)),)
    assert srv.messages("alice") == []
    assert open_files_under(srv.maildir("alice")) == []
    (path,) = srv.spool_entries()
    assert path.with_suffix(".eml").read_bytes() == message
    assert not path.with_suffix(".eml").stat().st_mode & stat.S_ISVTX  # nothing was tried
