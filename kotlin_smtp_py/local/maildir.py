"""Maildir writing: tmp → fsync → link into new/ (RFC-less but Dovecot-compatible convention).

File names are derived from the queue id and the recipient, so a redelivery of the same queue
entry after a crash finds the earlier copy and does not create a duplicate: ``link(2)`` into
``new/`` fails with EEXIST, and copies already moved to ``cur/`` by a mail reader are found by
prefix.
"""

from __future__ import annotations

import errno
import hashlib
import os
import re
import socket

from kotlin_smtp_py.diskio import sync_dir, write_all

COPY_CHUNK = 1 << 20
SMALL_MESSAGE = 64 * 1024
_SAFE_HOST = re.compile(r"[^A-Za-z0-9.-]")


def maildir_name(queue_id: str, recipient: str, received_at: float) -> str:
    """Deterministic unique name: ``<time>.Q<queue id>R<recipient hash>.<host>``."""
    digest = hashlib.sha1(recipient.lower().encode("utf-8")).hexdigest()[:12]
    host = _SAFE_HOST.sub("_", socket.gethostname()) or "localhost"
    return f"{int(received_at)}.Q{queue_id}R{digest}.{host}"


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


def ensure_maildir(root: str) -> None:
    if root in _known_maildirs and os.path.isdir(os.path.join(root, "tmp")):
        return
    for sub in ("tmp", "new", "cur"):
        os.makedirs(os.path.join(root, sub), mode=0o700, exist_ok=True)
    _known_maildirs.add(root)


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
    ensure_maildir(root)
    if check_existing and _already_delivered(root, name):
        return False
    tmp = os.path.join(root, "tmp", name)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if isinstance(message, str):
            write_all(fd, prefix)
            with open(message, "rb") as src:
                copy_file(src.fileno(), fd)
        elif len(message) < SMALL_MESSAGE:
            write_all(fd, prefix + message)  # one syscall; the copy is cheaper
        else:
            write_all(fd, prefix)
            write_all(fd, message)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, os.path.join(root, "new", name))
    except OSError as exc:
        if exc.errno != errno.EEXIST:
            raise
        os.unlink(tmp)
        return False
    os.unlink(tmp)
    sync_dir(os.path.join(root, "new"))
    return True
