"""SmtpReply.encode: the single-line shortcut gives exactly the bytes of the general path."""

from __future__ import annotations

import pytest

from kotlin_smtp_py.status import SmtpReply


@pytest.mark.parametrize("reply", [
    SmtpReply(250, "2.0.0", "Ok: queued as txhWd1pkhqpj73VcLB1s"),
    SmtpReply(220, "", "mx.test ESMTP kotlin-smtp-py ready"),
    SmtpReply(354, "", ""),
    SmtpReply(250, "", "mx.test\nPIPELINING\nSIZE 1000"),
    SmtpReply(550, "5.1.1", "Ünïcode user\nsecond line"),
    SmtpReply(451, "4.3.0", "lone surrogate \udc80 replaced"),
])
def test_encode_matches_line_by_line(reply: SmtpReply) -> None:
    assert reply.encode() == b"".join(line + b"\r\n" for line in reply.lines())
    assert reply.encode().endswith(b"\r\n") and reply.encode().count(b"\r\n") == \
        max(1, reply.text.count("\n") + 1)
