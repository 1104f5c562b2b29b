"""Big messages against a real twistd process: memory per session stays bounded, and the size
limit is enforced (SIZE at MAIL, and after DATA/BDAT) without breaking the session.

RSS is sampled from /proc/<pid>/status (VmRSS) in a thread while a ~24 MB message streams in
(under the 26214400-byte default, leaving room for the Received header) and is delivered.
"""

from __future__ import annotations

import hashlib
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from helpers import wait_until
from mtaproc import MtaPool, MtaProcess, maildir_files, spool_entries, vm_rss_kib

BIG = 24 * 1024 * 1024
# Streaming needs a few buffers of 256 KiB; any full in-memory copy of the 24 MiB message
# (even a single bytes object) would exceed this.
RSS_GROWTH_LIMIT_KIB = 16 * 1024
SMALL_LIMIT = 1024 * 1024


class Conn:
    """A minimal blocking SMTP client that can stream a body in chunks."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=60)
        self.buf = b""
        code, _ = self.reply()
        assert code == 220

    def reply(self) -> tuple[int, str]:
        lines = []
        while True:
            while b"\r\n" not in self.buf:
                chunk = self.sock.recv(65536)
                if not chunk:
                    raise ConnectionError(f"connection closed; got {lines!r}")
                self.buf += chunk
            line, self.buf = self.buf.split(b"\r\n", 1)
            lines.append(line.decode("utf-8", "replace"))
            if len(line) < 4 or line[3:4] != b"-":
                return int(line[:3]), "\n".join(x[4:] for x in lines)

    def cmd(self, line: str) -> tuple[int, str]:
        self.sock.sendall(line.encode() + b"\r\n")
        return self.reply()

    def close(self) -> None:
        try:
            self.sock.sendall(b"QUIT\r\n")
        except OSError:
            pass
        self.sock.close()


def body_chunks(token: str, total: int, chunk: int = 256 * 1024) -> Iterator[bytes]:
    """Wire bytes (dot-stuffed, CRLF lines) of a message of ``total`` bytes after unstuffing."""
    head = (f"From: <big@client.test>\r\nTo: <alice@localhost>\r\nSubject: big {token}\r\n"
            f"X-Big-Token: {token}\r\n\r\n").encode()
    tail = f"END-OF-{token}\r\n".encode()
    line = b"0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789ab\r\n"
    dot = b".dot-stuffed line" + b"x" * 57 + b"\r\n"  # sent as "..dot-stuffed..."
    assert len(line) == len(dot) == 76
    block = (line * 99 + dot) * (chunk // (76 * 100))
    yield head
    remaining = total - len(head) - len(tail)
    while remaining >= len(block):
        yield block
        remaining -= len(block)
    whole = remaining // 76 * 76
    if remaining - whole == 1:  # no room for a CRLF: make the last line one line longer
        whole -= 76
    yield block[:whole]
    remaining -= whole
    if remaining:
        yield b"z" * (remaining - 2) + b"\r\n"
    yield tail


def stuffed(data: bytes) -> bytes:
    return data.replace(b"\r\n.", b"\r\n..")


def send_data(conn: Conn, token: str, total: int, rcpt: str = "alice@localhost"
              ) -> tuple[int, str, str]:
    """MAIL/RCPT/DATA with a streamed body; returns (code, text, sha256 of the unstuffed body)."""
    assert conn.cmd("MAIL FROM:<big@client.test>")[0] == 250
    assert conn.cmd(f"RCPT TO:<{rcpt}>")[0] == 250
    code, text = conn.cmd("DATA")
    assert code == 354, text
    digest = hashlib.sha256()
    header_done = False
    sent = 0
    for piece in body_chunks(token, total):
        if header_done:
            digest.update(piece)
        header_done = True
        sent += len(piece)
        conn.sock.sendall(stuffed(piece) if not piece.startswith(b".") else b"." + stuffed(piece))
    assert sent == total, (sent, total)
    conn.sock.sendall(b".\r\n")
    code, text = conn.reply()
    return code, text, digest.hexdigest()


def send_bdat(conn: Conn, token: str, total: int, chunk: int = 1 << 20) -> tuple[int, str]:
    assert conn.cmd("MAIL FROM:<big@client.test> BODY=8BITMIME")[0] == 250
    assert conn.cmd("RCPT TO:<alice@localhost>")[0] == 250
    data = b"".join(body_chunks(token, total))
    for offset in range(0, len(data), chunk):
        part = data[offset:offset + chunk]
        last = offset + chunk >= len(data)
        conn.sock.sendall(f"BDAT {len(part)}{' LAST' if last else ''}\r\n".encode() + part)
        code, text = conn.reply()
        if last or code != 250:
            return code, text
    raise AssertionError("unreachable")


class RssSampler(threading.Thread):
    def __init__(self, pid: int) -> None:
        super().__init__(name="rss-sampler", daemon=True)
        self.pid = pid
        self.peak = 0
        self.samples = 0
        self.halt = threading.Event()

    def run(self) -> None:
        while not self.halt.is_set():
            rss = vm_rss_kib(self.pid)
            if rss is None:
                return
            self.peak = max(self.peak, rss)
            self.samples += 1
            time.sleep(0.005)

    def stop(self) -> int:
        self.halt.set()
        self.join(5)
        return self.peak


def _wait_delivered(mailboxes: Path, token: str, timeout: float = 60) -> Path:
    needle = f"X-Big-Token: {token}".encode()

    def find() -> Path | None:
        for path in maildir_files(mailboxes, "alice"):
            with open(path, "rb") as fh:
                if needle in fh.read(4096):
                    return path
        return None

    return wait_until(find, timeout=timeout, interval=0.05, message=f"{token} delivered")


def _body_sha(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        head = b""
        while b"\r\n\r\n" not in head:
            head += fh.read(4096)
        digest.update(head.split(b"\r\n\r\n", 1)[1])
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@pytest.fixture(scope="module")
def big_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[MtaProcess,
                                                                          dict[str, Any]]]:
    pool = MtaPool(tmp_path_factory.mktemp("big"))
    try:
        mta, conf = pool.new()
        # warm up: import and allocate everything a normal delivery needs before measuring
        conn = Conn(mta.port)
        conn.cmd("EHLO warm.client.test")
        token = uuid.uuid4().hex
        assert send_data(conn, token, 64 * 1024)[0] == 250
        conn.close()
        _wait_delivered(Path(conf["smtp"]["storage"]["mailboxDir"]), token)
        yield mta, conf
    finally:
        pool.close()


@pytest.mark.parametrize("mode", ["DATA", "BDAT"])
def test_24mb_message_bounded_rss(big_server: tuple[MtaProcess, dict[str, Any]],
                                  mode: str) -> None:
    mta, conf = big_server
    mailboxes = Path(conf["smtp"]["storage"]["mailboxDir"])
    idle = max(vm_rss_kib(mta.pid) or 0 for _ in range(5))
    assert idle > 0
    sampler = RssSampler(mta.pid)
    sampler.start()
    token = uuid.uuid4().hex
    started = time.monotonic()
    try:
        conn = Conn(mta.port)
        code, text = conn.cmd("EHLO big.client.test")
        assert code == 250 and "SIZE 26214400" in text, text
        if mode == "DATA":
            code, text, sha = send_data(conn, token, BIG)
        else:
            code, text = send_bdat(conn, token, BIG)
            sha = hashlib.sha256(b"".join(body_chunks(token, BIG))
                                 .split(b"\r\n\r\n", 1)[1]).hexdigest()
        assert code == 250, text
        assert conn.cmd("NOOP")[0] == 250  # session still healthy
        conn.close()
        path = _wait_delivered(mailboxes, token)
        wait_until(lambda: spool_entries(Path(conf["smtp"]["spool"]["dir"])) == [], timeout=30,
                   message="spool to drain")
    finally:
        peak = sampler.stop()
    elapsed = time.monotonic() - started
    growth = peak - idle
    print(f"{mode}: 24 MiB accepted+delivered in {elapsed:.1f}s; idle RSS {idle / 1024:.1f} MiB, "
          f"peak {peak / 1024:.1f} MiB, growth {growth / 1024:.1f} MiB "
          f"({sampler.samples} samples)")
    assert sampler.samples > 10
    assert path.stat().st_size > BIG
    assert _body_sha(path) == sha, "delivered body differs from what was sent"
    assert growth < RSS_GROWTH_LIMIT_KIB, \
        f"server RSS grew by {growth / 1024:.1f} MiB for one 24 MiB message"


@pytest.fixture(scope="module")
def small_limit_server(tmp_path_factory: pytest.TempPathFactory
                       ) -> Iterator[tuple[MtaProcess, dict[str, Any]]]:
    with MtaPool(tmp_path_factory.mktemp("limit")) as pool:
        yield pool.new({"smtp": {"limits": {"maxMessageSizeBytes": SMALL_LIMIT}}})


def test_size_parameter_over_limit_refused_at_mail(
        small_limit_server: tuple[MtaProcess, dict[str, Any]]) -> None:
    mta, _ = small_limit_server
    conn = Conn(mta.port)
    try:
        code, text = conn.cmd("EHLO c.test")
        assert f"SIZE {SMALL_LIMIT}" in text.splitlines(), text
        code, text = conn.cmd(f"MAIL FROM:<a@client.test> SIZE={SMALL_LIMIT + 1}")
        assert (code, text[:5]) == (552, "5.3.4"), (code, text)
        code, text = conn.cmd(f"MAIL FROM:<a@client.test> SIZE={SMALL_LIMIT}")
        assert code == 250, text
        assert conn.cmd("RSET")[0] == 250
    finally:
        conn.close()


def test_message_over_limit_552_after_data_session_survives(
        small_limit_server: tuple[MtaProcess, dict[str, Any]]) -> None:
    mta, conf = small_limit_server
    mailboxes = Path(conf["smtp"]["storage"]["mailboxDir"])
    conn = Conn(mta.port)
    try:
        assert conn.cmd("EHLO c.test")[0] == 250
        over = uuid.uuid4().hex
        code, text, _ = send_data(conn, over, SMALL_LIMIT + 1024)
        assert (code, text[:5]) == (552, "5.3.4"), (code, text)
        # the same session goes on: a message just under the limit (room left for Received:)
        under = uuid.uuid4().hex
        code, text, sha = send_data(conn, under, SMALL_LIMIT - 4096)
        assert code == 250, text
        # BDAT: the limit applies across chunks
        code, text = send_bdat(conn, uuid.uuid4().hex, SMALL_LIMIT + 1024, chunk=600 * 1024)
        assert (code, text[:5]) == (552, "5.3.4"), (code, text)
        assert conn.cmd("NOOP")[0] == 250
    finally:
        conn.close()
    path = _wait_delivered(mailboxes, under)
    assert _body_sha(path) == sha
    wait_until(lambda: spool_entries(Path(conf["smtp"]["spool"]["dir"])) == [], timeout=20,
               message="spool to drain")
    for p in maildir_files(mailboxes, "alice"):
        with open(p, "rb") as fh:
            assert over.encode() not in fh.read(4096), "an over-size message was delivered"
