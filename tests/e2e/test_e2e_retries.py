"""A 4xx peer: retries on the task.Clock schedule, only for the failed recipient, then a DSN
in the (local) sender's Maildir after maxRetries."""

from __future__ import annotations

from e2e_support import Dsn, message, rcpt_lines, submit
from outbound_sink import Behaviour

BASE = 60  # spool.retryDelaySeconds in e2e_support
MAX_RETRIES = 3  # spool.maxRetries in e2e_support


def test_transient_failure_retried_on_schedule_then_bounced(e2e_server, sinks, certs) -> None:
    sink = sinks.start(behaviour=Behaviour(rcpt={"soft@normal.test": b"451 4.2.1 mailbox busy"}))
    server = e2e_server({"smtp": {"spool": {"delayWarningSeconds": 0}}})
    submit(server, certs, "carol@localhost", ["ok@normal.test", "soft@normal.test"],
           message("retry schedule"))

    def attempts() -> int:
        return len(sink.sessions)

    def entry_after(n: int) -> dict | None:
        got = [e for e in server.entries() if e["attempts"] == n]
        return got[0] if got else None

    # Attempt 1: both recipients offered; "ok" accepted and never offered again.
    first = server.pump(lambda: entry_after(1), message="the first attempt to be deferred")
    server.settle()
    assert attempts() == 1
    assert sorted(rcpt_lines(sink)[0]) == ["RCPT TO:<ok@normal.test>",
                                           "RCPT TO:<soft@normal.test>"]
    assert [t.rcpts for t in sink.transactions] == [["RCPT TO:<ok@normal.test>"]]
    assert [r["address"] for r in first["pending"]] == ["soft@normal.test"]

    # A delay notice (default NOTIFY = FAILURE,DELAY) arrives once, after the first attempt
    # (delayWarningSeconds 0).
    notices = server.pump(lambda: server.messages("carol"), message="the delay notice")
    delayed = Dsn(notices[0])
    assert delayed.one("Action") == "delayed"
    assert delayed.one("Final-Recipient") == "rfc822; soft@normal.test"

    entry = first
    for n in range(1, MAX_RETRIES + 1):
        now = server.now()
        delay = entry["next_attempt"] - now
        nominal = BASE * 2 ** (n - 1)
        assert 0.8 * nominal - 0.01 <= delay <= 1.2 * nominal + 0.01, (n, delay)
        # Just before the due time: a scheduler tick runs but delivers nothing.
        server.advance(delay - 1.5)
        server.settle()
        assert attempts() == n, f"retry {n} ran early"
        # At the due time: exactly one new attempt, for the failed recipient only.
        server.advance(1.5)
        server.pump(lambda n=n: attempts() == n + 1, message=f"retry {n}")
        server.settle()
        assert attempts() == n + 1
        assert rcpt_lines(sink)[n] == ["RCPT TO:<soft@normal.test>"]
        if n < MAX_RETRIES:
            entry = server.pump(lambda n=n: entry_after(n + 1), message=f"entry after {n + 1}")

    # maxRetries exhausted: the entry is gone and one failure DSN reached carol's Maildir.
    server.pump(lambda: len(server.messages("carol")) == 2 and not server.entries(),
                message="the failure DSN in carol's Maildir and an empty queue")
    server.settle()
    assert attempts() == MAX_RETRIES + 1
    assert len(sink.transactions) == 1  # "ok" was delivered once, never again
    notices = server.messages("carol")
    assert len(notices) == 2, "expected exactly one delay notice and one failure DSN"
    dsn = Dsn(notices[1])
    assert dsn.raw.startswith(b"Return-Path: <>\r\n")  # DSNs travel from the null sender
    assert dsn.content_type == "multipart/report"
    assert dsn.report_type == "delivery-status"
    assert dsn.msg["To"] == "<carol@localhost>"
    assert dsn.one("Reporting-MTA") == "dns; relay.e2e.test"
    assert dsn.one("Final-Recipient") == "rfc822; soft@normal.test"  # not ok@
    assert dsn.one("Action") == "failed"
    assert dsn.one("Status").startswith("5.")
    assert dsn.one("Remote-MTA") == "dns; mx.test"
    assert "451 4.2.1 mailbox busy" in dsn.one("Diagnostic-Code")
    assert b"Subject: retry schedule" in dsn.raw  # the original is returned
