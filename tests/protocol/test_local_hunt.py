"""Hunt for bugs in local delivery, local routing and mailing lists, against a real server on
loopback with real Maildirs and list files (``smtp.routing.localDomain[s]``,
``smtp.storage.mailboxDir``/``listsDir``, ``smtp.spool.directLocalDelivery``).

Already covered elsewhere (not repeated here): path tricks in local parts and non-ASCII look-alikes
at the LocalDelivery level, one copy when a reader moves a copy to cur/ between two recipients of
one scheduler run, damaged tmp/new/cur subdirectories, the exact prefix bytes
(tests/unit/test_maildir_hunt.py); alice, ALICE, alice+tag and a list with alice giving one copy,
simple RCPT refusals (tests/protocol/test_session.py); direct delivery basics, a failed write
queued (tests/protocol/test_direct_delivery.py); too-deep lists and lists of unknown members
bouncing (tests/spool/test_loss_hunt.py); NOTIFY/RET/ENVID inherited by remote list members
(tests/unit/test_dsn_hunt.py).

Eight cases found bugs (six causes, all fixed since): a list that only loops back to itself
and a list of unparsable members vanished without a bounce, a non-UTF-8 list file failed
every recipient of the message (and a large one dropped the session), members reaching nobody
were not logged with direct delivery, a direct copy could be written again by a queued list
with the same member, one broken member mailbox held up the rest of its list.
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from protocol_support import Client, Server
from test_metrics_traffic import delta, scrape

MESSAGE = b"Subject: local hunt\r\n\r\nhello\r\n"


# -- helpers -------------------------------------------------------------------------------------

@pytest.fixture
def events() -> Iterator[list[dict[str, Any]]]:
    """Every log event of this process (the server runs in-process) during the test."""
    from twisted.logger import globalLogPublisher

    got: list[dict[str, Any]] = []
    observer = got.append
    globalLogPublisher.addObserver(observer)  # type: ignore[arg-type]
    yield got
    globalLogPublisher.removeObserver(observer)  # type: ignore[arg-type]


def copies(srv: Server, user: str) -> list[Path]:
    """Every delivered copy in ``user``'s Maildir (new/ and cur/)."""
    box = srv.maildir(user)
    return sorted(p for sub in ("new", "cur") if (box / sub).is_dir()
                  for p in (box / sub).iterdir())


class Tx:
    """The replies of one SMTP transaction."""

    def __init__(self, rcpts: list[tuple[int, str]], final: int, final_text: str) -> None:
        self.rcpts = rcpts
        self.final = final
        self.final_text = final_text

    @property
    def queue_id(self) -> str:
        m = re.search(r"queued as (\S+)", self.final_text)
        assert m, self.final_text
        return m.group(1)


def transaction(srv: Server, sender: str, rcpts: list[str], body: bytes = MESSAGE,
                mail_params: str = "") -> Tx:
    """MAIL, one RCPT per entry of ``rcpts`` (the whole argument, e.g. ``<a@b> NOTIFY=...``),
    DATA when any RCPT was accepted."""
    c = Client(srv.port)
    try:
        assert c.reply()[0] == 220
        assert c.cmd("EHLO client.test")[0] == 250
        code, lines = c.cmd(f"MAIL FROM:<{sender}>{mail_params}".encode())
        assert code == 250, lines
        got: list[tuple[int, str]] = []
        for r in rcpts:
            code, lines = c.cmd(f"RCPT TO:{r}".encode())
            got.append((code, lines[0]))
        if not any(code == 250 for code, _ in got):
            return Tx(got, 0, "")
        assert c.cmd("DATA")[0] == 354
        c.send(body + b".\r\n")
        final, lines = c.reply()
        c.cmd("QUIT")
        return Tx(got, final, lines[0])
    finally:
        c.close()


def finished(events: list[dict[str, Any]], queue_id: str, timeout: float = 20) -> None:
    """Wait for the scheduler (or the direct delivery) to log the end of ``queue_id``; bounces
    are queued before that line, so whatever the entry caused is on disk afterwards."""
    wait_until(lambda: any(e.get("event") == "entry_finished" and e.get("queue_id") == queue_id
                           for e in list(events)),
               timeout=timeout, message=f"entry {queue_id} finished")


