"""Maildir copies: exact bytes, never visible half-written, no duplicates, in both ways of
creating the file (an unnamed O_TMPFILE file in new/, or tmp/<name>)."""

from __future__ import annotations

import errno
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from kotlin_smtp_py.local import maildir

PREFIX = b"Return-Path: <a@example.org>\r\nDelivered-To: b@example.net\r\n"
BODY = b"Subject: hi\r\n\r\n" + b"line\r\n" * 20_000  # past SMALL_MESSAGE: two writes


@pytest.fixture(params=["unnamed", "tmp"])
def mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch,
         tmp_path: Path) -> Iterator[str]:
    if request.param == "unnamed":
        probe = tmp_path / "probe"
        probe.mkdir()
        # Linux on ext4 (this project's CI) supports it; a skip anywhere else says why.
        if not maildir._probe_unnamed_files(str(probe)):
            pytest.skip("O_TMPFILE + linkat through /proc not available here")
        assert list(probe.iterdir()) == []  # the probe cleans up after itself
    monkeypatch.setattr(maildir, "_unnamed_files", [request.param == "unnamed"])
    yield request.param


def files(box: Path) -> dict[str, list[str]]:
    return {sub: sorted(p.name for p in (box / sub).iterdir()) for sub in ("tmp", "new", "cur")}


@pytest.mark.parametrize("source", ["bytes", "small", "path"])
def test_copy_is_exact_private_and_only_in_new(tmp_path: Path, mode: str, source: str) -> None:
    box = tmp_path / "Maildir"
    msg = tmp_path / "m.eml"
    msg.write_bytes(BODY)
    message: str | bytes = {"bytes": BODY, "small": BODY[:200], "path": str(msg)}[source]
    expected = PREFIX + (BODY[:200] if source == "small" else BODY)
    assert maildir.write_maildir(str(box), "1.QaRb.host", PREFIX, message, check_existing=False)
    assert files(box) == {"tmp": [], "new": ["1.QaRb.host"], "cur": []}
    copy = box / "new" / "1.QaRb.host"
    assert copy.read_bytes() == expected
    assert stat.S_IMODE(copy.stat().st_mode) == 0o600
    # The same name again: the first copy wins, nothing is left behind.
    assert not maildir.write_maildir(str(box), "1.QaRb.host", b"X", b"other",
                                     check_existing=False)
    assert copy.read_bytes() == expected
    assert files(box)["tmp"] == []


def test_a_failed_write_leaves_no_trace(tmp_path: Path, mode: str) -> None:
    box = tmp_path / "Maildir"
    with pytest.raises(FileNotFoundError):
        maildir.write_maildir(str(box), "2.QaRb.host", PREFIX, str(tmp_path / "missing.eml"))
    assert files(box) == {"tmp": [], "new": [], "cur": []}


def test_a_mailbox_removed_while_running_is_created_again(tmp_path: Path, mode: str) -> None:
    box = tmp_path / "Maildir"
    assert maildir.write_maildir(str(box), "3.QaRb.host", PREFIX, BODY)
    shutil.rmtree(box)  # the process still believes the directories exist
    assert maildir.write_maildir(str(box), "4.QaRb.host", PREFIX, BODY)
    assert files(box)["new"] == ["4.QaRb.host"]


def test_copy_falls_back_to_read_write_where_the_kernel_cannot_copy(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    src = tmp_path / "src"
    src.write_bytes(BODY)
    dst = tmp_path / "dst"
    with open(src, "rb") as s, open(dst, "wb") as d:
        d.write(b"head:")
        d.flush()
        maildir.copy_file(s.fileno(), d.fileno())
    assert dst.read_bytes() == b"head:" + BODY


def test_maildir_names_are_stable_per_recipient() -> None:
    a = maildir.maildir_name("q1", "Alice@Example.org", 1000.7)
    assert a == maildir.maildir_name("q1", "alice@example.org", 1000.2)
    assert a != maildir.maildir_name("q1", "bob@example.org", 1000.2)
    assert a.startswith("1000.Qq1R")


def cached_pages(path: Path) -> int:
    """Pages of ``path`` in the page cache: mincore(2) on a private mapping (reads nothing)."""
    import ctypes
    import mmap

    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    vec = (ctypes.c_ubyte * -(-size // mmap.PAGESIZE))()
    with open(path, "rb") as fh:
        mm = mmap.mmap(fh.fileno(), size, access=mmap.ACCESS_COPY)
        try:
            anchor = ctypes.c_char.from_buffer(mm)
            rc = libc.mincore(ctypes.addressof(anchor), size, vec)
            del anchor
        finally:
            mm.close()
    assert rc == 0, ctypes.get_errno()
    return sum(v & 1 for v in vec)


@pytest.mark.parametrize("source", ["bytes", "path"])
def test_large_copies_leave_the_page_cache_small_ones_stay(tmp_path: Path, mode: str,
                                                           source: str) -> None:
    box = tmp_path / "box"
    for size, dropped in ((8 * 1024, False), (maildir.DROP_CACHE_BYTES + 4096, True)):
        message = b"x" * (size - 2) + b"\r\n"
        if source == "path":
            spooled = tmp_path / f"spooled-{size}"
            spooled.write_bytes(message)
        name = f"copy-{size}"
        assert maildir.write_maildir(str(box), name, PREFIX,
                                     str(spooled) if source == "path" else message)
        copy = box / "new" / name
        assert copy.read_bytes() == PREFIX + message
        if dropped:
            # Reading it back above cached it again: write once more, then look.
            copy.unlink()
            assert maildir.write_maildir(str(box), name, PREFIX,
                                         str(spooled) if source == "path" else message)
            assert cached_pages(copy) == 0
        else:
            assert cached_pages(copy) > 0
