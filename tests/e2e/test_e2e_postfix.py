"""Our relay delivering to a real Postfix (private instance on a loopback port) over verified
STARTTLS; and Postfix's own 5xx coming back as a DSN in the sender's Maildir."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2e_support import HOSTNAME, Dsn, fail_or_skip, message, split_received, submit
from helpers import CertSet, wait_until
from postfix_support import PostfixInstance, postfix_missing


@pytest.fixture(scope="module")
def postfix(certs: CertSet) -> Iterator[PostfixInstance]:
    why = postfix_missing()
    if why is not None:
        fail_or_skip(why)
    instance = PostfixInstance(certs)
    try:
        instance.start()
    except Exception as exc:
        instance.cleanup()
        fail_or_skip(f"private postfix did not start: {exc}")
    yield instance
    instance.cleanup()


def _to_postfix(postfix: PostfixInstance) -> dict:
    return {"smtp": {"relay": {"outboundTls": {
        "ports": [postfix.port], "startTlsRequired": True, "checkServerIdentity": True}}}}


def _postfix_headers(delivered: bytes) -> tuple[list[bytes], bytes]:
    """(header blocks Postfix prepended, the rest starting at our Received)."""
    mark = b"Received: from client.e2e.test"
    at = delivered.index(mark)
    head, rest = delivered[:at], delivered[at:]
    blocks: list[bytes] = []
    for line in head.split(b"\n")[:-1]:
        if line[:1] in (b" ", b"\t"):
            blocks[-1] += b"\n" + line
        else:
            blocks.append(line)
    return blocks, rest


def test_relay_to_postfix_over_verified_starttls(e2e_server, postfix, certs) -> None:
    server = e2e_server(_to_postfix(postfix), use_clock=False)
    body = b"Hello Postfix.\r\n.a leading dot\r\n" + "gr\u00fc\u00dfe 8bit\r\n".encode()
    original = message("to postfix", to="user@normal.test", body=body)
    assert submit(server, certs, "carol@localhost", ["user@normal.test"], original,
                  mail_options=("BODY=8BITMIME",)) == {}
    [delivered] = wait_until(postfix.messages, timeout=20,
                             message=f"the message in Postfix's Maildir\n{postfix.log()}")
    blocks, rest = _postfix_headers(delivered)
    names = [b.split(b":", 1)[0] for b in blocks]
    assert names == [b"Return-Path", b"X-Original-To", b"Delivered-To", b"Received"], blocks
    assert blocks[0] == b"Return-Path: <carol@localhost>"
    theirs = blocks[3].decode()
    assert f"from {HOSTNAME}" in theirs and "by mx.test (Postfix)" in theirs
    assert "(using TLS" in theirs, f"Postfix did not see TLS: {theirs}"
    # Postfix stores LF line ends; otherwise the bytes are exactly what was submitted.
    ours, after = split_received(rest.replace(b"\n", b"\r\n"))
    assert f"by {HOSTNAME}".encode() in ours
    assert after == original
    log = postfix.log()
    assert "Trusted TLS connection established" not in log  # (client certs are not used)
    assert "TLS connection established from" in log
    wait_until(lambda: not server.entries(), message="an empty queue")


def test_postfix_rejection_becomes_a_dsn(e2e_server, postfix, certs) -> None:
    server = e2e_server(_to_postfix(postfix), use_clock=False)
    submit(server, certs, "carol@localhost", ["nobody@normal.test"], message("unknown user"))
    [raw] = wait_until(lambda: server.messages("carol"), timeout=20,
                       message=f"the DSN in carol's Maildir\n{postfix.log()}")
    dsn = Dsn(raw)
    assert dsn.one("Action") == "failed"
    assert dsn.one("Status") == "5.1.1"
    assert dsn.one("Remote-MTA") == "dns; mx.test"
    diag = dsn.one("Diagnostic-Code")
    assert diag.startswith("smtp; 550 5.1.1 <nobody@normal.test>"), diag
    assert "User unknown in virtual mailbox table" in diag
