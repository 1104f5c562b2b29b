"""Dot-stuffing and CRLF normalisation, in memory and over a real loopback session."""

from __future__ import annotations

from pathlib import Path

import pytest
from outbound_support import deliver, make_entry

from kotlin_smtp_py.outbound.client import CHUNK_SIZE, DotStuffer


def stuff(data: bytes, chunk: int) -> bytes:
    s = DotStuffer()
    out = b"".join(s.feed(data[i:i + chunk]) for i in range(0, len(data), chunk))
    return out + s.finish()


def reference(data: bytes) -> bytes:
    """Line-at-a-time reference: normalise endings, stuff dots, terminate."""
    import re

    lines = re.split(rb"\r\n|\r|\n", data)
    trailing = lines[-1] == b""
    if trailing:
        lines = lines[:-1]
    body = b"".join((b"." + ln if ln.startswith(b".") else ln) + b"\r\n" for ln in lines)
    return body + b".\r\n"


CASES = [
    b"",
    b".",
    b".leading dot\r\nsecond\r\n",
    b"a\r\n.\r\nb\r\n",
    b"bare\nlf\n.dot after lf\n",
    b"bare\rcr\r.dot after cr",
    b"no final newline",
    b"\r\n\r\n..two dots\r\n",
    b"mixed\r\r\n.x\n\r.y",
]


@pytest.mark.parametrize("data", CASES)
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 7, 16384])
def test_stuffer_matches_line_reference_for_every_chunk_size(data: bytes, chunk: int) -> None:
    assert stuff(data, chunk) == reference(data)


def test_dot_line_exactly_at_chunk_boundary_is_stuffed() -> None:
    first = b"x" * (CHUNK_SIZE - 2) + b"\r\n"
    data = first + b".\r\nQUIT\r\n"
    assert len(first) == CHUNK_SIZE
    out = stuff(data, CHUNK_SIZE)
    assert out == first + b"..\r\nQUIT\r\n.\r\n"
    # The CR of a line ending split across the boundary is held until the next chunk.
    split = b"x" * (CHUNK_SIZE - 1) + b"\r\n.evil\r\n"
    assert stuff(split, CHUNK_SIZE) == b"x" * (CHUNK_SIZE - 1) + b"\r\n..evil\r\n.\r\n"


def test_session_delivers_dot_at_16384_and_leading_dot_unchanged(sinks, make_config,
                                                                  tmp_path: Path) -> None:
    sink = sinks.start()
    head = b"Subject: smuggle\r\n\r\n"
    pad = b"y" * (CHUNK_SIZE - len(head) - 2) + b"\r\n"
    body = head + pad + b".\r\nMAIL FROM:<evil@x>\r\n.leading\r\nend\r\n"
    assert body[CHUNK_SIZE:CHUNK_SIZE + 3] == b".\r\n"
    entry, path = make_entry(tmp_path, ["a@normal.test"], body)
    results = deliver(make_config(), entry, path)
    assert [s.code for _, s in results] == [250]
    assert len(sink.transactions) == 1
    assert sink.transactions[0].body == body
    assert b"\r\n..\r\nMAIL FROM" in sink.transactions[0].raw

    sink.sessions.clear()
    starts_with_dot = b".\r\n.hidden\r\nrest\r\n"
    entry, path = make_entry(tmp_path, ["a@normal.test"], starts_with_dot)
    assert [s.code for _, s in deliver(make_config(), entry, path)] == [250]
    assert sink.transactions[0].body == starts_with_dot


def test_bare_lf_and_cr_never_reach_the_peer(sinks, make_config, tmp_path: Path) -> None:
    sink = sinks.start()
    entry, path = make_entry(tmp_path, ["a@normal.test"], b"Subject: x\n\nline\rmore\n.\nend")
    assert deliver(make_config(), entry, path)[0][1].ok
    raw = sink.transactions[0].raw
    assert raw.replace(b"\r\n", b"").count(b"\r") == 0
    assert raw.replace(b"\r\n", b"").count(b"\n") == 0
    assert sink.transactions[0].body == b"Subject: x\r\n\r\nline\r\nmore\r\n.\r\nend\r\n"
