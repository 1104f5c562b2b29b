"""The test suite's private redis-server: it never mistakes another listener for itself and
moves to a fresh port when its picked one was taken meanwhile (a flake seen under load)."""

from __future__ import annotations

import socket

from helpers import RedisServer


def test_private_redis_moves_off_a_port_taken_after_the_pick() -> None:
    squatter = socket.socket()
    squatter.bind(("127.0.0.1", 0))
    squatter.listen()
    taken = squatter.getsockname()[1]
    server = RedisServer()
    server.port = taken  # as if another process bound it between the pick and the start
    try:
        server.start()
        assert server.port != taken
        assert server._ours()
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
            s.sendall(b"PING\r\n")
            assert s.recv(16).startswith(b"+PONG")
    finally:
        server.cleanup()
        squatter.close()
