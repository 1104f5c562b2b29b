"""The lighter epoll dispatch loop serves connections like Twisted's own: reads, writes,
disconnects, and a handler's exception logged and its connection dropped while the other
connections carry on. Run in a fresh interpreter: it patches the process's reactor."""

from __future__ import annotations

import json
import subprocess
import sys

SCRIPT = r"""
import json
from twisted.internet import epollreactor
epollreactor.install()
from twisted.internet import reactor, protocol, defer
from twisted.logger import globalLogPublisher
from twisted.python import log as legacy_log
from twisted.python import context
from kotlin_smtp_py.eventloop import lighten_dispatch

result = {"patched": lighten_dispatch(reactor), "errors": [], "systems": []}
globalLogPublisher.addObserver(  # legacy log.err() events carry "failure"
    lambda e: result["errors"].append(str(e.get("log_failure") or e.get("failure") or ""))
    if e.get("isError") or e.get("log_failure") is not None else None)

class Echo(protocol.Protocol):
    def dataReceived(self, data):
        result["systems"].append(context.get(legacy_log.ILogContext)["system"])
        if b"boom" in data:
            raise ValueError("handler blew up")
        self.transport.write(data.upper())

class Client(protocol.Protocol):
    def __init__(self, payload):
        self.payload, self.got, self.done = payload, b"", defer.Deferred()
    def connectionMade(self):
        self.transport.write(self.payload)
    def dataReceived(self, data):
        self.got += data
        if self.got.endswith(b"!"):
            self.transport.loseConnection()
    def connectionLost(self, reason):
        self.done.callback(self.got)

def connect(port, payload):
    c = Client(payload)
    protocol.ClientCreator(reactor, lambda: c).connectTCP("127.0.0.1", port)
    return c.done

@defer.inlineCallbacks
def main():
    f = protocol.Factory.forProtocol(Echo)
    port = reactor.listenTCP(0, f, interface="127.0.0.1").getHost().port
    bad, good = yield defer.gatherResults([connect(port, b"boom"), connect(port, b"hello!")])
    result["bad"], result["good"] = bad.decode(), good.decode()
    reactor.stop()

reactor.callWhenRunning(main)
reactor.callLater(20, reactor.stop)  # a bound, should the exchange hang
reactor.run()
print(json.dumps(result))
"""


def test_dispatch_serves_and_survives_a_failing_handler() -> None:
    run = subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True,
                         timeout=60)
    assert run.returncode == 0, run.stderr
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["patched"] is True
    assert result["good"] == "HELLO!"  # read and write on a healthy connection
    assert result["bad"] == ""  # the failing handler's connection was dropped, no reply
    assert any("handler blew up" in e for e in result["errors"])  # and the error logged
    # No per-event legacy context any more: handlers see the default system.
    assert set(result["systems"]) == {"-"}
