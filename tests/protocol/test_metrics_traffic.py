"""SPEC §5 metrics driven by real SMTP traffic: scrape, send mail, scrape again, compare."""

from __future__ import annotations

import smtplib
from typing import Any

from helpers import wait_until
from protocol_support import Client, scrape_metrics


def scrape(port: int) -> dict[str, float]:
    return scrape_metrics(port)


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return after.get(name, 0.0) - before.get(name, 0.0)


def test_metrics_follow_real_traffic(make_server: Any) -> None:
    srv = make_server({"smtp": {"spool": {"maxRetries": 0}}})
    mport = srv.service.management_port.getHost().port
    before = scrape(mport)
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("a@remote.test", ["alice@localhost"], b"Subject: one\r\n\r\nx\r\n")
        s.sendmail("a@remote.test", ["alice@localhost", "bob@localhost"],
                   b"Subject: two\r\n\r\ny\r\n")
    c = Client(srv.port)  # a rejected message: bare LF
    c.reply()
    c.cmd("EHLO c.test")
    c.cmd("MAIL FROM:<a@remote.test>")
    c.cmd("RCPT TO:<alice@localhost>")
    c.cmd("DATA")
    c.send(b"Subject: bad\r\n\r\nbare\nlf\r\n.\r\n")
    assert c.reply()[0] == 550
    c.cmd("QUIT")
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        s.sendmail("carol@localhost", ["alice@localhost"], b"Subject: three\r\n\r\nz\r\n")
    srv.wait_messages("alice", 3)
    wait_until(lambda: srv.spool_entries() == [], message="spool drained")
    # The entry's files vanish before the scheduler counts the completion (the delete runs in a
    # thread), so wait for the counters themselves rather than for the empty spool alone.
    after = wait_until(lambda: (m := scrape(mport)) and
                       delta(m, before, "smtp_sessions_ended_total") >= 3 and
                       delta(m, before, "smtp_spool_completed_total") >= 3 and m,
                       message="sessions ended and completions counted")
    assert delta(after, before, "smtp_sessions_started_total") == 3
    assert delta(after, before, "smtp_messages_accepted_total") == 3
    assert delta(after, before, "smtp_messages_rejected_total") == 1
    assert delta(after, before, "smtp_spool_queued_total") == 3
    assert delta(after, before, "smtp_spool_completed_total") == 3
    delivered = 'smtp_spool_delivery_recipients_total{result="delivered"}'
    assert delta(after, before, delivered) == 4  # alice ×3, bob ×1
    assert after["smtp_connections_active"] == 0
    assert after["smtp_spool_pending"] == 0
    age = 'smtp_spool_queue_age_seconds_count{outcome="completed"}'
    assert delta(after, before, age) == 3


def test_spool_pending_and_failures_by_reason(make_server: Any) -> None:
    # Queued, not delivered before the 250 (local.direct), so there is a queue to watch.
    srv = make_server({"smtp": {"spool": {"maxRetries": 0, "directLocalDelivery": False}}})
    mport = srv.service.management_port.getHost().port
    srv.service.scheduler.paused = True
    with smtplib.SMTP("127.0.0.1", srv.port) as s:
        for _ in range(3):
            s.sendmail("a@remote.test", ["bob@localhost"], b"Subject: p\r\n\r\nx\r\n")
    assert scrape(mport)["smtp_spool_pending"] == 3
    # bob's mailbox path becomes a regular file: bob no longer exists, so each delivery fails
    # permanently (recipient); each DSN to the remote sender then fails too (relay disabled:
    # policy) and is dropped without a DSN of its own.
    import shutil

    shutil.rmtree(srv.root / "mailboxes" / "bob")
    (srv.root / "mailboxes" / "bob").write_text("not a directory")
    srv.service.scheduler.paused = False
    after = wait_until(lambda: (m := scrape(mport)) and
                       m.get("smtp_spool_dropped_total", 0) >= 6 and
                       m.get("smtp_spool_pending", 1) == 0 and m, message="drops")
    failures = {k: v for k, v in after.items()
                if k.startswith("smtp_spool_delivery_failure_total{")}
    assert failures == {
        'smtp_spool_delivery_failure_total{domain="other",kind="permanent",reason="recipient"}':
            3.0,
        'smtp_spool_delivery_failure_total{domain="other",kind="permanent",reason="policy"}':
            3.0}
    assert after['smtp_spool_delivery_recipients_total{result="permanent_failure"}'] == 6
    assert after["smtp_spool_dropped_total"] == 6
    assert after['smtp_spool_queue_age_seconds_count{outcome="dropped"}'] == 6