def attempts(events: list[dict[str, Any]], queue_id: str) -> list[tuple[str, str]]:
    """(recipient, "code enhanced text") of every delivery attempt logged for ``queue_id``."""
    return [(str(e["recipient"]), str(e["status"])) for e in list(events)
            if e.get("event") == "delivery_attempt" and e.get("queue_id") == queue_id]


def bounces(events: list[dict[str, Any]], queue_id: str) -> list[dict[str, Any]]:
    return [e for e in list(events) if e.get("event") == "bounce"
            and e.get("queue_id") == queue_id]


def break_maildir(srv: Server, user: str) -> None:
    """Maildir/new as a regular file: every write into this mailbox fails (we run as root,
    so permissions would not stop us)."""
    maildir = srv.maildir(user)
    maildir.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(maildir / "new", ignore_errors=True)
    (maildir / "new").write_text("not a directory")


def dsn_field(raw: bytes, name: str) -> list[str]:
    return [m.decode() for m in re.findall(rb"(?im)^" + name.encode() + rb":\s*(.+?)\r$", raw)]


USERS = ("alice", "bob", "carol", "dave")


# -- 1. RCPT-time matching of local parts and domains ---------------------------------------------

RCPT_TABLE = [
    # (RCPT argument, expected code, expected enhanced code or "")
    ("<alice@localhost>", 250, ""),
    ("<ALICE@LOCALHOST>", 250, ""),                 # case-insensitive local part and domain
    ('<"alice"@localhost>', 250, ""),               # quoted form of a plain local part
    ('<"Alice+q"@LocalHost>', 250, ""),             # quoted +tag
    ("<alice+tag+more@example.test>", 250, ""),     # first delimiter only, second domain
    ("<alice+@localhost>", 250, ""),                # empty tag
    ("<alice@xn--bcher-kva.test>", 250, ""),        # IDN domain as A-label
    ("<+tag@localhost>", 550, "5.1.1"),              # tag without a user
    ("<a.lice@localhost>", 550, "5.1.1"),            # dots are significant (no Gmail folding)
    ('<"al ice"@localhost>', 550, "5.1.1"),
    ('<"../x"@localhost>', 550, "5.1.1"),            # names a path: nobody
    ('<"a/b"@localhost>', 550, "5.1.1"),
    ('<"alice/../bob"@localhost>', 550, "5.1.1"),
    ("<nobody@localhost>", 550, "5.1.1"),
    ("<alice@localhost.>", 501, "5.1.3"),            # trailing dot: not RFC 5321 syntax
    ("<alice@[127.0.0.1]>", 550, "5.7.1"),           # literals never local, never relayed
]


def test_rcpt_time_matching_of_local_parts_and_domains(make_server: Any) -> None:
    srv: Server = make_server({"smtp": {"routing": {"localDomains": ["example.test",
                                                                     "bücher.test"]}}},
                              users=USERS)
    (srv.root / "x").mkdir()  # what "../x" would reach from the mailbox root
    (srv.root / "mailboxes" / "a" / "b").mkdir(parents=True)  # what "a/b" would reach
    tx = transaction(srv, "s@remote.test", [r for r, _, _ in RCPT_TABLE])
    got = [(r, code, text[:5] if code != 250 else "") for (r, _, _), (code, text)
           in zip(RCPT_TABLE, tx.rcpts, strict=True)]
    assert got == RCPT_TABLE
    assert tx.final == 250
    # Seven spellings of alice: one copy, carrying the first spelling as Delivered-To.
    [copy] = copies(srv, "alice")
    assert copy.read_bytes().startswith(b"Return-Path: <s@remote.test>\r\n"
                                        b"Delivered-To: alice@localhost\r\n")
    assert list((srv.root / "x").iterdir()) == []
    assert list((srv.root / "mailboxes" / "a" / "b").iterdir()) == []
    assert srv.spool_entries() == []


