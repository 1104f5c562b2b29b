"""Maildir writing: write → fsync → link into new/ (RFC-less but Dovecot-compatible convention).

The copy is written into an unnamed file in ``new/`` (``O_TMPFILE``) and given its name with
``linkat(2)``, where the kernel and ``/proc`` allow it (probed once per process); elsewhere into
``tmp/<name>``, linked into ``new/`` and unlinked from ``tmp/``, as the Maildir convention says.
Either way a reader never sees a partial message.

File names are derived from the queue id and the recipient, so a redelivery of the same queue
entry after a crash finds the earlier copy and does not create a duplicate: ``link(2)`` into
``new/`` fails with EEXIST, and copies already moved to ``cur/`` by a mail reader are found by
prefix.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import os
import re
import socket

from kotlin_smtp_py.diskio import sync_dir, write_all
from kotlin_smtp_py.envelope import unique_hex

COPY_CHUNK = 1 << 20
SMALL_MESSAGE = 64 * 1024
# A copy at least this large leaves the page cache once it is on disk: we never read it again
# (the mail reader will, later or never), and keeping every delivered attachment cached makes
# each new message take pages nobody has used yet. On this project's 2-core VM, a server that
# had delivered ~2 GB of 1 MB messages went from 6.5 to 9.6 ms of CPU per message, and back
# after the cache was dropped. (PostgreSQL drops WAL segments from the cache the same way.)
DROP_CACHE_BYTES = 256 * 1024
_SAFE_HOST = re.compile(r"[^A-Za-z0-9.-]")


_host: list[str] = []  # gethostname(2) once per process, not once per copy


@functools.lru_cache(maxsize=1024)  # a few mailboxes get most of the mail
def _recipient_digest(recipient: str) -> str:
    return hashlib.sha1(recipient.lower().encode("utf-8")).hexdigest()[:12]


def maildir_name(queue_id: str, recipient: str, received_at: float) -> str:
    """Deterministic unique name: ``<time>.Q<queue id>R<recipient hash>.<host>``."""
    digest = _recipient_digest(recipient)
    if not _host:
        _host.append(_SAFE_HOST.sub("_", socket.gethostname()) or "localhost")
    return f"{int(received_at)}.Q{queue_id}R{digest}.{_host[0]}"


def copy_file(src: int, dst: int) -> None:
    """Append the rest of ``src`` to ``dst``: in the kernel (``copy_file_range(2)``, no copy
    through Python) where it works, else by reading and writing."""
    try:
        while os.copy_file_range(src, dst, COPY_CHUNK):
            pass
        return
    except OSError as exc:  # EXDEV/EINVAL/ENOSYS: other file systems, old kernels
        if exc.errno not in (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
    while chunk := os.read(src, COPY_CHUNK):
        write_all(dst, chunk)


_known_maildirs: set[str] = set()
# Whether an unnamed file (O_TMPFILE) in new/ can be given its name with linkat(2) through
# /proc/self/fd here: one element once the first Maildir of the process has been probed.
_unnamed_files: list[bool] = []


def ensure_maildir(root: str, fresh: bool = False) -> None:
    """Create ``tmp``, ``new`` and ``cur`` once per process (``fresh``: again, because a write
    found one missing: an operator removed the mailbox while we run)."""
    if root in _known_maildirs and not fresh:
        return
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
    _known_maildirs.add(root)
    if not _unnamed_files:
        _unnamed_files.append(_probe_unnamed_files(os.path.join(root, "new")))


def _probe_unnamed_files(directory: str) -> bool:
    try:
        fd = os.open(directory, os.O_TMPFILE | os.O_WRONLY, 0o600)
    except OSError:
        return False  # EOPNOTSUPP (file system), EISDIR/EINVAL (kernel)
    probe = os.path.join(directory, f".probe-{os.getpid()}-{unique_hex(4)}")
    try:
        _link_unnamed(fd, probe)
    except OSError:
        return False  # no /proc (some sandboxes)
    finally:
        os.close(fd)
    os.unlink(probe)
    return True


def _link_unnamed(fd: int, dest: str) -> None:
    # linkat(2) with AT_SYMLINK_FOLLOW through /proc. Python calls plain link(2) (which
    # refuses with EXDEV) unless a dir fd is given; the absolute source path ignores it.
    os.link(f"/proc/self/fd/{fd}", dest, src_dir_fd=fd, follow_symlinks=True)


def _create(root: str, name: str) -> tuple[int, str | None]:
    """An fd to write the copy into, and its tmp/ path (None: an unnamed file in new/, which
    no reader can see before it is linked, and which vanishes by itself if we die first;
    it also spares a directory entry created and removed in tmp/ per copy). Readable too:
    a message written here as it arrives may have to be copied back into the spool."""
    if _unnamed_files and _unnamed_files[0]:
        try:
            return os.open(os.path.join(root, "new"), os.O_TMPFILE | os.O_RDWR, 0o600), None
        except OSError as exc:
            # The probe ran on one mailbox; this one may live on a file system without
            # O_TMPFILE (NFS, CIFS, a symlink to another disk): use tmp/ for it.
            if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
                raise
    tmp = os.path.join(root, "tmp", name)
    return os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600), tmp


def open_copy(root: str, tmp_name: str) -> tuple[int, str | None]:
    """Start a copy in Maildir ``root``: an fd to write it into, and its ``tmp/`` path (None:
    unnamed). Finish it with :func:`finish_copy`, or close the fd and remove the path."""
    ensure_maildir(root)
    try:
        return _create(root, tmp_name)
    except FileNotFoundError:  # the mailbox was removed while we run
        ensure_maildir(root, fresh=True)
        return _create(root, tmp_name)


def finish_copy(root: str, name: str, fd: int, tmp: str | None,
                drop_cache: bool = False) -> bool:
    """fsync the copy in ``fd`` and give it its name in ``new/``; False if a copy of that
    name is there already. The caller closes ``fd``; ``tmp`` is removed either way.
    ``drop_cache``: a large copy, dropped from the page cache once written (DROP_CACHE_BYTES).
    Blocking; inside a ``DiskIO`` job ``new/`` is fsync'd at the end of the batch."""
    dest = os.path.join(root, "new", name)
    try:
        os.fsync(fd)
        if drop_cache:  # clean after the fsync, so the kernel frees the pages at once
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # link(2), never rename: an existing copy (a redelivery) must win, not be replaced.
        if tmp is None:
            _link_unnamed(fd, dest)
        else:
            os.link(tmp, dest)
    except FileExistsError:
        return False
    finally:
        _remove_tmp(tmp)
    sync_dir(os.path.join(root, "new"))
    return True


