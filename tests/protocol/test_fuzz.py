"""Hypothesis-driven fuzzing of the SMTP session over a real socket (bounded in count and time).

Each example opens a connection, pipelines a random sequence of commands and bytes, half-closes
its side and reads every reply until the server closes. Afterwards: no failure was logged in the
server, every reply line is well formed, memory stayed bounded and a normal transaction works.
"""

from __future__ import annotations

import re
import resource
import smtplib
import socket
import time
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.logger import globalLogPublisher

REPLY_LINE = re.compile(rb"^[2-5]\d\d[ -]")

VERBS = [b"EHLO", b"HELO", b"MAIL FROM:", b"RCPT TO:", b"DATA", b"BDAT", b"RSET", b"NOOP",
         b"HELP", b"VRFY", b"EXPN", b"ETRN", b"AUTH", b"STARTTLS", b"XYZ", b""]
ADDRESSES = [b"<alice@localhost>", b"<>", b"<bob@example.test>", b"<x@remote.test>",
             b"<\xc3\xa9@b\xc3\xbccher.test>", b"<@a,@b:c@d>", b"<a@[127.0.0.1]>", b"<",
             b"<postmaster>", b"<\"q@x\"@localhost>"]
PARAMS = [b"", b" SIZE=100", b" SIZE=999999999999", b" BODY=8BITMIME", b" SMTPUTF8",
          b" NOTIFY=SUCCESS", b" RET=HDRS", b" FOO=BAR", b" =", b" AUTH=<>", b" REQUIRETLS"]

command = st.one_of(
    st.builds(lambda v, a, p: v + (b"" if v.endswith(b":") else b" ") + a + p,
              st.sampled_from(VERBS), st.sampled_from(ADDRESSES), st.sampled_from(PARAMS)),
    st.builds(lambda n, last, body: b"BDAT %d%s\r\n" % (n, b" LAST" if last else b"") + body,
              st.integers(0, 64), st.booleans(), st.binary(max_size=64)),
    st.builds(lambda body: b"DATA\r\n" + body + b"\r\n.", st.binary(max_size=300)),
    st.binary(max_size=120),
    st.just(b"A" * 3000),
    st.sampled_from([b"\r", b"\n", b"\r\n.\r\n", b".\r\n", b"\x00", b"\xff\xfe", b"AUTH PLAIN",
                     b"AUTH LOGIN", b"*", b"=", b"AUTH PLAIN AGFsaWNlAHB3"]),
)
sequence = st.lists(command, min_size=1, max_size=25)


def _rss_kb() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def _exchange(port: int, payload: bytes, deadline: float = 20.0) -> bytes:
    s = socket.create_connection(("127.0.0.1", port), timeout=deadline)
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        out = b""
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            out += chunk
        else:
            raise AssertionError("server did not close the connection in time")
        return out
    finally:
        s.close()


def test_fuzz_session(make_server: Any) -> None:
    srv = make_server({"smtp": {
        "features": {"vrfyEnabled": True, "expnEnabled": True, "etrnEnabled": True},
        "limits": {"maxMessageSizeBytes": 100000}, "rateLimit": {"exemptCidrs": []},
        "auth": {"users": {"alice": "pw"}},
        "listeners": [{"port": 0, "bindAddress": "127.0.0.1", "allowPlaintextAuth": True}]}})
    failures: list[dict[str, Any]] = []

    def observer(event: dict[str, Any]) -> None:
        if "log_failure" in event:
            failures.append(event)

    globalLogPublisher.addObserver(observer)
    rss_before = _rss_kb()
    examples = 0

    @settings(max_examples=250, deadline=None, derandomize=False,
              suppress_health_check=[HealthCheck.function_scoped_fixture,
                                     HealthCheck.too_slow])
    @given(sequence)
    def run(cmds: list[bytes]) -> None:
        nonlocal examples
        examples += 1
        payload = b"".join(c + b"\r\n" for c in cmds)
        out = _exchange(srv.port, payload)
        lines = [ln for ln in out.split(b"\r\n") if ln]
        assert lines and lines[0].startswith(b"220 ")
        for line in lines:
            assert REPLY_LINE.match(line), (line, cmds)
            assert b"Traceback" not in line and b"Error" not in line[:40], line

    try:
        run()
    finally:
        globalLogPublisher.removeObserver(observer)
    assert examples > 0
    assert not failures, [f.get("log_format") for f in failures][:3]
    # ru_maxrss is the peak (KiB): the whole run must not have grown the process by 100 MB.
    assert _rss_kb() - rss_before < 100_000
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("after@remote.test", ["alice@localhost"], b"Subject: still fine\r\n\r\nok\r\n")
    srv.wait_messages("alice", 1)
