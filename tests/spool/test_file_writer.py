"""FileSpoolWriter: small messages stay in memory until the commit writes them off the reactor
thread; big ones spill into tmp/ once past the buffer. Either way the queued bytes are exact."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from helpers import on_reactor

from kotlin_smtp_py.envelope import Envelope, Recipient
from kotlin_smtp_py.spool.file import WRITE_BUFFER, FileSpool

ENV = Envelope(sender="a@example.org", recipients=(Recipient("b@example.net"),))


@pytest.mark.parametrize("size,spills", [(3000, False), (WRITE_BUFFER * 3 + 17, True)])
def test_bytes_are_exact_and_only_big_messages_touch_tmp_early(
        tmp_path: Path, reactor_thread: None, size: int, spills: bool) -> None:
    spool = on_reactor(FileSpool, str(tmp_path / "spool"))
    body = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    writer = on_reactor(spool.open_writer)
    for i in range(0, len(body), 4096):
        on_reactor(writer.write, body[i:i + 4096])
    tmp = tmp_path / "spool" / "tmp" / f"{writer.queue_id}.eml"
    assert tmp.exists() is spills
    entry = on_reactor(writer.commit, ENV)
    queued = tmp_path / "spool" / "queue" / f"{entry.queue_id}.eml"
    assert queued.read_bytes() == body
    assert stat.S_IMODE(os.stat(queued).st_mode) == 0o640
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    on_reactor(spool.release_all)


@pytest.mark.parametrize("size", [100, WRITE_BUFFER + 1])
def test_abort_leaves_nothing_behind(tmp_path: Path, reactor_thread: None, size: int) -> None:
    spool = on_reactor(FileSpool, str(tmp_path / "spool"))
    writer = on_reactor(spool.open_writer)
    on_reactor(writer.write, b"y" * size)
    on_reactor(writer.abort)
    assert list((tmp_path / "spool" / "tmp").iterdir()) == []
    assert list((tmp_path / "spool" / "queue").iterdir()) == []