def _remove_tmp(tmp: str | None) -> None:
    if tmp is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def _already_delivered(root: str, name: str) -> bool:
    if os.path.exists(os.path.join(root, "new", name)):
        return True
    try:
        with os.scandir(os.path.join(root, "cur")) as it:
            return any(e.name == name or e.name.startswith(name + ":") for e in it)
    except FileNotFoundError:
        return False


def write_maildir(root: str, name: str, prefix: bytes, message: str | bytes | bytearray,
                  check_existing: bool = True) -> bool:
    """Deliver ``prefix`` + the message into Maildir ``root``; False if already there.

    ``message`` is the path of a file holding the message, or the message itself.

    ``check_existing`` False skips looking for an earlier copy in ``new/`` and ``cur/`` (a scan
    of ``cur/``): for a first delivery attempt, where none can exist. A copy in ``new/`` is
    still caught by ``link(2)``.

    Blocking (fsync): call from a thread (a ``DiskIO`` job, which fsyncs ``new/`` for the
    whole batch before reporting success).
    """
    if check_existing and _already_delivered(root, name):  # (works on a missing Maildir too)
        return False
    fd, tmp = open_copy(root, name)
    try:
        try:
            if isinstance(message, str):
                write_all(fd, prefix)
                with open(message, "rb") as src:
                    large = os.fstat(src.fileno()).st_size >= DROP_CACHE_BYTES
                    copy_file(src.fileno(), fd)
            elif len(message) < SMALL_MESSAGE:
                large = False
                write_all(fd, prefix + message)  # one syscall; the copy is cheaper
            else:
                large = len(message) >= DROP_CACHE_BYTES
                write_all(fd, prefix)
                write_all(fd, message)
        except BaseException:
            _remove_tmp(tmp)
            raise
        return finish_copy(root, name, fd, tmp, drop_cache=large)
    finally:
        os.close(fd)
