"""``smtp.workerSockets: shared``: the parent's listening socket is the very socket its workers
accept from (inherited descriptors). Closing the parent's port at shutdown must not shut that
socket down for everyone: a ``shutdown(2)`` on a listening socket takes it out of the listening
state in every process, and a worker still draining then got ``accept: EINVAL`` logged as a
CRITICAL unhandled error (seen in CI on the double-SIGTERM lifecycle test)."""

from __future__ import annotations

import os
import socket

from twisted.internet import protocol, reactor
from twisted.internet.defer import CancelledError
from twisted.internet.error import ConnectionDone
from twisted.python.failure import Failure

from kotlin_smtp_py.workers import listen_shared


def test_closing_the_parents_port_leaves_the_shared_socket_listening() -> None:
    port = listen_shared(reactor, "127.0.0.1", 0, protocol.ServerFactory())
    number = port.getHost().port
    inherited = socket.socket(fileno=os.dup(port.fileno()))  # what a worker holds
    try:
        # What stopListening does once the reactor turns (loseConnection, then, one
        # iteration later, connectionLost closing the socket). The reactor does not run here:
        # the scheduled connectionLost is cancelled (it ran in a later test otherwise, on a
        # port already closed) and called now instead.
        pending = port.loseConnection()
        pending.addErrback(lambda f: f.trap(CancelledError))
        pending.cancel()
        port.connectionLost(Failure(ConnectionDone()))
        inherited.settimeout(5)
        client = socket.create_connection(("127.0.0.1", number), timeout=5)
        try:
            accepted, _ = inherited.accept()
            accepted.close()
        finally:
            client.close()
    finally:
        inherited.close()
