"""DataDecoder against a line-by-line reference: terminator, dot-unstuffing, bare EOLs and the
line-length limit, whatever the chunking (hypothesis)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from kotlin_smtp_py.inbound.framing import BARE_EOL, LINE_TOO_LONG, OK, DataDecoder

MAX_LINE = 40

line = st.one_of(
    st.integers(0, 3 * MAX_LINE).map(lambda n: b"x" * n),  # lengths around the limit
    st.sampled_from([b".", b"..", b".x", b"", b"x.y"]),
)


def reference(lines: list[bytes]) -> tuple[str, bytes]:
    if any(len(x) > MAX_LINE for x in lines):
        return LINE_TOO_LONG, b""
    return OK, b"".join((x[1:] if x.startswith(b".") else x) + b"\r\n" for x in lines)


def feed_in_pieces(wire: bytes, cuts: list[int]) -> tuple[DataDecoder, list[bytes], bytes]:
    """Feeds ``wire`` in pieces of the sizes in ``cuts`` (repeated) until the message ends;
    returns the decoder, what it passed on, and every byte after the terminator."""
    out: list[bytes] = []
    dec = DataDecoder(out.append, max_size=10**9, max_line=MAX_LINE)
    rest = None
    pos, i = 0, 0
    while rest is None and pos < len(wire):
        step = cuts[i % len(cuts)]
        rest = dec.feed(wire[pos:pos + step])
        pos += step
        i += 1
    assert dec.done and rest is not None
    return dec, out, rest + wire[pos:]


@settings(max_examples=400, deadline=None)
@given(st.lists(line, max_size=30), st.lists(st.integers(1, 97), min_size=1, max_size=40))
def test_matches_reference_for_any_chunking(lines: list[bytes], cuts: list[int]) -> None:
    # Dot-stuff like a client would, then terminate and add a pipelined command.
    wire = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
    wire += b".\r\nQUIT\r\n"
    dec, out, rest = feed_in_pieces(wire, cuts)
    assert rest == b"QUIT\r\n"
    # Stuffed lines are one byte longer on the wire: the limit applies to what was sent.
    sent = [(b"." + x if x.startswith(b".") else x) for x in lines]
    want_error, want_body = reference(sent)
    assert dec.error == want_error
    if want_error == OK:
        assert b"".join(out) == want_body


def test_long_line_inside_a_large_block_is_found_wherever_it_sits() -> None:
    short = b"y" * 30 + b"\r\n"
    for position in range(0, 200, 7):
        body = short * position + b"z" * (MAX_LINE + 1) + b"\r\n" + short * (200 - position)
        dec = DataDecoder(lambda _: None, max_size=10**9, max_line=MAX_LINE)
        assert dec.feed(body + b".\r\n") == b""
        assert dec.error == LINE_TOO_LONG, position
    ok = DataDecoder(lambda _: None, max_size=10**9, max_line=MAX_LINE)
    ok.feed(short * 500 + b"w" * MAX_LINE + b"\r\n.\r\n")
    assert ok.error == OK


def test_bare_lf_is_flagged() -> None:
    dec = DataDecoder(lambda _: None, max_size=10**9, max_line=MAX_LINE)
    dec.feed(b"a\nb\r\n.\r\n")
    assert dec.error == BARE_EOL


raw_line = st.lists(st.sampled_from([b"a", b".", b"\r", b"\n"]), max_size=8).map(b"".join)


@settings(max_examples=600, deadline=None)
@given(st.lists(raw_line, max_size=20), st.lists(st.integers(1, 23), min_size=1, max_size=20))
def test_bare_cr_and_lf_are_flagged_exactly(lines: list[bytes], cuts: list[int]) -> None:
    # Lines may hold bare CRs and LFs anywhere (also next to the CRLFs between lines, and
    # split from them by the chunking); the message is bad exactly when its content, up to
    # the first CRLF.CRLF, has a CR or LF that is not part of a CRLF.
    wire = b"".join((b"." + x if x.startswith(b".") else x) + b"\r\n" for x in lines)
    wire += b".\r\nQUIT\r\n"
    if wire.startswith(b".\r\n"):
        content, after = b"", wire[3:]
    else:
        p = wire.find(b"\r\n.\r\n")
        content, after = wire[:p + 2], wire[p + 5:]
    leftover = content.replace(b"\r\n", b"")
    bare = b"\r" in leftover or b"\n" in leftover
    dec, out, rest = feed_in_pieces(wire, cuts)
    assert rest == after
    assert dec.error == (BARE_EOL if bare else OK)
    if not bare:
        want = content[1:] if content.startswith(b".") else content
        assert b"".join(out) == want.replace(b"\r\n.", b"\r\n")


def test_bare_cr_is_flagged() -> None:
    for body in (b"a\rb\r\n", b"a\r\r\n", b"\r\n\r", b"a\n\rb\r\n", b"\r\r\n\n"):
        dec = DataDecoder(lambda _: None, max_size=10**9, max_line=MAX_LINE)
        assert dec.feed(body + b"\r\n.\r\n") == b""
        assert dec.error == BARE_EOL, body
