"""Outbound connection cache: later messages to the same target reuse an idle session (RSET,
then the transaction) instead of connecting, greeting, EHLO-ing and QUIT-ting each time."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from helpers import on_reactor, wait_until
from outbound_sink import Behaviour
from outbound_support import make_entry

from kotlin_smtp_py.config import ConnectionCacheConfig
from kotlin_smtp_py.outbound.relay import RelayDelivery

BODY = b"From: a@origin.test\r\nSubject: t\r\n\r\nhello\r\n"


def cached(make_config: Any, idle: float = 30.0, max_uses: int = 100, **kw: Any) -> Any:
    from twisted.internet import reactor

    cfg = make_config(relay={"connectionCache": ConnectionCacheConfig(
        enabled=True, idleSeconds=idle, maxUses=max_uses)}, **kw)
    return on_reactor(RelayDelivery, cfg, reactor)


def send(relay: RelayDelivery, tmp_path: Path, rcpt: str) -> Any:
    entry, path = make_entry(tmp_path, [rcpt], BODY)
    return on_reactor(relay.deliver, entry, path, list(entry.pending))


def test_sequential_messages_share_one_session_then_it_quits_when_idle(
        sinks: Any, make_config: Any, tmp_path: Path) -> None:
    sink = sinks.start()
    relay = cached(make_config, idle=0.5)
    for i in range(3):
        assert send(relay, tmp_path, f"r{i}@normal.test")[0][1].ok
    assert len(sink.sessions) == 1
    session = sink.sessions[0]
    assert [t.rcpts for t in session.transactions] == [
        [f"RCPT TO:<r{i}@normal.test>"] for i in range(3)]
    assert session.commands.count("EHLO client.test") == 1
    assert session.commands.count("RSET") == 2  # before the 2nd and 3rd transaction
    assert relay.sessions is not None and relay.sessions.reused == 2
    wait_until(lambda: session.commands[-1] == "QUIT", timeout=10,
               message="idle session closed with QUIT")


def test_a_session_the_peer_dropped_is_replaced_without_a_failure(
        sinks: Any, make_config: Any, tmp_path: Path) -> None:
    sink = sinks.start()
    relay = cached(make_config)
    assert send(relay, tmp_path, "a@normal.test")[0][1].ok
    on_reactor(lambda: sink.protocols[0].transport.loseConnection())
    results = send(relay, tmp_path, "b@normal.test")
    assert results[0][1].ok, results
    assert len(sink.sessions) == 2
    assert [len(s.transactions) for s in sink.sessions] == [1, 1]
    on_reactor(relay.close_idle)
    wait_until(lambda: sink.sessions[1].commands[-1] == "QUIT", message="QUIT at close_idle")


def test_max_uses_bounds_transactions_per_connection(
        sinks: Any, make_config: Any, tmp_path: Path) -> None:
    sink = sinks.start()
    relay = cached(make_config, max_uses=2)
    for i in range(5):
        assert send(relay, tmp_path, f"r{i}@normal.test")[0][1].ok
    assert [len(s.transactions) for s in sink.sessions] == [2, 2, 1]
    assert sink.sessions[0].commands[-1] == "QUIT"
    on_reactor(relay.close_idle)


def test_refusals_do_not_spoil_the_session_but_a_421_does(
        sinks: Any, make_config: Any, tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(rcpt={
        "nobody@normal.test": b"550 5.1.1 no such user",
        "closing@normal.test": b"421 4.3.2 shutting down"}))
    relay = cached(make_config)
    assert send(relay, tmp_path, "nobody@normal.test")[0][1].code == 550
    assert send(relay, tmp_path, "a@normal.test")[0][1].ok
    assert len(sink.sessions) == 1  # a 5xx RCPT ended the transaction, not the session
    assert send(relay, tmp_path, "closing@normal.test")[0][1].code == 421
    assert send(relay, tmp_path, "b@normal.test")[0][1].ok
    assert len(sink.sessions) == 2  # after a 421 the connection is never reused
    on_reactor(relay.close_idle)


def test_tls_sessions_are_reused_inside_tls(sinks: Any, make_config: Any, tls_context: Any,
                                           tmp_path: Path) -> None:
    sink = sinks.start(behaviour=Behaviour(tls=tls_context))
    relay = cached(make_config, tls={"startTlsRequired": True})
    assert send(relay, tmp_path, "a@normal.test")[0][1].ok
    assert send(relay, tmp_path, "b@normal.test")[0][1].ok
    (session,) = sink.sessions
    assert session.tls and len(session.transactions) == 2
    assert session.commands.count("STARTTLS") == 1
    on_reactor(relay.close_idle)


def test_a_refused_rset_drops_the_cached_session_before_any_message_byte(
        sinks: Any, make_config: Any, tmp_path: Path) -> None:
    sink = sinks.start()
    relay = cached(make_config)
    assert send(relay, tmp_path, "a@normal.test")[0][1].ok
    sink.behaviour.rset_reply = b"421 4.3.2 going away"
    results = send(relay, tmp_path, "b@normal.test")
    assert results[0][1].ok, results
    first, second = sink.sessions
    # RSET, MAIL, RCPT and DATA went out together, but the message itself did not: the old
    # connection was dropped at the bad RSET reply and the message went over a new one.
    assert [t.rcpts for t in first.transactions] == [["RCPT TO:<a@normal.test>"]]
    assert "RSET" in first.commands
    assert [t.rcpts for t in second.transactions] == [["RCPT TO:<b@normal.test>"]]
    on_reactor(relay.close_idle)