def test_smtputf8_domains_and_local_parts(make_server: Any) -> None:
    srv: Server = make_server({"smtp": {"routing": {"localDomains": ["bücher.test"]}}})
    c = Client(srv.port)
    try:
        c.reply()
        assert c.cmd("EHLO client.test")[0] == 250
        assert c.cmd("MAIL FROM:<s@remote.test>")[0] == 250
        # UTF-8 without SMTPUTF8: refused as such (RFC 6531 §3.4), never guessed.
        assert c.cmd("RCPT TO:<alice@bücher.test>".encode())[:1] == (553,)
        assert c.cmd("RSET")[0] == 250
        assert c.cmd("MAIL FROM:<s@remote.test> SMTPUTF8")[0] == 250
        assert c.cmd("RCPT TO:<alice@bücher.test>".encode())[0] == 250  # U-label domain
        # A UTF-8 local part can never name an (ASCII) mailbox: 550 at once, not a bounce.
        code, lines = c.cmd("RCPT TO:<jörg@localhost>".encode())
        assert (code, lines[0][:5]) == (550, "5.1.1")
        assert c.cmd("DATA")[0] == 354
        c.send(MESSAGE + b".\r\n")
        assert c.reply()[0] == 250
    finally:
        c.close()
    [copy] = copies(srv, "alice")
    assert b"Delivered-To: alice@xn--bcher-kva.test\r\n" in copy.read_bytes()


def test_unknown_user_is_refused_at_rcpt_and_the_others_get_it_without_a_bounce(
        make_server: Any) -> None:
    srv: Server = make_server(users=USERS)
    tx = transaction(srv, "dave@localhost", ["<alice@localhost>", "<nobody@localhost>",
                                             "<bob@localhost>"])
    assert [code for code, _ in tx.rcpts] == [250, 550, 250]
    assert tx.rcpts[1][1].startswith("5.1.1")
    assert tx.final == 250
    # Direct delivery: both copies are there when the 250 arrives; nothing queued, no notice.
    assert len(copies(srv, "alice")) == 1 and len(copies(srv, "bob")) == 1
    assert srv.spool_entries() == [] and copies(srv, "dave") == []


def test_a_user_known_only_to_auth_gets_a_private_maildir_created(make_server: Any) -> None:
    srv: Server = make_server({"smtp": {"auth": {"users": {"carol": "pw"}}}})
    assert not (srv.root / "mailboxes" / "carol").exists()
    tx = transaction(srv, "s@remote.test", ["<carol@localhost>"])
    assert tx.final == 250
    [copy] = copies(srv, "carol")
    assert copy.parent.name == "new"
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    for sub in ("tmp", "new", "cur"):
        assert stat.S_IMODE((srv.maildir("carol") / sub).stat().st_mode) == 0o700
    assert list((srv.maildir("carol") / "tmp").iterdir()) == []
    # Dovecot-compatible unique name: <time>.<unique>.<host>, no ':' or '/' in new/.
    assert re.fullmatch(r"\d+\.[A-Za-z0-9]+\.[A-Za-z0-9._-]+", copy.name), copy.name


