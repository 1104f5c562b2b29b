"""Permanent failures and RFC 3461 NOTIFY, end to end: the DSN (or its absence) is observed in
the sender's local Maildir after real deliveries to a scripted peer."""

from __future__ import annotations

from e2e_support import Dsn, message, submit
from outbound_sink import Behaviour

HARD = {"hard@normal.test": b"550 5.1.1 <hard@normal.test>: no such user here"}


def test_permanent_failure_bounces_at_once(e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour(rcpt=HARD))
    server = e2e_server()
    submit(server, certs, "carol@localhost", ["hard@normal.test", "fine@normal.test"],
           message("hard bounce"))
    [raw] = server.pump(lambda: server.messages("carol"), message="the failure DSN")
    server.pump(lambda: not server.entries(), message="an empty queue")
    assert len(sink.sessions) == 1, "a 5xx recipient must not be retried"
    dsn = Dsn(raw)
    assert raw.startswith(b"Return-Path: <>\r\n")
    assert dsn.content_type == "multipart/report"
    assert dsn.one("Final-Recipient") == "rfc822; hard@normal.test"
    assert dsn.one("Action") == "failed"
    assert dsn.one("Status") == "5.1.1"
    assert dsn.one("Remote-MTA") == "dns; mx.test"
    assert dsn.one("Diagnostic-Code") == \
        "smtp; 550 5.1.1 <hard@normal.test>: no such user here"
    assert [t.rcpts for t in sink.transactions] == [["RCPT TO:<fine@normal.test>"]]


def _assert_no_dsn(server, sink) -> None:
    server.pump(lambda: sink.sessions and not server.entries(),
                message="the attempt and an empty queue")
    server.settle()
    # A DSN is queued before the failed recipient leaves its entry: an empty queue and an idle
    # scheduler mean any notice would be in the Maildir by now.
    assert server.messages("carol") == []
    assert server.entries() == []


def test_no_dsn_for_null_sender(e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour(rcpt=HARD))
    server = e2e_server()
    submit(server, certs, "", ["hard@normal.test"], message("null sender"))
    _assert_no_dsn(server, sink)
    assert [c for c in sink.sessions[0].commands if c.startswith("MAIL")][0].startswith(
        "MAIL FROM:<> ")


def test_notify_never_suppresses_the_dsn(e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour(rcpt=HARD))
    server = e2e_server()
    submit(server, certs, "carol@localhost", ["hard@normal.test"], message("never"),
           rcpt_options=("NOTIFY=NEVER",))
    _assert_no_dsn(server, sink)


def test_notify_success_goes_on_to_a_dsn_capable_peer_without_a_notice_from_us(
        e2e_server, sinks, certs) -> None:
    """RFC 3461 §5.2.2: the next hop got NOTIFY=SUCCESS and reports the delivery itself; a
    notice from us as well would tell the sender "delivered" twice (and too early)."""
    sink = sinks.start(behaviour=Behaviour())
    server = e2e_server()
    submit(server, certs, "carol@localhost", ["good@normal.test"], message("success"),
           rcpt_options=("NOTIFY=SUCCESS",))
    _assert_no_dsn(server, sink)
    assert len(sink.transactions) == 1
    [rcpt] = sink.transactions[0].rcpts
    assert rcpt.startswith("RCPT TO:<good@normal.test> ") and "NOTIFY=SUCCESS" in rcpt, rcpt


def test_notify_success_past_a_peer_without_dsn_yields_a_relayed_notice(
        e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour(extensions=["PIPELINING", "8BITMIME"]))
    server = e2e_server()
    submit(server, certs, "carol@localhost", ["good@normal.test"], message("relayed"),
           rcpt_options=("NOTIFY=SUCCESS",))
    [raw] = server.pump(lambda: server.messages("carol"), message="the relayed notice")
    assert len(sink.transactions) == 1
    assert sink.transactions[0].rcpts == ["RCPT TO:<good@normal.test>"]
    dsn = Dsn(raw)
    assert dsn.one("Final-Recipient") == "rfc822; good@normal.test"
    assert dsn.one("Action") == "relayed"
    assert dsn.one("Status").startswith("2.")
    assert dsn.one("Remote-MTA") == "dns; mx.test"


