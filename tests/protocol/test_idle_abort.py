"""The idle timeout's 421 reaches a peer that reads nothing only if it can: after
ABORT_GRACE_SECONDS the connection is aborted, so a client that pipelines commands and never
reads its replies cannot hold a session (and its buffered output) open (TWISTED-NOTES:
``timeoutConnection`` needs an ``abortConnection`` fallback)."""

from __future__ import annotations

import socket
from typing import Any

from helpers import TCP_ESTABLISHED, tcp_socket_inodes, wait_until

from kotlin_smtp_py.inbound.protocol import ABORT_GRACE_SECONDS


def test_a_peer_that_never_reads_is_aborted_after_the_idle_timeout(make_server: Any) -> None:
    srv = make_server({"smtp": {"listeners": [
        {"port": 0, "bindAddress": "127.0.0.1", "idleTimeoutSeconds": 1}]}})
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # fills at once
        s.connect(("127.0.0.1", srv.port))
        s.setblocking(False)
        line = b"HELP\r\n" * 1000  # (not NOOP: junk commands past 100 end the session)
        sent = 0
        for _ in range(2000):  # bounded: ~12 MB of commands at most
            try:
                sent += s.send(line)
            except BlockingIOError:
                break  # the server stopped taking input: its replies back up
        assert sent > 0
        # The server now holds replies it cannot send, so its close after the idle 421 cannot
        # complete; only the abort ends the session.
        assert tcp_socket_inodes(srv.port, TCP_ESTABLISHED), "the session is open"
        wait_until(lambda: not tcp_socket_inodes(srv.port, TCP_ESTABLISHED)
                   and not tcp_socket_inodes(srv.port, "04")  # FIN_WAIT1: close pending
                   and not srv.service.factories[0].sessions,
                   timeout=1 + ABORT_GRACE_SECONDS + 15, message="the session to be aborted")
    finally:
        s.close()
    # and the server keeps serving
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as c:
        assert c.makefile("rb").readline().startswith(b"220")
