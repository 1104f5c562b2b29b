"""Hostile and broken next hops: every attempt must end in one clear per-recipient result
(delivered, transient, permanent) within the configured timeouts, never an escaped exception,
a wrong classification or a message that is reported delivered without being sent."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from helpers import on_reactor
from outbound_sink import Behaviour, SinkFactory, SinkProtocol
from outbound_support import deliver, make_entry
from twisted.internet import protocol, task
from twisted.internet.testing import StringTransport

from kotlin_smtp_py.config import ConnectionCacheConfig
from kotlin_smtp_py.outbound import client
from kotlin_smtp_py.outbound.client import ReplyReader, SessionError
from kotlin_smtp_py.outbound.relay import RelayDelivery
from kotlin_smtp_py.status import FailureKind, Reason

BODY = b"From: a@origin.test\r\nSubject: t\r\n\r\nhello\r\n"
NO_PIPELINING = ["8BITMIME", "SMTPUTF8", "ENHANCEDSTATUSCODES"]

Hook = Callable[["HuntSink", str], bool]


class HuntSink(SinkProtocol):
    """The scriptable sink plus per-verb hooks (return True when the hook answered) and an
    ``on_dot`` hook that replaces the reply to the final dot."""

    factory: HuntFactory

    def command(self, line: str) -> None:
        verb = line.split(" ", 1)[0].upper()
        hook = self.factory.hooks.get(verb)
        if hook is not None and hook(self, line):
            self.session.commands.append(line)
            return
        super().command(line)

    def _data_step(self) -> bool:
        on_dot = self.factory.on_dot
        if on_dot is None:
            return super()._data_step()
        before = len(self.session.transactions)
        self.send = lambda *lines: None  # type: ignore[method-assign]
        try:
            progressed = super()._data_step()
        finally:
            del self.send
        if len(self.session.transactions) > before:
            on_dot(self)
        return progressed

    def dataReceived(self, data: bytes) -> None:
        if getattr(self, "garbage", False):  # pretend to speak TLS: answer with junk
            assert self.transport is not None
            self.transport.write(b"this is not a TLS record\r\n" * 4)
            self.transport.loseConnection()
            return
        super().dataReceived(data)


class HuntFactory(SinkFactory):
    def __init__(self, behaviour: Behaviour | None = None,
                 hooks: dict[str, Hook] | None = None,
                 on_dot: Callable[[HuntSink], None] | None = None) -> None:
        super().__init__(behaviour)
        self.hooks = hooks or {}
        self.on_dot = on_dot

    def buildProtocol(self, addr: Any) -> HuntSink:
        proto = HuntSink(self)
        self.protocols.append(proto)
        return proto


def listen(sinks: Any, factory: protocol.Factory, interface: str = "127.0.0.1") -> Any:
    from twisted.internet import reactor

    factory.noisy = False
    sinks._listeners.append(on_reactor(reactor.listenTCP, sinks.port, factory,
                                       interface=interface))
    return factory


def fast(make_config: Any, read_ms: int = 1500, **kw: Any) -> Any:
    return make_config(tls={"readTimeoutMs": read_ms, "connectTimeoutMs": 1000}, **kw)


def reply(proto: HuntSink, *lines: bytes) -> bool:
    proto.send(*lines)
    return True


def close(proto: HuntSink) -> None:
    assert proto.transport is not None
    proto.transport.loseConnection()


def reader() -> tuple[ReplyReader, task.Clock]:
    clock = task.Clock()
    r = ReplyReader(clock, 5.0)
    r.makeConnection(StringTransport())
    return r, clock


def next_reply(r: ReplyReader) -> Any:
    """The next reply (or SessionError) from a reader fed synchronously."""
    from twisted.internet import defer

    d = defer.Deferred.fromCoroutine(r.reply())
    out: list[Any] = []
    d.addBoth(out.append)
    assert out, "no reply framed"
    value = out[0]
    return value.value if hasattr(value, "value") else value


# ------------------------------------------------------------------------------------------
# Confirmed bugs


@pytest.mark.parametrize(("extensions", "answer"), [
    (NO_PIPELINING, b"250 2.0.0 sure, whatever"), (None, b"250 2.0.0 sure, whatever"),
    (None, b"334 VXNlcm5hbWU6")], ids=["250-lockstep", "250-pipelined", "334-bounced"])
def test_non_354_intermediate_reply_to_data_is_a_transient_protocol_error(
        sinks: Any, make_config: Any, tmp_path: Path, extensions: list[str] | None,
        answer: bytes) -> None:
    behaviour = Behaviour() if extensions is None else Behaviour(extensions=extensions)
    sink = listen(sinks, HuntFactory(behaviour, hooks={
        "DATA": lambda p, _: reply(p, answer)}))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    (_, status), = deliver(fast(make_config), entry, path)
    assert sink.transactions == []  # nothing was ever sent
    assert not status.ok, status
    assert status.kind is FailureKind.TRANSIENT


def test_unsolicited_reply_desynchronises_lockstep_session(
        sinks: Any, make_config: Any, tmp_path: Path) -> None:
    sink = listen(sinks, HuntFactory(Behaviour(
        greeting=b"220 sink.test ESMTP\r\n250 2.0.0 unsolicited", extensions=NO_PIPELINING)))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    (_, status), = deliver(fast(make_config), entry, path)
    assert sink.transactions == []
    assert not status.ok, status  # reported delivered, but no byte of the message was sent


def test_552_at_rcpt_is_transient(sinks: Any, make_config: Any, tmp_path: Path) -> None:
    listen(sinks, HuntFactory(Behaviour(rcpt={
        "b@normal.test": b"552 5.5.3 too many recipients"})))
    entry, path = make_entry(tmp_path, ["a@normal.test", "b@normal.test"], BODY)
    results = deliver(fast(make_config), entry, path)
    assert results[0][1].ok
    assert results[1][1].kind is FailureKind.TRANSIENT, results[1][1]


def test_empty_continuation_lines_count_towards_the_reply_limit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(client, "MAX_REPLY_BYTES", 1000)
    r, _ = reader()
    r.dataReceived(b"250-\r\n" * 400 + b"250 ok\r\n")  # 2406 bytes on the wire
    result = next_reply(r)
    assert isinstance(result, SessionError) and result.kind == "protocol", result


def test_long_multiline_reply_is_framed_in_linear_time() -> None:
    r, _ = reader()
    # 56 KB in 9,001 lines: under MAX_REPLY_BYTES (raw bytes), and framing it used to re-add
    # every earlier line's length per line (~2 s here)
    data = b"250-x\r\n" * 9000 + b"250 ok\r\n"
    started = time.monotonic()
    r.dataReceived(data)
    elapsed = time.monotonic() - started
    assert next_reply(r).code == 250
    assert elapsed < 0.5, f"framing a 56 KB reply blocked the reactor for {elapsed:.1f}s"


@pytest.mark.parametrize("code", ["\u00b250", "\u0662\u0665\u0660"], ids=["superscript",
                                                                          "arabic-indic"])
def test_non_ascii_digits_are_a_protocol_error(code: str) -> None:
    r, _ = reader()
    r.dataReceived(f"{code} ok\r\n".encode())  # raises ValueError for the superscript
    result = next_reply(r)
    assert isinstance(result, SessionError) and result.kind == "protocol", result


def test_inconsistent_codes_across_reply_lines_are_a_protocol_error(
        sinks: Any, make_config: Any, tmp_path: Path) -> None:
    listen(sinks, HuntFactory(Behaviour(
        data_reply=b"550-5.7.1 message rejected as spam\r\n250 2.0.0 queued")))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    (_, status), = deliver(fast(make_config), entry, path)
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.PROTOCOL), status


# ------------------------------------------------------------------------------------------
# Behaving correctly (coverage not in the other outbound tests)


def test_close_after_354_or_after_the_dot_is_transient(sinks: Any, make_config: Any,
                                                       tmp_path: Path) -> None:
    def close_on_data(p: HuntSink, _: str) -> bool:
        p.send(b"354 go ahead")
        close(p)
        return True

    listen(sinks, HuntFactory(hooks={"DATA": close_on_data}))
    entry, path = make_entry(tmp_path, ["a@normal.test", "b@normal.test"], BODY)
    results = deliver(fast(make_config), entry, path)
    assert [s.kind for _, s in results] == [FailureKind.TRANSIENT] * 2, results

    after_dot = listen(sinks, HuntFactory(on_dot=close), "127.0.0.2")
    cfg = fast(make_config, relay={"defaultRoute": _route(sinks, "127.0.0.2"),
                                   "connectionCache": ConnectionCacheConfig(enabled=False)})
    results = deliver(cfg, entry, path)
    assert [s.kind for _, s in results] == [FailureKind.TRANSIENT] * 2, results
    assert len(after_dot.transactions) == 1  # the peer has it; we retry (RFC 5321 §4.1.1.4)


def _route(sinks: Any, host: str) -> Any:
    from kotlin_smtp_py.config import RouteConfig

    return RouteConfig(host=host, port=sinks.port)


def test_421_in_the_middle_of_pipelined_rcpts_defers_everyone(sinks: Any, make_config: Any,
                                                             tmp_path: Path) -> None:
    def shut(p: HuntSink, line: str) -> bool:
        if "b@" not in line:
            return False
        p.send(b"421 4.3.2 shutting down")
        close(p)
        return True

    sink = listen(sinks, HuntFactory(hooks={"RCPT": shut}))
    entry, path = make_entry(tmp_path, ["a@normal.test", "b@normal.test", "c@normal.test"],
                             BODY)
    results = deliver(fast(make_config), entry, path)
    assert [s.kind for _, s in results] == [FailureKind.TRANSIENT] * 3, results
    assert sink.transactions == []


def test_421_mid_rcpts_lockstep_keeps_the_421_transient(sinks: Any, make_config: Any,
                                                       tmp_path: Path) -> None:
    def shut(p: HuntSink, line: str) -> bool:
        if "b@" not in line:
            return False
        p.send(b"421 4.3.2 shutting down")
        close(p)
        return True

    sink = listen(sinks, HuntFactory(Behaviour(extensions=NO_PIPELINING), hooks={"RCPT": shut}))
    entry, path = make_entry(tmp_path, ["a@normal.test", "b@normal.test"], BODY)
    results = deliver(fast(make_config), entry, path)
    assert [(s.kind, s.code) for _, s in results][1] == (FailureKind.TRANSIENT, 421)
    assert results[0][1].kind is FailureKind.TRANSIENT
    assert sink.transactions == []


def test_two_replies_to_the_final_dot_deliver_exactly_once(sinks: Any, make_config: Any,
                                                            tmp_path: Path) -> None:
    sink = listen(sinks, HuntFactory(Behaviour(
        data_reply=b"250 2.0.0 queued\r\n250 2.0.0 queued again")))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    assert deliver(fast(make_config), entry, path)[0][1].ok
    assert len(sink.sessions) == 1 and len(sink.transactions) == 1


def test_garbage_reply_code_and_huge_reply_are_transient_protocol(
        sinks: Any, make_config: Any, tmp_path: Path) -> None:
    listen(sinks, HuntFactory(Behaviour(rcpt={"a@normal.test": b"2x0 what"})))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    (_, status), = deliver(fast(make_config), entry, path)
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.PROTOCOL), status

    huge = b"\r\n".join([b"250-" + b"x" * 1000] * 2000) + b"\r\n250 ok"  # 2 MB EHLO reply
    listen(sinks, HuntFactory(Behaviour(ehlo_reply=huge)), "127.0.0.2")
    cfg = fast(make_config, relay={"defaultRoute": _route(sinks, "127.0.0.2"),
                                   "connectionCache": ConnectionCacheConfig(enabled=False)})
    (_, status), = deliver(cfg, entry, path)
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.PROTOCOL), status


class Drip(protocol.Protocol):
    """Sends an endless greeting line one byte at a time."""

    def connectionMade(self) -> None:
        self.loop = task.LoopingCall(self._drip)
        self.loop.start(0.05)

    def _drip(self) -> None:
        assert self.transport is not None
        self.transport.write(b"2")

    def connectionLost(self, reason: Any = None) -> None:
        if self.loop.running:
            self.loop.stop()


def test_dripping_peer_is_bounded_by_read_timeout(sinks: Any, make_config: Any,
                                                  tmp_path: Path) -> None:
    listen(sinks, protocol.Factory.forProtocol(Drip))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    started = time.monotonic()
    (_, status), = deliver(fast(make_config, read_ms=500), entry, path)
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.TIMEOUT), status
    assert time.monotonic() - started < 5


def test_tls_handshake_garbage_is_a_transient_tls_failure(sinks: Any, make_config: Any,
                                                          tls_context: Any,
                                                          tmp_path: Path) -> None:
    def fake_starttls(p: HuntSink, _: str) -> bool:
        p.send(b"220 2.0.0 go ahead")
        p.garbage = True  # type: ignore[attr-defined]
        return True

    sink = listen(sinks, HuntFactory(Behaviour(tls=tls_context),
                                     hooks={"STARTTLS": fake_starttls}))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    (_, status), = deliver(fast(make_config), entry, path)
    assert (status.kind, status.reason) == (FailureKind.TRANSIENT, Reason.TLS), status
    assert not any(c.startswith("MAIL") for c in sink.sessions[0].commands)


def test_ehlo_421_defers_without_helo(sinks: Any, make_config: Any, tmp_path: Path) -> None:
    sink = listen(sinks, HuntFactory(Behaviour(ehlo_reply=b"421 4.3.2 try later")))
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    (_, status), = deliver(fast(make_config), entry, path)
    assert status.kind is FailureKind.TRANSIENT and status.code == 421
    assert not any(c.startswith("HELO") for c in sink.sessions[0].commands)


def test_long_dotted_lines_arrive_intact(sinks: Any, make_config: Any, tmp_path: Path) -> None:
    sink = listen(sinks, HuntFactory())
    body = b"Subject: x\r\n\r\n." + b"y" * 2000 + b"\r\n..\r\n.\r\nend\r\n"
    entry, path = make_entry(tmp_path, ["a@normal.test"], body)
    assert deliver(fast(make_config), entry, path)[0][1].ok
    (txn,) = sink.transactions
    assert txn.body == body and txn.raw.count(b"\r\n...\r\n") == 1


def test_cached_session_closed_after_rset_is_not_failed_permanently(
        sinks: Any, make_config: Any, tmp_path: Path) -> None:
    from twisted.internet import reactor

    sink = listen(sinks, HuntFactory())
    cfg = fast(make_config, relay={"connectionCache": ConnectionCacheConfig(
        enabled=True, idleSeconds=30, maxUses=10)})
    relay = on_reactor(RelayDelivery, cfg, reactor)
    entry, path = make_entry(tmp_path, ["a@normal.test"], BODY)
    assert on_reactor(relay.deliver, entry, path, list(entry.pending))[0][1].ok

    def rset_then_close(p: HuntSink, _: str) -> bool:
        p.send(b"250 2.0.0 ok")
        close(p)
        return True

    sink.hooks["RSET"] = rset_then_close
    (_, status), = on_reactor(relay.deliver, entry, path, list(entry.pending))
    assert status.ok or status.kind is FailureKind.TRANSIENT, status
    assert len(sink.transactions) <= 1 + int(status.ok)
    on_reactor(relay.close_idle)
