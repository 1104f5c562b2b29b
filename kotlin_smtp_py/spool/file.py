"""File spool: one message file + one envelope file per queue entry, durable before the 250.

Layout under ``smtp.spool.dir``::

    tmp/      messages being received (``<id>.eml``) and envelope files being written
    queue/    committed entries: ``<id>.eml`` (raw message) and ``<id>.json`` (QueueEntry)
    corrupt/  entries whose envelope cannot be read, moved aside for an operator

Leases are flock(2) locks on ``queue/<id>.eml`` (the kernel drops them when a holder dies).
The message file is never replaced while its entry exists, unlike the envelope, so its lock
covers the entry's whole life. The first lease sets the file's sticky bit, so a lease that
finds it clear knows no delivery was ever attempted. (Up to 0.3 the leases were separate
``locks/<id>.lock`` files: one more file created and removed per entry, and ext4 without a
journal charges every file creation for the inodes freed in the last minutes, which made a
queue drain pay quadratically; stale ones are removed at start-up.)

Invariants:
- An entry exists exactly when ``queue/<id>.json`` exists. Commit writes and fsyncs both files in
  ``tmp/``, renames the message, then the envelope, then fsyncs ``queue/``; only then does the
  Deferred fire (and the client get its 250). Directory fsyncs are shared by concurrent commits
  (group commit: one per I/O batch, see ``diskio``) and every fsync runs on a disk I/O thread,
  never on the reactor thread.
- Every state change of an entry is an atomic rename of a fully written, fsync'd file.
- A process may act on an entry only while it holds the flock on its message file; several
  processes can share one spool directory. An entry ends by unlinking its envelope first, so
  a process that gets the lock after it finds the envelope gone. The in-memory due index is
  refreshed by a periodic scan so entries written by other processes are picked up.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorThreads
from twisted.logger import Logger
from zope.interface import implementer

from kotlin_smtp_py.diskio import DiskIO, sync_dir, write_all
from kotlin_smtp_py.envelope import Envelope, Recipient, is_queue_id, new_queue_id, unique_hex
from kotlin_smtp_py.interfaces import ISpool, ISpoolWriter, IWriterHint
from kotlin_smtp_py.local.maildir import copy_file, open_copy
from kotlin_smtp_py.spool.dueindex import DueIndex
from kotlin_smtp_py.spool.record import Claim, QueueEntry, QueueSummary

log = Logger()

ORPHAN_AGE_SECONDS = 3600.0  # untouched tmp/orphan files older than this belong to dead writers
WRITE_BUFFER = 256 * 1024  # a message smaller than this stays in memory until the commit
SPILL_BUFFER = 64 * 1024  # the write buffer of one that spilled: chunks are large anyway, and
# a hundred 25 MB sessions at once hold 100 of these (peak RSS 148 MiB with 256 KiB each)
COMMITTED_CACHE = 10_000


@dataclass
class _MaildirSpill:
    """A message being written straight into its only Maildir (``direct.MaildirTarget``)."""

    target: Any
    tmp: str | None  # its tmp/ path (None: an unnamed file)


@implementer(ISpoolWriter, IWriterHint)
class FileSpoolWriter:
    """Collects one message; fsync only at commit.

    A message that stays under ``WRITE_BUFFER`` never touches the disk on the reactor thread:
    the commit job on the I/O thread creates, writes and fsyncs ``tmp/<id>.eml`` (or the
    Maildir copies) in one go. Creating the file here cost ~0.35 ms per message on the
    reactor (the open hands the GIL to the I/O thread and contends for the tmp/ directory).
    Bigger messages spill into the file once they pass the buffer, so memory per session
    stays bounded. (A shared in-memory budget of 8 MiB per process, so that 1 MB messages
    never spill, was tried: W3 no faster within this VM's noise, and 100 × 25 MB sessions
    peaked at 181 MiB instead of 136-141.)

    A message for a single local recipient with a single mailbox (``expect``, direct local
    delivery) spills into its Maildir copy instead: the prefix first, then the message as it
    arrives, and the commit only fsyncs and links it. That spares a spool file created and
    removed and a copy of the whole message (30 % of the CPU of 1 MB messages, measured).
    If the commit cannot use the copy it moves the message into the spool as usual."""

    def __init__(self, spool: FileSpool, queue_id: str) -> None:
        self.queue_id = queue_id
        self._spool = spool
        self._path = os.path.join(spool.tmp_dir, queue_id + ".eml")
        self._fh: Any = None
        self._head = bytearray()
        self._size = 0
        self._done = False
        self._hint: tuple[str, tuple[Recipient, ...]] | None = None
        self._spill: _MaildirSpill | None = None
        self.error: OSError | None = None  # writing the message failed (disk full, I/O)

    def expect(self, sender: str, recipients: Any) -> None:
        self._hint = (sender, tuple(recipients))

    @property
    def size(self) -> int:
        return self._size

    def write(self, data: bytes) -> None:
        if self._done:
            raise RuntimeError("writer already finished")
        self._size += len(data)
        if self.error is not None:
            return  # the rest of the message is read and dropped; commit() fails
        try:
            if self._fh is None:
                self._head += data
                if len(self._head) > WRITE_BUFFER:
                    self._fh = self._open_spill()
                    self._fh.write(self._head)
                    self._head = bytearray()
            else:
                self._fh.write(data)
        except OSError as exc:
            # A full disk (ENOSPC/EDQUOT) or an I/O error while the message arrives: the
            # session must answer after the final dot (452/451), not lose its connection.
            log.warn("spooling {queue_id} failed: {error}", queue_id=self.queue_id,
                     error=str(exc), event="spool_error")
            self.error = exc
            self._drop_spill()

    def _drop_spill(self) -> None:
        fh, self._fh = self._fh, None
        self._head = bytearray()
        if fh is not None:
            with contextlib.suppress(OSError):
                fh.close()  # (a buffered write may fail again here)
            self._spool.discard_sync_quietly(self._path)
        if self._spill is not None and self._spill.tmp is not None:
            self._spool.discard_sync_quietly(self._spill.tmp)

    def _open_spill(self) -> Any:
        spool = self._spool
        target = None
        if self._hint is not None and spool.direct is not None:
            target = spool.direct.target(*self._hint)  # (never raises: None = spool it)
        if target is not None:
            try:
                fd, tmp = open_copy(target.root, f"{int(time.time())}.{self.queue_id}.part")
            except OSError as exc:
                log.warn("cannot write {queue_id} into {mailbox} as it arrives, spooling it: "
                         "{error}", queue_id=self.queue_id, mailbox=target.mailbox,
                         error=str(exc))
            else:
                self._spill = _MaildirSpill(target, tmp)
                fh = os.fdopen(fd, "wb", buffering=SPILL_BUFFER)
                fh.write(target.prefix)
                return fh
        fd = os.open(self._path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        return os.fdopen(fd, "wb", buffering=SPILL_BUFFER)

    def commit(self, envelope: Envelope) -> defer.Deferred[QueueEntry]:
        if self._done:
            return defer.fail(RuntimeError("writer already finished"))
        self._done = True
        if self.error is not None:
            return defer.fail(self.error)
        now = self._spool.clock_time()
        entry = QueueEntry(queue_id=self.queue_id, envelope=envelope, pending=envelope.recipients,
                           next_attempt=now, created=now)
        fh, self._fh = self._fh, None
        head, self._head = self._head, bytearray()  # handed over, not copied
        spool = self._spool
        candidates = spool.direct.candidates(envelope) if spool.direct is not None else ()
        d: defer.Deferred[QueueEntry] = spool.disk_io.submit_urgent(
            spool.accept_sync, fh, self._path, entry, head, candidates, self._spill)

        def done(stored: QueueEntry) -> QueueEntry:
            if stored.pending:
                spool.index_add(stored)
                spool.remember_committed(stored)
            return stored

        def failed(f: Any) -> Any:
            self._spool.discard_sync_quietly(self._path)
            if self._spill is not None and self._spill.tmp is not None:
                self._spool.discard_sync_quietly(self._spill.tmp)
            return f

        return d.addCallbacks(done, failed)

    def abort(self) -> None:
        if self._done:
            return
        self._done = True
        fh, self._fh = self._fh, None
        self._head = bytearray()
        if fh is not None:  # only a spilled message has a file to remove
            fh.close()
            if self._spill is None:
                self._spool.discard_sync_quietly(self._path)
            elif self._spill.tmp is not None:  # (an unnamed one is gone with its fd)
                self._spool.discard_sync_quietly(self._spill.tmp)


@dataclass
class _Held:
    token: str
    fd: int


@implementer(ISpool)
class FileSpool:
    """The default spool backend: a directory on local disk."""

    def __init__(self, directory: str, clock: Any = None, scan_interval: float = 15.0,
                 on_corrupt: Callable[[str], None] | None = None,
                 disk_io: DiskIO | None = None, share: int = 0, shares: int = 1) -> None:
        """``share`` of ``shares``: this process's place among processes sharing the
        directory (``smtp.workers``); it decides which due entries it offers first."""
        from twisted.internet import reactor

        self.directory = os.path.abspath(directory)
        self.tmp_dir = os.path.join(self.directory, "tmp")
        self.queue_dir = os.path.join(self.directory, "queue")
        self.lock_dir = os.path.join(self.directory, "locks")  # up to 0.3; emptied at start
        self.corrupt_dir = os.path.join(self.directory, "corrupt")
        self.request_dir = os.path.join(self.directory, "requests")
        for d in (self.tmp_dir, self.queue_dir, self.corrupt_dir, self.request_dir):
            os.makedirs(d, exist_ok=True)
        # Root (an operator's `sudo kotlin-smtp queue retry`) working on a spool that belongs
        # to the service user: the files it writes get the queue directory's owner, or the
        # server could no longer read the entries it rewrote.
        self._owner: tuple[int, int] | None = None
        if os.geteuid() == 0:
            st = os.stat(self.queue_dir)
            if st.st_uid != 0:
                self._owner = (st.st_uid, st.st_gid)
        self._reactor: Any = reactor
        self.clock: Any = clock if clock is not None else reactor
        self.scan_interval = scan_interval
        self._on_corrupt = on_corrupt
        self._index = DueIndex(share=share, shares=shares)
        self._recent: set[str] = set()
        self._held: dict[str, _Held] = {}
        self._committed: dict[str, QueueEntry] = {}
        self._last_scan = float("-inf")
        self._scanning: defer.Deferred[None] | None = None
        if disk_io is None:
            disk_io = DiskIO(reactor, threads=1 if IReactorThreads.providedBy(reactor) else 0)
        self.disk_io = disk_io
        self.max_message_bytes: int | None = None
        self.corrupt_count = 0
        # local.direct.DirectLocalDelivery, when smtp.spool.directLocalDelivery is on
        self.direct: Any = None
        self._merge_scan(self.scan_sync({}, initial=True))
        self._last_scan = self.clock_time()

    # -- helpers -------------------------------------------------------------------------------

    def clock_time(self) -> float:
        return float(self.clock.seconds())

    def run_in_thread(self, fn: Callable[..., Any], *args: Any) -> defer.Deferred[Any]:
        return self.disk_io.submit(fn, *args)

    def _paths(self, queue_id: str) -> tuple[str, str]:
        return (os.path.join(self.queue_dir, queue_id + ".eml"),
                os.path.join(self.queue_dir, queue_id + ".json"))

    def index_add(self, entry: QueueEntry) -> None:
        self._index.set(entry.queue_id, entry.next_attempt, own=True)
        self._recent.add(entry.queue_id)

    def remember_committed(self, entry: QueueEntry) -> None:
        """Keep a just-committed entry for its first claim (bounded: other processes sharing the
        spool may claim it instead, and then it is never asked for here)."""
        self._committed[entry.queue_id] = entry
        if len(self._committed) > COMMITTED_CACHE:
            del self._committed[next(iter(self._committed))]

    @staticmethod
    def discard_sync_quietly(path: str) -> None:
        try:
            os.unlink(path)
        except OSError:
            pass

    def _write_json_sync(self, entry: QueueEntry) -> str:
        tmp = os.path.join(self.tmp_dir, f"{entry.queue_id}.{unique_hex(4)}.json")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
        try:
            if self._owner is not None:
                os.fchown(fd, *self._owner)
            write_all(fd, entry.to_json_bytes())  # a short write (disk full) must not pass
            # The envelope's mtime is its next attempt, so a scan learns when every entry is
            # due from a stat instead of reading and parsing each file (start-up with a large
            # queue). Claims still read the file and correct the index if the two disagree.
            os.utime(fd, (entry.next_attempt, entry.next_attempt))
            os.fsync(fd)
            os.close(fd)
            fd = -1
        except BaseException:
            # Not left for the start-up sweep: on a full disk every refused commit or
            # reschedule would keep one more file of the space it is short of.
            if fd >= 0:
                with contextlib.suppress(OSError):
                    os.close(fd)
            self.discard_sync_quietly(tmp)
            raise
        return tmp

    def commit_sync(self, fh: Any, path: str, entry: QueueEntry,
                    head: bytes | bytearray = b"", attempted: bool = False) -> None:
        """Thread: write and fsync the message (``head``: a message that never spilled into
        ``fh``), write the envelope, rename both into queue/, sync the directory.
        ``attempted``: a delivery was already tried, so the entry is committed as if leased
        before (its first lease will not skip duplicate checks)."""
        def seal(fd: int) -> None:
            if attempted:
                os.fchmod(fd, 0o640 | stat.S_ISVTX)  # the mark _lock_first_sync looks for
            os.fsync(fd)

        if fh is None:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            try:
                write_all(fd, head)
                seal(fd)
            finally:
                os.close(fd)
        else:
            try:
                fh.flush()
                seal(fh.fileno())
            finally:
                fh.close()
        json_tmp = self._write_json_sync(entry)
        eml, js = self._paths(entry.queue_id)
        os.rename(path, eml)
        os.rename(json_tmp, js)
        sync_dir(self.queue_dir)

    def _finish_spill_sync(self, fh: Any, path: str, entry: QueueEntry,
                           candidates: tuple[Recipient, ...],
                           spill: _MaildirSpill) -> tuple[QueueEntry | None, Any, bool]:
        """Thread: link a message written into its Maildir as it arrived. Returns the entry
        when that delivered it; else (the final envelope does not go direct after all, or
        the link failed) the message is moved into a spool file at ``path``, returned open
        for the commit, with whether a delivery failed."""
        target = spill.target
        try:  # whatever happens, the copy's fd is closed here (an unnamed copy then vanishes)
            fh.flush()
            failed = False
            if candidates == (target.recipient,):
                if self.direct.link_sync(entry.queue_id, entry.envelope, target, fh.fileno(),
                                         spill.tmp):
                    delivered = entry.evolve(pending=(), delivered_directly=(target.recipient,))
                    return delivered, None, False
                failed = True
            elif spill.tmp is not None:
                self.discard_sync_quietly(spill.tmp)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640)
            spooled = os.fdopen(fd, "wb", buffering=0)
            try:
                os.lseek(fh.fileno(), len(target.prefix), os.SEEK_SET)
                copy_file(fh.fileno(), fd)
            except BaseException:
                spooled.close()
                raise
            return None, spooled, failed
        finally:
            fh.close()

    def accept_sync(self, fh: Any, path: str, entry: QueueEntry, head: bytes | bytearray,
                    candidates: tuple[Recipient, ...],
                    spill: _MaildirSpill | None = None) -> QueueEntry:
        """Thread: deliver ``candidates`` straight into their Maildirs (``self.direct``), then
        commit whatever is left; returns the entry as committed (``pending`` empty: nothing
        was queued, and no file of this message is left in the spool). ``spill``: the message
        was written into its Maildir as it arrived (``fh``)."""
        failed = wrote = False
        if spill is not None:
            done_entry, fh, failed = self._finish_spill_sync(fh, path, entry, candidates, spill)
            if done_entry is not None:
                return done_entry
            candidates = ()  # a single recipient: it failed, or it does not go direct
        if candidates:
            if fh is not None:
                fh.flush()
            delivered, failed = self.direct.deliver_sync(entry.queue_id, entry.envelope,
                                                         candidates,
                                                         head if fh is None else path)
            if delivered:
                wrote = True
                done = set(delivered)
                entry = entry.evolve(pending=tuple(r for r in entry.pending if r not in done),
                                     delivered_directly=delivered, delivered_before=True)
        if entry.pending:
            # attempted: copies of this message exist already (a failed list, or direct ones
            # that a queued list with the same member must not write again once a reader
            # moved them to cur/), so the first queued delivery looks for them.
            self.commit_sync(fh, path, entry, head, attempted=failed or wrote)
        elif fh is not None:
            fh.close()
            os.unlink(path)
        return entry

    # -- ISpool: receiving ---------------------------------------------------------------------

    def open_writer(self) -> FileSpoolWriter:
        return FileSpoolWriter(self, new_queue_id())

    def enqueue(self, envelope: Envelope, message: bytes) -> defer.Deferred[QueueEntry]:
        """Messages we generate (notices, reports, list expansions). Their local recipients
        may be written directly at the commit, as SMTP mail is: reported as delivered here
        (for SMTP mail the server reports after its 250)."""
        writer = self.open_writer()
        writer.write(message)
        d = writer.commit(envelope)

        def report(entry: QueueEntry) -> QueueEntry:
            if entry.delivered_directly and self.direct is not None:
                self.direct.report(entry)
            return entry

        return d.addCallback(report)

    # -- ISpool: scheduling --------------------------------------------------------------------

    def due(self, now: float, limit: int) -> defer.Deferred[list[str]]:
        d: defer.Deferred[Any]
        # abs(): after the wall clock was stepped back, rescans went on hold for the step
        if abs(now - self._last_scan) >= self.scan_interval and self._scanning is None:
            self._last_scan = now
            self._recent = set()
            d = self._scanning = self.run_in_thread(self.scan_sync, self._index.snapshot())
            d.addCallback(self._merge_scan)

            def clear(result: object) -> object:
                self._scanning = None
                return result

            d.addBoth(clear)
        else:
            d = defer.succeed(None)

        def pick(_: object) -> list[str]:
            return self._index.due(now, limit, self._held)

        return d.addCallback(pick)

    def _merge_scan(self, scanned: dict[str, float]) -> None:
        """Reactor thread: adopt a scan, keeping what this process changed while it ran."""
        merged: dict[str, float] = {}
        for qid, t in scanned.items():
            known = self._index.get(qid)
            merged[qid] = t if known is None else known
        for qid in self._recent:
            due = self._index.get(qid)
            if due is not None:
                merged[qid] = due
        self._index.replace(merged)

    def scan_sync(self, known: dict[str, float], initial: bool = False) -> dict[str, float]:
        """Thread: list queue/ (picks up entries other processes wrote); returns id -> due."""
        seen: dict[str, float] = {}
        now = time.time()
        with os.scandir(self.queue_dir) as it:
            names = [e.name for e in it]
        json_ids = {n[:-5] for n in names if n.endswith(".json")}
        for qid in json_ids:
            if qid in known:
                seen[qid] = known[qid]
                continue
            try:
                seen[qid] = os.stat(self._paths(qid)[1]).st_mtime  # = next attempt (see above)
            except FileNotFoundError:
                continue  # completed since the listing
        if initial:
            self._cleanup_orphans_sync(names, json_ids, now)
        return seen

    def _cleanup_orphans_sync(self, names: list[str], json_ids: set[str], now: float) -> None:
        """Remove files of crashed commits/deletes (never acknowledged) once clearly stale."""
        for name in names:
            if (name.endswith(".eml") and name[:-4] not in json_ids) or \
                    name.startswith(".probe-"):  # readiness probe of a crashed process
                self._remove_if_stale(os.path.join(self.queue_dir, name), now)
        with os.scandir(self.tmp_dir) as it:
            for e in it:
                self._remove_if_stale(e.path, now)
        try:
            with os.scandir(self.lock_dir) as it:
                for e in it:
                    self._remove_if_stale(e.path, now)
        except FileNotFoundError:
            pass

    @staticmethod
    def _remove_if_stale(path: str, now: float) -> None:
        try:
            if now - os.stat(path).st_mtime > ORPHAN_AGE_SECONDS:
                os.unlink(path)
                log.info("removed stale spool file {path}", path=path)
        except OSError:
            pass

    def _read_entry_sync(self, queue_id: str) -> QueueEntry | None:
        _, js = self._paths(queue_id)
        try:
            with open(js, "rb") as fh:
                raw = fh.read()
        except FileNotFoundError:
            return None
        try:
            entry = QueueEntry.from_json_bytes(raw)
            if entry.queue_id != queue_id:
                raise ValueError("queue id mismatch")
            return entry
        except (ValueError, KeyError, TypeError, ArithmeticError) as exc:  # ("attempts": 1e999)
            self._move_corrupt_sync(queue_id, str(exc))
            return None

    def _move_corrupt_sync(self, queue_id: str, why: str) -> None:
        # The envelope first: it is what makes the entry exist (and a message file without
        # one is an orphan, never an entry without its message).
        for path in reversed(self._paths(queue_id)):
            try:
                os.rename(path, os.path.join(self.corrupt_dir, os.path.basename(path)))
            except OSError:
                pass
        log.error("corrupt spool entry {queue_id} moved to corrupt/: {why}", queue_id=queue_id,
                  why=why, event="spool_entry_corrupt")
        self._reactor.callFromThread(self._forget_corrupt, queue_id)

    def _forget_corrupt(self, queue_id: str) -> None:
        self.corrupt_count += 1
        self._index.discard(queue_id)
        if self._on_corrupt is not None:
            self._on_corrupt(queue_id)

    # -- ISpool: leases ------------------------------------------------------------------------

    def _lock_sync(self, queue_id: str) -> int | None:
        return self._lock_first_sync(queue_id)[0]

    def _lock_first_sync(self, queue_id: str) -> tuple[int | None, bool]:
        """(lock fd or None, whether this is the entry's first lease ever). The lock is on the
        message file; its sticky bit, set by the first lease, records that one existed."""
        eml, js = self._paths(queue_id)
        try:
            fd = os.open(eml, os.O_RDONLY)
        except FileNotFoundError:
            return None, False  # completed (or never committed)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                return None, False
            raise
        try:
            if not os.path.exists(js):  # completed by someone else between scan and lock
                os.close(fd)
                return None, False
            mode = os.fstat(fd).st_mode
            first = not mode & stat.S_ISVTX
            if first:
                # Not fsync'd: lost only to a power failure, and then a redelivery merely
                # skips the duplicate scan of cur/ (a copy still in new/ is caught anyway).
                os.fchmod(fd, stat.S_IMODE(mode) | stat.S_ISVTX)
        except BaseException:
            os.close(fd)
            raise
        return fd, first

    def _claim_sync(self, queue_id: str,
                    committed: QueueEntry | None = None) -> tuple[Claim, int] | bool:
        """Thread: the claim and its lock fd, or False when the entry is gone, True if locked.

        ``committed`` is the entry as this process committed it: on a first lease nobody can
        have changed the file since, so it stands in for reading and parsing it again."""
        fd, first = self._lock_first_sync(queue_id)
        if fd is None:
            eml, js = self._paths(queue_id)
            if not os.path.exists(js):
                return False
            if not os.path.exists(eml):
                # An envelope without its message (the message file is renamed in before the
                # envelope and unlinked after it, so this is damage, not a race): set it aside
                # and count it instead of taking it for an entry locked elsewhere forever.
                self._move_corrupt_sync(queue_id, "its message file is missing")
                return False
            return True
        try:
            entry = committed if first and committed is not None else \
                self._read_entry_sync(queue_id)
        except BaseException:  # EIO and the like: the lock must not outlive this attempt
            os.close(fd)
            raise
        if entry is None:
            os.close(fd)
            return False
        if first:
            entry = entry.evolve(first_delivery=True)
        return Claim(entry, unique_hex(8), self._paths(queue_id)[0]), fd

    def claim(self, queue_id: str) -> defer.Deferred[Claim | None]:
        if queue_id in self._held or not is_queue_id(queue_id):
            return defer.succeed(None)

        def done(result: tuple[Claim, int] | bool) -> Claim | None:
            if isinstance(result, bool):
                if not result:
                    self._index.discard(queue_id)
                return None
            claim, fd = result
            self._held[queue_id] = _Held(claim.token, fd)
            # The file is the truth; an index learnt from mtimes (or written by an older
            # version) may be early, and the scheduler releases an entry that is not due yet.
            self._index.set(queue_id, claim.entry.next_attempt)
            return claim

        return self.run_in_thread(self._claim_sync, queue_id,
                                  self._committed.pop(queue_id, None)).addCallback(done)

    def _check(self, claim: Claim) -> _Held:
        held = self._held.get(claim.entry.queue_id)
        if held is None or held.token != claim.token:
            raise LookupError(f"lease on {claim.entry.queue_id} is not held")
        return held

    def _complete_sync(self, claim: Claim, held: _Held) -> None:
        eml, js = self._paths(claim.entry.queue_id)
        try:
            # No directory fsync here: the delivery itself is already durable, and an unlink
            # lost to a power failure means a redelivery (Maildir names make that a no-op
            # locally; SMTP tolerates duplicates over loss), like Postfix's queue removal.
            # The envelope goes first: it is what makes the entry exist (see _lock_first_sync).
            os.unlink(js)
            self.discard_sync_quietly(eml)
        finally:
            os.close(held.fd)

    def _end_claim(self, claim: Claim, work: Callable[[_Held], None],
                   next_due: float | None) -> defer.Deferred[None]:
        """Run ``work`` (which closes the lease) in a thread; then forget the lease and either
        drop the entry from the due index (``next_due`` None) or re-index it."""
        try:
            held = self._check(claim)
        except LookupError as exc:
            return defer.fail(exc)
        qid = claim.entry.queue_id
        # The lease is handed to ``work`` now: release_all (shutdown) must not close its fd
        # while the job is queued or running (a double close could hit a reused fd number).
        del self._held[qid]

        def done(result: object) -> object:
            if next_due is None:
                self._index.discard(qid)
            else:
                self._index.set(qid, next_due)
            return result

        return self.run_in_thread(work, held).addBoth(done)

    def complete(self, claim: Claim) -> defer.Deferred[None]:
        return self._end_claim(claim, lambda held: self._complete_sync(claim, held), None)

    def _update_sync(self, entry: QueueEntry) -> None:
        tmp = self._write_json_sync(entry)
        os.rename(tmp, self._paths(entry.queue_id)[1])
        sync_dir(self.queue_dir)

    def _reschedule_sync(self, entry: QueueEntry, held: _Held) -> None:
        try:
            self._update_sync(entry)
        finally:
            os.close(held.fd)

    def reschedule(self, claim: Claim, entry: QueueEntry) -> defer.Deferred[None]:
        return self._end_claim(claim, lambda held: self._reschedule_sync(entry, held),
                               entry.next_attempt)

    def release(self, claim: Claim) -> defer.Deferred[None]:
        held = self._held.get(claim.entry.queue_id)
        if held is not None and held.token == claim.token:
            del self._held[claim.entry.queue_id]
            os.close(held.fd)
        return defer.succeed(None)

    def release_all(self) -> None:
        """Drop every lease (shutdown): the entries stay queued for the next run."""
        for held in self._held.values():
            os.close(held.fd)
        self._held.clear()

    # -- ISpool: inspection and operator actions -----------------------------------------------

    def pending_count(self) -> int:
        return len(self._index)

    def _list_sync(self) -> list[QueueSummary]:
        out = []
        with os.scandir(self.queue_dir) as it:
            ids = sorted(e.name[:-5] for e in it if e.name.endswith(".json"))
        for qid in ids:
            entry = self._read_entry_sync(qid)
            if entry is None:
                continue
            env = entry.envelope
            out.append(QueueSummary(qid, env.sender, tuple(r.address for r in entry.pending),
                                    env.size, entry.attempts, entry.next_attempt, entry.created,
                                    entry.last_error))
        return out

    def list_entries(self) -> defer.Deferred[list[QueueSummary]]:
        return self.run_in_thread(self._list_sync)

    def get(self, queue_id: str) -> defer.Deferred[QueueEntry | None]:
        if not is_queue_id(queue_id):
            return defer.succeed(None)
        return self.run_in_thread(self._read_entry_sync, queue_id)

    def _read_message_sync(self, queue_id: str) -> bytes | None:
        try:
            with open(self._paths(queue_id)[0], "rb") as fh:
                return fh.read()
        except FileNotFoundError:
            return None

    def read_message(self, queue_id: str) -> defer.Deferred[bytes | None]:
        if not is_queue_id(queue_id):
            return defer.succeed(None)
        return self.run_in_thread(self._read_message_sync, queue_id)

    def _delete_sync(self, queue_id: str) -> bool:
        fd = self._lock_sync(queue_id)
        if fd is None:
            return False
        self._complete_sync(Claim(QueueEntry(queue_id, Envelope("", ()), ()), "", ""),
                            _Held("", fd))
        return True

    def delete(self, queue_id: str) -> defer.Deferred[bool]:
        if not is_queue_id(queue_id) or queue_id in self._held:
            return defer.succeed(False)

        def done(ok: bool) -> bool:
            if ok:
                self._index.discard(queue_id)
            return ok

        return self.run_in_thread(self._delete_sync, queue_id).addCallback(done)

    def _retry_sync(self, ids: list[str], now: float) -> list[str]:
        changed = []
        for qid in ids:
            fd = self._lock_sync(qid)
            if fd is None:
                continue
            try:
                entry = self._read_entry_sync(qid)
                if entry is not None:
                    self._update_sync(entry.evolve(next_attempt=now))
                    changed.append(qid)
            finally:
                os.close(fd)
        return changed

    def retry_now(self, queue_id: str | None) -> defer.Deferred[int]:
        if queue_id is not None and not is_queue_id(queue_id):
            return defer.succeed(0)
        now = self.clock_time()

        def ids() -> list[str]:
            if queue_id is not None:
                return [queue_id]
            with os.scandir(self.queue_dir) as it:
                return [e.name[:-5] for e in it if e.name.endswith(".json")]

        def done(changed: list[str]) -> int:
            for qid in changed:
                self._index.set(qid, now)
            return len(changed)

        return self.run_in_thread(lambda: self._retry_sync(ids(), now)).addCallback(done)

    # -- requests from operator commands in other processes ------------------------------------

    def request_retry(self, queue_id: str | None) -> None:
        """Ask a running server sharing this directory to retry one entry (or all) now."""
        name = "flush" if queue_id is None else f"retry-{queue_id}"
        if queue_id is not None and not is_queue_id(queue_id):
            raise ValueError(f"not a queue id: {queue_id!r}")
        self._touch(os.path.join(self.request_dir, name))

    def _touch(self, path: str) -> None:
        with open(path, "a") as fh:
            if self._owner is not None:
                os.fchown(fh.fileno(), *self._owner)
            # Through the descriptor: a running server may take (rename or remove) the request
            # file at any moment, and a utime by path then failed with ENOENT.
            os.utime(fh.fileno())

    def note_trigger(self) -> None:
        """A trigger (ETRN) ran now: ``queue flush`` honours its cooldown too."""
        path = os.path.join(self.request_dir, "flush.done")
        try:
            self._touch(path)
        except OSError as exc:  # a missing mark only shortens one cooldown
            log.warn("cannot mark the trigger time in {path}: {error}", path=path,
                     error=str(exc))

    def last_flush_request(self) -> float:
        times = [0.0]
        for name in ("flush", "flush.done"):
            try:
                times.append(os.stat(os.path.join(self.request_dir, name)).st_mtime)
            except OSError:
                pass
        return max(times)

    def _take_requests_sync(self) -> list[str | None]:
        taken: list[str | None] = []
        with os.scandir(self.request_dir) as it:
            names = [e.name for e in it]
        for name in names:
            if name == "flush":
                taken.append(None)
                # flush.done keeps the request time: the CLI's cooldown clock.
                os.replace(os.path.join(self.request_dir, name),
                           os.path.join(self.request_dir, "flush.done"))
            elif name.startswith("retry-") and is_queue_id(name[6:]):
                taken.append(name[6:])
                self.discard_sync_quietly(os.path.join(self.request_dir, name))
        return taken

    def poll_requests(self) -> defer.Deferred[int]:
        """Apply pending operator requests; returns how many entries were made due."""
        @defer.inlineCallbacks
        def apply(requests: list[str | None]) -> Any:
            total = 0
            for qid in requests:
                total += yield self.retry_now(qid)
            return total

        return self.run_in_thread(self._take_requests_sync).addCallback(apply)

    def healthy(self) -> defer.Deferred[tuple[bool, str]]:
        """Readiness: the spool directories exist and files can be created in both (as
        root, ``os.access`` says yes to nearly anything, so try it): a commit writes in
        ``tmp/`` and renames into ``queue/``, and either refusing means 451 for every message."""
        def probe() -> tuple[bool, str]:
            for d in (self.queue_dir, self.tmp_dir):
                if not os.path.isdir(d):
                    return False, f"{d} is not a directory"
            for d in (self.tmp_dir, self.queue_dir):
                # A dot name: scans of queue/ only look at queue ids.
                path = os.path.join(d, f".probe-{unique_hex(4)}")
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                    os.close(fd)
                    os.unlink(path)
                except OSError as exc:
                    return False, f"cannot create files in {d}: {exc.strerror}"
            return True, "ok"

        return self.run_in_thread(probe)
