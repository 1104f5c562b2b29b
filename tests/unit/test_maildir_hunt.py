"""Hunt for local-delivery bugs with real files: local parts that try to leave the mailbox
root, duplicate copies, odd senders and messages, damaged Maildirs, the sent archive.

Already covered elsewhere (not repeated here): exact bytes and 0600 copies, a removed Maildir
created again (tests/unit/test_maildir.py); a redelivery finding a copy moved to cur/ with
":2,S" (tests/spool/test_file_first_lease.py); alice, ALICE, alice+tag and a list naming alice
getting one copy, path tricks refused at RCPT (tests/protocol/test_session.py).
"""

from __future__ import annotations

import errno
import os
import shutil
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from twisted.internet import defer

from kotlin_smtp_py.envelope import Address, Envelope, Recipient
from kotlin_smtp_py.inbound.policy import SessionInfo
from kotlin_smtp_py.local import maildir
from kotlin_smtp_py.local.delivery import LocalDelivery
from kotlin_smtp_py.local.directory import LocalDirectory, safe_name
from kotlin_smtp_py.service import SmtpService
from kotlin_smtp_py.spool.record import QueueEntry
from kotlin_smtp_py.status import DeliveryStatus

QID = "0123456789ABCDEFGHJK"
MESSAGE = b"Received: from x\r\nSubject: t\r\n\r\nbody\r\n"