def test_notify_success_to_a_local_mailbox_and_a_local_list(e2e_server, sinks, certs) -> None:
    sinks.start(behaviour=Behaviour())
    server = e2e_server()
    (server.root / "lists" / "team").write_text("dave\n")
    submit(server, certs, "carol@localhost", ["dave@localhost", "team@localhost"],
           message("local success"), rcpt_options=("NOTIFY=SUCCESS",))
    notices = server.pump(lambda: (lambda m: m if len(m) == 2 else [])(
        server.messages("carol")), message="two success notices")
    actions = {Dsn(raw).one("Final-Recipient"): Dsn(raw).one("Action") for raw in notices}
    assert actions == {"rfc822; dave@localhost": "delivered",
                       "rfc822; team@localhost": "expanded"}
    assert len(server.messages("dave")) == 1  # one copy for dave and the list with dave


def test_notify_delay_gives_one_delay_notice(e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour(rcpt={"slow@normal.test": b"451 4.7.1 try later"}))
    server = e2e_server({"smtp": {"spool": {"delayWarningSeconds": 0}}})
    submit(server, certs, "carol@localhost", ["slow@normal.test"], message("delay"),
           rcpt_options=("NOTIFY=DELAY",))
    [raw] = server.pump(lambda: server.messages("carol"), message="the delay notice")
    dsn = Dsn(raw)
    assert dsn.one("Action") == "delayed"
    assert dsn.one("Status").startswith("4.")
    assert "451 4.7.1 try later" in dsn.one("Diagnostic-Code")
    assert len(sink.sessions) == 1
    # Two more failed attempts: no second notice.
    for n in (1, 2):
        server.settle()
        [entry] = server.entries()
        server.advance(entry["next_attempt"] - server.now())
        server.pump(lambda n=n: len(sink.sessions) == n + 1, message=f"retry {n}")
        server.pump(lambda n=n: [e for e in server.entries() if e["attempts"] == n + 1],
                    message=f"entry deferred after attempt {n + 1}")
    server.settle()
    assert len(server.messages("carol")) == 1, "the delay notice was sent more than once"


def test_delay_notice_waits_for_delay_warning_seconds(e2e_server, sinks, certs) -> None:
    """A deferral of a young message (greylisting) sends no delay notice; the first deferral
    once the message is delayWarningSeconds old does, once; the give-up bounces as usual."""
    sink = sinks.start(behaviour=Behaviour(rcpt={"slow@normal.test": b"451 4.7.1 try later"}))
    server = e2e_server({"smtp": {"spool": {"delayWarningSeconds": 100}}})
    submit(server, certs, "carol@localhost", ["slow@normal.test"], message("delay"))
    ages = []
    for n in (1, 2, 3):  # maxRetries 3: attempts at ~0, ~60 and ~180 s are deferrals
        server.pump(lambda n=n: [e for e in server.entries() if e["attempts"] == n],
                    message=f"entry deferred after attempt {n}")
        server.settle()
        [entry] = server.entries()
        ages.append(server.now() - entry["created"])
        if ages[-1] < 100:
            assert server.messages("carol") == [], f"a notice at age {ages[-1]:.0f}s"
        server.advance(entry["next_attempt"] - server.now())
    assert ages[0] < 100 <= ages[-1], ages
    [notice] = server.pump(lambda: server.messages("carol"), message="the delay notice")
    assert Dsn(notice).one("Action") == "delayed"
    server.pump(lambda: not server.entries(), message="the give-up after attempt 4")
    bounced = server.pump(lambda: server.messages("carol")[1:], message="the failure notice")
    assert [Dsn(raw).one("Action") for raw in bounced] == ["failed"]
    assert len(sink.sessions) == 4


def test_a_failing_dsn_never_produces_another(e2e_server, sinks, certs) -> None:
    """Loop freedom: the sender is remote and its MX refuses both the message and the DSN."""
    sink = sinks.start(behaviour=Behaviour(rcpt={
        "hard@normal.test": b"550 5.1.1 no such user",
        "carol@normal.test": b"550 5.1.1 sender mailbox gone"}))
    server = e2e_server()
    submit(server, certs, "carol@normal.test", ["hard@normal.test"], message("loop"))
    server.pump(lambda: len(sink.sessions) >= 2 and not server.entries(),
                message="the bounce attempt and an empty queue")
    server.settle()
    assert len(sink.sessions) == 2
    bounce = sink.sessions[1]
    assert any(c.startswith("MAIL FROM:<> ") for c in bounce.commands)
    assert any(c.startswith("RCPT TO:<carol@normal.test>") for c in bounce.commands)
    assert server.entries() == []