def test_a_mailbox_path_that_is_a_regular_file_defers_and_keeps_the_message(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    srv: Server = make_server({"smtp": {"auth": {"users": {"erin": "pw"}}}})
    (srv.root / "mailboxes" / "erin").write_text("an operator's note, not a mailbox")
    tx = transaction(srv, "s@remote.test", ["<erin@localhost>", "<alice@localhost>"])
    assert tx.final == 250
    # erin's failed write stops the direct delivery: alice is queued and delivered from there.
    srv.wait_messages("alice", 1)
    wait_until(lambda: any(s.startswith("4") for r, s in attempts(events, tx.queue_id)
                           if r == "erin@localhost"), message="a deferred attempt for erin")
    assert (srv.root / "mailboxes" / "erin").read_text() == "an operator's note, not a mailbox"
    [entry] = srv.spool_entries()
    assert '"erin@localhost"' in entry.read_text()  # still queued: deferred, never dropped


# -- 2. list files ---------------------------------------------------------------------------------

def test_list_file_format_nesting_loops_and_duplicates(make_server: Any) -> None:
    srv: Server = make_server(users=USERS)
    srv.service.scheduler.paused = True  # everything must be done before the 250
    lists = srv.root / "lists"
    lists.joinpath("team").write_bytes(
        b"# the team\r\n"
        b"\r\n"
        b"   alice@localhost   \r\n"
        b"ALICE@LOCALHOST\r\n"                  # duplicate, other case
        b"alice+work@localhost # same mailbox\r\n"
        b"\t\r\n"
        b"team@localhost\r\n"                   # the list includes itself
        b"ops@example.test\r\n")                # a nested list in the other local domain
    lists.joinpath("ops").write_text("bob@localhost\nteam@localhost\ncarol@localhost\n")  # loop
    tx = transaction(srv, "dave@localhost", ["<team@localhost>", "<bob@localhost>"])
    assert tx.final == 250
    for user in ("alice", "bob", "carol"):
        [copy] = copies(srv, user)
        head = copy.read_bytes()
        assert head.startswith(b"Return-Path: <dave@localhost>\r\n"), head[:80]
        assert head.endswith(b"\r\n\r\nhello\r\n")
    assert b"Delivered-To: team@localhost\r\n" in copies(srv, "alice")[0].read_bytes()
    assert copies(srv, "dave") == [] and srv.spool_entries() == []


def test_a_very_long_list_is_delivered_once_to_every_member(make_server: Any) -> None:
    users = tuple(f"u{i:03d}" for i in range(400))
    srv: Server = make_server(users=users)
    (srv.root / "lists" / "all").write_text(
        "".join(f"{u}@localhost\n" for u in users) + "".join(f"{u}@LOCALHOST\n" for u in users))
    started = time.monotonic()
    tx = transaction(srv, "s@remote.test", ["<all@localhost>"])
    assert tx.final == 250
    assert time.monotonic() - started < 30
    assert [len(copies(srv, u)) for u in users] == [1] * len(users)
    assert srv.spool_entries() == []


def test_remote_list_member_with_relay_disabled_bounces_to_the_original_sender(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    srv: Server = make_server(users=USERS)
    (srv.root / "lists" / "team").write_text("alice@localhost\nfar@remote.test\n")
    tx = transaction(srv, "dave@localhost", ["<team@localhost>"])
    assert tx.final == 250
    [copy] = srv.wait_messages("alice", 1)  # a list with a remote member is queued
    assert copy.startswith(b"Return-Path: <dave@localhost>\r\n")
    [notice] = srv.wait_messages("dave", 1)
    assert dsn_field(notice, "Final-Recipient") == ["rfc822; far@remote.test"]
    assert dsn_field(notice, "Original-Recipient") == ["rfc822;team@localhost"]
    assert dsn_field(notice, "Action") == ["failed"]
    assert dsn_field(notice, "Status") == ["5.7.1"]
    assert notice.startswith(b"Return-Path: <>\r\n")
    wait_until(lambda: srv.spool_entries() == [], message="spool drained")
    assert len(copies(srv, "dave")) == 1


def test_a_list_changed_between_rcpt_and_delivery_uses_the_new_file(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    """Lists expand at delivery time (like Postfix :include:): a list removed meanwhile bounces
    (5.1.1), a changed one reaches its new members."""
    srv: Server = make_server({"smtp": {"spool": {"directLocalDelivery": False}}}, users=USERS)
    srv.service.scheduler.paused = True
    lists = srv.root / "lists"
    lists.joinpath("team").write_text("alice@localhost\n")
    lists.joinpath("crew").write_text("alice@localhost\n")
    tx = transaction(srv, "dave@localhost", ["<team@localhost>", "<crew@localhost>"])
    assert tx.final == 250
    lists.joinpath("team").unlink()
    lists.joinpath("crew").write_text("bob@localhost\n")
    srv.service.scheduler.paused = False
    srv.service.scheduler.trigger()
    finished(events, tx.queue_id)
    assert copies(srv, "alice") == [] and len(copies(srv, "bob")) == 1
    [notice] = srv.wait_messages("dave", 1)
    assert dsn_field(notice, "Final-Recipient") == ["rfc822; team@localhost"]
    assert dsn_field(notice, "Status") == ["5.1.1"]


# -- 3. many local recipients, some failing ----------------------------------------------------

def test_many_local_recipients_one_broken_mailbox_the_others_get_one_copy_each(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    srv: Server = make_server(users=("alice", "bob", "carol", "dave", "erin"))
    mport = srv.service.management_port.getHost().port
    before = scrape(mport)
    break_maildir(srv, "bob")
    tx = transaction(srv, "erin@localhost", [f"<{u}@localhost>" for u in
                                             ("alice", "bob", "carol", "dave")])
    assert tx.final == 250
    wait_until(lambda: len(copies(srv, "carol")) == 1 and len(copies(srv, "dave")) == 1,
               message="carol and dave delivered")
    wait_until(lambda: any(r == "bob@localhost" and s.startswith("4")
                           for r, s in attempts(events, tx.queue_id)),
               message="bob deferred")
    (srv.maildir("bob") / "new").unlink()  # the operator repairs the mailbox
    srv.wait_messages("bob", 1, timeout=20)
    finished(events, tx.queue_id)
    assert [len(copies(srv, u)) for u in ("alice", "bob", "carol", "dave")] == [1, 1, 1, 1]
    assert copies(srv, "erin") == []  # no notice: a deferral, then success
    after = wait_until(lambda: (m := scrape(mport)) and
                       delta(m, before, "smtp_spool_completed_total") == 1 and m,
                       message="completed counter")
    assert delta(after, before, 'smtp_spool_delivery_recipients_total{result="delivered"}') == 4
    assert delta(after, before,
                 'smtp_spool_delivery_recipients_total{result="transient_failure"}') >= 1
    assert delta(after, before,
                 'smtp_spool_delivery_recipients_total{result="permanent_failure"}') == 0


def test_direct_list_delivery_metrics_and_log_lines_count_envelope_recipients(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    srv: Server = make_server(users=USERS)
    mport = srv.service.management_port.getHost().port
    (srv.root / "lists" / "team").write_text("bob@localhost\ncarol@localhost\n")
    before = scrape(mport)
    tx = transaction(srv, "s@remote.test", ["<alice@localhost>", "<team@localhost>"])
    assert tx.final == 250
    finished(events, tx.queue_id)
    assert sorted(r for r, s in attempts(events, tx.queue_id)) == ["alice@localhost",
                                                                   "team@localhost"]
    assert all(s.startswith("250 2.") for _, s in attempts(events, tx.queue_id))
    after = wait_until(lambda: (m := scrape(mport)) and
                       delta(m, before, "smtp_spool_completed_total") == 1 and m,
                       message="completed counter")
    assert delta(after, before, 'smtp_spool_delivery_recipients_total{result="delivered"}') == 2
    assert after["smtp_spool_pending"] == 0


# -- 4. bugs -------------------------------------------------------------------------------------

@pytest.mark.parametrize("files", [
    {"team": "team+x@localhost\n"},
    {"team": "ops@localhost\n", "ops": "team@localhost\n"},
], ids=["self", "a-b-a"])
def test_a_list_that_only_loops_back_to_itself_bounces(
        make_server: Any, events: list[dict[str, Any]], files: dict[str, str]) -> None:
    srv: Server = make_server(users=USERS)
    for name, text in files.items():
        (srv.root / "lists" / name).write_text(text)
    tx = transaction(srv, "dave@localhost", ["<team@localhost>"])
    assert tx.final == 250
    finished(events, tx.queue_id)
    [(_, status)] = attempts(events, tx.queue_id)
    assert status.startswith("5"), f"team reached nobody but was reported {status!r}"
    assert bounces(events, tx.queue_id), "the sender was never told"


def test_a_list_whose_members_are_all_unparsable_does_not_vanish(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    srv: Server = make_server(users=USERS)
    (srv.root / "lists" / "team").write_text("alice\n<bob@localhost>\ncarol@localhost.\n")
    tx = transaction(srv, "dave@localhost", ["<team@localhost>"])
    assert tx.final == 250
    finished(events, tx.queue_id)
    delivered = [u for u in ("alice", "bob", "carol") if copies(srv, u)]
    [(_, status)] = attempts(events, tx.queue_id)
    assert delivered or (status.startswith("5") and bounces(events, tx.queue_id)), \
        f"nobody got the message, nobody was told; reported {status!r}"


@pytest.mark.parametrize("big", [False, True], ids=["small", "large-spilled"])
def test_a_list_file_that_is_not_utf8_does_not_fail_the_whole_transaction(
        make_server: Any, big: bool) -> None:
    srv: Server = make_server(users=USERS)
    (srv.root / "lists" / "team").write_bytes(b"# Jos\xe9's team\nalice@localhost\n")
    body = MESSAGE if not big else b"Subject: big\r\n\r\n" + (b"y" * 70 + b"\r\n") * 9000
    # The large case: a single recipient with a single mailbox is written as it arrives.
    rcpts = ["<team@localhost>"] if big else ["<team@localhost>", "<bob@localhost>"]
    try:
        tx = transaction(srv, "s@remote.test", rcpts, body=body)
    except ConnectionError:
        pytest.fail("the server dropped the connection in the middle of DATA")
    assert tx.final == 250, "one list file's encoding refused the message for everybody"
    if not big:
        assert len(copies(srv, "bob")) == 1


def test_an_unreachable_list_member_is_logged_with_direct_delivery(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    srv: Server = make_server(users=USERS)
    (srv.root / "lists" / "team").write_text("alice@localhost\nghost@localhost\n")
    tx = transaction(srv, "s@remote.test", ["<team@localhost>"])
    assert tx.final == 250
    finished(events, tx.queue_id)
    assert len(copies(srv, "alice")) == 1
    warned = [e for e in list(events) if e.get("event") == "list_member_unreachable"]
    assert warned and "ghost@localhost" in str(warned[0].get("problem")), \
        "no list_member_unreachable warning for ghost@localhost"


def test_an_unreachable_list_member_is_logged_by_the_scheduler(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    """The same list as above with the queue in between: the warning the docs promise."""
    srv: Server = make_server({"smtp": {"spool": {"directLocalDelivery": False}}}, users=USERS)
    (srv.root / "lists" / "team").write_text("alice@localhost\nghost@localhost\n")
    tx = transaction(srv, "s@remote.test", ["<team@localhost>"])
    finished(events, tx.queue_id)
    assert len(copies(srv, "alice")) == 1
    warned = [e for e in list(events) if e.get("event") == "list_member_unreachable"]
    assert warned and "ghost@localhost" in str(warned[0].get("problem"))
    assert warned[0].get("log_level").name == "warn"


def test_a_direct_copy_is_not_duplicated_by_a_queued_list_with_the_same_member(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    srv: Server = make_server(users=USERS)
    srv.service.scheduler.paused = True
    (srv.root / "lists" / "team").write_text("alice@localhost\nbob@localhost\n")
    tx = transaction(srv, "s@remote.test", ["<alice@localhost>",
                                            "<team@localhost> NOTIFY=SUCCESS"])
    assert tx.final == 250
    [first] = copies(srv, "alice")  # written directly; team is queued
    assert len(srv.spool_entries()) == 1
    os.rename(first, srv.maildir("alice") / "cur" / f"{first.name}:2,S")  # alice reads it
    srv.service.scheduler.paused = False
    srv.service.scheduler.trigger()
    finished(events, tx.queue_id)
    assert len(copies(srv, "bob")) == 1
    assert len(copies(srv, "alice")) == 1, "alice got the message twice"


def test_a_broken_member_mailbox_does_not_starve_the_rest_of_the_list(
        make_server: Any, events: list[dict[str, Any]]) -> None:
    srv: Server = make_server({"smtp": {"spool": {"maxRetries": 0}}}, users=USERS)
    (srv.root / "lists" / "team").write_text("alice@localhost\nbob@localhost\n"
                                             "carol@localhost\n")
    break_maildir(srv, "bob")
    tx = transaction(srv, "dave@localhost", ["<team@localhost>"])
    assert tx.final == 250
    finished(events, tx.queue_id)  # one attempt (maxRetries 0), then the entry ends
    assert len(copies(srv, "alice")) == 1
    assert len(copies(srv, "carol")) == 1, "carol never got the list's message"
