"""File spool: a first lease is recognisable (it sets the message file's sticky bit), and
Maildir duplicate checks rely on that: a first delivery skips them, any later one still finds
earlier copies. A lease creates no file."""

from __future__ import annotations

import os
import stat
import time
from pathlib import Path

from helpers import on_reactor

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.local.maildir import write_maildir
from kotlin_smtp_py.spool.file import FileSpool
from kotlin_smtp_py.spool.record import QueueEntry

BODY = b"Subject: hi\r\n\r\nHello\r\n"


def store(spool: FileSpool) -> QueueEntry:
    env = Envelope(sender="a@example.org", recipients=(Recipient("b@example.net"),),
                   size=len(BODY))
    entry: QueueEntry = on_reactor(spool.enqueue, env, BODY)
    return entry


def test_only_the_first_lease_is_marked_first(tmp_path: Path, reactor_thread: None) -> None:
    spool = on_reactor(FileSpool, str(tmp_path / "spool"))
    entry = store(spool)
    first = on_reactor(spool.claim, entry.queue_id)
    assert first is not None and first.entry.first_delivery
    assert first.entry == entry  # same data; the flag is not part of the value
    on_reactor(spool.release, first)  # e.g. shutdown mid-delivery: some copies may exist now
    again = on_reactor(spool.claim, entry.queue_id)
    assert again is not None and not again.entry.first_delivery
    on_reactor(spool.release_all)


def test_another_process_taking_the_first_lease_reads_the_file(tmp_path: Path,
                                                              reactor_thread: None) -> None:
    writer = on_reactor(FileSpool, str(tmp_path / "spool"))
    reader = on_reactor(FileSpool, str(tmp_path / "spool"))
    entry = store(writer)
    got = on_reactor(reader.claim, entry.queue_id)
    assert got is not None and got.entry.first_delivery and got.entry == entry
    # The writer cannot lease it now, and once the reader releases it, it is no longer first.
    assert on_reactor(writer.claim, entry.queue_id) is None
    on_reactor(reader.release, got)
    later = on_reactor(writer.claim, entry.queue_id)
    assert later is not None and not later.entry.first_delivery
    on_reactor(writer.release_all)


def test_first_lease_uses_the_committed_copy_later_ones_read_disk(
        tmp_path: Path, reactor_thread: None) -> None:
    spool = on_reactor(FileSpool, str(tmp_path / "spool"))
    entry = store(spool)
    js = tmp_path / "spool" / "queue" / f"{entry.queue_id}.json"
    good = js.read_bytes()
    js.write_bytes(b"{ damaged")
    first = on_reactor(spool.claim, entry.queue_id)
    assert first is not None and first.entry == entry  # what was committed, not the damage
    on_reactor(spool.release, first)
    assert on_reactor(spool.claim, entry.queue_id) is None  # the re-read finds the damage
    assert (tmp_path / "spool" / "corrupt" / f"{entry.queue_id}.json").read_bytes() != good


def _maildir_files(root: Path) -> list[str]:
    return sorted(p.name for sub in ("new", "cur") if (root / sub).is_dir()
                  for p in (root / sub).iterdir())


def test_redelivery_finds_a_copy_the_reader_moved_to_cur(tmp_path: Path) -> None:
    msg = tmp_path / "m.eml"
    msg.write_bytes(BODY)
    box = tmp_path / "Maildir"
    assert write_maildir(str(box), "100.QabcRdef.host", b"", str(msg), check_existing=False)
    os.rename(box / "new" / "100.QabcRdef.host", box / "cur" / "100.QabcRdef.host:2,S")
    # A later attempt (check_existing, the default) must not add a second copy ...
    assert not write_maildir(str(box), "100.QabcRdef.host", b"", str(msg))
    assert _maildir_files(box) == ["100.QabcRdef.host:2,S"]
    # ... and even a first attempt cannot duplicate a copy that is still in new/.
    assert write_maildir(str(box), "200.QxyzRdef.host", b"", str(msg), check_existing=False)
    assert not write_maildir(str(box), "200.QxyzRdef.host", b"", str(msg),
                             check_existing=False)
    assert _maildir_files(box) == ["100.QabcRdef.host:2,S", "200.QxyzRdef.host"]
    assert list((box / "tmp").iterdir()) == []


def test_a_lease_creates_no_file_and_old_lock_files_are_cleared(tmp_path: Path,
                                                                reactor_thread: None) -> None:
    """Leases lock the message file itself: on ext4 without a journal every file creation
    pays for recently freed inodes, so a drain that created a lock file per entry slowed down
    as it went. Lock files left by older versions go at start-up once stale."""
    root = tmp_path / "spool"
    (root / "locks").mkdir(parents=True)
    stale = root / "locks" / "0123456789abcdef.lock"
    stale.write_bytes(b"")
    os.utime(stale, (time.time() - 7200, time.time() - 7200))
    spool = on_reactor(FileSpool, str(root))
    assert not stale.exists()
    entry = store(spool)

    def files() -> list[str]:
        return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())

    before = files()
    claim = on_reactor(spool.claim, entry.queue_id)
    assert claim is not None and files() == before
    eml = root / "queue" / f"{entry.queue_id}.eml"
    assert eml.stat().st_mode & stat.S_ISVTX  # the mark of a lease having existed
    on_reactor(spool.complete, claim)
    assert files() == []