def _local(tmp_path: Path, users: tuple[str, ...] = ("alice", "karl"),
           between: Callable[[], None] | None = None) -> LocalDelivery:
    """LocalDelivery on real directories; ``between`` runs before every recipient's write
    (what another process, e.g. a mail reader, does while the delivery is in progress)."""
    mailboxes, lists = tmp_path / "mailboxes", tmp_path / "lists"
    for user in users:
        (mailboxes / user).mkdir(parents=True)
    mailboxes.mkdir(exist_ok=True)
    lists.mkdir()

    def run(fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        if between is not None:
            between()
        return defer.maybeDeferred(fn, *args)

    return LocalDelivery(LocalDirectory(str(mailboxes), str(lists)),
                         lambda d: d == "localhost", run_in_thread=run)


def _deliver(local: LocalDelivery, tmp_path: Path, addresses: list[str], sender: str = "s@x.test",
             message: bytes = MESSAGE, first: bool = True) -> list[DeliveryStatus]:
    path = tmp_path / "message.eml"
    path.write_bytes(message)
    env = Envelope(sender, tuple(Recipient(a) for a in addresses), received_at=1000.0)
    entry = QueueEntry(QID, env, env.recipients, first_delivery=first)
    results: list[Any] = []
    local.deliver(entry, str(path), env.recipients).addCallback(results.extend)
    return [status for _, status in results]


def _copies(tmp_path: Path, user: str) -> list[Path]:
    box = tmp_path / "mailboxes" / user / "Maildir"
    return sorted(p for sub in ("new", "cur") if (box / sub).is_dir()
                  for p in (box / sub).iterdir())


def _all_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


# -- 1. local parts that try to leave the mailbox root --------

TRICKS = ["../x", "..", ".", "a/b", "a/../alice", "alice/..", ".hidden", "alice\x00", "alice\n",
          "alice\r\n", "x" * 65, "\uff41lice",  # fullwidth a: NFKC would make it "alice"
          "a\u0301lice", "alice\u200b", "ALİCE", "-", "alice/", "\\alice"]


@pytest.mark.parametrize("local", TRICKS)
def test_path_tricks_never_name_a_mailbox(tmp_path: Path, local: str) -> None:
    # Directories a traversal would find: ../x next to the mailbox root, a/b inside it.
    (tmp_path / "x").mkdir()
    (tmp_path / "mailboxes" / "a" / "b").mkdir(parents=True)
    local_delivery = _local(tmp_path)
    assert local_delivery.directory.resolve(local) is None
    assert safe_name(local) is None or safe_name(local) == local  # never rewritten to a path
    before = _all_files(tmp_path)
    [status] = _deliver(local_delivery, tmp_path, [f"{local}@localhost"])
    assert status.permanent
    assert _all_files(tmp_path) - before <= {"message.eml"}


def test_a_non_ascii_local_part_never_resolves_to_an_ascii_mailbox(tmp_path: Path) -> None:
    local = _local(tmp_path)
    [status] = _deliver(local, tmp_path, ["\u212aarl@localhost"])
    assert local.directory.resolve("\u212aarl") is None
    assert _copies(tmp_path, "karl") == [] and status.permanent


# -- 2. duplicates --------

def _reader_moves_new_to_cur(tmp_path: Path, user: str) -> Callable[[], None]:
    """A mail reader (Dovecot with the mailbox selected) taking new/ messages to cur/."""
    def move() -> None:
        box = tmp_path / "mailboxes" / user / "Maildir"
        if (box / "new").is_dir():
            for p in (box / "new").iterdir():
                os.rename(p, box / "cur" / f"{p.name}:2,S")
    return move


@pytest.mark.parametrize("second", ["ALICE@localhost", "alice+tag@localhost"])
def test_one_copy_when_a_reader_moves_it_between_two_recipients(tmp_path: Path,
                                                               second: str) -> None:
    local = _local(tmp_path, between=_reader_moves_new_to_cur(tmp_path, "alice"))
    statuses = _deliver(local, tmp_path, ["alice@localhost", second])
    assert all(s.ok for s in statuses)
    assert len(_copies(tmp_path, "alice")) == 1


def test_same_mailbox_twice_in_one_envelope_gives_one_copy_with_the_first_prefix(
        tmp_path: Path) -> None:
    local = _local(tmp_path)
    statuses = _deliver(local, tmp_path, ["alice@localhost", "Alice+x@LOCALHOST",
                                          "karl@localhost"])
    assert all(s.ok for s in statuses)
    [alice] = _copies(tmp_path, "alice")
    [karl] = _copies(tmp_path, "karl")
    assert alice.read_bytes().startswith(b"Return-Path: <s@x.test>\r\n"
                                         b"Delivered-To: alice@localhost\r\n")
    assert alice.name != karl.name  # one message, two recipients: two names


# -- 3. senders and messages --------

@pytest.mark.parametrize("sender,line", [
    ("", b"Return-Path: <>\r\n"),
    ('"john doe"@x.test', b'Return-Path: <"john doe"@x.test>\r\n'),
    ("j\u00f6s\u00e9@xn--bcher-kva.test", "Return-Path: <j\u00f6s\u00e9@xn--bcher-kva.test>"
     "\r\n".encode()),
])
@pytest.mark.parametrize("message", [b"", b"Subject: lf\n\nbare\nlf\n",
                                     b"Subject: x\r\n\r\nno-eol"])
def test_prefix_and_message_bytes_are_kept_verbatim(tmp_path: Path, sender: str, line: bytes,
                                                    message: bytes) -> None:
    local = _local(tmp_path)
    [status] = _deliver(local, tmp_path, ["alice@localhost"], sender=sender, message=message)
    assert status.ok
    [copy] = _copies(tmp_path, "alice")
    assert copy.read_bytes() == line + b"Delivered-To: alice@localhost\r\n" + message


# -- 4. damaged Maildirs, removed mailboxes --------

@pytest.mark.parametrize("broken", ["tmp", "new", "cur"])
def test_a_maildir_subdirectory_that_is_a_file_is_a_transient_failure(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, broken: str) -> None:
    monkeypatch.setattr(maildir, "_known_maildirs", set())
    local = _local(tmp_path)
    box = tmp_path / "mailboxes" / "alice" / "Maildir"
    box.mkdir()
    (box / broken).write_bytes(b"not a directory")
    before = _all_files(tmp_path)
    [status] = _deliver(local, tmp_path, ["alice@localhost"])
    assert status.temporary and status.enhanced == "4.2.0"
    assert (box / broken).read_bytes() == b"not a directory"
    new = {f for f in _all_files(tmp_path) - before if (tmp_path / f).is_file()}
    assert new == {"message.eml"}  # no copy anywhere (at most empty subdirectories)


def test_a_mailbox_removed_before_delivery_bounces_and_is_not_recreated(
        tmp_path: Path) -> None:
    local = _local(tmp_path)
    assert _deliver(local, tmp_path, ["alice@localhost"])[0].ok  # known to this process
    shutil.rmtree(tmp_path / "mailboxes" / "alice")  # the user was deleted
    [status] = _deliver(local, tmp_path, ["alice@localhost"], first=False)
    assert status.permanent and status.enhanced == "5.1.1"
    assert not (tmp_path / "mailboxes" / "alice").exists()


def test_a_mailbox_on_a_file_system_without_o_tmpfile_still_gets_mail(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maildir, "_known_maildirs", set())
    monkeypatch.setattr(maildir, "_unnamed_files", [])
    local = _local(tmp_path)
    assert _deliver(local, tmp_path, ["alice@localhost"])[0].ok  # the probe: supported
    if maildir._unnamed_files != [True]:
        pytest.skip("O_TMPFILE not available here at all")
    real_open = os.open
    karl = str(tmp_path / "mailboxes" / "karl")

    def nfs_open(path: Any, flags: int, *args: Any, **kw: Any) -> int:
        if flags & os.O_TMPFILE == os.O_TMPFILE and str(path).startswith(karl):
            raise OSError(errno.EOPNOTSUPP, "Operation not supported", str(path))
        return real_open(path, flags, *args, **kw)

    monkeypatch.setattr(os, "open", nfs_open)
    [status] = _deliver(local, tmp_path, ["karl@localhost"])
    assert status.ok, status.text
    assert len(_copies(tmp_path, "karl")) == 1


# -- 5. list addresses with a +tag --------

def test_an_empty_list_addressed_with_a_tag_is_treated_like_the_list(tmp_path: Path) -> None:
    local = _local(tmp_path)
    (tmp_path / "lists" / "team").write_text("# nobody yet\n")
    assert local.directory.resolve("team+x") == "team"
    plain, tagged = _deliver(local, tmp_path, ["team@localhost", "team+x@localhost"])
    assert plain.ok
    assert tagged.ok, tagged.text


# -- 6. sent archive --------

def _archiving_service(tmp_path: Path, mode: str = "TRUSTED_SUBMISSION") -> Any:
    local = _local(tmp_path, users=("alice", "bob"))
    (tmp_path / "lists" / "news").write_text("alice@localhost\n")
    config = types.SimpleNamespace(smtp=types.SimpleNamespace(
        sentArchive=types.SimpleNamespace(mode=mode),
        storage=types.SimpleNamespace(mailboxDir=str(tmp_path / "mailboxes"))))
    svc = types.SimpleNamespace(
        config=config, directory=local.directory,
        router=types.SimpleNamespace(is_local_domain=lambda d: d == "localhost"),
        _trusted=lambda ip: ip == "127.0.0.1",
        disk_io=types.SimpleNamespace(submit=lambda fn, *a: defer.maybeDeferred(fn, *a)))
    return svc


def _session(auth: str | None, ip: str = "127.0.0.1") -> SessionInfo:
    return SessionInfo("s1", ip, 1234, "client", True, auth, 587)


def test_sent_archive_goes_to_the_authenticated_user_only(tmp_path: Path) -> None:
    svc = _archiving_service(tmp_path)
    owner = SmtpService._archive_owner(svc, _session("bob"), Address("alice", "localhost"))
    assert owner == "bob"  # bob sending as alice: bob's copy, not alice's
    assert SmtpService._archive_owner(svc, _session(None, "192.0.2.9"),
                                      Address("alice", "localhost")) is None
    assert SmtpService._archive_owner(svc, _session(None), Address("alice", "remote.test")) \
        is None
    message = tmp_path / "m.eml"
    message.write_bytes(MESSAGE)
    env = Envelope("alice@localhost", (Recipient("x@remote.test"),), received_at=1000.0,
                   archive_owner=owner)
    done: list[Any] = []
    SmtpService._archive_sent(svc, QueueEntry(QID, env, env.recipients), str(message)) \
        .addCallback(done.append)
    assert done == [True]
    mailboxes = tmp_path / "mailboxes"
    [copy] = list((mailboxes / "bob" / "sent" / "new").iterdir())
    assert copy.read_bytes() == MESSAGE
    assert not (mailboxes / "alice" / "sent").exists() and _copies(tmp_path, "bob") == []


def test_no_sent_archive_for_a_list_address(tmp_path: Path) -> None:
    svc = _archiving_service(tmp_path)
    assert SmtpService._archive_owner(svc, _session(None), Address("news", "localhost")) is None
